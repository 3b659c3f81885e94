#!/usr/bin/env bash
# bench/hostile.sh - the figures of issue 9's closing note, measured on 127.0.0.1 with
# examples/hostile.rs (a cluster with one misbehaving worker) and tests/hostile.rs:
#
#   item 1     p99 latency of the serving workers' clients (wrk --latency, one connection per
#              request, so that every request goes through the primary's accept loop) with no
#              attacker and during each single-worker flood; goal: within 2x of no flood
#   item 2     next_event errors per second while a respawn cannot happen; goal: 0
#   item 3     forks per second during a start-up protocol-error / closed-channel loop; goal: no
#              faster than the backoff (100 ms doubling: about 6 forks in 3 s)
#   item 5     workers after 30 SIGTTIN sent by a worker; goal: unchanged
#   items 6-9  requests lost, zombies left: the figures tests/hostile.rs prints; goal: 0
#
# Usage:  bench/hostile.sh                       (DURATION=5s: about 2 minutes)
#         DURATION=3s CONNS=20 bench/hostile.sh
#         SKIP_TESTS=1 bench/hostile.sh           (no cargo test run)
# Settings: DURATION (wrk -d, default 5s), CONNS (wrk -c, 50), PORT (first port, 18700),
# CARGO_TARGET_DIR. The markdown report goes to stdout, progress to stderr.
set -u
cd "$(dirname "$0")/.." || exit 2

DURATION=${DURATION:-5s}
CONNS=${CONNS:-50}
PORT=${PORT:-18700}
TARGET=${CARGO_TARGET_DIR:-target}
BIN=$TARGET/release/examples/hostile
secs=${DURATION%s}

log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
command -v wrk >/dev/null || { log "needs wrk"; exit 2; }
command -v curl >/dev/null || { log "needs curl"; exit 2; }
log "building examples/hostile (release)"
cargo build --release --quiet --example hostile >&2 || exit 2

SERVER=""
cleanup() { [ -n "$SERVER" ] && kill -KILL "$SERVER" 2>/dev/null; wait 2>/dev/null; }
trap cleanup EXIT
trap 'exit 130' INT TERM

# value of key=VALUE in the server's summary line
field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" "$2" | tail -1; }

# wrk's latency with unit -> milliseconds
to_ms() {
  awk -v v="$1" 'BEGIN {
    if (v ~ /us$/) { sub(/us$/, "", v); printf "%.3f", v / 1000 }
    else if (v ~ /ms$/) { sub(/ms$/, "", v); printf "%.3f", v }
    else if (v ~ /s$/) { sub(/s$/, "", v); printf "%.3f", v * 1000 }
    else printf "nan" }'
}

# run_server OUT ARGS... : start the example on the next port, wait for a 200 (5 s)
run_server() {
  local out=$1 i; shift
  PORT=$((PORT + 1))
  "$BIN" --listen "127.0.0.1:$PORT" "$@" >"$out" 2>/dev/null &
  SERVER=$!
  for ((i = 0; i < 50; i++)); do
    curl -s -o /dev/null -m 1 "http://127.0.0.1:$PORT/" && return 0
    sleep 0.1
  done
  log "server $* did not answer"
  return 1
}

wait_server() { wait "$SERVER" 2>/dev/null; SERVER=""; }

tmp=$(mktemp -d /tmp/forkcluster-hostile-bench.XXXXXX)
trap 'cleanup; rm -rf "$tmp"' EXIT

# ---- item 1: latency of the other workers' clients during a flood ----------------------------
echo "## issue 9 figures ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs, commit $(git rev-parse --short HEAD 2>/dev/null))"
echo
echo "### item 1: clients of the serving workers (2) while one other worker floods"
echo
echo "wrk -t1 -c$CONNS -d$DURATION --latency, \`Connection: close\`"
echo
echo "| scenario | requests/s | p50 ms | p99 ms | p99 / no flood | socket errors |"
echo "|---|---:|---:|---:|---:|---|"
base=""
for sc in "none 0" "flood 0" "flood 64" "flood-online 64" "flood-fds 64"; do
  set -- $sc
  attack=$1 mib=$2
  name=$attack
  [ "$attack" != none ] && name="$attack (sndbuf ${mib:-0} MiB)"
  [ "$mib" = 0 ] && [ "$attack" != none ] && name="$attack (default sndbuf)"
  log "item 1: $name"
  run_server "$tmp/srv" --workers 2 --attack "$attack" --for $((secs + 3)) \
    --flood-after 1 --flood-secs $((secs + 1)) --sndbuf-mib "$mib" || { wait_server; continue; }
  sleep 1.2
  wrk -t1 -c"$CONNS" -d"$DURATION" --latency -H 'Connection: close' \
    "http://127.0.0.1:$PORT/" >"$tmp/wrk" 2>&1
  wait_server
  rps=$(awk '/^Requests\/sec/ {print $2}' "$tmp/wrk")
  p50=$(to_ms "$(awk '$1 == "50%" {print $2}' "$tmp/wrk")")
  p99=$(to_ms "$(awk '$1 == "99%" {print $2}' "$tmp/wrk")")
  errs=$(sed -n 's/.*Socket errors: //p' "$tmp/wrk")
  reqs=$(awk '/requests in/ {print $1}' "$tmp/wrk")
  if [ "${reqs:-0}" = 0 ]; then p50="-"; p99="no response"; fi
  ratio="-"
  if [ "$attack" = none ]; then base=$p99; ratio=1
  elif [ -n "$base" ] && [ "$p99" != "no response" ]; then
    ratio=$(awk -v a="$p99" -v b="$base" 'BEGIN { if (b > 0) printf "%.1fx", a / b; else print "-" }')
  fi
  echo "| $name | ${rps:-0} | $p50 | $p99 | $ratio | ${errs:-none} |"
done
echo

# ---- items 2, 3, 5: counts from the example's summary line -------------------------------------
echo "### items 2, 3, 5"
echo
echo "| item | scenario | figure | goal |"
echo "|---|---|---|---|"
for a in garbage close shutwr; do
  log "item 3: $a crash loop"
  PORT=$((PORT + 1))
  timeout 30 "$BIN" --listen "127.0.0.1:$PORT" --workers 1 --attack "$a" --for 3 >"$tmp/srv" 2>/dev/null
  f=$(field forks "$tmp/srv"); s=$(field secs "$tmp/srv")
  rate=$(awk -v f="$f" 'BEGIN { printf "%.1f", f / 3 }')
  echo "| 3 | every worker: $a at start, then sleeps (3 s, max 64 workers) | $f forks ($rate/s); $(field workers_max "$tmp/srv") alive at most | <= ~6 forks (backoff 100 ms doubling) |"
done
log "item 2: table full"
PORT=$((PORT + 1))
timeout 30 "$BIN" --listen "127.0.0.1:$PORT" --workers 1 --max-workers 1 --attack close \
  --hang-timeout 30 --for 1 >"$tmp/srv" 2>/dev/null
e=$(field errors "$tmp/srv"); s=$(field secs "$tmp/srv")
rate=$(awk -v e="$e" -v s="$s" 'BEGIN { if (s > 0) printf "%.0f", e / s; else print 0 }')
echo "| 2 | respawn impossible (table full: max 1, the worker closed its channel) | $e next_event errors in $s s ($rate/s) | 0 |"
log "item 5: SIGTTIN from a worker"
run_server "$tmp/srv" --workers 2 --attack ttin --for 3 && wait_server
echo "| 5 | a worker sends SIGTTIN 30 times (2 serving + the sender) | $(field workers_max "$tmp/srv") workers at most | 3 |"
echo

# ---- items 6-9: the tests' own counts ---------------------------------------------------------
if [ -z "${SKIP_TESTS:-}" ]; then
  echo "### items 4-9 (cargo test --test hostile; FAILED is the attack working)"
  echo
  echo '```'
  for t in ignored_sigchld stopped_worker emfile_while_recovering subreaper_primary pid1_primary \
           forged_heartbeat sigttin_from; do
    log "test $t"
    out=$(RUST_BACKTRACE=0 timeout 120 cargo test --quiet --test hostile "$t" 2>/dev/null)
    res=$(printf '%s\n' "$out" | sed -n 's/^test \([a-z0-9_]*\) \.\.\. \([A-Za-z]*\).*/\1: \2/p')
    figs=$(printf '%s\n' "$out" | grep -E '^    .*(lost|zombies|Scale events|mapped)' | cut -c1-160)
    echo "$res"
    [ -n "$figs" ] && echo "$figs"
  done
  echo '```'
fi
