"""The device-resident loader: protocol, epoch coverage, sharding, determinism, capacity,
and equality with the reference loader when augmentation is off.

Augment-off tolerance on CPU: 0.01 uint8 step (both run torch's uint8 antialiased resize,
then normalise in float32); on CUDA the resize runs in float32: within 1 step of the
reference's rounded uint8 (tests/test_augment.py)."""
from __future__ import annotations

import pytest
import torch

from loaders.base import LoaderOptions, build_loader
from loaders.common import ConfigError
from loaders.resident import ResidentLoader, needed_bytes
from loaders.spec import AugmentSpec

SPEC = AugmentSpec(size=48)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def opts(**kw):
    base = dict(train=True, batch_size=24, workers=0, seed=3)
    base.update(kw)
    return LoaderOptions(**base)


def signatures(loader):
    """One hashable per yielded sample (augment off: the image identifies the sample)."""
    out = []
    for x, y in loader:
        for xi, yi in zip(x, y):
            out.append((int(yi), round(float(xi.double().sum()), 2), round(float(xi[0, 5, 7]), 4)))
    return out


def test_protocol_shapes_dtype_layout_and_registry(tiny_synthetic):
    loader = build_loader("resident", tiny_synthetic.train, SPEC, opts())
    assert isinstance(loader, ResidentLoader)
    assert len(loader) == 160 // 24                                     # drop_last when training
    x, y = next(iter(loader))
    assert x.shape == (24, 3, 48, 48) and x.dtype == torch.float32 and x.device.type == "cpu"
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert y.shape == (24,) and y.dtype == torch.int64
    assert loader.images.dtype == torch.uint8 and loader.images.shape[1:] == (32, 32, 3)  # native
    b = next(iter(ResidentLoader(tiny_synthetic.train, SPEC, opts(dtype=torch.bfloat16))))[0]
    assert b.dtype == torch.bfloat16 and b.is_contiguous(memory_format=torch.channels_last)


def test_every_sample_once_per_epoch_and_ranks_partition(tiny_synthetic):
    split, off = tiny_synthetic.train, SPEC.without()
    every = sorted(signatures(ResidentLoader(split, off, opts(train=False, batch_size=7))))
    assert len(every) == len(split) == len(set(every))
    loader = ResidentLoader(split, off, opts(batch_size=7, drop_last=False))
    assert len(loader) == -(-160 // 7)
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        assert sorted(signatures(loader)) == every
    ranks = [signatures(ResidentLoader(split, off, opts(batch_size=7, drop_last=False,
                                                        rank=r, world_size=2))) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 80
    assert not set(ranks[0]) & set(ranks[1]) and sorted(ranks[0] + ranks[1]) == every


def test_deterministic_for_a_seed_and_fresh_per_epoch(tiny_synthetic):
    split = tiny_synthetic.train
    a, b = ResidentLoader(split, SPEC, opts()), ResidentLoader(split, SPEC, opts())
    first = [(x.clone(), y.clone()) for x, y in a]
    assert all(torch.equal(x, x2) and torch.equal(y, y2) for (x, y), (x2, y2) in zip(first, b))
    again = list(a)                                          # same epoch again: same batches
    assert all(torch.equal(x, x2) for (x, _), (x2, _) in zip(first, again))
    a.set_epoch(1)
    x1, y1 = next(iter(a))
    assert not torch.equal(y1, first[0][1]) and not torch.equal(x1, first[0][0])
    other = next(iter(ResidentLoader(split, SPEC, opts(seed=4))))
    assert not torch.equal(other[1], first[0][1])


def test_refuses_a_dataset_that_does_not_fit(tiny_synthetic):
    split = tiny_synthetic.train
    need = needed_bytes(split, SPEC, opts())
    assert need >= 160 * 32 * 32 * 3
    with pytest.raises(ConfigError) as e:
        ResidentLoader(split, SPEC, opts(), free_bytes=lambda dev: need - 1)
    msg = str(e.value)
    assert f"{need:,} bytes" in msg and f"{need - 1:,} bytes" in msg and "\n" not in msg
    assert "--loader torchvision" in msg
    ResidentLoader(split, SPEC, opts(), free_bytes=lambda dev: need)      # exactly enough: fine


def compare_with_reference(split, spec, o, batches):
    ref = build_loader("torchvision", split, spec, o)
    res = build_loader("resident", split, spec, o)
    m = torch.tensor(spec.std).view(1, 3, 1, 1) * 255
    n = 0
    for (xr, yr), (xo, yo) in zip(ref, res):
        assert torch.equal(yr, yo)                                   # labels aligned
        d = (xr.float() - xo.float()).abs() * m                      # uint8 units
        assert d.max() <= 0.01, d.max()
        n += 1
        if n == batches:
            break
    assert n == batches


@pytest.mark.parametrize("train", [False, True])
def test_augment_off_equals_the_reference_loader(tiny_synthetic, train):
    compare_with_reference(tiny_synthetic.train, SPEC.without(), opts(train=train, batch_size=32), 4)


def test_augment_off_equals_the_reference_on_real_cifar(cifar_jpeg_dir, tmp_path):
    """Real CIFAR-10 JPEGs at the report's 128x128 (a 20-per-class subset, for speed)."""
    import shutil

    from loaders.datasets import load_dataset
    for part in ("train", "test"):
        for cls in sorted(p for p in (cifar_jpeg_dir / part).iterdir() if p.is_dir()):
            dst = tmp_path / "sub" / part / cls.name
            dst.mkdir(parents=True)
            for f in sorted(cls.iterdir())[:20]:
                shutil.copy(f, dst / f.name)
    ds = load_dataset(f"imagefolder:{tmp_path / 'sub'}", tmp_path / "cache")
    compare_with_reference(ds.val, AugmentSpec(), opts(train=False, batch_size=100), 2)


@CUDA
def test_cuda_resident(tiny_synthetic):
    o = opts(device=torch.device("cuda"))
    loader = ResidentLoader(tiny_synthetic.train, SPEC, o)
    assert loader.images.device.type == "cuda"
    x, y = next(iter(loader))
    assert x.device.type == "cuda" and y.device.type == "cuda"
    assert x.is_contiguous(memory_format=torch.channels_last)
    ev = dict(train=False, batch_size=64)
    gpu = ResidentLoader(tiny_synthetic.train, SPEC, opts(device=torch.device("cuda"), **ev))
    cpu = ResidentLoader(tiny_synthetic.train, SPEC, opts(**ev))
    for (xg, yg), (xc, yc) in zip(gpu, cpu):
        assert torch.equal(yg.cpu(), yc) and (xg.cpu() - xc).abs().max() < 1e-3
