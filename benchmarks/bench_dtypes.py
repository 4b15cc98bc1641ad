"""Accuracy cost of bfloat16, int8 and int4 weights against float32, on the same text.

    python benchmarks/bench_dtypes.py [--model NAME] [--tokens 1024] [--press snapkv-obk] [--ratio 0.5]

For each format (bfloat16 model, float32 model with `--quantize int8`, bfloat16 with int8, float32 model
with `--quantize int4`) against the float32 model, on the first --tokens tokens of this repository's
docs (natural English with code): mean and max per-position KL divergence of the next-token
distributions, top-1 agreement, and the kept-set agreement of a press after its prefill
(|kept_fmt & kept_fp32| / |kept_fp32|, over every layer and KV head). Scores are computed in float32
in every format.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from obinfer.cache.presses import make_press
from obinfer.loading import load_dir, resolve_model

HERE = Path(__file__).resolve().parent.parent


@torch.inference_mode()
def run(model, ids: torch.Tensor, press_name: str, ratio: float) -> tuple[torch.Tensor, list]:  # noqa: ANN001
    """(log-probs (T, V) float32 of a full-cache forward, kept positions after the press's prefill)."""
    logp = model(ids, model.new_cache()).float().log_softmax(-1)[0]
    cache, run_ = model.new_cache(), make_press(press_name, compression_ratio=ratio).start(model=model)
    run_.prefill(model, ids, cache)
    return logp, cache.kept_positions()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--press", default="snapkv-obk")
    ap.add_argument("--ratio", type=float, default=0.5)
    args = ap.parse_args()
    model_dir = resolve_model(args.model)
    ref, tok = load_dir(model_dir)
    text = "\n\n".join(p.read_text() for p in sorted((HERE / "docs").glob("*.md")))
    ids = torch.tensor([tok.encode(text)[: args.tokens]])
    lp_ref, kept_ref = run(ref, ids, args.press, args.ratio)
    del ref
    print(f"{model_dir.name}, {ids.shape[1]} tokens of docs/*.md, press {args.press} r = {args.ratio}")
    print(f"{'format':18} {'mean KL':>9} {'max KL':>8} {'top-1 agree':>12} {'kept agree':>11}")
    for label, dtype, quant in (("bfloat16", "bfloat16", None), ("int8 (float32 act)", "float32", "int8"),
                                ("int8 (bf16 act)", "bfloat16", "int8"), ("int4", "float32", "int4")):  # fmt: skip
        model, _ = load_dir(model_dir, dtype, "cpu", quant)
        lp, kept = run(model, ids, args.press, args.ratio)
        kl = (lp_ref.exp() * (lp_ref - lp)).sum(-1)
        top1 = (lp_ref.argmax(-1) == lp.argmax(-1)).float().mean()
        inter = total = 0
        for layer_a, layer_b in zip(kept, kept_ref, strict=True):
            for row_a, row_b in zip(layer_a, layer_b, strict=True):
                for a, b in zip(row_a, row_b, strict=True):
                    inter += len(set(a) & set(b))
                    total += len(b)
        print(f"{label:18} {kl.mean():9.4f} {kl.max():8.3f} {top1:12.1%} {inter / total:11.1%}")
        del model


if __name__ == "__main__":
    main()
