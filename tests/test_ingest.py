"""Ingest at scale: compact split columns, header-only validation, a process pool with a
deterministic result, resume after SIGKILL with no process left behind, old caches rebuilt."""
from __future__ import annotations

import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from loaders import datasets
from loaders.columns import Column, Paths
from loaders.datasets import load_dataset
from loaders.ingest import CHUNK_DELAY_ENV, Progress
from tests.conftest import ROOT


def make_folder(root: Path, classes: int = 4, per_class: int = 30, val: int = 6) -> Path:
    """RGB JPEGs and PNGs, plus one grayscale PNG (converted) and one truncated JPEG (skipped)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", val)):
        for c in range(classes):
            d = root / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 256, (12 + i % 3, 16, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i:03d}.{'png' if i % 5 == 0 else 'jpg'}")
    Image.new("L", (9, 7), 50).save(root / "train" / "c1" / "gray.png")
    good = (root / "train" / "c0" / "001.jpg").read_bytes()
    (root / "train" / "c0" / "cut.jpg").write_bytes(good[:-20])            # header intact
    return root.resolve()


def manifest_and_columns(ds) -> tuple[dict, dict]:
    m = json.loads((ds.cache_dir / "manifest.json").read_text())
    cols = {}
    for name, s in m["splits"].items():
        with np.load(ds.cache_dir / s["columns"]) as z:
            cols[name] = {k: z[k].copy() for k in z.files}
    return m, cols


def children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def with_marker(marker: str) -> list[int]:
    """Processes whose environment holds `marker` (a forked worker keeps its parent's)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker.encode() in (d / "environ").read_bytes():
                    out.append(int(d.name))
            except OSError:
                pass
    return out


# ---------------------------------------------------------------------------- columns

def test_columns_read_like_the_tuples_they_replace():
    rels = ["a/x.jpg", "b/ü ñ.png", "c/z.jpg", "/abs/q.png"]
    p = Paths.encode(rels, [1, 1, 0, 2], ("/cache/", "/root/", ""))
    want = ("/root/a/x.jpg", "/root/b/ü ñ.png", "/cache/c/z.jpg", "/abs/q.png")
    assert len(p) == 4 and tuple(p) == want and p == want and want == p and list(p) == list(want)
    assert p[np.int64(1)] == want[1] and p[-1] == want[-1] and type(p[0]) is str
    with pytest.raises(IndexError):
        p[4]
    assert isinstance(p[1:3], Paths) and p[1:3] == want[1:3] and p[::-2] == want[::-2]
    assert p + ("e",) == want + ("e",) and ("e",) + p == ("e",) + want
    assert p.index(want[2]) == 2 and want[3] in p and hash(p) == hash(want)
    assert pickle.loads(pickle.dumps(p)) == p and json.loads(json.dumps(list(p))) == list(want)
    labels, sizes = Column.of([3, 0, 999], signed=True), Column.of([(32, 48), (1, 1), (3000, 4000)], width=2)
    assert np.asarray(labels).dtype == np.int16 and np.asarray(sizes).dtype == np.uint16
    assert labels == (3, 0, 999) and type(labels[0]) is int and labels[np.int64(2)] == 999
    assert sizes[2] == (3000, 4000) and set(sizes) == {(32, 48), (1, 1), (3000, 4000)}
    assert torch.as_tensor(labels, dtype=torch.int64).tolist() == [3, 0, 999]
    assert np.asarray(sizes).shape == (3, 2) and sizes[:2] == ((32, 48), (1, 1))
    assert labels.nbytes == 6 and sizes.nbytes == 12 and p.nbytes == len("".join(rels).encode()) + 4 + 4 * 2
    with pytest.raises(TypeError):
        labels[0] = 1                                             # read-only, as a tuple
    with pytest.raises(ValueError):
        np.asarray(labels)[0] = 1                                 # the array too


def test_loaded_split_uses_columns_and_keeps_the_paths(tmp_path):
    root = make_folder(tmp_path / "d", classes=2, per_class=4, val=2)
    ds = load_dataset(f"imagefolder:{root}", tmp_path / "cache")
    assert isinstance(ds.train.paths, Paths) and isinstance(ds.train.labels, Column)
    inplace = [p for p in ds.train.paths if p.startswith(str(root))]
    assert inplace and all(Path(p).is_file() for p in ds.train.paths)
    gray = [p for p in ds.train.paths if "gray" in p]
    assert len(gray) == 1 and gray[0].startswith(str(ds.cache_dir) + "/files-")
    assert ds.train.sizes[ds.train.paths.index(gray[0])] == (7, 9)
    m = json.loads((ds.cache_dir / "manifest.json").read_text())
    assert m["version"] == datasets.MANIFEST_VERSION and m["splits"]["train"]["count"] == len(ds.train)
    assert "paths" not in json.dumps(m)                          # the columns live in the .npz files


# ---------------------------------------------------------------------------- validation

def test_plain_rgb_files_are_checked_by_header_only(tmp_path, monkeypatch):
    """Full decodes happen only for files that need conversion or lack their end marker."""
    root = make_folder(tmp_path / "d", classes=2, per_class=6, val=2)
    jpg = root / "train" / "c0" / "001.jpg"
    (root / "train" / "c0" / "trailing.jpg").write_bytes(jpg.read_bytes() + b"\0" * 7)   # kept
    png = (root / "train" / "c0" / "000.png").read_bytes()
    (root / "train" / "c0" / "cut.png").write_bytes(png[: len(png) // 2])                # skipped
    loads = []
    real = ImageFile.ImageFile.load

    def load(self):
        loads.append(Path(self.filename).name)
        return real(self)
    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    ds = load_dataset(f"imagefolder:{root}", tmp_path / "cache", workers=1)
    assert sorted(loads) == ["cut.jpg", "cut.png", "gray.png", "trailing.jpg"]
    reasons = {Path(r["path"]).name: r["reason"] for r in ds.report()}
    assert set(reasons) == {"cut.jpg", "cut.png"}
    assert all(r.startswith("truncated or corrupt image") for r in reasons.values())
    assert any(p.endswith("trailing.jpg") for p in ds.train.paths)


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, 0.999])
def test_any_truncation_of_a_jpeg_is_caught(tmp_path, keep):
    root = make_folder(tmp_path / "d", classes=2, per_class=3, val=1)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), np.uint8)).save(buf, "JPEG")
    data = buf.getvalue()
    (root / "train" / "c0" / "t.jpg").write_bytes(data[: max(1, int(len(data) * keep))])
    ds = load_dataset(f"imagefolder:{root}", tmp_path / "cache")
    assert str(root / "train" / "c0" / "t.jpg") in ds.skipped


def broken_huffman_jpeg(path: Path) -> None:
    """A JPEG whose header opens as RGB and which ends with EOI, but whose Huffman table is
    garbage: it passes the header check and fails any full decode (PIL: broken data stream)."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (32, 32, 3), np.uint8)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    i = data.find(b"\xff\xc4")
    data[i + 5:i + 21] = b"\xff" * 16
    path.write_bytes(bytes(data))


@pytest.mark.timeout(600)
def test_a_file_that_passes_ingest_but_fails_to_decode_is_survived_by_every_loader(tmp_path):
    from loaders.base import LoaderOptions, available_loaders, build_loader
    from loaders.spec import AugmentSpec
    root = make_folder(tmp_path / "d", classes=2, per_class=8, val=2)
    broken_huffman_jpeg(root / "train" / "c1" / "zz.jpg")
    ds = load_dataset(f"imagefolder:{root}", tmp_path / "cache")
    assert any(p.endswith("zz.jpg") for p in ds.train.paths)              # passed: header and EOI fine
    with pytest.raises(OSError):
        with Image.open(root / "train" / "c1" / "zz.jpg") as im:
            im.load()
    for name in available_loaders():
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            loader = build_loader(name, ds.train, AugmentSpec(size=16),
                                  LoaderOptions(train=False, batch_size=4, workers=0, drop_last=False))
            ys = torch.cat([y for _, y in loader])
        assert len(ys) >= len(ds.train) - 1, name          # left out (dali, ffcv) or stood in for
        if name in ("torchvision", "resident"):            # the next sample / a black image, named
            assert any("zz.jpg" in str(w.message) for w in seen), (name, [str(w.message) for w in seen])


# ---------------------------------------------------------------------------- the pool

def test_one_and_two_workers_give_identical_manifests_and_leave_no_process(tmp_path):
    root = make_folder(tmp_path / "d")
    before = set(children(os.getpid()))          # other tests may have left pools of their own
    one = load_dataset(f"imagefolder:{root}", tmp_path / "c1", workers=1)
    two = load_dataset(f"imagefolder:{root}", tmp_path / "c2", workers=2)
    assert set(children(os.getpid())) <= before                  # the pool is gone with the ingest
    m1, c1 = manifest_and_columns(one)
    m2, c2 = manifest_and_columns(two)
    assert m1 == m2 and len(one.skipped) == 1
    for name in c1:
        assert c1[name].keys() == c2[name].keys()
        assert all(np.array_equal(c1[name][k], c2[name][k]) for k in c1[name])
    assert one.train.paths[0].startswith(str(root)) and two.train.sizes == one.train.sizes


def test_progress_prints_a_line_when_not_a_tty():
    out = io.StringIO()
    p = Progress(1000, "ingest x", initial=100, every_s=0.0, stream=out)
    p.update(400)
    p.close()
    first, last = out.getvalue().splitlines()
    assert first.startswith("ingest x: 500/1,000 files (50%), ") and "files/s, ETA " in first
    assert last.startswith("ingest x: 400 files in ")


# ---------------------------------------------------------------------------- resume

KILLED = """
import sys
from loaders.datasets import load_dataset
load_dataset(sys.argv[1], sys.argv[2], workers=2)
"""


@pytest.mark.timeout(300)
def test_a_killed_ingest_resumes_where_it_stopped(tmp_path, capsys):
    root = make_folder(tmp_path / "d", classes=4, per_class=60, val=10)      # 282 files: 36 chunks of 8
    source, cache = f"imagefolder:{root}", tmp_path / "cache"
    before = set(children(os.getpid()))
    marker = f"FASTTRAIN_TEST_MARKER={uuid.uuid4().hex}"
    env = dict(os.environ, PYTHONPATH=str(ROOT), **{CHUNK_DELAY_ENV: "0.3"},
               **dict([marker.split("=")]))
    proc = subprocess.Popen([sys.executable, "-c", KILLED, source, str(cache)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    chunks = lambda: sorted(cache.glob("imagefolder-*/files-*/.chunks/*.json"))  # noqa: E731
    while len(chunks()) < 6 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()
    assert len(with_marker(marker.split("=")[1])) == 3            # the ingest and its 2 workers
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    for _ in range(100):                     # the workers die with their parent (PDEATHSIG)
        if not with_marker(marker.split("=")[1]):
            break
        time.sleep(0.05)
    assert with_marker(marker.split("=")[1]) == []
    done = len(chunks())
    assert 6 <= done < 36 and not list(cache.glob("*/manifest.json"))
    resumed = load_dataset(source, cache, workers=2)
    err = capsys.readouterr().err
    assert f"resuming: {done}/36 chunks" in err, err
    assert not list(resumed.cache_dir.glob("files-*/.chunks"))     # removed once the manifest is in
    fresh = load_dataset(source, tmp_path / "fresh", workers=1)
    (m1, c1), (m2, c2) = manifest_and_columns(resumed), manifest_and_columns(fresh)
    assert m1 == m2
    assert all(np.array_equal(c1[s][k], c2[s][k]) for s in c1 for k in c1[s])
    assert set(children(os.getpid())) <= before


# ---------------------------------------------------------------------------- versions

def test_an_old_version_cache_is_rebuilt(tmp_path):
    root = make_folder(tmp_path / "d", classes=2, per_class=3, val=1)
    ds = load_dataset(f"imagefolder:{root}", tmp_path / "cache")
    path = ds.cache_dir / "manifest.json"
    old = dict(json.loads(path.read_text()), version=2)
    old["splits"] = {n: {"paths": list(getattr(ds, n).paths), "labels": list(getattr(ds, n).labels),
                         "sizes": [list(s) for s in getattr(ds, n).sizes]} for n in ("train", "val")}
    path.write_text(json.dumps(old))
    again = load_dataset(f"imagefolder:{root}", tmp_path / "cache")
    assert json.loads(path.read_text())["version"] == datasets.MANIFEST_VERSION
    assert again.train.paths == ds.train.paths and again.val.labels == ds.val.labels
    (ds.cache_dir / json.loads(path.read_text())["splits"]["val"]["columns"]).write_bytes(b"garbage")
    assert load_dataset(f"imagefolder:{root}", tmp_path / "cache").val.labels == ds.val.labels   # unreadable: rebuilt


# ---------------------------------------------------------------------------- the benchmark

@pytest.mark.timeout(300)
def test_benchmark_runs_end_to_end_on_a_small_tree(tmp_path):
    """benchmarks/ingest.py on 200 files: every phase reports, the JSON has the extrapolation."""
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks.ingest", "--root", str(tmp_path / "b"), "--files", "200",
                        "--classes", "4", "--ffcv-files", "0", "--sample", "20", "--json", str(out), "--repeats", "1",
                        "--phases", "generate,ingest,reload,epoch,checks", "--clean"],
                       cwd=ROOT, capture_output=True, text=True, timeout=280, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert not [k for k, v in res.items() if isinstance(v, dict) and "error" in v], res
    assert res["ingest"]["files"] == 200 and res["ingest"]["skipped"] == 0 and res["ingest"]["files_per_s"] > 0
    assert set(res["ingest_median_by_workers"]) == {"0", "1"} and len(res["ingest_runs"]) == 2
    assert res["reload"]["manifest_load_s"] > 0 and res["extrapolated"]["files"] == 1_281_167
    assert "path_list_s" in res["epoch"] and res["checks"]["header_us_64x48"] > 0
    assert "ImageNet" in r.stdout and not (tmp_path / "b").exists()
