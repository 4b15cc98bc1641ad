"""The picture of an :class:`~obinfer.inspect.run.Inspection`: layer x position rasters per KV head (matplotlib)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from obinfer.errors import require
from obinfer.inspect.run import (
    EVICTED,
    ONLY_A,
    ONLY_B,
    SINKS,
    Inspection,
    PressView,
)
from obinfer.storage import atomic_path

TOKEN_LABELS_MAX = 80  # label the x axis with tokens when the drawn span has at most this many positions
DPI = 150

_VIEW_COLORS = ("#f4f4f4", "#1f3b73", "#8fa8d6")  # evicted, kept, protected
_DIFF_COLORS = ("#f4f4f4", "#d62728", "#1f77b4", "#b8b8b8")  # neither, only A, only B, both
_MARKS = (("sinks", "#2ca02c"), ("observation window", "#9467bd"), ("highlight", "#e6ab02"))


def _token_label(piece: str) -> str:
    return piece.replace("\n", "\u21b5").replace("\t", "\u21e5").replace(" ", "\u00b7") or "\u2205"


def _marks(insp: Inspection, view: PressView | None) -> list[tuple[str, str, list[int]]]:
    sinks = list(range(min(SINKS, insp.n)))
    window = list(range(*view.window)) if view is not None and view.window else []
    return [
        (name, color, pos) for (name, color), pos in zip(_MARKS, (sinks, window, insp.highlight), strict=True)
    ]


def _runs(positions: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted positions -> inclusive runs [(a, b), ...]."""
    runs: list[tuple[int, int]] = []
    for p in sorted(positions):
        if runs and p == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], p)
        else:
            runs.append((p, p))
    return runs


def _draw_marks(ax: Any, marks: list[tuple[str, str, list[int]]], span: tuple[int, int]) -> None:
    """Coloured strips just above the panel (one level per kind, 3 points apart) and highlight edges."""
    from matplotlib.transforms import ScaledTranslation

    a, b = span
    for level, (name, color, positions) in enumerate(marks):
        up = ScaledTranslation(0, (2.5 + 3.5 * level) / 72, ax.figure.dpi_scale_trans)
        for lo, hi in _runs([p for p in positions if a <= p < b]):
            ax.plot(
                [lo - 0.5, hi + 0.5],
                [1, 1],
                transform=ax.get_xaxis_transform() + up,
                color=color,
                lw=2.8,
                solid_capstyle="butt",
                clip_on=False,
            )
            if name == "highlight":
                for x in (lo - 0.5, hi + 0.5):
                    ax.axvline(x, color=color, lw=0.6, alpha=0.7)


def _style_axis(ax: Any, insp: Inspection, span: tuple[int, int], n_layers: int, bottom: bool) -> None:
    a, b = span
    ax.set_xlim(a - 0.5, b - 0.5)
    ax.set_yticks(range(0, n_layers, max(1, n_layers // 6)))
    ax.tick_params(labelsize=6)
    if b - a <= TOKEN_LABELS_MAX:
        ax.set_xticks(range(a, b))
        ax.set_xticklabels(
            [_token_label(t) for t in insp.tokens[a:b]] if bottom else [],
            rotation=90,
            fontsize=6 if b - a <= 50 else 5,
        )
    elif bottom:
        ax.set_xlabel("position", fontsize=7)


def plot_inspection(
    insp: Inspection,
    out: str | Path,
    span: tuple[int, int] | None = None,
    title: str | None = None,
    dpi: int = DPI,
) -> Path:
    """Write a PNG: rows = KV heads, columns = presses (+ their disagreement when there are two).

    Each panel is a layer x position raster of one KV head: dark = kept, light blue = kept because the
    policy always keeps it (window, last token), pale = evicted. Strips above each panel mark the sink
    tokens, the observation window and the highlighted positions. Panel titles give the share of the
    drawn (layer, position) cells kept (or, for the disagreement panel, kept by exactly one press).
    """
    require("matplotlib", what="inspect --out")
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    views, span = insp.views, span or (0, insp.n)
    L, H, _ = views[0].scores.shape
    diff = len(views) == 2
    cols, width = len(views) + diff, span[1] - span[0]
    col_w = min(7.0, max(3.5, 0.11 * width)) if width <= TOKEN_LABELS_MAX else 6.0
    row_h = 0.7 + 0.05 * L + (0.5 if width <= TOKEN_LABELS_MAX else 0.0)
    fig = Figure(figsize=(col_w * cols + 0.6, row_h * H + 1.1), dpi=dpi, layout="constrained")
    axes = fig.subplots(H, cols, squeeze=False, sharex=True, sharey=True)
    extent = (span[0] - 0.5, span[1] - 0.5, L - 0.5, -0.5)
    for h in range(H):
        rasters = [v.raster(h)[:, span[0] : span[1]] for v in views]
        for c, (v, r) in enumerate(zip(views, rasters, strict=True)):
            _panel(axes[h][c], r, ListedColormap(_VIEW_COLORS), 2, extent, v.name, h, r != EVICTED)
            _draw_marks(axes[h][c], _marks(insp, v), span)
        if diff:
            ka, kb = (r != EVICTED for r in rasters)
            d = ka.to(torch.int8) * ONLY_A + kb.to(torch.int8) * ONLY_B
            label = f"{views[0].name} vs {views[1].name}"
            _panel(axes[h][-1], d, ListedColormap(_DIFF_COLORS), 3, extent, label, h, ka != kb, "differ")
            _draw_marks(axes[h][-1], _marks(insp, None), span)
        for c in range(cols):
            _style_axis(axes[h][c], insp, span, L, bottom=h == H - 1)
        axes[h][0].set_ylabel("layer", fontsize=7)
    handles = [
        Patch(color=_VIEW_COLORS[i], label=t) for i, t in ((1, "kept"), (2, "always kept"), (0, "evicted"))
    ]
    handles += [Patch(color=c, label=n) for n, c in _MARKS]
    if diff:
        handles += [Patch(color=_DIFF_COLORS[i], label=f"only {views[i - 1].name}") for i in (1, 2)]
    fig.legend(
        handles=handles, loc="outside lower center", ncols=min(len(handles), 8), fontsize=7, frameon=False
    )
    fig.suptitle(title or f"kept positions per layer and KV head ({insp.n} tokens)", fontsize=9)
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return out


def _panel(
    ax: Any,
    r: Tensor,
    cmap: Any,
    vmax: int,
    extent: Any,
    name: str,
    h: int,
    count: Tensor,
    what: str = "kept",
) -> None:
    ax.imshow(r.numpy(), cmap=cmap, vmin=0, vmax=vmax, aspect="auto", interpolation="nearest", extent=extent)
    share = int(count.sum()) / max(1, count.numel())
    ax.set_title(f"{name}  |  KV head {h}  |  {what} {share:.0%}", fontsize=7, pad=13, loc="left")
