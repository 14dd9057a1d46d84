#!/usr/bin/env bash
# Make sure a Chromium for the browser tests (tests/test_browser.py) is at /usr/bin/chromium.
# Idempotent and quick when it is already there; otherwise installs Debian's `chromium` with apt
# (~20 s). Set UNIREF_SKIP_BROWSER=1 to skip (the browser tests then skip too).
set -euo pipefail
if [ "${UNIREF_SKIP_BROWSER:-}" = "1" ] || [ -x /usr/bin/chromium ]; then
  exit 0
fi
if [ -n "${UNIREF_CHROMIUM:-}" ] && [ -x "${UNIREF_CHROMIUM}" ]; then  # the tests' own override
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure_chromium: /usr/bin/chromium is missing and apt-get is not available;" \
       "install Chromium yourself or set UNIREF_SKIP_BROWSER=1" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO="sudo -n"
  else
    echo "ensure_chromium: need root (or sudo) to apt-get install chromium;" \
         "or set UNIREF_SKIP_BROWSER=1" >&2
    exit 1
  fi
fi
echo "ensure_chromium: installing Debian's chromium (apt-get)" >&2
t0=$(date +%s)
export DEBIAN_FRONTEND=noninteractive
LOG="$(mktemp -t ensure_chromium.XXXXXX.log)"
if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends chromium; } >"$LOG" 2>&1; then
  tail -n 30 "$LOG" >&2
  echo "ensure_chromium: apt-get failed (full log: $LOG)" >&2
  exit 1
fi
rm -f "$LOG"
if [ ! -x /usr/bin/chromium ]; then
  echo "ensure_chromium: apt-get finished but /usr/bin/chromium is still missing" >&2
  exit 1
fi
echo "ensure_chromium: $(/usr/bin/chromium --version 2>/dev/null || echo chromium) installed in $(( $(date +%s) - t0 )) s" >&2
