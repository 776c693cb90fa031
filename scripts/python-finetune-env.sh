#!/usr/bin/env bash
# The Python environment of the fine-tuning parity check (tests/python/finetune_parity.py) and
# benches/finetune: torch + transformers + peft, pinned, installed from PyPI into
# ${XDG_CACHE_HOME:-$HOME/.cache}/nstream/venv-finetune (outside the repository, shared by clones).
#
# Prints the venv's python on standard output (everything else goes to standard error), so:
#
#   python="$(scripts/python-finetune-env.sh)"
#   "$python" tests/python/finetune_parity.py ...
#
# Idempotent and fast when nothing changed: the venv records the pins it was built from in
# .nstream-requirements and is only (re)built when they differ or the interpreter is missing.
# torch from PyPI is large (with its CUDA libraries, a few GB): the first run takes minutes.
# Environment: NSTREAM_FINETUNE_VENV overrides the venv's location; PYTHON the interpreter that
# creates it (default python3, 3.10 or newer).
set -euo pipefail

venv="${NSTREAM_FINETUNE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/nstream/venv-finetune}"
base_python="${PYTHON:-python3}"

# The pins. Change them here only; a change rebuilds the venv on the next run.
requirements='torch==2.15.0
transformers==5.23.0
peft==0.21.2
safetensors
numpy'

log() { printf 'python-finetune-env: %s\n' "$*" >&2; }

stamp="$venv/.nstream-requirements"
python="$venv/bin/python"

if [[ -x "$python" && -f "$stamp" && "$(cat "$stamp")" == "$requirements" ]]; then
  printf '%s\n' "$python"
  exit 0
fi

command -v "$base_python" >/dev/null || { log "$base_python not found; set PYTHON to a Python 3.10+ interpreter"; exit 1; }
"$base_python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
  { log "$base_python is older than 3.10"; exit 1; }

log "creating $venv with: $(tr '\n' ' ' <<<"$requirements")"
rm -rf "$venv"
mkdir -p "$(dirname "$venv")"
"$base_python" -m venv "$venv"
requirements_file="$(mktemp)"
trap 'rm -f "$requirements_file"' EXIT
printf '%s\n' "$requirements" >"$requirements_file"
"$python" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
"$python" -m pip install --quiet --disable-pip-version-check -r "$requirements_file" >&2
"$python" -c 'import torch, transformers, peft, safetensors' >&2
# Written last, so an interrupted install is retried from scratch next time.
printf '%s' "$requirements" >"$stamp"
log "ready: $python (torch $("$python" -c 'import torch; print(torch.__version__)'))"
printf '%s\n' "$python"
