"""Offline RULER-style task generator (11 tasks: niah x8, vt, cwe, fwe), see docs/ruler.md.

``make_ruler(task, max_seq_length, n)`` returns rows ``{task, index, context, question, answer_prefix,
answers, max_new_tokens, n_tokens, depth, haystack, max_seq_length}`` with RULER's templates, needles,
haystacks and answers, split where kvpress splits RULER's input: the question starts at the last
``What is / What are all the special magic`` (niah) or ``Question:`` (vt, cwe, fwe); the answer prefix
starts at ``The special magic`` (niah) or ``Answer:`` (others). So the question keeps the space that
precedes the answer prefix, exactly as in kvpress's ``simonjegou/ruler`` dataset.

Length fitting: for every sample the haystack size is searched (galloping from a fixed start, then
interpolation with a bisection safeguard) for the largest size with
``count_tokens(context + question + answer_prefix) + max_new_tokens <= max_seq_length``; every probe
counts the whole prompt, so ``n_tokens`` is always the true count. Granularity (how far below the
budget a prompt can end up): one noise sentence (niah noise, vt), one essay word, one distractor needle
line (niah needle haystack), one numbered list entry (cwe), one step of the Zipf total (fwe).

Deviations from RULER (which draws everything from one global stream): each sample uses its own
``random.Random(seed + index)``; fixed-permutation shuffles use ``random.Random(seed)`` as RULER does;
keys, values and variable names within a sample are distinct; distractor keys never equal a real key;
CWE few-shot and real words are disjoint; ``adjective-noun`` words are drawn as a uniform
(adjective, noun) pair; sentence splitting is a regex (see haystack.py); empty essay segments are not
joined (no double spaces); noise and essay haystacks may end in a partial block / mid-sentence.
"""

from __future__ import annotations

import json
import math
import random
import re
import string
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from obinfer.eval import haystack as hs
from obinfer.storage import atomic_write_text

CountFn = Callable[[str], int]

DEPTHS: tuple[int, ...] = tuple(round(100 * i / 39) for i in range(40))  # round(linspace(0, 100, 40))
NEEDLE = "One of the special magic {type_v} for {key} is: {value}."
NIAH_HEAD = (
    "Some special magic {type_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_v} afterwards.\n"
)
NIAH_QUESTION = "What are all the special magic {type_v} for {query} mentioned in the provided text? "
NIAH_PREFIX = "The special magic {type_v} for {query} mentioned in the provided text are"
VT_HEAD = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
VT_QUESTION = "Question: Find all variables that are assigned the value {query} in the text above. "
VT_PREFIX = (
    "Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables "
    "are assigned the value {query}, they are: "
)
CWE_HEAD = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n"
)
CWE_QUESTION = "Question: What are the 10 most common words in the above list? "
CWE_PREFIX = "Answer: The top 10 words that appear most often in the list are:"
FWE_HEAD = (
    "Read the following coded text and track the frequency of each coded word. "
    "Find the three most frequently appeared coded words. "
)
FWE_QUESTION = (
    "Question: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text? "
)
FWE_PREFIX = "Answer: According to the coded text above, the three most frequently appeared words are:"

VT_HOPS, VT_ICL_BUDGET = 4, 500
CWE_NUM_CW = 10
ZETA2 = math.pi**2 / 6


@dataclass(frozen=True)
class TaskConfig:
    """One RULER task: generator kind, haystack and needle/key/value settings."""

    name: str
    kind: str  # "niah" | "vt" | "cwe" | "fwe"
    max_new_tokens: int
    haystack: str | None = None  # "noise" | "needle" | "essay" (niah, vt)
    type_k: str = "words"
    type_v: str = "numbers"
    num_k: int = 1
    num_v: int = 1
    num_q: int = 1


def _niah(name: str, hay: str, **kw: Any) -> TaskConfig:
    return TaskConfig(name, "niah", 128, hay, **kw)


TASKS: dict[str, TaskConfig] = {
    t.name: t
    for t in (
        _niah("niah_single_1", "noise"),
        _niah("niah_single_2", "essay"),
        _niah("niah_single_3", "essay", type_v="uuids"),
        _niah("niah_multikey_1", "essay", num_k=4),
        _niah("niah_multikey_2", "needle"),
        _niah("niah_multikey_3", "needle", type_k="uuids", type_v="uuids"),
        _niah("niah_multivalue", "essay", num_v=4),
        _niah("niah_multiquery", "essay", num_k=4, num_q=4),  # RULER: num_k = max(num_k, num_q)
        TaskConfig("vt", "vt", 30, "noise"),
        TaskConfig("cwe", "cwe", 120),
        TaskConfig("fwe", "fwe", 50),
    )
}


def simple_count_tokens(text: str) -> int:
    """A deterministic stand-in tokenizer: words and single punctuation marks."""
    return len(re.findall(r"\w+|[^\w\s]", text))


# ---------------------------------------------------------------------------------------- fitting
def fit_size(measure: Callable[[int], int], budget: int, lo: int, guess: int, hi: int | None = None) -> int:
    """Largest size ``s`` in ``[lo, hi]`` with ``measure(s) <= budget`` and ``measure(s + 1) > budget``.

    ``measure`` should be (nearly) non-decreasing. Gallops up from ``guess`` with a linear estimate
    until a too-long size is found, then narrows the bracket by interpolation, falling back to
    bisection when an interpolation step does not halve it.

    Raises:
        ValueError: if even ``measure(lo)`` exceeds the budget.
    """
    memo: dict[int, int] = {}

    def f(s: int) -> int:
        if s not in memo:
            memo[s] = measure(s)
        return memo[s]

    if f(lo) > budget:
        raise ValueError(f"the shortest prompt has {f(lo)} tokens, more than the budget of {budget}")
    if hi is not None and hi <= lo:
        return lo
    good, bad, streak = lo, None, 0
    s = max(guess, lo + 1) if hi is None else min(max(guess, lo + 1), hi)
    while bad is None and (hi is None or good < hi):
        if f(s) > budget:
            bad = s
            break
        good, streak = s, streak + 1
        slope = max((f(s) - f(lo)) / (s - lo), 1e-3)
        step = (int((budget - f(s)) / slope) + 1) << (streak - 1)  # grows if the slope keeps misleading
        s = s + step if hi is None else min(s + step, hi)
    if bad is None:
        return good
    return _narrow(f, budget, good, bad)


def _narrow(f: Callable[[int], int], budget: int, good: int, bad: int) -> int:
    interp = True
    while bad - good > 1:
        width, tg, tb = bad - good, f(good), f(bad)
        if interp and tb > tg:
            s = min(max(good + int((budget - tg) * width / (tb - tg)), good + 1), bad - 1)
        else:
            s = (good + bad) // 2
        if f(s) <= budget:
            good = s
            if interp and s + 1 < bad:  # interpolation usually lands just below the edge
                good, bad = (s + 1, bad) if f(s + 1) <= budget else (good, s + 1)
        else:
            bad = s
            if interp and s - 1 > good:
                good, bad = (s - 1, bad) if f(s - 1) <= budget else (good, s - 1)
        interp = not interp or 2 * (bad - good) <= width
    return good


# ----------------------------------------------------------------------------------------- values
def _random_value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    if kind == "words":
        adjs, nouns = hs.word_list("adjective"), hs.word_list("noun")
        i = rng.randrange(len(adjs) * len(nouns))
        return f"{adjs[i // len(nouns)]}-{nouns[i % len(nouns)]}"
    raise ValueError(f"unknown needle type {kind!r}")


def _distinct(
    rng: random.Random, draw: Callable[[random.Random], str], k: int, avoid: Iterable[str] = ()
) -> list[str]:
    """``k`` distinct draws, none of them in ``avoid``."""
    out: list[str] = []
    seen = set(avoid)
    while len(out) < k:
        x = draw(rng)
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


# ------------------------------------------------------------------------------------------- niah
@dataclass
class _Sample:
    """What a builder returns for one haystack size."""

    context: str
    question: str
    answer_prefix: str
    answers: list[str]
    depth: list[float]

    @property
    def prompt(self) -> str:
        return self.context + self.question + self.answer_prefix


BuildFn = Callable[[int], _Sample]


def _insert_lines(lines: list[str], items: list[str], rng: random.Random) -> tuple[list[str], list[float]]:
    """RULER's line insertion: items go before lines at ``sorted(sample(range(n), k), reverse=True)``."""
    n = len(lines)
    idx = sorted(rng.sample(range(n), len(items)), reverse=True)
    out = list(lines)
    for i, item in zip(idx, items, strict=True):
        out.insert(i, item)
    return out, [round(100 * i / n, 2) for i in sorted(idx)]


def _insert_sentences(text: str, needles: list[str], rng: random.Random) -> tuple[str, list[float]]:
    """RULER's essay insertion: needle j goes at sentence ``int(#sents * d_j / 100)``, d sampled from DEPTHS."""
    sents = hs.split_sentences(text)
    depths = sorted(rng.sample(DEPTHS, len(needles)))
    cuts = [0] + [int(len(sents) * d / 100) for d in depths] + [len(sents)]
    pieces: list[str] = []
    for j in range(1, len(cuts)):
        pieces.append(" ".join(sents[cuts[j - 1] : cuts[j]]))
        if j - 1 < len(needles):
            pieces.append(needles[j - 1])
    return " ".join(p for p in pieces if p), [float(d) for d in depths]


def _niah_builder(
    cfg: TaskConfig, rng: random.Random, seed: int, hay: str, words: tuple[str, ...]
) -> tuple[BuildFn, int, int]:
    """Keys, values, needles and query of one sample; the haystack is built per size."""
    num_k = max(cfg.num_k, cfg.num_q)
    keys = _distinct(rng, lambda r: _random_value(r, cfg.type_k), num_k)
    values = _distinct(rng, lambda r: _random_value(r, cfg.type_v), num_k * cfg.num_v)
    values_by_key = [values[i * cfg.num_v : (i + 1) * cfg.num_v] for i in range(num_k)]
    needles = [
        NEEDLE.format(type_v=cfg.type_v, key=k, value=v)
        for k, vs in zip(keys, values_by_key, strict=True)
        for v in vs
    ]
    random.Random(seed).shuffle(needles)
    queried = rng.sample(range(num_k), cfg.num_q)
    answers = [v for i in queried for v in values_by_key[i]]
    qkeys = [keys[i] for i in queried]
    query = ", ".join(qkeys[:-1]) + ", and " + qkeys[-1] if len(qkeys) > 1 else qkeys[0]
    head, question, prefix, type_v = NIAH_HEAD, NIAH_QUESTION, NIAH_PREFIX, cfg.type_v
    if cfg.num_q * cfg.num_v == 1:  # RULER's singular rewrite, applied to the raw template
        head, question, prefix = (
            t.replace("Some", "A").replace("are all", "is").replace("are", "is")
            for t in (head, question, prefix)
        )
        type_v = type_v[:-1]
    head, question, prefix = (t.format(type_v=type_v, query=query) for t in (head, question, prefix))
    layout_seed, distractor_seed = rng.getrandbits(64), rng.getrandbits(64)

    def build(size: int) -> _Sample:
        lrng = random.Random(layout_seed)
        if hay == "essay":
            body, depth = _insert_sentences(hs.essay_text(words, size), needles, lrng)
        else:
            if hay == "noise":
                lines = hs.noise_lines(size)
            else:
                drng = random.Random(distractor_seed)
                dkeys = _distinct(drng, lambda r: _random_value(r, cfg.type_k), size, avoid=keys)
                lines = [
                    NEEDLE.format(type_v=cfg.type_v, key=k, value=_random_value(drng, cfg.type_v))
                    for k in dkeys
                ]
            lines, depth = _insert_lines(lines, needles, lrng)
            body = "\n".join(lines)
        return _Sample(head + body + "\n", question, prefix, list(answers), depth)

    n_needles = len(needles)
    if hay == "essay":
        return build, 1, 400
    if hay == "noise":
        return build, 5 * (n_needles - 1) + 1, 100
    return build, n_needles, 20


# --------------------------------------------------------------------------------------------- vt
def _vt_names(rng: random.Random, k: int, n: int, avoid: Iterable[str] = ()) -> list[str]:
    return _distinct(rng, lambda r: "".join(r.choices(string.ascii_uppercase, k=k)), n, avoid)


def _vt_text(lines: list[str], names: list[str], value: str, rng: random.Random) -> tuple[str, list[float]]:
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(VT_HOPS)]
    pos = sorted(rng.sample(range(len(lines)), len(chain)))
    out = list(lines)
    for j, p in enumerate(pos):
        out.insert(p + j, chain[j])
    return "\n".join(out).replace(". \n", ".\n"), [round(100 * p / len(lines), 2) for p in pos]


def _vt_prompt(body: str, value: str) -> tuple[str, str, str]:
    q = VT_QUESTION.format(query=value)
    return VT_HEAD + body + "\n", q, VT_PREFIX.format(num_v=VT_HOPS + 1, query=value)


def _vt_icl_layout(seed: int, count: CountFn) -> tuple[int, int]:
    """Size (noise sentences) and layout seed of the in-context example: fitted once, <= 500 tokens."""
    rng = random.Random(seed)
    names, layout_seed = _vt_names(rng, 3, VT_HOPS + 1), rng.getrandbits(64)

    def measure(size: int) -> int:
        body, _ = _vt_text(hs.noise_lines(size), names, "12345", random.Random(layout_seed))
        return count("".join(_vt_prompt(body, "12345")))

    return fit_size(measure, VT_ICL_BUDGET, 5 * VT_HOPS + 1, 60), layout_seed


def _vt_builder(rng: random.Random, icl: tuple[int, int]) -> tuple[BuildFn, int, int]:
    """One chain of 5 names (4 hops) in a noise haystack, after a re-randomised in-context example."""
    names = _vt_names(rng, 5, VT_HOPS + 1)
    value = str(rng.randrange(10000, 99999))
    icl_names = _vt_names(rng, 3, VT_HOPS + 1)
    icl_value = str(rng.randrange(10000, 99999))
    while icl_value == value:
        icl_value = str(rng.randrange(10000, 99999))
    icl_body, _ = _vt_text(hs.noise_lines(icl[0]), icl_names, icl_value, random.Random(icl[1]))
    example = "".join(_vt_prompt(icl_body, icl_value)) + " " + " ".join(icl_names) + "\n"
    layout_seed = rng.getrandbits(64)

    def build(size: int) -> _Sample:
        body, depth = _vt_text(hs.noise_lines(size), names, value, random.Random(layout_seed))
        context, question, prefix = _vt_prompt(body, value)
        return _Sample(example + "\n" + context, question, prefix, list(names), depth)

    return build, 5 * VT_HOPS + 1, 100


# -------------------------------------------------------------------------------------------- cwe
def _cwe_list(
    common: list[str], uncommon: list[str], f_cw: int, n_uncommon: int, f_ucw: int, seed: int
) -> str:
    """Numbered list: common words x f_cw, ``n_uncommon`` entries of uncommon words x f_ucw (the last
    uncommon word may appear fewer times), shuffled with ``Random(seed)``."""
    u = -(-n_uncommon // f_ucw)
    items = common * f_cw + uncommon[: max(u - 1, 0)] * f_ucw
    if u:
        items += [uncommon[u - 1]] * (n_uncommon - (u - 1) * f_ucw)
    random.Random(seed).shuffle(items)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))


def _cwe_builder(rng: random.Random, seed: int, max_seq_length: int) -> tuple[BuildFn, int, int, int]:
    """A one-shot example, then the real list; the size is the number of uncommon entries."""
    pool = list(hs.common_words_pool())
    random.Random(seed).shuffle(pool)
    (fs_n, fs_cw, fs_ucw), (f_cw, f_ucw) = (
        ((40, 10, 3), (30, 3)) if max_seq_length >= 4096 else ((20, 3, 1), (6, 1))
    )
    perm = rng.sample(pool, len(pool))
    fs_words, words = perm[:fs_n], perm[fs_n:]
    fs_list = _cwe_list(
        fs_words[:CWE_NUM_CW], fs_words[CWE_NUM_CW:], fs_cw, (fs_n - CWE_NUM_CW) * fs_ucw, fs_ucw, seed
    )
    fs_answer = " ".join(f"{i + 1}. {w}" for i, w in enumerate(fs_words[:CWE_NUM_CW]))
    example = CWE_HEAD + fs_list + "\n" + CWE_QUESTION + CWE_PREFIX + " " + fs_answer + "\n"
    common, uncommon = words[:CWE_NUM_CW], words[CWE_NUM_CW:]

    def build(size: int) -> _Sample:
        body = _cwe_list(common, uncommon, f_cw, size, f_ucw, seed)
        return _Sample(example + CWE_HEAD + body + "\n", CWE_QUESTION, CWE_PREFIX, list(common), [])

    return build, 1, 200, len(uncommon) * f_ucw


# -------------------------------------------------------------------------------------------- fwe
def _fwe_counts(total: int, vocab_size: int) -> list[int]:
    """Zipf(2) counts: the word of rank k appears ``int(total * k**-2 / zeta(2))`` times."""
    return [int(total * (k**-2.0) / ZETA2) for k in range(1, vocab_size + 1)]


def _fwe_builder(rng: random.Random, seed: int, max_seq_length: int) -> tuple[BuildFn, int, int]:
    """Coded words with Zipf(2) counts; the size is the Zipf total N."""
    vocab_size = (max_seq_length - TASKS["fwe"].max_new_tokens) // 50
    if vocab_size < 5:
        raise ValueError(f"max_seq_length={max_seq_length} is too small for fwe (needs >= 300)")
    vocab = sorted(_distinct(rng, lambda r: "".join(r.choices(string.ascii_lowercase, k=6)), vocab_size))
    random.Random(seed).shuffle(vocab)
    vocab[0] = "..."  # the top-ranked word is noise

    def build(size: int) -> _Sample:
        words = [w for w, c in zip(vocab, _fwe_counts(size, vocab_size), strict=True) for _ in range(c)]
        random.Random(seed).shuffle(words)
        return _Sample(FWE_HEAD + " ".join(words) + "\n", FWE_QUESTION, FWE_PREFIX, vocab[1:4], [])

    return build, _fwe_min_total(vocab_size), max_seq_length // 6


def _fwe_min_total(vocab_size: int) -> int:
    """Smallest Zipf total whose answer words (ranks 2-4) are strictly ordered and above rank 5."""
    total = 1
    while True:
        c = _fwe_counts(total, vocab_size)
        if c[1] > c[2] > c[3] > c[4]:
            return total
        total += 1


# ------------------------------------------------------------------------------------------ driver
def _resolve(
    task: str, noise_fallback: bool, essays_dir: Path | str | None
) -> tuple[TaskConfig, str | None, tuple]:
    if task not in TASKS:
        raise ValueError(f"unknown RULER task {task!r}; valid tasks: {', '.join(TASKS)}")
    cfg = TASKS[task]
    if cfg.haystack != "essay":
        return cfg, cfg.haystack, ()
    try:
        return cfg, "essay", hs.essay_words(essays_dir)
    except hs.EssaysMissing:
        if not noise_fallback:
            raise
        return cfg, "noise", ()


@dataclass
class _Builder:
    """One sample as a function of its haystack size, with the size range to search."""

    build: BuildFn
    lo: int
    guess: int
    hi: int | None = None


def _sample_builders(
    task: str,
    max_seq_length: int,
    n: int,
    seed: int,
    count_tokens: CountFn,
    noise_fallback: bool,
    essays_dir: Path | str | None,
) -> tuple[TaskConfig, str | None, Iterator[_Builder]]:
    """Task config, haystack kind actually used, and a lazy builder per sample (used by make_ruler)."""
    cfg, hay, words = _resolve(task, noise_fallback, essays_dir)
    if n < 0 or max_seq_length <= cfg.max_new_tokens:
        raise ValueError(f"need n >= 0 and max_seq_length > {cfg.max_new_tokens} for {task}")
    icl = _vt_icl_layout(seed, count_tokens) if cfg.kind == "vt" else (0, 0)

    def gen() -> Iterator[_Builder]:
        for index in range(n):
            rng = random.Random(seed + index)
            if cfg.kind == "niah":
                yield _Builder(*_niah_builder(cfg, rng, seed, hay or "noise", words))
            elif cfg.kind == "vt":
                yield _Builder(*_vt_builder(rng, icl))
            elif cfg.kind == "cwe":
                yield _Builder(*_cwe_builder(rng, seed, max_seq_length))
            else:
                yield _Builder(*_fwe_builder(rng, seed, max_seq_length))

    return cfg, hay, gen()


def make_ruler(
    task: str,
    max_seq_length: int,
    n: int,
    seed: int = 42,
    count_tokens: CountFn = simple_count_tokens,
    noise_fallback: bool = False,
    essays_dir: Path | str | None = None,
) -> list[dict[str, Any]]:
    """Generate ``n`` samples of one RULER task fitted to ``max_seq_length`` tokens.

    Args:
        task: one of :data:`TASKS`.
        max_seq_length: prompt tokens (``count_tokens``, no special tokens, before any chat template)
            plus ``max_new_tokens`` must not exceed this.
        n: number of samples; sample ``i`` uses ``random.Random(seed + i)``.
        seed: base seed.
        count_tokens: the model tokenizer's token count (default: a regex word/punctuation count).
        noise_fallback: essay tasks use the noise haystack when the essays are missing
            (the row records ``haystack: "noise"``) instead of raising.
        essays_dir: where the essays live (default: :func:`haystack.default_essays_dir`).

    Returns:
        Rows ``{task, index, context, question, answer_prefix, answers, max_new_tokens, n_tokens,
        depth, haystack, haystack_size, max_seq_length}``. ``depth`` lists the needle / chain depths in
        percent of the haystack, in text order (empty for cwe and fwe); ``haystack_size`` is the fitted
        size (noise sentences, essay words, distractor lines, uncommon list entries or Zipf total).

    Raises:
        ValueError: unknown task, bad sizes, or a budget too small for the task.
        haystack.EssaysMissing: an essay task without essays and without ``noise_fallback``.
    """
    cfg, hay, builders = _sample_builders(
        task, max_seq_length, n, seed, count_tokens, noise_fallback, essays_dir
    )
    budget = max_seq_length - cfg.max_new_tokens
    rows: list[dict[str, Any]] = []
    for index, b in enumerate(builders):
        try:  # each sample is searched from the same start, so row i depends on seed + i only
            size = fit_size(lambda s, b=b: count_tokens(b.build(s).prompt), budget, b.lo, b.guess, b.hi)
        except ValueError as e:
            raise ValueError(f"max_seq_length={max_seq_length} is too small for {task}: {e}") from None
        if b.hi is not None and size == b.hi:
            raise ValueError(
                f"{task} at {max_seq_length} tokens needs more distinct words than the offline pool"
            )
        sample = b.build(size)
        row = _row(cfg, index, sample, count_tokens(sample.prompt), hay, max_seq_length)
        rows.append(row | {"haystack_size": size})
    return rows


def _row(
    cfg: TaskConfig, index: int, s: _Sample, n_tokens: int, hay: str | None, max_len: int
) -> dict[str, Any]:
    return {
        "task": cfg.name,
        "index": index,
        "context": s.context,
        "question": s.question,
        "answer_prefix": s.answer_prefix,
        "answers": s.answers,
        "max_new_tokens": cfg.max_new_tokens,
        "n_tokens": n_tokens,
        "depth": s.depth,
        "haystack": hay,
        "max_seq_length": max_len,
    }


# ------------------------------------------------------------------------------------------- jsonl
def save_jsonl(rows: Iterable[dict[str, Any]], path: Path | str) -> Path:
    """Write rows as JSON lines (UTF-8, one object per line), atomically; creates parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def load_jsonl(path: Path | str) -> list[dict[str, Any]]:
    """Read JSON lines written by :func:`save_jsonl` (blank lines are skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such JSONL file: {path}")
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
