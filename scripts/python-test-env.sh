#!/usr/bin/env bash
# The Python environment of tests/python: a venv with the official `openai` client and pytest,
# pinned, installed from PyPI into ${XDG_CACHE_HOME:-$HOME/.cache}/nstream/venv-test (outside the
# repository, shared by clones).
#
# Prints the venv's python on standard output (everything else goes to standard error), so:
#
#   python="$(scripts/python-test-env.sh)"
#   "$python" -m pytest tests/python -q
#
# Idempotent and fast when nothing changed: the venv records the pins it was built from in
# .nstream-requirements and is only (re)built when they differ or the interpreter is missing.
# Environment: NSTREAM_TEST_VENV overrides the venv's location; PYTHON the interpreter that
# creates it (default python3, 3.9 or newer).
set -euo pipefail

venv="${NSTREAM_TEST_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/nstream/venv-test}"
base_python="${PYTHON:-python3}"

# The pins. Change them here only; a change rebuilds the venv on the next run.
requirements='openai==3.57.0
pytest==9.2.0'

log() { printf 'python-test-env: %s\n' "$*" >&2; }

stamp="$venv/.nstream-requirements"
python="$venv/bin/python"

if [[ -x "$python" && -f "$stamp" && "$(cat "$stamp")" == "$requirements" ]]; then
  printf '%s\n' "$python"
  exit 0
fi

command -v "$base_python" >/dev/null || { log "$base_python not found; set PYTHON to a Python 3.9+ interpreter"; exit 1; }
"$base_python" -c 'import sys; sys.exit(sys.version_info < (3, 9))' ||
  { log "$base_python is older than 3.9"; exit 1; }

log "creating $venv with: $(tr '\n' ' ' <<<"$requirements")"
rm -rf "$venv"
mkdir -p "$(dirname "$venv")"
"$base_python" -m venv "$venv"
requirements_file="$(mktemp)"
trap 'rm -f "$requirements_file"' EXIT
printf '%s\n' "$requirements" >"$requirements_file"
"$python" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
"$python" -m pip install --quiet --disable-pip-version-check -r "$requirements_file" >&2
"$python" -c 'import openai, pytest' >&2
# Written last, so an interrupted install is retried from scratch next time.
printf '%s' "$requirements" >"$stamp"
log "ready: $python (openai $("$python" -c 'import openai; print(openai.__version__)'))"
printf '%s\n' "$python"
