"""Dataset ingest at scale, on a generated ImageFolder tree of small JPEGs.

    python -m benchmarks.ingest --root /tmp/ingest-bench              # 200,000 files, 1,000 classes
    python -m benchmarks.ingest --root /tmp/x --files 2000 --classes 10 --ffcv-files 0

Phases, each in a fresh subprocess (so its peak RSS is its own):
- generate: N 64x48 photo-like JPEGs (smooth colour fields plus noise), 5% of each class in
  val/, written in parallel; skipped when --root already holds the same tree.
- ingest: `load_dataset` on a cold cache (scan + fingerprint, header checks, manifest):
  wall, files/s, peak RSS of the ingest process and of its largest worker, manifest bytes;
  `--repeats` times for each of `--ingest-workers` (interleaved; the row is the median).
- reload: the cache hit as a training start pays it: the scan/fingerprint (1 and N
  workers), the manifest load, the loaded columns' memory against the same data as tuples.
- epoch: `loaders.base.epoch_indices` and DALI's per-epoch file list (`DaliLoader`
  construction, the path/label lists of one epoch, the DALI reader pipeline built over them).
- ffcv: the FFCV .beton writer on a `--ffcv-files` subset (files/s, for extrapolation).
- checks: microseconds per file, one core: the header check against a full decode, for
  the generated 64x48 JPEGs and for 500x375 ones (ImageNet's typical size).
Prints a table, the extrapolation to ImageNet's 1,281,167 training files, and writes JSON
(default benchmarks/results/ingest-<date>.json). Delete the tree afterwards (--clean).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGENET_FILES = 1_281_167


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024


def _cpu_s(who) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def _best(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


# ----------------------------------------------------------------------------- phases

def _photo(rng, h: int, w: int):
    import numpy as np
    from PIL import Image
    base = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    noisy = np.asarray(base, np.int16) + rng.normal(0, 8, (h, w, 3)).astype(np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _write_class(root: str, c: int, n_train: int, n_val: int, h: int, w: int) -> int:
    import numpy as np
    rng = np.random.default_rng(c)
    for split, n in (("train", n_train), ("val", n_val)):
        d = Path(root) / split / f"n{c:05d}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            _photo(rng, h, w).save(d / f"n{c:05d}_{i}.JPEG", quality=85)
    return n_train + n_val


def phase_generate(a) -> dict:
    from multiprocessing import get_context
    from loaders.ingest import usable_cores
    per = a.files // a.classes
    n_val = max(1, per // 20)
    stamp = Path(a.root) / ".generated"
    want = f"{a.files} {a.classes} 64x48 v1"
    if stamp.exists() and stamp.read_text() == want:
        return {"generated_s": 0.0, "reused": True, "files": per * a.classes}
    shutil.rmtree(a.root, ignore_errors=True)
    t = time.perf_counter()
    with get_context("fork").Pool(usable_cores()) as pool:
        n = sum(pool.starmap(_write_class, [(a.root, c, per - n_val, n_val, 48, 64) for c in range(a.classes)],
                             chunksize=4))
    stamp.write_text(want)
    return {"generated_s": time.perf_counter() - t, "reused": False, "files": n}


def phase_ingest(a) -> dict:
    from loaders.datasets import load_dataset
    shutil.rmtree(a.cache, ignore_errors=True)
    rss0 = _rss_mib()                      # the imports (torch, via loaders.common)
    cpu0 = _cpu_s(resource.RUSAGE_SELF)
    t = time.perf_counter()
    ds = load_dataset(f"imagefolder:{a.root}", a.cache, workers=a.workers)
    wall = time.perf_counter() - t
    cpu_parent, cpu_workers = _cpu_s(resource.RUSAGE_SELF) - cpu0, _cpu_s(resource.RUSAGE_CHILDREN)
    n = len(ds.train) + len(ds.val)
    m = ds.cache_dir / "manifest.json"
    cols = [ds.cache_dir / s["columns"] for s in json.loads(m.read_text())["splits"].values()]
    return {"workers": a.workers, "loadavg_1m": os.getloadavg()[0],
            "files": n, "train": len(ds.train), "val": len(ds.val), "skipped": len(ds.skipped),
            "ingest_s": wall, "files_per_s": n / wall, "cpu_s_parent": cpu_parent, "cpu_s_workers": cpu_workers,
            "cpu_us_per_file": 1e6 * (cpu_parent + cpu_workers) / n,
            "rss_before_mib": rss0, "peak_rss_mib": _peak_mib(),
            "peak_rss_worker_mib": _peak_mib(resource.RUSAGE_CHILDREN),
            "manifest_json_bytes": m.stat().st_size, "columns_bytes": sum(p.stat().st_size for p in cols)}


def phase_reload(a) -> dict:
    from loaders import datasets as D
    from loaders.ingest import WorkerPool, usable_cores
    root = Path(a.root).resolve()
    out = {}
    for _ in range(3):                  # interleaved; the row is the median
        for workers in sorted({1, usable_cores()}):
            with WorkerPool(workers) as pool:
                t = time.perf_counter()
                scan = D._scan_imagefolder(root, D._Work(pool, workers > 1))
                fp = D._imagefolder_fingerprint(root, scan)
                out.setdefault(f"scan_s_{workers}w_runs", []).append(time.perf_counter() - t)
    for workers in sorted({1, usable_cores()}):
        out[f"scan_s_{workers}w"] = statistics.median(out[f"scan_s_{workers}w_runs"])
    del scan
    gc.collect()
    cache_dir = next(Path(a.cache).glob("imagefolder-*"))
    rss0 = _rss_mib()
    t = time.perf_counter()
    ds = D._read_manifest(cache_dir / "manifest.json", cache_dir, fp)
    out["manifest_load_s"] = time.perf_counter() - t
    assert ds is not None, "the manifest did not load"
    out["columns_rss_mib"] = _rss_mib() - rss0
    out["columns_mib"] = sum(c.nbytes for s in (ds.train, ds.val) for c in (s.paths, s.labels, s.sizes)) / 2**20
    rss1 = _rss_mib()
    as_tuples = [(tuple(s.paths), tuple(s.labels), tuple(s.sizes)) for s in (ds.train, ds.val)]
    out["tuples_rss_mib"] = _rss_mib() - rss1
    out["tuples_mib"] = sum(_tuple_bytes(*t) for t in as_tuples) / 2**20
    out["tuples_build_s"] = _best(lambda: [tuple(s.paths) for s in (ds.train, ds.val)], 1)
    del as_tuples
    t = time.perf_counter()
    D.load_dataset(f"imagefolder:{root}", a.cache)
    out["cache_hit_load_s"] = time.perf_counter() - t
    return out


def _tuple_bytes(paths: tuple, labels: tuple, sizes: tuple) -> int:
    """What the tuples of a v2 manifest held: the containers, every str, int objects past the
    small-int cache, and one (h, w) tuple per image."""
    big = lambda v: sys.getsizeof(v) if v > 256 else 0  # noqa: E731
    return (sum(map(sys.getsizeof, (paths, labels, sizes))) + sum(map(sys.getsizeof, paths))
            + sum(map(big, labels)) + sum(sys.getsizeof(hw) + big(hw[0]) + big(hw[1]) for hw in sizes))


def phase_epoch(a) -> dict:
    from loaders.base import LoaderOptions, epoch_indices
    from loaders.datasets import load_dataset
    from loaders.spec import AugmentSpec
    split = load_dataset(f"imagefolder:{a.root}", a.cache).train
    n = len(split)
    out = {"n": n}
    for world in (1, 8):
        o = LoaderOptions(train=True, batch_size=256, world_size=world)
        out[f"epoch_indices_ms_world{world}"] = 1e3 * _best(lambda: epoch_indices(n, o, 3))
    order = epoch_indices(n, LoaderOptions(train=True, batch_size=256), 3)
    out["path_list_s"] = _best(lambda: [split.paths[i] for i in order])
    as_tuple = tuple(split.paths)
    out["path_list_s_tuple"] = _best(lambda: [as_tuple[i] for i in order])      # what v2's tuples cost
    out["label_list_s"] = _best(lambda: [split.labels[i] for i in order])
    try:
        from loaders.dali import DaliLoader
    except ImportError as e:
        out["dali"] = f"not available ({e})"
        return out
    opts = LoaderOptions(train=True, batch_size=min(256, n), workers=1)
    t = time.perf_counter()
    loader = DaliLoader(split, AugmentSpec(size=64), opts)
    out["dali_loader_init_s"] = time.perf_counter() - t
    t = time.perf_counter()
    idx = loader.sample_indices(0)
    files, labels = [split.paths[i] for i in idx], [int(i) for i in idx]
    out["dali_epoch_lists_s"] = time.perf_counter() - t
    del files, labels
    t = time.perf_counter()
    pipe = loader.build_pipeline(idx)
    pipe.build()
    out["dali_pipeline_build_s"] = time.perf_counter() - t
    t = time.perf_counter()
    pipe.run()
    out["dali_first_batch_s"] = time.perf_counter() - t
    del pipe
    out["peak_rss_mib"] = _peak_mib()
    return out


def phase_ffcv(a) -> dict:
    from dataclasses import replace

    import numpy as np
    from loaders.datasets import load_dataset
    from loaders.ingest import usable_cores
    try:
        from loaders.ffcv import write_beton
    except ImportError as e:
        return {"ffcv": f"not available ({e})"}
    split = load_dataset(f"imagefolder:{a.root}", a.cache).train
    k = min(a.ffcv_files, len(split))
    idx = np.sort(np.random.default_rng(0).permutation(len(split))[:k])
    sub = replace(split, paths=tuple(split.paths[i] for i in idx), labels=tuple(split.labels[i] for i in idx),
                  sizes=tuple(split.sizes[i] for i in idx))
    path, seconds, nbytes = write_beton(sub, 64, workers=usable_cores())
    return {"ffcv_files": k, "ffcv_write_s": seconds, "ffcv_files_per_s": k / seconds, "ffcv_bytes": nbytes,
            "ffcv_stored_hw": list(sub.sizes[0])}


def phase_checks(a) -> dict:
    import numpy as np
    from PIL import Image
    from loaders import datasets as D
    files = sorted(Path(a.root, "train").glob("*/*.JPEG"))[: a.sample]
    big = Path(a.cache) / "big-sample"
    big.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(min(300, a.sample)):
        _photo(rng, 375, 500).save(big / f"{i}.JPEG", quality=90)
    out = {}

    def full(p):
        with Image.open(p) as im:
            im.load()
    for name, sample in (("64x48", files), ("500x375", sorted(big.iterdir()))):
        sample = [str(p) for p in sample]
        out[f"header_us_{name}"] = 1e6 * _best(lambda: [D._check_image(p, "/nonexistent") for p in sample]) / len(sample)
        out[f"full_decode_us_{name}"] = 1e6 * _best(lambda: [full(p) for p in sample]) / len(sample)
    shutil.rmtree(big)
    return out


PHASES = {"generate": phase_generate, "ingest": phase_ingest, "reload": phase_reload, "epoch": phase_epoch,
          "ffcv": phase_ffcv, "checks": phase_checks}


# ----------------------------------------------------------------------------- driver

def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    from loaders.ingest import usable_cores
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    return {"cpu": cpu, "usable_cores": usable_cores(), "loadavg_at_start": os.getloadavg(),
            "python": platform.python_version(), "commit": commit.strip(), "date": time.strftime("%Y-%m-%d")}


def run_phase(name: str, argv: list[str]) -> dict:
    r = subprocess.run([sys.executable, "-m", "benchmarks.ingest", "--phase", name, *argv], cwd=ROOT,
                       stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if r.returncode:
        return {"error": f"phase {name} exited {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def ingest_runs(a, forwarded: list[str]) -> dict:
    """Every (repeat, worker count) ingest, interleaved; per worker count the median run."""
    runs = []
    for _ in range(a.repeats):
        for w in (int(x) for x in a.ingest_workers.split(",")):
            runs.append(run_phase("ingest", [*forwarded, "--workers", str(w)]))
            print(f"[ingest] {json.dumps(runs[-1])}", file=sys.stderr, flush=True)
    ok = [r for r in runs if "files_per_s" in r]
    median = {}
    for w in sorted({r["workers"] for r in ok}):
        mine = sorted((r for r in ok if r["workers"] == w), key=lambda r: r["files_per_s"])
        median[w] = mine[(len(mine) - 1) // 2]
    default = median.get(0) or next(iter(median.values()), {"error": "no ingest run finished"})
    return {"ingest": default, "ingest_median_by_workers": {str(w): r for w, r in median.items()},
            "ingest_runs": runs}


def extrapolate(res: dict, n: int) -> dict:
    ing, rel, ep = res.get("ingest", {}), res.get("reload", {}), res.get("epoch", {})
    f = IMAGENET_FILES / max(1, ing.get("files", n))
    out = {"files": IMAGENET_FILES}
    if "files_per_s" in ing:
        out["ingest_s"] = IMAGENET_FILES / ing["files_per_s"]
        out["manifest_bytes"] = (ing["manifest_json_bytes"] + ing["columns_bytes"]) * f
    for k in ("manifest_load_s", "columns_mib", "tuples_mib", "cache_hit_load_s"):
        if k in rel:
            out[k] = rel[k] * f
    for k in ("dali_loader_init_s", "dali_epoch_lists_s", "dali_pipeline_build_s", "path_list_s"):
        if k in ep:
            out[k] = ep[k] * f
    if "ffcv_files_per_s" in res.get("ffcv", {}):
        out["ffcv_write_s"] = IMAGENET_FILES / res["ffcv"]["ffcv_files_per_s"]
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="where the generated tree goes (e.g. /tmp/ingest-bench)")
    p.add_argument("--files", type=int, default=200_000)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--ingest-workers", default="1,0", help="ingest processes to compare (0: the usable cores)")
    p.add_argument("--repeats", type=int, default=3, help="ingest runs per worker count")
    p.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)   # one phase's
    p.add_argument("--ffcv-files", type=int, default=5000, help="FFCV writer subset (0: skip)")
    p.add_argument("--sample", type=int, default=2000, help="files timed one by one in the checks phase")
    p.add_argument("--phases", default="generate,ingest,reload,epoch,ffcv,checks")
    p.add_argument("--json", default=None, help="default benchmarks/results/ingest-<date>.json")
    p.add_argument("--clean", action="store_true", help="delete the tree and its cache at the end")
    p.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.root = str(Path(a.root).resolve() / "tree")
    a.cache = str(Path(a.root).parent / "cache")
    if a.phase:
        print(json.dumps(PHASES[a.phase](a)))
        return {}
    forwarded = [x for x in (argv if argv is not None else sys.argv[1:]) if x != "--clean"]
    res = {"machine": machine(), "args": {k: v for k, v in vars(a).items() if k != "phase"}}
    for name in a.phases.split(","):
        if name == "ffcv" and a.ffcv_files <= 0:
            continue
        if name == "ingest":
            res.update(ingest_runs(a, forwarded))
            continue
        t = time.perf_counter()
        res[name] = run_phase(name, forwarded)
        print(f"[{name}] {time.perf_counter() - t:.1f}s {json.dumps(res[name])}", file=sys.stderr, flush=True)
    res["extrapolated"] = extrapolate(res, a.files)
    out = Path(a.json) if a.json else ROOT / "benchmarks" / "results" / f"ingest-{res['machine']['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(table(res))
    print(f"JSON: {out}")
    if a.clean:
        shutil.rmtree(Path(a.root).parent, ignore_errors=True)
    return res


def table(res: dict) -> str:
    ing, rel, ep, ff, ch, ex = (res.get(k, {}) for k in ("ingest", "reload", "epoch", "ffcv", "checks",
                                                          "extrapolated"))
    scan_all = f"scan_s_{res['machine']['usable_cores']}w"
    g = lambda d, k, fmt="{:,.2f}": fmt.format(d[k]) if isinstance(d.get(k), (int, float)) else "-"  # noqa: E731
    rows = [
        ("files (train + val)", g(ing, "files", "{:,}"), g(ex, "files", "{:,}")),
        ("ingest wall s", g(ing, "ingest_s", "{:,.1f}"), g(ex, "ingest_s", "{:,.0f}")),
        ("ingest files/s, all workers (median)", g(ing, "files_per_s", "{:,.0f}"), ""),
        ("ingest CPU us/file (parent s, workers s)", f"{g(ing, 'cpu_us_per_file', '{:.0f}')} ({g(ing, 'cpu_s_parent', '{:.1f}')}, "
         f"{g(ing, 'cpu_s_workers', '{:.1f}')})", ""),
        ("ingest files/s, 1 worker (median)", g(res.get("ingest_median_by_workers", {}).get("1", {}), "files_per_s",
                                                "{:,.0f}"), ""),
        ("peak RSS ingest / worker MiB (imports)", f"{g(ing, 'peak_rss_mib', '{:,.0f}')} / "
         f"{g(ing, 'peak_rss_worker_mib', '{:,.0f}')} ({g(ing, 'rss_before_mib', '{:,.0f}')})", ""),
        ("manifest bytes (json + npz)", f"{ing.get('manifest_json_bytes', 0) + ing.get('columns_bytes', 0):,}",
         g(ex, "manifest_bytes", "{:,.0f}")),
        ("manifest load s", g(rel, "manifest_load_s", "{:.3f}"), g(ex, "manifest_load_s", "{:.2f}")),
        ("loaded columns MiB (as tuples)", f"{g(rel, 'columns_mib', '{:.1f}')} ({g(rel, 'tuples_mib', '{:.1f}')})",
         f"{g(ex, 'columns_mib', '{:.0f}')} ({g(ex, 'tuples_mib', '{:.0f}')})"),
        ("  RSS growth on load MiB (as tuples)", f"{g(rel, 'columns_rss_mib', '{:.0f}')} ({g(rel, 'tuples_rss_mib', '{:.0f}')})", ""),
        ("scan+fingerprint s, 1 / all workers", f"{g(rel, 'scan_s_1w')} / {g(rel, scan_all)}", ""),
        ("cache-hit load_dataset s", g(rel, "cache_hit_load_s"), g(ex, "cache_hit_load_s", "{:.1f}")),
        ("epoch_indices ms (world 1 / 8)", f"{g(ep, 'epoch_indices_ms_world1', '{:.1f}')} / {g(ep, 'epoch_indices_ms_world8', '{:.1f}')}", ""),
        ("epoch path list s (from a tuple)", f"{g(ep, 'path_list_s')} ({g(ep, 'path_list_s_tuple')})",
         g(ex, "path_list_s")),
        ("DALI loader init s", g(ep, "dali_loader_init_s"), g(ex, "dali_loader_init_s")),
        ("DALI epoch file+label lists s", g(ep, "dali_epoch_lists_s"), g(ex, "dali_epoch_lists_s")),
        ("DALI reader pipeline build s", g(ep, "dali_pipeline_build_s"), g(ex, "dali_pipeline_build_s")),
        ("FFCV writer files/s (subset)", f"{g(ff, 'ffcv_files_per_s', '{:,.0f}')} ({g(ff, 'ffcv_files', '{:,}')} files)",
         g(ex, "ffcv_write_s", "{:,.0f} s")),
        ("header check / full decode us, 64x48", f"{g(ch, 'header_us_64x48', '{:.0f}')} / {g(ch, 'full_decode_us_64x48', '{:.0f}')}", ""),
        ("header check / full decode us, 500x375", f"{g(ch, 'header_us_500x375', '{:.0f}')} / {g(ch, 'full_decode_us_500x375', '{:.0f}')}", ""),
    ]
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    head = f"{'':{w0}}  {'measured':>{w1}}  ImageNet ({IMAGENET_FILES:,} files, linear)"
    return "\n".join([head] + [f"{a:{w0}}  {b:>{w1}}  {c}" for a, b, c in rows])


if __name__ == "__main__":
    main()
