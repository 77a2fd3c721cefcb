# Shared helpers for bench/*.sh (sourced). The load generator and the Node
# peer come from ../shared/bench (read-only there), copied into bench/.kit/
# with their npm dependencies on first use.
set -euo pipefail
BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$BENCH_DIR/.." && pwd)"
SHARED="${CHATD_BENCH_SHARED:-$ROOT/../shared/bench}"
KIT="$BENCH_DIR/.kit"

kit_prepare() {  # kit_prepare load [peer-node]
  command -v node >/dev/null || { echo "bench: node is required (the load generator is Node)" >&2; exit 2; }
  [ -d "$SHARED/load" ] || { echo "bench: no load generator at $SHARED/load (set CHATD_BENCH_SHARED)" >&2; exit 2; }
  mkdir -p "$KIT"
  for part in "$@"; do
    if [ ! -d "$KIT/$part/node_modules" ]; then
      rm -rf "$KIT/$part" && cp -r "$SHARED/$part" "$KIT/$part"
      (cd "$KIT/$part" && npm ci --no-fund --no-audit --loglevel=error >&2)
    fi
  done
}

# run_scenario URL SECRET PID LABEL OUT SCENARIO DURATION
run_scenario() {
  local url=$1 secret=$2 pid=$3 label=$4 out=$5 sc=$6 dur=$7 args
  case "$sc" in
    conns)   args=(--scenario conns --server-fresh);;
    post)    args=(--scenario post --chats 1 --duration "$dur");;
    post32)  args=(--scenario post --chats 32 --duration "$dur");;
    history) args=(--scenario history --duration "$dur");;
    fanout)  args=(--scenario fanout --duration "$dur");;
    react|edit|changes|search)  # API.md version 2: bench/conversations.js, on the same kit
      local pidarg=(); [ -n "$pid" ] && pidarg=(--pid "$pid")
      echo "== $label $sc (load $(cut -d' ' -f1-3 /proc/loadavg))" >&2
      CHATD_BENCH_KIT="$KIT/load" node "$BENCH_DIR/conversations.js" --url "$url" \
           --secret "$secret" "${pidarg[@]}" --label "$label" --out "$out" --scenario "$sc" \
           --duration "$dur" 2>>"${out%.jsonl}.log" >/dev/null \
        || echo "   ($label $sc failed, see ${out%.jsonl}.log)" >&2
      return 0;;
    *) echo "bench: unknown scenario $sc" >&2; return 2;;
  esac
  local pidarg=(); [ -n "$pid" ] && pidarg=(--pid "$pid")
  echo "== $label $sc (load $(cut -d' ' -f1-3 /proc/loadavg))" >&2
  node "$KIT/load/bench.js" --url "$url" --secret "$secret" "${pidarg[@]}" --label "$label" \
       --out "$out" "${args[@]}" 2>>"${out%.jsonl}.log" >/dev/null \
    || echo "   ($label $sc failed, see ${out%.jsonl}.log)" >&2
}
