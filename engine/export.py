"""`python -m engine.export`: a trained run's model as a file that loads without this project.

    python -m engine.export runs/NAME --format onnx|torchscript|safetensors [--out PATH] [--checkpoint best]

The model is exported in eval mode, float32, on the CPU, with the fused kernels as their
pure-torch reference ops (kernels.use_backend("torch")). Input: the normalised float32 NCHW
batch of the run's preprocessing; output: logits.
- onnx: torch.onnx.export's torch.export-based exporter (the TorchScript-based one is
  deprecated), input "input" and output "logits" with a dynamic batch axis; metadata in
  metadata_props. Needs onnx + onnxscript; checked with onnxruntime when installed.
- torchscript: torch.jit.trace, deprecated in torch 2.14 but working (its warning is silenced);
  torch.jit.load(PATH) needs torch only; metadata as the extra file "fasttrain.json".
- safetensors: the state dict, metadata under the header key "fasttrain"; rebuild with
  engine.models.build_model(model, passthrough, width, num_classes) + load_state_dict.
Every format also gets PATH.json beside it (model, width, classes, size/mean/std, run,
checkpoint). Before the file is renamed into place it is loaded back and its logits on a
batch of 3 (the export traced 2) compared with PyTorch's: |diff| <= ATOL + RTOL * |logit|,
printed; a larger difference is an error (exit 1) and nothing is written.
"""
from __future__ import annotations

import contextlib
import io
import json
import sys
import warnings
from pathlib import Path

import torch

import kernels
from engine.inference import TrainedRun, cli_errors, load_run, parser
from engine.models import build_model
from loaders.common import ConfigError, atomic_path, atomic_write

FORMATS = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt", "safetensors": "model.safetensors"}
ATOL = RTOL = 1e-4
META_KEY = "fasttrain"


class CheckFailed(RuntimeError):
    """The exported file's logits differ from PyTorch's beyond the tolerance."""


def _require(*modules: str) -> None:
    import importlib.util
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"this format needs {', '.join(missing)}, not installed here; "
                          "pip install -e '.[export]'")


def _example(run: TrainedRun, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    return torch.randn(n, 3, run.spec.size, run.spec.size, generator=g)


def _export_onnx(run: TrainedRun, path: Path, meta: dict) -> None:
    _require("onnx", "onnxscript")
    import onnx
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")        # the exporter's progress lines and notes
        torch.onnx.export(run.model, (_example(run, 2),), str(path), dynamo=True, external_data=False,
                          input_names=["input"], output_names=["logits"],
                          dynamic_shapes=({0: torch.export.Dim("batch")},))
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, {META_KEY: json.dumps(meta), "classes": json.dumps(meta["classes"]),
                                        **{k: json.dumps(v) for k, v in meta["preprocessing"].items()
                                           if k in ("size", "mean", "std")}})
    onnx.save(proto, str(path))


def _run_onnx(path: Path, x: torch.Tensor) -> torch.Tensor | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["logits"], {"input": x.numpy()})[0])


def _export_torchscript(run: TrainedRun, path: Path, meta: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")        # "torch.jit.trace is deprecated" (torch 2.14)
        traced = torch.jit.trace(run.model, _example(run, 2), check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={f"{META_KEY}.json": json.dumps(meta)})


def _run_torchscript(path: Path, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")        # "torch.jit.load is deprecated"
        return torch.jit.load(str(path), map_location="cpu")(x)


def _export_safetensors(run: TrainedRun, path: Path, meta: dict) -> None:
    _require("safetensors")
    from safetensors.torch import save_file
    state = {k: v.detach().cpu().contiguous() for k, v in run.model.state_dict().items()}
    save_file(state, str(path), metadata={META_KEY: json.dumps(meta)})


def _run_safetensors(path: Path, x: torch.Tensor) -> torch.Tensor:
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()[META_KEY])
    model = build_model(meta["model"], passthrough=meta["passthrough"], width=meta["width"],
                        num_classes=meta["num_classes"])
    model.load_state_dict(load_file(str(path)))
    with torch.no_grad():
        return model.eval()(x)


EXPORTERS = {"onnx": (_export_onnx, _run_onnx), "torchscript": (_export_torchscript, _run_torchscript),
             "safetensors": (_export_safetensors, _run_safetensors)}


def export(run: TrainedRun, fmt: str, out: Path) -> str:
    """Write `run`'s model to `out` in `fmt` (and out.json); return the check's one-line result."""
    write, read_back = EXPORTERS[fmt]
    meta = dict(run.metadata(), format=fmt, input="input", output="logits", torch=torch.__version__)
    run.model.to(memory_format=torch.contiguous_format)
    x = _example(run, 3)
    with kernels.use_backend("torch"):
        with torch.no_grad():
            ref = run.model(x)
        with atomic_path(out) as tmp:
            write(run, tmp, meta)
            got = read_back(tmp, x)
            if got is None:
                check = "not checked: onnxruntime is not installed (pip install onnxruntime)"
            else:
                diff = (got - ref).abs()
                check = (f"max |logit diff| {diff.max().item():.2e} on a batch of 3 "
                         f"(tolerance {ATOL:g} + {RTOL:g} * |logit|)")
                if not bool((diff <= ATOL + RTOL * ref.abs()).all()):
                    raise CheckFailed(f"{fmt} export of {run.checkpoint}: {check} exceeded; nothing written")
    atomic_write(Path(f"{out}.json"), json.dumps(meta, indent=2))
    return check


def main(argv=None) -> Path:
    p = parser("python -m engine.export", __doc__.split("\n\n")[0])
    p.add_argument("--format", required=True, help=f"one of {', '.join(FORMATS)}")
    p.add_argument("--out", default=None, help="file to write (a folder: FILE inside it); default "
                   f"<run>/{{{', '.join(FORMATS.values())}}}")
    with cli_errors():
        args = p.parse_args(argv)
        if args.format not in FORMATS:
            raise ConfigError(f"--format {args.format!r}: unknown; use one of {', '.join(FORMATS)}")
        run = load_run(args.run, args.checkpoint, "cpu")
        out = Path(args.out) if args.out else run.folder / FORMATS[args.format]
        if out.is_dir():
            out = out / FORMATS[args.format]
        try:
            check = export(run, args.format, out)
        except CheckFailed as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(1) from None
        except OSError as e:
            raise ConfigError(f"--out {out}: cannot write ({e.strerror or e}); pass a writable path") from None
    print(f"{args.format}: {out} (+ {out.name}.json) from {run.checkpoint}")
    print(f"check: {check}")
    return out


if __name__ == "__main__":
    main()
