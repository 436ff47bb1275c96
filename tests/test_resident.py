"""The device-resident loader: native-size storage, capacity, and the CUDA path. The
loader contract (shapes, order, ranks, determinism, resume, augment-off equal to the
reference within 0.01 uint8 step on CPU) is tests/test_loader_contract.py's."""
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


def test_split_kept_once_at_native_size(tiny_synthetic):
    loader = build_loader("resident", tiny_synthetic.train, SPEC, opts())
    assert isinstance(loader, ResidentLoader)
    assert loader.images.dtype == torch.uint8 and loader.images.shape == (160, 32, 32, 3)
    x, _ = next(iter(loader))
    assert x.shape == (24, 3, 48, 48)                  # the upscale happens in the warp


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
