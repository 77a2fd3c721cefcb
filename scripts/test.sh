#!/usr/bin/env bash
# Install what the tests need (idempotent) and run the whole test suite.
#   ./scripts/test.sh            everything
#   ./scripts/test.sh -k cache   extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# The tested versions of every dependency, checked against their hashes
# (requirements.lock; ./scripts/lock.sh refreshes it), then chatd itself.
# Again only when the lock or the package metadata changed since the last install.
stamp=.venv/.chatd-installed
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ] \
   || [ requirements.lock -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q --require-hashes -r requirements.lock
  .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
  touch "$stamp"
fi
exec .venv/bin/python -m pytest "$@"
