"""`--budget 4m`: size the stages' epochs so the whole run ends inside a wall-clock budget.

The clock starts when the run starts (data ingest, compile and evaluation count). Before the
first step the engine times a few training steps on the real model (a probe restored after:
weights, BatchNorm statistics and RNG untouched) and estimates an epoch (its steps plus its
evaluation); the epochs that fit are shared among the stages in the proportions of the
preset's `--epochs` (the report's four-stage shape), pretraining getting at least one. At each
epoch end the plan is re-made from the measured epoch times when the projected end moves by
more than `MARGIN`; each stage's lr schedule follows its (new) length. A reserve is kept for
the last checkpoint, the plots and the summary. On a VM the host may take CPU time from the
run ("steal" in /proc/stat): the summary states it, since it explains a plan that shrank.
"""
from __future__ import annotations

import math
import os
import re

MARGIN = 0.10            # re-plan when the projected remaining epochs move by more than this
OVERRUN_EPOCHS = 0.1     # a plan that overruns by less than this share of an epoch is kept
RESERVE_S = 3.0          # plots, last checkpoint, summary
RESERVE_FRAC = 0.04      # and a share of the budget for timing noise
STEAL_NOTE = 0.05        # the summary names the host's steal from this share of the CPU time

_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_duration(text: str) -> float:
    """'4m', '90s', '1h30m', '2.5m' or plain seconds ('240') -> seconds; ValueError otherwise."""
    t = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        return float(t)
    parts = re.findall(r"(\d+(?:\.\d+)?)([smh])", t)
    if not parts or "".join(a + b for a, b in parts) != t:
        raise ValueError(text)
    return sum(float(a) * _UNITS[u] for a, u in parts)


def usable_seconds(budget_s: float) -> float:
    return budget_s * (1 - RESERVE_FRAC) - RESERVE_S


def share(total: int, weights: list[int]) -> list[int]:
    """`total` epochs shared in proportion to `weights` (largest remainder), the first stage
    with a weight getting at least one when total >= 1."""
    if total <= 0 or not weights:
        return [0] * len(weights)
    w = sum(weights) or 1
    raw = [total * x / w for x in weights]
    out = [math.floor(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: raw[i] - out[i], reverse=True)[: total - sum(out)]:
        out[i] += 1
    first = next(i for i, x in enumerate(weights) if x > 0) if any(weights) else 0
    if out[first] == 0:
        j = max(range(len(out)), key=lambda i: out[i])
        out[j] -= 1
        out[first] += 1
    return out


def plan(weights: list[int], epoch_s: float, remaining_s: float) -> list[int]:
    """Epochs per stage that fit `remaining_s` at `epoch_s` seconds an epoch (at least 1 in all)."""
    fit = max(int(remaining_s // max(epoch_s, 1e-9)), 1)
    return share(fit, weights)


def replan(current: list[int], done: list[int], weights: list[int], epoch_s: float,
           remaining_s: float) -> list[int] | None:
    """A new plan when the epochs that still fit differ from the planned ones by more than
    MARGIN (or would overrun), else None. `done[i]` epochs of stage i are finished. Finished
    stages keep their counts; the epochs of the stage in progress and of the later stages
    are shared anew in the preset's proportions, the stage in progress keeping at least the
    epochs it has done."""
    planned_left = sum(c - d for c, d in zip(current, done))
    epochs_left = remaining_s / max(epoch_s, 1e-9)
    fit = max(int(epochs_left), 0)
    # Kept: a plan within the margin, or one that overruns by timing noise only (the reserve
    # absorbs it). Without that tolerance, with the time left near a whole number of epochs,
    # each check's noise grew or shrank the plan by one (8 <-> 9 epochs in a make train run).
    if fit * (1 - MARGIN) <= planned_left <= epochs_left + OVERRUN_EPOCHS:
        return None
    active = next((i for i, (c, d) in enumerate(zip(current, done)) if d < c), len(current))
    if active == len(current):
        return None
    if fit >= 10:                                     # a cushion: timing noise neither overruns nor re-plans
        fit = int(fit * (1 - MARGIN / 2))
    target = share(done[active] + fit, weights[active:])
    target[0] = max(target[0], done[active])
    excess = sum(target) - done[active] - fit
    for j in range(len(target) - 1, 0, -1):           # the floor above is paid by the last stages
        take = min(excess, target[j])
        target[j] -= take
        excess -= take
    new = current[:active] + target
    return new if new != current else None


def host_steal_seconds(stat_path: str = "/proc/stat") -> float | None:
    """CPU seconds the hypervisor has taken from this machine since boot (all CPUs summed), from
    the steal column of /proc/stat's `cpu` line: 0 without a hypervisor, None where
    /proc/stat or its steal column is missing (not Linux)."""
    try:
        with open(stat_path) as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK") if fields[0] == "cpu" else None
    except (OSError, IndexError, ValueError):
        return None
