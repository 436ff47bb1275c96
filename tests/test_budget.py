"""--budget: the plan's arithmetic, and a real run that ends inside a small budget."""
from __future__ import annotations

import json
import os
import time

import pytest

from engine.budget import OVERRUN_EPOCHS, host_steal_seconds, parse_duration, plan, replan, share
from tests.hooked_train import main
from tests.test_train import make_tiny_folder


def test_durations():
    assert [parse_duration(t) for t in ("4m", "90s", "1h30m", "2.5m", "240")] == [240, 90, 5400, 150, 240]
    for bad in ("", "4x", "m", "4m junk"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_share_keeps_the_stage_proportions():
    assert share(18, [14, 2, 1, 1]) == [14, 2, 1, 1]
    assert share(9, [14, 2, 1, 1]) == [7, 1, 0, 1] or share(9, [14, 2, 1, 1]) == [7, 1, 1, 0]
    assert sum(share(37, [14, 2, 1, 1])) == 37 and share(1, [14, 2, 1, 1]) == [1, 0, 0, 0]
    assert share(1, [1, 1, 1, 1])[0] == 1 and share(0, [14, 2, 1, 1]) == [0, 0, 0, 0]
    assert plan([14, 2, 1, 1], epoch_s=10.0, remaining_s=185.0) == [14, 2, 1, 1]
    assert plan([14, 2, 1, 1], epoch_s=100.0, remaining_s=50.0) == [1, 0, 0, 0]     # always one epoch


def test_replan_only_beyond_the_margin():
    cur = [14, 2, 1, 1]
    done = [3, 0, 0, 0]
    assert replan(cur, done, [14, 2, 1, 1], epoch_s=10.0, remaining_s=150.0) is None    # 15 left, 15 fit
    # 7 fit: all planned (below 10 epochs no cushion), the shape kept
    assert replan(cur, done, [14, 2, 1, 1], epoch_s=20.0, remaining_s=150.0) == [8, 1, 1, 0]
    faster = replan(cur, done, [14, 2, 1, 1], epoch_s=5.0, remaining_s=150.0)         # 30 fit, a 5% cushion
    assert faster == [24, 3, 2, 2]
    assert replan([2, 0, 0, 0], [1, 0, 0, 0], [14, 2, 1, 1], 27.0, 80.0) == [3, 0, 0, 0]    # a slow probe corrected
    assert replan(cur, [14, 1, 0, 0], [14, 2, 1, 1], epoch_s=10.0, remaining_s=5.0) == [14, 1, 0, 0]  # stop
    assert replan([20, 3, 1, 1], [20, 0, 0, 0], [14, 2, 1, 1], 10.0, 35.0) == [20, 1, 1, 1]   # stage 0 done


def _replay(weights, current, checks):
    """Re-plans a run through `checks` [(mean epoch seconds, seconds left), ...] at its epoch
    ends; returns the planned totals in order and the last plan."""
    done, totals = [0] * len(current), [sum(current)]
    for epoch_s, remaining in checks:
        if sum(done) == sum(current):
            break
        done[next(j for j, (c, d) in enumerate(zip(current, done)) if d < c)] += 1
        new = replan(current, done, weights, epoch_s, remaining)
        if new is not None:
            current = new
            totals.append(sum(current))
    return totals, current


def test_replan_does_not_flip_between_two_plans():
    weights = [14, 2, 1, 1]
    # A make train run's checks (AMD VM): the time left sat at ~9.06, 8.0 and 7.04 epochs.
    recorded = [(21.9, 232.4), (21.0, 212.2), (21.0, 190.3), (21.1, 168.7), (21.0, 147.8), (21.0, 126.5),
                (21.0, 105.3), (21.0, 84.2), (21.0, 63.1), (21.0, 42.0), (21.0, 21.0), (21.0, 0.0)]
    totals, last = _replay(weights, [7, 1, 1, 0], recorded)
    assert totals == [9, 10, 11, 12] and last == [9, 1, 1, 1], totals          # grows, never back
    # Epochs of 21 s +- 0.6 s from budgets around it: one direction, and never more than the
    # tolerance past the budget (the reserve holds that).
    noise = [0.6, -0.2, 0.4, -0.6, 0.5, 0.1, -0.5, 0.3, -0.4, 0.6, -0.6, 0.2]
    for start in [240.0 + 1.3 * k for k in range(16)]:
        left = [start - sum(21.0 + noise[j % 12] for j in range(i + 1)) for i in range(30)]
        totals, last = _replay(weights, plan(weights, 23.1, start), [(21.0, r) for r in left])
        moves = [b - a for a, b in zip(totals, totals[1:])]
        assert all(d > 0 for d in moves) or all(d < 0 for d in moves), (start, totals)
        end = start - sum(21.0 + noise[j % 12] for j in range(sum(last)))
        assert end >= -(OVERRUN_EPOCHS * 21.0 + 0.6) and sum(last) >= 10, (start, end, last)


def test_host_steal_is_read_from_proc_stat(tmp_path):
    hz = os.sysconf("SC_CLK_TCK")
    stat = tmp_path / "stat"
    stat.write_text(f"cpu  100 0 50 900 3 0 1 {25 * hz} 0 0\ncpu0 50 0 25 450 1 0 0 {12 * hz} 0 0\n")
    assert host_steal_seconds(str(stat)) == 25.0                    # the 8th value of the `cpu` line
    stat.write_text("intr 1 2 3\n")
    assert host_steal_seconds(str(stat)) is None                    # no `cpu` line
    assert host_steal_seconds(str(tmp_path / "missing")) is None    # not Linux


def test_a_run_with_a_small_budget_ends_inside_it(tmp_path, capsys):
    data = make_tiny_folder(tmp_path / "data")
    budget = 25.0
    t0 = time.perf_counter()
    main(["--preset", "cpu-demo", "--data", f"imagefolder:{data}", "--width", "0.125", "--batch-size", "8",
          "--workers", "0", "--amp", "off", "--loader", "resident", "--budget", f"{budget:g}s",
          "--out", str(tmp_path / "runs"), "--name", "b", "--cache-dir", str(tmp_path / "cache")])
    wall = time.perf_counter() - t0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "runs" / "b" / "summary.json").read_text())
    assert "budget 25s: a step takes" in out and "plan pretraining" in out
    assert wall <= budget and summary["budget_used_s"] <= budget, (wall, summary)
    assert summary["budget_used_s"] >= 0.5 * budget, summary        # the budget was used, not left idle
    if host_steal_seconds() is not None:                            # Linux: the host's share is stated
        assert 0 <= summary["host_steal_frac"] <= 1 and summary["host_steal_s"] >= 0, summary
    p = summary["plan"]
    assert p[0] > p[1] >= 1, p                                      # the report's shape, all stages run
