"""Loaders (and, with --train, training) measured side by side in one run, as ratios.

    python -m benchmarks.throughput                   # 128x128 JPEG sources, then 32x32 ones
    python -m benchmarks.throughput --data shared128,shared --feed 12000 --load 1
    python -m benchmarks.throughput --train --threads engine,torch,1 --load 1

One table per `--data` source (synthetic128: built-in, rendered at 128; shared128: the CIFAR-10
archive upscaled once to 128, benchmarks/make_cifar128.py). Each (loader, augment, load) row
runs in a fresh subprocess: a warm-up epoch, then `--passes` timed epochs of `--batches`
batches; images/s is the median pass, CPU ms/img the process tree's CPU time over them.
Ratios divide by the `torchvision` loader (PIL images + v2, DataLoader workers) of the same
source, augment and load. The feed table turns CPU time into the host cores (and device work)
that a `--feed` images/s step needs. `--load N` adds rows under N busy-loop processes;
`--train` adds the step alone and loader + step rows, per `--threads` setting.
Method and measured tables: docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import contextlib
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
DATA_SOURCES = "synthetic128 | synthetic | shared128 | shared | imagefolder:PATH | cifar10:PATH"
# The 128px synthetic set: rendered natively at the training size (3000 train images: the
# default 8 x 256 subset fits; 7 ms each to render, once, into the cache).
SYNTHETIC128 = dict(size=128, train_per_class=300, val_per_class=20)
BASELINE = "torchvision"

# Where each loader's work runs when training on CUDA: (the augment-off run's work: decode,
# resize, normalise, copy; the augmentation's extra work). torchvision: all in host
# processes. ffcv: JPEG/raw decode on the host, loaders.augment on the device (its off-run
# resize + normalise also run there: the host figure is an upper bound). resident: decoded
# once when built; resize, augment, normalise on the device. dali with a GPU: "mixed" decode
# and every op on the device (the host keeps file reads, not measurable on a CPU).
PLACEMENT = {"torchvision": ("host", "host"), "torchvision-tensor": ("host", "host"),
             "ffcv": ("host", "device"), "resident": ("device", "device"), "dali": ("device", "device")}


# ------------------------------------------------------------------------------- data

def open_data(source: str, cache_dir: str):
    """The dataset behind a --data token (ingested into the cache on first use)."""
    from engine.config import SHARED_CIFAR10
    from loaders.datasets import SyntheticConfig, load_dataset
    if source == "synthetic128":
        return load_dataset("synthetic", cache_dir, SyntheticConfig(**SYNTHETIC128))
    if source in ("shared", "shared128"):
        if not SHARED_CIFAR10.exists():
            raise SystemExit(f"error: --data {source} needs {SHARED_CIFAR10}; pass --data imagefolder:PATH instead")
        if source == "shared":
            return load_dataset(f"imagefolder:{SHARED_CIFAR10}", cache_dir)
        from benchmarks.make_cifar128 import ensure
        return load_dataset(f"imagefolder:{ensure(SHARED_CIFAR10, cache_dir)}", cache_dir)
    return load_dataset(source, cache_dir)


def source_size(split) -> str:
    sizes = set(split.sizes)
    return "x".join(map(str, next(iter(sizes)))) if len(sizes) == 1 else "mixed-size"


def subset(split, n: int, seed: int = 0):
    import numpy as np
    if n > len(split):
        raise SystemExit(f"error: {n} images asked (--batches x --batch-size), the split has {len(split)}")
    idx = np.sort(np.random.default_rng(seed).permutation(len(split))[:n])
    pick = lambda seq: tuple(seq[i] for i in idx)  # noqa: E731
    return replace(split, paths=pick(split.paths), labels=pick(split.labels), sizes=pick(split.sizes))


# -------------------------------------------------------------------- machine and load

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


def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process, its waited-for children and every live
    descendant (DataLoader workers live through the passes, so RUSAGE_CHILDREN alone misses
    them). Live descendants from /proc (Linux); elsewhere only the rusage part."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        ru = resource.getrusage(who)
        total += ru.ru_utime + ru.ru_stime
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    parent, times = {}, {}
    for d in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            f = stat[stat.rindex(")") + 2:].split()       # fields from 3 (state) on
            parent[int(d)] = int(f[1])
            times[int(d)] = sum(int(v) for v in f[11:15]) / tick     # utime stime cutime cstime
    me, seen = os.getpid(), set()
    todo = [p for p, pp in parent.items() if pp == me]
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.add(p)
            total += times[p]
            todo += [c for c, pp in parent.items() if pp == p]
    return total


@contextlib.contextmanager
def busy_load(n: int):
    """N busy-loop processes (pure Python spin) for the duration of the block."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def apply_threads(mode: str, device, workers: int) -> int:
    """The step's intra-op threads: engine = engine.precision.configure_threads (cores / local
    ranks; an explicit OMP_NUM_THREADS wins), torch = torch's own default, cores-workers =
    usable cores minus the loader's workers (at least 1), or a number."""
    import torch
    from engine.precision import configure_threads, usable_cores
    if mode == "engine":
        return configure_threads(device)
    if mode != "torch":
        torch.set_num_threads(max(usable_cores() - workers, 1) if mode == "cores-workers" else int(mode))
    return torch.get_num_threads()


# ---------------------------------------------------------------------- child measurements

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
    from loaders.spec import AugmentSpec

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = apply_threads("engine", device, args.workers)
    data = open_data(args.data, args.cache_dir)
    split = subset(data.train, args.batches * args.batch_size)
    spec = spec_override(AugmentSpec(size=args.size), args.aug)
    spec = spec if augment else spec.without()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    opts = LoaderOptions(train=True, batch_size=args.batch_size, device=device, dtype=dtype,
                         workers=args.workers, drop_last=True)
    t0 = time.perf_counter()
    if loader_name == "torchvision-tensor":       # the uint8-tensor v2 pipeline, to compare
        from loaders.torchvision import TorchvisionLoader
        loader = TorchvisionLoader(split, spec, opts, pipeline="tensor")
    else:
        loader = build_loader(loader_name, split, spec, opts)
    setup_s = time.perf_counter() - t0
    times, cpu0 = [], 0.0
    for p in range(args.passes + 1):          # pass 0 is the warm-up
        loader.set_epoch(p)
        if p == 1:
            cpu0 = cpu_seconds()
        n, t0 = 0, time.perf_counter()
        for x, y in loader:
            n += y.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        if p:
            times.append(time.perf_counter() - t0)
        assert x.shape[-1] == args.size and x.is_contiguous(memory_format=torch.channels_last)
    cpu = cpu_seconds() - cpu0
    rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return dict(kind="loader", loader=loader_name, augment=augment, images_per_s=n / statistics.median(times),
                passes_s=[round(t, 3) for t in times], setup_s=round(setup_s, 2), peak_rss_mb=round(rss / 1024),
                cpu_s_per_image=cpu / (n * args.passes), cores_busy=round(cpu / sum(times), 2),
                size=args.size, source_size=source_size(data.train), batch_size=args.batch_size, images=n,
                workers=args.workers, threads=threads, device=str(device), loadavg_1m=os.getloadavg()[0])


def _engine(args, **over):
    """(cfg, engine, spec, threads) for the preset with --engine-args and `over` on top: the
    step the engine trains with, built without reading data or creating a run folder."""
    from engine.config import config_from_args
    from engine.precision import resolve_amp, resolve_compile, resolve_device
    from engine.step import build_engine
    import kernels as kernel_backends
    argv = ["--preset", args.preset, "--cache-dir", args.cache_dir, "--device", args.device,
            "--workers", str(args.workers)]
    argv += shlex.split(args.engine_args)
    for k, v in over.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    cfg, _ = config_from_args(argv)
    device = resolve_device(cfg.device)
    threads = apply_threads(args.threads, device, cfg.workers)
    kernel_backends.set_backend(cfg.kernels)
    eng = build_engine(cfg, 10, device, resolve_amp(cfg.amp, device), use_compile=resolve_compile(cfg.compile, device))
    return cfg, eng, cfg.spec(), threads


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
    cfg, eng, spec, threads = _engine(args, compile="on" if compile_ else "off", kernels=kernels, amp=amp)
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
                size=spec.size, preset=args.preset, device=str(eng.device), **_thread_info(args, threads))


def _thread_info(args, threads: int) -> dict:
    return dict(threads=args.threads, num_threads=threads, wait_policy=args.wait_policy,
                loadavg_1m=os.getloadavg()[0])


def measure_end_to_end(args, loader: str) -> dict:
    """kind=end_to_end: loader + `engine.loop.train_epoch` for `--batches` batches, median of passes."""
    import torch
    from engine.config import STAGES
    from engine.loop import BadSteps, EpochSetup, train_epoch, warm_up_compile
    from engine.precision import amp_name
    from loaders.base import LoaderOptions, build_loader
    cfg, eng, spec, threads = _engine(args, loader=loader)
    compile_s = warm_up_compile(eng, spec.size, cfg.batch_size, set(), tta=False)
    data = open_data(args.data, args.cache_dir)
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
                size=spec.size, source_size=source_size(data.train), preset=args.preset, device=str(eng.device),
                **_thread_info(args, threads))


# ---------------------------------------------------------------------------- the parent

def run_child(args, data: str, loader: str, augment: bool, what: str = "loader", threads: str = "engine",
              load: int = 0) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.throughput", "--_child", f"{what},{loader},{int(augment)}",
           "--preset", args.preset, "--steps", str(args.steps), "--engine-args", args.engine_args,
           "--data", data, "--cache-dir", args.cache_dir, "--size", str(args.size),
           "--batch-size", str(args.batch_size), "--batches", str(args.batches), "--passes", str(args.passes),
           "--workers", str(args.workers), "--device", args.device, "--threads", threads] + [f"--aug={a}" for a in args.aug]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if threads == "torch":                # torch's defaults: libgomp's own wait policy too
        env.pop("OMP_WAIT_POLICY", None)
    else:                                 # the engine's (engine/__init__.py), before torch loads
        env["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
    with busy_load(load):
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["?"])[-1]
        row = dict(kind=what, loader=loader, augment=augment, images_per_s=None, error=tail)
    else:
        row = json.loads(r.stdout.strip().splitlines()[-1])
    return {**row, "data": data, "load": load}


def feed_columns(rows: list[dict], feed: float, cuda: bool) -> None:
    """CPU time per image split into decode (the augment-off run) and augmentation (the
    difference), and the cores a `feed` images/s step needs on the host and, as CPU-core
    equivalents of work that moves to the GPU on CUDA, on the device (DS-Analyzer's
    differential method). Added to every loader row in place."""
    for r in rows:
        if r["kind"] != "loader" or not r.get("images_per_s"):
            continue
        off = next((o for o in rows if o["kind"] == "loader" and o["loader"] == r["loader"] and not o["augment"]
                    and o["load"] == r["load"] and o["data"] == r["data"] and o.get("images_per_s")), None)
        total = r["cpu_s_per_image"]
        decode = min(off["cpu_s_per_image"], total) if off else (total if not r["augment"] else None)
        aug = total - decode if decode is not None else None        # parts sum to the row's total
        where = PLACEMENT.get(r["loader"], ("host", "host"))
        if cuda:                           # measured on CUDA: the CPU time IS the host's
            host, device = total, None
        elif decode is None:               # no augment-off row: split only when both parts sit together
            host = total if where == ("host", "host") else 0.0 if where == ("device", "device") else None
            device = total - host if host is not None else None
        else:
            parts = (decode, aug)
            host = sum(p for p, w in zip(parts, where) if w == "host")
            device = sum(p for p, w in zip(parts, where) if w == "device")
        r.update(decode_cpu_s_per_image=decode, augment_cpu_s_per_image=aug, feed_images_per_s=feed,
                 host_cores_needed=None if host is None else round(feed * host, 2),
                 device_core_equiv=None if device is None else round(feed * device, 2),
                 placement_on_cuda=dict(decode=where[0], augment=where[1]))


def _ms(v) -> str:
    return "-" if v is None else f"{v * 1000:.2f}"


def print_tables(rows: list[dict], args, data: str) -> None:
    mine = [r for r in rows if r["kind"] == "loader" and r["data"] == data]
    src = next((r["source_size"] for r in mine if r.get("source_size")), "?")
    print(f"\n## loaders | data {data}: {src} JPEG sources -> {args.size}x{args.size} | baseline: torchvision "
          f"(PIL images + v2 transforms, {args.workers} DataLoader workers), same augment and load")
    print(f"{'loader':<19} {'augment':<7} {'load':>4} {'images/s':>9} {'x torchvision':>13} {'CPU ms/img':>10} "
          f"{'x tv by CPU':>11} {'cores busy':>10} {'peak RSS MB':>11}")
    for r in mine:
        ips = f"{r['images_per_s']:.0f}" if r.get("images_per_s") else "failed"
        ratio = f"{r['ratio_vs_torchvision']:.2f}x" if r.get("ratio_vs_torchvision") else "-"
        cpu_ratio = f"{r['cpu_ratio_vs_torchvision']:.2f}x" if r.get("cpu_ratio_vs_torchvision") else "-"
        print(f"{r['loader']:<19} {('on' if r['augment'] else 'off'):<7} {r['load']:>4} {ips:>9} {ratio:>13} "
              f"{_ms(r.get('cpu_s_per_image')):>10} {cpu_ratio:>11} {r.get('cores_busy', '-'):>10} "
              f"{r.get('peak_rss_mb', '-'):>11}"
              + (f"  ({r['error']})" if r.get("error") else ""))
    feed = [r for r in mine if "host_cores_needed" in r and (r["augment"] or args.augment == "off")]
    if feed:
        print(f"\n## feed {args.feed:.0f} images/s (--feed) | data {data} ({src} sources) | decode = the augment-off "
              "run's CPU, augment = on - off; device = CPU-core equivalents of the work that runs on the GPU "
              "with CUDA (PLACEMENT)")
        print(f"{'loader':<19} {'augment':<7} {'load':>4} {'decode ms':>9} {'augment ms':>10} {'host cores':>10} "
              f"{'device core-eq':>14}")
        for r in feed:
            cores = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
            print(f"{r['loader']:<19} {('on' if r['augment'] else 'off'):<7} {r['load']:>4} "
                  f"{_ms(r['decode_cpu_s_per_image']):>9} {_ms(r['augment_cpu_s_per_image']):>10} "
                  f"{cores(r['host_cores_needed']):>10} {cores(r['device_core_equiv']):>14}")


def loader_rows(args, names: list[str], data: str, loads: list[int], info: dict) -> list[dict]:
    augments = {"both": (True, False), "on": (True,), "off": (False,)}[args.augment]
    runs: dict = {(a, n, ld): [] for a in augments for n in names for ld in loads}
    for _ in range(args.repeats):          # interleaved: drift of the machine hits every row alike
        for aug, name, load in runs:
            r = run_child(args, data, name, aug, load=load)
            runs[(aug, name, load)].append(r)
            print(f"  measured {data} {name} augment={'on' if aug else 'off'} load={load}: "
                  f"{r.get('images_per_s') or r.get('error')}", file=sys.stderr, flush=True)
    rows = []
    for done in runs.values():             # images/s and CPU time: each the median run (lower middle)
        ok = sorted((r for r in done if r.get("images_per_s")), key=lambda r: r["images_per_s"])
        if not ok:
            rows.append({**done[-1], **info})
            continue
        cpu = sorted(r["cpu_s_per_image"] for r in ok)
        rows.append({**ok[(len(ok) - 1) // 2], **info, "cpu_s_per_image": cpu[(len(cpu) - 1) // 2],
                     "images_per_s_runs": [round(r["images_per_s"], 1) for r in ok],
                     "cpu_s_per_image_runs": [round(c, 6) for c in cpu]})
    for r in rows:
        base = next((b for b in rows if b["loader"] == BASELINE and b["augment"] == r["augment"]
                     and b["load"] == r["load"]), None)
        ok = base and base.get("images_per_s") and r.get("images_per_s")
        r["ratio_vs_torchvision"] = r["images_per_s"] / base["images_per_s"] if ok else None
        # By CPU time per image: what the images/s ratio is when both rows get the same cores;
        # stable under load, where images/s mostly measures the CPU share a row was given.
        r["cpu_ratio_vs_torchvision"] = base["cpu_s_per_image"] / r["cpu_s_per_image"] if ok else None
        r["baseline"] = (f"torchvision (PIL + v2, {args.workers} workers), data {data}, augment "
                         f"{'on' if r['augment'] else 'off'}, load {r['load']}")
    return rows


def select_combos(combos: list[tuple], patterns: str) -> list[tuple]:
    """The combos whose (compile, kernels, amp) match any comma-separated `C/K/A` pattern (`*`
    matches anything); all of them for an empty `patterns`."""
    if not patterns:
        return combos
    pats = [p.split("/") for p in patterns.split(",") if p]
    if any(len(p) != 3 for p in pats):
        raise SystemExit(f"error: --combos takes compile/kernels/amp patterns, e.g. 0/*/* or 1/triton/bf16 "
                         f"(got {patterns!r})")
    return [c for c in combos if any(all(q in ("*", str(v)) for q, v in zip(p, c[:3])) for p in pats)]


def train_rows(args, loaders: list[str], loads: list[int], info: dict) -> list[dict]:
    import torch
    from engine.precision import cpu_reports_bf16
    cuda = torch.cuda.is_available() and args.device in ("auto", "cuda")
    data = args.data.split(",")[0]
    threads = [t for t in args.threads.split(",") if t]
    # bf16 is measured wherever it may apply: CUDA, or a CPU whose flags claim native bf16
    # (whether `--amp auto` picks it there is decided by a probe; the rows show if it pays).
    amps = ("off", "bf16") if cuda or cpu_reports_bf16() else ("off",)
    compiles = {"both": (0, 1), "off": (0,), "on": (1,)}[args.train_compile]
    combos = [(c, k, a, t, n) for c in compiles for k in (("torch", "triton") if cuda else ("torch",)) for a in amps
              for t in (threads if not c else threads[:1]) for n in loads]
    combos = select_combos(combos, args.combos) if "train" in args.rows else []
    # Round-robin over the combos `--repeats` times (a fresh process each): drift of the
    # machine hits every combo alike; each row is the median run, with all runs listed.
    runs: dict = {combo: [] for combo in combos}
    for _ in range(args.repeats):
        for c, k, a, t, n in combos:
            r = run_child(args, data, f"{c}/{k}/{a}", True, "train", threads=t, load=n)
            runs[(c, k, a, t, n)].append(r)
            print(f"  measured train compile={c} kernels={k} amp={a} threads={t} load={n}: "
                  f"{r.get('images_per_s') or r.get('error')}", file=sys.stderr, flush=True)
    rows = []
    for done in runs.values():
        ok = sorted((r for r in done if r.get("images_per_s")), key=lambda r: r["images_per_s"])
        if not ok:
            rows.append({**done[-1], **info})
            continue
        rows.append({**ok[(len(ok) - 1) // 2], **info, "images_per_s_runs": [round(r["images_per_s"], 1) for r in ok],
                     "compile_s_runs": [r["compile_s"] for r in done if r.get("images_per_s")]})
    for name in loaders if "end_to_end" in args.rows else ():
        for t in threads:
            for n in loads:
                rows.append({**run_child(args, data, name, True, "end_to_end", threads=t, load=n), **info})
                print(f"  measured end_to_end {name} threads={t} load={n}: "
                      f"{rows[-1].get('images_per_s') or rows[-1].get('error')}", file=sys.stderr, flush=True)
    for r in rows:                        # against eager fp32 at the same load, first --threads setting
        eager = next((e for e in rows if e["kind"] == "train" and e.get("images_per_s") and not e.get("compile")
                      and e.get("kernels") == "torch" and e.get("amp") == "off" and e.get("threads") == threads[0]
                      and e["load"] == r["load"]), None)
        r["ratio_vs_eager"] = r["images_per_s"] / eager["images_per_s"] if eager and r.get("images_per_s") else None
        r["baseline"] = f"train eager/torch/amp off, threads {threads[0]}, load {r['load']}"
    print(f"\n## train | preset {args.preset}, data {data} (end_to_end) | baseline: eager fp32 step, threads "
          f"{threads[0]}, same load")
    print(f"{'kind':<11} {'loader':<12} {'compile':<8} {'kernels':<8} {'amp':<5} {'threads':<13} {'load':>4} "
          f"{'images/s':>9} {'x eager':>8} {'compile s':>9} {'data wait':>9}")
    for r in rows:
        ips = f"{r['images_per_s']:.0f}" if r.get("images_per_s") else "failed"
        ratio = f"{r['ratio_vs_eager']:.2f}x" if r.get("ratio_vs_eager") else "-"
        wait = f"{r['data_wait_frac']:.0%}" if r.get("data_wait_frac") is not None else "-"
        thr = f"{r.get('threads')}({r.get('num_threads', '?')})"
        print(f"{r['kind']:<11} {str(r.get('loader') or '-'):<12} {str(bool(r.get('compile'))):<8} "
              f"{str(r.get('kernels')):<8} {str(r.get('amp')):<5} {thr:<13} {r['load']:>4} {ips:>9} {ratio:>8} "
              f"{r.get('compile_s', '-'):>9} {wait:>9}"
              + (f"  (compile cache {r['compile_cache']})" if r.get("compile_cache") else "")
              + (f"  ({r['error']})" if r.get("error") else ""))
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--loaders", default="", help="comma-separated (default: every available loader); "
                   "torchvision-tensor = the torchvision loader's uint8-tensor pipeline")
    p.add_argument("--data", default="synthetic128,synthetic", help=f"comma-separated, one table each: {DATA_SOURCES}")
    p.add_argument("--cache-dir", default=".cache")
    p.add_argument("--size", type=int, default=128, help="training size of the loader rows")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--batches", type=int, default=8, help="batches per timed epoch")
    p.add_argument("--passes", type=int, default=3, help="timed epochs (median reported)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--augment", choices=("both", "on", "off"), default="both")
    p.add_argument("--aug", action="append", default=[], metavar="FIELD=VALUE",
                   help="AugmentSpec override for the loader rows, repeatable: --aug resize=rrc")
    p.add_argument("--feed", type=float, default=12000.0, help="images/s the step consumes (12000: an H200 on the "
                   "report's model): the feed table's host cores = feed x host CPU s/image")
    p.add_argument("--load", type=int, default=0, help="also measure every row under N busy-loop processes")
    p.add_argument("--json", default="", help="write the rows here as a JSON list (benchmarks/results/DATE-...)")
    p.add_argument("--train", action="store_true", help="also measure training and end-to-end rows")
    p.add_argument("--preset", default="cpu-demo", help="engine preset for the --train rows")
    p.add_argument("--train-compile", choices=("both", "off", "on"), default="both",
                   help="--train rows: eager and compiled steps, or only one of them")
    p.add_argument("--steps", type=int, default=10, help="steps per timed pass of a train row")
    p.add_argument("--repeats", type=int, default=1, help="fresh-process runs of each row, interleaved "
                   "(the row is the median run)")
    p.add_argument("--threads", default="engine", help="--train rows' intra-op thread settings, comma-separated: "
                   "engine (configure_threads, passive OpenMP wait), torch (torch's defaults), cores-workers, or N")
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
        # as libgomp reads it when torch loads (importing engine later sets a default)
        args.wait_policy = os.environ.get("OMP_WAIT_POLICY", "default")
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

    import torch
    from loaders.base import available_loaders
    from loaders.common import ConfigError
    sources = [d for d in args.data.split(",") if d]
    for d in sources:                                # ingest once, before any timing
        try:
            open_data(d, args.cache_dir)
        except ConfigError as e:
            raise SystemExit(f"error: {e}") from None
    names = [n for n in args.loaders.split(",") if n] or available_loaders()
    if BASELINE not in names:
        names.insert(0, BASELINE)                    # the baseline every ratio is against
    loads = [0, args.load] if args.load > 0 else [0]
    if os.environ.get("OMP_NUM_THREADS") and args.train and len(args.threads.split(",")) > 1:
        print(f"note: OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} is set: the engine setting uses it and torch's "
              "default follows it; unset it to compare thread settings", file=sys.stderr)
    info = machine()
    print(f"# {info['machine']} | torch {info['torch']} | {info.get('gpu', 'no GPU')} | commit {info['commit']} | "
          f"load average {os.getloadavg()[0]:.1f} | batch {args.batch_size} x {args.batches}, median of "
          f"{args.passes} | --load {args.load}", flush=True)
    rows = []
    for d in sources if "loader" in args.rows else ():
        rows += loader_rows(args, names, d, loads, info)
    feed_columns(rows, args.feed, torch.cuda.is_available() and args.device in ("auto", "cuda"))
    for d in sources if rows else ():
        print_tables(rows, args, d)
    if args.rows & {"train", "end_to_end"}:
        rows += train_rows(args, [n for n in names if n != "torchvision-tensor"], loads, info)
    if args.json:
        from loaders.common import atomic_write
        atomic_write(args.json, json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
