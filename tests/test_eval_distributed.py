"""The evaluation under torchrun (obinfer/eval/distributed.py): deterministic sharding, per-rank shards
merged atomically and idempotently, resume by row identity across world sizes, a dead rank named
instead of a hang; and end to end, 2 gloo processes on CPU give the rows of a single process, also
after a rank is killed mid-run and the run resumed (in one process, or on 2 ranks again)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch.distributed as tdist

from obinfer.eval import distributed as dist
from obinfer.eval import report, results
from obinfer.eval.distributed import DistributedError, World
from obinfer.eval.results import result_key

TIMING = ("prefill_s", "compress_s", "decode_s")  # differ between any two runs
# decode_rows: how many caches were decoded together (a resumed sample decodes only the rows it lacks)
VOLATILE = (*TIMING, "decode_rows")


# ------------------------------------------------------------------------------------ the world
def test_world_from_env():
    assert dist.world_from_env({}) == World(0, 1, 0) and not World().is_distributed
    w = dist.world_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (w.rank, w.size, w.local_rank, w.is_distributed, w.is_main) == (3, 4, 1, True, False)
    assert dist.world_from_env({"RANK": "0", "WORLD_SIZE": "1"}) == World(0, 1, 0)  # torchrun, 1 process
    for env, needle in [
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "0 <= RANK < WORLD_SIZE"),
        ({"WORLD_SIZE": "2"}, "RANK is not set"),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "-1"}, "LOCAL_RANK >= 0"),
    ]:
        with pytest.raises(DistributedError, match=needle.replace("(", r"\(")):
            dist.world_from_env(env)


def test_device_and_backend_per_rank():
    w = World(5, 8, 1)
    assert dist.rank_device("cuda", w) == "cuda:1"  # one GPU per local rank
    assert dist.rank_device("cuda:3", w) == "cuda:3" and dist.rank_device("cpu", w) == "cpu"
    assert dist.rank_device("cuda", World()) == "cuda"
    assert [dist.backend_for(d) for d in ("cpu", "cuda", "cuda:1")] == ["gloo", "nccl", "nccl"]


# ------------------------------------------------------------------------------------- sharding
def _samples(tasks=("niah_single_1", "vt"), lengths=(4096, 8192), n=5) -> list[dict]:
    return [{"task": t, "max_seq_length": L, "index": i} for L in lengths for t in tasks for i in range(n)]


@pytest.mark.parametrize("size", [1, 2, 3, 8])
def test_every_sample_has_one_rank_and_shares_are_fair(size):
    samples = _samples()
    shares = [dist.my_samples(samples, World(r, size)) for r in range(size)]
    ids = [(s["task"], s["max_seq_length"], s["index"]) for share in shares for s in share]
    assert sorted(ids) == sorted((s["task"], s["max_seq_length"], s["index"]) for s in samples)
    for task in ("niah_single_1", "vt"):  # each (task, length) spread evenly: at most one apart
        for L in (4096, 8192):
            counts = [sum(s["task"] == task and s["max_seq_length"] == L for s in sh) for sh in shares]
            assert max(counts) - min(counts) <= 1, counts
    assert all(shares) or size > len(samples)
    for share in shares:  # in the run's order
        at = [samples.index(s) for s in share]
        assert at == sorted(at)


def test_sharding_is_a_function_of_the_sample_alone():
    """Not of the list it is in, nor its position: a rerun with other samples assigns the same rank."""
    samples = _samples()
    rank = {(s["task"], s["max_seq_length"], s["index"]): dist.sample_rank(s["task"], s["max_seq_length"],
                                                                            s["index"], 3) for s in samples}  # fmt: skip
    fewer = [s for s in reversed(samples) if s["index"] % 2]
    for r in range(3):
        for s in dist.my_samples(fewer, World(r, 3)):
            assert rank[(s["task"], s["max_seq_length"], s["index"])] == r
    # different tasks do not all start on rank 0 (one sample each would leave the other ranks idle)
    starts = {
        dist.sample_rank(t, 2048, 0, 4)
        for t in ("niah_single_1", "niah_single_2", "vt", "cwe", "fwe", "qa_1")
    }
    assert len(starts) > 1
    assert dist.shard_path("out", World(1, 12)) == Path("out/shards/rank00001-of-00012.jsonl")


# -------------------------------------------------------------------------------------- merging
def _row(i: int, press: str = "snapkv", **extra) -> dict:
    return {"task": "vt", "length": 1000, "index": i, "press": press, "ratio": 0.5, "mode": "agnostic",
            "score": 1.0, "pred": "é"} | extra  # fmt: skip


def _write_rows(path: Path, rows: list[dict], tail: bytes = b"") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows) + tail)


def test_merge_is_ordered_deduplicated_atomic_and_idempotent(tmp_path):
    main, s0, s1 = (tmp_path / "results.jsonl", dist.shard_path(tmp_path, World(0, 2)),
                    dist.shard_path(tmp_path, World(1, 2)))  # fmt: skip
    old = dist.shard_path(tmp_path, World(2, 3))  # an earlier job's shard, another world size
    _write_rows(main, [_row(4)])
    _write_rows(s0, [_row(0), _row(2)])
    _write_rows(s1, [_row(1), _row(3, pred="first")], tail=b'{"task": "vt", "len')  # rank 1 died mid-write
    _write_rows(old, [_row(3, pred="second"), _row(9)])  # row 3 twice: kept once, the first copy
    order = {result_key(_row(i)): i for i in range(6)}  # row 9 is not in this run's order: last
    merged = dist.merge_results(tmp_path, order)
    assert [(r["index"], r["pred"]) for r in merged] == [(0, "é"), (1, "é"), (2, "é"), (3, "first"),
                                                          (4, "é"), (9, "é")]  # fmt: skip
    assert results.read_results(main) == merged and main.read_bytes().count(b"\n") == 6
    assert dist.shard_files(tmp_path) == [] and not (tmp_path / "shards").exists()
    data = main.read_bytes()
    assert dist.merge_results(tmp_path, order) == merged and main.read_bytes() == data  # again: the same
    # a merge killed after writing results.jsonl but before deleting the shards: merging again is the same
    _write_rows(s1, [_row(1), _row(3, pred="first")])
    assert dist.merge_results(tmp_path, order) == merged and main.read_bytes() == data
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_merge_keeps_an_answer_redone_with_a_larger_cap(tmp_path):
    """A row cut short at its cap (missing references) and the same answer redone with a larger cap on
    another rank: the merge keeps the redone one, wherever it is; a row that was not cut short is kept
    even against a larger cap's copy."""
    main, s0 = tmp_path / "results.jsonl", dist.shard_path(tmp_path, World(0, 2))
    short = dict(cap=4, new_tokens=4, score=0.0)
    _write_rows(main, [_row(0, pred="abcd", **short), _row(1, pred="ab", cap=4, new_tokens=2, score=0.0)])
    _write_rows(s0, [_row(0, pred="abcdef", cap=8, new_tokens=6, score=1.0),
                     _row(1, pred="other", cap=8, new_tokens=5, score=1.0)])  # fmt: skip
    merged = dist.merge_results(tmp_path, {result_key(_row(i)): i for i in range(2)})
    assert [(r["index"], r["pred"]) for r in merged] == [(0, "abcdef"), (1, "ab")]
    assert results.read_results(main) == merged and main.read_bytes().count(b"\n") == 2
    assert dist.finished_rows(tmp_path)[result_key(_row(0))]["cap"] == 8


def test_merge_without_flock_on_the_shared_filesystem(tmp_path, monkeypatch, caplog):
    import contextlib
    import errno

    @contextlib.contextmanager
    def no_lock(directory):  # noqa: ANN001, ANN202 - e.g. a Lustre mount without flock
        raise OSError(errno.ENOLCK, "No locks available")
        yield

    monkeypatch.setattr(dist, "locked", no_lock)
    _write_rows(dist.shard_path(tmp_path, World(1, 2)), [_row(1), _row(0)])
    assert [r["index"] for r in dist.merge_results(tmp_path, {result_key(_row(i)): i for i in range(2)})] == [
        0,
        1,
    ]
    assert "merging without the lock" in caplog.text and not (tmp_path / "shards").exists()


def test_merge_refuses_a_damaged_middle_line_and_keeps_everything(tmp_path):
    s0 = dist.shard_path(tmp_path, World(0, 2))
    _write_rows(s0, [_row(0)], tail=b"{oops\n" + json.dumps(_row(1)).encode() + b"\n")
    with pytest.raises(results.ResultsError, match=r"rank00000-of-00002.jsonl:2: not valid JSON"):
        dist.merge_results(tmp_path)
    assert s0.is_file() and not (tmp_path / "results.jsonl").exists()
    with pytest.raises(results.ResultsError, match="rank00000-of-00002.jsonl:2"):  # and resume says so too
        results.check_out_dir(tmp_path, resume=True)


def test_shards_count_as_results_for_resume_and_report(tmp_path):
    s1 = dist.shard_path(tmp_path, World(1, 2))
    _write_rows(s1, [_row(0), _row(1, press="full", ratio=0.0)], tail=b'{"torn')
    with pytest.raises(results.ResultsError, match=r"rank00001-of-00002.jsonl already exists.*--resume"):
        results.check_out_dir(tmp_path, resume=False)
    results.check_out_dir(tmp_path, resume=True)  # a torn last line is no damage
    assert dist.finished_rows(tmp_path).keys() == {
        result_key(_row(0)),
        result_key(_row(1, press="full", ratio=0.0)),
    }
    assert dist.finished_rows(tmp_path, skip=s1) == {}
    # the report reads the unmerged shard (results.jsonl does not exist yet), naming the torn line
    warned = []
    text, _ = report.make_report(tmp_path, plots=False, n_boot=10, warn=warned.append)
    assert "snapkv" in text and "full" in text
    assert len(warned) == 1 and "rank00001-of-00002.jsonl:3" in warned[0]
    with pytest.raises(results.ResultsError, match="rank00001-of-00002.jsonl:3"):
        report.make_report(tmp_path, plots=False, strict=True)
    _write_rows(tmp_path / "results.jsonl", [_row(0)])  # in both: counted once
    assert len(results.scan_results_dir(tmp_path).rows) == 2
    with pytest.raises(results.ResultsMissing):
        report.make_report(tmp_path / "empty", plots=False)


# -------------------------------------------------------------------------------------- waiting
class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


def test_rank0_waits_for_working_ranks_and_names_a_silent_one():
    store, clock = tdist.HashStore(), FakeClock()
    store.set("p/done/0", "1")
    beats = iter(range(1, 100))

    def sleep(s: float) -> None:  # rank 1 writes a row every 50 s and is done after 400 s; rank 2 is done
        clock.sleep(s)
        if clock.t % 50 == 0:
            store.set("p/rows/1", str(next(beats)))
        if clock.t >= 400:
            store.set("p/done/1", "1")

    store.set("p/done/2", "1")
    dist.wait_for_ranks(store, "p", 3, timeout_s=60, poll_s=10, clock=clock, sleep=sleep)
    assert clock.t == 400  # slower than the timeout in all, but never silent for it
    store2, clock2 = tdist.HashStore(), FakeClock()
    store2.set("q/done/0", "1")
    store2.set("q/rows/1", "7")  # then nothing: it died (or hangs)
    with pytest.raises(
        DistributedError, match=r"rank 1 neither finished nor wrote a result for 60 s.*--resume"
    ):
        dist.wait_for_ranks(store2, "q", 2, timeout_s=60, poll_s=10, clock=clock2, sleep=clock2.sleep)
    assert 60 < clock2.t <= 80


def test_die_hook_names_one_rank(monkeypatch):
    monkeypatch.setenv(dist.DIE_ENV, "1:4")
    assert dist.die_after_rows(World(1, 2)) == 4 and dist.die_after_rows(World(0, 2)) is None
    monkeypatch.setenv(dist.DIE_ENV, "x")
    with pytest.raises(DistributedError, match="RANK:N"):
        dist.die_after_rows(World(0, 2))
    monkeypatch.delenv(dist.DIE_ENV)
    assert dist.die_after_rows(World(1, 2)) is None


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_bad_torchrun_settings_and_a_missing_rank_are_one_line(tiny_chat_dir, tmp_path, monkeypatch, capsys):
    """A rank that never comes stops the others after --dist-timeout, with one line; no hang."""
    import time

    from obinfer import cli

    argv = [*ARGS, "--model", str(tiny_chat_dir), "--out", str(tmp_path / "out")]
    for var in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "x")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err == "obinfer: error: RANK='x' is not an integer (launch with torchrun)\n"
    monkeypatch.setenv("RANK", "0")
    assert cli.main([*argv, "--dist-timeout", "0"]) == 2
    assert "--dist-timeout must be > 0" in capsys.readouterr().err
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    t0 = time.monotonic()
    assert cli.main([*argv, "--dist-timeout", "1"]) == 2  # rank 1 never starts
    err = capsys.readouterr().err
    assert (
        err.startswith("obinfer: error: rank 0: torch.distributed (gloo) did not start")
        and err.count("\n") == 1
    )
    assert "--dist-timeout 1 s" in err and time.monotonic() - t0 < 30
    assert not tdist.is_initialized() and not (tmp_path / "out" / "results.jsonl").exists()


# ----------------------------------------------------------------------------------- end to end
ARGS = ["eval", "--presses", "full,snapkv,adakv-snapkv-obk", "--ratios", "0.5", "--tasks",
        "niah_single_1,niah_single_2", "--length", "560", "--samples", "3", "--max-new-tokens", "3",
        "--no-progress", "--dist-timeout", "120"]  # fmt: skip
N_ROWS = 2 * 3 * 3  # tasks x samples x (press, ratio)


def _torchrun(
    model: Path, out: Path, n: int, *extra: str, env: dict | None = None
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
           "-m", "obinfer", *ARGS, "--model", str(model), "--out", str(out), *extra]  # fmt: skip
    full_env = {k: v for k, v in os.environ.items() if k != dist.DIE_ENV} | {"OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=full_env | (env or {}))


def _rows(path: Path, drop=TIMING) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in drop} for r in rows]


def _without(rows: list[dict], drop) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in drop} for r in rows]


@pytest.fixture(scope="module")
def single(tiny_chat_dir, tmp_path_factory):
    """The reference: the same evaluation in one process (no torchrun)."""
    from obinfer import cli

    out = tmp_path_factory.mktemp("single") / "out"
    assert cli.main([*ARGS, "--model", str(tiny_chat_dir), "--out", str(out)]) == 0
    rows = _rows(out / "results.jsonl")
    assert len(rows) == N_ROWS
    return rows


def test_two_ranks_give_the_rows_of_one_process(tiny_chat_dir, tmp_path, single):
    out = tmp_path / "out"
    run = _torchrun(tiny_chat_dir, out, 2)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"{N_ROWS} results in {out / 'results.jsonl'}" in run.stdout
    n1 = int(re.search(r"rank 1 of 2: done, (\d+) results in its shard", run.stdout).group(1))
    assert 0 < n1 < N_ROWS and n1 % 3 == 0  # both ranks worked, each on whole samples
    assert _rows(out / "results.jsonl") == single  # row for row, in the same order (all but timings)
    assert not (out / "shards").exists()
    prefills = Counter(r["prefill_s"] for r in _rows(out / "results.jsonl", drop=()))
    assert sorted(prefills.values()) == [3] * 6  # one shared prefill per sample for its 3 presses


def test_a_killed_rank_resumes_with_nothing_lost_or_duplicated(tiny_chat_dir, tmp_path, single):
    from obinfer import cli

    out = tmp_path / "out"
    died = _torchrun(tiny_chat_dir, out, 2, env={dist.DIE_ENV: "1:4"})  # rank 1 killed after 4 rows
    assert died.returncode != 0
    assert not (out / "results.jsonl").exists()  # nothing merged
    shard1 = dist.shard_path(out, World(1, 2))
    data = shard1.read_bytes()
    assert data.count(b"\n") == 4 and not data.endswith(b"\n")  # 4 rows and a torn 5th
    kept = [json.loads(line) for line in data.splitlines()[:4]]
    assert len({(r["task"], r["index"]) for r in kept}) == 2  # killed in the middle of its 2nd sample
    # the report reads the unmerged shards meanwhile (naming rank 1's torn line)
    assert cli.main(["report", str(out), "--no-plots", "--bootstrap", "10"]) == 0
    # without --resume: refused; with it, in ONE process (another world size): the rest only
    assert cli.main([*ARGS, "--model", str(tiny_chat_dir), "--out", str(out)]) == 2
    assert cli.main([*ARGS, "--model", str(tiny_chat_dir), "--out", str(out), "--resume"]) == 0
    final = _rows(out / "results.jsonl", drop=())
    assert Counter(result_key(r) for r in final) == Counter(result_key(r) for r in single)  # once each
    assert _without(final, VOLATILE) == _without(single, VOLATILE)
    for row in kept:  # rank 1's finished rows were kept as written, not redone
        assert row in final
    assert not (out / "shards").exists()

    # rank 0 killed this time, and resumed on 2 ranks: it repairs its own torn shard and continues it
    out2 = tmp_path / "out2"
    assert _torchrun(tiny_chat_dir, out2, 2, env={dist.DIE_ENV: "0:2"}).returncode != 0
    before = dist.shard_path(out2, World(0, 2)).read_bytes()
    assert before.count(b"\n") == 2 and not before.endswith(b"\n")
    rerun = _torchrun(tiny_chat_dir, out2, 2, "--resume")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    final2 = _rows(out2 / "results.jsonl", drop=())
    assert _without(final2, VOLATILE) == _without(single, VOLATILE)
    assert all(json.loads(line) in final2 for line in before.splitlines()[:2])
