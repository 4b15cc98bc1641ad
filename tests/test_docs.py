"""Every code reference in docs/*.md and README.md resolves, every citation of the docs resolves, and the
committed pictures exist and are small.

A code reference is a repository path to a Python file, optionally followed by `:name` or `:Class.method`,
e.g. `obinfer/models/llama.py:apply_rope` or `obinfer/cache/attention.py:attend`. Names are
resolved by parsing the file with `ast` (functions, classes, methods, module-level assignments), so
nothing is imported.

A doc citation, anywhere in obinfer/, tests/, examples/, benchmarks/, docs/*.md and README.md, is
- `docs/<file>.md §N(.M)`, `docs/<file>.md section(s) N`, `<file>.md section N`, with number lists
  `1, 2 and 5` and ranges `3-6`: docs/<file>.md must have a heading numbered N (`## N.`, `### N.M`);
  inside docs/*.md a bare `section N` / `§N` cites the page itself;
- `Example N` / `Examples N and M`: a `### Example N` heading (or `**Example N**` label) of
  docs/scores.md, or of the last `<file>.md` named before it on the same line;
- a path `docs/<file>.md`: the file exists.
Paths to the design docs outside the repository (`shared/docs/...`) and Markdown links that leave the
repository are errors: cite the repository's own docs/ instead. This file itself is not scanned (its
resolver tests hold deliberately dangling citations).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
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
    text = "see `obinfer/cache/attention.py:attend` and obinfer/models/llama.py:apply_rope, "
    text += (
        "obinfer/models/llama.py:no_such_fn, obinfer/nope.py and obinfer/cache/kv_cache.py:LayerCache.nope"
    )
    refs = references(text)
    assert refs[:2] == [
        ("obinfer/cache/attention.py", "attend"),
        ("obinfer/models/llama.py", "apply_rope"),
    ]
    assert [resolve(p, n) is None for p, n in refs] == [True, True, False, False, False]


def test_docs_exist():
    names = {p.name for p in DOCS}
    assert {"guide.md", "cache.md", "scores.md", "ruler.md"} <= names


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


# ------------------------------------------------------------------------------ citations of the docs
NUM = r"\d+(?:\.\d+)*"
NUMS = rf"{NUM}(?:(?:\s*,\s*|\s+and\s+|\s*[-\u2013]\s*){NUM})*"  # 1, 2 and 5 | 3-6
SECTION_REF = re.compile(rf"(?:\b(?P<file>[\w-]+)\.md\)?,?\s+)?(?:§\s*|\bsections?\s+)(?P<nums>{NUMS})")
EXAMPLE_REF = re.compile(rf"\bExamples?\s+(?P<nums>{NUMS})")
MD_NAME = re.compile(r"\b([\w-]+)\.md\b")
DOC_PATH = re.compile(r"(?<![\w/.-])docs/[\w/.-]*?\.md\b")
OUTSIDE = re.compile(r"\bshared/docs/[\w/.-]*")
MD_LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)\s]*)?\)")
HEADING = re.compile(r"^#{1,6}\s+(\d+(?:\.\d+)*)\.?(?=[\s:]|$)", re.M)
EXAMPLE_LABEL = re.compile(r"^#{1,6}\s+(Example\s+\d+)\b|\*\*(Example\s+\d+)\b", re.M)
SCANNED = ("obinfer", "tests", "examples", "benchmarks")


@dataclass(frozen=True)
class Citation:
    where: str  # "path:line" of the citing text
    doc: str  # repository path of the cited doc, e.g. "docs/scores.md"
    label: str  # a heading number ("1.6") or "Example 2"


def _numbers(nums: str) -> list[str]:
    """'1, 2 and 5' -> ['1', '2', '5']; '3-6' -> ['3', '4', '5', '6']."""
    out: list[str] = []
    for item in re.split(r"\s*,\s*|\s+and\s+", nums):
        lo, _, hi = re.sub(r"\s", "", item).replace("\u2013", "-").partition("-")
        if hi and lo.isdigit() and hi.isdigit():
            out += [str(i) for i in range(int(lo), int(hi) + 1)]
        else:
            out += [lo] + ([hi] if hi else [])
    return out


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def citations(text: str, here: str) -> list[Citation]:
    """Section and Example citations in `text`, the contents of the repository file `here`."""
    out: list[Citation] = []
    for m in SECTION_REF.finditer(text):
        if m["file"]:
            doc = "README.md" if m["file"] == "README" else f"docs/{m['file']}.md"
        elif here.startswith("docs/"):
            doc = here  # a bare "section N" in a doc page cites that page
        else:
            continue
        out += [Citation(f"{here}:{_line(text, m.start())}", doc, n) for n in _numbers(m["nums"])]
    for m in EXAMPLE_REF.finditer(text):
        before = text[text.rfind("\n", 0, m.start()) + 1 : m.start()]
        named = MD_NAME.findall(before)
        doc = f"docs/{named[-1]}.md" if named else "docs/scores.md"
        where = f"{here}:{_line(text, m.start())}"
        out += [Citation(where, doc, f"Example {n}") for n in _numbers(m["nums"])]
    return out


@cache
def _labels(doc: str) -> frozenset[str]:
    """Heading numbers ('1', '1.6') and Example labels ('Example 2') of a repository doc."""
    text = (ROOT / doc).read_text(encoding="utf-8")
    examples = {re.sub(r"\s+", " ", a or b) for a, b in EXAMPLE_LABEL.findall(text)}
    return frozenset(HEADING.findall(text)) | examples


def resolve_citation(c: Citation) -> str | None:
    """None when the cited doc and heading exist, else a one-line reason."""
    if not (ROOT / c.doc).is_file():
        return f"{c.where}: cites {c.doc}, which does not exist"
    if c.label not in _labels(c.doc):
        what = c.label if c.label.startswith("Example") else f"section {c.label}"
        return f"{c.where}: cites {c.doc} {what}, which has no such heading"
    return None


def path_problems(text: str, here: str) -> list[str]:
    """docs/<file>.md paths that do not exist, paths into shared/docs/, Markdown links leaving the repo."""
    bad = [
        f"{here}:{_line(text, m.start())}: {m.group()} is outside the repository (cite docs/ instead)"
        for m in OUTSIDE.finditer(text)
    ]
    bad += [
        f"{here}:{_line(text, m.start())}: {m.group()} does not exist"
        for m in DOC_PATH.finditer(text)
        if not (ROOT / m.group()).is_file()
    ]
    if here.endswith(".md"):
        for m in MD_LINK.finditer(text):
            target = m.group(1)
            if "://" in target or target.startswith("mailto:"):
                continue
            path = ((ROOT / here).parent / target).resolve()
            if not path.is_relative_to(ROOT):
                bad.append(f"{here}:{_line(text, m.start())}: link {target} leaves the repository")
            elif not path.exists():
                bad.append(f"{here}:{_line(text, m.start())}: link {target} does not exist")
    return bad


def scanned_files() -> list[Path]:
    files = [p for d in SCANNED for ext in ("*.py", "*.md") for p in sorted((ROOT / d).rglob(ext))]
    files = [p for p in files if "__pycache__" not in p.parts and p != Path(__file__).resolve()]
    return files + DOCS


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_citation_resolver_on_fake_text():
    here = "tests/fake.py"
    good = "docs/scores.md §3, docs/ruler.md section 1.6; (docs/scores.md, sections 1, 2 and 5)\n"
    good += "scores.md section 8 and docs/scores.md sections 3-6. spec Examples 2, 3 and 4, Example 1\n"
    cites = citations(good, here)
    assert [(c.doc, c.label) for c in cites] == [
        ("docs/scores.md", "3"),
        ("docs/ruler.md", "1.6"),
        *[("docs/scores.md", n) for n in ("1", "2", "5", "8", "3", "4", "5", "6")],
        *[("docs/scores.md", f"Example {n}") for n in (2, 3, 4, 1)],
    ]
    assert cites[-1].where == "tests/fake.py:2"
    assert [resolve_citation(c) for c in cites] == [None] * len(cites)

    bad = "docs/scores.md §9 docs/ruler.md section 1.9 docs/nope.md section 1\nExamples 2 and 7\n"
    bad += "docs/ruler.md: Example 1\n"
    reasons = [resolve_citation(c) for c in citations(bad, here)]
    assert reasons == [
        "tests/fake.py:1: cites docs/scores.md section 9, which has no such heading",
        "tests/fake.py:1: cites docs/ruler.md section 1.9, which has no such heading",
        "tests/fake.py:1: cites docs/nope.md, which does not exist",
        None,
        "tests/fake.py:2: cites docs/scores.md Example 7, which has no such heading",
        "tests/fake.py:3: cites docs/ruler.md Example 1, which has no such heading",
    ]
    assert citations("see section 2 and §4", here) == []  # bare sections only count inside docs/*.md
    assert [c.doc for c in citations("see section 2", "docs/scores.md")] == ["docs/scores.md"]


def test_path_checker_on_fake_text():
    text = "follows shared/docs/scores.md and docs/scores.md; see docs/missing.md\n[x](../../etc/passwd) [y](cache.md)"
    assert path_problems(text, "docs/fake.md") == [
        "docs/fake.md:1: shared/docs/scores.md is outside the repository (cite docs/ instead)",
        "docs/fake.md:1: docs/missing.md does not exist",
        "docs/fake.md:2: link ../../etc/passwd leaves the repository",
    ]


def test_every_doc_citation_resolves():
    cites = [c for p in scanned_files() for c in citations(p.read_text(encoding="utf-8"), _rel(p))]
    assert len(cites) >= 20, "the citation pattern no longer finds the code's references to the docs"
    assert {"docs/scores.md", "docs/ruler.md"} <= {c.doc for c in cites}
    bad = [reason for c in cites if (reason := resolve_citation(c)) is not None]
    assert not bad, "dangling doc citations:\n" + "\n".join(bad)


def test_no_paths_outside_the_repository_or_to_missing_docs():
    bad = [b for p in scanned_files() for b in path_problems(p.read_text(encoding="utf-8"), _rel(p))]
    assert not bad, "bad doc paths:\n" + "\n".join(bad)
