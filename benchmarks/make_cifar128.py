"""A 128x128 JPEG image folder from a 32x32 CIFAR-10 JPEG archive: the report's workload
(sources at the training size) from the data at hand.

    python -m benchmarks.make_cifar128 ../shared/datasets/cifar10-jpeg.tar.gz /tmp/cifar128
    python -m benchmarks.throughput --data imagefolder:/tmp/cifar128

Every image of the archive's ImageFolder layout (train/<class>/*.jpg, test/<class>/*.jpg) is
decoded, upscaled with PIL bicubic to SIZE x SIZE and saved as JPEG quality 90 (4:2:0, the
encoder's default) under the same relative path. The folder is built under a temp name and
renamed last, so DST is either complete or absent. `benchmarks/throughput.py --data
shared128` builds it once into its cache (`ensure`).
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import tarfile
from multiprocessing import Pool
from pathlib import Path

from PIL import Image

SIZE, QUALITY = 128, 90
EXTENSIONS = (".jpg", ".jpeg", ".png")


def _convert(job: tuple[str, bytes, int, int]) -> tuple[str, bytes]:
    name, data, size, quality = job
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB").resize((size, size), Image.BICUBIC)
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=quality)
    return name, out.getvalue()


def _members(archive: Path, size: int, quality: int):
    with tarfile.open(archive) as t:
        for m in t:
            if m.isfile() and m.name.lower().endswith(EXTENSIONS) and not Path(m.name).name.startswith("."):
                yield str(Path(m.name).with_suffix(".jpg")), t.extractfile(m).read(), size, quality


def make(archive: str | os.PathLike, dst: str | os.PathLike, size: int = SIZE, quality: int = QUALITY,
         workers: int | None = None) -> int:
    """Write the folder; returns the number of images. An existing DST is left untouched."""
    archive, dst = Path(archive), Path(dst)
    if dst.exists():
        raise FileExistsError(f"{dst} exists; remove it or pick another destination")
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    n = 0
    try:
        with Pool(workers or os.cpu_count() or 1) as pool:
            for name, jpeg in pool.imap_unordered(_convert, _members(archive, size, quality), chunksize=64):
                out = tmp / name
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(jpeg)
                n += 1
        if not n:
            raise ValueError(f"{archive} holds no images")
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return n


def ensure(archive: str | os.PathLike, cache_root: str | os.PathLike, size: int = SIZE,
           quality: int = QUALITY) -> Path:
    """The folder for `archive` in `cache_root`, built on first use (keyed on the archive's
    path, byte size and mtime, and size/quality; concurrent callers build it once)."""
    import hashlib
    from loaders.common import file_lock
    archive = Path(archive).resolve()
    st = archive.stat()
    key = hashlib.sha256(f"{archive}|{st.st_size}|{st.st_mtime_ns}|{size}|{quality}".encode()).hexdigest()[:10]
    dst = Path(cache_root).resolve() / f"cifar{size}-q{quality}-{key}"
    with file_lock(dst.with_name(dst.name + ".lock"), f"building {dst.name}"):
        if not dst.exists():
            make(archive, dst, size, quality)
    return dst


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("archive", help="CIFAR-10 JPEG archive (.tar/.tar.gz, ImageFolder layout)")
    p.add_argument("dst", help="output folder (must not exist)")
    p.add_argument("--size", type=int, default=SIZE)
    p.add_argument("--quality", type=int, default=QUALITY)
    args = p.parse_args(argv)
    n = make(args.archive, args.dst, args.size, args.quality)
    print(f"{n} images at {args.size}x{args.size}, JPEG quality {args.quality}: {args.dst}")


if __name__ == "__main__":
    main()
