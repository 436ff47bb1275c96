"""Bad data: a folder with every kind of broken or odd file trains for an epoch with
each available loader, and the report lists exactly the bad items.

The fixture's cases: zero-byte file, truncated JPEG, text file named .jpg, grayscale, RGBA,
palette and 16-bit PNGs (converted), a 1x1 and a 4000x3000 image (kept), a file with mode
000, an empty class folder (in both splits), a directory symlink loop, a file symlink
loop, a dangling symlink, and a .txt file (ignored: no image extension).

Mode 000 does not stop root (these tests run as root in CI), so when run as root that file
is readable and is trained on; the "unreadable" path is then exercised by making the open
fail with PermissionError (test_permission_denied_is_reported).
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.train import main
from loaders.base import LoaderOptions, available_loaders, build_loader
from loaders.datasets import load_dataset
from loaders.common import ConfigError
from loaders.spec import AugmentSpec

ROOT_USER = os.geteuid() == 0


def make_bad_folder(root: Path) -> tuple[Path, dict[str, str]]:
    """The fixture folder and {bad path: expected reason prefix}."""
    rng = np.random.default_rng(0)
    root = Path(root)
    for split, n in (("train", 8), ("val", 3)):
        for c in ("cat", "dog", "fox"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i}.{'jpg' if i % 2 else 'png'}")
    cat, dog = root / "train" / "cat", root / "train" / "dog"
    bad = {}
    (cat / "zero.jpg").write_bytes(b"")
    bad[cat / "zero.jpg"] = "empty file"
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (cat / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    bad[cat / "truncated.jpg"] = "truncated or corrupt image"
    (cat / "notes.jpg").write_text("this is a text file, not a JPEG\n" * 5)
    bad[cat / "notes.jpg"] = "not an image"
    Image.new("L", (20, 24), 90).save(cat / "gray.png")
    Image.new("RGBA", (20, 24), (10, 200, 30, 128)).save(cat / "rgba.png")
    Image.new("RGB", (20, 24), (10, 200, 30)).convert("P", palette=Image.ADAPTIVE).save(dog / "palette.png")
    Image.fromarray((np.arange(24 * 20).reshape(24, 20) * 100).astype(np.uint16)).save(dog / "deep16.png")
    Image.new("RGB", (1, 1), (255, 0, 0)).save(dog / "tiny.png")
    Image.fromarray(np.tile(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), (100, 100, 1))).save(
        dog / "large.jpg", quality=50)
    Image.new("RGB", (32, 32), (1, 2, 3)).save(dog / "locked.png")
    os.chmod(dog / "locked.png", 0)
    if not ROOT_USER:
        bad[dog / "locked.png"] = "unreadable (Permission denied)"
    for s in ("train", "val"):
        (root / s / "bird").mkdir()
        bad[root / s / "bird"] = "empty class folder"
    os.symlink(".", dog / "loop")
    bad[dog / "loop"] = "symlink loop"
    os.symlink("self.jpg", dog / "self.jpg")
    bad[dog / "self.jpg"] = "symlink loop"
    os.symlink("nowhere.jpg", dog / "dangling.jpg")
    bad[dog / "dangling.jpg"] = "broken symlink"
    (dog / "readme.txt").write_text("ignored: no image extension")
    return root.resolve(), {str(p.parent.resolve() / p.name): r for p, r in bad.items()}


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
    return make_bad_folder(tmp_path_factory.mktemp("bad") / "data")


def test_report_lists_exactly_the_bad_files(bad_folder, tmp_path):
    root, bad = bad_folder
    ds = load_dataset(f"imagefolder:{root}", tmp_path / "cache")
    got = {r["path"]: r["reason"] for r in ds.report()}
    assert set(got) == set(bad)
    for path, reason in bad.items():
        assert got[path].startswith(reason), (path, got[path])
    assert ds.classes == ("cat", "dog", "fox") and ds.dropped_classes == ("bird",)
    assert len(ds.train) == 30 + ROOT_USER and len(ds.val) == 9     # + locked.png when root
    names = {Path(p).name.split("-")[0].split(".")[0]: (p, hw) for p, hw in zip(ds.train.paths, ds.train.sizes)}
    for converted in ("gray", "rgba", "palette", "deep16"):      # converted once, to RGB PNG in the cache
        p, _ = names[converted]
        assert str(ds.cache_dir) in p
        with Image.open(p) as im:
            assert im.mode == "RGB" and im.format == "PNG"
    assert names["tiny"][1] == (1, 1) and names["large"][1] == (3000, 4000)
    labels = dict(zip(ds.train.paths, ds.train.labels))
    assert labels[names["gray"][0]] == 0 and labels[names["palette"][0]] == 1      # labels follow the folders
    # Cached: the same report on a second load, no rebuild.
    again = load_dataset(f"imagefolder:{root}", tmp_path / "cache")
    assert again.report() == ds.report()


def test_strict_fails_at_ingest_with_the_list(bad_folder, tmp_path):
    root, bad = bad_folder
    with pytest.raises(ConfigError) as e:
        load_dataset(f"imagefolder:{root}", tmp_path / "cache", strict=True)
    msg = str(e.value)
    assert msg.startswith(f"--strict: {len(bad)} bad item(s) in imagefolder:") and "\n" not in msg
    assert sum(p in msg for p in bad) == min(len(bad), 10)


def test_permission_denied_is_reported(tmp_path, monkeypatch):
    from tests.test_spec_and_datasets import make_imagefolder
    root = make_imagefolder(tmp_path / "d")
    locked = (root / "train" / "cat" / "1.png").resolve()
    real_open = Image.open

    def open_(fp, *a, **k):
        if Path(fp) == locked:
            raise PermissionError(13, "Permission denied", str(fp))
        return real_open(fp, *a, **k)
    monkeypatch.setattr(Image, "open", open_)
    ds = load_dataset(f"imagefolder:{root}", tmp_path / "cache")
    assert ds.report() == [{"path": str(locked), "reason": "unreadable (Permission denied)"}]


@pytest.mark.parametrize("loader", available_loaders())
def test_trains_one_epoch_with_each_loader(bad_folder, loader, tmp_path, capsys):
    root, bad = bad_folder
    out = tmp_path / "runs"
    summary = main(["--data", f"imagefolder:{root}", "--loader", loader, "--width", "0.125", "--size", "32",
                    "--stages", "pretraining", "--epochs", "1", "--batch-size", "8", "--workers", "1", "--amp", "off",
                    "--out", str(out), "--name", "b", "--cache-dir", str(tmp_path / "cache")])
    stdout = capsys.readouterr().out
    assert stdout.count(f"data: skipped {len(bad)} bad item(s)") == 1                # printed once
    report = json.loads((out / "b" / "data_report.json").read_text())
    assert report["count"] == len(bad) and {i["path"] for i in report["items"]} == set(bad)
    assert report["dropped_classes"] == ["bird"]
    rows = (out / "b" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 2 and summary["images"] == 24                            # 3 full batches of 8
    state = torch.load(out / "b" / "last.pt", weights_only=False)["model"]
    assert all(torch.isfinite(v.float()).all() for v in state.values())


def test_torchvision_loader_survives_a_file_broken_after_ingest(tmp_path, tiny_synthetic):
    """Changed on disk during a run: a warning naming it, the next sample instead, no crash."""
    import dataclasses
    split = tiny_synthetic.train
    paths = []
    for i, p in enumerate(split.paths[:24]):
        q = tmp_path / f"{i:02d}.jpg"
        q.write_bytes(Path(p).read_bytes())
        paths.append(str(q))
    split = dataclasses.replace(split, paths=tuple(paths), labels=split.labels[:24], sizes=split.sizes[:24])
    Path(paths[5]).write_bytes(b"garbage")
    loader = build_loader("torchvision", split, AugmentSpec(size=32),
                          LoaderOptions(train=False, batch_size=8, workers=0))
    with pytest.warns(RuntimeWarning, match="05.jpg"):
        ys = torch.cat([y for _, y in loader]).tolist()
    assert len(ys) == 24 and ys[5] == split.labels[6]       # sample 6 stands in, with its own label
