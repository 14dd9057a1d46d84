#!/usr/bin/env bash
# Set up the environment if needed, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# The browser tests (tests/test_browser.py) need /usr/bin/chromium; quick when it is there.
bash scripts/ensure_chromium.sh || echo "test.sh: ensure_chromium.sh failed; the browser tests will fail (UNIREF_SKIP_BROWSER=1 skips them)" >&2
exec .venv/bin/python -m pytest "$@"
