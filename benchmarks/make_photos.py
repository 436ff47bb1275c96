"""A photo-sized JPEG image folder (default 500x375, ImageNet's typical size) from the
32x32 CIFAR-10 JPEG archive, for the photo workload of docs/datasets.md:

    python -m benchmarks.make_photos /tmp/photos --n 2000 --size 500x375
    python -m benchmarks.throughput --data imagefolder:/tmp/photos --aug resize=rrc

Each image: a CIFAR image upscaled (bicubic) over the canvas with a random crop and flip
(the scene), real image detail at two finer scales (mosaics of other CIFAR images at 4x
and 1x, each at 0.3 of its contrast), per-image grain (gaussian, sigma drawn in 3..8), JPEG
quality 90: ~64 KB per 500x375 file (a plain upscale: ~15 KB; ImageNet's JPEGs average
~110 KB at mixed sizes and qualities), so decode works on photo-like entropy. A tenth of
the images are portrait (HxW swapped). `--n` train images (round robin over classes),
`--val` (default n/10, at least one per class) from the archive's test split; a pure function of `--seed`. Built
under a temp name, renamed last. Never commit the output (../shared/datasets/README.md).
"""
from __future__ import annotations

import argparse
import io
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from engine.config import SHARED_CIFAR10


def _members(archive: Path) -> dict[str, dict[str, list[bytes]]]:
    """split -> class -> JPEG bytes, in the archive's order."""
    out: dict[str, dict[str, list[bytes]]] = {}
    with tarfile.open(archive) as t:
        for m in t:
            parts = m.name.split("/")
            if m.isfile() and len(parts) == 3 and parts[2].lower().endswith(".jpg"):
                out.setdefault(parts[0], {}).setdefault(parts[1], []).append(t.extractfile(m).read())
    return out


def _rgb(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def _mosaic(pool: list[bytes], hw: tuple[int, int], tile: int, rng: np.random.Generator) -> np.ndarray:
    """CIFAR images from `pool` tiled at tile x tile pixels over hw, at a random offset."""
    h, w = hw
    rows, cols = h // tile + 2, w // tile + 2
    m = Image.new("RGB", (cols * tile, rows * tile))
    for k, j in enumerate(rng.integers(0, len(pool), rows * cols)):
        m.paste(_rgb(pool[j]).resize((tile, tile), Image.BICUBIC), ((k % cols) * tile, (k // cols) * tile))
    dy, dx = rng.integers(0, tile, 2)
    return np.asarray(m.crop((dx, dy, dx + w, dy + h)), np.float32)


def photo(base: bytes, pool: list[bytes], hw: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """One photo-like image of size hw: a CIFAR image upscaled over the canvas (the scene),
    plus real image detail at two finer scales (mosaics of other CIFAR images at 4x and
    1x) and grain."""
    h, w = hw
    side = int(max(h, w) * rng.uniform(1.0, 1.3))           # upscale over the canvas, crop
    im = _rgb(base).resize((side, side), Image.BICUBIC)
    top, left = rng.integers(0, side - h + 1), rng.integers(0, side - w + 1)
    im = im.crop((left, top, left + w, top + h))
    if rng.random() < 0.5:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    x = np.asarray(im, np.float32) * 0.7
    for tile, weight in ((128, 0.15), (32, 0.15)):          # detail: mean-free, scaled
        m = _mosaic(pool, hw, tile, rng)
        x += (m - m.mean()) * weight * 2 + m.mean() * weight
    x += rng.normal(0, rng.uniform(3, 8), x.shape).astype(np.float32)
    return Image.fromarray(np.clip(x, 0, 255).round().astype(np.uint8))


def make(dst: Path, n: int, size: tuple[int, int], val: int | None = None, seed: int = 0,
         archive: Path = SHARED_CIFAR10, quality: int = 90) -> dict:
    """Write DST/train/<class>/NNNN.jpg (n images) and DST/val/<class>/NNNN.jpg; returns a
    summary (counts, mean file size, seconds)."""
    t0 = time.perf_counter()
    src = _members(archive)
    rng = np.random.default_rng(seed)
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    nbytes, count = 0, 0
    for split, out_name, k in (("train", "train", n), ("test", "val", val)):
        classes = sorted(src[split])
        k = max(n // 10, len(classes)) if k is None else k      # every class in val
        pool = [data for c in classes for data in src[split][c]]
        for i in range(k):
            c = classes[i % len(classes)]
            base = src[split][c][i // len(classes) % len(src[split][c])]
            hw = size if rng.random() >= 0.1 else size[::-1]
            path = tmp / out_name / c / f"{i // len(classes):04d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            photo(base, pool, hw, rng).save(path, format="JPEG", quality=quality)
            nbytes, count = nbytes + path.stat().st_size, count + 1
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return dict(images=count, mean_kb=round(nbytes / max(1, count) / 1024, 1),
                seconds=round(time.perf_counter() - t0, 1))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dst", type=Path)
    p.add_argument("--n", type=int, default=2000, help="training images")
    p.add_argument("--val", type=int, default=None, help="validation images (default n/10, at least one per class)")
    p.add_argument("--size", default="500x375", help="WxH of the landscape images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--archive", type=Path, default=SHARED_CIFAR10)
    a = p.parse_args(argv)
    if not a.archive.exists():
        raise SystemExit(f"error: {a.archive} not found (the shared CIFAR-10 JPEG archive); pass --archive")
    w, h = (int(v) for v in a.size.lower().split("x"))
    print(make(a.dst, a.n, (h, w), a.val, a.seed, a.archive, a.quality))


if __name__ == "__main__":
    main()
