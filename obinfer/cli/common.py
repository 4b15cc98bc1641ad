"""What several commands share: the model and press options, the CLI's loader, reading a text file."""

from __future__ import annotations

import argparse
from pathlib import Path

from obinfer.errors import UserError


def load(
    model: str | None,
    dtype: str = "float32",
    device: str = "cpu",
    weights_dir: str | None = None,
    quantize: str | None = None,
):  # noqa: ANN201
    """(model, tokenizer, model_dir) for a --model argument (see obinfer.loading)."""
    from obinfer.loading import check_device, load_dir, resolve_dtype, resolve_model
    from obinfer.quantize import check_quantize

    check_device(device)
    resolve_dtype(dtype, device)
    check_quantize(quantize)
    model_dir = resolve_model(model, weights_dir)
    return (*load_dir(model_dir, dtype, device, quantize), model_dir)


def load_args(args: argparse.Namespace):  # noqa: ANN201
    """`load` for the options of `add_model_args`."""
    return load(args.model, args.dtype, args.device, args.weights_dir, args.quantize)


def dtype_label(args: argparse.Namespace) -> str:
    """The resolved dtype, with "+int8" / "+int4" for quantized weights (what a results file records)."""
    from obinfer.loading import resolve_dtype

    return resolve_dtype(args.dtype, args.device) + (f"+{args.quantize}" if args.quantize else "")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", help="checkpoint directory or hub id (default: the embedded SmolLM2-135M-Instruct)"
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights and activations; auto = bfloat16 where the CPU (AMX / AVX512_BF16) or GPU has native "
        "bfloat16 matmuls, else float32 (default float32)",
    )
    p.add_argument(
        "--quantize",
        choices=["int8", "int4"],
        help="weight-only int8 linear layers (a quarter of float32's bytes per decoded token), or int4 "
        "(the decoder's layers in 4-bit groups, the LM head int8; CPU only)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:0, ... (default cpu)")
    p.add_argument("--weights-dir", help="where converted/downloaded checkpoints live (default ./weights)")


def add_press_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--press",
        default="full",
        help="KV-cache press, e.g. snapkv, snapkv-obk, adakv-snapkv-obkv, "
        "h2o-obv, tova-obk (see `obinfer presses`; default full = no compression)",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--compression-ratio", type=float, help="fraction of each head's tokens removed, in [0, 1)"
    )
    g.add_argument(
        "--cache-budget", type=int, help="tokens kept per KV head (H2O/TOVA also evict while decoding)"
    )
    p.add_argument(
        "--gqa",
        default="sum",
        choices=["sum", "pre"],
        help="aggregate scores over a KV head's query "
        "heads: sum of per-head terms (exact OBD) or pre-averaged attention",
    )
    p.add_argument(
        "--press-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="policy option, e.g. window=32 (snapkv), normalize=visible (h2o), per_head=true (tova), "
        "beta=20 (pyramid), lookahead=8 (laq)",
    )
    p.add_argument(
        "--prefill-chunk",
        type=int,
        metavar="N",
        help="feed the prompt in blocks of N tokens, compressing every layer to the budget after each "
        "block: no layer holds more than budget + N tokens per head (default: one block)",
    )


def build_press(args: argparse.Namespace):  # noqa: ANN201
    """The press of --press / --compression-ratio / --cache-budget / --gqa / --press-opt (FULL for none)."""
    from obinfer.cache.presses import PressName, make_press

    if args.press != "none" and not PressName.parse(args.press).is_full:  # unknown names fail here
        if args.compression_ratio is None and args.cache_budget is None:
            raise UserError(f"--press {args.press} needs --compression-ratio R or --cache-budget N")
    opts = press_options(args.press_opt)
    return make_press(
        args.press, compression_ratio=args.compression_ratio, budget=args.cache_budget, gqa=args.gqa, **opts
    )


def press_options(items: list[str]) -> dict[str, object]:
    """The values of --press-opt KEY=VALUE (repeatable) as a dict (`parse_value` for each value)."""
    opts = {}
    for kv in items:
        key, sep, val = kv.partition("=")
        if not sep or not key:
            raise UserError(f"--press-opt expects KEY=VALUE, got {kv!r}")
        opts[key] = parse_value(val)
    return opts


def parse_value(val: str) -> object:
    if val.lower() in ("none", "null"):
        return None
    if val.lower() in ("true", "false"):
        return val.lower() == "true"
    for cast in (int, float):
        try:
            return cast(val)
        except ValueError:
            pass
    return val


def read_text(path: str) -> str:
    """A UTF-8 text file given on the command line (a directory, a missing file or other bytes: one line)."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{path} is a directory, expected a text file")
    if not p.is_file():
        raise UserError(f"file not found: {path}")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None
