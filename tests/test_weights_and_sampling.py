"""Sharded checkpoints load like single files; the sampler's top-k / top-p / seed behave as specified;
bad sampling values, prompts and checkpoints (truncated, missing / mis-shaped / non-float tensors) give one
clear error naming the value, tensor or file."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from obinfer import weights
from obinfer.cache.presses import make_press
from obinfer.errors import ObinferError
from obinfer.generate import GenerationError, Sampling, generate, sample_next, stream
from obinfer.weights import CheckpointError, load_model


@torch.no_grad()
def test_sharded_index_loads_like_the_single_file(tiny_llama_dir, tmp_path):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    ids = torch.randint(3, 320, (1, 24), generator=torch.Generator().manual_seed(0))
    a, b = load_model(tiny_llama_dir), load_model(tmp_path)
    torch.testing.assert_close(a(ids, a.new_cache()), b(ids, b.new_cache()), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_casting_load_equals_the_float32_load_cast(tiny_llama_dir, tmp_path, monkeypatch, dtype):
    """A load that casts reads the file by chunks (here 1000 bytes: many chunks with ragged tails, and a
    sharded checkpoint) into the final buffers: the same values as casting the float32 load."""
    ref = load_model(tiny_llama_dir).state_dict()
    monkeypatch.setattr(weights, "_CHUNK_BYTES", 1000)
    sharded = _copy(tiny_llama_dir, tmp_path / "sharded")
    state = load_file(sharded / "model.safetensors")
    (sharded / "model.safetensors").unlink()
    names = sorted(state)
    save_file({k: state[k] for k in names[::2]}, sharded / "a.safetensors")
    save_file({k: state[k].to(torch.bfloat16) for k in names[1::2]}, sharded / "b.safetensors")  # mixed
    for d in (tiny_llama_dir, sharded):
        got = load_model(d, dtype=dtype).state_dict()
        assert got.keys() == ref.keys()
        for k, v in ref.items():
            src = v.to(torch.bfloat16) if d == sharded and k in names[1::2] else v
            assert got[k].dtype == dtype and torch.equal(got[k], src.to(dtype)), k
    # and the other way: a bfloat16 file loaded as float32 (bf16 -> f32 is exact)
    got = load_model(sharded).state_dict()
    assert all(torch.equal(got[k], state[k].to(torch.bfloat16).float()) for k in names[1::2])


def test_greedy_is_argmax():
    logits = torch.randn(3, 50)
    assert torch.equal(sample_next(logits, Sampling(), None), logits.argmax(-1))


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(4, 100)
    g = torch.Generator().manual_seed(0)
    for s in (Sampling(temperature=1.0, top_k=1), Sampling(temperature=1.0, top_p=1e-6)):
        assert torch.equal(sample_next(logits, s, g), logits.argmax(-1))


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]])
    probs = logits.softmax(-1)[0]
    g = torch.Generator().manual_seed(1)
    seen_k = {int(sample_next(logits, Sampling(temperature=1.0, top_k=2), g)) for _ in range(300)}
    assert seen_k == {0, 1}
    p = float(probs[:2].sum()) + 1e-3  # the smallest prefix reaching p is the top 3 tokens
    seen_p = {int(sample_next(logits, Sampling(temperature=1.0, top_p=p), g)) for _ in range(600)}
    assert seen_p == {0, 1, 2}


def test_seeded_sampling_is_reproducible_and_follows_the_distribution():
    logits = torch.tensor([[1.0, 0.0, -1.0]])
    s = Sampling(temperature=1.0, seed=5)
    draws = [sample_next(logits.expand(4000, 3), s, s.generator()) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    freq = torch.bincount(draws[0], minlength=3).float() / 4000
    torch.testing.assert_close(freq, logits.softmax(-1)[0], atol=0.03, rtol=0)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_scales_logits(temperature):
    logits = torch.tensor([[1.0, 0.0]])
    s = Sampling(temperature=temperature, seed=0)
    draws = sample_next(logits.expand(6000, 2), s, s.generator())
    expected = (logits / temperature).softmax(-1)[0, 1]
    assert abs(draws.float().mean() - expected) < 0.03


# ---------------------------------------------------------------- bad sampling values, prompts, checkpoints
@pytest.mark.parametrize(
    "kw, match",
    [
        ({"temperature": -1}, r"temperature must be a finite number >= 0 \(0 = greedy\), got -1$"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": "0.7"}, "temperature"),
        ({"top_p": 0}, r"top_p must be in \(0, 1\] \(1 = off\), got 0$"),
        ({"top_p": 2}, r"top_p must be in \(0, 1\]"),
        ({"top_p": -0.5}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"top_k": -3}, r"top_k must be an integer >= 0 \(0 = off\), got -3$"),
        ({"top_k": 2.5}, "top_k must be an integer"),
        ({"top_k": True}, "top_k must be an integer"),
        ({"seed": "1"}, "seed must be an integer"),
        ({"seed": 1.0}, "seed must be an integer"),
        ({"seed": 2**64}, "seed must be an integer in"),
    ],
)
def test_sampling_rejects_bad_values(kw, match):
    with pytest.raises(GenerationError, match=match):
        Sampling(**kw)


def test_sampling_accepts_the_edges():
    Sampling(temperature=0, top_p=1, top_k=0, seed=None)
    Sampling(temperature=1e-3, top_p=1e-9, top_k=10**6, seed=2**63)
    assert issubclass(GenerationError, ObinferError) and issubclass(GenerationError, ValueError)


@pytest.fixture(scope="module")
def tiny_model(tiny_llama_dir):
    return load_model(tiny_llama_dir)


@pytest.mark.parametrize(
    "prompt, kw, match",
    [
        ([], {}, r"^the prompt is empty \(0 tokens\)$"),
        ([5, 320, 6], {}, r"the prompt has token id 320 at index 1, outside the vocabulary \[0, 320\)"),
        ([-1], {}, r"token id -1 at index 0, outside the vocabulary"),
        ([5, 6.0], {}, r"the prompt has 6.0 at index 1; token ids must be integers"),
        ([5, True], {}, r"token ids must be integers"),
        ("hello", {}, r"the prompt must be a list of token ids, got str"),
        ([5, 6], {"max_new_tokens": 0}, r"max_new_tokens must be an integer >= 1, got 0"),
        ([5, 6], {"max_new_tokens": 2.0}, r"max_new_tokens must be an integer >= 1"),
        ([5, 6], {"question": []}, r"the question is empty \(0 tokens\)"),
        ([5, 6], {"question": [400]}, r"the question has token id 400"),
        ([5, 6], {"stop_ids": {"x"}}, r"stop_ids must be integer token ids"),
    ],
)
def test_generate_refuses_bad_arguments_at_the_call(tiny_model, prompt, kw, match):
    with pytest.raises(GenerationError, match=match):
        generate(tiny_model, prompt, **kw)  # raised at the call, before any forward pass


def test_stream_refuses_bad_batches(tiny_model):
    with pytest.raises(GenerationError, match=r"no prompts given"):
        stream(tiny_model, [])
    with pytest.raises(GenerationError, match=r"^prompt 1 is empty \(0 tokens\)$"):
        stream(tiny_model, [[5, 6], []])
    with pytest.raises(GenerationError, match="questions must have equal lengths"):
        stream(tiny_model, [[5, 6], [7]], questions=[[8], [9, 10]])
    with pytest.raises(GenerationError, match="1 questions for 2 prompts"):
        stream(tiny_model, [[5, 6], [7]], questions=[[8]])
    with pytest.raises(GenerationError, match="the cache holds 1 rows but 2 prompts"):
        stream(tiny_model, [[5, 6], [7]], cache=tiny_model.new_cache(1))
    s = Sampling()
    s.top_p = 0  # changed after it was made: checked again by stream
    with pytest.raises(GenerationError, match="top_p"):
        stream(tiny_model, [[5, 6]], sampling=s)
    # a tensor prompt and numpy-style integers are fine
    assert len(list(generate(tiny_model, torch.tensor([5, 6, 7]), max_new_tokens=2))) == 2


def test_drop_finished_gives_the_same_tokens_and_shrinks_the_batch(tiny_model):
    """Rows that stop leave the batch (the cache keeps only the others) and every row's tokens are the
    ones of the full-batch decode; a ragged (AdaKV-compressed, left-padded) batch included."""
    prompts = [
        [5, 9, 17, 33, 60, 61, 62, 70, 80, 90],
        [7, 8, 9, 10, 11, 12, 13],
        [40, 41, 42, 43, 44, 45, 46, 47],
    ]
    press = make_press("adakv-snapkv", compression_ratio=0.5, window=2)

    def run(stop_ids, drop):
        cache = tiny_model.new_cache(len(prompts))
        steps = stream(tiny_model, prompts, max_new_tokens=8, press=press, stop_ids=stop_ids, cache=cache,
                       drop_finished=drop)  # fmt: skip
        return [t.tolist() for t in steps], cache

    free, _ = run(set(), False)
    # stop row 0 at step 1 and row 1 at step 3 (by their own tokens, if the other rows do not make them)
    stops = {free[1][0], free[3][1]}
    ref, _ = run(stops, False)
    got, cache = run(stops, True)
    assert got == ref
    finished = [next((i for i, t in enumerate(col) if t in stops), None) for col in zip(*ref, strict=True)]
    assert finished[0] == 1 and len(ref) > 2  # row 0 stopped early while another row went on
    running_at_end = sum(1 for f in finished if f is None or f == len(ref) - 1)
    assert cache.batch < len(prompts) and cache.batch >= running_at_end
    with pytest.raises(GenerationError, match="drop_finished"):
        stream(tiny_model, prompts, press=make_press("h2o", budget=4), drop_finished=True)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rewrite(model_dir, change):
    """Load model.safetensors, apply change(dict) and save it back."""
    f = model_dir / "model.safetensors"
    state = load_file(f)
    change(state)
    save_file(state, f)
    return f


def test_truncated_or_corrupt_safetensors(tiny_llama_dir, tmp_path):
    d = _copy(tiny_llama_dir, tmp_path / "m")
    f = d / "model.safetensors"
    data = f.read_bytes()
    for blob in (data[: len(data) // 2], data[:20], b"not a safetensors file at all", b""):
        f.write_bytes(blob)
        with pytest.raises(CheckpointError, match=rf"cannot read {re.escape(str(f))} \(truncated or corrupt"):
            load_model(d)


def test_missing_tensor_names_it(tiny_llama_dir, tmp_path):
    d = _copy(tiny_llama_dir, tmp_path / "m")
    _rewrite(d, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\): model.layers.1.mlp.up_proj.weight$"):
        load_model(d)


def test_wrong_shape_names_tensor_and_file(tiny_llama_dir, tmp_path):
    d = _copy(tiny_llama_dir, tmp_path / "m")
    f = _rewrite(d, lambda s: s.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(
        CheckpointError,
        match=rf"tensor model.norm.weight in {re.escape(str(f))} has shape \(65,\), config.json expects \(64,\)",
    ):
        load_model(d)


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.uint8])
def test_non_float_dtype_names_tensor_and_file(tiny_llama_dir, tmp_path, dtype):
    d = _copy(tiny_llama_dir, tmp_path / "m")
    f = _rewrite(d, lambda s: s.update({"model.norm.weight": torch.ones(64, dtype=dtype)}))
    with pytest.raises(
        CheckpointError,
        match=rf"tensor model.norm.weight in {re.escape(str(f))} has dtype \w+, which cannot be cast",
    ):
        load_model(d)


def test_tensor_in_two_shards(tiny_llama_dir, tmp_path):
    d = _copy(tiny_llama_dir, tmp_path / "m")
    state = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    names = sorted(state)
    save_file({k: state[k] for k in names[:10]}, d / "a.safetensors")
    save_file({k: state[k] for k in names[9:]}, d / "b.safetensors")
    with pytest.raises(CheckpointError, match=rf"tensor {re.escape(names[9])} is stored twice"):
        load_model(d)


def test_half_checkpoints_load_and_dtype_device_checks(tiny_llama_dir, tmp_path):
    d = _copy(tiny_llama_dir, tmp_path / "m")
    _rewrite(d, lambda s: s.update({k: v.to(torch.bfloat16) for k, v in s.items()}))
    assert load_model(d).dtype == torch.float32  # bf16 weights are cast
    with pytest.raises(CheckpointError, match="unknown dtype 'int8'"):
        load_model(d, dtype="int8")
    with pytest.raises(CheckpointError, match="unsupported dtype torch.int8"):
        load_model(d, dtype=torch.int8)
    with pytest.raises(ObinferError, match="unknown device 'gpu0'"):
        load_model(d, device="gpu0")
