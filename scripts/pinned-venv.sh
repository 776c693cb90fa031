# Sourced by scripts/python-*-env.sh: builds a pinned Python venv and prints its python.
#
# pinned_venv NAME VENV REQUIREMENTS MINIMUM_MINOR IMPORTS VERSION_MODULE
#   NAME            the calling script, for log lines
#   VENV            where the venv lives
#   REQUIREMENTS    the pins, one a line (pip requirements syntax)
#   MINIMUM_MINOR   the oldest Python 3 minor version that may create it (10 for 3.10)
#   IMPORTS         the modules that must import afterwards (`torch, peft`)
#   VERSION_MODULE  the module whose version the last log line names
#
# Idempotent and fast when nothing changed: the venv records the pins it was built from in
# .nstream-requirements and is only (re)built when they differ or the interpreter is missing.
# PYTHON names the interpreter that creates it (default python3).
pinned_venv() {
  local name="$1" venv="$2" requirements="$3" minimum_minor="$4" imports="$5" version_module="$6"
  local base_python="${PYTHON:-python3}"
  local stamp="$venv/.nstream-requirements"
  local python="$venv/bin/python"
  log() { printf '%s: %s\n' "$name" "$*" >&2; }

  if [[ -x "$python" && -f "$stamp" && "$(cat "$stamp")" == "$requirements" ]]; then
    printf '%s\n' "$python"
    return 0
  fi

  command -v "$base_python" >/dev/null ||
    { log "$base_python not found; set PYTHON to a Python 3.$minimum_minor+ interpreter"; return 1; }
  "$base_python" -c "import sys; sys.exit(sys.version_info < (3, $minimum_minor))" ||
    { log "$base_python is older than 3.$minimum_minor"; return 1; }

  log "creating $venv with: $(tr '\n' ' ' <<<"$requirements")"
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  "$base_python" -m venv "$venv"
  requirements_file="$(mktemp)"
  trap 'rm -f "$requirements_file"' EXIT
  printf '%s\n' "$requirements" >"$requirements_file"
  "$python" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
  "$python" -m pip install --quiet --disable-pip-version-check -r "$requirements_file" >&2
  "$python" -c "import $imports" >&2
  # Written last, so an interrupted install is retried from scratch next time.
  printf '%s' "$requirements" >"$stamp"
  log "ready: $python ($version_module $("$python" -c "import $version_module; print($version_module.__version__)"))"
  printf '%s\n' "$python"
}
