#!/usr/bin/env bash
# Benchmark a running chatd (or any server of the same contract) with the four
# scenarios of the shared load generator; prints a table of medians.
#
#   bench/run.sh --url http://127.0.0.1:8080 --secret "$ACCESS_TOKEN_SECRET" \
#                [--pid PID] [--reps 1] [--duration 10] [--label chatd] \
#                [--scenarios "conns post post32 history fanout react edit changes"]
#
# --pid: the server's PID, for its CPU and memory (conns needs it). Loopback
# URLs only. Results: bench/results/<label>-<time>.jsonl (+ .log).
source "$(dirname "$0")/kit.sh"
URL="" SECRET="${ACCESS_TOKEN_SECRET:-}" PID="" REPS=1 DUR=10 LABEL=chatd
SCEN="conns post post32 history fanout react edit changes"
while [ $# -gt 0 ]; do
  case "$1" in
    --url) URL=$2; shift 2;; --secret) SECRET=$2; shift 2;; --pid) PID=$2; shift 2;;
    --reps) REPS=$2; shift 2;; --duration) DUR=$2; shift 2;; --label) LABEL=$2; shift 2;;
    --scenarios) SCEN=$2; shift 2;;
    -h|--help) sed -n 2,11p "$0"; exit 0;;
    *) echo "bench/run.sh: unknown option $1" >&2; exit 2;;
  esac
done
[ -n "$URL" ] || { echo "bench/run.sh: --url is required" >&2; exit 2; }
[ -n "$SECRET" ] || { echo "bench/run.sh: --secret (or ACCESS_TOKEN_SECRET) is required" >&2; exit 2; }
kit_prepare load
mkdir -p "$BENCH_DIR/results"
OUT="$BENCH_DIR/results/$LABEL-$(date -u +%Y%m%dT%H%M%SZ).jsonl"
ulimit -n 65536 2>/dev/null || true
for r in $(seq 1 "$REPS"); do
  for sc in $SCEN; do run_scenario "$URL" "$SECRET" "$PID" "$LABEL" "$OUT" "$sc" "$DUR"; done
done
node "$KIT/load/summarize.js" "$OUT"
CHATD_BENCH_KIT="$KIT/load" node "$BENCH_DIR/conversations.js" --summarize "$OUT"
