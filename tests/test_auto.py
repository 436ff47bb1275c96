"""--loader auto: on CUDA the resident loader when the decoded data fits, else (and always on
a CPU device) the fastest by a cached probe; under torch.distributed rank 0 decides for
every rank; the chosen loader's whole contract is delegated."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import run_two_ranks

from loaders import auto
from loaders.base import LoaderOptions, available_loaders, build_loader
from loaders.common import ConfigError
from loaders.spec import AugmentSpec

OPTS = LoaderOptions(train=True, batch_size=16, workers=0)


@pytest.fixture
def split(tiny_synthetic, tmp_path):
    """The synthetic training split with a cache of its own (no probe figures yet)."""
    return dataclasses.replace(tiny_synthetic.train, cache_dir=tmp_path)


def fake_probe(monkeypatch, figures):
    calls = []
    monkeypatch.setattr(auto, "probe", lambda name, *a: calls.append(name) or figures.get(name, 10.0))
    return calls


def test_cuda_takes_resident_when_the_decoded_split_fits(split, monkeypatch):
    calls = fake_probe(monkeypatch, {})
    cuda = dataclasses.replace(OPTS, device=torch.device("cuda"))
    monkeypatch.setattr(auto, "device_free_bytes", lambda device: 1 << 40)
    name, why = auto.choose(split, AugmentSpec(size=32), cuda)
    assert name == "resident" and "MiB free on cuda" in why["reason"] and calls == []


def test_cpu_chooses_by_the_probe_even_when_resident_fits(split, monkeypatch):
    fake = {"torchvision": 100.0, "resident": 250.0, "dali": 600.0, "ffcv": 300.0}
    calls = fake_probe(monkeypatch, fake)
    name, why = auto.choose(split, AugmentSpec(size=32), OPTS)       # fits: 160 tiny images
    assert sorted(calls) == sorted(available_loaders()) and "resident" in calls
    assert name == max(calls, key=lambda n: fake.get(n, 10.0))
    assert why["reason"] == "fastest by the probe"


def test_auto_probes_once_and_reuses_the_cache(split, monkeypatch):
    monkeypatch.setattr(auto, "device_free_bytes", lambda device: 1024)    # nothing fits
    fake = {"torchvision": 100.0, "dali": 450.0, "ffcv": 300.0}
    calls = fake_probe(monkeypatch, fake)
    spec = AugmentSpec(size=32)
    name, why = auto.choose(split, spec, OPTS)
    probed = [n for n in available_loaders() if n != "resident"]
    assert sorted(calls) == sorted(probed)
    assert name == max(probed, key=lambda n: fake.get(n, 10.0))
    assert why["images_per_s"] == {n: fake.get(n, 10.0) for n in probed}
    n = len(calls)
    again, _ = auto.choose(split, spec, OPTS)
    assert again == name and len(calls) == n                          # served from the cache
    auto.choose(split, AugmentSpec(size=48), OPTS)                     # another spec: probed anew
    assert len(calls) == 2 * n


def test_auto_delegates_the_whole_contract(split, monkeypatch, capsys):
    monkeypatch.setattr(auto, "choose", lambda *a: ("resident", dict(reason="test")))
    loader = build_loader("auto", split, AugmentSpec(size=32), OPTS)
    assert "chose resident (test)" in capsys.readouterr().out
    inner = loader.loader
    assert loader.opts is inner.opts and len(loader) == len(inner) == 10
    loader.set_epoch(4, start_batch=8)
    assert (inner.epoch, inner.start_batch) == (4, 8)
    assert len(list(loader)) == 2
    assert loader.sample_indices(4).tolist() == inner.sample_indices(4).tolist()


class FakeDist:
    """torch.distributed as seen by one rank of two."""

    def __init__(self, rank, chosen=None):
        self.rank, self.chosen, self.sent = rank, chosen, None

    def apply(self, monkeypatch):
        d = torch.distributed
        monkeypatch.setattr(d, "is_initialized", lambda: True)
        monkeypatch.setattr(d, "get_world_size", lambda: 2)
        monkeypatch.setattr(d, "get_rank", lambda: self.rank)
        monkeypatch.setattr(d, "broadcast_object_list", self.broadcast)

    def broadcast(self, box, src):
        assert src == 0
        if self.rank == 0:
            self.sent = list(box)
        else:
            box[:] = [self.chosen]


def test_under_distributed_rank_zero_decides_for_all(split, monkeypatch):
    choice = ("dali", dict(reason="fastest by the probe"))
    zero = FakeDist(0)
    zero.apply(monkeypatch)
    monkeypatch.setattr(auto, "choose", lambda *a: choice)
    assert auto.decide(split, AugmentSpec(size=32), OPTS) == choice and zero.sent == [choice]

    def no_probe(*a):
        raise AssertionError("rank 1 chose for itself")
    FakeDist(1, choice).apply(monkeypatch)
    monkeypatch.setattr(auto, "choose", no_probe)
    assert auto.decide(split, AugmentSpec(size=32), OPTS) == choice
    # Rank 0 failing to choose: every rank hears of it (none waits for a choice forever).
    failed = ConfigError("--loader auto: no loader could run here")
    FakeDist(1, failed).apply(monkeypatch)
    with pytest.raises(ConfigError, match="no loader could run"):
        auto.decide(split, AugmentSpec(size=32), OPTS)
    zero = FakeDist(0)
    zero.apply(monkeypatch)
    monkeypatch.setattr(auto, "choose", lambda *a: (_ for _ in ()).throw(failed))
    with pytest.raises(ConfigError, match="no loader could run"):
        auto.decide(split, AugmentSpec(size=32), OPTS)
    assert zero.sent == [failed]


RANK_SCRIPT = r"""
import json, sys
from pathlib import Path
import torch.distributed as dist
from loaders import auto
from loaders.base import LoaderOptions
from loaders.datasets import Split
from loaders.spec import AugmentSpec
store, split_json, rank = sys.argv[1], sys.argv[2], int(sys.argv[3])
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
s = json.load(open(split_json))
split = Split(s["name"], tuple(s["paths"]), tuple(s["labels"]), tuple(map(tuple, s["sizes"])),
              Path(s["cache_dir"]) / f"rank{rank}")        # as on separate machines
# Rank 0 measures dali fastest; rank 1's probe would say torchvision (and must not run).
fast = "dali" if rank == 0 else "torchvision"
auto.probe = lambda name, *a: 1000.0 if name == fast else 10.0
auto.base.available_loaders = lambda: ["torchvision", "resident", "dali"]
opts = LoaderOptions(train=True, batch_size=16, workers=0, rank=rank, world_size=2)
name, why = auto.decide(split, AugmentSpec(size=32), opts)
dist.destroy_process_group()
print(json.dumps(name))
"""


@pytest.mark.timeout(120)
def test_two_gloo_ranks_use_rank_zeros_choice(split, tmp_path):
    names = run_two_ranks(RANK_SCRIPT, split, tmp_path, timeout=110)
    assert names == ["dali", "dali"]
