"""SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C) stop a run at a step boundary.

While training, the two signals only set a flag; the epoch loop then checkpoints at the next
step boundary and raises `Stopped`, and the CLI exits 128+signal with the `--resume` command.
A second signal acts at once (the previous handler is back). Single process only: under DDP
the ranks would have to agree on the step (a collective per step), so torchrun runs keep the
default handlers and rely on the epoch-end and `--checkpoint-every` checkpoints.
"""
from __future__ import annotations

import contextlib
import signal
import threading


class Stopped(Exception):
    """The run checkpointed where it stood and stops; `--resume` continues."""

    def __init__(self, signum: int, where: str):
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}")
        self.signum = signum


class StopFlag:
    """The signal received, if any (None while none)."""

    def __init__(self):
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None


@contextlib.contextmanager
def stop_on_signals(flag: StopFlag, world: int):
    if world > 1 or threading.current_thread() is not threading.main_thread():
        yield
        return
    wanted = (signal.SIGTERM, signal.SIGINT)
    previous = {s: signal.getsignal(s) for s in wanted}

    def handler(signum, _frame):
        flag.signum = signum
        for s in wanted:                               # the next one is not deferred
            signal.signal(s, previous[s])
    for s in wanted:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s in wanted:
            signal.signal(s, previous[s])
