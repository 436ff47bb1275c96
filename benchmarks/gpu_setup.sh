#!/usr/bin/env bash
# Offline install, on the GPU box, of what benchmarks/gpu_bundle.py built and device calls
# carried (docs/gpu.md). gpu_check.sh runs it first when .gpu_bundle exists; alone:
#   bash benchmarks/gpu_setup.sh [BUNDLE_DIR] [--no-install]        (default .gpu_bundle)
# - BUNDLE/base: each line `requirement module` of base/requirements.txt whose module does not
#   import is installed from that wheelhouse (pip --no-index); what imports is left alone, so
#   the box's own torchvision stays.
# - BUNDLE/dali-partN: parts of dali.tar.xz. Each call's parts are copied to $GPU_BUNDLE_STASH
#   (/tmp/gpu_bundle_stash: it lasts while the machine stays warm, i.e. over back-to-back
#   calls); once every part named in dali.parts is there: cat, sha256sum -c, untar, and
#   pip install --no-index --no-deps of its wheels. --no-install stops before pip (tests).
set -u -o pipefail
cd "$(dirname "$0")/.."
BUNDLE=.gpu_bundle INSTALL=1
for arg in "$@"; do if [ "$arg" = --no-install ]; then INSTALL=0; else BUNDLE=$arg; fi; done
PY=${PY:-python3}
STASH=${GPU_BUNDLE_STASH:-/tmp/gpu_bundle_stash}
pip_offline() { "$PY" -m pip install -q --no-index --no-cache-dir --disable-pip-version-check "$@"; }
imports() { "$PY" -c "import $1" >/dev/null 2>&1; }

if [ -f "$BUNDLE/base/requirements.txt" ]; then
  while read -r req mod; do
    case $req in '' | '#'*) continue ;; esac
    if imports "$mod"; then echo "setup: $req: already there"; continue; fi
    if [ "$INSTALL" = 0 ]; then echo "setup: $req: missing (--no-install)"; continue; fi
    pip_offline --find-links "$BUNDLE/base" "$req" || pip_offline --no-deps --find-links "$BUNDLE/base" "$req"
    if imports "$mod"; then echo "setup: $req: installed"; else echo "setup: $req: still does not import"; fi
  done <"$BUNDLE/base/requirements.txt"
fi

if [ "$INSTALL" = 1 ] && imports nvidia.dali; then
  echo "setup: DALI: already there"
elif compgen -G "$BUNDLE/dali-part*/dali.parts" >/dev/null || [ -f "$STASH/dali.parts" ]; then
  mkdir -p "$STASH"
  for f in "$BUNDLE"/dali-part*/*; do [ -f "$f" ] && cp -f "$f" "$STASH/"; done
  mapfile -t parts <"$STASH/dali.parts"
  missing=()
  for p in "${parts[@]}"; do [ -f "$STASH/$p" ] || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: DALI: $((${#parts[@]} - ${#missing[@]})) of ${#parts[@]} parts here; still to carry (in the" \
      "next back-to-back call, while $STASH lasts): ${missing[*]}"
  elif (cd "$STASH" && cat "${parts[@]}" >dali.tar.xz && sha256sum -c --quiet dali.sha256); then
    rm -rf "$STASH/wheels"
    "$PY" -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')" \
      "$STASH/dali.tar.xz" "$STASH/wheels" || exit 1
    echo "setup: DALI: ${#parts[@]} parts reassembled and checked: $(ls "$STASH/wheels" | tr '\n' ' ')"
    if [ "$INSTALL" = 1 ]; then
      pip_offline --no-deps "$STASH"/wheels/*.whl
      "$PY" -c "import nvidia.dali as d; print('setup: DALI', d.__version__, 'installed')" || exit 1
    fi
  else
    echo "setup: DALI: the reassembled dali.tar.xz does not match dali.sha256"; exit 1
  fi
fi
exit 0
