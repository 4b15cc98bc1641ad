"""The import graph of obinfer/, read with `ast` (module-level and function-level imports alike):
no circle, nothing below the CLI imports the CLI, and the engine does not import the applications."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "obinfer"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = PKG) -> dict[str, set[str]]:
    """module -> obinfer modules it imports (a `from pkg import name` counts as pkg.name when that is a module)."""
    files = {_module_name(p): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        deps: set[str] = set()
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = mod.split(".")[: len(mod.split(".")) - node.level + (1 if is_pkg else 0)]
                    base = ".".join([*anchor, base] if base else anchor)
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for name in names:
                while name and name not in files:  # obinfer.cache.presses.make_press -> obinfer.cache.presses
                    name = name.rpartition(".")[0]
                if name.startswith("obinfer") and name != mod:
                    deps.add(name)
        graph[mod] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                return stack[stack.index(d) :] + [d]
            if d not in state and (c := visit(d)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def _is_cli(mod: str) -> bool:
    return mod == "obinfer.cli" or mod.startswith("obinfer.cli.")


def test_the_checker_finds_circles_and_names() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    graph = import_graph()
    assert (
        "obinfer.cache.kv_cache" in graph["obinfer.cache.presses"]
        or "obinfer.cache.policies" in graph["obinfer.cache.presses"]
    )
    assert "obinfer.cli" in graph["obinfer.__main__"]


def test_no_import_circle() -> None:
    assert find_cycle(import_graph()) is None


def test_nothing_below_the_cli_imports_it() -> None:
    graph = import_graph()
    bad = {
        m: sorted(d for d in deps if _is_cli(d))
        for m, deps in graph.items()
        if not _is_cli(m) and m != "obinfer.__main__"
    }
    assert not {m: d for m, d in bad.items() if d}


def test_the_engine_does_not_import_the_applications() -> None:
    """cache/, models/ and the modules they build on never import eval/ or inspect (or the CLI)."""
    graph = import_graph()
    apps = ("obinfer.eval", "obinfer.inspect", "obinfer.cli")
    engine = [m for m in graph if m.startswith(("obinfer.cache", "obinfer.models")) or m in (
        "obinfer.generate", "obinfer.config", "obinfer.weights", "obinfer.tokenizer", "obinfer.loading",
        "obinfer.prompts", "obinfer.catalog", "obinfer.gguf_import", "obinfer.hub", "obinfer.storage",
        "obinfer.assets", "obinfer.errors")]  # fmt: skip
    offenders = {m: sorted(d for d in graph[m] if d.startswith(apps)) for m in engine}
    assert not {m: d for m, d in offenders.items() if d}
