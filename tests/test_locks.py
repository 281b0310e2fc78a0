"""One writer per output folder (shard_tools.lock), and Ray tasks that reserve the cores they use.

Each test starts real processes on tiny frame-number-coded videos; a writer
is caught holding its lock by stopping it (SIGSTOP), so nothing here depends
on how fast a process runs.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shard_tools.lock import dataset_lock, lock_name, writer_lock
from shard_tools.make_shards import main as make_shards
from shard_tools.merge_parts import main as merge_parts
from shard_tools.sources import UsageError
from shard_tools.wds_index import write_index
from tests import media
from tests.conftest import REPO

COMMON = ["--short-side", "32", "--quiet", "--samples-per-shard", "2"]


def _src(root: Path, count: int, frames: int = 24) -> Path:
    """SRC/c/v00.mkv ...: ``count`` tiny coded videos."""
    (root / "c").mkdir(parents=True)
    for i in range(count):
        media.write_coded_video(root / "c" / f"v{i:02d}.mkv", frames + i, height=32, width=48)
    return root


def _snapshot(out: Path) -> dict[str, str]:
    """Every file of OUT and a hash of its bytes: what a refused writer must leave as it was."""
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}


def _valid_dataset(out: Path, count: int) -> None:
    """OUT is one complete dataset: every tar readable, every index what write_index gives, every input
    once, indices 0..count-1 in manifest order, nothing temporary left."""
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["total_samples"] == count and manifest["failed"] == 0
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(s["path"] for s in manifest["shards"])
    sources, indices = [], []
    for shard in manifest["shards"]:
        tar = out / shard["path"]
        with tarfile.open(tar) as t:
            for m in t:
                data = t.extractfile(m).read()
                if m.name.endswith(".json"):
                    info = json.loads(data)
                    sources.append(info["source"])
                    indices.append(info["index"])
        write_index(str(tar), str(out / "check.idx"))
        assert (out / "check.idx").read_bytes() == tar.with_suffix(".idx").read_bytes(), tar
        (out / "check.idx").unlink()
    assert sorted(sources) == [f"c/v{i:02d}.mkv" for i in range(count)]
    assert indices == list(range(count))
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


@contextlib.contextmanager
def _started(cmd: list[str], **kw) -> Iterator[subprocess.Popen]:
    """``cmd`` started in a session of its own, so that it is stopped and killed with its workers; killed
    with them if it still runs when the block ends, so a failed test leaves no process behind."""
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kw)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def _holder_pid(path: Path) -> int | None:
    try:
        return json.loads(path.read_text() or "{}").get("pid")
    except (OSError, ValueError):
        return None


def _stop_once_locked(proc: subprocess.Popen, lock: Path, deadline: float = 120) -> None:
    """Wait until ``proc`` holds ``lock`` (its pid in the file), then stop its process group there."""
    end = time.time() + deadline
    while _holder_pid(lock) != proc.pid:
        assert proc.poll() is None and time.time() < end, "the writer never took its lock"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGSTOP)
    assert _holder_pid(lock) == proc.pid, "the writer ended before it was stopped"


def test_writer_lock_refuses_a_second_writer_and_is_released(tmp_path):
    out = tmp_path / "out"
    with writer_lock(out, lock_name()) as path:
        holder = json.loads(Path(path).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(UsageError) as refused:  # locks are per open file: the same process is refused too
            with writer_lock(out, lock_name()):
                pass
        assert str(out) in str(refused.value) and f"pid {os.getpid()} on {socket.gethostname()}" in str(refused.value)
        with writer_lock(out, lock_name("p0001of0002")):  # another part's lock is another lock
            pass
    assert Path(path).read_text() == ""  # released: it names no holder
    with writer_lock(out, lock_name("p0001of0002")):  # a part's writer blocks the whole dataset's
        with pytest.raises(UsageError, match=r"which holds \.make_shards\.p0001of0002\.lock"):
            with dataset_lock(out):
                pass
    with dataset_lock(out):  # which takes the dataset's own lock and every part's
        for name in (lock_name(), lock_name("p0001of0002")):
            with pytest.raises(UsageError, match=name.replace(".", r"\.")):
                with writer_lock(out, name):
                    pass
    with pytest.raises(UsageError, match="no such folder"):
        with dataset_lock(tmp_path / "nope"):
            pass


WAIT_THEN_PACK = """\
import os, sys, time
from shard_tools.make_shards import main
if __name__ == "__main__":  # (make_shards' spawned workers import this file too)
    open(sys.argv[1] + "." + str(os.getpid()), "w").close()  # imported: ready
    while not os.path.exists(sys.argv[2]):
        time.sleep(0.001)
    sys.exit(main(sys.argv[3:]))
"""


def test_two_runs_into_one_out_one_packs_the_other_is_refused(tmp_path):
    """Two make_shards processes released at the same instant (both imported,
    waiting on one file) into one OUT: one packs, the other exits 2 naming
    OUT and the running one, and OUT is one valid dataset."""
    src = _src(tmp_path / "src", 6)
    out = tmp_path / "out"
    script = tmp_path / "wait_then_pack.py"
    script.write_text(WAIT_THEN_PACK)
    ready, go = tmp_path / "ready", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(script), str(ready), str(go), str(src), str(out), *COMMON, "--workers", "1"]
    with _started(cmd, env=env) as first, _started(cmd, env=env) as second:
        procs = [first, second]
        end = time.time() + 120
        while len(list(tmp_path.glob("ready.*"))) < 2:
            assert all(p.poll() is None for p in procs) and time.time() < end, "a process ended before the start"
            time.sleep(0.01)
        go.touch()
        said = [p.communicate(timeout=300) for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], said
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    assert "6 packed, 0 failed" in said[winner][0]
    err = said[loser][1]
    assert err.startswith(f"shard_tools.make_shards: error: {out} is being written by pid {procs[winner].pid} on "
                          f"{socket.gethostname()}"), err
    assert "wait_then_pack.py" in err and "Traceback" not in err
    _valid_dataset(out, 6)


def test_sigkill_mid_shard_then_resume_completes(tmp_path):
    """A run killed (SIGKILL, with its workers) while a shard is half written
    leaves its lock file naming a dead process, which blocks nothing:
    --resume packs every input once."""
    src = _src(tmp_path / "src", 7, frames=40)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "shard_tools.make_shards", str(src), str(out), *COMMON, "--workers", "1"]
    with _started(cmd, cwd=REPO) as proc:
        end = time.time() + 120
        while True:  # stopped, then killed, at an instant a shard is open
            assert proc.poll() is None and time.time() < end, "never caught with a shard half written"
            if list(out.glob("train-*.tar.tmp")):
                os.killpg(proc.pid, signal.SIGSTOP)
                if list(out.glob("train-*.tar.tmp")):
                    break
                os.killpg(proc.pid, signal.SIGCONT)
            time.sleep(0.002)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert _holder_pid(out / ".make_shards.lock") == proc.pid  # the file stays; the lock went with the process
    assert make_shards([str(src), str(out), *COMMON, "--workers", "0", "--resume"]) == 0
    _valid_dataset(out, 7)
    assert (out / ".make_shards.lock").read_text() == ""


def test_parts_pack_side_by_side_and_merge_waits_for_them(tmp_path, capsys):
    """Part 0 caught (stopped) holding its lock: a second part-0 writer and
    merge_parts are refused (exit 2, naming part 0's process) and change
    nothing, while part 1 packs at the same time; once part 0 ends, the
    merge gives one valid dataset."""
    src = _src(tmp_path / "src", 6)
    out = tmp_path / "out"
    part = [str(src), str(out), *COMMON]
    with _started([sys.executable, "-m", "shard_tools.make_shards", *part, "--workers", "1", "--part", "0",
                   "--parts", "2"], cwd=REPO) as proc:
        _stop_once_locked(proc, out / ".make_shards.p0000of0002.lock")
        holder = f"is being written by pid {proc.pid} on {socket.gethostname()}"
        before = _snapshot(out)
        assert make_shards([*part, "--workers", "0", "--part", "0", "--parts", "2"]) == 2
        assert f"{out} {holder}" in capsys.readouterr().err
        assert _snapshot(out) == before
        assert make_shards([*part, "--workers", "0", "--part", "1", "--parts", "2"]) == 0  # beside part 0
        assert "part 1 of 2: 3 packed" in capsys.readouterr().out
        before = _snapshot(out)
        assert merge_parts([str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"shard_tools.merge_parts: error: {out} {holder}")
        assert ".make_shards.p0000of0002.lock" in err
        assert _snapshot(out) == before
        os.killpg(proc.pid, signal.SIGCONT)
        stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "part 0 of 2: 3 packed" in stdout
    assert merge_parts([str(out)]) == 0
    _valid_dataset(out, 6)


def _make_shards_workers(marker: str) -> int:
    """make_shards' worker processes alive now under the run tagged ``marker`` (in its environment):
    multiprocessing's spawned children, whatever Ray process started them."""
    count = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"--multiprocessing-fork" not in f.read():
                    continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                count += marker.encode() in f.read().split(b"\0")
        except OSError:  # ended meanwhile, or not ours
            pass
    return count


def test_ray_pack_never_runs_more_workers_than_cpus(tmp_path):
    """ray_pack on a local Ray instance of 2 CPUs, 2 parts, no --workers:
    the make_shards worker processes alive, sampled all along, never exceed
    2 (each part is told --workers 1 and reserves 1 CPU; by itself a part
    starts one per core of the machine), and the parts merge into one valid
    dataset."""
    pytest.importorskip("ray")
    cpus = 2
    src = _src(tmp_path / "src", 6, frames=40)
    out = tmp_path / "out"
    marker = f"VTHCL_LOCK_TEST={tmp_path}"
    env = {**os.environ, marker.split("=")[0]: str(tmp_path)}
    cmd = [sys.executable, "-m", "shard_tools.ray_pack", str(src), str(out), "--parts", "2", "--num-cpus",
           str(cpus), *COMMON]
    with _started(cmd, cwd=REPO, env=env) as proc:
        peak, seen, end = 0, 0, time.time() + 300
        while proc.poll() is None and time.time() < end:
            alive = _make_shards_workers(marker)
            peak, seen = max(peak, alive), seen + (alive > 0)
            time.sleep(0.02)
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-2000:]
    assert "6 packed, 0 failed, from 2 parts" in stdout
    assert seen > 0, "no make_shards worker was ever seen alive: the count proves nothing"
    assert peak <= cpus, f"{peak} make_shards workers alive at once on a Ray instance of {cpus} CPUs"
    _valid_dataset(out, 6)
