"""Using a trained run: engine.predict, engine.evaluate, engine.export (and their one-line errors).

One tiny run is trained per module (10 classes x 6 train / 2 val 32px PNGs, width 0.125, one
epoch). Every expected number is recomputed here by hand from the run folder's files
(config.json, pretraining-best.pt) with the documented preprocessing, not through
engine.inference.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from engine import evaluate, export, predict
from engine.models import build_model
from engine.train import main as train
from loaders.common import read_rgb
from loaders.datasets import load_dataset
from loaders.spec import AugmentSpec
from loaders.torchvision import reference_transform
from tests.conftest import run_cli
from tests.test_train import make_tiny_folder

ONNX_ATOL = 1e-4                 # onnxruntime vs PyTorch float32 logits (measured ~1e-6)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_folder(tmp_path_factory.mktemp("use-data"))


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
    work = tmp_path_factory.mktemp("use-run")
    train(["--preset", "cpu-demo", "--data", f"imagefolder:{tiny}", "--width", "0.125", "--epochs", "1,0,0,0",
           "--batch-size", "8", "--workers", "0", "--amp", "off", "--out", str(work / "runs"), "--name", "r",
           "--cache-dir", str(work / "cache")])
    return work / "runs" / "r"


def by_hand(run):
    """(model in eval mode, evaluation transform, classes) rebuilt from the run folder's files."""
    conf = json.loads((run / "config.json").read_text())
    c = conf["config"]
    model = build_model(c["model"], passthrough=c["passthrough"] or None, width=c["width"],
                        num_classes=len(conf["classes"]))
    model.load_state_dict(torch.load(run / "pretraining-best.pt", weights_only=False)["model"])
    spec = AugmentSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in conf["spec"].items()})
    return model.eval(), reference_transform(spec, train=False), conf["classes"]


def hand_batch(tf, paths) -> torch.Tensor:
    return torch.stack([tf(read_rgb(str(p))) for p in paths])


def hand_logits(model, x, tta=False) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
        return (out + model(x.flip(3))) / 2 if tta else out


def one_error_line(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(n in lines[0] for n in needles), lines[0]


def exit_code(fn, argv) -> int:
    with pytest.raises(SystemExit) as e:
        fn(argv)
    return e.value.code


# ---------------------------------------------------------------------------------- predict

def test_predict_images_match_hand_computed_logits(run, tiny, capsys):
    paths = [tiny / "val" / f"class{c}" / "0.png" for c in (1, 4, 8)]
    capsys.readouterr()
    res = predict.main([str(run), *map(str, paths), "--top-k", "10", "--batch-size", "2", "--device", "cpu",
                        "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["predictions"] == res and printed["checkpoint"].endswith("pretraining-best.pt")
    model, tf, classes = by_hand(run)
    probs = torch.softmax(hand_logits(model, hand_batch(tf, paths)), dim=1)
    assert [r["path"] for r in res] == list(map(str, paths))
    for r, p in zip(res, probs):
        got = [t["prob"] for t in r["top"]]
        assert sum(got) == pytest.approx(1.0, abs=1e-5)            # all 10 classes shown
        assert got == sorted(got, reverse=True)
        assert r["top"][0]["index"] == int(p.argmax()) and r["top"][0]["class"] == classes[int(p.argmax())]
        assert all(t["class"] == classes[t["index"]] for t in r["top"])
        assert got == pytest.approx(p.sort(descending=True).values.tolist(), abs=1e-5)


def test_predict_folder_skips_unreadable_files_with_a_warning(run, tiny, tmp_path, capsys):
    folder = tmp_path / "imgs"
    shutil.copytree(tiny / "val" / "class3", folder / "a")
    shutil.copy(tiny / "val" / "class5" / "1.png", folder / "b.png")
    (folder / "broken.png").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("ignored: not an image extension")
    capsys.readouterr()
    res = predict.main([str(run), str(folder), "--top-k", "2", "--device", "cpu"])
    out, err = capsys.readouterr()
    good = ["a/0.png", "a/1.png", "b.png"]
    assert [os.path.relpath(r["path"], folder) for r in res] == good
    assert len(out.strip().splitlines()) == 3 and all(len(r["top"]) == 2 for r in res)
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "broken.png" in warnings[0]


def test_unreadable_named_image_exits_2_with_one_line(run, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    capsys.readouterr()
    assert exit_code(predict.main, [str(run), str(bad), "--device", "cpu"]) == 2
    one_error_line(capsys.readouterr().err, "cannot read image", str(bad))
    assert exit_code(predict.main, [str(run), str(tmp_path / "missing.png")]) == 2
    one_error_line(capsys.readouterr().err, "missing.png")


# ---------------------------------------------------------------------------------- evaluate

@pytest.mark.parametrize("tta", [False, True])
def test_evaluate_matches_hand_accuracy_and_writes_png_json(run, tiny, capsys, tta):
    res = evaluate.main([str(run), "--workers", "0", "--batch-size", "7", "--device", "cpu"]
                        + (["--tta"] if tta else []))
    out = capsys.readouterr().out
    data = load_dataset(f"imagefolder:{tiny}", run.parent.parent / "cache")
    model, tf, classes = by_hand(run)
    x, y = hand_batch(tf, data.val.paths), torch.tensor(data.val.labels)
    pred = hand_logits(model, x, tta).argmax(1)
    assert res["images"] == len(y) == 20 and res["classes"] == classes
    assert res["accuracy"] == pytest.approx((pred == y).float().mean().item())
    cm = np.array(res["confusion"])
    assert cm.sum() == 20 and (cm.sum(1) == np.bincount(y.numpy(), minlength=10)).all()
    for i, r in enumerate(res["per_class"]):
        assert r["class"] == classes[i] and r["images"] == cm[i].sum() and r["correct"] == cm[i, i]
        assert r["accuracy"] == pytest.approx(cm[i, i] / cm[i].sum())
        assert r["accuracy"] == pytest.approx((pred[y == i] == i).float().mean().item())
    stem = run / f"evaluation-val{'-tta' if tta else ''}"
    assert json.loads(stem.with_suffix(".json").read_text()) == res
    assert stem.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"accuracy {res['accuracy']:.4f}" in out and "confusion matrix" in out
    if tta:
        assert res["accuracy_plain"] == pytest.approx((hand_logits(model, x).argmax(1) == y).float().mean().item())


def test_evaluate_refuses_data_with_other_classes(run, tmp_path, capsys):
    for split in ("train", "val"):
        for name in ("cat", "dog"):
            (tmp_path / "other" / split / name).mkdir(parents=True)
            Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "other" / split / name / "0.png")
    capsys.readouterr()
    assert exit_code(evaluate.main, [str(run), "--data", f"imagefolder:{tmp_path / 'other'}", "--workers", "0",
                                     "--cache-dir", str(tmp_path / "cache")]) == 2
    one_error_line(capsys.readouterr().err, "classes", "cat, dog")


# ---------------------------------------------------------------------------------- export

def test_export_onnx_matches_pytorch_in_onnxruntime(run, tiny, tmp_path, capsys):
    for mod in ("onnx", "onnxscript", "onnxruntime"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is not installed (pip install -e '.[export]')")
    import onnx
    import onnxruntime as ort
    out = export.main([str(run), "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    assert "check: max |logit diff|" in capsys.readouterr().out
    model, tf, classes = by_hand(run)
    x = hand_batch(tf, sorted((tiny / "val").glob("class*/*.png"))[:5])    # a batch size the export never saw
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, hand_logits(model, x).numpy(), atol=ONNX_ATOL, rtol=0)
    proto = onnx.load(str(out))
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["classes"]) == classes and json.loads(props["size"]) == 32
    assert json.loads(props["fasttrain"])["preprocessing"]["mean"] == pytest.approx([125 / 255, 124 / 255, 115 / 255])
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param          # dynamic batch axis
    assert json.loads((tmp_path / "m.onnx.json").read_text())["classes"] == classes


def test_export_torchscript_loads_with_plain_torch(run, tiny, tmp_path):
    out = export.main([str(run), "--format", "torchscript", "--out", str(tmp_path)])
    assert out == tmp_path / "model.torchscript.pt"
    model, tf, classes = by_hand(run)
    x = hand_batch(tf, sorted((tiny / "val").glob("class*/*.png"))[:4])
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import json, sys, torch\n"
        "extra = {'fasttrain.json': ''}\n"
        "m = torch.jit.load('model.torchscript.pt', _extra_files=extra)\n"
        "torch.save(m(torch.load('x.pt')), 'y.pt')\n"
        "assert not {'engine', 'kernels', 'loaders'} & set(sys.modules), 'imported this repo'\n"
        "print(json.dumps(json.loads(extra['fasttrain.json'])['classes']))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == classes
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), hand_logits(model, x), atol=1e-5, rtol=0)


def test_export_safetensors_rebuilds_identical_weights(run, tiny, tmp_path):
    if importlib.util.find_spec("safetensors") is None:
        pytest.skip("safetensors is not installed (pip install -e '.[export]')")
    from safetensors.torch import load_file
    out = export.main([str(run), "--format", "safetensors", "--out", str(tmp_path / "w.safetensors")])
    meta = json.loads((tmp_path / "w.safetensors.json").read_text())
    state = load_file(str(out))
    saved = torch.load(run / "pretraining-best.pt", weights_only=False)["model"]
    assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k].cpu()) for k in saved)
    rebuilt = build_model(meta["model"], passthrough=meta["passthrough"], width=meta["width"],
                          num_classes=len(meta["classes"]))
    rebuilt.load_state_dict(state)
    model, tf, classes = by_hand(run)
    assert meta["classes"] == classes and meta["preprocessing"]["size"] == 32
    x = hand_batch(tf, sorted((tiny / "val").glob("class*/*.png"))[:3])
    assert torch.equal(hand_logits(rebuilt.eval(), x), hand_logits(model, x))


# ---------------------------------------------------------------------------------- errors

def test_run_without_checkpoint_exits_2_with_one_line(run, tmp_path):
    empty = tmp_path / "nock"
    empty.mkdir()
    shutil.copy(run / "config.json", empty)
    r = run_cli("-m", "engine.predict", str(empty), str(tmp_path), timeout=120)
    assert r.returncode == 2
    one_error_line(r.stderr, str(empty), "no checkpoint")


def test_bad_run_folder_checkpoint_and_format_are_one_line_errors(run, tmp_path, capsys):
    torch.save({"model": build_model("vgg", width=0.125, num_classes=10).state_dict()}, tmp_path / "other.pt")
    cases = [
        (evaluate.main, [str(tmp_path)], ("no config.json",)),
        (export.main, [str(run), "--format", "onnx", "--checkpoint", str(tmp_path / "other.pt")],
         ("does not match the run's model", "other.pt")),
        (export.main, [str(run), "--format", "tflite"], ("--format 'tflite'", "onnx, torchscript, safetensors")),
        (export.main, [str(run)], ("--format",)),
    ]
    capsys.readouterr()
    for fn, argv, needles in cases:
        assert exit_code(fn, argv) == 2, argv
        one_error_line(capsys.readouterr().err, *needles)


def test_best_checkpoint_is_the_best_epochs_stage(tmp_path):
    from engine.inference import checkpoint_path
    for stage in ("pretraining", "finetuning1", "finetuning2"):
        (tmp_path / f"{stage}-best.pt").touch()
    (tmp_path / "last.pt").touch()
    assert checkpoint_path(tmp_path, "best").name == "finetuning2-best.pt"        # nothing says which: the last
    (tmp_path / "metrics.csv").write_text("stage,epoch,val_acc\npretraining,1,0.5\npretraining,2,0.8\n"
                                          "finetuning1,1,0.8\nfinetuning2,1,0.7\n")
    assert checkpoint_path(tmp_path, "best").name == "pretraining-best.pt"        # the first highest val_acc
    (tmp_path / "summary.json").write_text(json.dumps({"best_at": "finetuning1 epoch 1"}))
    assert checkpoint_path(tmp_path, "best").name == "finetuning1-best.pt"
    assert checkpoint_path(tmp_path, "last").name == "last.pt"
