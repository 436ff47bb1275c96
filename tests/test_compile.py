"""torch.compile: one set of graphs per run (lr/alpha changes never recompile) and compiled
steps agree with eager ones on CPU."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from engine.models import build_model
from engine.train import main


def test_compiled_step_matches_eager():
    torch.manual_seed(0)
    # Dropout off: eager and inductor draw dropout masks from different RNG streams.
    eager = build_model("seed_best", width=0.125, dropout=0.0).to(memory_format=torch.channels_last)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, dynamic=False)
    x = torch.randn(8, 3, 32, 32).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (8,))
    outs = []
    for m, fwd in ((eager, eager), (compiled_model, compiled)):
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        for _ in range(2):
            loss = F.cross_entropy(fwd(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        outs.append((loss.detach(), [p.grad.clone() for p in m.parameters()]))
    # Tolerance: inductor reorders float32 reductions (BatchNorm statistics, conv backward),
    # so values agree to ~1e-6 relative; gradients of conv biases that feed a BatchNorm are
    # rounding noise (~1e-9) in both, hence an absolute floor of 1e-3 x the tensor's largest gradient. SGD, not AdamW: Adam divides
    # those noise gradients by their own magnitude and turns them into lr-sized steps.
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-4, atol=1e-5)
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=max(1e-3 * a.abs().max().item(), 1e-6))


def test_four_stage_compiled_run_compiles_once(tmp_path):
    # Recompiles are decided by dynamo's guards, whatever the backend: aot_eager counts the
    # same graphs as inductor without minutes of C++ codegen on this CPU.
    from tests.test_train import make_tiny_folder
    data = make_tiny_folder(tmp_path / "data")
    s = main(["--preset", "cpu-demo", "--data", f"imagefolder:{data}", "--model", "vgg", "--width", "0.125", "--epochs", "2,1,1,1",
              "--batch-size", "16", "--workers", "0", "--compile", "--compile-backend", "aot_eager", "--tta", "true", "--out", str(tmp_path / "runs"),
              "--cache-dir", str(tmp_path / "cache")])
    assert s["compile_s"] > 0 and s["compiles_after_warmup"] >= 2        # train + eval graphs
    assert s["compiles_at_end"] == s["compiles_after_warmup"]            # lr/alpha/stage changes: no recompiles
