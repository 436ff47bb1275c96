"""Fused mish pass-through sums in Triton: ``residual_mish(x, r) = mish(x + r)`` (the report's
``x = mish(x + block(x))``) and ``dense_residual_mish(x, previous)`` (its dense chain
``for s in previous: x = mish(x + s)``). Kernels: ``kernels/_triton_mish.py``; semantics:
``kernels.reference``.

Launches: forward 1 (one read of x and of each s_k, one write, fp32 in between); backward 1,
by recomputation (nothing but the inputs is saved; one write per gradient).

Off CUDA, backend "auto" runs ``mish_sum``: the same function as plain torch ops with one
``exp`` per element and a hand-derived backward, because aten's mish (tanh and log1p of exp)
costs about twice as much on CPU (docs/kernels.md); "torch" stays the reference.

Ops (``torch.library.custom_op`` with fake impls; same reasoning as
``kernels.batchnorm_silu``: one opaque node to torch.compile on CPU and CUDA, where a
``triton_op`` would be traced into): ``kernels::mish_chain(x, previous[]) -> y`` with autograd,
and ``kernels::mish_chain_backward(x, previous[], dy) -> grads[]`` (one per s_k; the gradient
of x equals that of s_1). Each always runs its Triton kernel; backend choice lives in the
public functions ("torch" calls the reference, so inductor can fuse the plain code).
"""
from typing import Optional, Sequence

import torch
from torch import Tensor

from kernels import reference
from kernels._common import cdiv, dense, get_backend, interpreted, relayout, triton_module, want_triton

_TRITON_SRC = "_triton_mish"


def _operands(x: Tensor, previous: Sequence[Tensor]):
    """x in a dense layout and every s_k in that same layout and dtype (a copy only where
    they differ, e.g. an NCHW skip added to a channels_last activation)."""
    x = dense(x)
    return x, [relayout(s, x) for s in previous]


def _launch(kernel_name: str, x: Tensor, tensors: tuple, k: int):
    tk = triton_module(_TRITON_SRC, x.device)
    block = 4096 if interpreted(x.device) else 1024
    getattr(tk, kernel_name)[(max(1, cdiv(x.numel(), block)),)](
        *tensors, x.numel(), K=k, BLOCK=block, num_warps=4)


@torch.library.custom_op("kernels::mish_chain", mutates_args=())
def mish_chain(x: Tensor, previous: list[Tensor]) -> Tensor:
    """``for s in previous: x = mish(x + s)`` (previous non-empty)."""
    x, previous = _operands(x, previous)
    y = torch.empty_like(x)
    _launch("mish_chain_fwd", x, (x, tuple(previous), y), len(previous))
    return y


@mish_chain.register_fake
def _(x, previous):
    return torch.empty_like(dense(x))


@torch.library.custom_op("kernels::mish_chain_backward", mutates_args=())
def mish_chain_backward(x: Tensor, previous: list[Tensor], dy: Tensor) -> list[Tensor]:
    """Gradients of ``mish_chain`` w.r.t. each s_k (that of x equals the first)."""
    x, previous = _operands(x, previous)
    dy = relayout(dy, x)
    grads = [torch.empty_like(x) for _ in previous]
    _launch("mish_chain_bwd", x, (x, tuple(previous), dy, tuple(grads)), len(previous))
    return grads


@mish_chain_backward.register_fake
def _(x, previous, dy):
    x = dense(x)
    return [torch.empty_like(x) for _ in previous]


def _setup(ctx, inputs, output):
    x, previous = inputs
    ctx.save_for_backward(x, *previous)


def _backward(ctx, dy):
    x, *previous = ctx.saved_tensors
    grads = torch.ops.kernels.mish_chain_backward(x, previous, dy)
    return grads[0], list(grads)


mish_chain.register_autograd(_backward, setup_context=_setup)


# exp cap per dtype: fp16 overflows n(n+2) + 2 past e^5.5 (t = 1 - 3e-5 there).
_EXP_CAP = {torch.float16: 5.5}


class _MishSum(torch.autograd.Function):
    """mish(x + r) with one exp: n = e^z, tanh(softplus(z)) = n(n+2) / (n(n+2) + 2), and
    d mish / dz = t + z * sigmoid(z) * (1 - t^2) with sigmoid(z) = n / (n+1). z is capped
    before the exp (t is 1 to the dtype's precision past the cap; n(n+2) stays finite)."""

    @staticmethod
    def forward(ctx, x: Tensor, r: Tensor) -> Tensor:
        z = x + r
        n = z.clamp(max=_EXP_CAP.get(z.dtype, 20.0)).exp_()
        t = n.add(2).mul_(n)
        t.div_(t + 2)
        ctx.save_for_backward(z, n, t)
        return z * t

    @staticmethod
    def backward(ctx, dy: Tensor):
        z, n, t = ctx.saved_tensors
        grad = (1 - t * t).mul_(z).mul_(n).div_(n + 1).add_(t).mul_(dy)
        return grad, grad


def mish_sum(x: Tensor, r: Tensor) -> Tensor:
    """``mish(x + r)`` in plain torch ops, one exp per element (the "auto" path off CUDA);
    the reference when the operands broadcast."""
    if x.shape != r.shape:
        return reference.residual_mish(x, r)
    return _MishSum.apply(x, r)


def _eager(backend: Optional[str], x: Tensor) -> bool:
    return (backend or get_backend()) == "auto" and not x.is_cuda


def dense_residual_mish(x: Tensor, previous: Sequence[Tensor], backend: Optional[str] = None) -> Tensor:
    """The report's dense pass-through ``for s in previous: x = mish(x + s)``, fused."""
    previous = list(previous)
    if previous and want_triton(backend, x):
        return torch.ops.kernels.mish_chain(x, previous)
    if _eager(backend, x):
        for s in previous:
            x = mish_sum(x, s)
        return x
    return reference.dense_residual_mish(x, previous)


def residual_mish(x: Tensor, r: Tensor, backend: Optional[str] = None) -> Tensor:
    """``mish(x + r)``, fused (forward and backward)."""
    if want_triton(backend, x):
        return torch.ops.kernels.mish_chain(x, [r])
    if _eager(backend, x):
        return mish_sum(x, r)
    return reference.residual_mish(x, r)


__all__ = ["residual_mish", "dense_residual_mish", "mish_sum"]
