"""Loaders (and, with --train, training) measured side by side in one run, as ratios.

    python -m benchmarks.throughput --data shared --loaders torchvision,dali,resident,ffcv

Method: each (loader, augment on/off) is measured in a fresh subprocess (so one loader's
thread pools and caches cannot slow the next, and its peak RSS is its own) over a fixed
subset of `--batches x --batch-size` training images: one warm-up epoch (worker start,
JIT compiles, file cache), then `--passes` timed epochs; images/s is the median pass.
Each row's ratio is against the torchvision loader with the same augment setting, measured
in the same run. Results in the README name the machine they came from.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_CIFAR = ROOT.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"


def resolve_data(source: str, cache_dir: str) -> str:
    """`shared` = ../shared/datasets CIFAR-10 JPEGs, unpacked once into the cache."""
    if source != "shared":
        return source
    out = Path(cache_dir) / "cifar10-jpeg"
    if not (out / "test").is_dir():
        if not SHARED_CIFAR.exists():
            raise SystemExit(f"error: --data shared needs {SHARED_CIFAR}; pass --data imagefolder:PATH instead")
        out.mkdir(parents=True, exist_ok=True)
        with tarfile.open(SHARED_CIFAR) as t:
            t.extractall(out, filter="data")
    return f"imagefolder:{out.resolve()}"


def machine() -> dict:
    import torch
    info = dict(machine=f"{platform.machine()} {os.cpu_count()} cpus, {platform.processor() or platform.system()}",
                torch=torch.__version__)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True).stdout.strip()
    except OSError:
        info["commit"] = ""
    return info


def subset(split, n: int, seed: int = 0):
    import numpy as np
    idx = np.sort(np.random.default_rng(seed).permutation(len(split))[:n])
    pick = lambda seq: tuple(seq[i] for i in idx)  # noqa: E731
    return replace(split, paths=pick(split.paths), labels=pick(split.labels), sizes=pick(split.sizes))


def measure_loader(args, loader_name: str, augment: bool) -> dict:
    """Runs inside the child process: warm-up epoch, then timed epochs."""
    import torch
    from loaders.base import LoaderOptions, build_loader
    from loaders.datasets import load_dataset
    from loaders.spec import AugmentSpec

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    data = load_dataset(args.data, args.cache_dir)
    split = subset(data.train, args.batches * args.batch_size)
    spec = AugmentSpec(size=args.size)
    spec = spec if augment else spec.without()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    opts = LoaderOptions(train=True, batch_size=args.batch_size, device=device, dtype=dtype,
                         workers=args.workers, drop_last=True)
    t0 = time.perf_counter()
    loader = build_loader(loader_name, split, spec, opts)
    setup_s = time.perf_counter() - t0
    times = []
    for p in range(args.passes + 1):          # pass 0 is the warm-up
        loader.set_epoch(p)
        n, t0 = 0, time.perf_counter()
        for x, y in loader:
            n += y.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        if p:
            times.append(time.perf_counter() - t0)
        assert x.shape[-1] == args.size and x.is_contiguous(memory_format=torch.channels_last)
    rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return dict(kind="loader", loader=loader_name, augment=augment, images_per_s=n / statistics.median(times),
                passes_s=[round(t, 3) for t in times], setup_s=round(setup_s, 2), peak_rss_mb=round(rss / 1024),
                size=args.size, batch_size=args.batch_size, images=n, device=str(device))


def run_child(args, loader: str, augment: bool) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.throughput", "--_child", f"{loader},{int(augment)}",
           "--data", args.data, "--cache-dir", args.cache_dir, "--size", str(args.size),
           "--batch-size", str(args.batch_size), "--batches", str(args.batches), "--passes", str(args.passes),
           "--workers", str(args.workers), "--device", args.device]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["?"])[-1]
        return dict(kind="loader", loader=loader, augment=augment, images_per_s=None, error=tail)
    return json.loads(r.stdout.strip().splitlines()[-1])


def print_table(rows: list[dict]) -> None:
    print(f"{'loader':<12} {'augment':<8} {'images/s':>10} {'x torchvision':>14} {'peak RSS MB':>12}")
    for r in rows:
        ips = f"{r['images_per_s']:.0f}" if r.get("images_per_s") else "failed"
        ratio = f"{r['ratio_vs_torchvision']:.2f}x" if r.get("ratio_vs_torchvision") else "-"
        print(f"{r['loader']:<12} {('on' if r['augment'] else 'off'):<8} {ips:>10} {ratio:>14} "
              f"{r.get('peak_rss_mb', '-'):>12}" + (f"  ({r['error']})" if r.get("error") else ""))


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--loaders", default="", help="comma-separated (default: every available loader)")
    p.add_argument("--data", default="synthetic", help="synthetic | imagefolder:PATH | cifar10:PATH | shared")
    p.add_argument("--cache-dir", default=".cache")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--batches", type=int, default=8, help="batches per timed epoch")
    p.add_argument("--passes", type=int, default=3, help="timed epochs (median reported)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--augment", choices=("both", "on", "off"), default="both")
    p.add_argument("--json", default="", help="write the rows here as a JSON list")
    p.add_argument("--_child", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        name, aug = args._child.split(",")
        print(json.dumps(measure_loader(args, name, aug == "1")))
        return []

    from loaders.base import available_loaders
    from loaders.datasets import load_dataset
    args.data = resolve_data(args.data, args.cache_dir)
    load_dataset(args.data, args.cache_dir)          # ingest once, before any timing
    names = [n for n in args.loaders.split(",") if n] or available_loaders()
    if "torchvision" not in names:
        names.insert(0, "torchvision")               # the baseline every ratio is against
    augments = {"both": (True, False), "on": (True,), "off": (False,)}[args.augment]
    info = machine()
    print(f"# {info['machine']} | torch {info['torch']} | {info.get('gpu', 'no GPU')} | commit {info['commit']} | "
          f"data {args.data} | {args.size}px, batch {args.batch_size} x {args.batches}, median of {args.passes}",
          flush=True)
    rows = []
    for aug in augments:
        for name in names:
            rows.append({**run_child(args, name, aug), **info})
            print(f"  measured {name} augment={'on' if aug else 'off'}: {rows[-1].get('images_per_s') or rows[-1].get('error')}",
                  file=sys.stderr, flush=True)
    for r in rows:
        base = next((b for b in rows if b["loader"] == "torchvision" and b["augment"] == r["augment"]), None)
        ok = base and base.get("images_per_s") and r.get("images_per_s")
        r["ratio_vs_torchvision"] = r["images_per_s"] / base["images_per_s"] if ok else None
    print_table(rows)
    if args.json:
        from loaders.fsutil import atomic_write
        atomic_write(args.json, json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
