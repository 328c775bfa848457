#!/usr/bin/env bash
# Create .venv/ and install coldstart with everything it needs. Idempotent: a
# second run with unchanged requirements returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
STAMP=.venv/.coldstart-setup
want=$(cat pyproject.toml scripts/constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x .venv/bin/coldstart ]; then
  exit 0
fi

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "coldstart needs Python 3.11 or newer (set PYTHON=python3.11)" >&2; exit 1; }
[ -d .venv ] || "$PYTHON" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first, alone: the 2.13.0 CPU wheel. Any looser torch requirement
# resolved by pip would download gigabytes of CUDA packages.
.venv/bin/python -m pip install --quiet torch==2.13.0
.venv/bin/python -m pip install --quiet -c scripts/constraints.txt -e ".[train,dev,test]"
echo "$want" > "$STAMP"
echo "set-up done: .venv/bin/coldstart"
