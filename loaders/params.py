"""The spec's random semantics, written once: uniform draws -> per-sample parameters -> the
composed warp matrix (and, for augment.py's fast colour mode, the composed colour map).

Every augmenting loader goes through here: augment.py (resident, FFCV) draws with
`draw_params` on the batch's device; DALI's pipeline feeds its own uniform draws to
`params_from_uniforms` and takes `warp_matrix` (torch on the CPU, handed to DALI as numpy).
Distributions are torchvision v2's (see `params_from_uniforms`); the tests compare them
with the v2 ops. Geometry is one 3x3 projective map per sample in continuous pixel
coordinates (pixel i spans [i, i+1], centre i+0.5: torchvision's tensor kernels'
convention), composed in the report's order: resize, flip, pad-crop, rotation about the
centre, translation, perspective.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields

import torch

from loaders.spec import LUMA, AugmentSpec

NCOLS = 24          # uniforms per sample; column layout in params_from_uniforms


@dataclass
class Params:
    """Per-sample parameters, each a tensor with leading dimension N, on one device.

    Geometry in pixels of the S x S training canvas: `shift` (N,2) is the pad-crop offset
    (left - pad, top - pad), `translate` (N,2) RandomAffine's integer (tx, ty), `corners`
    (N,4,2) RandomPerspective's endpoints (tl, tr, br, bl; equal to the start points when
    `perspective` is False). Colour: jitter factors, `order` (N,4) a permutation of
    0=brightness 1=contrast 2=saturation 3=hue (torchvision's fn_idx)."""
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

    def to(self, device) -> "Params":
        return Params(**{f.name: getattr(self, f.name).to(device, non_blocking=True)
                         for f in fields(self)})

    def __len__(self) -> int:
        return self.flip.shape[0]

    def __getitem__(self, sl: slice) -> "Params":
        return Params(**{f.name: getattr(self, f.name)[sl] for f in fields(self)})


@functools.lru_cache(maxsize=256)
def _const_cached(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).to(device)


def const(values: tuple, dtype: torch.dtype, device) -> torch.Tensor:
    """A small constant on `device`, copied there once: a host->device copy of pageable
    memory waits for the stream, which would stall CUDA's queue on every batch."""
    return _const_cached(values, dtype, torch.device(device))


# ---------------------------------------------------------------------------- parameters

def params_from_uniforms(u: torch.Tensor, spec: AugmentSpec) -> Params:
    """The spec's per-sample parameters from uniforms u (N, NCOLS) in [0, 1), float64 on
    u's device. Disabled augmentations get identity values.

    torchvision v2's distributions: flip Bernoulli(flip_p) (col 0); pad-crop offsets
    integer uniform on [0, 2*pad] per axis (1-2); rotation U(-d, d) (3); ColorJitter
    factors U(max(0, 1-x), 1+x) (4-6) and hue U(-h, h) turns (7); the jitter order a
    uniform permutation per sample, like ColorJitter's randperm(4) per call (argsort of
    8-11); grayscale Bernoulli(grayscale_p) (12); translation round(U(-f*S, f*S)) pixels
    per axis (13-14, RandomAffine's integer draw); perspective Bernoulli(perspective_p)
    (15), then each corner moved inwards by randint(0, int(distortion*(S//2))+1) per axis
    (16-23, RandomPerspective's draw). Integer draws are floor(u * k), uniform on 0..k-1
    like torch.randint."""
    u = u.to(torch.float64).reshape(u.shape[0], NCOLS)
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
    return Params(flip, shift, angle, translate, persp, corners, bright, contrast, sat, hue,
                  order, gray)


def draw_params(n: int, spec: AugmentSpec, generator: torch.Generator | None = None,
                device=None) -> Params:
    """Independent per-sample parameters for `n` images, from one torch.rand call on
    `device` (default: the generator's)."""
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand((n, NCOLS), generator=generator, device=device, dtype=torch.float64)
    return params_from_uniforms(u, spec)


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


def stage_matrices(p: Params, S: int) -> dict[str, torch.Tensor]:
    """(N,3,3) float64 maps from normalised output coordinates ([-1,1], half-pixel) to the
    normalised coordinates of each canvas the sequence reads from: 'crop' (the resized,
    flipped image: equal to the normalised source coordinates; the whole geometry),
    'rotate' (the crop's output), 'translate' (the rotation's output), 'perspective' (the
    translation's output). 'jitter' maps the canvas the colour jitter sees in the sequence
    (after flip, pad-crop and rotation) to the source: its contrast pivot is that canvas's
    mean, black corners included."""
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
    return {"crop": pre_jitter @ m_r, "rotate": norm @ m_r,
            "translate": norm @ m_t, "perspective": norm @ m_p,
            "jitter": pre_jitter @ rot @ denorm}


def warp_matrix(p: Params, S: int, src_hw=None) -> torch.Tensor:
    """(N,3,3) float64: output pixel coordinates -> source pixel coordinates (corner
    origin), the whole geometry including the resize from a (H, W) source to S x S.
    `src_hw`: (H, W), or (N,2) per sample; None: the source is already S x S. This is
    DALI's `warp_perspective(..., inverse_map=True, pixel_origin="corner")` matrix."""
    dev = p.angle.device
    hw = torch.as_tensor((S, S) if src_hw is None else src_hw, dtype=torch.float64, device=dev)
    h, w = hw.reshape(-1, 2).expand(len(p), 2).unbind(-1)
    to_src = _mat([[w / 2, 0, w / 2], [0, h / 2, h / 2], [0, 0, 1]])
    from_out = const(((2 / S, 0, -1), (0, 2 / S, -1), (0, 0, 1)), torch.float64, dev)
    return to_src @ stage_matrices(p, S)["crop"] @ from_out


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
