"""Fault injection: a short whole run SIGKILLed again and again, resumed each time, ends
exactly as an uninterrupted run, with no process and no temp file left behind.

Kill points (one seeded random generator: the same plan every time) across the run's life:
the data ingest, the FFCV .beton build, mid-epoch, mid-checkpoint-write (temp file written,
not yet renamed), the stage change, and plain random times from the process start. Before
each kill the victim's descendants (loader workers, .beton writers, the resource tracker)
are recorded; all must be gone within seconds. A run killed before its first checkpoint is
simply started again. Per loader chain: one run of ~6 s compute in 4-7 processes.
"""
from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import descendants, running
from tests.test_reliability import args, assert_same_weights, metrics, start_run
from tests.test_train import make_tiny_folder

SEED = 20261130
STEP_SLEEP, SAVE_SLEEP, INGEST_SLEEP = 0.1, 0.5, 0.02     # s: windows a kill can land in
HOOKS = ["--debug-step-sleep", str(STEP_SLEEP), "--debug-save-sleep", str(SAVE_SLEEP),
         "--debug-ingest-sleep", str(INGEST_SLEEP)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_folder(tmp_path_factory.mktemp("faults") / "data")


class Victim:
    """What a kill trigger looks at: the run folder, the cache, this process's start."""

    def __init__(self, run: Path, cache: Path):
        self.run, self.cache, self.t0 = run, cache, time.monotonic()
        self._stamp, self._pos = None, None
        self.first = self.position()

    def position(self):
        """last.pt's (stage, epoch, batch), re-read only when the file changed."""
        try:
            stamp = (self.run / "last.pt").stat().st_mtime_ns
        except OSError:
            return None
        if stamp != self._stamp:
            try:
                p = torch.load(self.run / "last.pt", weights_only=False)["position"]
                self._stamp, self._pos = stamp, (p["stage"], p["epoch"], p["batch"])
            except Exception:  # noqa: BLE001 - replaced while read: next poll
                pass
        return self._pos


# name -> (when to fire, extra delay before the kill)
TRIGGERS = {
    "ingest": (lambda v: any(v.cache.glob("*/files-*")) and not any(v.cache.glob("*/manifest.json")),
               lambda r: r.uniform(0, 0.8)),
    "beton build": (lambda v: any(v.cache.glob("*/ffcv/.*.beton.*.tmp")), lambda r: r.uniform(0, 0.1)),
    "checkpoint write": (lambda v: any(v.run.glob(".*.pt.*.tmp")), lambda r: r.uniform(0, 0.1)),
    "mid-epoch": (lambda v: v.position() not in (None, v.first), lambda r: r.uniform(0, 1.0)),
    "stage change": (lambda v: v.position() == (1, 0, 0), lambda r: r.uniform(0, 0.4)),
    "random time": (lambda v: True, lambda r: r.uniform(1, 8)),      # from the process start
}


def temps(*folders: Path) -> list[Path]:
    return [p for f in folders for p in f.rglob("*.tmp")]


def killed_run_chain(data, out: Path, name: str, loader: str, plan: list[str], rng) -> list[dict]:
    """Run `name` to its end, SIGKILLed at each trigger of `plan` in turn (resumed after
    each; started again while there is no checkpoint). One record per kill."""
    run, cache = out / name, out.parent / f"{name}-cache"          # a fresh cache: the first run ingests
    fresh = [*args(data, out, name), "--loader", loader, "--workers", "2", "--checkpoint-every", "2",
             "--cache-dir", str(cache)]
    kills = []
    for trigger in [*plan, None]:
        proc = start_run(*HOOKS, *(["--resume", str(run)] if (run / "last.pt").exists() else fresh))
        victim = Victim(run, cache)
        fire, delay = TRIGGERS[trigger] if trigger else (None, None)
        wait = delay(rng) if trigger else 0.0
        deadline = time.monotonic() + 300
        while proc.poll() is None and trigger:
            assert time.monotonic() < deadline, f"{name}: {trigger!r} never came"
            if fire(victim):
                time.sleep(wait)
                if proc.poll() is not None:
                    break
                pids = descendants(proc.pid)
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                left = temps(*(f for f in (run, cache) if f.exists()))
                kills.append(dict(trigger=trigger, at=victim.position(), children=len(pids),
                                  temps=[p.name for p in left], outlived=running(pids, within=5)))
                assert not kills[-1]["outlived"], kills[-1]
                break
            time.sleep(0.01)
        log = proc.communicate(timeout=300)[0]
        if proc.returncode != -signal.SIGKILL:             # finished (also before its trigger came)
            assert proc.returncode == 0, log[-3000:]
            if trigger is not None:
                kills.append(dict(trigger=trigger, at="the run had finished"))
            break
    return kills


def check_chain(data, tmp_path, loader: str, plan: list[str]) -> None:
    out = tmp_path / "runs"
    ref = start_run(*args(data, out, "ref"), "--loader", loader, "--workers", "1",
                    "--cache-dir", str(tmp_path / "ref-cache"))          # uninterrupted, alongside
    try:
        kills = killed_run_chain(data, out, "k", loader, plan, random.Random(f"{SEED}-{loader}"))
    finally:
        log = ref.communicate(timeout=600)[0]
    assert ref.returncode == 0, log[-3000:]
    print(f"\n{loader}: " + "\n".join(map(str, kills)))
    assert sum("children" in k for k in kills) >= len(plan) // 2, kills      # most kills landed
    assert metrics(out / "k") == metrics(out / "ref")
    for f in ("last.pt", "pretraining-best.pt", "finetuning1-best.pt"):
        assert_same_weights(out / "k" / f, out / "ref" / f)
    # Killed mid-write at least once: the temp files it left went at the next start.
    assert any(k.get("temps") for k in kills), kills
    assert temps(out / "k", tmp_path / "k-cache") == []
    mine = [p for p in Path("/proc").glob("[0-9]*/cmdline") if str(tmp_path).encode() in _read(p)]
    assert running([int(p.parent.name) for p in mine]) == [], "a process of this test lives on"


def _read(p: Path) -> bytes:
    try:
        return p.read_bytes()
    except OSError:
        return b""


def test_torchvision_run_killed_eight_times_ends_as_an_uninterrupted_run(data, tmp_path):
    check_chain(data, tmp_path, "torchvision", ["ingest", "checkpoint write", "random time", "mid-epoch",
                                                "checkpoint write", "random time", "stage change", "checkpoint write"])


def test_ffcv_run_killed_during_its_beton_build_and_after(data, tmp_path):
    try:
        import ffcv  # noqa: F401
    except ImportError as e:
        pytest.skip(f"FFCV is not importable here ({e}): the .beton build kills need it")
    check_chain(data, tmp_path, "ffcv", ["beton build", "mid-epoch", "random time"])
