"""benchmarks/throughput.py end to end on a tiny model: every row kind is produced with the
fields the README promises, and ratios refer to the baseline of the same run.
Behaviour only: no timing is asserted (speed is measured in benchmarks/, not tested)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, run_cli


def test_throughput_train_rows_schema(tmp_path):
    out = tmp_path / "rows.json"
    cmd = [sys.executable, "-m", "benchmarks.throughput", "--train", "--loaders", "resident", "--augment", "on",
           "--batches", "2", "--batch-size", "16", "--passes", "1", "--steps", "2", "--size", "32", "--repeats", "2",
           "--cache-dir", str(tmp_path / "cache"), "--json", str(out),
           # aot_eager: the compiled rows go through dynamo/AOTAutograd in seconds, not inductor's minutes
           "--engine-args", "--width 0.0625 --batch-size 16 --compile-backend aot_eager"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert not [r for r in rows if r.get("error")], [r["error"] for r in rows if r.get("error")]

    loaders = [r for r in rows if r["kind"] == "loader"]
    assert {r["loader"] for r in loaders} == {"torchvision", "resident"}
    assert next(r for r in loaders if r["loader"] == "torchvision")["ratio_vs_torchvision"] == 1.0

    train = [r for r in rows if r["kind"] == "train"]
    assert {r["compile"] for r in train} == {True, False}
    for r in rows:
        if r["kind"] != "loader":
            assert {"kind", "compile", "kernels", "amp", "loader", "images_per_s", "ratio_vs_eager",
                    "compile_s", "machine"} <= r.keys(), r
            assert r["images_per_s"] > 0 and r["amp"] in ("off", "bf16", "fp16")
    eager = next(r for r in train if not r["compile"] and r["amp"] == "off" and r["kernels"] == "torch")
    assert eager["ratio_vs_eager"] == 1.0 and eager["compile_s"] == 0
    for r in train:
        runs = r["images_per_s_runs"]
        assert len(runs) == 2 and r["images_per_s"] == pytest.approx(min(runs), abs=0.1)   # lower middle
        assert abs(r["ratio_vs_eager"] - r["images_per_s"] / eager["images_per_s"]) < 1e-9
        assert (r["compile_s"] > 0) == r["compile"]          # compile time is its own column

    e2e = [r for r in rows if r["kind"] == "end_to_end"]
    assert {r["loader"] for r in e2e} == {"torchvision", "resident"}
    assert all(0 <= r["data_wait_frac"] <= 1 for r in e2e)


def test_parity_verdict_is_the_overlap_of_seed_ranges():
    from benchmarks.parity import summarise
    runs = [dict(loader=n, seed=s, final_acc=a, best_acc=a, images_per_s=100.0, wall_s=1.0)
            for n, accs in (("torchvision", (0.60, 0.64)), ("dali", (0.63, 0.66)), ("ffcv", (0.50, 0.55)))
            for s, a in enumerate(accs)]
    table = {t["loader"]: t for t in summarise(runs)}
    assert table["dali"]["within_reference_range"] and not table["ffcv"]["within_reference_range"]
    assert table["torchvision"]["final_acc_mean"] == pytest.approx(0.62)


def test_parity_runs_every_loader_and_seed(tmp_path):
    from tests.test_train import make_tiny_folder
    data = make_tiny_folder(tmp_path / "data")
    r = run_cli("-m", "benchmarks.parity", "--loaders", "resident", "--seeds", "0", "--preset", "cpu-demo",
                "--epochs", "1,0,0,0", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "p"),
                "--engine-args", f"--data imagefolder:{data} --width 0.125 --batch-size 8 --workers 0 --amp off",
                timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads((tmp_path / "p" / "parity.json").read_text())
    assert sorted((x["loader"], x["seed"]) for x in out["runs"]) == [("resident", 0), ("torchvision", 0)]
    assert all(0 <= x["final_acc"] <= 1 and x["images_per_s"] > 0 for x in out["runs"])
    assert {t["loader"] for t in out["table"]} == {"torchvision", "resident"}
    assert isinstance(out["table"][1]["within_reference_range"], bool)
    assert (tmp_path / "p" / "parity.png").stat().st_size > 1000 and "within reference range" in r.stdout
