"""Webdataset shards (loaders/shards.py): the writer, the `webdataset:` source, the shard
rule, and every loader over shards: the contract suite's checks adapted to the shard rule
(sample ids come from `.cls` members written as the sample's own id), one training epoch
per loader through `engine.train`, and one 2-process gloo torchrun run.

Shards here: 160 of the tiny synthetic training images, `.cls` = the sample's global id,
written without meta.json (so the source scans them): 8 shards of 20 (the even case) or
7 shards of 23/22 (the uneven case).
"""
from __future__ import annotations

import io
import json
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from loaders.base import LoaderOptions, build_loader
from loaders.common import ConfigError, read_rgb
from loaders.datasets import load_dataset
from loaders.shards import load_webdataset, rank_quota, rank_shards, write_shards
from loaders.spec import AugmentSpec
from loaders.torchvision import reference_transform
from tests.conftest import ROOT, run_cli
from tests.test_loader_contract import LOADERS, TOLERANCE, epoch, ids, levels, same

SPEC = AugmentSpec(size=48)
N = 160


def opts(**kw):
    return LoaderOptions(**{**dict(train=True, batch_size=16, workers=1, seed=3, shuffle_buffer=40), **kw})


def write_id_shards(dst: Path, paths, counts, bad: dict | None = None, no_cls=()) -> Path:
    """Shards of `paths` in order, key = cls = the global id; `bad`: id -> image bytes;
    `no_cls`: ids written without a .cls member. Also classes.txt (one class per id)."""
    dst.mkdir(parents=True, exist_ok=True)
    i = 0
    for s, count in enumerate(counts):
        with tarfile.open(dst / f"train-{s:06d}.tar", "w") as t:
            for _ in range(count):
                data = (bad or {}).get(i) or Path(paths[i]).read_bytes()
                for name, blob in ((f"{i:06d}.jpg", data), (f"{i:06d}.cls", str(i).encode())):
                    if name.endswith(".cls") and i in no_cls:
                        continue
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    t.addfile(info, io.BytesIO(blob))
                i += 1
    with tarfile.open(dst / "val-000000.tar", "w") as t:       # a small val split
        for j in range(8):
            for name, blob in ((f"v{j:05d}.jpg", Path(paths[j]).read_bytes()), (f"v{j:05d}.cls", str(j).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                t.addfile(info, io.BytesIO(blob))
    (dst / "classes.txt").write_text("".join(f"c{k}\n" for k in range(sum(counts))))
    return dst


@pytest.fixture(scope="module")
def paths(tiny_synthetic):
    return tiny_synthetic.train.paths[:N]


@pytest.fixture(scope="module")
def even(paths, tmp_path_factory):
    root = tmp_path_factory.mktemp("even")
    write_id_shards(root / "shards", paths, [20] * 8)
    return load_webdataset(f"webdataset:{root / 'shards'}", root / "cache").train


@pytest.fixture(scope="module")
def uneven(paths, tmp_path_factory):
    root = tmp_path_factory.mktemp("uneven")
    write_id_shards(root / "shards", paths, [23] * 6 + [22])
    return load_webdataset(f"webdataset:{root / 'shards'}", root / "cache").train


# ------------------------------------------------------------------------------ the writer

def _members(folder: Path, split: str):
    out = []
    for shard in sorted(folder.glob(f"{split}-*.tar")):
        with tarfile.open(shard) as t:
            names = t.getnames()
            out += [(n, t.extractfile(n).read()) for n in names]
    return out


def test_writer_round_trips_every_image_and_label_once(tmp_path):
    from tests.test_train import make_tiny_folder
    src = make_tiny_folder(tmp_path / "src")
    ds = load_dataset(f"imagefolder:{src}", tmp_path / "cache")
    meta = write_shards(f"imagefolder:{src}", tmp_path / "a", 7, cache_root=tmp_path / "cache")
    assert [s["count"] for s in meta["splits"]["train"]] == [7] * 6 + [6] * 3   # 60 in 9, balanced
    assert (tmp_path / "a" / "classes.txt").read_text().split() == list(ds.classes)
    for name, split in (("train", ds.train), ("val", ds.val)):
        got = _members(tmp_path / "a", name)
        pairs = sorted((got[i][1], int(got[i + 1][1])) for i in range(0, len(got), 2))
        assert [n.split(".")[1] for n, _ in got] == ["png", "cls"] * len(split)     # PNG sources keep .png
        want = sorted((Path(p).read_bytes(), lab) for p, lab in zip(split.paths, split.labels))
        assert pairs == want                                         # every image and label once
        firsts = [int(b) for n, b in got[1::2]][:10]
        assert len(set(firsts)) > 1                                   # shards mix classes
    # Deterministic: another folder gets the same bytes; an unchanged source is not rewritten.
    write_shards(f"imagefolder:{src}", tmp_path / "b", 7, cache_root=tmp_path / "cache")
    for f in sorted((tmp_path / "a").glob("*.tar")):
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes(), f.name
    before = {f.name: f.stat().st_mtime_ns for f in (tmp_path / "a").glob("*.tar")}
    write_shards(f"imagefolder:{src}", tmp_path / "a", 7, cache_root=tmp_path / "cache")
    assert before == {f.name: f.stat().st_mtime_ns for f in (tmp_path / "a").glob("*.tar")}
    # Fewer, larger shards: the stale ones go; the source reads the new set.
    write_shards(f"imagefolder:{src}", tmp_path / "a", 30, cache_root=tmp_path / "cache")
    assert sorted(f.name for f in (tmp_path / "a").glob("*.tar")) == ["train-000000.tar", "train-000001.tar",
                                                                   "val-000000.tar"]
    w = load_webdataset(f"webdataset:{tmp_path / 'a'}", tmp_path / "cache")
    assert w.classes == ds.classes and w.train.counts == (30, 30) and w.val.counts == (20,)
    assert w.train.image_hw == (32, 32) and not w.skipped


def test_writer_cli_and_one_line_errors(tmp_path):
    from tests.test_train import make_tiny_folder
    src = make_tiny_folder(tmp_path / "src")
    r = run_cli("-m", "loaders.shards", str(src), str(tmp_path / "out"), "--shard-size", "25",
                "--split", "train", "--cache-dir", str(tmp_path / "cache"))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.suffix == ".tar") == \
        ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    for args, msg in (((str(src), str(tmp_path / "o2"), "--shard-size", "0"), "--shard-size 0: must be >= 1"),
                      ((str(tmp_path / "nope"), str(tmp_path / "o3")), "is not a directory"),
                      ((str(src), str(tmp_path / "o4"), "--split", "test"), "--split test: use train"),
                      ((str(src), str(src / "train" / "class0" / "0.png")), "is not a folder")):
        r = run_cli("-m", "loaders.shards", *args, "--cache-dir", str(tmp_path / "cache"))
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_source_forms_and_errors(paths, tmp_path):
    d = write_id_shards(tmp_path / "d", paths[:40], [10] * 4)
    forms = [f"webdataset:{d}", f"webdataset:{d}/{{split}}-{{000000..000003}}.tar",
             f"webdataset:train={d}/train-{{000000..000003}}.tar;val={d}/val-000000.tar"]
    with pytest.raises(ConfigError, match=r"3 of 4 val shards are missing .*val-000001.tar"):
        load_webdataset(forms[1], tmp_path / "cache")               # {split}: the same range for val
    for src in (forms[0], forms[2]):
        w = load_webdataset(src, tmp_path / "cache")
        assert w.train.counts == (10,) * 4 and w.val.counts == (8,) and w.num_classes == 40
        assert all(Path(p).name.startswith("train-") for p in w.train.shards)
    for src, msg in ((f"webdataset:{d}/train-{{000000..000005}}.tar", "cannot say which shards are validation"),
                     (f"webdataset:train={d}/train-{{000000..000005}}.tar;val={d}/val-000000.tar",
                      "2 of 6 train shards are missing"),
                     (f"webdataset:{tmp_path / 'none'}", "does not exist"),
                     ("webdataset:", "no shards given")):
        with pytest.raises(ConfigError, match=msg) as e:
            load_dataset(src, tmp_path / "cache")
        assert "\n" not in str(e.value)
    (d / ".writing").write_text("")                                # a write in progress or interrupted
    with pytest.raises(ConfigError, match="being written, or a write was interrupted"):
        load_dataset(forms[0], tmp_path / "cache")


def test_scan_reports_incomplete_samples_and_broken_tars(paths, tmp_path):
    d = write_id_shards(tmp_path / "d", paths[:40], [10] * 4, no_cls={13})
    (d / "train-000003.tar").write_bytes((d / "train-000003.tar").read_bytes()[:5000])   # cut short
    ds = load_dataset(f"webdataset:{d}", tmp_path / "cache")
    rep = {r["path"]: r["reason"] for r in ds.report()}
    assert rep[f"{d / 'train-000001.tar'}:000013"] == "missing .cls member"
    assert rep[str(d / "train-000003.tar")].startswith("truncated tar (no end-of-archive marker) after 1 ")
    assert ds.train.counts == (10, 9, 10, 1) and len(ds.train) == 30
    with pytest.raises(ConfigError, match="--strict: 3 bad item"):
        load_dataset(f"webdataset:{d}", tmp_path / "cache", strict=True)
    assert json.loads((ds.cache_dir / "manifest.json").read_text())["fingerprint"] == ds.fingerprint
    assert len(list((ds.cache_dir / "index").glob("*.idx"))) == 5        # DALI's index, from the scan


# ------------------------------------------------------------------------- the shard rule

def test_the_shard_rule_even_and_uneven(even, uneven):
    for split, quota in ((even, 80), (uneven, 68)):                  # 68: 22 + 23 + 23
        out = set()
        for e in range(6):
            dealt = [rank_shards(split, opts(rank=r, world_size=2), e) for r in (0, 1)]
            assert [len(d) for d in dealt] == [len(split.shards) // 2] * 2
            assert not set(dealt[0]) & set(dealt[1])
            out |= set(range(len(split.shards))) - set(dealt[0]) - set(dealt[1])
            assert rank_quota(split, opts(rank=0, world_size=2)) == quota
        assert (out == set()) if split is even else len(out) > 1        # the left-out shard changes
    ev = [rank_shards(uneven, opts(train=False, rank=r, world_size=2), 0).tolist() for r in (0, 1)]
    assert ev == [[0, 2, 4, 6], [1, 3, 5]]
    assert [rank_quota(uneven, opts(train=False, rank=r, world_size=2)) for r in (0, 1)] == [91, 69]
    with pytest.raises(ConfigError, match="8 train shard.* for 9 ranks"):
        build_loader("torchvision", even, SPEC, opts(rank=0, world_size=9))


# ---------------------------------------------------------------- the contract over shards

@pytest.mark.parametrize("name", LOADERS)
def test_batches_labels_and_the_reference(paths, even, name):
    """Shapes, dtype, layout; labels (= ids) are `sample_indices`; augmentation off, each
    image equals the reference transform of its source file."""
    spec = SPEC.without()
    for train in (True, False):
        loader = build_loader(name, even, spec, opts(train=train, drop_last=False))
        batches = epoch(loader, 1)
        assert len(batches) == len(loader) == 10
        for x, y in batches:
            assert x.shape[1:] == (3, 48, 48) and x.dtype == torch.float32 and y.dtype == torch.int64
            assert x.is_contiguous(memory_format=torch.channels_last)
        got = ids(batches)
        assert got == loader.sample_indices(1).tolist() and sorted(got) == list(range(N))
        if not train and name == "dali":
            assert got == list(range(N))                              # evaluation: shard order
        ref = reference_transform(spec, train=False)
        want = torch.stack([ref(read_rgb(paths[i])) for i in got])
        d = (levels(torch.cat([x for x, _ in batches]), spec) - levels(want, spec)).abs()
        top, mean = TOLERANCE[name]
        assert d.max() <= top and d.mean() <= mean, (train, d.max(), d.mean())
    aug = epoch(build_loader(name, even, SPEC, opts()), 1)
    assert ids(aug) == ids(epoch(build_loader(name, even, spec, opts()), 1))
    assert not torch.allclose(aug[0][0], epoch(build_loader(name, even, spec, opts()), 1)[0][0], atol=0.05)


@pytest.mark.parametrize("drop", [False, True])
@pytest.mark.parametrize("name", LOADERS)
def test_every_sample_once_per_epoch_across_two_ranks(even, name, drop):
    got = []
    for r in (0, 1):
        loader = build_loader(name, even, SPEC.without(), opts(rank=r, world_size=2, drop_last=drop))
        batches = epoch(loader, 3)
        assert len(batches) == len(loader) == (5 if drop else 5)      # 80 per rank, batch 16
        assert ids(batches) == loader.sample_indices(3).tolist()
        got.append(ids(batches))
    assert not set(got[0]) & set(got[1]) and sorted(got[0] + got[1]) == list(range(N))
    if name in ("torchvision", "dali"):                              # whole shards per rank
        for r, g in enumerate(got):
            mine = rank_shards(even, opts(rank=r, world_size=2), 3)
            assert {i // 20 for i in g} == set(mine.tolist())


@pytest.mark.parametrize("name", ["torchvision", "dali"])
def test_uneven_shards_every_rank_the_same_steps(uneven, name):
    if name == "dali":
        pytest.importorskip("nvidia.dali")
    offsets = uneven.offsets
    for e in (0, 1):
        got = []
        for r in (0, 1):
            o = opts(rank=r, world_size=2, drop_last=False)
            loader = build_loader(name, uneven, SPEC.without(), o)
            batches = epoch(loader, e)
            assert len(loader) == len(batches) == 5 and len(ids(batches)) == 68   # ceil(68 / 16)
            mine = rank_shards(uneven, o, e)
            allowed = {int(offsets[s]) + p for s in mine for p in range(uneven.counts[s])}
            assert set(ids(batches)) <= allowed and len(set(ids(batches))) == 68
            got.append(ids(batches))
        assert not set(got[0]) & set(got[1])


@pytest.mark.parametrize("name", LOADERS)
def test_resume_inside_an_epoch_and_determinism(even, name, monkeypatch):
    loader = build_loader(name, even, SPEC, opts(drop_last=False, workers=2 if name == "torchvision" else 1))
    full = epoch(loader, 2)
    assert len(full) == len(loader) == 10
    assert same(epoch(loader, 2, start=3), full[3:])
    assert same(epoch(loader), full)                                  # the start batch is used once
    fresh = build_loader(name, even, SPEC, opts(drop_last=False, workers=0 if name == "torchvision" else 1))
    assert same(epoch(fresh, 2, start=7), full[7:])                   # a restart, other --workers
    assert epoch(fresh, 2, start=10) == []
    other = epoch(fresh, 4)
    assert ids(other) != ids(full)
    loader.set_epoch(2)                                               # an epoch left early ...
    next(iter(loader))
    assert same(epoch(loader), full)                                  # ... leaves nothing behind

    def no_draws(*a, **k):
        raise AssertionError("a permutation was drawn")
    monkeypatch.setattr(np.random, "default_rng", no_draws)
    for e in range(3):                                                # len() and set_epoch: O(1)
        loader.set_epoch(e, start_batch=2)
        assert len(loader) == 10


@pytest.mark.parametrize("name", LOADERS)
def test_a_corrupt_member_is_skipped_with_a_warning(paths, name, tmp_path):
    d = write_id_shards(tmp_path / "d", paths[:40], [10] * 4, bad={21: b"this is not an image" * 10})
    split = load_webdataset(f"webdataset:{d}", tmp_path / "cache").train
    counts, warned = [], []
    for r in (0, 1):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            loader = build_loader(name, split, SPEC.without(), opts(batch_size=8, drop_last=False, rank=r,
                                                                    world_size=2, workers=0))
            batches = epoch(loader, 0)
        warned += [str(m.message) for m in w if "000021" in str(m.message)]
        assert len(batches) == len(loader) == 3, r
        assert 21 not in ids(batches)
        counts.append(len(ids(batches)))
    assert counts == ([19, 19] if name in ("resident", "ffcv") else [20, 20])   # 39 unpacked // 2
    assert warned and "train-000002.tar" in warned[0], warned


@pytest.mark.parametrize("name", ["torchvision", "dali"])
def test_a_shard_cut_short_mid_run_keeps_every_rank_in_step(paths, name, tmp_path):
    if name == "dali":
        pytest.importorskip("nvidia.dali")
    d = write_id_shards(tmp_path / "d", paths[:40], [10] * 4)
    split = load_webdataset(f"webdataset:{d}", tmp_path / "cache").train
    loaders = [build_loader(name, split, SPEC.without(), opts(batch_size=8, drop_last=False, rank=r,
                                                              world_size=2, workers=0)) for r in (0, 1)]
    shard = d / "train-000002.tar"
    shard.write_bytes(shard.read_bytes()[:6000])                   # samples 20, 21 (and part of 22) kept
    counts, warned = [], []
    for loader in loaders:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            batches = epoch(loader, 0)
        warned += [str(m.message) for m in w if "train-000002.tar" in str(m.message)]
        assert len(batches) == len(loader) == 3
        assert not set(ids(batches)) & set(range(23, 30))          # never read: not in the shard
        counts.append(len(ids(batches)))
    assert counts == [20, 20] and warned


# ------------------------------------------------------------------- training from shards

@pytest.fixture(scope="module")
def tool_shards(tmp_path_factory):
    from tests.test_train import make_tiny_folder
    root = tmp_path_factory.mktemp("tool")
    src = make_tiny_folder(root / "src")
    write_shards(f"imagefolder:{src}", root / "shards", 15, cache_root=root / "cache")   # 4 x 15 train
    return root


def _train_args(root: Path, loader: str, name: str, *extra, epochs: str = "1,0,0,0") -> list[str]:
    return ["--preset", "cpu-demo", "--data", f"webdataset:{root / 'shards'}", "--loader", loader,
            "--width", "0.125", "--size", "32", "--epochs", epochs, "--batch-size", "10", "--workers", "1",
            "--out", str(root / "runs"), "--name", name, "--cache-dir", str(root / "cache"), "--amp", "off",
            "--shuffle-buffer", "20", *extra]


@pytest.mark.parametrize("name", LOADERS)
def test_each_loader_trains_one_epoch_from_shards(tool_shards, name):
    from engine.train import main
    summary = main(_train_args(tool_shards, name, name))
    run = tool_shards / "runs" / name
    assert summary["images"] == 60 and (run / "summary.json").exists()
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["data"].startswith("webdataset:") and cfg["shuffle_buffer"] == 20


def test_two_process_gloo_run_sees_every_sample_once(tool_shards):
    """One torchrun (2 processes, gloo): the torchvision and DALI loaders over 4 equal
    shards; per epoch the ranks' samples are disjoint and cover the split, each recorded
    label is its sample's, and the ranks end with identical weights."""
    from tests.test_distributed import torchrun
    from loaders.base import available_loaders
    names = [n for n in ("torchvision", "dali") if n in available_loaders()]
    proc = torchrun("-m", "tests.test_shards", str(tool_shards), ",".join(names))
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-4000:]
    ds = load_dataset(f"webdataset:{tool_shards / 'shards'}", tool_shards / "cache")
    labels = [int(b) for shard in ds.train.shards for n, b in _tar(shard) if n.endswith(".cls")]
    for name in names:
        rec = tool_shards / "rec" / name
        for e in (0, 1):
            seen = [json.loads((rec / f"rank{r}-epoch{e}.json").read_text()) for r in (0, 1)]
            a, b = (s["indices"] for s in seen)
            assert len(a) == len(b) == 30 and sorted(a + b) == list(range(60)), name
            for s in seen:
                assert s["labels"] == [labels[i] for i in s["indices"]], name
        w0, w1 = (torch.load(rec / f"weights-rank{r}.pt") for r in (0, 1))
        assert all(torch.equal(w0[k], w1[k]) for k in w0), name


def _tar(path):
    with tarfile.open(path) as t:
        return [(m.name, t.extractfile(m).read()) for m in t if m.isreg()]


def _driver(root: str, names: str) -> None:
    import torch.distributed as dist

    from tests.hooked_train import main
    dist.init_process_group("gloo")
    root = Path(root)
    for name in names.split(","):
        main(_train_args(root, name, f"ddp-{name}", "--deterministic", "--record-samples",
                         str(root / "rec" / name), epochs="2,0,0,0"))


if __name__ == "__main__":
    import sys
    sys.path.insert(0, str(ROOT))
    _driver(*sys.argv[1:])
