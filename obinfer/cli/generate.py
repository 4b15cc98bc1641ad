"""`obinfer generate`: stream text from a model, optionally with a compressed KV cache."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from obinfer.cli.common import add_model_args, add_press_args, build_press, load_args, read_text
from obinfer.errors import UserError


def add_commands(sub: Any) -> None:
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


def cmd_generate(args: argparse.Namespace) -> None:
    from obinfer.generate import GenStats, Sampling, generate
    from obinfer.prompts import build_prompt

    press = build_press(args)
    if args.prompt is None and args.prompt_file is None and args.context_file is None:
        raise UserError("give --prompt, --prompt-file or --context-file")
    prompt = (
        args.prompt if args.prompt is not None else read_text(args.prompt_file) if args.prompt_file else ""
    )
    context = read_text(args.context_file) if args.context_file else None
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        raise UserError(f"--prefill-chunk must be >= 1 (tokens per block), got {args.prefill_chunk}")
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)  # checked before loading
    model, tok, _ = load_args(args)
    if context is None:  # a plain prompt: all of it is prefilled (and compressed, with a press)
        built = build_prompt(tok, prompt, chat=args.chat)
    else:  # a document, then a question about it (after compression unless --query-aware)
        question = args.question if args.question is not None else prompt
        built = build_prompt(tok, context, question, chat=args.chat, query_aware=args.query_aware)
    ids, question = built.prefill, built.after or None
    limit = model.cfg.max_position_embeddings
    total = len(built)
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
        prefill_chunk=args.prefill_chunk,
    ):
        sys.stdout.write(dec.push(t))
        sys.stdout.flush()
    sys.stdout.write(dec.flush() + "\n")
    if args.stats:
        print_stats(stats, press, file=sys.stderr)


def print_stats(stats, press, file=sys.stderr) -> None:  # noqa: ANN001
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
    p(f"cache bytes (peak) {_mib(stats.cache_bytes_peak)} during the prefill")
    if not press.is_full:
        if stats.observed_queries is not None:
            whole = press.observed_span(stats.prompt_tokens) == (0, stats.prompt_tokens)
            note = " (observed the whole prompt)" if whole and stats.prompt_tokens > 1 else ""
            p(f"observed queries   {stats.observed_queries}{note}")
        share = stats.scoring_s / stats.prefill_s if stats.prefill_s else 0.0
        p(
            f"press              {press.name} (scoring {stats.scoring_s * 1000:.0f} ms = {share:.1%} of prefill, "
            f"compaction {stats.compact_s * 1000:.0f} ms)"
        )
        p("tokens kept per layer (min / mean / max over heads):")
        for i, (lo, mean, hi) in enumerate(stats.kept_per_layer):
            p(f"  layer {i:2d}  {lo:6d} {mean:9.1f} {hi:6d}")


def _mib(n: int) -> str:  # noqa: D103
    return f"{n / 2**20:.2f} MiB"
