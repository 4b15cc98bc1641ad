"""Ragged (AdaKV) vs uniform decode speed at the same kept bytes, on the default model.

    python benchmarks/bench_ragged.py [--model NAME] [--lengths 2048,8192] [--ratios 0.5,0.75]
                                      [--new-tokens 32] [--repeats 5] [--question 32]
                                      [--threads 2] [--clock wall|cpu]

For each prompt length: one prefill of a random-token prompt (`Fanout`), then the compressed caches of
`snapkv-obk` (uniform heads) and `adakv-snapkv-obk` (ragged heads, the same bytes) at each ratio, and
the full cache. Each repeat decodes --new-tokens greedy tokens from a fresh copy of every cache, one
step of each cache in turn (a rotating order), so that load from other processes hits every cache
alike; the table gives the median step time as tokens/s, the ratio ragged / uniform, and K/V bytes
right after compression. With --question N it also times an N-token question block appended to each
compressed cache (attention of T > 1 queries over the cache), median of --repeats.

`--clock cpu` measures the process's CPU time instead of wall time: on a shared machine it is much
steadier, and it is the time spent only when --threads is 1.

Old vs new code: run it once with PYTHONPATH pointing at a copy of the old package, once without.
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

Key = tuple[str, float]  # (press name or "full", compression ratio)


@torch.inference_mode()
def decode_interleaved(
    model, caches: dict[Key, KVCache], first: int, n_new: int, rep: int, clock
) -> dict[Key, list[float]]:  # noqa: ANN001
    """Per-step seconds of n_new greedy steps on a fresh copy of each cache, one step of each in turn."""
    live = {key: c.fork() for key, c in caches.items()}
    tok = {key: torch.tensor([[first]], device=model.device) for key in caches}
    out: dict[Key, list[float]] = {key: [] for key in caches}
    keys = list(caches)
    for t in range(n_new):
        r = (rep + t) % len(keys)
        for key in keys[r:] + keys[:r]:
            t0 = clock()
            tok[key] = model(tok[key], live[key])[:, -1].argmax(-1, keepdim=True)
            out[key].append(clock() - t0)
    return out


@torch.inference_mode()
def question(model, cache: KVCache, ids: torch.Tensor, clock) -> float:  # noqa: ANN001
    """Seconds for one forward of a question block `ids` (1, T) on a copy of `cache`."""
    cache = cache.fork()
    t0 = clock()
    model(ids, cache, last_only=True)
    return clock() - t0


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
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    model, _ = obinfer.load(args.model)
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    ratios = [float(r) for r in args.ratios.split(",")]
    print(
        f"model: {cfg.n_layers} layers, {cfg.n_heads} / {cfg.n_kv_heads} heads, head dim {cfg.head_dim}; "
        f"{args.repeats} x {args.new_tokens} decode steps per cache, interleaved; {args.threads} threads, "
        f"{args.clock} clock; tok/s = 1 / median step"
    )
    head = f"{'n':>5} {'r':>5} {'cache':18} {'KV MiB':>7} {'decode tok/s':>12} {'ragged/uniform':>14}"
    if args.question:
        head += f" {'question ' + str(args.question) + ' ms':>14} {'ragged/uniform':>14}"
    print(head)
    for n in [int(x) for x in args.lengths.split(",")]:
        ids = torch.randint(100, cfg.vocab_size, (n,), generator=g).tolist()
        q_ids = torch.randint(100, cfg.vocab_size, (1, max(args.question, 1)), generator=g).to(model.device)
        presses = {
            (name, r): make_press(name, compression_ratio=r)
            for r in ratios
            for name in (args.uniform, args.ragged)
        }
        fan = Fanout(model, ids, presses.values())
        caches: dict[Key, KVCache] = {("full", 0.0): fan.cache}
        caches.update({key: fan.compress(p) for key, p in presses.items()})
        for key, c in caches.items():  # the layout each press produced (a ragged press must be ragged)
            uniform = all(layer.is_uniform() for layer in c.layers)
            assert uniform == (key[0] != args.ragged), (key, uniform)
        nbytes = {key: c.nbytes() for key, c in caches.items()}
        decode_interleaved(model, caches, ids[-1], 2, 0, clock)  # warm-up
        steps: dict[Key, list[float]] = {key: [] for key in caches}
        q_times: dict[Key, list[float]] = {key: [] for key in caches}
        for rep in range(args.repeats):
            for key, ts in decode_interleaved(model, caches, ids[-1], args.new_tokens, rep, clock).items():
                steps[key] += ts[1:]  # the first step of a copy reallocates its buffers (once per context)
            if args.question:
                for key in list(caches)[rep % len(caches) :] + list(caches)[: rep % len(caches)]:
                    q_times[key].append(question(model, caches[key], q_ids, clock))
        tok_s = {key: 1 / statistics.median(ts) for key, ts in steps.items()}
        q_ms = {key: 1e3 * statistics.median(ts) for key, ts in q_times.items() if ts}

        def line(
            key: Key, ratio: str = "", q_ratio: str = "", n=n, nbytes=nbytes, tok_s=tok_s, q_ms=q_ms
        ) -> str:  # noqa: ANN001
            s = f"{n:5d} {key[1]:5.2f} {key[0]:18} {nbytes[key] / 2**20:7.1f} {tok_s[key]:12.1f} {ratio:>14}"
            if args.question:
                s += f" {q_ms[key]:14.1f} {q_ratio:>14}"
            return s

        print(line(("full", 0.0)))
        for r in ratios:
            u, a = (args.uniform, r), (args.ragged, r)
            print(line(u))
            q_ratio = f"{q_ms[u] / q_ms[a]:.2f}" if args.question else ""  # a time ratio, inverted: speed
            print(line(a, f"{tok_s[a] / tok_s[u]:.2f}", q_ratio))


if __name__ == "__main__":
    main()
