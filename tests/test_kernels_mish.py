"""kernels.mish (fused residual_mish / dense_residual_mish): the Triton path against
kernels.reference (forward and backward; NCHW, channels_last, mixed layouts and views; odd
shapes; fp32/fp16/bf16), torch.compile(fullgraph=True), the backend switch, lazy Triton
import, and the error for a CPU tensor without the interpreter. Tolerances:
tests/kernel_helpers.py."""
import pytest
import torch

import kernels
import kernels.mish as kmish
from kernels import _common, reference
from tests.kernel_helpers import (DEVICE, DTYPES, LAYOUTS, SHAPE_IDS, SHAPES, SUM_TOL, TOL, GraphRecorder,
                                  check_backend_switch, check_blocks_match, check_clear_cpu_error,
                                  check_compiles_for_sm90, check_directional_derivatives, close,
                                  close_steps, make, needs_triton, record_paths, run_python, step, twins)


def _mish_run(fn, ts, dy):
    ts = [t.detach().clone().requires_grad_() for t in ts]
    y = fn(ts[0], ts[1:])
    y.backward(dy)
    return [y] + [t.grad for t in ts]


def _dense(x, previous):
    return kernels.dense_residual_mish(x, previous, backend="triton")


# ---------------------------------------------------------------------------------------
# Gradients: the reference (float64 gradcheck), the Triton backward (finite differences)


def test_reference_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    x, r, s = (torch.randn(2, 3, 3, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(reference.residual_mish, (x, r))
    assert torch.autograd.gradcheck(lambda x, r, s: reference.dense_residual_mish(x, [r, s, r]), (x, r, s))


@needs_triton
def test_triton_backward_finite_differences():
    """Gradients of x and of every s_k (one tensor used twice: its gradients add up)
    against central differences of the Triton forward."""
    x, r, s = (make((2, 3, 3, 4), scale=3.0, seed=i) for i in range(3))
    check_directional_derivatives(lambda x, r: kernels.residual_mish(x, r, backend="triton"), (x, r))
    check_directional_derivatives(lambda x, r, s: _dense(x, [r, s, r]), (x, r, s))


# ---------------------------------------------------------------------------------------
# Triton vs reference


@needs_triton
@pytest.mark.parametrize("k", [1, 3], ids=["residual", "dense3"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_mish_chain_matches_reference(dtype, shape, layout, k, no_copies):
    # scale 12: sums reach past +-20, the kernel's tanh(softplus) cut-over, and far negative.
    ts = [make(shape, dtype, layout, scale=12.0, seed=i) for i in range(k + 1)]
    dy = make(shape, dtype, layout, seed=10)
    if k == 1:
        fused = _mish_run(lambda x, p: kernels.residual_mish(x, p[0], backend="triton"), ts, dy)
    else:
        fused = _mish_run(_dense, ts, dy)
    assert not no_copies, f"re-layout inside the fused op: {no_copies}"
    ref = _mish_run(reference.dense_residual_mish, [t.float() for t in ts], dy.float())
    assert fused[0].dtype == dtype and _common.same_strides(fused[0], ts[0])
    assert len(fused) == len(ref) == k + 2
    for got, want in zip(fused, ref):
        close(got, want, TOL[dtype])


@needs_triton
def test_mish_chain_mixed_layouts_and_views():
    """A skip in the other layout, a non-dense (sliced) x, and the same tensor twice."""
    x = make((3, 5, 7, 9), layout=torch.channels_last, scale=3.0)
    s = make((3, 5, 7, 9), scale=3.0, seed=1)
    wide = make((3, 8, 7, 9), scale=3.0, seed=2)
    for ts in ([x, s], [wide[:, :5], x, x, s]):
        dy = make((3, 5, 7, 9), seed=3)
        fused = _mish_run(_dense, ts, dy)
        ref = _mish_run(reference.dense_residual_mish, ts, dy)
        for got, want in zip(fused, ref):
            close(got, want, TOL[torch.float32])
    assert kernels.dense_residual_mish(x, [], backend="triton") is x


@needs_triton
@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("dense", [False, True], ids=["residual", "dense"])
def test_blocks_match_nn_modules(dense):
    """ResBlocks (Conv -> BN -> SiLU -> Conv) whose residual / dense pass-throughs are the
    fused ops vs F.mish and the reference chain."""
    check_blocks_match(fused_bn=False, fused_mish=True, dense=dense)


# ---------------------------------------------------------------------------------------
# Registration: torch.compile(fullgraph=True), opcheck, backend switch, lazy import,
# CPU without interpreter


@needs_triton
@pytest.mark.usefixtures("no_tf32")
def test_compile_fullgraph_matches_eager():
    """torch.compile(fullgraph=True) of a dense ResBlock group on the fused mish ops: each
    pass-through is one graph node (running its Triton kernel, interpreted on CPU); output,
    gradients and running statistics match the model run eagerly."""
    eager, _ = twins(fused_bn=False, fused_mish=True, dense=True, c=3)
    model, _ = twins(fused_bn=False, fused_mish=True, dense=True, c=3)
    recorder = GraphRecorder()
    x = make((2, 3, 6, 5), seed=5)
    with kernels.use_backend("triton"):
        want = step(eager, x)
        got = step(torch.compile(model, fullgraph=True, backend=recorder), x)
    close_steps(got, want)
    for a, b in zip(model.buffers(), eager.buffers()):
        close(a.float(), b.float(), SUM_TOL)
    # 3 residual + 2 dense (the first block's dense chain is empty: no op)
    assert recorder.targets.count("kernels.mish_chain") == 5, recorder.targets


@needs_triton
def test_opcheck():
    """torch.library.opcheck: schema, fake (meta) implementation, autograd registration."""
    g = torch.Generator().manual_seed(0)
    x, r, s = (torch.randn(2, 3, 4, 5, generator=g).to(DEVICE).requires_grad_() for _ in range(3))
    ops = torch.ops.kernels
    for op, args in [(ops.mish_chain, (x, [r])), (ops.mish_chain, (x, [r, s])),
                     (ops.mish_chain_backward, (x.detach(), [r.detach(), s.detach()], x.detach()))]:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("dense", [False, True], ids=["residual_mish", "dense_residual_mish"])
def test_backend_switch(monkeypatch, dense):
    seen = record_paths(monkeypatch, kmish, "residual_mish", "dense_residual_mish")
    original = kmish.mish_sum
    monkeypatch.setattr(kmish, "mish_sum", lambda x, r: seen.append("eager") or original(x, r))
    if dense:
        check_backend_switch(seen, lambda x, **kw: kernels.dense_residual_mish(x, [x, x], **kw), off_cuda="eager")
    else:
        check_backend_switch(seen, lambda x, **kw: kernels.residual_mish(x, x, **kw), off_cuda="eager")


# ---------------------------------------------------------------------------------------
# The eager one-exp path ("auto" off CUDA) against the reference


def test_mish_sum_gradcheck_float64():
    g = torch.Generator().manual_seed(2)
    x, r = (torch.randn(2, 3, 3, 4, generator=g, dtype=torch.float64, requires_grad=True) * 4 for _ in range(2))
    x, r = x.detach().requires_grad_(), r.detach().requires_grad_()
    assert torch.autograd.gradcheck(kmish.mish_sum, (x, r))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mish_sum_matches_reference(dtype, layout):
    """Forward and both gradients against autograd of the reference over sums in [-40, 40]
    (past the exp cap, far negative), at the dtype's tolerance (TOL); the output keeps x's
    layout; x = -inf+r and NaN propagate as in the reference."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    g = torch.Generator().manual_seed(3)
    x, r = ((torch.rand(4, 6, 5, 7, generator=g) * 40 - 20).to(dtype).to(memory_format=fmt) for _ in range(2))
    dy = torch.randn(x.shape, generator=g).to(dtype)
    got = _mish_run(lambda a, rest: kmish.mish_sum(a, rest[0]), [x, r], dy)
    want = _mish_run(lambda a, rest: reference.residual_mish(a.float(), rest[0].float()), [x, r], dy.float())
    for a, b in zip(got, want):
        close(a, b, TOL[dtype])
    assert got[0].is_contiguous(memory_format=fmt)
    special = torch.tensor([float("nan"), float("-inf"), float("inf"), 0.0], dtype=dtype)
    torch.testing.assert_close(kmish.mish_sum(special, torch.zeros_like(special)),
                               reference.residual_mish(special, torch.zeros_like(special)), equal_nan=True)


@needs_triton
def test_cpu_tensor_without_interpreter_fails_clearly():
    check_clear_cpu_error("""
print(error(lambda: kernels.residual_mish(x, x, backend="triton")))
with kernels.use_backend("triton"):
    print(error(lambda: kernels.dense_residual_mish(x, [x, x])))
print(error(lambda: torch.ops.kernels.mish_chain(x, [x])))
assert torch.allclose(kernels.residual_mish(x, x, backend="auto"), torch.nn.functional.mish(x + x), rtol=1e-5, atol=1e-6)
""", "kernels._triton_mish")


LAZY_IMPORT = """
import os, sys, torch
import kernels
assert "triton" not in sys.modules, "importing kernels imported triton"
import triton  # as torch.utils.flop_counter (engine.models) does, before the variable is set
os.environ["TRITON_INTERPRET"] = "1"
x, r = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
y = kernels.residual_mish(x, r, backend="triton")
assert torch.allclose(y, torch.nn.functional.mish(x + r), atol=1e-5)
print("ok")
"""


@needs_triton
def test_kernels_import_lazily():
    """`import kernels` does not import Triton, and the Triton sources are decorated on first
    use, so TRITON_INTERPRET set after `import triton` still gives interpreted kernels."""
    out = run_python(LAZY_IMPORT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the other tests compile every kernel for real")
def test_kernels_compile_for_sm90():
    check_compiles_for_sm90("mish")
