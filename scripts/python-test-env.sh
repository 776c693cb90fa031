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
# Idempotent and fast when nothing changed (scripts/pinned-venv.sh builds it).
# Environment: NSTREAM_TEST_VENV overrides the venv's location; PYTHON the interpreter that
# creates it (default python3, 3.9 or newer).
set -euo pipefail

venv="${NSTREAM_TEST_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/nstream/venv-test}"

# The pins. Change them here only; a change rebuilds the venv on the next run.
requirements='openai==3.57.0
pytest==9.2.0'

# shellcheck source=scripts/pinned-venv.sh
source "$(dirname "${BASH_SOURCE[0]}")/pinned-venv.sh"
pinned_venv python-test-env "$venv" "$requirements" 9 'openai, pytest' openai
