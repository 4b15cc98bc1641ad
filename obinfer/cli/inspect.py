"""`obinfer inspect`: a picture (PNG) or JSON of which positions one press, or two compared, keeps."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from obinfer.cli.common import add_model_args, add_press_args, build_press, load_args, read_text
from obinfer.inspect.plot import DPI, plot_inspection
from obinfer.inspect.run import (
    InspectError,
    Inspection,
    agreement,
    find_text,
    parse_positions,
    parse_span,
    run_presses,
    to_json,
)
from obinfer.storage import atomic_write_text


def add_commands(subparsers: Any) -> None:
    """Register `obinfer inspect`."""
    p = subparsers.add_parser(
        "inspect",
        help="draw which positions a press keeps in every layer and KV head (PNG) or dump them (JSON)",
        description="Prefill a document once, compress it with one press (or two with --compare) and "
        "draw, for every layer and KV head, which original positions were kept.",
    )
    add_model_args(p)
    add_press_args(p)
    p.add_argument("--context-file", required=True, help="the document to prefill and compress")
    p.add_argument("--question", help="appended to the document before compression (query-aware)")
    p.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wrap the document in the chat template (default: on when the model has one)",
    )
    p.add_argument("--compare", metavar="A,B", help="two presses side by side and their disagreement")
    p.add_argument("--out", help="PNG file to write")
    p.add_argument(
        "--json",
        dest="json_out",
        metavar="PATH",
        help="write kept positions and scores as JSON ('-' = stdout)",
    )
    p.add_argument("--highlight", help="positions to mark, e.g. 120,130-140 (ranges inclusive)")
    p.add_argument("--highlight-text", help="mark the tokens of every occurrence of this text")
    p.add_argument("--span", help="draw only positions START:END (tokens become tick labels when short)")
    p.add_argument("--title", help="figure title")
    p.add_argument("--dpi", type=int, default=DPI, help=f"PNG resolution (default {DPI})")
    p.set_defaults(func=cmd_inspect)


def _presses(args: argparse.Namespace) -> list[Any]:
    if args.compare:
        if args.press not in ("full", "none"):
            raise InspectError("give --press or --compare, not both")
        names = [s.strip() for s in args.compare.split(",") if s.strip()]
        if len(names) != 2:
            raise InspectError(f"--compare takes two press names separated by a comma, got {args.compare!r}")
    else:
        names = [args.press]
    presses = [build_press(argparse.Namespace(**{**vars(args), "press": name})) for name in names]
    if any(p.is_full for p in presses):
        raise InspectError("inspect needs a press (e.g. --press snapkv-obk --compression-ratio 0.75)")
    return presses


def cmd_inspect(args: argparse.Namespace) -> None:
    from obinfer.prompts import build_prompt

    if not args.out and not args.json_out:
        raise InspectError("give --out FILE.png and/or --json FILE")
    presses = _presses(args)
    context = read_text(args.context_file)
    model, tok, model_dir = load_args(args)
    if args.question is None:  # the document alone, as the compressed part of a chat turn
        ids = build_prompt(tok, context, "", chat=args.chat).prefill
    else:  # query-aware: the question is compressed with the document
        ids = build_prompt(tok, context, args.question, chat=args.chat, query_aware=True).prefill
    if len(ids) >= model.cfg.max_position_embeddings:
        raise InspectError(
            f"prompt has {len(ids)} tokens but the model's context is {model.cfg.max_position_embeddings}"
        )
    pieces = [tok.decode([i]) for i in ids]
    highlight = set(parse_positions(args.highlight, len(ids))) if args.highlight else set()
    if args.highlight_text:
        highlight.update(find_text(pieces, args.highlight_text))
    span = parse_span(args.span, len(ids)) if args.span else None
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        raise InspectError(f"--prefill-chunk must be >= 1 (tokens per block), got {args.prefill_chunk}")
    insp = Inspection(pieces, run_presses(model, ids, presses, chunk=args.prefill_chunk), sorted(highlight))
    _print_summary(insp)
    if args.out:
        print(f"wrote {plot_inspection(insp, args.out, span, args.title, args.dpi)}", file=sys.stderr)
    if args.json_out:
        meta = {
            "model": str(model_dir),
            "question": args.question,
            "compression_ratio": args.compression_ratio,
            "cache_budget": args.cache_budget,
        }
        text = json.dumps(to_json(insp, meta))
        if args.json_out == "-":
            print(text)
        else:
            atomic_write_text(Path(args.json_out), text + "\n")
            print(f"wrote {args.json_out}", file=sys.stderr)


def _print_summary(insp: Inspection) -> None:
    """One line per press on stderr: share of (layer, head, position) slots kept, and of the highlight."""
    for v in insp.views:
        m = v.kept_mask()
        line = f"{v.name}: {int(m.sum())} of {m.numel()} (layer, head, position) slots kept ({m.float().mean():.1%})"
        if insp.highlight:
            line += f"; highlighted tokens kept in {m[..., insp.highlight].float().mean():.1%} of their slots"
        print(line, file=sys.stderr)
    if len(insp.views) == 2:
        print(f"agreement (Jaccard of kept slots): {agreement(*insp.views):.1%}", file=sys.stderr)
