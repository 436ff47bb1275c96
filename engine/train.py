"""`python -m engine.train`: the report's four-stage schedule on any loader.

    python -m engine.train --preset cpu-demo                 # what `make train` runs
    python -m engine.train --preset seed --data imagefolder:/data/cifar10 --loader dali

Writes runs/<name>/ (runs/latest points at the newest): config.json, metrics.csv,
<stage>-best.pt, last.pt, curves.png. Bad input exits 2 with a one-line error.
"""
from __future__ import annotations

import copy
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

import kernels
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


def resolve_compile(name: str, device: torch.device) -> bool:
    """On by default on CUDA; off on CPU, where compile (~70 s for the seed model) buys ~1.2x."""
    if name not in ("auto", "on", "off"):
        raise ConfigError(f"--compile {name!r}: use auto, on or off")
    return device.type == "cuda" if name == "auto" else name == "on"


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
        self.use_compile = resolve_compile(cfg.compile, self.device)
        if cfg.kernels not in kernels.BACKENDS:
            raise ConfigError(f"--kernels {cfg.kernels!r}: use one of {', '.join(kernels.BACKENDS)}")
        kernels.set_backend(cfg.kernels)
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
        # Only the model is compiled: lr (optimizer param_groups) and MixUp alpha live outside
        # the graph, so changing them between epochs and stages never recompiles.
        mode = None if cfg.compile_mode == "default" or cfg.compile_backend != "inductor" else cfg.compile_mode
        self.net = (torch.compile(self.model, backend=cfg.compile_backend, mode=mode, dynamic=False)
                    if self.use_compile else self.model)
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
            logits = self.net(x)
        loss = F.cross_entropy(logits.float(), y_soft, label_smoothing=self.cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(opt)
        self.scaler.update()
        return logits.detach(), loss.detach()

    def train_epoch(self, opt, stage: Stage, mixup, step0: int, total: int, desc: str):
        """One epoch. Metrics accumulate on the device and are read once at the end (and every
        log_every steps for the progress bar): no per-step host sync."""
        self.model.train()
        loss_sum, correct = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        bar = tqdm(total=len(self.train_loader), desc=desc, leave=False, dynamic_ncols=True,
                   disable=self.rank != 0 or not sys.stderr.isatty())
        t0, step, seen, wait = time.perf_counter(), step0, 0, 0.0
        batches = iter(self.train_loader)
        while True:
            t_wait = time.perf_counter()
            try:
                x, y = next(batches)
            except StopIteration:
                break
            wait += time.perf_counter() - t_wait
            for g in opt.param_groups:
                g["lr"] = cosine_lr(stage, step, total)
            x_mix, y_soft = mixup(x, y) if mixup else (x, F.one_hot(y, self.data.num_classes).float())
            logits, loss = self.train_step(opt, x_mix, y_soft)
            loss_sum += loss * y.shape[0]
            correct += (logits.argmax(1) == y).sum()
            step, seen = step + 1, seen + y.shape[0]
            bar.update()
            if step % self.cfg.log_every == 0 and not bar.disable:
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}",
                                img_s=f"{seen / (time.perf_counter() - t0):.0f}")
        bar.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        return dict(train_loss=loss_sum.item() / seen, train_acc=correct.item() / seen, images_per_s=seen / seconds,
                    seconds=seconds, data_wait_frac=wait / seconds, images=seen), step

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation loss/accuracy, and with --tta the mean of the logits of x and its mirror."""
        self.model.eval()
        sums = torch.zeros(3, device=self.device)
        n = 0
        for x, y in self.val_loader:
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                logits = self.net(x).float()
                tta = (logits + self.net(x.flip(3)).float()) / 2 if self.cfg.tta else logits
            sums += torch.stack([F.cross_entropy(logits, y, reduction="sum"), (logits.argmax(1) == y).sum(),
                                 (tta.argmax(1) == y).sum()])
            n += y.shape[0]
        s = sums.tolist()
        out = dict(val_loss=s[0] / n, val_acc=s[1] / n)
        if self.cfg.tta:
            out["val_acc_tta"] = s[2] / n
        return out

    def warm_up_compile(self) -> float:
        """Compile every graph the run needs (train step, eval at full and ragged batch, TTA)
        on random batches before any timing, then restore the weights: compile time is
        reported on its own, never mixed into throughput or time-to-accuracy."""
        if not self.use_compile:
            return 0.0
        t0 = time.perf_counter()
        state = copy.deepcopy(self.model.state_dict())
        s, b = self.spec.size, self.cfg.batch_size
        make = lambda n: torch.randn(n, 3, s, s, device=self.device).to(  # noqa: E731
            self.amp or torch.float32, memory_format=torch.channels_last)
        self.model.train()
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            self.net(make(b)).float().sum().backward()
        self.model.zero_grad(set_to_none=True)
        self.evaluate_shapes = {b, len(self.data.val) % b or b}
        self.model.eval()
        with torch.no_grad(), torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            for n in self.evaluate_shapes:
                x = make(n)
                self.net(x)
                if self.cfg.tta:
                    self.net(x.flip(3))
        self.model.load_state_dict(state)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def run(self) -> dict:
        cfg, t_start = self.cfg, time.perf_counter()
        compile_s = self.warm_up_compile()
        graphs_after_warmup = compile_count()
        best_overall, epoch_global, prev_best = (0.0, None), 0, None
        elapsed, images, reached = 0.0, 0, None          # elapsed: train + eval, compile excluded
        for si, (stage, epochs) in enumerate(self.plan):
            if prev_best is not None:       # each stage starts from the previous stage's best
                self.model.load_state_dict(torch.load(prev_best, map_location=self.device)["model"])
            opt = torch.optim.AdamW(self.model.parameters(), lr=stage.lr_start, weight_decay=cfg.weight_decay,
                                    **({"fused": True} if self.device.type == "cuda" else {"foreach": True}))
            mixup = v2.MixUp(alpha=stage.mixup_alpha, num_classes=self.data.num_classes) if stage.mixup_alpha > 0 else None
            total, step, best = epochs * len(self.train_loader), 0, -1.0
            best_path = self.out / f"{stage.name}-best.pt"
            for epoch in range(epochs):
                self.train_loader.set_epoch(epoch_global)
                lr = cosine_lr(stage, step, total)
                train, step = self.train_epoch(opt, stage, mixup, step, total, f"{stage.name} {epoch + 1}/{epochs}")
                t_eval = time.perf_counter()
                val = self.evaluate()
                elapsed += train["seconds"] + time.perf_counter() - t_eval
                images += train.pop("images")
                row = dict(stage=stage.name, epoch=epoch + 1, lr=lr, mixup_alpha=stage.mixup_alpha,
                           train_loss=train["train_loss"], train_acc=train["train_acc"], val_loss=val["val_loss"],
                           val_acc=val["val_acc"], images_per_s=train["images_per_s"], seconds=train["seconds"],
                           data_wait_frac=train["data_wait_frac"], **({"val_acc_tta": val["val_acc_tta"]} if cfg.tta else {}))
                self.rows.append(row)
                epoch_global += 1
                va = val["val_acc"]
                if self.rank == 0:
                    write_csv(self.rows, self.out / "metrics.csv")
                    state = dict(model=self.model.state_dict(), optimizer=opt.state_dict(), stage=si,
                                 epoch=epoch + 1, rows=self.rows, config=asdict(cfg))
                    if va > best:
                        save_checkpoint(best_path, **state)
                    save_checkpoint(self.out / "last.pt", **state)
                    tta = f" (tta {val['val_acc_tta']:.4f})" if cfg.tta else ""
                    tqdm.write(f"{stage.name} {epoch + 1}/{epochs}  lr {lr:.2e}  train loss {train['train_loss']:.4f} "
                               f"acc {train['train_acc']:.4f}  val loss {val['val_loss']:.4f} acc {va:.4f}{tta}  "
                               f"{train['images_per_s']:.0f} img/s  data wait {train['data_wait_frac']:.0%}")
                best = max(best, va)
                if va > best_overall[0]:
                    best_overall = (va, f"{stage.name} epoch {epoch + 1}")
                if cfg.target_acc and va >= cfg.target_acc and reached is None:
                    reached = dict(seconds=elapsed, images=images, at=f"{stage.name} epoch {epoch + 1}")
                    break
            prev_best = best_path
            if reached:
                break
        if self.rank == 0 and self.rows:
            plot_curves(self.rows, self.out / "curves.png", title=f"{cfg.model} on {cfg.data} ({cfg.loader})")
        summary = dict(best_val_acc=best_overall[0], best_at=best_overall[1], wall_s=time.perf_counter() - t_start,
                       train_eval_s=elapsed, compile_s=compile_s,
                       compiles_after_warmup=graphs_after_warmup, compiles_at_end=compile_count(), images=images,
                       loader=cfg.loader, run=str(self.out))
        if cfg.target_acc:
            summary["time_to_target"] = reached
        if self.rank == 0:
            atomic_write(self.out / "summary.json", json.dumps(summary, indent=2))
            target = ""
            if cfg.target_acc:
                target = (f" | reached {cfg.target_acc:.2%} in {reached['seconds']:.1f} s, {reached['images']:,} images "
                          f"({cfg.loader})" if reached else f" | target {cfg.target_acc:.2%} not reached")
            compiled = f", compile {compile_s:.1f} s" if self.use_compile else ""
            print(f"best val acc {best_overall[0]:.4f} ({best_overall[1]}) | wall {summary['wall_s']:.1f} s "
                  f"(train+eval {elapsed:.1f} s{compiled}){target} | "
                  f"{self.params:,} params | run {self.out}", flush=True)
        return summary


def compile_count() -> int:
    """Graphs torch.compile has produced in this process (dynamo's unique_graphs counter)."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


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
