"""NVIDIA DALI loader (`--loader dali`): decode and the whole spec in one DALI pipeline.

One pipeline definition (`dali_pipeline`) for both devices: on CUDA, JPEG decode on the GPU
("mixed") and every image op on "gpu"; without a GPU the same graph on the CPU
(`device_id=None`). Per sample: read the epoch's file list (`fn.readers.file`, sharded by
DALI), decode, per-sample parameters and warp matrix from `loaders.params` (uniforms from
`DrawFeed`, keyed by (seed, rank, epoch, batch); one `fn.python_function` call per batch),
colour at the source size (`fn.hsv`: DALI's YIQ hue rotation, saturation with grayscale
folded in; `fn.brightness_contrast` pivoting on the image's grey mean), normalise, then ONE
`fn.experimental.warp_perspective` for the resize and the whole geometry. Epochs: the loader
lays out one file list for a block of consecutive epochs (each the permutation every loader
uses), so `set_epoch(n)` replays epoch n exactly. A file DALI cannot decode is found, named
in a warning and skipped for the rest of the run. The pipeline step by step, the
differences from the reference (op order, hue, one warp) and measurements: docs/loaders.md.
"""
from __future__ import annotations

import ctypes
import warnings
from dataclasses import replace

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.data_node import DataNode
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from loaders.base import LoaderOptions, batches_per_epoch, epoch_indices
from loaders.params import NCOLS, params_from_uniforms, warp_matrix
from loaders.spec import LUMA, AugmentSpec

READER = "Reader"
GEOMETRY = ("crop", "rotate", "translate", "perspective")   # ops the single warp composes


def _dali_dtype(dtype: torch.dtype):
    # DALI has no bfloat16: emit float32 and let torch convert on the device.
    return types.FLOAT16 if dtype == torch.float16 else types.FLOAT


def _trim_heap() -> None:
    """Return freed heap to the OS after a pipeline is torn down. DALI's executor threads
    allocate from many glibc arenas; without this, each rebuilt pipeline grew the RSS by
    ~5 MB (fragmentation, not a leak: flat with malloc_trim)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):      # not glibc: nothing to do
        pass


def shard_bounds(n: int, shard_id: int, num_shards: int) -> tuple[int, int]:
    """The [start, end) block DALI's readers give shard `shard_id` of `num_shards`."""
    return n * shard_id // num_shards, n * (shard_id + 1) // num_shards


# ------------------------------------------------------- random parameters and matrices

class Draws:
    """The pipeline's `fn.python_function` body, one vectorised call per batch: the uniform
    draws -> the spec's per-sample parameters and warp matrices (`loaders.params`, the
    mapping augment.py uses, in torch on the CPU) -> DALI's operator arguments."""

    def __init__(self, spec: AugmentSpec, train: bool = True, scale_src: bool = True,
                 src_hw: tuple[int, int] | None = None):
        """`scale_src`: the warp also resizes the source to the training size; `src_hw`:
        the sources' common (height, width), or None when sizes vary (then the pipeline
        passes each image's shape)."""
        self.spec = spec if train else spec.without()
        self.scale_src = scale_src
        self.src_hw = src_hw if scale_src else (spec.size, spec.size)
        sp = self.spec
        self.geometric = any(getattr(sp, op) for op in GEOMETRY)
        self.jitter = sp.jitter
        self.colour = sp.jitter or sp.grayscale
        self.width = NCOLS if sp.any_enabled else 0
        # What the pipeline needs from this object, per batch.
        self.warp = self.geometric or scale_src
        self.shape_input = scale_src and src_hw is None
        self.outputs = []
        if self.warp and (self.geometric or sp.flip or self.shape_input):
            self.outputs.append("matrix")
        elif not self.warp and sp.flip:
            self.outputs.append("mirror")
        if self.colour:
            self.outputs += ["hue", "saturation"]
        if self.jitter:
            self.outputs += ["brightness", "contrast", "grey"]

    def constant_matrix(self) -> list[float]:
        """The warp's matrix when it is the same for every sample (a plain resize)."""
        p = params_from_uniforms(torch.zeros(1, NCOLS), self.spec.without())
        return warp_matrix(p, self.spec.size, self.src_hw)[0].to(torch.float32).ravel().tolist()

    def __call__(self, u, *rest):
        """fn.python_function body: (draws[, image shapes][, channel means]) -> one list of
        per-sample arrays for each name in `self.outputs`."""
        p = params_from_uniforms(torch.from_numpy(np.stack(u)), self.spec)
        rest = list(rest)
        n, outs = len(p), {}
        if self.shape_input:
            hw = torch.from_numpy(np.stack(rest.pop(0)).reshape(n, -1)[:, :2].astype(np.float64))
        else:
            hw = self.src_hw
        if "matrix" in self.outputs:
            outs["matrix"] = warp_matrix(p, self.spec.size, hw)
        if "mirror" in self.outputs:
            outs["mirror"] = p.flip.to(torch.int32)
        if self.colour:                  # grayscale = saturation 0 (the same luma blend)
            outs["hue"] = p.hue * 360.0                                 # turns -> degrees
            outs["saturation"] = p.saturation * ~p.grayscale
        if self.jitter:
            means = torch.from_numpy(np.stack(rest.pop(0)).reshape(n, 3).astype(np.float64))
            outs.update(brightness=p.brightness, contrast=p.contrast,
                        grey=means @ torch.tensor(LUMA, dtype=torch.float64))
        return tuple([np.asarray(v) for v in outs[k].numpy().astype(
            np.int32 if k == "mirror" else np.float32)] for k in self.outputs)


# ------------------------------------------------------------------------ the pipeline

@pipeline_def
def dali_pipeline(files, labels, spec: AugmentSpec, train: bool, device: str, feed=None,
                  shard_id: int = 0, num_shards: int = 1, out_dtype=types.FLOAT,
                  source_first: bool = True, source_hw: tuple[int, int] | None = None,
                  debug: bool = False):
    """The loader's one pipeline; `device` is "cpu" or "gpu" (decode "mixed", ops "gpu").

    `source_first`: every source is at most `spec.size`, so colour runs at the source size
    and the warp upscales; otherwise images are resized (antialiased) to `spec.size` first.
    `source_hw`: the sources' common (height, width), None when sizes vary.
    `labels` are passed through (the loader passes sample indices and maps them).
    Returns (images HWC normalised in out_dtype, labels int32 (N, 1)[, draws, matrices])."""
    s = spec.size
    jpegs, labels = fn.readers.file(files=list(files), labels=list(labels), shard_id=shard_id,
                                    num_shards=num_shards, random_shuffle=False,
                                    pad_last_batch=True, name=READER)
    # jpeg_fancy_upsampling: nvJPEG upsamples chroma like libjpeg-turbo (the reference).
    img = fn.decoders.image(jpegs, device="mixed" if device == "gpu" else "cpu",
                            output_type=types.RGB, adjust_orientation=False,
                            jpeg_fancy_upsampling=True)
    if device == "gpu":
        labels = labels.gpu()
    resize = source_hw != (s, s)
    if not source_first and resize:
        img = fn.resize(img, size=[s, s], interp_type=types.INTERP_LINEAR, antialias=True)
    draws = Draws(spec, train, scale_src=source_first and resize, src_hw=source_hw)
    # Per-sample uniform draws: from `feed` (a DrawFeed: keyed by epoch and batch), or
    # DALI's own seeded RNG when none is given.
    u = fn.external_source(source=feed, batch=True, dtype=types.FLOAT, ndim=1) if feed \
        else fn.random.uniform(range=[0.0, 1.0], shape=[max(1, draws.width)])
    mtx = draws.constant_matrix() if draws.warp else None
    mirror = 0
    if draws.outputs:
        inputs = [u]
        if draws.shape_input:
            inputs.append(img.shape(dtype=types.FLOAT))
        if draws.jitter:
            means = fn.reductions.mean(img, axes=[0, 1], dtype=types.FLOAT)
            inputs.append(means.cpu() if device == "gpu" else means)   # GPU -> CPU: 3 floats
        # One Python call per batch: ~60 fn.transforms.* operators cost more than the warp
        # (docs/loaders.md, "The pipeline").
        outs = fn.python_function(*inputs, function=draws, batch_processing=True,
                                  num_outputs=len(draws.outputs))
        outs = dict(zip(draws.outputs, outs if len(draws.outputs) > 1 else [outs]))
        mtx = outs.get("matrix", mtx)
        mirror = outs.get("mirror", mirror)
        if draws.colour:
            img = fn.hsv(img, hue=outs["hue"], saturation=outs["saturation"])
        if draws.jitter:         # torchvision's pivot, the grey mean (DALI's default: 128)
            img = fn.brightness_contrast(img, brightness=outs["brightness"],
                                         contrast=outs["contrast"], contrast_center=outs["grey"])
    # Normalise at the working size (before upscaling: fewer pixels); the warp then fills
    # with the normalised value of black, per channel.
    img = fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="HWC",
                                   mirror=mirror,
                                   mean=[255.0 * m for m in spec.mean],
                                   std=[255.0 * v for v in spec.std])
    if mtx is not None:
        # Augmenting: black (normalised) outside the frame; a plain resize clamps, like the
        # reference's resize. warp_perspective even without perspective: DALI 2.4's CPU
        # warp_affine measured ~4x slower (docs/loaders.md). The matrix maps output -> source.
        border = {"fill_value": [-m / v for m, v in zip(spec.mean, spec.std)]} \
            if draws.geometric else {"border_mode": "replicate"}
        img = fn.experimental.warp_perspective(img, matrix=mtx, size=[s, s], inverse_map=True,
                                               pixel_origin="corner",
                                               interp_type=types.INTERP_LINEAR, **border)
    if out_dtype != types.FLOAT:
        img = fn.cast(img, dtype=out_dtype)
    if debug:   # the draws and the warp's matrices, for the tests
        return img, labels, u, (mtx if isinstance(mtx, DataNode) else labels)
    return img, labels


# -------------------------------------------------------------------------- the loader

class DrawFeed:
    """`fn.external_source` callback: each batch's uniform draws, (batch, width) float32, a
    pure function of (seed, rank, epoch, batch in epoch, attempt), so any epoch (or the
    rest of one, from a batch on) replays exactly on its own (set_epoch(n) after a
    restart). Called once per pipeline iteration, in order; `schedule` lists (epoch,
    batches, first batch) as the pipeline's stream lays them out."""

    def __init__(self, seed: int, rank: int, batch_size: int, width: int,
                 schedule=((0, 1 << 30, 0),), attempt: int = 0):
        self.key, self.shape = (seed, rank, attempt), (batch_size, max(1, width))
        self.schedule, self.i = list(schedule), 0

    def __call__(self):
        i, self.i = self.i, self.i + 1
        for epoch, n, first in self.schedule:
            if i < n:
                i += first
                break
            i -= n
        else:                        # read-ahead past the planned stream: never delivered
            epoch = 1 << 31
        seed, rank, attempt = self.key
        return np.random.default_rng([seed, rank, epoch, i, attempt]).random(self.shape, np.float32)


class _Stream:
    """One pipeline over a block of consecutive epochs, and where its reader is."""

    def __init__(self, iterator, epochs: list[tuple[int, np.ndarray, int]]):
        self.iterator = iterator
        self.epochs = epochs        # [(epoch key, this rank's samples in order, batches)]
        self.pos = 0                # index into epochs of the next epoch to deliver
        self.busy = False           # an epoch is being delivered from it


class DaliLoader:
    """The Loader protocol over `dali_pipeline` (see the module docstring)."""

    BLOCK_SAMPLES = 400_000         # file-list entries per pipeline: ~0.7 s to build

    def __init__(self, split, spec: AugmentSpec, opts: LoaderOptions):
        self.split, self.spec, self.opts = split, spec, opts
        self.device = torch.device(opts.device)
        self.dali_device = "gpu" if self.device.type == "cuda" else "cpu"
        if self.dali_device == "gpu":
            self.device_id = self.device.index if self.device.index is not None \
                else torch.cuda.current_device()
            self.device = torch.device("cuda", self.device_id)
        else:
            self.device_id = None
        # Colour at the source size only when no source is larger than the training size
        # (downscaling inside a warp would alias; those are resized, antialiased, first).
        self.source_first = all(h <= spec.size and w <= spec.size for h, w in split.sizes)
        sizes = set(map(tuple, split.sizes))
        self.source_hw = sizes.pop() if len(sizes) == 1 else None
        self.width = Draws(spec, opts.train).width
        # The reader yields sample indices; this maps them to labels on the device.
        self.label_table = torch.as_tensor(split.labels, dtype=torch.int64, device=self.device)
        self.block_epochs = max(1, min(16, self.BLOCK_SAMPLES // max(1, len(split))))
        self.bad: set[str] = set()
        self.epoch, self.start_batch = 0, 0
        self._stream: _Stream | None = None

    # ---- epoch bookkeeping
    def epoch_order(self, epoch: int) -> np.ndarray:
        """All ranks' samples of `epoch` in reading order: the same permutation as every
        loader's, truncated to a multiple of the world size when training. Rank r reads
        its r-th contiguous block (`shard_bounds`)."""
        order = epoch_indices(len(self.split), replace(self.opts, rank=0, world_size=1), epoch)
        if self.opts.train:
            order = order[: len(order) - len(order) % self.opts.world_size]
        return order

    def _share(self, order: np.ndarray, rank: int) -> np.ndarray:
        """Rank `rank`'s block of `order`, without the files found bad. (Ranks drop bad
        files from their own blocks only, so blocks stay a partition while each rank finds
        a bad file on its own.)"""
        a, b = shard_bounds(len(order), rank, self.opts.world_size)
        share = order[a:b]
        if self.bad:
            share = np.array([i for i in share if self.split.paths[i] not in self.bad], np.int64)
        return share

    def rank_indices(self, epoch: int) -> np.ndarray:
        return self._share(self.epoch_order(epoch), self.opts.rank)

    def _key(self, epoch: int) -> int:
        return epoch if self.opts.train else 0      # evaluation: every epoch is the same

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select epoch `epoch`; the next iteration starts at its batch `start_batch` (a
        resume: the same batches the uninterrupted epoch gives from there, none decoded
        for the batches skipped)."""
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return batches_per_epoch(len(self.rank_indices(self.epoch)), self.opts)

    # ---- pipelines
    def build_pipeline(self, indices, shard_id=0, num_shards=1, feed=None, seed=0, debug=False):
        """A built pipeline reading `indices` (samples, in order) with DALI's sharding.
        Draws come from `feed` (default: keyed by `seed`, epoch 0)."""
        feed = feed or DrawFeed(seed, self.opts.rank, self.opts.batch_size, self.width)
        pipe = dali_pipeline(
            [self.split.paths[i] for i in indices], [int(i) for i in indices], self.spec,
            self.opts.train, self.dali_device, feed=feed, shard_id=shard_id,
            num_shards=num_shards, out_dtype=_dali_dtype(self.opts.dtype),
            source_first=self.source_first, source_hw=self.source_hw, debug=debug,
            batch_size=self.opts.batch_size, num_threads=max(1, self.opts.workers),
            device_id=self.device_id, seed=self.opts.seed)
        pipe.build()
        return pipe

    def _segment(self, share: np.ndarray) -> tuple[np.ndarray, int]:
        """One rank's epoch as whole batches: the ragged tail dropped, or padded with its
        last sample (delivered trimmed). Returns (stream entries, batches)."""
        bs = self.opts.batch_size
        nb = batches_per_epoch(len(share), self.opts)
        if len(share) == 0 or nb == 0:
            return share[:0], 0
        if self.opts.drop:
            return share[: nb * bs], nb
        return np.concatenate([share, np.repeat(share[-1:], nb * bs - len(share))]), nb

    def _open(self, first: int, head: np.ndarray | None = None, attempt: int = 0,
              skip: int = 0) -> _Stream:
        """A pipeline streaming epochs first.. (a block of them) in whole batches per rank.

        Normally every rank's stream is laid out back to back, equally long, and DALI's
        sharding (shard_id=rank, num_shards=world) hands each rank its own; after a bad
        file (`head`: this rank's remaining samples of `first`) the stream is this rank's
        alone, for the rest of that epoch. `skip`: start `first` at that batch."""
        opts = self.opts
        world = 1 if head is not None else opts.world_size
        streams = [[] for _ in range(world)]
        epochs = []
        for e in ([first] if head is not None else range(first, first + self.block_epochs)):
            order = self.epoch_order(e)
            first_batch = skip if e == first else 0
            for r in range(world):
                share = np.asarray(head, np.int64) if head is not None else self._share(order, r)
                share = share[first_batch * opts.batch_size:]
                seg, nb = self._segment(share)
                streams[r].append(seg)
                if head is not None or r == opts.rank:
                    epochs.append((self._key(e), share, nb, first_batch))
        streams = [np.concatenate(st) for st in streams]
        length = max(len(st) for st in streams)
        if length == 0:
            return _Stream(None, epochs)
        # Equal shards: pad each rank's stream with its last sample (never delivered).
        flat = np.concatenate([np.concatenate([st, np.repeat(st[-1:] if len(st) else
                                                             np.zeros(1, np.int64), length - len(st))])
                               for st in streams])
        feed = DrawFeed(opts.seed, opts.rank, opts.batch_size, self.width,
                        [(e, nb, b0) for e, _, nb, b0 in epochs], attempt)
        pipe = self.build_pipeline(flat, 0 if head is not None else opts.rank, world, feed=feed)
        it = DALIGenericIterator([pipe], ["images", "labels"], reader_name=READER,
                                 last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True)
        return _Stream(it, epochs)

    def _close(self) -> None:
        self._stream = None          # the iterator and its pipeline go with it
        _trim_heap()

    def __iter__(self):
        epoch, skip, self.start_batch = self.epoch, self.start_batch, 0
        s = self._stream
        if (s is None or s.busy or skip or s.pos >= len(s.epochs)
                or s.epochs[s.pos][0] != self._key(epoch)):
            self._close()
            s = self._stream = self._open(epoch, skip=skip)
        queue, attempt, done = s.epochs[s.pos][1], 0, 0
        finished, s.busy = False, True
        try:
            while True:
                try:
                    e, share, nb, _ = s.epochs[s.pos]
                    for b in range(nb):
                        out = next(s.iterator)[0]
                        y = out["labels"].view(-1)[: len(share) - b * self.opts.batch_size]
                        x = out["images"][: len(y)]
                        done += len(y)
                        yield self._to_model(x), self.label_table[y.to(torch.int64)]
                    s.pos, s.busy, finished = s.pos + 1, False, True
                    return
                except RuntimeError as err:
                    if "pipeline" not in str(err).lower() and "dali" not in str(err).lower():
                        raise
                    s = self._stream = None          # a failed pipeline cannot go on
                    _trim_heap()
                    remaining = [i for i in queue[done:] if self.split.paths[i] not in self.bad]
                    found = self._find_bad(str(err), remaining)
                    if not found or attempt >= 20:
                        raise
                    self.bad |= set(found)
                    warnings.warn(f"DALI loader: skipping {len(found)} unreadable image(s) for "
                                  f"the rest of the run: {', '.join(sorted(found))}",
                                  RuntimeWarning, stacklevel=2)
                    queue = np.array([i for i in remaining if self.split.paths[i] not in self.bad],
                                     np.int64)
                    attempt, done = attempt + 1, 0
                    if self._segment(queue)[1] == 0:
                        return
                    s = self._stream = self._open(epoch, head=queue, attempt=attempt)
                    s.busy = True
        finally:
            if not finished and self._stream is s:   # left mid-epoch: the stream is spent
                self._close()

    def _to_model(self, x: torch.Tensor) -> torch.Tensor:
        """(N, H, W, C) DALI output -> NCHW view in channels_last memory (no copy unless the
        engine's dtype is one DALI cannot produce, bfloat16)."""
        x = x.permute(0, 3, 1, 2)
        return x if x.dtype == self.opts.dtype else x.to(self.opts.dtype)

    def _find_bad(self, message: str, candidates) -> list[str]:
        """Files among `candidates` that failed. DALI's reader errors name the file; its
        decoder errors do not, so then: those PIL cannot fully decode (the ingest's test),
        else those DALI's own decoder rejects, one file at a time (slow; only ever after
        an error)."""
        paths = [self.split.paths[i] for i in candidates]
        named = [p for p in paths if p in message]
        if named:
            return named
        from PIL import Image
        bad = []
        for p in paths:
            try:
                with Image.open(p) as im:
                    im.load()
            except Exception:   # noqa: BLE001 - any failure to decode means unusable
                bad.append(p)
        return bad or dali_rejects(paths)


@pipeline_def(batch_size=1, num_threads=1, exec_async=False, exec_pipelined=False,
              prefetch_queue_depth=1)
def _decode_one(files):
    jpegs, _ = fn.readers.file(files=list(files))
    return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB, adjust_orientation=False)


def dali_rejects(paths) -> list[str]:
    """The files DALI's CPU decoder cannot read, found by decoding one file per run."""
    bad, start = [], 0
    while start < len(paths):
        pipe = _decode_one(paths[start:], device_id=None)
        try:
            pipe.build()
            while start < len(paths):
                pipe.run()
                start += 1
        except RuntimeError:
            bad.append(paths[start])
            start += 1
        finally:
            del pipe
    return bad
