"""End to end on the embedded default model (SmolLM2-135M-Instruct imported from its GGUF)."""

from __future__ import annotations

import torch

from obinfer.generate import generate
from obinfer.tokenizer import load_tokenizer
from obinfer.weights import load_model


@torch.no_grad()
def test_logits_match_transformers_on_the_converted_checkpoint(default_model_dir):
    import transformers

    tok = load_tokenizer(default_model_dir)
    text = tok.apply_chat([{"role": "user", "content": "Explain in one sentence why the sky is blue."}])
    ids = torch.tensor([tok.encode(text)])
    ref = transformers.AutoModelForCausalLM.from_pretrained(default_model_dir).eval()(ids).logits
    model = load_model(default_model_dir)
    out = model(ids, model.new_cache())
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=1e-4)


def test_greedy_answer_makes_sense(default_model_dir):
    tok = load_tokenizer(default_model_dir)
    model = load_model(default_model_dir)
    ids = tok.encode(tok.apply_chat([{"role": "user", "content": "What is the capital of France?"}]))
    answer = tok.decode(list(generate(model, ids, max_new_tokens=20, stop_ids=tok.stop_ids)))
    assert "Paris" in answer


NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
NEEDLE = "One of the special magic numbers for tender-oak is: 4185923.\n"
QUESTION = "What is the special magic number for tender-oak mentioned in the provided text?"


def _needle_prompt(tok) -> list[int]:  # noqa: ANN001
    prefix, suffix = tok.chat_parts()
    return tok.encode(prefix + NOISE * 15 + NEEDLE + NOISE * 15 + "\n\n" + QUESTION + suffix)


def _kvpress_answer(model_dir, ids: list[int], ratio: float, n_new: int, stop_ids) -> list[int]:  # noqa: ANN001
    """Greedy answer of transformers + kvpress SnapKVPress (query-aware: the question is in the window)."""
    import transformers
    from kvpress import SnapKVPress

    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    x = torch.tensor([ids])
    cache = transformers.DynamicCache()
    with torch.no_grad(), SnapKVPress(compression_ratio=ratio)(hf):
        logits = hf(x, past_key_values=cache, use_cache=True).logits[:, -1]
    out, pos = [], len(ids)
    with torch.no_grad():
        for _ in range(n_new):
            t = int(logits.argmax(-1))
            if t in stop_ids:
                break
            out.append(t)
            step = hf(
                torch.tensor([[t]]), past_key_values=cache, use_cache=True, position_ids=torch.tensor([[pos]])
            )
            logits, pos = step.logits[:, -1], pos + 1
    return out


def test_needle_full_cache_and_snapkv_equal_to_kvpress(default_model_dir):
    """Full cache finds the needle; SnapKV at r = 0.5 answers exactly what kvpress's SnapKV answers.

    (On this 135M model query-aware SnapKV at r = 0.5 loses this needle in both implementations.)
    """
    from obinfer.cache.presses import make_press

    tok = load_tokenizer(default_model_dir)
    model = load_model(default_model_dir)
    ids = _needle_prompt(tok)
    full = tok.decode(list(generate(model, ids, max_new_tokens=30, stop_ids=tok.stop_ids)))
    assert "4185923" in full
    ours = list(
        generate(
            model,
            ids,
            max_new_tokens=30,
            stop_ids=tok.stop_ids,
            press=make_press("snapkv", compression_ratio=0.5),
        )
    )
    assert ours == _kvpress_answer(default_model_dir, ids, 0.5, 30, tok.stop_ids)
