"""The training step and what it needs, built from a Config without reading any data.

`build_engine(cfg, num_classes, ...)` makes an `Engine`: the model (channels_last, on the
device), the callable the step runs (DDP-wrapped, compiled), the evaluation callable, the
autocast dtype, the GradScaler and the BatchNorm guard. `train_step(engine, opt, x, y_soft)`
is one step as a function: batch in, (logits, loss, bad) out, nothing stored aside. The
benchmark times this same function.

Non-finite steps cost no host sync: the fused AdamW (CPU and CUDA) honours a device-side
`found_inf` (any non-finite gradient, or loss), leaving weights, moments and step count
untouched; with fp16 the GradScaler skips from the same check. BatchNorm running statistics
the bad forward touched are put back by `BatchNormGuard` in a few launches.
The model always receives NCHW in channels_last memory in the autocast dtype
(`model_input`), whatever a transform (MixUp's roll on CUDA) returned.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.distributed import convert_sync_batchnorm
from engine.models import build_model


class BatchNormGuard:
    """Backs up BatchNorm running statistics before a step and restores them when the step
    was bad, in a few launches whatever the layer count: per dtype one `cat` into a flat
    backup; restore = one `cat`, one `where`, one multi-tensor copy back (a select, so NaN
    statistics from the bad forward never leak); the int64 batch counters get `bad`
    subtracted (a bad training forward added exactly 1)."""

    def __init__(self, model: nn.Module):
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        stats = [b for m in bns for b in (m.running_mean, m.running_var) if b is not None]
        self.groups: list[tuple[list[torch.Tensor], list[int], torch.Tensor]] = []
        for dtype in dict.fromkeys(b.dtype for b in stats):
            bufs = [b for b in stats if b.dtype == dtype]
            sizes = [b.numel() for b in bufs]
            self.groups.append((bufs, sizes, torch.empty(sum(sizes), dtype=dtype, device=bufs[0].device)))
        self.counters = [m.num_batches_tracked for m in bns if m.num_batches_tracked is not None]

    def save(self) -> None:
        for bufs, _, backup in self.groups:
            torch.cat([b.view(-1) for b in bufs], out=backup)

    def restore_if(self, bad: torch.Tensor) -> None:
        for bufs, sizes, backup in self.groups:
            now = torch.cat([b.view(-1) for b in bufs])
            kept = torch.where(bad, backup, now).split(sizes)
            torch._foreach_copy_(bufs, [k.view_as(b) for k, b in zip(kept, bufs)])
        if self.counters:
            torch._foreach_sub_(self.counters, bad.to(torch.int64))


def model_input(x: torch.Tensor, amp: torch.dtype | None) -> torch.Tensor:
    """The layout the model is fed: NCHW, channels_last memory, the autocast dtype (a no-op
    when `x` already is)."""
    return x.to(dtype=amp or torch.float32, memory_format=torch.channels_last)


@dataclass
class Engine:
    model: nn.Module               # the bare module (state dicts, evaluation under DDP)
    net: Callable                  # what the training step calls: DDP-wrapped, compiled
    eval_net: Callable             # what evaluation calls: no DDP hooks, compiled
    device: torch.device
    amp: torch.dtype | None
    scaler: torch.amp.GradScaler
    guard: BatchNormGuard
    world: int = 1
    label_smoothing: float = 0.0
    weight_decay: float = 0.05
    use_compile: bool = False

    def optimizer(self, lr: float) -> torch.optim.Optimizer:
        # Fused on CPU and CUDA: the fused kernel honours a device-side `found_inf`.
        return torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=self.weight_decay, fused=True)


def build_engine(cfg, num_classes: int, device: torch.device, amp, *, world: int = 1,
                 use_compile: bool = False, state: dict | None = None) -> Engine:
    """The model for `cfg` on `device` (weights from `state` if given), wrapped for the step."""
    model = build_model(cfg.model, passthrough=cfg.passthrough or None, width=cfg.width, num_classes=num_classes,
                        dropout=cfg.dropout)
    model.to(device, memory_format=torch.channels_last)
    if state is not None:
        model.load_state_dict(state)
    if cfg.sync_bn and world > 1:
        model = convert_sync_batchnorm(model)
    train_module = model
    if world > 1:
        train_module = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    # Only the model is compiled: lr (optimizer param_groups) and MixUp alpha live outside
    # the graph, so changing them between epochs and stages never recompiles.
    mode = None if cfg.compile_mode == "default" or cfg.compile_backend != "inductor" else cfg.compile_mode

    def compiled(m):
        return torch.compile(m, backend=cfg.compile_backend, mode=mode, dynamic=False) if use_compile else m
    net = compiled(train_module)
    # Evaluation runs the bare module: no DDP hooks or collectives (ranks' validation shards
    # may differ by one batch).
    eval_net = net if world == 1 else compiled(model)
    return Engine(model=model, net=net, eval_net=eval_net, device=device, amp=amp,
                  scaler=torch.amp.GradScaler(device.type, enabled=amp is torch.float16),
                  guard=BatchNormGuard(model), world=world, label_smoothing=cfg.label_smoothing,
                  weight_decay=cfg.weight_decay, use_compile=use_compile)


class StepResult(NamedTuple):
    logits: torch.Tensor           # detached
    loss: torch.Tensor             # detached, scalar
    bad: torch.Tensor              # bool scalar on the device: the step was skipped


def train_step(eng: Engine, opt: torch.optim.Optimizer, x: torch.Tensor, y_soft: torch.Tensor) -> StepResult:
    """One optimizer step on (x, soft targets). A non-finite loss or gradient leaves weights,
    optimizer state and BatchNorm statistics as they were."""
    eng.guard.save()
    with torch.autocast(eng.device.type, dtype=eng.amp, enabled=eng.amp is not None):
        logits = eng.net(model_input(x, eng.amp))
    loss = F.cross_entropy(logits.float(), y_soft, label_smoothing=eng.label_smoothing)
    opt.zero_grad(set_to_none=True)
    eng.scaler.scale(loss).backward()
    if eng.scaler.is_enabled():
        eng.scaler.unscale_(opt)                   # the scaler's own check decides its skip
    grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
    found = torch.zeros((), device=eng.device)
    torch._amp_foreach_non_finite_check_and_unscale_(grads, found, torch.ones((), device=eng.device))
    if eng.world == 1:
        # Under DDP the gradients are all-reduced, so their check alone is the same decision
        # on every rank (a non-finite loss anywhere makes them non-finite).
        found = torch.maximum(found, (~torch.isfinite(loss)).float())
    if not eng.scaler.is_enabled():
        opt.found_inf = found                      # the fused AdamW skips on it
    eng.scaler.step(opt)
    eng.scaler.update()
    bad = found > 0
    eng.guard.restore_if(bad)
    return StepResult(logits.detach(), loss.detach(), bad)


@torch.no_grad()
def eval_logits(eng: Engine, x: torch.Tensor, tta: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, test-time-augmented logits) in float32. Each call's output is cloned before
    the next call: with CUDA graphs a compiled callable's output buffer is reused."""
    x = model_input(x, eng.amp)
    with torch.autocast(eng.device.type, dtype=eng.amp, enabled=eng.amp is not None):
        logits = eng.eval_net(x).float().clone()
        if not tta:
            return logits, logits
        mirrored = eng.eval_net(x.flip(3)).float().clone()
    return logits, (logits + mirrored) / 2
