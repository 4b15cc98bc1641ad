"""benchmarks/gpu_check.py, the CUDA check, run as a dry run on the CPU (every step, tiny sizes), and its
comparisons shown to fail when the two sides differ."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from obinfer.weights import load_model

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("gpu_check", None)


def test_dry_run_on_cpu_runs_every_step(gpu_check, tmp_path, capsys, one_thread):
    out = tmp_path / "check.json"
    assert gpu_check.main(["--device", "cpu", "--dry-run", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    report = json.loads(out.read_text())
    names = [c["name"] for c in report["checks"]]
    status = {c["name"]: c["status"] for c in report["checks"]}
    assert not [c for c in report["checks"] if c["status"] == "FAIL"], text
    for prefix in ("logits tiny-llama", "logits tiny-qwen", "kept positions tiny-llama", "kept positions tiny-qwen",
                   "attention cpu: uniform prefill takes the uniform path", "eval cpu", "inspect cpu"):  # fmt: skip
        assert any(n.startswith(prefix) and status[n] == "ok" for n in names), (prefix, text)
    from obinfer.cache.presses import press_names

    n = len(press_names())
    kept = [c["detail"] for c in report["checks"] if c["name"].startswith("kept positions")]
    assert len(kept) == 2 and all(
        d.startswith(f"{n}/{n} presses equal at r=0.5") for d in kept
    )  # every press
    ragged = [n for n in names if "ragged by hand" in n]
    assert ragged and status[ragged[0]] == "ok" and "ragged path" in ragged[0]
    # the real model is skipped, said so in the output (not a pytest skip)
    assert "[skip] real model qwen2.5-coder-0.5b-instruct: dry run" in text
    speed = report["speed"]
    assert [(r["tokens"], r["press"]) for r in speed] == [
        (n, p) for n in (128, 256) for p in ("full", "snapkv", "adakv-snapkv")
    ]
    assert all(r["new_tokens"] == 8 and r["decode_tok_s"] > 0 and r["peak_bytes"] is None for r in speed)
    full, snap = speed[3], speed[4]
    assert snap["kv_bytes_kept"] < full["kv_bytes_kept"]  # the press compressed
    assert "| tiny-qwen | float32 | 256 | snapkv |" in text


def test_the_checks_fail_when_the_two_sides_differ(gpu_check, tmp_path, capsys, one_thread):
    a = load_model(gpu_check.write_tiny(gpu_check.TINY_LLAMA, tmp_path / "a", seed=0))
    b = load_model(gpu_check.write_tiny(gpu_check.TINY_LLAMA, tmp_path / "b", seed=5))  # other weights
    ids = gpu_check.prompt_ids(80, 320)
    rep = gpu_check.Report()
    gpu_check.check_logits(rep, "x", a, b, ids)
    gpu_check.check_kept(rep, "x", a, b, ids, every=20)
    gpu_check.check_eval_and_inspect(rep, a, b, ids)
    assert [c["status"] for c in rep.checks] == ["FAIL"] * 4, capsys.readouterr().out
    assert "differ: " in rep.checks[1]["detail"]
    rep2 = gpu_check.Report()
    gpu_check.check_logits(rep2, "x", a, a, ids)
    assert rep2.checks[0]["status"] == "ok" and not rep2.failed


def test_comparison_helpers(gpu_check):
    ref = torch.tensor([[1.0, -4.0], [2.0, 0.5]])
    assert gpu_check.compare_logits(ref, ref) == (0.0, 0.0)
    diff, rel = gpu_check.compare_logits(ref, ref + torch.tensor([[0.0, 0.2], [0.0, 0.0]]))
    assert diff == pytest.approx(0.2) and rel == pytest.approx(0.05)
    kept = [[[[0, 1, 5], [2]]]]  # [layer][row][head]
    assert gpu_check.kept_differences(kept, kept) == 0
    assert gpu_check.kept_differences(kept, [[[[0, 1, 6], [2]]]]) == 2  # 5 lost, 6 gained
    assert gpu_check.kept_differences("cannot build: x", kept) == "cannot build: x"


def test_speed_on_random_weights_of_an_architecture(gpu_check, one_thread):
    """What the speed section measures when the real checkpoint is missing (here a tiny architecture)."""
    model = gpu_check.arch_model(gpu_check.TINY_QWEN | {"max_position_embeddings": 100}, "bfloat16", "cpu")
    assert model.dtype == torch.bfloat16 and model.inv_freq.dtype == torch.float32
    assert model.model.layers[0].self_attn.q_proj.bias is not None  # Qwen-2.5: q/k/v biases
    r = gpu_check.decode_speed(model, 512, "adakv-snapkv", 4)
    assert r["tokens"] == 96 and r["new_tokens"] == 4  # capped to the model's 100 positions
    assert gpu_check.QWEN_05B["num_key_value_heads"] == 2 and gpu_check.QWEN_05B["hidden_size"] == 896


def test_byte_tokenizer_for_the_torchrun_check(gpu_check, tmp_path):
    """The tokenizer the torchrun check writes next to a tiny checkpoint loads and round-trips."""
    from obinfer.tokenizer import load_tokenizer

    tok = load_tokenizer(gpu_check.write_byte_tokenizer(tmp_path))
    ids = tok.encode("Hi wörld<|im_end|>", add_bos=False)
    assert ids == [72, 105, 32, 119, 195, 182, 114, 108, 100, 258] and max(ids) < 320
    assert tok.decode(ids) == "Hi wörld<|im_end|>" and 258 in tok.stop_ids
    assert tok.chat_parts() == ("<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n")


def test_path_counter_restores_the_attention_functions(gpu_check, tmp_path):
    from obinfer.cache import attention

    before = attention._attend_uniform, attention._attend_ragged
    model = load_model(gpu_check.write_tiny(gpu_check.TINY_QWEN, tmp_path / "q"))
    with gpu_check.count_paths() as counts:
        model(torch.tensor([[5, 6, 7]]), model.new_cache(1))
    assert counts == {"uniform": model.cfg.n_layers}
    assert (attention._attend_uniform, attention._attend_ragged) == before
