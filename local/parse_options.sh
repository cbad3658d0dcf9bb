#!/usr/bin/env bash
# Parse "--name value" / "--name=value" command-line options into shell variables.
#
# Source it after defining the defaults (Kaldi's utils/parse_options.sh convention, our own
# implementation):
#
#   stage=0
#   corpus_dir=download/an4
#   help_message="Usage: $0 [--stage N] [--corpus-dir DIR]"
#   . "$top/local/parse_options.sh"
#
# "--corpus-dir X" sets corpus_dir=X. Only variables that already exist can be set, so a typo
# is an error that lists the known options. "--help" (or -h) prints $help_message and exits.
# Booleans take explicit values ("--download true"). Positional arguments stop the parsing and
# are left in "$@".

while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help)
      echo "${help_message:-Usage: $0 [options]}"
      exit 0 ;;
    --*=*)
      __po_name="${1%%=*}"; __po_value="${1#*=}"; shift ;;
    --*)
      __po_name="$1"
      if [ $# -lt 2 ]; then
        echo "$0: option '$1' needs a value (e.g. $1 VALUE)" >&2
        exit 2
      fi
      __po_value="$2"; shift 2 ;;
    *)
      break ;;
  esac
  __po_var="${__po_name#--}"
  __po_var="${__po_var//-/_}"
  if ! [[ "$__po_var" =~ ^[a-z_][a-z0-9_]*$ ]] || [ -z "${!__po_var+x}" ] || \
     [[ "$__po_var" == __po_* ]] || [ "$__po_var" = help_message ]; then
    echo "$0: unknown option '$__po_name'." >&2
    echo "${help_message:-}" >&2
    exit 2
  fi
  printf -v "$__po_var" '%s' "$__po_value"
done
unset __po_name __po_value __po_var
