"""What TRIM-KV's gates cost at inference: `trimkv` against `tova` and `h2o` at the same budget, in one run.

    python benchmarks/bench_trimkv.py [--model NAME] [--lengths 1024,2048] [--budget 128]
        [--presses trimkv,tova,h2o,snapkv] [--new-tokens 64] [--repeats 3]

Per prompt length n (the same random tokens for every press): prefill seconds (including the press)
and greedy decode tokens/s under an absolute budget of M tokens per KV head, where trimkv, tova and h2o
evict after every decoding step too (snapkv compresses once, after the prefill), and the full cache for
reference. Each row also prints the ratio to tova (the other policy that evicts with one cheap pass per
step): the gates' overhead. Presses run interleaved, `--repeats` times; medians. trimkv needs gates for
the model and M (shipped for the default model at 128, or `--gates FILE`). Nothing else should run
on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from obinfer.cache.presses import make_press
from obinfer.generate import GenStats, stream
from obinfer.loading import load_dir, resolve_model


def run(model, ids: list[int], name: str, budget: int, n_new: int, opts: dict) -> GenStats:  # noqa: ANN001
    stats = GenStats()
    press = make_press("full") if name == "full" else make_press(name, budget=budget, **opts.get(name, {}))
    for _ in stream(model, [ids], max_new_tokens=n_new, press=press, stats=stats):
        pass
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", help="named model or checkpoint dir (default: the embedded SmolLM2-135M-Instruct)"
    )
    ap.add_argument("--lengths", default="1024,2048")
    ap.add_argument("--budget", type=int, default=128)
    ap.add_argument("--presses", default="trimkv,tova,h2o,snapkv")
    ap.add_argument("--gates", default="", help="a gates file for trimkv (default: the shipped ones)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_dir(resolve_model(args.model))
    opts = {"trimkv": {"gates": args.gates}} if args.gates else {}
    names = ["full", *[p for p in args.presses.split(",") if p]]
    g = torch.Generator().manual_seed(0)
    print(f"# torch {torch.__version__}, {args.threads} threads, budget {args.budget} tokens per KV head, "
          f"{args.new_tokens} new tokens, medians of {args.repeats} interleaved runs")  # fmt: skip
    for n in map(int, args.lengths.split(",")):
        ids = torch.randint(100, model.cfg.vocab_size, (n,), generator=g).tolist()
        for name in names:
            run(model, ids[:256], name, args.budget, 2, opts)  # warm-up (and the gates loaded once)
        got: dict[str, list[GenStats]] = {p: [] for p in names}
        for _ in range(args.repeats):
            for name in names:
                got[name].append(run(model, ids, name, args.budget, args.new_tokens, opts))
        med = {p: (statistics.median(s.prefill_s for s in v), statistics.median(s.decode_tok_s for s in v))
               for p, v in got.items()}  # fmt: skip
        print(f"\n## n = {n}")
        print(
            f"{'press':10} {'prefill s':>9} {'vs tova':>8} {'decode tok/s':>12} {'vs tova':>8} {'scoring ms':>10}"
        )
        for name in names:
            pre, dec = med[name]
            ref = med.get("tova")
            vs = (
                (f"{pre / ref[0]:8.2f}", f"{dec / ref[1]:8.2f}")
                if ref and name != "full"
                else (f"{'':>8}",) * 2
            )
            score = statistics.median(s.scoring_s for s in got[name]) * 1000
            print(f"{name:10} {pre:9.2f} {vs[0]} {dec:12.1f} {vs[1]} {score:10.0f}")


if __name__ == "__main__":
    main()
