"""Every code reference in docs/*.md and README.md resolves, and the committed pictures exist and are small.

A reference is a repository path to a Python file, optionally followed by `:name` or `:Class.method`,
e.g. `obinfer/models/llama.py:apply_rope` or `obinfer/cache/kv_cache.py:LayerCache.attend`. Names are
resolved by parsing the file with `ast` (functions, classes, methods, module-level assignments), so
nothing is imported.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md")) + [p for p in (ROOT / "README.md",) if p.is_file()]
REF = re.compile(
    r"\b((?:obinfer|examples|tests|benchmarks)/[\w/.-]*?\.py)(?::([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*))?"
)
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
MAX_IMAGE_BYTES = 200_000


def references(text: str) -> list[tuple[str, str | None]]:
    return [(m.group(1), m.group(2)) for m in REF.finditer(text)]


@cache
def _names(path: Path) -> frozenset[str]:
    """Dotted names defined in a Python file: top-level defs/classes/assignments and class members."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: set[str] = set()

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                out.add(prefix + node.name)
                if isinstance(node, ast.ClassDef):
                    visit(node.body, f"{prefix}{node.name}.")
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                out.update(prefix + t.id for t in targets if isinstance(t, ast.Name))

    visit(tree.body, "")
    return frozenset(out)


def resolve(path: str, name: str | None) -> str | None:
    """None when the reference resolves, else a one-line reason."""
    file = ROOT / path
    if not file.is_file():
        return f"{path}: no such file"
    if name is not None and name not in _names(file):
        return f"{path}:{name}: no such function, class, method or assignment"
    return None


def test_reference_checker_rejects_bad_references():
    text = "see `obinfer/cache/kv_cache.py:LayerCache.attend` and obinfer/models/llama.py:apply_rope, "
    text += (
        "obinfer/models/llama.py:no_such_fn, obinfer/nope.py and obinfer/cache/kv_cache.py:LayerCache.nope"
    )
    refs = references(text)
    assert refs[:2] == [
        ("obinfer/cache/kv_cache.py", "LayerCache.attend"),
        ("obinfer/models/llama.py", "apply_rope"),
    ]
    assert [resolve(p, n) is None for p, n in refs] == [True, True, False, False, False]


def test_docs_exist():
    names = {p.name for p in DOCS}
    assert {"guide.md", "cache.md"} <= names


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_code_reference_resolves(doc):
    text = doc.read_text(encoding="utf-8")
    refs = references(text)
    if doc.name in ("guide.md", "cache.md"):
        assert len(refs) >= 20, f"{doc.name} should point at the code it explains"
    bad = [reason for p, n in refs if (reason := resolve(p, n)) is not None]
    assert not bad, f"{doc.name}: unresolved references:\n" + "\n".join(sorted(set(bad)))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_images_exist_and_are_small(doc):
    for target in IMAGE.findall(doc.read_text(encoding="utf-8")):
        if "://" in target:
            continue
        img = (doc.parent / target).resolve()
        assert img.is_file(), f"{doc.name}: missing image {target}"
        assert img.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{target} is not a PNG"
        assert img.stat().st_size < MAX_IMAGE_BYTES, f"{target} is {img.stat().st_size} bytes"


def test_cache_doc_shows_inspect_pictures():
    text = (ROOT / "docs" / "cache.md").read_text(encoding="utf-8")
    images = IMAGE.findall(text)
    assert len(images) >= 2 and all(t.startswith("img/") for t in images)
    assert "obinfer inspect" in text
