"""Loaders (and, with --train, training) measured side by side in one run, as ratios.

    python -m benchmarks.throughput --data shared --loaders torchvision,dali,resident,ffcv
    python -m benchmarks.throughput --train --preset cpu-demo      # training rows

Method: each (loader, augment on/off) is measured in a fresh subprocess (so one loader's
thread pools and caches cannot slow the next, and its peak RSS is its own) over a fixed
subset of `--batches x --batch-size` training images: one warm-up epoch (worker start,
JIT compiles, file cache), then `--passes` timed epochs; images/s is the median pass.
Each row's ratio is against the torchvision loader with the same augment setting, measured
in the same run. Results in the README name the machine they came from.

--train adds, each in its own subprocess, on the preset's model and batch:
- kind=train: the training step alone on one fixed batch (no loader, the run's own fused
  AdamW), eager vs compiled, fused kernels (triton) vs reference (torch) and AMP off/bf16
  where they apply (Triton only on CUDA: on a CPU it runs only in its interpreter; bf16 on
  CUDA and on CPUs whose flags claim native bf16). images/s is the median of `--passes`
  runs of `--steps` steps; with `--repeats R` each combo runs in R fresh processes,
  round-robin, and the row is the median run (the lower middle for even R; all R listed).
  The ratio is against the eager/torch/amp-off row; compile time is its own column, never
  in images/s.
- kind=end_to_end: loader + step together over `--batches` batches for each loader (one
  warm-up epoch first), with the fraction of the time spent waiting for data.
`--rows` picks row kinds and `--combos` train combos (compile/kernels/amp, `*` for any), so a
short run measures a subset: `--rows train --combos "0/torch/off,1/*/bf16"`.

Measured (2-core Xeon VM with AMX, no GPU, torch 2.14.1 CPU, quiet machine, commit 12828b8,
CIFAR-10 JPEGs via `--data shared --train --augment on --batches 8 --steps 20 --passes 5`):
loaders at 128px: dali 17.3x, ffcv 8.2x, resident 7.9x torchvision (301 images/s);
cpu-demo step: compiled 1.71x eager in fp32 (724 vs 422 images/s), compiled bf16 2.11x;
cold inductor compile 119-133 s, reported apart from images/s. Single runs vary (another:
1.25x), so with `--repeats 3` (commit ede8ff0): compiled 1.39x eager (median; 1.31-1.50x over
all pairings), compiled bf16 1.59x. Results JSON: benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def resolve_data(source: str) -> str:
    """`shared` = the ../shared/datasets CIFAR-10 JPEG archive (unpacked once into the cache)."""
    from engine.config import SHARED_CIFAR10
    if source != "shared":
        return source
    if not SHARED_CIFAR10.exists():
        raise SystemExit(f"error: --data shared needs {SHARED_CIFAR10}; pass --data imagefolder:PATH instead")
    return f"imagefolder:{SHARED_CIFAR10}"


def machine() -> dict:
    import torch
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    info = dict(machine=f"{os.cpu_count()} x {cpu}",
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


def spec_override(spec, items: list[str]):
    """`spec` with --aug FIELD=VALUE overrides (values parsed as engine.train's --aug.FIELD)."""
    from dataclasses import fields
    from engine.config import _parse_value
    defaults = {f.name: f.default for f in fields(spec)}
    over = {}
    for item in items:
        k, _, v = item.partition("=")
        if k not in defaults or k == "size":
            raise SystemExit(f"error: --aug {item!r}: use FIELD=VALUE with an AugmentSpec field")
        over[k] = _parse_value(v, defaults[k])
    return replace(spec, **over)


def measure_loader(args, loader_name: str, augment: bool) -> dict:
    """Runs inside the child process: warm-up epoch, then timed epochs."""
    import torch
    from loaders.base import LoaderOptions, build_loader
    from loaders.datasets import load_dataset
    from loaders.spec import AugmentSpec

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    data = load_dataset(args.data, args.cache_dir)
    split = subset(data.train, args.batches * args.batch_size)
    spec = spec_override(AugmentSpec(size=args.size), args.aug)
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
                size=args.size, batch_size=args.batch_size, images=n, device=str(device),
                **({"aug": args.aug} if args.aug else {}))


def _engine(args, **over):
    """(cfg, engine, spec) for the preset with --engine-args and `over` on top: the step the
    engine trains with, built without reading data or creating a run folder."""
    from engine.config import config_from_args
    from engine.precision import configure_threads, resolve_amp, resolve_compile, resolve_device
    from engine.step import build_engine
    import kernels as kernel_backends
    argv = ["--preset", args.preset, "--data", args.data, "--cache-dir", args.cache_dir,
            "--device", args.device, "--workers", str(args.workers)]
    argv += shlex.split(args.engine_args)
    for k, v in over.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    cfg, _ = config_from_args(argv)
    device = resolve_device(cfg.device)
    configure_threads(device)
    kernel_backends.set_backend(cfg.kernels)
    eng = build_engine(cfg, 10, device, resolve_amp(cfg.amp, device), use_compile=resolve_compile(cfg.compile, device))
    return cfg, eng, cfg.spec()


def compile_cache() -> str | None:
    """'hit' when inductor took every graph from its on-disk cache (compile_s is then a
    warm figure), 'miss' when it generated code (a cold compile), None when nothing compiled."""
    from torch._dynamo.utils import counters
    hit, miss = counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]
    return None if not hit + miss else ("miss" if miss else "hit")


def measure_train(args, compile_: bool, kernels: str, amp: str) -> dict:
    """kind=train: `engine.step.train_step` alone on one fixed batch, the run's fused AdamW."""
    import torch
    import torch.nn.functional as F
    from engine.config import STAGES
    from engine.loop import warm_up_compile
    from engine.models import forward_flops
    from engine.step import train_step
    cfg, eng, spec = _engine(args, compile="on" if compile_ else "off", kernels=kernels, amp=amp)
    compile_s = warm_up_compile(eng, spec.size, cfg.batch_size, set(), tta=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(cfg.batch_size, 3, spec.size, spec.size, generator=g).to(eng.device)
    y = torch.randint(0, 10, (cfg.batch_size,), generator=g).to(eng.device)
    y_soft = F.one_hot(y, 10).float()
    opt = eng.optimizer(STAGES[0].lr_start)
    eng.model.train()
    times = []
    for p in range(args.passes + 1):       # pass 0 warms caches and autotuning
        t0 = time.perf_counter()
        for _ in range(args.steps):
            train_step(eng, opt, x, y_soft)
        if eng.device.type == "cuda":
            torch.cuda.synchronize()
        if p:
            times.append(time.perf_counter() - t0)
    ips = args.steps * cfg.batch_size / statistics.median(times)
    flops = 3 * forward_flops(eng.model, spec.size)            # forward + backward ~ 3x forward
    return dict(kind="train", compile=compile_, kernels=kernels, amp=amp, loader=None, images_per_s=ips,
                compile_s=round(compile_s, 2), compile_cache=compile_cache(),
                tflops=round(ips * flops / 1e12, 3), batch_size=cfg.batch_size,
                size=spec.size, preset=args.preset, device=str(eng.device))


def measure_end_to_end(args, loader: str) -> dict:
    """kind=end_to_end: loader + `engine.loop.train_epoch` for `--batches` batches, median of passes."""
    import torch
    from engine.config import STAGES
    from engine.loop import BadSteps, EpochSetup, train_epoch, warm_up_compile
    from engine.precision import amp_name
    from loaders.base import LoaderOptions, build_loader
    from loaders.datasets import load_dataset
    cfg, eng, spec = _engine(args, loader=loader)
    compile_s = warm_up_compile(eng, spec.size, cfg.batch_size, set(), tta=False)
    data = load_dataset(cfg.data, cfg.cache_dir)
    opts = LoaderOptions(train=True, batch_size=cfg.batch_size, device=eng.device, dtype=eng.amp or torch.float32,
                         workers=cfg.workers)
    train_loader = build_loader(loader, subset(data.train, args.batches * cfg.batch_size), spec, opts)
    opt = eng.optimizer(STAGES[0].lr_start)
    stats = []
    for p in range(args.passes + 1):
        setup = EpochSetup(opt=opt, lr=lambda s: STAGES[0].lr_start, mixup=None, num_classes=data.num_classes,
                           desc=f"e2e {loader}", epoch=p, show_bar=False)
        r, _ = train_epoch(eng, train_loader, setup, BadSteps(eng.device, 10**9), 0)
        if p:
            stats.append(r)
    mid = sorted(stats, key=lambda r: r["images_per_s"])[len(stats) // 2]
    return dict(kind="end_to_end", compile=eng.use_compile, kernels=cfg.kernels, amp=amp_name(eng.amp),
                loader=loader, images_per_s=mid["images_per_s"], data_wait_frac=round(mid["data_wait_frac"], 3),
                compile_s=round(compile_s, 2), compile_cache=compile_cache(), batch_size=cfg.batch_size,
                size=spec.size, preset=args.preset, device=str(eng.device))


def run_child(args, loader: str, augment: bool, what: str = "loader") -> dict:
    cmd = [sys.executable, "-m", "benchmarks.throughput", "--_child", f"{what},{loader},{int(augment)}",
           "--preset", args.preset, "--steps", str(args.steps), "--engine-args", args.engine_args,
           "--data", args.data, "--cache-dir", args.cache_dir, "--size", str(args.size),
           "--batch-size", str(args.batch_size), "--batches", str(args.batches), "--passes", str(args.passes),
           "--workers", str(args.workers), "--device", args.device] + [f"--aug={a}" for a in args.aug]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["?"])[-1]
        return dict(kind=what, loader=loader, augment=augment, images_per_s=None,
                    error=tail)
    return json.loads(r.stdout.strip().splitlines()[-1])


def print_table(rows: list[dict]) -> None:
    print(f"{'loader':<12} {'augment':<8} {'images/s':>10} {'x torchvision':>14} {'peak RSS MB':>12}")
    for r in rows:
        ips = f"{r['images_per_s']:.0f}" if r.get("images_per_s") else "failed"
        ratio = f"{r['ratio_vs_torchvision']:.2f}x" if r.get("ratio_vs_torchvision") else "-"
        print(f"{r['loader']:<12} {('on' if r['augment'] else 'off'):<8} {ips:>10} {ratio:>14} "
              f"{r.get('peak_rss_mb', '-'):>12}" + (f"  ({r['error']})" if r.get("error") else ""))


def select_combos(combos: list[tuple], patterns: str) -> list[tuple]:
    """The (compile, kernels, amp) combos matching any comma-separated `C/K/A` pattern (`*`
    matches anything); all of them for an empty `patterns`."""
    if not patterns:
        return combos
    pats = [p.split("/") for p in patterns.split(",") if p]
    if any(len(p) != 3 for p in pats):
        raise SystemExit(f"error: --combos takes compile/kernels/amp patterns, e.g. 0/*/* or 1/triton/bf16 "
                         f"(got {patterns!r})")
    return [c for c in combos if any(all(q in ("*", str(v)) for q, v in zip(p, c)) for p in pats)]


def train_rows(args, loaders: list[str], info: dict) -> list[dict]:
    import torch
    from engine.precision import cpu_reports_bf16
    cuda = torch.cuda.is_available() and args.device in ("auto", "cuda")
    # bf16 is measured wherever it may apply: CUDA, or a CPU whose flags claim native bf16
    # (whether `--amp auto` picks it there is decided by a probe; the rows show if it pays).
    amps = ("off", "bf16") if cuda or cpu_reports_bf16() else ("off",)
    combos = [(c, k, a) for c in (0, 1) for k in (("torch", "triton") if cuda else ("torch",)) for a in amps]
    combos = select_combos(combos, args.combos) if "train" in args.rows else []
    # Round-robin over the combos `--repeats` times (a fresh process each): drift of the
    # machine hits every combo alike; each row is the median run, with all runs listed.
    runs: dict = {combo: [] for combo in combos}
    for _ in range(args.repeats):
        for c, k, a in combos:
            r = run_child(args, f"{c}/{k}/{a}", True, "train")
            runs[(c, k, a)].append(r)
            print(f"  measured train compile={c} kernels={k} amp={a}: {r.get('images_per_s') or r.get('error')}",
                  file=sys.stderr, flush=True)
    rows = []
    for done in runs.values():
        ok = sorted((r for r in done if r.get("images_per_s")), key=lambda r: r["images_per_s"])
        if not ok:
            rows.append({**done[-1], **info})
            continue
        rows.append({**ok[(len(ok) - 1) // 2], **info, "images_per_s_runs": [round(r["images_per_s"], 1) for r in ok],
                     "compile_s_runs": [r["compile_s"] for r in done if r.get("images_per_s")]})
    eager = next((r for r in rows if r.get("images_per_s") and not r.get("compile") and r.get("kernels") == "torch"
                  and r.get("amp") == "off"), None)
    for name in loaders if "end_to_end" in args.rows else ():
        rows.append({**run_child(args, name, True, "end_to_end"), **info})
        print(f"  measured end_to_end {name}: {rows[-1].get('images_per_s') or rows[-1].get('error')}",
              file=sys.stderr, flush=True)
    for r in rows:
        r["ratio_vs_eager"] = r["images_per_s"] / eager["images_per_s"] if eager and r.get("images_per_s") else None
    print(f"\n{'kind':<11} {'loader':<12} {'compile':<8} {'kernels':<8} {'amp':<5} {'images/s':>9} {'x eager':>8} "
          f"{'compile s':>9} {'data wait':>9}")
    for r in rows:
        ips = f"{r['images_per_s']:.0f}" if r.get("images_per_s") else "failed"
        ratio = f"{r['ratio_vs_eager']:.2f}x" if r.get("ratio_vs_eager") else "-"
        wait = f"{r['data_wait_frac']:.0%}" if r.get("data_wait_frac") is not None else "-"
        print(f"{r['kind']:<11} {str(r.get('loader') or '-'):<12} {str(bool(r.get('compile'))):<8} "
              f"{str(r.get('kernels')):<8} {str(r.get('amp')):<5} {ips:>9} {ratio:>8} {r.get('compile_s', '-'):>9} "
              f"{wait:>9}" + (f"  (compile cache {r['compile_cache']})" if r.get("compile_cache") else "")
              + (f"  ({r['error']})" if r.get("error") else ""))
    return rows


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
    p.add_argument("--aug", action="append", default=[], metavar="FIELD=VALUE",
                   help="AugmentSpec override for the loader rows, repeatable: --aug resize=rrc")
    p.add_argument("--json", default="", help="write the rows here as a JSON list")
    p.add_argument("--train", action="store_true", help="also measure training and end-to-end rows")
    p.add_argument("--preset", default="cpu-demo", help="engine preset for the --train rows")
    p.add_argument("--steps", type=int, default=10, help="steps per timed pass of a train row")
    p.add_argument("--repeats", type=int, default=1, help="fresh-process runs of each train row, interleaved "
                   "(the row is the median run)")
    p.add_argument("--engine-args", default="", help="engine.train flags applied on top of --preset for the "
                   "--train rows, e.g. \"--width 0.5 --size 64\"")
    p.add_argument("--rows", default="", help="row kinds to measure, comma-separated: loader, train, end_to_end "
                   "(default: loader, plus train and end_to_end with --train)")
    p.add_argument("--combos", default="", help="train rows to measure: comma-separated compile/kernels/amp, "
                   "* for any, e.g. \"0/*/*\" (eager) or \"1/triton/bf16\" (default: all)")
    p.add_argument("--_child", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.rows = set(args.rows.split(",")) - {""} or {"loader"} | ({"train", "end_to_end"} if args.train else set())
    if args.rows - {"loader", "train", "end_to_end"}:
        p.error(f"--rows takes loader, train, end_to_end (got {','.join(sorted(args.rows))})")
    if args._child:
        what, name, aug = args._child.split(",")
        if what == "loader":
            row = measure_loader(args, name, aug == "1")
        elif what == "train":
            compile_, kernels, amp = name.split("/")
            row = measure_train(args, compile_ == "1", kernels, amp)
        else:
            row = measure_end_to_end(args, name)
        print(json.dumps(row))
        return []

    from loaders.base import available_loaders
    from loaders.datasets import load_dataset
    args.data = resolve_data(args.data)
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
    for aug in augments if "loader" in args.rows else ():
        for name in names:
            rows.append({**run_child(args, name, aug), **info})
            print(f"  measured {name} augment={'on' if aug else 'off'}: {rows[-1].get('images_per_s') or rows[-1].get('error')}",
                  file=sys.stderr, flush=True)
    for r in rows:
        base = next((b for b in rows if b["loader"] == "torchvision" and b["augment"] == r["augment"]), None)
        ok = base and base.get("images_per_s") and r.get("images_per_s")
        r["ratio_vs_torchvision"] = r["images_per_s"] / base["images_per_s"] if ok else None
    if rows:
        print_table(rows)
    if args.rows & {"train", "end_to_end"}:
        rows += train_rows(args, names, info)
    if args.json:
        from loaders.common import atomic_write
        atomic_write(args.json, json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
