"""benchmarks/throughput.py end to end on a tiny model: every row kind is produced with the
fields the README promises, and ratios refer to the baseline of the same run.
Behaviour only: no timing is asserted (speed is measured in benchmarks/, not tested)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


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
