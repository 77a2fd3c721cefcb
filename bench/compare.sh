#!/usr/bin/env bash
# chatd against the Node peer of the same contract, side by side on this
# machine: for each round and scenario, the peer then chatd, one server running
# at a time, on the same PostgreSQL and Redis. Prints the median tables with
# chatd's ratio to the peer, and keeps the raw JSONL under bench/results/.
#
#   bench/compare.sh [--reps 3] [--duration 10]
#                    [--scenarios "conns post post32 history fanout react changes search"]
#                    [--workers 1] [--label chatd]
#
# Needs: node/npm, a PostgreSQL superuser at $CHATD_BENCH_PG_ADMIN (default
# postgresql://postgres@127.0.0.1:5432/postgres) to create the bench role and
# databases, Redis at 127.0.0.1:6379, and chatd installed in ./.venv
# (./scripts/test.sh or pip install -e . does that).
#
# chatd runs at its DEFAULT settings (LOG_LEVEL=info: an access line per
# request, written to a file here as under systemd's journal or a pipe) except:
#   DATABASE_URL, REDIS_URL, CHATPORT, CHATD_HOST  the bench's own stores and port;
#   ACCESS_TOKEN_SECRET                            the secret the load generator signs with;
#   RATE_LIMIT_SENDS=off RATE_LIMIT_EVENTS=off     the peer has no limits, and 32
#                                                  closed-loop senders would only measure 429s;
#   CHATD_WORKERS (--workers, default 1)           the peer is one process.
# Extra settings for an A/B: CHATD_BENCH_ENV="LOG_LEVEL=warning ..." bench/compare.sh
source "$(dirname "$0")/kit.sh"
REPS=3 DUR=10 SCEN="conns post post32 history fanout react changes search" WORKERS=1 LABEL=chatd
while [ $# -gt 0 ]; do
  case "$1" in
    --reps) REPS=$2; shift 2;; --duration) DUR=$2; shift 2;; --scenarios) SCEN=$2; shift 2;;
    --workers) WORKERS=$2; shift 2;; --label) LABEL=$2; shift 2;;
    -h|--help) sed -n 2,24p "$0"; exit 0;;
    *) echo "bench/compare.sh: unknown option $1" >&2; exit 2;;
  esac
done
SECRET=bench-secret
ADMIN="${CHATD_BENCH_PG_ADMIN:-postgresql://postgres@127.0.0.1:5432/postgres}"
kit_prepare load peer-node
psql "$ADMIN" -v ON_ERROR_STOP=1 -q <<'SQL'
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'bench') THEN
    CREATE ROLE bench LOGIN PASSWORD 'bench';
  END IF;
END $$;
SELECT 'CREATE DATABASE peer_bench OWNER bench' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'peer_bench')\gexec
SELECT 'CREATE DATABASE py_bench OWNER bench' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'py_bench')\gexec
SQL
[ -x "$ROOT/.venv/bin/chatd" ] || { echo "bench: no $ROOT/.venv/bin/chatd; run ./scripts/test.sh first" >&2; exit 2; }

export ACCESS_TOKEN_SECRET=$SECRET
# Defaults but for the stores, the port and the rate limits (see the header).
# shellcheck disable=SC2206
CHATD_ENV=(DATABASE_URL=postgres://bench:bench@127.0.0.1:5432/py_bench REDIS_URL=redis://127.0.0.1:6379/1
           CHATPORT=8080 CHATD_HOST=127.0.0.1 CHATD_WORKERS="$WORKERS"
           RATE_LIMIT_SENDS=off RATE_LIMIT_EVENTS=off ${CHATD_BENCH_ENV:-})
env "${CHATD_ENV[@]}" "$ROOT/.venv/bin/chatctl" migrate >/dev/null
ulimit -n 65536 2>/dev/null || true
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$BENCH_DIR/results/$STAMP"
PEER_OUT="$BENCH_DIR/results/$STAMP/peer.jsonl" CHATD_OUT="$BENCH_DIR/results/$STAMP/$LABEL.jsonl"
CHATD_PID=""

start_chatd() {
  env "${CHATD_ENV[@]}" "$ROOT/.venv/bin/chatd" >>"${CHATD_OUT%.jsonl}.server.log" 2>&1 &
  CHATD_PID=$!
  for _ in $(seq 1 100); do curl -fs http://127.0.0.1:8080/healthz >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "bench: chatd did not start, see ${CHATD_OUT%.jsonl}.server.log" >&2; exit 1
}
stop_chatd() {
  [ -n "$CHATD_PID" ] && kill "$CHATD_PID" 2>/dev/null && wait "$CHATD_PID" 2>/dev/null || true
  CHATD_PID=""
}
start_peer() { PEER_RUN_DIR="$BENCH_DIR/results/$STAMP" "$KIT/peer-node/peerctl.sh" start >/dev/null; }
stop_peer() { PEER_RUN_DIR="$BENCH_DIR/results/$STAMP" "$KIT/peer-node/peerctl.sh" stop >/dev/null 2>&1 || true; }
trap 'stop_chatd; stop_peer' EXIT

for r in $(seq 1 "$REPS"); do
  for sc in $SCEN; do
    start_peer
    run_scenario http://127.0.0.1:9100 "$SECRET" "$(PEER_RUN_DIR="$BENCH_DIR/results/$STAMP" "$KIT/peer-node/peerctl.sh" pid)" peer "$PEER_OUT" "$sc" "$DUR"
    stop_peer; sleep 1
    start_chatd
    run_scenario http://127.0.0.1:8080 "$SECRET" "$CHATD_PID" "$LABEL" "$CHATD_OUT" "$sc" "$DUR"
    stop_chatd; sleep 1
  done
done
{
  echo "chatd settings beyond its defaults: rate limits off, CHATD_WORKERS=$WORKERS${CHATD_BENCH_ENV:+, $CHATD_BENCH_ENV}"
  echo
  node "$KIT/load/summarize.js" "$PEER_OUT" "$CHATD_OUT"
  if grep -qE '"scenario":"(react|edit|changes|search)"' "$PEER_OUT" "$CHATD_OUT"; then
    echo; echo "### API.md version 2 scenarios (bench/conversations.js)"; echo
    CHATD_BENCH_KIT="$KIT/load" node "$BENCH_DIR/conversations.js" --summarize "$PEER_OUT" "$CHATD_OUT"
  fi
} | tee "$BENCH_DIR/results/$STAMP/summary.md"
