"""Every documented example runs: module docstrings (``>>>`` doctests and ``::`` code blocks), the Python
blocks of docs/*.md, and the shell commands of README.md and docs/*.md (each parses with the real
argument parser; the README's run line runs for real on the embedded model)."""

from __future__ import annotations

import contextlib
import doctest
import importlib
import io
import pkgutil
import re
import shlex
import textwrap
from pathlib import Path

import pytest
import torch

import obinfer
from obinfer.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def _modules() -> list[str]:
    return sorted(
        m.name for m in pkgutil.walk_packages(obinfer.__path__, "obinfer.") if m.name != "obinfer.__main__"
    )


def _fenced(path: Path, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)


def _literal_blocks(doc: str) -> list[str]:
    """reST literal blocks (a paragraph ending in ``::``, then an indented block) without ``>>>`` lines."""
    blocks, lines = [], doc.splitlines()
    for i, line in enumerate(lines):
        if line.rstrip().endswith("::"):
            body = []
            for nxt in lines[i + 1 :]:
                if nxt.strip() and not nxt.startswith((" ", "\t")):
                    break
                body.append(nxt)
            code = textwrap.dedent("\n".join(body)).strip()
            if code and ">>>" not in code:
                blocks.append(code)
    return blocks


@pytest.fixture(scope="module")
def env(default_model_dir):
    """What the examples assume is in scope: the embedded model, its tokenizer, a chat prompt."""
    from obinfer.tokenizer import load_tokenizer
    from obinfer.weights import load_model

    mp = pytest.MonkeyPatch()
    mp.setenv("OBINFER_WEIGHTS", str(default_model_dir.parent))  # load() finds the converted model
    model, tok = load_model(default_model_dir), load_tokenizer(default_model_dir)
    ids = tok.encode(tok.apply_chat(FRANCE))
    yield {"model": model, "tok": tok, "ids": ids, "model_dir": default_model_dir}
    mp.undo()


def _globs(env: dict) -> dict:
    from obinfer.cache.kv_cache import KVCache
    from obinfer.cache.presses import make_press
    from obinfer.generate import GenStats
    from obinfer.inspect import run_presses

    ids = list(env["ids"])
    return {"torch": torch, "KVCache": KVCache, "make_press": make_press, "GenStats": GenStats,
            "run_presses": run_presses, "model": env["model"], "tok": env["tok"], "ids": ids,
            "cache": env["model"].new_cache()}  # fmt: skip


def test_there_are_examples_to_run() -> None:
    """Guards the collectors below: if they found nothing, the tests would pass vacuously."""
    n_doctest = sum(
        len(t.examples) for m in _modules() for t in doctest.DocTestFinder().find(importlib.import_module(m))
    )
    n_blocks = sum(len(_literal_blocks(importlib.import_module(m).__doc__ or "")) for m in _modules())
    n_shell = sum(len(_fenced(p, "bash")) for p in DOCS)
    assert (
        n_doctest >= 10 and n_blocks >= 2 and n_shell >= 3 and _fenced(ROOT / "docs" / "guide.md", "python")
    )


@pytest.mark.parametrize("name", _modules())
def test_module_doctests(name: str, env) -> None:
    module = importlib.import_module(name)
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    for test in doctest.DocTestFinder().find(module, globs=_globs(env)):
        runner = doctest.DocTestRunner(optionflags=flags)
        out = io.StringIO()
        runner.run(test, out=out.write)
        assert runner.failures == 0, out.getvalue()


@pytest.mark.parametrize(
    "name", [m for m in _modules() if _literal_blocks(importlib.import_module(m).__doc__ or "")]
)
def test_module_code_blocks(name: str, env) -> None:
    """The ``::`` blocks (the front-door example of obinfer/__init__.py among them) run as written."""
    module = importlib.import_module(name)
    for code in _literal_blocks(module.__doc__ or ""):
        code = code.replace('"weights/smollm2-135m-instruct"', repr(str(env["model_dir"])))
        g = {**vars(module), **_globs(env)}  # the block reads as part of its module
        code = code.replace('"my_score"', '"doc_example_score"')  # registered under a throw-away name
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                exec(compile(code, f"<{name} docstring>", "exec"), g)
        finally:
            from obinfer.cache.scores import SCORES
            from obinfer.catalog import MODELS

            SCORES.pop("doc_example_score", None)
            MODELS.pop("my-model", None)
        if "What is the capital of France?" in code and "print(" in code:
            assert "Paris" in buf.getvalue()


@pytest.mark.parametrize("doc", [p.name for p in DOCS if _fenced(p, "python")])
def test_docs_python_blocks(doc: str, env) -> None:
    path = ROOT / doc if doc == "README.md" else ROOT / "docs" / doc
    for code in _fenced(path, "python"):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            exec(compile(code, f"<{doc}>", "exec"), {})
        assert buf.getvalue().strip(), "the example prints what it shows"
        if "capital of France" in code and "generate(" in code:
            assert "Paris" in buf.getvalue()


def _shell_commands(path: Path) -> list[list[str]]:
    cmds = []
    for block in _fenced(path, "bash"):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            for part in re.split(r"\s&&\s", line.split("  #")[0]):
                words = shlex.split(part, comments=True)
                if words[:1] == ["obinfer"]:
                    cmds.append(words[1:])
    return cmds


@pytest.mark.parametrize("doc", [p.name for p in DOCS])
def test_documented_commands_parse(doc: str) -> None:
    path = ROOT / doc if doc == "README.md" else ROOT / "docs" / doc
    parser = build_parser()
    for argv in _shell_commands(path):
        try:
            parser.parse_args(argv)
        except SystemExit as exc:  # argparse's way of refusing
            raise AssertionError(f"{doc}: `obinfer {shlex.join(argv)}` does not parse") from exc


def test_readme_run_line_answers(env, capsys) -> None:
    (run,) = [
        c for c in _shell_commands(ROOT / "README.md") if c[:1] == ["generate"] and "France" in " ".join(c)
    ][:1]
    assert main(run) == 0
    assert "Paris" in capsys.readouterr().out
