#!/usr/bin/env bash
# Shared helpers of the recipes (egs/*/ASR/run.sh): logging, stage guards, finding k2quant.
#
# Source it from a recipe; it defines:
#   log MSG...                 timestamped message on stderr, prefixed with the recipe name
#   die MSG...                 log MSG and exit 1
#   run_stage N "DESC" [DONE]  true if stage N is within [$stage, $stop_stage] and the marker
#                              file DONE (if given) does not exist; logs "Stage N: DESC"
#                              (or that it is skipped because DONE exists)
#   mark_done FILE             create the marker FILE (and its directory)
#   find_k2quant               sets $k2quant: $K2QUANT if set, else the repository's
#                              .venv/bin/k2quant, else k2quant on PATH
#   find_lhotse                sets $lhotse: the lhotse CLI next to $k2quant, else on PATH
#   require_file FILE HINT     die with HINT unless FILE exists
#   elapsed                    seconds since the recipe started
# Recipes set: stage, stop_stage (and source local/parse_options.sh for options).

__common_start=$(date +%s)

log() {
  # report the first caller outside this file (the recipe line that logged or failed)
  local i=1
  while [ $i -lt ${#BASH_SOURCE[@]} ] && [ "${BASH_SOURCE[$i]##*/}" = common.sh ]; do
    i=$((i + 1))
  done
  echo -e "$(date '+%Y-%m-%d %H:%M:%S') (${BASH_SOURCE[$i]##*/}:${BASH_LINENO[$((i - 1))]}) $*" >&2
}

die() {
  log "ERROR: $*"
  exit 1
}

elapsed() {
  echo $(( $(date +%s) - __common_start ))
}

run_stage() {
  local n=$1 desc=$2 done_file=${3:-}
  if [ "$n" -lt "$stage" ] || [ "$n" -gt "$stop_stage" ]; then
    return 1
  fi
  if [ -n "$done_file" ] && [ -f "$done_file" ]; then
    log "Stage $n: $desc -- already done ($done_file exists; delete it to redo)"
    return 1
  fi
  log "Stage $n: $desc"
  return 0
}

mark_done() {
  mkdir -p "$(dirname "$1")"
  date '+%Y-%m-%d %H:%M:%S' > "$1"
}

require_file() {
  [ -e "$1" ] || die "$1 not found. $2"
}

find_k2quant() {
  local top
  top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  if [ -n "${K2QUANT:-}" ]; then
    k2quant=$K2QUANT
  elif [ -x "$top/.venv/bin/k2quant" ]; then
    k2quant="$top/.venv/bin/k2quant"
  elif command -v k2quant >/dev/null 2>&1; then
    k2quant=$(command -v k2quant)
  else
    die "k2quant not found: run 'make install' (or tools/install.sh) in $top, activate its .venv, or set K2QUANT=/path/to/k2quant"
  fi
  [ -x "$k2quant" ] || die "K2QUANT=$k2quant is not executable"
}

find_lhotse() {
  [ -n "${k2quant:-}" ] || find_k2quant
  if [ -x "$(dirname "$k2quant")/lhotse" ]; then
    lhotse="$(dirname "$k2quant")/lhotse"
  elif command -v lhotse >/dev/null 2>&1; then
    lhotse=$(command -v lhotse)
  else
    die "the lhotse CLI was not found next to $k2quant nor on PATH; install k2quant with its k2 extras (tools/install.sh)"
  fi
}
