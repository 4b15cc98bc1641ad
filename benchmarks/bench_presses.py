"""Press costs and savings on the default model, against the full cache measured in the same run.

    python benchmarks/bench_presses.py [--model DIR] [--lengths 2048,4096] [--ratios 0.5,0.75]

For each context length and press: scoring time (scores + choosing slots) and compaction time
(gathering the kept K/V) as shares of prefill time, decode tokens/s
(ratio to the full cache) and KV bytes kept (ratio to the full cache, and to (1 - r) x full).
Decode runs a fixed number of greedy steps (no stop token) so every press decodes the same count.
"""

from __future__ import annotations

import argparse

import torch

from obinfer.cache.presses import make_press
from obinfer.generate import GenStats, stream
from obinfer.loading import resolve_model
from obinfer.weights import load_model

PRESSES = ["full", "snapkv", "snapkv-obk", "adakv-snapkv-obk", "h2o-obk"]


def run(model, ids: list[int], press_name: str, ratio: float, n_new: int) -> GenStats:  # noqa: ANN001
    stats = GenStats()
    press = make_press(press_name, compression_ratio=ratio)
    for _ in stream(model, [ids], max_new_tokens=n_new, press=press, stats=stats):
        pass
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint dir (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--lengths", default="2048,4096")
    ap.add_argument("--ratios", default="0.5,0.75")
    ap.add_argument("--presses", default=",".join(PRESSES))
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(resolve_model(args.model))
    g = torch.Generator().manual_seed(0)
    print(
        f"{'n':>5} {'press':18} {'r':>5} {'prefill s':>9} {'scoring':>8} {'compact':>8} {'decode tok/s':>12} {'vs full':>7} "
        f"{'KV MiB':>8} {'vs full':>7} {'vs (1-r)':>8}"
    )
    for n in map(int, args.lengths.split(",")):
        ids = torch.randint(100, model.cfg.vocab_size, (n,), generator=g).tolist()
        run(model, ids[:256], "full", 0.0, 2)  # warm-up
        full = run(model, ids, "full", 0.0, args.new_tokens)
        print(
            f"{n:5d} {'full':18} {'-':>5} {full.prefill_s:9.2f} {'-':>8} {'-':>8} {full.decode_tok_s:12.1f} {1:7.2f} "
            f"{full.cache_bytes_kept / 2**20:8.1f} {1:7.2f} {'-':>8}"
        )
        for r in map(float, args.ratios.split(",")):
            for name in args.presses.split(","):
                if name == "full":
                    continue
                s = run(model, ids, name, r, args.new_tokens)
                kept = s.cache_bytes_kept  # right after compression, before decoding grows the buffers
                print(
                    f"{n:5d} {name:18} {r:5.2f} {s.prefill_s:9.2f} {s.scoring_s / s.prefill_s:8.1%} "
                    f"{s.compact_s / s.prefill_s:8.1%} {s.decode_tok_s:12.1f} {s.decode_tok_s / full.decode_tok_s:7.2f} {kept / 2**20:8.1f} "
                    f"{kept / full.cache_bytes_full:7.3f} {kept / ((1 - r) * full.cache_bytes_full):8.3f}"
                )


if __name__ == "__main__":
    main()
