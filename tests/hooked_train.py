"""`engine.train` with the test hooks, for tests that run the CLI in a subprocess or torchrun.

    python -m tests.hooked_train [--debug-nan-steps 1,2,5] [--debug-step-sleep S]
                                 [--debug-save-sleep S] [--debug-ingest-sleep S]
                                 [--record-samples DIR] ENGINE-FLAGS...

--debug-nan-steps: multiply the batch by NaN at these global steps (0-based).
--debug-step-sleep: sleep after every step (no effect on the numbers: lets a test kill a run
  mid-epoch); --debug-save-sleep: after each torch.save into a temp file, before its rename
  (a kill mid-checkpoint); --debug-ingest-sleep: after each image the dataset ingest takes in.
--record-samples DIR: each rank writes, per epoch, the sample indices and
labels it was given (rank{r}-epoch{e}.json), and its final weights (weights-rank{r}.pt).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from engine.loop import Hooks
from loaders.base import dist_rank_world
from loaders.common import atomic_write


def hooks_from_args(argv: list[str]) -> tuple[Hooks, list[str]]:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--debug-nan-steps", default="")
    p.add_argument("--debug-step-sleep", type=float, default=0.0)
    p.add_argument("--debug-save-sleep", type=float, default=0.0)
    p.add_argument("--debug-ingest-sleep", type=float, default=0.0)
    p.add_argument("--record-samples", default="")
    ns, rest = p.parse_known_args(argv)
    if ns.debug_save_sleep:
        _sleep_after(torch, "save", ns.debug_save_sleep, lambda obj, f, *a, **k: str(f).endswith(".tmp"))
    if ns.debug_ingest_sleep:
        import loaders.datasets
        _sleep_after(loaders.datasets, "_ingest_image", ns.debug_ingest_sleep)
    hooks = Hooks()
    nan_steps = {int(s) for s in ns.debug_nan_steps.split(",") if s}
    if nan_steps:
        hooks.batch = lambda step, x: x * float("nan") if step in nan_steps else x
    if ns.debug_step_sleep:
        hooks.after_step = lambda step: time.sleep(ns.debug_step_sleep)
    if ns.record_samples:
        rec = Path(ns.record_samples)

        def epoch_end(loader, epoch, labels, start_batch):
            rank, world = dist_rank_world()
            skip = start_batch * loader.opts.batch_size
            idx = [int(i) for i in loader.sample_indices(epoch)][skip: skip + len(labels)]
            atomic_write(rec / f"rank{rank}-epoch{epoch}.json",
                         json.dumps(dict(rank=rank, world=world, epoch=epoch, indices=idx, labels=labels)))

        def run_end(model):
            rec.mkdir(parents=True, exist_ok=True)
            torch.save({k: v.cpu() for k, v in model.state_dict().items()},
                       rec / f"weights-rank{dist_rank_world()[0]}.pt")
        hooks.epoch_end, hooks.run_end = epoch_end, run_end
    return hooks, rest


def _sleep_after(owner, name: str, seconds: float, when=lambda *a, **k: True) -> None:
    """Make owner.name sleep `seconds` after each call (for which `when` holds)."""
    if not hasattr(owner, name):
        raise SystemExit(f"tests/hooked_train.py: {owner.__name__}.{name} is gone; update the hook")
    fn = getattr(owner, name)

    def slowed(*a, **k):
        out = fn(*a, **k)
        if when(*a, **k):
            time.sleep(seconds)
        return out
    setattr(owner, name, slowed)


def main(argv=None) -> dict:
    from engine.train import main as train_main
    hooks, rest = hooks_from_args(sys.argv[1:] if argv is None else list(argv))
    return train_main(rest, hooks)


if __name__ == "__main__":
    main()
