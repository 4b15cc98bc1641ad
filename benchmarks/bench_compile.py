"""Does `torch.compile` pay for a decoding step on CPU? Eager against compiled, in one run.

    python benchmarks/bench_compile.py [--model smollm2-135m-instruct] [--dtype float32] [--batch 1]

Issue 11 asked to measure a compiled decode step before adding a flag for it. A decode step's
per-layer work outside the KV cache is two pure functions of fixed shapes (B, 1, C): before the
attention (RMSNorm, the q/k/v projections) and after it (o_proj, the residual, RMSNorm, the gated MLP,
the residual). This script compiles the second, the larger (`torch.compile(dynamic=False)`, inductor),
with each layer's weights as arguments (one compiled graph for every layer), and times it against the
same function in eager mode over every layer of the model, the two interleaved, --repeats rounds of 20
steps each; it prints the medians, their ratio and the largest difference of the outputs. The cache
operations between the two halves (append, ragged attention) hold Python lists and host ints and are
not compiled.

Needs a C++ compiler (inductor generates C++ on CPU); without one it says so and stops.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time

import torch
import torch.nn.functional as F

import obinfer


def post_attention(x, a, norm_w, eps: float, wo, wg, wu, wd):  # noqa: ANN001, ANN201
    """x + o_proj(a), then + MLP(RMSNorm(.)): what a decoder block does after its attention."""
    x = x + a @ wo
    h = x.float()
    h = norm_w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return x + (F.silu(h @ wg) * (h @ wu)) @ wd


def layer_args(block) -> tuple:  # noqa: ANN001
    """A block's weights as (in, out) matrices, contiguous."""

    def io(lin: torch.nn.Linear) -> torch.Tensor:
        w = lin.weight
        return (w.t() if w.shape == (lin.out_features, lin.in_features) else w).contiguous()

    n, m = block.post_attention_layernorm, block.mlp
    return (n.weight, n.eps, io(block.self_attn.o_proj), io(m.gate_proj), io(m.up_proj), io(m.down_proj))


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", default=None, help="a name, checkpoint dir or hub id (default: the embedded one)"
    )
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="float32", help="float32, bfloat16 or auto")
    args = ap.parse_args()
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        raise SystemExit("no C++ compiler on PATH: torch.compile (inductor) cannot run on this CPU")
    torch.set_num_threads(args.threads)
    model, _ = obinfer.load(args.model, dtype=args.dtype)
    layers = [layer_args(b) for b in model.model.layers]
    C = model.cfg.hidden_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 1, C, generator=g).to(model.dtype)
    a = torch.randn(args.batch, 1, model.cfg.n_heads * model.cfg.head_dim, generator=g).to(model.dtype)
    compiled = torch.compile(post_attention, dynamic=False)
    t0 = time.perf_counter()
    compiled(x, a, *layers[0])
    compile_s = time.perf_counter() - t0
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(args.repeats):
        for name, fn in (("eager", post_attention), ("compiled", compiled)):
            t0 = time.perf_counter()
            for _ in range(20):
                for w in layers:
                    fn(x, a, *w)
            times[name].append((time.perf_counter() - t0) / 20 * 1e3)
    diff = max(float((post_attention(x, a, *w) - compiled(x, a, *w)).abs().max()) for w in layers)
    e, c = statistics.median(times["eager"]), statistics.median(times["compiled"])
    print(
        f"# {args.model or 'default model'}, {len(layers)} layers, batch {args.batch}, {model.dtype}, "
        f"{args.threads} threads, torch {torch.__version__}"
    )
    print(f"compile time            {compile_s:8.1f} s")
    print(f"eager, ms per step      {e:8.2f}")
    print(f"compiled, ms per step   {c:8.2f}")
    print(f"compiled / eager speed  {e / c:8.2f}x   (max |difference| {diff:.2e})")


if __name__ == "__main__":
    main()
