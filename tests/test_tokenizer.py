"""obinfer.tokenizer against Hugging Face `tokenizers`/`transformers` and `sentencepiece` as references.

Small byte-level BPE tokenizers are trained here with `tokenizers` (one per pre-tokenizer style), saved
with a tokenizer_config.json, and loaded both by obinfer and by transformers' AutoTokenizer.
"""

from __future__ import annotations

import base64
import io
import json
import random
from pathlib import Path

import pytest

from obinfer.tokenizer import (
    LLAMA3_PATTERN,
    StreamDecoder,
    Tokenizer,
    TokenizerError,
    load_tokenizer,
)

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Exercises trim_blocks/lstrip_blocks, loop controls, tojson, raise_exception and a namespace.
FANCY_TEMPLATE = """{%- set ns = namespace(n=0) %}
{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('Unknown role ' + message['role']) }}
    {%- endif %}
    {% if message['role'] == 'system' %}{% continue %}{% endif %}
    {% set ns.n = ns.n + 1 %}
<|im_start|>{{ message['role'] }} #{{ ns.n }} {{ message['content'] | tojson }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"]
LLAMA3_SPECIALS += ["<|eom_id|>", "<|eot_id|>"]
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

TEXTS = [
    "", " ", "  ", "\n", "\t", "Hello world", "Hello, world! How are you?", " leading space", "trailing ",
    "multiple   spaces   here", "tabs\tand\t\ttabs", "new\nlines\n\n\nhere\r\nwindows", "  \n  \n", "x  \n",
    "Numbers 123 4567 89012345 3.14159 -42 1,000,000", "a1b2c3 12abc 1 2 3  44   555", "2024-05-01T12:34:56Z",
    "Café naïve résumé façade Ångström", "日本語のテキストです。中文文本。한국어 텍스트", "emoji 😀👍🏽🇫🇷 family 👨‍👩‍👧",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(3))", "if (a && b) { c->d[0] = 'e'; }",
    "I'm you're he'll we've she'd IT'S", "Ω≈ç√∫˜µ≤≥÷ ½ ¾ ² ³ ①②", "\u00a0nbsp\u2003emspace", "٣٤٥ ١٢ Ⅷ ⅻ",
    "ﬁ ligature e\u0301 vs é", "a" * 200, "1" * 40, "🙂" * 10, "http://example.com/path?q=1&r=2#frag",
    "“smart quotes” ‘single’ — dash … ellipsis", "Zürich Kraków İstanbul", "\x00\x01 control \x7f",
]  # fmt: skip
TRAIN_TEXT = (
    TEXTS[5:]
    + [
        "The quick brown fox jumps over the lazy dog. It's 10:45 and they're here; we'll see 2024 reports.",
        "In 1999, 42 people paid $3.50 each — a total of 147 dollars. Données, café, über, niño, façade.",
        "def main(args):\n    for i in range(10):\n        print(i, args[i])\n    return {'ok': True}\n",
        "東京は日本の首都です。我们今天学习。안녕하세요 세계. Emoji: 😀 😃 😄 👍 🚀 ✨",
    ]
    * 20
)


def corpus(specials: list[str], n_random: int = 120, seed: int = 0) -> list[str]:
    """The fixed texts, random character soup, random joins, and texts with special tokens inside."""
    rng = random.Random(seed)
    alphabet = "abcdefghij XYZ 0123456789 \t\n.,;'\"!?-_()[]{}éü日本😀 '" + "'s 're 'll "
    out = list(TEXTS)
    out += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(n_random)]
    out += [" ".join(rng.choices(TEXTS, k=rng.randint(2, 4))) for _ in range(n_random // 2)]
    for s in specials:
        out += [f"before {s}after", f"{s}\nline", f"x{s}{s} y", f"  {s}  12", f"end {s}"]
    return out


# ------------------------------------------------------------------------------------------------ fixtures
def _gpt2_byte_map() -> dict[str, int]:
    """GPT-2's printable character -> byte map (written out here as the test's own reference)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _train(pre_tokenizer, n_merges: int = 700, trained_specials=(), normalizer=None):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizer
    tk.normalizer = normalizer
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=256 + len(trained_specials) + n_merges,
        special_tokens=list(trained_specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(TRAIN_TEXT, trainer)
    return tk


def _save(tk, out: Path, config: dict, edit=None, generation_config: dict | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    tk.save(str(out / "tokenizer.json"))
    if edit is not None:
        data = json.loads((out / "tokenizer.json").read_text())
        edit(data)
        (out / "tokenizer.json").write_text(json.dumps(data))
    (out / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **config})
    )
    if generation_config is not None:
        (out / "generation_config.json").write_text(json.dumps(generation_config))
    return out


def _build(kind: str, out: Path) -> Path:
    """Train and save one fixture tokenizer directory of the given style."""
    from tokenizers import AddedToken, Regex, normalizers, processors
    from tokenizers import pre_tokenizers as pt

    chatml = {"bos_token": None, "eos_token": "<|im_end|>", "chat_template": CHATML_TEMPLATE}
    if kind in ("gpt2", "gpt2_prefix"):  # SmolLM2-like: specials trained in, ids 0..2
        tk = _train(pt.ByteLevel(add_prefix_space=kind == "gpt2_prefix"), trained_specials=CHATML_SPECIALS)
        return _save(tk, out, chatml)
    if kind == "digits":  # SmolLM2's pre-tokenizer, plus an added token that swallows spaces around it
        seq = pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False)])
        tk = _train(seq, trained_specials=CHATML_SPECIALS)
        tk.add_special_tokens([AddedToken("<mask>", lstrip=True, rstrip=True, normalized=False)])
        return _save(tk, out, chatml)
    split = pt.Split(Regex(QWEN2_PATTERN), behavior="isolated")
    if kind == "qwen2":  # specials and a non-special added token after the vocabulary, NFC normalizer
        seq = pt.Sequence([split, pt.ByteLevel(add_prefix_space=False, use_regex=False)])
        tk = _train(seq, normalizer=normalizers.NFC())
        tk.add_special_tokens(CHATML_SPECIALS)
        tk.add_tokens([AddedToken("<tool_call>", special=False, normalized=False)])
        return _save(tk, out, {**chatml, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    if kind == "staged":  # two Splits, then a space before every piece and GPT-2's regex: Python stages
        digits = pt.Split(Regex(r"\p{N}{1,3}"), behavior="isolated")
        tk = _train(pt.Sequence([digits, split, pt.ByteLevel(add_prefix_space=True, use_regex=True)]))
        tk.add_special_tokens(CHATML_SPECIALS)
        return _save(tk, out, chatml)
    assert kind == "llama3"
    llama3_split = pt.Split(Regex(LLAMA3_PATTERN), behavior="isolated")
    seq = pt.Sequence([llama3_split, pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk = _train(seq, n_merges=900)
    tk.add_special_tokens(LLAMA3_SPECIALS)
    bos = tk.token_to_id("<|begin_of_text|>")
    tk.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)],
    )
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE}
    eos = [tk.token_to_id("<|end_of_text|>"), tk.token_to_id("<|eot_id|>")]
    edit = lambda d: d["model"].update(ignore_merges=True)  # as Llama-3's tokenizer.json
    return _save(tk, out, config, edit, {"bos_token_id": bos, "eos_token_id": eos})


KINDS = ["gpt2", "gpt2_prefix", "digits", "qwen2", "staged", "llama3"]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {kind: _build(kind, root / kind) for kind in KINDS}


@pytest.fixture(scope="module")
def pairs(built) -> dict[str, tuple[Tokenizer, object]]:
    """(obinfer tokenizer, HF AutoTokenizer) per fixture kind."""
    return {k: (load_tokenizer(d), transformers.AutoTokenizer.from_pretrained(d)) for k, d in built.items()}


def _specials(hf) -> list[str]:
    return [t.content for t in hf.added_tokens_decoder.values()]


# ------------------------------------------------------------------------------- byte-level BPE vs HF
@pytest.mark.parametrize("kind", KINDS)
def test_encode_decode_matches_hf(pairs, kind):
    tok, hf = pairs[kind]
    texts = corpus(_specials(hf))
    mismatches = [
        t for t in texts if tok.encode(t, add_bos=False) != hf(t, add_special_tokens=False)["input_ids"]
    ]
    assert mismatches == []
    for t in texts:
        ids = tok.encode(t, add_bos=False)
        assert tok.decode(ids) == hf.decode(ids, clean_up_tokenization_spaces=False)
        assert tok.decode(ids, skip_special=True) == hf.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        if kind not in ("qwen2", "gpt2_prefix", "staged") and "<mask>" not in t:  # NFC, spaces added/taken
            assert tok.decode(ids) == t


@pytest.mark.parametrize("kind", KINDS)
def test_every_vocab_token_and_random_concatenations_match_hf(pairs, kind):
    """Each token's own text, and random runs of tokens, encode as HF does: the ranks follow the merges."""
    tok, hf = pairs[kind]
    backend = hf.backend_tokenizer
    n = backend.get_vocab_size(with_added_tokens=False)
    token_texts = [backend.decode([i]) for i in range(n)]
    rng = random.Random(kind)
    texts = token_texts + ["".join(rng.choices(token_texts, k=rng.randint(2, 6))) for _ in range(1000)]
    expected = [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    assert [t for t, e in zip(texts, expected, strict=True) if tok.encode(t, add_bos=False) != e] == []


@pytest.mark.parametrize("kind", KINDS)
def test_bos_default_follows_checkpoint(pairs, kind):
    tok, hf = pairs[kind]
    for t in ["Hello world", "", " 12 ab", "<|im_start|>x"]:
        assert tok.encode(t) == hf(t)["input_ids"]
    assert tok.add_bos == (kind == "llama3")
    if kind == "llama3":
        assert tok.bos_id == hf.convert_tokens_to_ids("<|begin_of_text|>")
        assert tok.encode("hi", add_bos=False) == tok.encode("hi")[1:]
        # a text that already starts with BOS (a rendered chat prompt) does not get a second one
        assert tok.encode("<|begin_of_text|>hi") == [tok.bos_id] + tok.encode("hi", add_bos=False)
        assert tok.encode("<|begin_of_text|>hi", add_bos=True)[:2] == [tok.bos_id, tok.bos_id]
    else:  # these fixtures define no BOS token: asking for one adds nothing
        assert tok.bos_id is None and tok.encode("hi", add_bos=True) == tok.encode("hi")


def test_stop_ids_and_vocab_size(pairs):
    tok, hf = pairs["llama3"]
    ids = {s: hf.convert_tokens_to_ids(s) for s in LLAMA3_SPECIALS}
    assert tok.stop_ids == {ids["<|end_of_text|>"], ids["<|eot_id|>"], ids["<|eom_id|>"]}
    assert tok.vocab_size == len(hf)
    tok, hf = pairs["qwen2"]
    assert tok.stop_ids == {hf.convert_tokens_to_ids("<|im_end|>"), hf.convert_tokens_to_ids("<|endoftext|>")}
    assert tok.bos_id is None and tok.vocab_size == len(hf)
    assert tok.token_id("<tool_call>") == hf.convert_tokens_to_ids("<tool_call>")


# ----------------------------------------------------------------------------------------------- SmolLM2
@pytest.fixture(scope="module")
def smollm2_dir(default_model_dir) -> Path:
    return default_model_dir


def test_smollm2_matches_hf(smollm2_dir):
    tok = load_tokenizer(smollm2_dir)
    hf = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    texts = corpus(_specials(hf), n_random=300)
    assert [t for t in texts if tok.encode(t) != hf(t)["input_ids"]] == []
    rng = random.Random(0)
    ids = rng.sample(range(17, len(hf)), 3000)
    token_texts = [hf.decode([i]) for i in ids]
    assert [t for t in token_texts if tok.encode(t) != hf(t)["input_ids"]] == []
    assert tok.decode(ids) == hf.decode(ids, clean_up_tokenization_spaces=False)
    assert tok.bos_id == 1 and not tok.add_bos
    assert {0, 2} <= tok.stop_ids
    for messages in _conversations():
        for gen in (True, False):
            expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert tok.apply_chat(messages, add_generation_prompt=gen) == expected
            assert tok.encode_chat(messages, gen) == hf(expected, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------ tiktoken format
def _tiktoken_file_from(hf_tokenizer_json: Path, out: Path) -> list[bytes]:
    """Write a Llama-3 style tokenizer.model: 256 single bytes, then merged tokens in merge order."""
    data = json.loads(hf_tokenizer_json.read_text())
    byte_of = _gpt2_byte_map()
    to_bytes = lambda s: bytes(byte_of[c] for c in s)
    tokens = [bytes([b]) for b in range(256)]
    for merge in data["model"]["merges"]:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        if to_bytes(left + right) not in tokens:
            tokens.append(to_bytes(left + right))
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"{base64.b64encode(t).decode()} {rank}" for rank, t in enumerate(tokens)]
    (out / "tokenizer.model").write_text("\n".join(lines) + "\n")
    return tokens


def test_tiktoken_model_matches_hf_tokens(built, pairs, tmp_path):
    ranks = _tiktoken_file_from(built["llama3"] / "tokenizer.json", tmp_path / "tt")
    tok = load_tokenizer(tmp_path / "tt")
    _, hf = pairs["llama3"]
    n = len(ranks)
    assert tok.vocab_size == n + 256 and tok.bos_id == n  # <|begin_of_text|> right after the ranks
    assert tok.stop_ids == {n + 1, n + 8, n + 9}  # end_of_text, eom_id, eot_id
    byte_of = _gpt2_byte_map()
    hf_bytes = {i: bytes(byte_of[c] for c in t) for t, i in hf.backend_tokenizer.get_vocab(False).items()}
    for t in corpus(["<|eot_id|>", "<|start_header_id|>"]):
        ids = tok.encode(t)
        assert ids[0] == n and tok.decode(ids[1:]) == t
        expected = hf(t, add_special_tokens=False)["input_ids"]
        # the same token strings: ranks hold bytes, HF ids hold byte-level strings / special tokens
        ours = [ranks[i] if i < n else tok.decode([i]).encode() for i in ids[1:]]
        theirs = [hf_bytes[i] if i in hf_bytes else hf.decode([i]).encode() for i in expected]
        assert ours == theirs
    assert tok.encode("x", add_bos=False) == [ranks.index(b"x")]
    # no template in the directory: the built-in Llama-3 format equals HF's rendering of Llama-3's template
    _, hf = pairs["llama3"]
    assert not tok.has_chat_template
    for messages in _conversations():
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert tok.apply_chat(messages) == expected


def test_tiktoken_model_specials_from_config(tmp_path):
    lines = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)]
    lines.append(f"{base64.b64encode(b'ab').decode()} 256")
    (tmp_path / "tokenizer.model").write_text("\n".join(lines))
    added = {"300": {"content": "<|begin_of_text|>", "special": True}, "301": {"content": "<|eot_id|>"}}
    cfg = {"added_tokens_decoder": added, "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(tmp_path)
    assert tok.encode("abc<|eot_id|>") == [300, 256, ord("c"), 301]
    assert tok.stop_ids == {301} and tok.vocab_size == 302
    assert tok.decode([300, 256, 301], skip_special=True) == "ab"


# ----------------------------------------------------------------------------------------- SentencePiece
@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory) -> Path:
    spm = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAIN_TEXT), model_writer=model, vocab_size=420, byte_fallback=True,
        character_coverage=0.98, minloglevel=2,
    )  # fmt: skip
    out = tmp_path_factory.mktemp("sp")
    (out / "tokenizer.model").write_bytes(model.getvalue())
    return out


def test_sentencepiece_matches_sentencepiece(sp_dir):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    tok = load_tokenizer(sp_dir)
    assert tok.bos_id == sp.bos_id() and tok.add_bos and tok.stop_ids == {sp.eos_id()}
    for t in corpus([]):
        ids = tok.encode(t)
        assert ids == [sp.bos_id()] + sp.encode(t)
        assert tok.decode(ids, skip_special=True) == sp.decode(ids)
    # control tokens written in the text become their ids (each side encoded on its own)
    assert tok.encode("a</s>b", add_bos=False) == sp.encode("a") + [sp.eos_id()] + sp.encode("b")
    assert tok.decode(tok.encode("a</s>b")) == "<s>a</s>b"


def test_unsupported_tokenizer_json_falls_back_to_tokenizer_model(sp_dir, tmp_path):
    """Llama-2/Mistral ship a Metaspace tokenizer.json next to the SentencePiece model: use the model."""
    (tmp_path / "tokenizer.model").write_bytes((sp_dir / "tokenizer.model").read_bytes())
    metaspace = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
    (tmp_path / "tokenizer.json").write_text(
        json.dumps({"model": {"type": "BPE"}, "pre_tokenizer": metaspace})
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    tok, ref = load_tokenizer(tmp_path), load_tokenizer(sp_dir)
    assert not tok.add_bos and tok.encode("héllo 12") == ref.encode("héllo 12", add_bos=False)


# --------------------------------------------------------------------------------------- chat templates
def _conversations() -> list[list[dict[str, str]]]:
    return [
        [{"role": "user", "content": "What is the capital of France?"}],
        [
            {"role": "system", "content": "  Be brief.  "},
            {"role": "user", "content": "Hi 😀\n"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Count: 1 2 3"},
        ],
    ]


@pytest.mark.parametrize("kind", ["gpt2", "qwen2", "llama3"])
def test_chat_template_matches_hf(pairs, kind):
    tok, hf = pairs[kind]
    assert tok.has_chat_template
    for messages in _conversations():
        for gen in (True, False):
            expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert tok.apply_chat(messages, add_generation_prompt=gen) == expected
            hf_ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
            hf_ids = hf_ids["input_ids"] if hasattr(hf_ids, "keys") else hf_ids
            assert tok.encode_chat(messages, gen) == list(hf_ids)


@pytest.mark.parametrize("kind", ["gpt2", "llama3"])
def test_chat_parts_split_the_prompt_at_the_user_text(pairs, kind):
    tok, hf = pairs[kind]
    prefix, suffix = tok.chat_parts()
    text = "Context here.\nQuestion?"
    expected = hf.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    assert prefix + text + suffix == expected
    assert suffix.endswith(
        "assistant<|end_header_id|>\n\n" if kind == "llama3" else "<|im_start|>assistant\n"
    )


def test_template_file_helpers_and_errors(built, tmp_path):
    d = tmp_path / "fancy"
    d.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (d / name).write_text((built["gpt2"] / name).read_text())
    (d / "chat_template.jinja").write_text(FANCY_TEMPLATE)  # takes priority over tokenizer_config's
    tok = load_tokenizer(d)
    hf = transformers.AutoTokenizer.from_pretrained(d)
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": 'é "q" <b>'}]
    for gen in (True, False):
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        assert tok.apply_chat(messages, add_generation_prompt=gen) == expected
    with pytest.raises(TokenizerError, match="Unknown role tool"):
        tok.apply_chat([{"role": "tool", "content": "x"}])
    (d / "chat_template.jinja").write_text("{{ strftime_now('%Y') }}|{{ bos_token }}|{{ eos_token }}")
    year = str(__import__("datetime").date.today().year)
    assert load_tokenizer(d).apply_chat([]) == f"{year}||<|im_end|>"
    (d / "chat_template.jinja").write_text("{% for m in messages %}")
    with pytest.raises(TokenizerError, match="does not compile"):
        load_tokenizer(d).apply_chat([])
    (d / "chat_template.jinja").write_text("no user text here")
    with pytest.raises(TokenizerError, match="0 times"):
        load_tokenizer(d).chat_parts()


def test_chatml_fallback_without_template(built, tmp_path):
    d = tmp_path / "plain"
    d.mkdir()
    (d / "tokenizer.json").write_text((built["qwen2"] / "tokenizer.json").read_text())
    tok = load_tokenizer(d)
    assert not tok.has_chat_template
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert (
        tok.apply_chat(msgs)
        == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    )
    (d / "tokenizer.json").write_text(
        (built["staged"] / "tokenizer.json").read_text().replace("<|im_", "<|xx_")
    )
    with pytest.raises(TokenizerError, match="no chat template"):
        load_tokenizer(d).apply_chat(msgs)


# ------------------------------------------------------------------------------------------- streaming
STREAM_TEXTS = [
    "héllo wörld 日本語 😀👍🏽 done",
    "<|im_end|>中文<|im_start|>x 🇫🇷",
    "a\n\n  b  \t😀",
    "Ω≈ç 123",
]


def _stream(dec: StreamDecoder, ids: list[int]) -> list[str]:
    return [dec.push(i) for i in ids] + [dec.flush()]


@pytest.mark.parametrize("kind", ["gpt2", "qwen2", "llama3", "sp"])
def test_stream_decoder_concatenates_to_decode(pairs, sp_dir, kind):
    tok = load_tokenizer(sp_dir) if kind == "sp" else pairs[kind][0]
    split_chars = 0
    for text in STREAM_TEXTS:
        ids = tok.encode(text)
        for skip in (False, True):
            pieces = _stream(tok.stream_decoder(skip_special=skip), ids)
            assert "".join(pieces) == tok.decode(ids, skip_special=skip)
            assert not any("\ufffd" in p for p in pieces)  # no character is ever cut in half
        # some character really is spread over several tokens (so the test means something)
        split_chars += sum(1 for i in ids if "\ufffd" in tok.decode([i]))
    assert split_chars > 0


def test_stream_decoder_flushes_a_cut_character(pairs):
    tok = pairs["gpt2"][0]
    ids = tok.encode("ab😀")
    partial = ids[:-1]  # the emoji's bytes are spread over several byte tokens
    dec = tok.stream_decoder()
    out = "".join(dec.push(i) for i in partial)
    assert out == "ab"
    assert out + dec.flush() == tok.decode(partial)


# ----------------------------------------------------------------------------------------------- errors
def test_errors_name_the_problem(built, tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(empty)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: malformed JSON"):
        load_tokenizer(bad)
    (bad / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": {}}}))
    with pytest.raises(TokenizerError, match=r"tokenizer\.json"):
        load_tokenizer(bad)
    data = json.loads((built["gpt2"] / "tokenizer.json").read_text())
    data["model"]["vocab"]["Ġthe"] = "not an id"
    (bad / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: malformed content"):
        load_tokenizer(bad)
    (bad / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    with pytest.raises(TokenizerError, match=r"tokenizer\.json.*WordPiece"):
        load_tokenizer(bad)
    good = tmp_path / "good"
    good.mkdir()
    (good / "tokenizer.json").write_text((built["gpt2"] / "tokenizer.json").read_text())
    (good / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: malformed JSON"):
        load_tokenizer(good)
    (good / "tokenizer_config.json").unlink()
    (good / "generation_config.json").write_text("")
    with pytest.raises(TokenizerError, match=r"generation_config\.json"):
        load_tokenizer(good)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "tokenizer.model").write_bytes(b"\x00\x01garbage\xff")
    with pytest.raises(TokenizerError, match=r"tokenizer\.model"):
        load_tokenizer(junk)
    (junk / "tokenizer.model").write_text("YQ== 0\nYg== 0\n")
    with pytest.raises(TokenizerError, match=r"tokenizer\.model: two tokens share a rank"):
        load_tokenizer(junk)
    (junk / "tokenizer.model").write_text("YQ== 0\nnot-base64!! 1\n")
    with pytest.raises(TokenizerError, match=r"tokenizer\.model: line 2"):
        load_tokenizer(junk)
    assert issubclass(TokenizerError, ValueError)
