#!/usr/bin/env bash
# Wheels that the GPU machine of this workplace lacks for benchmarks/gpu_check.sh (its image has
# torch, numpy, scipy, pandas, matplotlib, opencv, pyyaml, imageio, torchmetrics, ... but not the
# emulator, MLflow or the official code's imports), for CPython 3.12 on x86-64, at this project's
# pinned versions (read from the project's venv), into .whl/ (git-ignored through
# .git/info/exclude). Run here, where PyPI is reachable:
#     bash benchmarks/gpu_wheels.sh [PYTHON]
# then carry `.whl` (and `.official`, a checkout of the official code) in the device call.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
EXCLUDE=$(git rev-parse --git-path info/exclude)
grep -qx '/.whl/' "$EXCLUDE" 2>/dev/null || echo '/.whl/' >> "$EXCLUDE"
# The four stages' imports (gymnasium, ale-py, mlflow and its store) and the official code's
# (omegaconf, hydra, wandb and torcheval: tests/fixtures/official/README.md), with what they import
# that the GPU image lacks.
NAMES="ale-py gymnasium farama-notifications mlflow mlflow-skinny mlflow-tracing sqlalchemy alembic mako
graphene graphql-core graphql-relay flask flask-cors itsdangerous gunicorn docker cachetools databricks-sdk
google-auth pyasn1 pyasn1-modules fastapi starlette uvicorn gitpython gitdb smmap importlib-metadata
opentelemetry-api opentelemetry-sdk opentelemetry-proto opentelemetry-semantic-conventions pydantic
pydantic-core typing-inspection annotated-types python-dotenv sqlparse cryptography cffi pycparser huey
skops prettytable wcwidth omegaconf hydra-core"
pins=()
for n in $NAMES; do
  v=$("$PY" -m pip show "$n" 2>/dev/null | sed -n 's/^Version: //p')
  [ -n "$v" ] || { echo "gpu_wheels: $n is not installed in $PY; cannot pin it" >&2; exit 1; }
  pins+=("$n==$v")
done
# the official code's logging and metrics packages (versions of tests/fixtures/official/README.md)
pins+=("torcheval==0.0.7" "wandb==0.17.9" "protobuf==5.29.6" "docker-pycreds==0.4.0" "sentry-sdk==2.19.2" "setproctitle==1.3.4")
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 -d .whl "${pins[@]}"
# omegaconf's parser runtime is published as a source archive only (pure Python)
"$PY" -m pip download -q --no-deps -d .whl "antlr4-python3-runtime==$("$PY" -m pip show antlr4-python3-runtime | sed -n 's/^Version: //p')"
du -sh .whl
