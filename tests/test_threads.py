"""The CPU step's intra-op thread count: `thread_candidates` (when a run tunes at all) and
`ThreadTuner` (measures the candidates in the first steps and keeps the fastest), alone on
steps whose cost depends on the thread count, and inside a training run."""
from __future__ import annotations

import json
import time

import pytest
import torch

from engine.precision import ThreadTuner, thread_candidates
from engine.train import main
from tests.test_train import make_tiny_folder


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _run_steps(tuner: ThreadTuner, cost: dict[int, float], steps: int) -> list[str]:
    reports = []
    for _ in range(steps):
        time.sleep(cost[torch.get_num_threads()])
        if report := tuner.step_done():
            reports.append(report)
    return reports


@pytest.mark.parametrize("fast", [1, 2])
def test_tuner_keeps_the_faster_count(fast, restore_threads):
    """Interleaved blocks (1, 2, 1, 2) of one untimed + 4 timed steps: the choice is made after
    20 steps, reported once, and stays set."""
    cost = {1: 0.004, 2: 0.004}
    cost[3 - fast] = 0.012
    tuner = ThreadTuner([1, 2], block=4, rounds=2)
    assert torch.get_num_threads() == 1
    reports = _run_steps(tuner, cost, 19)
    assert tuner.chosen is None and not reports
    reports = _run_steps(tuner, cost, 11)
    assert tuner.chosen == fast and torch.get_num_threads() == fast
    assert len(reports) == 1 and reports[0].startswith(f"threads: {fast} (")
    assert "1: " in reports[0] and "2: " in reports[0]
    assert [len(tuner.times[c]) for c in (1, 2)] == [2, 2]


def test_one_candidate_means_no_tuning(restore_threads):
    torch.set_num_threads(2)
    tuner = ThreadTuner([2])
    assert tuner.chosen == 2 and tuner.step_done() is None and torch.get_num_threads() == 2


def test_candidates(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("engine.precision.usable_cores", lambda: 8)
    cpu = torch.device("cpu")
    assert thread_candidates(cpu, 1, 2, deterministic=False) == [6, 8]
    assert thread_candidates(cpu, 2, 2, deterministic=False) == [2, 4]     # 2 local ranks share 8 cores
    assert thread_candidates(cpu, 1, 0, deterministic=False) == [8]
    assert thread_candidates(cpu, 1, 12, deterministic=False) == [1, 8]
    n = torch.get_num_threads()
    assert thread_candidates(cpu, 1, 2, deterministic=True) == [n]         # rounding must not change
    assert thread_candidates(torch.device("cuda"), 1, 2, deterministic=False) == [n]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert thread_candidates(cpu, 1, 2, deterministic=False) == [n]         # the user's setting wins


def test_training_run_tunes_and_reports(tmp_path, monkeypatch, capsys, restore_threads):
    """Without OMP_NUM_THREADS a CPU run on 2 usable cores with 1 loader worker tries 1 and 2
    threads, prints the choice once, and the summary records the count it kept."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("engine.precision.usable_cores", lambda: 2)
    folder = make_tiny_folder(tmp_path / "data")
    main(["--preset", "cpu-demo", "--data", f"imagefolder:{folder}", "--loader", "resident", "--workers", "1",
          "--batch-size", "4", "--epochs", "2,0,0,0", "--out", str(tmp_path / "runs"), "--name", "t",
          "--cache-dir", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("threads: ")]
    assert len(lines) == 1, out
    chosen = int(lines[0].split()[1])
    summary = json.loads((tmp_path / "runs" / "t" / "summary.json").read_text())
    assert chosen in (1, 2) and summary["threads"] == chosen
