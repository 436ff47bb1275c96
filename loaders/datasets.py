"""Data sources, ingested once into a cache that every loader builds its own format from.

Sources: `synthetic` (a deterministic 10-class 32x32 set, written as JPEGs), `imagefolder:PATH`
(PATH/train + PATH/val or PATH/test, a folder per class; or a .tar(.gz) of that, unpacked
once) `cifar10:PATH` (the python pickle batches) and `webdataset:PATTERN` (tar shards:
loaders/shards.py). Design:
- The cache `<cache_root>/<kind>-<hash>/` holds a small `manifest.json` (fingerprint, classes,
  counts, bad items with reasons) and per split compact columns (`loaders/columns.py`); a
  `Split` exposes them as read-only sequences. Rebuilt only when the fingerprint changes.
- Imagefolder files are validated by header: plain RGB JPEG/PNG that end with their end
  marker are used in place; the rest is fully decoded: converted to RGB PNG in the cache, or
  skipped with a reason. Loaders survive a file that fails later.
- Scan and checks run over a process pool (`loaders/ingest.py`), in chunks saved as they
  finish: a killed ingest resumes where it stopped. Every build runs under a file lock and
  swaps its manifest in last, atomically.
Details, rules and measurements: docs/datasets.md.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import itertools
import json
import math
import os
import pickle
import shutil
import stat
import tarfile
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from loaders.columns import load_columns, save_columns
from loaders.common import (DISK_FULL, ConfigError, atomic_path, atomic_write, file_lock, read_rgb,
                            remove_stale_temps, view_of)
from loaders.ingest import WorkerPool, run_chunks, usable_cores

MANIFEST_VERSION = 3            # 3: columns in files-<key>/<split>.npz, header checks, resumable chunks
CHUNK_FILES = 1000              # most files per ingest chunk (a chunk's results are saved together)
PARALLEL_MIN_FILES = 4000       # default workers: fewer files are checked in-process
PARALLEL_MIN_CLASSES = 16       # default workers: fewer class folders are listed in-process
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
    """One split. A loaded split's columns are compact read-only sequences
    (`loaders.columns.Paths`/`Column`: items `str`, `int`, `(h, w)`); tuples work too."""
    name: str
    paths: Sequence[str]                # paths (absolute unless --cache-dir is relative) of RGB JPEG/PNG files
    labels: Sequence[int]
    sizes: Sequence[tuple[int, int]]    # (height, width) of each image
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
                 synthetic: SyntheticConfig = SyntheticConfig(), strict: bool = False,
                 workers: int | None = None) -> Dataset:
    """Parse `source`, ingest it into the cache if needed, and return the cached dataset.

    `strict`: a dataset with bad items (docs/datasets.md) is a ConfigError. `workers`: ingest
    processes; None or 0: the usable cores, with small folders done in-process."""
    with WorkerPool(workers or usable_cores()) as pool:
        ds = _load_dataset(source, cache_root, synthetic, _Work(pool, bool(workers)))
    if strict and ds.skipped:
        raise strict_error(ds)
    return ds


@dataclass
class _Work:
    pool: WorkerPool
    explicit: bool          # workers given: always use the pool (else only for large folders)

    def parallel(self, amount: int, threshold: int) -> bool:
        return self.explicit or amount >= threshold


def _load_dataset(source: str, cache_root, synthetic: SyntheticConfig, work: _Work) -> Dataset:
    kind, _, arg = source.partition(":")
    if kind == "webdataset":                 # tar shards, no per-file list: loaders/shards.py
        from loaders.shards import load_webdataset
        return load_webdataset(source, cache_root)
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
            scan = _scan_imagefolder(root, work)
            fingerprint = _imagefolder_fingerprint(root, scan)
            build = lambda d, files: _build_imagefolder(d, files, root, scan, work)  # noqa: E731
        else:
            root = _cifar_root(root)
            fingerprint = _files_fingerprint(sorted(root.glob("*_batch*")))
            build = lambda d, files: _build_cifar10(d, files, root)  # noqa: E731
        cache_dir = Path(cache_root) / f"{kind}-{_hash(str(root))[:10]}"
        return _cached(source, cache_dir, fingerprint, build, resumable=kind == "imagefolder")
    raise ConfigError(f"unknown data source {source!r}; use synthetic, imagefolder:PATH, cifar10:PATH "
                      "or webdataset:PATTERN")


def decoded(split: Split, size: int | None = None, view: str = "stretch", spec=None) -> np.ndarray:
    """The split as one uint8 array (N, H, W, 3), decoded once and cached as .npy.

    Images keep their native size when they all share it and `size` is None; otherwise
    each is resized (bilinear, antialiased) to size x size, or with view "center" made
    the evaluation view of `spec` (`common.view_of`). A file that fails to decode (ingest
    checks headers only) is black, with a RuntimeWarning naming it."""
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
        arr = np.zeros((len(split), h, w, 3), np.uint8)
        failed = []
        for i, p in enumerate(split.paths):
            try:
                if view == "center":
                    arr[i] = view_of(read_rgb(p), view, spec).permute(1, 2, 0).numpy()
                    continue
                with Image.open(p) as im:
                    im = im.convert("RGB")
                    if im.size != (w, h):
                        im = im.resize((w, h), Image.BILINEAR)
                    arr[i] = np.asarray(im)
            except Exception as e:  # noqa: BLE001 - passed ingest's header check, fails now: black
                failed.append(f"{p} ({type(e).__name__}: {e})")
        if failed:
            warnings.warn(f"{len(failed)} {split.name} image(s) could not be decoded and are black: "
                          + "; ".join(failed[:5]) + ("; ..." if len(failed) > 5 else ""), RuntimeWarning, stacklevel=2)
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


def _cached(source: str, cache_dir: Path, fingerprint: str, build, resumable: bool = False) -> Dataset:
    """The dataset from `cache_dir`'s manifest, (re)built by `build(cache_dir, files_dir)` when
    missing, stale or unreadable. `resumable`: a killed build's folder is continued, not wiped."""
    manifest_path = cache_dir / "manifest.json"
    with file_lock(cache_dir / ".lock"):
        remove_stale_temps(cache_dir)       # what a killed ingest left (manifest, decoded .npy temps)
        ds = _read_manifest(manifest_path, cache_dir, fingerprint)
        if ds is not None:
            return ds
        had_cache = manifest_path.exists()
        # Rebuild into a fresh folder (stale files from an older source must not leak in);
        # the previous folder and manifest stay until the new manifest is in place.
        files_dir = cache_dir / f"files-{_hash(f'{MANIFEST_VERSION}|{fingerprint}')[:12]}"
        if files_dir.exists() and not resumable:        # left by a build that was killed
            shutil.rmtree(files_dir)
        elif files_dir.exists():                          # resumed: its converted images' temps
            remove_stale_temps(files_dir, recursive=True)
        try:
            files_dir.mkdir(parents=True, exist_ok=True)
            new = build(cache_dir, files_dir)
            splits = {}
            for name, s in new.pop("splits").items():
                with atomic_path(files_dir / f"{name}.npz") as tmp, open(tmp, "wb") as f:
                    save_columns(f, s["paths"], s.get("which", np.zeros(len(s["paths"]), np.uint8)),
                                 s["labels"], s["sizes"])
                splits[name] = {"count": len(s["paths"]), "columns": f"{files_dir.name}/{name}.npz"}
            new.update(version=MANIFEST_VERSION, fingerprint=fingerprint, source=source, splits=splits)
            atomic_write(manifest_path, json.dumps(new))
        except OSError as e:
            if e.errno in DISK_FULL:
                shutil.rmtree(files_dir, ignore_errors=True)
                kept = ("the previous cache there is intact and still usable for the previous "
                        "version of the source" if had_cache else "nothing was kept")
                raise ConfigError(f"disk full while writing the dataset cache {cache_dir} ({e.strerror}); "
                                  f"{kept}; free space or point --cache-dir at another disk") from None
            if not resumable:
                shutil.rmtree(files_dir, ignore_errors=True)
            raise
        shutil.rmtree(files_dir / ".chunks", ignore_errors=True)
        for old in [cache_dir / "files", *cache_dir.glob("files-*")]:
            if old.is_dir() and old != files_dir:
                shutil.rmtree(old, ignore_errors=True)
        return _from_manifest(new, cache_dir)


def _read_manifest(path: Path, cache_dir: Path, fingerprint: str) -> Dataset | None:
    """The cached dataset when `path` is a readable current manifest for `fingerprint`."""
    try:
        m = json.loads(path.read_text())
        if m.get("fingerprint") != fingerprint or m.get("version") != MANIFEST_VERSION:
            return None
        return _from_manifest(m, cache_dir)
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile):
        return None


def _from_manifest(m: dict, cache_dir: Path) -> Dataset:
    root = m.get("root") or ""
    prefixes = (str(cache_dir) + os.sep, root.rstrip(os.sep) + os.sep if root else "", "")
    splits = {}
    for name in ("train", "val"):
        paths, labels, sizes = load_columns(cache_dir / m["splits"][name]["columns"], prefixes)
        splits[name] = Split(name, paths, labels, sizes, cache_dir)
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
    """What an imagefolder split holds: per class folder its image files (relative to the
    root, sorted) and a digest of their (path, size, mtime); bad entries (path, reason)."""
    classes: list[str]
    files: list[list[str]]
    digests: list[str]
    bad: list[tuple[str, str]]


def _entry_problem(path: str) -> str | None:
    """Why a directory entry cannot be followed/read as a file or folder, or None."""
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symlink loop"
        if os.path.islink(path):
            return "broken symlink"
        return f"unreadable ({e.strerror})"
    return None


def _walk_class(class_dir: str, root_len: int, ancestors: frozenset) -> tuple[list[str], str, list]:
    """Image files under `class_dir` (relative to the root: paths cut at `root_len`), the
    digest of their (path, size, mtime), and bad entries. Recursive, following symlinks once:
    a folder reached again (a symlink loop, a link to the split folder, or a second link to
    the same folder) is reported, not descended. `ancestors`: (dev, inode) of the split folders.
    One stat per entry (scandir's d_type spares it for folders and non-images)."""
    rows, bad, seen, stack = [], [], set(ancestors), [class_dir]
    while stack:
        d = stack.pop()
        try:
            st = os.stat(d)
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            bad.append((d, f"unreadable folder ({e.strerror})"))
            continue
        if (st.st_dev, st.st_ino) in seen:
            bad.append((d, "symlink loop (links back to a folder already listed)"))
            continue
        seen.add((st.st_dev, st.st_ino))
        subdirs = []
        for e in entries:
            if e.name.startswith("."):
                continue
            if e.is_symlink() and (problem := _entry_problem(e.path)):
                bad.append((e.path, problem))
                continue
            if not os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS:
                with contextlib.suppress(OSError):
                    if e.is_dir():
                        subdirs.append(e.path)
                continue
            try:
                est = e.stat()
            except OSError as err:
                bad.append((e.path, f"unreadable ({err.strerror})"))
                continue
            if stat.S_ISDIR(est.st_mode):
                subdirs.append(e.path)
            elif stat.S_ISREG(est.st_mode):
                rows.append((e.path[root_len:], est.st_size, est.st_mtime_ns))
            else:
                bad.append((e.path, "not a regular file"))
        stack.extend(reversed(subdirs))
    rows.sort()
    digest = _hash("\n".join(f"{p}\t{n}\t{t}" for p, n, t in rows))
    return [p for p, _, _ in rows], digest, bad


def _scan_split(split_dir: Path, work: _Work) -> _Scan:
    bad: list = []
    classes = []
    for e in sorted(os.scandir(split_dir), key=lambda e: e.name):
        if e.name.startswith("."):
            continue
        if e.is_symlink() and (problem := _entry_problem(e.path)):
            bad.append((e.path, problem))
        elif e.is_dir():
            classes.append(e.name)
    if not classes:
        raise ConfigError(f"{split_dir} has no class folders; put images in {split_dir}/<class>/")
    st = split_dir.stat()
    root = split_dir.parent.stat()
    ancestors = frozenset({(st.st_dev, st.st_ino), (root.st_dev, root.st_ino)})
    root_len = len(str(split_dir.parent)) + 1
    per_task = max(1, len(classes) // (8 * work.pool.workers))        # few round trips, balanced
    tasks = [(k, ([str(split_dir / c) for c in classes[k:k + per_task]], root_len, ancestors))
             for k in range(0, len(classes), per_task)]
    done = dict(work.pool.map_unordered(_walk_classes, tasks, work.parallel(len(classes), PARALLEL_MIN_CLASSES)))
    walked = [w for k in sorted(done) for w in done[k]]
    return _Scan(classes, [w[0] for w in walked], [w[1] for w in walked],
                 bad + [b for w in walked for b in w[2]])


def _walk_classes(class_dirs: list[str], root_len: int, ancestors: frozenset) -> list:
    return [_walk_class(d, root_len, ancestors) for d in class_dirs]


def _scan_imagefolder(root: Path, work: _Work) -> dict[str, _Scan]:
    train, val = _split_dirs(root)
    scan = {"train": _scan_split(train, work), "val": _scan_split(val, work)}
    classes, val_classes = scan["train"].classes, scan["val"].classes
    if val_classes != classes:
        only_train = sorted(set(classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(classes))
        raise ConfigError(f"class folders differ between {train} and {val}: only in train "
                          f"{only_train}, only in val {only_val}; make both hold the same class folders")
    return scan


def _imagefolder_fingerprint(root: Path, scan: dict[str, _Scan]) -> str:
    rows = [str(root)]
    for name, sc in scan.items():
        rows.append(f"{name}\t{sc.classes}")
        rows += [f"{c}\t{len(fs)}\t{d}" for c, fs, d in zip(sc.classes, sc.files, sc.digests)]
        rows += [f"bad\t{p}\t{r}" for p, r in sc.bad]
    return _hash("\n".join(rows))


def _build_imagefolder(cache_dir: Path, files_dir: Path, root: Path, scan: dict[str, _Scan], work: _Work) -> dict:
    names = ("train", "val")
    classes = scan["train"].classes
    nc = len(classes)
    rels = [f for n in names for fs in scan[n].files for f in fs]
    counts = [len(fs) for n in names for fs in scan[n].files]
    owner = np.repeat(np.arange(2 * nc), counts)            # split * nc + class, per file
    chunk = min(CHUNK_FILES, max(8, -(-len(rels) // 100)))  # depends on the file count only
    chunks, _ = run_chunks(work.pool, _check_images, rels, chunk, files_dir / ".chunks",
                           args=(str(root), str(files_dir.resolve()), files_dir.name),
                           parallel=work.parallel(len(rels), PARALLEL_MIN_FILES), desc=f"ingest {root}")
    # Columns over all files, in order (few Python objects: this runs at millions of files).
    hw = np.stack([np.fromiter(itertools.chain.from_iterable(c[k] for c in chunks), np.int64, len(rels))
                   for k in ("h", "w")], axis=1)
    converted = {k * chunk + i: rel for k, c in enumerate(chunks) for i, rel in c["converted"]}
    failed = [(k * chunk + i, why) for k, c in enumerate(chunks) for i, why in c["bad"]]
    bad = [b for n in names for b in scan[n].bad] + [(os.path.join(root, rels[i]), why) for i, why in failed]
    ok = np.ones(len(rels), bool)
    ok[[i for i, _ in failed]] = False
    kept = np.bincount(owner[ok], minlength=2 * nc).reshape(2, nc)
    listed = np.array(counts, np.int64).reshape(2, nc)
    # A class with no usable image in a split is dropped from both (consistent labels).
    dropped = []
    split_dirs = _split_dirs(root)
    for c, cls in enumerate(classes):
        empty = [s for s in (0, 1) if not kept[s, c]]
        if not empty:
            continue
        dropped.append(cls)
        for s in empty:
            what = "empty class folder" if not listed[s, c] else f"no usable image among {listed[s, c]} file(s)"
            o = 1 - s
            unused = f" ({kept[o, c]} {names[o]} image(s) unused)" if kept[o, c] else ""
            bad.append((str(split_dirs[s] / cls), f"{what}: class {cls!r} dropped from both splits{unused}"))
    final = [c for c in classes if c not in dropped]
    if not final:
        raise ConfigError(f"imagefolder {root} has no class with usable images in both splits "
                          f"({len(bad)} bad item(s), e.g. {bad[0][0]}: {bad[0][1]}); add images")
    label = np.full(nc, -1, np.int64)
    label[[classes.index(c) for c in final]] = np.arange(len(final))
    # In place: relative to the root (prefix 1); converted: relative to the cache (prefix 0).
    which = np.ones(len(rels), np.uint8)
    which[list(converted)] = 0
    shown = list(rels)
    for i, rel in converted.items():
        shown[i] = rel
    splits = {}
    for s, name in enumerate(names):
        idx = np.flatnonzero(ok & (owner // nc == s) & (label[owner % nc] >= 0))
        splits[name] = {"paths": [shown[i] for i in idx.tolist()], "which": which[idx],
                        "labels": label[owner[idx] % nc], "sizes": hw[idx]}
    return {"classes": final, "root": str(root), "splits": splits, "skipped": [list(b) for b in bad],
            "dropped_classes": dropped}


def _check_images(rels: list[str], root: str, files_dir: str, files_name: str) -> dict:
    """Files relative to `root`, checked: {"h": [...], "w": [...] (0 when skipped),
    "converted": [[i, the RGB PNG written under `files_dir`, relative to the cache], ...],
    "bad": [[i, why it is skipped], ...]}."""
    out = {"h": [], "w": [], "converted": [], "bad": []}
    for i, rel in enumerate(rels):
        sub = os.path.dirname(rel).split(os.sep, 2)[:2]          # <split folder>/<class>
        r = _check_image(os.path.join(root, rel), os.path.join(files_dir, *sub))
        if isinstance(r, str):
            out["bad"].append([i, r])
            r = [0, 0]
        elif isinstance(r, tuple):
            out["converted"].append([i, "/".join([files_name, *sub, r[0]])])
            r = r[1]
        out["h"].append(r[0])
        out["w"].append(r[1])
    return out


_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}


def _ends_with_marker(im: Image.Image) -> bool:
    """Whether the file ends with its format's end marker (JPEG EOI, PNG IEND chunk)."""
    marker, fp = _END_MARKERS[im.format], im.fp
    pos = fp.tell()
    try:
        fp.seek(-len(marker), os.SEEK_END)
        return fp.read(len(marker)) == marker
    except OSError:                     # shorter than the marker
        return False
    finally:
        fp.seek(pos)


def _check_image(path: str, convert_dir: str):
    """[h, w] when `path` can be read in place, (file name, [h, w]) of its RGB PNG written
    into `convert_dir`, or why it is skipped (a str).

    Plain 8-bit RGB JPEG/PNG files that end with their end marker pass on their header
    alone; one without the marker (truncated, or trailing bytes) is decoded in full to
    decide. Any other decodable image (grayscale, RGBA, palette, 16-bit, CMYK, other
    formats) is converted once to RGB PNG."""
    try:
        if os.stat(path).st_size == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as im:
            if im.format in _END_MARKERS and im.mode == "RGB":
                if not _ends_with_marker(im):
                    im.load()
                return [im.height, im.width]
            rgb = _to_rgb(im)
    except Image.UnidentifiedImageError:
        return "not an image (unrecognised content)"
    except Image.DecompressionBombError as e:
        return f"too large ({e})"
    except PermissionError as e:
        return f"unreadable ({e.strerror})"
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        text = getattr(e, "strerror", None) or str(e) or type(e).__name__
        return f"truncated or corrupt image ({text})"
    os.makedirs(convert_dir, exist_ok=True)
    name = os.path.splitext(os.path.basename(path))[0] + "-" + _hash(path)[:8] + ".png"
    with atomic_path(os.path.join(convert_dir, name)) as tmp:
        rgb.save(tmp, format="PNG")
    return name, [rgb.height, rgb.width]


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
