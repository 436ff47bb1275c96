"""Fused mish pass-through sums in Triton: ``residual_mish(x, r) = mish(x + r)`` (the report's
``x = mish(x + block(x))``) and ``dense_residual_mish(x, previous)`` (its dense chain
``for s in previous: x = mish(x + s)``). Kernels: ``kernels/_triton_mish.py``; semantics:
``kernels.reference``.

Launches: forward 1 (one read of x and of each s_k, one write, fp32 in between); backward 1,
by recomputation (nothing but the inputs is saved; one write per gradient).

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
from kernels._common import cdiv, dense, interpreted, relayout, triton_module, want_triton

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


def dense_residual_mish(x: Tensor, previous: Sequence[Tensor], backend: Optional[str] = None) -> Tensor:
    """The report's dense pass-through ``for s in previous: x = mish(x + s)``, fused."""
    previous = list(previous)
    if not previous or not want_triton(backend, x):
        return reference.dense_residual_mish(x, previous)
    return torch.ops.kernels.mish_chain(x, previous)


def residual_mish(x: Tensor, r: Tensor, backend: Optional[str] = None) -> Tensor:
    """``mish(x + r)``, fused (forward and backward)."""
    if not want_triton(backend, x):
        return reference.residual_mish(x, r)
    return torch.ops.kernels.mish_chain(x, [r])


__all__ = ["residual_mish", "dense_residual_mish"]
