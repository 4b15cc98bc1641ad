"""Which original positions a press keeps, per layer and KV head: the data behind `obinfer inspect`.

One prefill of the prompt runs *without* compression (`obinfer/cache/fanout.py:Fanout`); each press
then compresses a fork of it with the recorded queries, keeping the scores it ranked the slots by (the
scores shown) and leaving the kept sets shown. Prefill compression never changes the prompt's own
forward pass (docs/scores.md section 4), so one prefill serves every press compared and the kept sets
are exactly those of a real compressed run.

    >>> views = run_presses(model, ids, [make_press("snapkv", compression_ratio=0.75)])
    >>> views[0].kept[3][1]          # layer 3, KV head 1: sorted original positions kept
    [0, 1, 2, 24, 25, 26, 27, 28, 34]
    >>> tuple(views[0].scores.shape)  # (L, Hkv, n) float32, +inf for protected positions
    (30, 3, 37)

Shapes: L layers, Hkv KV heads, n prompt positions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from obinfer.cache.fanout import Fanout, scores_by_position
from obinfer.cache.presses import Press
from obinfer.errors import UserError

SINKS = 4  # the first tokens marked as attention sinks (StreamingLLM's default)
KEPT, EVICTED, PROTECTED = 1, 0, 2  # raster values of one view
BOTH, ONLY_A, ONLY_B, NEITHER = 3, 1, 2, 0  # raster values of a disagreement panel


class InspectError(UserError, ValueError):
    """Bad input to inspect: an unparsable position list or span, text not found, a missing press."""


@dataclass
class PressView:
    """What one press did to one prompt.

    Attributes:
        name: the press name, e.g. "adakv-snapkv-obk".
        kept: kept[layer][head] -> sorted original positions kept.
        scores: (L, Hkv, n) float32 score of each position before compression; +inf marks positions the
            policy always keeps (its window, the last token, ...), -inf invalid ones.
        window: [start, end) of the observation queries, or None when every query observes (H2O) or no
            query does (knorm, streamingllm, random).
    """

    name: str
    kept: list[list[list[int]]]
    scores: Tensor
    window: tuple[int, int] | None = None

    def raster(self, head: int) -> Tensor:
        """(L, n) int8: EVICTED, KEPT, or PROTECTED (kept because the policy always keeps it)."""
        L, _, n = self.scores.shape
        out = torch.zeros(L, n, dtype=torch.int8)
        for layer in range(L):
            out[layer, self.kept[layer][head]] = KEPT
        return out.masked_fill((self.scores[:, head] == math.inf) & (out == KEPT), PROTECTED)

    def kept_mask(self) -> Tensor:
        """(L, Hkv, n) bool: position kept."""
        L, H, n = self.scores.shape
        return torch.stack([(self.raster(h) != EVICTED) for h in range(H)], dim=1)


@dataclass
class Inspection:
    """One prompt, its tokens, and the views of the presses run on it."""

    tokens: list[str]
    views: list[PressView]
    highlight: list[int] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.tokens)


# ----------------------------------------------------------------------------- running presses
def observation_window(press: Press, n: int) -> tuple[int, int] | None:
    """[start, end) of the queries whose attention scores the keys (`Press.observed_span`), or None when
    no query does, or when the policy observes every query of any prompt (nothing to mark; see
    PressView.window). A window that covers a short prompt is still drawn."""
    span, huge = press.observed_span(n), 1 << 40
    return None if span is None or press.observed_span(huge) == (0, huge) else span


@torch.inference_mode()
def run_presses(
    model: Any, ids: Sequence[int], presses: Sequence[Press], chunk: int | None = None
) -> list[PressView]:
    """One uncompressed prefill of `ids` (`obinfer/cache/fanout.py:Fanout`); each press compresses a
    fork of it, and the scores it ranked the slots by are kept for the picture.

    Args:
        model: a `Transformer`.
        ids: the prompt's token ids (one row).
        presses: the presses to compare.
        chunk: block-wise prefill (`PressRun.prefill`): each press prefills on its own, in blocks of
            `chunk` tokens; the scores shown are those of the last block's compression.
    Returns:
        One PressView per press, in order.
    """
    if not presses:
        raise InspectError("inspect needs at least one press")
    if chunk is not None:
        views = []
        for press in presses:
            run = press.start(keep_scores=True, model=model)
            cache = model.new_cache(1)
            run.prefill(model, torch.tensor([list(ids)], device=model.device), cache, chunk=chunk)
            scores = scores_by_position(
                run.scores or {}, len(cache.layers), cache.layers[0].n_kv_heads, len(ids)
            )
            kept = [layer[0] for layer in cache.kept_positions()]
            views.append(PressView(press.name, kept, scores, observation_window(press, len(ids))))
        return views
    fan = Fanout(model, ids, presses)
    views = []
    for press in presses:
        cache, scores = fan.compress(press, with_scores=True)
        kept = [layer[0] for layer in cache.kept_positions()]
        views.append(PressView(press.name, kept, scores, observation_window(press, fan.n)))
    return views


def agreement(a: PressView, b: PressView) -> float:
    """Jaccard overlap of two views' kept (layer, head, position) sets, in [0, 1]."""
    ma, mb = a.kept_mask(), b.kept_mask()
    union = int((ma | mb).sum())
    return int((ma & mb).sum()) / union if union else 1.0


# ----------------------------------------------------------------------------- positions
def parse_positions(spec: str, n: int) -> list[int]:
    """Positions from "120,130-140" (ranges inclusive), each in [0, n). Returns them sorted, unique."""
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise InspectError(f"--highlight: cannot read {part!r} (expected N or N-M)") from None
        if a > b or a < 0 or b >= n:
            raise InspectError(
                f"--highlight: {part!r} is not a range inside the prompt's positions 0-{n - 1}"
            )
        out.update(range(a, b + 1))
    return sorted(out)


def parse_span(spec: str, n: int) -> tuple[int, int]:
    """[start, end) from "A:B" (Python slice style, either side may be empty)."""
    lo, sep, hi = spec.partition(":")
    try:
        a = int(lo) if lo.strip() else 0
        b = int(hi) if hi.strip() else n
    except ValueError:
        raise InspectError(f"--span: cannot read {spec!r} (expected START:END)") from None
    if not sep or not 0 <= a < b <= n:
        raise InspectError(f"--span {spec!r} must be START:END with 0 <= START < END <= {n}")
    return a, b


def find_text(pieces: Sequence[str], text: str) -> list[int]:
    """Positions of the tokens covering every occurrence of `text` in the concatenated pieces."""
    if not text:
        raise InspectError("--highlight-text is empty")
    joined, starts, c = "".join(pieces), [], 0
    for p in pieces:
        starts.append(c)
        c += len(p)
    found: set[int] = set()
    at = joined.find(text)
    while at >= 0:
        end = at + len(text)
        found.update(i for i, s in enumerate(starts) if s < end and s + len(pieces[i]) > at)
        at = joined.find(text, at + 1)
    if not found:
        raise InspectError(f"--highlight-text {text!r} does not occur in the prompt")
    return sorted(found)


# ----------------------------------------------------------------------------- JSON
def _finite(x: float) -> float | None:
    return float(f"{x:.6g}") if math.isfinite(x) else None  # 6 significant digits


def to_json(insp: Inspection, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """A JSON-ready dict: tokens, highlight, and per press kept[layer][head], scores[layer][head][pos]
    (null for non-finite scores) and protected[layer][head] (positions scored +inf)."""
    presses = []
    for v in insp.views:
        s = v.scores
        presses.append(
            {
                "name": v.name,
                "observation_window": list(v.window) if v.window else None,
                "kept": v.kept,
                "protected": [
                    [torch.nonzero(s[i, h] == math.inf)[:, 0].tolist() for h in range(s.shape[1])]
                    for i in range(s.shape[0])
                ],
                "scores": [[[_finite(x) for x in row.tolist()] for row in layer] for layer in s],
            }
        )
    out = dict(meta or {})
    out.update(n_positions=insp.n, tokens=insp.tokens, highlight=insp.highlight, presses=presses)
    if len(insp.views) == 2:
        out["agreement"] = agreement(*insp.views)
    return out
