"""`python -m engine.train`: the report's four-stage schedule on any loader.

    python -m engine.train --preset cpu-demo                 # what `make train` runs
    python -m engine.train --preset seed --data imagefolder:/data/cifar10 --loader dali
    python -m engine.train --resume runs/NAME                # continue a killed run
    torchrun --nproc_per_node=4 -m engine.train --preset seed --data ...   # DDP

Writes runs/<name>/ (runs/latest points at the newest): config.json, metrics.csv,
<stage>-best.pt, last.pt (+ prev.pt), curves.png, data_report.json, summary.json. Bad input
exits 2 with a one-line error; a run stopped by non-finite losses exits 3.

Reliability:
- Resume. `last.pt` is written at every epoch end (the stage end included) and every
  `--checkpoint-every N` steps inside an epoch, rotated with `prev.pt`
  (engine/checkpoint.py). `--resume runs/NAME` restores the run's own config (only
  config.RESUME_SAFE flags may be given to change how it runs), the position (stage, epoch,
  batch), model, optimizer, GradScaler, every rank's RNG states and partial-epoch metric
  sums, the metrics rows and the stage's best. The loaders make a batch a pure function of
  (seed, epoch, position), so resuming at batch k of an epoch (`set_epoch(epoch,
  start_batch=k)` where the loader has it, else by drawing and dropping k batches) gives the
  same batches as the uninterrupted run: on CPU with fixed threads the result is bitwise
  equal (tests/test_reliability.py).
- Non-finite steps. The optimizer is fused AdamW (CPU and CUDA); the step hands it a
  device-side `found_inf` (any non-finite gradient, or a non-finite loss) and the fused
  kernel then leaves weights, moments and step count untouched: no host sync. With fp16
  the GradScaler does the same from its own check. BatchNorm running statistics touched by
  such a step are put back with `torch.where` on the device. Skipped steps are counted on
  the device (`skipped_steps` column); the consecutive count is read every step on CPU and
  every `--log-every` steps on CUDA (the progress bar's read), and after `--max-bad-steps`
  in a row the run stops with a one-line message; no checkpoint is written during a
  streak, so last.pt is the last good state.
- torchrun. WORLD_SIZE > 1 initialises the process group (NCCL on CUDA, gloo on CPU); the
  model is wrapped in DDP (`--sync-bn`: SyncBatchNorm, CUDA only); every loader shards by
  rank (LoaderOptions.rank/world_size); train and validation sums are all-reduced once per
  epoch; only rank 0 writes files and draws progress bars.
- Limits. Before any data is read, the memory a step needs (weights, gradients, AdamW
  moments, and activations measured by one small forward and scaled to the batch and
  size) is compared with what the device has free (CPU: MemAvailable shared by the local
  ranks): too big is a one-line error naming both. A full disk while writing a checkpoint
  or metrics keeps the previous file (atomic rename) and says so; training goes on.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2
from tqdm import tqdm

import kernels
from engine.checkpoint import (load_resumable, rng_state, save_checkpoint, save_rotating,  # noqa: F401
                               set_rng_state)
from engine.config import Config, Stage, config_from_args
from engine.metrics import plot_curves, write_csv
from engine.models import MIN_SIZE, build_model, count_params
from loaders.base import LoaderOptions, build_loader, dist_rank_world, loader_class
from loaders.common import DISK_FULL, ConfigError, atomic_write, device_free_bytes
from loaders.datasets import load_dataset

_OWN_PROCESS_GROUP = False


class Stopped(Exception):
    """SIGTERM or SIGINT: the run checkpointed where it stood and stops; `--resume` continues."""

    def __init__(self, signum: int, where: str):
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}")
        self.signum = signum


@contextlib.contextmanager
def checkpoint_on_signals(trainer: "Trainer"):
    """While training, SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C) only set a flag:
    the step loop then checkpoints at the next step boundary and raises Stopped. A second
    signal acts at once. Single process only: under DDP the ranks would have to agree on
    the step (a collective per step), so torchrun runs keep the default handlers and rely
    on the epoch-end and `--checkpoint-every` checkpoints."""
    if trainer.world > 1 or threading.current_thread() is not threading.main_thread():
        yield
        return
    wanted = (signal.SIGTERM, signal.SIGINT)
    previous = {s: signal.getsignal(s) for s in wanted}

    def flag(signum, _frame):
        trainer.stop_signal = signum
        for s in wanted:                               # the next one is not deferred
            signal.signal(s, previous[s])
    for s in wanted:
        signal.signal(s, flag)
    try:
        yield
    finally:
        for s in wanted:
            signal.signal(s, previous[s])


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps; the message is one line."""


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """`local_rank` (torchrun): a CUDA device without an index becomes cuda:<local_rank>."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device here; use --device cpu or auto")
    if dev.type == "cuda" and dev.index is None and local_rank is not None:
        dev = torch.device("cuda", local_rank)
    return dev


def cpu_reports_bf16() -> bool:
    """Whether the CPU flags claim native bf16 (AVX512-BF16 or AMX)."""
    return getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or \
        getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()


@functools.lru_cache(maxsize=1)
def cpu_bf16_pays() -> bool:
    """Whether bf16 autocast beats float32 for a conv training step on this CPU.

    The CPU flags are not enough: one machine this was built on reports AVX512-BF16 and AMX
    (`torch.cpu._is_avx512_bf16_supported()`, `_is_amx_tile_supported()`) while bf16 convs
    run ~10x slower than float32 there (no usable native path under its hypervisor); another
    with the same flags runs them ~2x faster. So where the flags say yes, a ~0.2 s probe
    decides: conv fwd+bwd steps, bf16 and float32 interleaved, the fastest of each compared
    (contention from other processes only adds time, so the minimum is the stable figure)."""
    if not cpu_reports_bf16():
        return False
    with torch.random.fork_rng(devices=[]):       # the probe must not move the run's RNG
        conv = torch.nn.Conv2d(64, 64, 3, padding=1).to(memory_format=torch.channels_last)
        x = torch.randn(16, 64, 32, 32).to(memory_format=torch.channels_last)
    best = {torch.bfloat16: float("inf"), None: float("inf")}
    for i in range(6):
        for dtype in best:
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                conv(x).float().sum().backward()
            if i:                                 # the first call of each creates its primitives
                best[dtype] = min(best[dtype], time.perf_counter() - t0)
    return best[torch.bfloat16] < 0.9 * best[None]


AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def amp_name(dtype: torch.dtype | None) -> str:
    """The --amp name of a resolved autocast dtype ("off", "bf16", "fp16")."""
    return next(k for k, v in AMP_DTYPES.items() if v == dtype)


def resolve_amp(name: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA by default; on CPU only where bf16 measurably beats float32
    (`cpu_bf16_pays`); fp16 (with a gradient scaler) on request."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        return torch.bfloat16 if cpu_bf16_pays() else None
    if name not in AMP_DTYPES:
        raise ConfigError(f"--amp {name!r}: use auto, bf16, fp16 or off")
    return AMP_DTYPES[name]


def resolve_compile(name: str, device: torch.device) -> bool:
    """On by default on CUDA; off on CPU, where compile (~70 s for the seed model) buys ~1.2x."""
    if name not in ("auto", "on", "off"):
        raise ConfigError(f"--compile {name!r}: use auto, on or off")
    return device.type == "cuda" if name == "auto" else name == "on"


def cosine_lr(stage: Stage, step: int, total: int, warmup: int = 0) -> float:
    """lr annealed from stage.lr_start to stage.lr_end over the stage's steps, after a linear
    warm-up over the first `warmup` steps (if any)."""
    if step < warmup:
        return stage.lr_start * (step + 1) / warmup
    t = min((step - warmup) / max(total - warmup - 1, 1), 1.0)
    return stage.lr_end + (stage.lr_start - stage.lr_end) * 0.5 * (1 + math.cos(math.pi * t))


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world). Under torchrun (WORLD_SIZE > 1) initialises the default process group
    from the environment: NCCL on CUDA, gloo on CPU."""
    global _OWN_PROCESS_GROUP
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        _OWN_PROCESS_GROUP = True
    return dist_rank_world()


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def training_bytes(model: nn.Module, size: int, amp: torch.dtype | None) -> tuple[int, int]:
    """(bytes independent of the batch, bytes per image) a training step needs, estimated.

    Fixed: fp32 weights, gradients and AdamW's two moments (4 x params x 4 bytes). Per
    image: every leaf module's output (what autograd keeps for backward) counted by one
    forward of a single image at min(size, 32) px, scaled by (size/32)^2 (activations scale
    with pixels; the pooled head is negligible), x2 for the gradients alive during backward.
    The forward runs in eval mode without grad on the model's current device: no running
    statistics and no RNG are touched."""
    params = sum(p.numel() for p in model.parameters())
    s0 = min(size, 32)
    total = [0]

    def hook(_m, _i, out):
        if torch.is_tensor(out):
            total[0] += out.numel()

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    was_training = model.training
    try:
        model.eval()
        dev = next(model.parameters()).device
        with torch.no_grad():
            model(torch.zeros(1, 3, s0, s0, device=dev))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    elem = 2 if amp in (torch.bfloat16, torch.float16) else 4
    return 16 * params, int(2 * total[0] * (size / s0) ** 2 * elem)


class _SyncBNSiLU(nn.SyncBatchNorm):
    """SyncBatchNorm followed by SiLU: what a BNSiLU module becomes under --sync-bn (same
    parameter and buffer names, so checkpoints load either way)."""

    def forward(self, x):
        return F.silu(super().forward(x))


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """nn.SyncBatchNorm.convert_sync_batchnorm that keeps the fused BN+SiLU modules' SiLU."""
    if isinstance(module, kernels.BatchNormSiLU2d):
        new = _SyncBNSiLU(module.num_features, module.eps, module.momentum, module.affine,
                          module.track_running_stats)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new.to(next(module.parameters()).device)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child))
    return module


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")) if distributed else None)
        self.rank, self.world = init_distributed(self.device)
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        self.amp = resolve_amp(cfg.amp, self.device)
        if self.world > 1:       # one precision on every rank ("auto" on CPU is a timing probe)
            box = [self.amp]
            dist.broadcast_object_list(box, src=0)
            self.amp = box[0]
        self.spec = cfg.spec()
        self.plan = cfg.stage_plan()
        self.use_compile = resolve_compile(cfg.compile, self.device)
        if cfg.kernels not in kernels.BACKENDS:
            raise ConfigError(f"--kernels {cfg.kernels!r}: use one of {', '.join(kernels.BACKENDS)}")
        kernels.set_backend(cfg.kernels)
        if cfg.sync_bn and self.world > 1 and self.device.type != "cuda":
            raise ConfigError("--sync-bn needs CUDA (torch's SyncBatchNorm has no CPU implementation); "
                              "drop --sync-bn on CPU")
        loader_class(cfg.loader)                # a bad --loader fails before the data is read
        self.resume_state = None
        if cfg.resume:
            self.resume_state, self.resume_path = load_resumable(Path(cfg.resume))
        if cfg.size < MIN_SIZE:
            raise ConfigError(f"--size {cfg.size} is too small: the models halve the image five times; "
                              f"use --size {MIN_SIZE} or more")
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model, passthrough=cfg.passthrough or None, width=cfg.width)
        n = count_params(self.model)
        if n > cfg.max_params:
            raise ConfigError(f"model {cfg.model} (width {cfg.width}) has {n:,} parameters, over "
                              f"--max-params {cfg.max_params:,}; lower --width or raise --max-params")
        self.params = n
        self.check_fits()
        self.data = load_dataset(cfg.data, cfg.cache_dir, strict=cfg.strict)
        if self.data.num_classes != 10:
            self.model = build_model(cfg.model, passthrough=cfg.passthrough or None, width=cfg.width,
                                     num_classes=self.data.num_classes)
        self.model.to(self.device, memory_format=torch.channels_last)
        if self.resume_state is not None:
            self.model.load_state_dict(self.resume_state["model"])
        if cfg.sync_bn and self.world > 1:
            self.model = convert_sync_batchnorm(self.model)
        self.bn_buffers = [b for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                           for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
        self._bn_backup = [torch.empty_like(b) for b in self.bn_buffers]
        train_module = self.model
        if self.world > 1:
            train_module = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.ddp = train_module if self.world > 1 else None
        # Only the model is compiled: lr (optimizer param_groups) and MixUp alpha live outside
        # the graph, so changing them between epochs and stages never recompiles.
        mode = None if cfg.compile_mode == "default" or cfg.compile_backend != "inductor" else cfg.compile_mode
        compile_ = (lambda m: torch.compile(m, backend=cfg.compile_backend, mode=mode, dynamic=False)) \
            if self.use_compile else (lambda m: m)
        self.net = compile_(train_module)                       # the training step's callable
        # Evaluation runs the bare module (no DDP hooks or collectives: ranks' validation
        # shards may differ by one batch).
        self.eval_net = self.net if self.world == 1 else compile_(self.model)
        dtype = self.amp or torch.float32
        common = dict(device=self.device, dtype=dtype, seed=cfg.seed, rank=self.rank,
                      world_size=self.world, workers=cfg.workers)
        self.train_loader = build_loader(cfg.loader, self.data.train, self.spec,
                                         LoaderOptions(train=True, batch_size=cfg.batch_size, **common))
        self.val_loader = build_loader(cfg.loader, self.data.val, self.spec,
                                       LoaderOptions(train=False, batch_size=cfg.batch_size, **common))
        if len(self.train_loader) == 0:
            per_rank = f" ({len(self.data.train) // self.world} per rank)" if self.world > 1 else ""
            raise ConfigError(f"--batch-size {cfg.batch_size} is larger than the {len(self.data.train)} "
                              f"training images{per_rank}; lower it")
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp is torch.float16)
        self.out = self._run_folder()
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.resume_state is None:
                atomic_write(self.out / "config.json", json.dumps(
                    {**asdict(cfg), "params": n, "spec": self.spec.to_dict(), "device": str(self.device),
                     "amp": str(self.amp), "classes": list(self.data.classes), "world_size": self.world,
                     "config": asdict(cfg)}, indent=2, default=str))
            _point_latest(self.out)
            self._report_data()
        self.rows: list[dict] = []
        self.global_step = 0
        self.last_bad = None
        self._ctx = None                  # set by run(): what a mid-epoch checkpoint needs
        self.stop_signal: int | None = None   # set by checkpoint_on_signals
        self._one = torch.ones((), device=self.device)
        self.bad_run = torch.zeros((), dtype=torch.int64, device=self.device)
        self.bad_max = torch.zeros((), dtype=torch.int64, device=self.device)
        self._nan_steps = frozenset(cfg.debug_nan_steps)
        self._warned: set[str] = set()

    # --- setup helpers ---------------------------------------------------------------------
    def check_fits(self) -> None:
        """Refuse, before any data is read, a batch that cannot fit the device."""
        fixed, per_image = training_bytes(self.model, self.spec.size, self.amp)
        need = fixed + self.cfg.batch_size * per_image
        have = int(device_free_bytes(self.device))
        shared = ""
        if self.device.type == "cpu" and self.local_world > 1:
            have //= self.local_world
            shared = f" (MemAvailable shared by {self.local_world} local ranks)"
        if need > have:
            raise ConfigError(
                f"--batch-size {self.cfg.batch_size} at --size {self.spec.size} does not fit on {self.device}: "
                f"a training step needs about {_fmt_bytes(need)} ({_fmt_bytes(fixed)} for weights, gradients "
                f"and AdamW state + {_fmt_bytes(per_image)} of activations per image x {self.cfg.batch_size}) "
                f"but {_fmt_bytes(have)} is available{shared}; lower --batch-size, --size or --width")
        self.memory_estimate = dict(need=need, have=have, per_image=per_image, fixed=fixed)

    def _run_folder(self) -> Path:
        cfg = self.cfg
        name = cfg.name or f"{cfg.preset}-{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"
        if self.world > 1:                   # the timestamp must be rank 0's on every rank
            box = [name]
            dist.broadcast_object_list(box, src=0)
            name = box[0]
        return Path(cfg.out) / name

    def _report_data(self) -> None:
        """The bad-data report: printed once (a summary line and the first paths) and saved
        as data_report.json with every path and its reason."""
        rep = self.data.report()
        path = self.out / "data_report.json"
        self._write("data_report.json", lambda: atomic_write(path, json.dumps(
            dict(source=self.cfg.data, count=len(rep), dropped_classes=list(self.data.dropped_classes),
                 items=rep), indent=2)))
        if not rep:
            return
        kinds = Counter(r["reason"].split(" (")[0].split(":")[0] for r in rep)
        print(f"data: skipped {len(rep)} bad item(s) in {self.cfg.data} ("
              + ", ".join(f"{k} x{v}" for k, v in kinds.most_common()) + f"); full list: {path}", flush=True)
        for r in rep[:10]:
            print(f"  {r['path']}: {r['reason']}", flush=True)
        if len(rep) > 10:
            print(f"  ... and {len(rep) - 10} more", flush=True)

    def _write(self, what: str, fn) -> bool:
        """Run a file write; a full disk keeps the previous file (atomic writes) and warns."""
        try:
            fn()
            return True
        except OSError as e:
            if e.errno not in DISK_FULL:
                raise
            msg = (f"warning: disk full writing {self.out / what} ({e.strerror}); the previous {what} is "
                   "intact and still usable; training goes on and retries at the next checkpoint")
            print(msg, file=sys.stderr, flush=True)
            return False

    def make_optimizer(self, stage: Stage) -> torch.optim.Optimizer:
        # Fused on CPU and CUDA: the fused kernel honours a device-side `found_inf`, which is
        # how a non-finite step is skipped without a host sync.
        return torch.optim.AdamW(self.model.parameters(), lr=stage.lr_start, weight_decay=self.cfg.weight_decay,
                                 fused=True)

    # --- the whole training step, on one screen -------------------------------------------
    def train_step(self, opt, x, y_soft):
        """One step. A non-finite loss or gradient leaves weights, optimizer state and
        BatchNorm statistics as they were; `self.last_bad` is that flag (a device tensor)."""
        if self.bn_buffers:
            torch._foreach_copy_(self._bn_backup, self.bn_buffers)
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            logits = self.net(x)
        loss = F.cross_entropy(logits.float(), y_soft, label_smoothing=self.cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        bad = ~torch.isfinite(loss)
        if not self.scaler.is_enabled() and opt.defaults.get("fused"):
            grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
            found = torch.zeros((), device=self.device)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found, self._one)
            if self.world == 1:
                # Under DDP the gradients are all-reduced, so their check alone is the same
                # decision on every rank (a non-finite loss anywhere makes them non-finite).
                found = torch.maximum(found, bad.float())
            bad = found > 0
            opt.found_inf = found
        self.scaler.step(opt)
        self.scaler.update()
        for b, old in zip(self.bn_buffers, self._bn_backup):
            b.copy_(torch.where(bad, old, b))
        self.last_bad = bad
        return logits.detach(), loss.detach()

    def lr_at(self, stage: Stage, step: int, total: int) -> float:
        return cosine_lr(stage, step, total, warmup=round(stage.warmup_epochs * len(self.train_loader)))

    def _epoch_batches(self, start_batch: int):
        """An iterator over this epoch's batches from `start_batch` (resume): the loader's own
        `set_epoch(epoch, start_batch=k)` when it has one, else the first k drawn and dropped."""
        loader = self.train_loader
        if start_batch:
            epoch = getattr(self, "_loader_epoch", 0)
            if "start_batch" in inspect.signature(loader.set_epoch).parameters:
                loader.set_epoch(epoch, start_batch=start_batch)
                return iter(loader)
            it = iter(loader)
            for _ in range(start_batch):
                next(it)
            return it
        return iter(loader)

    def train_epoch(self, opt, stage: Stage, mixup, step0: int, total: int, desc: str,
                    start_batch: int = 0, partial: dict | None = None):
        """One epoch (from batch `start_batch`, with `partial`'s sums when resuming). Metrics
        accumulate on the device and are read once at the end (and every log_every steps for
        the progress bar and the bad-step check on CUDA): no per-step host sync."""
        self.model.train()
        cfg, dev = self.cfg, self.device
        acc = torch.zeros(4, device=dev)       # loss sum, correct, images in good steps, skipped steps
        seen0, sec0, wait0 = 0, 0.0, 0.0
        if partial:
            acc.copy_(partial["acc"])
            seen0, sec0, wait0 = partial["seen"], partial["seconds"], partial["wait"]
        n_batches = len(self.train_loader)
        bar = tqdm(total=n_batches, initial=start_batch, desc=desc, leave=False, dynamic_ncols=True,
                   disable=self.rank != 0 or not sys.stderr.isatty())
        check_every = 1 if dev.type == "cpu" else max(1, cfg.log_every)
        record = [] if cfg.record_samples else None
        t0, step, seen, wait, b = time.perf_counter(), step0, 0, 0.0, start_batch
        batches = self._epoch_batches(start_batch)
        while True:
            t_wait = time.perf_counter()
            try:
                x, y = next(batches)
            except StopIteration:
                break
            wait += time.perf_counter() - t_wait
            for g in opt.param_groups:
                g["lr"] = self.lr_at(stage, step, total)
            if self.global_step in self._nan_steps:      # test hook: a poisoned batch
                x = x * float("nan")
            x_mix, y_soft = mixup(x, y) if mixup else (x, F.one_hot(y, self.data.num_classes).float())
            logits, loss = self.train_step(opt, x_mix, y_soft)
            bad = self.last_bad
            good = (~bad).float()
            # Train accuracy against each mixed image's dominant label (MixUp's lam ~ Beta(a, a)
            # is mostly near 0 or 1, so half the batches are mostly the *other* image).
            acc += torch.stack([torch.where(bad, 0.0, loss * y.shape[0]),
                                (logits.argmax(1) == y_soft.argmax(1)).sum() * good, good * y.shape[0], 1 - good])
            self.bad_run = (self.bad_run + 1) * bad
            self.bad_max = torch.maximum(self.bad_max, self.bad_run)
            if record is not None:
                record.append(y.cpu())
            step, seen, b = step + 1, seen + y.shape[0], b + 1
            self.global_step += 1
            bar.update()
            if b % check_every == 0:
                self._check_bad_steps(stage, desc, b)
            if b % cfg.log_every == 0 and not bar.disable:
                s = acc.tolist()
                bar.set_postfix(loss=f"{s[0] / max(s[2], 1):.3f}", acc=f"{s[1] / max(s[2], 1):.3f}",
                                img_s=f"{seen / (time.perf_counter() - t0):.0f}")
            if cfg.debug_step_sleep:
                time.sleep(cfg.debug_step_sleep)
            stop = self.stop_signal is not None
            if self._ctx is not None and b < n_batches and (
                    stop or cfg.checkpoint_every and b % cfg.checkpoint_every == 0):
                saved = self._checkpoint_mid(opt, b, step, dict(acc=acc.cpu(), seen=seen0 + seen,
                                                                seconds=sec0 + time.perf_counter() - t0,
                                                                wait=wait0 + wait))
                if stop:
                    raise Stopped(self.stop_signal, f"at {desc} batch {b}/{n_batches}: " + (
                        f"checkpointed there ({self.out / 'last.pt'})" if saved else
                        "inside a run of skipped steps, so the last good checkpoint was kept"))
        bar.close()
        self._check_bad_steps(stage, desc, b)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = sec0 + time.perf_counter() - t0
        wait += wait0
        images = seen0 + seen
        if self.world > 1:                    # one all-reduce of the device sums per epoch
            # BatchNorm statistics: each rank's last forward updated its own; DDP would
            # broadcast rank 0's at the next forward. Do it now, so that every rank evaluates
            # and ends with the same model.
            for buf in self.model.buffers():
                dist.broadcast(buf, 0)
            skipped = acc[3].clone()          # the same on every rank (DDP: one decision)
            dist.all_reduce(acc)
            acc[3] = skipped
            images *= self.world
        s = acc.tolist()
        if record is not None:
            self._record_epoch(torch.cat(record).tolist() if record else [], start_batch)
        return dict(train_loss=s[0] / max(s[2], 1), train_acc=s[1] / max(s[2], 1), images_per_s=images / seconds,
                    seconds=seconds, data_wait_frac=wait / seconds, images=images, skipped_steps=int(s[3])), step

    def _check_bad_steps(self, stage: Stage, desc: str, batch: int) -> None:
        k = self.cfg.max_bad_steps
        if int(self.bad_max) >= k:
            raise NonFiniteError(
                f"stopped: {int(self.bad_max)} consecutive steps with a non-finite loss or gradient "
                f"(--max-bad-steps {k}) in {desc} by batch {batch}; those steps were skipped, so no weight "
                f"is NaN, and the last good checkpoint is {self.out / 'last.pt'}; lower the lr (--lr-scale), "
                "check the data or --amp, then --resume")

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation loss/accuracy, and with --tta the mean of the logits of x and its mirror.
        Under torchrun each rank evaluates its shard and the sums are all-reduced."""
        self.model.eval()
        sums = torch.zeros(4, device=self.device, dtype=torch.float64)
        n = 0
        for x, y in self.val_loader:
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                logits = self.eval_net(x).float()
                tta = (logits + self.eval_net(x.flip(3)).float()) / 2 if self.cfg.tta else logits
            sums[:3] += torch.stack([F.cross_entropy(logits, y, reduction="sum"), (logits.argmax(1) == y).sum(),
                                     (tta.argmax(1) == y).sum()]).double()
            n += y.shape[0]
        sums[3] = n
        if self.world > 1:
            dist.all_reduce(sums)
        s = sums.tolist()
        n = max(s[3], 1)
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
                self.eval_net(x)
                if self.cfg.tta:
                    self.eval_net(x.flip(3))
        self.model.load_state_dict(state)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    # --- checkpoints ---------------------------------------------------------------------------
    def _gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def _state(self, opt, position: dict, partial: dict | None = None) -> dict:
        """The resumable state; every rank must call it (it gathers per-rank RNG states)."""
        ranks = self._gather(dict(rng=rng_state(), partial=partial))
        return dict(config=asdict(self.cfg), position=position, world=self.world, progress=copy.deepcopy(self.prog),
                    rows=list(self.rows), model=self.model.state_dict(),
                    optimizer=opt.state_dict() if opt is not None else None, scaler=self.scaler.state_dict(),
                    ranks=ranks)

    def _save_last(self, state: dict) -> None:
        if self.rank == 0:
            self._write("last.pt", lambda: save_rotating(self.out, state))

    def _checkpoint_mid(self, opt, batch: int, step: int, partial: dict) -> bool:
        if int(self.bad_run) > 0:          # inside a run of skipped steps: keep the last good one
            return False
        si, epoch = self._ctx
        self.prog.update(stage_step=step, global_step=self.global_step)
        self._save_last(self._state(opt, dict(stage=si, epoch=epoch, batch=batch), partial))
        return True

    def _record_epoch(self, labels: list, start_batch: int) -> None:
        """Test hook (--record-samples DIR): the sample indices and labels this rank was
        given in this epoch, one JSON file per rank and epoch."""
        loader, epoch = self.train_loader, getattr(self, "_loader_epoch", 0)
        idx = None
        indices = getattr(loader, "sample_indices", None) or getattr(loader, "rank_indices", None)
        if indices is not None:
            idx = [int(i) for i in indices(epoch)]
            skip = start_batch * self.cfg.batch_size
            idx = idx[skip: skip + len(labels)]
        d = Path(self.cfg.record_samples)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write(d / f"rank{self.rank}-epoch{epoch}.json",
                     json.dumps(dict(rank=self.rank, world=self.world, epoch=epoch, indices=idx, labels=labels)))

    def _restore(self) -> tuple[dict, dict | None]:
        """(position, this rank's partial-epoch sums) from the resume state, RNG restored."""
        st = self.resume_state
        pos = dict(st["position"])
        ranks = st["ranks"]
        if pos["batch"] and len(ranks) != self.world:
            raise ConfigError(f"--resume {self.cfg.resume}: the checkpoint was written inside an epoch by "
                              f"{len(ranks)} process(es); resume with the same number (now {self.world})")
        mine = ranks[self.rank] if self.rank < len(ranks) else ranks[0]
        set_rng_state(mine["rng"])
        self.prog = dict(st["progress"])
        self.rows = list(st["rows"])
        self.global_step = self.prog["global_step"]
        if self.rank == 0:
            where = (f"stage {pos['stage'] + 1}/{len(self.plan)} epoch {pos['epoch'] + 1} batch {pos['batch']}"
                     if pos["stage"] < len(self.plan) else "the end (the run had finished)")
            print(f"resuming {self.out} from {self.resume_path.name} at {where}", flush=True)
        return pos, (mine["partial"] if pos["batch"] else None)

    def _previous_best(self, si: int) -> dict:
        """The best weights of planned stage si-1: from memory when this process trained it,
        else from its <stage>-best.pt (a resumed run)."""
        if self._best is not None and self._best[0] == si - 1:
            return self._best[1]
        path = self.out / f"{self.plan[si - 1][0].name}-best.pt"
        try:
            return torch.load(path, map_location=self.device, weights_only=False)["model"]
        except (OSError, RuntimeError, KeyError, EOFError) as e:
            raise ConfigError(f"cannot start stage {self.plan[si][0].name}: {path} is missing or unreadable "
                              f"({type(e).__name__}); it holds the previous stage's best weights") from None

    # --- the run ----------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg, t_start = self.cfg, time.perf_counter()
        compile_s = self.warm_up_compile()
        graphs_after_warmup = compile_count()
        self._best = None                 # (planned stage index, state dict) of the running stage's best
        self.prog = dict(stage_step=0, stage_best=-1.0, best_overall=[0.0, None], elapsed=0.0, images=0,
                         reached=None, epoch_global=0, global_step=0)
        pos, partial = dict(stage=0, epoch=0, batch=0), None
        if self.resume_state is not None:
            pos, partial = self._restore()
        P = self.prog
        for si, (stage, epochs) in enumerate(self.plan):
            if si < pos["stage"] or P["reached"]:
                continue
            fresh = not (si == pos["stage"] and (pos["epoch"] or pos["batch"]))
            if fresh:
                if si > 0:                # each stage starts from the previous stage's best
                    self.model.load_state_dict(self._previous_best(si))
                P.update(stage_step=0, stage_best=-1.0)
            opt = self.make_optimizer(stage)
            if not fresh:
                opt.load_state_dict(self.resume_state["optimizer"])
                self.scaler.load_state_dict(self.resume_state["scaler"])
            mixup = v2.MixUp(alpha=stage.mixup_alpha, num_classes=self.data.num_classes) if stage.mixup_alpha > 0 else None
            total = epochs * len(self.train_loader)
            best_path = self.out / f"{stage.name}-best.pt"
            for epoch in range(0 if fresh else pos["epoch"], epochs):
                start = pos["batch"] if (not fresh and epoch == pos["epoch"]) else 0
                self._loader_epoch = P["epoch_global"]
                self.train_loader.set_epoch(P["epoch_global"])
                self._ctx = (si, epoch)
                lr = self.lr_at(stage, P["stage_step"] - start, total)      # the row's lr: the epoch's first
                train, P["stage_step"] = self.train_epoch(
                    opt, stage, mixup, P["stage_step"], total, f"{stage.name} {epoch + 1}/{epochs}",
                    start_batch=start, partial=partial if start else None)
                partial = None
                t_eval = time.perf_counter()
                val = self.evaluate()
                P["elapsed"] += train["seconds"] + time.perf_counter() - t_eval
                P["images"] += train.pop("images")
                row = dict(stage=stage.name, epoch=epoch + 1, lr=lr, mixup_alpha=stage.mixup_alpha,
                           train_loss=train["train_loss"], train_acc=train["train_acc"], val_loss=val["val_loss"],
                           val_acc=val["val_acc"], images_per_s=train["images_per_s"], seconds=train["seconds"],
                           data_wait_frac=train["data_wait_frac"], skipped_steps=train["skipped_steps"],
                           # the run's clock (train + eval, compile excluded) and images so far:
                           # time to any accuracy can be read off a finished run
                           elapsed_s=P["elapsed"], images_seen=P["images"],
                           **({"val_acc_tta": val["val_acc_tta"]} if cfg.tta else {}))
                self.rows.append(row)
                P["epoch_global"] += 1
                P["global_step"] = self.global_step
                va = val["val_acc"]
                improved = va > P["stage_best"]
                if improved:
                    P["stage_best"] = va
                    self._best = (si, {k: v.detach().clone() for k, v in self.model.state_dict().items()})
                if va > P["best_overall"][0]:
                    P["best_overall"] = [va, f"{stage.name} epoch {epoch + 1}"]
                if cfg.target_acc and va >= cfg.target_acc and P["reached"] is None:
                    P["reached"] = dict(seconds=P["elapsed"], images=P["images"], at=f"{stage.name} epoch {epoch + 1}")
                done = epoch + 1 == epochs or P["reached"]
                nxt = dict(stage=si + 1, epoch=0, batch=0) if done else dict(stage=si, epoch=epoch + 1, batch=0)
                state = self._state(opt, nxt)
                if self.rank == 0:
                    self._write("metrics.csv", lambda: write_csv(self.rows, self.out / "metrics.csv"))
                    if improved:
                        self._write(best_path.name, lambda: save_checkpoint(
                            best_path, model=self._best[1], optimizer=opt.state_dict(), stage=si, epoch=epoch + 1,
                            rows=self.rows, config=asdict(cfg)))
                    self._save_last(state)
                    if self.stop_signal is not None:
                        raise Stopped(self.stop_signal, f"at the end of {stage.name} epoch {epoch + 1}: "
                                      f"checkpointed there ({self.out / 'last.pt'})")
                    tta = f" (tta {val['val_acc_tta']:.4f})" if cfg.tta else ""
                    skipped = f"  skipped {train['skipped_steps']} non-finite step(s)" if train["skipped_steps"] else ""
                    tqdm.write(f"{stage.name} {epoch + 1}/{epochs}  lr {lr:.2e}  train loss {train['train_loss']:.4f} "
                               f"acc {train['train_acc']:.4f}  val loss {val['val_loss']:.4f} acc {va:.4f}{tta}  "
                               f"{train['images_per_s']:.0f} img/s  data wait {train['data_wait_frac']:.0%}{skipped}")
                if P["reached"]:
                    break
        self._ctx = None
        if self.rank == 0 and self.rows:
            self._write("curves.png", lambda: plot_curves(
                self.rows, self.out / "curves.png", title=f"{cfg.model} on {cfg.data} ({cfg.loader})"))
        if cfg.record_samples:
            torch.save({k: v.cpu() for k, v in self.model.state_dict().items()},
                       Path(cfg.record_samples) / f"weights-rank{self.rank}.pt")
        best_overall, reached = P["best_overall"], P["reached"]
        summary = dict(best_val_acc=best_overall[0], best_at=best_overall[1], wall_s=time.perf_counter() - t_start,
                       train_eval_s=P["elapsed"], compile_s=compile_s,
                       compiles_after_warmup=graphs_after_warmup, compiles_at_end=compile_count(), images=P["images"],
                       loader=cfg.loader, run=str(self.out))
        if cfg.target_acc:
            summary["time_to_target"] = reached
        if self.rank == 0:
            self._write("summary.json", lambda: atomic_write(self.out / "summary.json", json.dumps(summary, indent=2)))
            target = ""
            if cfg.target_acc:
                target = (f" | reached {cfg.target_acc:.2%} in {reached['seconds']:.1f} s, {reached['images']:,} images "
                          f"({cfg.loader})" if reached else f" | target {cfg.target_acc:.2%} not reached")
            compiled = f", compile {compile_s:.1f} s" if self.use_compile else ""
            print(f"best val acc {best_overall[0]:.4f} ({best_overall[1]}) | wall {summary['wall_s']:.1f} s "
                  f"(train+eval {P['elapsed']:.1f} s{compiled}){target} | "
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
    global _OWN_PROCESS_GROUP
    try:
        cfg, _ = config_from_args(argv)
        trainer = Trainer(cfg)
        with checkpoint_on_signals(trainer):
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
        if _OWN_PROCESS_GROUP and dist.is_initialized():
            dist.destroy_process_group()
            _OWN_PROCESS_GROUP = False


if __name__ == "__main__":
    main()
