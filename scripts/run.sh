#!/usr/bin/env bash
# Install chatd into .venv (idempotent: again only when the package metadata
# changed) and start it in the foreground. With nothing configured it runs on
# its embedded PostgreSQL and Redis under CHATD_DATA_DIR (default: a per-user
# data folder; /var/lib/chatd for root), and its first lines say where it
# listens and how to get a token. Ctrl-C stops it (and its embedded servers).
#   ./scripts/run.sh                   the embedded default on port 8080
#   CHATPORT=9000 ./scripts/run.sh     any setting of .env.example, or a .env file
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# scripts/test.sh installs a superset (.[test]); either stamp will do.
fresh() { [ -f "$1" ] && [ ! setup.cfg -nt "$1" ] && [ ! pyproject.toml -nt "$1" ]; }
if ! fresh .venv/.chatd-run-installed && ! fresh .venv/.chatd-installed; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e .
  touch .venv/.chatd-run-installed
fi
exec .venv/bin/chatd "$@"
