"""The torchvision loader over webdataset shards (`--loader torchvision`, `--data webdataset:`).

This rank's shards (`shards.rank_shards`) are dealt round-robin to min(8, shards) streams,
and the streams to the DataLoader workers. A stream reads its shards in order through the
webdataset package (`tarfile_samples`), shuffles them in a buffer (its share of
`opts.shuffle_buffer`; `webdataset.shuffle` seeded by (seed, "shuffle", rank, epoch,
stream); training only), decodes with PIL and applies `reference_transform` per sample,
seeded by (seed, "sample", epoch, sample id) as the file loader does. Streams hand over
chunks of `batch_size` samples; the main process takes them round-robin (a plan from the
counts alone: `sample_indices` needs no reading) and cuts batches, so --workers never
changes a batch. `set_epoch(e, start_batch=k)`: the samples before batch k are read, not
decoded. A member that does not decode is replaced by the stream's next good sample (its
last at the stream's end), with a warning naming shard and key.
"""
from __future__ import annotations

import io
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from loaders.base import LoaderOptions, derive_seed, to_model_layout
from loaders.common import read_rgb
from loaders.shards import ShardSplit, StreamingLoader, rank_shards, shard_of, shard_samples, warn_member
from loaders.spec import AugmentSpec
from loaders.torchvision import reference_transform

STREAMS = 8         # streams per rank at most (fewer with fewer shards); --workers never changes them


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

    def _sample(self, img: torch.Tensor, sid: int, epoch: int) -> torch.Tensor:
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
                    good = (read_rgb(io.BytesIO(img[0])), label, sid)
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
        self.dataset = _Streams(split, reference_transform(spec, opts.train), opts.seed)

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
