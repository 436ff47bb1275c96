"""One epoch of training, one pass of evaluation, and the compile warm-up.

`train_epoch` runs `train_step` over a loader's batches (from `start_batch` when resuming),
with MixUp and the lr schedule applied per step. Metrics accumulate on the device and are
read once per epoch (and every `log_every` steps for the progress bar): no per-step host
sync. Consecutive skipped steps are tracked on the device (`BadSteps`) and read every step
on CPU (free there) and every `log_every` steps on CUDA. A mid-epoch checkpoint or a stop
signal is handed to the caller's `checkpoint` callback. `Hooks` are test-only callbacks,
injected by tests (tests/hooked_train.py), never part of the user's config.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from engine.distributed import sync_buffers
from engine.precision import ThreadTuner
from engine.signals import StopFlag, Stopped
from engine.step import Engine, eval_logits, model_input, train_step


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps; the message is one line."""


@dataclass
class Hooks:
    batch: Callable | None = None          # (global_step, x) -> x: e.g. poison a batch
    after_step: Callable | None = None     # (global_step) -> None: e.g. sleep so a test can kill
    epoch_end: Callable | None = None      # (loader, epoch, this rank's labels, start_batch) -> None
    run_end: Callable | None = None        # (model) -> None


@dataclass
class EpochSums:
    """A partial epoch's running sums, kept in a mid-epoch checkpoint."""
    acc: torch.Tensor                      # loss sum, correct, images in good steps, skipped steps
    seen: int = 0
    seconds: float = 0.0
    wait: float = 0.0


class BadSteps:
    """Consecutive non-finite steps, counted on the device."""

    def __init__(self, device: torch.device, limit: int):
        self.run = torch.zeros((), dtype=torch.int64, device=device)
        self.max = torch.zeros((), dtype=torch.int64, device=device)
        self.limit = limit

    def update(self, bad: torch.Tensor) -> None:
        self.run = (self.run + 1) * bad
        self.max = torch.maximum(self.max, self.run)

    def in_streak(self) -> bool:
        return int(self.run) > 0

    def check(self, where: str, last_good: str) -> None:
        if int(self.max) >= self.limit:
            raise NonFiniteError(
                f"stopped: {int(self.max)} consecutive steps with a non-finite loss or gradient "
                f"(--max-bad-steps {self.limit}) in {where}; those steps were skipped, so no weight is NaN, "
                f"and the last good checkpoint is {last_good}; lower the lr (--lr-scale), check the data or "
                "--amp, then --resume")


@dataclass
class EpochSetup:
    """What one epoch of training needs beyond the engine and the loader."""
    opt: torch.optim.Optimizer
    lr: Callable[[int], float]             # stage step -> lr
    mixup: Callable | None
    num_classes: int
    desc: str
    epoch: int = 0                         # the loader's epoch (global across stages)
    step0: int = 0                         # the stage step of batch 0
    start_batch: int = 0
    partial: EpochSums | None = None
    log_every: int = 20
    checkpoint_every: int = 0
    checkpoint: Callable | None = None     # (batch, stage step, global step, EpochSums) -> saved?
    last_good: str = "last.pt"
    stop: StopFlag = field(default_factory=StopFlag)
    hooks: Hooks = field(default_factory=Hooks)
    show_bar: bool = True
    threads: ThreadTuner | None = None     # CPU: settles the intra-op thread count in the first steps


def train_epoch(eng: Engine, loader, s: EpochSetup, bad: BadSteps, global_step: int) -> tuple[dict, int]:
    """(epoch metrics, global step after it). The loader's epoch was selected by the caller."""
    eng.model.train()
    dev = eng.device
    sums = s.partial or EpochSums(torch.zeros(4, device=dev))
    acc = sums.acc.to(dev).clone()
    loader.set_epoch(s.epoch, start_batch=s.start_batch)
    n_batches = len(loader)
    bar = tqdm(total=n_batches, initial=s.start_batch, desc=s.desc, leave=False, dynamic_ncols=True,
               disable=not s.show_bar or not sys.stderr.isatty())
    check_every = 1 if dev.type == "cpu" else max(1, s.log_every)
    labels = [] if s.hooks.epoch_end else None
    t0, seen, wait, b = time.perf_counter(), 0, 0.0, s.start_batch
    batches = iter(loader)
    while True:
        t_wait = time.perf_counter()
        try:
            x, y = next(batches)
        except StopIteration:
            break
        wait += time.perf_counter() - t_wait
        step = s.step0 + b
        for g in s.opt.param_groups:
            g["lr"] = s.lr(step)
        if s.hooks.batch:
            x = s.hooks.batch(global_step, x)
        x, y_soft = s.mixup(x, y) if s.mixup else (x, F.one_hot(y, s.num_classes).float())
        r = train_step(eng, s.opt, model_input(x, eng.amp), y_soft)
        good = (~r.bad).float()
        # Train accuracy against each mixed image's dominant label (MixUp's lam ~ Beta(a, a)
        # is mostly near 0 or 1, so half the batches are mostly the *other* image).
        acc += torch.stack([torch.where(r.bad, 0.0, r.loss * y.shape[0]),
                            (r.logits.argmax(1) == y_soft.argmax(1)).sum() * good, good * y.shape[0], 1 - good])
        bad.update(r.bad)
        if labels is not None:
            labels.append(y.cpu())
        seen, b, global_step = seen + y.shape[0], b + 1, global_step + 1
        bar.update()
        if b % check_every == 0:
            bad.check(f"{s.desc} by batch {b}", s.last_good)
        if b % s.log_every == 0 and not bar.disable:
            v = acc.tolist()
            bar.set_postfix(loss=f"{v[0] / max(v[2], 1):.3f}", acc=f"{v[1] / max(v[2], 1):.3f}",
                            img_s=f"{seen / (time.perf_counter() - t0):.0f}")
        if s.threads is not None and (report := s.threads.step_done()) and s.show_bar:
            tqdm.write(report)
        if s.hooks.after_step:
            s.hooks.after_step(global_step)
        stop = bool(s.stop)
        if s.checkpoint and b < n_batches and (stop or s.checkpoint_every and b % s.checkpoint_every == 0):
            saved = s.checkpoint(b, s.step0 + b, global_step, EpochSums(acc.cpu(), sums.seen + seen,
                                                            sums.seconds + time.perf_counter() - t0,
                                                            sums.wait + wait))
            if stop:
                raise Stopped(s.stop.signum, f"at {s.desc} batch {b}/{n_batches}: " + (
                    f"checkpointed there ({s.last_good})" if saved else
                    "inside a run of skipped steps, so the last good checkpoint was kept"))
    bar.close()
    bad.check(f"{s.desc} by batch {b}", s.last_good)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = sums.seconds + time.perf_counter() - t0
    wait += sums.wait
    images = sums.seen + seen
    if eng.world > 1:                     # one all-reduce of the device sums per epoch
        sync_buffers(eng.model)
        skipped = acc[3].clone()          # the same on every rank (DDP: one decision)
        dist.all_reduce(acc)
        acc[3] = skipped
        images *= eng.world
    v = acc.tolist()
    if labels is not None:
        s.hooks.epoch_end(loader, s.epoch, torch.cat(labels).tolist() if labels else [], s.start_batch)
    return dict(train_loss=v[0] / max(v[2], 1), train_acc=v[1] / max(v[2], 1), images_per_s=images / seconds,
                seconds=seconds, data_wait_frac=wait / seconds, images=images, skipped_steps=int(v[3])), global_step


@torch.no_grad()
def evaluate(eng: Engine, loader, tta: bool) -> dict:
    """Validation loss/accuracy (and with `tta` the accuracy of the mean of the logits of x
    and its mirror). Under torchrun each rank evaluates its shard; the sums are all-reduced."""
    eng.model.eval()
    sums = torch.zeros(4, device=eng.device, dtype=torch.float64)
    n = 0
    for x, y in loader:
        logits, mean = eval_logits(eng, x, tta)
        sums[:3] += torch.stack([F.cross_entropy(logits, y, reduction="sum"), (logits.argmax(1) == y).sum(),
                                 (mean.argmax(1) == y).sum()]).double()
        n += y.shape[0]
    sums[3] = n
    if eng.world > 1:
        dist.all_reduce(sums)
    v = sums.tolist()
    n = max(v[3], 1)
    out = dict(val_loss=v[0] / n, val_acc=v[1] / n)
    if tta:
        out["val_acc_tta"] = v[2] / n
    return out


def eval_batch_sizes(n_rank: int, batch_size: int) -> set[int]:
    """The batch sizes this rank's evaluation will see: full batches and its own ragged last."""
    return {b for b in (min(batch_size, n_rank), n_rank % batch_size) if b}


def warm_up_compile(eng: Engine, size: int, batch_size: int, eval_sizes: set[int], tta: bool) -> float:
    """Compile every graph the run needs (train step, evaluation at each batch size it will
    see, TTA) on random batches before any timing, then restore the weights: compile time is
    reported on its own, never mixed into throughput or time-to-accuracy."""
    if not eng.use_compile:
        return 0.0
    import copy
    t0 = time.perf_counter()
    state = copy.deepcopy(eng.model.state_dict())

    def make(n):
        return model_input(torch.randn(n, 3, size, size, device=eng.device), eng.amp)
    eng.model.train()
    with torch.autocast(eng.device.type, dtype=eng.amp, enabled=eng.amp is not None):
        eng.net(make(batch_size)).float().sum().backward()
    eng.model.zero_grad(set_to_none=True)
    eng.model.eval()
    for n in sorted(eval_sizes):
        eval_logits(eng, make(n), tta)
    eng.model.load_state_dict(state)
    if eng.device.type == "cuda":
        torch.cuda.synchronize(eng.device)
    return time.perf_counter() - t0
