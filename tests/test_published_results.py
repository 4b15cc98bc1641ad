"""Every table that docs/results.md publishes from a committed run is what `obinfer report` computes now
from that run's archived rows (issue 14: the figures are recomputed from the repository alone).

A published block is marked in the Markdown source::

    <!-- report: obinfer report results/NAME/results.jsonl.gz --paper -->
    ...the report's own text, verbatim...
    <!-- end report -->

and this test runs that report (without plots) and finds each block's text in its output. A command may
name several results files (a grid and its ablation on the same samples, read as one run), and mark
several blocks (pieces of one report). A block of the report's plain-text lines (not Markdown tables)
sits in a code fence inside the markers; the fence is not part of the text compared.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from obinfer.eval.report import make_report

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "results.md"
BLOCK = re.compile(
    r"<!-- report: (?P<cmd>obinfer report [^\n]*?) -->\n(?P<body>.*?)\n<!-- end report -->", re.S
)


def _blocks() -> list[tuple[str, str]]:
    return [(m["cmd"], _unfenced(m["body"])) for m in BLOCK.finditer(DOC.read_text(encoding="utf-8"))]


def _unfenced(body: str) -> str:
    """A block's text without the code fence around it, if it has one."""
    lines = body.strip().splitlines()
    if len(lines) >= 2 and lines[0].startswith("```") and lines[-1] == "```":
        return "\n".join(lines[1:-1])
    return body


def _report(cmd: str) -> str:
    args = shlex.split(cmd)[2:]
    paths = [ROOT / a for a in args if not a.startswith("-") and a.endswith((".gz", ".jsonl"))]
    informative = float(args[args.index("--informative") + 1]) if "--informative" in args else 80.0
    text, _ = make_report(paths, per_task="--per-task" in args, plots=False, paper="--paper" in args,
                          informative=informative, strict=True)  # fmt: skip
    return text


def test_docs_publish_report_blocks():
    blocks = _blocks()
    assert blocks, "docs/results.md marks no published report block"
    for cmd, body in blocks:
        assert body.strip(), f"empty published block for {cmd!r}"
        files = [a for a in shlex.split(cmd)[2:] if a.endswith((".gz", ".jsonl"))]
        assert files, f"{cmd!r} names no results file"
        for f in files:
            assert (ROOT / f).is_file(), f"{cmd!r}: the archived results {f} are not committed"


@pytest.mark.parametrize("cmd", sorted({cmd for cmd, _ in _blocks()}))
def test_published_blocks_are_recomputed_exactly(cmd):
    text = _report(cmd)
    for c, body in _blocks():
        if c == cmd:
            assert body.strip() in text, f"docs/results.md block of {cmd!r} differs from the report's output"
