"""The RULER-style evaluation (docs/ruler.md): generate samples, answer them under every press, report.

One module a concern, each importing only the ones above it in this list:

* ``tasks.py``, ``haystack.py``: the offline RULER task generator and its haystacks.
* ``metrics.py``: RULER's string-match scores and the paired bootstrap.
* ``protocol.py``: a sample as token ids (``obinfer.prompts.build_prompt`` with the evaluation's
  settings), RULER's length measure and the length checks.
* ``results.py``: the results directory: ``results.jsonl`` (appending a row durably, scanning for
  ``--resume``, reading for the report), ``run.json`` (the settings checked on ``--resume``).
* ``samples.py``: the sample cache in ``<out>/data``.
* ``distributed.py``: the evaluation under torchrun: which rank runs which sample, per-rank results
  shards, resume by row identity on any world size, rank 0's merge.
* ``runner.py``: the settings (``EvalConfig``) and the loop: one shared prefill per sample, a fork per
  press, greedy answers appended to the results.
* ``report.py``: tables, OBCache-vs-baseline comparisons and plots of a results file.

Every error a user can fix is an :class:`EvalError` (an ``ObinferError``).
"""

from __future__ import annotations

from obinfer.errors import ObinferError


class EvalError(ObinferError, ValueError):
    """A bad evaluation setting, a results directory that cannot be used, or a sample that does not fit."""
