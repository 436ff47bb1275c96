"""Where and how the step runs: device, autocast dtype, torch.compile, CPU threads.

- `resolve_device`: "auto" is CUDA when present; under torchrun a bare "cuda" is the local rank's.
- `resolve_amp`: bf16 autocast on CUDA; on CPU only where a short probe shows bf16 beating
  float32 (CPU flags are not enough: machines with AMX flags ran bf16 both 2x faster and 10x
  slower); fp16 with a GradScaler on request.
- `resolve_compile`: torch.compile on by default on CUDA, off on CPU (a cold compile costs
  minutes there against a ~1.4x step; see docs/engine.md).
- `configure_threads`: intra-op threads = the cores this process may use, divided among local
  ranks, minus the loader's worker processes; OpenMP waits passively (engine/__init__.py), so
  a busy neighbour or our own loader's workers do not make the step's threads spin.
  `ThreadTuner` then settles the count on CPU by timing the run's first steps.
"""
from __future__ import annotations

import functools
import os
import statistics
import time

import torch

from loaders.common import ConfigError

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """`local_rank` (torchrun): a CUDA device without an index becomes cuda:<local_rank>."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device; use auto, cpu or cuda[:N]") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name!r}: only cpu and cuda are supported; use auto, cpu or cuda[:N]")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device here; use --device cpu or auto")
    if dev.type == "cuda" and dev.index is None and local_rank is not None:
        dev = torch.device("cuda", local_rank)
    return dev


def cpu_reports_bf16() -> bool:
    """Whether the CPU flags claim native bf16 (AVX512-BF16 or AMX)."""
    return getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or \
        getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()


@functools.lru_cache(maxsize=1)
def cpu_bf16_pays() -> bool:
    """Whether bf16 autocast beats float32 for a conv training step on this CPU: where the
    flags say yes, ~0.2 s of conv fwd+bwd steps, the two dtypes interleaved, the fastest of
    each compared (contention only adds time, so the minimum is the stable figure)."""
    if not cpu_reports_bf16():
        return False
    with torch.random.fork_rng(devices=[]):       # the probe must not move the run's RNG
        conv = torch.nn.Conv2d(64, 64, 3, padding=1).to(memory_format=torch.channels_last)
        x = torch.randn(16, 64, 32, 32).to(memory_format=torch.channels_last)
    best = {torch.bfloat16: float("inf"), None: float("inf")}
    for i in range(6):
        for dtype in best:
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                conv(x).float().sum().backward()
            if i:                                 # the first call of each creates its primitives
                best[dtype] = min(best[dtype], time.perf_counter() - t0)
    return best[torch.bfloat16] < 0.9 * best[None]


def amp_name(dtype: torch.dtype | None) -> str:
    """The --amp name of a resolved autocast dtype ("off", "bf16", "fp16")."""
    return next(k for k, v in AMP_DTYPES.items() if v == dtype)


def resolve_amp(name: str, device: torch.device) -> torch.dtype | None:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        return torch.bfloat16 if cpu_bf16_pays() else None
    if name not in AMP_DTYPES:
        raise ConfigError(f"--amp {name!r}: use auto, bf16, fp16 or off")
    return AMP_DTYPES[name]


def resolve_compile(name: str, device: torch.device) -> bool:
    if name not in ("auto", "on", "off"):
        raise ConfigError(f"--compile {name!r}: use auto, on or off")
    return device.type == "cuda" if name == "auto" else name == "on"


def compile_count() -> int:
    """Graphs torch.compile has produced in this process (dynamo's unique_graphs counter)."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def configure_threads(device: torch.device, local_world: int = 1, loader_workers: int = 0) -> int:
    """Set torch's intra-op threads for the step and return the count: the cores this process
    may use (its affinity) shared by the local ranks, minus one per loader worker process, at
    least 1; on CUDA, where the host only launches kernels, at most 4. Measured on 2 cores
    (docs/benchmarks.md): 1 thread beat 2 passive threads quiet and 2-4x under one busy
    neighbour. An explicit OMP_NUM_THREADS wins."""
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    n = max(usable_cores() // max(local_world, 1) - loader_workers, 1)
    if device.type == "cuda":
        n = min(max(usable_cores() // max(local_world, 1), 1), 4)
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    return n


def thread_candidates(device: torch.device, local_world: int, loader_workers: int, deterministic: bool) -> list[int]:
    """The intra-op thread counts a CPU run tries (`ThreadTuner`): the rule's count and all of
    this rank's cores. One (no tuning) on CUDA, with OMP_NUM_THREADS set, or --deterministic
    (float sums may round differently with another thread count)."""
    if device.type == "cuda" or os.environ.get("OMP_NUM_THREADS") or deterministic:
        return [torch.get_num_threads()]
    share = max(usable_cores() // max(local_world, 1), 1)
    return sorted({max(share - loader_workers, 1), share})


class ThreadTuner:
    """Which intra-op thread count makes a CPU run fastest depends on how much of the cores the
    loader takes (a 32px DALI pipeline almost none, PIL decoding at 128px a core per worker)
    and on whatever else runs on the machine, so it is measured in place: the run's first
    steps take the candidates in turns (blocks of `block` timed steps after one untimed step
    that absorbs the switch, `rounds` blocks each, interleaved), timing each step from the
    end of the previous one (data wait included; CPU steps are synchronous), and the lowest
    median step time wins for the rest of the run."""

    def __init__(self, candidates: list[int], block: int = 4, rounds: int = 2):
        self.candidates = list(candidates)
        self.order = self.candidates * rounds
        self.block = block
        self.times: dict[int, list[float]] = {c: [] for c in self.candidates}
        self.chosen = self.candidates[0] if len(self.candidates) == 1 else None
        self.k, self.steps, self.t0 = 0, 0, 0.0
        torch.set_num_threads(self.order[0])

    def step_done(self) -> str | None:
        """Call after every training step; returns a one-line report when the choice is made."""
        if self.chosen is not None:
            return None
        now = time.perf_counter()
        self.steps += 1
        if self.steps == 1:
            self.t0 = now
            return None
        if self.steps <= self.block:
            return None
        self.times[self.order[self.k]].append((now - self.t0) / self.block)
        self.k, self.steps = self.k + 1, 0
        if self.k < len(self.order):
            torch.set_num_threads(self.order[self.k])
            return None
        medians = {c: statistics.median(t) for c, t in self.times.items()}
        self.chosen = min(medians, key=medians.get)
        torch.set_num_threads(self.chosen)
        tried = ", ".join(f"{c}: {medians[c] * 1e3:.0f} ms" for c in self.candidates)
        return f"threads: {self.chosen} (step time by intra-op thread count, median of {len(self.order) // len(self.candidates)} blocks: {tried})"
