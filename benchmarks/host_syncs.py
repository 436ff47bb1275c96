"""Host syncs per training step on CUDA: an engine run under
torch.cuda.set_sync_debug_mode("warn"), each synchronising call counted at the source line
that made it.

    python -m benchmarks.host_syncs ENGINE_FLAGS...    (e.g. --preset seed --epochs 1,0,0,0 --no-compile)

The loop is built to sync once an epoch and once every `log_every` steps (the bad-step
check); a `.item()`, `bool(tensor)` or `.cpu()` inside it shows as a line whose count is
about the number of steps. Prints every line with its count and exits 1 when one fires on
more than half the steps. Eager (`--no-compile`) is enough for the loop's own syncs.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESSAGE = "synchronizing CUDA operation"      # torch's text for a sync under debug mode "warn"


@contextlib.contextmanager
def count_syncs():
    """Counter of 'file:line' -> syncs made there while inside (debug mode set on CUDA)."""
    import torch
    counts: Counter = Counter()

    def show(message, category, filename, lineno, file=None, line=None):
        if MESSAGE in str(message):
            counts[f"{os.path.relpath(filename, ROOT)}:{lineno}"] += 1
        else:
            shown(message, category, filename, lineno, file, line)

    cuda = torch.cuda.is_available()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        shown, warnings.showwarning = warnings.showwarning, show
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield counts
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")


def per_step(counts: Counter, steps: int) -> list[str]:
    """The lines that synced on more than half of `steps`."""
    return [site for site, n in counts.items() if n > steps / 2]


def main(argv=None) -> int:
    from engine.config import config_from_args
    from engine.train import main as train
    argv = sys.argv[1:] if argv is None else argv
    with count_syncs() as counts:
        summary = train(argv)
    steps = math.ceil(summary["images"] / config_from_args(argv)[0].batch_size)
    print(f"host syncs: {sum(counts.values())} in {steps} training steps (plus warm-up, eval, checkpoints)")
    for site, n in counts.most_common():
        print(f"  {n:6d}  {site}")
    bad = per_step(counts, steps)
    if bad:
        print(f"FAIL: a sync on more than half the steps at {', '.join(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
