"""Photos of any size and aspect: the spec's resize policy (`resize` "rrc", `eval_resize`
"center") in every loader, against the torchvision reference, on non-square JPEGs.

Tolerances, in levels (1 = 1/255 before normalisation):
- evaluation "center", augment off: each loader's conformance tolerance
  (tests/test_loader_contract.py): torchvision, resident, FFCV store or compute the
  reference's own uint8 resize + crop (measured 0); DALI resizes with its own antialiasing
  filter (measured max 1.0, mean 0.2).
- a known RandomResizedCrop box against `resized_crop` of the full-resolution file:
  DALI decodes the box alone and resizes it like the reference (max 1.5, mean 0.5;
  measured 1.0 / 0.2). Resident and FFCV (augment.py) cut the box from the pixels they keep
  at the training size, upsampling what the reference downsamples: measured mean ~1.4, p99
  ~5, max ~11-17 at the block edge of these images (mean <= 2, p99 <= 12); DALI "full"
  likewise (1.5 / 5.8 / 14); sources no larger than the
  training size are exact (1 level: the reference's uint8 fixed-point resize).
- RRC draws vs torchvision's get_params, 2000 each: means within ~4 standard errors.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from engine.config import config_from_args
from loaders import augment as A
from loaders.base import LoaderOptions, batch_seed, build_loader, derive_seed
from loaders.common import ConfigError, read_rgb, storage_view
from loaders.datasets import Split
from loaders.params import draw_params, ncols, params_from_uniforms
from loaders.spec import AugmentSpec
from loaders.torchvision import reference_transform
from tests.test_loader_contract import LOADERS, TOLERANCE, _available, levels

S = 48
RRC = AugmentSpec(size=S, resize="rrc").without()            # RandomResizedCrop alone
CENTER = AugmentSpec(size=S, eval_resize="center").without()


def picture(h: int, w: int, seed: int) -> np.ndarray:
    """uint8 (h, w, 3): smooth colour waves with a darker block (one sharp edge)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    f, ph = rng.uniform(1, 3, (3, 2)), rng.uniform(0, 6, 3)
    img = np.stack([128 + 90 * np.sin(2 * np.pi * (f[c, 0] * xx / w + f[c, 1] * yy / h) + ph[c])
                    for c in range(3)], -1)
    img[h // 4:h // 2, w // 3:w // 2] = img[h // 4:h // 2, w // 3:w // 2] * 0.5 + 60
    return np.clip(img, 0, 255).round().astype(np.uint8)


def _jpegs(d: Path, shapes) -> Split:
    """12 JPEGs alternating between two (H, W) shapes, each labelled with its own index."""
    paths, sizes = [], []
    for i in range(12):
        hw = shapes[i % 2]
        p = d / f"{i:02d}.jpg"
        Image.fromarray(picture(*hw, seed=i)).save(p, quality=95)
        paths.append(str(p)), sizes.append(hw)
    return Split("train", tuple(paths), tuple(range(12)), tuple(sizes), d / "cache")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Larger than the training size, landscape and portrait: 64x96 and 96x64 (HxW)."""
    return _jpegs(tmp_path_factory.mktemp("photos"), ((64, 96), (96, 64)))


def opts(**kw):
    return LoaderOptions(**{**dict(train=True, batch_size=12, workers=1, seed=5), **kw})


def crops(split, boxes, order) -> torch.Tensor:
    """The reference's resized_crop of each file in `order` at its box (top, left, h, w)."""
    return torch.stack([TF.resized_crop(read_rgb(split.paths[i]), *(int(v) for v in b), [S, S],
                                        antialias=True) for i, b in zip(order, boxes)]).double()


# ----------------------------------------------------------------------------- the spec

def test_spec_fields_validate_and_come_from_the_cli():
    d = AugmentSpec()
    assert (d.resize, d.eval_resize, d.rrc_scale, d.eval_crop_frac) == ("stretch", "stretch", (0.08, 1.0), 0.875)
    assert ncols(d) == 24 and draw_params(4, d).box is None               # the default draw: as before
    assert AugmentSpec(size=128).eval_size == 146 and AugmentSpec(size=224).eval_size == 256
    for bad, msg in ((dict(resize="crop"), "resize='crop'"), (dict(eval_resize="x"), "eval_resize='x'"),
                     (dict(rrc_scale=(0.5, 0.2)), "rrc_scale"), (dict(rrc_scale=(0.5, 1.5)), "rrc_scale"),
                     (dict(rrc_ratio=(0.0, 1.0)), "rrc_ratio"), (dict(eval_crop_frac=1.2), "eval_crop_frac")):
        with pytest.raises(ValueError, match=msg):
            AugmentSpec(**bad)
    cfg, _ = config_from_args(["--aug.resize", "rrc", "--aug.rrc_scale", "0.25,1", "--aug.rrc_ratio", "0.5,2",
                               "--aug.eval_resize", "center", "--aug.eval_crop_frac", "0.9"])
    spec = cfg.spec()
    assert (spec.resize, spec.rrc_scale, spec.rrc_ratio) == ("rrc", (0.25, 1.0), (0.5, 2.0))
    assert (spec.eval_resize, spec.eval_crop_frac) == ("center", 0.9)
    with pytest.raises(ConfigError, match="rrc_scale"):
        config_from_args(["--aug.rrc_scale", "0.5,0.2"])[0].spec()
    # The reference: RandomResizedCrop where Resize was; Resize(short) + CenterCrop for evaluation.
    first = lambda spec, train: reference_transform(spec, train).transforms[0]   # noqa: E731
    assert isinstance(first(spec, True), v2.RandomResizedCrop) and isinstance(first(d, True), v2.Resize)
    assert first(spec, False).size == [spec.eval_size] and isinstance(
        reference_transform(spec, False).transforms[1], v2.CenterCrop)


# ----------------------------------------------------------------------------- RRC draws

def _tv_boxes(hw, n=2000) -> torch.Tensor:
    t = v2.RandomResizedCrop(S)
    torch.manual_seed(0)
    img = torch.zeros(3, *hw, dtype=torch.uint8)
    return torch.tensor([[p[k] for k in ("top", "left", "height", "width")]
                         for p in (t.make_params([img]) for _ in range(n))], dtype=torch.float64)


@pytest.mark.parametrize("hw", [(64, 96), (96, 64), (375, 500)])
def test_rrc_draws_follow_torchvision_get_params(hw):
    H, W = hw
    ours = draw_params(2000, RRC, torch.Generator().manual_seed(1), src_hw=hw).box
    ref = _tv_boxes(hw)
    assert ours.shape == (2000, 4) and (ours == ours.round()).all()
    assert (ours[:, :2] >= 0).all() and (ours[:, 0] + ours[:, 2] <= H).all() and (ours[:, 1] + ours[:, 3] <= W).all()
    q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)

    def stats(b):
        area = b[:, 2] * b[:, 3] / (H * W)
        log_ratio = torch.log(b[:, 3] / b[:, 2])
        pos = b[:, 0] / (H - b[:, 2] + 1)                     # where the box sits, in [0, 1)
        return area, log_ratio, pos
    for a, r, name in zip(stats(ours), stats(ref), ("area", "log ratio", "position")):
        se = r.std() / math.sqrt(len(r))
        assert abs(a.mean() - r.mean()) <= 4.5 * se * math.sqrt(2), (name, a.mean(), r.mean())
        assert (a.quantile(q) - r.quantile(q)).abs().max() <= 0.05, (name, a.quantile(q), r.quantile(q))


@pytest.mark.parametrize("hw", [(40, 200), (200, 40)])
def test_rrc_fallback_on_extreme_aspect_ratios(hw):
    """No attempt fits often: the centre crop of the clamped ratio, as often as torchvision."""
    H, W = hw
    h, w = (40, 53) if H < W else (53, 40)              # round(40 * 4/3), round(40 / (3/4))
    fallback = torch.tensor([(H - h) // 2, (W - w) // 2, h, w], dtype=torch.float64)
    ours = (draw_params(2000, RRC, torch.Generator().manual_seed(2), src_hw=hw).box == fallback).all(1)
    ref = (_tv_boxes(hw) == fallback).all(1)
    f, g = ours.double().mean(), ref.double().mean()
    assert 0.1 < g < 0.9 and abs(f - g) <= 4 * math.sqrt(2 * g * (1 - g) / 2000), (f, g)


# ------------------------------------------------------------- a known box, augment.py

def _forced(boxes, hw, spec=RRC):
    p = draw_params(len(boxes), spec, torch.Generator().manual_seed(0), src_hw=hw)
    p.box = torch.tensor(boxes, dtype=torch.float64)
    return p


def test_a_known_box_matches_resized_crop_in_augment():
    boxes = [(0, 0, 64, 96), (5, 10, 40, 60), (20, 30, 24, 30), (3, 2, 61, 45)]
    big = torch.from_numpy(picture(64, 96, 0)).permute(2, 0, 1)
    # Sources larger than the training size are shrunk to it first (as the resident loader
    # and FFCV keep them), then the box is cut from that: approximate.
    got = levels(A.apply(big.expand(4, -1, -1, -1), RRC, _forced(boxes, (64, 96))), RRC)
    want = torch.stack([TF.resized_crop(big, *b, [S, S], antialias=True) for b in boxes]).double()
    d = (got - want).abs()
    assert d.mean() <= 2 and d.quantile(0.99) <= 12, (d.mean(), d.quantile(0.99))
    # No larger than the training size: the box is cut from the source itself, exactly.
    small = torch.from_numpy(picture(40, 30, 1)).permute(2, 0, 1)
    boxes = [(0, 0, 40, 30), (5, 3, 20, 25), (10, 0, 30, 11)]
    got = levels(A.apply(small.expand(3, -1, -1, -1), RRC, _forced(boxes, (40, 30))), RRC)
    want = torch.stack([TF.resized_crop(small, *b, [S, S], antialias=True) for b in boxes]).double()
    assert (got - want).abs().max() <= 1.01          # the reference's uint8 fixed-point resize


def test_rrc_composes_with_the_reports_ops_in_one_warp():
    """Box, flip, pad-crop and rotation as one warp against torchvision's sequence (float,
    on a source no larger than the training size), where the sequence's fill is untouched."""
    spec = AugmentSpec(size=S, resize="rrc").only("flip", "crop", "rotate")
    small = torch.from_numpy(picture(40, 30, 2)).permute(2, 0, 1)
    n = 8
    p = draw_params(n, spec, torch.Generator().manual_seed(3), src_hw=(40, 30))
    got = levels(A.apply(small.expand(n, -1, -1, -1), spec, p), spec)
    pad = spec.crop_padding
    for k in range(n):
        def seq(img):
            img = TF.resized_crop(img, *(int(v) for v in p.box[k]), [S, S], antialias=True)
            img = TF.horizontal_flip(img) if p.flip[k] else img
            j, i = (int(v) + pad for v in p.shift[k].tolist())
            img = TF.pad(img, [pad] * 4, fill=0)[:, i:i + S, j:j + S]
            return TF.rotate(img, float(p.angle[k]), interpolation=InterpolationMode.BILINEAR, fill=0)
        ok = (seq(torch.full_like(small, 255).float()) == 255).all(0)
        d = (got[k] - seq(small.float()))[:, ok].abs()
        assert d.mean() <= 1.5 and d.quantile(0.99) <= 6, (k, d.mean(), d.quantile(0.99))


# ---------------------------------------------------------------------------- per loader

@pytest.mark.parametrize("name", LOADERS)
def test_eval_center_equals_the_reference(photos, name):
    split = dataclasses.replace(photos, name="val", cache_dir=Path(photos.cache_dir) / f"eval-{name}")
    loader = build_loader(name, split, CENTER, opts(train=False, batch_size=5))
    got = torch.cat([x for x, _ in loader])
    assert got.shape == (12, 3, S, S)
    want = torch.stack([reference_transform(CENTER, False)(read_rgb(p)) for p in split.paths])
    d = (levels(got, CENTER) - levels(want, CENTER)).abs()
    top, mean = TOLERANCE[name]
    assert d.max() <= top and d.mean() <= mean, (d.max(), d.mean())
    stretch = torch.stack([reference_transform(RRC, False)(read_rgb(p)) for p in split.paths])
    assert (levels(got, CENTER) - levels(stretch, CENTER)).abs().mean() > 5   # the policy matters here


def test_stored_views(photos):
    """Photos are kept at the training size: stretched (also the rrc source) or as the
    "center" eval view; uniform sources no larger than it stay native."""
    assert storage_view(photos, RRC, True) == ((S, S), "stretch")
    assert storage_view(photos, CENTER, False) == ((S, S), "center")
    assert storage_view(photos, CENTER, True) == ((S, S), "stretch")      # training: its own policy
    small = dataclasses.replace(photos, sizes=((32, 40),) * 12)
    assert storage_view(small, CENTER, False) == ((32, 40), "native")


@pytest.mark.parametrize("name", [pytest.param(n, marks=_available(n)) for n in ("resident", "ffcv")])
def test_rrc_in_the_device_loaders_matches_the_reference_crops(photos, name):
    """Resident and FFCV: the boxes drawn per batch (replayed from batch_seed) on the
    original sizes, cut from the kept 48x48 pixels, against the reference's resized_crop."""
    split = dataclasses.replace(photos, cache_dir=Path(photos.cache_dir) / f"rrc-{name}")
    o = opts(batch_size=6)
    loader = build_loader(name, split, RRC, o)
    loader.set_epoch(2)
    batches = [(x.clone(), y.clone()) for x, y in loader]
    order = loader.sample_indices(2)
    sizes = torch.tensor(split.sizes, dtype=torch.float64)
    for b, (x, y) in enumerate(batches):
        idx = order[b * 6:(b + 1) * 6]
        assert y.tolist() == idx.tolist()
        g = torch.Generator().manual_seed(batch_seed(o.seed, o.rank, 2, b))
        boxes = draw_params(len(idx), RRC, g, src_hw=sizes[idx]).box
        d = (levels(x, RRC) - crops(split, boxes, idx)).abs()
        assert d.mean() <= 2 and d.quantile(0.99) <= 12, (b, d.mean(), d.quantile(0.99))
    print(f"\n{name} rrc vs the reference crops (last batch): mean {d.mean():.2f}, p99 "
          f"{d.quantile(0.99):.1f}, max {d.max():.1f} levels")


def test_rrc_in_the_torchvision_loader_is_the_reference(photos):
    split = dataclasses.replace(photos, cache_dir=Path(photos.cache_dir) / "rrc-tv")
    loader = build_loader("torchvision", split, RRC, opts(workers=0))
    loader.set_epoch(1)
    x, y = next(iter(loader))
    from PIL import Image
    from loaders.torchvision import pil_transform
    ref = pil_transform(RRC, True)          # the loader's pipeline: the same v2 ops on PIL images
    for k, i in enumerate(y.tolist()):
        torch.manual_seed(derive_seed(5, "sample", 1, i))
        with Image.open(split.paths[i]) as im:
            assert torch.equal(x[k], ref(im.convert("RGB")))


@pytest.mark.parametrize("mode", ["slice", "full", "slice-small"])
def test_rrc_in_dali_matches_the_reference_crops(photos, tmp_path, mode):
    """"slice" (the default) decodes each box alone and resizes it like the reference (on
    sources no larger than the training size, "slice-small": no resize, the warp upsamples
    the box, its border replicated); "full" cuts the box from the image kept at the
    training size, like augment.py."""
    if _available("dali"):
        pytest.skip("DALI not installed")
    from loaders.dali import DaliLoader
    if mode == "slice-small":
        photos, mode = _jpegs(tmp_path, ((40, 30), (30, 44))), "slice"
    loader = DaliLoader(photos, RRC, opts(), rrc_decode=mode)
    pipe = loader.build_pipeline(np.arange(12), seed=4, debug=True)
    out = [np.array(o.as_tensor()) for o in pipe.run()]
    del pipe
    p = params_from_uniforms(torch.from_numpy(out[2]), RRC, torch.tensor(photos.sizes, dtype=torch.float64))
    got = levels(torch.from_numpy(out[0]).permute(0, 3, 1, 2), RRC)
    d = (got - crops(photos, p.box, range(12))).abs()
    print(f"\ndali rrc {mode}: mean {d.mean():.2f}, p99 {d.quantile(0.99):.1f}, max {d.max():.1f} levels")
    if mode == "slice":
        assert d.max() <= 1.5 and d.mean() <= 0.5, (d.max(), d.mean())
    else:
        assert d.mean() <= 2 and d.quantile(0.99) <= 12, (d.mean(), d.quantile(0.99))
    # The whole spec runs on top of the box (colour on the resized box, then the warp).
    full = AugmentSpec(size=S, resize="rrc")
    x, _ = next(iter(DaliLoader(photos, full, opts(), rrc_decode=mode)))
    assert x.shape == (12, 3, S, S) and torch.isfinite(x).all()
