"""Triton sources for BatchNorm+SiLU (imported lazily by ``kernels.batchnorm_silu``).

Every kernel sees x as rows x channels: row = (n, h*W + w), channel = c, addressed through
the strides (sN, sC, sHW), so contiguous NCHW (sHW = 1) and channels_last (sC = 1) are read
in place. Grid: (channel blocks, N, row splits); each program loops over its row range in
[BLOCK_R, BLOCK_C] tiles and keeps fp32 accumulators per channel.

Statistics are exact-merge Welford: each tile's mean and M2 are computed two-pass in
registers and merged into the running (count, mean, M2) with Chan's formula; programs write
partials that ``bn_stats_combine`` merges the same way. No E[x^2] - E[x]^2 anywhere.
"""
import triton
import triton.language as tl


@triton.jit
def _tile_ptrs(ptr, n, rows, cols, s_n, s_c, s_hw):
    return ptr + n * s_n + rows[:, None] * s_hw + cols[None, :] * s_c


@triton.jit
def _chan_merge(cnt, mean, m2, b_cnt, b_mean, b_m2):
    """Merge (b_cnt, b_mean, b_m2) into (cnt, mean, m2) (Chan et al.)."""
    tot = cnt + b_cnt
    frac = b_cnt / tl.maximum(tot, 1.0)
    delta = b_mean - mean
    return tot, mean + delta * frac, m2 + b_m2 + delta * delta * cnt * frac


@triton.jit
def _channel_params(w_ptr, b_ptr, mean_ptr, var_ptr, eps, cols, cmask,
                    HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    var = tl.load(var_ptr + cols, mask=cmask, other=1.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt_rn(var + eps)
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=cmask, other=1.0).to(tl.float32)
    else:
        w = tl.full(cols.shape, 1.0, tl.float32)
    if HAS_B:
        b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    else:
        b = tl.zeros(cols.shape, tl.float32)
    return mean, rstd, w, b


@triton.jit
def _tile_dz(x_ptr, dy_ptr, n, rows, cols, cmask, HW, sx_n, sx_c, sx_hw, sd_n, sd_c, sd_hw,
             mean, rstd, w, b):
    """(mask, x_hat, dL/dz) on one tile, for y = silu(z), z = x_hat * w + b,
    x_hat = (x - mean) * rstd; masked elements have dz = 0."""
    mask = (rows < HW)[:, None] & cmask[None, :]
    x = tl.load(_tile_ptrs(x_ptr, n, rows, cols, sx_n, sx_c, sx_hw), mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(_tile_ptrs(dy_ptr, n, rows, cols, sd_n, sd_c, sd_hw), mask=mask, other=0.0).to(tl.float32)
    x_hat = (x - mean[None, :]) * rstd[None, :]
    z = x_hat * w[None, :] + b[None, :]
    s = tl.sigmoid(z)
    return mask, x_hat, dy * s * (1.0 + z * (1.0 - s))


@triton.jit
def bn_stats_partial(x_ptr, part_ptr, C, HW, s_n, s_c, s_hw, P, ROWS_PER_SPLIT,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """part[0|1|2, p, c] = (count, mean, M2) of channel c over program p's rows."""
    n = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    cnt = tl.zeros([BLOCK_C], tl.float32)
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    r0 = split * ROWS_PER_SPLIT
    for r in range(0, ROWS_PER_SPLIT, BLOCK_R):
        rows = r0 + r + tl.arange(0, BLOCK_R)
        rmask = rows < HW
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(_tile_ptrs(x_ptr, n, rows, cols, s_n, s_c, s_hw), mask=mask, other=0.0).to(tl.float32)
        b_cnt = tl.sum(rmask.to(tl.float32), axis=0)
        b_mean = tl.sum(x, axis=0) / tl.maximum(b_cnt, 1.0)
        d = tl.where(mask, x - b_mean[None, :], 0.0)
        cnt, mean, m2 = _chan_merge(cnt, mean, m2, b_cnt, b_mean, tl.sum(d * d, axis=0))
    off = (n * tl.num_programs(2) + split) * C + cols
    tl.store(part_ptr + off, cnt, mask=cmask)
    tl.store(part_ptr + P * C + off, mean, mask=cmask)
    tl.store(part_ptr + 2 * P * C + off, m2, mask=cmask)


@triton.jit
def bn_stats_combine(part_ptr, mean_ptr, var_ptr, C, P,
                     BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merge P partials per channel into the batch mean and biased variance (fp32)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    cnt = tl.zeros([BLOCK_C], tl.float32)
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        mask = (ps < P)[:, None] & cmask[None, :]
        off = ps[:, None] * C + cols[None, :]
        p_cnt = tl.load(part_ptr + off, mask=mask, other=0.0)
        p_mean = tl.load(part_ptr + P * C + off, mask=mask, other=0.0)
        p_m2 = tl.load(part_ptr + 2 * P * C + off, mask=mask, other=0.0)
        b_cnt = tl.sum(p_cnt, axis=0)
        b_mean = tl.sum(p_cnt * p_mean, axis=0) / tl.maximum(b_cnt, 1.0)
        dm = p_mean - b_mean[None, :]
        b_m2 = tl.sum(p_m2 + p_cnt * dm * dm, axis=0)
        cnt, mean, m2 = _chan_merge(cnt, mean, m2, b_cnt, b_mean, b_m2)
    tl.store(mean_ptr + cols, mean, mask=cmask)
    tl.store(var_ptr + cols, m2 / tl.maximum(cnt, 1.0), mask=cmask)


@triton.jit
def bn_running_update(rm_ptr, rv_ptr, mean_ptr, var_ptr, C, momentum, unbias,
                      BLOCK_C: tl.constexpr):
    """running = (1 - momentum) * running + momentum * batch (variance unbiased), as
    nn.BatchNorm2d does."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    rm = tl.load(rm_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    rv = tl.load(rv_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0)
    var = tl.load(var_ptr + cols, mask=cmask, other=0.0)
    rm = momentum * mean + (1.0 - momentum) * rm
    rv = momentum * (var * unbias) + (1.0 - momentum) * rv
    tl.store(rm_ptr + cols, rm.to(rm_ptr.dtype.element_ty), mask=cmask)
    tl.store(rv_ptr + cols, rv.to(rv_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def bn_silu_apply(x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, eps, C, HW,
                  sx_n, sx_c, sx_hw, sy_n, sy_c, sy_hw, ROWS_PER_SPLIT,
                  HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """y = silu((x - mean) * rstd * w + b) with per-channel mean/var (batch or running)."""
    n = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mean, rstd, w, b = _channel_params(w_ptr, b_ptr, mean_ptr, var_ptr, eps, cols, cmask, HAS_W, HAS_B)
    scale = (rstd * w)[None, :]
    r0 = tl.program_id(2) * ROWS_PER_SPLIT
    for r in range(0, ROWS_PER_SPLIT, BLOCK_R):
        rows = r0 + r + tl.arange(0, BLOCK_R)
        mask = (rows < HW)[:, None] & cmask[None, :]
        x = tl.load(_tile_ptrs(x_ptr, n, rows, cols, sx_n, sx_c, sx_hw), mask=mask, other=0.0).to(tl.float32)
        z = (x - mean[None, :]) * scale + b[None, :]
        y = z * tl.sigmoid(z)
        tl.store(_tile_ptrs(y_ptr, n, rows, cols, sy_n, sy_c, sy_hw), y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def bn_silu_bwd_reduce(dy_ptr, x_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, part_ptr, eps, C, HW,
                       sx_n, sx_c, sx_hw, sd_n, sd_c, sd_hw, P, ROWS_PER_SPLIT,
                       HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """part[0|1, p, c] = program p's sum of dz and of dz * x_hat (dbias, dweight partials)."""
    n = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mean, rstd, w, b = _channel_params(w_ptr, b_ptr, mean_ptr, var_ptr, eps, cols, cmask, HAS_W, HAS_B)
    acc_db = tl.zeros([BLOCK_C], tl.float32)
    acc_dw = tl.zeros([BLOCK_C], tl.float32)
    r0 = split * ROWS_PER_SPLIT
    for r in range(0, ROWS_PER_SPLIT, BLOCK_R):
        rows = r0 + r + tl.arange(0, BLOCK_R)
        mask, x_hat, dz = _tile_dz(x_ptr, dy_ptr, n, rows, cols, cmask, HW, sx_n, sx_c, sx_hw,
                                   sd_n, sd_c, sd_hw, mean, rstd, w, b)
        acc_db += tl.sum(dz, axis=0)
        acc_dw += tl.sum(dz * x_hat, axis=0)
    off = (n * tl.num_programs(2) + split) * C + cols
    tl.store(part_ptr + off, acc_db, mask=cmask)
    tl.store(part_ptr + P * C + off, acc_dw, mask=cmask)


@triton.jit
def bn_silu_bwd_dx(dy_ptr, x_ptr, dx_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, db_ptr, dw_ptr, eps,
                   inv_count, C, HW, sx_n, sx_c, sx_hw, sd_n, sd_c, sd_hw, so_n, so_c, so_hw,
                   ROWS_PER_SPLIT, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                   TRAINING: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx = w * rstd * (dz - mean(dz) - x_hat * mean(dz * x_hat)) with batch statistics,
    dx = w * rstd * dz with running statistics (db = sum dz, dw = sum dz * x_hat)."""
    n = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mean, rstd, w, b = _channel_params(w_ptr, b_ptr, mean_ptr, var_ptr, eps, cols, cmask, HAS_W, HAS_B)
    scale = (w * rstd)[None, :]
    if TRAINING:
        m_db = (tl.load(db_ptr + cols, mask=cmask, other=0.0) * inv_count)[None, :]
        m_dw = (tl.load(dw_ptr + cols, mask=cmask, other=0.0) * inv_count)[None, :]
    r0 = tl.program_id(2) * ROWS_PER_SPLIT
    for r in range(0, ROWS_PER_SPLIT, BLOCK_R):
        rows = r0 + r + tl.arange(0, BLOCK_R)
        mask, x_hat, dz = _tile_dz(x_ptr, dy_ptr, n, rows, cols, cmask, HW, sx_n, sx_c, sx_hw,
                                   sd_n, sd_c, sd_hw, mean, rstd, w, b)
        if TRAINING:
            dx = (dz - m_db - x_hat * m_dw) * scale
        else:
            dx = dz * scale
        tl.store(_tile_ptrs(dx_ptr, n, rows, cols, so_n, so_c, so_hw), dx.to(dx_ptr.dtype.element_ty), mask=mask)
