"""The `obinfer` command line: generate, presses, download, convert-gguf, eval, report, fetch-essays, inspect.

Only this module (and the CLI helpers of obinfer.eval / obinfer.inspect) prints; the library logs.
Every user error becomes one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from obinfer.errors import ObinferError, UserError

DESCRIPTION = """obinfer: a from-scratch PyTorch inference engine for Llama-3.1 / Qwen-2.5 with an inspectable,
per-head KV cache and eviction presses (SnapKV, TOVA, H2O, AdaKV; OBCache scores obv/obk/obkv)."""


def _user_errors() -> tuple[type[BaseException], ...]:
    """What main() prints as one line: every obinfer error, and OS errors on files (disk full, ...)."""
    return (ObinferError, OSError)


# ----------------------------------------------------------------------------- model resolution
def resolve_model(model: str | None, weights_dir: str | None = None) -> Path:
    """A checkpoint directory for --model: a path, a name under weights/, a hub id, or the default."""
    from obinfer.gguf_import import ensure_default_model
    from obinfer.storage import default_weights_dir

    wdir = Path(weights_dir) if weights_dir else default_weights_dir()
    if model is None:
        return ensure_default_model(wdir)
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    local = wdir / model.split("/")[-1].lower()
    if local.is_dir():
        return local
    if path.suffix == ".gguf":
        raise UserError(
            f"{model} is a GGUF file: convert it first with `obinfer convert-gguf {model} <out dir>`"
        )
    if model.count("/") == 1 and not path.exists():
        from obinfer.hub import download

        return download(model, wdir)
    raise UserError(f"model not found: {model} (give a checkpoint directory or a hub id like org/name)")


def load(model: str | None, dtype: str = "float32", device: str = "cpu", weights_dir: str | None = None):  # noqa: ANN201
    """(model, tokenizer, model_dir) for a --model argument."""
    from obinfer.tokenizer import load_tokenizer
    from obinfer.weights import load_model

    check_device(device)
    model_dir = resolve_model(model, weights_dir)
    return load_model(model_dir, dtype=dtype, device=device), load_tokenizer(model_dir), model_dir


def check_device(device: str) -> None:
    """A clear error for a malformed device or CUDA/MPS that this machine does not have."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r} (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(
            f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {device!r} requested but MPS is not available on this machine")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", help="checkpoint directory or hub id (default: the embedded SmolLM2-135M-Instruct)"
    )
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weight dtype"
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
        help="policy option, e.g. window=32 (snapkv), normalize=visible (h2o), per_head=true (tova)",
    )


def build_press(args: argparse.Namespace):  # noqa: ANN201
    from obinfer.cache.presses import make_press, parse_press_name

    if args.press not in ("full", "none"):
        parse_press_name(args.press)  # unknown names fail before anything is loaded
        if args.compression_ratio is None and args.cache_budget is None:
            raise UserError(f"--press {args.press} needs --compression-ratio R or --cache-budget N")
    opts = {}
    for kv in args.press_opt:
        key, sep, val = kv.partition("=")
        if not sep:
            raise UserError(f"--press-opt expects KEY=VALUE, got {kv!r}")
        opts[key] = _parse_value(val)
    return make_press(
        args.press, compression_ratio=args.compression_ratio, budget=args.cache_budget, gqa=args.gqa, **opts
    )


def _parse_value(val: str) -> object:
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


# ----------------------------------------------------------------------------- generate
def cmd_generate(args: argparse.Namespace) -> None:
    from obinfer.generate import GenStats, Sampling, generate

    press = build_press(args)
    if args.prompt is None and args.prompt_file is None and args.context_file is None:
        raise UserError("give --prompt, --prompt-file or --context-file")
    prompt = (
        args.prompt if args.prompt is not None else read_text(args.prompt_file) if args.prompt_file else ""
    )
    context = read_text(args.context_file) if args.context_file else None
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)  # checked before loading
    model, tok, _ = load(args.model, args.dtype, args.device, args.weights_dir)
    chat = tok.has_chat_template if args.chat is None else args.chat
    ids, question = build_prompt(tok, prompt, context, args.question, chat, args.query_aware)
    limit = model.cfg.max_position_embeddings
    total = len(ids) + len(question or [])
    if total >= limit:
        raise UserError(f"prompt has {total} tokens but the model's context is {limit} tokens")
    stats = GenStats()
    dec = tok.stream_decoder()
    max_new = min(args.max_new_tokens, limit - total)
    for t in generate(
        model,
        ids,
        max_new_tokens=max_new,
        sampling=sampling,
        stop_ids=tok.stop_ids,
        press=press,
        question=question,
        stats=stats,
    ):
        sys.stdout.write(dec.push(t))
        sys.stdout.flush()
    sys.stdout.write(dec.flush() + "\n")
    if args.stats:
        print_stats(stats, press, file=sys.stderr)


def build_prompt(
    tok,
    prompt: str,
    context: str | None,
    question: str | None,
    chat: bool,  # noqa: ANN001
    query_aware: bool,
) -> tuple[list[int], list[int] | None]:
    """Token ids of the part prefilled (and compressed) and of the part fed after compression.

    Without --context-file the whole prompt is prefilled. With it, the context is prefilled and, in
    query-agnostic mode (default), the question + chat suffix is fed after compression at positions
    continuing from the uncompressed length; --query-aware puts the question before compression.
    """
    if context is None:
        text = tok.apply_chat([{"role": "user", "content": prompt}]) if chat else prompt
        return tok.encode(text), None
    q = question if question is not None else prompt
    if chat:
        prefix, suffix = tok.chat_parts()
    else:
        prefix, suffix = "", "\n"
    sep = "\n\n" if q else ""
    if query_aware:
        return tok.encode(prefix + context + sep + q + suffix), None
    return tok.encode(prefix + context), tok.encode(sep + q + suffix, add_bos=False)


def print_stats(stats, press=None, file=sys.stderr) -> None:  # noqa: ANN001
    p = lambda *a: print(*a, file=file)
    p(f"prompt tokens      {stats.prompt_tokens}")
    p(f"new tokens         {stats.new_tokens}")
    p(f"time to 1st token  {stats.ttft_s * 1000:.0f} ms")
    p(f"prefill            {stats.prefill_tok_s:.1f} tok/s ({stats.prefill_s:.2f} s)")
    p(f"decode             {stats.decode_tok_s:.1f} tok/s")
    p(
        f"cache bytes        {_mib(stats.cache_bytes_full)} before press -> {_mib(stats.cache_bytes_kept)} kept"
    )
    p(f"cache bytes (end)  {_mib(stats.cache_bytes)} allocated after decoding")
    if press is not None:
        if stats.observed_queries is not None:
            window = getattr(press.policy, "window", None)
            note = (
                f" (observed the whole prompt: it is not longer than the window of {window})"
                if window is not None and stats.observed_queries < window
                else ""
            )
            p(f"observed queries   {stats.observed_queries}{note}")
        share = stats.scoring_s / stats.prefill_s if stats.prefill_s else 0.0
        p(
            f"press              {press.name} (scoring {stats.scoring_s * 1000:.0f} ms = {share:.1%} of prefill, "
            f"compaction {stats.compact_s * 1000:.0f} ms)"
        )
        p("tokens kept per layer (min / mean / max over heads):")
        for i, (lo, mean, hi) in enumerate(stats.kept_per_layer):
            p(f"  layer {i:2d}  {lo:6d} {mean:9.1f} {hi:6d}")


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def read_text(path: str) -> str:
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{path} is a directory, expected a text file")
    if not p.is_file():
        raise UserError(f"file not found: {path}")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None


# ----------------------------------------------------------------------------- small commands
def cmd_presses(args: argparse.Namespace) -> None:
    from obinfer.cache.presses import describe_presses

    rows = describe_presses()
    width = max(len(n) for n, _ in rows)
    for name, desc in rows:
        print(f"{name:<{width}}  {desc}")


def cmd_download(args: argparse.Namespace) -> None:
    from obinfer.hub import download

    print(
        download(args.repo_id, Path(args.weights_dir) if args.weights_dir else None, revision=args.revision)
    )


def cmd_convert_gguf(args: argparse.Namespace) -> None:
    from obinfer.gguf_import import convert_gguf

    print(convert_gguf(args.gguf, args.out_dir))


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="obinfer", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser(
        "generate",
        help="generate text, optionally with a compressed KV cache",
        description="Generate text (streamed). With --context-file and --press, the context's KV "
        "cache is compressed before the question is asked.",
    )
    add_model_args(g)
    g.add_argument("--prompt", help="the prompt (or the question, with --context-file)")
    g.add_argument("--prompt-file", help="read the prompt from this file")
    g.add_argument("--context-file", help="a long document to prefill and compress before the question")
    g.add_argument("--question", help="the question asked about --context-file")
    g.add_argument(
        "--query-aware",
        action="store_true",
        help="compress with the question appended to the context "
        "(default: query-agnostic, the question comes after compression)",
    )
    g.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wrap the prompt in the model's chat template (default: on when the model has one)",
    )
    g.add_argument("--max-new-tokens", type=int, default=256, help="maximum tokens to generate (default 256)")
    g.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)"
    )
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0 = off)")
    g.add_argument(
        "--top-k", type=int, default=0, help="sample from the k most likely tokens (default 0 = off)"
    )
    g.add_argument("--seed", type=int, help="random seed for sampling (explicit torch.Generator)")
    g.add_argument("--stats", action="store_true", help="print timing, cache bytes and kept tokens per layer")
    add_press_args(g)
    g.set_defaults(func=cmd_generate)

    pr = sub.add_parser("presses", help="list every press name with a one-line description")
    pr.set_defaults(func=cmd_presses)

    d = sub.add_parser("download", help="download a model (config, tokenizer, safetensors) from the HF hub")
    d.add_argument("repo_id", help="hub id, e.g. Qwen/Qwen2.5-0.5B-Instruct")
    d.add_argument("--revision", help="branch, tag or commit")
    d.add_argument("--weights-dir", help="destination parent directory (default ./weights)")
    d.set_defaults(func=cmd_download)

    c = sub.add_parser(
        "convert-gguf", help="convert a llama/qwen2 GGUF file into a Hugging Face-layout checkpoint"
    )
    c.add_argument("gguf", help="input .gguf file")
    c.add_argument("out_dir", help="output checkpoint directory (written atomically)")
    c.set_defaults(func=cmd_convert_gguf)

    for register in _plugins():
        register(sub)
    return parser


def _plugins() -> list[Callable]:
    """Subcommands defined next to their code: eval / report / fetch-essays, and inspect."""
    from obinfer.eval.cli import add_commands as eval_commands
    from obinfer.inspect import add_commands as inspect_commands

    return [eval_commands, inspect_commands]


def _one_line(exc: BaseException) -> str:
    """The message of a user error as one line (OS errors: what failed and on which path)."""
    if isinstance(exc, OSError) and not isinstance(exc, ObinferError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        text = f"{exc.strerror}{where}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


class _ProgressLines(logging.Handler):
    """Library progress (first-use downloads, conversions) as `obinfer: ...` lines on the current stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"obinfer: {record.getMessage()}", file=sys.stderr, flush=True)


def _show_progress() -> None:
    log = logging.getLogger("obinfer")
    if not any(isinstance(h, _ProgressLines) for h in log.handlers):
        log.addHandler(_ProgressLines(logging.INFO))
        log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _show_progress()
    try:
        args.func(args)
    except _user_errors() as e:
        print(f"obinfer: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("obinfer: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
