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
case "${1:-}" in
  -h|--help|help)
    if [ "$(id -u)" = 0 ]; then data=/var/lib/chatd; else data="${XDG_DATA_HOME:-$HOME/.local/share}/chatd"; fi
    cat <<EOF
Usage: ./scripts/run.sh [--help]

Installs chatd into .venv (the first time, and again only when setup.cfg,
pyproject.toml or requirements.lock changed; the versions pinned in
requirements.lock) and runs it in the foreground. Ctrl-C stops it, and the
PostgreSQL and Redis it started.

Settings: the environment, or a .env file here; every one is in .env.example:
  CHATPORT, CHATD_HOST        where to listen (default: port 8080, every address)
  FRONTENDADDRES              browser origins allowed, e.g. http://localhost:3000
  DATABASE_URL or DB_*        an external PostgreSQL; REDIS_URL or REDIS_*: Redis
  ACCESS_TOKEN_SECRET         the HS256 secret tokens are signed with
  CHATD_DATA_DIR              the embedded default's folder (below)
  PYTHON                      the interpreter that makes .venv (default python3)

With no database configured (the default) chatd runs its own PostgreSQL and
Redis, whose data and generated token secret go to CHATD_DATA_DIR
(default here: $data). One chatd at a time owns a data folder.
Get a token with: .venv/bin/chatctl token USER
EOF
    exit 0
    ;;
esac
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# The tested versions of every dependency, checked against their hashes
# (requirements.lock, shared with scripts/test.sh: one stamp), then chatd itself.
stamp=.venv/.chatd-installed
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ] \
   || [ requirements.lock -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q --require-hashes -r requirements.lock
  .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
  touch "$stamp"
fi
exec .venv/bin/chatd "$@"
