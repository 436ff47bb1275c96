"""Parallel, resumable, observable work for dataset ingest (used by loaders/datasets.py).

- `WorkerPool`: a context manager over a process pool (fork) whose workers ignore Ctrl-C,
  die with their parent (PR_SET_PDEATHSIG on Linux, also after a SIGKILL of the parent) and
  never outlive the `with` block; with one worker everything runs in-process.
- `run_chunks`: a function over items in fixed-size chunks; each chunk's result is saved
  (atomically) in a folder as it finishes, so a killed run re-uses it, and the results
  come back in chunk order whatever the number of workers.
- `Progress`: a tqdm bar with ETA on an interactive stderr, else one line every 10 s.
"""
from __future__ import annotations

import ctypes
import json
import multiprocessing
import os
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, Iterable, Sequence

PROGRESS_EVERY_S = 10.0
CHUNK_DELAY_ENV = "FASTTRAIN_INGEST_CHUNK_DELAY"   # tests: seconds each chunk sleeps first
_PR_SET_PDEATHSIG = 1


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _init_worker(parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)       # Ctrl-C is the parent's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:                          # the parent died before prctl
        os._exit(1)


class WorkerPool:
    """`workers` processes for `map_unordered`, started on first parallel use."""

    def __init__(self, workers: int):
        self.workers = max(1, int(workers))
        self._ex: ProcessPoolExecutor | None = None

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._ex is not None:
            self._ex.shutdown(wait=True, cancel_futures=True)     # joins every worker
            self._ex = None

    def map_unordered(self, fn: Callable, tasks: Iterable[tuple], parallel: bool = True):
        """Yield (key, fn(*args)) for each (key, args) of `tasks`, as they finish."""
        if self.workers == 1 or not parallel:
            for key, args in tasks:
                yield key, fn(*args)
            return
        if self._ex is None:
            self._ex = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("fork"),
                                           initializer=_init_worker, initargs=(os.getpid(),))
        futures = {self._ex.submit(fn, *args): key for key, args in tasks}
        try:
            for f in as_completed(futures):
                yield futures[f], f.result()
        finally:
            for f in futures:
                f.cancel()


def _eta(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """Items done out of `total`: a tqdm bar on a TTY, else a line at most every `every_s`."""

    def __init__(self, total: int, desc: str, initial: int = 0, every_s: float = PROGRESS_EVERY_S,
                 stream=None):
        self.total, self.desc, self.done, self.initial, self.every_s = total, desc, initial, initial, every_s
        self.stream = stream or sys.stderr
        self.t0 = self.last = time.monotonic()
        self.printed = False
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="file", unit_scale=True,
                            file=self.stream, dynamic_ncols=True, leave=False)

    def line(self) -> str:
        took = time.monotonic() - self.t0
        rate = (self.done - self.initial) / took if took > 0 else 0.0
        eta = _eta((self.total - self.done) / rate) if rate > 0 else "?"
        return (f"{self.desc}: {self.done:,}/{self.total:,} files ({100 * self.done / max(1, self.total):.0f}%), "
                f"{rate:,.0f} files/s, ETA {eta}")

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last, self.printed = now, True
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.printed:
            took = time.monotonic() - self.t0
            print(f"{self.desc}: {self.done - self.initial:,} files in {took:.0f}s", file=self.stream, flush=True)


def _chunk_file(folder: Path, index: int, size: int) -> Path:
    return folder / f"{size}-{index:07d}.json"


def _run_chunk(fn: Callable, folder: str | None, index: int, size: int, items: list, args: tuple) -> list:
    delay = float(os.environ.get(CHUNK_DELAY_ENV) or 0)
    if delay:
        time.sleep(delay)
    out = fn(items, *args)
    if folder is not None:          # atomic, without fsync: this survives a kill, not a power cut
        path = _chunk_file(Path(folder), index, size)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"n": len(items), "result": out}))
        os.replace(tmp, path)
    return out


def _load_chunk(path: Path, n: int):
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return d["result"] if isinstance(d, dict) and d.get("n") == n and "result" in d else None


def run_chunks(pool: WorkerPool, fn: Callable, items: Sequence, size: int, folder: Path | None, *,
               args: tuple = (), parallel: bool = True, desc: str = "ingest") -> tuple[list, int]:
    """`fn(chunk_of_items, *args)` (a module-level function returning a JSON-able result)
    over `items` in chunks of `size`; returns (the chunks' results in order, number of
    chunks found already done in `folder`). `folder` None: nothing saved."""
    starts = range(0, len(items), size)
    results: list = [None] * len(starts)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        for k, s in enumerate(starts):
            results[k] = _load_chunk(_chunk_file(folder, k, size), len(items[s:s + size]))
    todo = [(k, (fn, None if folder is None else str(folder), k, size, list(items[s:s + size]), args))
            for k, s in enumerate(starts) if results[k] is None]
    left = sum(len(t[1][4]) for t in todo)
    reused = len(starts) - len(todo)
    if reused:
        print(f"{desc}: resuming: {reused}/{len(starts)} chunks ({len(items) - left:,} files) "
              f"already done in {folder}", file=sys.stderr, flush=True)
    progress = Progress(len(items), desc, initial=len(items) - left)
    try:
        for k, out in pool.map_unordered(_run_chunk, todo, parallel=parallel and len(todo) > 1):
            results[k] = out
            progress.update(len(items[starts[k]:starts[k] + size]))
    finally:
        progress.close()
    return results, reused
