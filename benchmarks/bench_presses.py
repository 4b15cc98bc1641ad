"""Press costs and savings: obinfer against kvpress 0.5.5 and against its own full cache, in one run.

    python benchmarks/bench_presses.py [--model NAME] [--lengths 2048,8192] [--ratios 0.5,0.75,0.9]
        [--peer-presses snapkv,tova,adakv-snapkv] [--presses snapkv-obk,adakv-snapkv-obk,h2o-obk]

Per context length n (random tokens, the same prompt for both engines) and ratio r:

- **vs kvpress** (--peer-presses; kvpress's SnapKVPress, TOVAPress and AdaKVPress(SnapKVPress) on the
  transformers model of the same checkpoint): prefill seconds including the press, and greedy decode
  tokens/s after compression, obinfer and kvpress runs interleaved, and the ratios kvpress / obinfer
  (time) and obinfer / kvpress (speed). kvpress's AdaKV masks evicted keys and keeps them in memory, so
  its decode reads the full cache; obinfer's stores the ragged heads.
- **vs the full cache** (every press): decode tokens/s relative to obinfer's full cache at the same n
  (bytes read per step fall with r), the K/V bytes kept, and the scoring time (scores + choosing slots)
  as a share of the prefill.
- **ragged vs uniform**: `adakv-<p>` against `<p>` at the same r keep the same bytes; the ratio of their
  decode speeds is how much the ragged layout costs.

Decode runs a fixed number of steps (no stop token), so every press decodes the same count. Nothing
else should run on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from obinfer.cache.presses import make_press
from obinfer.generate import GenStats, stream
from obinfer.loading import load_dir, resolve_model

PRESSES = "snapkv-obk,adakv-snapkv-obk,h2o-obk"
PEER_PRESSES = "snapkv,tova,adakv-snapkv"


def ob_run(model, ids: list[int], press_name: str, ratio: float, n_new: int) -> GenStats:  # noqa: ANN001
    stats = GenStats()
    press = make_press(press_name, compression_ratio=ratio) if press_name != "full" else make_press("full")
    for _ in stream(model, [ids], max_new_tokens=n_new, press=press, stats=stats):
        pass
    return stats


def kvpress_press(name: str, ratio: float):  # noqa: ANN201
    import kvpress

    if name == "snapkv":
        return kvpress.SnapKVPress(compression_ratio=ratio)
    if name == "tova":
        return kvpress.TOVAPress(compression_ratio=ratio)
    if name == "adakv-snapkv":
        return kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=ratio))
    raise SystemExit(f"no kvpress counterpart for {name} (choose from {PEER_PRESSES})")


@torch.inference_mode()
def kv_run(hf, ids: list[int], name: str, ratio: float, n_new: int) -> tuple[float, float]:  # noqa: ANN001
    """(prefill s including the press, decode tok/s) of transformers + kvpress, greedy, no stop token."""
    import transformers

    x = torch.tensor([ids])
    cache = transformers.DynamicCache()
    t0 = time.perf_counter()
    with kvpress_press(name, ratio)(hf):
        logits = hf(x, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    prefill = time.perf_counter() - t0
    pos = len(ids)
    t0 = time.perf_counter()
    for _ in range(n_new):
        tok = logits.argmax(-1, keepdim=True)
        logits = hf(tok, past_key_values=cache, use_cache=True, position_ids=torch.tensor([[pos]])).logits[
            :, -1
        ]
        pos += 1
    return prefill, n_new / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", help="named model or checkpoint dir (default: the embedded SmolLM2-135M-Instruct)"
    )
    ap.add_argument("--lengths", default="2048,8192")
    ap.add_argument("--ratios", default="0.5,0.75,0.9")
    ap.add_argument(
        "--peer-presses", default=PEER_PRESSES, help="presses also run with kvpress ('' for none)"
    )
    ap.add_argument("--presses", default=PRESSES, help="further obinfer presses (no kvpress counterpart run)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1, help="interleaved runs per press (medians)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = resolve_model(args.model)
    model, _ = load_dir(model_dir)
    peers = [p for p in args.peer_presses.split(",") if p]
    hf = None
    if peers:
        import kvpress
        import transformers

        transformers.utils.logging.disable_progress_bar()
        hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()
        print(f"# kvpress {kvpress.__version__ if hasattr(kvpress, '__version__') else '0.5.5'}, "
              f"transformers {transformers.__version__}, torch {torch.__version__}, {args.threads} threads")  # fmt: skip
    g = torch.Generator().manual_seed(0)
    k = args.new_tokens
    for n in map(int, args.lengths.split(",")):
        ids = torch.randint(100, model.cfg.vocab_size, (n,), generator=g).tolist()
        ob_run(model, ids[:256], "full", 0.0, 2)  # warm-up
        full = ob_run(model, ids, "full", 0.0, k)
        print(f"\n## n = {n}: obinfer full cache: prefill {full.prefill_s:.2f} s, decode {full.decode_tok_s:.1f} tok/s, "
              f"K/V {full.cache_bytes_kept / 2**20:.1f} MiB")  # fmt: skip
        print(f"{'press':18} {'r':>5} {'prefill s':>9} {'kvpress':>8} {'ratio':>6} {'decode':>7} {'kvpress':>8} "
              f"{'ratio':>6} {'vs full':>7} {'K/V MiB':>8} {'scoring':>8}")  # fmt: skip
        for r in map(float, args.ratios.split(",")):
            decode = {}
            for name in peers + [p for p in args.presses.split(",") if p]:
                runs, peer_runs = [], []
                for _ in range(args.repeats):
                    runs.append(ob_run(model, ids, name, r, k))
                    if name in peers:
                        peer_runs.append(kv_run(hf, ids, name, r, k))
                s = runs[len(runs) // 2]
                pre = statistics.median(x.prefill_s for x in runs)
                dec = statistics.median(x.decode_tok_s for x in runs)
                decode[name] = dec
                if peer_runs:
                    kp = statistics.median(x[0] for x in peer_runs)
                    kd = statistics.median(x[1] for x in peer_runs)
                    peer = f"{kp:8.2f} {kp / pre:6.2f} {dec:7.1f} {kd:8.1f} {dec / kd:6.2f}"
                else:
                    peer = f"{'-':>8} {'-':>6} {dec:7.1f} {'-':>8} {'-':>6}"
                print(f"{name:18} {r:5.2f} {pre:9.2f} {peer} {dec / full.decode_tok_s:7.2f} "
                      f"{s.cache_bytes_kept / 2**20:8.1f} {s.scoring_s / s.prefill_s:8.1%}")  # fmt: skip
            for name, dec in decode.items():
                base = name.removeprefix("adakv-")
                if base != name and base in decode:
                    print(
                        f"  ragged vs uniform at r = {r}: {name} / {base} decode = {dec / decode[base]:.2f}"
                    )


if __name__ == "__main__":
    main()
