"""A full disk for real: the run folder on a small tmpfs (mounted here; needs root, skipped with
the reason otherwise). The checkpoint that does not fit stops the run with one line and exit 2,
the previous checkpoint stays loadable, no temp file is left, and the run resumes once there
is room (here: from a copy on a larger disk)."""
from __future__ import annotations

import csv
import os
import shutil
import subprocess

import pytest

from engine.checkpoint import load_resumable
from tests.hooked_train import main
from tests.test_train import make_tiny_folder


@pytest.fixture
def small_fs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_checkpoint_on_a_full_disk_stops_with_exit_2_and_resumes(tmp_path, small_fs, capsys):
    data = make_tiny_folder(tmp_path / "data")
    argv = ["--preset", "cpu-demo", "--data", f"imagefolder:{data}", "--width", "0.125", "--epochs", "2,0,0,0",
            "--batch-size", "8", "--workers", "0", "--amp", "off", "--checkpoint-every", "2",
            "--cache-dir", str(tmp_path / "cache"), "--name", "full"]
    with pytest.raises(SystemExit) as e:
        main([*argv, "--out", str(small_fs)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2, err
    last = err.splitlines()[-1]
    assert last.startswith(f"error: disk full writing {small_fs / 'full'}/") and "Traceback" not in err, err
    assert "left" in last and "--resume" in last
    state, _ = load_resumable(small_fs / "full")                       # the last good checkpoint
    assert state["position"]["batch"] > 0 or state["position"]["epoch"] > 0
    assert not [p.name for p in (small_fs / "full").iterdir() if p.name.endswith(".tmp")]
    # Room again: the run continues from where it stopped and finishes.
    big = tmp_path / "big"
    shutil.copytree(small_fs / "full", big / "full", symlinks=True)
    main(["--resume", str(big / "full")])
    rows = list(csv.DictReader(open(big / "full" / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
