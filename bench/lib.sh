# bench/lib.sh - helpers for bench/run.sh (sourced; bash).
#
# The server table, start_server/stop_server, tree_pids, pid_ticks and smaps_kb come from the
# peers' scripts/lib.sh (sourced by run.sh from its scratch copy of the peers directory); this
# file adds what the crate's bench needs on top: progress output, background children that
# can be stopped on exit, /proc readers and the wrk output parsers.

log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "run.sh: $*"; exit 2; }

# ---------------------------------------------------------------------------------------------
# Children: every long command runs in the background and is waited for, so that a SIGINT or
# SIGTERM to run.sh is handled at once and the EXIT trap can stop that child's whole tree.

CHILD_PID=""
LOG_FD=""

# run_logged LOGFILE CMD... : run CMD with stdout+stderr to LOGFILE and to our stderr; return
# its exit status.
run_logged() {
  local logf=$1 fd tee_pid rc; shift
  exec {fd}> >(tee -a "$logf" >&2)
  tee_pid=$!
  LOG_FD=$fd
  "$@" >&$fd 2>&1 {fd}>&- &
  CHILD_PID=$!
  wait "$CHILD_PID"
  rc=$?
  CHILD_PID=""
  exec {fd}>&-
  LOG_FD=""
  # the log is complete once tee has exited (bounded: a stray holder of the pipe must not hang us)
  local i
  for ((i = 0; i < 100; i++)); do pid_alive "$tee_pid" || break; sleep 0.1; done
  return $rc
}

# stop_tree PID [GRACE_S] : SIGTERM PID, wait up to GRACE_S (10) for its whole tree (as seen
# before the signal) to go, SIGKILL what is left, by pid.
stop_tree() {
  local root=$1 grace=${2:-10} pids p i alive
  [ -n "$root" ] || return 0
  pids=$(tree_pids "$root")
  [ -n "$pids" ] || return 0
  kill -TERM "$root" 2>/dev/null
  for ((i = 0; i < grace * 10; i++)); do
    alive=0
    for p in $pids; do pid_alive "$p" && alive=1; done
    [ $alive = 0 ] && break
    sleep 0.1
  done
  for p in $pids; do
    if pid_alive "$p"; then
      log "pid $p still alive, SIGKILL"
      kill -KILL "$p" 2>/dev/null
    fi
  done
  wait "$root" 2>/dev/null
}

# all descendants of this shell (not including itself)
my_descendants() {
  local c
  for c in $(cat /proc/$$/task/*/children 2>/dev/null); do tree_pids "$c"; done
}

# ---------------------------------------------------------------------------------------------
# /proc readers

# on-CPU time of a task in ns (first field of /proc/PID/schedstat; 0 if gone). Exact, unlike
# utime+stime, which are sampled in clock ticks.
pid_sched_ns() {
  local a
  read -r a _ < "/proc/$1/schedstat" 2>/dev/null || { echo 0; return; }
  echo "${a:-0}"
}

# sum of pid_sched_ns over PIDS (one awk, not one process per pid)
tree_sched_ns() {
  local p files=()
  for p in "$@"; do files+=("/proc/$p/schedstat"); done
  # %.0f: mawk clamps %d at 2^31-1 (2.1 s of CPU), which broke long runs
  awk '{s += $1} END {printf "%.0f", s}' "${files[@]}" 2>/dev/null || echo 0
}

pid_threads() { awk '$1=="Threads:"{print $2}' "/proc/$1/status" 2>/dev/null; }

# ports: is something listening on 127.0.0.1:PORT (or *:PORT)?
port_busy() {
  if command -v ss >/dev/null 2>&1; then
    [ -n "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]
  else
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
  fi
}

# free_port START : first port >= START that nobody listens on
free_port() {
  local p=$1
  while port_busy "$p"; do p=$((p + 1)); done
  echo "$p"
}

# ---------------------------------------------------------------------------------------------
# wrk output

wrk_rps()      { awk '/^Requests\/sec:/{printf "%.0f", $2}' "$1"; }
wrk_requests() { awk '/ requests in /{print $1}' "$1"; }
wrk_errors() {
  local s n
  s=$(awk '/Socket errors:/{gsub(",","");print $4+$6+$8+$10}' "$1")
  n=$(awk '/Non-2xx/{print $NF}' "$1")
  echo $(( ${s:-0} + ${n:-0} ))
}
to_us() {                  # "345.00us" / "1.23ms" / "2.00s" -> microseconds
  awk -v v="$1" 'BEGIN{
    if (v ~ /us$/) { sub(/us$/,"",v); printf "%.0f", v }
    else if (v ~ /ms$/) { sub(/ms$/,"",v); printf "%.0f", v*1000 }
    else if (v ~ /s$/) { sub(/s$/,"",v); printf "%.0f", v*1000000 }
    else printf "NA" }'
}
wrk_pct_us() { to_us "$(awk -v p="$2%" '$1==p{print $2}' "$1")"; }

# seconds in a duration like 10s / 2s / 1m (wrk syntax; plain numbers are seconds)
dur_s() {
  case $1 in
    *ms) echo 1 ;;
    *s) echo "${1%s}" ;;
    *m) echo $(( ${1%m} * 60 )) ;;
    *h) echo $(( ${1%h} * 3600 )) ;;
    *) echo "$1" ;;
  esac
}
