"""Every table that docs/results.md publishes from a committed run is what `obinfer report` computes now
from that run's archived rows (issue 14: the figures are recomputed from the repository alone).

A published block is marked in the Markdown source::

    <!-- report: obinfer report results/NAME/results.jsonl.gz --paper -->
    ...the report's own text, verbatim...
    <!-- end report -->

and this test runs that report (without plots) and finds each block's text in its output.
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
    return [(m["cmd"], m["body"]) for m in BLOCK.finditer(DOC.read_text(encoding="utf-8"))]


def _report(cmd: str) -> str:
    args = shlex.split(cmd)[2:]
    path = ROOT / args[0]
    informative = float(args[args.index("--informative") + 1]) if "--informative" in args else 80.0
    text, _ = make_report(path, per_task="--per-task" in args, plots=False, paper="--paper" in args,
                          informative=informative, strict=True)  # fmt: skip
    return text


def test_docs_publish_report_blocks():
    blocks = _blocks()
    assert blocks, "docs/results.md marks no published report block"
    for cmd, body in blocks:
        assert body.strip(), f"empty published block for {cmd!r}"
        assert (ROOT / shlex.split(cmd)[2]).is_file(), f"{cmd!r}: the archived results are not committed"


@pytest.mark.parametrize("cmd", sorted({cmd for cmd, _ in _blocks()}))
def test_published_blocks_are_recomputed_exactly(cmd):
    text = _report(cmd)
    for c, body in _blocks():
        if c == cmd:
            assert body.strip() in text, f"docs/results.md block of {cmd!r} differs from the report's output"
