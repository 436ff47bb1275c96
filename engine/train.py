"""`python -m engine.train`: the report's four-stage schedule on any loader.

    python -m engine.train --preset cpu-demo                 # what `make train` runs
    python -m engine.train --preset seed --data imagefolder:/data/cifar10 --loader dali

Writes runs/<name>/ (runs/latest points at the newest): config.json, metrics.csv,
<stage>-best.pt, last.pt, curves.png. Bad input exits 2 with a one-line error.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from tqdm import tqdm

from engine.config import Config, Stage, config_from_args
from engine.metrics import plot_curves, write_csv
from engine.models import build_model, count_params
from loaders.base import LoaderOptions, build_loader, dist_rank_world
from loaders.datasets import load_dataset
from loaders.fsutil import ConfigError, atomic_path, atomic_write


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device here; use --device cpu or auto")
    return dev


def resolve_amp(name: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA by default; off on CPU (no native bf16 here: ~10x slower)."""
    table = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if name not in table:
        raise ConfigError(f"--amp {name!r}: use auto, bf16, fp16 or off")
    return table[name]


def cosine_lr(stage: Stage, step: int, total: int) -> float:
    """lr annealed from stage.lr_start to stage.lr_end over the stage's steps."""
    t = min(step / max(total - 1, 1), 1.0)
    return stage.lr_end + (stage.lr_start - stage.lr_end) * 0.5 * (1 + math.cos(math.pi * t))


def save_checkpoint(path: Path, **state) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.amp = resolve_amp(cfg.amp, self.device)
        self.rank, self.world = dist_rank_world()
        self.spec = cfg.spec()
        self.plan = cfg.stage_plan()
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model, passthrough=cfg.passthrough or None, width=cfg.width)
        n = count_params(self.model)
        if n > cfg.max_params:
            raise ConfigError(f"model {cfg.model} (width {cfg.width}) has {n:,} parameters, over "
                              f"--max-params {cfg.max_params:,}; lower --width or raise --max-params")
        self.params = n
        self.data = load_dataset(cfg.data, cfg.cache_dir)
        if self.data.num_classes != 10:
            self.model = build_model(cfg.model, passthrough=cfg.passthrough or None, width=cfg.width,
                                     num_classes=self.data.num_classes)
        self.model.to(self.device, memory_format=torch.channels_last)
        dtype = self.amp or torch.float32
        common = dict(device=self.device, dtype=dtype, seed=cfg.seed, rank=self.rank,
                      world_size=self.world, workers=cfg.workers)
        self.train_loader = build_loader(cfg.loader, self.data.train, self.spec,
                                         LoaderOptions(train=True, batch_size=cfg.batch_size, **common))
        self.val_loader = build_loader(cfg.loader, self.data.val, self.spec,
                                       LoaderOptions(train=False, batch_size=cfg.batch_size, **common))
        if len(self.train_loader) == 0:
            raise ConfigError(f"--batch-size {cfg.batch_size} is larger than the {len(self.data.train)} "
                              "training images; lower it")
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp is torch.float16)
        name = cfg.name or f"{cfg.preset}-{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.out = Path(cfg.out) / name
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write(self.out / "config.json", json.dumps(
            {**asdict(cfg), "params": n, "spec": self.spec.to_dict(), "device": str(self.device),
             "amp": str(self.amp), "classes": list(self.data.classes)}, indent=2, default=str))
        _point_latest(self.out)
        self.rows: list[dict] = []

    # --- the whole training step, on one screen -------------------------------------------
    def train_step(self, opt, x, y_soft):
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            logits = self.model(x)
        loss = F.cross_entropy(logits.float(), y_soft, label_smoothing=self.cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(opt)
        self.scaler.update()
        return logits.detach(), loss.detach()

    def train_epoch(self, opt, stage: Stage, mixup, step0: int, total: int, desc: str):
        self.model.train()
        sums = torch.zeros(3, device=self.device)        # loss*n, correct, n: read once per epoch
        bar = tqdm(self.train_loader, desc=desc, leave=False, dynamic_ncols=True,
                   disable=self.rank != 0 or not sys.stderr.isatty() and os.environ.get("CI") == "true")
        t0, step = time.perf_counter(), step0
        for i, (x, y) in enumerate(bar):
            for g in opt.param_groups:
                g["lr"] = cosine_lr(stage, step, total)
            x_mix, y_soft = mixup(x, y) if mixup else (x, F.one_hot(y, self.data.num_classes).float())
            logits, loss = self.train_step(opt, x_mix, y_soft)
            n = y.shape[0]
            sums += torch.stack([loss * n, (logits.argmax(1) == y).sum().float(), torch.tensor(float(n), device=self.device)])
            step += 1
            if (i + 1) % self.cfg.log_every == 0:
                s = sums.tolist()
                bar.set_postfix(loss=f"{s[0] / s[2]:.3f}", acc=f"{s[1] / s[2]:.3f}",
                                img_s=f"{s[2] / (time.perf_counter() - t0):.0f}")
        s = sums.tolist()
        seconds = time.perf_counter() - t0
        return s[0] / s[2], s[1] / s[2], s[2] / seconds, seconds, step

    @torch.no_grad()
    def evaluate(self):
        self.model.eval()
        sums = torch.zeros(3, device=self.device)
        for x, y in self.val_loader:
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                logits = self.model(x).float()
            sums += torch.stack([F.cross_entropy(logits, y, reduction="sum"),
                                 (logits.argmax(1) == y).sum().float(), torch.tensor(float(y.shape[0]), device=self.device)])
        s = sums.tolist()
        return s[0] / s[2], s[1] / s[2]

    def run(self) -> dict:
        cfg, t_start = self.cfg, time.perf_counter()
        best_overall, epoch_global, prev_best = (0.0, None), 0, None
        for si, (stage, epochs) in enumerate(self.plan):
            if prev_best is not None:       # each stage starts from the previous stage's best
                self.model.load_state_dict(torch.load(prev_best, map_location=self.device)["model"])
            opt = torch.optim.AdamW(self.model.parameters(), lr=stage.lr_start,
                                    weight_decay=cfg.weight_decay,
                                    fused=self.device.type == "cuda", foreach=None if self.device.type == "cuda" else True)
            mixup = v2.MixUp(alpha=stage.mixup_alpha, num_classes=self.data.num_classes) if stage.mixup_alpha > 0 else None
            total, step, best = epochs * len(self.train_loader), 0, -1.0
            best_path = self.out / f"{stage.name}-best.pt"
            for epoch in range(epochs):
                self.train_loader.set_epoch(epoch_global)
                lr = opt.param_groups[0]["lr"] if step else stage.lr_start
                tl, ta, ips, secs, step = self.train_epoch(opt, stage, mixup, step, total,
                                                           f"{stage.name} {epoch + 1}/{epochs}")
                vl, va = self.evaluate()
                row = dict(stage=stage.name, epoch=epoch + 1, lr=lr, mixup_alpha=stage.mixup_alpha,
                           train_loss=tl, train_acc=ta, val_loss=vl, val_acc=va, images_per_s=ips,
                           seconds=secs)
                self.rows.append(row)
                epoch_global += 1
                if self.rank == 0:
                    write_csv(self.rows, self.out / "metrics.csv")
                    state = dict(model=self.model.state_dict(), optimizer=opt.state_dict(), stage=si,
                                 epoch=epoch + 1, rows=self.rows, config=asdict(cfg))
                    if va > best:
                        best = va
                        save_checkpoint(best_path, **state)
                    save_checkpoint(self.out / "last.pt", **state)
                    tqdm.write(f"{stage.name} {epoch + 1}/{epochs}  lr {lr:.2e}  train loss {tl:.4f} acc {ta:.4f}  "
                               f"val loss {vl:.4f} acc {va:.4f}  {ips:.0f} img/s")
                if va > best_overall[0]:
                    best_overall = (va, f"{stage.name} epoch {epoch + 1}")
            prev_best = best_path
        wall = time.perf_counter() - t_start
        if self.rank == 0 and self.rows:
            plot_curves(self.rows, self.out / "curves.png", title=f"{cfg.model} on {cfg.data} ({cfg.loader})")
        summary = dict(best_val_acc=best_overall[0], best_at=best_overall[1], wall_s=wall, run=str(self.out))
        if self.rank == 0:
            print(f"best val acc {best_overall[0]:.4f} ({best_overall[1]}) | wall {wall:.1f} s | "
                  f"{self.params:,} params | run {self.out}", flush=True)
        return summary


def _point_latest(run_dir: Path) -> None:
    """runs/latest -> run_dir, swapped atomically."""
    link = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest.{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(run_dir.name)
    os.replace(tmp, link)


def main(argv=None) -> dict:
    try:
        cfg, _ = config_from_args(argv)
        return Trainer(cfg).run()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
