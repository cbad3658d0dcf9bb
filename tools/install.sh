#!/usr/bin/env bash
# Install k2quant and its known-good k2 stack into ./.venv (idempotent).
#
# k2 from the package registry exists only as k2==1.23.4, built for Python 3.9 and
# torch==1.13.1, so this script needs a Python 3.9. It looks, in order, at:
#   1. $PYTHON (if set),
#   2. python3.9 on PATH,
#   3. pyenv's 3.9 interpreters ($PYENV_ROOT/versions/3.9.*, default ~/.pyenv).
# Re-running it is quick: it does nothing when setup.cfg and tools/constraints.txt have not
# changed since the last successful install.
#
# --with-sctk also installs NIST SCTK (sclite, sc_stats, hubscr.pl: eval2000 scoring and
# MAPSSWE) and sox from the Debian/Ubuntu packages 'sctk' and 'sox' when they are missing; that
# needs root (apt-get). Without root it says what to run. --sctk-only does only that.
#
# Usage: tools/install.sh [--venv DIR] [--with-sctk | --sctk-only]
set -euo pipefail

top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$top/.venv"
with_sctk=false
sctk_only=false
while [ $# -gt 0 ]; do
  case "$1" in
    --venv) venv="$2"; shift 2 ;;
    --with-sctk) with_sctk=true; shift ;;
    --sctk-only) with_sctk=true; sctk_only=true; shift ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "tools/install.sh: unknown option '$1' (expected --venv DIR, --with-sctk, --sctk-only)" >&2; exit 2 ;;
  esac
done

log() { echo "[install] $*"; }

have_sctk() {
  for t in sclite sc_stats hubscr.pl; do
    command -v "$t" >/dev/null 2>&1 || [ -x "/usr/lib/sctk/bin/$t" ] || \
      { [ -n "${SCTK_BIN:-}" ] && [ -x "$SCTK_BIN/$t" ]; } || return 1
  done
}
if [ "$with_sctk" = true ]; then
  if have_sctk && command -v sox >/dev/null 2>&1; then
    log "SCTK and sox: already installed"
  elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing the Debian packages sctk and sox (apt-get)"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq sctk sox >/dev/null
    have_sctk || { echo "[install] error: 'apt-get install sctk' did not provide sclite, sc_stats and hubscr.pl" >&2; exit 1; }
    log "SCTK: $(ls /usr/lib/sctk/bin/sclite 2>/dev/null || command -v sclite)"
  else
    cat >&2 <<MSG
[install] error: NIST SCTK (sclite, sc_stats, hubscr.pl) or sox is missing and this is not a
  root shell with apt-get. Install them yourself, e.g.
    sudo apt-get install sctk sox          (Debian/Ubuntu; tools land in /usr/lib/sctk/bin)
  or build SCTK from NIST's sources (usnistgov/SCTK: make config all install) and
  set SCTK_BIN to its bin directory.
MSG
    exit 1
  fi
  [ "$sctk_only" = true ] && exit 0
fi

stamp="$venv/.k2quant-install-stamp"
want=$(cat "$top/setup.cfg" "$top/tools/constraints.txt" | sha256sum | cut -d' ' -f1)
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  log "up to date: $venv ($("$venv/bin/python" --version 2>&1))"
  exit 0
fi

is_py39() { "$1" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 9) else 1)' 2>/dev/null; }

python=""
candidates=()
[ -n "${PYTHON:-}" ] && candidates+=("$PYTHON")
command -v python3.9 >/dev/null 2>&1 && candidates+=("$(command -v python3.9)")
pyenv_root="${PYENV_ROOT:-$HOME/.pyenv}"
for p in "$pyenv_root"/versions/3.9*/bin/python3.9 "$pyenv_root"/versions/3.9*/bin/python; do
  [ -x "$p" ] && candidates+=("$p")
done
for c in "${candidates[@]+"${candidates[@]}"}"; do
  if is_py39 "$c"; then python="$c"; break; fi
  log "skipping $c: not Python 3.9 ($("$c" --version 2>&1 || echo 'does not run'))"
done
if [ -z "$python" ]; then
  cat >&2 <<MSG
[install] error: no Python 3.9 found (looked at \$PYTHON, python3.9 on PATH, $pyenv_root/versions/3.9*).
  k2 from the package registry (k2==1.23.4) is built only for Python 3.9 + torch 1.13.1.
  Either install Python 3.9 (e.g. 'pyenv install 3.9.18') and re-run, or, in your own
  environment, install the k2 wheel that matches your torch (see k2's installation page)
  and then run:  pip install -e '.[k2,dev]'
  The core (quantizers, modules, search, LM, export) needs no k2:  pip install -e '.[dev]'
MSG
  exit 1
fi
log "using $python ($("$python" --version 2>&1))"

if [ ! -x "$venv/bin/python" ]; then
  log "creating $venv"
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade 'pip<25' >/dev/null 2>&1 || true
log "installing -e .[k2,dev] under tools/constraints.txt (torch 1.13.1, k2 1.23.4, numpy<2, ...)"
"$venv/bin/python" -m pip install -q -c "$top/tools/constraints.txt" -e "$top[k2,dev]"
"$venv/bin/python" - <<'PY'
import torch, k2, k2.version, lhotse, numpy
print(f"[install] torch {torch.__version__}, k2 {k2.version.__version__}, lhotse {lhotse.__version__}, numpy {numpy.__version__}")
PY
echo "$want" > "$stamp"
log "done: activate with 'source $venv/bin/activate' or use $venv/bin/k2quant"
