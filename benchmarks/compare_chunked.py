"""Chunked prefill against one-shot compression, paired per sample, from two `obinfer eval` result dirs.

    python benchmarks/compare_chunked.py results/one-shot results/chunk512 [--n-boot 2000]

The two runs must share tasks, lengths, samples, presses, ratios and modes (the second one with
`--prefill-chunk N`). For every (mode, press, ratio) present in both, it prints the accuracy of each
and the chunked minus one-shot difference with its 95% paired bootstrap CI over the same samples
(`obinfer/eval/metrics.py:paired_bootstrap_ci`), plus the chunked run's peak K/V bytes.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

from obinfer.eval.metrics import paired_bootstrap_ci
from obinfer.eval.results import read_results, result_key


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("one_shot", help="results dir (or results.jsonl) of the one-shot run")
    ap.add_argument("chunked", help="results dir (or results.jsonl) of the --prefill-chunk run")
    ap.add_argument("--n-boot", type=int, default=2000)
    args = ap.parse_args()
    a = {result_key(r): r for r in read_results(args.one_shot)}
    b = {result_key(r): r for r in read_results(args.chunked)}
    pairs: dict[tuple, list[tuple[float, float, int]]] = defaultdict(list)
    for key, rb in b.items():
        ra = a.get(key)
        if ra is None:
            continue
        task, length, index, press, ratio, mode = key
        pairs[mode, length, press, ratio].append(
            (float(ra["score"]), float(rb["score"]), rb.get("cache_bytes_peak", 0))
        )
    chunks = sorted({r.get("prefill_chunk") for r in b.values()} - {None})
    print(f"chunked ({', '.join(map(str, chunks)) or '?'} tokens per block) minus one-shot, accuracy points")
    head = f"{'mode':<9}{'length':>7}  {'press':<28}{'ratio':>6}{'one-shot':>9}{'chunked':>9}{'diff':>8}  {'95% CI':<17}{'n':>4}"
    print(head + f"{'peak K/V MiB':>14}")
    for (mode, length, press, ratio), xs in sorted(pairs.items()):
        sa, sb, peak = [x[0] for x in xs], [x[1] for x in xs], max(x[2] for x in xs)
        diff, lo, hi = paired_bootstrap_ci(sb, sa, n_boot=args.n_boot)
        print(
            f"{mode:<9}{length:>7}  {press:<28}{ratio:>6}{100 * sum(sa) / len(sa):>9.1f}{100 * sum(sb) / len(sb):>9.1f}"
            f"{100 * diff:>8.1f}  [{100 * lo:6.1f}, {100 * hi:6.1f}]{len(xs):>4}{peak / 2**20:>14.2f}"
        )


if __name__ == "__main__":
    main()
