"""obinfer/eval/paper.py: the OBCache paper's tables (informative tasks, paired CIs per cell, tally,
score ablation) and plots, checked against plain loops over hand-made results."""

from __future__ import annotations

import json
import random
from collections import defaultdict

import matplotlib.image as mpimg
import pytest

from obinfer.eval import paper, results
from obinfer.eval.metrics import MetricsError, paired_bootstrap_ci, stratified_bootstrap_ci
from obinfer.eval.report import make_report

TASKS = {"niah_single_1": 1.0, "niah_multikey_1": 0.9, "vt": 0.5}  # task -> full-cache success rate
PRESSES = ("snapkv", "snapkv-obk", "snapkv-obv", "h2o", "h2o-obk")
RATIOS = (0.5, 0.9)
N = 10


def _rows(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for mode in ("agnostic", "aware"):
        for task, p_full in TASKS.items():
            for i in range(N):
                depth = [round(100 * (i + 0.5) / N, 2)]
                base = {"task": task, "index": i, "length": 4096, "mode": mode, "depth": depth, "budget": 0}
                full = 1.0 if i < round(p_full * N) else 0.0
                rows.append(base | {"press": "full", "ratio": 0.0, "score": full})
                for press in PRESSES:
                    for r in RATIOS:
                        p = (0.8 if "ob" in press else 0.5) * (1 - r / 2)
                        rows.append(base | {"press": press, "ratio": r, "score": float(rng.random() < p)})
    return rows


def _acc(rows, press, mode, ratio, tasks):
    """Plain mean over tasks of the task's mean score, x100."""
    by_task = defaultdict(list)
    for r in rows:
        if r["press"] == press and r["mode"] == mode and r["ratio"] == ratio and r["task"] in tasks:
            by_task[r["task"]].append(r["score"])
    return 100 * sum(sum(v) / len(v) for v in by_task.values()) / len(by_task)


def test_stratified_bootstrap_reduces_to_the_paired_one_and_weights_tasks_equally():
    rng = random.Random(1)
    a = [float(rng.random() < 0.7) for _ in range(25)]
    b = [float(rng.random() < 0.4) for _ in range(25)]
    d = [x - y for x, y in zip(a, b, strict=True)]
    assert stratified_bootstrap_ci([d], n_boot=500, seed=3) == pytest.approx(
        paired_bootstrap_ci(a, b, 500, 3)
    )
    # two tasks of different sizes: the estimate is the mean of the task means, not the pooled mean
    est, lo, hi = stratified_bootstrap_ci([[1.0] * 2, [0.0] * 8], n_boot=200)
    assert (est, lo, hi) == (0.5, 0.5, 0.5)  # constant within each task: no spread
    est, lo, hi = stratified_bootstrap_ci([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0]], n_boot=2000)
    assert est == pytest.approx((0.75 + 1 / 3) / 2) and lo < est < hi
    with pytest.raises(MetricsError):
        stratified_bootstrap_ci([[1.0], []])
    with pytest.raises(MetricsError):
        stratified_bootstrap_ci([[1.0]], n_boot=0)


def test_informative_tasks_follow_the_full_cache():
    rows = _rows()
    assert paper.full_accuracy(rows)[4096]["niah_multikey_1"] == (90.0, 2 * N)
    assert paper.informative_tasks(rows) == {4096: ["niah_multikey_1", "niah_single_1"]}
    assert paper.informative_tasks(rows, 95.0) == {4096: ["niah_single_1"]}
    assert paper.informative_tasks(rows, 0.0) == {4096: sorted(TASKS)}
    no_full = [r for r in rows if not (r["press"] == "full" and r["task"] == "vt")]
    assert "vt" in paper.informative_tasks(no_full)[4096]  # no full-cache row: nothing says uninformative


def test_paper_cells_match_plain_loops():
    rows = _rows()
    tasks = paper.informative_tasks(rows)
    cells = paper.paper_cells(rows, tasks, n_boot=300)
    fams = {(c.baseline, c.variant) for c in cells}
    assert fams == {("h2o", "h2o-obk"), ("snapkv", "snapkv-obk")}  # tova, adakv-snapkv: no rows
    assert len(cells) == 2 * 2 * (len(RATIOS) + 1)  # families x modes x (ratios + pooled)
    for c in cells:
        ratios = RATIOS if c.ratio == "all" else [c.ratio]
        base = sum(_acc(rows, c.baseline, c.mode, r, tasks[4096]) for r in ratios) / len(ratios)
        var = sum(_acc(rows, c.variant, c.mode, r, tasks[4096]) for r in ratios) / len(ratios)
        assert (c.base_acc, c.var_acc) == (pytest.approx(base), pytest.approx(var))
        assert c.diff == pytest.approx(var - base) and c.lo <= c.diff <= c.hi and c.n == 2 * N
        assert c.verdict == ("better" if c.lo > 0 else "worse" if c.hi < 0 else "no clear difference")
    t = paper.tally(cells)
    per_ratio = [c for c in cells if c.ratio != "all"]
    assert t == {
        "cells": 8,
        "at_least_as_good": sum(c.var_acc >= c.base_acc - 1e-9 for c in per_ratio),
        "better": sum(c.lo > 0 for c in per_ratio),
        "worse": sum(c.hi < 0 for c in per_ratio),
        "no_ci": 0,
    }
    assert t["better"] >= 1  # the variants were drawn 1.6x as likely to succeed


def test_paper_table_and_ablation_text():
    rows = _rows()
    tasks = paper.informative_tasks(rows)
    cells = paper.paper_cells(rows, tasks, n_boot=300)
    text = paper.format_paper_table(cells)
    lines = text.splitlines()
    head = next(line for line in lines if line.startswith("| method"))
    assert head.split(" | ")[1:] == [
        "agnostic 0.5",
        "agnostic 0.9",
        "agnostic mean",
        "aware 0.5",
        "aware 0.9",
        "aware mean |",
    ]
    snap = next(line for line in lines if line.startswith("| snapkv |"))
    assert snap.split(" | ")[1] == f"{_acc(rows, 'snapkv', 'agnostic', 0.5, tasks[4096]):.1f}"
    t = paper.tally(cells)
    assert f"at least as accurate as its baseline in {t['at_least_as_good']} of 8 cells" in text
    assert f"significantly better in {t['better']}, significantly worse in {t['worse']}" in text
    abl = paper.ablation_cells(rows, tasks, n_boot=300)
    assert {(c.mode, c.variant) for c in abl} == {
        (m, v) for m in ("agnostic", "aware") for v in ("snapkv-obv", "snapkv-obk")
    }
    atext = paper.format_ablation(abl)
    assert "| mode | family | attn | obv | obk |" in atext
    row = next(line for line in atext.splitlines() if line.startswith("| aware | snapkv |"))
    pooled = sum(_acc(rows, "snapkv", "aware", r, tasks[4096]) for r in RATIOS) / 2
    assert row.split(" | ")[2] == f"{pooled:.1f}"


def test_ablation_rows_use_the_samples_every_score_answered():
    """An ablation run with fewer samples than its grid: the whole (mode, family) row, attn and obk
    included, is computed on the samples obv also answered, and the table says how many."""
    rows = _rows()
    tasks = paper.informative_tasks(rows)
    few = [r for r in rows if not (r["press"] == "snapkv-obv" and r["index"] >= 6)]
    abl = paper.ablation_cells(few, tasks, n_boot=200)
    assert {c.n for c in abl} == {2 * 6}  # 2 informative tasks x samples 0-5
    common = [r for r in rows if r["index"] < 6]
    for c in abl:
        base = sum(_acc(common, "snapkv", c.mode, r, tasks[4096]) for r in RATIOS) / 2
        var = sum(_acc(common, c.variant, c.mode, r, tasks[4096]) for r in RATIOS) / 2
        assert (c.base_acc, c.var_acc) == (pytest.approx(base), pytest.approx(var))
    assert "n = 12 samples per cell" in paper.format_ablation(abl)
    # the paper's table still uses every sample of snapkv and snapkv-obk
    assert {c.n for c in paper.paper_cells(few, tasks, n_boot=50)} == {2 * N}


def test_every_press_on_the_samples_all_answered():
    """format_common: nothing when every press answered the same samples; else each press's accuracy on
    the samples every press answered, equal to a plain mean over those samples."""
    rows = _rows()
    tasks = paper.informative_tasks(rows)
    assert paper.format_common(rows, tasks) == ""
    few = [r for r in rows if not (r["press"] == "snapkv-obv" and r["index"] >= 4)]
    text = paper.format_common(few, tasks)
    assert text.count("n = 8 samples per cell") == 2  # both modes; 2 informative tasks x samples 0-3
    common = [r for r in rows if r["index"] < 4]
    lines = text.split("aware, length 4096")[1].splitlines()
    assert next(x for x in lines if x.startswith("| full |")).endswith(
        f" | {_acc(common, 'full', 'aware', 0.0, tasks[4096]):.1f} |"
    )
    for press in PRESSES:
        row = next(x for x in lines if x.startswith(f"| {press} |")).strip("| ").split(" | ")
        accs = [_acc(common, press, "aware", r, tasks[4096]) for r in RATIOS]
        assert row[1:] == [f"{a:.1f}" for a in accs] + [f"{sum(accs) / len(accs):.1f}"]
    assert "Every press on the samples all of them answered" in paper.paper_report(few, n_boot=50)
    assert "for the presses run at all of them" not in text
    # a press run at only some of the ratios (a smaller check): its cells, but no mean beside the others'
    some = few + [{**r, "press": "knorm"} for r in rows if r["press"] == "snapkv" and r["ratio"] == RATIOS[0]]
    text = paper.format_common(some, tasks)
    assert text.count("mean = pooled over the ratios, for the presses run at all of them") == 2
    row = next(x for x in text.splitlines() if x.startswith("| knorm |")).strip("| ").split(" | ")
    accs = [_acc(common, "snapkv", "agnostic", RATIOS[0], tasks[4096])]
    assert row[1:] == [f"{accs[0]:.1f}"] + ["-"] * (len(RATIOS) - 1) + ["-"]
    assert next(x for x in text.splitlines() if x.startswith("| snapkv |")).split(" | ")[-1] != "- |"


def test_make_report_paper_text_and_plots(tmp_path):
    out = tmp_path / "res"
    out.mkdir()
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    text, paths = make_report(out, per_task=True, paper=True, n_boot=100)
    assert "| 4096 | vt | 50.0 | 20 | no |" in text
    assert "The paper's grid (obk vs attn), informative tasks, length 4096" in text
    assert "niah_single_1, length 4096" in text and "vt, length 4096" not in text
    names = {p.name for p in paths}
    assert {"paper_4096.png", "paper_4096_niah_single_1.png", "depth_ratio_4096.png"} <= names
    assert "paper_4096_vt.png" not in names
    for p in paths:
        assert mpimg.imread(p).shape[2] in (3, 4)
    best, worst = paper.rank_presses(_rows())[0][0], paper.rank_presses(_rows())[-1][0]
    assert "ob" in best and "ob" not in worst


def test_cli_report_paper_options(tmp_path, capsys):
    from obinfer.cli import main

    out = tmp_path / "res"
    out.mkdir()
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    assert (
        main(["report", str(out), "--paper", "--no-plots", "--informative", "95", "--bootstrap", "50"]) == 0
    )
    text = capsys.readouterr().out
    assert "| 4096 | niah_multikey_1 | 90.0 | 20 | no |" in text
    for bad in ("101", "-1", "nan"):
        assert main(["report", str(out), "--paper", "--informative", bad]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--informative" in err[0]


@pytest.mark.parametrize("few", [1, paper.MIN_PER_TASK - 1])
def test_a_task_with_too_few_samples_gets_no_ci(few):
    """Resampling within a task of one or a few samples has (almost) no spread: such a cell shows no CI,
    is never bold and never counts as significant."""
    rows = [r for r in _rows() if r["task"] == "niah_single_1" or r["index"] < few]
    cells = paper.paper_cells(rows, {4096: ["niah_single_1", "niah_multikey_1"]}, n_boot=200)
    assert cells and all(c.verdict.startswith("no CI") for c in cells)
    t = paper.tally(cells)
    assert t["no_ci"] == t["cells"] == 8 and t["better"] == t["worse"] == 0
    text = paper.format_paper_table(cells)
    assert "[no CI]" in text and "**" not in text and "8 cells have no CI" in text


def _write_run(d, rows, **run):
    d.mkdir()
    (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    info = {"model": "m", "dtype": "float32", "seed": 42, "chat": True, "press_opts": {}} | run
    (d / "run.json").write_text(json.dumps(info))
    return d


def test_report_of_two_runs_is_the_report_of_their_rows_together(tmp_path, capsys):
    """A grid and its ablation as two directories (obinfer report GRID ABLATION): the same text as one
    file of all their rows; a row both hold with the same answer counts once."""
    from obinfer.cli import main

    rows = [r | {"pred": "x"} for r in _rows()]
    ablation = {"snapkv-obv"}
    grid = _write_run(tmp_path / "grid", [r for r in rows if r["press"] not in ablation])
    abl = _write_run(tmp_path / "abl", [r for r in rows if r["press"] in ablation or r["press"] == "full"])
    one = _write_run(tmp_path / "one", rows)
    merged, _ = make_report([grid, abl], paper=True, plots=False, n_boot=100)
    alone, _ = make_report(one, paper=True, plots=False, n_boot=100)
    assert merged == alone and "obv" in merged
    just_grid, _ = make_report(grid, paper=True, plots=False, n_boot=100)
    assert "obv" not in just_grid.split("Ablation of the score")[1]
    assert main(["report", str(grid), str(abl), "--paper", "--no-plots", "--bootstrap", "100"]) == 0
    assert capsys.readouterr().out.strip() == alone.strip()


def test_the_per_task_summary_is_each_tasks_pooled_paper_cell():
    """Each (task, mode, family) cell of the per-task summary is the pooled cell of the paper's grid
    computed on that task alone, baseline and variant accuracies as a plain mean over its samples."""
    rows = _rows()
    tasks = {4096: ["niah_multikey_1", "niah_single_1"]}
    text = paper.format_task_summary(paper.task_cells(rows, tasks, n_boot=100))
    lines = [x for x in text.splitlines() if x.startswith("| niah")]
    assert len(lines) == 4 and "| task | mode | h2o | snapkv |" in text  # families present in the rows
    for line in lines:
        task, mode, *cells = [x.strip() for x in line.strip("|").split("|")]
        for fam, cell in zip(("h2o", "snapkv"), cells, strict=True):
            (c,) = [
                c
                for c in paper.paper_cells(rows, {4096: [task]}, n_boot=100)
                if c.ratio == "all" and c.mode == mode and c.baseline == fam
            ]
            base = sum(_acc(rows, fam, mode, r, [task]) for r in RATIOS) / len(RATIOS)
            var = sum(_acc(rows, fam + "-obk", mode, r, [task]) for r in RATIOS) / len(RATIOS)
            assert c.base_acc == pytest.approx(base) and c.var_acc == pytest.approx(var)
            assert cell.startswith(f"{base:.1f} -> {var:.1f} (") and f"{c.diff:+.1f} [" in cell
    assert text in paper.paper_report(rows, n_boot=100)


def test_the_paper_block_counts_the_answers_their_cap_cut_short():
    """Rows with a recorded cap: the block counts, per cap and informative task, the answers that
    reached it with references missing (a score of 1 at the cap, or an answer that stopped sooner, is
    not one)."""
    rows = _rows()
    assert "cut short" not in paper.paper_report(rows, n_boot=50)  # caps not recorded: no line
    rng = random.Random(5)
    capped = [r | {"cap": rng.choice([64, 128]), "new_tokens": rng.choice([10, 64, 128])} for r in rows]
    want, total = defaultdict(int), defaultdict(int)
    for r in capped:
        if r["task"] != "vt":
            total[r["cap"]] += 1
            want[(r["cap"], r["task"])] += r["new_tokens"] >= r["cap"] and r["score"] < 1
    line = paper.format_caps(capped, {4096: ["niah_multikey_1", "niah_single_1"]})
    parts = [
        f"cap {c}: {want[(c, 'niah_multikey_1')] + want[(c, 'niah_single_1')]} of {total[c]} "
        f"(niah_multikey_1 {want[(c, 'niah_multikey_1')]}, niah_single_1 {want[(c, 'niah_single_1')]})"
        for c in (64, 128)
    ]
    assert (
        line
        == "Answers cut short by their cap (they reached it with references missing): "
        + "; ".join(parts)
        + "."
    )
    assert line in paper.paper_report(capped, n_boot=50)


def test_a_run_redoing_cut_short_answers_with_a_larger_cap_is_read_with_it(tmp_path):
    """A second directory holding answers redone with a larger cap (those the first run's cap cut short):
    read together, each redone answer replaces the one it redoes, whichever directory comes first."""
    rows = [r | {"pred": "x", "model": "m", "cap": 2, "new_tokens": 2} for r in _rows()]
    short = [r for r in rows if r["score"] < 1][:5]
    assert len(short) == 5
    redone = [r | {"pred": "longer", "cap": 4, "new_tokens": 3, "score": 1.0} for r in short]
    a = _write_run(tmp_path / "a", rows)
    b = _write_run(tmp_path / "b", redone)
    want = {results.result_key(r): r for r in rows} | {results.result_key(r): r for r in redone}
    for order in ([a, b], [b, a]):
        got = results.scan_runs(order).rows
        assert len(got) == len(rows) and {results.result_key(r): r for r in got} == want
    # a row that was not cut short (it scored 1, or stopped before its cap) is not replaced: refused
    done = [r for r in rows if r["score"] == 1][0] | {"pred": "y", "cap": 4}
    c = _write_run(tmp_path / "c", [done])
    with pytest.raises(results.ResultsError, match="differently"):
        results.scan_runs([a, c])


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"seed": 7}, "seed 42 vs 7"),
        ({"dtype": "bfloat16"}, "dtype float32 vs bfloat16"),
        ("pred", "answer niah_single_1 #0 (4096 tokens, full, ratio 0, agnostic) differently"),
        ("model", "hold rows of different models (m vs other)"),
    ],
)
def test_runs_that_cannot_be_read_as_one_are_refused(tmp_path, capsys, change, needle):
    from obinfer.cli import main

    rows = [r | {"pred": "x", "model": "m"} for r in _rows()]
    a = _write_run(tmp_path / "a", rows[: len(rows) // 2])
    b_rows = rows[len(rows) // 2 :]
    if change == "pred":
        b_rows = b_rows + [rows[0] | {"pred": "y"}]
    if change == "model":
        b_rows = [r | {"model": "other"} for r in b_rows]
    b = _write_run(tmp_path / "b", b_rows, **(change if isinstance(change, dict) else {}))
    assert main(["report", str(a), str(b), "--no-plots"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and str(a) in err[0] and str(b) in err[0]
