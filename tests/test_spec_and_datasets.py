"""Augmentation spec defaults and the dataset cache: synthetic determinism, imagefolder and
cifar10-pickle ingest from tiny fixtures made here, cache reuse and rebuild."""
from __future__ import annotations

import hashlib
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loaders.datasets import SyntheticConfig, decoded, load_dataset
from loaders.common import ConfigError
from loaders.spec import AUGMENTATIONS, MEAN, STD, AugmentSpec


def test_spec_defaults_are_the_reports():
    s = AugmentSpec()
    assert s.size == 128
    assert (s.flip_p, s.crop_padding, s.rotate_degrees) == (0.5, 4, 30.0)
    assert (s.grayscale_p, s.translate_frac) == (0.2, 0.25)
    assert (s.perspective_distortion, s.perspective_p) == (0.3, 0.5)
    assert s.mean == (125 / 255, 124 / 255, 115 / 255) == MEAN
    assert s.std == (60 / 255, 59 / 255, 64 / 255) == STD
    assert s.enabled == AUGMENTATIONS            # all on, in the report's order
    assert AUGMENTATIONS == ("flip", "crop", "rotate", "jitter", "grayscale", "translate", "perspective")


def test_spec_switches_and_validation():
    s = AugmentSpec()
    assert s.without().enabled == () and not s.without().any_enabled
    assert s.without("flip", "rotate").enabled == ("crop", "jitter", "grayscale", "translate", "perspective")
    assert s.only("grayscale").enabled == ("grayscale",)
    with pytest.raises(ValueError, match="unknown augmentation"):
        s.without("blur")
    with pytest.raises(ValueError, match="flip_p"):
        AugmentSpec(flip_p=1.5)


def _files_digest(ds) -> str:
    h = hashlib.sha1()
    for p, label in zip(ds.train.paths + ds.val.paths, ds.train.labels + ds.val.labels):
        h.update(Path(p).read_bytes())
        h.update(bytes([label]))
    return h.hexdigest()


def test_synthetic_is_deterministic_and_balanced(tmp_path):
    cfg = SyntheticConfig(train_per_class=3, val_per_class=2)
    a = load_dataset("synthetic", tmp_path / "a", cfg)
    b = load_dataset("synthetic", tmp_path / "b", cfg)
    assert _files_digest(a) == _files_digest(b)
    assert len(a.train) == 30 and len(a.val) == 20 and a.num_classes == 10
    assert sorted(set(a.train.labels)) == list(range(10))
    arr = decoded(a.train)
    assert arr.shape == (30, 32, 32, 3) and arr.dtype == np.uint8
    # Different classes really differ (the data is not constant).
    assert arr.reshape(30, -1).std(axis=0).mean() > 10
    other = load_dataset("synthetic", tmp_path / "c", SyntheticConfig(train_per_class=3, val_per_class=2, seed=1))
    assert _files_digest(other) != _files_digest(a)


def make_imagefolder(root: Path, classes=("cat", "dog"), n=3, size=(20, 16), val="val"):
    rng = np.random.default_rng(0)
    for split in ("train", val):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{i}.png")
    return root


def test_imagefolder_ingest_labels_and_conversion(tmp_path):
    root = make_imagefolder(tmp_path / "data", val="test")
    Image.new("L", (9, 7), 128).save(root / "train" / "dog" / "gray.png")       # converted to RGB
    ds = load_dataset(f"imagefolder:{root}", tmp_path / "cache")
    assert ds.classes == ("cat", "dog")
    assert len(ds.train) == 7 and len(ds.val) == 6
    for p, label in zip(ds.train.paths, ds.train.labels):
        with Image.open(p) as im:
            assert im.mode == "RGB"
        if "gray" not in p:
            assert Path(p).parent.name == ds.classes[label]
    gray = [p for p in ds.train.paths if "gray" in p]
    assert len(gray) == 1 and str(tmp_path / "cache") in gray[0]
    assert ds.train.sizes[ds.train.paths.index(gray[0])] == (7, 9)


def test_cache_is_reused_and_rebuilt_on_change(tmp_path):
    root = make_imagefolder(tmp_path / "data")
    ds = load_dataset(f"imagefolder:{root}", tmp_path / "cache")
    manifest = ds.cache_dir / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    again = load_dataset(f"imagefolder:{root}", tmp_path / "cache")
    assert manifest.stat().st_mtime_ns == stamp and again.train.paths == ds.train.paths
    Image.new("RGB", (20, 16), (1, 2, 3)).save(root / "train" / "cat" / "new.png")
    changed = load_dataset(f"imagefolder:{root}", tmp_path / "cache")
    assert len(changed.train) == len(ds.train) + 1
    assert changed.fingerprint != ds.fingerprint
    assert not list(ds.cache_dir.glob(".manifest.json.*.tmp"))     # no temp files left behind


def test_cifar10_pickle_ingest(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(1)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, 4)]
        batches[name] = (data, labels)
        with open(root / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)
    ds = load_dataset(f"cifar10:{tmp_path}", tmp_path / "cache")
    assert len(ds.train) == 20 and len(ds.val) == 4 and ds.num_classes == 10
    arr = decoded(ds.train)
    want = batches["data_batch_1"][0].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    assert np.array_equal(arr[:4], want)                     # PNG is lossless: pixels exact
    assert list(ds.train.labels[:4]) == batches["data_batch_1"][1]
    assert list(ds.val.labels) == batches["test_batch"][1]


def test_imagefolder_archive_is_unpacked_once_and_read_like_the_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                  # a relative --cache-dir must still give usable paths
    root = make_imagefolder(tmp_path / "data", val="test")
    archive = tmp_path / "data.tar.gz"
    with tarfile.open(archive, "w:gz") as t:
        for p in sorted(root.rglob("*")):
            t.add(p, arcname=str(p.relative_to(root)), recursive=False)
    folder = load_dataset(f"imagefolder:{root}", tmp_path / "cache")
    ds = load_dataset(f"imagefolder:{archive}", "cache")
    assert all(Path(p).is_file() for p in ds.train.paths + ds.val.paths)
    assert ds.classes == folder.classes and ds.train.labels == folder.train.labels
    assert [Path(p).relative_to(root) for p in folder.train.paths] == \
        [Path(p).relative_to(Path(ds.train.paths[0]).parents[2]) for p in ds.train.paths]
    tree = Path(ds.train.paths[0]).parents[2]
    stamp = tree.stat().st_mtime_ns
    again = load_dataset(f"imagefolder:{archive}", "cache")
    assert again.train.paths == ds.train.paths and tree.stat().st_mtime_ns == stamp   # not unpacked again
    assert not list(tree.parent.glob("*.tmp"))
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(archive.read_bytes()[:200])
    with pytest.raises(ConfigError, match="not a readable .tar"):
        load_dataset(f"imagefolder:{broken}", tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("archive-*/tree*"))[1:]          # only the good one


@pytest.mark.parametrize("source, match", [
    ("nosuch", "unknown data source"),
    ("imagefolder", "needs a path"),
    ("imagefolder:/definitely/missing", "not a directory"),
    ("cifar10:/definitely/missing", "not a directory"),
])
def test_bad_sources(tmp_path, source, match):
    with pytest.raises(ConfigError, match=match):
        load_dataset(source, tmp_path)


def test_empty_class_folder_and_class_mismatch(tmp_path):
    root = make_imagefolder(tmp_path / "a")
    (root / "train" / "bird").mkdir()
    (root / "val" / "bird").mkdir()
    with pytest.raises(ConfigError, match="--strict: 2 bad item.*empty class folder"):
        load_dataset(f"imagefolder:{root}", tmp_path / "c1", strict=True)
    ds = load_dataset(f"imagefolder:{root}", tmp_path / "c1")     # default: dropped and reported
    assert ds.classes == ("cat", "dog") and ds.dropped_classes == ("bird",)
    assert sorted(ds.skipped) == [str(root.resolve() / s / "bird") for s in ("train", "val")]
    root2 = make_imagefolder(tmp_path / "b")
    make_imagefolder(root2, classes=("fox",))
    (root2 / "val" / "fox").rename(root2 / "val" / "owl")
    with pytest.raises(ConfigError, match="class folders differ.*only in train \\['fox'\\].*only in val \\['owl'\\]"):
        load_dataset(f"imagefolder:{root2}", tmp_path / "c2")
