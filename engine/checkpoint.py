"""Checkpoints that survive a kill at any moment, a full disk and a truncated file.

A run folder holds `last.pt` (the newest resumable state) and `prev.pt` (the one before it).
`save_rotating` writes the new state to a temp file beside them, fsyncs it, turns the current
`last.pt` into `prev.pt` (a hard link swapped in by rename) and renames the temp file over
`last.pt`: whenever the process dies at least one of the two is complete, and a failed write
leaves both untouched. `load_resumable` reads `last.pt` and falls back to `prev.pt` (saying
why) when the former is missing, truncated or corrupt.

A resumable state: the resolved config, the `Position` (the next thing to do), the
`Progress` bookkeeping, model / optimizer / GradScaler states, the metrics rows, the
dataset's classes, and per rank its RNG states and partial-epoch sums.
"""
from __future__ import annotations

import contextlib
import os
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from loaders.common import ConfigError, atomic_path, temp_beside

LAST, PREV = "last.pt", "prev.pt"
FORMAT = 2                  # 2: typed Position/Progress, classes


@dataclass
class Position:
    """Where a run continues: planned stage index, epoch within it, batch within the epoch."""
    stage: int = 0
    epoch: int = 0
    batch: int = 0


@dataclass
class Progress:
    """A run's bookkeeping across epochs and stages."""
    stage_step: int = 0            # optimizer steps taken in the current stage
    stage_best: float = -1.0       # the current stage's best validation accuracy
    best_acc: float = 0.0          # the run's best validation accuracy ...
    best_at: str | None = None     # ... and where ("pretraining epoch 3")
    elapsed: float = 0.0           # train + eval seconds (compile excluded)
    images: int = 0                # training images seen
    reached: dict | None = None    # --target-acc: seconds, images, where
    epoch_global: int = 0          # epochs done across stages: the loaders' epoch number
    global_step: int = 0
    plan: list | None = None       # --budget: epochs per planned stage, as last (re)planned
    budget_spent: float = 0.0      # --budget: wall seconds of earlier processes of this run

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Progress":
        return cls(**d)


def save_checkpoint(path: Path, **state) -> None:
    """One file, written atomically (temp file + fsync + rename)."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def save_rotating(run_dir: Path, state: dict) -> Path:
    """Write `state` as run_dir/last.pt, keeping the previous last.pt as prev.pt."""
    run_dir = Path(run_dir)
    last, prev = run_dir / LAST, run_dir / PREV
    tmp = link = temp_beside(last)
    try:
        torch.save({**state, "format": FORMAT}, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if last.exists():
            link = temp_beside(prev)
            link.unlink()                       # os.link wants a free name
            try:
                os.link(last, link)
            except OSError:                     # no hard links here: copy instead
                import shutil
                shutil.copyfile(last, link)
            os.replace(link, prev)
        os.replace(tmp, last)
        _fsync_dir(run_dir)
    except BaseException:
        for f in {tmp, link}:                   # a failed write leaves no temp file behind
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f)
        raise
    return last


def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_resumable(run_dir: Path, map_location="cpu") -> tuple[dict, Path]:
    """(state, path) from last.pt, else prev.pt with a warning; ConfigError when neither
    is usable."""
    run_dir = Path(run_dir)
    problems = []
    for path in (run_dir / LAST, run_dir / PREV):
        if not path.exists():
            problems.append(f"{path.name} missing")
            continue
        try:
            state = torch.load(path, map_location=map_location, weights_only=False)
            if not isinstance(state, dict) or state.get("format") != FORMAT or "model" not in state:
                raise ValueError("not a resumable checkpoint of this version")
        except Exception as e:  # noqa: BLE001 - truncated pickles raise many kinds of errors
            problems.append(f"{path.name} unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
            continue
        if problems:
            print(f"warning: resume: {'; '.join(problems)}; falling back to {path}", file=sys.stderr, flush=True)
        return state, path
    raise ConfigError(f"--resume {run_dir}: no usable checkpoint ({'; '.join(problems)}); start a new run")


# ------------------------------------------------------------------------------ RNG states

def rng_state() -> dict:
    return dict(torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
                numpy=np.random.get_state(), python=random.getstate())


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
