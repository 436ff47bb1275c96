"""`python -m engine.evaluate`: accuracy, per-class accuracy and confusion matrix of a trained run.

    python -m engine.evaluate runs/NAME [--data SOURCE] [--split val|train] [--tta] [--loader torchvision]

Data: the run's own --data (or --data), read through loaders.datasets with the run's cache
folder, and its validation split (or --split train), through the run's loader (or --loader:
e.g. torchvision where the run's DALI is absent) built for evaluation: resize + normalise,
every image once, in order. The dataset's classes must be the run's, in the same order.
--tta averages the logits of each image and its horizontal mirror, as training's evaluation
did; the plain accuracy is reported beside it. The model runs in float32 (engine/inference.py),
so figures can differ in the last digits from a val_acc that training logged under autocast.
Prints per class: images, correct, accuracy; the overall accuracy; the confusion matrix (rows:
true class, columns: predicted) up to 20 classes. Writes evaluation-<split>[-tta].json (all of
it) and .png (the row-normalised matrix) into the run folder; an unwritable folder is a warning.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from engine.inference import TrainedRun, class_list, cli_errors, load_run, parser, run_logits
from engine.metrics import save_figure
from loaders.base import LoaderOptions, build_loader
from loaders.common import ConfigError, atomic_write
from loaders.datasets import load_dataset

MAX_PRINTED = 20                 # classes up to which the matrix is printed and annotated


def confusion(run: TrainedRun, loader, tta: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(confusion matrix of the reported logits, of the plain logits): [true, predicted] counts."""
    n = len(run.classes)
    cms = [torch.zeros(n * n, dtype=torch.int64, device=run.device) for _ in range(2)]
    for x, y in loader:
        plain, reported = run_logits(run, x, tta)
        for cm, lg in zip(cms, (reported, plain)):
            cm += torch.bincount(y.to(run.device) * n + lg.argmax(1), minlength=n * n)
    return cms[0].view(n, n).cpu(), cms[1].view(n, n).cpu()


def report(run: TrainedRun, cm: torch.Tensor, plain: torch.Tensor, meta: dict) -> dict:
    total, correct = int(cm.sum()), int(cm.diag().sum())
    per_class = [dict({"class": c}, images=int(cm[i].sum()), correct=int(cm[i, i]),
                      accuracy=float(cm[i, i] / cm[i].sum()) if cm[i].sum() else None)
                 for i, c in enumerate(run.classes)]
    out = dict(meta, images=total, correct=correct, accuracy=correct / total, classes=list(run.classes),
               per_class=per_class, confusion=cm.tolist())
    if meta["tta"]:
        out["accuracy_plain"] = int(plain.diag().sum()) / total
    return out


def table(res: dict) -> str:
    width = max(5, *(len(c) for c in res["classes"]))
    lines = [f"{'class':<{width}}  images  correct  accuracy"]
    for r in res["per_class"]:
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.4f}"
        lines.append(f"{r['class']:<{width}}  {r['images']:>6}  {r['correct']:>7}  {acc:>8}")
    plain = f"  (with --tta; without: {res['accuracy_plain']:.4f})" if res["tta"] else ""
    lines.append(f"accuracy {res['accuracy']:.4f} ({res['correct']}/{res['images']}){plain}")
    n = len(res["classes"])
    if n <= MAX_PRINTED:
        cw = max(3, len(str(max(max(row) for row in res["confusion"]))))
        lines.append("confusion matrix (rows: true class, columns: predicted class index):")
        lines.append(" " * (width + 5) + " ".join(f"{j:>{cw}}" for j in range(n)))
        for i, row in enumerate(res["confusion"]):
            lines.append(f"{i:>3} {res['classes'][i]:<{width}} " + " ".join(f"{v:>{cw}}" for v in row))
    else:
        lines.append(f"confusion matrix ({n} classes): in the JSON and PNG")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cm = torch.tensor(res["confusion"], dtype=torch.float64)
    rates = cm / cm.sum(1, keepdim=True).clamp(min=1)
    n = len(res["classes"])
    size = min(4 + 0.4 * n, 20)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    im = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, label="fraction of the true class")
    if n <= MAX_PRINTED:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if rates[i, j] > 0.5 else "black")
    ticks = range(n) if n <= 2 * MAX_PRINTED else []
    ax.set_xticks(ticks, [res["classes"][i] for i in ticks], rotation=45, ha="right")
    ax.set_yticks(ticks, [res["classes"][i] for i in ticks])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    tta = " (tta)" if res["tta"] else ""
    ax.set_title(f"{Path(res['run']).name}, {res['data']} {res['split']}: accuracy {res['accuracy']:.4f}{tta}")
    save_figure(fig, path)


def main(argv=None) -> dict:
    p = parser("python -m engine.evaluate", __doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="data source (default: the run's own --data)")
    p.add_argument("--split", default="val", choices=("val", "train"), help="which split (default val)")
    p.add_argument("--tta", action="store_true", help="mean of the logits of each image and its mirror")
    p.add_argument("--loader", default=None, help="loader (default: the run's own --loader)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the run's --batch-size")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: the run's --workers)")
    p.add_argument("--cache-dir", default=None, help="dataset cache folder (default: the run's --cache-dir)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda[:N]")
    with cli_errors():
        args = p.parse_args(argv)
        run = load_run(args.run, args.checkpoint, args.device)
        cfg = run.cfg
        source, loader_name = args.data or cfg.data, args.loader or cfg.loader
        batch = args.batch_size if args.batch_size is not None else cfg.batch_size
        workers = args.workers if args.workers is not None else cfg.workers
        if batch < 1 or workers < 0:
            raise ConfigError(f"--batch-size {batch} / --workers {workers}: need >= 1 / >= 0; e.g. --batch-size 64")
        data = load_dataset(source, args.cache_dir or cfg.cache_dir)
        if tuple(data.classes) != run.classes:
            raise ConfigError(f"--data {source}: its classes ({class_list(data.classes)}) are not the run's "
                              f"({class_list(run.classes)}) in the same order; evaluate on data with the run's "
                              "class folders")
        split = data.val if args.split == "val" else data.train
        if len(split) == 0:
            raise ConfigError(f"--data {source}: the {args.split} split has no images; pick the other --split")
        loader = build_loader(loader_name, split, run.spec, LoaderOptions(
            train=False, batch_size=batch, device=run.device, dtype=torch.float32, seed=cfg.seed, workers=workers))
        cm, plain = confusion(run, loader, args.tta)
        res = report(run, cm, plain, dict(run=str(run.folder), checkpoint=str(run.checkpoint), data=source,
                                          split=args.split, loader=loader_name, tta=args.tta))
    print(f"{run.folder}: {run.checkpoint.name} on {source} {args.split} ({res['images']} images, "
          f"loader {loader_name}, {run.device})")
    print(table(res))
    stem = run.folder / f"evaluation-{args.split}{'-tta' if args.tta else ''}"
    try:
        atomic_write(stem.with_suffix(".json"), json.dumps(res, indent=2))
        plot(res, stem.with_suffix(".png"))
        print(f"written: {stem}.json, {stem}.png")
    except OSError as e:
        print(f"warning: cannot write {stem}.json/.png ({e.strerror or e}); the table above is the result",
              file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
