"""The evaluation across processes: ``torchrun ... -m obinfer eval``, on several GPUs or nodes.

torchrun (torch.distributed's launcher) starts the same command once per rank and sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``; without them (or with a world of one) the evaluation is the
single process it always was. Under torchrun:

* **Who does what.** A sample (task, length, index) belongs to rank :func:`sample_rank`, a pure
  function of its identity and the world size (round-robin over the indices of each task and length,
  from an offset hashed from them), so every rank knows its share without talking to the others and a
  rerun assigns the same samples to the same ranks. A rank runs its samples exactly as a single process
  would (one shared prefill per sample and mode, the compressed caches decoded in batches).
* **Where results go.** Each rank appends to its own shard, ``<out>/shards/rankRRRRR-of-WWWWW.jsonl``
  (whole fsync'ed lines, like ``results.jsonl``). When every rank is done, rank 0 merges
  ``results.jsonl`` and the shards into ``results.jsonl`` (:func:`merge_results`: atomic, idempotent,
  rows in the order a single process writes them) and deletes the shards. Rank 0 also writes ``run.json``
  and the sample files (``data/``), which the other ranks read after a barrier: on several nodes,
  ``<out>`` must be on a filesystem that every node shares.
* **Resume.** What is finished is read from ``results.jsonl`` and every shard, of any world size, by
  row identity (task, length, index, press, ratio, mode, budget: ``result_key``), so a rerun, with
  ``--resume``, after a rank died, on another number of ranks or in one process, skips the finished rows
  and duplicates none (but redoes, with a larger ``--max-new-tokens``, answers cut short by the smaller
  one: the merge keeps the redone row, ``results.supersedes``). A torn last line (a rank killed while
  writing) is dropped: the rank owning the shard cuts it off before appending; merges and readers skip it.
* **Waiting.** torch.distributed's process group (gloo on CPU, nccl on CUDA, device ``cuda:LOCAL_RANK``)
  is initialised with a timeout; ranks meet at a barrier (a gloo ``monitored_barrier``, naming the
  ranks missing) before writing anything. At the end, rank 0 does not wait at a barrier, whose timeout
  would have to exceed the longest difference between the ranks' shares: each rank records its number of
  rows and then "done" in torch.distributed's key-value store, and rank 0 gives up, with one line naming
  the rank, if a rank neither finishes nor writes a row for the timeout (``--dist-timeout``).

Test hook (tests only): ``OBINFER_TEST_DIE_AFTER_ROWS=RANK:N`` makes rank RANK write a torn line after
its N-th row and kill itself with SIGKILL.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from obinfer.eval import EvalError
from obinfer.eval.results import (
    RESULTS_FILE,
    SHARD_DIR,
    ResultsError,
    Rows,
    decode_json,
    final_rows,
    row_problem,
    scan_for_resume,
    shard_files,
)
from obinfer.storage import atomic_write_bytes, locked

DEFAULT_TIMEOUT_S = 1800.0  # --dist-timeout: rendezvous, barriers, and a rank's longest silence
POLL_S = 1.0  # rank 0's polling period while it waits for the others
DIE_ENV = "OBINFER_TEST_DIE_AFTER_ROWS"
_KEY_PREFIX = "obinfer/eval"

logger = logging.getLogger(__name__)


class DistributedError(EvalError):
    """A rank that did not start, died or hangs; or a bad torchrun environment."""


# ------------------------------------------------------------------------------------------ the world
@dataclass(frozen=True)
class World:
    """This process's place among the ranks: ``RANK`` of ``WORLD_SIZE``, ``LOCAL_RANK`` on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env(env: Mapping[str, str] | None = None) -> World:
    """The world torchrun describes in ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (none set: one process).

    Raises DistributedError naming the variable if one is not a number or they disagree.
    """
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env and "RANK" not in env:
        return World()
    values = {}
    for name, default in (("RANK", None), ("WORLD_SIZE", None), ("LOCAL_RANK", "0")):
        text = env.get(name, default)
        if text is None:
            raise DistributedError(f"{name} is not set but {'RANK' if name == 'WORLD_SIZE' else 'WORLD_SIZE'} "
                                   "is: launch with torchrun, or set RANK, WORLD_SIZE and LOCAL_RANK")  # fmt: skip
        try:
            values[name] = int(text)
        except ValueError:
            raise DistributedError(f"{name}={text!r} is not an integer (launch with torchrun)") from None
    world = World(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"])
    if world.size < 1 or not 0 <= world.rank < world.size or world.local_rank < 0:
        raise DistributedError(
            f"RANK={world.rank}, WORLD_SIZE={world.size}, LOCAL_RANK={world.local_rank} do not describe a "
            "rank (need 0 <= RANK < WORLD_SIZE, LOCAL_RANK >= 0)"
        )
    return world


def rank_device(device: str, world: World) -> str:
    """This rank's device: ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun (one GPU per rank); an
    explicit ``cuda:N`` or ``cpu`` is kept."""
    return f"cuda:{world.local_rank}" if device == "cuda" and world.is_distributed else device


def backend_for(device: str) -> str:
    """torch.distributed's backend for a device: nccl for CUDA, gloo otherwise."""
    return "nccl" if device.split(":")[0] == "cuda" else "gloo"


# ---------------------------------------------------------------------------------------- sharding
def sample_rank(task: str, length: int, index: int, size: int) -> int:
    """The rank that runs sample (task, length, index) among `size` ranks.

    Consecutive indices of one (task, length) go to consecutive ranks, so every rank gets a fair share
    of every task and length (their costs differ); the first index's rank is hashed from (task, length)
    so that few samples per task do not all land on rank 0. A pure function: the same on every rank,
    in every rerun.
    """
    offset = zlib.crc32(f"{task}\0{int(length)}".encode())
    return (int(index) + offset) % size


def my_samples(samples: list[dict[str, Any]], world: World) -> list[dict[str, Any]]:
    """The samples this rank runs, in their order."""
    if not world.is_distributed:
        return list(samples)
    return [
        s for s in samples
        if sample_rank(s["task"], int(s.get("max_seq_length", 0)), int(s["index"]), world.size) == world.rank
    ]  # fmt: skip


def shard_path(out_dir: Path | str, world: World) -> Path:
    """This rank's results file: ``<out>/shards/rankRRRRR-of-WWWWW.jsonl``."""
    return Path(out_dir) / SHARD_DIR / f"rank{world.rank:05d}-of-{world.size:05d}.jsonl"


# ------------------------------------------------------------------------------- reading and merging
def finished_rows(out_dir: Path | str, skip: Path | None = None) -> dict[tuple, dict[str, Any]]:
    """The rows of ``results.jsonl`` and the shards (but `skip`) by key (`final_rows`), read-only: a torn
    last line (its writer died, or is writing it) is ignored; a damaged line before it is a ResultsError."""
    out_dir = Path(out_dir)
    rows: list[dict[str, Any]] = []
    for path in [out_dir / RESULTS_FILE, *shard_files(out_dir)]:
        if path != skip and path.is_file() and path.stat().st_size:
            rows += scan_for_resume(path)[0]
    return final_rows(rows)


def _whole_lines(path: Path) -> list[tuple[dict[str, Any], bytes]]:
    """(row, line without its newline) of each row of a results file; a torn last line is left out."""
    data = path.read_bytes()
    raw_lines = data.split(b"\n")
    last = max((i for i, raw in enumerate(raw_lines) if raw.strip()), default=-1)
    out = []
    for i, raw in enumerate(raw_lines):
        if not raw.strip():
            continue
        row, why = decode_json(raw)
        why = why or row_problem(row)
        if why is None:
            out.append((row, raw))
        elif i != last:
            raise ResultsError(
                f"{path}:{i + 1}: {why} (a damaged line before the last one): fix or delete that line, "
                "then rerun with --resume"
            )
    return out


def merge_results(out_dir: Path | str, order: Mapping[tuple, int] | None = None) -> Rows:
    """Merge ``results.jsonl`` and every shard into ``results.jsonl``, then delete the shards.

    Each row (by key) is kept once (`final_rows`): its first copy (``results.jsonl`` first, then the
    shards by name) unless a later one redoes it with a larger cap (that one is kept, the other dropped);
    rows are sorted by `order` (key -> position: the order a single process writes them), rows it does
    not list last, in the order read. The file is replaced atomically and the shards are deleted only
    after, so a merge killed at any point loses nothing and merging again gives the same file. The
    directory is locked (flock) meanwhile. Returns the merged rows.
    """
    out_dir = Path(out_dir)
    main = out_dir / RESULTS_FILE
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(locked(out_dir))
        except OSError as e:  # a shared filesystem without flock: rank 0 alone merges anyway
            logger.warning("cannot lock %s (%s); merging without the lock", out_dir, e.strerror or e)
        shards = shard_files(out_dir)
        lines = [x for path in ([main, *shards] if main.is_file() else shards) for x in _whole_lines(path)]
        raw_of = {id(row): raw for row, raw in lines}
        final = final_rows(row for row, _ in lines)
        keys = list(final)
        if order is not None:
            rank = {k: i for i, k in enumerate(keys)}
            keys.sort(key=lambda k: (0, order[k]) if k in order else (1, rank[k]))
        data = b"".join(raw_of[id(final[k])] + b"\n" for k in keys)
        if shards or not main.is_file() or main.read_bytes() != data:
            atomic_write_bytes(main, data)
        for path in shards:
            path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # not empty (another file there) or already gone
            (out_dir / SHARD_DIR).rmdir()
    return [final[k] for k in keys]


# ---------------------------------------------------------------------------------- the ranks' group
class Group:
    """The ranks of one torchrun job: torch.distributed's process group and its key-value store.

    Args:
        world: this rank (from :func:`world_from_env`).
        device: this rank's device (nccl for CUDA, gloo otherwise; CUDA: made the current device).
        timeout_s: for the rendezvous, the barriers, and a silent rank (see :meth:`wait_for_ranks`).
    """

    def __init__(self, world: World, device: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        import torch
        import torch.distributed as dist

        if not timeout_s > 0:
            raise DistributedError(f"the distributed timeout must be > 0 seconds, got {timeout_s}")
        self.world, self.timeout_s = world, float(timeout_s)
        backend = backend_for(device)
        timeout = datetime.timedelta(seconds=self.timeout_s)
        self.owned = not dist.is_initialized()  # a program that started torch.distributed itself keeps it
        try:
            if backend == "nccl":
                torch.cuda.set_device(torch.device(device))
            if self.owned:
                dist.init_process_group(backend, timeout=timeout, rank=world.rank, world_size=world.size)
            elif (dist.get_rank(), dist.get_world_size()) != (world.rank, world.size):
                raise DistributedError(
                    f"torch.distributed is already started as rank {dist.get_rank()} of {dist.get_world_size()}, "
                    f"not {world.rank} of {world.size}"
                )
            # barriers on CPU, whatever the backend: gloo's monitored_barrier names missing ranks
            self.ctrl = (
                None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
            )
        except (RuntimeError, ValueError) as e:
            raise DistributedError(
                f"rank {world.rank}: torch.distributed ({backend}) did not start: {_first_line(e)} (every "
                f"rank must start within --dist-timeout {self.timeout_s:g} s, at the address torchrun gives)"
            ) from None
        from torch.distributed import distributed_c10d

        self.store = distributed_c10d._get_default_store()
        # a torchrun restart (--max-restarts) keeps the store: keys are per attempt
        self.prefix = f"{_KEY_PREFIX}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        self.rows = 0

    def barrier(self, what: str) -> None:
        """Every rank reaches this point (within the timeout), or DistributedError naming `what`."""
        import torch.distributed as dist

        try:
            dist.monitored_barrier(
                group=self.ctrl, timeout=datetime.timedelta(seconds=self.timeout_s), wait_all_ranks=True
            )
        except RuntimeError as e:
            raise DistributedError(
                f"rank {self.world.rank}: not every rank reached {what} within {self.timeout_s:g} s "
                f"({_first_line(e)}): a rank failed, died or hangs; rerun with --resume"
            ) from None

    def row_done(self) -> None:
        """Record one more row of this rank (rank 0 reads it as a sign of life)."""
        self.rows += 1
        self.store.set(f"{self.prefix}/rows/{self.world.rank}", str(self.rows))

    def finish(self) -> None:
        """Record that this rank has written all its rows."""
        self.store.set(f"{self.prefix}/done/{self.world.rank}", "1")

    def wait_for_ranks(self, poll_s: float = POLL_S) -> None:
        """(Rank 0) until every rank has finished; see :func:`wait_for_ranks`."""
        wait_for_ranks(self.store, self.prefix, self.world.size, self.timeout_s, poll_s)

    def close(self) -> None:
        """Shut the process group down (unless the program had started it)."""
        import torch.distributed as dist

        if self.owned:
            with contextlib.suppress(RuntimeError, ValueError):
                dist.destroy_process_group()


def wait_for_ranks(
    store: Any,
    prefix: str,
    size: int,
    timeout_s: float,
    poll_s: float = POLL_S,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Wait until every rank has set ``<prefix>/done/<rank>`` in `store`.

    A rank still working updates ``<prefix>/rows/<rank>`` with each row; one that neither finishes nor
    writes a row for `timeout_s` (counted on this clock from when waiting starts or its last row) died
    or hangs: DistributedError naming it (its finished rows are kept; ``--resume`` continues).
    """
    seen: dict[int, tuple[bytes | None, float]] = {r: (None, clock()) for r in range(size)}
    while True:
        pending = [r for r in range(size) if not store.check([f"{prefix}/done/{r}"])]
        if not pending:
            return
        now = clock()
        for r in pending:
            key = f"{prefix}/rows/{r}"
            rows = store.get(key) if store.check([key]) else None
            if rows != seen[r][0]:
                seen[r] = (rows, now)
            elif now - seen[r][1] > timeout_s:
                raise DistributedError(
                    f"rank {r} neither finished nor wrote a result for {timeout_s:g} s: it died or hangs; "
                    "stop the job and rerun it with --resume (finished rows are kept)"
                )
        sleep(poll_s)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# --------------------------------------------------------------------------------------- test hook
def die_after_rows(world: World) -> int | None:
    """N if ``OBINFER_TEST_DIE_AFTER_ROWS=RANK:N`` names this rank (tests only), else None."""
    spec = os.environ.get(DIE_ENV)
    if not spec:
        return None
    rank, _, n = spec.partition(":")
    try:
        return int(n) if int(rank) == world.rank else None
    except ValueError:
        raise DistributedError(f"{DIE_ENV}={spec!r}: expected RANK:N") from None


def die_now(path: Path) -> None:
    """Write half a row to `path` (a kill in the middle of a write) and SIGKILL this process."""
    with open(path, "ab") as fh:
        fh.write(b'{"task": "niah_single_1", "length": 5')
        fh.flush()
        os.fsync(fh.fileno())
    os.kill(os.getpid(), signal.SIGKILL)
