"""The OBCache paper's views of a results directory: does an output-aware score beat attention?

The paper (arXiv 2510.07651) swaps the attention score of H2O, TOVA, SnapKV and AdaKV-SnapKV for its key
score (``obk``) and reports accuracy per compression ratio and mode. This module computes that table
from the rows `obinfer eval` wrote (``obinfer report DIR --paper``), with what the paper leaves out: a
paired CI for every cell.

* **Informative tasks.** A task whose full-cache accuracy is below a threshold (default 80%) cannot
  show what compression loses; the headline is the mean over the tasks at or above it, at each length
  (`informative_tasks`). Tasks without full-cache rows are kept (nothing says they are uninformative).
* **Paper table** (`paper_cells`, `format_paper_table`): rows each family and its variant, columns
  mode x ratio, cells the accuracy (mean over tasks of the task's mean score, x100) on the samples both
  presses answered, and a row of the difference with its 95% CI from a bootstrap that resamples samples
  within each task, keeping the pairing (`metrics.stratified_bootstrap_ci`); no CI while some task has
  fewer than `MIN_PER_TASK` shared samples. `tally` counts the cells where the variant is at least as
  good, and where the CI excludes 0.
* **Ablation** (`ablation_cells`): every score of a family (attn, obv, obk, obkv, caote) pooled over
  the ratios (a sample's mean over them), with the difference to attn, on the samples every score of
  the family answered (an ablation run with fewer samples than its grid restricts the whole row).
* **Plots**: accuracy against ratio per family, baseline solid and variant dashed with CI bands, full
  cache dotted, one panel per (mode, family), also per task (`plot_paper`); needle depth x ratio heat
  maps of the best and the worst press (`plot_depth_ratio`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from obinfer.cache.presses import FULL_NAME
from obinfer.eval.figures import DEPTH_BINS, PLOTS_WHAT, depth_bin, new_figure, save_png
from obinfer.eval.metrics import stratified_bootstrap_ci
from obinfer.eval.results import Rows, cut_short, output_dir, press_name, row_budget, row_cap

PAPER_FAMILIES = ("h2o", "tova", "snapkv", "adakv-snapkv")  # the paper's four methods, in its order
ABLATION_SCORES = ("attn", "obv", "obk", "obkv", "caote")
# the families of the ablation table, those present in the results (the paper's SnapKV pair, and their
# PyramidKV layer-budget variants)
ABLATION_FAMILIES = ("snapkv", "adakv-snapkv", "pyramid-snapkv", "pyramid-adakv-snapkv")
INFORMATIVE = 80.0  # full-cache accuracy (%) at or above which a task is informative
# fewer shared samples than this in some task: no CI. Resampling within a task of 1 sample has no spread,
# and with 2-4 the percentile bootstrap shows near-certainty whenever those few samples agree.
MIN_PER_TASK = 5


def variant_name(family: str, score: str) -> str:
    """`snapkv`, `obk` -> `snapkv-obk`; the attn score is the family itself."""
    return family if score == "attn" else f"{family}-{score}"


# ------------------------------------------------------------------------------------------- tasks
def full_accuracy(rows: Rows) -> dict[int, dict[str, tuple[float, int]]]:
    """length -> task -> (full-cache accuracy %, samples), over every mode (the full cache is the same
    model call in both modes)."""
    acc: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["press"] == FULL_NAME and not row_budget(r):
            acc[int(r["length"])][r["task"]].append(float(r["score"]))
    return {
        length: {t: (100 * sum(v) / len(v), len(v)) for t, v in sorted(by_task.items())}
        for length, by_task in sorted(acc.items())
    }


def informative_tasks(rows: Rows, threshold: float = INFORMATIVE) -> dict[int, list[str]]:
    """length -> the tasks whose full-cache accuracy is >= `threshold` %, and those with no full-cache
    row (sorted)."""
    full = full_accuracy(rows)
    tasks: dict[int, set[str]] = defaultdict(set)
    for r in rows:
        tasks[int(r["length"])].add(r["task"])
    out = {}
    for length, names in sorted(tasks.items()):
        known = full.get(length, {})
        out[length] = sorted(t for t in names if t not in known or known[t][0] >= threshold)
    return out


# ---------------------------------------------------------------------------------------- samples
def _by_sample(rows: Rows, tasks: dict[int, list[str]] | None) -> dict[tuple, dict[str, dict]]:
    """(mode, length) -> press -> ratio -> (task, index) -> score; ratio rows only, `tasks` per length."""
    out: dict[tuple, dict[str, dict]] = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    for r in rows:
        length = int(r["length"])
        if row_budget(r) or (tasks is not None and r["task"] not in tasks.get(length, ())):
            continue
        ratio = round(float(r["ratio"]), 6)
        out[(r["mode"], length)][r["press"]][ratio][(r["task"], int(r["index"]))] = float(r["score"])
    return out


def _sample_sets(presses: dict[str, dict]) -> list[set[tuple]]:
    """The (task, index) samples of each (press, ratio) of one `_by_sample` entry."""
    return [set(by_key) for by_ratio in presses.values() for by_key in by_ratio.values()]


def _strata(keys: Sequence[tuple], values: dict[tuple, float]) -> list[list[float]]:
    by_task: dict[str, list[float]] = defaultdict(list)
    for k in keys:
        by_task[k[0]].append(values[k])
    return [by_task[t] for t in sorted(by_task)]


def _task_mean(keys: Sequence[tuple], values: dict[tuple, float]) -> float:
    strata = _strata(keys, values)
    return 100 * sum(sum(s) / len(s) for s in strata) / len(strata)


@dataclass(frozen=True)
class Cell:
    """One comparison: `variant` against `baseline` at one (mode, length, ratio); ratio "all" = pooled
    (each sample's mean over the ratios). Accuracies and CI in points (x100), on the `n` shared samples."""

    mode: str
    length: int
    baseline: str
    variant: str
    ratio: float | str
    base_acc: float
    var_acc: float
    diff: float
    lo: float
    hi: float
    n: int

    @property
    def verdict(self) -> str:
        if math.isnan(self.lo):
            return f"no CI (a task with fewer than {MIN_PER_TASK} samples)"
        return "better" if self.lo > 0 else "worse" if self.hi < 0 else "no clear difference"


def _cell(mode, length, base, variant, ratio, a: dict, b: dict, n_boot: int, seed: int) -> Cell | None:  # noqa: ANN001
    keys = sorted(set(a) & set(b))
    if not keys:
        return None
    diffs = {k: a[k] - b[k] for k in keys}
    strata = _strata(keys, diffs)
    d, lo, hi = stratified_bootstrap_ci(strata, n_boot=n_boot, seed=seed)
    if min(len(x) for x in strata) < MIN_PER_TASK:  # a task of one sample would count as certain
        lo = hi = math.nan
    return Cell(mode, length, base, variant, ratio, _task_mean(keys, b), _task_mean(keys, a),
                100 * d, 100 * lo, 100 * hi, len(keys))  # fmt: skip


def _pooled(by_ratio: dict[float, dict], ratios: Sequence[float]) -> dict[tuple, float]:
    """Each sample's mean score over `ratios` (samples answered at all of them)."""
    keys = set.intersection(*(set(by_ratio[r]) for r in ratios))
    return {k: sum(by_ratio[r][k] for r in ratios) / len(ratios) for k in keys}


def compare(
    rows: Rows,
    pairs: Sequence[tuple[str, str]],
    tasks: dict[int, list[str]] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    pooled: bool = True,
) -> list[Cell]:
    """`Cell`s of each (variant, baseline) pair at every (mode, length) and ratio both have (and pooled
    over those ratios, as ratio "all"), on the `tasks` of each length (None: all)."""
    out = []
    for (mode, length), presses in sorted(_by_sample(rows, tasks).items()):
        for variant, base in pairs:
            if variant not in presses or base not in presses:
                continue
            va, vb = presses[variant], presses[base]
            ratios = sorted(set(va) & set(vb))
            for ratio in ratios:
                cell = _cell(mode, length, base, variant, ratio, va[ratio], vb[ratio], n_boot, seed)
                out += [cell] if cell else []
            if pooled and len(ratios) > 1:
                cell = _cell(mode, length, base, variant, "all", _pooled(va, ratios), _pooled(vb, ratios),
                             n_boot, seed)  # fmt: skip
                out += [cell] if cell else []
    return out


def paper_cells(
    rows: Rows,
    tasks: dict[int, list[str]] | None = None,
    score: str = "obk",
    families: Sequence[str] = PAPER_FAMILIES,
    n_boot: int = 2000,
    seed: int = 0,
) -> list[Cell]:
    """The paper's grid: each family's `score` variant against the family (its attention score)."""
    return compare(rows, [(variant_name(f, score), f) for f in families], tasks, n_boot, seed)


def ablation_cells(
    rows: Rows,
    tasks: dict[int, list[str]] | None = None,
    families: Sequence[str] = ABLATION_FAMILIES,
    scores: Sequence[str] = ABLATION_SCORES,
    n_boot: int = 2000,
    seed: int = 0,
) -> list[Cell]:
    """Every non-attn score of each family against attn, pooled over the ratios ("all" cells only).

    Per (mode, length, family), on the samples that every score present answered: a grid of 30 samples
    for attn and obk with an ablation of 5 for obv gives one table of 5 samples, so that all its columns
    (attn included) are comparable."""
    rows = list(rows)
    out = []
    for f in families:
        names = {variant_name(f, s) for s in scores}
        mine = [r for r in rows if r["press"] in names]
        common = {ml: set.intersection(*_sample_sets(p)) for ml, p in _by_sample(mine, tasks).items()}
        sub = [
            r for r in mine if (r["task"], int(r["index"])) in common.get((r["mode"], int(r["length"])), ())
        ]
        pairs = [(variant_name(f, s), f) for s in scores if s != "attn"]
        out += [c for c in compare(sub, pairs, tasks, n_boot, seed) if c.ratio == "all"]
    return out


def tally(cells: Sequence[Cell]) -> dict[str, int]:
    """Per-ratio cells (not the pooled ones): how many, the variant >= its baseline, significantly
    better (CI above 0), significantly worse (CI below 0)."""
    cs = [c for c in cells if c.ratio != "all"]
    return {
        "cells": len(cs),
        "at_least_as_good": sum(c.diff >= 0 for c in cs),
        "better": sum(c.lo > 0 for c in cs),
        "worse": sum(c.hi < 0 for c in cs),
        "no_ci": sum(math.isnan(c.lo) for c in cs),
    }


# ------------------------------------------------------------------------------------------ tables
def _ci(c: Cell) -> str:
    if math.isnan(c.lo):
        return f"{c.diff:+.1f} [no CI]"
    text = f"{c.diff:+.1f} [{c.lo:+.1f}, {c.hi:+.1f}]"
    return f"**{text}**" if c.lo > 0 or c.hi < 0 else text


def _n_text(cells: Iterable[Cell]) -> str:
    """The cells' sample count: "30", or its range "5-30"."""
    ns = sorted({c.n for c in cells})
    return f"{ns[0]}" if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"


def _col(mode: str, ratio: float | str) -> str:
    return f"{mode} {ratio:g}" if not isinstance(ratio, str) else f"{mode} mean"


def format_paper_table(cells: Sequence[Cell], title: str = "") -> str:
    """Markdown: per length, rows each baseline, its variant and their difference (95% CI, bold where
    the CI excludes 0); columns mode x ratio, then each mode's pooled mean. n = samples per cell."""
    parts = []
    for length in sorted({c.length for c in cells}):
        cs = [c for c in cells if c.length == length]
        cols = sorted({(c.mode, c.ratio) for c in cs}, key=lambda mr: (mr[0], isinstance(mr[1], str), mr[1]))
        at = {(c.baseline, c.variant, c.mode, c.ratio): c for c in cs}
        pairs = list(dict.fromkeys((c.baseline, c.variant) for c in cs))
        n_text = _n_text(cs)
        lines = [
            f"{title}length {length}, accuracy % (n = {n_text} samples per cell); "
            "difference = variant - baseline, paired 95% CI, bold where it excludes 0",
            "",
            "| method | " + " | ".join(_col(m, r) for m, r in cols) + " |",
            "|---|" + "---:|" * len(cols),
        ]
        for base, variant in pairs:
            row = [at.get((base, variant, m, r)) for m, r in cols]
            lines.append(f"| {base} | " + " | ".join(f"{c.base_acc:.1f}" if c else "-" for c in row) + " |")
            lines.append(f"| {variant} | " + " | ".join(f"{c.var_acc:.1f}" if c else "-" for c in row) + " |")
            lines.append("| difference | " + " | ".join(_ci(c) if c else "-" for c in row) + " |")
        t = tally(cs)
        lines += [
            "",
            f"The variant is at least as accurate as its baseline in {t['at_least_as_good']} of {t['cells']} "
            f"cells (mode x ratio x method); significantly better in {t['better']}, significantly worse in "
            f"{t['worse']}."
            + (
                f" {t['no_ci']} cells have no CI (a task with fewer than {MIN_PER_TASK} samples)."
                if t["no_ci"]
                else ""
            ),
        ]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) if parts else "no (variant, baseline) pair with shared samples in these results"


def format_ablation(cells: Sequence[Cell], title: str = "") -> str:
    """Markdown: rows (mode, family), columns the scores; a cell is the accuracy pooled over the ratios,
    and for a score other than attn its difference to attn (95% CI)."""
    parts = []
    for length in sorted({c.length for c in cells}):
        cs = [c for c in cells if c.length == length]
        scores = [s for s in ABLATION_SCORES if any(press_name(c.variant).score == s for c in cs)]
        n_text = _n_text(cs)
        lines = [
            f"{title}length {length}, accuracy % pooled over the ratios, and the difference to attn "
            f"(paired 95% CI, bold where it excludes 0); n = {n_text} samples per cell, those every score "
            "of the family answered",
            "",
            "| mode | family | attn | " + " | ".join(scores) + " |",
            "|---|---|---:|" + "---:|" * len(scores),
        ]
        for mode, family in sorted({(c.mode, c.baseline) for c in cs}):
            row = {press_name(c.variant).score: c for c in cs if (c.mode, c.baseline) == (mode, family)}
            base = next(iter(row.values())).base_acc  # the same samples for every score of the row
            cell = lambda c: f"{c.var_acc:.1f} ({_ci(c)})" if c else "-"  # noqa: E731
            lines.append(
                f"| {mode} | {family} | {base:.1f} | " + " | ".join(cell(row.get(s)) for s in scores) + " |"
            )
        parts.append("\n".join(lines))
    return (
        "\n\n".join(parts) if parts else "no family with its attn baseline and another score in these results"
    )


def format_informative(rows: Rows, threshold: float) -> str:
    """Each task's full-cache accuracy and whether it is informative, per length (Markdown)."""
    full = full_accuracy(rows)
    inf = informative_tasks(rows, threshold)
    lines = [f"full-cache accuracy per task (informative: >= {threshold:g}%); rows = samples x modes", ""]
    lines += ["| length | task | full % | rows | informative |", "|---:|---|---:|---:|---|"]
    for length, tasks in inf.items():
        every = sorted(set(tasks) | set(full.get(length, {})))
        for t in every:
            acc, n = full.get(length, {}).get(t, (math.nan, 0))
            acc_text = f"{acc:.1f}" if n else "-"
            lines.append(f"| {length} | {t} | {acc_text} | {n} | {'yes' if t in tasks else 'no'} |")
    return "\n".join(lines)


def task_cells(
    rows: Rows,
    tasks: dict[int, list[str]],
    score: str = "obk",
    families: Sequence[str] = PAPER_FAMILIES,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[tuple[int, str], list[Cell]]:
    """The paper's grid computed on each task alone: (length, task) -> its `paper_cells`."""
    return {
        (length, t): paper_cells(rows, {length: [t]}, score, families, n_boot, seed)
        for length, names in tasks.items()
        for t in names
    }


def format_task_summary(
    by_task: dict[tuple[int, str], list[Cell]], score: str = "obk", families: Sequence[str] = PAPER_FAMILIES
) -> str:
    """Markdown: the paper's grid per task (`task_cells`), pooled over the ratios: rows (task, mode),
    columns the families, a cell ``baseline -> variant (difference [95% CI])``."""
    parts = []
    for length in sorted({length for length, _ in by_task}):
        cells = {
            (t, c.mode, c.baseline): c
            for (L, t), cs in by_task.items()
            if L == length
            for c in cs
            if c.ratio == "all"
        }
        if not cells:
            continue
        fams = [f for f in families if any(k[2] == f for k in cells)]
        n_text = _n_text(cells.values())
        lines = [
            f"Per task, length {length}: accuracy % pooled over the ratios, baseline -> {score} variant, and "
            f"the difference (paired 95% CI, bold where it excludes 0); n = {n_text} samples per cell",
            "",
            "| task | mode | " + " | ".join(fams) + " |",
            "|---|---|" + "---|" * len(fams),
        ]
        for t, mode in sorted({(k[0], k[1]) for k in cells}):
            text = [
                f"{c.base_acc:.1f} -> {c.var_acc:.1f} ({_ci(c)})" if (c := cells.get((t, mode, f))) else "-"
                for f in fams
            ]
            lines.append(f"| {t} | {mode} | " + " | ".join(text) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def format_common(rows: Rows, tasks: dict[int, list[str]]) -> str:
    """Markdown: every press's accuracy per mode x ratio (and pooled over the ratios) on the samples
    that every press answered at every ratio, per length; "" when every press answered the same samples
    (the plain accuracy table says it all). For a grid read with a smaller ablation of other presses."""
    parts = []
    for (mode, length), presses in sorted(_by_sample(rows, tasks).items()):
        sets = _sample_sets(presses)
        if all(k == sets[0] for k in sets):
            continue
        common = set.intersection(*sets)
        if not common:
            parts.append(f"{mode}, length {length}: no sample answered by every press")
            continue
        keys = sorted(common)
        ratios = sorted({r for by_ratio in presses.values() for r in by_ratio if r > 0})
        # a press run at only some of the ratios (a smaller check) gets no mean: it would not compare
        partial = any(p != FULL_NAME and set(ratios) - set(by_ratio) for p, by_ratio in presses.items())
        lines = [
            f"Every press on the samples all of them answered, {mode}, length {length}: accuracy % "
            f"(n = {len(keys)} samples per cell; mean = pooled over the ratios"
            + (", for the presses run at all of them)" if partial else ")"),
            "",
            "| press | " + " | ".join(f"{r:g}" for r in ratios) + " | mean |",
            "|---|" + "---:|" * (len(ratios) + 1),
        ]
        order = sorted(presses, key=lambda p: p != FULL_NAME)  # full first, then as the rows list them
        for press in order:
            by_ratio = presses[press]
            acc = {r: _task_mean(keys, by_ratio[r]) for r in by_ratio}
            cells = [f"{acc[r]:.1f}" if r in acc else "-" for r in ratios]
            whole = press == FULL_NAME or not set(ratios) - set(acc)
            mean = f"{sum(acc.values()) / len(acc):.1f}" if whole else "-"
            lines.append(f"| {press} | " + " | ".join(cells) + f" | {mean} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def format_caps(rows: Rows, tasks: dict[int, list[str]]) -> str:
    """How many of the informative tasks' answers their cap cut short (reached it with references
    missing: a larger cap could score them higher), per cap and task; "" when no row records its cap."""
    chosen = [r for r in rows if r["task"] in tasks.get(int(r["length"]), ())]
    by_cap: dict[int, list[dict]] = defaultdict(list)
    for r in chosen:
        if (c := row_cap(r)) is not None:
            by_cap[c].append(r)
    if not by_cap:
        return ""
    parts = []
    for cap, rs in sorted(by_cap.items()):
        short: dict[str, int] = defaultdict(int)
        for r in rs:
            short[r["task"]] += cut_short(r)
        n = sum(short.values())
        where = ", ".join(f"{t} {k}" for t, k in sorted(short.items()) if k)
        parts.append(f"cap {cap}: {n} of {len(rs)}" + (f" ({where})" if n else ""))
    return (
        "Answers cut short by their cap (they reached it with references missing): " + "; ".join(parts) + "."
    )


def paper_report(
    rows: Rows,
    threshold: float = INFORMATIVE,
    score: str = "obk",
    per_task: bool = False,
    n_boot: int = 2000,
    seed: int = 0,
) -> str:
    """The text of ``obinfer report --paper``: informative tasks, the paper table and the ablation on
    them, every press on the samples all answered (when some answered fewer: a grid with its ablation),
    the grid per task pooled over the ratios, the answers their cap cut short, and (per_task) the
    paper table of each task."""
    tasks = informative_tasks(rows, threshold)
    by_task = task_cells(rows, tasks, score, n_boot=n_boot, seed=seed)
    parts = [
        format_informative(rows, threshold),
        format_paper_table(
            paper_cells(rows, tasks, score, n_boot=n_boot, seed=seed),
            f"The paper's grid ({score} vs attn), informative tasks, ",
        ),  # fmt: skip
        format_ablation(ablation_cells(rows, tasks, n_boot=n_boot, seed=seed), "Ablation of the score, "),
        format_common(rows, tasks),
        format_task_summary(by_task, score),
        format_caps(rows, tasks),
    ]
    if per_task:
        parts += [format_paper_table(cells, f"{t}, ") for (_, t), cells in by_task.items()]
    return "\n\n".join(p for p in parts if p)


# ------------------------------------------------------------------------------------------- plots
def _accuracy_band(values: dict[tuple, float], n_boot: int, seed: int) -> tuple[float, float, float]:
    keys = sorted(values)
    strata = _strata(keys, values)
    m, lo, hi = stratified_bootstrap_ci(strata, n_boot=n_boot, seed=seed)
    if min(len(x) for x in strata) < MIN_PER_TASK:
        lo = hi = math.nan  # no band (see MIN_PER_TASK)
    return 100 * m, 100 * lo, 100 * hi


def plot_paper(
    rows: Rows,
    out_dir: Path | str,
    tasks: dict[int, list[str]] | None = None,
    score: str = "obk",
    families: Sequence[str] = PAPER_FAMILIES,
    per_task: bool = True,
    n_boot: int = 1000,
    seed: int = 0,
) -> list[Path]:
    """``paper_<length>.png`` (the `tasks` of that length; all if None) and, with per_task,
    ``paper_<length>_<task>.png``: one panel per (mode, family), accuracy against ratio, baseline solid,
    `score` variant dashed, 95% bootstrap bands, full cache dotted."""
    out = output_dir(out_dir, PLOTS_WHAT)
    paths = []
    lengths = sorted({int(r["length"]) for r in rows})
    for length in lengths:
        chosen = (tasks or {}).get(length) if tasks is not None else sorted({r["task"] for r in rows})
        views = [("", chosen or [])]
        if per_task:
            views += [(f"_{t}", [t]) for t in chosen or []]
        for suffix, names in views:
            data = _by_sample(rows, {length: names})
            modes = sorted(m for m, L in data if L == length)
            fams = [f for f in families if any(f in data[(m, length)] for m in modes)]
            if not modes or not fams:
                continue
            fig = new_figure(2.6 * len(fams) + 0.6, 2.4 * len(modes) + 0.6, "constrained")
            axes = fig.subplots(len(modes), len(fams), squeeze=False, sharey=True)
            for i, mode in enumerate(modes):
                presses = data[(mode, length)]
                full = presses.get(FULL_NAME, {}).get(0.0)
                for j, fam in enumerate(fams):
                    ax = axes[i][j]
                    for name, style, colour in (
                        (fam, "-", "tab:blue"),
                        (variant_name(fam, score), "--", "tab:red"),
                    ):
                        by_ratio = {r: v for r, v in presses.get(name, {}).items() if r > 0}
                        if not by_ratio:
                            continue
                        xs = sorted(by_ratio)
                        band = [_accuracy_band(by_ratio[x], n_boot, seed) for x in xs]
                        ax.plot(
                            xs,
                            [b[0] for b in band],
                            linestyle=style,
                            marker="o",
                            ms=3,
                            color=colour,
                            label=name,
                        )
                        ax.fill_between(
                            xs, [b[1] for b in band], [b[2] for b in band], color=colour, alpha=0.15
                        )
                    if full:
                        ax.axhline(
                            _accuracy_band(full, 1, seed)[0], color="black", linestyle=":", label="full"
                        )
                    ax.set_title(f"{fam}, {mode}", fontsize=9)
                    ax.set_ylim(-2, 102)
                    ax.grid(alpha=0.3)
                    if i == len(modes) - 1:
                        ax.set_xlabel("compression ratio")
                    if j == 0:
                        ax.set_ylabel("accuracy (%)")
                    if i == 0:  # each family's own names, once per column
                        ax.legend(fontsize=7, loc="upper right")
            what = names[0] if suffix else f"{len(names)} tasks"
            fig.suptitle(
                f"attention (solid) vs {score} (dashed), length {length}, {what}; bands: 95% CI", fontsize=10
            )
            paths.append(save_png(fig, out / f"paper_{length}{suffix}.png", dpi=100))
    return paths


def rank_presses(rows: Rows, tasks: dict[int, list[str]] | None = None) -> list[tuple[str, float]]:
    """Presses (not the full cache) by accuracy pooled over every ratio, mode and length, best first."""
    scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for presses in _by_sample(rows, tasks).values():
        for p, by_ratio in presses.items():
            if p == FULL_NAME:
                continue
            for values in by_ratio.values():
                for (task, _), s in values.items():
                    scores[p][task].append(s)
    acc = {p: 100 * sum(sum(v) / len(v) for v in t.values()) / len(t) for p, t in scores.items()}
    return sorted(acc.items(), key=lambda kv: (-kv[1], kv[0]))


def plot_depth_ratio(rows: Rows, out_dir: Path | str, presses: Sequence[str] | None = None) -> list[Path]:
    """``depth_ratio_<length>.png``: niah accuracy by needle depth (rows, 10-point bins) x ratio
    (columns), one panel per (mode, press); presses default to the best and the worst (`rank_presses`
    on the single-needle niah rows)."""
    import numpy as np

    niah = [
        r
        for r in rows
        if r["task"].startswith("niah") and len(r.get("depth") or []) == 1 and not row_budget(r)
    ]
    paths = []
    for length in sorted({int(r["length"]) for r in niah}):
        at = [r for r in niah if int(r["length"]) == length]
        ranked = rank_presses(at)
        names = (
            list(presses) if presses else list(dict.fromkeys([ranked[0][0], ranked[-1][0]])) if ranked else []
        )
        modes = sorted({r["mode"] for r in at})
        ratios = sorted({round(float(r["ratio"]), 6) for r in at if r["press"] in names})
        if not names or not ratios:
            continue
        fig = new_figure(1.2 + 2.2 * len(names) * len(modes), 4.2, "constrained")
        axes = fig.subplots(1, len(names) * len(modes), squeeze=False)[0]
        im = None
        for k, (name, mode) in enumerate((n, m) for n in names for m in modes):
            acc: dict[tuple[int, float], list[float]] = defaultdict(list)
            for r in at:
                if r["press"] == name and r["mode"] == mode:
                    acc[(depth_bin(r), round(float(r["ratio"]), 6))].append(float(r["score"]))
            m = np.array([[100 * sum(v) / len(v) if (v := acc.get((b, x))) else math.nan for x in ratios]
                          for b in range(DEPTH_BINS)])  # fmt: skip
            ax = axes[k]
            ax.set_facecolor("0.8")
            im = ax.imshow(np.ma.masked_invalid(m), aspect="auto", cmap="RdYlGn", vmin=0, vmax=100)
            ax.set_xticks(range(len(ratios)), [f"{x:g}" for x in ratios], fontsize=7)
            step = 100 // DEPTH_BINS
            ax.set_yticks(range(DEPTH_BINS), [f"{b * step}-{(b + 1) * step}" if k == 0 else "" for b in range(DEPTH_BINS)],
                          fontsize=7)  # fmt: skip
            ax.set_title(f"{name}, {mode}", fontsize=8)
            ax.set_xlabel("ratio", fontsize=8)
        axes[0].set_ylabel("needle depth (%)")
        if im is not None:
            fig.colorbar(im, ax=list(axes), shrink=0.8)
        fig.suptitle(
            f"niah accuracy (%) by needle depth x ratio, length {length}; grey = no data", fontsize=9
        )
        paths.append(save_png(fig, output_dir(out_dir, PLOTS_WHAT) / f"depth_ratio_{length}.png", dpi=100))
    return paths
