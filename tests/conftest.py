"""Shared fixtures: tiny datasets made inside the tests, and the real CIFAR-10 JPEGs from
../shared/datasets when present (tests that need them skip with a reason otherwise); the
processes a test started (`children`, `descendants`, `running`), read from /proc."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# metrics.csv columns that are clock readings: they differ between otherwise identical runs
TIMING = {"images_per_s", "seconds", "data_wait_frac", "elapsed_s"}
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "2")
# Triton decides at import/decoration time whether kernels are interpreted, and importing
# torchvision imports triton: with no GPU, the kernel tests need the interpreter set before
# any test module is collected (checked without importing torch).
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

from engine.config import SHARED_CIFAR10  # noqa: E402  (no torch import: the env above stays first)


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory):
    """A 10-class synthetic dataset, 16 train + 4 val images per class, cached in a tmp dir."""
    from loaders.datasets import SyntheticConfig, load_dataset
    cache = tmp_path_factory.mktemp("cache")
    return load_dataset("synthetic", cache, SyntheticConfig(train_per_class=16, val_per_class=4))


@pytest.fixture(scope="session")
def cifar_jpeg_dir(tmp_path_factory):
    """../shared/datasets CIFAR-10 JPEGs unpacked once per session (ImageFolder layout)."""
    if not SHARED_CIFAR10.exists():
        pytest.skip(f"real data absent: {SHARED_CIFAR10} not found (../shared is not beside this checkout)")
    out = tmp_path_factory.mktemp("cifar10")
    with tarfile.open(SHARED_CIFAR10) as t:
        t.extractall(out, filter="data")
    return out


def run_cli(*args, cwd=None, timeout=600, env=None):
    """Run `python -m ...` in a subprocess; returns CompletedProcess (text)."""
    e = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=cwd or ROOT, capture_output=True, text=True,
                          timeout=timeout, env=e)


@pytest.fixture
def no_copies(monkeypatch):
    """Counts every re-layout the fused kernels could do (tests/test_kernels_*.py):
    Tensor.contiguous and the one helper (`kernels._common.relayout`) they use for
    mismatched layouts."""
    import torch

    import kernels.batchnorm_silu as kbn
    import kernels.mish as kmish
    from kernels import _common
    calls = []
    original = torch.Tensor.contiguous

    def contiguous(self, *a, **k):
        calls.append("contiguous")
        return original(self, *a, **k)

    def relayout(t, ref, _orig=_common.relayout):
        out = _orig(t, ref)
        if out is not t:
            calls.append("relayout")
        return out

    monkeypatch.setattr(torch.Tensor, "contiguous", contiguous)
    for mod in (kbn, kmish):
        monkeypatch.setattr(mod, "relayout", relayout)
    return calls


@pytest.fixture
def no_tf32():
    """Full fp32 convs/matmuls on a GPU: the block tests compare two models whose conv inputs
    differ by fp32 rounding, which TF32 would amplify past the tolerances."""
    import torch
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def run_two_ranks(script: str, split, tmp_path, timeout: int) -> list:
    """Run `script` (python -c) as ranks 0 and 1 together; its argv: a file for the gloo
    group's store, `split` as JSON (name, paths, labels, sizes, cache_dir: tmp_path/cache),
    the rank. Returns each rank's last stdout line, parsed as JSON."""
    spec_file = tmp_path / "split.json"
    spec_file.write_text(json.dumps(dict(name=split.name, paths=list(split.paths), labels=list(split.labels),
                                         sizes=list(split.sizes), cache_dir=str(tmp_path / "cache"))))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "store"), str(spec_file), str(r)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    outs = []
    for p in procs:
        so, se = p.communicate(timeout=timeout)
        assert p.returncode == 0, se[-3000:]
        outs.append(json.loads(so.strip().splitlines()[-1]))
    return outs


def _stat(pid) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state, ppid, ...); None when gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc: no procps needed)."""
    return [int(d.parent.name) for d in Path("/proc").glob("[0-9]*/stat")
            if (f := _stat(d.parent.name)) and int(f[1]) == pid]


def descendants(pid: int) -> list[int]:
    """Children, their children, and so on."""
    out, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        out += kids
        todo += kids
    return out


def running(pids, within: float = 0.0) -> list[int]:
    """Those of `pids` still running (zombies count as gone) after waiting up to `within` s."""
    deadline = time.monotonic() + within
    while True:
        left = [p for p in pids if (f := _stat(p)) and f[0] not in "ZX"]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)
