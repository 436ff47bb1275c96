"""Fused-kernel benchmark: forward+backward time and peak memory of each fused op against
eager PyTorch (the unfused reference) and against ``torch.compile`` of that reference
(inductor's own fusion), at the shapes the ``seed`` preset produces (the report's network,
batch 256 at 128x128, channels_last), as ratios measured in the same run.

    python -m benchmarks.kernels [--batch 256] [--dtype bf16|fp16|fp32] [--quick] [--json PATH]
    TRITON_INTERPRET=0 python -m benchmarks.kernels --compile-only [--family bn_silu|mish]
                                        # every kernel (of one family) for sm_90, no GPU needed

On a machine without CUDA it says that the Triton kernels' speed needs a GPU, runs a
correctness pass of them under TRITON_INTERPRET=1 on tiny shapes plus the sm_90 compile
check, times the CPU's own mish path against the reference at the cpu-demo shapes, and
exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

if not torch.cuda.is_available():  # before anything imports the Triton sources
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kernels  # noqa: E402
from kernels import reference  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# (C, H, W) of every BatchNorm+SiLU / mish pass-through in the seed model at 128x128
# (engine.models, seed_best = nodropout_concat + dense): stem1 BN at 128^2, ResBlock11/12 at
# 64^2, stem2 BN at 32^2, ResBlock2 / stem3 at 16^2, ResBlock3 / stem4 at 8^2, ResBlock4 at 4^2.
BN_SHAPES = [(64, 128, 128), (64, 64, 64), (128, 32, 32), (128, 16, 16), (128, 8, 8),
             (64, 8, 8), (64, 4, 4)]
# (C, H, W, K): K = 1 is residual_mish; the dense chains before block i have K = i
# (groups of 3 blocks -> up to 2, ResBlock2's 5 blocks -> up to 4).
MISH_SHAPES = [(64, 64, 64, 1), (64, 64, 64, 2), (128, 16, 16, 1), (128, 16, 16, 4),
               (128, 8, 8, 2), (64, 4, 4, 2)]


# --------------------------------------------------------------------------------------
# Compile-only check: every @triton.jit kernel through ptxas for sm_90 on any machine


def _signature(fn, const: dict, io_dtype: str) -> dict:
    """Triton signature from the kernels' naming convention: x/y/dy/dx pointers carry the
    activation dtype, other pointers fp32 (statistics, partials, weights), S/G tuples of K
    activation pointers, eps-like scalars fp32, the rest i32."""
    sig = {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name in ("S", "G"):
            sig[p.name] = tuple([f"*{io_dtype}"] * const["K"])
        elif p.name.endswith("_ptr"):
            sig[p.name] = f"*{io_dtype}" if p.name in ("x_ptr", "y_ptr", "dy_ptr", "dx_ptr") else "*fp32"
        elif p.name in ("eps", "momentum", "unbias", "inv_count"):
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "i32"
    return sig


def compile_check(arch: int = 90, family: str | None = None) -> int:
    """Compile each kernel (each constexpr variant) of ``family`` ("bn_silu", "mish", None =
    both) to a cubin for ``arch``; returns failures. Catches what the interpreter cannot:
    unsupported constructs, non-constexpr globals."""
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run --compile-only with TRITON_INTERPRET=0"
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels import _triton_batchnorm_silu as tb, _triton_mish as tm
    rows = dict(BLOCK_R=64, BLOCK_C=64)
    families = {"bn_silu": [
        (tb.bn_stats_partial, rows), (tb.bn_stats_combine, dict(BLOCK_P=64, BLOCK_C=64)),
        (tb.bn_running_update, dict(BLOCK_C=64)),
        (tb.bn_silu_apply, dict(HAS_W=True, HAS_B=True, **rows)),
        (tb.bn_silu_apply, dict(HAS_W=False, HAS_B=False, BLOCK_R=256, BLOCK_C=16)),
        (tb.bn_silu_bwd_reduce, dict(HAS_W=True, HAS_B=True, **rows)),
        (tb.bn_silu_bwd_dx, dict(HAS_W=True, HAS_B=True, TRAINING=True, **rows)),
        (tb.bn_silu_bwd_dx, dict(HAS_W=True, HAS_B=False, TRAINING=False, **rows)),
    ], "mish": [(fn, dict(K=k, BLOCK=1024)) for fn in (tm.mish_chain_fwd, tm.mish_chain_bwd) for k in (1, 4)]}
    variants = [v for name, vs in families.items() if family in (None, name) for v in vs]
    failures = 0
    for fn, const in variants:
        for io in ("bf16", "fp32"):
            name = f"{fn.__name__}[{','.join(f'{k}={v}' for k, v in const.items())}] {io}"
            try:
                src = ASTSource(fn=fn, signature=_signature(fn, const, io), constexprs=const)
                k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})
                print(f"  ok    {name}: {len(k.asm['cubin'])} B cubin")
            except Exception as e:  # report every kernel, then fail
                failures += 1
                print(f"  FAIL  {name}: {type(e).__name__}: {str(e).splitlines()[-1] if str(e) else ''}")
    print(f"compile check sm_{arch}: {len(variants) * 2 - failures}/{len(variants) * 2} compiled")
    return failures


# --------------------------------------------------------------------------------------
# Cases: (name, fused fn, reference fn, make_inputs)


def _bn_case(shape, batch, dtype, device):
    c, h, w = shape

    def make():
        x = torch.randn(batch, c, h, w, device=device, dtype=dtype).to(memory_format=torch.channels_last)
        weight = torch.randn(c, device=device)
        bias = torch.randn(c, device=device)
        stats = [torch.zeros(c, device=device), torch.ones(c, device=device)]
        return [x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_()], stats

    def fused(x, weight, bias, rm, rv):
        return kernels.bn_silu(x, weight, bias, rm, rv, True, 0.1, 1e-5, backend="triton")

    def ref(x, weight, bias, rm, rv):
        return reference.bn_silu(x, weight, bias, rm, rv, True, 0.1, 1e-5)

    return f"bn_silu {c}x{h}x{w}", fused, ref, make


def _mish_case(shape, batch, dtype, device):
    c, h, w, k = shape

    def make():
        ts = [torch.randn(batch, c, h, w, device=device, dtype=dtype).to(memory_format=torch.channels_last)
              for _ in range(k + 1)]
        return [t.requires_grad_() for t in ts], []

    def fused(x, *prev):
        return kernels.dense_residual_mish(x, list(prev), backend="triton")

    def ref(x, *prev):
        return reference.dense_residual_mish(x, list(prev))

    name = f"{'residual_mish' if k == 1 else f'dense_mish K={k}'} {c}x{h}x{w}"
    return name, fused, ref, make


def _fwd_bwd(fn, grads_of, args, dy):
    def run():
        fn(*args).backward(dy)
        for t in grads_of:
            t.grad = None
    return run


def _measure(run, device) -> tuple[float, float]:
    """(median ms of forward+backward, peak MiB above the inputs)."""
    import triton.testing
    run()
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run()
    torch.cuda.synchronize(device)
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    ms = triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")
    return ms, peak


def bench(args) -> list[dict]:
    import torch._dynamo
    device = torch.device(args.device)
    for knob in ("recompile_limit", "cache_size_limit"):  # one reference fn, one graph per shape
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    dtype = DTYPES[args.dtype]
    cases = [_bn_case(s, args.batch, dtype, device) for s in BN_SHAPES]
    cases += [_mish_case(s, args.batch, dtype, device) for s in MISH_SHAPES]
    if args.quick:
        cases = cases[1:2] + cases[len(BN_SHAPES):len(BN_SHAPES) + 2]
    results = []
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    print(f"{gpu}, torch {torch.__version__}, batch {args.batch}, "
          f"{args.dtype}, channels_last; forward+backward ms (median), peak MiB; "
          f"ratio = other / fused (> 1: fused is faster)")
    print(f"{'case':32s} {'fused':>8s} {'eager':>8s} {'compile':>8s} {'x eager':>8s} {'x comp':>8s}"
          f" {'MiB f/e/c':>18s}")
    for name, fused, ref, make in cases:
        inputs, extra = make()
        dy = torch.randn_like(fused(*inputs, *extra))
        compiled = torch.compile(ref, fullgraph=True, dynamic=False)
        t0 = time.perf_counter()
        compiled(*inputs, *extra).backward(dy)  # compile outside the timing
        compile_s = time.perf_counter() - t0
        row = {"case": name, "compile_s": round(compile_s, 1)}
        for label, fn in (("fused", fused), ("eager", ref), ("compile", compiled)):
            row[f"{label}_ms"], row[f"{label}_mib"] = _measure(_fwd_bwd(fn, inputs, inputs + extra, dy), device)
        row["vs_eager"] = row["eager_ms"] / row["fused_ms"]
        row["vs_compile"] = row["compile_ms"] / row["fused_ms"]
        results.append(row)
        print(f"{name:32s} {row['fused_ms']:8.3f} {row['eager_ms']:8.3f} {row['compile_ms']:8.3f} "
              f"{row['vs_eager']:8.2f} {row['vs_compile']:8.2f} "
              f"{row['fused_mib']:6.0f}/{row['eager_mib']:5.0f}/{row['compile_mib']:5.0f}")
    slower = [r["case"] for r in results if r["vs_compile"] < 1.0]
    print("inductor faster than the fused kernel on: " + (", ".join(slower) if slower else "none"))
    return results


# --------------------------------------------------------------------------------------
# CPU: the eager mish path's speed, the interpreter correctness pass

# (C, H, W, K) of the mish pass-throughs of the cpu-demo preset (width 0.25 at 32x32):
# ResBlock11/12 at 16^2, ResBlock2 at 4^2, ResBlock3 at 2^2, ResBlock4 at 1^2.
CPU_MISH_SHAPES = [(16, 16, 16, 1), (16, 16, 16, 2), (32, 4, 4, 1), (32, 4, 4, 4), (32, 2, 2, 2), (16, 1, 1, 2)]


def cpu_mish_speed(batch: int = 64, repeats: int = 5, iters: int = 20) -> list[dict]:
    """Forward+backward ms of the "auto" CPU path (`kernels.mish.mish_sum`, one exp) against
    the reference (aten mish) at the cpu-demo preset's shapes, fp32, channels_last; median of
    `repeats` timings of `iters` calls, both measured in the same run."""
    rows = []
    print(f"cpu mish, batch {batch}, fp32, channels_last, {torch.get_num_threads()} threads; fwd+bwd ms (median "
          f"of {repeats}); ratio = reference / eager")
    for c, h, w, k in CPU_MISH_SHAPES:
        ts = [torch.randn(batch, c, h, w).to(memory_format=torch.channels_last).requires_grad_() for _ in range(k + 1)]
        dy = torch.randn_like(ts[0])
        row = {"case": f"{'residual_mish' if k == 1 else f'dense_mish K={k}'} {c}x{h}x{w}"}
        for label, backend in (("eager", "auto"), ("reference", "torch")):
            run = _fwd_bwd(lambda x, *prev, b=backend: kernels.dense_residual_mish(x, list(prev), backend=b),
                           ts, ts, dy)
            run()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                for _ in range(iters):
                    run()
                times.append((time.perf_counter() - t0) / iters * 1e3)
            row[f"{label}_ms"] = round(sorted(times)[repeats // 2], 4)
        row["ratio"] = round(row["reference_ms"] / row["eager_ms"], 2)
        rows.append(row)
        print(f"{row['case']:32s} {row['eager_ms']:8.3f} {row['reference_ms']:8.3f} {row['ratio']:6.2f}x")
    return rows



def interpreter_pass() -> int:
    """Tiny shapes through the Triton kernels (interpreted) against the reference."""
    torch.manual_seed(0)
    worst = {}
    for layout in (torch.contiguous_format, torch.channels_last):
        x = (torch.randn(2, 3, 5, 7) * 2 + 1).to(memory_format=layout)
        w, b = torch.randn(3), torch.randn(3)
        outs = []
        for fn in (lambda *a: kernels.bn_silu(*a, backend="triton"), reference.bn_silu):
            xi, wi, bi = (t.clone().requires_grad_() for t in (x, w, b))
            stats = [torch.zeros(3), torch.ones(3)]
            y = fn(xi, wi, bi, *stats, True, 0.1, 1e-5)
            y.backward(torch.ones_like(y))
            outs.append([y, xi.grad, wi.grad, bi.grad, *stats])
        worst["bn_silu"] = max(worst.get("bn_silu", 0.0), *((a - r).abs().max().item() for a, r in zip(*outs)))
        for k in (1, 3):
            ts = [(torch.randn(2, 3, 5, 7) * 4).to(memory_format=layout) for _ in range(k + 1)]
            outs = []
            for fn in (lambda x, p: kernels.dense_residual_mish(x, p, backend="triton"),
                       reference.dense_residual_mish):
                ti = [t.clone().requires_grad_() for t in ts]
                y = fn(ti[0], ti[1:])
                y.backward(torch.ones_like(y))
                outs.append([y] + [t.grad for t in ti])
            worst[f"mish K={k}"] = max(worst.get(f"mish K={k}", 0.0),
                                       *((a - r).abs().max().item() for a, r in zip(*outs)))
    bad = {k: v for k, v in worst.items() if not v < 1e-4}
    for k, v in worst.items():
        print(f"  {k:12s} max |triton - reference| (fp32, fwd+bwd, both layouts) = {v:.2e}")
    return len(bad)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--quick", action="store_true", help="3 cases only")
    ap.add_argument("--json", help="write the result rows here")
    ap.add_argument("--compile-only", action="store_true", help="sm_90 compile check, then exit")
    ap.add_argument("--family", choices=("bn_silu", "mish"), help="--compile-only: this kernel family only")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # smoke tests of bench()
    args = ap.parse_args(argv)
    if args.compile_only:
        return 1 if compile_check(family=args.family) else 0
    if not torch.cuda.is_available():
        print("benchmarks.kernels: speed needs a CUDA GPU (none here); running the interpreter "
              "correctness pass and the sm_90 compile check instead.")
        failed = interpreter_pass()
        env = dict(os.environ, TRITON_INTERPRET="0")  # compiled-mode jit objects
        proc = subprocess.run([sys.executable, "-m", "benchmarks.kernels", "--compile-only"], env=env,
                              capture_output=True, text=True)
        print(proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-2000:])
        print("interpreter pass:", "ok" if not failed else f"{failed} kernel(s) off")
        rows = cpu_mish_speed()
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return 0
    results = bench(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
