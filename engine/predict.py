"""`python -m engine.predict`: the top-k classes of images, with a trained run's model.

    python -m engine.predict runs/NAME photo.jpg more/ --top-k 3 [--json]

Each image gets the run's evaluation preprocessing (engine/inference.py), batches of
--batch-size go through the chosen checkpoint's model on --device (auto: CUDA if present),
and the softmax of the logits gives the probabilities. Output: one line per image,
`PATH  CLASS PROB  CLASS PROB ...`, best first (class names from the run); with --json one
document {run, checkpoint, device, predictions: [{path, top: [{class, index, prob}]}]}. The
checkpoint and device used end the output on stderr in text mode.
Folders are walked recursively (sorted, hidden entries skipped) for the extensions
loaders/datasets.py accepts; a file named on the command line is read whatever its extension.
Unreadable images: a file named on the command line is an error (one line naming it, exit 2;
missing files are found before the first batch, undecodable ones when their batch is read, so lines
already printed stand); a file found in a folder is skipped with a `warning:` line on stderr
naming it, and the rest go on.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from engine.inference import (TrainedRun, UnreadableImage, cli_errors, load_run, parser, preprocess, read_image,
                              run_logits)
from loaders.common import ConfigError
from loaders.datasets import IMAGE_EXTENSIONS, _walk_class


def image_files(args: list[str]) -> list[tuple[Path, bool]]:
    """(path, named on the command line) for every image the arguments name or hold."""
    out = []
    for a in args:
        p = Path(a)
        if p.is_dir():
            found, _, bad = _walk_class(str(p), 0, frozenset())     # root_len 0: full paths
            for path, reason in bad:
                print(f"warning: skipping {path}: {reason}", file=sys.stderr, flush=True)
            if not found:
                raise ConfigError(f"{a}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder; "
                                  "pass images or a folder holding some")
            out += [(Path(f), False) for f in found]
        elif p.is_file():
            out.append((p, True))
        else:
            raise ConfigError(f"{a}: no such image file or folder; pass image files or folders")
    return out


def predict(run: TrainedRun, files: list[tuple[Path, bool]], top_k: int, batch_size: int):
    """Yield (path, [(class index, probability), ...]) for the readable images, best first."""
    transform = preprocess(run.spec)
    k = min(top_k, len(run.classes))
    for start in range(0, len(files), batch_size):
        paths, xs = [], []
        for path, named in files[start:start + batch_size]:
            try:
                xs.append(transform(read_image(path)))
            except UnreadableImage as e:
                if named:
                    raise
                print(f"warning: {e.brief}; skipped", file=sys.stderr, flush=True)
                continue
            paths.append(path)
        if not xs:
            continue
        probs = torch.softmax(run_logits(run, torch.stack(xs))[0], dim=1).cpu()
        top = probs.topk(k, dim=1)
        for path, values, indices in zip(paths, top.values.tolist(), top.indices.tolist()):
            yield path, list(zip(indices, values))


def main(argv=None) -> list[dict]:
    p = parser("python -m engine.predict", __doc__.split("\n\n")[0])
    p.add_argument("images", nargs="+", help="image files and/or folders of images")
    p.add_argument("--top-k", type=int, default=5, help="classes shown per image (default 5)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda[:N]")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text lines")
    with cli_errors():
        args = p.parse_args(argv)
        for flag, v in (("--top-k", args.top_k), ("--batch-size", args.batch_size)):
            if v < 1:
                raise ConfigError(f"{flag} {v}: must be >= 1; e.g. {flag} 5")
        run = load_run(args.run, args.checkpoint, args.device)
        files = image_files(args.images)
        results = []
        for path, top in predict(run, files, args.top_k, args.batch_size):
            results.append(dict(path=str(path), top=[dict({"class": run.classes[i]}, index=i, prob=pr)
                                                     for i, pr in top]))
            if not args.json:
                print(f"{path}  " + "  ".join(f"{run.classes[i]} {pr:.4f}" for i, pr in top), flush=True)
    if not args.json:
        print(f"{len(results)} image(s) with {run.checkpoint} on {run.device}", file=sys.stderr, flush=True)
    else:
        print(json.dumps(dict(run=str(run.folder), checkpoint=str(run.checkpoint), device=str(run.device),
                              predictions=results), indent=2))
    return results


if __name__ == "__main__":
    main()
