"""The reference loader: augmentation rates of the v2 pipeline, and per-sample seeding
(a sample's augmentation depends on (seed, epoch, sample) alone). The loader contract is
tests/test_loader_contract.py's."""
from __future__ import annotations

import numpy as np
import torch

from loaders.base import LoaderOptions, build_loader
from loaders.spec import AugmentSpec
from loaders.torchvision import reference_transform


def test_a_samples_augmentation_is_its_own(tiny_synthetic):
    """The same sample of the same epoch comes out identical whatever its rank, batch or
    worker (workers reseed per sample); another epoch draws anew."""
    def by_sample(world, workers, epoch=1):
        out = {}
        for r in range(world):
            loader = build_loader("torchvision", tiny_synthetic.train, AugmentSpec(size=32),
                                  LoaderOptions(train=True, batch_size=7, workers=workers, seed=5,
                                                rank=r, world_size=world))
            loader.set_epoch(epoch)
            for (x, _), i in zip(loader, np.array_split(loader.sample_indices(epoch), len(loader))):
                out.update(zip(i.tolist(), x))
        return out
    one, two, other = by_sample(1, 0), by_sample(2, 2), by_sample(1, 0, epoch=2)
    common = sorted(set(one) & set(two) & set(other))      # (training drops ragged batches)
    assert len(common) > 100 and all(torch.equal(one[i], two[i]) for i in common)
    assert sum(not torch.equal(one[i], other[i]) for i in common) > 0.9 * len(common)


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
