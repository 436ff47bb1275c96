"""Data sources, ingested once into a cache that every loader builds its own format from.

Sources (`--data`): `synthetic` (default: a deterministic built-in 10-class set of 32x32
colour images, shapes and textures with clutter, written as JPEG so the real decode path
runs); `imagefolder:PATH` (PATH/train and PATH/val or PATH/test, one folder per class; PATH
may be a .tar/.tar.gz of that layout, unpacked once into the cache); `cifar10:PATH` (the
python pickle batches). The cache (`<cache_root>/<kind>-<hash of the source path>/`) holds
`manifest.json`: the source's fingerprint, the classes, and per split the paths, labels and
sizes; rebuilt only when the fingerprint changes, always written atomically, under a lock.
Loaders read `Split.paths`/`Split.labels` or `decoded(split)` (one uint8 NHWC array, cached
as .npy). Bad data: convertible images (grayscale, RGBA, palette, 16-bit, ...) become RGB
PNG in the cache; unusable files are skipped and reported with a reason
(`Dataset.report()`; `strict=True` makes that a ConfigError); a class with no usable image
is dropped from both splits. The full list and the concurrency rules: docs/loaders.md.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import os
import pickle
import shutil
import stat
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from loaders.common import (DISK_FULL, ConfigError, atomic_path, atomic_write, file_lock, read_rgb,
                            remove_stale_temps, view_of)

MANIFEST_VERSION = 2            # 2: files-<fingerprint> folders, skip reasons, dropped classes
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
SYNTHETIC_CLASSES = ("disc", "square", "triangle", "ring", "cross",
                     "stripes", "checker", "dots", "frame", "crescent")


@dataclass(frozen=True)
class SyntheticConfig:
    train_per_class: int = 600
    val_per_class: int = 100
    size: int = 32
    seed: int = 0
    version: str = "shapes-v2"   # bump when the generator's output changes


@dataclass(frozen=True)
class Split:
    name: str
    paths: tuple[str, ...]            # absolute paths of decodable RGB JPEG/PNG files
    labels: tuple[int, ...]
    sizes: tuple[tuple[int, int], ...]  # (height, width) of each image
    cache_dir: Path

    def __len__(self) -> int:
        return len(self.paths)


@dataclass(frozen=True)
class Dataset:
    source: str
    classes: tuple[str, ...]
    train: Split
    val: Split
    cache_dir: Path
    fingerprint: str
    skipped: tuple[str, ...] = field(default=())        # paths of bad items (files, folders)
    skip_reasons: tuple[str, ...] = field(default=())   # one reason per entry of `skipped`
    dropped_classes: tuple[str, ...] = field(default=())

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def report(self) -> list[dict]:
        """The bad-data report: one {path, reason} per skipped file or dropped class folder."""
        reasons = self.skip_reasons or ("unusable",) * len(self.skipped)
        return [{"path": p, "reason": r} for p, r in zip(self.skipped, reasons)]


def strict_error(ds: Dataset, limit: int = 10) -> ConfigError:
    """The one-line --strict error listing the bad items (the first `limit`)."""
    rep = ds.report()
    shown = "; ".join(f"{r['path']} ({r['reason']})" for r in rep[:limit])
    more = f"; ... and {len(rep) - limit} more (all listed in {ds.cache_dir / 'manifest.json'})" \
        if len(rep) > limit else ""
    return ConfigError(f"--strict: {len(rep)} bad item(s) in {ds.source}: {shown}{more}; "
                       "fix or remove them, or run without --strict to skip them")


# ---------------------------------------------------------------------------- public API

def load_dataset(source: str, cache_root: str | os.PathLike = ".cache",
                 synthetic: SyntheticConfig = SyntheticConfig(), strict: bool = False) -> Dataset:
    """Parse `source`, ingest it into the cache if needed, and return the cached dataset.

    `strict`: a dataset with bad items (see the module docstring) is a ConfigError."""
    ds = _load_dataset(source, cache_root, synthetic)
    if strict and ds.skipped:
        raise strict_error(ds)
    return ds


def _load_dataset(source: str, cache_root, synthetic: SyntheticConfig) -> Dataset:
    kind, _, arg = source.partition(":")
    if kind == "synthetic":
        if arg:
            raise ConfigError(f"--data synthetic takes no path (got {source!r}); use --data synthetic")
        fingerprint = _hash(repr(synthetic))
        cache_dir = Path(cache_root) / f"synthetic-{fingerprint[:10]}"
        return _cached(source, cache_dir, fingerprint, lambda d, files: _build_synthetic(d, files, synthetic))
    if kind in ("imagefolder", "cifar10"):
        if not arg:
            raise ConfigError(f"--data {kind} needs a path: --data {kind}:PATH")
        root = Path(arg).expanduser().resolve()
        if kind == "imagefolder" and root.is_file():
            root = _unpack_archive(source, root, Path(cache_root))
        if not root.is_dir():
            raise ConfigError(f"--data {source}: {root} is not a directory; pass an existing folder"
                              + (" or a .tar(.gz) archive" if kind == "imagefolder" else ""))
        if kind == "imagefolder":
            scan = _scan_imagefolder(root)
            fingerprint = _imagefolder_fingerprint(scan)
            build = lambda d, files: _build_imagefolder(d, files, root, scan)  # noqa: E731
        else:
            root = _cifar_root(root)
            fingerprint = _files_fingerprint(sorted(root.glob("*_batch*")))
            build = lambda d, files: _build_cifar10(d, files, root)  # noqa: E731
        cache_dir = Path(cache_root) / f"{kind}-{_hash(str(root))[:10]}"
        return _cached(source, cache_dir, fingerprint, build)
    raise ConfigError(f"unknown data source {source!r}; use synthetic, imagefolder:PATH or cifar10:PATH")


def decoded(split: Split, size: int | None = None, view: str = "stretch", spec=None) -> np.ndarray:
    """The split as one uint8 array (N, H, W, 3), decoded once and cached as .npy.

    Images keep their native size when they all share it and `size` is None; otherwise
    each is resized (bilinear, antialiased) to size x size, or with view "center" made
    the evaluation view of `spec` (`common.view_of`)."""
    sizes = set(split.sizes)
    if size is None:
        if len(sizes) != 1:
            raise ConfigError(f"{split.name} images have {len(sizes)} different sizes; "
                              "pass a size to decode them at one resolution")
        h, w = sizes.pop()
    else:
        h = w = size
    tag = f"-center{spec.eval_size}" if view == "center" else ""
    out = split.cache_dir / f"{split.name}-decoded-{h}x{w}{tag}.npy"
    key = _hash("\n".join(split.paths))[:12]
    meta = out.with_suffix(".key")
    with file_lock(split.cache_dir / ".lock"):
        if out.exists() and meta.exists() and meta.read_text() == key:
            return np.load(out, mmap_mode="r")
        arr = np.empty((len(split), h, w, 3), np.uint8)
        for i, p in enumerate(split.paths):
            if view == "center":
                arr[i] = view_of(read_rgb(p), view, spec).permute(1, 2, 0).numpy()
                continue
            with Image.open(p) as im:
                im = im.convert("RGB")
                if im.size != (w, h):
                    im = im.resize((w, h), Image.BILINEAR)
                arr[i] = np.asarray(im)
        try:
            with atomic_path(out) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, arr)
            atomic_write(meta, key)
        except OSError as e:
            if e.errno in DISK_FULL:
                raise ConfigError(f"disk full writing the decoded cache {out} ({e.strerror}); the previous "
                                  f"file there, if any, is intact; free space or use another --cache-dir") from None
            raise
        return np.load(out, mmap_mode="r")


# ----------------------------------------------------------------------------- the cache



def _unpack_archive(source: str, archive: Path, cache_root: Path) -> Path:
    """A .tar(.gz) ImageFolder archive unpacked once into the cache; returns the folder.
    Unpacked into a temp folder and renamed, under the lock: a kill never leaves half a tree."""
    st = archive.stat()
    out = cache_root.resolve() / f"archive-{_hash(f'{archive}|{st.st_size}|{st.st_mtime_ns}')[:10]}"
    tree = out / "tree"
    with file_lock(out / ".lock"):
        if not tree.is_dir():
            tmp = out / "tree.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                with tarfile.open(archive) as t:
                    t.extractall(tmp, filter="data")
            except (tarfile.TarError, EOFError, zlib.error) as e:
                shutil.rmtree(tmp, ignore_errors=True)
                raise ConfigError(f"--data {source}: {archive} is not a readable .tar(.gz) archive ({e}); "
                                  "pass a folder or a valid archive") from None
            except OSError as e:
                shutil.rmtree(tmp, ignore_errors=True)
                raise ConfigError(f"--data {source}: unpacking {archive} into {out} failed ({e.strerror}); "
                                  "free space or point --cache-dir at another disk") from None
            os.replace(tmp, tree)
    return tree


def _cached(source: str, cache_dir: Path, fingerprint: str, build) -> Dataset:
    manifest_path = cache_dir / "manifest.json"
    with file_lock(cache_dir / ".lock"):
        remove_stale_temps(cache_dir)       # what a killed ingest left (manifest, decoded .npy temps)
        m = None
        if manifest_path.exists():
            try:
                m = json.loads(manifest_path.read_text())
            except (OSError, json.JSONDecodeError):
                m = None
        if not m or m.get("fingerprint") != fingerprint or m.get("version") != MANIFEST_VERSION:
            # Rebuild into a fresh folder (stale files from an older source must not leak
            # in); the previous folder and manifest stay until the new manifest is in place.
            files_dir = cache_dir / f"files-{fingerprint[:12]}"
            if files_dir.exists():              # left by a build that was killed
                shutil.rmtree(files_dir)
            try:
                files_dir.mkdir(parents=True)
                new = build(cache_dir, files_dir)
                new.update(version=MANIFEST_VERSION, fingerprint=fingerprint, source=source)
                atomic_write(manifest_path, json.dumps(new))
            except OSError as e:
                shutil.rmtree(files_dir, ignore_errors=True)
                if e.errno in DISK_FULL:
                    kept = ("the previous cache there is intact and still usable for the previous "
                            "version of the source" if m else "nothing was kept")
                    raise ConfigError(f"disk full while writing the dataset cache {cache_dir} ({e.strerror}); "
                                      f"{kept}; free space or point --cache-dir at another disk") from None
                raise
            m = new
            for old in [cache_dir / "files", *cache_dir.glob("files-*")]:
                if old.is_dir() and old != files_dir:
                    shutil.rmtree(old, ignore_errors=True)
    return _from_manifest(m, cache_dir)


def _from_manifest(m: dict, cache_dir: Path) -> Dataset:
    splits = {}
    for name in ("train", "val"):
        s = m["splits"][name]
        paths = tuple(str((cache_dir / p) if not os.path.isabs(p) else p) for p in s["paths"])
        splits[name] = Split(name, paths, tuple(s["labels"]), tuple(map(tuple, s["sizes"])), cache_dir)
    skipped = [tuple(e) if isinstance(e, (list, tuple)) else (e, "unusable") for e in m.get("skipped", ())]
    return Dataset(m["source"], tuple(m["classes"]), splits["train"], splits["val"], cache_dir,
                   m["fingerprint"], tuple(p for p, _ in skipped), tuple(r for _, r in skipped),
                   tuple(m.get("dropped_classes", ())))


def _hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def _files_fingerprint(files) -> str:
    rows = []
    for f in files:
        st = f.stat()
        rows.append(f"{f}\t{st.st_size}\t{st.st_mtime_ns}")
    return _hash("\n".join(rows))


# ----------------------------------------------------------------------------- imagefolder

def _split_dirs(root: Path) -> tuple[Path, Path]:
    train = root / "train"
    val = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
    if not train.is_dir() or val is None:
        raise ConfigError(f"imagefolder {root} needs train/ and val/ (or test/) subfolders, "
                          "each with one folder per class")
    return train, val


@dataclass
class _Scan:
    """What an imagefolder split holds: image files per class, and bad entries."""
    per_class: dict[str, list[Path]]
    bad: list[tuple[str, str]]          # (path, reason)


def _entry_problem(path: Path) -> str | None:
    """Why a directory entry cannot be followed/read as a file or folder, or None."""
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symlink loop"
        if path.is_symlink():
            return "broken symlink"
        return f"unreadable ({e.strerror})"
    return None


def _walk_class(class_dir: Path, bad: list, ancestors: set) -> list[Path]:
    """Image files under `class_dir`, recursively, following symlinks once: a folder
    reached again (a symlink loop, a link to the split folder, or a second link to the same
    folder) is reported, not descended. `ancestors`: (dev, inode) of the split folders."""
    files, seen, stack = [], set(ancestors), [class_dir]
    while stack:
        d = stack.pop()
        try:
            st = d.stat()
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            bad.append((str(d), f"unreadable folder ({e.strerror})"))
            continue
        if (st.st_dev, st.st_ino) in seen:
            bad.append((str(d), "symlink loop (links back to a folder already listed)"))
            continue
        seen.add((st.st_dev, st.st_ino))
        subdirs = []
        for e in entries:
            if e.name.startswith("."):
                continue
            p = Path(e.path)
            image_ext = p.suffix.lower() in IMAGE_EXTENSIONS
            problem = _entry_problem(p) if e.is_symlink() else None
            if problem:
                bad.append((str(p), problem))
                continue
            try:
                mode = os.stat(p).st_mode
            except OSError as err:
                bad.append((str(p), f"unreadable ({err.strerror})"))
                continue
            if stat.S_ISDIR(mode):
                subdirs.append(p)
            elif image_ext:
                if stat.S_ISREG(mode):
                    files.append(p)
                else:
                    bad.append((str(p), "not a regular file"))
        stack.extend(reversed(subdirs))
    return sorted(files)


def _scan_split(split_dir: Path) -> _Scan:
    bad: list = []
    classes = []
    for e in sorted(os.scandir(split_dir), key=lambda e: e.name):
        if e.name.startswith("."):
            continue
        p = Path(e.path)
        if e.is_symlink() and (problem := _entry_problem(p)):
            bad.append((str(p), problem))
        elif p.is_dir():
            classes.append(e.name)
    if not classes:
        raise ConfigError(f"{split_dir} has no class folders; put images in {split_dir}/<class>/")
    st = split_dir.stat()
    root = split_dir.parent.stat()
    ancestors = {(st.st_dev, st.st_ino), (root.st_dev, root.st_ino)}
    return _Scan({c: _walk_class(split_dir / c, bad, ancestors) for c in classes}, bad)


def _scan_imagefolder(root: Path) -> dict[str, _Scan]:
    train, val = _split_dirs(root)
    scan = {"train": _scan_split(train), "val": _scan_split(val)}
    classes, val_classes = list(scan["train"].per_class), list(scan["val"].per_class)
    if val_classes != classes:
        only_train = sorted(set(classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(classes))
        raise ConfigError(f"class folders differ between {train} and {val}: only in train "
                          f"{only_train}, only in val {only_val}; make both hold the same class folders")
    return scan


def _imagefolder_fingerprint(scan: dict[str, _Scan]) -> str:
    rows = []
    for name, sc in scan.items():
        rows.append(f"{name}\t{sorted(sc.per_class)}")
        for fs in sc.per_class.values():
            for f in fs:
                st = f.stat()
                rows.append(f"{f}\t{st.st_size}\t{st.st_mtime_ns}")
        rows += [f"bad\t{p}\t{r}" for p, r in sc.bad]
    return _hash("\n".join(rows))


def _build_imagefolder(cache_dir: Path, files_dir: Path, root: Path, scan: dict[str, _Scan]) -> dict:
    classes = list(scan["train"].per_class)
    bad = [b for sc in scan.values() for b in sc.bad]
    kept: dict[str, dict[str, list]] = {}
    for name, sc in scan.items():
        kept[name] = {}
        for c in classes:
            rows = []
            for f in sc.per_class[c]:
                path, info = _ingest_image(f, files_dir / name / c)
                if path is None:
                    bad.append((str(f), info))
                else:
                    rows.append((str(path), info))
            kept[name][c] = rows
    # A class with no usable image in a split is dropped from both (consistent labels).
    dropped = []
    split_dirs = dict(zip(("train", "val"), _split_dirs(root)))
    for c in classes:
        empty = [n for n in ("train", "val") if not kept[n][c]]
        if not empty:
            continue
        dropped.append(c)
        for n in empty:
            listed = len(scan[n].per_class[c])
            what = "empty class folder" if not listed else f"no usable image among {listed} file(s)"
            others = [o for o in ("train", "val") if o != n and kept[o][c]]
            unused = f" ({len(kept[others[0]][c])} {others[0]} image(s) unused)" if others else ""
            bad.append((str(split_dirs[n] / c), f"{what}: class {c!r} dropped from both splits{unused}"))
    final = [c for c in classes if c not in dropped]
    if not final:
        raise ConfigError(f"imagefolder {root} has no class with usable images in both splits "
                          f"({len(bad)} bad item(s), e.g. {bad[0][0]}: {bad[0][1]}); add images")
    splits = {}
    for name in ("train", "val"):
        paths, labels, sizes = [], [], []
        for label, c in enumerate(final):
            for path, hw in kept[name][c]:
                paths.append(path)
                labels.append(label)
                sizes.append(hw)
        splits[name] = {"paths": paths, "labels": labels, "sizes": sizes}
    return {"classes": final, "splits": splits, "skipped": [list(b) for b in bad],
            "dropped_classes": dropped}


def _ingest_image(path: Path, convert_dir: Path):
    """(path a loader can read, (h, w)) or (None, why the file is skipped).

    Plain 8-bit RGB JPEG/PNG files are used in place; any other decodable image
    (grayscale, RGBA, palette, 16-bit, other formats) is converted once to RGB PNG."""
    try:
        if path.stat().st_size == 0:
            return None, "empty file (0 bytes)"
        with Image.open(path) as im:
            im.load()
            fmt, mode = im.format, im.mode
            if fmt in ("JPEG", "PNG") and mode == "RGB":
                return path, (im.height, im.width)
            rgb = _to_rgb(im)
    except Image.UnidentifiedImageError:
        return None, "not an image (unrecognised content)"
    except Image.DecompressionBombError as e:
        return None, f"too large ({e})"
    except PermissionError as e:
        return None, f"unreadable ({e.strerror})"
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        text = getattr(e, "strerror", None) or str(e) or type(e).__name__
        return None, f"truncated or corrupt image ({text})"
    convert_dir.mkdir(parents=True, exist_ok=True)
    out = convert_dir / (path.stem + "-" + _hash(str(path))[:8] + ".png")
    with atomic_path(out) as tmp:
        rgb.save(tmp, format="PNG")
    return out, (rgb.height, rgb.width)


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im, dtype=np.float64)
        a = np.clip(a / max(a.max(), 1) * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(a).convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGB", im.size, (0, 0, 0))
        bg.paste(im, mask=im.getchannel("A"))
        return bg
    return im.convert("RGB")


# ----------------------------------------------------------------------------- cifar10 pickles

def _cifar_root(root: Path) -> Path:
    for cand in (root, root / "cifar-10-batches-py"):
        if (cand / "data_batch_1").exists() and (cand / "test_batch").exists():
            return cand
    raise ConfigError(f"cifar10:{root} has no data_batch_1..5 and test_batch; pass the folder "
                      "holding the python pickle batches (cifar-10-batches-py)")


def _build_cifar10(cache_dir: Path, files_dir: Path, root: Path) -> dict:
    meta = root / "batches.meta"
    if meta.exists():
        with open(meta, "rb") as f:
            classes = [c.decode() if isinstance(c, bytes) else c
                       for c in pickle.load(f, encoding="bytes")[b"label_names"]]
    else:
        classes = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]
    batches = {"train": sorted(root.glob("data_batch_*")), "val": [root / "test_batch"]}
    splits = {}
    for name, files in batches.items():
        paths, labels = [], []
        out_dir = files_dir / name
        out_dir.mkdir(parents=True, exist_ok=True)
        for bf in files:
            with open(bf, "rb") as f:
                d = pickle.load(f, encoding="bytes")
            data = np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            for img, label in zip(data, d[b"labels"]):
                p = out_dir / f"{len(paths):06d}.png"
                Image.fromarray(img).save(p, format="PNG", compress_level=1)
                paths.append(os.path.relpath(p, cache_dir))
                labels.append(int(label))
        splits[name] = {"paths": paths, "labels": labels, "sizes": [[32, 32]] * len(paths)}
    return {"classes": classes, "splits": splits, "skipped": []}


# ----------------------------------------------------------------------------- synthetic

def _build_synthetic(cache_dir: Path, files_dir: Path, cfg: SyntheticConfig) -> dict:
    splits = {}
    for si, (name, per_class) in enumerate((("train", cfg.train_per_class), ("val", cfg.val_per_class))):
        paths, labels = [], []
        for label, cls in enumerate(SYNTHETIC_CLASSES):
            out_dir = files_dir / name / cls
            out_dir.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                rng = np.random.default_rng([cfg.seed, si, label, i])
                img = render_synthetic(label, rng, cfg.size)
                p = out_dir / f"{i:05d}.jpg"
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=92)
                p.write_bytes(buf.getvalue())
                paths.append(os.path.relpath(p, cache_dir))
                labels.append(label)
        splits[name] = {"paths": paths, "labels": labels, "sizes": [[cfg.size, cfg.size]] * len(paths)}
    return {"classes": list(SYNTHETIC_CLASSES), "splits": splits, "skipped": []}


def _colour(rng, avoid=None):
    """A random RGB colour; when `avoid` is given, one whose luminance differs by >= 60."""
    while True:
        c = tuple(int(v) for v in rng.integers(0, 256, 3))
        # The generator's own luminance, part of the "shapes-v2" images; not the spec's LUMA
        # (0.2989 would change one of 7000 colour choices; docs/loaders.md).
        lum = 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
        if avoid is None or abs(lum - avoid) >= 60:
            return c, lum


def render_synthetic(label: int, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """One image of class `label`: drawn at 4x then downsampled (antialiased edges)."""
    S = size * 4
    bg, bg_lum = _colour(rng)
    bg2, _ = _colour(rng)
    # Background: a linear gradient between two colours, plus clutter lines and blobs.
    t = np.linspace(0, 1, S)[:, None, None]
    if rng.random() < 0.5:
        t = t.transpose(1, 0, 2)
    grad = (np.asarray(bg) * (1 - 0.5 * t) + np.asarray(bg2) * 0.5 * t).astype(np.uint8)
    img = Image.fromarray(np.broadcast_to(grad, (S, S, 3)).copy())
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):
        c, _ = _colour(rng)
        x0, y0, x1, y1 = (int(v) for v in rng.integers(0, S, 4))
        d.line((x0, y0, x1, y1), fill=c, width=int(rng.integers(1, 4)))
    fg, fg_lum = _colour(rng, avoid=bg_lum)
    fg2, _ = _colour(rng, avoid=fg_lum)   # texture contrast: stripes never vanish
    scale = rng.uniform(0.45, 0.8) * S / 2          # half-extent of the object
    cx, cy = (rng.uniform(scale * 0.8, S - scale * 0.8) for _ in range(2))
    angle = rng.uniform(0, 2 * math.pi)

    def pts(poly):  # rotate + place a polygon given in unit coordinates
        ca, sa = math.cos(angle), math.sin(angle)
        return [(cx + scale * (x * ca - y * sa), cy + scale * (x * sa + y * ca)) for x, y in poly]

    box = (cx - scale, cy - scale, cx + scale, cy + scale)
    w = max(2, int(scale * 0.3))
    name = SYNTHETIC_CLASSES[label]
    if name == "disc":
        d.ellipse(box, fill=fg)
    elif name == "square":
        d.polygon(pts([(-.8, -.8), (.8, -.8), (.8, .8), (-.8, .8)]), fill=fg)
    elif name == "triangle":
        d.polygon(pts([(0, -1), (.9, .7), (-.9, .7)]), fill=fg)
    elif name == "ring":
        d.ellipse(box, outline=fg, width=w)
    elif name == "cross":
        d.polygon(pts([(-.25, -1), (.25, -1), (.25, 1), (-.25, 1)]), fill=fg)
        d.polygon(pts([(-1, -.25), (1, -.25), (1, .25), (-1, .25)]), fill=fg)
    elif name == "frame":
        d.polygon(pts([(-.85, -.85), (.85, -.85), (.85, .85), (-.85, .85)]), outline=fg, width=w)
    elif name == "crescent":
        d.ellipse(box, fill=fg)
        off = 0.45 * scale
        d.ellipse((box[0] + off * math.cos(angle), box[1] + off * math.sin(angle),
                   box[2] + off * math.cos(angle), box[3] + off * math.sin(angle)), fill=bg)
    else:  # textures fill a rotated square patch
        patch = Image.new("RGB", (S, S), fg2)
        pd = ImageDraw.Draw(patch)
        period = max(8, int(scale * rng.uniform(0.35, 0.55)))
        if name == "stripes":
            for k in range(0, S, period):
                pd.rectangle((k, 0, k + period // 2, S), fill=fg)
        elif name == "checker":
            for yy in range(0, S, period):
                for xx in range(0, S, period):
                    if (xx // period + yy // period) % 2 == 0:
                        pd.rectangle((xx, yy, xx + period - 1, yy + period - 1), fill=fg)
        else:  # dots
            r = max(2, period // 4)
            for yy in range(period // 2, S, period):
                for xx in range(period // 2, S, period):
                    pd.ellipse((xx - r, yy - r, xx + r, yy + r), fill=fg)
        patch = patch.rotate(math.degrees(angle), resample=Image.BILINEAR, fillcolor=fg2)
        mask = Image.new("L", (S, S), 0)
        ImageDraw.Draw(mask).polygon(pts([(-.9, -.9), (.9, -.9), (.9, .9), (-.9, .9)]), fill=255)
        img.paste(patch, (0, 0), mask)
    img = img.resize((size, size), Image.LANCZOS)
    noise = rng.normal(0, 6, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(img, np.float64) + noise, 0, 255).astype(np.uint8))
