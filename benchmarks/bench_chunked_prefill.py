"""Peak K/V bytes, peak RSS and time of a compressed prefill against the prompt length, one-shot vs chunked.

    python benchmarks/bench_chunked_prefill.py [--model NAME] [--lengths 1024,2048,4096,8192]
        [--chunk 512] [--budget 256] [--press snapkv]

Each (length, mode) runs in its own process (so its peak RSS is its own): load the model, prefill a
random-token prompt with the press at `--cache-budget` (`PressRun.prefill`, one shot or in blocks of
`--chunk` tokens), and report:
- peak K/V: the most K/V bytes the cache held during the prefill (`PressRun.peak_bytes`): one-shot, a
  layer's whole prompt plus the other layers' budgets; chunked, at most (budget + chunk) per head in
  one layer plus the budgets: flat in the prompt length;
- peak RSS: the process's high-water mark (VmHWM) minus its RSS after loading the model (activations,
  attention temporaries and the cache);
- seconds: the prefill's wall time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


@torch.inference_mode()
def one(args: argparse.Namespace) -> None:
    """Child: one (length, chunk) prefill; prints a JSON line."""
    import obinfer
    from obinfer.cache.presses import make_press

    torch.set_num_threads(args.threads)
    model, _ = obinfer.load(args.model) if args.model else obinfer.load()
    ids = torch.randint(100, model.cfg.vocab_size, (1, args.n), generator=torch.Generator().manual_seed(0))
    base = _rss_kib("VmRSS")
    run = make_press(args.press, budget=args.budget).start(model=model)
    cache = model.new_cache(1)
    t0 = time.perf_counter()
    run.prefill(model, ids.to(model.device), cache, chunk=args.chunk or None)
    dt = time.perf_counter() - t0
    peak = _rss_kib("VmHWM")
    out = {"peak_kv": run.peak_bytes, "kept_kv": cache.nbytes(), "rss_mib": (peak - base) / 1024, "s": dt}
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", default=None, help="a name, checkpoint dir or hub id (default: the embedded one)"
    )
    ap.add_argument("--lengths", default="1024,2048,4096,8192", help="prompt lengths (tokens)")
    ap.add_argument("--chunk", type=int, default=512, help="block size of the chunked prefill")
    ap.add_argument("--budget", type=int, default=256, help="tokens kept per KV head")
    ap.add_argument("--press", default="snapkv")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args()
    if args.n is not None:
        return one(args)
    print(f"press {args.press}, budget {args.budget} tokens per head, chunk {args.chunk}")
    print(
        f"{'prompt':>7} {'mode':>8} {'peak K/V MiB':>13} {'kept K/V MiB':>13} {'peak RSS MiB':>13} {'seconds':>8}"
    )
    for n in [int(x) for x in args.lengths.split(",")]:
        for chunk in (0, args.chunk):
            cmd = [
                sys.executable,
                __file__,
                "--n",
                str(n),
                "--chunk",
                str(chunk),
                "--budget",
                str(args.budget),
            ]
            cmd += ["--press", args.press, "--threads", str(args.threads)]
            cmd += ["--model", args.model] if args.model else []
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                print(f"{n:>7} {'chunked' if chunk else 'one-shot':>8}  failed: {res.stderr.strip()[-300:]}")
                continue
            r = json.loads(res.stdout.strip().splitlines()[-1])
            mode = f"N={chunk}" if chunk else "one-shot"
            print(
                f"{n:>7} {mode:>8} {r['peak_kv'] / 2**20:>13.2f} {r['kept_kv'] / 2**20:>13.2f} "
                f"{r['rss_mib']:>13.1f} {r['s']:>8.2f}"
            )


if __name__ == "__main__":
    main()
