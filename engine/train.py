"""`python -m engine.train`: the report's four-stage schedule on any loader.

    python -m engine.train --preset cpu-demo                 # what `make train` runs
    python -m engine.train --preset seed --data imagefolder:/data/cifar10 --loader dali
    python -m engine.train --resume runs/NAME                # continue a killed run
    torchrun --nproc_per_node=4 -m engine.train --preset seed --data ...   # DDP

This module is the CLI and the run's orchestration: checks that read nothing, then the data,
the engine (engine/step.py) and the loaders, then the stages (each starts from the previous
stage's best weights with a fresh AdamW), the best and last checkpoints, resume, and the
summary. The step is engine/step.py, the epoch loop engine/loop.py.

Writes runs/<name>/ (runs/latest points at the newest): config.json, metrics.csv,
<stage>-best.pt, last.pt (+ prev.pt), curves.png, data_report.json, summary.json. Bad input
exits 2 with a one-line error; a run stopped by non-finite losses exits 3; SIGTERM/SIGINT
checkpoint and exit 128+signal.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from tqdm import tqdm

import kernels
from engine import budget, distributed
from engine.checkpoint import Position, Progress, load_resumable, rng_state, save_checkpoint, save_rotating, set_rng_state
from engine.config import Config, Stage, config_from_args
from engine.loop import (BadSteps, EpochSetup, EpochSums, Hooks, NonFiniteError, eval_batch_sizes, evaluate,
                         train_epoch, warm_up_compile)
from engine.memory import check_fits
from engine.metrics import TensorBoardLog, plot_curves, write_csv
from engine.models import build_model, count_params
from engine.precision import (ThreadTuner, amp_name, compile_count, configure_threads, resolve_amp,
                              resolve_compile, resolve_device, thread_candidates)
from engine.rundir import RunFolder, check_writable
from engine.signals import StopFlag, Stopped, stop_on_signals
from engine.step import build_engine, train_step
from loaders.base import LoaderOptions, build_loader, loader_class
from loaders.common import ConfigError, atomic_write
from loaders.datasets import load_dataset


def cosine_lr(stage: Stage, step: int, total: int, warmup: int = 0) -> float:
    """lr annealed from stage.lr_start to stage.lr_end over the stage's steps, after a linear
    warm-up over the first `warmup` steps (if any)."""
    if step < warmup:
        return stage.lr_start * (step + 1) / warmup
    t = min((step - warmup) / max(total - warmup - 1, 1), 1.0)
    return stage.lr_end + (stage.lr_start - stage.lr_end) * 0.5 * (1 + math.cos(math.pi * t))


class Trainer:
    """One run. Everything that can be checked without data is checked first (flags, device,
    kernels, the resume state, the output folder, the memory a step needs); then the data is
    read, the engine and loaders built and the run folder created."""

    def __init__(self, cfg: Config, hooks: Hooks | None = None):
        self.cfg, self.hooks, self.stop = cfg, hooks or Hooks(), StopFlag()
        self.t_created = time.perf_counter()                 # the --budget clock starts here
        self.steal_at_start = budget.host_steal_seconds()
        self.budget_s = budget.parse_duration(cfg.budget) if cfg.budget else 0.0
        launched = distributed.launched_world()
        self.device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")) if launched > 1 else None)
        self._check_kernels()
        if cfg.log == "tensorboard":
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                raise ConfigError("--log tensorboard needs the tensorboard package: pip install -e .[tensorboard]") from None
        if cfg.sync_bn and launched > 1 and self.device.type != "cuda":
            raise ConfigError("--sync-bn needs CUDA (torch's SyncBatchNorm has no CPU implementation); "
                              "drop --sync-bn on CPU")
        loader_class(cfg.loader)                     # a bad --loader fails before the data is read
        self.resume_state = self.resume_path = None
        if cfg.resume:
            self.resume_state, self.resume_path = load_resumable(Path(cfg.resume))
        else:
            check_writable(Path(cfg.out))
        self.rank, self.world = distributed.init_distributed(self.device)
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
        self.threads = configure_threads(self.device, self.local_world, cfg.workers)
        self.thread_tuner = ThreadTuner(thread_candidates(self.device, self.local_world, cfg.workers,
                                                          cfg.deterministic))
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        # one precision on every rank ("auto" on CPU is a timing probe that could differ)
        self.amp = distributed.from_rank0(resolve_amp(cfg.amp, self.device), self.world)
        self.use_compile = resolve_compile(cfg.compile, self.device)
        if cfg.sync_bn and self.world > 1 and self.rank == 0:
            print("note: --sync-bn: torch's SyncBatchNorm synchronises the host once per BatchNorm layer "
                  "per step", flush=True)
        kernels.set_backend(cfg.kernels)
        self.spec, self.plan = cfg.spec(), cfg.stage_plan()
        self.weights = [e for _, e in self.plan]             # --budget keeps these proportions
        self._epoch_times: list[float] = []                  # --budget: measured epoch wall times
        torch.manual_seed(cfg.seed)
        probe = build_model(cfg.model, passthrough=cfg.passthrough or None, width=cfg.width)
        self.params = count_params(probe)
        if self.params > cfg.max_params:
            raise ConfigError(f"model {cfg.model} (width {cfg.width}) has {self.params:,} parameters, over "
                              f"--max-params {cfg.max_params:,}; lower --width or raise --max-params")
        self.memory_estimate = check_fits(probe, self.spec.size, cfg.batch_size, self.amp, self.device,
                                          self.local_world)
        # --- the data, the engine, the loaders -------------------------------------------
        self.data = load_dataset(cfg.data, cfg.cache_dir, strict=cfg.strict, workers=cfg.ingest_workers)
        self._check_data()
        torch.manual_seed(cfg.seed)                  # the same initial weights as before the probe
        self.engine = build_engine(cfg, self.data.num_classes, self.device, self.amp, world=self.world,
                                   use_compile=self.use_compile,
                                   state=self.resume_state["model"] if self.resume_state else None)
        self.model = self.engine.model
        common = dict(device=self.device, dtype=self.amp or torch.float32, seed=cfg.seed, rank=self.rank,
                      world_size=self.world, workers=cfg.workers, shuffle_buffer=cfg.shuffle_buffer)
        self.train_loader = build_loader(cfg.loader, self.data.train, self.spec,
                                         LoaderOptions(train=True, batch_size=cfg.batch_size, **common))
        self.val_loader = build_loader(cfg.loader, self.data.val, self.spec,
                                       LoaderOptions(train=False, batch_size=cfg.batch_size, **common))
        if len(self.train_loader) == 0:
            per_rank = f" ({len(self.data.train) // self.world} per rank)" if self.world > 1 else ""
            raise ConfigError(f"--batch-size {cfg.batch_size} is larger than the {len(self.data.train)} "
                              f"training images{per_rank}; lower it")
        self.folder = RunFolder(self._run_path(), self.rank)
        self.out = self.folder.path
        self.folder.create()
        if self.resume_state is None:
            self.folder.write("config.json", lambda: atomic_write(self.out / "config.json", json.dumps(
                {**asdict(cfg), "params": self.params, "spec": self.spec.to_dict(), "device": str(self.device),
                 "amp": str(self.amp), "classes": list(self.data.classes), "world_size": self.world,
                 "threads": self.threads, "config": asdict(cfg)}, indent=2, default=str)))
        self.folder.point_latest()
        self.tb = TensorBoardLog(self.out / "tensorboard") if cfg.log == "tensorboard" and self.rank == 0 else None
        if self.rank == 0:
            self._report_data()
        self.rows: list[dict] = []
        self.prog = Progress()
        self.bad = BadSteps(self.device, cfg.max_bad_steps)

    # --- setup checks -------------------------------------------------------------------------
    def _check_kernels(self) -> None:
        if self.cfg.kernels not in kernels.BACKENDS:
            raise ConfigError(f"--kernels {self.cfg.kernels!r}: use one of {', '.join(kernels.BACKENDS)}")
        if self.cfg.kernels == "triton" and self.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ConfigError("--kernels triton on cpu needs the Triton interpreter (TRITON_INTERPRET=1, slow); "
                              "use --kernels auto or torch on cpu")

    def _check_data(self) -> None:
        d = self.data
        if d.num_classes < 2:
            raise ConfigError(f"--data {self.cfg.data}: {d.num_classes} class(es) found "
                              f"({', '.join(d.classes) or 'none'}); a classifier needs at least 2 class folders")
        if self.resume_state is not None:
            st = self.resume_state
            if list(st["classes"]) != list(d.classes):
                raise ConfigError(f"--resume {self.cfg.resume}: the dataset's classes changed since the run "
                                  f"started ({len(st['classes'])} then, {d.num_classes} now: "
                                  f"{', '.join(d.classes)[:80]}); resume with the same data or start a new run")
            if st["data_fingerprint"] != d.fingerprint:
                raise ConfigError(f"--resume {self.cfg.resume}: the files of --data {self.cfg.data} changed since "
                                  "the run started (its epochs would not be the ones it planned); restore them "
                                  "or start a new run")

    def _run_path(self) -> Path:
        cfg = self.cfg
        name = cfg.name or f"{cfg.preset}-{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"
        return Path(cfg.out) / distributed.from_rank0(name, self.world)   # rank 0's timestamp everywhere

    def _report_data(self) -> None:
        """The dataset summary, and the bad-data report: printed once (a summary line and the
        first paths) and saved as data_report.json with every path and its reason."""
        d, rep = self.data, self.data.report()
        path = self.out / "data_report.json"
        self.folder.write(path.name, lambda: atomic_write(path, json.dumps(
            dict(source=self.cfg.data, count=len(rep), dropped_classes=list(d.dropped_classes), items=rep),
            indent=2)))
        print(f"data: {self.cfg.data}: {d.num_classes} classes, {len(d.train):,} train and {len(d.val):,} val "
              f"images kept, {len(rep)} skipped", flush=True)
        if not rep:
            return
        kinds = Counter(r["reason"].split(" (")[0].split(":")[0] for r in rep)
        print(f"data: skipped {len(rep)} bad item(s) in {self.cfg.data} ("
              + ", ".join(f"{k} x{v}" for k, v in kinds.most_common()) + f"); full list: {path}", flush=True)
        for r in rep[:10]:
            print(f"  {r['path']}: {r['reason']}", flush=True)
        if len(rep) > 10:
            print(f"  ... and {len(rep) - 10} more", flush=True)

    # --- checkpoints -----------------------------------------------------------------------------
    def _state(self, opt, position: Position, partial: EpochSums | None = None) -> dict:
        """The resumable state; every rank must call it (it gathers per-rank RNG states)."""
        ranks = distributed.gather(dict(rng=rng_state(), partial=None if partial is None else asdict(partial)),
                                    self.world)
        return dict(config=asdict(self.cfg), position=asdict(position), world=self.world,
                    progress={**self.prog.to_dict(),
                              "budget_spent": self.prog.budget_spent + time.perf_counter() - self.t_created},
                    rows=list(self.rows), classes=list(self.data.classes),
                    data_fingerprint=self.data.fingerprint,
                    model=self.model.state_dict(), optimizer=opt.state_dict() if opt is not None else None,
                    scaler=self.engine.scaler.state_dict(), ranks=ranks)

    def _save_last(self, state: dict) -> bool:
        return self.folder.write("last.pt", lambda: save_rotating(self.out, state), essential=True)

    def _restore(self) -> tuple[Position, EpochSums | None]:
        """(position, this rank's partial-epoch sums) from the resume state, RNG restored."""
        st = self.resume_state
        pos = Position(**st["position"])
        ranks = st["ranks"]
        if pos.batch and len(ranks) != self.world:
            raise ConfigError(f"--resume {self.cfg.resume}: the checkpoint was written inside an epoch by "
                              f"{len(ranks)} process(es); resume with the same number (now {self.world})")
        mine = ranks[self.rank] if self.rank < len(ranks) else ranks[0]
        set_rng_state(mine["rng"])
        self.prog = Progress.from_dict(st["progress"])
        self.rows = list(st["rows"])
        if self.rank == 0:
            where = (f"stage {pos.stage + 1}/{len(self.plan)} epoch {pos.epoch + 1} batch {pos.batch}"
                     if pos.stage < len(self.plan) else "the end (the run had finished)")
            print(f"resuming {self.out} from {self.resume_path.name} at {where}", flush=True)
        partial = mine["partial"] if pos.batch else None
        return pos, (EpochSums(**partial) if partial else None)

    def _previous_best(self, si: int) -> dict:
        """The best weights of the last stage before si that ran: from memory when this process
        trained it, else from its <stage>-best.pt (a resumed run)."""
        prev = max(j for j in range(si) if self.plan[j][1] > 0)     # stages planned at 0 epochs are skipped
        if self._best is not None and self._best[0] == prev:
            return self._best[1]
        path = self.out / f"{self.plan[prev][0].name}-best.pt"
        try:
            return torch.load(path, map_location=self.device, weights_only=False)["model"]
        except (OSError, RuntimeError, KeyError, EOFError) as e:
            raise ConfigError(f"cannot start stage {self.plan[si][0].name}: {path} is missing or unreadable "
                              f"({type(e).__name__}); it holds the previous stage's best weights") from None

    # --- the run ------------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg, eng, t_start = self.cfg, self.engine, time.perf_counter()
        val_rank = len(range(self.rank, len(self.data.val), self.world))    # the evaluation sharding rule
        compile_s = warm_up_compile(eng, self.spec.size, cfg.batch_size, eval_batch_sizes(val_rank, cfg.batch_size),
                                    cfg.tta)
        graphs_after_warmup = compile_count()
        self._best = None                 # (planned stage index, state dict) of the running stage's best
        pos, partial = Position(), None
        if self.resume_state is not None:
            pos, partial = self._restore()
        P = self.prog
        n_batches = len(self.train_loader)
        if self.budget_s:
            self._plan_budget(n_batches)
        with stop_on_signals(self.stop, self.world):
            for si, (stage, _) in enumerate(self.plan):
                if si < pos.stage or P.reached or self.plan[si][1] == 0:
                    continue
                fresh = not (si == pos.stage and (pos.epoch or pos.batch))
                if fresh:
                    if any(self.plan[j][1] for j in range(si)):   # each stage starts from the previous stage's best
                        self.model.load_state_dict(self._previous_best(si))
                    P.stage_step, P.stage_best = 0, -1.0
                opt = eng.optimizer(stage.lr_start)
                if not fresh:
                    opt.load_state_dict(self.resume_state["optimizer"])
                    eng.scaler.load_state_dict(self.resume_state["scaler"])
                mixup = v2.MixUp(alpha=stage.mixup_alpha, num_classes=self.data.num_classes) \
                    if stage.mixup_alpha > 0 else None
                # the warm-up keeps its length (a shorter one let the scaled-up lr stall training
                # near chance), at most half of a stage a budget shortened
                warm = min(stage.warmup_epochs, self.plan[si][1] / 2) if self.budget_s else stage.warmup_epochs
                warmup = round(warm * n_batches)
                epoch = 0 if fresh else pos.epoch
                while epoch < self.plan[si][1]:              # a budget re-plan may change the count
                    t_epoch = time.perf_counter()
                    epochs = self.plan[si][1]
                    total = epochs * n_batches
                    start = pos.batch if (not fresh and epoch == pos.epoch) else 0
                    step0 = P.stage_step - start
                    lr = cosine_lr(stage, step0, total, warmup)        # the row's lr: the epoch's first
                    setup = EpochSetup(
                        opt=opt, lr=lambda s, st=stage, n=total: cosine_lr(st, s, n, warmup), mixup=mixup,
                        num_classes=self.data.num_classes, desc=f"{stage.name} {epoch + 1}/{epochs}",
                        epoch=P.epoch_global, step0=step0, start_batch=start, partial=partial if start else None,
                        log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
                        checkpoint=lambda *a, si=si, e=epoch: self._checkpoint_mid(opt, si, e, *a),
                        last_good=str(self.out / "last.pt"), stop=self.stop, hooks=self.hooks, show_bar=self.rank == 0,
                        threads=self.thread_tuner)
                    train, P.global_step = train_epoch(eng, self.train_loader, setup, self.bad, P.global_step)
                    P.stage_step = step0 + n_batches
                    partial = None
                    t_eval = time.perf_counter()
                    val = evaluate(eng, self.val_loader, cfg.tta)
                    if self.budget_s:
                        self._replan_budget(si, epoch, time.perf_counter() - t_epoch)
                    self._end_epoch(si, stage, epoch, opt, lr, train, val, time.perf_counter() - t_eval)
                    if P.reached:
                        break
                    epoch += 1
        if self.rank == 0 and self.rows:
            self.folder.write("curves.png", lambda: plot_curves(
                self.rows, self.out / "curves.png", title=f"{cfg.model} on {cfg.data} ({cfg.loader})"))
        if self.tb is not None:
            self.tb.close()
        if self.hooks.run_end:
            self.hooks.run_end(self.model)
        return self._summary(t_start, compile_s, graphs_after_warmup)

    # --- the time budget ------------------------------------------------------------------------
    def _budget_left(self) -> float:
        spent = self.prog.budget_spent + time.perf_counter() - self.t_created
        return budget.usable_seconds(self.budget_s) - spent

    def _set_plan(self, epochs: list[int], why: str) -> None:
        epochs = distributed.from_rank0(epochs, self.world)
        self.plan = [(stage, e) for (stage, _), e in zip(self.plan, epochs)]
        self.prog.plan = list(epochs)
        if self.rank == 0:
            print(f"budget {self.cfg.budget}: {why}; plan " + ", ".join(
                f"{s.name} {e}" for s, e in self.plan) + f" epochs ({self._budget_left():.0f} s left)", flush=True)

    def _plan_budget(self, n_batches: int) -> None:
        """The first plan (or the saved one on resume), from a timed probe of the step."""
        if self.prog.plan is not None:
            self.plan = [(stage, e) for (stage, _), e in zip(self.plan, self.prog.plan)]
            return
        step_s = self._probe_step_seconds()
        val_batches = -(-len(range(self.rank, len(self.data.val), self.world)) // self.cfg.batch_size)
        epoch_s = n_batches * step_s + val_batches * step_s / 3          # evaluation: forward only
        self._epoch_s = epoch_s
        self._set_plan(budget.plan(self.weights, epoch_s, self._budget_left()),
                       f"a step takes {step_s * 1e3:.0f} ms, an epoch about {epoch_s:.1f} s")

    def _replan_budget(self, si: int, epoch: int, epoch_s: float) -> None:
        """Re-plan from the measured epoch time when the projection moved by more than the margin."""
        self._epoch_times.append(epoch_s)
        self._epoch_s = sum(self._epoch_times) / len(self._epoch_times)
        done = [e if i < si else (epoch + 1 if i == si else 0) for i, (_, e) in enumerate(self.plan)]
        new = budget.replan([e for _, e in self.plan], done, self.weights, self._epoch_s, self._budget_left())
        if new is not None:
            self._set_plan(new, f"an epoch takes {self._epoch_s:.1f} s")

    def _probe_step_seconds(self) -> float:
        """Seconds per training step, timed on random data (weights, statistics and RNG restored)."""
        import copy
        eng = self.engine
        state = copy.deepcopy(self.model.state_dict())
        x = torch.randn(self.cfg.batch_size, 3, self.spec.size, self.spec.size, device=self.device)
        y = F.one_hot(torch.arange(self.cfg.batch_size, device=self.device) % self.data.num_classes,
                      self.data.num_classes).float()
        opt, times = eng.optimizer(0.0), []
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            for i in range(5):
                t0 = time.perf_counter()
                train_step(eng, opt, x, y)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                if i >= 2:                                  # the first steps allocate
                    times.append(time.perf_counter() - t0)
        self.model.load_state_dict(state)
        return distributed.from_rank0(sorted(times)[len(times) // 2], self.world)

    def _checkpoint_mid(self, opt, si: int, epoch: int, batch: int, stage_step: int, global_step: int,
                        sums: EpochSums) -> bool:
        if self.bad.in_streak():            # inside a run of skipped steps: keep the last good one
            return False
        self.prog.stage_step, self.prog.global_step = stage_step, global_step
        state = self._state(opt, Position(si, epoch, batch), sums)
        return self._save_last(state) if self.rank == 0 else True

    def _end_epoch(self, si, stage, epoch, opt, lr, train, val, eval_s) -> None:
        cfg, P = self.cfg, self.prog
        epochs = self.plan[si][1]
        P.elapsed += train["seconds"] + eval_s
        P.images += train.pop("images")
        row = dict(stage=stage.name, epoch=epoch + 1, lr=lr, mixup_alpha=stage.mixup_alpha,
                   train_loss=train["train_loss"], train_acc=train["train_acc"], val_loss=val["val_loss"],
                   val_acc=val["val_acc"], images_per_s=train["images_per_s"], seconds=train["seconds"],
                   data_wait_frac=train["data_wait_frac"], skipped_steps=train["skipped_steps"],
                   # the run's clock (train + eval, compile excluded) and images so far:
                   # time to any accuracy can be read off a finished run
                   elapsed_s=P.elapsed, images_seen=P.images,
                   **({"val_acc_tta": val["val_acc_tta"]} if cfg.tta else {}))
        self.rows.append(row)
        P.epoch_global += 1
        va = val["val_acc"]
        improved = va > P.stage_best
        if improved:
            P.stage_best = va
            self._best = (si, {k: v.detach().clone() for k, v in self.model.state_dict().items()})
        if va > P.best_acc:
            P.best_acc, P.best_at = va, f"{stage.name} epoch {epoch + 1}"
        if cfg.target_acc and va >= cfg.target_acc and P.reached is None:
            P.reached = dict(seconds=P.elapsed, images=P.images, at=f"{stage.name} epoch {epoch + 1}")
        done = epoch + 1 == epochs or P.reached
        state = self._state(opt, Position(si + 1, 0, 0) if done else Position(si, epoch + 1, 0))
        if self.rank != 0:
            return
        self.folder.write("metrics.csv", lambda: write_csv(self.rows, self.out / "metrics.csv"))
        if self.tb is not None:
            self.tb.add_row(row, P.epoch_global)
        if improved:
            best_path = self.out / f"{stage.name}-best.pt"
            self.folder.write(best_path.name, lambda: save_checkpoint(
                best_path, model=self._best[1], optimizer=opt.state_dict(), stage=si, epoch=epoch + 1,
                rows=self.rows, config=asdict(cfg), classes=list(self.data.classes)), essential=True)
        self._save_last(state)
        if self.stop:
            raise Stopped(self.stop.signum, f"at the end of {stage.name} epoch {epoch + 1}: "
                          f"checkpointed there ({self.out / 'last.pt'})")
        tta = f" (tta {val['val_acc_tta']:.4f})" if cfg.tta else ""
        skipped = f"  skipped {train['skipped_steps']} non-finite step(s)" if train["skipped_steps"] else ""
        tqdm.write(f"{stage.name} {epoch + 1}/{epochs}  lr {lr:.2e}  train loss {train['train_loss']:.4f} "
                   f"acc {train['train_acc']:.4f}  val loss {val['val_loss']:.4f} acc {va:.4f}{tta}  "
                   f"{train['images_per_s']:.0f} img/s  data wait {train['data_wait_frac']:.0%}{skipped}")

    def _summary(self, t_start: float, compile_s: float, graphs_after_warmup: int) -> dict:
        cfg, P = self.cfg, self.prog
        summary = dict(best_val_acc=P.best_acc, best_at=P.best_at, wall_s=time.perf_counter() - t_start,
                       train_eval_s=P.elapsed, compile_s=compile_s, compiles_after_warmup=graphs_after_warmup,
                       compiles_at_end=compile_count(), images=P.images, loader=cfg.loader, run=str(self.out),
                       amp=amp_name(self.amp), threads=torch.get_num_threads(), resumed=self.resume_state is not None)
        if cfg.target_acc:
            summary["time_to_target"] = P.reached
        steal = budget.host_steal_seconds()
        if steal is not None and self.steal_at_start is not None:
            # the share of this machine's CPU time (all cores) the host took during this process
            cpu_s = (time.perf_counter() - self.t_created) * (os.cpu_count() or 1)
            summary.update(host_steal_s=steal - self.steal_at_start,
                           host_steal_frac=(steal - self.steal_at_start) / max(cpu_s, 1e-9))
        if self.budget_s:
            used = P.budget_spent + time.perf_counter() - self.t_created
            summary.update(budget_s=self.budget_s, budget_used_s=used, plan=P.plan)
        if self.rank == 0:
            self.folder.write("summary.json", lambda: atomic_write(self.out / "summary.json",
                                                                  json.dumps(summary, indent=2)))
            target = ""
            if cfg.target_acc:
                r = P.reached
                target = (f" | reached {cfg.target_acc:.2%} in {r['seconds']:.1f} s, {r['images']:,} images "
                          f"({cfg.loader})" if r else f" | target {cfg.target_acc:.2%} not reached")
            compiled = f", compile {compile_s:.1f} s" if self.use_compile else ""
            # After a resume this process's wall clock covers only its own part; train+eval is the run's.
            wall = "this process" if self.resume_state is not None else "wall"
            spent = (f" | budget {cfg.budget}: used {summary['budget_used_s']:.0f} s "
                     f"({summary['budget_used_s'] / self.budget_s:.0%})" if self.budget_s else "")
            if summary.get("host_steal_frac", 0) >= budget.STEAL_NOTE:
                spent += (f" | the VM's host took {summary['host_steal_frac']:.0%} of the CPU time "
                          f"(steal {summary['host_steal_s']:.0f} s): this machine ran slower than it can")
            print(f"best val acc {P.best_acc:.4f} ({P.best_at}) | train+eval {P.elapsed:.1f} s "
                  f"({wall} {summary['wall_s']:.1f} s{compiled}){target}{spent} | "
                  f"{self.params:,} params | run {self.out}", flush=True)
        return summary


def main(argv=None, hooks: Hooks | None = None) -> dict:
    trainer = None
    try:
        cfg, _ = config_from_args(argv)
        trainer = Trainer(cfg, hooks)
        return trainer.run()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(3) from None
    except Stopped as e:
        print(f"{e}; continue with: python -m engine.train --resume {trainer.out}", file=sys.stderr)
        raise SystemExit(128 + e.signum) from None
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
