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
# Idempotent and fast when nothing changed (scripts/pinned-venv.sh builds it).
# torch from PyPI is large (with its CUDA libraries, a few GB): the first run takes minutes.
# Environment: NSTREAM_FINETUNE_VENV overrides the venv's location; PYTHON the interpreter that
# creates it (default python3, 3.10 or newer).
set -euo pipefail

venv="${NSTREAM_FINETUNE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/nstream/venv-finetune}"

# The pins. Change them here only; a change rebuilds the venv on the next run.
requirements='torch==2.15.0
transformers==5.23.0
peft==0.21.2
safetensors
numpy'

# shellcheck source=scripts/pinned-venv.sh
source "$(dirname "${BASH_SOURCE[0]}")/pinned-venv.sh"
pinned_venv python-finetune-env "$venv" "$requirements" 10 'torch, transformers, peft, safetensors' torch
