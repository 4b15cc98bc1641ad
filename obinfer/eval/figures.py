"""Figure helpers shared by the report modules: a matplotlib Figure on an Agg canvas (no pyplot, no
global backend state) and an atomic PNG write."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from obinfer.errors import require
from obinfer.storage import atomic_path

PLOTS_WHAT = "for the plots (use --plots-dir)"  # completes "PATH is a file, not a directory ..."
DEPTH_BINS = 10  # needle depth bins of 10 percentage points


def depth_bin(row: dict[str, Any]) -> int:
    """The needle-depth bin (0 .. DEPTH_BINS - 1) of a single-needle row."""
    return min(int(float(row["depth"][0]) // (100 / DEPTH_BINS)), DEPTH_BINS - 1)


def new_figure(w: float, h: float, layout: str | None = None):  # noqa: ANN202
    """A matplotlib Figure on an Agg canvas (no pyplot, no global backend state)."""
    require("matplotlib", what="plots")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), layout=layout)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Any, path: Path, dpi: int) -> Path:
    """Write the figure as PNG atomically (a kill never leaves a truncated PNG)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path
