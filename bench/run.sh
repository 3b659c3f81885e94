#!/usr/bin/env bash
# bench/run.sh - forkcluster against its peers (Node cluster, nginx) and the C limits, in one
# run on 127.0.0.1. Prints one markdown table (with the ratios the goals name) on stdout;
# progress goes to stderr; raw output goes to bench/results/<timestamp>/ (table.md too).
#
#   bench/run.sh                                   # everything, DURATION=10s ROUNDS=2
#   DURATION=2s ROUNDS=1 bench/run.sh              # quick check (~3 min on 2 cores)
#   SECTIONS="http scale" SERVERS="hello-rr c-rr node-rr" bench/run.sh
#
# Sections (SECTIONS, default "http ipc scale mem startup size"; "syscalls" is extra):
#   http      wrk -t1 -c50 keep-alive and `Connection: close` against hello rr/shared (2 workers)
#             and the peers, through the peers' run.sh (same invocation, alternating rounds)
#   ipc       cargo bench --bench wire (forkcluster channel vs the C seqpacket/fd-passing limits,
#             plus Node's ipc_bench.js)
#   scale     round-robin hello with SCALE_WORKERS workers under the wrk close load: conn/s and
#             the primary's CPU per connection (c-rr at SCALE_C workers for reference)
#   mem       RSS/PSS/USS and threads of every process, idle and after load
#   startup   launch -> every worker answered (hello), first 200 / "ready" line (peers)
#   size      static musl hello (profile small) vs the std-only Rust hello floor
#   syscalls  strace -c of hello-rr and c-rr (primary, workers) under the close load: syscalls
#             per request (SYSCALL_SERVERS="hello-rr c-rr")
#   schedules (extra, issue 11) every schedule (rr shared reuseport lc sticky) against the peers:
#             evenness over 8 workers, connections lost at restart, p99 under skewed work, sticky
#             seats across a worker's death, cost, hello rr vs C rr like for like (+ strace,
#             perf), chaos.sh per schedule. See bench/schedules.sh (SCHED_PARTS=...). Quick:
#             SECTIONS=schedules DURATION=2s ROUNDS=1 bench/run.sh (~4 min on 2 cores)
#
# Environment (defaults):
#   DURATION=10s ROUNDS=2 CONNS=50 THREADS=1
#   WARMUP=2s PAUSE=2 (1s and 0.5 when DURATION <= 3s: the "quick" settings)
#   SERVERS="hello-rr hello-shared node-rr node-none nginx-reuseport c-rr c-shared c-reuseport"
#       any name of the peers' table (also nginx-shared c-shared-herd c-single) or hello-rr,
#       hello-shared
#   SCALE_WORKERS="2 16 64 256"  SCALE_C="2 256" (c-rr worker counts; "" to skip)
#   MEM_SERVERS="hello-rr hello-shared hello-rr-musl node-rr nginx-reuseport c-rr"
#   MEM_IDLE=2 (s; 1 when quick)  MEM_LOAD=$DURATION (1s when quick; ka then close)
#   STARTUP_SERVERS="hello-rr hello-shared node-rr node-none nginx-reuseport c-rr"
#   STARTUP_RUNS=20 (5 when DURATION <= 3s)
#   WIRE_REPS/WIRE_N/WIRE_FD_N/WIRE_PINGS/WIRE_PIN: passed to the wire bench (smaller when quick)
#   PEERS=<repo>/../shared/bench/peers   (read-only; copied to a scratch dir)
#   BASE_PORT=18600  OUT=bench/results/<timestamp>  CARGO_TARGET_DIR (default <repo>/target)
#   FLOOR_DIR=/tmp/forkcluster-bench-floor  (cargo project of the size floor, kept as a cache)
#   BASE_REV=<commit>  also build hello at that commit: servers hello-base-rr, hello-base-shared,
#       hello-base-rr-nodefer run beside the current build (before/after in one invocation)
#
# Every run is bounded (wrk -d, timeout); every server is stopped by pid (SIGTERM, then
# SIGKILL), and the EXIT trap stops whatever is still running.
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
PEERS=${PEERS:-"$(dirname "$0")/../../shared/bench/peers"}
PEERS=$(cd "$PEERS" 2>/dev/null && pwd) || { echo "run.sh: peers directory not found (set PEERS)" >&2; exit 2; }

DURATION=${DURATION:-10s}
ROUNDS=${ROUNDS:-2}
CONNS=${CONNS:-50}
THREADS=${THREADS:-1}
# shellcheck source=bench/lib.sh
. "$here/lib.sh"
dur=$(dur_s "$DURATION")
QUICK=0; [ "${dur%.*}" -le 3 ] 2>/dev/null && QUICK=1
if [ $QUICK = 1 ]; then WARMUP=${WARMUP:-1s}; PAUSE=${PAUSE:-0.5}; else WARMUP=${WARMUP:-2s}; PAUSE=${PAUSE:-2}; fi
SECTIONS=${SECTIONS:-"http ipc scale mem startup size"}
SERVERS=${SERVERS:-"hello-rr hello-shared node-rr node-none nginx-reuseport c-rr c-shared c-reuseport"}
SCALE_WORKERS=${SCALE_WORKERS:-"2 16 64 256"}
SCALE_C=${SCALE_C-"2 256"}
MEM_SERVERS=${MEM_SERVERS:-"hello-rr hello-shared hello-rr-musl node-rr nginx-reuseport c-rr"}
if [ $QUICK = 1 ]; then MEM_IDLE=${MEM_IDLE:-1}; else MEM_IDLE=${MEM_IDLE:-2}; fi
if [ $QUICK = 1 ]; then MEM_LOAD=${MEM_LOAD:-1s}; else MEM_LOAD=${MEM_LOAD:-$DURATION}; fi
STARTUP_SERVERS=${STARTUP_SERVERS:-"hello-rr hello-shared node-rr node-none nginx-reuseport c-rr"}
if [ $QUICK = 1 ]; then STARTUP_RUNS=${STARTUP_RUNS:-5}; else STARTUP_RUNS=${STARTUP_RUNS:-20}; fi
BASE_PORT=${BASE_PORT:-18600}
STAMP=$(date +%Y%m%d-%H%M%S)
OUT=${OUT:-$here/results/$STAMP}
TARGET_DIR=${CARGO_TARGET_DIR:-$root/target}
FLOOR_DIR=${FLOOR_DIR:-/tmp/forkcluster-bench-floor}
MUSL=x86_64-unknown-linux-musl
HELLO=$TARGET_DIR/release/examples/hello
HELLO_MUSL=$TARGET_DIR/$MUSL/small/examples/hello
CLK_TCK=$(getconf CLK_TCK)

has() { case " $SECTIONS " in *" $1 "*) return 0;; esac; return 1; }

mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
SCRATCH=$(mktemp -d /tmp/forkcluster-bench.XXXXXX) || exit 2

# --- the peers' helpers (server table, start/stop, tree_pids, pid_ticks, smaps_kb) ----------
cp -r "$PEERS" "$SCRATCH/peers" && rm -rf "$SCRATCH/peers/results" "$SCRATCH/peers/bin"
# shellcheck source=/dev/null
. "$SCRATCH/peers/scripts/lib.sh"

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "${CHILD_PID:-}" ]; then log "stopping child $CHILD_PID"; stop_tree "$CHILD_PID" 30; fi
  if [ -n "${LOG_FD:-}" ]; then exec {LOG_FD}>&-; sleep 0.2; fi   # lets its tee finish
  if [ -n "${SERVER_PID:-}" ]; then stop_server; fi
  local left p
  left=$(my_descendants)   # the subshell that lists them is gone by the time of the loop
  for p in $left; do
    if pid_alive "$p"; then
      log "leftover pid $p ($(cat /proc/$p/comm 2>/dev/null)), SIGKILL"; kill -KILL "$p" 2>/dev/null
    fi
  done
  rm -rf "$SCRATCH"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- prerequisites ----------------------------------------------------------------------------
need_apt=""
command -v wrk >/dev/null || need_apt="$need_apt wrk"
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null || need_apt="$need_apt nginx-light"
if [ -n "$need_apt" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing:$need_apt"
    timeout 600 apt-get install -y $need_apt >&2 || log "apt-get install failed:$need_apt"
  else
    die "missing:$need_apt (apt-get install -y$need_apt)"
  fi
fi
for t in wrk gcc make cargo python3 awk; do command -v $t >/dev/null || die "missing $t"; done
command -v node >/dev/null || log "node not found: the node peers will fail"
[ -x /usr/sbin/nginx ] || log "nginx not found: the nginx peers will fail"

log "output: $OUT (scratch $SCRATCH)"
{
  echo "date_utc=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host=$(hostname) cpus=$(nproc) kernel=$(uname -r)"
  echo "git=$(git -C "$root" rev-parse --short HEAD 2>/dev/null)$(git -C "$root" diff --quiet HEAD -- src examples benches Cargo.toml 2>/dev/null || echo '+dirty')"
  echo "rustc=$(rustc --version 2>/dev/null | cut -d' ' -f1-2)"
  echo "node=$(node --version 2>/dev/null)"
  echo "wrk=$(wrk -v 2>&1 | head -1 | awk '{print $2}' | tr -d ,)"
  echo "settings=DURATION=$DURATION ROUNDS=$ROUNDS CONNS=$CONNS THREADS=$THREADS WARMUP=$WARMUP PAUSE=$PAUSE SECTIONS=\"$SECTIONS\""
  echo "loadavg_start=$(cut -d' ' -f1-3 /proc/loadavg)"
} > "$OUT/meta.txt"

log "building the C peers and the startup probe"
make -s -C "$SCRATCH/peers/c" >&2 || die "make -C peers/c failed"
gcc -O2 -Wall -Wextra -o "$SCRATCH/startup_probe" "$here/startup_probe.c" || die "startup_probe.c failed"

log "cargo build --release --example hello"
(cd "$root" && timeout 1200 cargo build --release --example hello >&2) || die "cargo build failed"
if has mem || has size; then
  log "cargo build --profile small --target $MUSL --example hello"
  (cd "$root" && timeout 1200 cargo build --profile small --target $MUSL --example hello >&2) \
    || log "musl build failed (rustup target add $MUSL); hello-rr-musl and size will be missing"
fi

# BASE_REV: the same hello built from another commit, for before/after runs in one invocation
# (servers hello-base-rr, hello-base-shared, hello-base-rr-nodefer).
HELLO_BASE=""
if [ -n "${BASE_REV:-}" ]; then
  log "building hello at BASE_REV=$BASE_REV into $SCRATCH/base"
  rm -rf "$SCRATCH/base" && mkdir -p "$SCRATCH/base/src" || die "mkdir failed"
  (cd "$root" && git archive "$BASE_REV" | tar -x -C "$SCRATCH/base/src") || die "git archive $BASE_REV failed"
  (cd "$SCRATCH/base/src" && CARGO_TARGET_DIR="$SCRATCH/base/target" timeout 1200 \
     cargo build --release --example hello >&2) || die "cargo build at $BASE_REV failed"
  HELLO_BASE=$SCRATCH/base/target/release/examples/hello
  echo "base_rev=$BASE_REV ($(cd "$root" && git rev-parse --short "$BASE_REV"))" >> "$OUT/meta.txt"
fi

cd "$SCRATCH/peers" || exit 2
# the crate's servers, in the peers' table format ({PORT} is replaced)
CMD[hello-rr]="$HELLO --listen 127.0.0.1:{PORT} --workers 2 --schedule rr"
CMD[hello-shared]="$HELLO --listen 127.0.0.1:{PORT} --workers 2 --schedule shared"
CMD[hello-rr-musl]="$HELLO_MUSL --listen 127.0.0.1:{PORT} --workers 2 --schedule rr"
# hello without TCP_DEFER_ACCEPT, like the C servers (SERVERS="... hello-rr-nodefer")
CMD[hello-rr-nodefer]="$HELLO --listen 127.0.0.1:{PORT} --workers 2 --schedule rr --defer-accept 0"
# every schedule by name, 2 workers (reuseport runs as shared and lc/sticky as rr until their
# dispatch lands)
for _s in reuseport lc sticky; do
  CMD[hello-$_s]="$HELLO --listen 127.0.0.1:{PORT} --workers 2 --schedule $_s"
done
if [ -n "$HELLO_BASE" ]; then
  CMD[hello-base-rr]="$HELLO_BASE --listen 127.0.0.1:{PORT} --workers 2 --schedule rr"
  CMD[hello-base-shared]="$HELLO_BASE --listen 127.0.0.1:{PORT} --workers 2 --schedule shared"
  CMD[hello-base-rr-nodefer]="$HELLO_BASE --listen 127.0.0.1:{PORT} --workers 2 --schedule rr --defer-accept 0"
fi

# ---------------------------------------------------------------------------------------------
section_http() {
  local d=$OUT/http extra="" s
  mkdir -p "$d"
  for s in $SERVERS; do
    case $s in hello-*) extra="$extra$s|${CMD[$s]}"$'\n' ;; esac
  done
  log "== http: $SERVERS"
  run_logged "$d/run.log" env DURATION="$DURATION" ROUNDS="$ROUNDS" CONNS="$CONNS" THREADS="$THREADS" \
    WARMUP="$WARMUP" PAUSE="$PAUSE" BASE_PORT="$(free_port "$BASE_PORT")" OUTDIR="$d" \
    SERVERS="$SERVERS" EXTRA_SERVERS="$extra" ./run.sh
  python3 scripts/tsv2md.py "$d/results.tsv" > "$d/tables.md" 2>/dev/null
}

# ---------------------------------------------------------------------------------------------
section_ipc() {
  local d=$OUT/ipc wire=()
  mkdir -p "$d"
  if [ $QUICK = 1 ]; then
    wire=(WIRE_REPS="${WIRE_REPS:-1}" WIRE_N="${WIRE_N:-100000}" WIRE_FD_N="${WIRE_FD_N:-30000}" WIRE_PINGS="${WIRE_PINGS:-3000}")
  fi
  log "== ipc: cargo bench --bench wire ${wire[*]}"
  run_logged "$d/wire.txt" env "${wire[@]}" PEERS_DIR="$PEERS" timeout 900 \
    cargo bench --manifest-path "$root/Cargo.toml" --bench wire
  if ! grep -q '^node_w2p_msgs_per_s' "$d/wire.txt" && command -v node >/dev/null; then
    log "== ipc: the wire bench did not run node; node ipc_bench.js w2p pingpong"
    run_logged "$d/node.txt" timeout 300 node node/ipc_bench.js --n 200000 --pings 20000 --reps "$ROUNDS" w2p p2w pingpong
  fi
}

# ---------------------------------------------------------------------------------------------
# one close-mode wrk run against an already started server; appends a row to scale.tsv
scale_one() {            # impl workers port (rows go to $SCALE_DIR/scale.tsv, default $OUT/scale)
  local impl=$1 n=$2 port=$3 d=${SCALE_DIR:-$OUT/scale} raw pids t0 t1 pt0 pt1 pn0 pn1 s0 s1
  raw=$d/wrk-$impl-$n.txt
  pids=$(tree_pids "$SERVER_PID")
  # the tree's CPU from schedstat (ns): utime+stime are whole clock ticks per process, and with
  # 256 workers each one's share of a short run is below one tick
  s0=$(tree_sched_ns $pids)
  pt0=$(pid_ticks "$SERVER_PID"); pn0=$(pid_sched_ns "$SERVER_PID"); t0=$(date +%s.%N)
  timeout 300 wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency -H 'Connection: close' \
    "http://127.0.0.1:$port/" > "$raw" 2>&1
  t1=$(date +%s.%N); pt1=$(pid_ticks "$SERVER_PID"); pn1=$(pid_sched_ns "$SERVER_PID")
  s1=$(tree_sched_ns $pids)
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$impl" "$n" "$(wrk_rps "$raw")" \
    "$(wrk_requests "$raw")" "$(wrk_pct_us "$raw" 50)" "$(wrk_pct_us "$raw" 99)" "$(wrk_errors "$raw")" \
    "$((pt1 - pt0))" "$((pn1 - pn0))" "$((s1 - s0))" "$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.3f", b-a}')" \
    "$(echo "$pids" | wc -w)" >> "$d/scale.tsv"
  tail -1 "$d/scale.tsv" >&2
}

section_scale() {
  local d=$OUT/scale n port name i cnt
  mkdir -p "$d"
  printf 'impl\tworkers\treq_s\trequests\tp50_us\tp99_us\terrors\tprimary_ticks\tprimary_ns\ttree_ns\twall_s\tprocs\n' > "$d/scale.tsv"
  log "== scale: hello rr workers $SCALE_WORKERS; c-rr workers ${SCALE_C:-none} (close load, $DURATION each; clk_tck=$CLK_TCK)"
  port=$(free_port $((BASE_PORT + 40)))
  local runs=()
  for n in $SCALE_WORKERS; do runs+=("hello-rr $n"); done
  for n in $SCALE_C; do runs+=("c-rr $n"); done
  for r in "${runs[@]}"; do
    read -r impl n <<< "$r"
    name=scale-$impl-$n
    if [ "$impl" = hello-rr ]; then
      CMD[$name]="$HELLO --listen 127.0.0.1:{PORT} --workers $n --schedule rr"
    else
      CMD[$name]="bin/prefork_http rr {PORT} $n"
    fi
    start_server "$name" "$port" "$d/server-$impl-$n.log" || continue
    # wait until all n workers exist (20 s max), then warm up
    for ((i = 0; i < 200; i++)); do
      cnt=$(tree_pids "$SERVER_PID" | wc -l)
      [ "$cnt" -ge $((n + 1)) ] && break
      sleep 0.1
    done
    timeout 60 wrk -t"$THREADS" -c"$CONNS" -d"$WARMUP" -H 'Connection: close' "http://127.0.0.1:$port/" > /dev/null 2>&1
    sleep "$PAUSE"
    scale_one "$impl" "$n" "$port"
    stop_server
    sleep "$PAUSE"
  done
}

# ---------------------------------------------------------------------------------------------
mem_snapshot() {         # server phase
  local p role rss pss uss
  for p in $(tree_pids "$SERVER_PID"); do
    if [ "$p" = "$SERVER_PID" ]; then role=primary; else role=worker; fi
    rss=$(smaps_kb "$p" Rss); pss=$(smaps_kb "$p" Pss)
    uss=$(( $(smaps_kb "$p" Private_Clean) + $(smaps_kb "$p" Private_Dirty) ))
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$p" "$role" "$(cat /proc/$p/comm 2>/dev/null)" \
      "$rss" "$pss" "$uss" "$(pid_threads "$p")" >> "$OUT/mem/mem.tsv"
  done
}

section_mem() {
  local d=$OUT/mem s port
  mkdir -p "$d"
  printf 'server\tphase\tpid\trole\tcomm\trss_kb\tpss_kb\tuss_kb\tthreads\n' > "$d/mem.tsv"
  log "== mem: $MEM_SERVERS (idle ${MEM_IDLE}s, load $MEM_LOAD ka + $MEM_LOAD close)"
  port=$(free_port $((BASE_PORT + 60)))
  for s in $MEM_SERVERS; do
    [ "$s" = hello-rr-musl ] && [ ! -x "$HELLO_MUSL" ] && { log "no $HELLO_MUSL, skipping"; continue; }
    start_server "$s" "$port" "$d/server-$s.log" || continue
    sleep "$MEM_IDLE"
    mem_snapshot "$s" idle
    timeout 300 wrk -t"$THREADS" -c"$CONNS" -d"$MEM_LOAD" "http://127.0.0.1:$port/" > "$d/wrk-$s-ka.txt" 2>&1
    timeout 300 wrk -t"$THREADS" -c"$CONNS" -d"$MEM_LOAD" -H 'Connection: close' "http://127.0.0.1:$port/" > "$d/wrk-$s-close.txt" 2>&1
    sleep "$MEM_IDLE"
    mem_snapshot "$s" after-load
    stop_server
    sleep 0.5
  done
  column -t -s $'\t' "$d/mem.tsv" >&2 2>/dev/null || cat "$d/mem.tsv" >&2
}

# ---------------------------------------------------------------------------------------------
section_startup() {
  local d=$OUT/startup s port cmd argv args out
  mkdir -p "$d"
  printf 'server\tmetric\tmin_ms\tmedian_ms\tmax_ms\tok\n' > "$d/startup.tsv"
  log "== startup: $STARTUP_SERVERS ($STARTUP_RUNS runs each)"
  port=$(free_port $((BASE_PORT + 70)))
  for s in $STARTUP_SERVERS; do
    cmd=${CMD[$s]//\{PORT\}/$port}
    # nginx: prepare the prefix first and time nginx itself, not the wrapper script
    case $cmd in nginx/run_nginx.sh*) cmd=$($cmd --print-cmd) ;; esac
    read -r -a argv <<< "$cmd"
    case $s in
      hello-*) args=(-w 2) ;;                               # bodies name the worker
      node-*) args=(-w 1 -r "cluster_http ready") ;;        # stderr line once all listen
      *) args=(-w 1) ;;                                     # same body from every worker
    esac
    out=$d/$s.txt
    run_logged "$out" timeout 600 "$SCRATCH/startup_probe" -n "$STARTUP_RUNS" "${args[@]}" "$port" -- "${argv[@]}"
    awk -v s="$s" '/^all_workers_ms .* workers=1$/{next}
      /^(first_200_ms|all_workers_ms|ready_text_ms) /{
        m=$1; sub(/_ms$/,"",m); for(i=2;i<=NF;i++){split($i,kv,"="); v[kv[1]]=kv[2]}
        printf "%s\t%s\t%s\t%s\t%s\t%s\n", s, m, v["min"], v["median"], v["max"], v["ok"] }' "$out" >> "$d/startup.tsv"
    sleep 0.5
  done
  if command -v hyperfine >/dev/null && command -v node >/dev/null; then
    run_logged "$d/hyperfine-node.txt" timeout 120 hyperfine -N --warmup 2 --runs "$STARTUP_RUNS" 'node -e 0' \
      --export-json "$d/hyperfine-node.json" > /dev/null
    python3 - "$d/hyperfine-node.json" >> "$d/startup.tsv" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["results"][0]
print("node -e 0 (hyperfine)\tprocess\t%.2f\t%.2f\t%.2f\t%d/%d" % (r["min"]*1e3, r["median"]*1e3, r["max"]*1e3, len(r["times"]), len(r["times"])))
PY
  fi
}

# ---------------------------------------------------------------------------------------------
section_size() {
  local d=$OUT/size floor hsz fsz port ok
  mkdir -p "$d"
  log "== size: floor in $FLOOR_DIR"
  mkdir -p "$FLOOR_DIR/src"
  cp "$PEERS/rust_size/main.rs" "$FLOOR_DIR/src/main.rs"
  # the same settings as the crate's [profile.small] (opt-level z, lto, 1 CGU, abort, strip)
  cat > "$FLOOR_DIR/Cargo.toml" <<'TOML'
[package]
name = "hello_tcp"
version = "0.1.0"
edition = "2021"

[dependencies]

[profile.release]
debug = false
opt-level = "z"
lto = true
codegen-units = 1
panic = "abort"
strip = true
TOML
  (cd "$FLOOR_DIR" && CARGO_TARGET_DIR="$FLOOR_DIR/target" timeout 600 cargo build --release --offline --target $MUSL) > "$d/floor-build.txt" 2>&1 \
    || { log "floor build failed (see $d/floor-build.txt)"; }
  floor=$FLOOR_DIR/target/$MUSL/release/hello_tcp
  printf 'binary\tbytes\tpath\tfile\n' > "$d/size.tsv"
  for b in "hello-musl-small:$HELLO_MUSL" "floor-musl:$floor" "hello-release-glibc:$HELLO"; do
    local n=${b%%:*} p=${b#*:}
    [ -f "$p" ] || continue
    printf '%s\t%s\t%s\t%s\n' "$n" "$(stat -c %s "$p")" "$p" "$(file -b "$p" 2>/dev/null | tr ',' '\n' | grep -E 'executable|linked|stripped' | tr -d '\n' | sed 's/^ //')" >> "$d/size.tsv"
  done
  # does the static hello run?
  if [ -x "$HELLO_MUSL" ]; then
    port=$(free_port $((BASE_PORT + 80)))
    start_server hello-rr-musl "$port" "$d/hello-musl.log" && ok=yes || ok=no
    if [ $ok = yes ]; then curl -s --max-time 2 "http://127.0.0.1:$port/" > "$d/hello-musl-answer.txt"; stop_server; fi
    echo "hello-musl-answers=$ok" >> "$d/size.tsv.meta"
  fi
  cat "$d/size.tsv" >&2
}

# ---------------------------------------------------------------------------------------------
# strace -c of a running server under the close load, split by role: one strace on the
# primary, one (-f) on the workers. strace slows everything down; the counts per request are
# what matters, not the times.
section_syscalls() {
  local d=$OUT/syscalls s port pids p pargs sp1 sp2 raw
  command -v strace >/dev/null || { log "no strace; skipping syscalls"; return; }
  mkdir -p "$d"
  printf 'server\trequests\n' > "$d/requests.tsv"
  port=$(free_port $((BASE_PORT + 90)))
  log "== syscalls: ${SYSCALL_SERVERS:-hello-rr c-rr} (strace -c, close load $DURATION)"
  for s in ${SYSCALL_SERVERS:-hello-rr c-rr}; do
    start_server "$s" "$port" "$d/server-$s.log" || continue
    timeout 60 wrk -t1 -c"$CONNS" -d"$WARMUP" -H 'Connection: close' "http://127.0.0.1:$port/" > /dev/null 2>&1
    pids=$(tree_pids "$SERVER_PID"); pargs=()
    for p in $pids; do [ "$p" != "$SERVER_PID" ] && pargs+=(-p "$p"); done
    timeout 300 strace -c -o "$d/strace-$s-primary.txt" -p "$SERVER_PID" 2> "$d/strace-$s-primary.err" &
    sp1=$!
    timeout 300 strace -c -f -o "$d/strace-$s-workers.txt" "${pargs[@]}" 2> "$d/strace-$s-workers.err" &
    sp2=$!
    sleep 1
    raw=$d/wrk-$s.txt
    timeout 300 wrk -t1 -c"$CONNS" -d"$DURATION" -H 'Connection: close' "http://127.0.0.1:$port/" > "$raw" 2>&1
    kill -INT "$sp1" "$sp2" 2>/dev/null; wait "$sp1" "$sp2" 2>/dev/null
    printf '%s\t%s\n' "$s" "$(wrk_requests "$raw")" >> "$d/requests.tsv"
    stop_server
    sleep 0.5
  done
}

# shellcheck source=bench/schedules.sh
. "$here/schedules.sh"

for sec in $SECTIONS; do
  case $sec in
    http|ipc|scale|mem|startup|size|syscalls|schedules) ;;
    *) die "unknown section '$sec' (http ipc scale mem startup size syscalls schedules)" ;;
  esac
  echo "loadavg_before_$sec=$(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/meta.txt"
  "section_$sec"
done
echo "loadavg_end=$(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/meta.txt"

python3 "$here/report.py" "$OUT" > "$OUT/table.md" || die "report.py failed"
cat "$OUT/table.md"
log "raw output and table.md: $OUT"
