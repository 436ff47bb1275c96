"""metrics.csv (one row per epoch), curves.png (the report's four panels, a colour per stage)
and, with --log tensorboard, TensorBoard events with the same scalars."""
from __future__ import annotations

import csv
import io
from pathlib import Path

from loaders.common import atomic_path, atomic_write

COLUMNS = ("stage", "epoch", "lr", "mixup_alpha", "train_loss", "train_acc", "val_loss", "val_acc",
           "images_per_s", "seconds")


def write_csv(rows: list[dict], path: Path) -> None:
    """Rewrites the whole file atomically: a kill never leaves half a row."""
    extra = sorted({k for r in rows for k in r} - set(COLUMNS))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS) + extra, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write(path, buf.getvalue())


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def save_figure(fig, path: Path) -> None:
    """A matplotlib figure as a PNG, written atomically, then closed."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def plot_curves(rows: list[dict], path: Path, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("train_loss", "Training loss"), ("train_acc", "Training accuracy"),
              ("val_loss", "Validation loss"), ("val_acc", "Validation accuracy"))
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    stages = list(dict.fromkeys(r["stage"] for r in rows))
    for ax, (key, label) in zip(axes.flat, panels):
        for i, stage in enumerate(stages):
            pts = [(n + 1, float(r[key])) for n, r in enumerate(rows) if r["stage"] == stage]
            ax.plot(*zip(*pts), marker="o", ms=3, color=f"C{i}", label=stage)
        ax.set_title(label)
        ax.set_xlabel("epoch (all stages)")
        ax.grid(alpha=0.3)
    axes[0, 0].legend()
    if title:
        fig.suptitle(title)
    save_figure(fig, path)


class TensorBoardLog:
    """Every numeric column of a metrics row as a scalar (train/..., val/..., and the rest:
    lr, data_wait_frac, images_per_s, ...), indexed by the run's epoch number. Needs the
    `tensorboard` package (pip install -e .[tensorboard])."""

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(log_dir))

    def add_row(self, row: dict, epoch: int) -> None:
        for k, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch":
                group = k.split("_", 1)[0] if k.startswith(("train_", "val_")) else "run"
                self.writer.add_scalar(f"{group}/{k}", v, epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
