"""Samples per hour of `obinfer eval`: this checkout against a baseline checkout, the same command.

    git worktree add /tmp/obinfer-base 13ba58a        # the last commit before the evaluation was batched
    python benchmarks/bench_eval.py --baseline /tmp/obinfer-base [--length 2048] [--samples 3] [--runs 2]

Runs `python -m obinfer eval --presses full,snapkv,snapkv-obk,tova,adakv-snapkv-obk --ratios 0.5,0.75
--tasks niah_single_1 --length L --samples S --out ...` as a whole process, once with the baseline's
code (PYTHONPATH=BASELINE) and once with this checkout's (its default `--batch`, plus --extra), the two
in turn, --runs times each; both use the same weights directory. Prints seconds per sample (median over
runs; model loading and sample generation included, as a user sees them), samples per hour, the ratio,
and whether every answer (task, index, mode, press, ratio -> pred) is identical.

Without --baseline it compares this checkout with itself at --batch 1 (one row at a time) and at the
default batch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PRESSES = "full,snapkv,snapkv-obk,tova,adakv-snapkv-obk"
HERE = Path(__file__).resolve().parent.parent


def eval_cmd(args: argparse.Namespace, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "obinfer", "eval", "--presses", args.presses, "--ratios", args.ratios,
        "--tasks", args.task, "--length", str(args.length), "--samples", str(args.samples),
        "--out", str(out), "--no-progress",
    ]  # fmt: skip


def run_one(src: Path, cmd: list[str], out: Path) -> tuple[float, dict]:
    env = dict(os.environ, PYTHONPATH=str(src))
    env.setdefault("OBINFER_WEIGHTS", str(HERE / "weights"))
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, cwd=src, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {src}:\n{r.stderr[-2000:]}")
    preds = {}
    for line in (out / "results.jsonl").read_text().splitlines():
        row = json.loads(line)
        preds[(row["task"], row["index"], row.get("mode"), row["press"], row["ratio"])] = row["pred"]
    return wall, preds


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", help="a checkout of an earlier commit (default: this one at --batch 1)")
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--task", default="niah_single_1")
    p.add_argument("--presses", default=PRESSES)
    p.add_argument("--ratios", default="0.5,0.75")
    p.add_argument(
        "--extra", default="", help="further options for this checkout's command, e.g. '--batch 16'"
    )
    args = p.parse_args(argv)
    base_src = Path(args.baseline).resolve() if args.baseline else HERE
    base_extra = [] if args.baseline else ["--batch", "1"]
    times: dict[str, list[float]] = {"baseline": [], "this": []}
    preds: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            order = ("baseline", "this") if i % 2 == 0 else ("this", "baseline")
            for side in order:
                out = Path(tmp) / f"{side}-{i}"
                if side == "baseline":
                    cmd, src = eval_cmd(args, out) + base_extra, base_src
                else:
                    cmd, src = eval_cmd(args, out) + args.extra.split(), HERE
                wall, got = run_one(src, cmd, out)
                times[side].append(wall)
                preds.setdefault(side, got)
    n_rows = len(preds["this"])
    print(f"{args.task} @ {args.length}, presses {args.presses}, ratios {args.ratios}: {args.samples} samples, "
          f"{n_rows} rows per run, {args.runs} runs each, interleaved")  # fmt: skip
    label = {"baseline": f"baseline {base_src.name}" + (" --batch 1" if base_extra else ""),
             "this": "this checkout " + (args.extra or "(default --batch)")}  # fmt: skip
    per = {side: statistics.median(ts) / args.samples for side, ts in times.items()}
    for side in ("baseline", "this"):
        print(f"{label[side]:40} {per[side]:7.1f} s/sample  {3600 / per[side]:6.0f} samples/h")
    print(f"speed-up: {per['baseline'] / per['this']:.2f}x")
    same = preds["baseline"] == preds["this"]
    diff = [k for k in preds["this"] if preds["baseline"].get(k) != preds["this"][k]]
    print(
        f"answers identical: {same}"
        + ("" if same else f" ({len(diff)} of {n_rows} rows differ, e.g. {diff[:3]})")
    )


if __name__ == "__main__":
    main()
