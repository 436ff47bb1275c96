"""NVIDIA DALI loader (`--loader dali`): decode and the whole spec in one DALI pipeline.

One pipeline definition (`dali_pipeline`) for both devices: on CUDA, JPEG decode on the GPU
("mixed") and every image op on "gpu"; without a GPU the same graph on the CPU
(`device_id=None`). Per sample: read this rank's file list (`fn.readers.file`), decode,
per-sample parameters and warp matrix from `loaders.params` (uniforms from `DrawFeed`,
keyed by (seed, rank, epoch, batch); one `fn.python_function` call per batch), colour at
the source size (`fn.hsv`: DALI's YIQ hue rotation, saturation with grayscale folded in;
`fn.brightness_contrast` pivoting on the image's grey mean), normalise, then ONE
`fn.experimental.warp_perspective` for the resize and the whole geometry. Epochs: the loader
lays out one file list of this rank's `base.epoch_indices` for a block of consecutive
epochs, so `set_epoch(n)` replays epoch n exactly. A file DALI cannot decode is found,
named in a warning and replaced by the next readable sample for the rest of the run
(`DaliLoader`). The pipeline step by step, the differences from the reference (op order,
hue, one warp) and measurements: docs/loaders.md.
"""
from __future__ import annotations

from pathlib import Path
import tempfile
import io
import ctypes
import warnings
from dataclasses import replace

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.data_node import DataNode
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from loaders.base import EpochLoader, LoaderOptions, batch_seed, batches_per_epoch, derive_seed
from loaders.params import NCOLS, center_crop_box, ncols, params_from_uniforms, warp_matrix
from loaders.spec import LUMA, AugmentSpec

READER = "Reader"
GEOMETRY = ("crop", "rotate", "translate", "perspective")   # ops the single warp composes
from loaders.shards import (ShardSplit, StreamingLoader, ensure_indexes, parse_label, rank_shards, read_index,
                            shard_samples, warn_member)


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


# ------------------------------------------------------- random parameters and matrices

class Draws:
    """The pipeline's `fn.python_function` body, one vectorised call per batch: the uniform
    draws -> the spec's per-sample parameters and warp matrices (`loaders.params`, the
    mapping augment.py uses, in torch on the CPU) -> DALI's operator arguments."""

    def __init__(self, spec: AugmentSpec, train: bool = True, scale_src: bool = True,
                 src_hw: tuple[int, int] | None = None, rrc_decode: str = "slice",
                 shrink: bool = False):
        """`scale_src`: the warp also resizes the source to the training size; `src_hw`:
        the sources' common (height, width), or None when sizes vary (then the pipeline
        passes each image's shape). spec.resize "rrc": the pipeline passes each file's
        shape; `rrc_decode` "slice": the box is decoded alone (outputs "anchor", "shape")
        and, with `shrink` (sources larger than S), resized to S x S by the pipeline, else
        mapped onto the canvas by the warp; "full": the warp cuts it from the image."""
        self.spec = spec if train else replace(spec.without(), resize="stretch")
        sp = self.spec
        self.rrc = sp.resize == "rrc"
        self.slice = self.rrc and rrc_decode == "slice"
        self.shrink = self.slice and shrink
        self.boxed = self.rrc and not self.slice          # the box is part of the warp
        self.scale_src = scale_src and not self.slice
        self.src_hw = src_hw if self.scale_src else (spec.size, spec.size)
        self.geometric = any(getattr(sp, op) for op in GEOMETRY)
        self.jitter = sp.jitter
        self.colour = sp.jitter or sp.grayscale
        self.width = ncols(sp) if sp.any_enabled else 0
        # What the pipeline needs from this object, per batch.
        self.warp = self.geometric or self.scale_src or (self.rrc and not self.shrink)
        self.shape_input = self.scale_src and src_hw is None and not self.rrc
        self.outputs = ["anchor", "shape"] if self.slice else []
        if self.warp and (self.geometric or sp.flip or self.shape_input or self.rrc):
            self.outputs.append("matrix")
        elif not self.warp and sp.flip:
            self.outputs.append("mirror")
        if self.colour:
            self.outputs += ["hue", "saturation"]
        if self.jitter:
            self.outputs += ["brightness", "contrast"] + ([] if self.slice else ["grey"])

    def constant_matrix(self) -> list[float]:
        """The warp's matrix when it is the same for every sample (a plain resize)."""
        p = params_from_uniforms(torch.zeros(1, NCOLS), replace(self.spec.without(), resize="stretch"))
        return warp_matrix(p, self.spec.size, self.src_hw)[0].to(torch.float32).ravel().tolist()

    def __call__(self, u, *rest):
        """fn.python_function body: (draws[, file or image shapes][, channel means]) -> one
        list of per-sample arrays for each name in `self.outputs`."""
        rest = list(rest)
        n, outs = len(u), {}
        shapes = lambda: torch.from_numpy(np.stack(rest.pop(0)).reshape(n, -1)[:, :2].astype(np.float64))  # noqa: E731
        orig = shapes() if self.rrc else None
        p = params_from_uniforms(torch.from_numpy(np.stack(u)), self.spec, orig)
        hw = shapes() if self.shape_input else self.src_hw
        if self.rrc and self.scale_src and self.src_hw is None:
            hw = orig                                   # decoded at the files' own sizes
        if self.slice:                                  # (x, y) and (w, h) for image_slice
            outs["anchor"], outs["shape"] = p.box[:, [1, 0]], p.box[:, [3, 2]]
            hw = self.src_hw if self.shrink else p.box[:, 2:]
        if "matrix" in self.outputs:
            outs["matrix"] = warp_matrix(p, self.spec.size, hw, box=self.boxed)
        if "mirror" in self.outputs:
            outs["mirror"] = p.flip.to(torch.int32)
        if self.colour:                  # grayscale = saturation 0 (the same luma blend)
            outs["hue"] = p.hue * 360.0                                 # turns -> degrees
            outs["saturation"] = p.saturation * ~p.grayscale
        if self.jitter:
            outs.update(brightness=p.brightness, contrast=p.contrast)
            if not self.slice:
                outs["grey"] = grey_mean(rest.pop(0))
        return tuple([np.asarray(v) for v in outs[k].numpy().astype(
            np.int32 if k == "mirror" else np.float32)] for k in self.outputs)


def grey_mean(means) -> torch.Tensor:
    """fn.reductions.mean's per-channel means of a batch -> each image's grey mean (LUMA):
    torchvision's contrast pivot."""
    m = torch.from_numpy(np.stack(means).reshape(len(means), 3).astype(np.float64))
    return m @ torch.tensor(LUMA, dtype=torch.float64)


def _grey_arrays(means) -> list[np.ndarray]:
    return [np.asarray(v) for v in grey_mean(means).numpy().astype(np.float32)]


class CenterArgs:
    """fn.python_function body for evaluation "center": the files' shapes -> per sample
    the resized width and height and the crop's (x, y) (torchvision's arithmetic,
    `params.center_crop_box`)."""

    def __init__(self, spec: AugmentSpec):
        self.spec = spec

    def __call__(self, shapes):
        rw, rh, anchor = [], [], []
        for shp in shapes:
            (h, w), (top, left) = center_crop_box(np.asarray(shp)[:2], self.spec)
            rw.append(np.array(w, np.float32)), rh.append(np.array(h, np.float32))
            anchor.append(np.array([left, top], np.int32))
        return rw, rh, anchor


# ------------------------------------------------------------------------ the pipeline

@pipeline_def
def dali_pipeline(files, labels, spec: AugmentSpec, train: bool, device: str, feed=None,
                  shard_id: int = 0, num_shards: int = 1, out_dtype=types.FLOAT,
                  source_first: bool = True, source_hw: tuple[int, int] | None = None,
                  debug: bool = False, rrc_decode: str = "slice", reader=None):
    """The loader's one pipeline; `device` is "cpu" or "gpu" (decode "mixed", ops "gpu").

    `source_first`: every source is at most `spec.size`, so colour runs at the source size
    and the warp upscales; otherwise images are resized (antialiased) to `spec.size` first.
    `source_hw`: the sources' common (height, width), None when sizes vary. Resize policy:
    training "rrc" decodes the box alone and resizes it (`rrc_decode` "slice") or cuts it
    in the warp ("full"); evaluation "center" resizes, then slices the centre crop.
    `labels` are passed through (the loader passes sample indices and maps them).
    `reader`: a callable returning (encoded images, labels) in place of the file reader
    (the webdataset loader's). Returns (images HWC normalised in out_dtype, labels int32
    (N, 1)[, draws, matrices])."""
    s = spec.size
    if reader is None:
        jpegs, labels = fn.readers.file(files=list(files), labels=list(labels), shard_id=shard_id,
                                        num_shards=num_shards, random_shuffle=False,
                                        pad_last_batch=True, name=READER)
    else:
        jpegs, labels = reader()
    # jpeg_fancy_upsampling: nvJPEG upsamples chroma like libjpeg-turbo (the reference).
    dec = dict(device="mixed" if device == "gpu" else "cpu", output_type=types.RGB,
               jpeg_fancy_upsampling=True)
    center = not train and spec.eval_resize == "center"
    draws = Draws(spec, train, scale_src=source_first and source_hw != (s, s) and not center,
                  src_hw=source_hw, rrc_decode=rrc_decode, shrink=not source_first)
    if not draws.slice:
        img = fn.decoders.image(jpegs, adjust_orientation=False, **dec)
    if center:             # Resize(short side) + CenterCrop, torchvision's arithmetic
        shapes = fn.peek_image_shape(jpegs, dtype=types.FLOAT)
        rw, rh, anchor = fn.python_function(shapes, function=CenterArgs(spec),
                                            batch_processing=True, num_outputs=3)
        img = fn.resize(img, resize_x=rw, resize_y=rh, interp_type=types.INTERP_LINEAR,
                        antialias=True)
        img = fn.slice(img, anchor, np.array([s, s], np.int32), normalized_anchor=False,
                       normalized_shape=False)
    elif not source_first and source_hw != (s, s) and not draws.slice:
        img = fn.resize(img, size=[s, s], interp_type=types.INTERP_LINEAR, antialias=True)
    # Per-sample uniform draws: from `feed` (a DrawFeed: keyed by epoch and batch), or
    # DALI's own seeded RNG when none is given.
    u = fn.external_source(source=feed, batch=True, dtype=types.FLOAT, ndim=1) if feed \
        else fn.random.uniform(range=[0.0, 1.0], shape=[max(1, draws.width)])
    outs = {}
    if draws.outputs:
        inputs = [u]
        if draws.rrc:                       # the files' shapes, from their headers
            inputs.append(fn.peek_image_shape(jpegs, dtype=types.FLOAT))
        if draws.shape_input:
            inputs.append(img.shape(dtype=types.FLOAT))
        if draws.jitter and not draws.slice:
            means = fn.reductions.mean(img, axes=[0, 1], dtype=types.FLOAT)
            inputs.append(means.cpu() if device == "gpu" else means)   # GPU -> CPU: 3 floats
        # One Python call per batch: ~60 fn.transforms.* operators cost more than the warp
        # (docs/loaders.md, "The pipeline").
        outs = fn.python_function(*inputs, function=draws, batch_processing=True,
                                  num_outputs=len(draws.outputs))
        outs = dict(zip(draws.outputs, outs if len(draws.outputs) > 1 else [outs]))
    if draws.slice:        # RandomResizedCrop: decode the box only (then as the reference: its
        img = fn.decoders.image_slice(jpegs, outs["anchor"], outs["shape"], normalized_anchor=False,
                                      normalized_shape=False, **dec)
        if draws.shrink:   # resize to s, antialiased; small sources: the warp upsamples it)
            img = fn.resize(img, size=[s, s], interp_type=types.INTERP_LINEAR, antialias=True)
        if draws.jitter:   # the contrast pivot: the grey mean of the resized box
            means = fn.reductions.mean(img, axes=[0, 1], dtype=types.FLOAT)
            outs["grey"] = fn.python_function(means.cpu() if device == "gpu" else means,
                                              function=_grey_arrays, batch_processing=True)
    if device == "gpu":
        labels = labels.gpu()
    mtx = draws.constant_matrix() if draws.warp else None
    mirror = 0
    if draws.outputs:
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
    """`fn.external_source` callback: each batch's uniform draws, (batch, width) float32,
    from a numpy generator seeded by `base.batch_seed(seed, rank, epoch, batch in epoch)`,
    so any epoch (or the rest of one, from a batch on) replays exactly on its own
    (set_epoch(n) after a restart). Called once per pipeline iteration, in order;
    `schedule` lists (epoch, batches, first batch) as the pipeline's stream lays them out."""

    def __init__(self, seed: int, rank: int, batch_size: int, width: int,
                 schedule=((0, 1 << 30, 0),)):
        self.seed, self.rank, self.shape = seed, rank, (batch_size, max(1, width))
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
        rng = np.random.default_rng(batch_seed(self.seed, self.rank, epoch, i))
        return rng.random(self.shape, np.float32)


class _Stream:
    """One pipeline over a block of consecutive epochs, and where its reader is."""

    def __init__(self, iterator, epochs: list[tuple[int, int, int, int]]):
        self.iterator = iterator
        self.epochs = epochs        # [(epoch key, samples, batches, first batch)] of this rank
        self.pos = 0                # index into epochs of the next epoch to deliver
        self.busy = False           # an epoch is being delivered from it


class DaliLoader(EpochLoader):
    """The `base.Loader` contract over `dali_pipeline`.

    Order and sharding: this rank's `base.epoch_indices`, the rule every loader follows.
    The pipeline's reader reads a file list of this rank's samples only (no DALI
    sharding), laid out for a block of consecutive epochs (up to 16, at most
    `BLOCK_SAMPLES` entries) in whole batches: the ragged tail dropped, or padded with its
    last sample and trimmed on delivery. Consecutive epochs continue one pipeline (its
    read-ahead is the next epoch's first batches); `set_epoch(n, start_batch=k)`, an epoch
    out of sequence, or an epoch left early starts a new block at n, batch k (the batches
    before k are never read). Draws are keyed by (seed, rank, epoch, batch) (`DrawFeed`),
    so an epoch comes out identical either way.

    Unreadable files: a file that fails in DALI (changed since the ingest, or rejected by
    DALI's decoder) fails a batch; the loader finds it (DALI's reader errors name the
    file; its decoder errors do not, so it checks this epoch's remaining files with PIL,
    then with DALI's decoder one by one), warns naming it, and from then on reads the next
    readable sample of the split in its place (as the torchvision loader does), resuming
    the epoch at the batch that failed. Every rank therefore yields exactly len() batches
    (DDP stays in step), and `sample_indices` shows the replacements.

    Output: DALI's NHWC buffer handed over by dlpack (no copy), permuted to NCHW (which
    is channels_last). DALI's iterator with the dynamic executor passes buffers DALI no
    longer reuses (the dlpack capsule owns them); without it, it copies into fresh
    tensors: a batch stays valid however long the consumer holds it (tested)."""

    BLOCK_SAMPLES = 400_000         # file-list entries per pipeline: ~0.7 s to build

    def __init__(self, split, spec: AugmentSpec, opts: LoaderOptions, *, rrc_decode: str = "slice"):
        self.split, self.spec, self.rrc_decode = split, spec, rrc_decode
        self._init_epochs(len(split), opts)
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
        self.bad: set[int] = set()              # samples found unreadable in this run
        self._replace: np.ndarray | None = None  # sample -> the sample read in its place
        self._stream: _Stream | None = None

    # ---- epoch bookkeeping
    def sample_indices(self, epoch: int) -> np.ndarray:
        idx = super().sample_indices(epoch)
        return idx if self._replace is None else self._replace[idx]

    def _key(self, epoch: int) -> int:
        return epoch if self.opts.train else 0      # evaluation: every epoch is the same

    def _mark_bad(self, found: list[int]) -> None:
        """Read the next readable sample of the split (cyclically) in place of each bad one."""
        self.bad |= set(found)
        n = self.n_samples
        if len(self.bad) >= n:
            raise RuntimeError(f"DALI loader: no readable image left in the {self.split.name} split")
        replace = np.arange(n)
        for i in sorted(self.bad):
            j = i
            while j in self.bad:
                j = (j + 1) % n
            replace[i] = j
        self._replace = replace
        names = ", ".join(self.split.paths[i] for i in sorted(found))
        warnings.warn(f"DALI loader: cannot read {names}; using the next readable sample of the "
                      "split instead for the rest of the run", RuntimeWarning, stacklevel=3)

    # ---- pipelines
    def build_pipeline(self, indices, feed=None, seed=0, debug=False):
        """A built pipeline reading `indices` (samples, in order). Draws come from `feed`
        (default: keyed by `seed`, epoch 0)."""
        feed = feed or DrawFeed(seed, self.opts.rank, self.opts.batch_size, self.width)
        pipe = dali_pipeline(
            [self.split.paths[i] for i in indices], [int(i) for i in indices], self.spec,
            self.opts.train, self.dali_device, feed=feed, out_dtype=_dali_dtype(self.opts.dtype),
            source_first=self.source_first, source_hw=self.source_hw, debug=debug,
            rrc_decode=self.rrc_decode,
            batch_size=self.opts.batch_size, num_threads=max(1, self.opts.workers),
            device_id=self.device_id, seed=self.opts.seed)
        pipe.build()
        return pipe

    def _segment(self, share: np.ndarray) -> tuple[np.ndarray, int]:
        """One epoch's samples as whole batches: the ragged tail dropped, or padded with its
        last sample (delivered trimmed). Returns (stream entries, batches)."""
        bs = self.opts.batch_size
        nb = batches_per_epoch(len(share), self.opts)
        if len(share) == 0 or nb == 0:
            return share[:0], 0
        if self.opts.drop:
            return share[: nb * bs], nb
        return np.concatenate([share, np.repeat(share[-1:], nb * bs - len(share))]), nb

    def _open(self, first: int, skip: int = 0) -> _Stream:
        """A pipeline streaming this rank's epochs first.. (a block of them) in whole
        batches, `first` from its batch `skip` on."""
        bs = self.opts.batch_size
        segments, epochs = [], []
        for e in range(first, first + self.block_epochs):
            b0 = skip if e == first else 0
            share = self.sample_indices(e)[b0 * bs:]
            seg, nb = self._segment(share)
            segments.append(seg)
            epochs.append((self._key(e), len(share), nb, b0))
        flat = np.concatenate(segments)
        if len(flat) == 0:
            return _Stream(None, epochs)
        feed = DrawFeed(self.opts.seed, self.opts.rank, bs, self.width,
                        [(key, nb, b0) for key, _, nb, b0 in epochs])
        pipe = self.build_pipeline(flat, feed=feed)
        it = DALIGenericIterator([pipe], ["images", "labels"], reader_name=READER,
                                 last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True)
        return _Stream(it, epochs)

    def _close(self) -> None:
        self._stream = None          # the iterator and its pipeline go with it
        _trim_heap()

    def __iter__(self):
        epoch, b = self._begin()     # b: the epoch's next batch to deliver
        bs = self.opts.batch_size
        s = self._stream
        if s is not None and (s.busy or b or s.pos >= len(s.epochs)
                              or s.epochs[s.pos][0] != self._key(epoch)):
            self._close()
        s, finished, attempts = None, False, 0
        try:
            while True:
                try:
                    if self._stream is None:
                        self._stream = self._open(epoch, skip=b)
                    s = self._stream
                    s.busy = True
                    _, count, nb, b0 = s.epochs[s.pos]
                    while b < b0 + nb:
                        out = next(s.iterator)[0]
                        y = out["labels"].view(-1)[: count - (b - b0) * bs]
                        x = out["images"][: len(y)]
                        b += 1
                        yield self._to_model(x), self.label_table[y.to(torch.int64)]
                    s.pos, s.busy, finished = s.pos + 1, False, True
                    return
                except RuntimeError as err:
                    if "pipeline" not in str(err).lower() and "dali" not in str(err).lower():
                        raise
                    self._close()            # a failed pipeline cannot go on
                    s, attempts = None, attempts + 1
                    found = self._find_bad(str(err), self.sample_indices(epoch)[b * bs:])
                    if not found or attempts > 20:
                        raise
                    self._mark_bad(found)    # then resume at batch b, the one that failed
        finally:
            if not finished and s is not None and self._stream is s:   # left mid-epoch
                self._close()

    def _to_model(self, x: torch.Tensor) -> torch.Tensor:
        """(N, H, W, C) DALI output -> NCHW view in channels_last memory (no copy unless the
        engine's dtype is one DALI cannot produce, bfloat16)."""
        x = x.permute(0, 3, 1, 2)
        return x if x.dtype == self.opts.dtype else x.to(self.opts.dtype)

    def _find_bad(self, message: str, candidates) -> list[int]:
        """The samples among `candidates` whose files failed. DALI's reader errors name the
        file; its decoder errors do not, so then: those PIL cannot fully decode (the
        ingest's test), else those DALI's own decoder rejects, one file at a time (slow;
        only ever after an error)."""
        by_path = {self.split.paths[i]: int(i) for i in candidates}
        named = [p for p in by_path if p in message]
        if not named:
            from PIL import Image
            for p in by_path:
                try:
                    with Image.open(p) as im:
                        im.load()
                except Exception:   # noqa: BLE001 - any failure to decode means unusable
                    named.append(p)
        return [by_path[p] for p in named or dali_rejects(list(by_path))]


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


# ---- the streaming variant over webdataset shards (loaders/shards.py): The DALI loader over webdataset shards (`--loader dali`, `--data webdataset:`).
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


DaliLoader.shard_loader = WdsDaliLoader


def _reader_only(reader, **kw):
    from nvidia.dali import pipeline_def

    @pipeline_def(**kw)
    def pipe():
        _, ids = reader()
        return ids
    return pipe()

