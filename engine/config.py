"""Training configuration: presets as data, every field overridable from the CLI (timm-like).

`python -m engine.train --preset cpu-demo --epochs 2,1,1,1 --aug.rotate_degrees 15 --no-aug perspective`

The report's four-stage schedule (AdamW, lr annealed start -> end within each stage by a
cosine, each stage starting from the previous stage's best checkpoint with a fresh
optimizer):
  pretraining  lr 2e-4 -> 1e-5  MixUp alpha 0.1
  finetuning1  lr 1e-5 -> 5e-6  MixUp alpha 0.2
  finetuning2  lr 5e-6 -> 1e-6  MixUp alpha 0.5
  finetuning3  lr 5e-6 -> 1e-6  MixUp alpha 0.3
Weight decay is 0.05 (the report gives none; AdamW's 0.01 default under-regularises this
heavily-augmented 4M-parameter model less than the augmentation does, 0.05 is timm's
usual small-CNN choice).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

from loaders.common import ConfigError
from loaders.spec import AUGMENTATIONS, AugmentSpec


@dataclass(frozen=True)
class Stage:
    name: str
    lr_start: float
    lr_end: float
    mixup_alpha: float
    warmup_epochs: float = 0.0       # linear lr warm-up to lr_start, then the cosine


STAGES = (
    Stage("pretraining", 2e-4, 1e-5, 0.1),
    Stage("finetuning1", 1e-5, 5e-6, 0.2),
    Stage("finetuning2", 5e-6, 1e-6, 0.5),
    Stage("finetuning3", 5e-6, 1e-6, 0.3),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


@dataclass
class Config:
    preset: str = "seed"
    model: str = "seed_best"
    passthrough: str = ""            # "" = the model's default
    width: float = 1.0
    dropout: float = 1.0             # scales every dropout rate of the model (0: none; the report's: 1)
    data: str = "synthetic"
    loader: str = "torchvision"
    size: int = 128
    batch_size: int = 128
    epochs: tuple[int, ...] = (120, 20, 20, 20)   # one count per stage
    stages: str = "all"              # "all" or comma-separated stage names
    lr_scale: float = 1.0            # multiplies every stage's lr_start/lr_end
    weight_decay: float = 0.05
    label_smoothing: float = 0.0
    warmup_epochs: float = 0.0       # linear lr warm-up at the start of the first stage run (0: the report's)
    device: str = "auto"
    amp: str = "auto"                # auto | bf16 | fp16 | off
    compile: str = "auto"            # auto (on CUDA) | on | off
    compile_mode: str = "default"    # torch.compile mode: default, max-autotune-no-cudagraphs, ...
    compile_backend: str = "inductor"  # torch.compile backend (aot_eager: dynamo graphs without codegen)
    kernels: str = "auto"            # fused-op backend: auto (Triton on CUDA) | triton | torch
    tta: bool = False                # also report horizontal-flip test-time-augmented accuracy
    target_acc: float = 0.0          # stop when val accuracy reaches this (0 = run all stages)
    budget: str = ""                 # wall-clock budget ("4m", "90s", "1h30m"): sizes the stages' epochs
    log: str = ""                    # "tensorboard": also write TensorBoard events to <run>/tensorboard
    workers: int = 2
    shuffle_buffer: int = 1000       # --data webdataset: samples in each stream's shuffle buffer
    ingest_workers: int = 0          # processes ingesting a dataset folder (0: the usable cores)
    seed: int = 0
    max_params: int = 5_000_000
    out: str = "runs"
    name: str = ""
    cache_dir: str = ".cache"
    log_every: int = 20              # steps between progress-bar reads of the device metrics
    aug: dict = field(default_factory=dict)       # AugmentSpec overrides (not size)
    no_aug: tuple[str, ...] = ()     # augmentations switched off
    resume: str = ""                 # run folder to continue: --resume runs/NAME
    checkpoint_every: int = 0        # also checkpoint every N steps inside an epoch (0 = off)
    max_bad_steps: int = 20          # stop after this many consecutive non-finite steps
    strict: bool = False             # bad data (skipped files, empty class folders) is an error
    sync_bn: bool = False            # torchrun: SyncBatchNorm across ranks (CUDA)
    deterministic: bool = False      # torch.use_deterministic_algorithms (bitwise resume)

    def spec(self) -> AugmentSpec:
        try:
            spec = AugmentSpec(size=self.size, **self.aug)
        except TypeError as e:
            raise ConfigError(f"bad --aug override ({e}); fields: {', '.join(AugmentSpec.field_names())}") from None
        except ValueError as e:
            raise ConfigError(f"{e} (the preset's --aug values with yours on top); fix the --aug.FIELD flag") from None
        return spec.without(*self.no_aug) if self.no_aug else spec

    def stage_plan(self) -> list[tuple[Stage, int]]:
        """(stage, epochs) for the stages to run, lrs scaled."""
        wanted = STAGE_NAMES if self.stages == "all" else tuple(s for s in self.stages.split(",") if s)
        bad = [s for s in wanted if s not in STAGE_NAMES]
        if bad:
            raise ConfigError(f"unknown stage {bad}; use 'all' or names from {', '.join(STAGE_NAMES)}")
        if len(self.epochs) not in (1, len(STAGES)):
            raise ConfigError(f"--epochs takes 1 or {len(STAGES)} comma-separated counts, got {len(self.epochs)}")
        epochs = self.epochs * len(STAGES) if len(self.epochs) == 1 else self.epochs
        plan = [(dataclasses.replace(s, lr_start=s.lr_start * self.lr_scale, lr_end=s.lr_end * self.lr_scale), e)
                for s, e in zip(STAGES, epochs) if s.name in wanted and e > 0]
        if plan and self.warmup_epochs:
            plan[0] = (dataclasses.replace(plan[0][0], warmup_epochs=self.warmup_epochs), plan[0][1])
        return plan


# What `make train` runs: all four stages in <= 5 min on 2 CPU cores (`--budget 4m30s` sizes the
# epochs), >= 85% on the synthetic validation split. Width and resolution shrink (the full
# model trains at ~3 img/s on these CPUs); lrs scale x10 because ~10 epochs replace ~180.
# Every augmentation stays on, geometry magnitudes reduced: the report warns that a small
# model does not converge under too-hard augmentation (width 0.25, full spec: 22% val after
# 600 steps against 64% with these). Dropout off (the head's 0.3/0.2 are what the report's
# full-size model needed against overfitting; at this size and length they kept the first
# epochs near chance, 10-12% val after one epoch against 19-23% without). Half an epoch of
# lr warm-up. Measurements: docs/models.md.
_CPU_DEMO = dict(model="seed_best", width=0.25, size=32, batch_size=64, epochs=(14, 2, 1, 1), lr_scale=10.0,
                 warmup_epochs=0.5, dropout=0.0, workers=2,
                 aug=dict(rotate_degrees=15.0, translate_frac=0.1, perspective_p=0.25))
# The CIFAR-10 JPEG archive that ../shared/datasets holds beside a checkout (20k train, 10k test).
SHARED_CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpeg.tar.gz"

PRESETS: dict[str, dict] = {
    # The report's settings: seed_best (nodropout_concat + dense) at 128x128.
    "seed": dict(model="seed_best", width=1.0, size=128, batch_size=128, epochs=(120, 20, 20, 20)),
    "cpu-demo": _CPU_DEMO,
    # cpu-demo's recipe on real photographs at 32px: the time-to-accuracy row of the README.
    "cpu-cifar": {**_CPU_DEMO, "data": f"imagefolder:{SHARED_CIFAR10}"},
}


# What `--resume` lets the command line change: how the run is executed, not what it computes
# (a different --device or --compile changes float rounding, not the recipe). Anything else
# given with --resume must equal the run's value.
RESUME_SAFE = ("resume", "workers", "ingest_workers", "log_every", "checkpoint_every", "max_bad_steps", "device",
               "compile", "compile_mode", "compile_backend", "kernels", "cache_dir", "strict", "deterministic", "log")


def _parse_value(text: str, example, annotation: str = ""):
    if example == () and "int" in annotation:
        return tuple(int(v) for v in text.split(",") if v)
    if isinstance(example, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(text)
    if isinstance(example, tuple):
        return tuple(type(example[0])(v) for v in text.split(",") if v) if example else tuple(text.split(","))
    return type(example)(text)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as a one-line ConfigError instead of a usage dump."""

    def error(self, message: str):
        raise ConfigError(f"{message}; see {self.prog} --help")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m engine.train", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help=f"one of {', '.join(PRESETS)} (default cpu-demo)")
    defaults = Config()
    for f in fields(Config):
        if f.name in ("preset", "aug", "no_aug", "compile"):
            continue
        ex = getattr(defaults, f.name)
        switch = dict(nargs="?", const="true") if isinstance(ex, bool) else {}   # --strict == --strict true
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None,
                       help=f"default from the preset (base {ex!r})", **switch)
    for f in fields(AugmentSpec):
        if f.name != "size":
            p.add_argument(f"--aug.{f.name}", dest=f"aug.{f.name}", default=None,
                           help=f"augmentation spec override (default {f.default!r})")
    p.add_argument("--compile", dest="compile", nargs="?", const="on", default=None,
                   help="torch.compile the model: auto (default: on CUDA), on, off")
    p.add_argument("--no-compile", dest="compile", action="store_const", const="off")
    p.add_argument("--config", default=None, help="a YAML file of flags (field: value, aug: {field: value}), "
                   "layered over the preset and under the command line")
    p.add_argument("--no-aug", default=None,
                   help=f"comma-separated augmentations to switch off, or 'all' ({', '.join(AUGMENTATIONS)})")
    return p


def _tuples(v):
    """JSON lists back to the tuples the config uses."""
    if isinstance(v, list):
        return tuple(_tuples(x) for x in v)
    if isinstance(v, dict):
        return {k: _tuples(x) for k, x in v.items()}
    return v


def saved_config(run_dir: str | Path) -> Config:
    """The resolved Config a run folder was started with (its config.json)."""
    run = Path(run_dir)
    path = run / "config.json"
    if not path.is_file():
        raise ConfigError(f"--resume {run_dir}: no {path.name} there; pass a run folder (runs/NAME)")
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"--resume {run_dir}: {path} is unreadable ({e}); the run cannot be resumed") from None
    resolved_amp = saved.get("amp")             # what "auto" resolved to when the run started
    saved = saved.get("config", saved)          # faithful copy (older files: the top level)
    names = {f.name for f in fields(Config)}
    cfg = Config(**{k: _tuples(v) for k, v in saved.items() if k in names})
    pinned = {"None": "off", "torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(resolved_amp)
    if cfg.amp == "auto" and pinned:            # resume in the precision the run used
        cfg = dataclasses.replace(cfg, amp=pinned)
    return dataclasses.replace(cfg, out=str(run.resolve().parent), name=run.resolve().name, resume=str(run))


def config_file_args(argv: list[str]) -> list[str]:
    """The flags a `--config FILE` (YAML) stands for, to be parsed before the command line's own
    (so the command line wins): `batch_size: 64` -> --batch-size 64, `epochs: [14, 2, 1, 1]` ->
    --epochs 14,2,1,1, `aug: {rotate_degrees: 15}` -> --aug.rotate_degrees 15."""
    path = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"), None) or \
        next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if path is None:
        return []
    import yaml
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"--config {path}: cannot read it ({str(e).splitlines()[0]}); pass a YAML file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of flag: value, got {type(data).__name__}")
    known = {f.name for f in fields(Config)} | {"preset", "no_aug"}

    def text(key, v):
        if isinstance(v, bool):
            return ("on" if v else "off") if key == "compile" else str(v).lower()
        return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
    out = []
    for key, value in data.items():
        k = str(key).replace("-", "_")
        if k == "aug" and isinstance(value, dict):
            bad = [f for f in value if f not in AugmentSpec.field_names() or f == "size"]
            if bad:
                raise ConfigError(f"--config {path}: unknown aug field(s) {bad}; fields: "
                                  f"{', '.join(n for n in AugmentSpec.field_names() if n != 'size')}")
            out += [a for f, v in value.items() for a in (f"--aug.{f}", text(f, v))]
        elif k in known and k not in ("aug", "resume"):
            out += ["--" + k.replace("_", "-"), text(k, value)]
        else:
            raise ConfigError(f"--config {path}: unknown key {key!r}; use the flag names of python -m "
                              "engine.train --help without the dashes (e.g. batch_size: 64)")
    return out


def config_from_args(argv=None, parser=None) -> tuple[Config, argparse.Namespace]:
    """Config from the command line: the preset, then the flags given. With --resume RUN:
    the run's own config, and only the RESUME_SAFE flags may differ from it."""
    parser = parser or build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = parser.parse_args(config_file_args(argv) + argv)
    preset = ns.preset or "cpu-demo"
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; use one of: {', '.join(PRESETS)}")
    cfg = dataclasses.replace(Config(), preset=preset, **PRESETS[preset])
    defaults = Config()
    over = {}
    for f in fields(Config):
        text = getattr(ns, f.name, None)
        if text is None or f.name in ("preset", "aug", "no_aug"):
            continue
        try:
            over[f.name] = _parse_value(text, getattr(defaults, f.name), str(f.type))
        except ValueError:
            raise ConfigError(f"--{f.name.replace('_', '-')} {text!r}: expected {type(getattr(defaults, f.name)).__name__}") from None
    aug = {}
    for f in fields(AugmentSpec):
        text = vars(ns).get(f"aug.{f.name}")
        if text is None:
            continue
        try:
            aug[f.name] = _parse_value(text, f.default)
        except ValueError:
            raise ConfigError(f"--aug.{f.name} {text!r}: expected {type(f.default).__name__}") from None
    if aug:
        over["aug"] = {**cfg.aug, **aug}     # CLI fields on top of the preset's
    if ns.no_aug:
        names = AUGMENTATIONS if ns.no_aug == "all" else tuple(n for n in ns.no_aug.split(",") if n)
        bad = [n for n in names if n not in AUGMENTATIONS]
        if bad:
            raise ConfigError(f"--no-aug {bad}: unknown; use 'all' or names from {', '.join(AUGMENTATIONS)}")
        over["no_aug"] = names
    if ns.resume:
        cfg = saved_config(ns.resume)
        if ns.preset is not None:
            over["preset"] = ns.preset
        for k, v in over.items():
            if k not in RESUME_SAFE and v != getattr(cfg, k):
                raise ConfigError(f"--{k.replace('_', '-')} cannot change on --resume (the run has {getattr(cfg, k)!r}); "
                                  f"only {', '.join('--' + n.replace('_', '-') for n in RESUME_SAFE[1:])} can; "
                                  "start a new run for a different recipe")
        over = {k: v for k, v in over.items() if k in RESUME_SAFE and k != "resume"}
    cfg = dataclasses.replace(cfg, **over)
    validate(cfg)                    # one-line errors before any work
    return cfg, ns


MIN_SIZE = 32                        # the models halve the image five times

# flag -> (test, what it must be, an example of a good value)
_RANGES = {
    "batch_size": (lambda v: v >= 1, ">= 1", 64),
    "size": (lambda v: v >= MIN_SIZE, f">= {MIN_SIZE} (the models halve the image five times)", 128),
    "width": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0", 0.25),
    "dropout": (lambda v: 0 <= v <= 3, "in [0, 3] (it scales rates up to 0.3)", 1.0),
    "lr_scale": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0", 1.0),
    "weight_decay": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0", 0.05),
    "label_smoothing": (lambda v: 0 <= v < 1, "in [0, 1)", 0.1),
    "warmup_epochs": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0", 1),
    "target_acc": (lambda v: 0 <= v <= 1, "in [0, 1] (0 = off)", 0.9),
    "workers": (lambda v: v >= 0, ">= 0", 2),
    "shuffle_buffer": (lambda v: v >= 1, ">= 1 (1 = no shuffling within shards)", 1000),
    "ingest_workers": (lambda v: v >= 0, ">= 0 (0 = the usable cores)", 4),
    "seed": (lambda v: v >= 0, ">= 0", 0),
    "max_params": (lambda v: v >= 1, ">= 1", 5_000_000),
    "log_every": (lambda v: v >= 1, ">= 1", 20),
    "checkpoint_every": (lambda v: v >= 0, ">= 0 (0 = only at epoch ends)", 100),
    "max_bad_steps": (lambda v: v >= 1, ">= 1", 20),
    "epochs": (lambda v: all(e >= 0 for e in v) and any(v), "counts >= 0, at least one > 0", "14,2,1,1"),
}


def validate(cfg: Config) -> None:
    """Every numeric flag's range (NaN and inf included), the augmentation spec and the stage
    plan: a one-line ConfigError naming the flag, the value and a good value."""
    for name, (ok, rule, example) in _RANGES.items():
        value = getattr(cfg, name)
        if not ok(value):
            shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
            raise ConfigError(f"--{name.replace('_', '-')} {shown}: must be {rule}; e.g. --{name.replace('_', '-')} {example}")
    if cfg.log not in ("", "tensorboard"):
        raise ConfigError(f"--log {cfg.log}: use --log tensorboard (or leave it out)")
    if cfg.budget:
        from engine.budget import parse_duration
        try:
            ok = parse_duration(cfg.budget) > 0
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"--budget {cfg.budget}: not a duration; use e.g. --budget 4m, 90s or 1h30m")
    cfg.spec()
    if not cfg.stage_plan():
        raise ConfigError(f"--epochs {','.join(map(str, cfg.epochs))} with --stages {cfg.stages}: no stage has an "
                          "epoch to run; give the stages you run at least one epoch")
