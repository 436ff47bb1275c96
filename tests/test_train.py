"""The four-stage schedule, the run folder it writes, and one-line CLI errors (exit 2)."""
from __future__ import annotations

import csv
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from engine.config import SHARED_CIFAR10, STAGES, config_from_args
from engine.train import cosine_lr, main
from tests.conftest import run_cli
from loaders.common import ConfigError


def make_tiny_folder(root):
    """10 classes x 6 train / 2 val solid-colour-ish 32x32 PNGs."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for c in range(10):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                arr = np.full((32, 32, 3), c * 25, np.uint8) + rng.integers(0, 20, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return make_tiny_folder(tmp_path_factory.mktemp("tiny"))


def test_stage_schedule_lrs_and_alphas():
    cfg, _ = config_from_args(["--preset", "seed"])
    plan = cfg.stage_plan()
    assert [(s.name, s.lr_start, s.lr_end, s.mixup_alpha) for s, _ in plan] == [
        ("pretraining", 2e-4, 1e-5, 0.1), ("finetuning1", 1e-5, 5e-6, 0.2),
        ("finetuning2", 5e-6, 1e-6, 0.5), ("finetuning3", 5e-6, 1e-6, 0.3)]
    for stage, _ in plan:
        total = 37
        assert math.isclose(cosine_lr(stage, 0, total), stage.lr_start)
        assert math.isclose(cosine_lr(stage, total - 1, total), stage.lr_end)
        lrs = [cosine_lr(stage, k, total) for k in range(total)]
        assert all(a >= b for a, b in zip(lrs, lrs[1:]))     # annealed monotonically
    warm, _ = config_from_args(["--preset", "seed", "--warmup-epochs", "0.5", "--stages", "finetuning1,finetuning2"])
    first, second = (s for s, _ in warm.stage_plan())
    assert (first.name, first.warmup_epochs, second.warmup_epochs) == ("finetuning1", 0.5, 0.0)  # first run stage only
    lrs = [cosine_lr(first, k, 20, warmup=4) for k in range(20)]
    assert lrs[:4] == pytest.approx([first.lr_start * k / 4 for k in (1, 2, 3, 4)])           # linear, up to lr_start
    assert lrs[-1] == pytest.approx(first.lr_end) and all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    demo, _ = config_from_args(["--preset", "cpu-demo", "--stages", "finetuning2,finetuning3", "--epochs", "3"])
    assert [(s.name, e) for s, e in demo.stage_plan()] == [("finetuning2", 3), ("finetuning3", 3)]
    assert demo.stage_plan()[0][0].lr_start == pytest.approx(5e-6 * demo.lr_scale)


def test_cli_overrides_reach_the_spec():
    cfg, _ = config_from_args(["--preset", "cpu-demo", "--size", "64", "--aug.rotate_degrees", "15",
                               "--no-aug", "perspective,flip", "--batch-size", "8"])
    spec = cfg.spec()
    assert (spec.size, spec.rotate_degrees, cfg.batch_size) == (64, 15.0, 8)
    assert "perspective" not in spec.enabled and "flip" not in spec.enabled and "rotate" in spec.enabled


@pytest.mark.parametrize("scale", [0.0, 1.0, 2.0])
def test_dropout_flag_scales_the_models_dropout(scale):
    """--dropout reaches the engine's model: every dropout rate is the report's times the scale
    (seed_best keeps only the head's 0.3 and 0.2; 0 leaves none)."""
    from engine.step import build_engine
    cfg, _ = config_from_args(["--preset", "seed", "--width", "0.25", "--dropout", str(scale)])
    model = build_engine(cfg, 10, torch.device("cpu"), None).model
    rates = [m.p for m in model.modules() if isinstance(m, (torch.nn.Dropout, torch.nn.Dropout2d))]
    assert rates == pytest.approx([0.3 * scale, 0.2 * scale])


def test_cpu_cifar_preset_is_cpu_demo_on_the_shared_cifar_archive():
    demo, _ = config_from_args(["--preset", "cpu-demo"])
    cifar, _ = config_from_args(["--preset", "cpu-cifar"])
    assert cifar.data == f"imagefolder:{SHARED_CIFAR10}" and SHARED_CIFAR10.name == "cifar10-jpeg.tar.gz"
    assert dataclasses.replace(cifar, data=demo.data, preset="cpu-demo") == demo


def test_four_stage_run_writes_metrics_checkpoints_and_curves(tiny_folder, tmp_path, capsys):
    summary = main(["--preset", "cpu-demo", "--data", f"imagefolder:{tiny_folder}", "--width", "0.125",
                    "--epochs", "2,1,1,1", "--batch-size", "16", "--workers", "0", "--out", str(tmp_path / "runs"),
                    "--name", "t", "--cache-dir", str(tmp_path / "cache")])
    run = tmp_path / "runs" / "t"
    assert (tmp_path / "runs" / "latest").resolve() == run.resolve()
    rows = list(csv.reader(open(run / "metrics.csv")))
    assert rows[0][:10] == ["stage", "epoch", "lr", "mixup_alpha", "train_loss", "train_acc", "val_loss",
                            "val_acc", "images_per_s", "seconds"]
    body = rows[1:]
    assert [r[0] for r in body] == ["pretraining", "pretraining", "finetuning1", "finetuning2", "finetuning3"]
    assert [float(r[3]) for r in body] == [0.1, 0.1, 0.2, 0.5, 0.3]
    assert all(0 <= float(r[5]) <= 1 and 0 <= float(r[7]) <= 1 for r in body)
    col = {name: i for i, name in enumerate(rows[0])}
    elapsed = [float(r[col["elapsed_s"]]) for r in body]
    assert all(b > a for a, b in zip(elapsed, elapsed[1:]))
    # 10 classes x 6 train images, batch 16, last partial batch dropped: 48 images per epoch
    assert [int(r[col["images_seen"]]) for r in body] == [48 * k for k in range(1, 6)]
    for s in STAGES:
        ckpt = torch.load(run / f"{s.name}-best.pt", weights_only=False)
        assert set(ckpt["model"]) and ckpt["config"]["preset"] == "cpu-demo"
    assert (run / "last.pt").exists() and (run / "config.json").exists()
    png = (run / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert not list(run.glob(".*.tmp"))
    out = capsys.readouterr().out
    assert "best val acc" in out and summary["best_val_acc"] == max(float(r[7]) for r in body)


def test_target_acc_stops_the_run_and_reports_time_images_and_loader(tiny_folder, tmp_path, capsys):
    summary = main(["--preset", "cpu-demo", "--data", f"imagefolder:{tiny_folder}", "--width", "0.125",
                    "--epochs", "3,1,1,1", "--batch-size", "16", "--workers", "0", "--target-acc", "0.05",
                    "--out", str(tmp_path / "runs"), "--name", "t", "--cache-dir", str(tmp_path / "cache")])
    with open(tmp_path / "runs" / "t" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1                          # 5% is reached after the first epoch: no more training
    reached = summary["time_to_target"]
    assert reached["at"] == "pretraining epoch 1" and reached["images"] == int(rows[0]["images_seen"]) == 48
    assert reached["seconds"] == pytest.approx(float(rows[0]["elapsed_s"]), rel=1e-5) and reached["seconds"] > 0
    assert summary["loader"] == "torchvision"
    assert "reached 5.00% in" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--loader", "nope"], "unknown loader 'nope'"),
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--data", "mnist:/x"], "unknown data source"),
    (["--data", "imagefolder:/no/such/dir"], "is not a directory"),
    (["--width", "1.0", "--max-params", "1000"], "over --max-params 1,000"),
    (["--stages", "pretrain"], "unknown stage"),
    (["--batch-size", "many"], "--batch-size 'many': expected int"),
    (["--size", "16"], "--size 16: must be >= 32"),
])
def test_bad_input_is_one_line_exit_2(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(args + ["--out", str(tmp_path), "--cache-dir", str(tmp_path / "cache"), "--workers", "0"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_bad_dataset_layout_from_the_command_line(tmp_path):
    """An empty class folder: --strict is the one-line error; by default the class is
    dropped from both splits, reported, and the run trains on the rest."""
    root = tmp_path / "d"
    for split in ("train", "val"):
        (root / split / "a").mkdir(parents=True)
        (root / split / "c").mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (i * 90, 0, 0)).save(root / split / "a" / f"{i}.png")
            Image.new("RGB", (8, 8), (0, 0, 90 + i)).save(root / split / "c" / f"{i}.png")
    (root / "train" / "b").mkdir()
    (root / "val" / "b").mkdir()
    common = ("-m", "engine.train", "--data", f"imagefolder:{root}", "--out", str(tmp_path / "runs"),
              "--cache-dir", str(tmp_path / "cache"), "--workers", "0")
    r = run_cli(*common, "--strict", timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: --strict: 2 bad item(s)") and "empty class folder" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli(*common, "--name", "ok", "--stages", "pretraining", "--epochs", "1", "--batch-size", "2",
                "--width", "0.125", timeout=300)
    assert r.returncode == 0, r.stderr
    assert "data: skipped 2 bad item(s)" in r.stdout
    report = json.loads((tmp_path / "runs" / "ok" / "data_report.json").read_text())
    assert report["count"] == 2 and report["dropped_classes"] == ["b"]
    assert sorted(i["path"] for i in report["items"]) == [str(root.resolve() / s / "b") for s in ("train", "val")]
    assert json.loads((tmp_path / "runs" / "ok" / "config.json").read_text())["classes"] == ["a", "c"]


def test_config_file_is_layered_under_the_command_line(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("preset: cpu-demo\nbatch_size: 32\nepochs: [3, 1, 0, 0]\nwidth: 0.5\ncompile: off\n"
                 "aug:\n  rotate_degrees: 5\nno_aug: [perspective]\n")
    cfg, _ = config_from_args(["--config", str(f), "--width", "0.125"])
    assert (cfg.batch_size, cfg.epochs, cfg.width, cfg.compile) == (32, (3, 1, 0, 0), 0.125, "off")
    assert cfg.aug["rotate_degrees"] == 5.0 and cfg.aug["translate_frac"] == 0.1     # preset's aug kept
    assert cfg.no_aug == ("perspective",)
    (tmp_path / "bad.yaml").write_text("batch_sise: 3\n")
    with pytest.raises(ConfigError, match="unknown key 'batch_sise'"):
        config_from_args(["--config", str(tmp_path / "bad.yaml")])
    with pytest.raises(ConfigError, match="cannot read it"):
        config_from_args(["--config", str(tmp_path / "missing.yaml")])


def test_tensorboard_events_hold_the_metrics_scalars(tiny_folder, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install -e .[tensorboard])")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    main(["--data", f"imagefolder:{tiny_folder}", "--width", "0.125", "--epochs", "2,0,0,0", "--batch-size", "8",
          "--workers", "0", "--amp", "off", "--log", "tensorboard", "--out", str(tmp_path / "runs"), "--name", "tb",
          "--cache-dir", str(tmp_path / "cache")])
    ev = EventAccumulator(str(tmp_path / "runs" / "tb" / "tensorboard"))
    ev.Reload()
    tags = set(ev.Tags()["scalars"])
    assert {"train/train_loss", "val/val_acc", "run/lr", "run/data_wait_frac", "run/images_per_s"} <= tags
    rows = list(csv.DictReader(open(tmp_path / "runs" / "tb" / "metrics.csv")))
    got = [e.value for e in ev.Scalars("val/val_acc")]
    assert got == pytest.approx([float(r["val_acc"]) for r in rows])
