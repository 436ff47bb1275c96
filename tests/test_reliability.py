"""Exact resume after SIGKILL and SIGTERM, checkpoint fallback, non-finite steps, limits.

Exactness: runs compared bit for bit use one CPU thread and --deterministic, and run in
the same kind of process (the SIGKILL test: three fresh subprocesses; the fallback test:
two in-process runs), so a resumed run reproduces the uninterrupted one exactly; only the
timing columns of metrics.csv (images_per_s, seconds, data_wait_frac) differ.
"""
from __future__ import annotations

import csv
import errno
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine.checkpoint import load_resumable, save_rotating
from engine.config import config_from_args
from engine.distributed import convert_sync_batchnorm
from engine.step import train_step
from engine.train import Trainer
from tests.hooked_train import hooks_from_args, main
from loaders.datasets import load_dataset
from loaders.common import ConfigError
from tests.conftest import ROOT, TIMING
from tests.test_train import make_tiny_folder



@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_folder(tmp_path_factory.mktemp("rel") / "data")


@pytest.fixture
def one_thread():
    """Fixed threads and deterministic algorithms for an in-process run; restored after."""
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(det)


def args(data, out, name, *extra):
    # 60 training images / batch 8 = 7 steps per epoch; two stages, three epochs in all.
    return ["--preset", "cpu-demo", "--data", f"imagefolder:{data}", "--width", "0.125", "--epochs", "2,1,0,0",
            "--batch-size", "8", "--workers", "0", "--out", str(out), "--name", name,
            "--cache-dir", str(out.parent / "cache"), "--deterministic", "--amp", "off", *extra]


def metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as f:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(f)]


def assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = (torch.load(p, weights_only=False)["model"] for p in (a, b))
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def start_run(*argv) -> subprocess.Popen:
    """engine.train in a fresh one-thread process (stdout and stderr together, as text)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "tests.hooked_train", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(data, tmp_path):
    # Every run in a fresh process with one thread: a long-lived test process carries
    # settings earlier tests changed (float32 matmul precision, kernel backend, thread
    # pools), which move the last bits of an in-process run.
    out = tmp_path / "runs"
    ref = start_run(*args(data, out, "ref"))                          # uninterrupted, alongside
    # The victim sleeps 0.3 s after each step (no effect on the numbers) so that the kill
    # lands mid-run; it checkpoints every 2 steps.
    victim = start_run(*args(data, out, "k", "--checkpoint-every", "2", "--debug-step-sleep", "0.3"))
    last = out / "k" / "last.pt"
    deadline = time.time() + 240
    try:
        while time.time() < deadline:                             # first mid-epoch checkpoint of epoch 2
            pos = torch.load(last, weights_only=False)["position"] if last.exists() else {}
            if pos.get("epoch") == 1 and pos.get("batch"):
                break
            assert victim.poll() is None, victim.stdout.read()
            time.sleep(0.05)
        else:
            pytest.fail("no mid-epoch checkpoint within 240 s")
        victim.send_signal(signal.SIGKILL)
    finally:
        victim.kill()
        victim.wait()
    pos = torch.load(last, weights_only=False)["position"]
    assert pos["stage"] == 0 and pos["epoch"] == 1 and 0 < pos["batch"] < 7, pos     # mid-epoch
    assert len(metrics(out / "k")) == 1 and not (out / "k" / "summary.json").exists()
    # Resume with 2 loader workers (the victim had none): batches do not depend on them.
    resumed = start_run("--resume", str(out / "k"), "--workers", "2")
    for p in (ref, resumed):
        log = p.communicate(timeout=300)[0]
        assert p.returncode == 0, log[-3000:]
    assert "resuming" in log and "at stage 1/2 epoch 2 batch" in log
    assert metrics(out / "k") == metrics(out / "ref")
    assert [r["skipped_steps"] for r in metrics(out / "ref")] == ["0", "0", "0"]
    for f in ("last.pt", "pretraining-best.pt", "finetuning1-best.pt"):
        assert_same_weights(out / "k" / f, out / "ref" / f)
    ref, res = (torch.load(out / r / "last.pt", weights_only=False) for r in ("ref", "k"))
    for a, b in zip(ref["optimizer"]["state"].values(), res["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    # A finished run resumes to its summary without training again.
    again = main(["--resume", str(out / "k")])
    assert again["best_val_acc"] == pytest.approx(max(float(r["val_acc"]) for r in metrics(out / "ref")))


def test_sigterm_checkpoints_at_the_next_step_then_resume_equals_an_uninterrupted_run(data, tmp_path):
    out = tmp_path / "runs"
    ref = start_run(*args(data, out, "ref"))
    # No --checkpoint-every: the only mid-epoch checkpoint can come from the signal.
    victim = start_run(*args(data, out, "t", "--debug-step-sleep", "0.3"))
    last = out / "t" / "last.pt"
    deadline = time.time() + 240
    while not (last.exists() and torch.load(last, weights_only=False)["position"]["epoch"] == 1):
        assert victim.poll() is None and time.time() < deadline, victim.stdout.read()
        time.sleep(0.05)
    time.sleep(0.5)                                   # a step or two into epoch 2 (0.3 s per step)
    victim.send_signal(signal.SIGTERM)
    log = victim.communicate(timeout=60)[0]
    assert victim.returncode == 128 + signal.SIGTERM, log[-3000:]
    assert "stopped by SIGTERM at pretraining 2/2 batch" in log and f"--resume {out / 't'}" in log
    pos = torch.load(last, weights_only=False)["position"]
    assert pos["stage"] == 0 and pos["epoch"] == 1 and 0 < pos["batch"] < 7, pos
    resumed = start_run("--resume", str(out / "t"))
    for p in (ref, resumed):
        log = p.communicate(timeout=300)[0]
        assert p.returncode == 0, log[-3000:]
    assert metrics(out / "t") == metrics(out / "ref")
    for f in ("last.pt", "pretraining-best.pt", "finetuning1-best.pt"):
        assert_same_weights(out / "t" / f, out / "ref" / f)


def test_truncated_last_checkpoint_falls_back_to_prev(tmp_path, data, one_thread, capsys):
    d = tmp_path / "r"
    d.mkdir()
    for i in (1, 2):
        save_rotating(d, dict(position=dict(stage=0, epoch=i, batch=0), model={"w": torch.full((3,), float(i))}))
    state, path = load_resumable(d)
    assert path.name == "last.pt" and state["position"]["epoch"] == 2
    blob = (d / "last.pt").read_bytes()
    (d / "last.pt").write_bytes(blob[: len(blob) // 2])            # a torn write
    state, path = load_resumable(d)
    err = capsys.readouterr().err
    assert re.search("last.pt unreadable.*falling back to .*prev.pt", err) and "\n" not in err.strip()
    assert path.name == "prev.pt" and state["position"]["epoch"] == 1
    (d / "prev.pt").unlink()
    with pytest.raises(ConfigError, match="no usable checkpoint"):
        load_resumable(d)
    # End to end: a run whose last.pt is torn resumes from prev.pt and finishes identically.
    out = tmp_path / "runs"
    main(args(data, out, "ref"))
    main(args(data, out, "t", "--stages", "pretraining"))         # 2 epochs: prev.pt = epoch 1 end
    blob = (out / "t" / "last.pt").read_bytes()
    (out / "t" / "last.pt").write_bytes(blob[:1000])
    cfg, _ = config_from_args(["--resume", str(out / "t")])
    Trainer(cfg).run()
    assert "falling back to" in capsys.readouterr().err
    rows = metrics(out / "t")
    assert rows == metrics(out / "ref")[:2]


def test_resume_refuses_a_different_recipe(tmp_path, data):
    out = tmp_path / "runs"
    run = out / "x"
    run.mkdir(parents=True)
    cfg, _ = config_from_args(args(data, out, "x", "--amp", "auto"))
    from dataclasses import asdict
    (run / "config.json").write_text(json.dumps({**asdict(cfg), "device": "cpu", "amp": "None", "config": asdict(cfg)}))
    again, _ = config_from_args(["--resume", str(run), "--workers", "3", "--checkpoint-every", "5"])
    assert (again.workers, again.checkpoint_every, again.width, again.epochs) == (3, 5, 0.125, (2, 1, 0, 0))
    assert again.out == str(out.resolve()) and again.name == "x"
    assert cfg.amp == "auto" and again.amp == "off"          # pinned to what "auto" resolved to
    same, _ = config_from_args(["--resume", str(run), "--batch-size", "8"])      # same value: fine
    assert same.batch_size == 8
    with pytest.raises(ConfigError, match="--lr-scale cannot change on --resume"):
        config_from_args(["--resume", str(run), "--lr-scale", "2"])
    with pytest.raises(ConfigError, match="no config.json"):
        config_from_args(["--resume", str(tmp_path)])


def test_non_finite_steps_are_skipped_counted_and_leave_state_untouched(data, tmp_path):
    out = tmp_path / "runs"
    hooks, argv = hooks_from_args(args(data, out, "nan", "--stages", "pretraining", "--epochs", "1",
                                       "--debug-nan-steps", "1,2,5"))
    cfg, _ = config_from_args(argv)
    t = Trainer(cfg, hooks)
    # One poisoned step by hand: weights, AdamW state and BatchNorm statistics unchanged.
    opt = t.engine.optimizer(cfg.stage_plan()[0][0].lr_start)
    x, y = next(iter(t.train_loader))
    y_soft = torch.nn.functional.one_hot(y, 10).float()
    assert not bool(train_step(t.engine, opt, x, y_soft).bad)
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    moments = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    assert bool(train_step(t.engine, opt, x * float("nan"), y_soft).bad)
    assert all(torch.equal(before[k], v) for k, v in t.model.state_dict().items())
    assert all(torch.equal(moments[id(p)][k], v) for p, s in opt.state.items() for k, v in s.items())
    # The run: steps 1, 2 and 5 poisoned -> skipped and counted, training goes on.
    summary = t.run()
    rows = metrics(out / "nan")
    assert rows[0]["skipped_steps"] == "3" and math.isfinite(float(rows[0]["train_loss"]))
    assert all(torch.isfinite(v.float()).all() for v in t.model.state_dict().values())
    assert summary["best_val_acc"] >= 0


def test_consecutive_non_finite_steps_stop_with_the_last_good_checkpoint(data, tmp_path, capsys):
    out = tmp_path / "runs"
    with pytest.raises(SystemExit) as e:
        main(args(data, out, "stop", "--stages", "pretraining", "--checkpoint-every", "2",
                  "--debug-nan-steps", ",".join(map(str, range(3, 40))), "--max-bad-steps", "3"))
    assert e.value.code == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: stopped: 3 consecutive steps with a non-finite loss") and "last.pt" in err
    state = torch.load(out / "stop" / "last.pt", weights_only=False)
    assert state["position"] == dict(stage=0, epoch=0, batch=2)       # written before the streak
    assert all(torch.isfinite(v.float()).all() for v in state["model"].values())
    assert not (out / "stop" / "metrics.csv").exists()


def test_batch_that_cannot_fit_is_refused_before_reading_data(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:      # the data path does not even exist: never read
        main(["--data", "imagefolder:/no/such/data", "--size", "1024", "--batch-size", "100000",
              "--device", "cpu", "--out", str(tmp_path), "--cache-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "\n" not in err.strip()
    assert "--batch-size 100000 at --size 1024 does not fit on cpu" in err and "GiB" in err
    assert "of activations per image x 100000" in err
    import engine.memory
    monkeypatch.setattr(engine.memory, "device_free_bytes", lambda dev: 2**20)     # a 1 MiB device
    with pytest.raises(SystemExit):
        main(["--width", "0.125", "--device", "cpu", "--out", str(tmp_path), "--data", "imagefolder:/no/such"])
    assert "but 1.0 MiB is available" in capsys.readouterr().err


def test_full_disk_keeps_the_previous_dataset_cache(tmp_path, monkeypatch):
    # The dataset cache: a rebuild that hits a full disk keeps the previous cache usable.
    root = make_tiny_folder(tmp_path / "src")
    ds = load_dataset(f"imagefolder:{root}", tmp_path / "cache2")
    manifest = ds.cache_dir / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    from PIL import Image
    extra = root / "train" / "class0" / "extra.png"
    Image.new("L", (8, 8)).save(extra)                 # grayscale: the rebuild converts (writes) it
    import loaders.datasets

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(loaders.datasets, "atomic_write", full)
    with pytest.raises(ConfigError, match="disk full while writing the dataset cache.*previous cache there is intact"):
        load_dataset(f"imagefolder:{root}", tmp_path / "cache2")
    monkeypatch.undo()
    assert manifest.stat().st_mtime_ns == stamp and all(Path(p).exists() for p in ds.train.paths)
    extra.unlink()                                      # source as before: the old cache is used as is
    again = load_dataset(f"imagefolder:{root}", tmp_path / "cache2")
    assert manifest.stat().st_mtime_ns == stamp and again.train.paths == ds.train.paths


def test_sync_batchnorm_conversion_keeps_the_fused_silu():
    from engine.models import build_model
    torch.manual_seed(0)
    m = build_model("seed_best", width=0.125)
    x = torch.randn(4, 3, 32, 32)
    m.eval()
    want = m(x)
    keys = set(m.state_dict())
    s = convert_sync_batchnorm(m)
    assert set(s.state_dict()) == keys
    assert not any(type(mod).__name__ == "BatchNormSiLU2d" for mod in s.modules())
    torch.testing.assert_close(s(x), want)        # world 1: SyncBatchNorm computes plain BN


def test_fp16_gradscaler_skips_non_finite_steps_too(data, tmp_path):
    """--amp fp16: the GradScaler's own inf check skips the step (and lowers its scale)."""
    out = tmp_path / "runs"
    main(args(data, out, "f16", "--stages", "pretraining", "--epochs", "1", "--amp", "fp16",
              "--debug-nan-steps", "1,2"))
    assert metrics(out / "f16")[0]["skipped_steps"] == "2"
    state = torch.load(out / "f16" / "last.pt", weights_only=False)
    assert state["scaler"]["scale"] < 65536.0                       # halved by the skipped steps
    assert all(torch.isfinite(v.float()).all() for v in state["model"].values())
