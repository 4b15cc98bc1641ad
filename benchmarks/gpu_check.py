"""The CUDA path checked in one short script (minutes): the engine on a device against CPU float32.

    python benchmarks/gpu_check.py                         # on a GPU: cuda, tiny checkpoints + Qwen 0.5B
    python benchmarks/gpu_check.py --device cpu --dry-run  # every step on the CPU, tiny sizes (a test)
    python benchmarks/gpu_check.py --real PATH_OR_NAME --lengths 8192,32768 --json gpu_check.json
    python benchmarks/gpu_check.py --random-weights        # offline, without the checkpoint: speed on
                                                           # random weights of Qwen2.5-0.5B's shape

Checks (each line ``[ok]``, ``[FAIL]`` or ``[skip]``; exit status 1 if any check failed):

1. **logits**: prefill logits and 8 greedy tokens on the device (float32) equal CPU float32 (the same
   checkpoint, written and loaded from safetensors) for a tiny random Llama (llama3 RoPE scaling) and a
   tiny random Qwen-2.5 (q/k/v biases, tied embeddings), and for a real model (``--real``; the device
   machine must have it in the weights directory, it is not downloaded in ``--dry-run``); bfloat16 on
   the device is reported (largest logit difference, greedy agreement), not checked.
2. **kept positions**: for every press name (``obinfer presses``) at compression ratio 0.5, the
   positions each (layer, KV head) keeps on the device equal CPU's (one shared prefill per device,
   `obinfer/cache/fanout.py`; the tiny checkpoints; the real model at 1024 tokens for every 8th name,
   ``--real-presses-every 1`` for all, which is slow on the CPU side).
3. **attention paths**: a uniform layout takes the uniform path, and its prefill runs in a fused SDPA
   kernel in bfloat16 (flash / memory-efficient / cuDNN only, the math fallback disabled; float32 and
   a question block over a compressed cache are reported, with torch's reason when no fused kernel
   takes them); snapkv and AdaKV caches decode on the path of their layout, a ragged one on the
   ragged path.
4. **eval and inspect**: ``run_eval`` (shared prefill, batched ragged decoding) and the inspector's
   ``run_presses`` on the device give CPU's answers, kept sets and scores; ``torchrun --nproc-per-node 2
   -m obinfer eval --device cuda`` (nccl; on a single GPU both ranks share it) writes the rows that one
   process writes (not in ``--dry-run``: tests/test_eval_distributed.py runs it with gloo on CPU).
5. **speed**: decode tok/s, prefill seconds and peak device memory for full vs snapkv vs adakv-snapkv
   (r = 0.5) at 8k and 32k on the real model (Qwen2.5 0.5B by default) in bfloat16; where the model
   cannot be loaded (a device machine offline), or with ``--random-weights``, on random weights of
   Qwen2.5-0.5B's architecture (speed and memory do not depend on the weights). Peak memory is
   ``torch.cuda.max_memory_allocated`` over the prefill, compression and decode, weights included.

``--dry-run`` replaces the real model by the tiny ones and the contexts by a few hundred tokens, so
that every step runs on the CPU in seconds (tests/test_gpu_check.py); on the CPU, the device *is* CPU,
so the comparisons are trivially equal and only the code paths are exercised.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

TINY_LLAMA = dict(
    model_type="llama", vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5,
    rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32},
)  # fmt: skip
TINY_QWEN = dict(
    model_type="qwen2", vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-6,
    rope_theta=1000000.0, tie_word_embeddings=True, eos_token_id=2,
)  # fmt: skip
# Qwen2.5-0.5B's architecture: speed and memory do not depend on the weights, so a device machine without
# the checkpoint (it cannot download it) still measures them on random weights of this shape
QWEN_05B = dict(
    model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
    num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
    rope_theta=1000000.0, tie_word_embeddings=True, eos_token_id=151645,
)  # fmt: skip
DEFAULT_REAL = "qwen2.5-coder-0.5b-instruct"
SPEED_PRESSES = ("full", "snapkv", "adakv-snapkv")


# ------------------------------------------------------------------------------------------ report
@dataclass
class Report:
    """Check lines as they come, and everything measured (for --json)."""

    checks: list[dict[str, Any]] = field(default_factory=list)
    speed: list[dict[str, Any]] = field(default_factory=list)

    def add(self, status: str, name: str, detail: str = "") -> None:
        self.checks.append({"status": status, "name": name, "detail": detail})
        print(f"[{status}] {name}" + (f": {detail}" if detail else ""), flush=True)

    def check(self, ok: bool, name: str, detail: str = "") -> bool:
        self.add("ok" if ok else "FAIL", name, detail)
        return ok

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [c for c in self.checks if c["status"] == "FAIL"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------- checkpoints
def write_tiny(config: dict[str, Any], out: Path, seed: int = 0) -> Path:
    """A random-weight checkpoint in Hugging Face layout (config.json + model.safetensors), built with
    obinfer's own model (no transformers): weights N(0, 0.15) so that attention is far from uniform,
    biases N(0, 0.5)."""
    from safetensors.torch import save_file

    from obinfer.config import ModelConfig
    from obinfer.models.llama import Transformer

    torch.manual_seed(seed)
    cfg = ModelConfig.from_hf(config)
    model = Transformer(cfg)
    state = {}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if p.dim() == 2:
            p = torch.randn_like(p) * 0.15
        elif name.endswith(".bias"):
            p = torch.randn_like(p) * 0.5
        state[name] = p.contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config))
    return out


def tiny_checkpoints(root: Path) -> dict[str, Path]:
    return {"tiny-llama": write_tiny(TINY_LLAMA, root / "tiny-llama"),
            "tiny-qwen": write_tiny(TINY_QWEN, root / "tiny-qwen", seed=1)}  # fmt: skip


def load_real(name: str, dtype: str, device: str) -> tuple[Any, Any] | str:
    """(model, tokenizer) of a named model / directory / hub id, or why it cannot be loaded."""
    from obinfer.errors import ObinferError
    from obinfer.loading import load

    try:
        return load(name, dtype=dtype, device=device)
    except (ObinferError, OSError) as e:
        return f"{name} not available ({' '.join(str(e).split())[:160]})"


def arch_model(config: dict[str, Any], dtype: str, device: torch.device | str) -> Any:
    """A model of `config`'s architecture with random weights, built on `device` (for speed and memory)."""
    from obinfer.config import ModelConfig
    from obinfer.models.llama import Transformer, rope_inv_freq

    cfg = ModelConfig.from_hf(config)
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(cfg)
    model = model.to(getattr(torch, dtype))
    model.inv_freq = rope_inv_freq(cfg).to(device)  # float32, as load_model leaves it
    return model.eval().requires_grad_(False)


def prompt_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, min(vocab, 32000), (n,), generator=g).tolist()


# ------------------------------------------------------------------------------------- 1. logits
@torch.inference_mode()
def logits_and_greedy(model: Any, ids: list[int], n_new: int = 8) -> tuple[torch.Tensor, list[int]]:
    """Prefill logits (T, V) on the CPU in float32, and n_new greedy tokens."""
    cache = model.new_cache(1)
    logits = model(torch.tensor([ids], device=model.device), cache)[0]
    out, nxt = [], logits[-1]
    for _ in range(n_new):
        t = int(nxt.argmax())
        out.append(t)
        nxt = model(torch.tensor([[t]], device=model.device), cache)[0, -1]
    return logits.float().cpu(), out


def compare_logits(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    """(largest absolute difference, that relative to the largest |reference logit|)."""
    diff = float((ref - got).abs().max())
    return diff, diff / max(float(ref.abs().max()), 1e-12)


def check_logits(rep: Report, name: str, cpu_model: Any, dev_model: Any, ids: list[int],
                 tol: float = 1e-4, checked: bool = True) -> None:  # fmt: skip
    ref, ref_toks = logits_and_greedy(cpu_model, ids)
    got, toks = logits_and_greedy(dev_model, ids)
    diff, rel = compare_logits(ref, got)
    same = sum(a == b for a, b in zip(ref_toks, toks, strict=True))
    detail = f"max|diff| {diff:.2e} (relative {rel:.2e}), greedy tokens {same}/{len(toks)} equal"
    where = f"logits {name} {dev_model.device} {str(dev_model.dtype).replace('torch.', '')} vs cpu float32"
    if checked:
        rep.check(rel <= tol and same == len(toks), where, detail)
    else:
        rep.add("info", where, detail)


# ------------------------------------------------------------------------------ 2. kept positions
def all_presses() -> list[str]:
    from obinfer.cache.presses import press_names

    return press_names()


def kept_by_press(model: Any, ids: list[int], names: list[str]) -> dict[str, Any]:
    """press name -> kept positions ([layer][row][head] -> positions) at r = 0.5, or the error text."""
    from obinfer.cache.fanout import Fanout
    from obinfer.cache.presses import make_press

    presses, out = {}, {}
    for name in names:
        try:
            presses[name] = make_press(name, compression_ratio=0.5)
        except Exception as e:  # noqa: BLE001 - reported per press
            out[name] = f"cannot build: {e}"
    fan = Fanout(model, ids, list(presses.values()))
    for name, press in presses.items():
        try:
            out[name] = fan.compress(press).kept_positions()
        except Exception as e:  # noqa: BLE001 - reported per press
            out[name] = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
    return out


def kept_differences(ref: Any, got: Any) -> int | str:
    """Positions kept by one and not the other, summed over (layer, row, head); or an error text."""
    if isinstance(ref, str) or isinstance(got, str):
        return ref if isinstance(ref, str) else got
    n = 0
    for lr, lg in zip(ref, got, strict=True):
        for rr, rg in zip(lr, lg, strict=True):
            for hr, hg in zip(rr, rg, strict=True):
                n += len(set(hr) ^ set(hg))
    return n


def check_kept(
    rep: Report, name: str, cpu_model: Any, dev_model: Any, ids: list[int], every: int = 1
) -> None:
    """Kept positions of every press (with `every` > 1, of every `every`-th name: a dry run)."""
    names = all_presses()[::every]
    ref = kept_by_press(cpu_model, ids, names)
    got = ref if dev_model is cpu_model else kept_by_press(dev_model, ids, names)
    bad = {}
    for press in names:
        d = kept_differences(ref[press], got[press])
        if d != 0:
            bad[press] = d
    detail = f"{len(names) - len(bad)}/{len(names)} presses equal at r=0.5, {len(ids)} tokens"
    detail += f" (every {every}th of {len(all_presses())} names: dry run)" if every > 1 else ""
    if bad:
        detail += "; differ: " + ", ".join(f"{k} ({v})" for k, v in list(bad.items())[:8])
        detail += f" and {len(bad) - 8} more" if len(bad) > 8 else ""
    rep.check(not bad, f"kept positions {name} {dev_model.device} vs cpu", detail)


# ---------------------------------------------------------------------------- 3. attention paths
@contextlib.contextmanager
def count_paths() -> Iterator[Counter]:
    """Count the attention paths taken (uniform / ragged) while the block runs."""
    from obinfer.cache import attention

    counts: Counter = Counter()
    real = {n: getattr(attention, n) for n in ("_attend_uniform", "_attend_ragged")}

    def counted(n: str):  # noqa: ANN202
        def call(*a: Any, **k: Any) -> Any:
            counts[n.strip("_").replace("attend_", "")] += 1
            return real[n](*a, **k)

        return call

    for n in real:
        setattr(attention, n, counted(n))
    try:
        yield counts
    finally:
        for n, f in real.items():
            setattr(attention, n, f)


def fused_only(device: torch.device) -> contextlib.AbstractContextManager:
    """SDPA restricted to fused kernels (no math fallback): a call that cannot use one raises."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device.type == "cuda":
        backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    else:
        backends = [SDPBackend.FLASH_ATTENTION]  # the CPU's fused (flash) kernel
    return sdpa_kernel(backends)


def fused_run(device: torch.device, fn: Any) -> tuple[bool, str]:
    """Run fn() with SDPA limited to fused kernels: (True, "") or (False, why, from torch's warnings)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with fused_only(device):
                fn()
            return True, ""
        except RuntimeError as e:
            reasons = [str(w.message).strip().splitlines()[0] for w in caught] or [str(e)]
            return False, "; ".join(dict.fromkeys(" ".join(r.split())[:150] for r in reasons))[:600]


@torch.inference_mode()
def check_attention_paths(rep: Report, model: Any, ids: list[int], bf16: Any = None) -> None:
    """Which attention path and SDPA kernel each layout takes on the device (`bf16`: a bfloat16 copy,
    the dtype fused CUDA kernels need)."""
    from obinfer.cache.fanout import Fanout
    from obinfer.cache.presses import make_press
    from obinfer.generate import stream

    dev = model.device
    x = torch.tensor([ids], device=dev)
    with count_paths() as counts:
        model(x, model.new_cache(1), last_only=True)
    L = model.cfg.n_layers
    rep.check(counts == Counter(uniform=L), f"attention {dev}: uniform prefill takes the uniform path",
              str(dict(counts)))  # fmt: skip
    for m in [model] + ([bf16] if bf16 is not None else []):
        dtype = str(m.dtype).replace("torch.", "")
        fused, why = fused_run(dev, lambda m=m: m(x, m.new_cache(1), last_only=True))
        name = f"attention {dev} {dtype}: uniform prefill runs in a fused SDPA kernel"
        if dev.type == "cuda" and m is bf16:
            rep.check(fused, name, why)
        else:
            rep.add("info", f"{name}: {fused}", why)
        snap = make_press("snapkv", compression_ratio=0.5)
        cache = Fanout(m, ids, [snap]).compress(snap)  # a question block (T = 8) over a compressed cache
        fused, why = fused_run(dev, lambda m=m, c=cache: m(x[:, :8], c.fork(), last_only=True))
        rep.add(
            "info",
            f"attention {dev} {dtype}: question block on a compressed uniform cache fused: {fused}",
            why,
        )
    uni, ada = make_press("snapkv", compression_ratio=0.5), make_press("adakv-snapkv", compression_ratio=0.5)
    fan = Fanout(model, ids, [uni, ada])
    caches = {
        "snapkv": fan.compress(uni),
        "adakv-snapkv": fan.compress(ada),
        "ragged by hand": ragged(fan.cache),
    }
    for what, cache in caches.items():
        path = "uniform" if all(layer.is_uniform() for layer in cache.layers) else "ragged"
        with count_paths() as counts:
            list(stream(model, [[ids[-1]]], max_new_tokens=4, cache=cache))
        ok = counts[path] > 0 and sum(counts.values()) == counts[path]
        ok &= path == "ragged" or what != "ragged by hand"
        rep.check(ok, f"attention {dev}: {what} cache decodes on the {path} path", str(dict(counts)))


def ragged(full: Any) -> Any:
    """A fork of `full` whose KV heads keep different numbers of slots (head h: every (h+2)-th and the
    last), in every layer."""
    cache = full.fork()
    for layer in cache.layers:
        n = layer.length[0]
        layer.keep([torch.tensor(sorted(set(range(0, n, i % layer.n_kv_heads + 2)) | {n - 1}), device=layer.k.device)
                    for i in range(layer.n_segments)])  # fmt: skip
    return cache


# ---------------------------------------------------------------------------- 4. eval and inspect
SPECIALS = {"<|user|>": 300, "<|end|>": 301, "<|assistant|>": 302}


class ByteTokenizer:
    """Bytes as ids 3..258 and three chat tokens, for the 320-token tiny checkpoints."""

    bos_id, stop_ids, has_chat_template = 1, {2, 301}, True

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = [self.bos_id] if add_bos else []
        for part in _split_specials(text):
            ids += [SPECIALS[part]] if part in SPECIALS else [b + 3 for b in part.encode("utf-8")]
        return ids

    def decode(self, ids: list[int]) -> str:
        names = {v: k for k, v in SPECIALS.items()}
        data = b"".join(
            names[i].encode() if i in names else bytes([i - 3]) if 3 <= i < 259 else b"" for i in ids
        )
        return data.decode("utf-8", errors="replace")

    def chat_parts(self) -> tuple[str, str]:
        return "<|user|>", "<|end|><|assistant|>"


def _split_specials(text: str) -> list[str]:
    out, i, start = [], 0, 0
    while i < len(text):
        s = next((s for s in SPECIALS if text.startswith(s, i)), None)
        if s:
            out += [text[start:i], s] if i > start else [s]
            i = start = i + len(s)
        else:
            i += 1
    return out + ([text[start:]] if start < len(text) else [])


def eval_samples(n: int = 2) -> list[dict[str, Any]]:
    base = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
    return [
        {"task": "niah_single_1", "index": i, "max_seq_length": 512, "max_new_tokens": 6, "n_tokens": 0,
         "context": "A special magic number is hidden below.\n" + base
         + f"One of the special magic numbers for key-{i} is: {1234567 + i}.\n" + base,
         "question": f"What is the special magic number for key-{i}? ", "answer_prefix": "The number is",
         "answers": [str(1234567 + i)], "depth": [50.0]}
        for i in range(n)
    ]  # fmt: skip


def check_eval_and_inspect(rep: Report, cpu_model: Any, dev_model: Any, ids: list[int]) -> None:
    from obinfer.cache.presses import make_press
    from obinfer.eval.runner import EvalConfig, run_eval
    from obinfer.inspect.run import run_presses

    dev = dev_model.device
    cfg = dict(presses=["full", "snapkv", "adakv-snapkv-obk", "h2o", "tova-obv"], ratios=[0.5],
               modes=["agnostic", "aware"])  # fmt: skip
    keep = ("index", "mode", "press", "ratio", "pred", "score", "kept_tokens", "cache_bytes")
    rows = []
    for m in (cpu_model, dev_model):
        with tempfile.TemporaryDirectory() as tmp:
            res = run_eval(m, ByteTokenizer(), eval_samples(), EvalConfig(**cfg), tmp, progress=False)
        rows.append([{k: r[k] for k in keep} for r in res])
    same = sum(a == b for a, b in zip(*rows, strict=True))
    rep.check(same == len(rows[0]), f"eval {dev}: answers, scores and kept tokens equal cpu's",
              f"{same}/{len(rows[0])} rows equal (batched decoding, ragged rows)")  # fmt: skip
    presses = [make_press(n, compression_ratio=0.5) for n in ("snapkv-obk", "adakv-h2o-obkv", "tova")]
    ref, got = run_presses(cpu_model, ids, presses), run_presses(dev_model, ids, presses)
    bad = []
    for a, b in zip(ref, got, strict=True):
        finite = torch.isfinite(a.scores)
        scale = float(a.scores[finite].abs().max()) if finite.any() else 1.0
        close = torch.equal(finite, torch.isfinite(b.scores)) and torch.allclose(
            a.scores[finite], b.scores[finite], rtol=1e-3, atol=1e-4 * scale
        )
        if a.kept != b.kept or not close:
            bad.append(a.name)
    rep.check(not bad, f"inspect {dev}: kept sets and scores equal cpu's", ", ".join(bad) or "3 presses")


# ------------------------------------------------------------------------------ 4b. eval under torchrun
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TIMING = ("prefill_s", "compress_s", "decode_s")


def write_byte_tokenizer(model_dir: Path) -> Path:
    """A byte-level BPE ``tokenizer.json`` without merges: byte b is id b, ChatML's special tokens are
    256-258 (fits the 320-token tiny checkpoints), and a ChatML chat template."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\xa1"), ord("\xac") + 1),
        *range(ord("\xae"), 256),
    ]
    shifted = [b for b in range(256) if b not in printable]  # GPT-2's byte -> unicode map
    char = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(shifted)}
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    data = {
        "added_tokens": [{"id": 256 + i, "content": t, "special": True} for i, t in enumerate(specials)],
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
        "decoder": {"type": "ByteLevel"},
        "model": {"type": "BPE", "vocab": {char[b]: b for b in range(256)}, "merges": []},
    }
    (model_dir / "tokenizer.json").write_text(json.dumps(data))
    config = {"chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": None, "add_bos_token": False}
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    return model_dir


def check_torchrun(rep: Report, dev: torch.device, root: Path, n_ranks: int = 2) -> None:
    """``torchrun --nproc-per-node 2 -m obinfer eval --device ...`` (nccl on CUDA; both ranks on one GPU
    if there is only one) writes the rows one process writes."""
    import subprocess

    model = write_byte_tokenizer(write_tiny(TINY_LLAMA, root / "tiny-chat"))
    args = ["eval", "--model", str(model), "--presses", "full,snapkv,adakv-snapkv-obk", "--ratios", "0.5",
            "--tasks", "niah_single_1,niah_single_2", "--length", "1024", "--samples", "2",
            "--max-new-tokens", "4", "--no-progress", "--dist-timeout", "300"]  # fmt: skip
    device = str(dev)
    if dev.type == "cuda":
        device = "cuda" if torch.cuda.device_count() >= n_ranks else f"cuda:{dev.index or 0}"
    runs = {
        "one process": [sys.executable, "-m", "obinfer", *args, "--device", str(dev), "--out", str(root / "one")],
        f"{n_ranks} ranks": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                             str(n_ranks), "-m", "obinfer", *args, "--device", device, "--out", str(root / "ranks")],
    }  # fmt: skip
    rows = []
    for what, cmd in runs.items():
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            tail = " | ".join(done.stderr.strip().splitlines()[-6:])[-600:]
            rep.check(
                False, f"eval {dev} under torchrun ({device}, {n_ranks} ranks)", f"{what} failed: {tail}"
            )
            return
        out = root / ("one" if what == "one process" else "ranks") / "results.jsonl"
        rows.append(
            [
                {k: v for k, v in json.loads(x).items() if k not in TIMING}
                for x in out.read_text().splitlines()
            ]
        )
    rep.check(rows[0] == rows[1] and len(rows[0]) > 0,
              f"eval {dev} under torchrun ({device}, {n_ranks} ranks): the rows of one process",
              f"{sum(a == b for a, b in zip(*rows, strict=False))}/{len(rows[0])} rows equal, row for row")  # fmt: skip


# ------------------------------------------------------------------------------------- 5. speed
@torch.inference_mode()
def decode_speed(model: Any, n: int, press_name: str, new_tokens: int) -> dict[str, Any]:
    """One prompt of n random tokens under a press: prefill s, decode tok/s, peak device memory."""
    from obinfer.cache.presses import make_press
    from obinfer.generate import GenStats, stream

    dev = model.device
    press = make_press(press_name, compression_ratio=None if press_name == "full" else 0.5)
    n = min(n, model.cfg.max_position_embeddings - new_tokens)  # "32k" on a 32768-position model
    ids = prompt_ids(n, model.cfg.vocab_size, seed=n)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    stats = GenStats()
    t0 = time.perf_counter()
    for _ in stream(model, [ids], max_new_tokens=new_tokens, press=press, stats=stats):
        pass
    sync(dev)
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    return {"press": press_name, "tokens": n, "new_tokens": stats.new_tokens, "prefill_s": stats.prefill_s,
            "decode_tok_s": stats.decode_tok_s, "wall_s": wall, "kv_bytes_kept": stats.cache_bytes_kept,
            "peak_bytes": peak}  # fmt: skip


def run_speed(rep: Report, model: Any, name: str, lengths: list[int], new_tokens: int) -> None:
    decode_speed(model, min(lengths), "full", 2)  # warm-up (kernels, allocator)
    for n in lengths:
        for press in SPEED_PRESSES:
            r = decode_speed(model, n, press, new_tokens) | {"model": name, "device": str(model.device),
                                                              "dtype": str(model.dtype).replace("torch.", "")}  # fmt: skip
            rep.speed.append(r)
            peak = "n/a on cpu" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**30:.2f} GiB"
            rep.add("info", f"speed {name} {r['dtype']} {n} tokens {press}",
                    f"prefill {r['prefill_s']:.2f} s, decode {r['decode_tok_s']:.1f} tok/s, "
                    f"K/V kept {r['kv_bytes_kept'] / 2**20:.1f} MiB, peak memory {peak}")  # fmt: skip


def speed_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of the speed rows (for docs/results.md)."""
    lines = ["| model | dtype | tokens | press | prefill s | decode tok/s | K/V kept MiB | peak GiB |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**30:.2f}"
        lines.append(f"| {r['model']} | {r['dtype']} | {r['tokens']} | {r['press']} | {r['prefill_s']:.2f} | "
                     f"{r['decode_tok_s']:.1f} | {r['kv_bytes_kept'] / 2**20:.1f} | {peak} |")  # fmt: skip
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- main
def check_real(rep: Report, args: argparse.Namespace, dev: torch.device) -> None:
    """Logits and kept positions of the real model against its CPU float32 copy, then its speed (on
    random weights of Qwen2.5-0.5B's architecture if the model cannot be loaded, or with --random-weights)."""
    lengths = [int(x) for x in args.lengths.split(",")]
    real = "--random-weights" if args.random_weights else load_real(args.real, "float32", "cpu")
    if isinstance(real, str):
        rep.add("skip", f"real model {args.real}", real)
        name = "qwen2.5-0.5b architecture, random weights"
        run_speed(rep, arch_model(QWEN_05B, args.speed_dtype, dev), name, lengths, args.new_tokens)
        return
    cpu_model = real[0]
    dev_model = cpu_model if dev.type == "cpu" else load_real(args.real, "float32", str(dev))[0]
    check_logits(rep, args.real, cpu_model, dev_model, prompt_ids(512, cpu_model.cfg.vocab_size), tol=1e-3)
    ids = prompt_ids(1024, cpu_model.cfg.vocab_size, seed=1)
    check_kept(rep, args.real, cpu_model, dev_model, ids, every=args.real_presses_every)
    del cpu_model, dev_model, real
    speed = load_real(args.real, args.speed_dtype, str(dev))
    if isinstance(speed, str):
        rep.add("skip", "speed", speed)
        return
    run_speed(rep, speed[0], args.real, lengths, args.new_tokens)


def run_checks(args: argparse.Namespace, dev: torch.device) -> Report:
    """Every check of the module docstring, in order; prints them; returns the report."""
    from obinfer.weights import load_model

    rep = Report()
    t_start = time.perf_counter()
    n_tiny = 96 if args.dry_run else 384
    print(f"gpu_check: device {dev}" + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else "")
          + (", dry run" if args.dry_run else ""), flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        tiny = tiny_checkpoints(Path(tmp))
        for name, path in tiny.items():
            cpu_model = load_model(path)
            dev_model = cpu_model if dev.type == "cpu" else load_model(path, device=dev)
            ids = prompt_ids(n_tiny, 320, seed=len(name))
            check_logits(rep, name, cpu_model, dev_model, ids)
            if dev.type != "cpu":
                check_logits(rep, name, cpu_model, load_model(path, "bfloat16", dev), ids, checked=False)
            check_kept(rep, name, cpu_model, dev_model, ids)
            if name == "tiny-llama":
                check_attention_paths(rep, dev_model, ids, load_model(path, "bfloat16", dev))
                check_eval_and_inspect(rep, cpu_model, dev_model, ids)
        if args.dry_run:
            rep.add("skip", "eval under torchrun", "dry run (tests/test_eval_distributed.py runs it on CPU)")
        else:
            check_torchrun(rep, dev, Path(tmp))
        if args.dry_run:
            rep.add("skip", f"real model {args.real}", "dry run: the tiny checkpoints stand in for it")
            run_speed(rep, load_model(tiny["tiny-qwen"], device=dev), "tiny-qwen", [128, 256], 8)
    if not args.dry_run:
        check_real(rep, args, dev)
    took = time.perf_counter() - t_start
    if rep.speed:
        print(speed_table(rep.speed))
    print(f"gpu_check: {len(rep.checks)} lines, {len(rep.failed)} failed, {took:.0f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(dev), "dry_run": args.dry_run, "seconds": took,
                                               "checks": rep.checks, "speed": rep.speed}, indent=1) + "\n")  # fmt: skip
    return rep


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="the device checked against the CPU (default cuda)")
    p.add_argument("--dry-run", action="store_true", help="tiny checkpoints and contexts only (runs on CPU)")
    p.add_argument("--real", default=DEFAULT_REAL, help=f"the real model (default {DEFAULT_REAL})")
    p.add_argument("--lengths", default="8192,32768", help="speed: prompt lengths (default 8192,32768)")
    p.add_argument("--new-tokens", type=int, default=64, help="speed: tokens decoded (default 64)")
    p.add_argument("--speed-dtype", default="bfloat16", help="speed: the real model's dtype on the device")
    p.add_argument(
        "--real-presses-every",
        type=int,
        default=8,
        help="kept positions on the real model: every N-th press name (default 8; 1: all, slow on CPU)",
    )
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="skip the real model's checks; measure speed on random weights of Qwen2.5-0.5B's architecture",
    )
    p.add_argument("--json", help="write every check and measurement to this file")
    args = p.parse_args(argv)

    from obinfer.errors import ObinferError
    from obinfer.loading import check_device

    try:
        check_device(args.device)
    except ObinferError as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2
    dev = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 (the CPU reference)
    torch.backends.cudnn.allow_tf32 = False
    threads = torch.get_num_threads()
    if args.dry_run:
        torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and kind to shared cores
    try:
        rep = run_checks(args, dev)
    finally:
        torch.set_num_threads(threads)
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
