"""The reference loader: protocol (shapes, dtype, layout, normalisation), labels aligned
with images, epoch coverage and rank sharding, and augmentation rates."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from loaders.base import Loader, LoaderOptions, build_loader, epoch_indices
from loaders.spec import AugmentSpec
from loaders.common import read_rgb
from loaders.torchvision import reference_transform


def opts(**kw):
    base = dict(train=False, batch_size=16, workers=0)
    return LoaderOptions(**{**base, **kw})


def test_protocol_shapes_layout_and_normalisation(tiny_synthetic):
    spec = AugmentSpec(size=48).without()
    loader = build_loader("torchvision", tiny_synthetic.val, spec, opts(batch_size=16, workers=1))
    assert isinstance(loader, Loader)
    assert len(loader) == 3                                  # 40 val images, ragged last batch kept
    batches = list(loader)
    assert len(batches) == 3
    x, y = batches[0]
    assert x.shape == (16, 3, 48, 48) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.is_contiguous(memory_format=torch.channels_last)
    # Labels aligned with images: the natural order in evaluation, each image equal to
    # decode -> bilinear resize -> normalise of its own file (tolerance: float32 rounding).
    xs, ys = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert ys.tolist() == list(tiny_synthetic.val.labels)
    mean = torch.tensor(spec.mean).view(3, 1, 1)
    std = torch.tensor(spec.std).view(3, 1, 1)
    for i in (0, 17, 39):
        img = read_rgb(tiny_synthetic.val.paths[i]).float()[None] / 255
        want = torch.nn.functional.interpolate(img, size=(48, 48), mode="bilinear", align_corners=False,
                                               antialias=True)[0]
        torch.testing.assert_close(xs[i], (want - mean) / std, atol=2e-2, rtol=0)
    # Normalised range: (0 - mean)/std .. (1 - mean)/std.
    lo, hi = (0 - max(spec.mean)) / min(spec.std), (1 - min(spec.mean)) / min(spec.std)
    assert lo - 1e-4 <= xs.min() and xs.max() <= hi + 1e-4


def test_training_epoch_coverage_and_rank_partition(tiny_synthetic):
    n = len(tiny_synthetic.train)
    o = opts(train=True, drop_last=False)
    e0, e1 = epoch_indices(n, o, 0), epoch_indices(n, o, 1)
    assert sorted(e0.tolist()) == list(range(n)) and e0.tolist() != e1.tolist()
    assert np.array_equal(e0, epoch_indices(n, o, 0))       # deterministic for a seed
    ranks = [epoch_indices(n, opts(train=True, rank=r, world_size=3), 5) for r in range(3)]
    seen = np.concatenate(ranks)
    assert len(set(seen.tolist())) == len(seen) == n - n % 3  # no sample on two ranks
    assert len({len(r) for r in ranks}) == 1                  # equal counts: ranks stay in step
    # The loader yields exactly one epoch's samples (labels as a multiset).
    loader = build_loader("torchvision", tiny_synthetic.train, AugmentSpec(size=32),
                          opts(train=True, drop_last=False, workers=0))
    loader.set_epoch(3)
    labels = torch.cat([y for _, y in loader]).tolist()
    assert sorted(labels) == sorted(tiny_synthetic.train.labels)
    assert len(loader) == -(-n // 16)


def _rate(spec, image, n, probe):
    t = reference_transform(spec, train=True)
    torch.manual_seed(0)
    return np.mean([probe(t(image)) for _ in range(n)])


def test_flip_and_grayscale_rates():
    # Asymmetric, colourful 16x16 image: left half red, right half blue.
    img = torch.zeros(3, 16, 16, dtype=torch.uint8)
    img[0, :, :8] = 255
    img[2, :, 8:] = 255
    n = 2000  # binomial sd at p=0.5: 0.011, at p=0.2: 0.009 -> tolerance 0.04 is > 3.5 sd
    flip = _rate(AugmentSpec(size=16).only("flip"), img, n, lambda x: float(x[0, 0, 0] < x[0, 0, -1]))
    assert abs(flip - 0.5) < 0.04
    gray = _rate(AugmentSpec(size=16).only("grayscale"), img, n,
                 lambda x: float(torch.allclose(x[0] * 60 / 255 + 125 / 255, x[2] * 64 / 255 + 115 / 255, atol=1e-4)))
    assert abs(gray - 0.2) < 0.04
    persp = AugmentSpec(size=16).only("perspective")
    base = reference_transform(persp.without(), train=False)(img)
    changed = _rate(persp, img, 1000, lambda x: float(not torch.allclose(x, base)))
    assert abs(changed - 0.5) < 0.06


def test_augmented_batches_vary_and_stay_in_range(tiny_synthetic):
    spec = AugmentSpec(size=32)
    loader = build_loader("torchvision", tiny_synthetic.train, spec, opts(train=True, workers=0))
    x, _ = next(iter(loader))
    plain = next(iter(build_loader("torchvision", tiny_synthetic.train, spec.without(), opts(train=True, workers=0))))[0]
    assert not torch.allclose(x, plain)
    lo, hi = (0 - max(spec.mean)) / min(spec.std), (1 - min(spec.mean)) / min(spec.std)
    assert lo - 1e-4 <= x.min() and x.max() <= hi + 1e-4


def test_unknown_loader_is_a_config_error(tiny_synthetic):
    from loaders.common import ConfigError
    with pytest.raises(ConfigError, match="unknown loader 'nope'; use one of: torchvision"):
        build_loader("nope", tiny_synthetic.val, AugmentSpec(), opts())
