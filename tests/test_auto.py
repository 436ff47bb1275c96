"""--loader auto: resident when the decoded data fits, else the fastest by a cached probe."""
from __future__ import annotations

import torch

from loaders import auto
from loaders.base import LoaderOptions, available_loaders, build_loader
from loaders.spec import AugmentSpec


def test_auto_picks_resident_when_it_fits(tiny_synthetic, capsys):
    opts = LoaderOptions(train=True, batch_size=16, workers=0)
    loader = build_loader("auto", tiny_synthetic.train, AugmentSpec(size=32), opts)
    assert loader.choice["loader"] == "resident"
    assert "chose resident" in capsys.readouterr().out
    x, y = next(iter(loader))
    assert x.shape == (16, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last)
    assert len(loader) == len(tiny_synthetic.train) // 16


def test_auto_probes_once_and_reuses_the_cache(tiny_synthetic, monkeypatch, capsys):
    monkeypatch.setattr(auto, "device_free_bytes", lambda device: 1024)    # nothing fits
    calls = []
    fake = {"torchvision": 100.0, "dali": 450.0, "ffcv": 300.0}
    monkeypatch.setattr(auto, "probe", lambda name, *a: calls.append(name) or fake.get(name, 10.0))
    (tiny_synthetic.train.cache_dir / "loader-probe.json").unlink(missing_ok=True)
    spec, opts = AugmentSpec(size=32), LoaderOptions(train=True, batch_size=16, workers=0)
    name, why = auto.choose(tiny_synthetic.train, spec, opts)
    probed = [n for n in available_loaders() if n != "resident"]
    assert sorted(calls) == sorted(probed)
    assert name == max(probed, key=lambda n: fake.get(n, 10.0))
    assert why["images_per_s"] == {n: fake.get(n, 10.0) for n in probed}
    n = len(calls)
    again, _ = auto.choose(tiny_synthetic.train, spec, opts)
    assert again == name and len(calls) == n                          # served from the cache
    auto.choose(tiny_synthetic.train, AugmentSpec(size=48), opts)     # another spec: probed anew
    assert len(calls) == 2 * n
