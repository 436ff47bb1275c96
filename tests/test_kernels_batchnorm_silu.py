"""kernels.batchnorm_silu (fused BatchNorm2d + SiLU): the Triton path against
kernels.reference.bn_silu (forward, backward, running statistics; NCHW and channels_last; odd
shapes; fp32/fp16/bf16), torch.compile(fullgraph=True), the backend switch, and the error for a
CPU tensor without the interpreter. Tolerances: tests/kernel_helpers.py."""
import pytest
import torch
import torch.nn as nn

import kernels
import kernels.batchnorm_silu as kbn
from kernels import _common, reference
from tests.kernel_helpers import (DEVICE, DTYPES, LAYOUTS, SHAPE_IDS, SHAPES, SUM_TOL, TOL, GraphRecorder,
                                  check_backend_switch, check_blocks_match, check_clear_cpu_error,
                                  check_compiles_for_sm90, check_directional_derivatives, close,
                                  close_steps, make, needs_triton, record_paths, step, twins)


def _bn_run(fn, x, w, b, dy, stats, training):
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = fn(x, w, b, *stats, training, 0.1, 1e-5)
    y.backward(dy)
    return y, x.grad, w.grad, b.grad


def _triton(*args):
    return kernels.bn_silu(*args, backend="triton")


def _affine(c):
    return make((c,), seed=1), make((c,), seed=2)


# ---------------------------------------------------------------------------------------
# Gradients: the reference (float64 gradcheck), the Triton backward (finite differences)


def test_reference_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w, b = (torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(lambda x, w, b: reference.bn_silu(x, w, b, None, None, True), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: reference.bn_silu(x, w, b, rm, rv, False), (x, w, b))


@needs_triton
@pytest.mark.parametrize("layout", LAYOUTS)
def test_triton_backward_finite_differences(layout):
    """d/dx, d/dweight, d/dbias of the Triton op against central differences of the Triton
    forward: batch statistics (with and without affine) and running statistics."""
    x = make((2, 3, 3, 4), layout=layout, scale=2.0, shift=1.0)
    w, b = _affine(3)
    rm, rv = make((3,), seed=4), make((3,), seed=5).abs() + 0.5
    check_directional_derivatives(lambda x, w, b: _triton(x, w, b, None, None, True), (x, w, b))
    check_directional_derivatives(lambda x: _triton(x, None, None, None, None, True), (x,))
    check_directional_derivatives(lambda x, w, b: _triton(x, w, b, rm, rv, False), (x, w, b))


# ---------------------------------------------------------------------------------------
# Triton vs reference


@needs_triton
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bn_silu_train_matches_reference(dtype, shape, layout, no_copies):
    c = shape[1]
    x = make(shape, dtype, layout, scale=2.0, shift=1.5)  # mean far from 0: Welford matters
    w, b = _affine(c)
    dy = make(shape, dtype, layout, seed=3)
    stats_t = [torch.zeros(c, device=DEVICE), torch.ones(c, device=DEVICE)]
    stats_r = [t.clone() for t in stats_t]
    fused = _bn_run(_triton, x, w, b, dy, stats_t, True)
    assert not no_copies, f"re-layout inside the fused op: {no_copies}"
    ref = _bn_run(reference.bn_silu, x.float(), w, b, dy.float(), stats_r, True)
    assert fused[0].dtype == dtype and fused[1].dtype == dtype
    assert _common.same_strides(fused[0], x) and _common.same_strides(fused[1], x)
    close(fused[0], ref[0], TOL[dtype])   # y
    close(fused[1], ref[1], TOL[dtype])   # dx
    close(fused[2], ref[2], SUM_TOL)      # dweight
    close(fused[3], ref[3], SUM_TOL)      # dbias
    assert not torch.equal(stats_t[1], torch.ones(c, device=DEVICE))
    close(stats_t[0], stats_r[0], SUM_TOL)  # running mean
    close(stats_t[1], stats_r[1], SUM_TOL)  # running var (unbiased)


@needs_triton
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES[:2], ids=SHAPE_IDS[:2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bn_silu_eval_matches_reference(dtype, shape, layout, no_copies):
    c = shape[1]
    x = make(shape, dtype, layout, scale=2.0, shift=0.5)
    w, b = _affine(c)
    dy = make(shape, dtype, layout, seed=3)
    stats = [make((c,), seed=4), make((c,), seed=5).abs() + 0.5]
    before = [t.clone() for t in stats]
    fused = _bn_run(_triton, x, w, b, dy, stats, False)
    assert not no_copies
    ref = _bn_run(reference.bn_silu, x.float(), w, b, dy.float(), stats, False)
    assert all(torch.equal(a, b) for a, b in zip(stats, before)), "eval mode updated running stats"
    close(fused[0], ref[0], TOL[dtype])
    close(fused[1], ref[1], TOL[dtype])
    close(fused[2], ref[2], SUM_TOL)
    close(fused[3], ref[3], SUM_TOL)


@needs_triton
@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # numpy, in the interpreter's sigmoid
def test_bn_silu_edge_inputs():
    """No affine; broadcast gradient (stride-0 dy from .sum()); a gradient in the other
    layout; 2-D input (BatchNorm1d-style); constant channel (variance 0)."""
    x = make((3, 5, 7, 9), layout=torch.channels_last, scale=3.0)
    x[:, 2] = 4.0
    for dy_layout in (None, torch.contiguous_format):
        xt, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        yt = kernels.bn_silu(xt, None, None, None, None, True, backend="triton")
        yr = reference.bn_silu(xr, None, None, None, None, True)
        if dy_layout is None:
            yt.sum().backward()
            yr.sum().backward()
        else:
            dy = make(x.shape, layout=dy_layout, seed=7)
            yt.backward(dy)
            yr.backward(dy)
        close(yt, yr, TOL[torch.float32])
        close(xt.grad, xr.grad, TOL[torch.float32])
    x2 = make((6, 5))
    w = make((5,), seed=1)
    close(kernels.bn_silu(x2, w, w, None, None, True, backend="triton"),
          reference.bn_silu(x2, w, w, None, None, True), TOL[torch.float32])


def test_bn_silu_single_value_per_channel_raises():
    x = torch.randn(1, 3, 1, 1, device=DEVICE)
    for backend in ("torch",) + (("triton",) if _common.HAS_TRITON else ()):
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            kernels.bn_silu(x, None, None, None, None, True, backend=backend)


@needs_triton
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
def test_batchnorm_silu2d_tracks_nn_batchnorm(momentum):
    """BatchNormSiLU2d (Triton) vs nn.BatchNorm2d + nn.SiLU: running stats and
    num_batches_tracked after several steps, eval outputs, state dicts both ways."""
    torch.manual_seed(0)
    fused = kernels.BatchNormSiLU2d(5, momentum=momentum, backend="triton").to(DEVICE)
    bn = nn.BatchNorm2d(5, momentum=momentum).to(DEVICE)
    with torch.no_grad():
        fused.weight.uniform_(0.5, 1.5)
        fused.bias.uniform_(-0.5, 0.5)
    bn.load_state_dict(fused.state_dict())
    plain = nn.Sequential(bn, nn.SiLU())
    for i in range(4):
        x = make((3, 5, 7, 9), layout=torch.channels_last, scale=1 + i, shift=i, seed=i)
        close(fused(x), plain(x), TOL[torch.float32])
    for name in ("running_mean", "running_var"):
        close(getattr(fused, name), getattr(bn, name), SUM_TOL)
    assert fused.num_batches_tracked.item() == bn.num_batches_tracked.item() == 4
    fused.eval()
    plain.eval()
    x = make((2, 5, 4, 4), seed=9)
    close(fused(x), plain(x), TOL[torch.float32])
    nn.BatchNorm2d(5).load_state_dict(fused.state_dict())
    kernels.BatchNormSiLU2d(5).load_state_dict(bn.state_dict())


@needs_triton
@pytest.mark.usefixtures("no_tf32")
def test_blocks_match_nn_modules():
    """ResBlocks (Conv -> BatchNormSiLU2d -> Conv, mish pass-through) vs the same blocks with
    nn.BatchNorm2d + nn.SiLU."""
    check_blocks_match(fused_bn=True, fused_mish=False, dense=False)


# ---------------------------------------------------------------------------------------
# Registration: torch.compile(fullgraph=True), opcheck, backend switch, CPU without interpreter


@needs_triton
@pytest.mark.usefixtures("no_tf32")
def test_compile_fullgraph_matches_eager():
    """torch.compile(fullgraph=True) of ResBlocks on BatchNormSiLU2d: the ops are single graph
    nodes (running their Triton kernels, interpreted on CPU). Training step: output,
    gradients and running statistics match the model run eagerly; then eval mode."""
    eager, _ = twins(fused_bn=True, fused_mish=False, dense=False, c=3, n=2)
    model, _ = twins(fused_bn=True, fused_mish=False, dense=False, c=3, n=2)
    recorder = GraphRecorder()
    compiled = torch.compile(model, fullgraph=True, backend=recorder)
    x = make((2, 3, 6, 5), seed=5)
    with kernels.use_backend("triton"):
        want = step(eager, x)
        got = step(compiled, x)
        close_steps(got, want)
        for a, b in zip(model.buffers(), eager.buffers()):
            close(a.float(), b.float(), SUM_TOL)
        eager.eval()
        model.eval()
        with torch.no_grad():
            close(compiled(x), eager(x), (1e-4, 1e-4))
    assert recorder.targets.count("kernels.bn_silu_train") == 2, recorder.targets
    assert recorder.targets.count("kernels.bn_running_update") == 2
    assert recorder.targets.count("kernels.bn_silu_eval") == 2


@needs_triton
def test_opcheck():
    """torch.library.opcheck: schema, fake (meta) implementation, autograd registration."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 5, generator=g).to(DEVICE).requires_grad_()
    w, b = (torch.randn(3, generator=g).to(DEVICE).requires_grad_() for _ in range(2))
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    mean, var = torch.rand(3, device=DEVICE), torch.rand(3, device=DEVICE) + 0.5
    ops = torch.ops.kernels
    cases = [(ops.bn_silu_train, (x, w, b, 1e-5)),
             (ops.bn_silu_train, (x, None, None, 1e-5)),
             (ops.bn_silu_eval, (x, w, b, rm, rv, 1e-5)),
             (ops.bn_silu_backward, (x.detach(), x.detach(), w.detach(), None, mean, var, 1e-5, True)),
             (ops.bn_running_update, (rm.clone(), rv.clone(), mean, var, 0.1, 40))]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_backend_switch(monkeypatch):
    seen = record_paths(monkeypatch, kbn, "bn_silu")
    check_backend_switch(seen, lambda x, **kw: kernels.bn_silu(x, None, None, None, None, True, **kw))
    x = make((2, 3, 4, 4))
    seen.clear()
    kernels.BatchNormSiLU2d(3, backend="torch").to(DEVICE)(x)
    assert seen == ["reference"]
    if _common.HAS_TRITON:
        seen.clear()
        kernels.BatchNormSiLU2d(3, backend="triton").to(DEVICE)(x)
        assert seen == ["triton", "triton"]  # bn_silu_train, bn_running_update


@needs_triton
def test_cpu_tensor_without_interpreter_fails_clearly():
    check_clear_cpu_error("""
print(error(lambda: kernels.bn_silu(x, None, None, None, None, True, backend="triton")))
with kernels.use_backend("triton"):
    print(error(lambda: kernels.BatchNormSiLU2d(3)(x)))
print(error(lambda: torch.ops.kernels.bn_silu_train(x, None, None, 1e-5)))
y = kernels.bn_silu(x, None, None, None, None, True, backend="auto")
assert torch.equal(y, kernels.bn_silu(x, None, None, None, None, True, backend="torch"))
""", "kernels._triton_batchnorm_silu")


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the other tests compile every kernel for real")
def test_kernels_compile_for_sm90():
    check_compiles_for_sm90("bn_silu")
