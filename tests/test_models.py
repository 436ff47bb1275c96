"""engine.models: the report's Table 1 models and its two PassThrough listings (CPU, fast)."""
from __future__ import annotations

import functools
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels

from engine.models import (ARCHS, PASSTHROUGHS, BNSiLU, PassThrough, build_model, count_params,
                           forward_flops, variants)
from loaders.common import ConfigError

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = variants()
NAMES = [v[0] for v in VARIANTS]
BUDGET = 5_000_000


@functools.lru_cache(maxsize=None)
def _model(arch: str, passthrough: str, width: float = 1.0) -> nn.Module:
    torch.manual_seed(0)
    return build_model(arch, passthrough, width=width)


def _fixed_input(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1234))


# The report's listings, written literally (`self` dropped).
def report_resblock_passthrough(manyResBlock: list, x):
    for i in range(len(manyResBlock)):
        x = F.mish(x + manyResBlock[i](x))
    return x


def report_modified_passthrough(manyResBlock: list, x):
    sequence = [x]
    for i in range(len(manyResBlock)):
        for j in range(i):
            x = F.mish(x + sequence[j])
        x = F.mish(x + manyResBlock[i](x))
        sequence.append(x)
    return x


def test_variant_list():
    assert set(ARCHS) == {"vgg", "deep", "dropout", "nodropout_concat"}
    assert PASSTHROUGHS == ("residual", "dense")
    assert len(set(NAMES)) == len(NAMES)
    assert ("seed_best", "nodropout_concat", "dense") in VARIANTS
    for arch in ARCHS:
        assert any(v[1] == arch for v in VARIANTS)
    for arch in ("deep", "dropout", "nodropout_concat"):
        for p in PASSTHROUGHS:
            assert (f"{arch}-{p}", arch, p) in VARIANTS


@pytest.mark.parametrize("name,arch,passthrough", VARIANTS, ids=NAMES)
def test_params_under_budget_and_forward_shapes(name, arch, passthrough):
    model = _model(arch, passthrough).train()
    assert count_params(model) < BUDGET
    for size in (32, 64):
        assert model(_fixed_input(2, 3, size, size)).shape == (2, 10)
    small = _model(arch, passthrough, 0.25).train()
    assert small(_fixed_input(2, 3, 128, 128)).shape == (2, 10)


def test_seed_best_is_nodropout_concat_dense_and_matches_calibration():
    seed = build_model("seed_best")
    assert (seed.arch, seed.passthrough) == ("nodropout_concat", "dense")
    n = count_params(seed)
    assert n == count_params(_model("nodropout_concat", "residual"))
    assert abs(n - 4_220_000) / 4_220_000 < 0.02
    head = set(seed.head.modules())
    trunk_drops = [m for m in seed.modules()
                   if isinstance(m, (nn.Dropout, nn.Dropout2d)) and m not in head]
    assert trunk_drops == []  # no dropout after convs; only the MLP head keeps it
    assert [m.p for m in seed.head if isinstance(m, nn.Dropout)] == [0.3, 0.2]
    assert len(seed.taps) == 5


def test_num_classes():
    model = build_model("deep", width=0.25, num_classes=7).eval()
    assert model(_fixed_input(2, 3, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("arch", ["nodropout_concat", "dropout"])
def test_dense_passthrough_is_the_reports_code(arch):
    model = _model(arch, "dense", 0.25).eval()
    for group, channels in ((model.res2, 32), (model.connect.res2, 16)):
        assert isinstance(group, PassThrough) and group.style == "dense"
        x = _fixed_input(2, channels, 8, 8)
        with torch.no_grad():
            want = report_modified_passthrough(list(group.blocks), x)
            with kernels.use_backend("torch"):                  # the reference: bit for bit
                assert torch.equal(group(x), want)
            torch.testing.assert_close(group(x), want, rtol=1e-5, atol=1e-5)   # the default (CPU: eager mish)


@pytest.mark.parametrize("arch", ["nodropout_concat", "dropout", "deep"])
def test_residual_passthrough_is_the_reports_code(arch):
    # In eval mode the report's odd-block Dropout2d(0.1) is the identity.
    model = _model(arch, "residual", 0.25).eval()
    group = model.res2
    assert group.style == "residual"
    x = _fixed_input(2, 32, 8, 8)
    with torch.no_grad():
        want = report_resblock_passthrough(list(group.blocks), x)
        with kernels.use_backend("torch"):
            assert torch.equal(group(x), want)
        torch.testing.assert_close(group(x), want, rtol=1e-5, atol=1e-5)


def test_dense_chain_differs_from_residual():
    model = _model("nodropout_concat", "dense", 0.25).eval()
    x = _fixed_input(2, 32, 8, 8)
    with torch.no_grad():
        dense = model.res2(x)
        residual = report_resblock_passthrough(list(model.res2.blocks), x)
    assert not torch.allclose(dense, residual)


def test_vgg_has_no_skip_connections():
    model = _model("vgg", "plain", 0.25).eval()
    group = model.res2
    x = _fixed_input(2, 32, 8, 8)
    expected = x
    with torch.no_grad():
        for block in group.blocks:
            expected = F.mish(block(expected))
        assert torch.equal(group(x), expected)
    assert model.connect.kind == "sequential"


def test_width_multiplier_shrinks_params():
    full = count_params(_model("nodropout_concat", "dense"))
    half = count_params(_model("nodropout_concat", "dense", 0.5))
    quarter = count_params(_model("nodropout_concat", "dense", 0.25))
    assert quarter < half < full
    assert half < full / 3


@pytest.mark.parametrize("momentum", [0.1, None])
def test_bnsilu_matches_batchnorm_then_silu(momentum):
    torch.manual_seed(0)
    fused, ref = BNSiLU(8, momentum=momentum), nn.BatchNorm2d(8, momentum=momentum)
    with torch.no_grad():
        for m in (fused, ref):
            m.weight.copy_(torch.linspace(0.5, 1.5, 8))
            m.bias.copy_(torch.linspace(-0.2, 0.2, 8))
    for step in range(3):
        x = _fixed_input(4, 8, 5, 5) * (step + 1)
        torch.testing.assert_close(fused(x), F.silu(ref(x)))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(fused, name), getattr(ref, name))
    fused.eval(), ref.eval()
    x = _fixed_input(2, 8, 5, 5)
    torch.testing.assert_close(fused(x), F.silu(ref(x)))
    assert fused.state_dict().keys() == ref.state_dict().keys()


def test_channels_last_and_compile_fullgraph():
    model = _model("nodropout_concat", "dense", 0.25).eval()
    x = _fixed_input(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        cl = model.to(memory_format=torch.channels_last)
        out = cl(x.to(memory_format=torch.channels_last))
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
        torch._dynamo.reset()
        compiled = torch.compile(cl, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x.to(memory_format=torch.channels_last)), out)
    model.to(memory_format=torch.contiguous_format)


def test_forward_flops_restores_mode_and_scales_with_size():
    model = _model("deep", "residual", 0.25).train()
    mean = model.stem1[1].running_mean.clone()
    f32, f64 = forward_flops(model, 32), forward_flops(model, 64)
    assert model.training
    assert torch.equal(model.stem1[1].running_mean, mean)
    assert 3.5 * f32 < f64 < 4.5 * f32


@pytest.mark.parametrize("name,passthrough", [("resnet", None), ("", None),
                                              ("deep", "sideways"), ("vgg", "residual"),
                                              ("seed_best", "residual")])
def test_bad_names_raise_config_error(name, passthrough):
    with pytest.raises(ConfigError) as err:
        build_model(name, passthrough)
    assert isinstance(err.value, ValueError)
    assert "\n" not in str(err.value)


def test_unknown_arch_message_lists_valid_names():
    with pytest.raises(ConfigError, match="unknown model 'resnet'") as err:
        build_model("resnet")
    for name in ARCHS + ("seed_best",):
        assert name in str(err.value)


def test_cli_prints_name_and_params():
    out = subprocess.run([sys.executable, "-m", "engine.models"], cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=120).stdout
    lines = out.strip().splitlines()
    assert [line.split()[0] for line in lines] == NAMES
    for line in lines:
        assert re.fullmatch(r"[a-z_]+(-[a-z]+)? \d+", line), line
    counts = dict(line.split() for line in lines)
    assert int(counts["seed_best"]) == count_params(_model("nodropout_concat", "dense"))
