#!/usr/bin/env bash
# Create .venv with Python 3.11 and install the project with pinned dependencies.
#   bash scripts/setup.sh          # the pipeline
#   bash scripts/setup.sh --test   # the pipeline plus what the tests need (pytest, headless Chromium)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"Python 3.11 is required, found {sys.version.split()[0]}"'
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "${1:-}" = "--test" ]; then
  .venv/bin/python -m pip install -q -e '.[test]'
  # The MLflow UI browser test drives Debian's headless Chromium.
  if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "warning: could not install chromium; the MLflow UI browser test will be skipped" >&2
  fi
else
  .venv/bin/python -m pip install -q -e .
fi
