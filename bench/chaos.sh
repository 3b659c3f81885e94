#!/usr/bin/env bash
# bench/chaos.sh - the chaos benchmark: how many requests fail when workers keep dying.
#
# For each server (the crate's `hello` example, release build, then Node's cluster), start it on
# 127.0.0.1 with WORKERS workers, load it with
#     wrk -t$THREADS -c$CONNS -d${DURATION}s --timeout $TIMEOUT URL        (keep-alive)
# and meanwhile SIGKILL a random worker of it every INTERVAL seconds. Both respawn the dead:
# hello by itself (forkcluster's supervisor), node through `cluster.on('exit', () => fork())`,
# patched into a temporary copy of ../shared/bench/peers/node/cluster_http.js (which does not
# respawn), run with NODE_CLUSTER_SCHED_POLICY=rr (the primary accepts, as in hello).
#
# Prints, for both: requests served, failed requests (wrk's socket errors connect + read +
# write + timeout, plus non-2xx responses), kills, failures per kill, and the ratio node/hello.
#
# Environment (defaults): DURATION=20 (s per server)  INTERVAL=0.2 (s)  WORKERS=2  CONNS=50
#   THREADS=1  TIMEOUT=2s (wrk's request timeout)  SERVERS="hello node"
#   NODE=/usr/bin/node (or node on PATH)  KEEP=1 keeps the temporary directory
#   SCHEDULE=rr|shared|reuseport|lc|sticky (hello's --schedule, default rr)
#   HELLO=<path> a hello binary to use instead of building target/release/examples/hello
#   MODE=keep-alive|close (close: wrk sends `Connection: close`, one request per connection, so a
#   kill can only fail the requests the dead worker was serving at that moment; with keep-alive
#   every connection a dead worker held fails, whatever the server)
#
# Needs: wrk (apt-get install wrk), node, cargo. Run from anywhere (paths are resolved from this
# script): the repo is its parent directory, ../shared a sibling of the repo. Bounded in time
# (every wait has a limit); the EXIT trap stops everything it started, by pid.
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
shared_dir="$here/../../shared"
node_src="$shared_dir/bench/peers/node/cluster_http.js"

DURATION=${DURATION:-20}
INTERVAL=${INTERVAL:-0.2}
WORKERS=${WORKERS:-2}
CONNS=${CONNS:-50}
THREADS=${THREADS:-1}
TIMEOUT=${TIMEOUT:-2s}
SERVERS=${SERVERS:-"hello node"}
NODE=${NODE:-$(command -v node || echo /usr/bin/node)}
SCHEDULE=${SCHEDULE:-rr}
HELLO_BIN=${HELLO:-$repo/target/release/examples/hello}

log() { printf '%s chaos: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "$*"; exit 2; }

[[ $DURATION =~ ^[0-9]+$ ]] && [ "$DURATION" -gt 0 ] || die "DURATION must be whole seconds"
command -v wrk >/dev/null || die "wrk not found: apt-get install wrk"
MODE=${MODE:-keep-alive}
case $MODE in
  keep-alive) WRK_HEADER=() ;;
  close) WRK_HEADER=(-H "Connection: close") ;;
  *) die "MODE is keep-alive or close" ;;
esac
for s in $SERVERS; do
  case $s in
    hello) command -v cargo >/dev/null || die "cargo not found" ;;
    node)
      [ -x "$NODE" ] || die "node not found at $NODE (set NODE=)"
      [ -f "$node_src" ] || die "missing $node_src (../shared must be a sibling of the repo)"
      ;;
    *) die "unknown server '$s' (hello, node)" ;;
  esac
done

tmp=$(mktemp -d "${TMPDIR:-/tmp}/chaos.XXXXXX")
SERVER_PID=""
KILLER_PID=""
WRK_PID=""

# The live (not zombie) pids whose parent is $1.
children() {
  local parent=$1 p stat state ppid
  for p in /proc/[0-9]*; do
    { stat=$(<"$p/stat"); } 2>/dev/null || continue
    read -r state ppid _ <<< "${stat##*) }"
    [ "$ppid" = "$parent" ] && [ "$state" != Z ] && echo "${p#/proc/}"
  done
}

alive() { [ -d "/proc/$1" ] && ! grep -q '^State:.*Z' "/proc/$1/status" 2>/dev/null; }

# Stops the server (SIGTERM, SIGKILL after 5 s) and whatever workers it had, by pid.
stop_server() {
  local pid=$SERVER_PID kids i p
  [ -n "$pid" ] || return 0
  kids=$(children "$pid")
  kill -TERM "$pid" 2>/dev/null
  for ((i = 0; i < 50; i++)); do alive "$pid" || break; sleep 0.1; done
  alive "$pid" && kill -KILL "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
  for p in $kids $(children "$pid"); do alive "$p" && kill -KILL "$p" 2>/dev/null; done
  SERVER_PID=""
}

cleanup() {
  [ -n "$KILLER_PID" ] && kill -TERM "$KILLER_PID" 2>/dev/null && wait "$KILLER_PID" 2>/dev/null
  [ -n "$WRK_PID" ] && kill -TERM "$WRK_PID" 2>/dev/null && wait "$WRK_PID" 2>/dev/null
  stop_server
  if [ "${KEEP:-0}" = 1 ]; then log "kept $tmp"; else rm -rf "$tmp"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null ||
    echo $((20000 + RANDOM % 20000))
}

# wait_ready LOG PATTERN COUNT : until LOG has COUNT lines matching PATTERN (10 s at most)
wait_ready() {
  local i
  for ((i = 0; i < 100; i++)); do
    [ "$(grep -c -- "$2" "$1" 2>/dev/null)" -ge "$3" ] && return 0
    alive "$SERVER_PID" || return 1
    sleep 0.1
  done
  return 1
}

# The killer: every INTERVAL, SIGKILL one random live worker of $1; one line per kill in $2.
killer() {
  local primary=$1 out=$2 kids
  trap 'exit 0' TERM
  while :; do
    sleep "$INTERVAL"
    kids=$(children "$primary")
    [ -n "$kids" ] || continue
    victim=$(printf '%s\n' $kids | shuf -n 1)
    kill -KILL "$victim" 2>/dev/null && echo "$victim" >> "$out"
  done
}

# field TEXT REGEX : the first number captured by REGEX in TEXT, or 0
num() { local v; v=$(grep -oE "$2" <<< "$1" | head -1 | grep -oE '[0-9]+' | head -1); echo "${v:-0}"; }

declare -A REQ FAIL KILLS DETAIL

run_one() {
  local name=$1 port log out kills_f txt sock non2xx
  port=$(free_port)
  log="$tmp/$name.log"
  out="$tmp/$name.wrk"
  kills_f="$tmp/$name.kills"
  : > "$kills_f"
  case $name in
    hello)
      "$HELLO_BIN" --listen "127.0.0.1:$port" --workers "$WORKERS" --schedule "$SCHEDULE" \
        </dev/null >/dev/null 2>"$log" &
      SERVER_PID=$!
      wait_ready "$log" " listening on " "$WORKERS" || { cat "$log" >&2; die "hello did not start"; }
      ;;
    node)
      NODE_CLUSTER_SCHED_POLICY=rr "$NODE" "$tmp/cluster_http.js" "$port" "$WORKERS" \
        </dev/null >/dev/null 2>"$log" &
      SERVER_PID=$!
      wait_ready "$log" "cluster_http ready" 1 || { cat "$log" >&2; die "node did not start"; }
      ;;
  esac
  curl -fsS -m 2 "http://127.0.0.1:$port/" >/dev/null || die "$name does not answer"
  log "$name: pid $SERVER_PID on port $port, wrk -c$CONNS -d${DURATION}s, SIGKILL a worker every ${INTERVAL}s"
  killer "$SERVER_PID" "$kills_f" &
  KILLER_PID=$!
  timeout -s KILL $((DURATION + 20)) \
    wrk -t"$THREADS" -c"$CONNS" -d"${DURATION}s" --timeout "$TIMEOUT" "${WRK_HEADER[@]}" "http://127.0.0.1:$port/" \
    >"$out" 2>&1 &
  WRK_PID=$!
  wait "$WRK_PID"
  WRK_PID=""
  kill -TERM "$KILLER_PID" 2>/dev/null
  wait "$KILLER_PID" 2>/dev/null
  KILLER_PID=""
  stop_server
  txt=$(cat "$out")
  grep -q "requests in" <<< "$txt" || { cat "$out" >&2; die "$name: no wrk result"; }
  REQ[$name]=$(num "$txt" '[0-9]+ requests in')
  sock=0
  if grep -q "Socket errors" <<< "$txt"; then
    sock=$(($(num "$txt" 'connect [0-9]+') + $(num "$txt" 'read [0-9]+') + $(num "$txt" 'write [0-9]+') + $(num "$txt" 'timeout [0-9]+')))
  fi
  non2xx=$(num "$txt" 'Non-2xx or 3xx responses: [0-9]+')
  FAIL[$name]=$((sock + non2xx))
  KILLS[$name]=$(wc -l < "$kills_f")
  DETAIL[$name]="$(grep -E 'Socket errors|Non-2xx' <<< "$txt" | sed 's/^ *//' | paste -sd ';' -)"
  log "$name: ${REQ[$name]} requests, ${FAIL[$name]} failed, ${KILLS[$name]} kills ${DETAIL[$name]:+(${DETAIL[$name]})}"
}

for s in $SERVERS; do
  case $s in
    hello)
      if [ -z "${HELLO:-}" ]; then
        log "building hello (release)"
        (cd "$repo" && cargo build -q --release --example hello) || die "cargo build failed"
      fi
      [ -x "$HELLO_BIN" ] || die "no hello at $HELLO_BIN"
      ;;
    node)
      # Respawn on exit while not stopping: one line added at the top of the exit handler.
      sed "s/^  cluster.on('exit', (w, code, sig) => {\$/&\n    if (!stopping) cluster.fork();/" \
        "$node_src" > "$tmp/cluster_http.js"
      grep -q "if (!stopping) cluster.fork();" "$tmp/cluster_http.js" ||
        die "could not patch $node_src (its exit handler changed?)"
      ;;
  esac
done

for s in $SERVERS; do run_one "$s"; done

per_kill() { awk -v f="$1" -v k="$2" 'BEGIN { if (k > 0) printf "%.3f", f / k; else print "n/a" }'; }

echo
echo "chaos: ${DURATION}s of wrk -t$THREADS -c$CONNS ($MODE, --timeout $TIMEOUT), $WORKERS workers, SIGKILL of a random worker every ${INTERVAL}s"
printf '%-28s %12s %10s %7s %16s\n' server requests failed kills failures/kill
for s in $SERVERS; do
  case $s in
    hello) label="forkcluster hello ($SCHEDULE)" ;;
    node) label="node cluster (rr)" ;;
  esac
  printf '%-28s %12s %10s %7s %16s\n' "$label" "${REQ[$s]}" "${FAIL[$s]}" "${KILLS[$s]}" "$(per_kill "${FAIL[$s]}" "${KILLS[$s]}")"
done
if [ -n "${FAIL[hello]:-}" ] && [ -n "${FAIL[node]:-}" ]; then
  awk -v hf="${FAIL[hello]}" -v hk="${KILLS[hello]}" -v nf="${FAIL[node]}" -v nk="${KILLS[node]}" \
      -v hr="${REQ[hello]}" -v nr="${REQ[node]}" 'BEGIN {
    h = hk > 0 ? hf / hk : 0; n = nk > 0 ? nf / nk : 0
    if (h > 0) printf "failures per kill, node / hello: %.1fx\n", n / h
    else if (n > 0) printf "failures per kill, node / hello: hello had none (node %.3f per kill)\n", n
    else print "failures per kill, node / hello: neither failed a request"
    if (nr > 0) printf "requests served, hello / node: %.2fx\n", hr / nr
  }'
fi
if [ -n "${FAIL[hello]:-}" ]; then
  # hello backs off respawning workers that die young (crash-loop protection, Builder::backoff):
  # under this kill rate that leaves it without workers for a while, so it gets fewer kills.
  grep -oE 'respawning in [0-9]+ ms' "$tmp/hello.log" | grep -oE '[0-9]+' |
    awk '{ n++; s += $1; if ($1 > m) m = $1 } END {
      printf "hello crash-loop backoff: %d delays, %.1f s summed, longest %d ms\n", n, s / 1000, m }'
fi
