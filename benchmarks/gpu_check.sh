#!/usr/bin/env bash
# Every GPU check in one command, for a lent GPU box (torch >= 2.11, no DALI/FFCV there unless
# carried). Usage: bash benchmarks/gpu_check.sh [OUTDIR] [SECTION ...]
# With no SECTION every section runs (about 12 minutes on one H200: more than one 8-minute
# call, so split a lease in two, e.g. `... $OUT engine kernels_tests augment_resident` then
# `... $OUT kernels_bench train_bench dali ffcv`). Each section runs independently; a failing
# section is reported and the rest still run. Logs and JSON land in OUTDIR.
set -u
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-/tmp/gpu_check}}
shift || true
ONLY=" $* "
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
status=0
section() {  # section NAME CMD...: run one check, log it, remember failures
  local name=$1; shift
  if [ "$ONLY" != "  " ] && [[ "$ONLY" != *" $name "* ]]; then return; fi
  echo "=== $name"
  if ! timeout 300 "$@" 2>&1 | tee "$OUT/$name.log"; then echo "!!! $name failed"; status=1; fi
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"

# --- sections (one per feature; keep each short) ---
section kernels_tests $PY -m pytest -q -p no:cacheprovider tests/test_kernels_batchnorm_silu.py tests/test_kernels_mish.py   # fused kernels on CUDA (~1 min)
section kernels_bench $PY -m benchmarks.kernels --json "$OUT/kernels.json"           # fused vs eager vs inductor (~2-3 min)
section dali bash -c "if ! $PY -c 'import nvidia.dali' 2>/dev/null; then echo 'skip: nvidia.dali is not importable here (carry the nvidia-dali-cuda130 wheel to run the DALI GPU checks)'; exit 0; fi; $PY -m pytest -q -p no:cacheprovider tests/test_dali.py || exit 1; data=synthetic; [ -f ../shared/datasets/cifar10-jpeg.tar.gz ] && data=shared; $PY -m benchmarks.throughput --data \$data --cache-dir /tmp/gpu_check_cache --loaders dali --device cuda --batches 16 --json $OUT/dali_throughput.json"   # DALI GPU decode + augment: tests on CUDA, then throughput vs torchvision (~2-3 min)
section augment_resident bash -c "$PY -m pytest -q -p no:cacheprovider tests/test_augment.py tests/test_resident.py || exit 1; $PY -m loaders.augment --device cuda --batch-size 512 --dtype bfloat16 || exit 1; data=synthetic; [ -f ../shared/datasets/cifar10-jpeg.tar.gz ] && data=shared; $PY -m benchmarks.throughput --data \$data --cache-dir /tmp/gpu_check_cache --loaders torchvision,resident --device cuda --batches 16 --json $OUT/resident_throughput.json"   # on-device augmentation + resident loader: tests on CUDA, augment-only images/s, throughput vs torchvision (~2-3 min)
section ffcv bash -c "if ! $PY -c 'import ffcv' 2>/dev/null; then echo 'skip: ffcv is not importable here (no FFCV on this GPU box: it builds from source against Debian opencv/turbojpeg; pip install -e .[ffcv] to run the FFCV GPU checks)'; exit 0; fi; $PY -m pytest -q -p no:cacheprovider tests/test_ffcv.py || exit 1; data=synthetic; [ -f ../shared/datasets/cifar10-jpeg.tar.gz ] && data=shared; $PY -m benchmarks.throughput --data \$data --cache-dir /tmp/gpu_check_cache --loaders torchvision,ffcv --device cuda --batches 16 --json $OUT/ffcv_throughput.json"   # FFCV host decode -> pinned async copy -> on-device augmentation: tests on CUDA, throughput vs torchvision (~2-3 min)
# The engine on the real target: the seed preset (full model, 128px, bf16, compiled, Triton
# kernels) for ~180 steps on synthetic data; prints images/s per epoch, compile time and
# compile counts (summary.json), then the training rows: eager vs compiled x kernels x AMP,
# with achieved TFLOP/s.
section engine $PY -m engine.train --preset seed --loader resident --epochs 2,1,1,0 --batch-size 256 --cache-dir /tmp/gpu_check_cache --out "$OUT/runs" --name seed-short
section train_bench $PY -m benchmarks.throughput --train --preset seed --augment on --loaders resident,torchvision --batches 16 --steps 20 --passes 3 --cache-dir /tmp/gpu_check_cache --json "$OUT/train_throughput.json"

exit $status
