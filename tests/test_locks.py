"""The cache lock: a dead holder never blocks (also when it forked children that live on with
the lock file open, as FFCV's writers did), and a long wait says on whom it waits."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from loaders.common import file_lock
from tests.conftest import ROOT

HOLD = """
import os, sys, time
from loaders.common import file_lock
with file_lock(sys.argv[1]):
    if os.fork() == 0:          # a child that inherits the open lock file and outlives us
        time.sleep(float(sys.argv[2]))
        os._exit(0)
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def holder(lock, seconds):
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(lock), str(seconds)], cwd=ROOT, stdout=subprocess.PIPE,
                         text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.stdout.readline().strip() == "locked"
    return p


def test_a_killed_holder_with_a_live_forked_child_does_not_block(tmp_path):
    lock = tmp_path / ".lock"
    p = holder(lock, 30)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    t0 = time.monotonic()
    with file_lock(lock):
        took = time.monotonic() - t0
    assert took < 5, took                   # flock, inherited by the child, would wait 30 s
    subprocess.run(["pkill", "-f", HOLD.splitlines()[1]], check=False)


def test_a_long_wait_names_the_holder(tmp_path, capsys):
    lock = tmp_path / ".lock"
    p = holder(lock, 2)
    with file_lock(lock, what="dataset cache", notice_after=0.3):
        pass
    err = capsys.readouterr().err
    assert f"for the lock on {lock} (dataset cache), held by pid {p.pid}" in err, err
    p.wait()
