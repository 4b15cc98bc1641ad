"""RULER scoring (docs/ruler.md §1.5) and confidence intervals for comparing presses.

``string_match_all`` (niah, vt, cwe, fwe): per sample the fraction of references found in the
prediction (case-insensitive substring); ``string_match_part`` (qa): 1 if any reference is found.
Both average over samples, scale by 100 and round to 2 decimals, exactly as RULER and kvpress do.
Predictions are post-processed the kvpress way: strip, remove control characters, strip.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from statistics import NormalDist

import numpy as np

from obinfer.errors import ObinferError

_CONTROL = re.compile(r"[\x00-\x1f]")

Metric = Callable[[Sequence[str], Sequence[Sequence[str]]], float]


class MetricsError(ObinferError, ValueError):
    """Bad scoring input: an unknown task, mismatched or empty lists, a confidence level out of (0, 1)."""


def postprocess(pred: str) -> str:
    """Strip, remove control characters ``[\\x00-\\x1f]`` (kvpress; RULER replaces them by ``\\n``), strip."""
    return _CONTROL.sub("", pred.strip()).strip()


def _check(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> None:
    if len(preds) != len(refs) or not preds:
        raise MetricsError(f"need as many predictions as reference lists, got {len(preds)} and {len(refs)}")
    if any(isinstance(r, str) or len(r) == 0 for r in refs):
        raise MetricsError("each reference entry must be a non-empty list of strings")


def string_match_all(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Mean over samples of the fraction of references contained in the prediction, x100, 2 dp."""
    _check(preds, refs)
    score = sum(
        sum(1.0 if r.lower() in p.lower() else 0.0 for r in ref) / len(ref)
        for p, ref in zip(preds, refs, strict=True)
    )
    return round(score / len(preds) * 100, 2)


def string_match_part(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Mean over samples of 1 if any reference is contained in the prediction, x100, 2 dp."""
    _check(preds, refs)
    score = sum(
        max(1.0 if r.lower() in p.lower() else 0.0 for r in ref) for p, ref in zip(preds, refs, strict=True)
    )
    return round(score / len(preds) * 100, 2)


METRIC_FOR_TASK: dict[str, Metric] = {
    **{
        t: string_match_all
        for t in (
            "niah_single_1",
            "niah_single_2",
            "niah_single_3",
            "niah_multikey_1",
            "niah_multikey_2",
            "niah_multikey_3",
            "niah_multivalue",
            "niah_multiquery",
            "vt",
            "cwe",
            "fwe",
        )
    },
    "qa_1": string_match_part,
    "qa_2": string_match_part,
}


def _metric(task: str) -> Metric:
    if task not in METRIC_FOR_TASK:
        raise MetricsError(f"unknown RULER task {task!r}; valid tasks: {', '.join(METRIC_FOR_TASK)}")
    return METRIC_FOR_TASK[task]


def score_row(pred: str, answers: Sequence[str], task: str) -> float:
    """Score of one sample in [0, 1] (unrounded): the task's metric on the post-processed prediction."""
    _check([pred], [answers])
    p = postprocess(pred).lower()
    hits = [r.lower() in p for r in answers]
    return sum(hits) / len(hits) if _metric(task) is string_match_all else float(any(hits))


def score_task(preds: Sequence[str], refs: Sequence[Sequence[str]], task: str) -> float:
    """RULER task score (0-100, 2 dp): post-process the predictions, then apply the task's metric."""
    return _metric(task)([postprocess(p) for p in preds], refs)


def ruler_average(task_scores: dict[str, float]) -> float:
    """Headline RULER number: the plain mean of the per-task scores (11 or 13 tasks), 2 dp."""
    if not task_scores:
        raise MetricsError("no task scores to average")
    return round(sum(task_scores.values()) / len(task_scores), 2)


# ------------------------------------------------------------------------------------------ intervals
def _z(level: float) -> float:
    if not 0 < level < 1:
        raise MetricsError(f"confidence level must be in (0, 1), got {level}")
    return NormalDist().inv_cdf(0.5 + level / 2)


def wilson_ci(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``successes / n``."""
    if n <= 0 or not 0 <= successes <= n:
        raise MetricsError(f"need 0 <= successes <= n and n > 0, got {successes}/{n}")
    z, p = _z(level), successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def _bootstrap_means(x: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    idx = np.random.default_rng(seed).integers(0, len(x), size=(n_boot, len(x)))
    return x[idx].mean(axis=1)


def mean_ci(
    values: Sequence[float], level: float = 0.95, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean and confidence interval of per-sample scores: Wilson if all are 0/1, else percentile bootstrap.

    Returns:
        ``(mean, lo, hi)``.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise MetricsError("mean_ci needs a non-empty 1-D list of values")
    _z(level)
    if np.all((x == 0) | (x == 1)):
        lo, hi = wilson_ci(int(x.sum()), x.size, level)
        return float(x.mean()), lo, hi
    means = _bootstrap_means(x, n_boot, seed)
    q = (1 - level) / 2
    return float(x.mean()), float(np.quantile(means, q)), float(np.quantile(means, 1 - q))


def paired_bootstrap_ci(
    a: Sequence[float], b: Sequence[float], n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """Paired percentile bootstrap of ``mean(a) - mean(b)`` over the same samples (press A vs press B).

    Samples are resampled jointly, so the per-sample pairing is kept. If ``lo > 0``, A beats B at
    this level; if the interval contains 0, the data cannot tell them apart.

    Returns:
        ``(mean_diff, lo, hi)``.
    """
    xa, xb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if xa.shape != xb.shape or xa.ndim != 1 or xa.size == 0:
        raise MetricsError(
            f"paired_bootstrap_ci needs two non-empty lists of equal length, got {xa.shape}, {xb.shape}"
        )
    if n_boot < 1:
        raise MetricsError(f"n_boot must be >= 1, got {n_boot}")
    _z(level)
    d = xa - xb
    means = _bootstrap_means(d, n_boot, seed)
    q = (1 - level) / 2
    return float(d.mean()), float(np.quantile(means, q)), float(np.quantile(means, 1 - q))


def stratified_bootstrap_ci(
    strata: Sequence[Sequence[float]], n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """Mean over strata of each stratum's mean, with a percentile bootstrap CI that resamples within
    each stratum (RULER's headline is the mean over tasks of each task's mean: a stratum is a task).

    Pass per-sample differences of two presses on the same samples for a paired CI of their accuracy
    difference. With one stratum this is ``paired_bootstrap_ci`` of the differences.

    Returns:
        ``(mean, lo, hi)``.
    """
    xs = [np.asarray(s, dtype=np.float64) for s in strata]
    if not xs or any(x.ndim != 1 or x.size == 0 for x in xs):
        raise MetricsError("stratified_bootstrap_ci needs one or more non-empty 1-D strata")
    if n_boot < 1:
        raise MetricsError(f"n_boot must be >= 1, got {n_boot}")
    _z(level)
    rng = np.random.default_rng(seed)
    boot = np.zeros(n_boot)
    for x in xs:
        boot += x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    boot /= len(xs)
    q = (1 - level) / 2
    est = float(np.mean([x.mean() for x in xs]))
    return est, float(np.quantile(boot, q)), float(np.quantile(boot, 1 - q))
