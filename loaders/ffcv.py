"""FFCV loader (`--loader ffcv`): a .beton written once, decoded and batched on the host by
FFCV's compiled (numba) pipeline, every augmentation on the device through `loaders.augment`.

Storage: ONE content-keyed .beton per split in `<dataset cache>/ffcv/` (exact uint8 pixels
by default, or JPEG), at the images' native size when they share one no larger than the
training size (the upscale happens inside augment.py's warp), else at the training size
(`common.storage_view`; photos: docs/datasets.md); written atomically under a lock; unreadable images are reported by name and left out (a
ConfigError with `strict=True`). Loading: FFCV decodes, batches and moves uint8 to the
device, then one `augment` call per batch does the whole spec (FFCV has no rotation,
perspective, hue or grayscale op, and a host flip/crop would be an extra pass). Orders:
"epoch" (default) is `base.epoch_indices`, the permutation every loader uses;
"quasi_random" is FFCV's page-local order (datasets larger than RAM), made a pure function
of the epoch; "auto" picks it when the .beton exceeds half the RAM. numba compiles the
pipeline at construction (`warm_up=True`). FFCV 1.0.2 defects worked around here (torch
thread count, writer hang, readonly reader type, custom order, `Squeeze(1)`, cloned
labels, iterator shutdown, quasi-random state): docs/loaders.md.
"""
from __future__ import annotations

import contextlib
import _thread
import ctypes
import hashlib
import importlib.metadata
import json
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF


@contextlib.contextmanager
def _torch_threads_kept():
    """Undo FFCV's `torch.set_num_threads` calls (an FFCV 1.0.2 defect: docs/loaders.md)."""
    n = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


with _torch_threads_kept():
    import numba as nb
    from ffcv.fields import IntField, RGBImageField
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader
    from ffcv.memory_managers import OSCacheManager
    from ffcv.pipeline.compiler import Compiler
    from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage
    from ffcv.traversal_order import QuasiRandom
    from ffcv.traversal_order.base import TraversalOrder
    from ffcv import writer as ffcv_writer
    from ffcv.writer import DatasetWriter

from loaders.augment import augment
from loaders.base import EpochLoader, LoaderOptions, batch_seed, derive_seed, epoch_indices
from loaders.common import (ConfigError, atomic_path, atomic_write, device_free_bytes, die_with_parent, file_lock,
                            read_rgb, remove_stale_temps, storage_view, view_of)
from loaders.spec import AugmentSpec


def _os_cache_reader(self):
    """Replaces `OSCacheManager.compile_reader`: the same reader (a sample's bytes, a slice
    of the memory-mapped file; its size looked up by address), compiled with a readonly
    signature built as a new numba type. FFCV's version makes it readonly by setting
    `.mutable = False` on numba's interned `uint8[::1]` type object, which changes the
    hash of a type already used in numba's dictionaries: after a few loaders, numba's
    dispatcher finalizers raise KeyError ("Exception ignored in: <finalize object>").
    An FFCV 1.0.2 defect: docs/loaders.md."""
    ro = nb.types.Array(nb.uint8, 1, "C", readonly=True)
    u64 = nb.types.Array(nb.uint64, 1, "C")

    def read(address, state):
        data, ptrs, sizes = state
        return data[address:address + sizes[np.searchsorted(ptrs, address)]]
    return Compiler.compile(read, ro(nb.uint64, nb.types.Tuple([ro, u64, u64])))


OSCacheManager.compile_reader = _os_cache_reader

FFCV_VERSION = importlib.metadata.version("ffcv")   # not ffcv.__version__ (docs/loaders.md)
_FORMAT = 1                      # bump when what goes into a .beton changes
_MIN_PAGE = 1 << 21              # FFCV's smallest page (2 MiB)
ORDERS = ("auto", "epoch", "quasi_random")


@dataclass(frozen=True)
class BetonOptions:
    """How a split is written. `resolution`: "native" (the images' own size when uniform
    and no larger than the training size, else the training size) or "train" (always the
    training size). `write_mode`: "raw" (exact pixels) or "jpg" (re-encoded at
    `jpeg_quality`, smaller files, lossy)."""
    write_mode: str = "raw"
    jpeg_quality: int = 90
    resolution: str = "native"

    def __post_init__(self):
        if self.write_mode not in ("raw", "jpg"):
            raise ConfigError(f"ffcv write_mode {self.write_mode!r}: use 'raw' or 'jpg'")
        if self.resolution not in ("native", "train"):
            raise ConfigError(f"ffcv resolution {self.resolution!r}: use 'native' or 'train'")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"ffcv jpeg_quality {self.jpeg_quality}: use 1..100")


@dataclass(frozen=True)
class Beton:
    path: Path
    n: int                              # samples written (readable or not)
    skipped: tuple[tuple[int, str], ...]  # (index, "path (error)") of unreadable images
    nbytes: int
    seconds: float                      # write time; 0.0 when an existing file was reused

    @property
    def readable(self) -> np.ndarray:
        bad = {i for i, _ in self.skipped}
        return np.array([i for i in range(self.n) if i not in bad], dtype=np.int64)


# ----------------------------------------------------------------------------- writing

def stored_size(split, spec: AugmentSpec, options: BetonOptions = BetonOptions()) -> tuple[int, int]:
    """(H, W) the split is stored at in the .beton."""
    return stored_view(split, spec, options)[0]


def stored_view(split, spec: AugmentSpec, options: BetonOptions = BetonOptions(),
                train: bool = True) -> tuple[tuple[int, int], str]:
    """((H, W), view) of the .beton's pixels (`common.storage_view`)."""
    hw, view = storage_view(split, spec, train)
    if options.resolution == "train" and view == "native" and hw != (spec.size, spec.size):
        return (spec.size, spec.size), "stretch"
    return hw, view


def _read(path: str, hw: tuple[int, int], view: str = "stretch", spec: AugmentSpec | None = None) -> np.ndarray:
    """uint8 (H, W, 3) as the reference loader sees it: PIL decode, then (only when the
    file's size differs) torchvision's bilinear antialiased resize of the uint8 tensor;
    view "center": the evaluation view of `spec` (`common.view_of`)."""
    t = read_rgb(path)
    if view == "center":
        t = view_of(t, view, spec)
    elif tuple(t.shape[1:]) != tuple(hw):
        t = TF.resize(t, list(hw), interpolation=InterpolationMode.BILINEAR, antialias=True)
    return np.ascontiguousarray(t.permute(1, 2, 0).numpy())


class _Images:
    """The indexable dataset FFCV's writer workers read. Never raises (a raising worker
    hangs FFCV's writer: docs/loaders.md): an unreadable image is flagged in `bad` (shared
    memory) and written as a black placeholder that the loader leaves out."""

    def __init__(self, paths, labels, hw, bad, view="stretch", spec=None):
        self.paths, self.labels, self.hw, self.bad = paths, labels, hw, bad
        self.view, self.spec = view, spec
        self._threads_set = False

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        if not self._threads_set:             # inside a forked writer worker
            torch.set_num_threads(1)
            self._threads_set = True
        try:
            return _read(self.paths[i], self.hw, self.view, self.spec), int(self.labels[i])
        except Exception:  # noqa: BLE001  (any failure: report the file, never hang the writer)
            self.bad[i] = 1
            return np.zeros((*self.hw, 3), np.uint8), -1


def _hash(parts) -> str:
    h = hashlib.sha1()
    for p in parts:
        h.update(str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:12]


def _stat(path: str) -> str:
    try:
        st = os.stat(path)
        return f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        return "missing"


def _view_tag(view: str, spec: AugmentSpec | None) -> str:
    return f"center{spec.eval_size}" if view == "center" else ""


def beton_path(split, hw: tuple[int, int], options: BetonOptions = BetonOptions(),
               view: str = "stretch", spec: AugmentSpec | None = None) -> Path:
    """Where the .beton for this path list, stored size, view and options lives
    (content-keyed)."""
    mode = options.write_mode + (str(options.jpeg_quality) if options.write_mode == "jpg" else "")
    mode += _view_tag(view, spec)
    listed = _hash(p for pair in zip(split.paths, split.labels) for p in pair)
    key = _hash([_FORMAT, FFCV_VERSION, hw, mode, *map(_stat, split.paths)])
    return Path(split.cache_dir) / "ffcv" / f"{split.name}-{hw[0]}x{hw[1]}-{mode}-{listed}-{key}.beton"


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _existing(path: Path, n: int) -> Beton | None:
    """The Beton at `path` when it and its sidecar are complete and agree, else None."""
    try:
        meta = json.loads(_sidecar(path).read_text())
        size = path.stat().st_size
    except (OSError, ValueError):
        return None
    if meta.get("nbytes") != size or meta.get("n") != n or meta.get("ffcv") != FFCV_VERSION:
        return None
    return Beton(path, n, tuple((int(i), s) for i, s in meta.get("skipped", [])), size, 0.0)


def _page_size(hw: tuple[int, int]) -> int:
    """A power of two holding several samples: a sample larger than a page kills FFCV's
    writer worker (MemoryError on the retry)."""
    need = 2 * hw[0] * hw[1] * 3 + (1 << 16)
    return max(_MIN_PAGE, 1 << (need - 1).bit_length())


class _WorkerDied(Exception):
    pass


class _TrackedProcess(multiprocessing.Process):
    """FFCV's writer workers, recorded so the watchdog can read their exit codes; each dies
    with the process that started it (a SIGKILLed run leaves no writer behind)."""
    started: list = []

    def start(self):
        super().start()
        _TrackedProcess.started.append(self)

    def run(self):
        die_with_parent()
        super().run()


ffcv_writer.Process = _TrackedProcess


def _run_watched(writer: DatasetWriter, dataset, chunksize: int) -> None:
    """`writer.from_indexed_dataset`, aborted (RuntimeError) instead of hanging forever when
    a worker process dies: one exits non-zero, or all have exited for 10 s while the writer
    still waits. The writer runs in this (main) thread, so its workers are forked from the
    main thread; a watchdog thread interrupts it with SIGUSR1 (a temporary handler; SIGINT
    handlers stay untouched). Off the main thread: no watchdog. FFCV 1.0.2's writer hang:
    docs/loaders.md."""
    workers = _TrackedProcess.started = []
    if threading.current_thread() is not threading.main_thread():
        writer.from_indexed_dataset(dataset, chunksize=chunksize)
        return
    stop, why = threading.Event(), []

    def watch():
        gone_since = None
        while not stop.wait(0.2):
            codes = [p.exitcode for p in list(workers)]
            dead = [c for c in codes if c not in (None, 0)]
            gone = bool(codes) and None not in codes
            gone_since = (gone_since or time.monotonic()) if gone else None
            if dead or (gone_since and time.monotonic() - gone_since > 10):
                why.append(f"exited with code {dead[0]}" if dead else "exited early")
                for p in list(workers):
                    if p.exitcode is None:
                        p.terminate()
                _thread.interrupt_main(signal.SIGUSR1)
                return

    def interrupted(signum, frame):
        if why:                                # ours; anyone else's SIGUSR1 goes to their handler
            raise _WorkerDied()
        if callable(old):
            old(signum, frame)

    old = signal.signal(signal.SIGUSR1, interrupted)
    watchdog = threading.Thread(target=watch, name="ffcv-writer-watchdog", daemon=True)
    watchdog.start()
    try:
        writer.from_indexed_dataset(dataset, chunksize=chunksize)
    except _WorkerDied:
        with contextlib.suppress(Exception):
            writer.metadata_sm.close()
            writer.metadata_sm.unlink()
        raise RuntimeError(f"ffcv: a .beton writer worker process {why[0]} (its error is "
                           "printed above: disk full? out of memory?)") from None
    finally:
        stop.set()
        watchdog.join()
        signal.signal(signal.SIGUSR1, old)


def _describe(path: str, hw, view="stretch", spec=None) -> str:
    try:
        _read(path, hw, view, spec)
        return f"{path} (unreadable at write time)"
    except Exception as e:  # noqa: BLE001
        return f"{path} ({type(e).__name__}: {e})"


def _report(b: Beton, strict: bool) -> None:
    if not b.skipped:
        return
    names = "; ".join(s for _, s in b.skipped)
    if strict:
        raise ConfigError(f"ffcv: {len(b.skipped)} unreadable image(s): {names}; fix or remove "
                          "them, or run without --strict to skip them")
    print(f"ffcv: skipped {len(b.skipped)} unreadable image(s) in {b.path.name}: {names}",
          file=sys.stderr, flush=True)


def _write(split, hw, options: BetonOptions, path: Path, workers: int, strict: bool,
           view: str = "stretch", spec: AugmentSpec | None = None) -> Beton:
    n = len(split)
    bad = multiprocessing.RawArray(ctypes.c_uint8, n)
    field = RGBImageField(write_mode=options.write_mode, jpeg_quality=options.jpeg_quality)
    t0 = time.perf_counter()
    with atomic_path(path) as tmp:
        writer = DatasetWriter(str(tmp), {"image": field, "label": IntField()},
                               page_size=_page_size(hw), num_workers=max(1, workers))
        with _torch_threads_kept():
            _run_watched(writer, _Images(split.paths, split.labels, hw, bad, view, spec),
                         chunksize=max(1, min(100, n // (4 * max(1, workers)))))
        skipped = tuple((i, _describe(split.paths[i], hw, view, spec)) for i in range(n) if bad[i])
        size = tmp.stat().st_size
        b = Beton(path, n, skipped, size, time.perf_counter() - t0)
        _report(b, strict)                       # strict: raises, the temp file is removed
        atomic_write(_sidecar(path), json.dumps(dict(
            n=n, nbytes=size, ffcv=FFCV_VERSION, hw=list(hw), write_mode=options.write_mode,
            jpeg_quality=options.jpeg_quality, skipped=[list(s) for s in skipped],
            seconds=round(b.seconds, 3))))
    return b


def _prune_stale(path: Path) -> None:
    """Delete older .beton files of the same path list, size and options (a changed source)."""
    stem = path.name.rsplit("-", 1)[0]
    for old in path.parent.glob(f"{stem}-*.beton"):
        if old != path:
            for f in (old, _sidecar(old)):
                with contextlib.suppress(FileNotFoundError):
                    f.unlink()


def ensure_beton(split, hw: tuple[int, int], options: BetonOptions = BetonOptions(), *,
                 workers: int = 2, strict: bool = False, force: bool = False,
                 view: str = "stretch", spec: AugmentSpec | None = None) -> Beton:
    """The split's .beton at stored size `hw` (`view` "center": the eval view of `spec`):
    reused when complete and current, else (or with `force`) written, atomically.
    Unreadable images: reported (and skipped), or a ConfigError under `strict`."""
    if len(split) == 0:
        raise ConfigError(f"ffcv: the {split.name} split has no images; check --data")
    path = beton_path(split, hw, options, view, spec)
    stem = path.name.rsplit("-", 1)[0]
    with file_lock(path.parent / (stem + ".lock")):
        remove_stale_temps(path.parent, f".{stem}-*.tmp")    # a killed writer's (.beton, sidecar)
        b = None if force else _existing(path, len(split))
        if b is None:
            b = _write(split, hw, options, path, workers, strict, view, spec)
            _prune_stale(path)
        else:
            _report(b, strict)
    return b


def write_beton(split, spec: AugmentSpec | int = 128, options: BetonOptions = BetonOptions(), *,
                workers: int = 2) -> tuple[Path, float, int]:
    """Write (always, replacing any cached copy atomically) the .beton the loader would use
    for `split` at training size `spec` (an AugmentSpec or an int) and return
    (path, seconds, bytes). For the benchmark's write time and size."""
    spec = spec if isinstance(spec, AugmentSpec) else AugmentSpec(size=int(spec))
    b = ensure_beton(split, stored_size(split, spec, options), options, workers=workers, force=True)
    return b.path, b.seconds, b.nbytes


# ----------------------------------------------------------------------------- loading

class _EpochOrder(TraversalOrder):
    """`base.epoch_indices` over the readable samples as an FFCV traversal order, cut to
    the pass's whole batches: from batch `skip` (a resume: the batches before it are never
    read) to the epoch's last. (FFCV takes a custom order only as an instance it calls
    with the loader: docs/loaders.md.)"""

    def __init__(self, readable: np.ndarray, opts: LoaderOptions, batches: int):  # super(): __call__
        self.readable, self.opts, self.batches, self.skip = readable, opts, batches, 0

    def __call__(self, loader):               # FFCV calls the instance with the loader
        super().__init__(loader)
        return self

    def rank_order(self, epoch: int) -> np.ndarray:
        return self.readable[epoch_indices(len(self.readable), self.opts, epoch)]

    def sample_order(self, epoch: int):
        b = self.opts.batch_size
        return self.rank_order(epoch)[self.skip * b: self.batches * b]


class _QuasiRandomOrder(QuasiRandom):
    """FFCV's quasi-random (page-local) order as a pure function of the epoch. FFCV's
    `QuasiRandom.sample_order` shuffles its page table in place, so each epoch's order
    depended on every order drawn before it (a resume, or a `sample_indices` call, changed
    the epochs after it); here every epoch starts from the table as built."""

    def __init__(self):                       # noqa: super() in __call__
        pass

    def __call__(self, loader):               # FFCV calls the instance with the loader
        super().__init__(loader)
        self.pristine = self.page_to_samples_array.copy()
        return self

    def sample_order(self, epoch: int):
        np.copyto(self.page_to_samples_array, self.pristine)
        return super().sample_order(epoch)


def _dist() -> tuple[int, int] | None:
    d = torch.distributed
    return (d.get_rank(), d.get_world_size()) if d.is_available() and d.is_initialized() else None


def _stop(it) -> None:
    """End an FFCV epoch iterator, also one left early. FFCV's own `close()` releases the
    memory context while its thread may still be decoding ahead (with the process cache its
    page readers are then gone and that thread waits forever), and at the end of an epoch
    the thread blocks on a full queue for good (`put(None)` without a timeout). So: signal
    it, give it 0.6 s to notice (it checks when its queue is full), else take one batch
    off its queue, until it has ended; then close."""
    it.terminate_event.set()
    while it.is_alive():
        it.join(timeout=0.6)
        if it.is_alive():
            with contextlib.suppress(queue.Empty):
                it.output_queue.get_nowait()
    it.close()


class FfcvLoader(EpochLoader):
    """The `base.Loader` contract over an FFCV `Loader`; batch b of an epoch is augmented
    with a generator seeded by `base.batch_seed`. Sample indices are the readable
    images' (`Beton.readable`): order "epoch" deals them by `base.epoch_indices`, and a
    resume reads from its start batch on; "quasi_random" (FFCV's page-local order, for
    datasets larger than RAM) deals each rank the fixed shard `readable[:n - n % world]
    [rank::world]` and resumes by decoding and dropping the batches before the start."""

    def __init__(self, split, spec: AugmentSpec, opts: LoaderOptions, *,
                 beton: BetonOptions = BetonOptions(), order: str = "auto", strict: bool = False,
                 batches_ahead: int = 3, warm_up: bool = True, emulate_clipping: bool = False):
        if order not in ORDERS:
            raise ConfigError(f"ffcv order {order!r}: use one of {', '.join(ORDERS)}")
        self.spec, self.emulate_clipping = spec, emulate_clipping
        dist = _dist()
        if dist is not None and dist != (opts.rank, opts.world_size):
            raise ConfigError(f"ffcv: LoaderOptions rank/world_size {opts.rank}/{opts.world_size} "
                              f"differ from torch.distributed's {dist[0]}/{dist[1]}")
        self.hw, view = stored_view(split, spec, beton, opts.train)
        self.beton = ensure_beton(split, self.hw, beton, workers=opts.workers, strict=strict,
                                  view=view, spec=spec)
        if view == "center":                  # stored as the eval view: nothing left to crop
            self.spec = replace(spec, eval_resize="stretch")
        # "rrc" boxes are drawn on the original sizes, whatever size the pixels are kept at.
        self.src_hw = torch.from_numpy(np.asarray(split.sizes, dtype=np.float64)) \
            if opts.train and spec.resize == "rrc" else None
        readable = self.readable = self.beton.readable
        if len(readable) == 0:
            raise ConfigError(f"ffcv: no readable image in the {split.name} split")
        self._init_epochs(len(readable), opts)
        if order == "auto":
            big = self.beton.nbytes > device_free_bytes(torch.device("cpu")) // 2
            order = "quasi_random" if opts.train and big else "epoch"
        if not opts.train:
            order = "epoch"                   # natural order, sharded like every loader
        self.order = order
        if order == "epoch":
            indices, os_cache = readable, True
            self.traversal = _EpochOrder(readable, opts, len(self))
        else:
            w = opts.world_size
            indices = readable[: len(readable) - len(readable) % w][opts.rank::w]
            self.traversal, os_cache = _QuasiRandomOrder(), False
        dev = torch.device(opts.device)
        pipelines = {
            "image": [SimpleRGBImageDecoder(), ToTensor(), ToDevice(dev, non_blocking=True),
                      ToTorchImage(channels_last=True)],
            "label": [IntDecoder(), ToTensor(), Squeeze(1), ToDevice(dev, non_blocking=True)],
        }
        # Decode threads: raw pixels are a memcpy (one thread: 270k img/s at 32x32 here, two
        # threads 54k: prange overhead); JPEG decode scales with threads where cores are free.
        threads = 1 if beton.write_mode == "raw" else max(1, opts.workers)
        with _torch_threads_kept():
            self.loader = Loader(str(self.beton.path), batch_size=opts.batch_size,
                                 num_workers=threads, os_cache=os_cache,
                                 order=self.traversal, indices=indices, pipelines=pipelines,
                                 # FFCV's quasi-random order seeds numpy's legacy global RNG
                                 # with seed * 912300 + epoch, which must stay below 2**32.
                                 seed=derive_seed(opts.seed, "ffcv-order") % 4096,
                                 drop_last=opts.drop, batches_ahead=batches_ahead)
        self.generator = torch.Generator(device=dev)
        if warm_up:                           # numba compiles the pipeline on its first batch
            with _torch_threads_kept():
                it = iter(self.loader)
            try:
                next(it, None)
            finally:
                _stop(it)

    def sample_indices(self, epoch: int) -> np.ndarray:
        order = self.traversal.rank_order(epoch) if self.order == "epoch" \
            else self.traversal.sample_order(epoch)
        return np.asarray(order)[: len(self) * self.opts.batch_size]

    def __iter__(self):
        epoch, first = self._begin()
        o = self.opts
        skip_here = self.order == "epoch"     # the order starts at `first`; else drop batches
        self.loader.next_epoch = epoch        # FFCV passes it to the order, then increments
        if skip_here:
            self.traversal.skip = first
        try:
            with _torch_threads_kept():
                it = iter(self.loader)
        finally:
            if skip_here:
                self.traversal.skip = 0
        order = None if self.src_hw is None else torch.from_numpy(
            np.ascontiguousarray(self.sample_indices(epoch), dtype=np.int64))
        try:
            for b, (x, y) in enumerate(it, first if skip_here else 0):
                if b < first:
                    continue
                self.generator.manual_seed(batch_seed(o.seed, o.rank, epoch, b))
                hw = None if order is None else \
                    self.src_hw[order[b * o.batch_size:b * o.batch_size + len(y)]].to(x.device)
                yield (augment(x, self.spec, self.generator, o.dtype, train=o.train,
                               emulate_clipping=self.emulate_clipping, src_hw=hw), y.clone())
        finally:
            _stop(it)
