"""`--loader auto`: pick the loader for this machine and dataset, and say why.

1. The resident loader when the decoded split fits the device with room for training:
   its bytes (`common.needed_bytes`) at most `RESIDENT_SHARE` of what is free there.
2. Otherwise the fastest available loader by a short measured probe (`PROBE_BATCHES`
   batches each after one warm-up batch, same spec and batch size), the figures cached in
   `<dataset cache>/loader-probe.json` keyed on machine, dataset fingerprint, split, spec and
   batch size, so later runs reuse them.

The choice and the figures behind it are printed once (rank 0) and kept in `.choice`.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time

import torch

from loaders import base
from loaders.common import ConfigError, atomic_write, device_free_bytes, needed_bytes

RESIDENT_SHARE = 0.5       # leave the other half of the device to the model and activations
PROBE_BATCHES = 4


def _probe_key(split, spec, opts) -> str:
    return json.dumps([platform.node(), platform.machine(), os.cpu_count(), str(opts.device),
                       torch.cuda.get_device_name() if opts.device.type == "cuda" else "",
                       split.name, len(split), hashlib.sha1('\n'.join(split.paths).encode()).hexdigest()[:12], spec.to_dict(), opts.batch_size,
                       opts.workers])


def probe(name: str, split, spec, opts) -> float:
    """Images/s of `name` over PROBE_BATCHES batches after one warm-up batch."""
    loader = base.build_loader(name, split, spec, opts)
    it = iter(loader)
    next(it)
    n, t0 = 0, time.perf_counter()
    for _, (x, y) in zip(range(PROBE_BATCHES), it):
        n += y.shape[0]
    if opts.device.type == "cuda":
        torch.cuda.synchronize(opts.device)
    return n / (time.perf_counter() - t0)


def choose(split, spec, opts) -> tuple[str, dict]:
    """(loader name, why). On CUDA the resident loader when the decoded split fits the
    device with room for training; otherwise (and always on a CPU device, where the
    resident loader's batched augmentation is slower than DALI's pipeline) the fastest by
    the cached probe, resident among the candidates when it fits."""
    need = needed_bytes(split, spec, opts)
    free = device_free_bytes(opts.device)
    fits = "resident" in base.available_loaders() and need <= RESIDENT_SHARE * free
    size = f"decoded split needs {need / 2**20:.0f} MiB, {free / 2**20:.0f} MiB free on {opts.device}"
    if fits and opts.device.type == "cuda":
        return "resident", dict(reason=size)
    cache = split.cache_dir / "loader-probe.json"
    key = _probe_key(split, spec, opts)
    try:
        table = json.loads(cache.read_text())
    except (OSError, json.JSONDecodeError):
        table = {}
    figures = table.get(key)
    if figures is None:
        figures = {}
        for name in base.available_loaders():
            if name == "resident" and not fits:
                continue
            try:
                figures[name] = probe(name, split, spec, opts)
            except (ConfigError, RuntimeError) as e:    # a loader that cannot run here is skipped
                figures[name] = f"failed: {str(e).splitlines()[0][:120]}"
        table[key] = figures
        atomic_write(cache, json.dumps(table))
    measured = {k: v for k, v in figures.items() if isinstance(v, float)}
    if not measured:
        raise ConfigError(f"--loader auto: no loader could run here ({figures}); pick one with --loader")
    best = max(measured, key=measured.get)
    why = "fastest by the probe" if fits else f"{size}: more than {RESIDENT_SHARE:.0%} of that"
    return best, dict(reason=why, images_per_s=figures)


def decide(split, spec, opts) -> tuple[str, dict]:
    """`choose` on one process; under torch.distributed rank 0 chooses (and probes) alone
    and broadcasts its choice (or its error), so every rank builds the same loader."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return choose(split, spec, opts)
    box, error = [None], None
    if dist.get_rank() == 0:
        try:
            box[0] = choose(split, spec, opts)
        except Exception as e:   # noqa: BLE001 - every rank must hear of it, or they wait forever
            error, box[0] = e, e if isinstance(e, ConfigError) else RuntimeError(f"rank 0: {e}")
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], Exception):
        raise error or box[0]
    return box[0]


class AutoLoader(base.Loader):
    """Chooses once (on the training split) and delegates the whole contract to the chosen
    loader."""
    _choices: dict = {}   # (split cache, device) -> name: the val loader follows the train choice

    def __init__(self, split, spec, opts: base.LoaderOptions):
        key = (str(split.cache_dir), str(opts.device))
        if opts.train or key not in self._choices:
            name, why = decide(split, spec, opts)
            AutoLoader._choices[key] = name
            self.choice = dict(loader=name, **why)
            if opts.rank == 0:
                figs = why.get("images_per_s")
                figs = "; probe " + ", ".join(f"{k} {v:.0f} img/s" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in figs.items()) if figs else ""
                print(f"--loader auto: chose {name} ({why['reason']}{figs})", flush=True)
        else:
            self.choice = dict(loader=self._choices[key], reason="same as the training split")
        self.loader = base.build_loader(self.choice["loader"], split, spec, opts)

    @property
    def opts(self) -> base.LoaderOptions:
        return self.loader.opts

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.loader.set_epoch(epoch, start_batch)

    def sample_indices(self, epoch: int):
        return self.loader.sample_indices(epoch)

    def __iter__(self):
        return iter(self.loader)
