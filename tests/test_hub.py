"""Tests for obinfer.hub.download with a local fake Hub (no network).

The fake downloader copies files from a local directory, filtering them with the allow_patterns it is
given (fnmatch, as huggingface_hub does), so the tests check what the real call would fetch.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path

import pytest

from obinfer import hub
from obinfer.hub import ALLOW_PATTERNS, HubError, InvalidRepoIdError, download


def make_repo(root: Path, files: dict[str, str]) -> Path:
    root.mkdir(parents=True)
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


FULL_REPO = {
    "config.json": json.dumps({"model_type": "llama"}),
    "generation_config.json": "{}",
    "tokenizer.json": "{}",
    "tokenizer_config.json": "{}",
    "model.safetensors": "weights",
    "pytorch_model.bin": "pickled weights",
    "training_args.pt": "pickle",
    "README.md": "readme",
}


class FakeHub:
    """snapshot_download stand-in serving repos from local dirs; records calls; can fail after N files."""

    def __init__(self, repos: dict[str, Path], fail_after: int | None = None) -> None:
        self.repos, self.fail_after, self.calls = repos, fail_after, []

    def __call__(self, *, repo_id, revision, token, local_dir, allow_patterns):
        self.calls.append(
            {"repo_id": repo_id, "revision": revision, "token": token, "patterns": allow_patterns}
        )
        if repo_id not in self.repos:
            raise FileNotFoundError(
                f"404 Client Error: Repository Not Found for url: /{repo_id}\nmore details"
            )
        src = self.repos[repo_id]
        for n, path in enumerate(sorted(p for p in src.rglob("*") if p.is_file())):
            rel = path.relative_to(src).as_posix()
            if not any(fnmatch.fnmatch(rel, pat) for pat in allow_patterns):
                continue
            if self.fail_after is not None and n >= self.fail_after:
                raise ConnectionError("connection reset mid-download")
            (Path(local_dir) / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(local_dir) / rel)
        (Path(local_dir) / ".cache" / "huggingface").mkdir(parents=True)  # like the real local-dir mode
        return local_dir


@pytest.fixture
def fake_hub(tmp_path: Path) -> FakeHub:
    return FakeHub(
        {
            "Org/Tiny-Model": make_repo(tmp_path / "hub" / "full", FULL_REPO),
            "Org/BinOnly": make_repo(
                tmp_path / "hub" / "bin",
                {"config.json": "{}", "pytorch_model.bin": "x", "tokenizer.json": "{}"},
            ),
            "Org/NoConfig": make_repo(tmp_path / "hub" / "nocfg", {"model.safetensors": "w"}),
            "Org/Sharded": make_repo(
                tmp_path / "hub" / "sharded",
                {
                    "config.json": "{}",
                    "model-00001-of-00002.safetensors": "a",
                    "model.safetensors.index.json": json.dumps(
                        {
                            "weight_map": {
                                "a": "model-00001-of-00002.safetensors",
                                "b": "model-00002-of-00002.safetensors",
                            }
                        }
                    ),
                },
            ),
        }
    )


def leftovers(weights: Path) -> list[str]:
    return sorted(p.name for p in weights.iterdir()) if weights.exists() else []


def test_download_fetches_only_allowed_files(tmp_path: Path, fake_hub: FakeHub) -> None:
    weights = tmp_path / "weights"
    out = download("Org/Tiny-Model", weights, revision="v1", token="tok", downloader=fake_hub)
    assert out == weights / "tiny-model"
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert leftovers(weights) == ["tiny-model"]  # no temp dir left next to it
    assert fake_hub.calls == [
        {"repo_id": "Org/Tiny-Model", "revision": "v1", "token": "tok", "patterns": ALLOW_PATTERNS}
    ]


def test_allow_patterns_never_match_pickles() -> None:
    for name in ["pytorch_model.bin", "model.pt", "consolidated.00.pth", "pytorch_model-00001-of-00002.bin"]:
        assert not any(fnmatch.fnmatch(name, pat) for pat in ALLOW_PATTERNS), name
    for name in ["model-00001-of-00004.safetensors", "tokenizer.model", "chat_template.jinja"]:
        assert any(fnmatch.fnmatch(name, pat) for pat in ALLOW_PATTERNS), name


def test_second_download_reuses_existing_dir(tmp_path: Path, fake_hub: FakeHub) -> None:
    download("Org/Tiny-Model", tmp_path / "w", downloader=fake_hub)
    download("Org/Tiny-Model", tmp_path / "w", downloader=fake_hub)
    assert len(fake_hub.calls) == 1


def test_failure_half_way_leaves_nothing(tmp_path: Path, fake_hub: FakeHub) -> None:
    fake_hub.fail_after = 2
    weights = tmp_path / "weights"
    with pytest.raises(HubError, match=r"Org/Tiny-Model.*ConnectionError: connection reset"):
        download("Org/Tiny-Model", weights, downloader=fake_hub)
    assert leftovers(weights) == []


def test_missing_repo_error_is_one_line(tmp_path: Path, fake_hub: FakeHub) -> None:
    with pytest.raises(HubError) as info:
        download("Org/Nope", tmp_path / "w", downloader=fake_hub)
    assert "Org/Nope" in str(info.value) and "Repository Not Found" in str(info.value)
    assert "\n" not in str(info.value)
    assert leftovers(tmp_path / "w") == []


@pytest.mark.parametrize(
    "repo, message",
    [
        ("Org/BinOnly", "no safetensors weights in Org/BinOnly"),
        ("Org/NoConfig", "no config.json in Org/NoConfig"),
        ("Org/Sharded", "shard model-00002-of-00002.safetensors"),
    ],
)
def test_unusable_repos_are_refused(tmp_path: Path, fake_hub: FakeHub, repo: str, message: str) -> None:
    with pytest.raises(HubError, match=message):
        download(repo, tmp_path / "w", downloader=fake_hub)
    assert leftovers(tmp_path / "w") == []


@pytest.mark.parametrize("bad", ["", "a/b/c", "../etc", "Org/..", "has space/x"])
def test_invalid_repo_id(tmp_path: Path, fake_hub: FakeHub, bad: str) -> None:
    with pytest.raises(InvalidRepoIdError):
        download(bad, tmp_path / "w", downloader=fake_hub)
    assert isinstance(InvalidRepoIdError("x"), ValueError) and fake_hub.calls == []


def test_default_downloader_is_huggingface_snapshot_download(
    tmp_path: Path, fake_hub: FakeHub, monkeypatch
) -> None:
    import huggingface_hub

    assert hub.default_downloader() is huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_hub)
    assert download("Org/Tiny-Model", tmp_path / "w") == tmp_path / "w" / "tiny-model"
    assert len(fake_hub.calls) == 1


def test_default_weights_dir_from_env(tmp_path: Path, fake_hub: FakeHub, monkeypatch) -> None:
    monkeypatch.setenv("OBINFER_WEIGHTS", str(tmp_path / "envw"))
    assert download("Org/Tiny-Model", downloader=fake_hub) == tmp_path / "envw" / "tiny-model"
