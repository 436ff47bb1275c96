"""Do the fast loaders cost accuracy? The same preset, data and epochs with every loader and
several seeds; final validation accuracy (mean and spread over seeds), time and images/s.

    python -m benchmarks.parity --preset cpu-cifar --epochs 2,0,0,0 --seeds 0,1,2
    python -m benchmarks.parity --loaders torchvision,dali --engine-args "--width 0.125"

Each (loader, seed) is one `engine.train` run in a fresh subprocess, run one after another
(the loaders share the cores, so they never run at once). Verdict per loader: its mean final
accuracy lies within the torchvision reference's seed range widened by the loader's own
spread (the two ranges overlap), or not. Writes parity.json, parity.csv and parity.png
(accuracy per seed and mean, images/s) into --out; the table is printed.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ("loader", "seeds", "final_acc_mean", "final_acc_min", "final_acc_max", "best_acc_mean",
           "images_per_s", "wall_s", "within_reference_range")


def run_one(args, loader: str, seed: int, out: Path) -> dict:
    name = f"{loader}-seed{seed}"
    cmd = [sys.executable, "-m", "engine.train", "--preset", args.preset, "--loader", loader, "--seed", str(seed),
           "--epochs", args.epochs, "--out", str(out / "runs"), "--name", name, "--cache-dir", args.cache_dir,
           *shlex.split(args.engine_args)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        return dict(loader=loader, seed=seed, error=(r.stderr.strip().splitlines() or ["?"])[-1], wall_s=wall)
    run = out / "runs" / name
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    summary = json.loads((run / "summary.json").read_text())
    images = sum(float(x["images_per_s"]) * float(x["seconds"]) for x in rows)
    return dict(loader=loader, seed=seed, final_acc=float(rows[-1]["val_acc"]), best_acc=summary["best_val_acc"],
                images_per_s=images / sum(float(x["seconds"]) for x in rows), wall_s=wall,
                train_eval_s=summary["train_eval_s"])


def summarise(runs: list[dict]) -> list[dict]:
    by: dict[str, list[dict]] = {}
    for r in runs:
        by.setdefault(r["loader"], []).append(r)
    table = []
    for loader, rs in by.items():
        ok = [r for r in rs if "final_acc" in r]
        if not ok:
            table.append(dict(loader=loader, seeds=0, error=rs[0].get("error")))
            continue
        acc = [r["final_acc"] for r in ok]
        table.append(dict(loader=loader, seeds=len(ok), final_acc_mean=statistics.mean(acc),
                          final_acc_min=min(acc), final_acc_max=max(acc),
                          best_acc_mean=statistics.mean(r["best_acc"] for r in ok),
                          images_per_s=statistics.median(r["images_per_s"] for r in ok),
                          wall_s=statistics.median(r["wall_s"] for r in ok)))
    ref = next((t for t in table if t["loader"] == "torchvision" and t.get("seeds")), None)
    for t in table:
        if ref and t.get("seeds"):
            # overlap of the two seed ranges: the loader's runs are indistinguishable from the
            # reference's at this number of seeds
            t["within_reference_range"] = t["final_acc_min"] <= ref["final_acc_max"] and \
                ref["final_acc_min"] <= t["final_acc_max"]
    return table


def plot(runs: list[dict], table: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from engine.metrics import save_figure
    names = [t["loader"] for t in table if t.get("seeds")]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for i, name in enumerate(names):
        accs = [r["final_acc"] for r in runs if r["loader"] == name and "final_acc" in r]
        a.scatter([i] * len(accs), accs, color=f"C{i}", alpha=0.6)
        a.errorbar([i], [statistics.mean(accs)], yerr=[[statistics.mean(accs) - min(accs)],
                                                         [max(accs) - statistics.mean(accs)]],
                   fmt="_", ms=20, color=f"C{i}", capsize=6)
    a.set_xticks(range(len(names)), names)
    a.set_title("final validation accuracy (each seed, mean and range)")
    ips = [next(t["images_per_s"] for t in table if t["loader"] == n) for n in names]
    bars = b.bar(names, ips, color=[f"C{i}" for i in range(len(names))])
    b.bar_label(bars, labels=[f"{v:,.0f}" for v in ips])
    b.set_title("training images/s (loader + step)")
    fig.suptitle(title)
    save_figure(fig, path)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.parity", description=__doc__.split("\n\n")[0])
    p.add_argument("--loaders", default="", help="comma-separated (default: every available loader)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--preset", default="cpu-cifar")
    p.add_argument("--epochs", default="2,0,0,0", help="the epoch budget, one count per stage")
    p.add_argument("--engine-args", default="", help="more engine.train flags for every run")
    p.add_argument("--cache-dir", default=".cache")
    p.add_argument("--out", default="", help="output folder (default runs/parity-<time>)")
    args = p.parse_args(argv)
    from loaders.base import available_loaders
    names = [n for n in args.loaders.split(",") if n] or available_loaders()
    if "torchvision" not in names:
        names.insert(0, "torchvision")          # the reference every verdict is against
    seeds = [int(s) for s in args.seeds.split(",") if s]
    out = Path(args.out or f"runs/parity-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in seeds:                             # seeds outermost: drift hits every loader alike
        for loader in names:
            runs.append(run_one(args, loader, seed, out))
            r = runs[-1]
            print(f"  {loader} seed {seed}: " + (f"final {r['final_acc']:.4f}, {r['images_per_s']:.0f} img/s, "
                                                 f"{r['wall_s']:.0f} s" if "final_acc" in r else r["error"]),
                  file=sys.stderr, flush=True)
    table = summarise(runs)
    from benchmarks.throughput import machine
    info = machine()
    print(f"# {info['machine']} | torch {info['torch']} | commit {info['commit']} | preset {args.preset} "
          f"--epochs {args.epochs} {args.engine_args} | seeds {args.seeds}")
    print(f"{'loader':<12} {'final acc mean':>14} {'min..max':>15} {'best mean':>10} {'images/s':>9} "
          f"{'wall s':>7}  within reference range")
    for t in table:
        if not t.get("seeds"):
            print(f"{t['loader']:<12} failed: {t.get('error')}")
            continue
        print(f"{t['loader']:<12} {t['final_acc_mean']:>14.4f} {t['final_acc_min']:>7.4f}..{t['final_acc_max']:.4f} "
              f"{t['best_acc_mean']:>10.4f} {t['images_per_s']:>9.0f} {t['wall_s']:>7.0f}  "
              f"{t.get('within_reference_range', '-')}")
    from loaders.common import atomic_write
    atomic_write(out / "parity.json", json.dumps(dict(machine=info, args=vars(args), runs=runs, table=table), indent=2))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(table)
    atomic_write(out / "parity.csv", buf.getvalue())
    plot(runs, table, out / "parity.png", f"{args.preset}, --epochs {args.epochs}, seeds {args.seeds}")
    print(f"written: {out / 'parity.json'}, {out / 'parity.csv'}, {out / 'parity.png'}")
    return table


if __name__ == "__main__":
    main()
