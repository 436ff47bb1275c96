"""A finished run, read back for use: shared by engine.predict, engine.evaluate, engine.export.

`load_run(folder, checkpoint, device)` returns a `TrainedRun`: the run's Config, its class
names in label order and AugmentSpec (config.json's "classes" and "spec"), the checkpoint
chosen, and the model built as in training with those weights, in eval mode on the device.
Checkpoints: "best" is the stage-best file of the run's best epoch (summary.json's best_at,
else metrics.csv's highest val_acc, else the last stage with a -best.pt file), "last" is
last.pt (prev.pt, with a warning, when last.pt is unreadable), anything else a path to a .pt
holding {"model": state_dict} or a bare state dict. They are unpickled as engine.train does
(weights_only=False): open run folders you trust. Inference runs in float32 (not the run's
autocast); `run_logits` is engine.step.eval_logits itself, so --tta means what it meant in training.
`preprocess(spec)` is the run's evaluation transform (resize to spec.size, bilinear with
antialias, or spec.eval_resize "center": short side, centre crop; then normalise). Every problem is a one-line ConfigError; `cli_errors` turns it
into "error: ..." on stderr and exit 2 for the three CLIs.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn

from engine.checkpoint import LAST, PREV
from engine.config import STAGE_NAMES, Config, _Parser, _tuples, saved_config
from engine.metrics import read_csv
from engine.models import build_model
from engine.precision import resolve_device
from engine.step import eval_logits
from loaders.common import ConfigError, read_rgb
from loaders.spec import AugmentSpec
from loaders.torchvision import reference_transform

CHECKPOINT_HELP = "best (default: the run's best epoch), last, or a path to a .pt checkpoint"


@dataclass
class TrainedRun:
    folder: Path
    cfg: Config
    classes: tuple[str, ...]
    spec: AugmentSpec
    checkpoint: Path
    model: nn.Module               # eval mode, float32, channels_last, on `device`
    device: torch.device

    def metadata(self) -> dict:
        """What is needed to rebuild and feed the model without this run folder."""
        return dict(model=self.cfg.model, passthrough=self.cfg.passthrough or None, width=self.cfg.width,
                    num_classes=len(self.classes), classes=list(self.classes),
                    preprocessing=dict(size=self.spec.size, mean=list(self.spec.mean), std=list(self.spec.std),
                                       resize=resize_text(self.spec), input="RGB, NCHW, float32",
                                       normalise="(x / 255 - mean) / std"),
                    run=str(self.folder), checkpoint=str(self.checkpoint))


def resize_text(spec: AugmentSpec) -> str:
    """The evaluation resize in words (spec.eval_resize), for exported metadata."""
    if spec.eval_resize == "center":
        return (f"bilinear, antialias, short side to {spec.eval_size}, then centre crop "
                f"{spec.size} x {spec.size}")
    return "bilinear, antialias, to size x size"


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser whose errors are one-line ConfigErrors, with the run folder and
    --checkpoint arguments every CLI here takes."""
    p = _Parser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="the run folder (runs/NAME, or runs/latest)")
    p.add_argument("--checkpoint", default="best", help=CHECKPOINT_HELP)
    return p


@contextlib.contextmanager
def cli_errors():
    """ConfigError -> `error: ...` on stderr and exit 2, without a traceback."""
    try:
        yield
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


# --------------------------------------------------------------------------- the run folder

def class_list(classes, shown: int = 5) -> str:
    """"N: a, b, c, ..." for one-line messages."""
    more = ", ..." if len(classes) > shown else ""
    return f"{len(classes)}: {', '.join(classes[:shown])}{more}"


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is unreadable ({type(e).__name__}: {e}); {what}") from None


def _best_stage(run: Path) -> str | None:
    """The stage of the run's best epoch: summary.json, else metrics.csv (first highest val_acc)."""
    summary = run / "summary.json"
    if summary.is_file():
        best_at = _read_json(summary, "delete it to fall back to metrics.csv").get("best_at") or ""
        if " epoch " in best_at:
            return best_at.rsplit(" epoch ", 1)[0]
    try:
        rows = read_csv(run / "metrics.csv")
    except (OSError, UnicodeDecodeError):
        return None
    best = None
    for r in rows:
        try:
            acc = float(r["val_acc"])
        except (KeyError, TypeError, ValueError):
            continue
        if best is None or acc > best[0]:
            best = (acc, r.get("stage"))
    return best[1] if best else None


def _no_checkpoint(run: Path) -> ConfigError:
    return ConfigError(f"{run}: no checkpoint (no <stage>-best.pt, {LAST} or {PREV}); train the run first "
                       "(python -m engine.train) or pass --checkpoint PATH")


def checkpoint_path(run: Path, which: str) -> Path:
    """The file --checkpoint names in `run`."""
    bests = [run / f"{s}-best.pt" for s in STAGE_NAMES if (run / f"{s}-best.pt").is_file()]
    if which == "best":
        stage = _best_stage(run)
        if stage and (run / f"{stage}-best.pt").is_file():
            return run / f"{stage}-best.pt"
        if bests:
            return bests[-1]
        if (run / LAST).is_file() or (run / PREV).is_file():
            raise ConfigError(f"{run}: no <stage>-best.pt checkpoint (the run stopped before its first "
                              "evaluation); use --checkpoint last")
        raise _no_checkpoint(run)
    if which == "last":
        for p in (run / LAST, run / PREV):
            if p.is_file():
                return p
        if bests:
            raise ConfigError(f"{run}: no {LAST} or {PREV}; use --checkpoint best")
        raise _no_checkpoint(run)
    path = Path(which).expanduser()
    if not path.is_file():
        raise ConfigError(f"--checkpoint {which}: no such file; use best, last or a path to a .pt checkpoint")
    return path


def _load_state(path: Path, fallback: Path | None) -> tuple[dict, Path]:
    """(checkpoint dict, its path); an unreadable last.pt falls back to prev.pt."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - truncated or foreign pickles raise many kinds of errors
        first = str(e).splitlines()[0] if str(e) else ""
        if fallback is not None and fallback.is_file():
            print(f"warning: {path} is unreadable ({type(e).__name__}: {first}); using {fallback}",
                  file=sys.stderr, flush=True)
            return _load_state(fallback, None)
        raise ConfigError(f"checkpoint {path} is unreadable ({type(e).__name__}: {first}); "
                          "pass another with --checkpoint") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        return state, path
    if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        return {"model": state}, path
    raise ConfigError(f"checkpoint {path} holds no model state dict (neither {{'model': ...}} nor a bare "
                      "state dict); pass a checkpoint written by engine.train")


def _check_matches(model: nn.Module, state: dict, path: Path, cfg: Config, n: int) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        first = (shapes or missing or unexpected)[0]
        raise ConfigError(
            f"checkpoint {path} does not match the run's model ({cfg.model}, width {cfg.width}, {n} classes): "
            f"{len(missing)} missing, {len(unexpected)} unexpected, {len(shapes)} differently shaped tensors "
            f"(first: {first}); pass a checkpoint of this run")


def load_run(folder: str | Path, checkpoint: str = "best", device: str = "cpu") -> TrainedRun:
    """The run in `folder` with the weights `checkpoint` names, on `device` ("auto": CUDA if present)."""
    run = Path(folder)
    if not run.is_dir():
        raise ConfigError(f"{folder}: not a folder; pass a run folder (runs/NAME)")
    conf = run / "config.json"
    if not conf.is_file():
        raise ConfigError(f"{folder}: no config.json, so not a run folder; pass one written by "
                          "python -m engine.train (runs/NAME)")
    saved = _read_json(conf, "the run folder is damaged")
    dev = resolve_device(device)
    cfg = saved_config(run)
    path = checkpoint_path(run, checkpoint)
    state, path = _load_state(path, run / PREV if path.name == LAST else None)
    classes = tuple(saved.get("classes") or state.get("classes") or ())
    if not classes:
        raise ConfigError(f"{conf} and {path} name no classes; the run folder is damaged")
    if state.get("classes") is not None and tuple(state["classes"]) != classes:
        raise ConfigError(f"checkpoint {path} was trained on other classes ({class_list(state['classes'])}) than "
                          f"the run ({class_list(classes)}); pass a checkpoint of this run")
    spec = AugmentSpec(**_tuples(saved["spec"])) if isinstance(saved.get("spec"), dict) else cfg.spec()
    model = build_model(cfg.model, passthrough=cfg.passthrough or None, width=cfg.width, num_classes=len(classes))
    _check_matches(model, state["model"], path, cfg, len(classes))
    model.load_state_dict(state["model"])
    model.to(dev, memory_format=torch.channels_last).eval()
    return TrainedRun(run, cfg, classes, spec, path, model, dev)


# --------------------------------------------------------------------------- images and logits

def preprocess(spec: AugmentSpec):
    """uint8 CHW RGB -> the normalised float32 CHW the model was evaluated on in training."""
    return reference_transform(spec, train=False)


class UnreadableImage(ConfigError):
    """An image file that cannot be decoded; `brief` is the message without the advice."""

    def __init__(self, brief: str):
        super().__init__(f"{brief}; pass a readable image file")
        self.brief = brief


def read_image(path: str | Path) -> torch.Tensor:
    """uint8 CHW RGB of an image file, or UnreadableImage naming it."""
    try:
        return read_rgb(str(path))
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds of errors for bad files
        first = str(e).splitlines()[0] if str(e) else ""
        raise UnreadableImage(f"cannot read image {path} ({type(e).__name__}: {first})") from None


def run_logits(run: TrainedRun, x: torch.Tensor, tta: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, test-time-augmented logits) in float32 of a normalised NCHW batch: training's
    eval_logits (TTA = the mean over x and its horizontal mirror) on the bare model, no autocast."""
    engine = SimpleNamespace(eval_net=run.model, amp=None, device=run.device)
    return eval_logits(engine, x.to(run.device), tta)
