"""engine.compare trains each model under one budget and writes the table and the plot."""
from __future__ import annotations

import csv

from engine.compare import COLUMNS, main
from tests.test_train import make_tiny_folder


def test_compare_writes_table_and_plot(tmp_path):
    data = make_tiny_folder(tmp_path / "data")
    rows = main(["--models", "vgg,nodropout_concat", "--preset", "cpu-demo", "--data", f"imagefolder:{data}",
                 "--width", "0.125", "--epochs", "1,0,0,0", "--batch-size", "16", "--workers", "0",
                 "--target-acc", "0.05", "--out", str(tmp_path / "runs"), "--name", "cmp",
                 "--cache-dir", str(tmp_path / "cache")])
    out = tmp_path / "runs" / "cmp"
    table = list(csv.DictReader(open(out / "compare.csv")))
    assert [r["model"] for r in table] == ["vgg", "nodropout_concat"] and tuple(table[0]) == COLUMNS
    assert int(table[0]["params"]) != int(table[1]["params"]) and float(table[1]["gflops_per_image"]) > 0
    assert all(float(r["time_to_target_s"]) > 0 for r in table)          # 5% is reached at once
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG" and (out / "vgg" / "metrics.csv").exists()
    assert rows[0]["model"] == "vgg"
