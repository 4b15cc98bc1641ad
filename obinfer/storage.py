"""Where obinfer keeps what it builds or fetches, and how it writes a directory so that it is never torn.

* ``default_weights_dir()``: checkpoints (converted GGUFs, hub downloads).
* ``default_data_dir()``: first-use downloads (the embedded model's GGUF, the evaluation's essays).
* ``atomic_path(path)`` / ``atomic_write_text`` / ``atomic_write_bytes``: replace a file so that a reader
  (or a rerun after a kill) sees the old file or the new one, never a torn one: the data goes to a
  hidden temporary file next to the target (``.<name>.<random>.tmp``), is fsync'ed, then
  ``os.replace``d over it. OSErrors are re-raised naming the target file (not the temporary one).
* ``atomic_dir(out)``: build a directory under a temporary sibling name and rename it into place.
  The parent directory is locked while this happens (``flock``), so two processes building the same
  thing at once take turns: the second finds the first's result. A temporary directory left behind by
  a killed process (``.<name>.tmp-*``) is removed by the next one that builds into the same parent.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

from obinfer.errors import ObinferError

try:  # POSIX; elsewhere directory builds are not serialised between processes
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)


class StorageError(ObinferError):
    """A directory obinfer must write cannot be created or locked (read-only, a file in the way, ...)."""


class OutputExistsError(StorageError):
    """The directory to build exists already."""


def default_weights_dir() -> Path:
    """Where checkpoints live: ``$OBINFER_WEIGHTS``, else ``<repo>/weights`` in a source checkout,
    else ``~/.cache/obinfer/weights``."""
    env = os.environ.get("OBINFER_WEIGHTS")
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parent.parent
    pyproject = repo / "pyproject.toml"
    if pyproject.is_file() and 'name = "obinfer"' in pyproject.read_text(encoding="utf-8"):
        return repo / "weights"
    return Path.home() / ".cache" / "obinfer" / "weights"


def default_data_dir() -> Path:
    """Where first-use downloads live: ``$OBINFER_DATA``, else ``~/.cache/obinfer``."""
    env = os.environ.get("OBINFER_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "obinfer"


def ensure_dir(path: Path) -> Path:
    """``mkdir -p path`` with a one-line error naming the path (a file in the way, read-only, ...)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise StorageError(f"{path} exists and is not a directory") from None
    except OSError as exc:
        raise StorageError(f"cannot create directory {path}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK):
        raise StorageError(f"cannot write to {path}: permission denied (set another directory)")
    return path


def check_creatable(path: Path) -> None:
    """Fail early, with the path named, if ``path`` could not be created: its nearest existing ancestor
    must be a writable directory (checked before expensive work such as a conversion)."""
    anc = path.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise StorageError(f"cannot create {path}: {anc} is not a directory")
    if not os.access(anc, os.W_OK):
        raise StorageError(f"cannot create {path}: {anc} is not writable")


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` (an advisory ``flock`` on the directory itself, so no
    lock file is left behind). Other obinfer processes building into it wait."""
    if fcntl is None:
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another obinfer process writing into %s", directory)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _tmp_prefix(out: Path) -> str:
    return f".{out.name}.tmp-"


def remove_stale_tmp(out: Path) -> int:
    """Delete temporary siblings of ``out`` left by killed processes; call with the parent locked."""
    n = 0
    for stale in out.parent.glob(_tmp_prefix(out) + "*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        n += 1
    if n:
        logger.info("removed %d stale temporary item(s) next to %s", n, out)
    return n


@contextlib.contextmanager
def atomic_dir(out: Path | str) -> Iterator[Path]:
    """Yield an empty temporary directory next to ``out``; rename it to ``out`` when the block succeeds.

    On any error (or KeyboardInterrupt) the temporary directory is deleted and nothing is left. If the
    process is killed, the next ``atomic_dir`` into the same parent deletes the leftover.

    Raises:
        OutputExistsError: ``out`` exists (checked again after the lock is taken).
        StorageError: the parent directory cannot be created or written.
    """
    out = Path(out)
    if out.exists():
        raise OutputExistsError(f"output directory already exists: {out}")
    ensure_dir(out.parent)
    with locked(out.parent):
        if out.exists():
            raise OutputExistsError(f"output directory already exists: {out}")
        remove_stale_tmp(out)
        tmp = out.parent / f"{_tmp_prefix(out)}{uuid.uuid4().hex[:12]}"
        tmp.mkdir()  # not mkdtemp: that would leave the final directory with mode 0700
        try:
            yield tmp
            os.rename(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


# ---------------------------------------------------------------------------------------- atomic files
TMP_SUFFIX = ".tmp"


def _read_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it; done once, at import
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def oserror_for(path: Path | str, e: OSError, replaces: Path | str | None = None) -> OSError:
    """`e` re-made to name `path` if it names no file or names `replaces` (same errno and subclass).

    E.g. ``oserror_for(path, e)`` turns a bare ``[Errno 28] No space left on device`` from a write
    into ``[Errno 28] No space left on device: 'path'``. Other errors are returned unchanged.
    """
    if e.errno is None or (e.filename is not None and str(e.filename) != str(replaces)):
        return e
    return OSError(e.errno, e.strerror or os.strerror(e.errno), str(path))


def _raise_naming(path: Path, e: OSError, tmp: Path | str | None = None) -> NoReturn:
    new = oserror_for(path, e, tmp)
    if new is e:
        raise e
    raise new from e


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not supported everywhere (e.g. Windows); the rename stands
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path in `path`'s directory; on success it is fsync'ed and renamed to `path`.

    The body writes the temporary file (it exists, empty, when the body starts). Raises
    IsADirectoryError if `path` is a directory, and OSErrors naming `path` (see the module doc).
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    except OSError as e:
        _raise_naming(path, e, e.filename)  # mkstemp names its random candidate
    os.close(fd)
    tmp = Path(name)
    try:
        try:
            try:
                mode = stat.S_IMODE(path.stat().st_mode)
            except OSError:
                mode = 0o666 & ~_UMASK
            os.chmod(tmp, mode)
            yield tmp
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as e:
            _raise_naming(path, e, tmp)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    """Replace `path` with `data` atomically (see :func:`atomic_path`); returns `path` as a Path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: Path | str, text: str, encoding: str = "utf-8") -> Path:
    """Replace `path` with `text` atomically (see :func:`atomic_path`); returns `path` as a Path."""
    return atomic_write_bytes(path, text.encode(encoding))
