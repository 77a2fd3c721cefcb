#!/usr/bin/env bash
# Send throughput before and after search/mentions (the issue's "post 1 chat
# and post 32 chats before/after"): the same load generator scenarios
# (bench/run.sh post, post32) against chatd built from a base revision and
# from this checkout, alternately, each on a fresh migrated database.
#
#   bench/search_sends.sh [--before REV] [--reps 3] [--duration 10]
#
# REV defaults to the merge base with main. Uses CHATD_TEST_PG_URL (an admin
# URL of a PostgreSQL server) and CHATD_TEST_REDIS_URL. Prints the medians of
# each label (bench/run.sh's table). The machine may be shared: compare the
# medians of several alternating reps, not one run.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BEFORE=$(git merge-base HEAD main) REPS=3 DUR=10
while [ $# -gt 0 ]; do
  case "$1" in
    --before) BEFORE=$2; shift 2;; --reps) REPS=$2; shift 2;; --duration) DUR=$2; shift 2;;
    *) echo "unknown option $1" >&2; exit 2;;
  esac
done
ADMIN=${CHATD_TEST_PG_URL:-postgresql://postgres@127.0.0.1:5432/postgres}
REDIS=${CHATD_TEST_REDIS_URL:-redis://127.0.0.1:6379/0}
PY=$ROOT/.venv/bin/python
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$TMP/before"
git archive "$BEFORE" | tar -x -C "$TMP/before"
SECRET=$(head -c 24 /dev/urandom | base64 | tr -d '/+=')
db_url() { echo "${ADMIN%/*}/$1"; }

run_one() {  # label tree
  local label=$1 tree=$2 db="chatd_bench_sends_$1" port
  psql "$ADMIN" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db"
  (cd "$tree" && PYTHONPATH="$tree" "$PY" -c \
     "from chatd import migrations; migrations.migrate('$(db_url "$db")')" >/dev/null)
  port=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  (cd "$tree" && PYTHONPATH="$tree" DATABASE_URL=$(db_url "$db") REDIS_URL=$REDIS \
     ACCESS_TOKEN_SECRET=$SECRET CHATPORT=$port CHATD_HOST=127.0.0.1 LOG_LEVEL=warning \
     RATE_LIMIT_SENDS=1000000/1s RATE_LIMIT_EVENTS=1000000/1s \
     CHATD_REDIS_PREFIX="bench-sends-$label-$$" exec "$PY" -m chatd) &
  local pid=$!
  for _ in $(seq 1 100); do
    curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.2
  done
  bench/run.sh --url "http://127.0.0.1:$port" --secret "$SECRET" --pid "$pid" \
    --label "$label" --duration "$DUR" --scenarios "post post32" || true
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

for r in $(seq 1 "$REPS"); do
  echo "=== rep $r (load $(cut -d' ' -f1-3 /proc/loadavg))"
  run_one before "$TMP/before"
  run_one after "$ROOT"
done
