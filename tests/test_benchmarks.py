"""benchmarks/throughput.py end to end on a tiny model: every row kind is produced with the
fields the README and issue promise (CPU time per image, cores needed for --feed, the load
and thread columns), and ratios refer to the baseline of the same run. Behaviour only: no
timing is asserted (speed is measured in benchmarks/, not tested)."""
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
           "--data", "synthetic", "--threads", "engine,1", "--batches", "2", "--batch-size", "16", "--passes", "1", "--steps", "2", "--size", "32", "--repeats", "2",
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
    eager = next(r for r in train if not r["compile"] and r["amp"] == "off" and r["kernels"] == "torch"
                 and r["threads"] == "engine")
    assert eager["ratio_vs_eager"] == 1.0 and eager["compile_s"] == 0
    # --threads engine,1: the eager step in each setting (compiled rows: the first setting only)
    assert {(r["threads"], r["num_threads"]) for r in train if not r["compile"]} >= {("1", 1)}
    assert {r["threads"] for r in train if r["compile"]} == {"engine"}
    assert all(r["load"] == 0 and r["wait_policy"] == "PASSIVE" for r in train)
    for r in train:
        runs = r["images_per_s_runs"]
        assert len(runs) == 2 and r["images_per_s"] == pytest.approx(min(runs), abs=0.1)   # lower middle
        assert abs(r["ratio_vs_eager"] - r["images_per_s"] / eager["images_per_s"]) < 1e-9
        assert (r["compile_s"] > 0) == r["compile"]          # compile time is its own column

    e2e = [r for r in rows if r["kind"] == "end_to_end"]
    assert {(r["loader"], r["threads"]) for r in e2e} == {(n, t) for n in ("torchvision", "resident")
                                                           for t in ("engine", "1")}
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


def test_loader_rows_cpu_time_feed_and_load(tmp_path):
    """A tiny loader-only run with --load 1: every row carries its load, its CPU time per
    image, the decode/augment split and the cores --feed needs; the torchvision loader is
    all host work."""
    out = tmp_path / "rows.json"
    cmd = [sys.executable, "-m", "benchmarks.throughput", "--data", "synthetic", "--loaders", "torchvision",
           "--augment", "both", "--load", "1", "--feed", "1000", "--batches", "2", "--batch-size", "8",
           "--passes", "1", "--size", "32", "--workers", "1", "--cache-dir", str(tmp_path / "cache"),
           "--json", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "baseline: torchvision (PIL images + v2" in r.stdout and "## feed 1000 images/s" in r.stdout
    rows = json.loads(out.read_text())
    assert sorted((r["augment"], r["load"]) for r in rows) == [(False, 0), (False, 1), (True, 0), (True, 1)]
    for r in rows:
        assert not r.get("error") and r["kind"] == "loader" and r["data"] == "synthetic"
        assert r["source_size"] == "32x32" and r["ratio_vs_torchvision"] == r["cpu_ratio_vs_torchvision"] == 1.0
        assert "torchvision (PIL + v2" in r["baseline"] and f"load {r['load']}" in r["baseline"]
        off = next(o for o in rows if not o["augment"] and o["load"] == r["load"])
        assert r["cpu_s_per_image"] > 0
        assert r["decode_cpu_s_per_image"] == min(off["cpu_s_per_image"], r["cpu_s_per_image"])
        assert r["augment_cpu_s_per_image"] == r["cpu_s_per_image"] - r["decode_cpu_s_per_image"]
        assert r["host_cores_needed"] == pytest.approx(1000 * r["cpu_s_per_image"], abs=0.01)
        assert r["device_core_equiv"] == 0
        assert r["feed_images_per_s"] == 1000 and r["placement_on_cuda"] == dict(decode="host", augment="host")


def test_feed_columns_place_work_per_loader():
    """decode = the augment-off run, augment = the difference; host and device parts follow
    where each loader runs them on CUDA; measured on CUDA, all CPU time is host time."""
    from benchmarks.throughput import feed_columns

    def rows():
        return [dict(kind="loader", loader=n, augment=a, load=0, data="d", images_per_s=1.0,
                     cpu_s_per_image=(4e-3 if a else 1e-3))
                for n in ("torchvision", "ffcv", "resident", "dali") for a in (True, False)]
    got = rows()
    feed_columns(got, 1000, cuda=False)
    on = {r["loader"]: r for r in got if r["augment"]}
    assert all(r["decode_cpu_s_per_image"] == 1e-3 and r["augment_cpu_s_per_image"] == 3e-3 for r in on.values())
    assert (on["torchvision"]["host_cores_needed"], on["torchvision"]["device_core_equiv"]) == (4.0, 0.0)
    assert (on["ffcv"]["host_cores_needed"], on["ffcv"]["device_core_equiv"]) == (1.0, 3.0)
    for name in ("resident", "dali"):
        assert (on[name]["host_cores_needed"], on[name]["device_core_equiv"]) == (0.0, 4.0)
    got = rows()
    feed_columns(got, 1000, cuda=True)
    assert all(r["host_cores_needed"] == (4.0 if r["augment"] else 1.0) and r["device_core_equiv"] is None
               for r in got)
    only_on = [r for r in rows() if r["augment"]]
    feed_columns(only_on, 1000, cuda=False)
    ffcv = next(r for r in only_on if r["loader"] == "ffcv")           # no off row: no split
    assert ffcv["decode_cpu_s_per_image"] is None and ffcv["host_cores_needed"] is None


def test_cpu_seconds_counts_live_and_finished_children_once():
    """A child's CPU time counts while it runs (DataLoader workers live through the passes)
    and, once waited for, through RUSAGE_CHILDREN, not twice."""
    from benchmarks.throughput import cpu_seconds
    c0 = cpu_seconds()
    child = subprocess.Popen([sys.executable, "-c", "import sys, time\nwhile time.process_time() < 0.5: pass\n"
                              "print('spun', flush=True)\nsys.stdin.read()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "spun"
    c1 = cpu_seconds()
    child.stdin.close()
    child.wait(timeout=30)
    c2 = cpu_seconds()
    assert c1 - c0 >= 0.45 and abs(c2 - c1) < 0.2, (c0, c1, c2)
