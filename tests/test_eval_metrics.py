"""RULER scoring (string_match_all / string_match_part), post-processing and confidence intervals."""

import math

import numpy as np
import pytest

from obinfer.eval import metrics as m
from obinfer.eval.tasks import TASKS


def test_postprocess_strips_and_removes_control_characters():
    assert m.postprocess("  \n 1234567\x00 is\tthe\x1f answer \n") == "1234567 isthe answer"
    assert m.postprocess("\x07\x1b") == ""
    assert m.postprocess("caf\u00e9 \x7f") == "caf\u00e9 \x7f"  # DEL and non-ASCII are not [\x00-\x1f]


def test_string_match_all_is_the_mean_fraction_of_references_found():
    preds = ["The numbers are 111 and 222.", "only 333", "nothing"]
    refs = [["111", "222"], ["333", "444", "555"], ["666"]]
    # (2/2 + 1/3 + 0/1) / 3 * 100 = 44.444... -> 44.44
    assert m.string_match_all(preds, refs) == 44.44
    assert m.string_match_all(["1/3"], [["1", "3", "x"]]) == 66.67  # rounding to 2 dp


def test_string_match_part_needs_any_reference():
    preds = ["The numbers are 111 and 222.", "only 333", "nothing"]
    refs = [["111", "222"], ["333", "444", "555"], ["666"]]
    assert m.string_match_part(preds, refs) == 66.67
    assert m.string_match_part(preds, refs) >= m.string_match_all(preds, refs)


def test_matching_is_case_insensitive_substring():
    assert m.string_match_all(["ANSWER: Tenuous-Thirst"], [["tenuous-thirst"]]) == 100.0
    assert m.string_match_all(["12345"], [["1234567"]]) == 0.0  # reference must be inside the prediction
    assert m.string_match_all(["x1234567y"], [["1234567"]]) == 100.0


def test_control_characters_are_removed_before_matching_in_score_row():
    # a control character inside the answer breaks the raw match but not the post-processed one
    assert m.string_match_all(["12\x0034567"], [["1234567"]]) == 0.0
    assert m.score_row("12\x0034567", ["1234567"], "niah_single_1") == 1.0
    assert m.score_task(["12\x0034567", "no"], [["1234567"], ["7"]], "niah_single_1") == 50.0


def test_score_row_all_vs_part_and_unrounded():
    assert m.score_row("a b", ["a", "b", "c"], "vt") == pytest.approx(2 / 3)
    assert m.score_row("a b", ["a", "b", "c"], "qa_1") == 1.0
    assert m.score_row("zzz", ["a", "b"], "qa_2") == 0.0


def test_metric_table_covers_every_generated_task_and_qa():
    assert set(TASKS) | {"qa_1", "qa_2"} == set(m.METRIC_FOR_TASK)
    assert all(m.METRIC_FOR_TASK[t] is m.string_match_all for t in TASKS)
    with pytest.raises(ValueError, match="valid tasks"):
        m.score_row("x", ["x"], "niah_single_9")


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError):
        m.string_match_all([], [])
    with pytest.raises(ValueError):
        m.string_match_all(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError):
        m.string_match_part(["a"], ["a"])  # a bare string instead of a list of references
    with pytest.raises(ValueError):
        m.paired_bootstrap_ci([1.0, 0.0], [1.0])


def test_ruler_average_is_plain_mean():
    assert m.ruler_average({"a": 100.0, "b": 50.0, "c": 0.0}) == 50.0


def _paired_example(n: int = 400, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    u = rng.random(n)
    a = (u < 0.8).astype(float)  # press A solves 80 % of samples
    b = (u < 0.6).astype(float)  # press B solves a subset of them: 60 %, true paired difference 0.2
    return a, b


def test_paired_bootstrap_contains_true_difference_and_is_deterministic():
    a, b = _paired_example()
    diff, lo, hi = m.paired_bootstrap_ci(list(a), list(b), n_boot=2000, seed=0)
    assert diff == pytest.approx(a.mean() - b.mean())
    assert lo <= 0.2 <= hi
    assert lo > 0  # A beats B
    assert m.paired_bootstrap_ci(list(a), list(b), n_boot=2000, seed=0) == (diff, lo, hi)
    assert m.paired_bootstrap_ci(list(a), list(b), n_boot=2000, seed=1) != (diff, lo, hi)
    # percentile interval width ~ normal-theory width 2 z sd / sqrt(n)
    d = a - b
    normal = 2 * 1.959964 * d.std(ddof=1) / math.sqrt(len(d))
    assert hi - lo == pytest.approx(normal, rel=0.15)


def test_paired_bootstrap_of_identical_presses_contains_zero():
    a, _ = _paired_example()
    rng = np.random.default_rng(3)
    b = a.copy()
    ones, zeros = np.flatnonzero(a == 1), np.flatnonzero(a == 0)
    b[rng.choice(ones, 20, replace=False)] = 0  # symmetric noise: 20 wins and 20 losses, true diff 0
    b[rng.choice(zeros, 20, replace=False)] = 1
    diff, lo, hi = m.paired_bootstrap_ci(list(a), list(b))
    assert lo <= diff <= hi
    assert lo < 0 < hi


def test_mean_ci_wilson_for_binary_and_bootstrap_otherwise():
    mean, lo, hi = m.mean_ci([1.0] * 8 + [0.0] * 2)
    assert mean == 0.8
    # Wilson 95 % for 8/10, from the closed form
    z = 1.959963984540054
    c = (0.8 + z * z / 20) / (1 + z * z / 10)
    h = z / (1 + z * z / 10) * math.sqrt(0.8 * 0.2 / 10 + z * z / 400)
    assert (lo, hi) == pytest.approx((c - h, c + h))
    assert m.mean_ci([1.0] * 5)[2] == 1.0 and m.mean_ci([1.0] * 5)[1] < 1.0
    vals = [0.25, 0.5, 0.75, 1.0, 0.0, 0.5] * 20
    mean, lo, hi = m.mean_ci(vals, seed=0)
    assert lo < mean < hi
    assert m.mean_ci(vals, seed=0) == (mean, lo, hi)
