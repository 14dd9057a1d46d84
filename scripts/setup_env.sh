#!/usr/bin/env bash
# Create or reuse .venv with the pinned dev environment. Safe to run again: it reinstalls only
# when a requirements or constraints file changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${UNIREF_PYTHON:-$(command -v python3.11 || command -v python3)}"
VENV="${UNIREF_VENV:-.venv}"
STAMP="$VENV/.uniref-deps"
WANT="$(cat requirements.txt requirements-dev.txt constraints-dev.txt | sha256sum | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV with $PY" >&2
  "$PY" -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "setup: installing dependencies (first run takes a few minutes)" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  "$VENV/bin/python" -m pip install -q -r requirements-dev.txt -c constraints-dev.txt >&2
  echo "$WANT" > "$STAMP"
fi
