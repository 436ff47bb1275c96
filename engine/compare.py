"""`python -m engine.compare`: the report's architecture comparison (its Figure 5).

    python -m engine.compare --models vgg,deep,dropout,nodropout_concat --preset cpu-demo --target-acc 0.6

Trains each model under the same budget (the preset's schedule, data, loader and every
other flag, which are passed through to `engine.train`), then writes to
runs/compare-<time>/: `compare.csv` and `compare.json` (params, forward FLOPs per image,
best val accuracy, time to the target accuracy, training images/s) and `compare.png`
(accuracy bars, images/s and params beside them). Each model's own run folder is kept
under it.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from pathlib import Path

from engine.config import config_from_args
from engine.metrics import read_csv, save_figure
from engine.models import build_model, count_params, forward_flops
from engine.train import Trainer
from loaders.common import ConfigError, atomic_write

COLUMNS = ("model", "params", "gflops_per_image", "best_val_acc", "time_to_target_s", "images_per_s", "wall_s")


def plot(rows: list[dict], path: Path, target: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [r["model"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    panels = (("best_val_acc", "best validation accuracy"), ("images_per_s", "training images/s"),
              ("params", "parameters"))
    for ax, (key, title) in zip(axes, panels):
        vals = [r[key] or 0 for r in rows]
        bars = ax.bar(names, vals, color=[f"C{i}" for i in range(len(rows))])
        ax.bar_label(bars, labels=[f"{v:.3f}" if key == "best_val_acc" else f"{v:,.0f}" for v in vals], fontsize=8)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=20)
    if target:
        axes[0].axhline(target, ls="--", color="grey", label=f"target {target:.0%}")
        axes[0].legend()
    save_figure(fig, path)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m engine.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="vgg,deep,dropout,nodropout_concat",
                   help="comma-separated model names (engine.models)")
    args, rest = p.parse_known_args(argv)
    try:
        base, _ = config_from_args(rest)
        out = Path(base.out) / (base.name or f"compare-{time.strftime('%Y%m%d-%H%M%S')}")
        rows = []
        for model in [m for m in args.models.split(",") if m]:
            net = build_model(model, width=base.width)
            cfg, _ = config_from_args(rest + ["--model", model, "--out", str(out), "--name", model])
            summary = Trainer(cfg).run()
            reached = summary.get("time_to_target") or {}
            ips = sorted(float(r["images_per_s"]) for r in read_csv(Path(summary["run"]) / "metrics.csv"))
            rows.append(dict(model=model, params=count_params(net),
                             gflops_per_image=round(forward_flops(net, cfg.size) / 1e9, 4),
                             best_val_acc=summary["best_val_acc"], time_to_target_s=reached.get("seconds"),
                             images_per_s=ips[len(ips) // 2] if ips else None, wall_s=summary["wall_s"]))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write(out / "compare.csv", buf.getvalue())
    atomic_write(out / "compare.json", json.dumps(rows, indent=2))
    plot(rows, out / "compare.png", base.target_acc)
    print(buf.getvalue().rstrip())
    print(f"comparison written to {out}")
    return rows


if __name__ == "__main__":
    main()
