"""``obinfer eval``, ``obinfer report`` and ``obinfer fetch-essays``.

    obinfer eval --presses full,snapkv,snapkv-obk --ratios 0.25,0.5,0.75 --tasks niah_single_1,vt \\
        --length 2048 --samples 20 --out results/
    obinfer eval --presses full,h2o,tova,snapkv,trimkv --budgets 64,128,256,512 ... --out budgets/
    obinfer eval ... --out results/ --resume          # continue an interrupted run
    obinfer eval ... --max-new-tokens 128 --resume    # redo the answers a smaller cap cut short
    obinfer report results/ --per-task                # tables, comparisons, PNGs in results/plots
    obinfer report budgets/ --compare trimkv=h2o,tova,snapkv   # also these paired comparisons
    obinfer report grid/ ablation/ --paper            # two runs on the same samples, read as one
    torchrun --nproc-per-node 4 -m obinfer eval ... --device cuda --out results/   # 4 GPUs, one shard each
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from obinfer.cli.common import add_model_args, dtype_label, load, press_options
from obinfer.errors import UserError

DEFAULT_PRESSES = "full,snapkv,snapkv-obk"
DEFAULT_RATIOS = "0.25,0.5,0.75"  # without --ratios and --budgets


def _split(text: str, what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise UserError(f"--{what} is empty")
    return list(dict.fromkeys(items))


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in _split(text, what)]
    except ValueError:
        raise UserError(f"--{what} expects comma-separated numbers, got {text!r}") from None


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in _split(text, what)]
    except ValueError:
        raise UserError(f"--{what} expects comma-separated integers, got {text!r}") from None


def _tasks(text: str) -> list[str]:
    from obinfer.eval.tasks import TASKS

    if text == "all":
        return list(TASKS)
    tasks = _split(text, "tasks")
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise UserError(f"unknown task(s) {', '.join(bad)}; valid tasks: all, {', '.join(TASKS)}")
    return tasks


def cmd_eval(args: argparse.Namespace) -> None:
    from obinfer.eval import distributed
    from obinfer.eval.results import RESULTS_FILE, check_out_dir
    from obinfer.eval.runner import EvalConfig
    from obinfer.eval.samples import check_lengths
    from obinfer.loading import check_device

    modes = ["aware"] if args.query_aware else _split(args.modes, "modes")
    tasks, lengths = _tasks(args.tasks), _ints(args.length, "length")
    if args.samples < 1:
        raise UserError(f"--samples must be >= 1, got {args.samples}")
    if not args.dist_timeout > 0:
        raise UserError(f"--dist-timeout must be > 0 seconds, got {args.dist_timeout}")
    check_lengths(tasks, lengths)  # too small for a task: before the model is loaded
    presses = _split(args.presses, "presses")
    budgets = _ints(args.budgets, "budgets") if args.budgets is not None else []
    if args.ratios is not None:
        ratios = _floats(args.ratios, "ratios")
    else:  # the default ratios, unless only budgets were asked for
        ratios = [] if budgets else _floats(DEFAULT_RATIOS, "ratios")
    cfg = EvalConfig(
        presses, ratios, modes, args.chat, args.max_new_tokens, args.reprefill, batch=args.batch,
        prefill_chunk=args.prefill_chunk, budgets=budgets, press_opts=press_options(args.press_opt),
    )  # fmt: skip
    out = Path(args.out)
    check_out_dir(out, args.resume)  # a file, or results there without --resume, or a damaged file
    world = distributed.world_from_env()  # torchrun's RANK / WORLD_SIZE / LOCAL_RANK; none: one process
    device = distributed.rank_device(args.device, world)
    check_device(device)  # before torch.distributed picks nccl for it
    group = distributed.Group(world, device, args.dist_timeout) if world.is_distributed else None
    try:
        t0 = time.perf_counter()
        rows = _eval_ranks(args, cfg, out, device, world, group, tasks, lengths)
    finally:
        if group is not None:
            group.close()
    if world.is_main:
        print(f"{len(rows)} results in {out / RESULTS_FILE} ({time.perf_counter() - t0:.1f} s this run)")
        print(f"tables and plots: obinfer report {out}")
    else:
        print(f"rank {world.rank} of {world.size}: done, {len(rows)} results in its shard "
              f"(rank 0 merges the shards into {out / RESULTS_FILE})")  # fmt: skip


def _eval_ranks(args: argparse.Namespace, cfg: Any, out: Path, device: str, world: Any, group: Any,
                tasks: list[str], lengths: list[int]) -> list[dict]:  # fmt: skip
    """Load the model, the samples (rank 0 makes them, then the other ranks read them) and run."""
    from obinfer.eval.protocol import count_tokens_fn
    from obinfer.eval.results import check_run_info
    from obinfer.eval.runner import run_eval
    from obinfer.eval.samples import check_lengths, load_samples, order_samples

    model, tok, model_dir = load(args.model, args.dtype, device, args.weights_dir, args.quantize)
    # too large for the model: before any sample is generated
    check_lengths(tasks, lengths, model.cfg.max_position_embeddings, args.max_new_tokens)
    cfg.model_name = Path(model_dir).name
    chat = tok.has_chat_template if args.chat is None else args.chat
    info = {"model": cfg.model_name, "dtype": dtype_label(args), "seed": args.seed, "chat": chat}
    if cfg.press_opts:  # recorded only when given, so runs made before --press-opt resume as they were
        info["press_opts"] = cfg.press_opts
    count = count_tokens_fn(tok)

    def samples() -> list[dict]:
        rows = load_samples(
            out, tasks, lengths, args.samples, args.seed, count, args.noise_fallback, args.essays_dir
        )
        return order_samples(rows, args.order)

    if world.is_main:
        check_run_info(out, info, args.resume)
        rows = samples()
    if group is not None:
        group.barrier("the samples (made by rank 0)")
    if not world.is_main:
        rows = samples()  # rank 0's sample files, read
    progress = world.is_main and not args.no_progress
    return run_eval(model, tok, rows, cfg, out, resume=args.resume, progress=progress, group=group)


def _compare_pairs(text: str) -> list[tuple[str, str]]:
    """``VARIANT=BASE1,BASE2`` -> [(VARIANT, BASE1), (VARIANT, BASE2)] (a value of --compare)."""
    variant, eq, bases = text.partition("=")
    names = [x.strip() for x in bases.split(",")]
    if not eq or not variant.strip() or not all(names) or "=" in bases:
        raise UserError(f"--compare expects VARIANT=BASE1,BASE2 (e.g. trimkv=h2o,tova,snapkv), got {text!r}")
    return [(variant.strip(), base) for base in dict.fromkeys(names)]


def cmd_report(args: argparse.Namespace) -> None:
    from obinfer.eval.report import make_report

    if args.bootstrap < 1:
        raise UserError(f"--bootstrap must be >= 1, got {args.bootstrap}")
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    if not 0.0 <= args.informative <= 100.0:
        raise UserError(
            f"--informative must be in [0, 100] (a full-cache accuracy in %), got {args.informative:g}"
        )
    pairs = [pair for text in args.compare or [] for pair in _compare_pairs(text)]
    text, paths = make_report(
        args.results,
        args.per_task,
        args.plots_dir,
        not args.no_plots,
        n_boot=args.bootstrap,
        seed=args.seed,
        strict=args.strict,
        warn=lambda msg: print(f"obinfer: warning: {msg}", file=sys.stderr),
        pairs=pairs,
        paper=args.paper,
        informative=args.informative,
    )
    print(text)
    for p in paths:
        print(f"wrote {p}", file=sys.stderr)


def cmd_fetch_essays(args: argparse.Namespace) -> None:
    from obinfer.eval.haystack import EssaysFetchError, fetch_essays

    try:
        print(fetch_essays(args.dest))
    except EssaysFetchError as e:
        raise UserError(str(e)) from None


def _add_eval(sub: Any) -> None:
    e = sub.add_parser(
        "eval",
        help="RULER-style evaluation of presses at compression ratios or absolute budgets",
        description="Generate (and cache) RULER samples, prefill each once, compress it with every press "
        "and ratio (--budgets: every press and budget, a prefill each), answer greedily and append scored "
        "rows to OUT/results.jsonl.",
    )
    add_model_args(e)
    e.add_argument(
        "--presses", default=DEFAULT_PRESSES, help=f"comma-separated press names (default {DEFAULT_PRESSES})"
    )
    e.add_argument(
        "--ratios",
        help=f"compression ratios, fraction removed (default {DEFAULT_RATIOS}; none with --budgets)",
    )
    e.add_argument(
        "--budgets",
        metavar="M,...",
        help="absolute budgets, tokens kept per KV head (e.g. 64,128,256,512), each run like `obinfer "
        "generate --cache-budget M`: h2o, tova and trimkv keep at most M per head while decoding too; "
        "each press prefills on its own",
    )
    e.add_argument("--tasks", default="all", help="comma-separated RULER tasks or 'all' (default: all 11)")
    e.add_argument("--length", default="2048", help="max_seq_length in tokens; comma-separated for several")
    e.add_argument("--samples", type=int, default=10, help="samples per task and length (default 10)")
    e.add_argument("--seed", type=int, default=42, help="sample generation seed (default 42)")
    e.add_argument(
        "--press-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option for every press but full, e.g. window=16 (snapkv) or gates=my.safetensors "
        "(trimkv); repeatable; recorded in OUT/run.json (a --resume with other options is refused)",
    )
    e.add_argument(
        "--order",
        choices=("task", "sample"),
        default="task",
        help="evaluate task by task (default), or sample index by sample index across the tasks (a run "
        "stopped early then covers every task about equally)",
    )
    e.add_argument(
        "--modes", default="agnostic", help="agnostic and/or aware, comma-separated (default agnostic)"
    )
    e.add_argument(
        "--query-aware",
        action="store_true",
        help="compress with the question in the context (= --modes aware)",
    )
    e.add_argument("--out", default="results", help="results directory (default ./results)")
    e.add_argument("--resume", action="store_true", help="continue OUT/results.jsonl, skipping finished rows")
    e.add_argument(
        "--reprefill",
        action="store_true",
        help="prefill again for every press (naive; for timing comparisons)",
    )
    e.add_argument(
        "--prefill-chunk",
        type=int,
        metavar="N",
        help="block-wise prefill: N tokens per block, every layer compressed to the press's budget after "
        "each block (bounded memory; each press prefills on its own). Write to its own --out; `obinfer "
        "report ONE_SHOT CHUNKED` shows these presses as PRESS@chunkN beside the one-shot ones",
    )
    e.add_argument(
        "--max-new-tokens",
        type=int,
        help="cap the tasks' answer lengths (for quick runs); with --resume, a larger cap than before "
        "redoes the answers the smaller one cut short (at the cap, references missing)",
    )
    e.add_argument(
        "--batch",
        type=int,
        default=8,
        help="decode up to N compressed caches of a sample together as one batch (memory: N caches; default 8)",
    )
    e.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="chat template (default: if the model has one)",
    )
    e.add_argument(
        "--noise-fallback",
        action="store_true",
        help="essay tasks use the noise haystack if essays are missing",
    )
    e.add_argument("--essays-dir", help="where `obinfer fetch-essays` put the essays (default: its default)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.add_argument(
        "--dist-timeout",
        type=float,
        default=1800.0,
        help="under torchrun: seconds to wait for the other ranks (to start; for rank 0 to make the samples), "
        "and without a new result from a rank before it counts as dead (default 1800)",
    )
    e.set_defaults(func=cmd_eval)


def add_commands(sub: Any) -> None:
    """Register eval, report and fetch-essays on the main parser's subparsers."""
    _add_eval(sub)
    r = sub.add_parser("report", help="tables, OBCache-vs-baseline comparisons and plots of an eval run")
    r.add_argument(
        "results",
        nargs="+",
        help="results directory (or its results.jsonl); several are read as one run (the same model, "
        "dtype, seed and settings), e.g. a grid and its ablation on the same samples",
    )
    r.add_argument("--per-task", action="store_true", help="also one table per task")
    r.add_argument("--plots-dir", help="where to write the PNGs (default RESULTS/plots)")
    r.add_argument("--no-plots", action="store_true", help="tables only")
    r.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default 2000)")
    r.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    r.add_argument(
        "--compare",
        action="append",
        metavar="VARIANT=BASE1,BASE2",
        help="also compare VARIANT with each BASE on the same samples (paired bootstrap CI per ratio or "
        "budget), e.g. trimkv=h2o,tova,snapkv; repeatable",
    )
    r.add_argument(
        "--paper",
        action="store_true",
        help="also the OBCache paper's tables (each of h2o, tova, snapkv, adakv-snapkv against its -obk "
        "variant per mode x ratio, with paired CIs; the score ablation) and plots, on the informative tasks",
    )
    r.add_argument(
        "--informative",
        type=float,
        default=80.0,
        metavar="PCT",
        help="with --paper: a task is informative if its full-cache accuracy is >= PCT %% (default 80)",
    )
    r.add_argument(
        "--strict",
        action="store_true",
        help="an unreadable line in the results file is an error (default: skipped with a warning)",
    )
    r.set_defaults(func=cmd_report)
    f = sub.add_parser(
        "fetch-essays", help="download the Paul Graham essays used by the essay haystack tasks"
    )
    f.add_argument(
        "--dest", help="target directory (default ~/.cache/obinfer/essays or $OBINFER_DATA/essays)"
    )
    f.set_defaults(func=cmd_fetch_essays)
