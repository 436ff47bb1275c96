"""The DALI loader over webdataset shards (`--loader dali`, `--data webdataset:`).

Per pass, one `dali.dali_pipeline` whose reader is DALI's `fn.readers.webdataset` over this
rank's shards (`shards.rank_shards`, DALI's own sharding off), with the index files the
loader writes once into the cache (complete samples only), DALI's shuffle buffer
(`initial_fill` = `opts.shuffle_buffer`, seeded by (seed, "shuffle", rank, epoch);
training only), then decode and the whole spec as the file loader does. Each sample's id
comes from its `source_info` (shard path and offset) and its label from `.cls`, in one
`fn.python_function` per batch. `sample_indices` runs the reader alone (no decode);
`set_epoch(e, start_batch=k)` decodes and drops the first k batches (DALI's reader cannot
skip). A member DALI cannot decode is found with PIL, named in a warning and left out of
this run's index; the rank's quota is then filled from DALI's next pass over its shards.
"""
from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
import torch
from nvidia.dali import fn
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from loaders.base import LoaderOptions, derive_seed
from loaders.dali import READER, DrawFeed, Draws, _dali_dtype, _trim_heap, dali_pipeline
from loaders.shards import (ShardSplit, StreamingLoader, ensure_indexes, parse_label, rank_shards, read_index,
                            shard_samples, warn_member)
from loaders.spec import AugmentSpec


class _Ids:
    """fn.python_function body: (source_info, cls) per sample -> int32 [global id, label]."""

    def __init__(self, where: dict[str, tuple[np.ndarray, int]], n_classes: int):
        self.where, self.n_classes = where, n_classes     # shard path -> (image offsets, first id)

    def __call__(self, infos, clss):
        out = []
        for info, cls in zip(infos, clss):
            path, off, _ = bytes(np.asarray(info)).decode().rsplit(":", 2)
            offsets, first = self.where[path]
            sid = first + int(np.searchsorted(offsets, int(off)))
            out.append(np.array([sid, parse_label(bytes(np.asarray(cls)), self.n_classes)], np.int32))
        return out


class WdsDaliLoader(StreamingLoader):
    """The `base.Loader` contract over shards read by DALI's webdataset reader; order: the
    shard rule, then DALI's shuffle buffer."""

    def __init__(self, split: ShardSplit, spec: AugmentSpec, opts: LoaderOptions):
        self._init_stream(split, opts)
        self.spec = spec
        self.index = ensure_indexes(split)
        self.device = torch.device(opts.device)
        self.dali_device = "gpu" if self.device.type == "cuda" else "cpu"
        self.device_id = (self.device.index or 0) if self.dali_device == "gpu" else None
        hw = split.image_hw
        self.source_first = hw is not None and max(hw) <= spec.size
        self.source_hw = hw if self.source_first else None
        self.width = Draws(spec, opts.train).width
        self.bad: dict[int, set[int]] = {}      # shard -> positions left out of this run's index
        self._private: Path | None = None

    # ---- what the reader reads
    def _shards(self, epoch: int) -> tuple[list[str], list[str], dict]:
        mine = rank_shards(self.split, self.opts, epoch)
        paths, idx, where = [], [], {}
        offsets = self.split.offsets
        for i in mine:
            rows = read_index(self.index[i])           # positions: the full index's
            paths.append(self.split.shards[i])
            idx.append(str(self._index(i)))
            where[self.split.shards[i]] = (np.asarray([r[0][1] for r in rows], np.int64), int(offsets[i]))
        return paths, idx, where

    def _index(self, i: int) -> Path:
        if i in self.bad:
            return self._private / f"{i}.idx"
        return self.index[i]

    def _reader(self, epoch: int):
        paths, idx, where = self._shards(epoch)
        o = self.opts
        seed = derive_seed(o.seed, "shuffle", o.rank, epoch) % (1 << 31)

        def reader():
            img, cls = fn.readers.webdataset(paths=paths, index_paths=idx, ext=["jpg;jpeg;png", "cls"],
                                             missing_component_behavior="error", random_shuffle=o.train,
                                             initial_fill=max(1, o.shuffle_buffer), seed=seed, name=READER)
            info = fn.get_property(img, key="source_info")
            ids = fn.python_function(info, cls, function=_Ids(where, self.split.num_classes),
                                     batch_processing=True, num_outputs=1)
            return img, ids
        return reader

    # ---- the contract
    def sample_indices(self, epoch: int) -> np.ndarray:
        o = self.opts
        if self.delivered == 0:
            return np.zeros(0, np.int64)
        reader = self._reader(epoch)
        pipe = _reader_only(reader, batch_size=o.batch_size, num_threads=1, device_id=None, seed=o.seed)
        pipe.build()
        ids = []
        while len(ids) < self.delivered:
            (out,) = pipe.run()
            ids += [int(np.asarray(out[i])[0]) for i in range(len(out))]
        del pipe
        _trim_heap()
        return np.asarray(ids[: self.delivered], np.int64)

    def _iterator(self, epoch: int):
        o = self.opts
        feed = DrawFeed(o.seed, o.rank, o.batch_size, self.width, [(epoch if o.train else 0, 1 << 30, 0)])
        pipe = dali_pipeline(None, None, self.spec, o.train, self.dali_device, feed=feed,
                             out_dtype=_dali_dtype(o.dtype), source_first=self.source_first,
                             source_hw=self.source_hw, reader=self._reader(epoch), batch_size=o.batch_size,
                             num_threads=max(1, o.workers), device_id=self.device_id, seed=o.seed)
        pipe.build()
        return DALIGenericIterator([pipe], ["images", "labels"], size=-1, auto_reset=False)

    def __iter__(self):
        epoch, first = self._begin()
        o, B = self.opts, self.opts.batch_size
        b, nb, attempts = first, len(self), 0
        while b < nb:
            it, done = None, 0
            try:
                it = self._iterator(epoch)
                for out in it:                       # batches 0.. of the pass; drop those before b
                    if done >= b:
                        lab = out[0]["labels"]
                        n = min(B, self.delivered - done * B)
                        x = out[0]["images"][:n].permute(0, 3, 1, 2)
                        yield (x if x.dtype == o.dtype else x.to(o.dtype)), lab[:n, 1].to(torch.int64)
                        b += 1
                    done += 1
                    if done >= nb:
                        break
            except RuntimeError as err:
                attempts += 1
                if attempts > 20 or not self._leave_out_bad(epoch, err):
                    raise
            finally:
                del it
                _trim_heap()

    def _leave_out_bad(self, epoch: int, err: Exception) -> bool:
        """After a failed batch: this pass's samples PIL cannot decode (or missing from a
        shard cut short), warned about and left out of this run's index (a private copy).
        False when none is found."""
        from PIL import Image
        found = False
        for i in rank_shards(self.split, self.opts, epoch):
            path, off = self.split.shards[i], int(self.split.offsets[i])
            bad = set()
            for sid, key, img, _ in shard_samples(path, self.split.counts[i], off, self.split.num_classes):
                if sid - off in self.bad.get(i, ()):
                    continue
                try:
                    if img is None:
                        raise EOFError("missing from the shard")
                    with Image.open(io.BytesIO(img[0])) as im:
                        im.convert("RGB")
                except Exception as e:  # noqa: BLE001 - any failure to decode: leave it out
                    warn_member(path, key, f"{type(e).__name__}: {e}", "left out of this run's index")
                    bad.add(sid - off)
            if bad:
                found = True
                self.bad.setdefault(i, set()).update(bad)
                if self._private is None:          # removed with the loader
                    self._tmp = tempfile.TemporaryDirectory(prefix="dali-wds-", dir=self.split.cache_dir)
                    self._private = Path(self._tmp.name)
                rows = [r for p, r in enumerate(read_index(self.index[i])) if p not in self.bad[i]]
                text = [f"v1.2 {len(rows)}"] + [" ".join(f"{e} {o} {s} {n}" for e, o, s, n in r) for r in rows]
                (self._private / f"{i}.idx").write_text("\n".join(text) + "\n")
        return found


def _reader_only(reader, **kw):
    from nvidia.dali import pipeline_def

    @pipeline_def(**kw)
    def pipe():
        _, ids = reader()
        return ids
    return pipe()

