"""Triton sources for the mish pass-through chain (imported lazily by ``kernels.mish``).

``x_k = mish(x_{k-1} + s_k)`` for k = 1..K, x_0 = x, over flat memory (x, every s_k, the
output and the gradients share one dense layout, so element i of each is the same logical
element). K is a compile-time constant and the s_k arrive as a tuple of pointers: one read
of x and of each s_k, one write, fp32 in between. The backward recomputes the K
pre-activations in registers and walks back: g_K = dy, g_{k-1} = g_k * mish'(t_k); the
gradient of s_k is g_{k-1} (and that of x equals that of s_1).
"""
import triton
import triton.language as tl

_BIG = tl.constexpr(20.0)  # above this tanh(softplus(t)) == 1 in fp32 (1 - tanh is ~4e-18)


@triton.jit
def _tanh_softplus(t):
    """(tanh(softplus(t)), u = exp(t), n) with tanh(log1p(u)) = n / (n + 2), n = u * (u + 2):
    exact algebra, no cancellation for t << 0 (n ~ 2u) and no overflow (t clamped)."""
    u = tl.exp(tl.minimum(t, _BIG))
    n = u * (u + 2.0)
    return tl.where(t > _BIG, 1.0, n / (n + 2.0)), u, n


@triton.jit
def _mish(t):
    tsp, _, _ = _tanh_softplus(t)
    return t * tsp


@triton.jit
def _mish_grad(t):
    """d mish / dt = tsp + t * sigmoid(t) * (1 - tsp^2), 1 - tsp^2 = 4 (n + 1) / (n + 2)^2."""
    tsp, u, n = _tanh_softplus(t)
    d = n + 2.0
    one_minus_sq = tl.where(t > _BIG, 0.0, 4.0 * (n + 1.0) / (d * d))
    return tsp + t * (u / (1.0 + u)) * one_minus_sq


@triton.jit
def mish_chain_fwd(x_ptr, S, y_ptr, numel, K: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    a = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    for k in tl.static_range(K):
        a = _mish(a + tl.load(S[k] + offs, mask=mask, other=0.0).to(tl.float32))
    tl.store(y_ptr + offs, a.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def mish_chain_bwd(x_ptr, S, dy_ptr, G, numel, K: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    a = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    ts = ()
    for k in tl.static_range(K):
        t = a + tl.load(S[k] + offs, mask=mask, other=0.0).to(tl.float32)
        ts = ts + (t,)
        if k < K - 1:
            a = _mish(t)
    g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    for j in tl.static_range(K):
        g = g * _mish_grad(ts[K - 1 - j])
        tl.store(G[K - 1 - j] + offs, g.to(G[K - 1 - j].dtype.element_ty), mask=mask)
