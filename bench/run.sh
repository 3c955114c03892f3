#!/usr/bin/env bash
# mailhook benchmark: accept path, end to end, memory, CPU and disk writes, against a bare-axum
# ceiling and against the seed's own Flask + gunicorn + Celery + Redis + SQLite stack (the
# "original"), for every backend this build and machine support; then the ingest rate as the
# table grows, and the cost model (CPU and bytes per request and per event at each stage, beside
# the physical floor of each). Writes the generated part of bench/RESULTS.md (and a latency PNG
# when gnuplot is available); the hand-written analysis around it is kept.
#
#   bench/run.sh                         # the full run (about an hour on 2 cores)
#   BENCH_DURATION=3 BENCH_RUNS=1 bench/run.sh     # a quick run (about 15 min)
#
# Knobs (environment):
#   BENCH_SECTIONS        what to run                                ("throughput growth cost")
#   BENCH_DURATION        seconds of load per phase                  (15)
#   BENCH_RUNS            runs of each throughput phase; throughput is the median of the runs,
#                         p99 and max the worst                      (3)
#   BENCH_CONNECTIONS     concurrent connections                     (64)
#   BENCH_THREADS         wrk threads                                (2)
#   BENCH_CONFIGS         which configurations                       ("anchor sqlite redis amqp")
#   BENCH_PAYLOADS        which payloads                             ("report5 opened report100")
#   BENCH_IDS             messageIds: random (20 lowercase letters and digits, as Infobip makes
#                         them) or sequential (the old run-prefix-counter ids)     (random)
#   BENCH_ANCHOR          the seed's stack     (../shared/anchors/flask-celery from the checkout)
#   BENCH_GROWTH_SIZES    stored events before the growth phases     ("0 1000000"; the full
#                         measurement is "0 1000000 10000000": about 35 GB of disk, 30+ min)
#   BENCH_GROWTH_CONFIGS  configurations for the growth phases       ("sqlite redis")
#   BENCH_GROWTH_PAYLOAD  payload of the growth phases               (report5)
#   BENCH_COST_EVENTS     events written by each floor example       (100000)
#   BENCH_TAIL_CONFIGS    the tail experiments, each BENCH_RUNS times on BENCH_TAIL_PAYLOADS
#                         ("sqlite sqlite+api sqlite+tmpfs sqlite+warn sqlite+strace"): embedded
#                         as is; +api: API alone (--no-worker); +tmpfs: queue and table in
#                         /dev/shm (no disk flush); +warn: RUST_LOG=warn; +strace: every
#                         fsync/fdatasync timed by strace, per thread
#   BENCH_TAIL_PAYLOADS   payloads of the tail experiments           ("report5 opened")
#   BENCH_DRAIN_TIMEOUT   seconds to wait for the table to catch up  (300)
#   BENCH_RUST_LOG        mailhook's RUST_LOG (production default)   (info)
#   BENCH_PORT            first TCP port used on 127.0.0.1           (18700)
#   BENCH_OUT             report path                                (bench/RESULTS.md)
#   BENCH_KEEP            set: keep the work dir (logs, wrk output, results.jsonl, the phases'
#                         databases: GBs after a growth section) at the end
#   BENCH_MACHINE_NOTE    a line about the machine, printed in bold at the top of the report
#                         (e.g. that it was shared while the figures were taken)
#   PG_URL / REDIS_URL / AMQP_URL   the services (defaults: 127.0.0.1, postgres trust auth,
#                                   redis db 0, guest/guest on vhost /)
#
# Load only ever targets 127.0.0.1 and every phase is bounded in time. Each phase gets a fresh
# temp dir, a fresh PostgreSQL database and its own queue name; the original runs on a Redis
# server of its own (on BENCH_PORT - 1, nothing saved to disk), so its Celery keys never meet
# anyone else's. Everything this script started is stopped, and every database and queue it
# created is dropped, on exit.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)

SECTIONS=${BENCH_SECTIONS:-throughput growth cost tail}
DURATION=${BENCH_DURATION:-15}
RUNS=${BENCH_RUNS:-3}
CONNECTIONS=${BENCH_CONNECTIONS:-64}
THREADS=${BENCH_THREADS:-2}
CONFIGS=${BENCH_CONFIGS:-anchor sqlite redis amqp}
PAYLOADS=${BENCH_PAYLOADS:-report5 opened report100}
IDS=${BENCH_IDS:-random}
ANCHOR=${BENCH_ANCHOR:-$ROOT/../shared/anchors/flask-celery}
GROWTH_SIZES=${BENCH_GROWTH_SIZES:-0 1000000}
GROWTH_CONFIGS=${BENCH_GROWTH_CONFIGS:-sqlite redis}
GROWTH_PAYLOAD=${BENCH_GROWTH_PAYLOAD:-report5}
COST_EVENTS=${BENCH_COST_EVENTS:-100000}
TAIL_CONFIGS=${BENCH_TAIL_CONFIGS:-sqlite sqlite+api sqlite+tmpfs sqlite+warn sqlite+strace}
TAIL_PAYLOADS=${BENCH_TAIL_PAYLOADS:-report5 opened}
DRAIN_TIMEOUT=${BENCH_DRAIN_TIMEOUT:-300}
MH_LOG=${BENCH_RUST_LOG:-info}
PORT=${BENCH_PORT:-18700}
OUT=${BENCH_OUT:-bench/RESULTS.md}
PG_URL=${PG_URL:-postgres://postgres@127.0.0.1:5432}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379/0}
AMQP_URL=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
ANCHOR_REDIS_PORT=$((PORT - 1))

case $IDS in random | sequential) ;; *) echo "BENCH_IDS must be random or sequential" >&2; exit 2 ;; esac
has() { [[ " $1 " == *" $2 "* ]]; }

RUN_ID=$(date +%Y%m%d%H%M%S)$$
WORK=$(mktemp -d "/tmp/mailhook-bench.XXXXXX")
RESULTS=$WORK/results.jsonl
NOTES=$WORK/notes.txt
: >"$RESULTS"
: >"$NOTES"
PIDS=()
PG_DBS=()
QUEUES=()
CLK_TCK=$(getconf CLK_TCK)
T_START=$(date +%s)

log() { printf '==> %s\n' "$*" >&2; }
note() { printf '%s\n' "$*" >>"$NOTES"; log "NOTE: $*"; }
now() { date +%s.%N; }

stop_pid() { # pid: SIGTERM, then SIGKILL after 30 s (Celery's prefork pool takes its time)
  local pid=$1
  kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 300); do
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local pid db q
  # Descendants too (a tracee that strace leaves behind, a Celery pool child), found first.
  local -a tree=()
  for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && tree+=($(tree_pids "$pid")); done
  for pid in "${PIDS[@]}" "${tree[@]}"; do stop_pid "$pid"; done
  for db in "${PG_DBS[@]}"; do
    psql "$PG_URL/postgres" -qAtc "DROP DATABASE IF EXISTS \"$db\"" >/dev/null 2>&1 || true
  done
  for q in "${QUEUES[@]}"; do
    if command -v redis-cli >/dev/null; then
      redis-cli -u "$REDIS_URL" --scan --pattern "*$q*" 2>/dev/null |
        while read -r key; do redis-cli -u "$REDIS_URL" DEL "$key" >/dev/null 2>&1 || true; done
    fi
    if command -v rabbitmqctl >/dev/null; then
      rabbitmqctl -q delete_queue "$q" >/dev/null 2>&1 || true
      rabbitmqctl -q delete_queue "$q.dlq" >/dev/null 2>&1 || true
    fi
  done
  rm -rf /dev/shm/mailhook-bench-"$RUN_ID"-*
  if [[ -n ${BENCH_KEEP:-} ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------------------------
apt_install() { # packages...: apt-get install, with one apt-get update on the first miss
  if [[ -z ${APT_UPDATED:-} ]]; then apt-get update -qq >/dev/null 2>&1 || true; APT_UPDATED=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1
}
# wrk: a C load generator from Debian, one epoll loop per thread. On a 2-core machine the load
# generator shares the CPU with the server, so the cheaper it is per request the more of the
# machine the server gets; wrk's Lua request() hook also lets every request carry unique ids.
command -v wrk >/dev/null || { log "installing wrk"; apt_install wrk; }
command -v sqlite3 >/dev/null || { log "installing sqlite3"; apt_install sqlite3; }
command -v python3 >/dev/null || { log "installing python3"; apt_install python3; }
command -v curl >/dev/null || { log "installing curl"; apt_install curl; }
if ! command -v gnuplot >/dev/null; then
  log "installing gnuplot-nox (for the latency plot; optional)"
  apt_install gnuplot-nox || note "gnuplot unavailable: no latency plot"
fi

# The original: checked before anything is built, so a missing anchor fails at once.
if has "$CONFIGS" anchor && has "$SECTIONS" throughput; then
  if [[ ! -f $ANCHOR/app.py || ! -f $ANCHOR/tasks.py || ! -f $ANCHOR/models.py ]]; then
    echo "bench/run.sh: the seed's Flask + Celery stack is not at $ANCHOR" >&2
    echo "  (expected app.py, tasks.py, models.py: shared/anchors/flask-celery beside the checkout)." >&2
    echo "  Point BENCH_ANCHOR at it, or leave 'anchor' out of BENCH_CONFIGS." >&2
    exit 2
  fi
  ANCHOR=$(cd "$ANCHOR" && pwd)
  command -v redis-server >/dev/null || { log "installing redis-server (the original's broker)"; apt_install redis-server; }
fi

# ---------------------------------------------------------------------------------------------
# Build once
# ---------------------------------------------------------------------------------------------
BUILD_CMD="cargo build --release --bin mailhook --example bare_axum --example bare_append --example bare_insert --example prefill"
log "$BUILD_CMD"
$BUILD_CMD >&2
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
# Copy the binaries: the target dir is shared, and a concurrent build must not swap them mid-run.
mkdir -p "$WORK/bin"
for b in mailhook examples/bare_axum examples/bare_append examples/bare_insert examples/prefill; do
  cp "$TARGET_DIR/release/$b" "$WORK/bin/"
done
MAILHOOK=$WORK/bin/mailhook
BARE=$WORK/bin/bare_axum

# The original's virtualenv, pinned, rebuilt when the requirements change (as the tests build
# target/celery-venv).
ANCHOR_VENV=$TARGET_DIR/anchor-venv
ANCHOR_PY=$ANCHOR_VENV/bin/python
ensure_anchor_venv() {
  local reqs=$ROOT/bench/anchor-requirements.txt want
  want=$(sha256sum "$reqs" | cut -d' ' -f1)
  if [[ $(cat "$ANCHOR_VENV/requirements.sha256" 2>/dev/null) == "$want" ]]; then return 0; fi
  log "building $ANCHOR_VENV (pip install, once)"
  # Chained: this runs under `||`, where set -e does not stop at a failed pip.
  rm -rf "$ANCHOR_VENV" &&
    python3 -m venv "$ANCHOR_VENV" >&2 &&
    "$ANCHOR_VENV/bin/pip" install --quiet --disable-pip-version-check --timeout 60 -r "$reqs" >&2 &&
    echo "$want" >"$ANCHOR_VENV/requirements.sha256"
}

# ---------------------------------------------------------------------------------------------
# Payloads: templates with @ID@ where each messageId goes (filled per request by post.lua)
# ---------------------------------------------------------------------------------------------
python3 - "$ROOT/tests/fixtures/examples" "$WORK" <<'PY'
import json, sys
src, work = sys.argv[1], sys.argv[2]
def write(out, d, events):
    for e in events:
        e["messageId"] = "@ID@"
    text = json.dumps(d, separators=(",", ":"), ensure_ascii=False)
    open(f"{work}/{out}.json", "w").write(text)
    open(f"{work}/{out}.events", "w").write(str(len(events)))
def template(name, out):
    d = json.load(open(f"{src}/{name}"))
    write(out, d, d["results"] if "results" in d else [d])
template("delivered-dict.json", "report5")
template("opened.json", "opened")
# Infobip's default bucket: 100 results in one report (the example's five, twenty times over).
d = json.load(open(f"{src}/delivered-dict.json"))
d["results"] = [json.loads(json.dumps(r)) for _ in range(20) for r in d["results"]]
write("report100", d, d["results"])
PY

# ---------------------------------------------------------------------------------------------
# Measurement helpers
# ---------------------------------------------------------------------------------------------
tree_pids() { # pid: the pid and all its descendants
  local p=$1 c
  echo "$p"
  for c in $(ps -o pid= --ppid "$p" 2>/dev/null); do tree_pids "$c"; done
}
# CPU ticks of a process tree: utime + stime of every live member, plus cutime + cstime (its
# children that have exited and been waited for, e.g. recycled workers).
cpu_ticks() {
  local p sum=0 t
  for p in $(tree_pids "$1"); do
    t=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12 + $13 + $14 + $15}') || continue
    sum=$((sum + ${t:-0}))
  done
  echo "$sum"
}
hwm_kb() { # peak RSS of a tree: the sum of each member's VmHWM
  local p sum=0 v
  for p in $(tree_pids "$1"); do
    v=$(awk '/^VmHWM:/ {print $2}' "/proc/$p/status" 2>/dev/null) || continue
    sum=$((sum + ${v:-0}))
  done
  echo "$sum"
}
write_bytes() { # bytes a tree caused to be written to storage (/proc/PID/io)
  local p sum=0 v
  for p in $(tree_pids "$1"); do
    v=$(awk '/^write_bytes:/ {print $2}' "/proc/$p/io" 2>/dev/null) || continue
    sum=$((sum + ${v:-0}))
  done
  echo "$sum"
}
file_bytes() { # paths...: total size of those that exist
  local f sum=0
  for f in "$@"; do [[ -e $f ]] && sum=$((sum + $(stat -c %s "$f"))); done
  echo "$sum"
}

wait_health() { # port pid...: 0 when /health answers 200 while the processes live
  local port=$1; shift
  local pid
  for _ in $(seq 1 150); do
    for pid in "$@"; do kill -0 "$pid" 2>/dev/null || return 1; done
    if curl -fs -o /dev/null "http://127.0.0.1:$port/health"; then return 0; fi
    sleep 0.1
  done
  return 1
}

wait_port() { # port [pid]: until something accepts connections on the port
  for _ in $(seq 1 300); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    [[ -n ${2:-} ]] && { kill -0 "$2" 2>/dev/null || return 1; }
    sleep 0.1
  done
  return 1
}

count_rows() { # db_url [above_id]: rows with an id above above_id (rows added since a prefill)
  local q="SELECT count(*) FROM email_callback WHERE id > ${2:-0}"
  case $1 in
    sqlite://*) sqlite3 -cmd '.timeout 10000' "${1#sqlite://}" "$q" ;;
    postgres://*) psql "$1" -qAtc "$q" ;;
  esac
}
max_id() { # db_url
  case $1 in
    sqlite://*) sqlite3 -cmd '.timeout 10000' "${1#sqlite://}" 'SELECT coalesce(max(id), 0) FROM email_callback' ;;
    postgres://*) psql "$1" -qAtc 'SELECT coalesce(max(id), 0) FROM email_callback' ;;
  esac
}

run_wrk() { # url payload out_file
  wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --timeout 10s --latency \
    -s "$ROOT/bench/post.lua" "$1" -- "$WORK/$2.json" "$RUN_ID-$PHASE" "$IDS" >"$3" 2>&1
  grep '^WRKJSON ' "$3" | sed 's/^WRKJSON //'
}
wrk_field() { python3 -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$1" "$2"; }

# Waits until the table holds every accepted event, then until the count stops moving (requests
# cut off by wrk's deadline may have been committed too). Sets ROWS, ROWS_AT_LOAD_END, T_LAST,
# DRAINED.
wait_rows() { # db_url expected t_load_end above_id
  local db_url=$1 expected=$2 t_load=$3 above=$4
  ROWS_AT_LOAD_END=$(count_rows "$db_url" "$above")
  ROWS=$ROWS_AT_LOAD_END T_LAST=$t_load DRAINED=true
  local prev=-1 stable=0 deadline t
  deadline=$(awk -v t="$t_load" -v d="$DRAIN_TIMEOUT" 'BEGIN{printf "%.3f", t + d}')
  while :; do
    t=$(now)
    ROWS=$(count_rows "$db_url" "$above")
    if [[ $ROWS != "$prev" ]]; then prev=$ROWS; T_LAST=$t; stable=0; else stable=$((stable + 1)); fi
    if ((ROWS >= expected && stable >= 4)); then break; fi
    if awk -v a="$t" -v b="$deadline" 'BEGIN{exit !(a > b)}'; then DRAINED=false; break; fi
    sleep 0.25
  done
}

# Per-process figures, as a JSON list: name, peak RSS, CPU s and bytes written over the phase.
procs_json() { # "name|pid|cpu0_ticks|wb0" ...
  local out="[" sep="" spec name pid c0 w0 hwm cpu wb
  for spec in "$@"; do
    IFS='|' read -r name pid c0 w0 <<<"$spec"
    if kill -0 "$pid" 2>/dev/null; then
      hwm=$(hwm_kb "$pid")
      cpu=$(awk -v a="$(cpu_ticks "$pid")" -v b="$c0" -v hz="$CLK_TCK" 'BEGIN{printf "%.3f", (a - b) / hz}')
      wb=$(($(write_bytes "$pid") - w0))
    else
      hwm=null; cpu=null; wb=null
      note "$CUR: $name died during the phase"
    fi
    out+="$sep{\"name\":\"$name\",\"vmhwm_kb\":$hwm,\"cpu_s\":$cpu,\"write_bytes\":$wb}"
    sep=","
  done
  echo "$out]"
}
proc_spec() { echo "$1|$2|$(cpu_ticks "$2")|$(write_bytes "$2")"; }

# ---------------------------------------------------------------------------------------------
# The original's broker: a Redis server of its own, nothing saved, as the anchor's bench runs it
# ---------------------------------------------------------------------------------------------
ANCHOR_REDIS_PID=
start_anchor_redis() {
  [[ -n $ANCHOR_REDIS_PID ]] && return 0
  if redis-cli -p "$ANCHOR_REDIS_PORT" ping >/dev/null 2>&1; then
    note "anchor: something already answers on port $ANCHOR_REDIS_PORT; set BENCH_PORT elsewhere"
    return 1
  fi
  mkdir -p "$WORK/anchor-redis"
  redis-server --bind 127.0.0.1 --port "$ANCHOR_REDIS_PORT" --save "" --appendonly no \
    --dir "$WORK/anchor-redis" --daemonize no >"$WORK/anchor-redis/redis.log" 2>&1 &
  ANCHOR_REDIS_PID=$!; PIDS+=("$!")
  for _ in $(seq 1 100); do
    redis-cli -p "$ANCHOR_REDIS_PORT" ping >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  note "anchor: its Redis server did not start ($(tail -n1 "$WORK/anchor-redis/redis.log"))"
  return 1
}

PHASE=0
RUN=1
SECTION=throughput
GROWTH_DB=       # growth: the database the phase writes to (prefilled), instead of a fresh one
PREFILLED=0      # growth: events stored before the phase
PREFILL_S=null   # growth: seconds the prefill took
# One phase: fresh processes, load for DURATION, then wait for the table to hold every event.
phase() { # config[+modifier...] payload (modifiers: see BENCH_TAIL_CONFIGS)
  local config=${1%%+*} mods="+${1#*+}+" payload=$2
  [[ $1 == *+* ]] || mods=""
  local label=$1
  PHASE=$((PHASE + 1))
  CUR="$label/$payload"
  local port=$((PORT + PHASE)) dir="$WORK/$PHASE-$config-$payload"
  # +tmpfs: the databases in memory, so that no commit waits for the disk.
  local dbdir=$dir
  [[ $mods == *+tmpfs+* ]] && { dbdir="/dev/shm/mailhook-bench-$RUN_ID-$PHASE"; mkdir -p "$dbdir"; }
  local events_per_req
  events_per_req=$(cat "$WORK/$payload.events")
  mkdir -p "$dir"
  local queue="mailhook-bench-$RUN_ID-$PHASE"
  local db_url="" broker_url
  local -a specs=() pids=()

  case $config in
    ceiling)
      "$BARE" "127.0.0.1:$port" >"$dir/bare.log" 2>&1 &
      pids=($!); PIDS+=("$!")
      wait_port "$port" "$!" || { note "bare_axum did not start"; return 1; }
      ;;
    anchor)
      ensure_anchor_venv || { note "anchor: its virtualenv could not be built"; return 1; }
      start_anchor_redis || return 1
      redis-cli -p "$ANCHOR_REDIS_PORT" DEL email-webhook unacked unacked_index >/dev/null
      db_url="sqlite://$dir/anchor.db"
      # The anchor's own files, run where they are; bytecode goes to the work dir, so the
      # anchor (shared, maybe read-only) is never written to.
      export DATABASE_URL="sqlite:///$dir/anchor.db" CELERY_BROKER_URL="redis://127.0.0.1:$ANCHOR_REDIS_PORT/0"
      export PYTHONPYCACHEPREFIX=$WORK/pycache
      (cd "$ANCHOR" && "$ANCHOR_PY" models.py) >"$dir/models.log" 2>&1 || {
        note "anchor: models.py failed: $(tail -n1 "$dir/models.log")"; return 1; }
      local node="bench-$RUN_ID-$PHASE@localhost"
      (cd "$ANCHOR" && exec "$ANCHOR_PY" -m celery -A tasks worker -Q email-webhook -c 2 -P prefork \
        --loglevel=WARNING -n "$node") >"$dir/celery.log" 2>&1 &
      pids+=($!); PIDS+=("$!")
      (cd "$ANCHOR" && exec "$ANCHOR_PY" -m gunicorn -w 2 -b "127.0.0.1:$port" --log-level warning \
        app:app) >"$dir/gunicorn.log" 2>&1 &
      pids+=($!); PIDS+=("$!")
      local ready=false
      if wait_port "$port" "${pids[1]}"; then
        for _ in $(seq 1 40); do
          kill -0 "${pids[0]}" 2>/dev/null || break
          if (cd "$ANCHOR" && "$ANCHOR_PY" -m celery -A tasks inspect ping -d "$node" --timeout 1) \
            >/dev/null 2>&1; then ready=true; break; fi
        done
      fi
      unset DATABASE_URL CELERY_BROKER_URL PYTHONPYCACHEPREFIX
      if [[ $ready != true ]]; then
        note "anchor: did not come up ($(tail -qn1 "$dir/celery.log" "$dir/gunicorn.log" | tr '\n' ' ' | cut -c1-300))"
        local pid; for pid in "${pids[@]}"; do stop_pid "$pid"; done
        return 1
      fi
      ;;
    sqlite | redis | amqp)
      if [[ -n $GROWTH_DB ]]; then
        db_url=$GROWTH_DB
      elif [[ $config == sqlite ]]; then
        db_url="sqlite://$dbdir/mailhook.db"
      else
        local db="mailhook_bench_${RUN_ID}_$PHASE"
        psql "$PG_URL/postgres" -qAtc "CREATE DATABASE \"$db\"" >/dev/null
        PG_DBS+=("$db")
        db_url="$PG_URL/$db"
      fi
      case $config in
        sqlite) broker_url="sqlite://$dbdir/mailhook-queue.db" ;;
        redis) broker_url=$REDIS_URL ;;
        amqp) broker_url=$AMQP_URL ;;
      esac
      QUEUES+=("$queue")
      local rust_log=$MH_LOG
      [[ $mods == *+warn+* ]] && rust_log=warn
      export DATABASE_URL=$db_url BROKER_URL=$broker_url MAILHOOK_QUEUE=$queue RUST_LOG=$rust_log
      "$MAILHOOK" migrate >"$dir/migrate.log" 2>&1 || {
        note "$config: migrate failed: $(tail -n1 "$dir/migrate.log")"; return 1; }
      local -a wrap=()
      # +strace: only fsync and fdatasync stop the process (seccomp filter), each timed (-T).
      # -y names each call's file, -ttt stamps when it started.
      [[ $mods == *+strace+* ]] && wrap=(strace -f --seccomp-bpf -e trace=fsync,fdatasync -y -ttt -T -qq -o "$dir/strace.txt")
      if [[ $config == sqlite && $mods == *+api+* ]]; then
        "${wrap[@]}" "$MAILHOOK" serve --no-worker --bind "127.0.0.1:$port" >"$dir/serve.log" 2>&1 &
        pids=($!); PIDS+=("$!")
        db_url=""   # nothing is stored: no end-to-end figure
      elif [[ $config == sqlite ]]; then
        "${wrap[@]}" "$MAILHOOK" serve --bind "127.0.0.1:$port" >"$dir/serve.log" 2>&1 &
        pids=($!); PIDS+=("$!")
      else
        "$MAILHOOK" serve --no-worker --bind "127.0.0.1:$port" >"$dir/serve.log" 2>&1 &
        pids=($!); PIDS+=("$!")
        "$MAILHOOK" worker >"$dir/worker.log" 2>&1 &
        pids+=($!); PIDS+=("$!")
      fi
      unset DATABASE_URL BROKER_URL MAILHOOK_QUEUE RUST_LOG
      if ! wait_health "$port" "${pids[@]}"; then
        local why
        why=$(grep -hvE '^[[:space:]]+([0-9]+:|at )' "$dir"/*.log 2>/dev/null |
          grep -iE 'unsupported|refused|error|failed' | tail -n1 | sed 's/^ *//' | cut -c1-300 || true)
        note "$config: skipped, the service did not become healthy with BROKER_URL=${broker_url%%://*}://... (${why:-no error logged})"
        local pid; for pid in "${pids[@]}"; do stop_pid "$pid"; done
        return 1
      fi
      ;;
  esac
  local -a names
  case $config in
    ceiling) names=(bare_axum) ;;
    anchor) names=("celery worker -c 2" "gunicorn -w 2") ;;
    sqlite) names=("mailhook serve") ;;
    *) names=("mailhook serve --no-worker" "mailhook worker") ;;
  esac
  local i
  for i in "${!pids[@]}"; do specs+=("$(proc_spec "${names[i]}" "${pids[i]}")"); done
  [[ $config == anchor ]] && specs+=("$(proc_spec "redis-server (the original's)" "$ANCHOR_REDIS_PID")")
  local above=0
  [[ -n $db_url && $PREFILLED -gt 0 ]] && above=$(max_id "$db_url")

  log "phase $PHASE ($SECTION, run $RUN): $label / $payload: ${DURATION}s, $CONNECTIONS connections"
  # Tail phases of the embedded default: the WAL files' sizes every 50 ms. A WAL past
  # wal_autocheckpoint's pages (2000 x 4 KiB) means a committing connection checkpoints inline.
  local sampler=""
  if [[ $SECTION == tail && $config == sqlite ]]; then
    while :; do
      echo "$EPOCHREALTIME $(stat -c %s "$dbdir/mailhook-queue.db-wal" 2>/dev/null || echo 0) $(stat -c %s "$dbdir/mailhook.db-wal" 2>/dev/null || echo 0)"
      sleep 0.05
    done >"$dir/wal.txt" &
    sampler=$!
  fi
  local t0 t_load wrk_json
  t0=$(now)
  wrk_json=$(run_wrk "http://127.0.0.1:$port/email" "$payload" "$dir/wrk.txt")
  t_load=$(now)
  local wal=null
  if [[ -n $sampler ]]; then
    kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null || true
    wal=$(awk 'BEGIN{q=0;t=0} {if ($2>q) q=$2; if ($3>t) t=$3} END{printf "{\"queue_wal_max\":%d,\"table_wal_max\":%d}", q, t}' "$dir/wal.txt")
  fi
  [[ -n $wrk_json ]] || { note "$config/$payload: wrk printed no summary: $(tail -n3 "$dir/wrk.txt")"; return 1; }
  local requests status_errors
  requests=$(wrk_field "$wrk_json" requests)
  status_errors=$(wrk_field "$wrk_json" status_errors)
  local accepted=$((requests - status_errors))

  ROWS_AT_LOAD_END=null ROWS=0 T_LAST=$t_load DRAINED=true
  [[ -n $db_url ]] && wait_rows "$db_url" $((accepted * events_per_req)) "$t_load" "$above"

  local procs fsyncs=null
  procs=$(procs_json "${specs[@]}")
  # strace leaves its tracee running when it is stopped: stop mailhook itself first.
  [[ $mods == *+strace+* ]] && stop_pid "$(ps -o pid= --ppid "${pids[0]}" | head -n1 | tr -d ' ')"
  local pid; for pid in "${pids[@]}"; do stop_pid "$pid"; done
  local disk=null
  if [[ $config == sqlite && -z $GROWTH_DB ]]; then
    disk=$(file_bytes "$dbdir"/mailhook.db "$dbdir"/mailhook.db-wal "$dbdir"/mailhook-queue.db "$dbdir"/mailhook-queue.db-wal)
  fi
  [[ $dbdir != "$dir" ]] && rm -rf "$dbdir"
  [[ -s $dir/strace.txt ]] && fsyncs=$(python3 "$ROOT/bench/flushes.py" "$dir/strace.txt" "$t0" "$t_load")

  printf '{"section":"%s","run":%d,"config":"%s","payload":"%s","events_per_request":%d,"t0":%s,"t_load_end":%s,"t_last_row":%s,"accepted":%d,"rows_at_load_end":%s,"rows":%d,"drained":%s,"prefilled":%d,"prefill_s":%s,"disk_bytes":%s,"fsyncs":%s,"wal":%s,"wrk":%s,"procs":%s}\n' \
    "$SECTION" "$RUN" "$label" "$payload" "$events_per_req" "$t0" "$t_load" "$T_LAST" "$accepted" \
    "$ROWS_AT_LOAD_END" "$ROWS" "$DRAINED" "$PREFILLED" "$PREFILL_S" "$disk" "$fsyncs" "$wal" "$wrk_json" "$procs" >>"$RESULTS"
  sleep 1
}

# ---------------------------------------------------------------------------------------------
# Cost model: the embedded default split into its stages, each beside its physical floor
# ---------------------------------------------------------------------------------------------
# API accept alone (`serve --no-worker` on the SQLite queue, under wrk), then the worker alone
# (`mailhook worker` draining that queue into a fresh table), each process measured over its own
# stage; then the floors: bare_append (write + fdatasync of the same bodies, grouped by the
# connection count) and bare_insert (the same rows into a fresh table with the same pragmas).
cost_phase() { # payload
  local payload=$1
  PHASE=$((PHASE + 1))
  CUR="cost/$payload"
  local port=$((PORT + PHASE)) dir="$WORK/$PHASE-cost-$payload"
  local events_per_req
  events_per_req=$(cat "$WORK/$payload.events")
  mkdir -p "$dir"
  local queue="mailhook-bench-$RUN_ID-$PHASE"
  export DATABASE_URL="sqlite://$dir/mailhook.db" BROKER_URL="sqlite://$dir/mailhook-queue.db" \
    MAILHOOK_QUEUE=$queue RUST_LOG=$MH_LOG
  "$MAILHOOK" migrate >"$dir/migrate.log" 2>&1 || { note "cost: migrate failed"; return 1; }
  "$MAILHOOK" serve --no-worker --bind "127.0.0.1:$port" >"$dir/serve.log" 2>&1 &
  local api=$!; PIDS+=("$!")
  wait_health "$port" "$api" || { note "cost: serve --no-worker did not start"; return 1; }
  local api_spec; api_spec=$(proc_spec "API: serve --no-worker" "$api")
  log "phase $PHASE (cost): API alone / $payload: ${DURATION}s"
  local t0 t_load wrk_json
  t0=$(now)
  wrk_json=$(run_wrk "http://127.0.0.1:$port/email" "$payload" "$dir/wrk.txt")
  t_load=$(now)
  [[ -n $wrk_json ]] || { note "cost/$payload: wrk printed no summary"; stop_pid "$api"; return 1; }
  local api_procs; api_procs=$(procs_json "$api_spec")
  stop_pid "$api"
  local queue_bytes
  queue_bytes=$(file_bytes "$dir"/mailhook-queue.db "$dir"/mailhook-queue.db-wal)
  local requests status_errors accepted
  requests=$(wrk_field "$wrk_json" requests)
  status_errors=$(wrk_field "$wrk_json" status_errors)
  accepted=$((requests - status_errors))

  log "phase $PHASE (cost): worker alone drains $accepted callbacks"
  "$MAILHOOK" worker >"$dir/worker.log" 2>&1 &
  local wk=$!; PIDS+=("$!")
  local wk_spec; wk_spec=$(proc_spec "worker: mailhook worker" "$wk")
  local t_w0; t_w0=$(now)
  wait_rows "$DATABASE_URL" $((accepted * events_per_req)) "$t_w0" 0
  local wk_procs; wk_procs=$(procs_json "$wk_spec")
  stop_pid "$wk"
  unset DATABASE_URL BROKER_URL MAILHOOK_QUEUE RUST_LOG
  local table_bytes
  table_bytes=$(file_bytes "$dir"/mailhook.db "$dir"/mailhook.db-wal)

  local bodies=$(( COST_EVENTS / events_per_req )) append insert_p insert_s
  ((bodies < 1000)) && bodies=1000
  log "phase $PHASE (cost): floors: bare_append and bare_insert, $bodies callbacks"
  append=$("$WORK/bin/bare_append" --template "$WORK/$payload.json" --count "$bodies" \
    --group "$CONNECTIONS" --out "$dir/append.log")
  insert_p=$("$WORK/bin/bare_insert" --template "$WORK/$payload.json" --count "$bodies" \
    --batch 256 --db "$dir/bare-prepared.db" --via prepared)
  insert_s=$("$WORK/bin/bare_insert" --template "$WORK/$payload.json" --count "$bodies" \
    --batch 256 --db "$dir/bare-store.db" --via store)

  printf '{"section":"cost","run":1,"config":"cost","payload":"%s","events_per_request":%d,"t0":%s,"t_load_end":%s,"t_worker_start":%s,"t_last_row":%s,"accepted":%d,"rows":%d,"drained":%s,"queue_bytes":%d,"table_bytes":%d,"wrk":%s,"api":%s,"worker":%s,"append":%s,"insert_prepared":%s,"insert_store":%s}\n' \
    "$payload" "$events_per_req" "$t0" "$t_load" "$t_w0" "$T_LAST" "$accepted" "$ROWS" "$DRAINED" \
    "$queue_bytes" "$table_bytes" "$wrk_json" "$api_procs" "$wk_procs" "$append" "$insert_p" "$insert_s" >>"$RESULTS"
  sleep 1
}

# ---------------------------------------------------------------------------------------------
# Growth: the same load on a table that already holds N events (random ids)
# ---------------------------------------------------------------------------------------------
free_bytes() { df -B1 --output=avail "$1" | tail -n1 | tr -d ' '; }
growth_series() { # config
  local config=$1 db_url datadir size
  PHASE=$((PHASE + 1))
  local gdir="$WORK/$PHASE-growth-$config"
  mkdir -p "$gdir"
  if [[ $config == sqlite ]]; then
    db_url="sqlite://$gdir/mailhook.db"; datadir=$gdir
  else
    local db="mailhook_bench_${RUN_ID}_growth_$PHASE"
    psql "$PG_URL/postgres" -qAtc "CREATE DATABASE \"$db\"" >/dev/null || { note "growth: PostgreSQL unavailable"; return 1; }
    PG_DBS+=("$db")
    db_url="$PG_URL/$db"
    datadir=$(psql "$PG_URL/postgres" -qAtc 'SHOW data_directory' 2>/dev/null || echo /)
  fi
  DATABASE_URL=$db_url "$MAILHOOK" migrate >"$gdir/migrate.log" 2>&1 || {
    note "growth/$config: migrate failed: $(tail -n1 "$gdir/migrate.log")"; return 1; }
  local stored=0
  for size in $(tr ' ' '\n' <<<"$GROWTH_SIZES" | sort -n); do
    PREFILL_S=null
    if ((size > stored)); then
      # About 2 KB a row in the table and its index, plus the WAL: refuse rather than fill the disk.
      local need=$(((size - stored) * 3000)) avail
      avail=$(free_bytes "$datadir")
      if ((avail < need + 2 * 1024 * 1024 * 1024)); then
        note "growth/$config: $size events need about $((need >> 30)) GiB on $datadir; $((avail >> 30)) GiB free: skipped"
        break
      fi
      log "growth/$config: prefilling to $size events"
      local t0 out
      t0=$(now)
      out=$("$WORK/bin/prefill" --database-url "$db_url" --template "$WORK/$GROWTH_PAYLOAD.json" \
        --rows $((size - stored)) 2>"$gdir/prefill-$size.log") || {
        note "growth/$config: prefill failed: $(tail -n1 "$gdir/prefill-$size.log")"; return 1; }
      PREFILL_S=$(awk -v a="$(now)" -v b="$t0" 'BEGIN{printf "%.1f", a - b}')
      log "growth/$config: $out"
    fi
    [[ $config == sqlite ]] && sqlite3 "${db_url#sqlite://}" 'PRAGMA wal_checkpoint(TRUNCATE)' >/dev/null
    stored=$(count_rows "$db_url" 0)
    GROWTH_DB=$db_url PREFILLED=$stored
    phase "$config" "$GROWTH_PAYLOAD" || { GROWTH_DB= PREFILLED=0; return 1; }
    GROWTH_DB= PREFILLED=0
    stored=$(count_rows "$db_url" 0)
  done
  # A 10M-event table is tens of GB: gone before the next series fills another.
  if [[ $config == sqlite ]]; then
    rm -f "$gdir"/mailhook.db*
  else
    psql "$PG_URL/postgres" -qAtc "DROP DATABASE IF EXISTS \"${db_url##*/}\"" >/dev/null 2>&1 || true
  fi
}

# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
if has "$SECTIONS" throughput; then
  SECTION=throughput
  FAILED=" "
  for RUN in $(seq 1 "$RUNS"); do
    for payload in $PAYLOADS; do phase ceiling "$payload" || true; done
    for config in $CONFIGS; do
      has "$FAILED" "$config" && continue
      for payload in $PAYLOADS; do
        phase "$config" "$payload" || { FAILED+="$config "; break; }
      done
    done
  done
fi
if has "$SECTIONS" growth; then
  SECTION=growth
  RUN=1
  for config in $GROWTH_CONFIGS; do growth_series "$config" || true; done
fi
if has "$SECTIONS" tail; then
  SECTION=tail
  for RUN in $(seq 1 "$RUNS"); do
    for payload in $TAIL_PAYLOADS; do
      for config in $TAIL_CONFIGS; do phase "$config" "$payload" || true; done
    done
  done
fi
if has "$SECTIONS" cost; then
  SECTION=cost
  RUN=1
  for payload in $PAYLOADS; do cost_phase "$payload" || true; done
fi

# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
{
  echo "nproc=$(nproc)"
  echo "cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
  echo "mem=$(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)"
  echo "kernel=$(uname -r)"
  echo "os=$(sed -n 's/^PRETTY_NAME=//p' /etc/os-release | tr -d '"')"
  echo "rustc=$(rustc -V)"
  echo "wrk=$(wrk -v 2>&1 | head -n1 || true)"
  echo "sqlite3=$(sqlite3 --version | cut -d' ' -f1)"
  echo "postgresql=$(psql "$PG_URL/postgres" -qAtc 'SHOW server_version' 2>/dev/null || echo unavailable)"
  echo "redis=$(redis-cli -u "$REDIS_URL" INFO server 2>/dev/null | awk -F: '/^redis_version/ {print $2}' | tr -d '\r' || true)"
  echo "rabbitmq=$(rabbitmqctl -q version 2>/dev/null || echo unavailable)"
  if [[ -x ${ANCHOR_PY:-} ]]; then
    echo "original=$("$ANCHOR_PY" --version 2>&1); $("$ANCHOR_VENV/bin/pip" freeze 2>/dev/null | grep -iE '^(celery|kombu|redis|flask|gunicorn|sqlalchemy)==' | tr '\n' ' ')"
  fi
  echo "commit=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src Cargo.toml || echo ' (+ uncommitted changes)')"
  echo "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "load=$(cut -d' ' -f1-3 /proc/loadavg)"
  echo "wall_min=$(( ($(date +%s) - T_START + 30) / 60 ))"
} >"$WORK/machine.txt"

PLOT_DATA=$WORK/latency.dat
BENCH_ARGS="BENCH_DURATION=$DURATION BENCH_RUNS=$RUNS BENCH_CONNECTIONS=$CONNECTIONS BENCH_THREADS=$THREADS BENCH_IDS=$IDS BENCH_SECTIONS=\"$SECTIONS\" BENCH_CONFIGS=\"$CONFIGS\" BENCH_PAYLOADS=\"$PAYLOADS\" BENCH_GROWTH_SIZES=\"$GROWTH_SIZES\""
python3 "$ROOT/bench/report.py" "$RESULTS" "$NOTES" "$WORK/machine.txt" "$OUT" "$PLOT_DATA" \
  "$BENCH_ARGS" "$MH_LOG" "$BUILD_CMD" "$WORK"

if command -v gnuplot >/dev/null && [[ -s $PLOT_DATA ]]; then
  PNG="${OUT%.md}-latency.png"
  gnuplot <<GP || note "gnuplot failed: no latency plot"
set terminal pngcairo size 1100,560 noenhanced
set output "$PNG"
set title "POST /email latency at $CONNECTIONS connections (wrk, ms, log scale; p99 = worst of the runs)"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set logscale y
set ylabel "ms"
set xtics rotate by -30
set bmargin 7
set rmargin 8
set key top left
set grid ytics
plot "$PLOT_DATA" using 2:xtic(1) title "p50", "" using 3 title "p90", "" using 4 title "p99"
GP
fi
log "wrote $OUT"
