"""Tokenizers: byte-level BPE through tiktoken, SentencePiece, chat templates, stop tokens, streaming.

`load_tokenizer(model_dir)` looks in a checkpoint directory for, in this order:

- ``tokenizer.json`` holding a byte-level BPE (GPT-2 style: Llama-3, Qwen-2.5, SmolLM2). The GPT-2
  byte-to-unicode vocabulary is turned back into raw bytes, every merge gives its token a rank in merge
  order, and tiktoken runs the BPE. The pre-tokenizer regex is chosen from the ``pre_tokenizer`` entry.
- ``tokenizer.model`` in tiktoken format (Llama-3's original release: ``<base64 bytes> <rank>`` per line)
  with the Llama-3 split pattern and 256 special tokens after the ranks.
- ``tokenizer.model`` holding a SentencePiece model (Llama-2, Mistral), run by ``sentencepiece``.

Added and special tokens (``<|im_start|>``, ``<|eot_id|>``, ...) are matched in raw text, as Hugging
Face does (tiktoken's ``allowed_special="all"``). ``tokenizer_config.json`` and ``generation_config.json``
give the BOS behaviour, stop tokens and chat template; the template is rendered with jinja2 the way
Hugging Face's ``apply_chat_template(..., tokenize=False)`` does.

Example::

    tok = load_tokenizer("weights/smollm2-135m-instruct")
    ids = tok.encode_chat([{"role": "user", "content": "Hi!"}])
    dec = tok.stream_decoder()
    text = "".join(dec.push(i) for i in ids) + dec.flush()
"""

from __future__ import annotations

import base64
import json
import logging
import re
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import regex
import tiktoken

from obinfer.errors import ObinferError

log = logging.getLogger(__name__)

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_WHOLE_TEXT = r"[\s\S]+"  # no split: one piece per call
# Chat-model end markers that stop generation whenever the vocabulary has them as added tokens.
_END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|endoftext|>", "<|end_of_text|>")
_TEMPLATE_TOKENS = tuple(f"{name}_token" for name in ("bos", "eos", "unk", "sep", "pad", "cls", "mask"))
DEFAULT_SENTINEL = "<<OBINFER_USER_TEXT>>"


class TokenizerError(ObinferError, ValueError):
    """A tokenizer file is missing, malformed or of an unsupported kind."""


class _Unsupported(TokenizerError):
    """tokenizer.json is valid but not a byte-level BPE (a tokenizer.model may still serve)."""


def digits_pattern(individual: bool = True) -> str:
    """The single-regex form of HF's ``Sequence[Digits(individual_digits), ByteLevel(use_regex=True)]``.

    Digits come first as their own alternative, the GPT-2 digit-run alternative is dropped, and the
    whitespace look-ahead treats a digit like whitespace so that spaces before a digit stay together.
    """
    digits = r"\p{N}" if individual else r"\p{N}+"
    return digits + r"|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE vocabularies."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@dataclass(frozen=True)
class _Added:
    """An added token matched in raw text before BPE (``special`` ones can be skipped when decoding)."""

    content: str
    id: int
    special: bool = True
    lstrip: bool = False
    rstrip: bool = False


def _added_token(entry: dict[str, Any], token_id: Any, default_special: bool = True) -> _Added:
    """An added token from its JSON form ({"content": ..., "special": ..., "lstrip": ..., ...})."""
    flags = (
        bool(entry.get("special", default_special)),
        bool(entry.get("lstrip")),
        bool(entry.get("rstrip")),
    )
    return _Added(str(entry["content"]), int(token_id), *flags)


class _Backend(Protocol):
    size: int  # ids 0 .. size-1 belong to the backend (some may be holes or added tokens)

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def piece_id(self, piece: str) -> int | None: ...


# ----------------------------------------------------------------------------------------------- backends
@dataclass(frozen=True)
class _PreSplit:
    """How text is cut before BPE: tiktoken's own regex, optionally after Python split stages.

    ``prefix_at`` is the stage index before which a space is put in front of every piece that lacks one
    (HF ByteLevel's ``add_prefix_space``; it applies to each piece earlier Split steps made), or None.
    """

    pattern: str
    stages: tuple[regex.Pattern, ...] = ()
    prefix_at: int | None = None


class _BPEBackend:
    """tiktoken BPE plus what a tokenizer.json adds around it (normalizer, pre-split stages, id table)."""

    def __init__(
        self,
        ranks: dict[bytes, int],
        split: _PreSplit,
        id_bytes: dict[int, bytes],
        rank_to_id: list[int] | None = None,
        normalize: Callable[[str], str] | None = None,
        vocab: dict[str, int] | None = None,
    ) -> None:
        self._enc = tiktoken.Encoding(
            "obinfer-bpe", pat_str=split.pattern, mergeable_ranks=ranks, special_tokens={}
        )
        self._split = split
        self._id_bytes = id_bytes
        self._rank_to_id = rank_to_id
        self._normalize = normalize
        self._vocab = vocab
        self.size = max(id_bytes) + 1

    def encode(self, text: str) -> list[int]:
        if self._normalize is not None:
            text = self._normalize(text)
        pieces = [text]
        for k, rx in enumerate((*self._split.stages, None)):
            if k == self._split.prefix_at:
                pieces = [p if p.startswith(" ") else " " + p for p in pieces]
            if rx is not None:
                pieces = _isolate(pieces, rx)
        ranks = [r for piece in pieces for r in self._enc.encode_ordinary(piece)]
        if self._rank_to_id is None:
            return ranks
        table = self._rank_to_id
        return [i for r in ranks if (i := table[r]) >= 0]  # bytes without a token are dropped, as HF does

    def decode(self, ids: list[int]) -> str:
        return b"".join(self._id_bytes.get(i, b"") for i in ids).decode("utf-8", errors="replace")

    def piece_id(self, piece: str) -> int | None:
        if self._vocab is not None:
            return self._vocab.get(piece)
        return self._enc._mergeable_ranks.get(piece.encode("utf-8"))


class _SentencePieceBackend:
    """A SentencePiece model; ids past its vocabulary are added tokens handled by `Tokenizer`."""

    def __init__(self, sp: Any) -> None:
        self.sp = sp
        self.size = sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text) if text else []

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([i for i in ids if 0 <= i < self.size])

    def piece_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return None if self.sp.is_unknown(i) and piece != self.sp.id_to_piece(i) else i


def _isolate(pieces: list[str], rx: regex.Pattern) -> list[str]:
    """HF ``Split(behavior="Isolated")``: every match and every gap between matches becomes a piece."""
    out: list[str] = []
    for piece in pieces:
        pos = 0
        for m in rx.finditer(piece):
            if m.start() > pos:
                out.append(piece[pos : m.start()])
            if m.end() > m.start():
                out.append(m.group())
            pos = m.end()
        if pos < len(piece):
            out.append(piece[pos:])
    return out


# ------------------------------------------------------------------------------------------ file readers
def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError as e:
        raise TokenizerError(f"{path}: file not found") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: malformed JSON ({e})") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_json_if_exists(path: Path) -> dict[str, Any]:
    return _read_json(path) if path.is_file() else {}


def _token_text(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template_source(model_dir: Path, config: dict[str, Any]) -> str | None:
    """chat_template.jinja (preferred, as HF does), chat_template.json, or tokenizer_config's entry."""
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if template is None and (model_dir / "chat_template.json").is_file():
        template = _read_json(model_dir / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


# ------------------------------------------------------------------------------------ tokenizer.json (BPE)
@dataclass
class _Parts:
    """What a tokenizer file yields before tokenizer_config.json is consulted."""

    backend: _Backend
    added: list[_Added]
    bos_id: int | None = None  # BOS the file itself prepends (post-processor template), else None
    add_bos: bool = False
    template_tokens: dict[str, str] | None = None


def _byte_level_vocab(
    model: dict[str, Any], added_ids: set[int], path: Path
) -> tuple[dict[bytes, int], list[int], dict[int, bytes], dict[str, int]]:
    """Ranks in merge order for tiktoken, the rank -> id table, id -> bytes and the string vocabulary."""
    vocab, merges = model.get("vocab"), model.get("merges")
    if not isinstance(vocab, dict) or not isinstance(merges, list):
        raise TokenizerError(f"{path}: model.vocab / model.merges missing or malformed")
    char_of = _bytes_to_unicode()
    table = {ord(c): chr(b) for b, c in char_of.items()}
    table.update({c: "\uffff" for c in range(256) if c not in table})  # non byte-level chars fail below
    id_bytes: dict[int, bytes] = {}
    for tok, i in vocab.items():
        try:
            id_bytes[int(i)] = tok.translate(table).encode("latin-1")
        except UnicodeEncodeError:
            if int(i) not in added_ids:
                raise _Unsupported(f"{path}: vocabulary is not byte-level (token {tok!r})") from None
    ranks: dict[bytes, int] = {bytes([b]): b for b in range(256)}
    rank_to_id = [vocab.get(char_of[b], -1) for b in range(256)]
    for k, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        merged_id = vocab.get(left + right)
        if merged_id is None:
            raise TokenizerError(
                f"{path}: merge #{k} {left!r} + {right!r} makes a token not in the vocabulary"
            )
        _add_rank(ranks, rank_to_id, id_bytes[merged_id], merged_id)
    if model.get("ignore_merges"):  # HF looks whole pre-tokens up in the vocabulary first, as tiktoken does
        for i in sorted(set(id_bytes) - added_ids):
            _add_rank(ranks, rank_to_id, id_bytes[i], i)
    return ranks, rank_to_id, id_bytes, {t: int(i) for t, i in vocab.items()}


def _add_rank(ranks: dict[bytes, int], rank_to_id: list[int], token: bytes, token_id: int) -> None:
    if token not in ranks:  # a token made by several merges keeps the rank of the first one
        ranks[token] = len(rank_to_id)
        rank_to_id.append(token_id)


def _flatten(step: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
    if not step:
        return []
    if step.get("type") == "Sequence":
        return [s for sub in step.get(key, []) for s in _flatten(sub, key)]
    return [step]


def _pre_tokenizer_plan(pre: dict[str, Any] | None, path: Path) -> _PreSplit:
    """How to cut text for a byte-level pre-tokenizer: one tiktoken regex when possible, else stages."""
    steps = _flatten(pre, "pretokenizers")
    if not steps or steps[-1].get("type") != "ByteLevel":
        raise _Unsupported(f"{path}: pre_tokenizer does not end with ByteLevel (got {pre!r:.120})")
    byte_level, splits = steps[-1], steps[:-1]
    prefix_space = bool(byte_level.get("add_prefix_space", False))
    use_regex = bool(byte_level.get("use_regex", True))
    patterns: list[str] = []
    for s in splits:
        if s.get("type") == "Digits":
            patterns.append(r"\p{N}" if s.get("individual_digits") else r"\p{N}+")
        elif s.get("type") == "Split" and s.get("behavior") == "Isolated" and not s.get("invert"):
            pat = s.get("pattern", {})
            patterns.append(pat["Regex"] if "Regex" in pat else regex.escape(pat.get("String", "")))
        else:
            raise _Unsupported(f"{path}: unsupported pre-tokenizer step {s!r:.120}")
    final = [GPT2_PATTERN] if use_regex else []
    if not splits:
        return _PreSplit((final or [_WHOLE_TEXT])[0], prefix_at=0 if prefix_space else None)
    if not prefix_space and len(splits) == 1 and not use_regex:
        return _PreSplit(patterns[0])
    if not prefix_space and len(splits) == 1 and use_regex and splits[0].get("type") == "Digits":
        return _PreSplit(digits_pattern(bool(splits[0].get("individual_digits"))))
    try:
        stages = tuple(regex.compile(p) for p in patterns + final)
    except regex.error as e:
        raise TokenizerError(f"{path}: pre-tokenizer regex does not compile ({e})") from e
    return _PreSplit(_WHOLE_TEXT, stages, len(splits) if prefix_space else None)


def _normalizer(spec: dict[str, Any] | None, path: Path) -> Callable[[str], str] | None:
    forms = []
    for step in _flatten(spec, "normalizers"):
        if step.get("type") not in ("NFC", "NFD", "NFKC", "NFKD"):
            raise _Unsupported(f"{path}: unsupported normalizer {step.get('type')!r}")
        forms.append(step["type"])
    if not forms:
        return None

    def normalize(text: str) -> str:
        for form in forms:
            text = unicodedata.normalize(form, text)
        return text

    return normalize


def _template_bos(post: dict[str, Any] | None) -> int | None:
    """The special token a TemplateProcessing post-processor puts before the text, if any."""
    for step in _flatten(post, "processors"):
        if step.get("type") == "TemplateProcessing" and step.get("single"):
            first = step["single"][0]
            if isinstance(first, dict) and "SpecialToken" in first:
                name = first["SpecialToken"]["id"]
                return int(step.get("special_tokens", {})[name]["ids"][0])
    return None


def _parse_tokenizer_json(path: Path) -> _Parts:
    data = _read_json(path)
    model = data.get("model")
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE":
        raise _Unsupported(f"{path}: model type {model.get('type') if isinstance(model, dict) else model!r}")
    for option in ("continuing_subword_prefix", "end_of_word_suffix", "dropout", "byte_fallback"):
        if model.get(option):
            raise _Unsupported(f"{path}: BPE option {option}={model[option]!r} is not supported")
    try:
        added = [_added_token(t, t["id"], default_special=False) for t in data.get("added_tokens") or []]
    except (KeyError, TypeError, ValueError) as e:
        raise TokenizerError(f"{path}: malformed added_tokens ({e!r})") from e
    split = _pre_tokenizer_plan(data.get("pre_tokenizer"), path)
    normalize = _normalizer(data.get("normalizer"), path)
    ranks, rank_to_id, id_bytes, vocab = _byte_level_vocab(model, {a.id for a in added}, path)
    for a in added:
        id_bytes[a.id] = a.content.encode("utf-8")
    backend = _BPEBackend(ranks, split, id_bytes, rank_to_id, normalize, vocab)
    bos = _template_bos(data.get("post_processor"))
    return _Parts(backend, added, bos_id=bos, add_bos=bos is not None)


# ----------------------------------------------------------------------------------- tokenizer.model files
def llama3_special_tokens(n_base: int, n_special: int = 256) -> list[_Added]:
    """Llama-3.1's special tokens, numbered from ``n_base`` (128000 for the real vocabulary)."""
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>"]
    names += ["<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>"]
    names += ["<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
    names += [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + n_special - len(names))]
    return [_Added(name, n_base + k) for k, name in enumerate(names)]


def _is_tiktoken_file(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096)
    first = head.lstrip().split(b"\n", 1)[0].strip()
    return re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+", first) is not None


def _parse_tiktoken_model(path: Path, config_added: list[_Added]) -> _Parts:
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as e:
            raise TokenizerError(f"{path}: line {lineno} is not '<base64 token> <rank>'") from e
    if len(set(ranks.values())) != len(ranks):
        raise TokenizerError(f"{path}: two tokens share a rank")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(f"{path}: {len(missing)} single bytes have no rank (e.g. byte {missing[0]})")
    added = config_added or llama3_special_tokens(max(ranks.values()) + 1)
    id_bytes = {r: t for t, r in ranks.items()}
    id_bytes.update({a.id: a.content.encode("utf-8") for a in added})
    backend = _BPEBackend(ranks, _PreSplit(LLAMA3_PATTERN), id_bytes)
    bos = next((a.id for a in added if a.content == "<|begin_of_text|>"), None)
    tokens = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
    return _Parts(backend, added, bos_id=bos, add_bos=bos is not None, template_tokens=tokens)


def _parse_sentencepiece(path: Path, config_added: list[_Added]) -> _Parts:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.load(str(path))
    except (OSError, RuntimeError) as e:
        raise TokenizerError(f"{path}: neither a tiktoken BPE file nor a SentencePiece model ({e})") from e
    known = {a.id for a in config_added}
    added = list(config_added)
    for i in range(sp.get_piece_size()):
        if (sp.is_control(i) or sp.is_unknown(i)) and i not in known:
            added.append(_Added(sp.id_to_piece(i), i))
    bos = sp.bos_id() if sp.bos_id() >= 0 else None
    tokens = {
        name: sp.id_to_piece(i)
        for name, i in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()), ("unk_token", sp.unk_id()))
        if i >= 0
    }
    return _Parts(
        _SentencePieceBackend(sp), added, bos_id=bos, add_bos=bos is not None, template_tokens=tokens
    )


def _config_added(config: dict[str, Any], path: Path) -> list[_Added]:
    """tokenizer_config.json's ``added_tokens_decoder`` ({"128000": {"content": ..., "special": ...}})."""
    try:
        return [_added_token(d, i) for i, d in (config.get("added_tokens_decoder") or {}).items()]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise TokenizerError(f"{path}: malformed added_tokens_decoder ({e!r})") from e


# ------------------------------------------------------------------------------------------ chat templates
def _tojson(
    x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_chat_template(source: str) -> Any:
    """Compile a chat template in the environment HF uses (sandboxed, trim/lstrip blocks, its helpers)."""
    try:
        import jinja2
        import jinja2.ext
        import jinja2.sandbox
    except ImportError as e:
        raise TokenizerError("chat templates need the jinja2 package: pip install jinja2") from e

    class Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` marks assistant text for training; render it as is."""

        tags = {"generation"}

        def parse(self, parser: Any) -> list[Any]:
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise TokenizerError(f"chat template does not compile: {e}") from e


def _chatml(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def _llama3_chat(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    turns = [
        f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
        for m in messages
    ]
    text = "<|begin_of_text|>" + "".join(turns)
    return text + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if add_generation_prompt else "")


# ---------------------------------------------------------------------------------------------- Tokenizer
class StreamDecoder:
    """Turns token ids into text as they arrive, holding back incomplete UTF-8 characters.

    It decodes a short window of recent ids twice (with and without the newest) and emits the difference
    once it no longer ends in U+FFFD, so the pieces concatenate to ``decode(all_ids)``.
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._read = 0  # ids[:read] have been emitted; ids[0] starts the context window

    def push(self, token_id: int) -> str:
        """Add one token; return the new text (possibly "")."""
        self._ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        """Return whatever is held back (e.g. a cut-off character, as U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        before = self._decode(self._ids[: self._read])
        text = self._decode(self._ids)
        if not final and (len(text) <= len(before) or text.endswith("\ufffd")):
            return ""
        self._ids = self._ids[self._read :]
        self._read = len(self._ids)
        return text[len(before) :]


class Tokenizer:
    """Text <-> token ids for one checkpoint, with its chat format and stop tokens.

    Attributes:
        vocab_size: number of token ids (largest id + 1, added tokens included).
        bos_id: the beginning-of-sequence id, or None when the checkpoint has none.
        add_bos: whether `encode` prepends ``bos_id`` by default (the checkpoint's behaviour).
        stop_ids: ids that end generation (eos, generation_config's eos ids, chat end markers).
        chat_template: the checkpoint's jinja chat template, or None.
    """

    def __init__(
        self,
        parts: _Parts,
        config: dict[str, Any] | None = None,
        generation_config: dict[str, Any] | None = None,
        chat_template: str | None = None,
    ) -> None:
        config, generation_config = config or {}, generation_config or {}
        self._backend = parts.backend
        self._added = added = {a.content: a for a in parts.added}
        self._added_text = {a.id: a.content for a in added.values()}
        self._special_ids = {a.id for a in added.values() if a.special}
        # plain alternation, longest first (capture groups would make Python's re scan ~1000x slower)
        longest_first = sorted(added, key=len, reverse=True)
        self._added_re = re.compile("|".join(map(re.escape, longest_first))) if added else None
        self._template_vars = dict(parts.template_tokens or {})
        self._template_vars.update({k: v for k in _TEMPLATE_TOKENS if (v := _token_text(config.get(k)))})
        bos_text = _token_text(config.get("bos_token"))
        self.bos_id = self.token_id(bos_text) if bos_text else parts.bos_id
        explicit = config.get("add_bos_token")
        self.add_bos = bool(explicit) if isinstance(explicit, bool) else parts.add_bos
        self.add_bos = self.add_bos and self.bos_id is not None
        self._bos_text = self._added_text.get(self.bos_id) if self.bos_id is not None else None
        self.stop_ids = self._stop_ids(config, generation_config)
        self.chat_template = chat_template
        self._compiled: Any = None
        self.vocab_size = max([*self._added_text, self._backend.size - 1]) + 1

    def _stop_ids(self, config: dict[str, Any], generation_config: dict[str, Any]) -> set[int]:
        stops: set[int] = set()
        eos_text = self._template_vars.get("eos_token")
        if eos_text and (i := self.token_id(eos_text)) is not None:
            stops.add(i)
        eos = generation_config.get("eos_token_id")
        stops.update(int(i) for i in (eos if isinstance(eos, list) else [eos]) if isinstance(i, int))
        stops.update(self._added[m].id for m in _END_MARKERS if m in self._added)
        return stops

    # -------------------------------------------------------------------------------------- ids <-> text
    def token_id(self, token: str) -> int | None:
        """The id of an added/special token or a vocabulary entry written as in the vocabulary, else None."""
        if token in self._added:
            return self._added[token].id
        return self._backend.piece_id(token)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; added/special tokens written in the text become their ids.

        Args:
            text: any string.
            add_bos: prepend ``bos_id``. None follows the checkpoint (``self.add_bos``) unless ``text``
                already starts with the BOS token (as a rendered Llama-3 chat prompt does).
        """
        if add_bos is None:  # the checkpoint's behaviour, without doubling a BOS the text already starts with
            add_bos = self.add_bos and not (self._bos_text is not None and text.startswith(self._bos_text))
        ids = [self.bos_id] if add_bos and self.bos_id is not None else []
        pos = 0
        for m in self._added_re.finditer(text) if self._added_re is not None else ():
            start, end, token = m.start(), m.end(), self._added[m.group()]
            if start < pos:  # inside whitespace an rstrip token swallowed
                continue
            while token.lstrip and start > pos and text[start - 1].isspace():
                start -= 1
            while token.rstrip and end < len(text) and text[end].isspace():
                end += 1
            ids += self._backend.encode(text[pos:start]) if start > pos else []
            ids.append(token.id)
            pos = end
        if pos < len(text):
            ids += self._backend.encode(text[pos:])
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of ``ids``; special tokens are written out unless ``skip_special``. Unknown ids give ""."""
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            if i not in self._added_text:
                run.append(i)
                continue
            if run:
                out.append(self._backend.decode(run))
                run = []
            if not (skip_special and i in self._special_ids):
                out.append(self._added_text[i])
        if run:
            out.append(self._backend.decode(run))
        return "".join(out)

    def stream_decoder(self, skip_special: bool = False) -> StreamDecoder:
        """An incremental decoder: ``push(id) -> new text``, ``flush() -> held-back text``."""
        return StreamDecoder(lambda ids: self.decode(ids, skip_special=skip_special))

    # ---------------------------------------------------------------------------------------------- chat
    @property
    def has_chat_template(self) -> bool:
        """True when the checkpoint ships its own chat template."""
        return self.chat_template is not None

    def apply_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages`` ([{"role": "user", "content": "..."}, ...]).

        Equals HF's ``apply_chat_template(messages, tokenize=False, add_generation_prompt=...)``. Without
        a template, the Llama-3 header format or ChatML is used when the vocabulary has its tokens.
        The text may start with the BOS token: encode it with ``add_bos=False`` (see `encode_chat`).
        """
        if self.chat_template is None:
            if "<|start_header_id|>" in self._added and "<|eot_id|>" in self._added:
                return _llama3_chat(messages, add_generation_prompt)
            if "<|im_start|>" in self._added and "<|im_end|>" in self._added:
                return _chatml(messages, add_generation_prompt)
            raise TokenizerError("this tokenizer has no chat template and no known chat tokens; use raw text")
        if self._compiled is None:
            self._compiled = compile_chat_template(self.chat_template)
        import jinja2

        try:
            return self._compiled.render(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self._template_vars,
            )
        except jinja2.TemplateError as e:
            raise TokenizerError(f"chat template error: {e}") from e

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of `apply_chat` (no extra BOS: the template writes it, as in HF)."""
        return self.encode(self.apply_chat(messages, add_generation_prompt), add_bos=False)

    def chat_parts(self, sentinel: str = DEFAULT_SENTINEL) -> tuple[str, str]:
        """(prefix, suffix) of the chat prompt around a single user message.

        ``prefix + user_text + suffix`` is the prompt for one user turn with the generation prompt; the
        suffix is what follows the question (e.g. ``<|im_end|>\\n<|im_start|>assistant\\n``).
        """
        text = self.apply_chat([{"role": "user", "content": sentinel}], add_generation_prompt=True)
        if text.count(sentinel) != 1:
            raise TokenizerError(
                f"chat template shows the user text {text.count(sentinel)} times, expected once"
            )
        prefix, suffix = text.split(sentinel)
        return prefix, suffix

    def __repr__(self) -> str:
        kind = type(self._backend).__name__.strip("_").replace("Backend", "")
        return f"Tokenizer({kind}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, stop_ids={sorted(self.stop_ids)})"


def _guarded(parse: Callable[..., _Parts], path: Path, *args: Any) -> _Parts:
    """Run a file parser, turning a stray KeyError/TypeError/... on odd content into a TokenizerError."""
    try:
        return parse(path, *args)
    except TokenizerError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OSError) as e:
        raise TokenizerError(f"{path}: malformed content ({type(e).__name__}: {e})") from e


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """Load the tokenizer of a checkpoint directory (see the module docstring for the supported files).

    Raises:
        TokenizerError: the directory or tokenizer files are missing, malformed or unsupported.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise TokenizerError(f"{model_dir}: tokenizer directory not found")
    config_path = model_dir / "tokenizer_config.json"
    config = _read_json_if_exists(config_path)
    generation_config = _read_json_if_exists(model_dir / "generation_config.json")
    json_path, model_path = model_dir / "tokenizer.json", model_dir / "tokenizer.model"
    parts = None
    if json_path.is_file():
        try:
            parts = _guarded(_parse_tokenizer_json, json_path)
        except _Unsupported as e:
            if not model_path.is_file():
                raise
            log.info("%s; using %s instead", e, model_path)
    if parts is None:
        if not model_path.is_file():
            raise TokenizerError(f"{model_dir}: no tokenizer.json or tokenizer.model found")
        config_added = _config_added(config, config_path)
        parse = _parse_tiktoken_model if _is_tiktoken_file(model_path) else _parse_sentencepiece
        parts = _guarded(parse, model_path, config_added)
    return Tokenizer(parts, config, generation_config, _chat_template_source(model_dir, config))
