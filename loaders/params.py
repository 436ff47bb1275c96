"""The spec's random semantics, written once: uniform draws -> per-sample parameters -> the
composed warp matrix (and, for augment.py's fast colour mode, the composed colour map).

Every augmenting loader goes through here: augment.py (resident, FFCV) draws with
`draw_params` on the batch's device; DALI's pipeline feeds its own uniform draws to
`params_from_uniforms` and takes `warp_matrix` (torch on the CPU, handed to DALI as numpy).
Distributions are torchvision v2's (see `params_from_uniforms`); the tests compare them
with the v2 ops. Geometry is one 3x3 projective map per sample in continuous pixel
coordinates (pixel i spans [i, i+1], centre i+0.5: torchvision's tensor kernels'
convention), composed in the report's order: resize (or RandomResizedCrop's box, spec.resize
"rrc"), flip, pad-crop, rotation about the centre, translation, perspective.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields

import torch

from loaders.spec import LUMA, AugmentSpec

NCOLS = 24          # uniforms per sample for the report's spec; layout in params_from_uniforms
RRC_ATTEMPTS = 10   # RandomResizedCrop.get_params' tries before its fallback
RRC_COLS = 2 * RRC_ATTEMPTS + 2   # more uniforms per sample with spec.resize "rrc"


def ncols(spec: AugmentSpec) -> int:
    """Uniforms per sample the spec's draw takes (NCOLS, plus RRC_COLS for "rrc")."""
    return NCOLS + (RRC_COLS if spec.resize == "rrc" else 0)


@dataclass
class Params:
    """Per-sample parameters, each a tensor with leading dimension N, on one device.

    Geometry in pixels of the S x S training canvas: `shift` (N,2) is the pad-crop offset
    (left - pad, top - pad), `translate` (N,2) RandomAffine's integer (tx, ty), `corners`
    (N,4,2) RandomPerspective's endpoints (tl, tr, br, bl; equal to the start points when
    `perspective` is False). Colour: jitter factors, `order` (N,4) a permutation of
    0=brightness 1=contrast 2=saturation 3=hue (torchvision's fn_idx). RandomResizedCrop
    (spec.resize "rrc"): `box` (N,4) (top, left, height, width) integer pixels of a source of
    size `src_hw` (N,2) (H, W); None: the whole source (a plain resize)."""
    flip: torch.Tensor         # bool
    shift: torch.Tensor        # float64 (N,2) integers
    angle: torch.Tensor        # float64 degrees, counter-clockwise like F.rotate
    translate: torch.Tensor    # float64 (N,2) integers
    perspective: torch.Tensor  # bool
    corners: torch.Tensor      # float64 (N,4,2) integers
    brightness: torch.Tensor   # float64
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor          # turns
    order: torch.Tensor        # int64 (N,4)
    grayscale: torch.Tensor    # bool
    box: torch.Tensor | None = None     # float64 (N,4) integers
    src_hw: torch.Tensor | None = None  # float64 (N,2)

    def _map(self, fn) -> "Params":
        return Params(**{f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                         for f in fields(self)})

    def to(self, device) -> "Params":
        return self._map(lambda t: t.to(device, non_blocking=True))

    def __len__(self) -> int:
        return self.flip.shape[0]

    def __getitem__(self, sl: slice) -> "Params":
        return self._map(lambda t: t[sl])


@functools.lru_cache(maxsize=256)
def _const_cached(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).to(device)


def const(values: tuple, dtype: torch.dtype, device) -> torch.Tensor:
    """A small constant on `device`, copied there once: a host->device copy of pageable
    memory waits for the stream, which would stall CUDA's queue on every batch."""
    return _const_cached(values, dtype, torch.device(device))


# ---------------------------------------------------------------------------- parameters

def params_from_uniforms(u: torch.Tensor, spec: AugmentSpec, src_hw=None) -> Params:
    """The spec's per-sample parameters from uniforms u (N, ncols(spec)) in [0, 1), float64
    on u's device. Disabled augmentations get identity values. `src_hw`: the sources'
    (H, W), one pair or (N,2), for the "rrc" box (default: size x size).

    torchvision v2's distributions: flip Bernoulli(flip_p) (col 0); pad-crop offsets
    integer uniform on [0, 2*pad] per axis (1-2); rotation U(-d, d) (3); ColorJitter
    factors U(max(0, 1-x), 1+x) (4-6) and hue U(-h, h) turns (7); the jitter order a
    uniform permutation per sample, like ColorJitter's randperm(4) per call (argsort of
    8-11); grayscale Bernoulli(grayscale_p) (12); translation round(U(-f*S, f*S)) pixels
    per axis (13-14, RandomAffine's integer draw); perspective Bernoulli(perspective_p)
    (15), then each corner moved inwards by randint(0, int(distortion*(S//2))+1) per axis
    (16-23, RandomPerspective's draw); "rrc": `rrc_boxes` (24-45). Integer draws are
    floor(u * k), uniform on 0..k-1 like torch.randint."""
    u = u.to(torch.float64).reshape(u.shape[0], ncols(spec))
    n, device = u.shape[0], u.device
    S, pad = spec.size, spec.crop_padding
    zeros, ones = u.new_zeros(n), u.new_ones(n)
    no = torch.zeros(n, dtype=torch.bool, device=device)

    flip = (u[:, 0] < spec.flip_p) if spec.flip else no
    if spec.crop and pad > 0:
        shift = torch.floor(u[:, 1:3] * (2 * pad + 1)).clamp_(max=2 * pad) - pad
        shift = shift.flip(1)   # columns: (left, top) = (x, y)
    else:
        shift = u.new_zeros(n, 2)
    angle = (2 * u[:, 3] - 1) * spec.rotate_degrees if spec.rotate else zeros

    def factor(col, x):
        lo, hi = max(0.0, 1.0 - x), 1.0 + x
        return lo + (hi - lo) * u[:, col] if spec.jitter and x > 0 else ones
    bright, contrast, sat = factor(4, spec.brightness), factor(5, spec.contrast), factor(6, spec.saturation)
    hue = (2 * u[:, 7] - 1) * spec.hue if spec.jitter else zeros
    order = u[:, 8:12].argsort(dim=1)          # a uniform random permutation per sample
    gray = (u[:, 12] < spec.grayscale_p) if spec.grayscale else no
    if spec.translate:
        m = spec.translate_frac * S
        translate = torch.round((2 * u[:, 13:15] - 1) * m)
    else:
        translate = u.new_zeros(n, 2)

    start = const(((0, 0), (S - 1, 0), (S - 1, S - 1), (0, S - 1)), torch.float64,
                  device).expand(n, 4, 2)
    if spec.perspective:
        persp = u[:, 15] < spec.perspective_p
        bound = int(spec.perspective_distortion * (S // 2)) + 1
        r = torch.floor(u[:, 16:24] * bound).clamp_(max=bound - 1).view(n, 4, 2)
        inward = const(((0, 0), (-1, 0), (-1, -1), (0, -1)), torch.float64, device)  # tl tr br bl
        lo = torch.where(inward < 0, S - bound, 0.0)      # randint(S - bound, S) on those axes
        corners = torch.where(persp[:, None, None], lo + r, start)
    else:
        persp, corners = no, start.clone()
    box = hw = None
    if spec.resize == "rrc":
        hw = torch.as_tensor((S, S) if src_hw is None else src_hw, dtype=torch.float64,
                             device=device).reshape(-1, 2).expand(n, 2)
        box = rrc_boxes(u[:, NCOLS:], hw, spec.rrc_scale, spec.rrc_ratio)
    return Params(flip, shift, angle, translate, persp, corners, bright, contrast, sat, hue,
                  order, gray, box, hw)


def rrc_boxes(u: torch.Tensor, hw: torch.Tensor, scale, ratio) -> torch.Tensor:
    """torchvision's `RandomResizedCrop.get_params`, vectorised: (N,4) (top, left, height,
    width) from uniforms u (N, RRC_COLS) on sources of size hw (N,2). Attempt k takes area
    fraction U(scale) (col k) and log aspect U(log ratio) (col 10+k), width and height
    round(sqrt(area * aspect)), round(sqrt(area / aspect)); the first that fits is placed
    at integer uniform (top, left) (cols 20, 21); none fits: the centre crop of the whole
    image with its aspect clamped to ratio."""
    H, W = hw[:, 0:1], hw[:, 1:2]
    k = RRC_ATTEMPTS
    area = H * W * (scale[0] + (scale[1] - scale[0]) * u[:, :k])
    lr = torch.log(torch.tensor(ratio, dtype=torch.float32)).to(u)   # float32, as torchvision
    aspect = torch.exp(lr[0] + (lr[1] - lr[0]) * u[:, k:2 * k])
    w, h = torch.round(torch.sqrt(area * aspect)), torch.round(torch.sqrt(area / aspect))
    ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)          # the first fitting attempt
    found = ok.any(dim=1)
    H, W = H[:, 0], W[:, 0]
    lo, hi = min(ratio), max(ratio)
    wide, tall = W / H > hi, W / H < lo
    fw = torch.where(wide, torch.round(H * hi), W)                   # the fallback
    fh = torch.where(tall, torch.round(W / lo), H)
    w = torch.where(found, w.gather(1, first)[:, 0], fw)
    h = torch.where(found, h.gather(1, first)[:, 0], fh)
    top = torch.where(found, torch.minimum(torch.floor(u[:, 2 * k] * (H - h + 1)), H - h),
                      torch.floor((H - h) / 2))
    left = torch.where(found, torch.minimum(torch.floor(u[:, 2 * k + 1] * (W - w + 1)), W - w),
                       torch.floor((W - w) / 2))
    return torch.stack([top, left, h, w], dim=1)


def center_crop_box(hw, spec: AugmentSpec) -> tuple[tuple[int, int], tuple[int, int]]:
    """Evaluation "center" on an (H, W) source, torchvision's arithmetic: ((H', W') the short
    side resized to spec.eval_size, (top, left) of the centre size x size crop there)."""
    h, w = (int(v) for v in hw)
    r, S = spec.eval_size, spec.size
    short, long = (w, h) if w <= h else (h, w)
    long = int(r * long / short)
    rh, rw = (long, r) if w <= h else (r, long)
    return (rh, rw), (int(round((rh - S) / 2.0)), int(round((rw - S) / 2.0)))


def draw_params(n: int, spec: AugmentSpec, generator: torch.Generator | None = None,
                device=None, src_hw=None) -> Params:
    """Independent per-sample parameters for `n` images, from one torch.rand call on
    `device` (default: the generator's). `src_hw`: as in `params_from_uniforms`."""
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand((n, ncols(spec)), generator=generator, device=device, dtype=torch.float64)
    return params_from_uniforms(u, spec, src_hw)


# ---------------------------------------------------------------------------- geometry

def _mat(rows) -> torch.Tensor:
    """(N,3,3) from a 3x3 nested list of (N,) tensors or floats (broadcast)."""
    flat = [r for row in rows for r in row]
    ref = next(t for t in flat if isinstance(t, torch.Tensor))
    flat = [t if isinstance(t, torch.Tensor) else torch.full_like(ref, float(t)) for t in flat]
    return torch.stack(flat, dim=-1).view(-1, 3, 3)


def _perspective_matrix(corners: torch.Tensor, S: int) -> torch.Tensor:
    """Homography mapping output (end) points to input (start) points, like torchvision's
    `_get_perspective_coeffs(startpoints, endpoints)` (applied, as `F.perspective` does, to
    pixel-centre coordinates), via the closed-form square-to-quad map Q (Heckbert):
    H = Q_start @ adj(Q_end). No linear solve, no host sync."""
    x, y = corners[..., 0], corners[..., 1]
    x0, x1, x2, x3 = x.unbind(-1)
    y0, y1, y2, y3 = y.unbind(-1)
    sx, sy = x0 - x1 + x2 - x3, y0 - y1 + y2 - y3
    dx1, dx2, dy1, dy2 = x1 - x2, x3 - x2, y1 - y2, y3 - y2
    den = dx1 * dy2 - dx2 * dy1
    g = (sx * dy2 - dx2 * sy) / den
    h = (dx1 * sy - sx * dy1) / den
    q = _mat([[x1 - x0 + g * x1, x3 - x0 + h * x3, x0],
              [y1 - y0 + g * y1, y3 - y0 + h * y3, y0],
              [g, h, 1.0]])
    a, b, c = q[:, 0].unbind(-1)
    d, e, f = q[:, 1].unbind(-1)
    gg, hh, ii = q[:, 2].unbind(-1)
    adj = _mat([[e * ii - f * hh, c * hh - b * ii, b * f - c * e],
                [f * gg - d * ii, a * ii - c * gg, c * d - a * f],
                [d * hh - e * gg, b * gg - a * hh, a * e - b * d]])
    scale = const(((S - 1.0, 0, 0), (0, S - 1.0, 0), (0, 0, 1)), corners.dtype, corners.device)
    hm = scale @ adj
    return hm / hm[:, 2:3, 2:3]


def _box_matrix(p: Params) -> torch.Tensor | None:
    """RandomResizedCrop's box: normalised S x S canvas -> normalised source coordinates."""
    if p.box is None:
        return None
    top, left, h, w = p.box.unbind(-1)
    H, W = p.src_hw.unbind(-1)
    return _mat([[w / W, 0, (2 * left + w) / W - 1], [0, h / H, (2 * top + h) / H - 1], [0, 0, 1]])


def stage_matrices(p: Params, S: int) -> dict[str, torch.Tensor]:
    """(N,3,3) float64 maps from normalised output coordinates ([-1,1], half-pixel) to the
    normalised coordinates of each canvas the sequence reads from: 'crop' (the source: the
    whole geometry), 'canvas' (the resized or RandomResizedCrop'd S x S image, before the
    flip; 'crop' without the box), 'rotate' (the crop's output), 'translate' (the
    rotation's output), 'perspective' (the translation's output). 'jitter' maps the canvas
    the colour jitter sees in the sequence (after flip, pad-crop and rotation) to the
    source: its contrast pivot is that canvas's mean, black corners included."""
    n, dev, dt = len(p), p.angle.device, torch.float64
    eye = torch.eye(3, dtype=dt, device=dev).expand(n, 3, 3)
    half = S / 2
    denorm = const(((half, 0, half), (0, half, half), (0, 0, 1)), dt, dev)
    norm = const(((1 / half, 0, -1), (0, 1 / half, -1), (0, 0, 1)), dt, dev)
    persp = torch.where(p.perspective[:, None, None], _perspective_matrix(p.corners, S), eye)
    tx, ty = p.translate.unbind(-1)
    trans = _mat([[1, 0, -tx], [0, 1, -ty], [0, 0, 1]])
    th = torch.deg2rad(p.angle)
    c, s = torch.cos(th), torch.sin(th)
    rot = _mat([[c, -s, half - c * half + s * half], [s, c, half - s * half - c * half], [0, 0, 1]])
    sx, sy = p.shift.unbind(-1)
    crop = _mat([[1, 0, sx], [0, 1, sy], [0, 0, 1]])
    fl = p.flip.to(dt)
    flip = _mat([[1 - 2 * fl, 0, S * fl], [0, 1, 0], [0, 0, 1]])
    m_p = persp @ denorm
    m_t = trans @ m_p
    m_r = rot @ m_t
    pre_jitter = norm @ flip @ crop
    canvas, jitter = pre_jitter @ m_r, pre_jitter @ rot @ denorm
    box = _box_matrix(p)
    return {"crop": canvas if box is None else box @ canvas, "canvas": canvas,
            "rotate": norm @ m_r, "translate": norm @ m_t, "perspective": norm @ m_p,
            "jitter": jitter if box is None else box @ jitter}


def warp_matrix(p: Params, S: int, src_hw=None, box: bool = True) -> torch.Tensor:
    """(N,3,3) float64: output pixel coordinates -> source pixel coordinates (corner
    origin), the whole geometry including the resize (or the "rrc" box, unless `box` is
    False: the source is then that box, already cut out) from a (H, W) source to S x S.
    `src_hw`: (H, W), or (N,2) per sample; None: the source is already S x S. This is
    DALI's `warp_perspective(..., inverse_map=True, pixel_origin="corner")` matrix."""
    dev = p.angle.device
    hw = torch.as_tensor((S, S) if src_hw is None else src_hw, dtype=torch.float64, device=dev)
    h, w = hw.reshape(-1, 2).expand(len(p), 2).unbind(-1)
    to_src = _mat([[w / 2, 0, w / 2], [0, h / 2, h / 2], [0, 0, 1]])
    from_out = const(((2 / S, 0, -1), (0, 2 / S, -1), (0, 0, 1)), torch.float64, dev)
    return to_src @ stage_matrices(p, S)["crop" if box else "canvas"] @ from_out


# ---------------------------------------------------------------------------- colour

def colour_affine(p: Params, spec: AugmentSpec, mean_rgb: torch.Tensor,
                  coverage: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-sample colour map x -> A @ x + b on RGB in [0, 1], A (N,3,3) and b (N,3)
    float64, that ColorJitter (in each sample's own op order) then grayscale compose to,
    WITHOUT the clamps between ops (augment.py's fast mode). Brightness, contrast and
    saturation are torchvision's blends, linear maps about black, the image's grey mean and
    each pixel's grey. The contrast pivot is the grey mean of the image as it is at that
    point of the order: LUMA . (A @ mean_rgb + b * coverage), where `mean_rgb` (N,3) is the
    source's channel means over the canvas the jitter sees, zero fill counted, and
    `coverage` (N,) the fraction of that canvas the image covers. Hue: a rotation by hue
    turns about the grey axis (1,1,1): HSV's hue is the angle about that axis (on a
    hexagon, not a circle), so this is a linear stand-in for its shift, closer to it on
    CIFAR-10 than DALI's rotation of the YIQ chroma plane (docs/loaders.md)."""
    n, dev, dt = len(p), p.hue.device, torch.float64
    eye = torch.eye(3, dtype=dt, device=dev).expand(n, 3, 3)
    luma = const(LUMA, dt, dev)
    grey = const((LUMA,) * 3, dt, dev)                 # every row LUMA: x -> its grey
    A, b = eye, torch.zeros(n, 3, dtype=dt, device=dev)
    if spec.jitter:
        v = lambda f: f.to(dt)[:, None, None]   # noqa: E731
        th = v(p.hue) * (2 * math.pi)              # Rodrigues about u = (1,1,1)/sqrt(3)
        r = 1 / math.sqrt(3)
        cross_u = const(((0, -r, r), (r, 0, -r), (-r, r, 0)), dt, dev)
        hue = torch.cos(th) * eye + torch.sin(th) * cross_u + (1 - torch.cos(th)) / 3
        sat = v(p.saturation) * eye + (1 - v(p.saturation)) * grey
        by_op = torch.stack([v(p.brightness) * eye, v(p.contrast) * eye, sat, hue], dim=1)
        rows = torch.arange(n, device=dev)
        for j in range(4):                             # torchvision's fn_idx order
            op = p.order[:, j]
            m = by_op[rows, op]
            pivot = ((A @ mean_rgb.to(dt)[:, :, None])[:, :, 0] + b * coverage.to(dt)[:, None]) @ luma
            lift = torch.where(op == 1, (1 - p.contrast) * pivot, 0.0)
            A, b = m @ A, (m @ b[:, :, None])[:, :, 0] + lift[:, None]
    if spec.grayscale:
        g = torch.where(p.grayscale[:, None, None], grey, eye)
        A, b = g @ A, (g @ b[:, :, None])[:, :, 0]
    return A, b
