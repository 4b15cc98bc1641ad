"""`obinfer inspect` as a library: run presses on one prompt (run.py) and draw what they keep (plot.py).

>>> from obinfer.inspect import run_presses, plot_inspection
"""

from obinfer.inspect.plot import plot_inspection
from obinfer.inspect.run import (
    KEPT,
    PROTECTED,
    InspectError,
    Inspection,
    PressView,
    agreement,
    find_text,
    parse_positions,
    parse_span,
    run_presses,
    to_json,
)

__all__ = ["KEPT", "PROTECTED", "Inspection", "InspectError", "PressView", "agreement", "find_text",
           "parse_positions", "parse_span", "plot_inspection", "run_presses", "to_json"]  # fmt: skip
