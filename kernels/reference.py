"""Pure-torch references for the fused kernels: the semantics the Triton versions must match.

They are also the `backend="torch"` implementation used on CPU and wherever Triton is off.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def bn_silu(x, weight, bias, running_mean, running_var, training: bool = True,
            momentum: float = 0.1, eps: float = 1e-5):
    """silu(batch_norm(x)): nn.BatchNorm2d (running stats updated in place) then nn.SiLU."""
    return F.silu(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps))


def residual_mish(x, r):
    """mish(x + r): the report's ResBlock pass-through step `x = F.mish(x + block(x))`."""
    return F.mish(x + r)


def dense_residual_mish(x, previous):
    """The report's dense chain: `for s in previous: x = F.mish(x + s)`."""
    for s in previous:
        x = F.mish(x + s)
    return x
