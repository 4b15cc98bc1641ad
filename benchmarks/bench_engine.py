"""Engine speed: obinfer vs transformers on the same checkpoint, measured in one run.

    python benchmarks/bench_engine.py [--model DIR] [--dtypes float32,bfloat16] [--lengths 512,2048]

Prefill tokens/s at each length (last-position logits only, for both) and decode tokens/s (greedy,
64 new tokens after a 512-token prompt), each the median of --repeats runs (obinfer and transformers runs interleaved), and the ratio
obinfer / transformers. Nothing else should run on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from obinfer.loading import resolve_model
from obinfer.weights import load_model


def timed_pair(fa, fb, repeats: int) -> tuple[float, float]:  # noqa: ANN001
    """Median times of fa and fb, their runs interleaved (a, b, a, b, ...) so machine drift hits both."""
    fa(), fb()  # warm-up
    ta, tb = [], []
    for _ in range(repeats):
        for fn, ts in ((fa, ta), (fb, tb)):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


@torch.inference_mode()
def ob_prefill(model, ids):  # noqa: ANN001, ANN201
    return model(ids, model.new_cache(), last_only=True)


@torch.inference_mode()
def ob_decode(model, ids, n_new: int) -> None:  # noqa: ANN001
    cache = model.new_cache()
    logits = model(ids, cache, last_only=True)[:, -1]
    for _ in range(n_new):
        logits = model(logits.argmax(-1, keepdim=True), cache)[:, -1]


@torch.inference_mode()
def hf_prefill(model, ids):  # noqa: ANN001, ANN201
    from transformers import DynamicCache

    return model(ids, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)


@torch.inference_mode()
def hf_decode(model, ids, n_new: int) -> None:  # noqa: ANN001
    from transformers import DynamicCache

    cache = DynamicCache()
    out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    for _ in range(n_new):
        out = model(out.logits[:, -1].argmax(-1, keepdim=True), past_key_values=cache, use_cache=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint dir (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--lengths", default="512,2048")
    ap.add_argument("--decode-prompt", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import transformers

    torch.set_num_threads(args.threads)
    model_dir = resolve_model(args.model)
    g = torch.Generator().manual_seed(0)
    print(
        f"model {model_dir}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{args.threads} threads"
    )
    print(f"{'dtype':9} {'measure':22} {'obinfer':>10} {'transformers':>13} {'ratio':>7}")
    for dtype_name in args.dtypes.split(","):
        bench_dtype(model_dir, dtype_name, args, g)


def bench_dtype(model_dir, dtype_name: str, args: argparse.Namespace, g: torch.Generator) -> None:  # noqa: ANN001
    """Print the prefill and decode rows of one dtype."""
    import transformers

    dtype = getattr(torch, dtype_name)
    ob = load_model(model_dir, dtype=dtype)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, attn_implementation="sdpa"
    ).eval()
    vocab = ob.cfg.vocab_size
    for n in map(int, args.lengths.split(",")):
        ids = torch.randint(100, vocab, (1, n), generator=g)
        t_ob, t_hf = timed_pair(lambda: ob_prefill(ob, ids), lambda: hf_prefill(hf, ids), args.repeats)  # noqa: B023
        print(
            f"{dtype_name:9} {f'prefill {n} (tok/s)':22} {n / t_ob:10.0f} {n / t_hf:13.0f} {t_hf / t_ob:7.2f}"
        )
    ids = torch.randint(100, vocab, (1, args.decode_prompt), generator=g)
    k = args.new_tokens
    d_ob, d_hf = timed_pair(lambda: ob_decode(ob, ids, k), lambda: hf_decode(hf, ids, k), args.repeats)
    p_ob, p_hf = timed_pair(lambda: ob_prefill(ob, ids), lambda: hf_prefill(hf, ids), args.repeats)
    t_ob, t_hf = d_ob - p_ob, d_hf - p_hf  # decode time alone
    label = f"decode @{args.decode_prompt} (tok/s)"
    print(f"{dtype_name:9} {label:22} {k / t_ob:10.1f} {k / t_hf:13.1f} {t_hf / t_ob:7.2f}")


if __name__ == "__main__":
    main()
