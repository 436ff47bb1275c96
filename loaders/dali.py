"""NVIDIA DALI loader: the spec's augmentations in one DALI pipeline, one warp per image.

One pipeline definition (`dali_pipeline`), parameterised by device: on a CUDA device the
JPEGs are decoded on the GPU (`fn.decoders.image(device="mixed")`) and every image op runs
on "gpu"; with no GPU the same graph runs on the CPU (`device_id=None`, ops on "cpu"). The
per-sample parameters are CPU argument inputs either way.

Per training sample:

1. read: `fn.readers.file` over a list of the dataset cache's files laid out per epoch
   and rank (see Epochs), sharded by DALI (`shard_id`/`num_shards`); the last batch
   policy (`drop_last`: drop the ragged batch, else pad it and trim on delivery) is
   applied per epoch in that layout; decode to RGB uint8 at the source size.
2. parameters: one vector of uniform draws per sample (`DrawFeed`, through
   `fn.external_source`: a numpy generator keyed by (seed, rank, epoch, batch), so every
   epoch replays on its own; `fn.random.uniform` when no feed is given) mapped to the
   spec's parameters with torchvision v2's distributions, and the per-sample 3x3 warp
   matrix, by one vectorised numpy call per batch (`Draws`, via `fn.python_function`).
   DALI charges about a millisecond per operator per batch on the CPU, and composing the
   matrix from `fn.transforms.*` and arithmetic took ~60 tiny operators (measured: ~25 ms
   per batch of 256, more than the warp); the numpy call costs ~2 ms.
3. colour at the source size, before the upscaling warp (32x32 for CIFAR instead of
   128x128: 16x fewer pixels): `fn.hsv` (hue; saturation, with grayscale folded in as
   saturation 0: the same luma blend), then `fn.brightness_contrast` pivoting on the
   image's grey mean (torchvision's pivot; DALI's default pivots on grey 128).
4. normalise at the working size (`fn.crop_mirror_normalize`, float32), still before the
   upscale; fewer pixels again, and the warp then needs no uint8 round trip.
5. ONE resampling for the whole geometry: resize to the training size, flip, pad-crop
   offset, rotation, translation and (with p per sample) perspective composed into one
   matrix and applied by `fn.experimental.warp_perspective` (bilinear, corner pixel
   origin, filled with the normalised value of black per channel). Also when the spec or
   the sample has no perspective: DALI 2.4's CPU `warp_affine` measured ~4x slower than
   `warp_perspective` here (850 vs 3400 images/s, 32->128).
6. the engine's dtype: float32 (CPU), float16 cast in the pipeline; DALI has no bfloat16,
   so that is float32 converted by torch on the device. The iterator hands over DALI's NHWC buffer
   (dlpack, no copy); the loader returns its NCHW permutation, which is channels_last.

Validation, and training with every augmentation off: decode, normalise, and the same warp
as a plain resize (edges clamped, as the reference's resize does); no warp at all when the
sources already have the training size (flip alone then mirrors in crop_mirror_normalize).
Sources larger than the training size are resized first (`fn.resize`, antialiased, like
the reference) and coloured and warped at the training size.

Differences from the reference (torchvision v2, `loaders/torchvision.py`), by design and
measured in tests/test_dali.py:

- Order. The report resizes first and applies ColorJitter/Grayscale between rotation and
  translation. Here, with sources no larger than the training size, colour comes first, at
  the source size. Per-pixel colour maps commute with resampling except (a) at the black
  fill: the reference jitters the pad/rotation fill too (contrast lifts black to
  (1-c)*mean), here it stays black, and (b) the contrast pivot: the reference's grey mean
  includes that fill, here it is the source's own mean.
- ColorJitter applies b, c, s, h in a random order per image and truncates to uint8 after
  each; here hsv then brightness+contrast, rounded. The linear parts commute (saturation
  and hue keep luma, the mean pivot scales with brightness): each op alone matches within
  1 level; together mean ~1.7, p99 ~10 levels where clipping between ops differs (the
  reference in another order differs from itself by mean 0.7, p99 8).
- Hue: DALI's hsv rotates chroma in YIQ, a linear approximation of torchvision's exact HSV
  shift; at the spec's +-0.05 turn, mean 1.9 / p99 17 levels on CIFAR-10, more on very
  saturated colours. DALI has no exact HSV op; not matched.
- One warp instead of a sequence: content one step moves out of the frame and a later
  step brings back is black in the sequence but real content here (kept; ~7% of the
  pixels on average at the spec's defaults, up to ~20%). Where the frame's edge is in
  view the warp blends it into the fill over half a source pixel (2 output pixels at 4x);
  the reference's resize clamps and only its later steps blend (~1 pixel); ~0.5% of the
  pixels at the defaults. Elsewhere the warp matches the step-by-step sequence within 2-3
  levels (the sequence resamples up to four times and rounds after each).
- Random draws follow torchvision's: integer crop offsets, integer perspective corner
  offsets in [0, int(d*size/2)], translations uniform then rounded (floor(x + 0.5); DALI
  2.4 has no `fn.round`), torchvision's perspective coefficients (start points at the
  corner pixels' indices, used as corner-origin coordinates) in closed form.
- EXIF orientation is not applied (the reference's `decode_image` does not either).

Epochs: DALI's reader can reshuffle by itself (`shuffle_after_epoch`, seeded), but only
along its own sequence of epochs, so `set_epoch(n)` could not select epoch n. Instead the
reader reads a file list that this loader lays out for a block of consecutive epochs
(up to 16, at most ~400k entries: ~0.7 s to build): epoch e is the permutation
`epoch_indices` gives every loader for (seed, e) - the reference loader's order -
truncated to a multiple of the world size when training; rank r's share is its r-th
contiguous block, cut to whole batches (the ragged tail dropped, or padded with its last
sample and trimmed on delivery: the last-batch policy); the ranks' streams are laid back
to back, equally long, and DALI's sharding (shard_id=rank, num_shards=world) hands each
rank its own. Consecutive epochs continue the same pipeline (its read-ahead is the next
epoch's first batches, not waste); `set_epoch(n)` out of sequence, or leaving an epoch
early, starts a new block at n, and since the draws are keyed by epoch and batch, epoch n
comes out identical either way (also after a restart). Tearing a pipeline down is
followed by `malloc_trim`: DALI's executor threads allocate from many glibc arenas, and
without it rebuilding grew the RSS by ~5 MB per pipeline.

Bad input: the dataset cache drops files it cannot decode at ingest. A file that fails in
DALI anyway (changed since, or rejected by DALI's decoder) fails a batch; the loader then
finds it (DALI's reader errors name the file; its decoder errors do not, so it checks the
remaining files with PIL, then with DALI's decoder one by one), warns with the names,
drops them for the rest of the run and resumes the epoch where it stopped, on a pipeline
over this rank's remaining samples. The epoch is short of those samples, never aborted.
"""
from __future__ import annotations

import ctypes
import warnings

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.data_node import DataNode
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from loaders.base import EpochLoader, LoaderOptions, batch_seed, batches_per_epoch
from loaders.spec import AugmentSpec

LUMA = (0.299, 0.587, 0.114)      # ITU-R 601 luma (torchvision uses 0.2989, 0.587, 0.114)
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


# ------------------------------------------------------- random parameters and matrices

class Draws:
    """Maps per-sample uniform draws in [0, 1) to the spec's random parameters, with
    torchvision v2's distributions, and builds each sample's warp matrix. Runs inside the
    pipeline as one vectorised `fn.python_function` call per batch; the tests use it to
    recover the parameters behind each output."""

    def __init__(self, spec: AugmentSpec, train: bool = True, scale_src: bool = True,
                 src_hw: tuple[int, int] | None = None):
        """`scale_src`: the warp also resizes the source to the training size; `src_hw`:
        the sources' common (height, width), or None when sizes vary (then the pipeline
        passes each image's shape)."""
        self.spec, self.scale_src, self.src_hw = spec, scale_src, src_hw
        on = (lambda name: train and getattr(spec, name))
        self.geometric = any(on(op) for op in GEOMETRY)
        self.jitter = on("jitter")
        self.colour = on("jitter") or on("grayscale")
        widths = {"flip": 1, "crop": 2, "rotate": 1, "translate": 2, "perspective": 9,
                  "grayscale": 1, "jitter": 4}
        self.slots, k = {}, 0
        for name, w in widths.items():
            if on(name):
                self.slots[name] = slice(k, k + w)
                k += w
        self.width = k
        # What the pipeline needs from this object, per batch.
        self.warp = self.geometric or scale_src
        self.shape_input = scale_src and src_hw is None
        self.outputs = []
        if self.warp and (self.geometric or "flip" in self.slots or self.shape_input):
            self.outputs.append("matrix")
        elif not self.warp and "flip" in self.slots:
            self.outputs.append("mirror")
        if self.colour:
            self.outputs += ["hue", "saturation"]
        if self.jitter:
            self.outputs += ["brightness", "contrast", "grey"]

    def constant_matrix(self) -> list[float]:
        """The warp's matrix when it is the same for every sample (a plain resize)."""
        return self.matrices({"n": 1})[0].astype(np.float32).ravel().tolist()

    # ---- parameters
    def params(self, u: np.ndarray) -> dict[str, np.ndarray]:
        """{name: (N, ...) array} from draws u of shape (N, width)."""
        sp, u = self.spec, np.asarray(u, np.float64)
        u = u.reshape(len(u), -1)
        n, s, out = len(u), float(sp.size), {}
        take = (lambda name: u[:, self.slots[name]])
        if "flip" in self.slots:
            out["flip"] = take("flip")[:, 0] < sp.flip_p
        if "crop" in self.slots:                      # RandomCrop: integer offsets 0..2p
            out["crop"] = np.floor(take("crop") * (2 * sp.crop_padding + 1))   # (x=j, y=i)
        if "rotate" in self.slots:
            out["angle"] = sp.rotate_degrees * (2 * take("rotate")[:, 0] - 1)
        if "translate" in self.slots:                 # RandomAffine rounds its shifts
            out["translate"] = np.floor(sp.translate_frac * s * (2 * take("translate") - 1) + 0.5)
        if "perspective" in self.slots:               # RandomPerspective: p, then corners
            v = take("perspective")
            bw = int(sp.perspective_distortion * (sp.size // 2)) + 1
            out["perspective"] = v[:, 0] < sp.perspective_p
            out["corners"] = np.floor(v[:, 1:] * bw) * out["perspective"][:, None]
        if "grayscale" in self.slots:
            out["gray"] = take("grayscale")[:, 0] < sp.grayscale_p
        if "jitter" in self.slots:                    # ColorJitter factors and hue
            v = take("jitter")
            for j, (name, r) in enumerate((("brightness", sp.brightness),
                                           ("contrast", sp.contrast),
                                           ("saturation", sp.saturation))):
                lo = max(0.0, 1 - r)
                out[name] = lo + (1 + r - lo) * v[:, j]
            out["hue"] = sp.hue * (2 * v[:, 3] - 1)   # turns
        out["n"] = n
        return out

    # ---- geometry
    def matrices(self, p: dict, src_hw: np.ndarray | None = None) -> np.ndarray:
        """(N, 3, 3) forward (source -> output) matrices in corner-origin pixel coordinates:
        resize (when the source is warped directly), flip, pad-crop offset, rotation about
        the centre, translation, then perspective, composed in the report's order."""
        sp, n, s = self.spec, p["n"], float(self.spec.size)
        m = np.broadcast_to(np.eye(3), (n, 3, 3)).copy()
        if self.scale_src:
            hw = np.asarray(self.src_hw if src_hw is None else src_hw, np.float64)
            hw = np.broadcast_to(hw.reshape(-1, hw.shape[-1])[:, :2], (n, 2))
            m[:, 0, 0], m[:, 1, 1] = s / hw[:, 1], s / hw[:, 0]
        if "flip" in p:
            m = _affine(np.where(p["flip"], -1.0, 1.0), 0.0, np.where(p["flip"], s, 0.0),
                        0.0, 1.0, 0.0) @ m
        if "crop" in p:
            d = sp.crop_padding - p["crop"]
            m = _affine(1.0, 0.0, d[:, 0], 0.0, 1.0, d[:, 1]) @ m
        if "angle" in p:
            # torchvision: positive angle = counter-clockwise on screen (y points down),
            # about the image centre (s/2, s/2 in corner-origin coordinates).
            a = np.radians(p["angle"])
            cs, sn, c = np.cos(a), np.sin(a), s / 2
            m = _affine(cs, sn, c - cs * c - sn * c, -sn, cs, c + sn * c - cs * c) @ m
        if "translate" in p:
            t = p["translate"]
            m = _affine(1.0, 0.0, t[:, 0], 0.0, 1.0, t[:, 1]) @ m
        if "corners" in p:
            m = perspective_matrix(p["corners"], sp.size) @ m
        return m

    def __call__(self, u, *rest):
        """fn.python_function body: (draws[, image shapes][, channel means]) -> one list of
        per-sample arrays for each name in `self.outputs`."""
        p = self.params(np.stack(u))
        rest = list(rest)
        shapes = np.stack(rest.pop(0)) if self.shape_input else None
        n, outs = p["n"], {}
        if "matrix" in self.outputs:
            outs["matrix"] = self.matrices(p, shapes).astype(np.float32)
        if "mirror" in self.outputs:
            outs["mirror"] = p["flip"].astype(np.int32)
        if self.colour:
            sat = p.get("saturation", np.ones(n))
            if "gray" in p:                       # grayscale = saturation 0 (same luma)
                sat = sat * ~p["gray"]
            outs["hue"] = p.get("hue", np.zeros(n)) * 360.0         # turns -> degrees
            outs["saturation"] = sat
        if self.jitter:
            means = np.stack(rest.pop(0)).reshape(n, 3).astype(np.float64)
            outs.update(brightness=p["brightness"], contrast=p["contrast"],
                        grey=means @ np.asarray(LUMA))
        return tuple([np.asarray(v, np.float32 if k != "mirror" else np.int32)
                      for v in outs[k]] for k in self.outputs)


def _affine(a, b, c, d, e, f) -> np.ndarray:
    """(N, 3, 3) affine matrices from per-sample (or scalar) coefficients."""
    a, b, c, d, e, f = np.broadcast_arrays(*(np.asarray(v, np.float64) for v in (a, b, c, d, e, f)))
    one, zero = np.ones_like(a), np.zeros_like(a)
    return np.stack([np.stack([a, b, c], -1), np.stack([d, e, f], -1),
                     np.stack([zero, zero, one], -1)], -2)


def perspective_matrix(corners: np.ndarray, size: int) -> np.ndarray:
    """torchvision's RandomPerspective as forward (N, 3, 3) matrices.

    torchvision maps its start points (0,0), (w-1,0), (w-1,h-1), (0,h-1) to end points moved
    inwards by the integer `corners` offsets (x0,y0, x1,y1, x2,y2, x3,y3: top-left,
    top-right, bottom-right, bottom-left) and samples with those coefficients in
    corner-origin coordinates. Built in closed form as rect -> unit square -> quad."""
    o = np.asarray(corners, np.float64).reshape(-1, 8)
    e = float(size - 1)
    x0, y0, x1, y1 = o[:, 0], o[:, 1], e - o[:, 2], o[:, 3]
    x2, y2, x3, y3 = e - o[:, 4], e - o[:, 5], o[:, 6], e - o[:, 7]
    sx, sy = x0 - x1 + x2 - x3, y0 - y1 + y2 - y3
    dx1, dx2, dy1, dy2 = x1 - x2, x3 - x2, y1 - y2, y3 - y2
    den = dx1 * dy2 - dx2 * dy1
    g, h = (sx * dy2 - dx2 * sy) / den, (dx1 * sy - sx * dy1) / den
    quad = np.stack([np.stack([x1 - x0 + g * x1, x3 - x0 + h * x3, x0], -1),
                     np.stack([y1 - y0 + g * y1, y3 - y0 + h * y3, y0], -1),
                     np.stack([g, h, np.ones_like(g)], -1)], -2)
    return quad @ np.diag([1 / e, 1 / e, 1.0])


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
        outs = fn.python_function(*inputs, function=draws, batch_processing=True,
                                  num_outputs=len(draws.outputs))
        outs = dict(zip(draws.outputs, outs if len(draws.outputs) > 1 else [outs]))
        mtx = outs.get("matrix", mtx)
        mirror = outs.get("mirror", mirror)
        if draws.colour:
            img = fn.hsv(img, hue=outs["hue"], saturation=outs["saturation"])
        if draws.jitter:
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
        # reference's resize.
        border = {"fill_value": [-m / v for m, v in zip(spec.mean, spec.std)]} \
            if draws.geometric else {"border_mode": "replicate"}
        img = fn.experimental.warp_perspective(img, matrix=mtx, size=[s, s], inverse_map=False,
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

    def __init__(self, split, spec: AugmentSpec, opts: LoaderOptions):
        self.split, self.spec = split, spec
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
