"""Bad configuration: one line naming the flag, the value and the fix, exit 2, no traceback, no
usage dump, and nothing done first: no data ingested, no run folder, runs/latest untouched.
Errors only the data can reveal (one class, a resume whose classes or files changed) come
right after ingest, still before the run folder is touched."""
from __future__ import annotations

import shutil

import pytest

from engine.train import main
from tests.test_train import make_tiny_folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_folder(tmp_path_factory.mktemp("cfgerr") / "data")


def run(tmp_path, capsys, *argv, data=None):
    out, cache = tmp_path / "runs", tmp_path / "cache"
    out.mkdir(exist_ok=True)
    (out / "latest").unlink(missing_ok=True)
    (out / "latest").symlink_to("previous")
    with pytest.raises(SystemExit) as e:
        main(["--data", f"imagefolder:{data or tmp_path / 'nodata'}", "--width", "0.125", "--workers", "0",
              "--out", str(out), "--cache-dir", str(cache), "--amp", "off", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err and "usage" not in err, err
    assert sorted(p.name for p in out.iterdir()) == ["latest"] and str((out / "latest").readlink()) == "previous"
    return err, cache


@pytest.mark.parametrize("argv, says", [
    (["--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (["--batch-size", "-4"], "--batch-size -4: must be >= 1"),
    (["--epochs", "0"], "--epochs 0: must be counts >= 0, at least one > 0"),
    (["--epochs", "-1"], "--epochs -1: must be"),
    (["--epochs", "3,0,0,0", "--stages", "finetuning1"], "no stage has an epoch to run"),
    (["--dropout", "-0.1"], "--dropout -0.1: must be in [0, 3]"),
    (["--dropout", "nan"], "--dropout nan: must be in [0, 3]"),
    (["--lr-scale", "nan"], "--lr-scale nan: must be a finite number > 0"),
    (["--lr-scale", "inf"], "--lr-scale inf: must be a finite number > 0"),
    (["--lr-scale", "0"], "--lr-scale 0.0: must be"),
    (["--weight-decay", "-1"], "--weight-decay -1.0: must be"),
    (["--width", "0"], "--width 0.0: must be a finite number > 0"),
    (["--size", "7"], "--size 7: must be >= 32"),
    (["--workers", "-1"], "--workers -1: must be >= 0"),
    (["--checkpoint-every", "-2"], "--checkpoint-every -2: must be >= 0"),
    (["--max-bad-steps", "0"], "--max-bad-steps 0: must be >= 1"),
    (["--log-every", "0"], "--log-every 0: must be >= 1"),
    (["--label-smoothing", "1"], "--label-smoothing 1.0: must be in [0, 1)"),
    (["--target-acc", "2"], "--target-acc 2.0: must be in [0, 1]"),
    (["--warmup-epochs", "nan"], "--warmup-epochs nan: must be"),
    (["--seed", "-1"], "--seed -1: must be >= 0"),
    (["--aug.flip_p", "2"], "flip_p=2.0 (need 0..1)"),
    (["--aug.nope", "1"], "unrecognized arguments: --aug.nope 1"),
    (["--amp", "fp8"], "--amp 'fp8'"),
    (["--compile", "maybe"], "--compile 'maybe'"),
    (["--device", "tpu"], "--device 'tpu'"),
])
def test_bad_flag_is_refused_before_any_work(argv, says, tmp_path, capsys):
    err, cache = run(tmp_path, capsys, *argv)
    assert says in err, err
    assert not cache.exists()                       # no data was read


def test_output_folder_that_cannot_be_written(tmp_path, capsys):
    for bad in ("/proc/engine-out", str(tmp_path / "a-file")):
        (tmp_path / "a-file").write_text("x")
        with pytest.raises(SystemExit) as e:
            main(["--data", "imagefolder:/nowhere", "--out", bad, "--cache-dir", str(tmp_path / "cache")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(f"error: --out {bad}: ") and err.count("\n") == 1, err
        assert not (tmp_path / "cache").exists()


def test_one_class_is_refused_before_the_run_folder(tmp_path, capsys, data):
    one = tmp_path / "one"
    for split in ("train", "val"):
        shutil.copytree(data / split / "class0", one / split / "class0")
    err, _ = run(tmp_path, capsys, data=one)
    assert "1 class(es) found (class0); a classifier needs at least 2 class folders" in err


def test_resume_after_the_classes_or_files_changed(tmp_path, capsys, data):
    src = tmp_path / "src"
    shutil.copytree(data, src)
    out = tmp_path / "runs"
    common = ["--data", f"imagefolder:{src}", "--width", "0.125", "--workers", "0", "--epochs", "1,0,0,0",
              "--batch-size", "8", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--amp", "off"]
    main(common + ["--name", "r"])
    shutil.copy(src / "train" / "class0" / "0.png", src / "train" / "class1" / "extra.png")
    with pytest.raises(SystemExit) as e:
        main(["--resume", str(out / "r")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "the files of --data" in err and err.count("\n") == 1, err
    shutil.copytree(src / "train" / "class0", src / "train" / "class10")
    shutil.copytree(src / "val" / "class0", src / "val" / "class10")
    with pytest.raises(SystemExit) as e:
        main(["--resume", str(out / "r")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "the dataset's classes changed since the run started (10 then, 11 now" in err, err
