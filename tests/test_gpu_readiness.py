"""What a CUDA review found, shown on CPU where the behaviour can be: each test fails on the
code before its fix. What only a GPU can show is listed in docs/gpu.md (the GPU check).

- `--kernels triton` must not run Triton before the model is on its device (the memory probe)
  and is refused with one line on a CPU without the interpreter.
- The model is always fed channels_last in the autocast dtype, whatever a transform returned
  (CUDA's `roll` in MixUp returns contiguous NCHW).
- The epoch loop does not call `len(loader)` per step (a permutation per call on some loaders).
- BatchNorm backup/restore costs a handful of ops whatever the layer count, and restores NaN
  statistics; fp16 steps skipped by the GradScaler restore them and count too.
- Evaluation survives a compiled callable that reuses its output buffer (CUDA graphs) with TTA,
  and warms up the batch sizes this rank's shard will really have.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.config import config_from_args
from engine.loop import BadSteps, EpochSetup, eval_batch_sizes, evaluate, train_epoch
from engine.step import BatchNormGuard, build_engine, eval_logits, train_step
from tests.conftest import run_cli


def tiny_engine(amp: str = "off", **over):
    cfg, _ = config_from_args(["--width", "0.125", "--amp", amp, "--device", "cpu", "--compile", "off",
                               *[a for k, v in over.items() for a in (f"--{k.replace('_', '-')}", str(v))]])
    torch.manual_seed(0)
    dtype = {"off": None, "fp16": torch.float16, "bf16": torch.bfloat16}[amp]
    return build_engine(cfg, 10, torch.device("cpu"), dtype)


class FakeLoader:
    """A loader over fixed batches that counts len() calls."""

    def __init__(self, batches):
        self.batches, self.len_calls = batches, 0

    def __len__(self):
        self.len_calls += 1
        return len(self.batches)

    def set_epoch(self, epoch, start_batch=0):
        self.start = start_batch

    def __iter__(self):
        return iter(self.batches[self.start:])


def batches(n=4, size=32, bs=4):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(bs, 3, size, size, generator=g), torch.randint(0, 10, (bs,), generator=g)) for _ in range(n)]


def test_kernels_triton_on_cpu_without_interpreter_is_one_line_exit_2(tmp_path):
    r = run_cli("-m", "engine.train", "--kernels", "triton", "--device", "cpu", "--out", str(tmp_path),
                "--data", "imagefolder:/no/such", env={"TRITON_INTERPRET": "0"}, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: --kernels triton on cpu needs the Triton interpreter")


def test_memory_probe_never_runs_triton_kernels(tmp_path):
    """The probe forward runs while the model is still on the host: with --kernels triton
    forced, on CUDA, a Triton kernel on a CPU tensor raised. The probe uses the reference."""
    code = ("import kernels, torch; from engine.models import build_model; from engine.memory import training_bytes;"
            "kernels.set_backend('triton'); m = build_model('seed_best', width=0.125);"
            "print(training_bytes(m, 32, None))")
    r = run_cli("-c", code, env={"TRITON_INTERPRET": "0"}, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_model_is_fed_channels_last_after_any_transform():
    eng = tiny_engine()
    seen = []
    net = eng.net

    def spy(x):
        seen.append((x.is_contiguous(memory_format=torch.channels_last), x.dtype))
        return net(x)
    eng.net = spy

    def contiguous_mixup(x, y):            # what CUDA's roll gives MixUp: plain NCHW
        return x.contiguous(), F.one_hot(y, 10).float()
    setup = EpochSetup(opt=eng.optimizer(1e-3), lr=lambda s: 1e-3, mixup=contiguous_mixup, num_classes=10,
                       desc="t", show_bar=False)
    train_epoch(eng, FakeLoader(batches()), setup, BadSteps(eng.device, 100), 0)
    assert seen == [(True, torch.float32)] * 4


def test_epoch_loop_reads_len_once_not_per_step():
    eng = tiny_engine()
    loader = FakeLoader(batches(n=6))
    setup = EpochSetup(opt=eng.optimizer(1e-3), lr=lambda s: 1e-3, mixup=None, num_classes=10, desc="t",
                       show_bar=False)
    train_epoch(eng, loader, setup, BadSteps(eng.device, 100), 0)
    assert loader.len_calls <= 1


def test_batchnorm_guard_is_a_few_ops_and_restores_nan_statistics():
    eng = tiny_engine()
    bns = [m for m in eng.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) > 10
    guard = BatchNormGuard(eng.model)
    before = {k: v.clone() for k, v in eng.model.state_dict().items() if "running" in k or "num_batches" in k}
    # ops that touch memory (views are free; the old code ran ~3 per buffer: 150 here)
    views = {"aten::view", "aten::split", "aten::split_with_sizes", "aten::as_strided", "aten::narrow",
             "aten::slice", "aten::view_as", "aten::alias", "aten::empty", "aten::to", "aten::_to_copy"}
    work = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        guard.save()
    work += [e.name for e in prof.events() if e.cpu_parent is None and e.name not in views]
    for m in bns:                                             # a bad forward: NaN statistics
        m.running_mean.fill_(float("nan"))
        m.num_batches_tracked += 1
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        guard.restore_if(torch.tensor(True))
    work += [e.name for e in prof.events() if e.cpu_parent is None and e.name not in views]
    assert len(work) <= 8, work
    after = eng.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    guard.save()
    for m in bns:
        m.running_var.mul_(2)
    guard.restore_if(torch.tensor(False))                      # a good step keeps its update
    assert all(torch.equal(m.running_var, before[k.replace("running_mean", "running_var")] * 2)
               for m, k in zip(bns, [k for k in before if k.endswith("running_mean")]))


@pytest.mark.parametrize("amp", ["off", "fp16"])
def test_a_skipped_step_restores_batchnorm_and_reports_bad(amp):
    eng = tiny_engine(amp)
    opt = eng.optimizer(1e-3)
    (x, y), = batches(n=1)
    y_soft = F.one_hot(y, 10).float()
    # fp16: the GradScaler's first scales overflow (skipped steps) until it has backed off
    assert any(not bool(train_step(eng, opt, x, y_soft).bad) for _ in range(30))
    before = {k: v.clone() for k, v in eng.model.state_dict().items()}
    r = train_step(eng, opt, x * float("nan"), y_soft)
    assert bool(r.bad)
    after = eng.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), [k for k in before if not torch.equal(before[k], after[k])]


def test_tta_survives_an_output_buffer_reused_between_calls():
    """CUDA graphs reuse a compiled callable's output buffer: the first call's logits must be
    copied before the mirrored call overwrites them."""
    buf = torch.empty(2, 3)

    def graph_like(x):
        return buf.copy_(x.mean(dim=(2, 3)))                 # the same tensor every call
    eng = SimpleNamespace(eval_net=graph_like, amp=None, device=torch.device("cpu"))
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    x[..., :16] *= 3                                         # the mirror has another mean
    logits, mean = eval_logits(eng, x, tta=True)
    want = x.mean(dim=(2, 3))
    torch.testing.assert_close(logits, want)
    torch.testing.assert_close(mean, (want + x.flip(3).mean(dim=(2, 3))) / 2)


def test_evaluation_warm_up_uses_this_ranks_ragged_batch():
    n, world, b = 61, 2, 8
    shards = [len(range(r, n, world)) for r in range(world)]                  # 31 and 30
    assert [eval_batch_sizes(s, b) for s in shards] == [{8, 7}, {8, 6}]
    assert eval_batch_sizes(5, 8) == {5} and eval_batch_sizes(16, 8) == {8}


def test_evaluate_counts_and_averages_on_cpu():
    eng = tiny_engine()
    out = evaluate(eng, batches(n=3), tta=True)
    assert 0 <= out["val_acc"] <= 1 and 0 <= out["val_acc_tta"] <= 1 and math.isfinite(out["val_loss"])


def test_fp16_step_the_scaler_skips_restores_batchnorm_and_counts():
    """A finite loss whose scaled gradients overflow: the GradScaler skips the step; the
    BatchNorm statistics its forward moved must be put back and the step reported bad."""
    eng = tiny_engine("fp16")
    eng.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 60)          # certain overflow
    opt = eng.optimizer(1e-3)
    (x, y), = batches(n=1)
    before = {k: v.clone() for k, v in eng.model.state_dict().items()}
    r = train_step(eng, opt, x, F.one_hot(y, 10).float())
    assert torch.isfinite(r.loss) and bool(r.bad) and eng.scaler.get_scale() < 2.0 ** 60
    after = eng.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
