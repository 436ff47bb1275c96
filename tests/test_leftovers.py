"""Nothing outlives a killed run: no worker process (FFCV's .beton writers, DataLoader
workers, multiprocessing's resource tracker), and no temp file once the folder is written
again (`remove_stale_temps`: never one whose writer still lives)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.rundir import RunFolder
from loaders.common import remove_stale_temps
from tests.conftest import ROOT, children, descendants, running
from tests.test_train import make_tiny_folder

# A process that starts workers which then hang in a slow read, and says when they exist.
VICTIMS = {
    "ffcv": """
import sys, time
from loaders import ffcv as F
from loaders.datasets import load_dataset
F._read = lambda path, hw: time.sleep(60)
F.ensure_beton(load_dataset("imagefolder:" + sys.argv[1], sys.argv[2]).train, (32, 32), workers=2)
""",
    "torchvision": """
import sys, time
import loaders.torchvision as T
from loaders.base import LoaderOptions, build_loader
from loaders.datasets import load_dataset
from loaders.spec import AugmentSpec
T._Files._read = lambda self, i: time.sleep(60)
split = load_dataset("imagefolder:" + sys.argv[1], sys.argv[2]).train
loader = build_loader("torchvision", split, AugmentSpec(size=32), LoaderOptions(train=True, batch_size=4, workers=2))
loader.set_epoch(0)
next(iter(loader))
""",
}


def python(code: str, *argv) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", code, *map(str, argv)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def workers_of(proc, n: int, timeout: float = 120) -> list[int]:
    """The pids of `proc`'s descendants once `n` worker processes (not the resource tracker) exist."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        if sum(b"resource_tracker" not in cmdline(k) for k in children(proc.pid)) >= n:
            time.sleep(0.3)                   # the workers past their start-up
            return descendants(proc.pid)
        time.sleep(0.05)
    pytest.fail(f"no {n} workers within {timeout} s")


class sleeper:
    """A live process (its pid) for the duration of a with block."""

    def __enter__(self) -> int:
        self.p = subprocess.Popen(["sleep", "60"])
        return self.p.pid

    def __exit__(self, *exc):
        self.p.kill()
        self.p.wait()


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("loader", ["ffcv", "torchvision"])
def test_sigkill_leaves_no_worker_process(loader, tmp_path):
    if loader == "ffcv":
        pytest.importorskip("ffcv", reason="FFCV is not installed here")
    data = make_tiny_folder(tmp_path / "data")
    proc = python(VICTIMS[loader], data, tmp_path / "cache")
    try:
        pids = workers_of(proc, 2)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
        proc.wait()
    left = running(pids, within=5)
    for pid in left:                          # never leave them to the next test
        os.kill(pid, signal.SIGKILL)
    assert not left, f"{len(left)} of {len(pids)} processes outlived the killed {loader} parent"
    if loader == "ffcv":                      # the dead writer's temp goes at the next build
        from loaders import ffcv as F
        from loaders.datasets import load_dataset
        folder = next((tmp_path / "cache").glob("*/ffcv"))
        dead = list(folder.glob(".*.tmp"))
        assert all(f".{proc.pid}." in p.name for p in dead), dead
        if not dead:        # the tiny build finished before the kill (a quiet machine): a stale one by hand
            dead = [folder / f".{next(folder.glob('*.beton')).name}.{dead_pid()}.dead0000.tmp"]
            dead[0].touch()
        with sleeper() as live:
            mine = folder / f".{dead[0].name.split('.')[1]}.beton.{live}.abcd1234.tmp"   # a live writer's
            mine.touch()
            F.ensure_beton(load_dataset(f"imagefolder:{data}", tmp_path / "cache").train, (32, 32), workers=1)
            assert sorted(folder.glob(".*.tmp")) == [mine]


def test_stale_temps_go_live_writers_temps_stay(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    dead = dead_pid()
    with sleeper() as live:
        stale = [run / f".last.pt.{dead}.k2j4_x9a.tmp", run / f".metrics.csv.{dead}.zz1.tmp",
                 run / ".prev.pt.12.tmp"]                       # an old name without a pid, 2 h old
        kept = [run / f".last.pt.{live}.a8d7f6s5.tmp", run / f".last.pt.{os.getpid()}.qqq.tmp",
                run / ".last.pt.abc123.tmp",                    # no pid, recent: maybe a live writer's
                run / "last.pt", run / f"notes.{dead}.x.tmp"]   # not a temp name
        for f in stale + kept:
            f.write_bytes(b"x")
        os.utime(stale[-1], (time.time() - 7200, time.time() - 7200))
        RunFolder(run).create()                                 # a run (new or resumed) takes the folder
        assert sorted(run.iterdir()) == sorted(kept)
        sub = run / "sub"
        sub.mkdir()
        (sub / f".x.{dead}.r.tmp").write_bytes(b"")
        assert remove_stale_temps(run) == [] and remove_stale_temps(run, recursive=True) == [sub / f".x.{dead}.r.tmp"]


DIES_WITH_PARENT = """
import multiprocessing, os, sys, time
from loaders.common import die_with_parent

def work(marker):
    time.sleep(1.5)                 # the parent is gone before the call: the race it closes
    die_with_parent()
    open(marker, "w").close()
    time.sleep(60)

if __name__ == "__main__":
    p = multiprocessing.Process(target=work, args=(sys.argv[1],))
    p.start()
    print(p.pid, flush=True)
    os._exit(0)
"""


def test_a_worker_whose_parent_died_before_die_with_parent_goes_too(tmp_path):
    proc = python(DIES_WITH_PARENT, tmp_path / "survived")
    worker = int(proc.stdout.readline())
    proc.wait()
    left = running([worker], within=8)
    if left:
        os.kill(worker, signal.SIGKILL)
    assert not left and not (tmp_path / "survived").exists()
