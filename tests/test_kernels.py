"""Fused kernels (kernels/): Triton forward and backward against the pure-torch references.

Without CUDA the Triton kernels run under TRITON_INTERPRET=1 (set here before anything
imports the Triton sources; importing `kernels` does not import them), so shapes stay tiny.
On a GPU box the same tests run the compiled kernels on CUDA tensors.

Tolerances per input dtype (Liger-Kernel style). The kernels compute in fp32 and round once
at the store, so low-precision results are compared with the reference evaluated in fp32 on
the same (exactly upcast) inputs:
* fp32: rtol 1e-5, atol 1e-5 x max|ref| -- same math, only summation order and exp/sqrt
  implementations differ (observed <= ~2e-6 relative).
* fp16: rtol 2e-3 (~4 ulp of 2^-11): one rounding of the result (RTNE) plus fp32 noise.
* bf16: rtol 1.6e-2 (2 ulp of 2^-7): under the interpreter the fp32 -> bf16 store truncates
  instead of rounding to nearest (measured: 100% of elements equal truncation), i.e. up to
  1 ulp (2^-7 relative) where the GPU is within half an ulp.
Per-channel sums (dweight, dbias, batch statistics) are fp32 accumulations of exactly
upcast inputs, so they use the fp32 tolerance scaled by 10 whatever the input dtype.
"""
import os
import re

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kernels  # noqa: E402
import kernels.batchnorm_silu as kbn  # noqa: E402
import kernels.mish as kmish  # noqa: E402
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
DTYPES = [pytest.param(d, id=str(d).split(".")[-1]) for d in TOL]
LAYOUTS = [pytest.param(torch.contiguous_format, id="nchw"),
           pytest.param(torch.channels_last, id="channels_last")]
# N=1; C=3, 5 (not powers of two) and 16; H*W = 16, 63, 561 (no block size divides 63 or 561,
# and 2x33x17 takes two row splits, the second partly past the end); 4x4 and 64x64 maps.
SHAPES = [(1, 3, 4, 4), (3, 5, 7, 9), (2, 3, 33, 17), (1, 3, 64, 64), (3, 16, 4, 4)]


def close(actual, expected, tol):
    rtol, atol = tol
    expected = expected.float()
    torch.testing.assert_close(actual.float(), expected, rtol=rtol,
                               atol=atol * max(1.0, expected.abs().max().item()))


def make(shape, dtype, layout, scale=1.0, shift=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scale + shift
    return x.to(DEVICE, dtype).to(memory_format=layout)


@pytest.fixture(autouse=True)
def _no_tf32():
    """Full fp32 convs/matmuls on a GPU: the block tests compare two models whose conv inputs
    differ by fp32 rounding, which TF32 would amplify past the tolerances."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture
def no_copies(monkeypatch):
    """Counts every re-layout the kernels could do: Tensor.contiguous and the one helper
    (`_common.relayout`) they use for mismatched layouts."""
    calls = []
    original = torch.Tensor.contiguous

    def contiguous(self, *a, **k):
        calls.append("contiguous")
        return original(self, *a, **k)

    def relayout(t, ref, _orig=_common.relayout):
        out = _orig(t, ref)
        if out is not t:
            calls.append("relayout")
        return out

    monkeypatch.setattr(torch.Tensor, "contiguous", contiguous)
    for mod in (kbn, kmish):
        monkeypatch.setattr(mod, "relayout", relayout)
    return calls


# ---------------------------------------------------------------------------------------
# References and backward formulas (float64 gradcheck)


def test_reference_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    x, r, s = (torch.randn(2, 3, 3, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    w, b = (torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(lambda x, w, b: reference.bn_silu(x, w, b, None, None, True), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: reference.bn_silu(x, w, b, rm, rv, False), (x, w, b))
    assert torch.autograd.gradcheck(reference.residual_mish, (x, r))
    assert torch.autograd.gradcheck(lambda x, r, s: reference.dense_residual_mish(x, [r, s, r]), (x, r, s))


def test_backward_formulas_gradcheck_float64():
    """The ops' torch implementation (use_triton=False) uses the hand-written backward
    formulas the Triton kernels implement; gradcheck them in float64."""
    g = torch.Generator().manual_seed(2)
    x, r, s = (torch.randn(2, 3, 3, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    w, b = (torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    ops = torch.ops.kernels
    assert torch.autograd.gradcheck(lambda x, w, b: ops.bn_silu_train(x, w, b, 1e-5, False)[0], (x, w, b))
    assert torch.autograd.gradcheck(lambda x: ops.bn_silu_train(x, None, None, 1e-5, False)[0], (x,))
    assert torch.autograd.gradcheck(lambda x, w, b: ops.bn_silu_eval(x, w, b, rm, rv, 1e-5, False), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, r, s: ops.mish_chain(x, [r, s, r], False), (x, r, s))


# ---------------------------------------------------------------------------------------
# bn_silu: Triton vs reference


def _bn_run(fn, x, w, b, dy, stats, training):
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = fn(x, w, b, *stats, training, 0.1, 1e-5)
    y.backward(dy)
    return y, x.grad, w.grad, b.grad


@needs_triton
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES)
def test_bn_silu_train_matches_reference(dtype, shape, layout, no_copies):
    c = shape[1]
    x = make(shape, dtype, layout, scale=2.0, shift=1.5)  # mean far from 0: Welford matters
    w, b = make((c,), torch.float32, torch.contiguous_format, seed=1), make((c,), torch.float32, torch.contiguous_format, seed=2)
    dy = make(shape, dtype, layout, seed=3)
    stats_t = [torch.zeros(c, device=DEVICE), torch.ones(c, device=DEVICE)]
    stats_r = [t.clone() for t in stats_t]
    fused = _bn_run(lambda *a: kernels.bn_silu(*a, backend="triton"), x, w, b, dy, stats_t, True)
    assert not no_copies, f"re-layout inside the fused op: {no_copies}"
    ref = _bn_run(reference.bn_silu, x.float(), w, b, dy.float(), stats_r, True)
    assert fused[0].dtype == dtype and fused[1].dtype == dtype
    assert _common.same_strides(fused[0], x) and _common.same_strides(fused[1], x)
    close(fused[0], ref[0], TOL[dtype])   # y
    close(fused[1], ref[1], TOL[dtype])   # dx
    close(fused[2], ref[2], SUM_TOL)      # dweight
    close(fused[3], ref[3], SUM_TOL)      # dbias
    close(stats_t[0], stats_r[0], SUM_TOL)  # running mean
    close(stats_t[1], stats_r[1], SUM_TOL)  # running var (unbiased)


@needs_triton
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(1, 3, 4, 4), (3, 5, 7, 9)], ids=["1x3x4x4", "3x5x7x9"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bn_silu_eval_matches_reference(dtype, shape, layout, no_copies):
    c = shape[1]
    x = make(shape, dtype, layout, scale=2.0, shift=0.5)
    w, b = make((c,), torch.float32, torch.contiguous_format, seed=1), make((c,), torch.float32, torch.contiguous_format, seed=2)
    dy = make(shape, dtype, layout, seed=3)
    stats = [make((c,), torch.float32, torch.contiguous_format, seed=4),
             make((c,), torch.float32, torch.contiguous_format, seed=5).abs() + 0.5]
    before = [t.clone() for t in stats]
    fused = _bn_run(lambda *a: kernels.bn_silu(*a, backend="triton"), x, w, b, dy, stats, False)
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
    x = make((3, 5, 7, 9), torch.float32, torch.channels_last, scale=3.0)
    x[:, 2] = 4.0
    for dy_layout in (None, torch.contiguous_format):
        xt, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        yt = kernels.bn_silu(xt, None, None, None, None, True, backend="triton")
        yr = reference.bn_silu(xr, None, None, None, None, True)
        if dy_layout is None:
            yt.sum().backward()
            yr.sum().backward()
        else:
            dy = make(x.shape, torch.float32, dy_layout, seed=7)
            yt.backward(dy)
            yr.backward(dy)
        close(yt, yr, TOL[torch.float32])
        close(xt.grad, xr.grad, TOL[torch.float32])
    x2 = make((6, 5), torch.float32, torch.contiguous_format)
    w = make((5,), torch.float32, torch.contiguous_format, seed=1)
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
    for step in range(4):
        x = make((3, 5, 7, 9), torch.float32, torch.channels_last, scale=1 + step, shift=step, seed=step)
        close(fused(x), plain(x), TOL[torch.float32])
    for name in ("running_mean", "running_var"):
        close(getattr(fused, name), getattr(bn, name), SUM_TOL)
    assert fused.num_batches_tracked.item() == bn.num_batches_tracked.item() == 4
    fused.eval()
    plain.eval()
    x = make((2, 5, 4, 4), torch.float32, torch.contiguous_format, seed=9)
    close(fused(x), plain(x), TOL[torch.float32])
    nn.BatchNorm2d(5).load_state_dict(fused.state_dict())
    kernels.BatchNormSiLU2d(5).load_state_dict(bn.state_dict())


# ---------------------------------------------------------------------------------------
# residual_mish / dense_residual_mish: Triton vs reference


def _mish_run(fn, ts, dy):
    ts = [t.detach().clone().requires_grad_() for t in ts]
    y = fn(ts[0], ts[1:])
    y.backward(dy)
    return [y] + [t.grad for t in ts]


@needs_triton
@pytest.mark.parametrize("k", [1, 3], ids=["residual", "dense3"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES)
def test_mish_chain_matches_reference(dtype, shape, layout, k, no_copies):
    # scale 12: sums reach past +-20, the kernel's tanh(softplus) cut-over, and far negative.
    ts = [make(shape, dtype, layout, scale=12.0, seed=i) for i in range(k + 1)]
    dy = make(shape, dtype, layout, seed=10)
    if k == 1:
        fused = _mish_run(lambda x, p: kernels.residual_mish(x, p[0], backend="triton"), ts, dy)
    else:
        fused = _mish_run(lambda x, p: kernels.dense_residual_mish(x, p, backend="triton"), ts, dy)
    assert not no_copies, f"re-layout inside the fused op: {no_copies}"
    ref = _mish_run(reference.dense_residual_mish, [t.float() for t in ts], dy.float())
    assert fused[0].dtype == dtype and _common.same_strides(fused[0], ts[0])
    for got, want in zip(fused, ref):
        close(got, want, TOL[dtype])


@needs_triton
def test_mish_chain_mixed_layouts_and_views():
    """A skip in the other layout, a non-dense (sliced) x, and the same tensor twice."""
    x = make((3, 5, 7, 9), torch.float32, torch.channels_last, scale=3.0)
    s = make((3, 5, 7, 9), torch.float32, torch.contiguous_format, scale=3.0, seed=1)
    wide = make((3, 8, 7, 9), torch.float32, torch.contiguous_format, scale=3.0, seed=2)
    for ts in ([x, s], [wide[:, :5], x, x, s]):
        dy = make((3, 5, 7, 9), torch.float32, torch.contiguous_format, seed=3)
        fused = _mish_run(lambda x, p: kernels.dense_residual_mish(x, p, backend="triton"), ts, dy)
        ref = _mish_run(reference.dense_residual_mish, ts, dy)
        for got, want in zip(fused, ref):
            close(got, want, TOL[torch.float32])
    assert kernels.dense_residual_mish(x, [], backend="triton") is x


# ---------------------------------------------------------------------------------------
# Blocks built from the fused ops vs the same blocks from nn modules


class ResBlocks(nn.Module):
    """The report's ResBlock group (Conv -> BN -> SiLU -> Conv) with its residual or dense
    pass-through; `fused` picks BatchNormSiLU2d + kernels.* or nn.BatchNorm2d + SiLU + mish."""

    def __init__(self, c: int, n: int, fused: bool, dense: bool):
        super().__init__()
        bn = (lambda: kernels.BatchNormSiLU2d(c)) if fused else (lambda: nn.Sequential(nn.BatchNorm2d(c), nn.SiLU()))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, c, 3, padding=1), bn(), nn.Conv2d(c, c, 3, padding=1)) for _ in range(n))
        self.fused, self.dense = fused, dense

    def forward(self, x):
        sequence = [x]
        for i, block in enumerate(self.blocks):
            if self.dense:
                x = kernels.dense_residual_mish(x, sequence[:i]) if self.fused else \
                    reference.dense_residual_mish(x, sequence[:i])
            x = kernels.residual_mish(x, block(x)) if self.fused else F.mish(x + block(x))
            sequence.append(x)
        return x


def _twins(dense: bool, c: int = 5, n: int = 3):
    torch.manual_seed(0)
    fused, plain = ResBlocks(c, n, True, dense).to(DEVICE), ResBlocks(c, n, False, dense).to(DEVICE)
    with torch.no_grad():
        for m in fused.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    # blocks.i.1.<bn state> (BatchNormSiLU2d) is blocks.i.1.0.<bn state> (BatchNorm2d, SiLU)
    plain.load_state_dict({re.sub(r"^(blocks\.\d+\.1)\.", r"\1.0.", k): v for k, v in fused.state_dict().items()})
    return fused, plain


def _step(model, x):
    x = x.detach().clone().requires_grad_()
    y = model(x)
    y.backward(torch.ones_like(y) / y.numel() ** 0.5)
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return y, x.grad, grads


@needs_triton
@pytest.mark.parametrize("dense", [False, True], ids=["residual", "dense"])
def test_blocks_match_nn_modules(dense):
    fused, plain = _twins(dense)
    x = make((3, 5, 7, 9), torch.float32, torch.channels_last, seed=4)
    fused, plain = fused.to(memory_format=torch.channels_last), plain.to(memory_format=torch.channels_last)
    with kernels.use_backend("triton"):
        got = _step(fused, x)
    want = _step(plain, x)
    close(got[0], want[0], (1e-4, 1e-4))
    close(got[1], want[1], (1e-4, 1e-4))
    for g, w in zip(got[2], want[2]):
        close(g, w, (1e-4, 1e-4))
    states = plain.state_dict()
    for k, v in fused.state_dict().items():
        if "running" in k:
            close(v, states[re.sub(r"^(blocks\.\d+\.1)\.", r"\1.0.", k)], SUM_TOL)


# ---------------------------------------------------------------------------------------
# Registration: torch.compile(fullgraph=True), opcheck, backend selection, lazy import


@needs_triton
def test_compile_fullgraph_matches_eager():
    """torch.compile(fullgraph=True) of a dense ResBlock group on the fused ops: the custom
    ops are single graph nodes (they run the Triton kernels, interpreted on CPU). Outputs,
    gradients and running statistics match the same model run eagerly."""
    eager, _ = _twins(dense=True, c=3)
    model, _ = _twins(dense=True, c=3)
    x = make((2, 3, 6, 5), torch.float32, torch.contiguous_format, seed=5)
    with kernels.use_backend("triton"):
        want = _step(eager, x)
        got = _step(torch.compile(model, fullgraph=True), x)
    close(got[0], want[0], (1e-4, 1e-4))
    close(got[1], want[1], (1e-4, 1e-4))
    for g, w in zip(got[2], want[2]):
        close(g, w, (1e-4, 1e-4))
    for a, b in zip(model.buffers(), eager.buffers()):
        close(a.float(), b.float(), SUM_TOL)


@needs_triton
@pytest.mark.parametrize("use_triton", [False, True], ids=["torch_impl", "triton_impl"])
def test_opcheck(use_triton):
    """torch.library.opcheck: schema, fake (meta) implementation, autograd registration."""
    g = torch.Generator().manual_seed(0)
    x, r, s = (torch.randn(2, 3, 4, 5, generator=g).to(DEVICE).requires_grad_() for _ in range(3))
    w, b = (torch.randn(3, generator=g).to(DEVICE).requires_grad_() for _ in range(2))
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    ops = torch.ops.kernels
    mean, var = torch.rand(3, device=DEVICE), torch.rand(3, device=DEVICE) + 0.5
    cases = [(ops.bn_silu_train, (x, w, b, 1e-5, use_triton)),
             (ops.bn_silu_eval, (x, w, b, rm, rv, 1e-5, use_triton)),
             (ops.bn_silu_backward, (x.detach(), x.detach(), w.detach(), None, mean, var, 1e-5, True, use_triton)),
             (ops.bn_running_update, (rm.clone(), rv.clone(), mean, var, 0.1, 40, use_triton)),
             (ops.mish_chain, (x, [r, s], use_triton)),
             (ops.mish_chain_backward, (x.detach(), [r.detach(), s.detach()], x.detach(), use_triton))]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_backend_selection():
    x = torch.randn(2, 3, 4, 4)
    assert kernels.get_backend() == "auto"
    assert not _common.use_triton(None, x)  # auto on CPU: the reference
    assert not _common.use_triton("torch", x)
    with kernels.use_backend("torch"):
        assert kernels.get_backend() == "torch"
    assert kernels.get_backend() == "auto"
    with pytest.raises(ValueError):
        kernels.use_backend("cuda").__enter__()
    if _common.HAS_TRITON:
        assert _common.use_triton("triton", x)
        with pytest.raises(TypeError):
            _common.use_triton("triton", x.double())
    if torch.cuda.is_available() and _common.HAS_TRITON:
        assert _common.use_triton("auto", x.cuda()) and not _common.use_triton("auto", x.cuda().double())


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
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", LAZY_IMPORT], cwd=ROOT, capture_output=True, text=True,
                         env=dict(env, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES=""), timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the other tests compile every kernel for real")
def test_kernels_compile_for_sm90():
    """Every kernel through the real compiler (ptxas, sm_90) without a GPU: catches what the
    interpreter accepts but the compiler rejects (non-constexpr globals, bad tuple use)."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.kernels", "--compile-only"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(ROOT), TRITON_INTERPRET="0"))
    if "No module named 'triton.backends.nvidia'" in out.stderr:
        pytest.skip("triton without the nvidia backend")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
