"""Report: table numbers from a hand-made results file, paired comparisons, valid PNG plots."""

from __future__ import annotations

import json
import math
import random

import matplotlib.image as mpimg
import pytest

from obinfer.eval import report, results
from obinfer.eval.metrics import paired_bootstrap_ci

# (press, ratio) -> per-sample scores of niah_single_1 #0, #1 and vt #0
SCORES = {
    ("full", 0.0): [1.0, 0.0, 1.0],
    ("snapkv", 0.25): [1.0, 0.0, 0.0],
    ("snapkv", 0.5): [0.0, 0.0, 0.4],
    ("snapkv-obk", 0.25): [1.0, 1.0, 1.0],
    ("snapkv-obk", 0.5): [1.0, 0.0, 0.6],
}
SAMPLES = [("niah_single_1", 0, [12.0]), ("niah_single_1", 1, [87.5]), ("vt", 0, [10.0, 20.0])]


def _rows(mode: str = "agnostic", length: int = 1000) -> list[dict]:
    rows = []
    for (press, ratio), scores in SCORES.items():
        for (task, index, depth), s in zip(SAMPLES, scores, strict=True):
            rows.append(
                {
                    "task": task,
                    "index": index,
                    "length": length,
                    "press": press,
                    "ratio": ratio,
                    "mode": mode,
                    "score": s,
                    "depth": depth,
                    "pred": "x",
                    "answers": ["y"],
                }
            )
    random.Random(0).shuffle(rows)  # pairing must not depend on the file order
    return rows


def _write(path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_split_and_order_press_names():
    split = lambda name: (results.press_name(name).family, results.press_name(name).score)
    assert split("adakv-snapkv-obk") == ("adakv-snapkv", "obk")
    assert split("h2o") == ("h2o", "attn")
    names = [
        "snapkv-obkv",
        "adakv-snapkv",
        "snapkv",
        "full",
        "h2o-obv",
        "snapkv-obv",
        "h2o",
        "adakv-snapkv-obk",
    ]
    assert report.press_order(names) == [
        "full",
        "h2o",
        "h2o-obv",
        "snapkv",
        "snapkv-obv",
        "snapkv-obkv",
        "adakv-snapkv",
        "adakv-snapkv-obk",
    ]


def test_table_numbers_from_hand_made_results(tmp_path):
    path = tmp_path / "results.jsonl"
    _write(path, _rows())
    grid = report.accuracy_grid(results.read_results(tmp_path))[("agnostic", 1000)]
    # mean over tasks of the task means: niah (a + b) / 2 and vt c, then x100
    for (press, ratio), (a, b, c) in SCORES.items():
        acc, n = grid[press][ratio]
        assert n == 3
        assert acc == pytest.approx(100 * ((a + b) / 2 + c) / 2)
    text = report.accuracy_tables(results.read_results(path))
    lines = {
        line.split()[0]: line for line in text.splitlines() if line and line.split()[0] in ("full", "snapkv")
    }
    assert lines["full"].split()[1:] == ["75.0", "(3)", "-", "-"]
    assert lines["snapkv"].split()[1:] == ["-", "25.0", "(3)", "20.0", "(3)"]
    per_task = report.accuracy_grid(results.read_results(path), per_task=True)
    assert per_task[("agnostic", 1000, "vt")]["snapkv-obk"][0.5] == (pytest.approx(60.0), 1)
    assert per_task[("agnostic", 1000, "niah_single_1")]["snapkv-obk"][0.5] == (50.0, 2)
    assert "-- vt: mode agnostic" in report.accuracy_tables(results.read_results(path), per_task=True)


def test_read_results_skips_a_torn_line(tmp_path):
    path = tmp_path / "results.jsonl"
    _write(path, _rows()[:4])
    with path.open("a") as fh:
        fh.write('{"task": "vt", "sco')
    rows, bad = results.read_results(path, with_errors=True)
    assert len(rows) == 4 and bad == 1
    with pytest.raises(FileNotFoundError, match="no results"):
        results.read_results(tmp_path / "missing")


def test_variant_vs_baseline_paired_bootstrap():
    comps = report.compare_variants(_rows(), n_boot=500, seed=3)
    assert [(c["variant"], c["baseline"], c["ratio"]) for c in comps] == [
        ("snapkv-obk", "snapkv", 0.25),
        ("snapkv-obk", "snapkv", 0.5),
        ("snapkv-obk", "snapkv", "all"),
    ]
    order = [0, 1, 2]  # samples sorted by (task, index): niah #0, niah #1, vt #0
    for c in comps[:2]:
        a = [SCORES[("snapkv-obk", c["ratio"])][i] for i in order]
        b = [SCORES[("snapkv", c["ratio"])][i] for i in order]
        diff, lo, hi = paired_bootstrap_ci(a, b, n_boot=500, seed=3)
        assert (c["diff"], c["lo"], c["hi"], c["n"]) == pytest.approx((100 * diff, 100 * lo, 100 * hi, 3))
    assert comps[0]["diff"] == pytest.approx(100 * 2 / 3)
    pooled = comps[2]
    a = [(SCORES[("snapkv-obk", 0.25)][i] + SCORES[("snapkv-obk", 0.5)][i]) / 2 for i in order]
    b = [(SCORES[("snapkv", 0.25)][i] + SCORES[("snapkv", 0.5)][i]) / 2 for i in order]
    assert pooled["diff"] == pytest.approx(100 * (sum(a) - sum(b)) / 3)
    assert pooled["n"] == 3
    assert all(c["verdict"] in ("better", "no clear difference") for c in comps)
    text = report.format_comparisons(comps)
    assert "snapkv-obk" in text and "all" in text


def test_long_press_names_keep_their_columns_apart():
    long = {"mode": "aware", "length": 2048, "variant": "laq-adakv-snapkv-obk", "baseline": "adakv-snapkv-obk",
            "ratio": 0.5, "diff": 1.0, "lo": -1.0, "hi": 2.0, "n": 60, "verdict": "no clear difference"}  # fmt: skip
    row = report.format_comparisons([long]).splitlines()[-1]
    assert row.split()[:4] == ["aware", "2048", "laq-adakv-snapkv-obk", "adakv-snapkv-obk"]


def test_verdicts_follow_the_interval():
    rows = []
    for i in range(30):  # the variant is right on every sample, the baseline on none
        for press, s in (("tova", 0.0), ("tova-obv", 1.0)):
            rows.append(
                {
                    "task": "vt",
                    "index": i,
                    "length": 10,
                    "press": press,
                    "ratio": 0.5,
                    "mode": "aware",
                    "score": s,
                }
            )
    (c,) = report.compare_variants(rows, n_boot=200)
    assert c["verdict"] == "better" and c["lo"] == c["hi"] == 100.0
    flipped = [dict(r, score=1.0 - r["score"]) for r in rows]
    assert report.compare_variants(flipped, n_boot=200)[0]["verdict"] == "worse"


def test_depth_matrix_bins_needle_depths():
    rows = [
        {"depth": [3.0], "length": 1000, "score": 1.0},
        {"depth": [7.0], "length": 1000, "score": 0.0},
        {"depth": [95.0], "length": 2000, "score": 1.0},
        {"depth": [100.0], "length": 2000, "score": 1.0},
    ]
    m = report.depth_matrix(rows, [1000, 2000])
    assert len(m) == 10 and m[0][0] == 50.0 and m[9][1] == 100.0
    assert math.isnan(m[0][1]) and math.isnan(m[5][0])


def test_plot_styles_pair_variants_with_baselines():
    fams = ["snapkv", "adakv-snapkv"]
    base, var = report.press_style("snapkv", fams), report.press_style("snapkv-obk", fams)
    assert base["color"] == var["color"] and base["linestyle"] != var["linestyle"]
    assert base["marker"] != var["marker"]
    assert report.press_style("adakv-snapkv", fams)["color"] != base["color"]


def test_pngs_are_written_and_readable(tmp_path):
    rows = _rows("agnostic", 1000) + _rows("agnostic", 2000) + _rows("aware", 1000)
    _write(tmp_path / "results.jsonl", rows)
    text, paths = report.make_report(tmp_path, per_task=True, n_boot=100)
    names = sorted(p.name for p in paths)
    assert names == sorted(
        [
            "accuracy_agnostic_1000.png",
            "accuracy_agnostic_2000.png",
            "accuracy_aware_1000.png",
            "niah_depth_full_agnostic.png",
            "niah_depth_presses_agnostic.png",
            "niah_depth_full_aware.png",
            "niah_depth_presses_aware.png",
        ]
    )
    for p in paths:
        assert p.parent == tmp_path / "plots" and p.stat().st_size > 0
        img = mpimg.imread(p)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
        assert img.std() > 0  # not a blank canvas
    assert "== mode aware, length 1000 ==" in text


def test_cli_report(tmp_path, capsys):
    from obinfer import cli

    _write(tmp_path / "r" / "results.jsonl", _rows())
    assert cli.main(["report", str(tmp_path / "r"), "--per-task", "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "-- niah_single_1:" in out and "75.0 (3)" in out
    assert not (tmp_path / "r" / "plots").exists()
    assert cli.main(["report", str(tmp_path / "nothing")]) == 2
    assert "no results" in capsys.readouterr().err


# ------------------------------------------------------------------ bad input
def _one_line_error(capsys, *needles: str) -> None:
    err = capsys.readouterr().err
    assert err.startswith("obinfer: error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err


def _damaged(tmp_path):
    """A results file with a torn line (3), an undecodable one (5) and a non-row (7) among good rows."""
    lines = [json.dumps(r) + "\n" for r in _rows()]
    lines[2] = lines[2][:25] + "\n"
    lines[4] = '{"task": "caf\xe9"}\n'
    lines[6] = "[1, 2]\n"
    path = tmp_path / "r" / "results.jsonl"
    path.parent.mkdir(parents=True)
    path.write_bytes("".join(lines).encode("utf-8").replace("caf\xe9".encode(), b"caf\xe9"))  # latin-1 byte
    return path, len(lines) - 3


def test_report_warns_about_skipped_lines_and_strict_refuses(tmp_path, capsys):
    from obinfer import cli

    path, n_good = _damaged(tmp_path)
    scan = results.scan_results(path)
    assert len(scan.rows) == n_good
    assert [(b.line, b.reason) for b in scan.bad] == [
        (3, "not valid JSON"),
        (5, "not UTF-8"),
        (7, "not a JSON object"),
    ]
    assert cli.main(["report", str(path.parent), "--no-plots"]) == 0
    captured = capsys.readouterr()
    assert "accuracy %" in captured.out
    warning = captured.err
    assert warning.startswith("obinfer: warning: skipped 3 unreadable lines:") and warning.count("\n") == 1
    assert f"{path}:3 (not valid JSON), {path}:5 (not UTF-8), {path}:7 (not a JSON object)" in warning
    assert "--strict" in warning
    assert cli.main(["report", str(path.parent), "--no-plots", "--strict"]) == 2
    _one_line_error(capsys, f"{path}:3: not valid JSON", "3 unreadable lines")
    with pytest.raises(results.ResultsError, match=":3: not valid JSON"):
        results.read_results(path, strict=True)
    rows, bad = results.read_results(path, with_errors=True)
    assert (len(rows), bad) == (n_good, 3)


def test_report_rows_missing_fields_are_skipped_not_a_traceback(tmp_path, capsys):
    from obinfer import cli

    rows = _rows()
    rows[0] = {k: v for k, v in rows[0].items() if k != "score"}
    rows[1] = rows[1] | {"ratio": "half"}
    rows[2] = rows[2] | {"depth": "deep"}
    _write(tmp_path / "results.jsonl", rows)
    assert cli.main(["report", str(tmp_path), "--no-plots"]) == 0
    err = capsys.readouterr().err
    assert "skipped 3 unreadable lines" in err and ":1 (missing score)" in err and ":2 (" in err


def test_report_bad_paths_and_options(tmp_path, capsys):
    from obinfer import cli

    nothing = tmp_path / "garbage" / "results.jsonl"
    nothing.parent.mkdir()
    nothing.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff binary\n")
    assert cli.main(["report", str(nothing)]) == 2
    _one_line_error(capsys, str(nothing), "no readable results", ":1 (")
    (tmp_path / "d" / "results.jsonl").mkdir(parents=True)
    assert cli.main(["report", str(tmp_path / "d")]) == 2
    _one_line_error(capsys, str(tmp_path / "d" / "results.jsonl"), "is a directory")
    empty = tmp_path / "e" / "results.jsonl"
    empty.parent.mkdir()
    empty.write_text("\n")
    assert cli.main(["report", str(empty)]) == 2
    _one_line_error(capsys, str(empty), "no results yet")
    good = tmp_path / "g"
    _write(good / "results.jsonl", _rows())
    (good / "plots").write_text("a file")
    assert cli.main(["report", str(good)]) == 2
    _one_line_error(capsys, str(good / "plots"), "not a directory")
    assert cli.main(["report", str(good), "--no-plots", "--bootstrap", "0"]) == 2
    _one_line_error(capsys, "--bootstrap must be >= 1")
    assert cli.main(["report", str(good), "--no-plots", "--seed", "-1"]) == 2
    _one_line_error(capsys, "--seed must be >= 0")
    with pytest.raises(report.ReportError, match="resamples must be >= 1"):
        report.make_report(good, plots=False, n_boot=0)
    with pytest.raises(report.ReportError, match="seed must be >= 0"):
        report.make_report(good, plots=False, seed=-1)


def test_plots_are_replaced_atomically(tmp_path, monkeypatch):
    """A failure while a PNG is written leaves the previous PNG and no temporary file."""
    import errno

    from matplotlib.figure import Figure

    _write(tmp_path / "results.jsonl", _rows())
    plot = tmp_path / "plots" / "accuracy_agnostic_1000.png"
    plot.parent.mkdir()
    plot.write_bytes(b"old plot")

    def fail_halfway(self, fname, **kwargs):
        with open(fname, "wb") as fh:
            fh.write(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", fail_halfway)
    with pytest.raises(OSError, match="No space left on device") as err:
        report.make_report(tmp_path, n_boot=10)
    assert err.value.filename == str(plot)
    assert plot.read_bytes() == b"old plot"
    assert sorted(p.name for p in plot.parent.iterdir()) == [plot.name]


# ------------------------------------------------------------------ budgets
# (press, budget) -> per-sample scores of SAMPLES, beside the ratio rows of SCORES and the same full rows
BUDGET_SCORES = {
    ("h2o", 64): [0.0, 0.0, 0.0],
    ("h2o", 128): [1.0, 0.0, 0.2],
    ("trimkv", 64): [1.0, 0.0, 0.4],
    ("trimkv", 128): [1.0, 1.0, 0.6],
    ("snapkv", 64): [0.0, 1.0, 0.0],
}


def _budget_rows(mode: str = "agnostic", length: int = 1000, with_ratios: bool = True) -> list[dict]:
    rows = [r for r in _rows(mode, length) if with_ratios or r["press"] == "full"]
    for (press, budget), scores in BUDGET_SCORES.items():
        for (task, index, depth), s in zip(SAMPLES, scores, strict=True):
            rows.append({"task": task, "index": index, "length": length, "press": press, "ratio": 0.0,
                         "budget": budget, "mode": mode, "score": s, "depth": depth, "pred": "x",
                         "answers": ["y"]})  # fmt: skip
    random.Random(1).shuffle(rows)
    return rows


def _table(text: str, title: str) -> dict[str, list[str]]:
    """press -> cells of the table titled `title` in a report text (the header row under "press")."""
    lines = text.split(title, 1)[1].split("\n\n")[0].strip("\n").splitlines()
    head, *body = lines
    return {"press": head.split()[1:], **{line.split()[0]: line.split()[1:] for line in body}}


def test_budget_tables_beside_the_ratio_tables(tmp_path):
    rows = _budget_rows()
    text = report.accuracy_tables(rows)
    ratio = _table(text, "== mode agnostic, length 1000 ==\n")
    assert ratio["full"] == ["75.0", "(3)", "-", "-"]
    assert ratio["snapkv"] == ["-", "25.0", "(3)", "20.0", "(3)"]
    assert "h2o" not in ratio and "trimkv" not in ratio  # budget rows stay out of the ratio table
    budget = _table(text, "== mode agnostic, length 1000, by budget (tokens per head) ==\n")
    assert budget["press"] == ["full", "budget", "64", "budget", "128"]
    assert budget["full"] == ["75.0", "(3)", "-", "-"]  # the reference, in its own column
    for (press, b), (a, c, d) in BUDGET_SCORES.items():
        cell = budget[press][1:3] if b == 64 else budget[press][-2:]
        assert cell == [f"{100 * ((a + c) / 2 + d) / 2:.1f}", "(3)"], (press, b)
    assert "snapkv-obk" not in budget and budget["snapkv"][-1] == "-"
    grid = report.accuracy_grid(rows, axis="budget")[("agnostic", 1000)]
    assert grid["trimkv"][128] == (pytest.approx(100 * ((1 + 1) / 2 + 0.6) / 2), 3)
    assert set(grid) == {"full", "h2o", "trimkv", "snapkv"} and set(grid["full"]) == {0}
    # the ratio table of these rows is the one of the ratio rows alone
    alone = report.accuracy_tables(_rows())
    assert text.startswith(alone + "\n\n== mode agnostic, length 1000, by budget (tokens per head) ==")
    per_task = report.accuracy_tables(rows, per_task=True)
    assert "-- vt: mode agnostic, length 1000, by budget (tokens per head) --" in per_task
    assert "-- vt: mode agnostic, length 1000 --" in per_task
    # budgets alone (and the full cache): no ratio table
    only = report.accuracy_tables(_budget_rows(with_ratios=False))
    assert "length 1000 ==" not in only and "by budget (tokens per head) ==" in only
    with pytest.raises(report.ReportError, match="unknown axis"):
        report.group(rows, axis="tokens")


def test_budget_comparisons_with_explicit_pairs():
    rows = _budget_rows()
    plain = report.compare_variants(rows, n_boot=500, seed=3)
    assert [c["axis"] for c in plain] == ["ratio"] * 3  # no automatic budget pair among these presses
    pairs = [("trimkv", "h2o"), ("trimkv", "snapkv"), ("trimkv", "full"), ("snapkv-obk", "snapkv")]
    comps = report.compare_variants(rows, n_boot=500, seed=3, pairs=pairs)
    assert [(c["axis"], c["variant"], c["baseline"], c["ratio"]) for c in comps] == [
        ("ratio", "snapkv-obk", "snapkv", 0.25),  # automatic, and not repeated for the explicit pair
        ("ratio", "snapkv-obk", "snapkv", 0.5),
        ("ratio", "snapkv-obk", "snapkv", "all"),
        ("budget", "trimkv", "h2o", "M=64"),
        ("budget", "trimkv", "h2o", "M=128"),
        ("budget", "trimkv", "h2o", "all"),
        ("budget", "trimkv", "snapkv", "M=64"),  # snapkv ran at 64 only: no pooled row
        ("budget", "trimkv", "full", "M=64"),
        ("budget", "trimkv", "full", "M=128"),
        ("budget", "trimkv", "full", "all"),
    ]
    assert comps[:3] == plain
    by = {(c["baseline"], c["ratio"]): c for c in comps if c["axis"] == "budget"}

    def mean(press: str, budgets: list[int]) -> list[float]:
        """Per-sample mean score over `budgets` (the full cache: its one score at every budget)."""
        scores = [SCORES[("full", 0.0)] if press == "full" else BUDGET_SCORES[(press, b)] for b in budgets]
        return [sum(s[i] for s in scores) / len(budgets) for i in range(3)]

    for (base, label), c in by.items():
        budgets = [64, 128] if label == "all" else [int(label[2:])]
        assert c["budget"] == ("all" if label == "all" else budgets[0])
        diff, lo, hi = paired_bootstrap_ci(mean("trimkv", budgets), mean(base, budgets), n_boot=500, seed=3)
        assert (c["diff"], c["lo"], c["hi"], c["n"]) == pytest.approx((100 * diff, 100 * lo, 100 * hi, 3))
    assert by[("h2o", "M=64")]["diff"] == pytest.approx(100 * 1.4 / 3)
    text = report.format_comparisons(comps)
    line = next(x for x in text.splitlines() if "M=128" in x and " h2o " in x)
    assert line.split()[:5] == ["agnostic", "1000", "trimkv", "h2o", "M=128"]
    with pytest.raises(report.ReportError, match="a comparison is a .variant, baseline. pair"):
        report.compare_variants(rows, pairs=[("trimkv",)])
    with pytest.raises(report.ReportError, match="compares a press with itself"):
        report.compare_variants(rows, pairs=[("h2o", "h2o")])
    with pytest.raises(report.ReportError, match="'snapkv-obk-x-y' is not a press name"):
        report.compare_variants(rows, pairs=[("snapkv-obk-x-y", "h2o")])


def test_budget_plots(tmp_path, monkeypatch):
    rows = _budget_rows()
    _write(tmp_path / "results.jsonl", rows)
    saved = {}
    real = report.save_png

    def keep(fig, path, dpi):  # noqa: ANN001, ANN202
        saved[path.name] = fig
        return real(fig, path, dpi)

    monkeypatch.setattr(report, "save_png", keep)
    _, paths = report.make_report(tmp_path, n_boot=50)
    assert sorted(p.name for p in paths) == [
        "accuracy_agnostic_1000.png",
        "accuracy_agnostic_1000_budget.png",
        "niah_depth_full_agnostic.png",
        "niah_depth_presses_agnostic.png",
        "niah_depth_presses_agnostic_budget.png",
    ]
    for p in paths:
        img = mpimg.imread(p)
        assert img.ndim == 3 and img.std() > 0
    (ax,) = saved["accuracy_agnostic_1000_budget.png"].axes
    assert ax.get_xscale() == "log" and list(ax.get_xticks()) == [64, 128]
    assert ax.get_xlabel() == "budget (tokens per KV head)"
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["trimkv"].get_xdata()) == [64, 128]
    assert list(lines["trimkv"].get_ydata()) == pytest.approx([100 * (0.5 + 0.4) / 2, 100 * (1 + 0.6) / 2])
    assert list(lines["full (75.0)"].get_ydata()) == [75.0, 75.0]  # the full cache, a horizontal line
    titles = [a.get_title() for a in saved["niah_depth_presses_agnostic_budget.png"].axes if a.get_title()]
    assert "trimkv @ M=64" in titles and "h2o @ M=128" in titles
    assert not any("@ 0" in t for t in titles)


def test_cli_report_compare(tmp_path, capsys):
    from obinfer import cli

    _write(tmp_path / "results.jsonl", _budget_rows())
    argv = ["report", str(tmp_path), "--no-plots"]
    assert cli.main([*argv, "--compare", "trimkv=h2o,snapkv", "--compare", "h2o=full"]) == 0
    out = capsys.readouterr().out
    rows = [line.split()[:5] for line in out.splitlines() if line.startswith("agnostic") and "M=" in line]
    assert rows == [
        ["agnostic", "1000", "trimkv", "h2o", "M=64"],
        ["agnostic", "1000", "trimkv", "h2o", "M=128"],
        ["agnostic", "1000", "trimkv", "snapkv", "M=64"],
        ["agnostic", "1000", "h2o", "full", "M=64"],
        ["agnostic", "1000", "h2o", "full", "M=128"],
    ]
    assert "by budget (tokens per head)" in out
    assert cli.main([*argv, "--compare", "trimkv=tova"]) == 0  # a press these results lack: a warning
    err = capsys.readouterr().err
    assert err == "obinfer: warning: comparison trimkv=tova: no tova rows in these results\n"
    for bad in ("trimkv", "=h2o", "trimkv=", "trimkv=h2o,,tova", "a=b=c"):
        assert cli.main([*argv, "--compare", bad]) == 2
        _one_line_error(capsys, "--compare expects VARIANT=BASE1,BASE2", repr(bad))
    assert cli.main([*argv, "--compare", "h2o=h2o"]) == 2
    _one_line_error(capsys, "comparison h2o=h2o compares a press with itself")


# ------------------------------------------------------------------ archived (gzip) results
def test_an_archived_run_reports_and_resumes(tmp_path, capsys):
    """A directory holding only results.jsonl.gz (a run committed to the repository) gives the same
    report as the plain file; `--resume` writes its rows back to results.jsonl and continues after them;
    without --resume the archive is refused like a results file; a damaged archive is one line."""
    import gzip

    from obinfer import cli

    rows = _rows()
    _write(tmp_path / "plain" / "results.jsonl", rows)
    arch = tmp_path / "arch"
    arch.mkdir()
    (arch / results.ARCHIVE_FILE).write_bytes(
        gzip.compress((tmp_path / "plain" / "results.jsonl").read_bytes())
    )
    plain_text, _ = report.make_report(tmp_path / "plain", plots=False, n_boot=50)
    arch_text, _ = report.make_report(arch, plots=False, n_boot=50)
    assert arch_text == plain_text and results.results_path(arch).name == results.ARCHIVE_FILE
    with pytest.raises(results.ResultsError, match="already exists: pass --resume"):
        results.check_out_dir(arch, resume=False)
    assert not (arch / results.RESULTS_FILE).exists()
    path = results.check_out_dir(arch, resume=True)
    assert (
        path == arch / results.RESULTS_FILE
        and path.read_bytes() == (tmp_path / "plain" / "results.jsonl").read_bytes()
    )
    assert results.open_for_resume(path, resume=True).keys() == {results.result_key(r) for r in rows}
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / results.ARCHIVE_FILE).write_bytes(b"not gzip at all")
    assert cli.main(["report", str(bad), "--no-plots"]) != 0
    _one_line_error(capsys, "results.jsonl.gz", "not a readable gzip file")


# ------------------------------------------------------------------ tagged methods (@chunkN)
def test_a_chunked_run_reads_beside_the_one_shot_run(tmp_path):
    """`obinfer report GRID CHUNKED`: the chunked run's rows (``prefill_chunk`` set) are their own
    methods, ``<press>@chunkN``, not answers to the grid's result keys; they are compared with the
    one-shot press and with their own attn baseline, each pair on the samples both answered."""
    grid = _rows()
    chunked = []
    for r in _rows():
        if r["press"] == "full":
            continue
        flipped = r["task"] == "niah_single_1" and r["index"] == 1  # a different answer than the grid's
        chunked.append({**r, "prefill_chunk": 512, "score": 1.0 - r["score"] if flipped else r["score"]})
    _write(tmp_path / "grid" / "results.jsonl", grid)
    _write(tmp_path / "chunked" / "results.jsonl", chunked)
    scan = results.scan_runs([tmp_path / "grid", tmp_path / "chunked"])
    assert sorted({r["press"] for r in scan.rows}) == [
        "full",
        "snapkv",
        "snapkv-obk",
        "snapkv-obk@chunk512",
        "snapkv@chunk512",
    ]
    assert len(scan.rows) == len(grid) + len(chunked)
    comps = report.compare_variants(scan.rows, n_boot=200, seed=1)
    pairs = {(c["variant"], c["baseline"]) for c in comps}
    assert pairs == {
        ("snapkv-obk", "snapkv"),
        ("snapkv@chunk512", "snapkv"),
        ("snapkv-obk@chunk512", "snapkv@chunk512"),
        ("snapkv-obk@chunk512", "snapkv-obk"),
    }
    by = {(r["press"], r["ratio"], r["task"], r["index"]): r["score"] for r in scan.rows}
    for c in comps:
        if c["ratio"] == "all":
            continue
        a = [by[(c["variant"], c["ratio"], *SAMPLES[i][:2])] for i in range(3)]
        b = [by[(c["baseline"], c["ratio"], *SAMPLES[i][:2])] for i in range(3)]
        assert c["diff"] == pytest.approx(100 * (sum(a) - sum(b)) / 3) and c["n"] == 3  # paired per sample
    text, _ = report.make_report([tmp_path / "grid", tmp_path / "chunked"], plots=False, n_boot=50)
    names = [line.split()[0] for line in text.splitlines() if line.split() and "snapkv" in line.split()[0]]
    assert names[:4] == ["snapkv", "snapkv@chunk512", "snapkv-obk", "snapkv-obk@chunk512"]
    alone, _ = report.make_report(tmp_path / "chunked", plots=False, n_boot=50)
    assert "snapkv@chunk512" in alone and "snapkv-obk@chunk512" in alone


def test_method_tags_and_bad_chunk_rows():
    row = {"task": "vt", "length": 10, "index": 0, "press": "snapkv-obk", "ratio": 0.5, "mode": "aware",
           "score": 1.0}  # fmt: skip
    assert results.method_name(row) == "snapkv-obk"
    assert results.method_name({**row, "prefill_chunk": 64}) == "snapkv-obk@chunk64"
    assert results.split_method("snapkv-obk@chunk64") == ("snapkv-obk", "@chunk64")
    assert results.press_name("snapkv-obk@chunk64").family == "snapkv"
    assert results.row_problem(row) is None and results.row_problem({**row, "prefill_chunk": 8}) is None
    for bad in (0, -1, 1.5, "8", True):
        assert results.row_problem({**row, "prefill_chunk": bad}) == "prefill_chunk must be an integer >= 1"
    assert results.row_problem({**row, "press": "snapkv@chunk8"}) == "'snapkv@chunk8' is not a press name"
