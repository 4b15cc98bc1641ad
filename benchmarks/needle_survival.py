"""Why does `obk` rescue query-agnostic SnapKV on one haystack and not on another? (issue 14's reading)

An analysis, not a timing: for committed RULER samples (the issue-14 grid's `data/`), prefill each
sample's query-agnostic context once (`obinfer.inspect.run_presses`, one uncompressed prefill shared by
every press), compress it with SnapKV under several scores at one ratio, and measure, per layer and KV
head, whether the answer's tokens (the needle's value: the number or UUID) survive.

The scores compared (all SnapKV's window and pooling; docs/scores.md):

- `attn`: sum_i A_ip, SnapKV's own;
- `obk`: sum_i (A_ip z_ip)^2 ||v_p - o_i||^2, OBCache's key score;
- `az2`: sum_i (A_ip z_ip)^2, `obk` without its distance factor (registered here only);
- `vdist`: sum_i ||v_p - o_i||^2, the distance factor alone, unweighted (registered here only; used for
  the needle's distance ratio below, unpooled, and not as a press in the table).

Printed per task: the share of (layer, KV head) pairs that keep every answer token, per score; and the
needle's distance ratio: its mean `vdist` over the median `vdist` of the other prompt positions outside
the window (the median of that ratio over the pairs, and the share of pairs where the needle is above
the 90th percentile). If the distance factor is what lifts the needle, the ratio is large where `obk`
rescues SnapKV and near 1 where it does not, and `az2` alone does not rescue it.

    python benchmarks/needle_survival.py --data results/issue14-qwen05-4k/data \
        --tasks niah_single_1,niah_single_2 --samples 8 --ratio 0.5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from obinfer.cache.presses import make_press
from obinfer.cache.scores import dist2, reduce_term, register_score
from obinfer.eval.protocol import sample_prompt
from obinfer.inspect.run import find_text, run_presses
from obinfer.loading import load


@register_score("az2")
def az2(inp):  # noqa: ANN001, ANN201
    t = inp.terms
    return reduce_term(inp, (t.A * t.z).square())


@register_score("vdist")
def vdist(inp):  # noqa: ANN001, ANN201
    return reduce_term(inp, dist2(inp.terms))


SCORES = ("attn", "obk", "az2")


def press_name(score: str) -> str:
    return "snapkv" if score == "attn" else f"snapkv-{score}"


def analyse(model, tok, row: dict, ratio: float, chat: bool) -> dict:  # noqa: ANN001
    ids = sample_prompt(tok, row, "agnostic", chat).prefill
    pieces = [tok.decode([i]) for i in ids]
    needle = sorted({p for a in row["answers"] for p in find_text(pieces, a)})
    presses = [make_press(press_name(s), compression_ratio=ratio) for s in SCORES]
    presses.append(make_press("snapkv-vdist", compression_ratio=ratio, kernel=1))
    views = run_presses(model, ids, presses)
    out: dict = {}
    for s, v in zip(SCORES, views[:-1], strict=True):
        kept = v.kept_mask()  # (L, Hkv, n)
        out[s] = float(kept[:, :, needle].all(-1).float().mean())
    d = views[-1].scores  # (L, Hkv, n) +inf on the window
    others = torch.ones(d.shape[-1], dtype=torch.bool)
    others[needle] = False
    others &= torch.isfinite(d[0, 0])
    hay = d[:, :, others]
    ratio_lh = d[:, :, needle].mean(-1) / hay.median(-1).values
    above = d[:, :, needle].mean(-1) > hay.quantile(0.9, dim=-1)
    out["dist_ratio"] = float(ratio_lh.median())
    out["above_p90"] = float(above.float().mean())
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="results/issue14-qwen05-4k/data")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--weights-dir", default=None)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tasks", default="niah_single_1,niah_single_2")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--ratio", type=float, default=0.5)
    args = ap.parse_args(argv)
    if not 0.0 < args.ratio < 1.0 or args.samples < 1:
        sys.exit("needle_survival: --ratio must be in (0, 1) and --samples >= 1")
    samples = {}
    for task in args.tasks.split(","):
        path = Path(args.data) / f"{task}_{args.length}_{args.seed}.jsonl"
        if not path.is_file():
            sys.exit(f"needle_survival: no samples at {path}")
        lines = path.read_text(encoding="utf-8").splitlines()
        samples[task] = [json.loads(line) for line in lines if line.strip()][: args.samples]
    torch.set_grad_enabled(False)
    model, tok = load(args.model, dtype=args.dtype, weights_dir=args.weights_dir)
    chat = bool(tok.has_chat_template)
    print(
        f"model {args.model} ({args.dtype}), query-agnostic, snapkv at r = {args.ratio}, {args.samples} samples per task"
    )
    print(
        "| task | samples | needle kept in every token, share of (layer, KV head): attn | obk | az2 | "
        "needle distance / median, median over pairs | pairs with the needle above p90 |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for task, rows in samples.items():
        res = [analyse(model, tok, r, args.ratio, chat) for r in rows]
        m = {k: statistics.fmean(r[k] for r in res) for k in res[0]}
        print(
            f"| {task} | {len(res)} | {100 * m['attn']:.1f}% | {100 * m['obk']:.1f}% | {100 * m['az2']:.1f}% | "
            f"{statistics.median(r['dist_ratio'] for r in res):.2f} | {100 * m['above_p90']:.1f}% |",
            flush=True,
        )


if __name__ == "__main__":
    main()
