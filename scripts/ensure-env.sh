#!/usr/bin/env bash
# Create or update the project's virtual environment (.venv) so that it matches pyproject.toml + constraints.txt.
# Idempotent and quick when nothing changed: a stamp records the hash of what was installed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${BILEVEL_VENV:-.venv}"
PY="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
stamp="$VENV/.bilevel-env-stamp"
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! "$VENV/bin/python" -c "import bilevel" 2>/dev/null; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  "$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[dev,sd,digits]"
  echo "$want" > "$stamp"
fi
