"""Shared plumbing for the fused kernels: backend choice, lazy Triton loading, layouts.

Nothing here imports Triton. The ``@triton.jit`` sources live in ``kernels/_triton_*.py`` and
are imported on the first Triton launch (``triton_module``), because ``triton.jit`` decides
at decoration time whether a kernel is compiled or interpreted (``TRITON_INTERPRET=1``): a
test that sets the variable after something imported ``kernels`` (through
``engine.models``) still gets interpreted kernels.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "torch")
# Triton kernels take these input dtypes (fp32 accumulation inside); anything else (e.g.
# float64 for gradcheck) runs the reference under "auto" and is an error under "triton".
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HAS_TRITON = importlib.util.find_spec("triton") is not None

_default_backend = "auto"


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; expected one of {BACKENDS}")
    return name


def set_backend(name: str) -> None:
    """Process-wide default for calls that pass ``backend=None`` (the models do)."""
    global _default_backend
    _default_backend = _check(name)


def get_backend() -> str:
    return _default_backend


@contextlib.contextmanager
def use_backend(name: str):
    """``with kernels.use_backend("triton"): ...`` forces the implementation inside."""
    global _default_backend
    previous, _default_backend = _default_backend, _check(name)
    try:
        yield
    finally:
        _default_backend = previous


def check_triton_device(device: torch.device) -> None:
    """Before any launch: a one-line error naming the fixes when Triton cannot run on
    ``device`` (a CPU tensor without the interpreter), instead of a deep Triton traceback."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") not in ("1", "true", "True"):
        raise RuntimeError(
            f"kernels: backend 'triton' got a {device.type} tensor, and Triton runs on CPU only "
            "under its interpreter: use --kernels torch or auto (kernels.set_backend), or set "
            "TRITON_INTERPRET=1")


def want_triton(backend: str | None, x: torch.Tensor) -> bool:
    """Resolve a backend name for input ``x``: ``auto`` is Triton on CUDA (fp32/fp16/bf16),
    the reference elsewhere; ``triton`` is always Triton, which on a CPU tensor needs
    ``TRITON_INTERPRET=1`` (checked here, before the first launch)."""
    name = _check(backend or _default_backend)
    if name == "torch":
        return False
    if name == "auto":
        return HAS_TRITON and x.is_cuda and x.dtype in TRITON_DTYPES
    if not HAS_TRITON:
        raise RuntimeError("backend='triton' but triton is not installed")
    if x.dtype not in TRITON_DTYPES:
        raise TypeError(f"backend='triton' supports {TRITON_DTYPES}, got {x.dtype}")
    check_triton_device(x.device)
    return True


def triton_module(name: str, device: torch.device):
    """Import ``kernels.<name>`` (Triton sources) for a launch on ``device``."""
    check_triton_device(device)
    return importlib.import_module(f"kernels.{name}")


def interpreted(device: torch.device) -> bool:
    """True when launches on ``device`` go through the (slow, per-program) interpreter."""
    return device.type != "cuda"


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def same_strides(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same memory layout (strides of size-1 dims do not matter)."""
    return a.shape == b.shape and all(
        sa == sb or n == 1 for sa, sb, n in zip(a.stride(), b.stride(), a.shape))


def dense(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when it is contiguous NCHW or channels_last, else a contiguous copy (the
    only layouts the flat kernels index without strides; views and slices land here)."""
    if x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return x
    return x.contiguous()


def relayout(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` with ``ref``'s strides and dtype; a copy only when they differ (e.g. a gradient
    arriving NCHW for a channels_last activation). The tests assert this copies nothing for
    matching layouts, so it must stay the one place kernels re-layout a tensor."""
    if t.dtype == ref.dtype and same_strides(t, ref):
        return t
    return torch.empty_like(ref).copy_(t)


def rows_strides(x: torch.Tensor):
    """(sN, sC, sHW) for a 4-D tensor whose H and W merge into one row index (contiguous NCHW,
    channels_last, broadcast gradients), else None."""
    _, _, h, w = x.shape
    sn, sc, sh, sw = x.stride()
    if h == 1:
        return sn, sc, sw
    if w == 1 or sh == w * sw:
        return sn, sc, sw if w > 1 else sh
    return None
