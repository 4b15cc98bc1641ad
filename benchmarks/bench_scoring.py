"""Scoring cost as a share of prefill, on the default model (SmolLM2-135M-Instruct).

    python benchmarks/bench_scoring.py [--length 2048 | --long] [--repeats 5] [--ratio 0.5]

A random-token prompt (2k tokens, or 4k with --long) is prefilled with each press at r = 0.5 through a
`PressRun` (`run = press.start(stats)`; the run records `scoring_s`: computing the scores and choosing
the kept slots). Every repeat first prefills with the full cache, then with each press, so the full
prefill is measured in the same conditions (interleaved). The table gives, per press, the medians over
repeats of: scoring seconds, the scoring share of the full-cache prefill of the same repeat (the
headline number), the share of the press's own prefill, and the press's prefill time relative to the
full one. `h2o...:fused=true` takes each layer's attention from the scoring pass (H2O's `fused` option):
its scoring time then includes the layer's attention, so its cost is read from "prefill vs full".
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import obinfer
from obinfer.cache.presses import make_press
from obinfer.generate import GenStats

PRESSES = ["snapkv", "snapkv-obk", "snapkv-obkv", "adakv-snapkv-obk", "h2o", "h2o-obk", "h2o:fused=true",
           "h2o-obk:fused=true"]  # fmt: skip


def make(spec: str, ratio: float):  # noqa: ANN201
    """A press from "name[:key=value[;key=value]]", e.g. "h2o-obk:fused=true"."""
    name, _, opts = spec.partition(":")
    kw = {}
    for item in filter(None, opts.split(";")):
        key, _, val = item.partition("=")
        kw[key] = {"true": True, "false": False}.get(val.lower(), int(val) if val.isdigit() else val)
    return make_press(name, compression_ratio=ratio, **kw)


def prefill(model, ids: torch.Tensor, press_name: str | None, ratio: float) -> tuple[float, float]:  # noqa: ANN001
    """One prefill into a fresh cache; returns (prefill seconds, scoring seconds)."""
    cache = model.new_cache(1)
    observer, run = None, None
    if press_name is not None:
        run = make(press_name, ratio).start(GenStats())
        observer = run.prefill_observer()
    t0 = time.perf_counter()
    model(ids, cache, observer=observer, last_only=True)
    dt = time.perf_counter() - t0
    return dt, (run.scoring_s if run is not None else 0.0)


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", default=None, help="a name, checkpoint dir or hub id (default: the embedded one)"
    )
    ap.add_argument("--length", type=int, default=2048, help="prompt tokens (default 2048)")
    ap.add_argument("--long", action="store_true", help="a 4096-token prompt")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--presses", default=",".join(PRESSES), help="press names, each with optional :key=value;..."
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = 4096 if args.long else args.length
    model, _ = obinfer.load(args.model) if args.model else obinfer.load()
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(100, model.cfg.vocab_size, (1, n), generator=g).to(model.device)
    presses = args.presses.split(",")

    prefill(model, ids[:, :256], None, args.ratio)  # warm-up
    for name in presses:
        prefill(model, ids[:, :256], name, args.ratio)
    full_s: list[float] = []
    res: dict[str, list[tuple[float, float, float, float]]] = {p: [] for p in presses}
    for _ in range(args.repeats):
        f, _ = prefill(model, ids, None, args.ratio)
        full_s.append(f)
        for name in presses:
            p, s = prefill(model, ids, name, args.ratio)
            res[name].append((s, s / f, p / f, s / p))

    med = statistics.median
    print(
        f"n={n}, r={args.ratio}, {args.repeats} repeats, {args.threads} threads; full prefill {med(full_s):.3f} s"
    )
    print(
        f"{'press':18} {'scoring s':>9} {'of full prefill':>16} {'of own prefill':>15} {'prefill vs full':>16}"
    )
    for name in presses:
        rows = res[name]
        print(
            f"{name:18} {med(r[0] for r in rows):9.3f} {med(r[1] for r in rows):16.1%} "
            f"{med(r[3] for r in rows):15.1%} {med(r[2] for r in rows):16.2f}"
        )


if __name__ == "__main__":
    main()
