"""The `obinfer` command: argparse and printing only, on top of the library (nothing imports this package).

Each command lives in its own module and registers itself with ``add_commands(subparsers)``:
``generate`` (generate.py), ``models`` / ``presses`` / ``download`` / ``convert-gguf`` (models.py),
``eval`` / ``report`` / ``fetch-essays`` (eval.py), ``inspect`` (inspect.py), ``train-gates``
(train.py). :func:`main` turns every
user error (any ``ObinferError``, or an OS error on a file) into one line on stderr and exit status 2,
and shows the library's progress lines (first-use downloads and conversions).
"""

from __future__ import annotations

import argparse
import logging
import sys

from obinfer.cli import eval as eval_commands
from obinfer.cli import generate, inspect, models, train
from obinfer.errors import ObinferError

DESCRIPTION = """obinfer: a from-scratch PyTorch inference engine for Llama-3.1 / Qwen-2.5 with an inspectable,
per-head KV cache and eviction presses (SnapKV, TOVA, H2O, AdaKV; OBCache scores obv/obk/obkv)."""
COMMANDS = (generate, models, eval_commands, inspect, train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="obinfer", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.add_commands(sub)
    return parser


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
    except (ObinferError, OSError) as e:
        print(f"obinfer: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("obinfer: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
