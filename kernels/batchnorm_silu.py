"""Fused BatchNorm2d + SiLU (the report's ``Conv -> BatchNorm -> SiLU -> Conv``) in Triton.

Launches: forward 3 (Welford partials over rows x channels, merge into mean/var,
normalise+affine+SiLU) + 1 running-stat update; backward 2 (one reduction for dbias and
dweight, one elementwise pass for dx), the minimum for batch norm. Kernels:
``kernels/_triton_batchnorm_silu.py``; semantics: ``kernels.reference.bn_silu``.

Ops (``torch.library.custom_op``, each with a fake impl; the two forward ops have autograd):
``kernels::bn_silu_train``, ``bn_silu_eval``, ``bn_silu_backward`` and ``bn_running_update``
(separate: register_autograd refuses mutating ops). A custom op always runs its Triton
kernel and is one opaque node to torch.compile (fullgraph=True works on CPU and CUDA); a
``triton_op`` would be traced into, which on CPU needs a Triton CPU backend. Backend choice
lives in ``bn_silu``: "torch" calls the reference, so inductor can fuse the plain code.
Details and measurements: docs/kernels.md.
"""
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from kernels import reference
from kernels._common import (cdiv, interpreted, next_pow2, relayout, rows_strides, triton_module,
                             want_triton)

_TRITON_SRC = "_triton_batchnorm_silu"
_SM_COUNT: dict = {}


def _prep(x: Tensor) -> Tensor:
    """x itself when its H and W merge into one row stride (NCHW, channels_last), else a
    contiguous copy (same rule in the real and the fake implementations)."""
    return x if rows_strides(x) is not None else x.contiguous()


def _tiles(x: Tensor):
    """(grid, rows_per_split, meta) for the rows x channels kernels over ``x`` (N, C, H, W)."""
    n, c, h, w = x.shape
    hw = h * w
    if interpreted(x.device):  # few, large programs: the interpreter pays per program
        block_c, block_r, target, warps = min(next_pow2(c), 16), 128, 4, 4
    else:
        if x.device not in _SM_COUNT:
            _SM_COUNT[x.device] = torch.cuda.get_device_properties(x.device).multi_processor_count
        channels_last = x.stride(1) == 1 and c > 1
        block_c = min(next_pow2(c), 64 if channels_last else 16)
        block_r, target, warps = max(16, 4096 // block_c), 4 * _SM_COUNT[x.device], 8
    block_r = min(block_r, max(16, next_pow2(hw)))
    c_blocks = cdiv(c, block_c)
    splits = max(1, min(cdiv(hw, block_r), cdiv(target, c_blocks * n)))
    rows_per_split = cdiv(cdiv(hw, splits), block_r) * block_r
    splits = cdiv(hw, rows_per_split)
    meta = dict(BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps)
    return (c_blocks, n, splits), rows_per_split, meta


def _affine(weight: Optional[Tensor], bias: Optional[Tensor], dummy: Tensor):
    return (weight if weight is not None else dummy, bias if bias is not None else dummy,
            dict(HAS_W=weight is not None, HAS_B=bias is not None))


def _channel_meta(c: int, p: int = 1):
    return dict(BLOCK_C=min(next_pow2(c), 64), BLOCK_P=min(next_pow2(p), 64))


# ---------------------------------------------------------------------------------------
# Ops: each runs its Triton kernels (CUDA, or the interpreter on CPU)


@torch.library.custom_op("kernels::bn_silu_train", mutates_args=())
def bn_silu_train(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                  eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """silu(batch_norm(x)) with batch statistics; returns (y, mean, biased var) (fp32 stats)."""
    x = _prep(x)
    tk = triton_module(_TRITON_SRC, x.device)
    n, c, h, w = x.shape
    y = torch.empty_like(x)
    grid, rps, meta = _tiles(x)
    p = n * grid[2]
    part = torch.empty((3, p, c), device=x.device, dtype=torch.float32)
    tk.bn_stats_partial[grid](x, part, c, h * w, *rows_strides(x), p, rps, **meta)
    mean = torch.empty(c, device=x.device, dtype=torch.float32)
    var = torch.empty_like(mean)
    cm = _channel_meta(c, p)
    tk.bn_stats_combine[(cdiv(c, cm["BLOCK_C"]),)](part, mean, var, c, p, **cm)
    wt, bs, has = _affine(weight, bias, mean)
    tk.bn_silu_apply[grid](x, y, wt, bs, mean, var, eps, c, h * w, *rows_strides(x),
                           *rows_strides(y), rps, **has, **meta)
    return y, mean, var


@bn_silu_train.register_fake
def _(x, weight, bias, eps):
    x = _prep(x)
    stat = x.new_empty(x.shape[1], dtype=torch.float32)
    return torch.empty_like(x), stat, torch.empty_like(stat)


@torch.library.custom_op("kernels::bn_silu_eval", mutates_args=())
def bn_silu_eval(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Tensor,
                 running_var: Tensor, eps: float) -> Tensor:
    """silu(batch_norm(x)) with the running statistics (no update)."""
    x = _prep(x)
    tk = triton_module(_TRITON_SRC, x.device)
    _, c, h, w = x.shape
    y = torch.empty_like(x)
    grid, rps, meta = _tiles(x)
    wt, bs, has = _affine(weight, bias, running_mean)
    tk.bn_silu_apply[grid](x, y, wt, bs, running_mean, running_var, eps, c, h * w,
                           *rows_strides(x), *rows_strides(y), rps, **has, **meta)
    return y


@bn_silu_eval.register_fake
def _(x, weight, bias, running_mean, running_var, eps):
    return torch.empty_like(_prep(x))


@torch.library.custom_op("kernels::bn_silu_backward", mutates_args=())
def bn_silu_backward(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                     mean: Tensor, var: Tensor, eps: float,
                     training: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias); dweight/dbias in fp32."""
    x = _prep(x)
    tk = triton_module(_TRITON_SRC, x.device)
    n, c, h, w = x.shape
    if rows_strides(dy) is None:
        dy = relayout(dy, x)
    dx = torch.empty_like(x)
    grid, rps, meta = _tiles(x)
    p = n * grid[2]
    part = torch.empty((2, p, c), device=x.device, dtype=torch.float32)
    wt, bs, has = _affine(weight, bias, mean)
    tk.bn_silu_bwd_reduce[grid](dy, x, wt, bs, mean, var, part, eps, c, h * w, *rows_strides(x),
                                *rows_strides(dy), p, rps, **has, **meta)
    db, dw = part[0].sum(0), part[1].sum(0)  # deterministic (no atomics)
    tk.bn_silu_bwd_dx[grid](dy, x, dx, wt, bs, mean, var, db, dw, eps,
                            1.0 / (n * h * w), c, h * w, *rows_strides(x), *rows_strides(dy),
                            *rows_strides(dx), rps, TRAINING=training, **has, **meta)
    return dx, dw, db


@bn_silu_backward.register_fake
def _(dy, x, weight, bias, mean, var, eps, training):
    x = _prep(x)
    stat = x.new_empty(x.shape[1], dtype=torch.float32)
    return torch.empty_like(x), stat, torch.empty_like(stat)


@torch.library.custom_op("kernels::bn_running_update", mutates_args=("running_mean", "running_var"))
def bn_running_update(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                      momentum: float, count: int) -> None:
    """running = (1 - momentum) * running + momentum * batch stat (variance made unbiased)."""
    tk = triton_module(_TRITON_SRC, mean.device)
    c = mean.numel()
    cm = _channel_meta(c)
    tk.bn_running_update[(cdiv(c, cm["BLOCK_C"]),)](
        running_mean, running_var, mean, var, c, momentum, count / max(count - 1, 1),
        BLOCK_C=cm["BLOCK_C"])


@bn_running_update.register_fake
def _(running_mean, running_var, mean, var, momentum, count):
    return None


def _grads(weight, bias, dx, dw, db):
    return (dx, None if weight is None else dw.to(weight.dtype),
            None if bias is None else db.to(bias.dtype))


def _train_setup(ctx, inputs, output):
    x, weight, bias, eps = inputs
    _, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    ctx.save_for_backward(x, weight, bias, mean, var)
    ctx.eps = eps


def _train_backward(ctx, dy, _dmean, _dvar):
    x, weight, bias, mean, var = ctx.saved_tensors
    grads = torch.ops.kernels.bn_silu_backward(dy, x, weight, bias, mean, var, ctx.eps, True)
    return (*_grads(weight, bias, *grads), None)


def _eval_setup(ctx, inputs, output):
    x, weight, bias, running_mean, running_var, eps = inputs
    ctx.save_for_backward(x, weight, bias, running_mean, running_var)
    ctx.eps = eps


def _eval_backward(ctx, dy):
    x, weight, bias, running_mean, running_var = ctx.saved_tensors
    grads = torch.ops.kernels.bn_silu_backward(dy, x, weight, bias, running_mean, running_var,
                                               ctx.eps, False)
    return (*_grads(weight, bias, *grads), None, None, None)


bn_silu_train.register_autograd(_train_backward, setup_context=_train_setup)
bn_silu_eval.register_autograd(_eval_backward, setup_context=_eval_setup)


# ---------------------------------------------------------------------------------------
# Public API


def bn_silu(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
            running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool = True,
            momentum: float = 0.1, eps: float = 1e-5, backend: Optional[str] = None) -> Tensor:
    """``silu(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum,
    eps))``; running statistics are updated in place when training and given.
    ``backend``: "auto" (Triton on CUDA, reference elsewhere), "triton", "torch", or None
    for the current default (``kernels.use_backend`` / ``kernels.set_backend``)."""
    if not want_triton(backend, x):
        return reference.bn_silu(x, weight, bias, running_mean, running_var, training, momentum, eps)
    if x.dim() not in (2, 3, 4):
        raise ValueError(f"expected 2D, 3D or 4D input (got {x.dim()}D input)")
    x4 = x if x.dim() == 4 else x.reshape(*x.shape, *([1] * (4 - x.dim())))  # a view
    if training:
        count = x.numel() // x.shape[1]
        if count <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(x.shape)}")
        y, mean, var = torch.ops.kernels.bn_silu_train(x4, weight, bias, eps)
        if running_mean is not None and running_var is not None:
            torch.ops.kernels.bn_running_update(running_mean, running_var, mean, var, momentum, count)
    else:
        if running_mean is None or running_var is None:
            raise ValueError("running_mean and running_var must be defined in evaluation mode")
        y = torch.ops.kernels.bn_silu_eval(x4, weight, bias, running_mean, running_var, eps)
    return y if x.dim() == 4 else y.reshape(x.shape)


class BatchNormSiLU2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` followed by ``nn.SiLU`` as one module (one fused op). Same
    parameters and buffers as ``nn.BatchNorm2d``, so state dicts load either way; momentum
    (``None`` = cumulative average), ``num_batches_tracked`` and ``track_running_stats``
    behave as in ``nn.BatchNorm2d``. ``backend`` as in ``bn_silu`` (None = global default)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 backend: Optional[str] = None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep = not self.training or self.track_running_stats
        return bn_silu(x, self.weight, self.bias, self.running_mean if keep else None,
                       self.running_var if keep else None, batch_stats, factor, self.eps,
                       backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend}"


__all__ = ["bn_silu", "BatchNormSiLU2d"]
