# bench/schedules.sh - the `schedules` section of bench/run.sh (issue 11, "Measure"); sourced by
# run.sh, which provides the server table (CMD), start_server/stop_server, the /proc readers,
# $SCRATCH (the peers' copy, cwd), $OUT, $HELLO and the quick settings.
#
#   SECTIONS=schedules DURATION=2s ROUNDS=1 bench/run.sh     # quick, ~4 min on 2 cores
#   SECTIONS=schedules bench/run.sh                          # DURATION=10s: ~13 min
#
# Parts (SCHED_PARTS, default all, in this order):
#   even    8 workers, close load (loadgen -c$CONNS): each worker's share of the answers
#           (X-Worker header: hello --say-seat; Node and nginx copies that add the worker pid)
#   queue   4 workers, backlog $QUEUE_BACKLOG, $QUEUE_CONNS close connections: SIGHUP (rolling
#           restart / nginx reload) and 2 SIGKILLs of a worker under load; failures at the client
#   skew    4 workers, open loop $SKEW_RATE req/s, $SKEW_FRACTION of them to /slow (a worker
#           blocked $SKEW_MS ms): latency of the fast requests, rr vs lc
#   sticky  8 workers, 1000 client IPs (127.x.y.z): fraction on their old seat before, during
#           and after one worker is SIGKILLed and replaced
#   cost    close load, 2 workers: reuseport vs C reuseport and nginx reuseport (req/s, req per
#           server core-s, peers' run.sh, ROUNDS rounds); primary CPU per connection of rr, lc,
#           sticky at SCHED_SCALE workers (scale_one: wrk, one client IP), and rr and sticky
#           again with loadgen from STICKY_IPS client IPs (from one IP sticky uses one seat)
#   l4l     hello rr --defer-accept 0 vs C rr, $L4L_ROUNDS alternating rounds (peers' run.sh), then
#           strace -c per process (section_syscalls) and, if perf works, perf stat of both
#   chaos   bench/chaos.sh MODE=close for every schedule: failed requests under SIGKILLs
#
# Settings: SCHEDULES="rr shared reuseport lc sticky"  EVEN_WORKERS=8  EVEN_PEERS="node-rr
#   node-none nginx-shared nginx-reuseport"  QUEUE_SERVERS="hello-reuseport hello-rr
#   nginx-reuseport c-reuseport"  QUEUE_WORKERS=4 QUEUE_BACKLOG=64 QUEUE_CONNS=256
#   QUEUE_SECS (6 quick, 15)  SKEW_WORKERS=4 SKEW_RATE=150 SKEW_FRACTION=0.1 SKEW_MS=20
#   SKEW_SECS (8 quick, 20)  STICKY_SCHEDULES="sticky rr"  STICKY_IPS=1000
#   SCHED_SCALE="2 256"  L4L_ROUNDS=3  CHAOS_SECS (4 quick, 20)  CHAOS_SCHEDULES=$SCHEDULES

SCHED_PARTS=${SCHED_PARTS:-"even queue skew sticky cost l4l chaos"}
SCHEDULES=${SCHEDULES:-"rr shared reuseport lc sticky"}
EVEN_WORKERS=${EVEN_WORKERS:-8}
EVEN_PEERS=${EVEN_PEERS-"node-rr node-none nginx-shared nginx-reuseport"}
QUEUE_SERVERS=${QUEUE_SERVERS:-"hello-reuseport hello-rr nginx-reuseport c-reuseport"}
QUEUE_WORKERS=${QUEUE_WORKERS:-4}
QUEUE_BACKLOG=${QUEUE_BACKLOG:-64}
QUEUE_CONNS=${QUEUE_CONNS:-256}
SKEW_WORKERS=${SKEW_WORKERS:-4}
SKEW_RATE=${SKEW_RATE:-150}
SKEW_FRACTION=${SKEW_FRACTION:-0.1}
SKEW_MS=${SKEW_MS:-20}
STICKY_SCHEDULES=${STICKY_SCHEDULES:-"sticky rr"}
STICKY_IPS=${STICKY_IPS:-1000}
SCHED_SCALE=${SCHED_SCALE:-"2 256"}
L4L_ROUNDS=${L4L_ROUNDS:-3}
if [ "${QUICK:-0}" = 1 ]; then
  QUEUE_SECS=${QUEUE_SECS:-6}; SKEW_SECS=${SKEW_SECS:-8}; CHAOS_SECS=${CHAOS_SECS:-4}
else
  QUEUE_SECS=${QUEUE_SECS:-15}; SKEW_SECS=${SKEW_SECS:-20}; CHAOS_SECS=${CHAOS_SECS:-20}
fi
CHAOS_SCHEDULES=${CHAOS_SCHEDULES:-$SCHEDULES}

LOADGEN=""
BG_PID=""     # a background loadgen (the EXIT trap's my_descendants also gets it)

# the schedules' servers, in the peers' table format
sched_servers() {
  local s
  for s in $SCHEDULES; do
    CMD[hello-$s]="$HELLO --listen 127.0.0.1:{PORT} --workers 2 --schedule $s"
    CMD[even-hello-$s]="$HELLO --listen 127.0.0.1:{PORT} --workers $EVEN_WORKERS --schedule $s --say-seat"
    CMD[queue-hello-$s]="$HELLO --listen 127.0.0.1:{PORT} --workers $QUEUE_WORKERS --schedule $s --backlog $QUEUE_BACKLOG"
    CMD[skew-hello-$s]="$HELLO --listen 127.0.0.1:{PORT} --workers $SKEW_WORKERS --schedule $s --slow-ms $SKEW_MS"
    CMD[sticky-hello-$s]="$HELLO --listen 127.0.0.1:{PORT} --workers $EVEN_WORKERS --schedule $s --say-seat"
  done
  # Node: a copy of cluster_http.js whose answers carry X-Worker: <worker pid>
  sed "s/'Content-Length': '6' }/'Content-Length': '6', 'X-Worker': String(process.pid) }/" \
    "$SCRATCH/peers/node/cluster_http.js" > "$SCRATCH/peers/node/cluster_http_xw.js"
  grep -q X-Worker "$SCRATCH/peers/node/cluster_http_xw.js" || log "could not patch cluster_http.js: node has no X-Worker"
  CMD[even-node-rr]="env NODE_CLUSTER_SCHED_POLICY=rr node node/cluster_http_xw.js {PORT} $EVEN_WORKERS"
  CMD[even-node-none]="env NODE_CLUSTER_SCHED_POLICY=none node node/cluster_http_xw.js {PORT} $EVEN_WORKERS"
  # nginx: a launcher for the peers' configuration with N workers, a backlog, X-Worker: $pid
  cat > "$SCRATCH/nginx_sched.sh" <<EOF
#!/usr/bin/env bash
# nginx_sched.sh PORT reuseport|noreuseport WORKERS BACKLOG: the peers' nginx.conf with WORKERS
# workers, listen backlog BACKLOG and an X-Worker: \$pid header; exec's nginx (pid = master)
set -eu
port=\$1 variant=\$2 workers=\$3 backlog=\$4
src=$SCRATCH/peers/nginx/nginx.conf
[ "\$variant" = noreuseport ] && src=$SCRATCH/peers/nginx/nginx-noreuseport.conf
prefix=$SCRATCH/nginx-\$port-\$variant
mkdir -p "\$prefix/logs" "\$prefix/tmp" "\$prefix/conf"
chmod 755 "$SCRATCH" "\$prefix"
sed -e "s/127\.0\.0\.1:18083\( reuseport\)\{0,1\};/127.0.0.1:\$port\1 backlog=\$backlog;/" \\
    -e "s/^worker_processes .*/worker_processes \$workers;/" \\
    -e 's/return 200 "hello\\\\n";/add_header X-Worker \$pid always;\n            return 200 "hello\\\\n";/' \\
    "\$src" > "\$prefix/conf/nginx.conf"
exec /usr/sbin/nginx -p "\$prefix/" -e "\$prefix/logs/error.log" -c "\$prefix/conf/nginx.conf"
EOF
  chmod +x "$SCRATCH/nginx_sched.sh"
  CMD[even-nginx-shared]="$SCRATCH/nginx_sched.sh {PORT} noreuseport $EVEN_WORKERS 511"
  CMD[even-nginx-reuseport]="$SCRATCH/nginx_sched.sh {PORT} reuseport $EVEN_WORKERS 511"
  CMD[queue-nginx-reuseport]="$SCRATCH/nginx_sched.sh {PORT} reuseport $QUEUE_WORKERS $QUEUE_BACKLOG"
  # the C reuseport peer with the same backlog (a copy built from the scratch sources)
  sed "s/listen(fd, 511)/listen(fd, PEER_BACKLOG)/" "$SCRATCH/peers/c/prefork_http.c" > "$SCRATCH/peers/c/prefork_http_bl.c"
  gcc -O2 -DPEER_BACKLOG="$QUEUE_BACKLOG" -o "$SCRATCH/peers/bin/prefork_http_bl" "$SCRATCH/peers/c/prefork_http_bl.c" \
    || log "prefork_http_bl failed"
  CMD[queue-c-reuseport]="bin/prefork_http_bl reuseport {PORT} $QUEUE_WORKERS"
  CMD[queue-c-rr]="bin/prefork_http_bl rr {PORT} $QUEUE_WORKERS"
}

# wait until the server tree has at least N processes (20 s max)
wait_procs() {
  local n=$1 i
  for ((i = 0; i < 200; i++)); do
    [ "$(tree_pids "$SERVER_PID" | wc -l)" -ge "$n" ] && return 0
    sleep 0.1
  done
  return 1
}

# kv FILE KEY: a key=value line of loadgen's output
kv() { awk -F= -v k="$2" '$1==k{print $2}' "$1"; }

# ---------------------------------------------------------------------------------------------
sched_even() {
  local d=$OUT/schedules/even s name port raw procs
  mkdir -p "$d"
  printf 'server\tworkers\trequests\trps\terrors\tvalues\n' > "$d/even.tsv"
  port=$(free_port $((BASE_PORT + 100)))
  local list=()
  for s in $SCHEDULES; do list+=("hello-$s"); done
  for s in $EVEN_PEERS; do list+=("$s"); done
  log "== schedules/even: ${list[*]} ($EVEN_WORKERS workers, close load -c$CONNS $DURATION)"
  for s in "${list[@]}"; do
    name=even-$s
    [ -n "${CMD[$name]:-}" ] || { log "no server $name"; continue; }
    start_server "$name" "$port" "$d/server-$s.log" || continue
    procs=$((EVEN_WORKERS + 1))
    wait_procs "$procs" || log "$s: fewer than $procs processes"
    timeout 60 "$LOADGEN" -c "$CONNS" -d "$(dur_s "$WARMUP")" "$port" > /dev/null 2>&1
    raw=$d/loadgen-$s.txt
    # sticky maps a client IP to a seat: from one IP it serves from one worker (spilling over
    # when that one's queue is full), so its load comes from STICKY_IPS addresses
    local src=() label=$s
    if [ "$s" = hello-sticky ]; then src=(-S "$STICKY_IPS"); label="$s ($STICKY_IPS IPs)"; fi
    timeout 300 "$LOADGEN" -c "$CONNS" -d "$dur" "${src[@]}" -H X-Worker "$port" > "$raw" 2>&1
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$label" "$EVEN_WORKERS" "$(kv "$raw" requests)" "$(kv "$raw" rps)" \
      "$(kv "$raw" errors)" "$(awk '$1=="value"{printf "%s%s=%s", sep, $2, $3; sep=","}' "$raw")" >> "$d/even.tsv"
    tail -1 "$d/even.tsv" >&2
    stop_server
    sleep "$PAUSE"
  done
}

# ---------------------------------------------------------------------------------------------
# one queue run: load, then SIGHUP at 1/5, SIGKILL of a worker at 2/5 and 3/5 of QUEUE_SECS
sched_queue_one() {      # name label port
  local name=$1 s=$2 port=$3 d=$OUT/schedules/queue raw ev kids victim t hup=yes
  case $s in c-*) hup=no ;; esac   # the C peer has no reload: SIGHUP would stop it
  start_server "$name" "$port" "$d/server-$s.log" || return
  wait_procs $((QUEUE_WORKERS + 1)) || log "$s: not all workers up"
  raw=$d/loadgen-$s.txt; ev=$d/events-$s.txt
  : > "$ev"
  "$LOADGEN" -c "$QUEUE_CONNS" -d "$QUEUE_SECS" -t 5000 -o "$d/requests-$s.txt" "$port" > "$raw" 2>&1 &
  BG_PID=$!
  t=$(awk -v s="$QUEUE_SECS" 'BEGIN{printf "%.2f", s/5}')
  sleep "$t"
  if [ $hup = yes ]; then kill -HUP "$SERVER_PID" && echo "$(date +%s.%N) SIGHUP $SERVER_PID" >> "$ev"; fi
  for _ in 1 2; do
    sleep "$t"
    kids=$(cat /proc/"$SERVER_PID"/task/*/children 2>/dev/null)
    victim=$(printf '%s\n' $kids | shuf -n 1)
    [ -n "$victim" ] && kill -KILL "$victim" 2>/dev/null && echo "$(date +%s.%N) SIGKILL $victim" >> "$ev"
  done
  wait "$BG_PID"; BG_PID=""
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$s" "$(kv "$raw" requests)" "$(kv "$raw" ok)" \
    "$(kv "$raw" err_reset)" "$(kv "$raw" err_eof)" "$(kv "$raw" err_connect)" "$(kv "$raw" err_timeout)" \
    "$(kv "$raw" err_non200)" "$(kv "$raw" err_other)" "$(grep -c SIGHUP "$ev")" "$(grep -c SIGKILL "$ev")" \
    "$(queue_windows "$ev" "$d/requests-$s.txt")" >> "$d/queue.tsv"
  tail -1 "$d/queue.tsv" >&2
  stop_server
  sleep "$PAUSE"
}

# failures (reset+eof+connect) before the first signal, from the SIGHUP to the first SIGKILL,
# and after it: "pre:N hup:N kill:N"
queue_windows() {        # events requests
  awk 'NR==FNR { if ($2=="SIGHUP") h=$1; else if ($2=="SIGKILL" && !k) k=$1; next }
       $3 ~ /^ERR:(reset|eof|connect)/ { if (h && $1 >= h && (!k || $1 < k)) nh++; else if (k && $1 >= k) nk++; else np++ }
       END { printf "pre:%d hup:%d kill:%d", np, nh, nk }' "$1" "$2"
}

sched_queue() {
  local d=$OUT/schedules/queue s port
  mkdir -p "$d"
  printf 'server\trequests\tok\treset\teof\tconnect\ttimeout\tnon200\tother\thups\tkills\twindows\n' > "$d/queue.tsv"
  port=$(free_port $((BASE_PORT + 110)))
  log "== schedules/queue: $QUEUE_SERVERS ($QUEUE_WORKERS workers, backlog $QUEUE_BACKLOG, -c$QUEUE_CONNS, ${QUEUE_SECS}s: SIGHUP, 2 SIGKILL)"
  for s in $QUEUE_SERVERS; do
    [ -n "${CMD[queue-$s]:-}" ] || { log "no server queue-$s"; continue; }
    sched_queue_one "queue-$s" "$s" "$port"
  done
}

# ---------------------------------------------------------------------------------------------
sched_skew() {
  local d=$OUT/schedules/skew s port raw k
  mkdir -p "$d"
  printf 'server\trate\tslow_fraction\tslow_ms\trequests\terrors\tfast_n\tfast_p50_us\tfast_p90_us\tfast_p99_us\tfast_p999_us\tfast_mean_us\tslow_n\tslow_p50_us\tslow_p99_us\n' > "$d/skew.tsv"
  port=$(free_port $((BASE_PORT + 120)))
  log "== schedules/skew: rr lc ($SKEW_WORKERS workers, ${SKEW_RATE} req/s, $SKEW_FRACTION to /slow = ${SKEW_MS} ms, ${SKEW_SECS}s)"
  for s in rr lc; do
    start_server "skew-hello-$s" "$port" "$d/server-$s.log" || continue
    wait_procs $((SKEW_WORKERS + 1))
    timeout 60 "$LOADGEN" -c 8 -d 1 "$port" > /dev/null 2>&1
    raw=$d/loadgen-$s.txt
    timeout 300 "$LOADGEN" -c 256 -R "$SKEW_RATE" -s "$SKEW_FRACTION" -d "$SKEW_SECS" -r 7 "$port" > "$raw" 2>&1
    {
      printf 'hello-%s\t%s\t%s\t%s\t%s\t%s' "$s" "$SKEW_RATE" "$SKEW_FRACTION" "$SKEW_MS" "$(kv "$raw" requests)" "$(kv "$raw" errors)"
      for k in fast_n fast_p50_us fast_p90_us fast_p99_us fast_p999_us fast_mean_us slow_n slow_p50_us slow_p99_us; do
        printf '\t%s' "$(kv "$raw" $k)"
      done
      echo
    } >> "$d/skew.tsv"
    tail -1 "$d/skew.tsv" >&2
    stop_server
    sleep "$PAUSE"
  done
}

# ---------------------------------------------------------------------------------------------
# sticky: the primary's stderr is time-stamped (EPOCHREALTIME per line) to find the replacement's
# "listening" time; requests are classified by completion time against the kill and that line.
sched_sticky() {
  local d=$OUT/schedules/sticky s port log cmd i victim vid tkill newid
  mkdir -p "$d"
  printf 'server\tphase\trequests\tsame_seat\tfraction\tnote\n' > "$d/sticky.tsv"
  port=$(free_port $((BASE_PORT + 130)))
  log "== schedules/sticky: $STICKY_SCHEDULES ($EVEN_WORKERS workers, $STICKY_IPS client IPs)"
  for s in $STICKY_SCHEDULES; do
    log="$d/server-$s.log"
    cmd=${CMD[sticky-hello-$s]//\{PORT\}/$port}
    # the time-stamper is this shell's child (not the server's), and ends with the server's stderr
    local tsfd
    exec {tsfd}> >(while IFS= read -r l; do printf '%s %s\n' "$EPOCHREALTIME" "$l"; done > "$log")
    ( exec bash -c "exec $cmd" ) > /dev/null 2>&$tsfd {tsfd}>&- &
    SERVER_PID=$!
    exec {tsfd}>&-
    bin/httpprobe wait "$port" 20000 || { log "sticky-$s did not come up"; stop_server; continue; }
    for ((i = 0; i < 200; i++)); do
      [ "$(grep -c ' listening on ' "$log")" -ge "$EVEN_WORKERS" ] && break; sleep 0.1
    done
    timeout 60 "$LOADGEN" -c 16 -n "$STICKY_IPS" -S "$STICKY_IPS" -H X-Seat -o "$d/base-$s.txt" "$port" > "$d/loadgen-base-$s.txt" 2>&1
    # a longer pass (3 times the IPs) across the kill and the replacement
    "$LOADGEN" -c 16 -n $((3 * STICKY_IPS)) -S "$STICKY_IPS" -O 337 -d 30 -H X-Seat -o "$d/run-$s.txt" "$port" > "$d/loadgen-run-$s.txt" 2>&1 &
    BG_PID=$!
    sleep 0.05
    victim=$(printf '%s\n' $(cat /proc/"$SERVER_PID"/task/*/children 2>/dev/null) | shuf -n 1)
    vid=$(awk -v p="$victim" '$0 ~ "forked \\(pid " p "\\)" {print $3}' "$log" | tail -1)
    tkill=$EPOCHREALTIME
    kill -KILL "$victim"
    wait "$BG_PID"; BG_PID=""
    # the replacement: the first worker forked after the kill; wait for it to listen (5 s)
    for ((i = 0; i < 50; i++)); do
      newid=$(awk -v t="$tkill" '$1 > t && / forked \(pid / {print $3; exit}' "$log")
      [ -n "$newid" ] && grep -q " worker $newid listening on " "$log" && break
      sleep 0.1
    done
    timeout 60 "$LOADGEN" -c 16 -n "$STICKY_IPS" -S "$STICKY_IPS" -O 611 -H X-Seat -o "$d/after-$s.txt" "$port" > "$d/loadgen-after-$s.txt" 2>&1
    stop_server
    python3 - "$s" "$d" "$tkill" "$vid" "${newid:-}" "$log" >> "$d/sticky.tsv" <<'PY'
import sys
s, d, tkill, vid, newid, logf = sys.argv[1:7]
tkill = float(tkill)
tlisten = None
for line in open(logf):
    p = line.split()
    if newid and len(p) > 3 and p[1] == "worker" and p[2] == newid and "listening" in line:
        tlisten = float(p[0]); break
def load(f):
    out = []
    for line in open(f):
        t, ip, v = line.split()
        out.append((float(t), int(ip), v))
    return out
alias = {newid: vid} if newid and vid else {}   # until Worker::seat(): the replacement takes the dead id's seat
base = {ip: alias.get(v, v) for _, ip, v in load(f"{d}/base-{s}.txt") if not v.startswith("ERR")}
def frac(rows, phase, note=""):
    n = len(rows); same = sum(1 for _, ip, v in rows if alias.get(v, v) == base.get(ip))
    print(f"hello-{s}\t{phase}\t{n}\t{same}\t{same / n:.3f}\t{note}" if n else f"hello-{s}\t{phase}\t0\t0\tNA\t{note}")
run = load(f"{d}/run-{s}.txt")
frac([r for r in run if r[0] < tkill], "before-kill")
end = tlisten if tlisten else float("inf")
during = [r for r in run if tkill <= r[0] < end]
frac(during, "during",
     f"kill->replacement listening {((tlisten - tkill) * 1e3):.1f} ms" if tlisten else "no replacement seen")
# The dead seat's IPs have to move while it is empty (1/8 of them on average, by the hash), so
# "during" is about 7/8 by construction; what sticky promises is that the other seats' IPs stay.
# The dead seat is the baseline seat that answers (almost) nothing during the window (a few
# answers it sent just before it died can complete after the kill's time stamp).
cnt = {v: 0 for v in set(base.values())}
for _, _, v in during:
    if alias.get(v, v) in cnt:
        cnt[alias.get(v, v)] += 1
d0 = min(cnt, key=cnt.get) if cnt else None
if during and d0 is not None and cnt[d0] <= 0.1 * len(during) / len(cnt):
    n_dead = sum(1 for v in base.values() if v == d0)
    frac([r for r in during if base.get(r[1]) != d0], "during, IPs of the live seats",
         f"dead seat {d0} had {n_dead} of {len(base)} IPs: 'during' is expected near {1 - n_dead / len(base):.3f}")

frac([r for r in run if r[0] >= end], "after-listening (same pass)")
frac(load(f"{d}/after-{s}.txt"), "after (new pass)", f"killed id {vid}, replacement id {newid or '?'}")
PY
    tail -4 "$d/sticky.tsv" >&2
    sleep "$PAUSE"
  done
}

# ---------------------------------------------------------------------------------------------
sched_cost() {
  local d=$OUT/schedules/cost extra="" s n port impl i
  mkdir -p "$d"
  extra="hello-reuseport|${CMD[hello-reuseport]}"$'\n'
  log "== schedules/cost: hello-reuseport c-reuseport nginx-reuseport (close, $ROUNDS rounds)"
  run_logged "$d/run.log" env DURATION="$DURATION" ROUNDS="$ROUNDS" CONNS="$CONNS" THREADS="$THREADS" \
    WARMUP="$WARMUP" PAUSE="$PAUSE" BASE_PORT="$(free_port $((BASE_PORT + 140)))" OUTDIR="$d" MODES=close \
    SERVERS="hello-reuseport c-reuseport nginx-reuseport" EXTRA_SERVERS="$extra" ./run.sh
  # primary CPU per connection: rr, lc, sticky at SCHED_SCALE workers (the scale section's meter)
  SCALE_DIR=$d
  printf 'impl\tworkers\treq_s\trequests\tp50_us\tp99_us\terrors\tprimary_ticks\tprimary_ns\ttree_ns\twall_s\tprocs\n' > "$d/scale.tsv"
  port=$(free_port $((BASE_PORT + 150)))
  for n in $SCHED_SCALE; do
    for impl in rr lc sticky; do
      CMD[cost-$impl-$n]="$HELLO --listen 127.0.0.1:{PORT} --workers $n --schedule $impl"
      start_server "cost-$impl-$n" "$port" "$d/server-$impl-$n.log" || continue
      wait_procs $((n + 1)) || log "cost-$impl-$n: not all workers up"
      timeout 60 wrk -t"$THREADS" -c"$CONNS" -d"$WARMUP" -H 'Connection: close' "http://127.0.0.1:$port/" > /dev/null 2>&1
      sleep "$PAUSE"
      scale_one "hello-$impl" "$n" "$port"
      # sticky maps client IPs to seats: from wrk's one IP every connection goes to one seat,
      # so rr and sticky are measured again from STICKY_IPS addresses (loadgen)
      if [ "$impl" != lc ]; then
        sleep "$PAUSE"
        cost_ips_one "hello-$impl@${STICKY_IPS}ips" "$n" "$port"
      fi
      stop_server
      sleep "$PAUSE"
    done
  done
  SCALE_DIR=""
}

# scale_one's row, measured with loadgen from STICKY_IPS client addresses
cost_ips_one() {         # impl workers port
  local impl=$1 n=$2 port=$3 d=$SCALE_DIR raw pids pt0 pt1 pn0 pn1 s0 s1 t0 t1
  raw=$d/loadgen-$impl-$n.txt
  pids=$(tree_pids "$SERVER_PID")
  s0=$(tree_sched_ns $pids)
  pt0=$(pid_ticks "$SERVER_PID"); pn0=$(pid_sched_ns "$SERVER_PID"); t0=$(date +%s.%N)
  timeout 300 "$LOADGEN" -c "$CONNS" -d "$dur" -S "$STICKY_IPS" "$port" > "$raw" 2>&1
  t1=$(date +%s.%N); pt1=$(pid_ticks "$SERVER_PID"); pn1=$(pid_sched_ns "$SERVER_PID")
  s1=$(tree_sched_ns $pids)
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$impl" "$n" "$(kv "$raw" rps)" "$(kv "$raw" ok)" \
    "$(kv "$raw" fast_p50_us)" "$(kv "$raw" fast_p99_us)" "$(kv "$raw" errors)" "$((pt1 - pt0))" "$((pn1 - pn0))" \
    "$((s1 - s0))" "$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.3f", b-a}')" "$(echo "$pids" | wc -w)" >> "$d/scale.tsv"
  tail -1 "$d/scale.tsv" >&2
}

# ---------------------------------------------------------------------------------------------
sched_l4l() {
  local d=$OUT/schedules/l4l extra s pids p
  mkdir -p "$d"
  extra="hello-rr-nodefer|${CMD[hello-rr-nodefer]}"$'\n'
  log "== schedules/l4l: hello-rr-nodefer c-rr (close, $L4L_ROUNDS rounds)"
  run_logged "$d/run.log" env DURATION="$DURATION" ROUNDS="$L4L_ROUNDS" CONNS="$CONNS" THREADS="$THREADS" \
    WARMUP="$WARMUP" PAUSE="$PAUSE" BASE_PORT="$(free_port $((BASE_PORT + 160)))" OUTDIR="$d" MODES=close \
    SERVERS="hello-rr-nodefer c-rr" EXTRA_SERVERS="$extra" ./run.sh
  if ! has syscalls; then
    SYSCALL_SERVERS="hello-rr-nodefer c-rr" section_syscalls
  fi
  # perf stat per role (counts of context switches, cpu migrations, task-clock), if perf works
  if perf stat -e task-clock true > /dev/null 2>&1; then
    local port; port=$(free_port $((BASE_PORT + 170)))
    printf 'server\trole\trequests\ttask_clock_ms\tcontext_switches\tcpu_migrations\tpage_faults\n' > "$d/perf.tsv"
    for s in hello-rr-nodefer c-rr; do
      start_server "$s" "$port" "$d/perf-server-$s.log" || continue
      timeout 60 wrk -t1 -c"$CONNS" -d"$WARMUP" -H 'Connection: close' "http://127.0.0.1:$port/" > /dev/null 2>&1
      pids=$(tree_pids "$SERVER_PID")
      local wp=""; for p in $pids; do [ "$p" != "$SERVER_PID" ] && wp="$wp${wp:+,}$p"; done
      timeout 120 perf stat -x, -e task-clock,context-switches,cpu-migrations,page-faults -p "$SERVER_PID" -o "$d/perf-$s-primary.csv" &
      local pp1=$!
      timeout 120 perf stat -x, -e task-clock,context-switches,cpu-migrations,page-faults -p "$wp" -o "$d/perf-$s-workers.csv" &
      local pp2=$!
      sleep 0.3
      timeout 300 wrk -t1 -c"$CONNS" -d"$DURATION" -H 'Connection: close' "http://127.0.0.1:$port/" > "$d/perf-wrk-$s.txt" 2>&1
      kill -INT "$pp1" "$pp2" 2>/dev/null; wait "$pp1" "$pp2" 2>/dev/null
      local role
      for role in primary workers; do
        awk -F, -v s="$s" -v r="$role" -v n="$(wrk_requests "$d/perf-wrk-$s.txt")" '
          $3=="task-clock"{tc=$1} $3=="context-switches"{cs=$1} $3=="cpu-migrations"{cm=$1} $3=="page-faults"{pf=$1}
          END{printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", s, r, n, tc, cs, cm, pf}' "$d/perf-$s-$role.csv" >> "$d/perf.tsv"
      done
      stop_server
      sleep "$PAUSE"
    done
  fi
}

# ---------------------------------------------------------------------------------------------
sched_chaos() {
  local d=$OUT/schedules/chaos s out
  mkdir -p "$d"
  printf 'schedule\trequests\tfailed\tkills\tdetail\n' > "$d/chaos.tsv"
  log "== schedules/chaos: $CHAOS_SCHEDULES (MODE=close, ${CHAOS_SECS}s each, 2 workers)"
  for s in $CHAOS_SCHEDULES; do
    out=$d/chaos-$s.txt
    run_logged "$out" env MODE=close SCHEDULE="$s" SERVERS=hello DURATION="$CHAOS_SECS" HELLO="$HELLO" \
      CONNS="$CONNS" timeout 300 "$here/chaos.sh"
    awk -v s="$s" '/^forkcluster hello/{printf "%s\t%s\t%s\t%s\t", s, $(NF-3), $(NF-2), $(NF-1); found=1}
      END{if(!found) printf "%s\tNA\tNA\tNA\t", s}' "$out" >> "$d/chaos.tsv"
    # wrk's socket errors and non-2xx, as chaos.sh logs them: "(Socket errors: ...;Non-2xx ...)"
    (grep -E 'hello: [0-9]+ requests, [0-9]+ failed' "$out" | tail -1 | grep -oE '\(.*\)' | tr -d '()'; echo) | head -1 >> "$d/chaos.tsv"
    tail -1 "$d/chaos.tsv" >&2
  done
}

# ---------------------------------------------------------------------------------------------
section_schedules() {
  mkdir -p "$OUT/schedules"
  gcc -O2 -Wall -Wextra -o "$SCRATCH/loadgen" "$here/loadgen.c" -lm || { log "loadgen.c failed"; return; }
  LOADGEN=$SCRATCH/loadgen
  sched_servers
  {
    echo "schedules=$SCHEDULES"
    echo "parts=$SCHED_PARTS"
    echo "even_workers=$EVEN_WORKERS conns=$CONNS duration=$DURATION"
    echo "queue=workers $QUEUE_WORKERS backlog $QUEUE_BACKLOG conns $QUEUE_CONNS secs $QUEUE_SECS"
    echo "skew=workers $SKEW_WORKERS rate $SKEW_RATE fraction $SKEW_FRACTION slow_ms $SKEW_MS secs $SKEW_SECS"
    echo "sticky=workers $EVEN_WORKERS ips $STICKY_IPS"
    echo "l4l_rounds=$L4L_ROUNDS chaos_secs=$CHAOS_SECS"
  } > "$OUT/schedules/meta.txt"
  local p
  for p in $SCHED_PARTS; do
    case $p in
      even|queue|skew|sticky|cost|l4l|chaos) ;;
      *) log "unknown schedules part '$p'"; continue ;;
    esac
    echo "loadavg_before_schedules_$p=$(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/meta.txt"
    "sched_$p"
  done
}
