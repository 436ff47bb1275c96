"""The loader contract (`loaders.base.Loader`), checked on every loader available here:
shapes, dtype, layout and range; labels aligned with images; every sample once per epoch
across two ranks, matching `sample_indices` and the one sharding rule; len() = batches
yielded, in O(1); determinism per (seed, epoch); `set_epoch(e, start_batch=k)`; every
rank yields len() batches when a file breaks after ingest; augmentation off equals the
reference transform.

Augment-off tolerances against the reference transform (torchvision v2: decode, bilinear
antialiased resize in uint8, normalise), in levels (1 = 1/255 before normalisation), as
measured and argued in each loader's own tests:
- torchvision: max 1, mean 0.05 (PIL images through the reference's v2 ops: PIL's bilinear
  resize and torch's uint8 antialiased one give identical pixels when upscaling, measured 0
  levels at 24-128 px on synthetic and CIFAR-10 JPEGs, 2026-12-02; downscaling non-square
  photos (tests/test_photos.py) they round apart by at most one level, mean 0.003);
- resident: max 0.01 (the same uint8 antialiased resize, then normalise in float32);
- ffcv: max 1, mean 0.5 (raw .beton: exact pixels; augment.py resizes in float32);
- dali: max 1.5 (same libjpeg-turbo pixels; DALI warps the normalised float image).
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from loaders.base import (Loader, LoaderOptions, batch_seed, build_loader, derive_seed,
                          epoch_indices, loader_class, rank_count)
from loaders.common import ConfigError, read_rgb
from loaders.datasets import Split
from loaders.spec import AugmentSpec
from loaders.torchvision import reference_transform

NAMES = ("torchvision", "resident", "dali", "ffcv")
TOLERANCE = {"torchvision": (1.001, 0.05), "resident": (0.01, 0.01), "ffcv": (1.001, 0.5),
             "dali": (1.5, 1.5)}                                     # (max, mean) levels
SPEC = AugmentSpec(size=48)
N = 157                       # odd: two ranks drop one sample of every training epoch


def _available(name):
    try:
        loader_class(name)
        return []
    except ConfigError as e:
        return [pytest.mark.skip(reason=str(e))]


LOADERS = [pytest.param(n, marks=_available(n)) for n in NAMES]


def opts(**kw):
    return LoaderOptions(**{**dict(train=True, batch_size=16, workers=1, seed=3), **kw})


@pytest.fixture(scope="module")
def split(tiny_synthetic, tmp_path_factory):
    """157 synthetic training images, each labelled with its own index (a label names the
    sample), in a cache of their own."""
    s = tiny_synthetic.train
    return dataclasses.replace(s, paths=s.paths[:N], labels=tuple(range(N)), sizes=s.sizes[:N],
                               cache_dir=tmp_path_factory.mktemp("contract-cache"))


def levels(x: torch.Tensor, spec: AugmentSpec = SPEC) -> torch.Tensor:
    """Normalised NCHW images -> 0..255 levels (float64)."""
    std = torch.tensor(spec.std, dtype=torch.float64).view(1, 3, 1, 1)
    mean = torch.tensor(spec.mean, dtype=torch.float64).view(1, 3, 1, 1)
    return x.double() * std * 255 + mean * 255


def epoch(loader, e=None, start=0):
    if e is not None:
        loader.set_epoch(e, start)
    return [(x.clone(), y.clone()) for x, y in loader]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, x2) and torch.equal(y, y2)
                                    for (x, y), (x2, y2) in zip(a, b))


def ids(batches) -> list[int]:
    return [int(i) for _, y in batches for i in y]


# ----------------------------------------------------------------------- rule and seeds

def test_the_sharding_rule():
    for n, w in ((157, 2), (160, 3), (5, 4)):
        whole = epoch_indices(n, opts(), 7)
        assert sorted(whole.tolist()) == list(range(n))
        assert not np.array_equal(whole, epoch_indices(n, opts(), 8))
        assert np.array_equal(whole, epoch_indices(n, opts(), 7))
        for train in (True, False):
            ranks = [epoch_indices(n, opts(train=train, rank=r, world_size=w), 7) for r in range(w)]
            base = whole if train else np.arange(n)
            kept = base[: n - n % w] if train else base
            for r, got in enumerate(ranks):                          # dealt round-robin
                assert np.array_equal(got, kept[r::w])
                assert len(got) == rank_count(n, opts(train=train, rank=r, world_size=w))
            if train:                                                # truncated: equal counts
                assert len({len(g) for g in ranks}) == 1


def test_derive_seed():
    s = derive_seed(3, "sample", 1, 2)
    assert s == derive_seed(3, "sample", 1, 2) and 0 <= s < 2 ** 63
    assert len({derive_seed(3, "sample", e, i) for e in range(50) for i in range(200)}) == 10_000
    assert len({s, derive_seed(3, "sample", 2, 1), derive_seed(4, "sample", 1, 2),
                derive_seed(3, "augment", 1, 2), derive_seed(3, "sample", 1, 2, 0),
                derive_seed(-3, "sample", 1, 2)}) == 6
    assert batch_seed(3, 0, 1, 2) != batch_seed(3, 1, 1, 2)          # ranks draw independently


def test_unknown_loader_is_a_config_error(split):
    with pytest.raises(ConfigError, match="unknown loader 'nope'; use one of: torchvision"):
        build_loader("nope", split, SPEC, opts())


# ------------------------------------------------------------------------- the contract

@pytest.mark.parametrize("name", LOADERS)
def test_batches_shape_dtype_layout_and_range(split, name):
    loader = build_loader(name, split, SPEC, opts())
    assert isinstance(loader, Loader) and loader.opts.batch_size == 16
    batches = epoch(loader, 0)
    assert len(batches) == len(loader) == N // 16                   # training drops the ragged batch
    for x, y in batches:
        assert x.shape == (16, 3, 48, 48) and x.dtype == torch.float32 and x.device.type == "cpu"
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert y.shape == (16,) and y.dtype == torch.int64
    lv = levels(torch.cat([x for x, _ in batches]))                 # normalised 0..255 images
    assert lv.min() > -1e-3 and lv.max() < 255 + 1e-3
    # Augmented: the same samples without augmentation look different.
    plain = epoch(build_loader(name, split, SPEC.without(), opts()), 0)
    assert ids(plain) == ids(batches)
    assert not torch.allclose(plain[0][0], batches[0][0], atol=0.05)
    # Evaluation keeps the ragged batch; other engine dtypes (bfloat16) keep the layout.
    ev = build_loader(name, split, SPEC.without(), opts(train=False, dtype=torch.bfloat16))
    got = epoch(ev, 0)
    assert len(got) == len(ev) == -(-N // 16) and len(got[-1][1]) == N % 16
    assert all(x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last)
               for x, _ in got)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("name", LOADERS)
def test_augment_off_equals_the_reference_and_labels_align(split, name, train):
    """Each image equals the reference transform of the file its label names, in the
    order `sample_indices` gives (evaluation: the natural order)."""
    spec = SPEC.without()
    loader = build_loader(name, split, spec, opts(train=train, drop_last=False))
    batches = epoch(loader, 1)
    order = loader.sample_indices(1).tolist()
    assert ids(batches) == order
    assert order == (list(range(N)) if not train else epoch_indices(N, opts(), 1).tolist())
    ref = reference_transform(spec, train=False)
    want = torch.stack([ref(read_rgb(split.paths[i])) for i in order])
    d = (levels(torch.cat([x for x, _ in batches]), spec) - levels(want, spec)).abs()
    top, mean = TOLERANCE[name]
    assert d.max() <= top and d.mean() <= mean, (d.max(), d.mean())


@pytest.mark.parametrize("drop", [False, True])
@pytest.mark.parametrize("name", LOADERS)
def test_every_sample_once_per_epoch_across_two_ranks(split, name, drop):
    spec = SPEC.without()
    got = []
    for r in (0, 1):
        o = opts(rank=r, world_size=2, drop_last=drop)
        loader = build_loader(name, split, spec, o)
        batches = epoch(loader, 3)
        assert len(batches) == len(loader) == (78 // 16 if drop else -(-78 // 16))
        assert ids(batches) == loader.sample_indices(3).tolist()
        assert ids(batches) == epoch_indices(N, o, 3)[: len(loader) * 16].tolist()   # the one rule
        got.append(ids(batches))
    assert not set(got[0]) & set(got[1]) and len(got[0]) == len(got[1])
    whole = epoch_indices(N, opts(), 3)[: N - 1]              # the epoch's order, truncated to even
    if drop:
        assert set(got[0] + got[1]) < set(whole.tolist())
    else:
        assert sorted(got[0] + got[1]) == sorted(whole.tolist())


@pytest.mark.parametrize("name", LOADERS)
def test_len_and_set_epoch_draw_nothing(split, name, monkeypatch):
    """len() (called every step) and set_epoch are O(1): no permutation is drawn."""
    loader = build_loader(name, split, SPEC, opts(drop_last=False))

    def no_draws(*a, **k):
        raise AssertionError("a permutation was drawn")
    monkeypatch.setattr(np.random, "default_rng", no_draws)
    for e in range(3):
        loader.set_epoch(e, start_batch=2)
        assert len(loader) == -(-N // 16)


@pytest.mark.parametrize("name", LOADERS)
def test_deterministic_per_seed_and_epoch(split, name):
    a = build_loader(name, split, SPEC, opts())
    e1 = epoch(a, 1)
    assert same(e1, epoch(a))                                  # again without set_epoch: epoch 1
    b = build_loader(name, split, SPEC, opts())
    e2 = epoch(b, 2)
    assert same(e1, epoch(b, 1))                               # another instance, same batches
    assert ids(e1) != ids(e2) and not torch.equal(e1[0][0], e2[0][0])   # a new order, new draws
    assert same(e2, epoch(a, 2))
    other = epoch(build_loader(name, split, SPEC, opts(seed=4)), 1)
    assert ids(other) != ids(e1)


@pytest.mark.parametrize("name", LOADERS)
def test_set_epoch_start_batch_yields_exactly_the_rest(split, name):
    loader = build_loader(name, split, SPEC, opts(drop_last=False))
    full = epoch(loader, 2)
    n = len(loader)
    assert len(full) == n == 10
    assert same(epoch(loader, 2, start=3), full[3:]) and len(loader) == n
    assert same(epoch(loader), full)                           # the start batch is used once
    fresh = build_loader(name, split, SPEC, opts(drop_last=False))   # a resume after a restart
    assert same(epoch(fresh, 2, start=7), full[7:])
    assert epoch(fresh, 2, start=n) == []
    with pytest.raises(ValueError, match="start_batch"):
        fresh.set_epoch(2, n + 1)
    loader.set_epoch(2)                                        # an epoch left early ...
    next(iter(loader))
    assert same(epoch(loader), full)                           # ... leaves nothing behind


@pytest.mark.parametrize("name", LOADERS)
def test_every_rank_yields_len_batches_after_a_file_breaks(split, name, tmp_path):
    """A file that became unreadable after ingest (the split still lists it): no rank's
    epoch ends early (DDP would hang), the file is never delivered."""
    if name == "resident":
        pytest.skip("the resident loader decodes the whole split when built: a broken file "
                    "stops every rank at start, never mid-epoch")
    paths = []
    for i, p in enumerate(split.paths[:41]):
        q = tmp_path / f"{i:02d}.jpg"
        q.write_bytes(Path(p).read_bytes())
        paths.append(str(q))
    Path(paths[21]).write_bytes(b"this is not an image" * 10)
    broken = Split("train", tuple(paths), tuple(range(41)), ((32, 32),) * 41, tmp_path / "cache")
    counts, warned = [], []
    for r in (0, 1):
        loader = build_loader(name, broken, SPEC.without(), opts(batch_size=8, drop_last=False,
                                                                  rank=r, world_size=2, workers=0))
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            batches = epoch(loader, 0)
        warned += [str(m.message) for m in w if "21.jpg" in str(m.message)]
        assert len(batches) == len(loader) == 3, r
        assert 21 not in ids(batches)
        counts.append(sum(len(y) for _, y in batches))
    assert counts == [20, 20]                          # 41 (ffcv: 40 readable) // 2 each
    if name != "ffcv":                                 # (ffcv reports it when writing the .beton)
        assert warned


@pytest.mark.parametrize("name", LOADERS)
def test_augment_off_equals_the_reference_on_real_cifar(cifar_jpeg_dir, tmp_path, name):
    """Real CIFAR-10 JPEGs (the first 20 test images per class) at the report's 128x128."""
    classes = sorted(p for p in (cifar_jpeg_dir / "test").iterdir() if p.is_dir())
    paths = tuple(str(f) for c in classes for f in sorted(c.iterdir())[:20])
    val = Split("val", paths, tuple(range(len(paths))), ((32, 32),) * len(paths), tmp_path / "cache")
    spec = AugmentSpec().without()
    batches = epoch(build_loader(name, val, spec, opts(train=False, batch_size=100)), 0)
    assert ids(batches) == list(range(200))
    ref = reference_transform(spec, train=False)
    want = torch.stack([ref(read_rgb(p)) for p in paths])
    d = (levels(torch.cat([x for x, _ in batches]), spec) - levels(want, spec)).abs()
    top, mean = TOLERANCE[name]
    assert d.max() <= top and d.mean() <= mean, (d.max(), d.mean())
