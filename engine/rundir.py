"""The run folder: runs/<name>/ and the runs/latest link, written by rank 0 only.

Every write goes through `RunFolder.write`, which turns a full disk into a message naming
the file and the space left instead of a traceback: for metrics, plots and reports the run
warns and goes on (the previous file is intact: atomic writes); for a checkpoint
(`essential=True`) it raises `DiskFull` and the CLI exits 2 with the resume command, the last
good checkpoint intact. torch.save reports a full disk as a RuntimeError from its C++ writer,
not an OSError: both are recognised. `check_writable` runs before any data is read, so a bad --out fails first.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from loaders.common import DISK_FULL, ConfigError, remove_stale_temps
from engine.memory import fmt_bytes


class DiskFull(ConfigError):
    """A file the run cannot continue without could not be written: no space left."""


def check_writable(out: Path, flag: str = "--out") -> None:
    """A one-line ConfigError unless `out` (or its nearest existing parent) takes a file."""
    out = Path(out)
    probe_dir = out
    while not probe_dir.exists():
        if probe_dir.parent == probe_dir:
            break
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise ConfigError(f"{flag} {out}: {probe_dir} is not a folder; pass a folder the run can write into")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".write-test.", dir=probe_dir)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise ConfigError(f"{flag} {out}: cannot write in {probe_dir} ({e.strerror or e}); "
                          "pass a writable folder") from None


def _free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


# How torch.save's C++ writer reports a failed write (a full disk among them).
_WRITER_FAILURES = ("iostream error", "unexpected pos", "failed writing", "file write failed")


def is_disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return e.errno in DISK_FULL
    return isinstance(e, RuntimeError) and any(s in str(e) for s in _WRITER_FAILURES)


class RunFolder:
    def __init__(self, path: Path, rank: int = 0):
        self.path, self.rank = Path(path), rank

    def create(self) -> None:
        """Make the folder (new run) or take it over (resume): temp files a killed process
        left there are deleted (`remove_stale_temps`: never a live writer's)."""
        if self.rank == 0:
            self.path.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(self.path)

    def write(self, name: str, fn, essential: bool = False) -> bool:
        """Run `fn` (which writes self.path/name atomically); rank 0 only. A full disk:
        a warning and False, or DiskFull when `essential`."""
        if self.rank != 0:
            return False
        try:
            fn()
            return True
        except (OSError, RuntimeError) as e:
            if not is_disk_full(e):
                raise
            free = _free_bytes(self.path)
            left = f"{fmt_bytes(free)} left" if free is not None else "no space left"
            old = self.path / name
            if old.exists():
                left += f", the previous one is {fmt_bytes(old.stat().st_size)}"
            if essential:
                raise DiskFull(f"disk full writing {old} ({left}); the previous checkpoint is intact; free "
                               f"some space, then: python -m engine.train --resume {self.path}") from None
            print(f"warning: disk full writing {self.path / name} ({left}); the previous {name} is intact "
                  "and still usable; training goes on and retries at the next write", file=sys.stderr, flush=True)
            return False

    def point_latest(self) -> None:
        """<out>/latest -> this run, swapped atomically."""
        if self.rank != 0:
            return
        link = self.path.parent / "latest"
        tmp = self.path.parent / f".latest.{os.getpid()}"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(self.path.name)
        os.replace(tmp, link)

