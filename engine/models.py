"""The report's classifiers (Table 1) with its two pass-through styles.

Architectures (`ARCHS`, a column of Table 1 each): `vgg` (no residual connections),
`deep`, `dropout`, `nodropout_concat`; pass-throughs `residual` (x + block(x), then mish) and
`dense` (the sum of every earlier result before each block); `seed_best` =
nodropout_concat + dense, the report's best. `width` multiplies every channel count (CPU
presets shrink it); dropout follows Table 1 (none after BatchNorm in the NoDropout models).
Conv -> BatchNorm -> SiLU runs as the fused `kernels.BatchNormSiLU2d`, the mish residual
sums as `kernels.residual_mish` / `dense_residual_mish` (Triton on CUDA, the torch reference
elsewhere). `python -m engine.models` prints every variant's parameters and FLOPs.
Decisions the report leaves open and their reasons: docs/models.md.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import kernels
from loaders.common import ConfigError

ARCHS = ("vgg", "deep", "dropout", "nodropout_concat")
PASSTHROUGHS = ("residual", "dense")
PLAIN = "plain"  # vgg's pass-through: no skip connection
ALIASES = {"seed_best": ("nodropout_concat", "dense")}
MODEL_NAMES = ARCHS + tuple(ALIASES)

# Per-architecture settings read off Table 1 (see the module docstring).
# stem_drop: the conv dropouts (and the block / odd-block Dropout2d) are present.
_ARCH = {
    "vgg": dict(connection="sequential", ks12=5, stem_drop=True, taps=False),
    "deep": dict(connection="resconnect", ks12=3, stem_drop=True, taps=False),
    "dropout": dict(connection="concat", ks12=5, stem_drop=True, taps=False),
    "nodropout_concat": dict(connection="concat", ks12=5, stem_drop=False, taps=True),
}
BLOCKS = {"res11": 3, "res12": 3, "res2": 5, "res3": 3, "res4": 3}
TAPS = (32, 32, 64, 64, 64)  # Linear1..Linear5 output widths (sum 256)


# BatchNorm2d + SiLU as one module (an nn.BatchNorm2d subclass, so checkpoints load either
# way); its forward calls the fused op chosen by the kernels backend.
BNSiLU = kernels.BatchNormSiLU2d


def _ch(n: int, width: float) -> int:
    return max(8, int(round(n * width / 8)) * 8)


def _drop2d(p: float) -> nn.Module:
    return nn.Dropout2d(p) if p > 0 else nn.Identity()


def res_block(channels: int, kernel_size: int, dropout: float) -> nn.Sequential:
    """The report's ResBlock body: Conv -> BatchNorm+SiLU -> [Dropout2d] -> Conv ("same")."""
    pad = (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(channels, channels, kernel_size, padding=pad),
        BNSiLU(channels),
        _drop2d(dropout),
        nn.Conv2d(channels, channels, kernel_size, padding=pad),
    )


class PassThrough(nn.Module):
    """A group of ResBlocks chained by one of the report's pass-through styles.

    ``odd_dropout`` > 0 adds Dropout2d after every odd-indexed block (residual/plain only)."""

    def __init__(self, blocks: list[nn.Module], style: str, odd_dropout: float = 0.0):
        super().__init__()
        assert style in PASSTHROUGHS + (PLAIN,)
        self.style = style
        self.blocks = nn.ModuleList(blocks)
        rate = odd_dropout if style != "dense" else 0.0
        self.drops = nn.ModuleList(_drop2d(rate if i % 2 else 0.0) for i in range(len(blocks)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.style == "dense":
            sequence = [x]
            for i, block in enumerate(self.blocks):
                x = kernels.dense_residual_mish(x, sequence[:i])
                x = kernels.residual_mish(x, block(x))
                sequence.append(x)
            return x
        for block, drop in zip(self.blocks, self.drops):
            x = F.mish(block(x)) if self.style == PLAIN else kernels.residual_mish(x, block(x))
            x = drop(x)
        return x


class Connection(nn.Module):
    """How ResBlock11 (res1) and ResBlock12 (res2) combine: ``sequential`` (vgg),
    ``resconnect`` (deep: y = res1(x) + x; out = res2(y) + y) or ``concat``."""

    def __init__(self, kind: str, res1: nn.Module, res2: nn.Module):
        super().__init__()
        self.kind, self.res1, self.res2 = kind, res1, res2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "concat":
            return torch.cat([self.res1(x), self.res2(x)], dim=1)
        if self.kind == "resconnect":
            y = self.res1(x) + x
            return self.res2(y) + y
        return self.res2(self.res1(x))


def stem(cin: int, cout: int, kernel_size: int, stride: int, dropout: float) -> nn.Sequential:
    """ConvN -> BatchNorm+SiLU -> MaxPool(2) -> Dropout2d (Table 1's conv rows)."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=(kernel_size - 1) // 2),
        BNSiLU(cout),
        nn.MaxPool2d(2),
        _drop2d(dropout),
    )


class Tap(nn.Module):
    """A projection tap: global average pool, then Linear."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.linear = nn.Linear(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.mean(dim=(2, 3)))


def head(cin: int, hidden: int, num_classes: int, scale: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(cin, hidden), nn.BatchNorm1d(hidden), nn.GELU(), nn.Dropout(0.3 * scale),
        nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.GELU(), nn.Dropout(0.2 * scale),
        nn.Linear(hidden, num_classes),
    )


class ReportNet(nn.Module):
    """One column of Table 1; see the module docstring for the layers and decisions."""

    def __init__(self, arch: str, passthrough: str, width: float = 1.0,
                 num_classes: int = 10, dropout: float = 1.0):
        super().__init__()
        cfg = _ARCH[arch]
        self.arch, self.passthrough = arch, passthrough
        c64, c128 = _ch(64, width), _ch(128, width)
        conv_scale = dropout if cfg["stem_drop"] else 0.0  # 0 removes every conv dropout
        odd = 0.1 * conv_scale

        def group(nominal: int, n: int, ks: int) -> PassThrough:
            rate = (0.15 if nominal < 128 else 0.25) * conv_scale
            ch = _ch(nominal, width)
            return PassThrough([res_block(ch, ks, rate) for _ in range(n)], passthrough, odd)

        self.stem1 = stem(3, c64, 7, 1, 0.15 * conv_scale)
        self.connect = Connection(cfg["connection"], group(64, BLOCKS["res11"], 3),
                                  group(64, BLOCKS["res12"], cfg["ks12"]))
        c_conn = 2 * c64 if cfg["connection"] == "concat" else c64
        self.stem2 = stem(c_conn, c128, 3, 2, 0.25 * conv_scale)
        self.res2 = group(128, BLOCKS["res2"], 3)
        self.stem3 = stem(c128, c128, 5, 1, 0.25 * conv_scale)
        self.res3 = group(128, BLOCKS["res3"], 3)
        self.stem4 = stem(c128, c64, 3, 1, 0.25 * conv_scale)
        self.res4 = group(64, BLOCKS["res4"], 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        tap_out = [_ch(t, width) for t in TAPS]
        if cfg["taps"]:
            self.taps = nn.ModuleList(Tap(cin, cout) for cin, cout in
                                      zip((c128, c128, c64, c64, c64), tap_out))
            features = sum(tap_out)
        else:
            self.taps = None
            features = c64
        self.head = head(features, _ch(256, width), num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem2(self.connect(self.stem1(x)))
        t1 = self.stem3(self.res2(x))
        t2 = self.res3(t1)
        t3 = self.stem4(t2)
        t4 = self.res4(t3)
        t5 = self.pool(t4)
        if self.taps is None:
            return self.head(t5.flatten(1))
        feats = [tap(t) for tap, t in zip(self.taps, (t1, t2, t3, t4, t5))]
        return self.head(torch.cat(feats, dim=1))


# The stems halve the image five times (stem2's stride-2 conv and four max-pools), so the
# last stem needs a 2x2 map: 32px (engine.config.MIN_SIZE) is the smallest input accepted.


def _resolve(name: str, passthrough: str | None) -> tuple[str, str]:
    if name in ALIASES:
        arch, default = ALIASES[name]
        if passthrough not in (None, default):
            raise ConfigError(f"model {name!r} is {arch} + {default}; drop the pass-through "
                              f"{passthrough!r} or use model {arch!r}")
        return arch, default
    if name not in ARCHS:
        raise ConfigError(f"unknown model {name!r}: valid names are {', '.join(MODEL_NAMES)}")
    if name == "vgg":
        if passthrough not in (None, PLAIN):
            raise ConfigError(f"model 'vgg' has no residual connections, so no pass-through "
                              f"{passthrough!r}: leave it unset (vgg is {PLAIN!r})")
        return name, PLAIN
    if passthrough is None:
        return name, "residual"
    if passthrough not in PASSTHROUGHS:
        raise ConfigError(f"unknown pass-through {passthrough!r}: valid ones are "
                          f"{', '.join(PASSTHROUGHS)}")
    return name, passthrough


def build_model(name: str, passthrough: str | None = None, width: float = 1.0,
                num_classes: int = 10, dropout: float = 1.0) -> nn.Module:
    """Build ``name`` (an arch in ``ARCHS`` or ``seed_best``). ``passthrough`` None picks the
    default: ``residual``, ``dense`` for ``seed_best``, ``plain`` for ``vgg``.
    Raises ``ConfigError`` for unknown names or bad settings."""
    arch, style = _resolve(name, passthrough)
    if not width > 0:
        raise ConfigError(f"width must be > 0, got {width}")
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    if dropout < 0:
        raise ConfigError(f"dropout scale must be >= 0, got {dropout}")
    return ReportNet(arch, style, width, num_classes, dropout)


def variants() -> list[tuple[str, str, str]]:
    """Every distinct model as (name, arch, passthrough)."""
    out = [("vgg", "vgg", PLAIN)]
    out += [(f"{a}-{p}", a, p) for a in ARCHS if a != "vgg" for p in PASSTHROUGHS]
    out += [(n, *ALIASES[n]) for n in ALIASES]
    return out


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: nn.Module, size: int) -> int:
    """Forward FLOPs per image at ``size`` x ``size`` (FlopCounterMode at batch 2, halved).
    Runs in eval mode without grad so BatchNorm statistics are untouched."""
    p = next(model.parameters())
    x = torch.randn(2, 3, size, size, device=p.device, dtype=p.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m engine.models",
        description="Print each model variant as 'name params' (with --size: "
                    "'name params forward_flops_per_image').")
    ap.add_argument("--width", type=float, default=1.0, help="channel width multiplier")
    ap.add_argument("--size", type=int, default=None,
                    help="also print forward FLOPs per image at this input size")
    args = ap.parse_args(argv)
    try:
        for name, arch, style in variants():
            model = build_model(arch, style, width=args.width)
            line = f"{name} {count_params(model)}"
            if args.size:
                line += f" {forward_flops(model, args.size)}"
            print(line, flush=True)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
