#!/usr/bin/env bash
# The GPU checks, for a lent GPU box (torch >= 2.11; no DALI/FFCV there unless carried).
#   bash benchmarks/gpu_check.sh OUTDIR [GROUP|SECTION ...]   (no GROUP/SECTION: every section)
#   bash benchmarks/gpu_check.sh --list                         sections, timeouts, needs, groups
# Each section runs under its own timeout. The sections of one group have timeouts adding up to
# at most 420 s, so one group plus the offline setup (at most 60 s) fits one 8-minute device
# call even when every section times out. docs/gpu.md says which group goes in which call.
# Status per section: pass | fail (non-zero exit, or no CUDA) | timeout (killed at its timeout) |
# skip (a module it needs does not import: no DALI, FFCV, pytest...; the note says which).
# OUTDIR gets at most four files, each rewritten as every section ends, so a call killed at
# its limit still returns what finished: summary.tsv (section, status, seconds, note),
# sections.log (the tail of each section's log), results.tgz (every output but checkpoints)
# and env.txt (GPU, versions, setup, what imports). The full outputs stay in $GPU_CHECK_WORK.
# Exit: 0 when nothing failed or timed out, 1 when a section failed, 3 when a section timed
# out and none failed, 2 on a usage error.
# Test hooks: GPU_CHECK_EXTRA=FILE is sourced after the built-in sections (more `def`s and
# `group`s); GPU_CHECK_PREFLIGHT=0 skips the offline setup and the environment report.
set -u -o pipefail
cd "$(dirname "$0")/.."

declare -a ORDER=()
declare -A CMD=() TIMEOUT=() NEEDS=() GROUP=() HAVE=() WHY=()
def() {  # def NAME TIMEOUT_S NEEDS CMD: NEEDS is '-' or comma-separated 'cuda' / Python modules
  ORDER+=("$1"); TIMEOUT[$1]=$2; NEEDS[$1]=$3; CMD[$1]=${4//$'\n'/ }  # CMD may span lines
}
group() { GROUP[$1]="${*:2}"; }  # group NAME SECTION...
GROUP_BUDGET=420 SETUP_TIMEOUT=60

export PY=${PY:-python3} PYTHONUNBUFFERED=1 CACHE=/tmp/gpu_check_cache DATA=synthetic
[ -f ../shared/datasets/cifar10-jpeg.tar.gz ] && DATA=shared
# benchmarks.throughput as the old single train_bench section ran it; each section below
# measures a subset of its rows (--rows, --combos) so each fits its own timeout.
export TP="$PY -m benchmarks.throughput --preset seed --augment on --loaders resident,torchvision \
--batches 16 --steps 20 --passes 3 --cache-dir $CACHE"

compile_counts() {  # compile_counts RUN_DIR: the engine's compile figures; fails on a recompile after warm-up
  "$PY" - "$1/summary.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
a, b = s["compiles_after_warmup"], s["compiles_at_end"]
print(f"compile counts: {a} graphs after warm-up, {b} at the end | compile {s['compile_s']:.1f} s | "
      f"{s['images']} images, train+eval {s['train_eval_s']:.1f} s")
sys.exit(0 if a == b else f"FAIL: recompiled during training ({a} graphs after warm-up, {b} at the end)")
EOF
}
export -f compile_counts

# --- sections: def NAME TIMEOUT NEEDS CMD (run by bash -c with PY, CACHE, DATA, TP, OUT, WORK set) ---
# Fused Triton kernels on CUDA against the torch reference (~1 min).
def kernels_tests 120 cuda,pytest,triton '$PY -m pytest -q -p no:cacheprovider tests/test_kernels*.py'
# The seed preset (full model, 128px, bf16, compiled, Triton kernels) on synthetic data, 4 stages:
# images/s per epoch, compile time; fails when anything recompiled after the warm-up (~2-3 min).
def engine 240 cuda,torchvision,tqdm,matplotlib '$PY -m engine.train --preset seed --loader resident
  --epochs 2,1,1,0 --batch-size 256 --cache-dir $CACHE --out $WORK/runs --name seed-short &&
  compile_counts $WORK/runs/seed-short'
# Host syncs per step: one eager epoch under torch.cuda.set_sync_debug_mode("warn"), syncs counted
# per source line; fails when a line syncs on more than half the steps (~1 min).
def host_syncs 60 cuda,torchvision,tqdm,matplotlib '$PY -m benchmarks.host_syncs --preset seed --loader resident
  --epochs 1,0,0,0 --batch-size 256 --no-compile --cache-dir $CACHE --out $WORK/runs --name host-syncs'
# Fused ops vs eager vs inductor: forward+backward time and peak memory (~2-3 min).
def kernels_bench 210 cuda,triton '$PY -m benchmarks.kernels --json $WORK/kernels.json'
# Loader rows (torchvision, resident) and the eager training rows, torch vs triton x fp32 vs bf16.
def train_eager 210 cuda,torchvision '$TP --rows loader,train --combos "0/*/*" --json $WORK/train_eager.json'
# Compiled training rows in bf16, torch vs triton kernels, with the eager fp32 baseline (~3 min cold).
def train_compiled 270 cuda,torchvision,triton '$TP --rows train --combos "0/torch/off,1/*/bf16"
  --json $WORK/train_compiled.json'
# Compiled training rows in fp32 (~3 min cold).
def train_compiled_fp32 270 cuda,torchvision,triton '$TP --rows train --combos "0/torch/off,1/*/off"
  --json $WORK/train_compiled_fp32.json'
# Loader + compiled step together per loader, with the fraction of time waiting for data.
def train_e2e 150 cuda,torchvision '$TP --rows end_to_end --json $WORK/train_e2e.json'
# On-device augmentation + resident loader: tests on CUDA, augment-only images/s, throughput.
def augment_resident 180 cuda,pytest,torchvision '$PY -m pytest -q -p no:cacheprovider tests/test_augment.py
  tests/test_resident.py && $PY -m loaders.augment --device cuda --batch-size 512 --dtype bfloat16 &&
  $PY -m benchmarks.throughput --data $DATA --cache-dir $CACHE --loaders torchvision,resident --device cuda
  --batches 16 --json $WORK/resident_throughput.json'
# DALI GPU decode + augment: tests on CUDA, then throughput vs torchvision.
def dali 240 cuda,pytest,torchvision,nvidia.dali '$PY -m pytest -q -p no:cacheprovider tests/test_dali.py &&
  $PY -m benchmarks.throughput --data $DATA --cache-dir $CACHE --loaders dali --device cuda --batches 16
  --json $WORK/dali_throughput.json'
# FFCV host decode -> pinned async copy -> on-device augmentation (FFCV builds from source: not
# on the GPU box unless built there).
def ffcv 150 cuda,pytest,torchvision,ffcv '$PY -m pytest -q -p no:cacheprovider tests/test_ffcv.py &&
  $PY -m benchmarks.throughput --data $DATA --cache-dir $CACHE --loaders torchvision,ffcv --device cuda
  --batches 16 --json $WORK/ffcv_throughput.json'

# --- groups: one device call each (timeouts add up to at most GROUP_BUDGET) ---
group core engine kernels_tests host_syncs
group bench kernels_bench train_eager
group loaders dali augment_resident
group compiled train_compiled train_e2e
group extra train_compiled_fp32 ffcv

[ -n "${GPU_CHECK_EXTRA:-}" ] && source "$GPU_CHECK_EXTRA"

list() {
  local name g t
  printf '%-20s %8s  %s\n' section timeout needs
  for name in "${ORDER[@]}"; do printf '%-20s %7ss  %s\n' "$name" "${TIMEOUT[$name]}" "${NEEDS[$name]}"; done
  echo
  echo "each group: at most ${GROUP_BUDGET} s of section timeouts, after a setup of at most ${SETUP_TIMEOUT} s"
  for g in $(printf '%s\n' "${!GROUP[@]}" | sort); do
    t=0; for name in ${GROUP[$g]}; do t=$((t + TIMEOUT[$name])); done
    printf 'group %-14s %4ss  %s\n' "$g" "$t" "${GROUP[$g]}"
  done
}
if [ "${1:-}" = --list ]; then list; exit 0; fi

export OUT=${1:-${OUT:-/tmp/gpu_check}}
shift || true
declare -a SELECTED=()
[ $# -gt 0 ] || set -- "${ORDER[@]}"
for arg in "$@"; do
  if [ -n "${GROUP[$arg]+x}" ]; then SELECTED+=(${GROUP[$arg]})
  elif [ -n "${CMD[$arg]+x}" ]; then SELECTED+=("$arg")
  else echo "gpu_check: no section or group '$arg'" >&2; list >&2; exit 2; fi
done
mkdir -p "$OUT"
export WORK=${GPU_CHECK_WORK:-/tmp/gpu_check_work/$(date +%Y%m%d-%H%M%S)-$$}
mkdir -p "$WORK"
SUMMARY=$OUT/summary.tsv
[ -s "$SUMMARY" ] || printf 'section\tstatus\tseconds\tnote\n' >"$SUMMARY"
worst=0; for name in "${SELECTED[@]}"; do worst=$((worst + TIMEOUT[$name])); done
if [ "$worst" -gt "$GROUP_BUDGET" ]; then
  echo "gpu_check: note: these sections may take up to ${worst} s, more than one 8-minute device call"
fi

have() {  # have NEED: 0 when the prerequisite is there (checked once); WHY[NEED] says why not
  local need=$1 err
  if [ -z "${HAVE[$need]+x}" ]; then
    if [ "$need" = cuda ]; then
      err=$("$PY" -c 'import torch; assert torch.cuda.is_available(), "torch.cuda.is_available() is False"' 2>&1)
    else
      err=$("$PY" -c "import $need" 2>&1)
    fi
    HAVE[$need]=$?
    WHY[$need]="$need: $(tail -n 1 <<<"$err")"
  fi
  return "${HAVE[$need]}"
}

if [ "${GPU_CHECK_PREFLIGHT:-1}" != 0 ]; then
  {
    echo "# $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?') | sections: ${SELECTED[*]}"
    echo "# work dir: $WORK"
    if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    else echo "no nvidia-smi"; fi
    bundle=${GPU_BUNDLE:-.gpu_bundle}
    if [ -d "$bundle" ]; then timeout -k 5 "$SETUP_TIMEOUT" bash benchmarks/gpu_setup.sh "$bundle" \
      || echo "setup: exit $? (timeout: 124)"; fi
    "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__)"
    for need in cuda triton torchvision pytest tqdm matplotlib nvidia.dali ffcv; do
      if have "$need"; then echo "have $need"; else echo "missing ${WHY[$need]}"; fi
    done
  } >"$OUT/env.txt" 2>&1
  cat "$OUT/env.txt"
  # a skipped DALI section names what the setup had (e.g. "1 of 3 parts here; still to carry ...")
  dali_note=$(grep -m 1 '^setup: DALI' "$OUT/env.txt")
  [ "${HAVE[nvidia.dali]}" = 0 ] || [ -z "$dali_note" ] || WHY[nvidia.dali]+=" | $dali_note"
fi

declare -a ROWS=()
failed=0 timed_out=0
record() {  # record NAME STATUS SECONDS NOTE: summary line now, results refreshed
  ROWS+=("$1"$'\t'"$2"$'\t'"$3"$'\t'"$4")
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$SUMMARY"
  { echo "=== $1: $2 ($3 s) $4"; [ -f "$WORK/$1.log" ] && tail -n 300 "$WORK/$1.log"; } >>"$OUT/sections.log"
  tar -czf "$OUT/results.tgz.part" --exclude='*.pt' -C "$WORK" . && mv -f "$OUT/results.tgz.part" "$OUT/results.tgz"
}
summary() {
  echo
  printf '%-20s %-8s %8s  %s\n' section status seconds note
  local row
  for row in "${ROWS[@]}"; do
    IFS=$'\t' read -r n s t note <<<"$row"; printf '%-20s %-8s %8s  %s\n' "$n" "$s" "$t" "$note"
  done
  echo "summary: $SUMMARY | outputs: $WORK"
}
run() {  # run NAME TIMEOUT: the section's command; output to $WORK/NAME.log, and to stdout as it comes
  local log=$WORK/$1.log tail_pid rc
  : >"$log"
  # No pipe into tee: a grandchild that outlives the timeout would hold a pipe open, not a file.
  timeout -k 10 "$2" bash -c "${CMD[$1]}" >>"$log" 2>&1 </dev/null &
  SECTION_PID=$!
  tail -n +1 -s 0.2 -f --pid="$SECTION_PID" "$log" &
  tail_pid=$!
  wait "$SECTION_PID"; rc=$?
  wait "$tail_pid"
  SECTION_PID=""
  return "$rc"
}
SECTION_PID=""
trap '[ -n "$SECTION_PID" ] && kill -TERM "$SECTION_PID"; echo "gpu_check: interrupted"; summary; exit 130' INT TERM

for name in "${SELECTED[@]}"; do
  skip=""
  for need in ${NEEDS[$name]//,/ }; do
    [ "$need" = - ] || have "$need" || { skip="missing ${WHY[$need]}"; break; }
  done
  if [ -n "$skip" ]; then  # no GPU is no reason to pass a GPU check: that one fails
    status=skip; [ "$need" = cuda ] && status=fail failed=1
    echo "=== $name: $status ($skip)"; record "$name" "$status" 0 "$skip"; continue
  fi
  t=${TIMEOUT[$name]}
  echo "=== $name (timeout ${t} s)"
  t0=$EPOCHREALTIME
  run "$name" "$t"
  rc=$?
  secs=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
  if [ "$rc" = 0 ]; then status=pass note=""
  elif { [ "$rc" = 124 ] || [ "$rc" = 137 ]; } && awk -v s="$secs" -v t="$t" 'BEGIN { exit !(s >= t - 0.5) }'; then
    status=timeout note="killed at its ${t} s timeout"; timed_out=1
  else
    status=fail note="exit $rc"; failed=1
  fi
  echo "=== $name: $status ($secs s) $note"
  record "$name" "$status" "$secs" "$note"
done
summary
if [ "$failed" = 1 ]; then exit 1; elif [ "$timed_out" = 1 ]; then exit 3; fi
exit 0
