"""Fused mish pass-through sums: ``residual_mish(x, r) = mish(x + r)`` (the report's
``x = mish(x + block(x))``) and ``dense_residual_mish(x, previous)`` (its dense chain
``for s in previous: x = mish(x + s)``) as one kernel each way. The Triton sources are
``kernels/_triton_mish.py``.

Forward: one read of x and of each previous tensor, one write, fp32 in between (the unfused
chain writes and re-reads every intermediate, in the input dtype). Backward by recomputation:
nothing but the inputs is saved; one read of x, each s_k and dy, one write per gradient.

Registration (same reasoning as ``kernels.batchnorm_silu``: ``custom_op`` so torch.compile
sees one opaque node that works with fullgraph=True on CPU and CUDA; ``triton_op`` would be
traced into, which needs a Triton CPU backend):

* ``kernels::mish_chain(x, previous[], use_triton) -> y``
* ``kernels::mish_chain_backward(x, previous[], dy, use_triton) -> grads[]`` (one per s_k; the
  gradient of x equals that of s_1 and is returned for both)

``residual_mish(x, r)`` is ``mish_chain(x, [r])``.
"""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels import reference
from kernels._common import cdiv, dense, interpreted, relayout, triton_module, use_triton

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
def mish_chain(x: Tensor, previous: list[Tensor], use_triton: bool) -> Tensor:
    """``for s in previous: x = mish(x + s)`` (previous non-empty)."""
    x, previous = _operands(x, previous)
    if not use_triton:  # reference math in fp32, like the kernel
        a = x.to(torch.promote_types(x.dtype, torch.float32))
        for s in previous:
            a = F.mish(a + s)
        return relayout(a.to(x.dtype), x)
    y = torch.empty_like(x)
    _launch("mish_chain_fwd", x, (x, tuple(previous), y), len(previous))
    return y


@mish_chain.register_fake
def _(x, previous, use_triton):
    return torch.empty_like(dense(x))


@torch.library.custom_op("kernels::mish_chain_backward", mutates_args=())
def mish_chain_backward(x: Tensor, previous: list[Tensor], dy: Tensor, use_triton: bool) -> list[Tensor]:
    """Gradients of ``mish_chain`` w.r.t. each s_k (that of x equals the first)."""
    x, previous = _operands(x, previous)
    dy = relayout(dy, x)
    if not use_triton:
        acc = torch.promote_types(x.dtype, torch.float32)
        ts, a = [], x.to(acc)
        for s in previous:
            ts.append(a + s)
            a = F.mish(ts[-1])
        g, grads = dy.to(acc), []
        for t in reversed(ts):
            g = g * _mish_grad_torch(t)
            grads.append(relayout(g.to(x.dtype), x))
        return grads[::-1]
    grads = [torch.empty_like(x) for _ in previous]
    _launch("mish_chain_bwd", x, (x, tuple(previous), dy, tuple(grads)), len(previous))
    return grads


@mish_chain_backward.register_fake
def _(x, previous, dy, use_triton):
    x = dense(x)
    return [torch.empty_like(x) for _ in previous]


def _mish_grad_torch(t: Tensor) -> Tensor:
    """d mish / dt = tanh(sp) + t * sigmoid(t) * (1 - tanh(sp)^2), sp = softplus(t)."""
    tsp = torch.tanh(F.softplus(t))
    return tsp + t * torch.sigmoid(t) * (1 - tsp * tsp)


def _setup(ctx, inputs, output):
    x, previous, use_tr = inputs
    ctx.save_for_backward(x, *previous)
    ctx.use_triton = use_tr


def _backward(ctx, dy):
    x, *previous = ctx.saved_tensors
    grads = torch.ops.kernels.mish_chain_backward(x, previous, dy, ctx.use_triton)
    return grads[0], list(grads), None


mish_chain.register_autograd(_backward, setup_context=_setup)


def dense_residual_mish(x: Tensor, previous: Sequence[Tensor], backend: Optional[str] = None) -> Tensor:
    """The report's dense pass-through ``for s in previous: x = mish(x + s)``, fused."""
    previous = list(previous)
    if not previous or not use_triton(backend, x):
        return reference.dense_residual_mish(x, previous)
    return torch.ops.kernels.mish_chain(x, previous, True)


def residual_mish(x: Tensor, r: Tensor, backend: Optional[str] = None) -> Tensor:
    """``mish(x + r)``, fused (forward and backward)."""
    if not use_triton(backend, x):
        return reference.residual_mish(x, r)
    return torch.ops.kernels.mish_chain(x, [r], True)


__all__ = ["residual_mish", "dense_residual_mish"]
