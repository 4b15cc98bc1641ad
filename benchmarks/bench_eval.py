"""Samples per hour of the evaluation: each sample's compressed caches decoded one at a time (--batch 1)
vs together as one batch of ragged rows, the two runs interleaved, answers compared.

    python benchmarks/bench_eval.py [--model NAME] [--length 2048] [--samples 4] [--batch 8]

Prints seconds per sample for both and their ratio, and whether every answer is identical.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import obinfer
from obinfer.eval.protocol import count_tokens_fn
from obinfer.eval.runner import EvalConfig, run_eval
from obinfer.eval.samples import load_or_make_samples


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--task", default="niah_single_1")
    p.add_argument("--max-new-tokens", type=int, default=32)
    args = p.parse_args(argv)
    model, tok = obinfer.load(args.model)
    presses, ratios = ["full", "snapkv", "snapkv-obk", "tova", "adakv-snapkv-obk"], [0.5, 0.75]
    with tempfile.TemporaryDirectory() as tmp:
        rows = load_or_make_samples(
            Path(tmp), args.task, args.length, args.samples, 0, count_tokens_fn(tok)
        )
        times: dict[int, float] = {1: 0.0, args.batch: 0.0}
        preds: dict[int, dict] = {1: {}, args.batch: {}}
        for i, row in enumerate(rows):  # interleave the two settings sample by sample
            for batch in (1, args.batch) if i % 2 == 0 else (args.batch, 1):
                cfg = EvalConfig(presses, ratios, max_new_tokens=args.max_new_tokens, batch=batch)
                t0 = time.perf_counter()
                out = run_eval(model, tok, [row], cfg, Path(tmp) / f"r{batch}-{i}", progress=False)
                times[batch] += time.perf_counter() - t0
                preds[batch].update({(r["index"], r["press"], r["ratio"]): r["pred"] for r in out})
    n = len(rows)
    one, many = times[1] / n, times[args.batch] / n
    print(f"{args.task} @ {args.length}, {len(presses)} presses x {len(ratios)} ratios, {n} samples")
    print(f"batch 1: {one:.1f} s/sample ({3600 / one:.0f} samples/h)")
    print(
        f"batch {args.batch}: {many:.1f} s/sample ({3600 / many:.0f} samples/h)  speed-up {one / many:.2f}x"
    )
    print(f"answers identical: {preds[1] == preds[args.batch]}")


if __name__ == "__main__":
    main()
