"""Refuse, before any data is read, a training step that cannot fit the device.

The estimate: fp32 weights, gradients and AdamW's two moments (16 bytes per parameter), plus
per image every leaf module's output (what autograd keeps for backward) counted by one
forward of a single image at min(size, 32) px and scaled by pixels, x2 for the gradients
alive during backward. The probe forward runs with the reference kernels (the estimate does
not depend on them, and the model may still be on the host while the run targets CUDA), in
eval mode without grad: no running statistics and no RNG are touched.
"""
from __future__ import annotations

import torch
import torch.nn as nn

import kernels
from loaders.common import ConfigError, device_free_bytes


def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def training_bytes(model: nn.Module, size: int, amp: torch.dtype | None) -> tuple[int, int]:
    """(bytes independent of the batch, bytes per image) a training step needs, estimated."""
    params = sum(p.numel() for p in model.parameters())
    s0 = min(size, 32)
    total = [0]

    def hook(_m, _i, out):
        if torch.is_tensor(out):
            total[0] += out.numel()

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    was_training = model.training
    try:
        model.eval()
        dev = next(model.parameters()).device
        with torch.no_grad(), kernels.use_backend("torch"):
            model(torch.zeros(1, 3, s0, s0, device=dev))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    elem = 2 if amp in (torch.bfloat16, torch.float16) else 4
    return 16 * params, int(2 * total[0] * (size / s0) ** 2 * elem)


def check_fits(model: nn.Module, size: int, batch_size: int, amp, device: torch.device,
               local_world: int = 1) -> dict:
    """The estimate against what `device` has free (CPU: MemAvailable shared by the local
    ranks); a one-line ConfigError when it does not fit."""
    fixed, per_image = training_bytes(model, size, amp)
    need = fixed + batch_size * per_image
    have = int(device_free_bytes(device))
    shared = ""
    if device.type == "cpu" and local_world > 1:
        have //= local_world
        shared = f" (MemAvailable shared by {local_world} local ranks)"
    if need > have:
        raise ConfigError(
            f"--batch-size {batch_size} at --size {size} does not fit on {device}: a training step needs "
            f"about {fmt_bytes(need)} ({fmt_bytes(fixed)} for weights, gradients and AdamW state + "
            f"{fmt_bytes(per_image)} of activations per image x {batch_size}) but {fmt_bytes(have)} is "
            f"available{shared}; lower --batch-size, --size or --width")
    return dict(need=need, have=have, per_image=per_image, fixed=fixed)
