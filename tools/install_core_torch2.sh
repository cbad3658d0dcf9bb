#!/usr/bin/env bash
# A second environment (./.venv-core) with a current torch 2.x and *no k2*, to prove the core
# (quantizers, modules, plans, export, search, LM) does not need k2. Idempotent.
#
# Python: $CORE_PYTHON, else python3.11 / python3 on PATH (must be >= 3.10).
# torch:  $CORE_TORCH (a pip requirement), else torch==2.13.0 (a CPU wheel of it lies on these
#         machines' disk for Python 3.11; elsewhere pip downloads it).
set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$top/.venv-core"
log() { echo "[install-core] $*"; }
stamp="$venv/.k2quant-install-stamp"
want=$(cat "$top/setup.cfg" | sha256sum | cut -d' ' -f1)
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  log "up to date: $venv"; exit 0
fi
python="${CORE_PYTHON:-}"
if [ -z "$python" ]; then
  for c in python3.11 python3.12 python3; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)'; then
      python=$(command -v "$c"); break
    fi
  done
fi
[ -n "$python" ] || { echo "[install-core] error: no Python >= 3.10 found; set CORE_PYTHON" >&2; exit 1; }
log "using $python ($("$python" --version 2>&1))"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
# torch first, so that the CPU build on disk is used when the machine has one.
"$venv/bin/python" -m pip install -q "${CORE_TORCH:-torch==2.13.0}"
"$venv/bin/python" -m pip install -q -e "$top[dev,onnx]"  # onnx: the integer model's ONNX export
"$venv/bin/python" -c 'import torch, importlib.util as u; print("[install-core] torch", torch.__version__, "k2 present:", u.find_spec("k2") is not None)'
echo "$want" > "$stamp"
