"""Reports on a results directory written by the runner: tables, OBCache-vs-baseline tests, PNG plots.

Rows lie on one of two axes: a compression ratio (``budget`` 0 or absent) or an absolute budget of M
tokens per KV head (``budget`` M, from ``obinfer eval --budgets``). Each axis gets its own tables,
comparisons and plots; the full cache's rows (ratio 0) are the reference on both. Results without
budgets give the same report as before budgets existed.

* Accuracy table: rows press, columns compression ratio (or budget: ``by budget`` tables, the full cache
  in a ``full`` column), one table per (mode, length, axis); a cell is the RULER headline number, the
  mean over tasks of each task's mean string-match score (x100), with the number of samples behind it.
  ``per_task=True`` adds one table per task.
* Comparison: each OBCache variant (``<family>-obv/obk/obkv``) against its baseline (``<family>``,
  the same policy and allocator with the attention score), each press with a query source or layer
  budget (``laq-``, ``pyramid-``, ...) against the press without it (``PressName.base``), and the
  explicit ``pairs`` (``obinfer report --compare trimkv=h2o,tova,snapkv``; against ``full``, the full
  cache's score at every point): paired bootstrap CI of the accuracy difference on the same samples, per
  ratio or budget (``M=64``) and pooled over them (per-sample mean over the points, so a sample counts
  once).
* Plots (matplotlib, Agg canvas): accuracy against ratio (``accuracy_<mode>_<length>.png``) or budget
  (``..._budget.png``, log2 axis) with one line per press, each variant in its baseline's colour with its
  own line style and marker, full cache as a horizontal line; needle depth x length heatmaps for the
  single-needle niah tasks, full cache and per (press, ratio) (``..._budget.png``: per (press, budget)).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from obinfer.cache.allocators import DEFAULT_ALLOCATOR
from obinfer.cache.policies import PressError
from obinfer.cache.presses import FULL_NAME
from obinfer.eval import EvalError
from obinfer.eval.figures import DEPTH_BINS, PLOTS_WHAT, depth_bin, new_figure, save_png
from obinfer.eval.results import (
    ResultsError,
    ResultsMissing,
    Rows,
    output_dir,
    press_name,
    row_budget,
    scan_runs,
    split_method,
)

logger = logging.getLogger(__name__)

SCORE_STYLES: dict[str, tuple[Any, str]] = {  # score -> (line style, marker)
    "attn": ("-", "o"),
    "obv": ("--", "s"),
    "obk": ("-.", "^"),
    "obkv": (":", "D"),
}
OTHER_STYLE: tuple[Any, str] = ((0, (5, 1, 1, 1)), "v")
AXES = ("ratio", "budget")  # a row's axis: compression ratio (budget 0), or absolute budget M > 0
BUDGET_TITLE = "by budget (tokens per head)"


class ReportError(EvalError):
    """A bad report option."""


# ------------------------------------------------------------------------------------------ names
def press_order(names: Sequence[str]) -> list[str]:
    """full first, then by policy, uniform before other allocators (adakv), baseline before its
    obv/obk/obkv variants; a press before its query-source or layer-budget variants (laq-, pyramid-)
    and before its tagged methods (@chunkN); ties by name."""
    scores = list(SCORE_STYLES)

    def key(name: str) -> tuple:
        p, (press, tag) = press_name(name), split_method(name)
        rank = scores.index(p.score) if p.score in scores else len(scores)
        return (not p.is_full, p.policy, p.allocator != DEFAULT_ALLOCATOR, p.allocator, rank, p.score,
                press != p.base, tag, name)  # fmt: skip

    return sorted(set(names), key=key)


# ------------------------------------------------------------------------------------------ tables
def accuracy(rows: Rows) -> tuple[float, int]:
    """(mean over tasks of the task's mean score, x100; number of rows)."""
    by_task: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        by_task[r["task"]].append(float(r["score"]))
    means = [sum(v) / len(v) for v in by_task.values()]
    return 100.0 * sum(means) / len(means), len(rows)


def _check_axis(axis: str) -> None:
    if axis not in AXES:
        raise ReportError(f"unknown axis {axis!r}; choose from {', '.join(AXES)}")


def group(
    rows: Rows, per_task: bool = False, axis: str = "ratio"
) -> dict[tuple, dict[str, dict[float, Rows]]]:
    """Rows by (mode, length[, task]) -> press -> point on `axis`.

    A point is the compression ratio (axis "ratio": rows without a budget) or the budget M (axis
    "budget": rows with one, and the full cache's rows at point 0, their reference). A group with no
    row of a press on `axis`, only the full cache's, is left out where the other axis has some (a run of
    budgets alone has no ratio table); a run of the full cache alone keeps its ratio group.
    """
    _check_axis(axis)
    out: dict[tuple, dict[str, dict[float, Rows]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    pressed: set[tuple] = set()  # groups with a press row on this axis
    other: set[tuple] = set()  # groups with a row on the other axis
    for r in rows:
        key = (r["mode"], int(r["length"])) + ((r["task"],) if per_task else ())
        budget, full = row_budget(r), r["press"] == FULL_NAME
        if (axis == "budget") == (budget > 0):
            point = budget if budget else round(float(r["ratio"]), 6)
            out[key][r["press"]][point].append(r)
            if budget or not full:
                pressed.add(key)
        elif full and not budget:  # axis "budget": the full cache's rows, the reference
            out[key][r["press"]][0].append(r)
        else:
            other.add(key)
    keep = pressed if axis == "budget" else pressed | (set(out) - other)
    return {k: v for k, v in out.items() if k in keep}


def accuracy_grid(
    rows: Rows, per_task: bool = False, axis: str = "ratio"
) -> dict[tuple, dict[str, dict[float, tuple[float, int]]]]:
    """(mode, length[, task]) -> press -> ratio (or budget, `group`) -> (accuracy %, samples)."""
    return {
        key: {p: {ratio: accuracy(rs) for ratio, rs in by_ratio.items()} for p, by_ratio in presses.items()}
        for key, presses in group(rows, per_task, axis).items()
    }


def point_label(point: float, axis: str) -> str:
    """A table column: ``ratio 0.5``; on the budget axis ``budget 64``, and ``full`` for the reference."""
    if axis == "budget":
        return f"budget {int(point)}" if point else "full"
    return f"ratio {point:g}"


def format_table(title: str, cells: dict[str, dict[float, tuple[float, int]]], axis: str = "ratio") -> str:
    """One text table: rows press, columns ratio (or budget), cells ``accuracy (n)``."""
    ratios = sorted({r for by_ratio in cells.values() for r in by_ratio})
    names = press_order(list(cells))
    width = max(len("press"), *(len(n) for n in names))
    cell_w = 14
    head = "".join(f"{point_label(r, axis):>{cell_w}}" for r in ratios)
    lines = [title, f"{'press':<{width}}  " + head]
    for name in names:
        row = f"{name:<{width}}  "
        for r in ratios:
            c = cells[name].get(r)
            row += f"{(f'{c[0]:.1f} ({c[1]})' if c else '-'):>{cell_w}}"
        lines.append(row)
    return "\n".join(lines)


def _by_axis(rows: Rows, per_task: bool) -> list[tuple[tuple, str, dict]]:
    """(group key, axis, cells) of every accuracy table: by key, the ratio table before the budget one."""
    grids = {axis: accuracy_grid(rows, per_task, axis) for axis in AXES}
    keys = sorted(set().union(*grids.values()))
    return [(key, axis, grids[axis][key]) for key in keys for axis in AXES if key in grids[axis]]


def accuracy_tables(rows: Rows, per_task: bool = False) -> str:
    """Every accuracy table as text (per (mode, length, axis), then per task on request)."""
    head = "accuracy % (mean over tasks of the per-task mean string-match score) and (samples)"
    parts = [head]
    by = lambda axis: f", {BUDGET_TITLE}" if axis == "budget" else ""  # noqa: E731
    for (mode, length), axis, cells in _by_axis(rows, per_task=False):
        parts.append(format_table(f"\n== mode {mode}, length {length}{by(axis)} ==", cells, axis))
    if per_task:
        for (mode, length, task), axis, cells in _by_axis(rows, per_task=True):
            parts.append(format_table(f"\n-- {task}: mode {mode}, length {length}{by(axis)} --", cells, axis))
    return "\n".join(parts)


# ------------------------------------------------------------------------------------- comparisons
def _scores_by_sample(by_point: dict[float, Rows]) -> dict[float, dict[tuple, float]]:
    """point (ratio or budget) -> (task, index) -> score."""
    out: dict[float, dict[tuple, float]] = defaultdict(dict)
    for point, rows in by_point.items():
        for r in rows:
            out[point][(r["task"], int(r["index"]))] = float(r["score"])
    return out


def _compare(a: dict[tuple, float], b: dict[tuple, float], n_boot: int, seed: int) -> dict[str, Any] | None:
    from obinfer.eval.metrics import paired_bootstrap_ci

    keys = sorted(set(a) & set(b))
    if not keys:
        return None
    diff, lo, hi = paired_bootstrap_ci([a[k] for k in keys], [b[k] for k in keys], n_boot=n_boot, seed=seed)
    verdict = "better" if lo > 0 else "worse" if hi < 0 else "no clear difference"
    return {"diff": 100 * diff, "lo": 100 * lo, "hi": 100 * hi, "n": len(keys), "verdict": verdict}


def _pooled(va: dict[float, dict], vb: dict[float, dict], ratios: list[float]) -> tuple[dict, dict]:
    """Per-sample mean over `ratios` for samples present at every ratio in both presses."""
    common = set.intersection(*(set(va[r]) & set(vb[r]) for r in ratios))
    mean = lambda d, k: sum(d[r][k] for r in ratios) / len(ratios)
    return {k: mean(va, k) for k in common}, {k: mean(vb, k) for k in common}


def check_pairs(pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The explicit (variant, baseline) comparisons, each once; ReportError for a malformed one."""
    out = []
    for pair in pairs:
        if (
            not isinstance(pair, tuple | list)
            or len(pair) != 2
            or not all(isinstance(x, str) and x for x in pair)
        ):
            raise ReportError(f"a comparison is a (variant, baseline) pair of press names, got {pair!r}")
        variant, base = pair
        if variant == base:
            raise ReportError(f"comparison {variant}={base} compares a press with itself")
        for name in pair:
            try:
                press_name(name)
            except PressError:
                raise ReportError(f"comparison {variant}={base}: {name!r} is not a press name") from None
        out.append((variant, base))
    return list(dict.fromkeys(out))


def compare_variants(
    rows: Rows, n_boot: int = 2000, seed: int = 0, pairs: Sequence[tuple[str, str]] = ()
) -> list[dict[str, Any]]:
    """Each OBCache variant against its baseline, and each of the explicit `pairs` (variant, baseline),
    per (mode, length) and axis, per ratio or budget and pooled over them ("all").

    Returns:
        Dicts {mode, length, axis ("ratio" or "budget"), variant, baseline, ratio (float, "M=64" for a
        budget, or "all"), diff, lo, hi (accuracy points, variant minus baseline, 95% paired bootstrap
        CI), n (paired samples), verdict}; budget comparisons also have budget (int or "all").
    Raises:
        ReportError: a malformed pair (see `check_pairs`).
    """
    pairs = check_pairs(pairs)
    groups = {axis: group(rows, axis=axis) for axis in AXES}
    out = []
    for key in sorted(set().union(*groups.values())):
        mode, length = key
        for axis in AXES:
            presses = groups[axis].get(key)
            if presses is None:
                continue
            by_press = {p: _scores_by_sample(d) for p, d in presses.items()}
            todo = []
            for variant in press_order(list(presses)):
                p, (press, tag) = press_name(variant), split_method(variant)
                # an OBCache score against its attn family; a query source or layer budget (laq-,
                # pyramid-, epi-) against the press without it (PressName.base); both with the
                # same tag (@chunkN); a tagged method against its press run one-shot
                bases = [p.family + tag] if p.score != "attn" else []
                bases += [p.base + tag] if p.base != press else []
                todo += [(variant, base) for base in (bases if not p.is_full else [])]
                todo += [(variant, press)] if tag else []
            todo += [pair for pair in pairs if pair not in todo]
            for variant, base in todo:
                if variant in by_press and base in by_press:
                    out += _compare_pair(mode, length, axis, variant, base, by_press, n_boot, seed)
    return out


def _compare_pair(
    mode: str, length: int, axis: str, variant: str, base: str, by_press: dict, n_boot: int, seed: int
) -> list[dict[str, Any]]:
    """The paired comparisons of `variant` against `base` at every shared ratio or budget (and pooled).

    The full cache has one point (ratio 0, the budget tables' reference): compared with a press, its
    scores stand at each of the press's points.
    """
    out = []
    va, vb = by_press[variant], by_press[base]
    if (variant == FULL_NAME) != (base == FULL_NAME):
        full, other = (va, vb) if variant == FULL_NAME else (vb, va)
        if 0 not in full:
            return []
        full = {point: full[0] for point in other}
        va, vb = (full, other) if variant == FULL_NAME else (other, full)
    ratios = sorted(set(va) & set(vb))
    for ratio in [*ratios, "all"] if len(ratios) > 1 else ratios:
        a, b = _pooled(va, vb, ratios) if ratio == "all" else (va[ratio], vb[ratio])
        res = _compare(a, b, n_boot, seed)
        if res is None:
            continue
        row = {"mode": mode, "length": length, "axis": axis, "variant": variant, "baseline": base}
        if axis == "budget":
            row |= {"ratio": ratio if ratio == "all" else f"M={ratio}", "budget": ratio}
        else:
            row["ratio"] = ratio
        out.append({**row, **res})
    return out


def format_comparisons(comps: list[dict[str, Any]]) -> str:
    if not comps:
        return (
            "no OBCache variant with its baseline (e.g. snapkv and snapkv-obk), nor a pair asked for, "
            "in these results"
        )
    wv = max(len("variant"), *(len(c["variant"]) for c in comps)) + 2  # columns as wide as the names
    wb = max(len("baseline"), *(len(c["baseline"]) for c in comps)) + 2
    label = lambda c: c["ratio"] if isinstance(c["ratio"], str) else f"{c['ratio']:g}"  # noqa: E731
    wr = max(6, *(len(label(c)) + 1 for c in comps))
    lines = [
        "variant - baseline (an OBCache score vs attn; laq-/pyramid-/epi- vs the press without it; pairs "
        "asked for), accuracy points, paired bootstrap 95% CI (M=64: a budget of 64 tokens per KV head; "
        "'all' = pooled over the ratios, or the budgets)",
        f"{'mode':<9}{'length':>7}  {'variant':<{wv}}{'baseline':<{wb}}{'ratio':>{wr}}{'diff':>8}  {'95% CI':<18}{'n':>5}  verdict",
    ]
    for c in comps:
        ci = f"[{c['lo']:+.1f}, {c['hi']:+.1f}]"
        lines.append(
            f"{c['mode']:<9}{c['length']:>7}  {c['variant']:<{wv}}{c['baseline']:<{wb}}{label(c):>{wr}}"
            f"{c['diff']:>+8.1f}  {ci:<18}{c['n']:>5}  {c['verdict']}"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- plots
def press_style(name: str, families: Sequence[str]) -> dict[str, Any]:
    """Line kwargs: colour from the press family, line style and marker from its score."""
    from matplotlib import colormaps

    p = press_name(name)
    colours = colormaps["tab10" if len(families) <= 10 else "tab20"].colors
    ls, marker = SCORE_STYLES.get(p.score, OTHER_STYLE)
    return {
        "color": colours[list(families).index(p.family) % len(colours)],
        "linestyle": ls,
        "marker": marker,
    }


def plot_accuracy(rows: Rows, out_dir: Path | str) -> list[Path]:
    """``accuracy_<mode>_<length>.png``: accuracy against compression ratio, one line per press;
    ``accuracy_<mode>_<length>_budget.png``: against the budget (tokens per KV head, log2 axis)."""
    out_dir = output_dir(out_dir, PLOTS_WHAT)
    paths = []
    for (mode, length), axis, cells in _by_axis(rows, per_task=False):
        names = press_order(list(cells))
        many = len(names) > 8  # a long legend goes beside the axes, not over the lines
        fig = new_figure(9.5 if many else 7, 4.5)
        ax = fig.add_subplot()
        families = list(dict.fromkeys(press_name(n).family for n in names if n != FULL_NAME))
        for name in names:
            pts = sorted(cells[name].items())
            if name == FULL_NAME:
                ax.axhline(pts[0][1][0], color="black", linestyle=":", label=f"full ({pts[0][1][0]:.1f})")
                continue
            ax.plot([r for r, _ in pts], [c[0] for _, c in pts], label=name, **press_style(name, families))
        if axis == "budget":
            budgets = sorted({b for n in names if n != FULL_NAME for b in cells[n]})
            ax.set_xscale("log", base=2)
            ax.set_xticks(budgets, [str(b) for b in budgets])
            ax.set_xticks([], minor=True)
            ax.set(xlabel="budget (tokens per KV head)", ylabel="accuracy (%)", ylim=(-2, 102))
            ax.set_title(f"RULER accuracy, {mode} mode, length {length}, by budget")
        else:
            ax.set(xlabel="compression ratio (fraction of KV removed)", ylabel="accuracy (%)", ylim=(-2, 102))
            ax.set_title(f"RULER accuracy, {mode} mode, length {length}")
        ax.grid(alpha=0.3)
        if many:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        else:
            ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        suffix = "_budget" if axis == "budget" else ""
        paths.append(save_png(fig, out_dir / f"accuracy_{mode}_{length}{suffix}.png", dpi=110))
    return paths


def depth_matrix(rows: Rows, lengths: Sequence[int]) -> list[list[float]]:
    """Mean score x100 per (depth bin, length); NaN where no sample. Rows: bins of 10 points of depth."""
    acc: dict[tuple[int, int], list[float]] = defaultdict(list)
    for r in rows:
        acc[(depth_bin(r), int(r["length"]))].append(float(r["score"]))
    return [
        [100 * sum(v) / len(v) if (v := acc.get((b, L))) else math.nan for L in lengths]
        for b in range(DEPTH_BINS)
    ]


def _heatmap(ax: Any, rows: Rows, lengths: list[int], title: str, labels: bool) -> Any:
    import numpy as np

    m = np.ma.masked_invalid(np.array(depth_matrix(rows, lengths), dtype=float))
    ax.set_facecolor("0.8")  # grey = no sample in that cell
    im = ax.imshow(m, aspect="auto", cmap="RdYlGn", vmin=0, vmax=100, origin="upper")
    ax.set_xticks(range(len(lengths)), [str(L) for L in lengths] if labels else [""] * len(lengths))
    step = 100 // DEPTH_BINS
    ax.set_yticks(
        range(DEPTH_BINS),
        [f"{b * step}-{(b + 1) * step}" for b in range(DEPTH_BINS)] if labels else [""] * DEPTH_BINS,
    )
    ax.set_title(title, fontsize=8)
    return im


def plot_depth_heatmaps(rows: Rows, out_dir: Path | str) -> list[Path]:
    """``niah_depth_full_<mode>.png`` and ``niah_depth_presses_<mode>.png`` (presses x ratios grid;
    ``niah_depth_presses_<mode>_budget.png``: presses x budgets).

    Uses niah rows with a single needle depth (single, multikey_2/3); cells are mean scores per needle
    depth bin (10 points) and context length.
    """
    out_dir = Path(out_dir)
    niah = [r for r in rows if r["task"].startswith("niah") and len(r.get("depth") or []) == 1]
    paths = []
    for mode in sorted({r["mode"] for r in niah}):
        mrows = [r for r in niah if r["mode"] == mode]
        lengths = sorted({int(r["length"]) for r in mrows})
        full = [r for r in mrows if r["press"] == FULL_NAME and not row_budget(r) and not float(r["ratio"])]
        out_dir = output_dir(out_dir, PLOTS_WHAT)
        if full:
            paths.append(_full_heatmap(full, lengths, mode, out_dir))
        for axis in AXES:
            cells: dict[tuple[str, float], Rows] = {}
            for presses in group(mrows, axis=axis).values():
                for p, by_ratio in presses.items():
                    for ratio, rs in by_ratio.items():
                        cells.setdefault((p, ratio), []).extend(rs)
            if any(p != FULL_NAME for p, _ in cells):
                paths.append(_press_heatmaps(cells, lengths, mode, out_dir, axis))
    return paths


def _full_heatmap(rows: Rows, lengths: list[int], mode: str, out_dir: Path) -> Path:
    fig = new_figure(1.5 + 0.9 * len(lengths), 4.5)
    ax = fig.add_subplot()
    im = _heatmap(ax, rows, lengths, f"full cache, {mode}: niah accuracy (%), grey = no data", labels=True)
    ax.set(xlabel="context length (tokens)", ylabel="needle depth (%)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return save_png(fig, out_dir / f"niah_depth_full_{mode}.png", dpi=110)


def _press_heatmaps(
    cells: dict[tuple[str, float], Rows], lengths: list[int], mode: str, out_dir: Path, axis: str = "ratio"
) -> Path:
    names = press_order([p for p, _ in cells if p != FULL_NAME])
    ratios = sorted({r for p, r in cells if p != FULL_NAME})
    at = (lambda r: f"M={int(r)}") if axis == "budget" else (lambda r: f"{r:g}")  # noqa: E731
    fig = new_figure(1.5 + (0.6 + 0.5 * len(lengths)) * len(ratios), 1.0 + 1.9 * len(names), "constrained")
    axes = fig.subplots(len(names), len(ratios), squeeze=False)
    im = None
    for i, name in enumerate(names):
        for j, ratio in enumerate(ratios):
            ax = axes[i][j]
            rs = cells.get((name, ratio), [])
            im = _heatmap(ax, rs, lengths, f"{name} @ {at(ratio)}", labels=(j == 0 and i == len(names) - 1))
    budgets = ", M = tokens per KV head" if axis == "budget" else ""
    fig.suptitle(
        f"niah accuracy (%) by needle depth (rows, %) x length (columns), {mode} mode{budgets}; grey = no data",
        fontsize=9,
    )
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.6)
    suffix = "_budget" if axis == "budget" else ""
    return save_png(fig, out_dir / f"niah_depth_presses_{mode}{suffix}.png", dpi=100)


# ------------------------------------------------------------------------------------------ driver
def make_report(
    results: Path | str | Sequence[Path | str],
    per_task: bool = False,
    plots_dir: Path | str | None = None,
    plots: bool = True,
    n_boot: int = 2000,
    seed: int = 0,
    strict: bool = False,
    warn: Callable[[str], None] | None = None,
    pairs: Sequence[tuple[str, str]] = (),
    paper: bool = False,
    informative: float = 80.0,
) -> tuple[str, list[Path]]:
    """The report text (tables + comparisons) and the PNGs written (default ``<results>/plots``).

    `results`: a results directory or file, or several read as one run (`results.scan_runs`: the same
    model, dtype, seed and settings; e.g. a grid and its ablation on the same samples).
    Unusable lines of the results file are skipped with one message to `warn` (default: a logged
    warning) naming the file and the first few line numbers; ``strict=True`` raises ResultsError instead.
    A results directory's unmerged shards (a torchrun job still running, or one that died) are read too.
    `pairs`: (variant, baseline) comparisons added to the automatic ones (`compare_variants`); one that
    finds no shared samples is named to `warn`. `paper`: also the OBCache paper's tables on the tasks
    whose full-cache accuracy is >= `informative` % (`obinfer/eval/paper.py`), and its plots.
    """
    if not 0.0 <= informative <= 100.0:
        raise ReportError(
            f"the informative threshold is a full-cache accuracy in [0, 100] %, got {informative:g}"
        )
    if n_boot < 1:
        raise ReportError(f"the number of bootstrap resamples must be >= 1, got {n_boot}")
    if seed < 0:
        raise ReportError(f"the bootstrap seed must be >= 0, got {seed}")
    pairs = check_pairs(pairs)
    scan = scan_runs([results] if isinstance(results, (str, Path)) else list(results))
    if scan.bad and strict:
        raise ResultsError(scan.bad_lines_error())
    if scan.bad and not scan.rows:
        raise ResultsError(f"{scan.path} holds no readable results: {scan.describe()}")
    if not scan.rows:
        raise ResultsMissing(f"{scan.path} holds no results yet")
    if scan.bad:
        n = len(scan.bad)
        (warn or logger.warning)(
            f"skipped {n} unreadable line{'s' if n > 1 else ''}: {scan.describe()} "
            "(--strict makes this an error)"
        )
    rows = scan.rows
    comps = compare_variants(rows, n_boot, seed, pairs)
    made, present = {(c["variant"], c["baseline"]) for c in comps}, {r["press"] for r in rows}
    for variant, base in pairs:
        if (variant, base) not in made:
            absent = [n for n in (variant, base) if n not in present]
            why = (
                f"no {' or '.join(absent)} rows"
                if absent
                else "no ratio or budget of both on the same samples"
            )
            (warn or logger.warning)(f"comparison {variant}={base}: {why} in these results")
    parts = [accuracy_tables(rows, per_task), format_comparisons(comps)]
    if paper:
        from obinfer.eval import paper as pp

        parts.append(pp.paper_report(rows, informative, per_task=per_task, n_boot=n_boot, seed=seed))
    paths: list[Path] = []
    if plots:
        pdir = Path(plots_dir) if plots_dir is not None else scan.path.parent / "plots"
        paths = plot_accuracy(rows, pdir) + plot_depth_heatmaps(rows, pdir)
        if paper:
            tasks = pp.informative_tasks(rows, informative)
            paths += pp.plot_paper(rows, pdir, tasks, per_task=per_task) + pp.plot_depth_ratio(rows, pdir)
    return "\n\n".join(parts), paths
