"""Reference loader: torch DataLoader + torchvision.transforms.v2, the baseline everyone knows.

Every other loader is tested and measured against this one. Per sample, in worker
processes: decode (PIL), resize to the training size (or the spec's resize policy), then
the spec's augmentations in the report's order, each as its own v2 transform (one
resampling per geometric op, as the report's code did), ToDtype + Normalize. Batches are
pinned and copied to the device with non_blocking=True, then laid out channels_last in the
engine's dtype. Determinism: a
sample's augmentation is a pure function of (seed, epoch, sample index): the worker reseeds
the CPU generator the v2 transforms draw from, per sample, inside `torch.random.fork_rng`
(with workers=0 the training process's RNG stream is untouched), so worker count and start
batch never change a batch (`set_epoch(epoch, start_batch=k)` yields exactly batches k..).
Bad files: a file that fails after ingest is replaced, with a warning naming it, by the
next readable sample of the split (deterministic), so the epoch never dies mid-way.
"""
from __future__ import annotations

import numpy as np
from dataclasses import dataclass
import random
import io
import warnings

import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler, get_worker_info
from torchvision.transforms import InterpolationMode, v2

from loaders.base import EpochLoader, LoaderOptions, derive_seed, to_model_layout
from loaders.common import die_with_parent, read_rgb
from loaders.spec import AugmentSpec

BILINEAR = InterpolationMode.BILINEAR
from loaders.shards import ShardSplit, StreamingLoader, rank_shards, shard_of, shard_samples, warn_member


def _spec_ops(spec: AugmentSpec, train: bool) -> list:
    """The spec's resize and augmentations as v2 transforms, in the report's order, one
    resampling per geometric op, after the resize policy (Resize, RandomResizedCrop for
    "rrc" training, Resize(short side) + CenterCrop for "center" evaluation). v2 transforms
    take a PIL image or a uint8 tensor alike."""
    s = spec.size
    if train and spec.resize == "rrc":
        ops: list = [v2.RandomResizedCrop(s, scale=spec.rrc_scale, ratio=spec.rrc_ratio,
                                          interpolation=BILINEAR, antialias=True)]
    elif not train and spec.eval_resize == "center":
        ops = [v2.Resize(spec.eval_size, interpolation=BILINEAR, antialias=True), v2.CenterCrop(s)]
    else:
        ops = [v2.Resize((s, s), interpolation=BILINEAR, antialias=True)]
    if train:
        if spec.flip:
            ops.append(v2.RandomHorizontalFlip(spec.flip_p))
        if spec.crop:
            ops.append(v2.RandomCrop(s, padding=spec.crop_padding, fill=0))
        if spec.rotate:
            ops.append(v2.RandomRotation(spec.rotate_degrees, interpolation=BILINEAR, fill=0))
        if spec.jitter:
            ops.append(v2.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue))
        if spec.grayscale:
            ops.append(v2.RandomGrayscale(spec.grayscale_p))
        if spec.translate:
            t = spec.translate_frac
            ops.append(v2.RandomAffine(degrees=0, translate=(t, t), interpolation=BILINEAR, fill=0))
        if spec.perspective:
            ops.append(v2.RandomPerspective(spec.perspective_distortion, p=spec.perspective_p,
                                            interpolation=BILINEAR, fill=0))
    return ops


def _normalise(spec: AugmentSpec) -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(spec.mean), list(spec.std))]


def reference_transform(spec: AugmentSpec, train: bool) -> v2.Compose:
    """THE REFERENCE for the semantic tests: the spec as a torchvision v2 pipeline on a uint8
    CHW tensor (`common.read_rgb`) -> normalised float32. Not what the loader runs by default
    (see `pil_transform`). Validation (train=False) gets resize + normalise only."""
    return v2.Compose(_spec_ops(spec, train) + _normalise(spec))


def pil_transform(spec: AugmentSpec, train: bool) -> v2.Compose:
    """WHAT THE LOADER RUNS (pipeline="pil", the default): the same v2 transforms in the same
    order on the decoded PIL image (PIL's C resampling and colour ops, as the report's code
    and most users write it), then PILToTensor + ToDtype + Normalize. On 128x128 JPEG sources
    it is several times faster than the tensor pipeline (docs/benchmarks.md); its pixels
    differ from `reference_transform` by PIL's integer resampling (tests/test_loader_contract.py
    states the measured tolerance)."""
    return v2.Compose(_spec_ops(spec, train) + [v2.PILToTensor()] + _normalise(spec))


def _read_pil(path):
    """The decoded RGB PIL image of a file or file object (what torchvision's ImageFolder hands its transform)."""
    from PIL import Image
    with Image.open(path) as im:
        return im.convert("RGB")


class _Files(torch.utils.data.Dataset):
    def __init__(self, split, transform, seed: int = 0, read=read_rgb):
        self.paths, self.labels, self.transform, self.seed = split.paths, split.labels, transform, seed
        self.read = read

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, key):
        i, epoch = key if isinstance(key, tuple) else (key, 0)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(derive_seed(self.seed, "sample", epoch, i))
            img, j = self._read(i)
            return self.transform(img), self.labels[j]

    def _read(self, i: int):
        """(image, the index it came from): sample i, or the next readable one."""
        for k in range(min(len(self.paths), 16)):
            j = (i + k) % len(self.paths)
            try:
                img = self.read(self.paths[j])
            except Exception as e:  # noqa: BLE001 - any decode failure: use the next sample
                warnings.warn(f"torchvision loader: cannot read {self.paths[j]} ({type(e).__name__}: {e}); "
                              "using the next sample instead", RuntimeWarning, stacklevel=2)
                continue
            return img, j
        raise RuntimeError(f"torchvision loader: 16 consecutive unreadable files from {self.paths[i]}")


class _Keys(Sampler):
    """The (index, epoch) keys of the pass being delivered (set by the loader per pass)."""

    def __init__(self):
        self.keys: list[tuple[int, int]] = []

    def __iter__(self):
        return iter(self.keys)

    def __len__(self):
        return len(self.keys)


def _worker_init(worker_id: int) -> None:
    die_with_parent()                    # a SIGKILLed run leaves no DataLoader worker behind


class TorchvisionLoader(EpochLoader):
    """The `base.Loader` contract over a torch DataLoader; each sample's augmentation is
    seeded by `derive_seed(seed, "sample", epoch, index)` in the worker that decodes it.

    `pipeline`: "pil" (default, the baseline every benchmark ratio divides by: PIL images
    through `pil_transform`) or "tensor" (uint8 tensors through `reference_transform`, the
    semantic reference; kept to measure against, `benchmarks/throughput.py` row
    torchvision-tensor)."""

    PIPELINES = {"pil": (pil_transform, _read_pil), "tensor": (reference_transform, read_rgb)}

    def __init__(self, split, spec: AugmentSpec, opts: LoaderOptions, pipeline: str = "pil"):
        self._init_epochs(len(split), opts)
        self.sampler = _Keys()
        transform, read = self.PIPELINES[pipeline]
        self.pipeline = pipeline
        self.dataset = _Files(split, transform(spec, opts.train), opts.seed, read)
        # The DataLoader's own base seed (augmentations do not depend on it: _Files reseeds
        # per sample).
        self._generator = torch.Generator()
        workers = opts.workers
        self.loader = DataLoader(
            self.dataset, batch_size=opts.batch_size, sampler=self.sampler,
            num_workers=workers, pin_memory=opts.device.type == "cuda",
            persistent_workers=workers > 0, drop_last=opts.drop,
            prefetch_factor=4 if workers > 0 else None, generator=self._generator,
            worker_init_fn=_worker_init)

    def __iter__(self):
        epoch, first = self._begin()
        o = self.opts
        todo = self.sample_indices(epoch)[first * o.batch_size:]
        self.sampler.keys = [(i, epoch) for i in todo.tolist()]
        self._generator.manual_seed(derive_seed(o.seed, "workers", o.rank, epoch))
        for x, y in self.loader:
            yield (to_model_layout(x.to(o.device, non_blocking=True), o.dtype),
                   y.to(o.device, non_blocking=True))


STREAMS = 8         # streams per rank at most (fewer with fewer shards); --workers never changes them


# ---- the streaming variant over webdataset shards (loaders/shards.py): The torchvision loader over webdataset shards (`--loader torchvision`, `--data webdataset:`).
@dataclass(frozen=True)
class _Task:
    """One stream of one pass: its shards [(path, count, first id)], its shuffle seed (None:
    no shuffle), and the chunks it must deliver, k0..k1-1, of `chunk` samples each."""
    stream: int
    shards: tuple
    epoch: int
    shuffle_seed: int | None
    k0: int
    k1: int
    chunk: int
    buffer: int


def _stream_ids(task: _Task) -> list[int]:
    """The sample ids of a stream in delivery order (what the worker yields, without reading)."""
    ids = (off + p for _, count, off in task.shards for p in range(count))
    return list(_shuffled(ids, task))


def _shuffled(items, task: _Task):
    if task.shuffle_seed is None:
        return items
    import webdataset as wds
    return wds.shuffle(task.buffer, task.buffer, rng=random.Random(task.shuffle_seed))(iter(items))


class _Streams(IterableDataset):
    """What each DataLoader worker runs: the pass's tasks dealt to workers by worker id."""

    def __init__(self, split: ShardSplit, transform, seed: int):
        self.split, self.transform, self.seed = split, transform, seed
        self.tasks: list[_Task] = []

    def __iter__(self):
        """This worker's streams (tasks w, w + workers, ...), a chunk of each in turn."""
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        runs = [self._run(t) for t in self.tasks[wid::nw]]
        while runs:
            for r in list(runs):
                try:
                    yield next(r)
                except StopIteration:
                    runs.remove(r)

    def _sample(self, img, sid: int, epoch: int) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(derive_seed(self.seed, "sample", epoch, sid))
            return self.transform(img)

    def _run(self, t: _Task):
        """Chunks (stream, k, images, labels, ids) k0..k1-1 of one stream. A bad sample
        takes the next good one of the stream (the last one at the stream's end)."""
        raw = (s for path, count, off in t.shards
               for s in shard_samples(path, count, off, self.split.num_classes))
        lo, hi = t.k0 * t.chunk, t.k1 * t.chunk
        slots: list = []                     # [sid, (image, label, source id) or None], chunk k on
        waiting: list = []                   # slots waiting for the next good sample
        last, k = None, t.k0
        for p, (sid, key, img, label) in enumerate(_shuffled(raw, t)):
            if p < lo:
                continue                     # before the start batch: read, never decoded
            if p >= hi:
                break
            good = None
            if img is not None:
                try:
                    good = (_read_pil(io.BytesIO(img[0])), label, sid)
                except Exception as e:  # noqa: BLE001 - any decode failure: take another sample
                    warn_member(self._path(sid), key, f"{type(e).__name__}: {e}",
                                "the stream's next good sample is used instead")
            slots.append([sid, good])
            if good is None:
                waiting.append(slots[-1])
                continue
            last = good
            for w in waiting:
                w[1] = good
            waiting = []
            while len(slots) >= t.chunk:
                yield self._chunk(t, k, slots[:t.chunk])
                slots, k = slots[t.chunk:], k + 1
        if waiting and last is None:
            raise RuntimeError(f"torchvision loader: no readable sample in the stream of {t.shards[0][0]}")
        for w in waiting:                    # bad samples at the stream's end: its last good one
            w[1] = last
        while slots:
            yield self._chunk(t, k, slots[:t.chunk])
            slots, k = slots[t.chunk:], k + 1

    def _chunk(self, t: _Task, k: int, slots):
        xs = torch.stack([self._sample(img, sid, t.epoch) for sid, (img, _, _) in slots])
        return (t.stream, k, xs, torch.tensor([g[1] for _, g in slots], dtype=torch.int64),
                torch.tensor([g[2] for _, g in slots], dtype=torch.int64))

    def _path(self, sid: int) -> str:
        return self.split.shards[shard_of(self.split, sid)]


class WdsTorchvisionLoader(StreamingLoader):
    """The `base.Loader` contract over shards streamed by DataLoader workers; order: the
    shard rule (`shards.rank_shards`), then buffer shuffles and the streams' round-robin."""

    def __init__(self, split: ShardSplit, spec: AugmentSpec, opts: LoaderOptions):
        self._init_stream(split, opts)
        self.dataset = _Streams(split, pil_transform(spec, opts.train), opts.seed)

    def _plan(self, epoch: int, first: int):
        """(tasks, needed chunks [(stream, k, position, length)]) of a pass from batch `first`."""
        o, C = self.opts, self.opts.batch_size
        mine = rank_shards(self.split, o, epoch)
        ns = max(1, min(STREAMS, len(mine)))
        offsets = self.split.offsets
        streams = [[(self.split.shards[i], self.split.counts[i], int(offsets[i])) for i in mine[s::ns]]
                   for s in range(ns)]
        lens = [sum(c for _, c, _ in st) for st in streams]
        nch = [-(-n // C) for n in lens]
        lo, hi, pos, needed = first * C, self.delivered, 0, []
        for k in range(max(nch, default=0)):
            for s in range(ns):
                if k < nch[s]:
                    n = min(C, lens[s] - k * C)
                    if pos < hi and pos + n > lo:
                        needed.append((s, k, pos, n))
                    pos += n
        tasks = []
        for s in range(ns):
            ks = [k for st, k, _, _ in needed if st == s]
            if ks:
                seed = derive_seed(o.seed, "shuffle", o.rank, epoch, s) if o.train else None
                tasks.append(_Task(s, tuple(streams[s]), epoch, seed, ks[0], ks[-1] + 1, C,
                                   max(1, o.shuffle_buffer // ns)))
        return tasks, needed

    def sample_indices(self, epoch: int) -> np.ndarray:
        tasks, needed = self._plan(epoch, 0)
        orders = {t.stream: _stream_ids(t) for t in tasks}
        out = [orders[s][k * self.opts.batch_size:][:n] for s, k, _, n in needed]
        flat = np.asarray([i for part in out for i in part], dtype=np.int64)
        return flat[: self.delivered]

    def __iter__(self):
        epoch, first = self._begin()
        o, B = self.opts, self.opts.batch_size
        tasks, needed = self._plan(epoch, first)
        if not tasks:
            return
        self.dataset.tasks = tasks
        nw = min(o.workers, len(tasks))
        loader = DataLoader(self.dataset, batch_size=None, num_workers=nw,
                            pin_memory=o.device.type == "cuda", prefetch_factor=2 if nw else None)
        lo, hi = first * B, self.delivered
        held, xs, ys = {}, [], []
        it = iter(loader)
        try:
            for s, k, pos, n in needed:
                while (s, k) not in held:          # chunks arrive round-robin: held is tiny
                    c = next(it)
                    held[(c[0], c[1])] = c
                _, _, x, y, _ = held.pop((s, k))
                a, b = max(0, lo - pos), min(n, hi - pos)
                xs.append(x[a:b])
                ys.append(y[a:b])
                while sum(len(v) for v in ys) >= B or (ys and (s, k) == needed[-1][:2]):
                    x_all, y_all = torch.cat(xs), torch.cat(ys)
                    xb, yb = x_all[:B], y_all[:B]
                    xs, ys = [x_all[B:]] if len(x_all) > B else [], [y_all[B:]] if len(y_all) > B else []
                    yield (to_model_layout(xb.to(o.device, non_blocking=True), o.dtype),
                           yb.to(o.device, non_blocking=True))
        finally:
            del it


TorchvisionLoader.shard_loader = WdsTorchvisionLoader
