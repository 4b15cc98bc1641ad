"""Engine speed: obinfer vs transformers (and llama.cpp's decode, where installed), in one run.

    python benchmarks/bench_engine.py [--models smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct]
        [--dtypes float32,bfloat16,int8,int4] [--contexts 1024,8192] [--llama-cpp PYTHON]

For each model, weight format and context length n:
    prefill n   tokens/s of a prefill of n random tokens (last-position logits only, for both engines);
    decode @n   tokens/s of greedy decoding after that prefill (each engine prefills once, then blocks of
                --decode-steps steps alternate between the engines, --repeats blocks each).
Each figure is the median over interleaved runs (obinfer, peer, obinfer, peer, ...), and the ratio is
obinfer / peer. "int8" / "int4" are obinfer's weight-only formats (`--quantize int8` / `int4`, float32
activations between the layers) against transformers in float32.

The decode rows also give obinfer's share of the memory-bandwidth limit: a decoding step reads every
weight once (bytes of the linear layers and the LM head), so the limit is bandwidth / those bytes,
with the machine's streaming read bandwidth measured at the start of the same run (the sum of a
1 GiB float32 tensor, same thread count); the share is given for the interleaved blocks and for
obinfer's blocks alone (--repeats blocks in a row, after the interleaved ones).

llama.cpp: with --llama-cpp PYTHON (an interpreter that has llama-cpp-python), the same model's GGUF
(its own quantization, e.g. Q4_1 for SmolLM2) decodes after an n-token prompt in a subprocess, right
after obinfer's int8 and int4 decode rows; it is compared with obinfer decoding alone (its blocks in a
row, not interleaved with transformers'), as llama.cpp runs alone too. Without it the row says
llama.cpp was not measured. It is never a dependency of obinfer or of its tests.

Nothing else should run on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from obinfer.catalog import MODELS
from obinfer.hardware import native_bf16
from obinfer.loading import load_dir, resolve_model

LLAMA_CPP_SCRIPT = r"""
import json, random, sys, time
from llama_cpp import Llama
path, n, steps, repeats, threads = sys.argv[1], *map(int, sys.argv[2:6])
llm = Llama(model_path=path, n_ctx=n + steps * (repeats + 1) + 8, n_threads=threads, n_batch=512, verbose=False)
random.seed(0)
ids = [random.randrange(100, llm.n_vocab()) for _ in range(n)]
t = time.perf_counter(); llm.eval(ids); prefill = n / (time.perf_counter() - t)
rates = []
for r in range(repeats + 1):  # the first block warms up; each step feeds one token (its id does not matter)
    t = time.perf_counter()
    for _ in range(steps):
        llm.eval([ids[-1]])
    if r:
        rates.append(steps / (time.perf_counter() - t))
print(json.dumps({"prefill": prefill, "decode": sorted(rates)[len(rates) // 2]}))
"""


def bandwidth_gbs(threads: int) -> float:
    """Streaming read bandwidth (GB/s): the best of 5 sums of a 1 GiB float32 tensor."""
    x = torch.ones(1 << 28)
    x.sum()
    best = min(_time(lambda: x.sum()) for _ in range(5))
    return x.numel() * 4 / best / 1e9


def _time(fn) -> float:  # noqa: ANN001
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def weight_bytes(model) -> int:  # noqa: ANN001
    """Bytes a decoding step reads: every linear layer's weight (and scales) and the LM head."""
    total = 0
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear) or type(mod).__name__ in ("Int8Linear", "Int4Linear"):
            total += sum(t.numel() * t.element_size() for t in mod.buffers(recurse=False))
            total += sum(p.numel() * p.element_size() for p in mod.parameters(recurse=False))
    return total


def interleaved(fa, fb, repeats: int) -> tuple[float, float]:  # noqa: ANN001
    """Median times of fa and fb, their runs interleaved (a, b, a, b, ...) so machine drift hits both."""
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(_time(fa))
        tb.append(_time(fb))
    return statistics.median(ta), statistics.median(tb)


class ObEngine:
    def __init__(self, model) -> None:  # noqa: ANN001
        self.model, self.cache, self.tok = model, None, None

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> None:
        self.cache = self.model.new_cache()
        self.tok = self.model(ids, self.cache, last_only=True)[:, -1].argmax(-1, keepdim=True)

    @torch.inference_mode()
    def decode(self, steps: int) -> None:
        for _ in range(steps):
            self.tok = self.model(self.tok, self.cache)[:, -1].argmax(-1, keepdim=True)


class HfEngine:
    def __init__(self, model) -> None:  # noqa: ANN001
        self.model, self.cache, self.tok = model, None, None

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache()
        out = self.model(ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.tok = out.logits[:, -1].argmax(-1, keepdim=True)

    @torch.inference_mode()
    def decode(self, steps: int) -> None:
        for _ in range(steps):
            out = self.model(self.tok, past_key_values=self.cache, use_cache=True)
            self.tok = out.logits[:, -1].argmax(-1, keepdim=True)


def llama_cpp_decode(python: str, gguf: Path, n: int, args: argparse.Namespace) -> dict | None:
    r = subprocess.run(
        [python, "-c", LLAMA_CPP_SCRIPT, str(gguf), str(n), str(args.decode_steps), str(args.repeats),
         str(args.threads)],
        capture_output=True, text=True,
    )  # fmt: skip
    if r.returncode != 0:
        print(f"  llama.cpp failed: {r.stderr.strip().splitlines()[-1:]}")
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_model(name: str, args: argparse.Namespace, bw: float) -> None:
    model_dir = resolve_model(name)
    print(f"\n## {name}")
    print(f"{'weights':9} {'measure':22} {'obinfer':>9} {'peer':>9} {'ratio':>6}  notes")
    g = torch.Generator().manual_seed(0)
    for fmt in args.dtypes.split(","):
        bench_format(name, model_dir, fmt, args, bw, g)


def bench_format(
    name: str, model_dir: Path, fmt: str, args: argparse.Namespace, bw: float, g: torch.Generator
) -> None:
    """The prefill and decode rows of one weight format ("float32", "bfloat16", "int8" or "int4")."""
    import transformers

    quantized = fmt in ("int8", "int4")
    dtype = "float32" if quantized else fmt
    ob_model, _ = load_dir(model_dir, dtype, "cpu", fmt if quantized else None)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, dtype), attn_implementation="sdpa"
    ).eval()
    ob, peer = ObEngine(ob_model), HfEngine(hf)
    wbytes = weight_bytes(ob_model)
    for n in map(int, args.contexts.split(",")):
        ids = torch.randint(100, ob_model.cfg.vocab_size, (1, n), generator=g)
        t_ob, t_hf = interleaved(lambda: ob.prefill(ids), lambda: peer.prefill(ids), args.prefill_repeats)  # noqa: B023
        print(
            f"{fmt:9} {f'prefill {n} (tok/s)':22} {n / t_ob:9.0f} {n / t_hf:9.0f} {t_hf / t_ob:6.2f}  transformers"
        )
        k = args.decode_steps
        ob.decode(2), peer.decode(2)  # warm-up
        d_ob, d_hf = interleaved(lambda: ob.decode(k), lambda: peer.decode(k), args.repeats)  # noqa: B023
        # obinfer alone: its blocks in a row (the share of the bandwidth limit is a property of one engine;
        # llama.cpp, below, runs alone in its process too)
        alone = statistics.median(_time(lambda: ob.decode(k)) for _ in range(args.repeats))  # noqa: B023
        limit = bw * 1e9 / wbytes
        share = (
            f"{k / d_ob / limit:.0%} of the {limit:.0f} tok/s bandwidth limit ({wbytes / 1e6:.0f} MB/token); "
            f"alone {k / alone:.1f} tok/s, {k / alone / limit:.0%}"
        )
        print(
            f"{fmt:9} {f'decode @{n} (tok/s)':22} {k / d_ob:9.1f} {k / d_hf:9.1f} {d_hf / d_ob:6.2f}  transformers; {share}"
        )
        if quantized:
            llama_row(name, n, k / alone, args, fmt)


def llama_row(name: str, n: int, ob_rate: float, args: argparse.Namespace, fmt: str) -> None:
    source = MODELS[name].source if name in MODELS else None
    if not args.llama_cpp or source is None:
        why = "no --llama-cpp interpreter given" if not args.llama_cpp else "no GGUF for this model"
        print(
            f"{fmt:9} {f'decode @{n} (tok/s)':22} {ob_rate:9.1f} {'-':>9} {'-':>6}  llama.cpp not measured ({why})"
        )
        return
    res = llama_cpp_decode(args.llama_cpp, source.fetch(), n, args)
    if res is not None:
        quant = gguf_types(source.fetch())
        print(
            f"{fmt:9} {f'decode @{n} (tok/s)':22} {ob_rate:9.1f} {res['decode']:9.1f} "
            f"{ob_rate / res['decode']:6.2f}  llama.cpp ({quant}; its prefill {res['prefill']:.0f} tok/s)"
        )


def gguf_types(path: Path) -> str:
    """The GGUF's weight formats, most frequent first (e.g. "Q4_1" or "Q5_0, Q8_0, Q4_K")."""
    from collections import Counter

    from gguf import GGUFReader

    types = Counter(t.tensor_type.name for t in GGUFReader(path).tensors if t.tensor_type.name != "F32")
    return ", ".join(name for name, _ in types.most_common(3))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct",
                    help="named models or checkpoint directories, comma-separated")  # fmt: skip
    ap.add_argument("--dtypes", default="float32,bfloat16,int8,int4")
    ap.add_argument("--contexts", default="1024,8192")
    ap.add_argument("--decode-steps", type=int, default=16, help="decode steps per timed block")
    ap.add_argument("--repeats", type=int, default=5, help="timed decode blocks per engine")
    ap.add_argument("--prefill-repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--llama-cpp", help="a Python interpreter with llama-cpp-python (for its decode row)")
    args = ap.parse_args()
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    bw = bandwidth_gbs(args.threads)
    print(
        f"# {platform.processor() or platform.machine()}, {args.threads} threads, native bf16: {native_bf16()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, python {sys.version.split()[0]}"
    )
    print(f"streaming read bandwidth: {bw:.1f} GB/s")
    for name in args.models.split(","):
        bench_model(name, args, bw)


if __name__ == "__main__":
    main()
