#!/usr/bin/env bash
# Create .venv with Python 3.11 and install the project with pinned dependencies.
#   bash scripts/setup.sh          # the pipeline
#   bash scripts/setup.sh --test   # the pipeline plus what the tests need (pytest; as root: Debian's
#                                  # headless Chromium, SLURM and munge)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"Python 3.11 is required, found {sys.version.split()[0]}"'
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "${1:-}" = "--test" ]; then
  .venv/bin/python -m pip install -q -e '.[test]'
  # The MLflow UI browser test drives Debian's headless Chromium; the cluster test
  # (tests/test_slurm.py) runs a one-node SLURM cluster of Debian's packages.
  apt_install() {  # $1: a command the packages provide; then the packages; $NEEDED_BY: the test
    command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] && return 0
    shift
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null) \
        && return 0
    fi
    echo "warning: could not install $*; $NEEDED_BY will be skipped" >&2
  }
  NEEDED_BY="the MLflow UI browser test" apt_install chromium chromium
  NEEDED_BY="the SLURM cluster test" apt_install slurmctld slurmctld slurmd slurm-client munge
else
  .venv/bin/python -m pip install -q -e .
fi
