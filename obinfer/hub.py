"""Download safetensors checkpoints from the Hugging Face Hub into the weights directory.

Only the files the engine needs are fetched (config, tokenizer, chat template, ``*.safetensors`` and the
shard index); pickled ``*.bin``/``*.pt``/``*.pth`` weights are never downloaded. The snapshot lands in a
temporary sibling of ``weights_dir/<name>`` and is renamed into place only once it is complete.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from obinfer.errors import ObinferError
from obinfer.storage import OutputExistsError, atomic_dir, default_weights_dir

logger = logging.getLogger(__name__)

ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "chat_template.jinja",
    "*.safetensors",
    "model.safetensors.index.json",
]
_REPO_ID_RE = re.compile(r"^(?:[\w.-]+/)?[\w.-]+$")

# Called like huggingface_hub.snapshot_download(repo_id=, revision=, token=, local_dir=, allow_patterns=).
Downloader = Callable[..., Any]


class HubError(ObinferError, RuntimeError):
    """A Hub download failed or produced an unusable checkpoint."""


class InvalidRepoIdError(HubError, ValueError):
    """The repository id is malformed."""


def default_downloader() -> Downloader:
    """The real ``huggingface_hub.snapshot_download`` (imported lazily)."""
    from huggingface_hub import snapshot_download

    return snapshot_download


def model_dir_name(repo_id: str) -> str:
    """Local directory name for ``repo_id``: its last part, lowercased (``Org/Model-1B`` -> ``model-1b``)."""
    if not _REPO_ID_RE.match(repo_id) or ".." in repo_id or repo_id.split("/")[-1] == ".":
        raise InvalidRepoIdError(f"invalid Hugging Face repo id {repo_id!r} (expected 'owner/name')")
    return repo_id.split("/")[-1].lower()


def _check_snapshot(path: Path, repo_id: str) -> None:
    """Raise :class:`HubError` unless ``path`` holds a config.json and complete safetensors weights."""
    if not (path / "config.json").is_file():
        raise HubError(f"no config.json in {repo_id}")
    if not any(path.glob("*.safetensors")):
        raise HubError(f"no safetensors weights in {repo_id} (.bin/.pt checkpoints are not supported)")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values())
        if missing := sorted(s for s in shards if not (path / s).is_file()):
            raise HubError(f"{repo_id}: shard {missing[0]} listed in the index was not downloaded")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def download(
    repo_id: str,
    weights_dir: str | Path | None = None,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    downloader: Downloader | None = None,
) -> Path:
    """Download a safetensors checkpoint into ``weights_dir/<name>`` (atomically).

    Args:
        repo_id: Hub repository, e.g. ``"Qwen/Qwen2.5-0.5B-Instruct"``.
        weights_dir: checkpoint root; defaults to :func:`obinfer.storage.default_weights_dir`.
        revision: branch, tag or commit (default: the repo's default branch).
        token: Hub token, passed through to the downloader.
        downloader: ``snapshot_download``-compatible callable; defaults to :func:`default_downloader`.

    Returns:
        The checkpoint directory. If it already holds a config.json, it is returned without downloading.

    Raises:
        InvalidRepoIdError: malformed ``repo_id``.
        HubError: the download failed, or the repo has no config.json / safetensors weights.
    """
    name = model_dir_name(repo_id)
    root = Path(weights_dir) if weights_dir is not None else default_weights_dir()
    out = root / name
    if (out / "config.json").is_file():
        logger.debug("%s already present at %s", repo_id, out)
        return out
    if out.exists():
        raise HubError(f"{out} exists but holds no config.json; delete it and retry")
    fetch = downloader if downloader is not None else default_downloader()
    try:
        with atomic_dir(out) as tmp:
            try:
                fetch(
                    repo_id=repo_id,
                    revision=revision,
                    token=token,
                    local_dir=str(tmp),
                    allow_patterns=ALLOW_PATTERNS,
                )
            except Exception as exc:
                raise HubError(f"cannot download {repo_id}: {_first_line(exc)}") from exc
            shutil.rmtree(tmp / ".cache", ignore_errors=True)  # huggingface_hub's local-dir bookkeeping
            _check_snapshot(tmp, repo_id)
    except OutputExistsError:  # another process downloaded it while we waited for the lock
        if not (out / "config.json").is_file():
            raise
    return out
