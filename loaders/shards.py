"""Webdataset shards: the writer (`python -m loaders.shards`), the `webdataset:PATTERN`
source, the shard sharding rule, and the loaders over shards.

    python -m loaders.shards imagefolder:/data/pets /data/pets-shards --shard-size 1000
    python -m engine.train --data webdataset:/data/pets-shards --loader dali

A split is a list of tar shards (members `<key>.jpg|png` + `<key>.cls`) with a sample count
per shard: no per-file list. Training epochs permute the shards by (seed, epoch), deal
them round-robin to ranks and shuffle samples within a buffer; every rank delivers the same
number of samples (`rank_quota`). The torchvision and DALI loaders stream the shards; the
resident and FFCV loaders unpack them once into the cache and run as over any split.
Source syntax, the rule in full, bad members and each loader's behaviour:
docs/datasets.md, "Webdataset shards".
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tarfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loaders.base import (EpochLoader, Loader, LoaderOptions, batches_per_epoch, derive_seed,
                          loader_class)
from loaders.common import DISK_FULL, ConfigError, atomic_path, atomic_write, file_lock

FORMAT = "fasttrain-webdataset"
META = "meta.json"                      # the writer's record: classes, shards, counts, bytes
WRITING = ".writing"                    # present while the writer replaces a folder's shards
MANIFEST_VERSION = 1
IMAGE_EXTS = ("jpg", "jpeg", "png")     # a sample's image member (the first one found)
SHARD_RE = re.compile(r"^(train|val|test)-(\d{6})\.tar$")


def _hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def member_key(name: str) -> tuple[str | None, str | None]:
    """(key, extension) of a tar member by webdataset's convention: the key ends at the
    first dot of the file name (its folder included), the extension is lower-cased."""
    m = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return (m.group(1), m.group(2).lower()) if m else (None, None)


def parse_label(raw: bytes | None, n_classes: int | None) -> int | None:
    """The class index in a `.cls` member (an integer as text), or None when unusable."""
    try:
        v = int(raw.decode("ascii").strip())
    except (AttributeError, UnicodeDecodeError, ValueError):
        return None
    return v if v >= 0 and (n_classes is None or v < n_classes) else None


# ------------------------------------------------------------------------------- the writer

def _balanced(n: int, shard_size: int) -> list[int]:
    """Counts of ceil(n / shard_size) shards holding n samples, differing by at most one."""
    k = -(-n // shard_size)
    return [n // k + (i < n % k) for i in range(k)]


def _image_ext(data: bytes) -> str:
    return "jpg" if data[:3] == b"\xff\xd8\xff" else "png"     # the ingest keeps RGB JPEG/PNG only


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)            # fixed metadata: the same input writes the same bytes
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def write_shards(source: str, dst: str | os.PathLike, shard_size: int, splits=("train", "val"),
                 seed: int = 0, cache_root: str | os.PathLike = ".cache", strict: bool = False) -> dict:
    """Write `source` (any `load_dataset` source) as shards `DST/<split>-NNNNNN.tar` plus
    `meta.json` and `classes.txt`; returns the meta. Samples are shuffled once by `seed`
    (shards mix classes); shard counts differ by at most one. Each shard is written to a
    temp file and renamed; the meta last. Up to date (same source files, size, seed): no
    write."""
    from loaders.datasets import load_dataset
    if shard_size < 1:
        raise ConfigError(f"--shard-size {shard_size}: must be >= 1; e.g. --shard-size 1000")
    bad = [s for s in splits if s not in ("train", "val")]
    if bad or not splits:
        raise ConfigError(f"--split {','.join(splits)}: use train, val or train,val")
    dst = Path(dst).expanduser().resolve()
    if dst.exists() and not dst.is_dir():
        raise ConfigError(f"shards: {dst} exists and is not a folder; pass a folder to write the shards into")
    ds = load_dataset(source, cache_root, strict=strict)
    want = dict(source=source, fingerprint=ds.fingerprint, shard_size=shard_size, seed=seed,
                written=sorted(splits))
    try:
        dst.mkdir(parents=True, exist_ok=True)
        with file_lock(dst / ".shards.lock", "writing shards"):
            old = _read_meta(dst)
            if old and {k: old.get(k) for k in want} == want and all(
                    _size(dst / s["name"]) == s["bytes"] for sp in old["splits"].values() for s in sp):
                print(f"shards: {dst} is up to date ({source})", flush=True)
                return old
            meta = dict(format=FORMAT, version=1, classes=list(ds.classes), **want, splits={})
            atomic_write(dst / WRITING, "a write in progress (or interrupted): run python -m loaders.shards again\n")
            (dst / META).unlink(missing_ok=True)
            for name in splits:
                meta["splits"][name] = _write_split(getattr(ds, name), name, dst, shard_size, seed)
            atomic_write(dst / "classes.txt", "".join(c + "\n" for c in ds.classes))
            atomic_write(dst / META, json.dumps(meta, indent=1))
            kept = {s["name"] for sp in meta["splits"].values() for s in sp}
            for f in dst.iterdir():                 # shards of an earlier, larger write
                m = SHARD_RE.match(f.name)
                if m and m.group(1) in splits and f.name not in kept:
                    f.unlink()
            (dst / WRITING).unlink()
    except OSError as e:
        if e.errno in DISK_FULL:
            raise ConfigError(f"shards: disk full writing into {dst} ({e.strerror}); shards already in place "
                              "are complete; free space and run again") from None
        if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise ConfigError(f"shards: cannot write into {dst} ({e.strerror}); pick a writable folder") from None
        raise
    n = {k: sum(s["count"] for s in v) for k, v in meta["splits"].items()}
    print("shards: wrote " + ", ".join(f"{k}: {n[k]} samples in {len(v)} shard(s)" for k, v in meta["splits"].items())
          + f" to {dst}", flush=True)
    return meta


def _write_split(split, name: str, dst: Path, shard_size: int, seed: int) -> list[dict]:
    order = np.random.default_rng(derive_seed(seed, "write-shards", name)).permutation(len(split))
    out, i = [], 0
    for s, count in enumerate(_balanced(len(split), shard_size)):
        path = dst / f"{name}-{s:06d}.tar"
        with atomic_path(path) as tmp:
            with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
                for j in order[i:i + count]:
                    data = Path(split.paths[j]).read_bytes()
                    key = f"{i:08d}"
                    _add(tar, f"{key}.{_image_ext(data)}", data)
                    _add(tar, f"{key}.cls", f"{split.labels[j]}".encode())
                    i += 1
        out.append(dict(name=path.name, count=count, bytes=path.stat().st_size,
                        sizes=sorted({tuple(split.sizes[j]) for j in order[i - count:i]})))
    return out


def _read_meta(folder: Path) -> dict | None:
    try:
        m = json.loads((folder / META).read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("format") == FORMAT else None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


# ------------------------------------------------------------------------ scanning a shard

@dataclass
class ShardScan:
    """One shard read header by header (its `.cls` members read too, they are tiny)."""
    samples: list = field(default_factory=list)   # (key, [(ext, offset, size, name)] image then cls, label)
    problems: list = field(default_factory=list)  # (where, reason)


def scan_shard(path: str, n_classes: int | None) -> ShardScan:
    """The complete samples of a shard (an image member and a usable `.cls`), in order, and
    what is wrong with the others. A tar that breaks off keeps the samples before it."""
    out = ShardScan()

    def close(key, parts):
        if key is None:
            return
        img = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
        if img is None:
            out.problems.append((f"{path}:{key}", "missing image member (.jpg/.png)"))
        elif "cls" not in parts:
            out.problems.append((f"{path}:{key}", "missing .cls member"))
        elif (label := parse_label(parts["cls"][4], n_classes)) is None:
            out.problems.append((f"{path}:{key}", f"unusable .cls {parts['cls'][4][:20]!r}"
                                 + (f" (classes: {n_classes})" if n_classes else "")))
        elif " " in img[3] or " " in parts["cls"][3]:
            out.problems.append((f"{path}:{key}", "member name with a space (DALI's index cannot list it)"))
        else:
            out.samples.append((key, [img[:4], parts["cls"][:4]], label))

    key, parts = None, {}
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if not m.isreg() or ("/" not in m.name and m.name.startswith("__") and m.name.endswith("__")):
                    continue
                k, ext = member_key(m.name)
                if k is None:
                    continue
                if k != key:
                    close(key, parts)
                    key, parts = k, {}
                raw = tar.extractfile(m).read(64) if ext == "cls" else None
                parts.setdefault(ext, (ext, m.offset_data, m.size, m.name, raw))
            end = tar.offset
    except (tarfile.TarError, OSError, EOFError) as e:
        out.problems.append((path, f"unreadable tar after {len(out.samples)} sample(s) ({e}); kept those"))
        return out                       # the sample being read when it broke is incomplete
    close(key, parts)
    if os.path.getsize(path) < end + 1024:     # tarfile stops quietly where a shard is cut short
        out.problems.append((path, f"truncated tar (no end-of-archive marker) after {len(out.samples)} "
                                   "complete sample(s); kept those"))
    return out


def write_index(scan: ShardScan, path: Path) -> None:
    """DALI's webdataset index (v1.2) listing the complete samples only."""
    lines = [f"v1.2 {len(scan.samples)}"]
    lines += [" ".join(f"{e} {o} {s} {n}" for e, o, s, n in parts) for _, parts, _ in scan.samples]
    atomic_write(path, "\n".join(lines) + "\n")


def read_index(path: Path) -> list[tuple[tuple, tuple]]:
    """[(image (ext, offset, size, name), cls (ext, offset, size, name))] of an index."""
    rows = []
    for line in Path(path).read_text().splitlines()[1:]:
        f = line.split()
        rows.append((tuple(f[0:4]), tuple(f[4:8])))
    return [((a[0], int(a[1]), int(a[2]), a[3]), (b[0], int(b[1]), int(b[2]), b[3])) for a, b in rows]


# ----------------------------------------------------------------------------- the source

@dataclass(frozen=True)
class ShardSplit:
    """A split kept as shards: paths, complete samples per shard, the cache. Sample ids are
    dense: shard i's samples are `offsets[i] .. offsets[i] + counts[i] - 1`, in shard order."""
    name: str
    shards: tuple[str, ...]
    counts: tuple[int, ...]
    cache_dir: Path
    num_classes: int
    image_hw: tuple[int, int] | None = None     # every image's (h, w), when the writer recorded one

    def __len__(self) -> int:
        return sum(self.counts)

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)

    def index_path(self, i: int) -> Path:
        """Where shard i's DALI index lives in the cache (keyed by path, size and mtime)."""
        p = self.shards[i]
        st = os.stat(p)
        return self.cache_dir / "index" / f"{_hash(f'{p}|{st.st_size}|{st.st_mtime_ns}')[:16]}.idx"


SOURCE_HELP = ("use webdataset:FOLDER (written by python -m loaders.shards), webdataset:'/d/{split}-{000000..000127}.tar' "
               "or webdataset:'train=/d/train-{000000..000127}.tar;val=/d/val-{000000..000007}.tar'")


def _expand(pattern: str) -> list[str]:
    from braceexpand import braceexpand
    return [str(Path(p).expanduser().resolve()) for p in braceexpand(pattern)]


def parse_source(source: str) -> tuple[dict[str, list[str]], Path]:
    """{split: shard paths} of a `webdataset:` source, and the folder whose meta.json /
    classes.txt describe it. Missing shards are a ConfigError."""
    arg = source.partition(":")[2].strip()
    if not arg:
        raise ConfigError(f"--data {source}: no shards given; {SOURCE_HELP}")
    folder = Path(arg).expanduser().resolve()
    if (folder if folder.is_dir() else folder.parent).joinpath(WRITING).exists():
        raise ConfigError(f"--data {source}: the shards there are being written, or a write was interrupted "
                          f"({folder / WRITING}); let it finish or run python -m loaders.shards again")
    if "{" not in arg and "=" not in arg and folder.is_dir():
        meta = _read_meta(folder)
        if meta:
            shards = {k: [str(folder / s["name"]) for s in v] for k, v in meta["splits"].items()}
        else:
            shards = {k: sorted(str(p) for p in folder.glob(f"{k}-*.tar")) for k in ("train", "val", "test")}
    elif "=" in arg:
        shards = {}
        for part in arg.split(";"):
            k, _, pat = part.partition("=")
            if k.strip() not in ("train", "val", "test") or not pat:
                raise ConfigError(f"--data {source}: {part!r} is not SPLIT=PATTERN; {SOURCE_HELP}")
            shards[k.strip()] = _expand(pat.strip())
    elif "{split}" in arg:
        shards = {k: _expand(arg.replace("{split}", k)) for k in ("train", "val", "test")}
        if not any(os.path.exists(p) for p in shards["val"]):
            shards.pop("val")
        if not any(os.path.exists(p) for p in shards["test"]):
            shards.pop("test")
    elif os.path.exists(arg) or "{" in arg:
        raise ConfigError(f"--data {source}: one pattern cannot say which shards are validation; {SOURCE_HELP}")
    else:
        raise ConfigError(f"--data {source}: {arg} does not exist; {SOURCE_HELP}")
    if not shards.get("val"):
        shards["val"] = shards.pop("test", [])
    shards.pop("test", None)
    for name in ("train", "val"):
        got = shards.get(name) or []
        missing = [p for p in got if not os.path.isfile(p)]
        if not got or len(missing) == len(got):
            raise ConfigError(f"--data {source}: no {name} shards found"
                              + (f" (e.g. {missing[0]} is missing)" if missing else "") + f"; {SOURCE_HELP}")
        if missing:
            raise ConfigError(f"--data {source}: {len(missing)} of {len(got)} {name} shards are missing "
                              f"(e.g. {missing[0]}); restore them or fix the pattern's range")
    first = Path(shards["train"][0]).parent
    return shards, (folder if folder.is_dir() else first)


def _classes(folder: Path, meta: dict | None) -> list[str] | None:
    if meta and meta.get("classes"):
        return list(meta["classes"])
    try:
        names = [ln.strip() for ln in (folder / "classes.txt").read_text().splitlines() if ln.strip()]
        return names or None
    except OSError:
        return None


def load_webdataset(source: str, cache_root):
    """The `webdataset:` source as a Dataset of two ShardSplits. Counts come from the
    writer's meta.json when a shard's size matches it, else from one header scan per
    shard (which also writes DALI's index), recorded in the cache's manifest under the
    lock. Incomplete samples and broken tars are reported (`Dataset.report()`)."""
    from loaders.datasets import Dataset
    shards, folder = parse_source(source)
    meta = _read_meta(folder)
    listed = {s["name"]: s for sp in (meta or {}).get("splits", {}).values() for s in sp}
    classes = _classes(folder, meta)
    rows = [f"{k}\t{p}\t{os.stat(p).st_size}\t{os.stat(p).st_mtime_ns}" for k in ("train", "val") for p in shards[k]]
    fingerprint = _hash("\n".join(rows + [repr(classes)]))
    cache_dir = Path(cache_root) / f"webdataset-{_hash(source)[:10]}"
    manifest = cache_dir / "manifest.json"
    with file_lock(cache_dir / ".lock", "webdataset scan"):
        try:
            m = json.loads(manifest.read_text())
        except (OSError, ValueError):
            m = None
        if not m or m.get("fingerprint") != fingerprint or m.get("version") != MANIFEST_VERSION:
            m = _build_manifest(shards, listed, classes, cache_dir)
            m.update(version=MANIFEST_VERSION, fingerprint=fingerprint, source=source)
            atomic_write(manifest, json.dumps(m))
    splits = {k: ShardSplit(k, tuple(v["shards"]), tuple(v["counts"]), cache_dir, len(m["classes"]),
                            tuple(v["hw"]) if v.get("hw") else None) for k, v in m["splits"].items()}
    for k, s in splits.items():
        if len(s) == 0:
            raise ConfigError(f"--data {source}: the {k} shards hold no complete sample (an image and a .cls); "
                              f"see {manifest}")
    return Dataset(source, tuple(m["classes"]), splits["train"], splits["val"], cache_dir, fingerprint,
                   tuple(p for p, _ in m["skipped"]), tuple(r for _, r in m["skipped"]))


def _build_manifest(shards, listed, classes, cache_dir: Path) -> dict:
    n_classes = len(classes) if classes else None
    out, skipped, top = {}, [], -1
    for name in ("train", "val"):
        paths, counts, sizes, known = [], [], set(), True
        for p in shards[name]:
            rec = listed.get(Path(p).name)
            if rec and rec.get("bytes") == os.stat(p).st_size:
                count = rec["count"]          # the writer's count: no scan
                sizes |= {tuple(hw) for hw in rec.get("sizes", [])}
                known &= "sizes" in rec
            else:
                known = False                 # the scan reads no pixels
                scan = scan_shard(p, n_classes)
                skipped += scan.problems
                count = len(scan.samples)
                top = max([top] + [lab for *_, lab in scan.samples])
                if count:
                    write_index(scan, ShardSplit(name, (p,), (count,), cache_dir, 0).index_path(0))
            if count == 0:
                skipped.append((p, "no complete sample: shard left out"))
                continue
            paths.append(p)
            counts.append(count)
        out[name] = dict(shards=paths, counts=counts, hw=list(sizes.pop()) if known and len(sizes) == 1 else None)
    classes = classes or [str(i) for i in range(top + 1)]
    return dict(classes=classes, splits=out, skipped=[list(s) for s in skipped])


def ensure_indexes(split: ShardSplit) -> list[Path]:
    """DALI's index for every shard of the split, written once into the cache (a header
    scan, under the lock) where missing. A shard whose complete samples no longer match
    its count is a ConfigError (it changed since the source was read)."""
    out = []
    with file_lock(split.cache_dir / ".lock", "webdataset index"):
        for i, p in enumerate(split.shards):
            idx = split.index_path(i)
            if not idx.exists():
                scan = scan_shard(p, split.num_classes)
                if len(scan.samples) != split.counts[i]:
                    raise ConfigError(f"webdataset: {p} holds {len(scan.samples)} complete samples, not the "
                                      f"{split.counts[i]} recorded; it changed since the source was read: run again")
                write_index(scan, idx)
            out.append(idx)
    return out


# ------------------------------------------------------------------------- the sharding rule

def rank_shards(split: ShardSplit, opts: LoaderOptions, epoch: int) -> np.ndarray:
    """This rank's shards (indices into split.shards) for `epoch`, in reading order.

    Training: the shards permuted by (seed, epoch), the last `S % world` of the permutation
    left out for the epoch, the rest dealt round-robin (each rank gets S // world).
    Evaluation: shard i goes to rank i % world, every shard read."""
    S, W = len(split.shards), opts.world_size
    if opts.train:
        if S < W:
            raise ConfigError(f"webdataset: {S} {split.name} shard(s) for {W} ranks; every rank needs one: "
                              "write smaller shards (python -m loaders.shards ... --shard-size)")
        order = np.random.default_rng(derive_seed(opts.seed, "shards", epoch)).permutation(S)[: S - S % W]
    else:
        order = np.arange(S)
    return order[opts.rank::W]


def rank_quota(split: ShardSplit, opts: LoaderOptions) -> int:
    """Samples this rank delivers every epoch. Training: the fewest any rank can be dealt
    (the S // world smallest counts), the same on every rank; a rank dealt more drops the
    end of its stream. Evaluation: all of its shards' samples."""
    if opts.train:
        k = len(split.shards) // opts.world_size
        return int(np.sort(np.asarray(split.counts))[:k].sum())
    return int(sum(split.counts[opts.rank::opts.world_size]))


class StreamingLoader(EpochLoader):
    """`EpochLoader` for loaders that stream shards: len() from `rank_quota`; a subclass
    provides `sample_indices` (global sample ids in delivery order) and `__iter__`."""

    def _init_stream(self, split: ShardSplit, opts: LoaderOptions) -> None:
        rank_shards(split, opts, 0)                      # S < world: the ConfigError now
        self.split, self.opts, self.n_samples = split, opts, len(split)
        self.quota = rank_quota(split, opts)
        self._len = batches_per_epoch(self.quota, opts)
        self.delivered = self._len * opts.batch_size if opts.drop else self.quota
        self.epoch, self.start_batch = 0, 0


# ------------------------------------------------------------------ resident and FFCV: unpack

def unpack(split: ShardSplit):
    """The shards as files in the cache (once, under the lock): a `datasets.Split` the
    resident and FFCV loaders read like any other, and each file's global sample id. A
    member that does not decode is left out with a warning naming shard and key."""
    from PIL import Image

    from loaders.datasets import Split
    key = _hash("\n".join(f"{p}|{os.stat(p).st_size}|{os.stat(p).st_mtime_ns}|{c}"
                          for p, c in zip(split.shards, split.counts)))[:12]
    root = split.cache_dir / f"unpacked-{split.name}-{key}"
    with file_lock(split.cache_dir / ".lock", "webdataset unpack"):
        if not (root / "files.json").exists():
            tmp = root.with_name(root.name + ".tmp")          # renamed when complete: a kill leaves no half
            shutil.rmtree(tmp, ignore_errors=True)
            m = dict(paths=[], labels=[], sizes=[], ids=[])
            for i, (sid, key_, img, label) in enumerate(_iter_members(split)):
                rel = f"{i // 10000:04d}/{sid:09d}.{img[1]}"
                try:
                    with Image.open(io.BytesIO(img[0])) as im:
                        im.load()
                        hw = (im.height, im.width)
                        rgb = None if im.mode == "RGB" and im.format in ("JPEG", "PNG") else im.convert("RGB")
                except Exception as e:  # noqa: BLE001 - any decode failure: leave it out
                    warn_member(split.shards[shard_of(split, sid)], key_, f"{type(e).__name__}: {e}", "left out")
                    continue
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                if rgb is None:
                    (tmp / rel).write_bytes(img[0])
                else:
                    rel = rel.rsplit(".", 1)[0] + ".png"
                    rgb.save(tmp / rel, format="PNG")
                m["paths"].append(rel)
                m["labels"].append(label)
                m["sizes"].append(hw)
                m["ids"].append(sid)
            (tmp / "files.json").write_text(json.dumps(m))
            os.replace(tmp, root)
            for old in split.cache_dir.glob(f"unpacked-{split.name}-*"):   # a changed source's copy
                if old != root:
                    shutil.rmtree(old, ignore_errors=True)
        m = json.loads((root / "files.json").read_text())
    s = Split(split.name, tuple(str(root / p) for p in m["paths"]), tuple(m["labels"]),
              tuple(map(tuple, m["sizes"])), root)
    return s, np.asarray(m["ids"], dtype=np.int64)


def shard_of(split: ShardSplit, sid: int) -> int:
    """The index of the shard holding sample `sid`."""
    return int(np.searchsorted(split.offsets, sid, side="right") - 1)


def warn_member(shard: str, key: str, why: str, instead: str) -> None:
    warnings.warn(f"webdataset: {shard}: sample {key}: {why}; {instead}", RuntimeWarning, stacklevel=3)


def shard_samples(path: str, count: int, first_id: int, n_classes: int):
    """Exactly `count` samples of one shard, in order, as the scan counted them:
    (id, key, (image bytes, ext) or None, label or None). Incomplete samples are passed
    over (the scan did not count them); a shard that ends early is padded with None
    images (the caller replaces them), with a warning; extra samples are not read."""
    import webdataset as wds
    errors: list = []
    pos = 0

    def handler(exn):
        errors.append(exn)
        return True
    if count:
        for s in wds.tarfile_samples([{"url": path}], handler=handler):
            ext = next((e for e in IMAGE_EXTS if e in s), None)
            if ext is None or "cls" not in s or parse_label(s["cls"], n_classes) is None:
                continue
            yield first_id + pos, s["__key__"], (s[ext], ext), parse_label(s["cls"], n_classes)
            pos += 1
            if pos == count:
                return
    if pos < count:
        why = f"{type(errors[0]).__name__}: {str(errors[0].args[0])[:200]}" if errors else "fewer samples"
        warn_member(path, f"#{pos}..", f"{count - pos} of {count} samples missing ({why})",
                    "other samples of the stream take their place")
        for p in range(pos, count):
            yield first_id + p, f"#{p}", None, None


def _iter_members(split: ShardSplit):
    for path, count, off in zip(split.shards, split.counts, split.offsets):
        for sid, key, img, label in shard_samples(path, count, int(off), split.num_classes):
            if img is not None:
                yield sid, key, img, label


class Unpacked(Loader):
    """A resident or FFCV loader over the unpacked shards: its own per-sample order
    (`base.epoch_indices`); `sample_indices` are global sample ids."""

    def __init__(self, inner, ids: np.ndarray):
        self.inner, self.ids = inner, ids

    @property
    def opts(self) -> LoaderOptions:
        return self.inner.opts

    def __len__(self) -> int:
        return len(self.inner)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.inner.set_epoch(epoch, start_batch)

    def sample_indices(self, epoch: int) -> np.ndarray:
        return self.ids[self.inner.sample_indices(epoch)]

    def __iter__(self):
        return iter(self.inner)


def build_shard_loader(name: str, split: ShardSplit, spec, opts: LoaderOptions):
    """The `name` loader over shards: a backend with its own streaming loader
    (`EpochLoader.shard_loader`: torchvision, DALI) streams them; the others (resident, FFCV)
    read them unpacked; auto streams with DALI when it is installed, else torchvision."""
    if name == "auto":
        name = "dali" if _streams_shards("dali") else "torchvision"
        if opts.rank == 0 and opts.train:
            print(f"--loader auto: chose {name} (webdataset shards: a streaming loader, no unpacked copy)",
                  flush=True)
    cls = loader_class(name)                              # unknown or not installed: ConfigError
    if getattr(cls, "shard_loader", None) is not None:    # the backend streams shards itself
        return cls.shard_loader(split, spec, opts)
    files, ids = unpack(split)
    return Unpacked(cls(files, spec, opts), ids)


def _streams_shards(name: str) -> bool:
    """Whether the `name` backend is installed and has its own streaming loader."""
    try:
        return getattr(loader_class(name), "shard_loader", None) is not None
    except ConfigError:
        return False


# ------------------------------------------------------------------------------------- CLI

def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m loaders.shards",
                                description="Write a dataset as webdataset tar shards (docs/datasets.md).")
    p.add_argument("src", help="a --data source (imagefolder:PATH, cifar10:PATH, synthetic) or an imagefolder path")
    p.add_argument("dst", help="the folder to write <split>-NNNNNN.tar, meta.json and classes.txt into")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard at most (default 1000)")
    p.add_argument("--split", default="train,val", help="splits to write (default train,val)")
    p.add_argument("--seed", type=int, default=0, help="the one shuffle before writing (default 0)")
    p.add_argument("--cache-dir", default=".cache", help="the ingest cache of the source (default .cache)")
    p.add_argument("--strict", action="store_true", help="bad source files are an error")
    p.error = lambda msg: (print(f"error: {p.prog}: {msg}", file=sys.stderr), sys.exit(2))  # one line
    a = p.parse_args(argv)
    src = a.src if re.match(r"^(synthetic|imagefolder|cifar10)(:|$)", a.src) else f"imagefolder:{a.src}"
    try:
        return write_shards(src, a.dst, a.shard_size, tuple(s for s in a.split.split(",") if s), a.seed,
                            a.cache_dir, a.strict)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
