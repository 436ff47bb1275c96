"""Shared by tests/test_kernels_*.py (one file per kernel family): inputs, tolerances, the
comparison, a finite-difference check of the Triton backward, the ResBlock twins, and
subprocess runs (clean environment, compile check).

Without CUDA the Triton kernels run under TRITON_INTERPRET=1 (set by tests/conftest.py, and
here for a direct import), so shapes stay tiny; on a GPU box the same tests run the compiled
kernels on CUDA tensors.

Tolerances per input dtype (Liger-Kernel style). The kernels compute in fp32 and round once
at the store, so low-precision results are compared with the reference evaluated in fp32 on
the same (exactly upcast) inputs:
* fp32: rtol 1e-5, atol 1e-5 x max|ref| -- same math, only summation order and exp/sqrt
  implementations differ.
* fp16: rtol 2e-3 (~4 ulp of 2^-11): one rounding of the result plus fp32 noise.
* bf16: rtol 1.6e-2 (2 ulp of 2^-7): the interpreter's fp32 -> bf16 store truncates instead
  of rounding to nearest, i.e. up to 1 ulp where the GPU is within half an ulp.
Per-channel sums (dweight, dbias, batch and running statistics) are fp32 accumulations of
exactly upcast inputs: SUM_TOL, the fp32 tolerance x 10, whatever the input dtype.
Measurements behind these numbers: docs/kernels.md.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kernels  # noqa: E402
from kernels import _common, reference  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(not _common.HAS_TRITON, reason="triton is not installed")

TOL = {  # rtol, atol (x max|ref|); reasons in the module docstring
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
SUM_TOL = (1e-4, 1e-4)
BLOCK_TOL = (1e-4, 1e-4)  # conv blocks: the convs see inputs that differ by fp32 rounding
DTYPES = [pytest.param(d, id=str(d).split(".")[-1]) for d in TOL]
LAYOUTS = [pytest.param(torch.contiguous_format, id="nchw"),
           pytest.param(torch.channels_last, id="channels_last")]
# N=1; C=3, 5 (not powers of two) and 16; H*W = 16, 63, 561 (no block size divides 63 or 561,
# and 2x33x17 takes two row splits, the second partly past the end); 4x4 and 64x64 maps.
SHAPES = [(1, 3, 4, 4), (3, 5, 7, 9), (2, 3, 33, 17), (1, 3, 64, 64), (3, 16, 4, 4)]
SHAPE_IDS = ["x".join(map(str, s)) for s in SHAPES]


def close(actual, expected, tol):
    rtol, atol = tol
    expected = expected.float()
    torch.testing.assert_close(actual.float(), expected, rtol=rtol,
                               atol=atol * max(1.0, expected.abs().max().item()))


def make(shape, dtype=torch.float32, layout=torch.contiguous_format, scale=1.0, shift=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scale + shift
    return x.to(DEVICE, dtype).to(memory_format=layout)


def check_directional_derivatives(fn, inputs, directions=3, h=1e-2, rtol=5e-3, seed=0):
    """Gradcheck-style test of a Triton backward in fp32 (the kernels take no float64, and a
    full gradcheck costs two interpreted forwards per input element): for a random output
    weighting v and random directions u of each input, the central difference
    (v . fn(.. + h u ..) - v . fn(.. - h u ..)) / 2h of the Triton forward must match <grad, u>
    from the Triton backward to ``rtol`` x max(1, |<grad, u>|). O(h^2) truncation + fp32
    rounding stay 10x below that (docs/kernels.md); one gradient term scaled by 0.9 fails."""
    g = torch.Generator().manual_seed(seed)
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*inputs)
    v = torch.randn(y.shape, generator=g).to(y.device, y.dtype)
    grads = torch.autograd.grad(y, inputs, v)
    with torch.no_grad():
        for i, (t, grad) in enumerate(zip(inputs, grads)):
            for _ in range(directions):
                u = torch.randn(t.shape, generator=g).to(t.device, t.dtype)
                shifted = [[s + sign * h * u if j == i else s for j, s in enumerate(inputs)]
                           for sign in (1, -1)]
                numeric = ((fn(*shifted[0]) - fn(*shifted[1])).double() * v.double()).sum().item() / (2 * h)
                analytic = (grad.double() * u.double()).sum().item()
                assert abs(numeric - analytic) <= rtol * max(1.0, abs(analytic)), \
                    f"input {i}: finite difference {numeric:.6g} vs backward {analytic:.6g}"


# ---------------------------------------------------------------------------------------
# The report's ResBlock group, built from the fused ops or from nn modules


class ResBlocks(nn.Module):
    """Blocks Conv -> BN -> SiLU -> Conv, each added back through mish
    (``x = mish(x + block(x))``), with the dense pass-through before each block when
    ``dense``. ``fused_bn``: BatchNormSiLU2d, else nn.BatchNorm2d + nn.SiLU; ``fused_mish``:
    kernels.residual_mish / dense_residual_mish, else F.mish / the reference."""

    def __init__(self, c: int, n: int, fused_bn: bool, fused_mish: bool, dense: bool):
        super().__init__()
        bn = (lambda: kernels.BatchNormSiLU2d(c)) if fused_bn else (lambda: nn.Sequential(nn.BatchNorm2d(c), nn.SiLU()))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, c, 3, padding=1), bn(), nn.Conv2d(c, c, 3, padding=1)) for _ in range(n))
        self.fused_mish, self.dense = fused_mish, dense

    def forward(self, x):
        sequence = [x]
        for i, block in enumerate(self.blocks):
            if self.dense:
                x = kernels.dense_residual_mish(x, sequence[:i]) if self.fused_mish else \
                    reference.dense_residual_mish(x, sequence[:i])
            x = kernels.residual_mish(x, block(x)) if self.fused_mish else F.mish(x + block(x))
            sequence.append(x)
        return x


def bn_key(key: str) -> str:
    """BatchNormSiLU2d state ``blocks.i.1.<name>`` is ``blocks.i.1.0.<name>`` in (BatchNorm2d, SiLU)."""
    return re.sub(r"^(blocks\.\d+\.1)\.", r"\1.0.", key)


def twins(fused_bn: bool, fused_mish: bool, dense: bool, c: int = 5, n: int = 3):
    """(model with the fused ops asked for, the same model from nn modules), equal weights."""
    torch.manual_seed(0)
    fused = ResBlocks(c, n, fused_bn, fused_mish, dense).to(DEVICE)
    plain = ResBlocks(c, n, False, False, dense).to(DEVICE)
    with torch.no_grad():
        for m in fused.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    rename = bn_key if fused_bn else (lambda k: k)
    plain.load_state_dict({rename(k): v for k, v in fused.state_dict().items()})
    return fused, plain


def step(model, x):
    """(output, input gradient, parameter gradients) of one forward+backward."""
    x = x.detach().clone().requires_grad_()
    y = model(x)
    y.backward(torch.ones_like(y) / y.numel() ** 0.5)
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return y, x.grad, grads


def close_steps(got, want, tol=BLOCK_TOL):
    close(got[0], want[0], tol)
    close(got[1], want[1], tol)
    assert len(got[2]) == len(want[2])
    for g, w in zip(got[2], want[2]):
        close(g, w, tol)


def check_blocks_match(fused_bn: bool, fused_mish: bool, dense: bool):
    """ResBlocks with the fused ops asked for (backend "triton") vs the same blocks from nn
    modules, channels_last: outputs, every gradient, and the 6 running statistics."""
    fused, plain = twins(fused_bn, fused_mish, dense)
    x = make((3, 5, 7, 9), layout=torch.channels_last, seed=4)
    fused, plain = fused.to(memory_format=torch.channels_last), plain.to(memory_format=torch.channels_last)
    with kernels.use_backend("triton"):
        got = step(fused, x)
    close_steps(got, step(plain, x))
    states = plain.state_dict()
    running = [k for k in fused.state_dict() if "running" in k]
    assert len(running) == 6
    for k in running:
        close(fused.state_dict()[k], states[bn_key(k) if fused_bn else k], SUM_TOL)


class GraphRecorder:
    """A torch.compile backend that records the FX graph dynamo hands over (to assert which
    ops are single nodes) and compiles it with inductor."""

    def __init__(self):
        self.targets = []

    def __call__(self, gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx
        self.targets += [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
        return compile_fx(gm, example_inputs)


# ---------------------------------------------------------------------------------------
# Subprocesses


def run_python(code: str, interpret: bool = False, timeout: int = 120):
    """``python -c code`` on CPU tensors (CUDA hidden) with TRITON_INTERPRET unset, or "1"."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=timeout)


def check_compiles_for_sm90(family: str):
    """Every kernel of ``family`` through the real compiler (ptxas, sm_90) without a GPU:
    catches what the interpreter accepts but the compiler rejects."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.kernels", "--compile-only", "--family", family],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(ROOT), TRITON_INTERPRET="0"))
    if "No module named 'triton.backends.nvidia'" in out.stderr:
        pytest.skip("triton without the nvidia backend")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert re.search(r"compile check sm_90: (\d+)/\1 compiled", out.stdout), out.stdout[-3000:]


CPU_WITHOUT_INTERPRETER = """
import sys, torch
import kernels
x = torch.randn(2, 3, 4, 4)
def error(fn):
    try:
        fn()
    except RuntimeError as e:
        return str(e)
    raise AssertionError("no error")
"""


def check_clear_cpu_error(calls: str, not_imported: str):
    """Run ``calls`` (lines of ``print(error(lambda: ...))``, each one Triton call on a CPU
    tensor) in a process without TRITON_INTERPRET: each must fail with the one-line error
    naming the fixes, before any launch (``not_imported``, the Triton sources, never loaded)."""
    code = CPU_WITHOUT_INTERPRETER + calls + f"\nassert {not_imported!r} not in sys.modules\n"
    out = run_python(code)
    assert out.returncode == 0, out.stderr[-3000:]
    messages = out.stdout.strip().splitlines()
    assert len(messages) == calls.count("print(error("), out.stdout
    for message in messages:
        assert message.startswith("kernels: backend 'triton' got a cpu tensor"), message
        for fix in ("--kernels torch or auto", "TRITON_INTERPRET=1"):
            assert fix in message, message


def record_paths(monkeypatch, module, *reference_names):
    """Returns a list that each call of ``module``'s public functions appends to: "reference"
    when it ran ``kernels.reference.<name>``, "triton" when it loaded a Triton kernel."""
    seen = []

    def spy(owner, name, label):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            seen.append(label)
            return original(*args, **kwargs)
        monkeypatch.setattr(owner, name, wrapper)

    for name in reference_names:
        spy(reference, name, "reference")
    spy(module, "triton_module", "triton")
    return seen


def check_backend_switch(seen, call, off_cuda: str = "reference"):
    """The backend rules for one public function ``call(x, backend=...)`` (``seen`` from
    ``record_paths``): "torch" runs the reference, "auto" Triton on CUDA fp32/fp16/bf16 and
    ``off_cuda`` on other devices (the reference, or a family's eager CPU path), "triton" always
    Triton; None takes the default (set_backend, use_backend); unknown names and float64
    under "triton" are errors."""
    x = make((2, 3, 4, 4))

    def paths(x=x, **kw):
        seen.clear()
        call(x, **kw)
        return set(seen)

    on_device = off_cuda if DEVICE.type != "cuda" else "reference"
    auto = {"triton"} if DEVICE.type == "cuda" and _common.HAS_TRITON else {on_device}
    assert kernels.get_backend() == "auto"
    assert paths() == auto and paths(backend="auto") == auto
    assert paths(backend="torch") == {"reference"}
    assert paths(x.double(), backend="auto") == {on_device}
    if _common.HAS_TRITON:
        assert paths(backend="triton") == {"triton"}
        with pytest.raises(TypeError, match="float64"):
            call(x.double(), backend="triton")
        with kernels.use_backend("triton"):
            assert kernels.get_backend() == "triton"
            assert paths() == {"triton"}
            assert paths(backend="torch") == {"reference"}  # the argument beats the default
    with kernels.use_backend("torch"):
        assert paths() == {"reference"}
    assert kernels.get_backend() == "auto"
    kernels.set_backend("torch")
    try:
        assert paths() == {"reference"}
    finally:
        kernels.set_backend("auto")
    for bad in (lambda: kernels.set_backend("cuda"), lambda: kernels.use_backend("cuda").__enter__(),
                lambda: call(x, backend="cuda")):
        with pytest.raises(ValueError, match="unknown kernel backend"):
            bad()
    assert kernels.get_backend() == "auto"
