"""Ragged (AdaKV) vs uniform decode speed at the same kept bytes, on the default model.

    python benchmarks/bench_ragged.py [--model DIR] [--lengths 2048,8192] [--ratios 0.5,0.75]
                                      [--new-tokens 32] [--repeats 5] [--question 32]

For each prompt length: one prefill of a random-token prompt (`Fanout`), then the compressed caches of
`snapkv-obk` (uniform heads) and `adakv-snapkv-obk` (ragged heads, same bytes) at each ratio, and the
full cache. Each repeat decodes --new-tokens greedy tokens from a fresh copy of every cache, the caches'
runs interleaved (full, uniform, ragged, ... in a rotating order) so machine drift hits all of them;
the tables give medians. Prints decode tokens/s, the ratio ragged / uniform, KV bytes, and with
--question N the time of an N-token question block appended to each compressed cache (T > 1 attention
over the cache, the path a question after a compressed context takes).

Old vs new code: run it once with PYTHONPATH pointing at a copy of the old package, once without.
Nothing else should run on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import obinfer
from obinfer.cache.fanout import Fanout
from obinfer.cache.kv_cache import KVCache
from obinfer.cache.presses import make_press


@torch.inference_mode()
def decode(model, cache: KVCache, first: int, n_new: int) -> float:  # noqa: ANN001
    """Seconds for n_new greedy one-token steps on `cache` (modified), starting from token `first`."""
    tok = torch.tensor([[first]], device=model.device)
    t0 = time.perf_counter()
    for _ in range(n_new):
        tok = model(tok, cache)[:, -1].argmax(-1, keepdim=True)
    return time.perf_counter() - t0


@torch.inference_mode()
def question(model, cache: KVCache, ids: torch.Tensor) -> float:  # noqa: ANN001
    """Seconds for one forward of a question block `ids` (1, T) on `cache` (modified)."""
    t0 = time.perf_counter()
    model(ids, cache, last_only=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a name, checkpoint dir or hub id (default: the embedded SmolLM2-135M)")
    ap.add_argument("--lengths", default="2048", help="prompt lengths, comma-separated (e.g. 2048,8192)")
    ap.add_argument("--ratios", default="0.5,0.75")
    ap.add_argument("--uniform", default="snapkv-obk")
    ap.add_argument("--ragged", default="adakv-snapkv-obk")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--question", type=int, default=0, help="also time a question block of this many tokens")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = obinfer.load(args.model)
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    ratios = [float(r) for r in args.ratios.split(",")]
    print(
        f"model: {cfg.n_layers} layers, {cfg.n_heads} / {cfg.n_kv_heads} heads, head dim {cfg.head_dim}; "
        f"{args.new_tokens} decode steps, median of {args.repeats} interleaved repeats, {args.threads} threads"
    )
    head = f"{'n':>5} {'r':>5} {'cache':18} {'KV MiB':>7} {'decode tok/s':>12} {'ragged/uniform':>14}"
    if args.question:
        head += f" {'question ' + str(args.question) + ' ms':>14} {'ragged/uniform':>14}"
    print(head)
    for n in [int(x) for x in args.lengths.split(",")]:
        ids = torch.randint(100, cfg.vocab_size, (n,), generator=g).tolist()
        q_ids = torch.randint(
            100, cfg.vocab_size, (1, max(args.question, 1)), generator=g, device=model.device
        )
        presses = {
            (name, r): make_press(name, compression_ratio=r)
            for r in ratios
            for name in (args.uniform, args.ragged)
        }
        fan = Fanout(model, ids, presses.values())
        caches: dict[tuple[str, float], KVCache] = {("full", 0.0): fan.cache}
        caches.update({key: fan.compress(p) for key, p in presses.items()})
        for key, c in caches.items():  # the layout each press produced (a ragged press must be ragged)
            uniform = all(layer.is_uniform() for layer in c.layers)
            assert uniform == (key[0] != args.ragged), (key, uniform)
        nbytes = {key: c.nbytes() for key, c in caches.items()}
        first = ids[-1]
        decode(model, caches["full", 0.0].fork(), first, 2)  # warm-up
        times: dict[tuple[str, float], list[float]] = {key: [] for key in caches}
        q_times: dict[tuple[str, float], list[float]] = {key: [] for key in caches}
        keys = list(caches)
        for rep in range(args.repeats):
            order = keys[rep % len(keys) :] + keys[: rep % len(keys)]  # rotate who goes first
            for key in order:
                times[key].append(decode(model, caches[key].fork(), first, args.new_tokens))
                if args.question:
                    q_times[key].append(question(model, caches[key].fork(), q_ids))
        tok_s = {key: args.new_tokens / statistics.median(ts) for key, ts in times.items()}
        q_ms = {key: 1e3 * statistics.median(ts) for key, ts in q_times.items() if ts}

        def line(
            key: tuple[str, float],
            ratio: str = "",
            q_ratio: str = "",
            n=n,
            nbytes=nbytes,
            tok_s=tok_s,
            q_ms=q_ms,
        ) -> str:  # noqa: ANN001
            s = f"{n:5d} {key[1]:5.2f} {key[0]:18} {nbytes[key] / 2**20:7.1f} {tok_s[key]:12.1f} {ratio:>14}"
            if args.question:
                s += f" {q_ms[key]:14.1f} {q_ratio:>14}"
            return s

        print(line(("full", 0.0)))
        for r in ratios:
            u, a = (args.uniform, r), (args.ragged, r)
            print(line(u))
            qr = f"{q_ms[u] / q_ms[a]:.2f}" if args.question else ""  # time ratio inverted: speed ratio
            print(line(a, f"{tok_s[a] / tok_s[u]:.2f}", qr))


if __name__ == "__main__":
    main()
