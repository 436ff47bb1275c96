"""DDP under torchrun with gloo on CPU, 2 processes.

One torchrun launch runs this file as its worker program (`-m tests.test_distributed`),
which trains the same tiny run once per available loader, each a full `engine.train.main`
in one process group, recording what
every rank saw (`--record-samples`). Then, in the same launch, a run that checkpoints
every 2 steps is SIGKILLed (each worker process, from the test) after its first
mid-epoch checkpoint, and a second torchrun resumes it.

Checks: per loader, the union of the ranks' samples in an epoch is the dataset minus the
remainder truncated to a multiple of the world size, with no sample on two ranks, each
recorded label matches its sample; the weights (and BatchNorm buffers) are identical on
both ranks at the end; rank 0 alone wrote the run folder; the resumed run's weights and
metrics equal the uninterrupted 2-process run's (bitwise: gloo sums two ranks in a fixed
order, one thread per process).
"""
from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, TIMING, children
N_TRAIN = 61           # 10 classes x 6 + 1: one sample is truncated away for 2 ranks


def make_data(root: Path) -> Path:
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for c in range(10):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n + (split == "train" and c == 0)):
                arr = np.full((32, 32, 3), c * 25, np.uint8) + rng.integers(0, 20, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")
    return root


def run_args(work: Path, name: str, loader: str, *extra) -> list[str]:
    return ["--preset", "cpu-demo", "--data", f"imagefolder:{work / 'data'}", "--loader", loader,
            "--width", "0.125", "--size", "32", "--epochs", "2,0,0,0", "--batch-size", "5", "--workers", "0",
            "--out", str(work / "runs"), "--name", name, "--cache-dir", str(work / "cache"),
            "--deterministic", "--amp", "off",
            "--record-samples", str(work / "rec" / name), *extra]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def loaders_here() -> list[str]:
    from loaders.base import available_loaders
    return available_loaders()


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """One torchrun: every loader's run, then the victim, killed after a mid-epoch checkpoint."""
    work = tmp_path_factory.mktemp("ddp")
    make_data(work / "data")
    names = loaders_here()
    proc = torchrun("-m", "tests.test_distributed", str(work), ",".join(names))
    last = work / "runs" / "victim" / "last.pt"
    deadline, log = time.time() + 600, ""
    try:
        while time.time() < deadline:
            pos = torch.load(last, weights_only=False)["position"] if last.exists() else {}
            if pos.get("batch"):
                break
            if proc.poll() is not None:
                pytest.fail(f"torchrun ended before the victim's checkpoint:\n{proc.stdout.read()[-4000:]}")
            time.sleep(0.05)
        else:
            pytest.fail("no mid-epoch checkpoint within 600 s")
        # SIGKILL both workers (torchrun starts each in its own session: killing the agent
        # alone would leave them running).
        workers = children(proc.pid)
        assert len(workers) == 2, workers
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        log = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return work, names, log


def test_each_loader_shards_by_rank_and_ranks_stay_identical(launched):
    work, names, log = launched
    from loaders.datasets import load_dataset
    ds = load_dataset(f"imagefolder:{work / 'data'}", work / "cache")
    assert len(ds.train) == N_TRAIN
    for name in names:
        rec = work / "rec" / name
        assert (work / "runs" / name / "summary.json").exists(), (name, log[-3000:])
        for epoch in (0, 1):
            seen = [json.loads((rec / f"rank{r}-epoch{epoch}.json").read_text()) for r in (0, 1)]
            assert [s["world"] for s in seen] == [2, 2]
            assert len(seen[0]["labels"]) == len(seen[1]["labels"]) == 30, name   # 61 // 2, batch 5
            for s in seen:                           # each recorded label is its sample's
                assert s["labels"] == [ds.train.labels[i] for i in s["indices"]], name
            a, b = (set(s["indices"]) for s in seen)
            assert not a & b and len(a) == len(b) == 30, name                   # no sample twice
            assert len(a | b) == N_TRAIN - N_TRAIN % 2, name                     # the epoch, minus 1
        w0, w1 = (torch.load(rec / f"weights-rank{r}.pt") for r in (0, 1))
        for k in w0:
            assert torch.equal(w0[k], w1[k]), (name, k)
        files = sorted(p.name for p in (work / "runs" / name).iterdir())
        assert files == ["config.json", "curves.png", "data_report.json", "last.pt", "metrics.csv",
                         "pretraining-best.pt", "prev.pt", "summary.json"], files
        rows = list(csv.DictReader(open(work / "runs" / name / "metrics.csv")))
        assert len(rows) == 2 and all(0 <= float(r["val_acc"]) <= 1 for r in rows)


def test_resume_under_torchrun_after_sigkill(launched):
    work, _, _ = launched
    pos = torch.load(work / "runs" / "victim" / "last.pt", weights_only=False)["position"]
    assert pos["batch"] > 0 and not (work / "runs" / "victim" / "summary.json").exists()
    proc = torchrun("-m", "tests.hooked_train", "--resume", str(work / "runs" / "victim"),
                    "--record-samples", str(work / "rec" / "resumed"))
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-4000:]
    assert "resuming" in out and out.count("best val acc") == 1           # rank 0 alone prints

    def strip(run):
        return [{k: v for k, v in r.items() if k not in TIMING}
                for r in csv.DictReader(open(work / "runs" / run / "metrics.csv"))]
    assert strip("victim") == strip("resident")
    a, b = (torch.load(work / "runs" / r / "last.pt", weights_only=False)["model"] for r in ("victim", "resident"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    w0, w1 = (torch.load(work / "rec" / "resumed" / f"weights-rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)


def _driver(work: str, names: str) -> None:
    """The torchrun worker program: every loader's run, then the victim. The process group
    is initialised here once for all of them (a default group destroyed and initialised
    again in one process finds the previous group's stale rendezvous keys in torchrun's
    store), so these runs take the engine's "already initialised" path; the resume launch
    takes the engine's own initialisation."""
    import torch.distributed as dist

    from tests.hooked_train import main
    dist.init_process_group("gloo")
    work = Path(work)
    for name in names.split(","):
        main(run_args(work, name, name))
    main(run_args(work, "victim", "resident", "--checkpoint-every", "2", "--debug-step-sleep", "0.5"))


if __name__ == "__main__":
    _driver(*sys.argv[1:])
