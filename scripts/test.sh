#!/usr/bin/env bash
# The test command (README): set up .venv if needed, then lint, type-check and run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0 || .venv/bin/pip install -q "torch>=2.3"
.venv/bin/pip install -q --disable-pip-version-check -e ".[dev]"
export OMP_NUM_THREADS=1 RAY_DEDUP_LOGS=0 PYTHONUNBUFFERED=1
# Leftover processes of this run only (never `ray stop`, which would stop every Ray on the machine).
RAY_ELASTIC_TEST_SESSION="$(.venv/bin/python -c 'import uuid; print(uuid.uuid4().hex)')"
export RAY_ELASTIC_TEST_SESSION
cleanup() { .venv/bin/python scripts/kill_session_procs.py "$RAY_ELASTIC_TEST_SESSION" || true; }
trap cleanup EXIT
.venv/bin/ruff check ray_elastic tests examples benchmarks
.venv/bin/mypy ray_elastic
mkdir -p test-output
.venv/bin/python -m pytest -p no:cacheprovider -q "$@"
