"""The augmentation spec applied to a whole batch of uint8 images on any device (CPU or CUDA).

    images = augment(batch_uint8, spec, generator, dtype)   # (N,H,W,3) or (N,3,H,W) uint8
    # -> (N,3,S,S) normalised, channels_last, in `dtype`, on the batch's device
    images = augment(batch_uint8, spec, train=False)          # resize + normalise only

Per-sample parameters come from `loaders.params` (one `torch.rand` per batch on the
generator's device); `draw_params` + `apply` are the two halves. Geometry (an "rrc" box
drawn on the original `src_hw` included) is ONE bilinear resampling per image through the
composed matrix, the zero fill a separate coverage mask; content one step crops and a
later one brings back is kept (`emulate_clipping=True` reproduces the sequence's black). Colour runs on the source before the upscaling warp, per
`spec.colour_mode`: "fast" (default) is one per-sample 3x3 matrix + offset with 1/255 and
1/std folded in, one batched matmul, clamped once; "exact" is torchvision's ops one by one
(each sample's op order, clamps, HSV hue). CPU: chunks of ~0.5M pixels (32 images at 128),
single-threaded worker threads. `python -m loaders.augment` prints augmentation-only
images/s (exact vs fast). Rationale and measurements: docs/loaders.md.
"""
from __future__ import annotations

import concurrent.futures
import functools
import os
import queue
import threading

import torch
import torch.nn.functional as F

from loaders.params import Params, center_crop_box, colour_affine, const, draw_params, stage_matrices
from loaders.spec import LUMA, AugmentSpec

# CPU: pixels augmented at a time per thread (the larger of the source and the output image;
# 32 images at 128, 512 at 32): a chunk pays a few hundred small ops, so small images want
# many per chunk (docs/loaders.md, "CPU threading").
_CPU_CHUNK_PIXELS = 32 * 128 * 128
_POOL_MIN_IMAGES = 64            # smaller batches run on the calling thread
_MIN_RANGE = 16                  # images per thread at least, however many threads
_PIVOT_GRID = 32                 # points per side sampling the canvas for the contrast pivot


# ---------------------------------------------------------------------------- geometry

def grid_planes(theta: torch.Tensor, S: int, projective: bool, out=None):
    """theta (N,3,3) applied to the half-pixel output grid: the normalised source x and y as
    two (N,S,S) float32 planes. Each is one broadcast sum of (N,1,S) and (N,S,1) rank-1
    terms (contiguous inner dimension, so vectorised), plus one division when projective.
    `out`: optional three (N,S,S) buffers for x, y and the homogeneous z."""
    theta = theta.to(torch.float32)
    xs = (torch.arange(S, device=theta.device, dtype=torch.float32) * 2 + 1) / S - 1
    a = (theta[:, :, 0:1] * xs + theta[:, :, 2:3]).unsqueeze(2)    # (N,3,1,S): x terms + const
    b = (theta[:, :, 1:2] * xs).unsqueeze(3)                        # (N,3,S,1): y terms
    bx, by, bz = out if out is not None else (None, None, None)
    gx, gy = torch.add(a[:, 0], b[:, 0], out=bx), torch.add(a[:, 1], b[:, 1], out=by)
    if projective:
        z = torch.add(a[:, 2], b[:, 2], out=bz)
        gx, gy = gx.div_(z), gy.div_(z)
    return gx, gy


def grid_from(theta: torch.Tensor, S: int, projective: bool) -> torch.Tensor:
    """(N,S,S,2) sampling grid for `F.grid_sample` (align_corners=False)."""
    return torch.stack(grid_planes(theta, S, projective), dim=-1)


def _edge_weight_(gx: torch.Tensor, gy: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """The weight bilinear sampling with zero padding gives the in-image pixels of an (h, w)
    image at normalised coordinates (gx, gy): c = prod over axes of clamp(distance to the
    edge in pixels + 0.5, 0, 1). Computed IN PLACE in gx (gy is clobbered too)."""
    for g, size in ((gx, hw[1]), (gy, hw[0])):
        half = size / 2
        g.abs_().mul_(-half).add_(half + 0.5).clamp_(0, 1)
    return gx.mul_(gy)


def box_bounds(p: Params) -> torch.Tensor:
    """(N,4) float32 (x min, x max, y min, y max): the normalised source coordinates of the
    "rrc" box's first and last pixel centres. Clamping the sampling grid there replicates
    the box's edge pixels, as torchvision's crop-then-resize does (the border of the crop,
    not of the source)."""
    top, left, h, w = p.box.unbind(-1)
    H, W = p.src_hw.unbind(-1)
    return torch.stack([(2 * left + 1) / W - 1, (2 * (left + w) - 1) / W - 1,
                        (2 * top + 1) / H - 1, (2 * (top + h) - 1) / H - 1], dim=-1).to(torch.float32)


def _coverage_(gx: torch.Tensor, gy: torch.Tensor, S: int) -> torch.Tensor:
    """(N,S,S) fill weight of an S-canvas sampled at normalised coordinates (gx, gy), as
    torchvision's tensor kernels apply it with fill=0; computed IN PLACE in gx (gy is
    clobbered too).

    Bilinear sampling with zero padding equals the edge weight c (`_edge_weight_`) times
    the edge-clamped ("border") sample; torchvision then multiplies by its sampled
    ones-mask (c again) to apply the fill. So the sequence's result is border sample * c^2."""
    cov = _edge_weight_(gx, gy, (S, S))
    return cov.mul_(cov)


class _Workspace(threading.local):
    """Per-thread CPU float32 buffers for one chunk, reused across calls: fresh multi-MB
    tensors are page-faulted in on every allocation, which cost more than the arithmetic."""

    def __init__(self):
        self.bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple, like: torch.Tensor | None = None) -> torch.Tensor:
        """The buffer `name` of `shape` (with `like`'s strides when given): the first `shape[0]`
        rows of a kept buffer at least that long (ranges of different lengths share it)."""
        t = self.bufs.get(name)
        if (t is None or t.shape[1:] != shape[1:] or t.shape[0] < shape[0]
                or (like is not None and t.stride() != like.stride())):
            t = torch.empty(shape) if like is None else torch.empty_like(like, dtype=torch.float32)
            self.bufs[name] = t
        return t[:shape[0]]


_WORK = _Workspace()


# ---------------------------------------------------------------------------- colour

def _gray(x: torch.Tensor) -> torch.Tensor:
    return x[:, 0:1].mul(LUMA[0]).add_(x[:, 1:2], alpha=LUMA[1]).add_(x[:, 2:3], alpha=LUMA[2])


def _blend(x: torch.Tensor, f, a, b, clamp: bool = True, canvas=None) -> torch.Tensor:
    """x <- f*x + (1-f)*(a*gray + b*mean(gray)), per-sample (N,) f, a, b; clamped to [0,1].
    brightness: (f,0,0); contrast: (f,0,1); saturation: (f,1,0); grayscale: (0,1,0).
    `canvas`: a coarse grid of the sequence's canvas at the jitter (see stage_matrices):
    the mean is taken there, zero fill included, as torchvision's contrast does."""
    v = lambda t: t.to(x.dtype).view(-1, 1, 1, 1)  # noqa: E731
    g = _gray(x)
    w = 1 - f
    seen = g if canvas is None else F.grid_sample(g, canvas, mode="bilinear", padding_mode="zeros",
                                                  align_corners=False)
    base = torch.addcmul(v(b * w) * seen.mean(dim=(2, 3), keepdim=True), g, v(a * w))
    out = torch.addcmul(base, x, v(f))
    return out.clamp_(0, 1) if clamp else out


def _hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_hue (RGB -> HSV, h += shift mod 1, -> RGB), per-sample shift."""
    r, g, b = x.unbind(1)
    maxc = torch.maximum(torch.maximum(r, g), b)      # on planes: ~7x faster than aminmax(dim=1)
    c = maxc - torch.minimum(torch.minimum(r, g), b)
    safe = torch.where(c > 0, c, torch.ones_like(c))
    h6 = torch.where(maxc == r, (g - b) / safe,
                     torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h6 = h6.add_(6 * shift.to(x.dtype).view(-1, 1, 1)).remainder_(6)
    out = []
    for n in (5.0, 3.0, 1.0):                     # R, G, B
        k = (h6 + n).remainder_(6)
        t = torch.minimum(k, 4 - k).clamp_(0, 1)
        out.append(maxc - c * t)
    return torch.stack(out, dim=1)


def _pivot_canvas(spec: AugmentSpec, mats) -> torch.Tensor | None:
    """The grid (N,32,32,2) sampling the sequence's canvas at the jitter (flip, pad-crop and
    rotation applied, black corners included) for the contrast pivot's grey mean; None:
    the mean is the whole source image's."""
    if spec.jitter and spec.contrast > 0 and mats is not None and (
            spec.crop or spec.rotate or spec.resize == "rrc"):
        return grid_from(mats["jitter"], min(spec.size, _PIVOT_GRID), False)
    return None


def colour(x: torch.Tensor, p: Params, spec: AugmentSpec, mats=None) -> torch.Tensor:
    """Colour jitter (per-sample random op order) and random grayscale on float NCHW in [0,1],
    torchvision's ops one by one (spec.colour_mode "exact").

    `mats` (from stage_matrices): take the contrast pivot over the sequence's canvas at the
    jitter (`_pivot_canvas`) instead of over the whole source image."""
    canvas = _pivot_canvas(spec, mats)
    if spec.jitter:
        order = p.order
        is_hue = order == 3
        hpos = is_hue.long().argmax(dim=1)                           # where hue sits
        keep = torch.where(is_hue, 9, torch.arange(4, device=order.device)).argsort(dim=1)[:, :3]
        lin = order.gather(1, keep)                                  # the 3 linear ops, in order
        facs = torch.stack([p.brightness, p.contrast, p.saturation], dim=1)
        one = torch.ones_like(p.brightness)
        use_hue = spec.hue > 0

        def pass_(j, active):
            op = lin[:, j]
            f = torch.where(active, facs.gather(1, op[:, None])[:, 0], one)
            return _blend(x, f, (op == 2) & active, (op == 1) & active, canvas=canvas)

        for j in range(3):
            x = pass_(j, j < hpos if use_hue else torch.ones_like(p.flip))
        if use_hue:
            x = _hue(x, p.hue)
            for j in range(3):
                x = pass_(j, j >= hpos)
    if spec.grayscale:
        g = p.grayscale
        x = _blend(x, (~g).to(x.dtype), torch.ones_like(g), torch.zeros_like(g), clamp=False)
    return x


def fast_colour_map(x: torch.Tensor, p: Params, spec: AugmentSpec, mats=None,
                    unit: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Jitter and grayscale as ONE per-sample affine colour map, A (N,3,3) and b (N,3)
    float32 with y = A @ x + b (`params.colour_affine`: no clamps between ops, hue as a
    rotation about the grey axis), for float images x (N,3,H,W) whose white is `unit` (1 or
    255), mapping to [0, 1] units before the clamp (spec.colour_mode "fast").
    `mats`: the contrast pivot over the sequence's canvas, as in `colour`."""
    n, _, h, w = x.shape
    canvas = _pivot_canvas(spec, mats)
    if not (spec.jitter and spec.contrast > 0):          # no pivot needed
        mean_rgb, cover = x.new_zeros(n, 3), x.new_ones(n)
    elif canvas is None:
        mean_rgb, cover = x.mean(dim=(2, 3)) / unit, x.new_ones(n)
    else:
        mean_rgb = F.grid_sample(x, canvas, mode="bilinear", padding_mode="zeros",
                                 align_corners=False).mean(dim=(2, 3)) / unit
        cover = _edge_weight_(canvas[..., 0].clone(), canvas[..., 1].clone(), (h, w)).mean(dim=(1, 2))
    A, b = colour_affine(p, spec, mean_rgb, cover)
    A = A / unit
    return A.to(torch.float32), b.to(torch.float32)


# ---------------------------------------------------------------------------- entry points

def _nchw(images: torch.Tensor) -> torch.Tensor:
    """uint8/float (N,H,W,3) or (N,3,H,W) -> an (N,3,H,W) view (no copy), checked."""
    if images.dim() != 4:
        raise ValueError(f"expected a batch of images (4 dims), got shape {tuple(images.shape)}")
    x = images.permute(0, 3, 1, 2) if images.shape[-1] == 3 and images.shape[1] != 3 else images
    if x.shape[1] != 3:
        raise ValueError(f"expected 3-channel RGB images, got shape {tuple(images.shape)}")
    return x


def _float_source(x: torch.Tensor, S: int) -> torch.Tensor:
    """Images from `_nchw` -> contiguous float32 NCHW in [0,1] (planes: per-channel ops
    vectorise), shrunk to S x S with antialiasing when larger (bilinear sampling alone
    would alias)."""
    f = x.to(torch.float32, memory_format=torch.contiguous_format)
    if x.dtype == torch.uint8:
        f.mul_(1 / 255)
    if f.shape[-2] > S or f.shape[-1] > S:
        f = F.interpolate(f, size=(S, S), mode="bilinear", align_corners=False, antialias=True)
    return f


class _CpuPool:
    """k worker threads whose torch ops run single-threaded, for splitting a batch.

    Why: on CPU, intra-op (OpenMP) parallelism pays a barrier per op, and this pipeline is
    a few hundred small ops per batch; on a shared machine a descheduled team thread
    stalls every one of them (docs/loaders.md, "CPU threading"). Coarse parallelism, one
    independent range of the batch per thread, has no per-op barrier. `torch.set_num_threads` is per OpenMP thread plus one
    process-wide default, so the workers set 1 for themselves and the caller's setting is
    restored before the pool is used."""

    def __init__(self, k: int):
        caller = torch.get_num_threads()
        self.tasks: queue.SimpleQueue = queue.SimpleQueue()
        self.ok = [False] * k
        ready = threading.Barrier(k + 1)
        for i in range(k):
            threading.Thread(target=self._run, args=(i, ready), daemon=True,
                             name=f"augment-{i}").start()
        ready.wait()
        torch.set_num_threads(caller)
        self.k = k if all(self.ok) else 1     # the per-thread setting did not stick: no split

    def _run(self, i: int, ready: threading.Barrier) -> None:
        torch.get_num_threads()               # initialise this thread's setting first...
        torch.set_num_threads(1)              # ...so that this one is not overridden later
        self.ok[i] = torch.get_num_threads() == 1
        ready.wait()
        while True:
            fn, fut = self.tasks.get()
            try:
                fut.set_result(fn())
            except BaseException as e:        # re-raised in the caller
                fut.set_exception(e)

    def run(self, fns) -> list:
        futs = [concurrent.futures.Future() for _ in fns]
        for fn, fut in zip(fns, futs):
            self.tasks.put((fn, fut))
        return [f.result() for f in futs]


_POOL: dict[tuple[int, int], _CpuPool] = {}
_POOL_LOCK = threading.Lock()


def _cpu_pool() -> _CpuPool | None:
    k = torch.get_num_threads()
    if k <= 1 or threading.current_thread().name.startswith("augment-"):
        return None
    key = (k, os.getpid())                    # a forked child gets threads of its own
    with _POOL_LOCK:
        if key not in _POOL:
            _POOL[key] = _CpuPool(k)
        return _POOL[key] if _POOL[key].k > 1 else None


def apply(images: torch.Tensor, spec: AugmentSpec, p: Params | None,
          dtype: torch.dtype = torch.float32, emulate_clipping: bool = False,
          center: bool = False) -> torch.Tensor:
    """`augment` with given parameters (None: no augmentation, resize + normalise only;
    `center`: the "center" evaluation resize + crop instead of the stretch)."""
    if p is None and (center or images.dtype == torch.uint8 and images.device.type == "cpu"):
        return _resize_only(images, spec, dtype, center)
    x = _nchw(images)
    n, S, dev = x.shape[0], spec.size, x.device
    geometric = p is not None and (p.box is not None or any(
        getattr(spec, a) for a in ("flip", "crop", "rotate", "translate", "perspective")))
    mats = None
    if p is not None:
        p = p.to(dev)
        mats = stage_matrices(p, S) if geometric else None
        if p.box is not None:
            mats["bounds"] = box_bounds(p)
    small = max(x.shape[-2:]) <= S                  # else shrunk to S x S first
    if not geometric and small and x.shape[-2:] != (S, S):  # resize: identity, normalised coords
        mats = {"crop": torch.eye(3, device=dev).expand(n, 3, 3)}
    out = torch.empty((n, 3, S, S), dtype=dtype, device=dev, memory_format=torch.channels_last)
    cpu = dev.type == "cpu"
    chunk = _cpu_chunk(S, x.shape[-2:]) if cpu else n
    job = functools.partial(_apply_range, x, spec, p, mats, out, geometric, emulate_clipping, chunk)
    pool = _cpu_pool() if cpu and n >= _POOL_MIN_IMAGES else None
    if pool is None:
        job(0, n)
    else:                    # one contiguous range per thread, in whole chunks
        per = max(-(-n // pool.k), min(chunk, _MIN_RANGE))
        if per > chunk:
            per = -(-per // chunk) * chunk
        pool.run([functools.partial(job, i, min(n, i + per)) for i in range(0, n, per)])
    return out


def _cpu_chunk(S: int, src_hw) -> int:
    """Images per CPU chunk for output size S from sources of (h, w)."""
    return max(1, _CPU_CHUNK_PIXELS // max(S * S, int(src_hw[0]) * int(src_hw[1])))


def _resize_only(images: torch.Tensor, spec: AugmentSpec, dtype: torch.dtype,
                 center: bool = False) -> torch.Tensor:
    """Resize (`center`: the short side to spec.eval_size, then the centre crop) +
    normalise. uint8 on the CPU: torch's uint8 antialiased bilinear kernel (the one the
    reference's Resize runs, so the result is the reference's to the bit); else in float32.
    Then one fused scale-and-shift into the channels_last output."""
    S = spec.size
    x = _nchw(images)
    (rh, rw), (top, left) = center_crop_box(x.shape[-2:], spec) if center else ((S, S), (0, 0))
    unit = 255.0 if x.dtype == torch.uint8 else 1.0
    if x.dtype != torch.uint8 or x.device.type != "cpu":
        x = x.to(torch.float32)
    x = x.contiguous(memory_format=torch.channels_last)
    if x.shape[-2:] != (rh, rw):
        x = F.interpolate(x, size=(rh, rw), mode="bilinear", align_corners=False, antialias=True)
    x = x[:, :, top:top + S, left:left + S]
    scale = const(tuple(1 / (unit * s) for s in spec.std), torch.float32, x.device).view(1, 3, 1, 1)
    bias = const(tuple(-m / s for m, s in zip(spec.mean, spec.std)), torch.float32,
                  x.device).view(1, 3, 1, 1)
    out = torch.empty((x.shape[0], 3, S, S), dtype=dtype, device=x.device,
                      memory_format=torch.channels_last)
    return torch.addcmul(bias, x, scale, out=out)


def _apply_range(x_all, spec: AugmentSpec, p_all: Params | None, mats_all, out_all,
                 geometric: bool, emulate_clipping: bool, chunk: int, lo: int, hi: int) -> None:
    """Colour, warp and normalise images lo..hi of the batch (an `_nchw` view) into
    out_all[lo:hi]: colour on the source planes (with 1/std), one warp, then the fill mask
    and -mean/std in one addcmul and the channels_last layout in one copy.

    CPU: `chunk` images at a time (`_cpu_chunk`) through reused buffers avoid page-faulting
    fresh memory each batch (about 2x faster than one pass over the batch, measured with
    16-image chunks) and amortise each op's overhead. CUDA: the whole range at once
    (`chunk` = the batch), buffers from the caching allocator."""
    S, dev, cpu = spec.size, x_all.device, x_all.device.type == "cpu"
    mean = const(spec.mean, torch.float32, dev).view(1, 3, 1, 1)
    inv_std = const(tuple(1 / s for s in spec.std), torch.float32, dev).view(1, 3, 1, 1)
    bias = -mean * inv_std
    fast = p_all is not None and spec.colour_mode == "fast"
    stages = [st for st, on in (("rotate", spec.rotate), ("translate", spec.translate),
                                ("perspective", spec.perspective)) if on and emulate_clipping
              and geometric]
    m0 = min(hi - lo, chunk)

    def work(name: str, shape: tuple, like: torch.Tensor | None = None) -> torch.Tensor:
        if cpu:
            return _WORK.get(name, shape, like)
        return torch.empty(shape, device=dev) if like is None else torch.empty_like(like, dtype=torch.float32)
    planes, grid = work("planes", (5, m0, S, S)), work("grid", (m0, S, S, 2))
    proj = spec.perspective and geometric
    for i in range(lo, hi, chunk):
        sl, m = slice(i, min(hi, i + chunk)), min(hi, i + chunk) - i
        p = None if p_all is None else p_all[sl]
        mats = None if mats_all is None else {k: v[sl] for k, v in mats_all.items()}
        if fast:     # one matmul: colour, 1/255 and 1/std; it also writes NCHW planes
            x = work("src", (m0, *x_all.shape[1:]), x_all[lo:lo + m0])[:m].copy_(x_all[sl])
            if max(x.shape[-2:]) > S:            # shrink first: bilinear sampling would alias
                x = F.interpolate(x, size=(S, S), mode="bilinear", align_corners=False, antialias=True)
            n, _, h, w = x.shape
            unit = 255.0 if x_all.dtype == torch.uint8 else 1.0
            A, b = fast_colour_map(x, p, spec, mats if geometric else None, unit)
            x = torch.baddbmm(b[:, :, None], A, x.view(n, 3, h * w),   # either layout: GEMM
                              out=work("colour", (m0, 3, h * w))[:m]).view(n, 3, h, w)
            x = x.clamp_(0, 1).mul_(inv_std)     # scalar clamp: ~6x faster than per-channel bounds
        else:
            x = _float_source(x_all[sl], S)
            if p is not None:
                x = colour(x, p, spec, mats if geometric else None)
            x = x * inv_std                      # fill 0 stays 0; bias added at the end
        if mats is None:                         # already S x S, nothing to resample
            out_all[sl].copy_(x.add_(bias))
            continue
        P, g = planes[:, :m], grid[:m]
        gx, gy = grid_planes(mats["crop"], S, proj, out=(P[0], P[1], P[2]))
        if "bounds" in mats:                     # RandomResizedCrop reads its box only
            b = mats["bounds"].view(m, 4, 1, 1)
            gx.clamp_(b[:, 0], b[:, 1]), gy.clamp_(b[:, 2], b[:, 3])
        g[..., 0].copy_(gx)                      # planes are cheap to build; interleave once
        g[..., 1].copy_(gy)
        w = torch.grid_sampler_2d(x, g, 0, 1, False)   # bilinear, border, half-pixel
        if geometric:                            # (a plain resize never leaves the canvas)
            if p is not None and p.box is not None:   # the fill is the RRC canvas's
                gx, gy = grid_planes(mats["canvas"], S, proj, out=(P[0], P[1], P[2]))
            mask = _coverage_(gx, gy, S)         # in P[0]
            for st in stages:                    # the sequence's intermediate canvases
                mask.mul_(_coverage_(*grid_planes(mats[st], S, proj, out=(P[2], P[3], P[4])), S))
            torch.addcmul(bias, w, mask.unsqueeze(1), out=w)
        else:
            w.add_(bias)
        out_all[sl].copy_(w)                     # NCHW -> channels_last (+ dtype) in one copy


def augment(images: torch.Tensor, spec: AugmentSpec, generator: torch.Generator | None = None,
            dtype: torch.dtype = torch.float32, *, train: bool = True,
            emulate_clipping: bool = False, src_hw=None) -> torch.Tensor:
    """The spec applied to a uint8 batch (N,H,W,3) or (N,3,H,W) on its device, per-sample
    random parameters drawn from `generator`. Returns (N,3,S,S) normalised, channels_last,
    `dtype`. `train=False`: the reference's validation transform (resize per
    spec.eval_resize + normalise). `src_hw`: the samples' original (H, W), (N,2), for the
    "rrc" draw when the batch holds them resized (default: the batch's own size)."""
    if not train:
        return apply(images, spec, None, dtype, center=spec.eval_resize == "center")
    if not spec.any_enabled:
        return apply(images, spec, None, dtype)
    dev = generator.device if generator is not None else images.device
    if src_hw is None and spec.resize == "rrc":
        src_hw = _nchw(images).shape[-2:]
    extra = {} if src_hw is None else {"src_hw": src_hw}
    p = draw_params(images.shape[0], spec, generator, device=dev, **extra)
    return apply(images, spec, p, dtype, emulate_clipping)


def _cpu_name() -> str:
    """The CPU's model name, core count and widest vector ISA (for benchmark headers)."""
    name, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key.strip() == "model name":
                    name = val.strip()
                elif key.strip() == "flags":
                    flags = set(val.split())
                    break
    except OSError:
        pass
    isa = [x for x, flag in (("AMX", "amx_tile"), ("AVX512", "avx512f"), ("AVX2", "avx2"))
           if flag in flags]
    return f"{name}, {os.cpu_count()} cores, {'/'.join(isa) or 'no AVX2'}"


def _main(argv=None) -> None:
    """Augmentation-only throughput on an in-memory uint8 batch (no data loading), each
    configuration timed in interleaved rounds, median round reported:
    python -m loaders.augment [--device cuda] [--size 128] [--source 32] [--batch-size 256]"""
    import argparse
    import dataclasses
    import statistics
    import time

    ap = argparse.ArgumentParser(description=_main.__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", type=int, default=128, help="training size")
    ap.add_argument("--source", type=int, default=32, help="stored image size (CIFAR: 32)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--batches", type=int, default=10, help="batches per timed round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median reported)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    a = ap.parse_args(argv)
    dev, dtype = torch.device(a.device), getattr(torch, a.dtype)
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randint(0, 256, (a.batch_size, a.source, a.source, 3), dtype=torch.uint8,
                      generator=g, device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    fast = AugmentSpec(size=a.size, colour_mode="fast")
    exact = dataclasses.replace(fast, colour_mode="exact")
    configs = {"full spec, exact colour": (exact, {}),
               "full spec, fast colour": (fast, {}),
               "full spec, fast colour, emulate clipping": (fast, {"emulate_clipping": True}),
               "augment off (resize + normalise)": (fast, {"train": False})}
    times: dict[str, list[float]] = {k: [] for k in configs}
    cpu_times: dict[str, list[float]] = {k: [] for k in configs}
    for name, (spec, kw) in configs.items():             # warm-up
        augment(x, spec, g, dtype, **kw)
    for _ in range(a.rounds):
        for name, (spec, kw) in configs.items():
            sync()
            t, c = time.perf_counter(), time.process_time()
            for _ in range(a.batches):
                augment(x, spec, g, dtype, **kw)
            sync()
            times[name].append(time.perf_counter() - t)
            cpu_times[name].append(time.process_time() - c)
    where = _cpu_name() if dev.type == "cpu" else torch.cuda.get_device_name(dev)
    print(f"augment-only images/s, {a.source}->{a.size}px, batch {a.batch_size}, {a.dtype}, "
          f"on {dev} ({where}), {torch.get_num_threads()} threads, median of {a.rounds} "
          f"interleaved rounds of {a.batches} batches; per wall-clock second and per second "
          f"of this process's CPU time (steadier on a shared machine)")
    rates = {}
    for name in configs:
        n = a.batches * a.batch_size
        rates[name] = (n / statistics.median(times[name]), n / statistics.median(cpu_times[name]))
        print(f"  {name:42s} {rates[name][0]:9,.0f} wall {rates[name][1]:9,.0f} cpu")
    f, e = rates["full spec, fast colour"], rates["full spec, exact colour"]
    print(f"  fast / exact colour: {f[0] / e[0]:.2f}x wall, {f[1] / e[1]:.2f}x cpu")


if __name__ == "__main__":
    _main()
