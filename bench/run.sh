#!/usr/bin/env bash
# mailhook benchmark: accept path, end to end, memory and CPU, against a bare-axum ceiling,
# for every backend this build and machine support. Writes bench/RESULTS.md (and a latency PNG
# when gnuplot is available).
#
#   bench/run.sh                         # the real run: 15 s per load phase
#   BENCH_DURATION=3 bench/run.sh        # a quick run
#
# Knobs (environment):
#   BENCH_DURATION        seconds of load per phase                  (15)
#   BENCH_CONNECTIONS     concurrent connections                     (64)
#   BENCH_THREADS         wrk threads                                (2)
#   BENCH_CONFIGS         which configurations                       ("sqlite redis amqp")
#   BENCH_PAYLOADS        which payloads                             ("report5 opened")
#   BENCH_DRAIN_TIMEOUT   seconds to wait for the table to catch up  (300)
#   BENCH_RUST_LOG        mailhook's RUST_LOG (production default)   (info)
#   BENCH_PORT            first TCP port used on 127.0.0.1           (18700)
#   BENCH_OUT             report path                                (bench/RESULTS.md)
#   PG_URL / REDIS_URL / AMQP_URL   the services (defaults: 127.0.0.1, postgres trust auth,
#                                   redis db 0, guest/guest on vhost /)
#
# Load only ever targets 127.0.0.1 and every phase is bounded in time. Each phase gets a fresh
# temp dir, a fresh PostgreSQL database and its own queue name; everything this script started
# is stopped, and every database and queue it created is dropped, on exit.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)

DURATION=${BENCH_DURATION:-15}
CONNECTIONS=${BENCH_CONNECTIONS:-64}
THREADS=${BENCH_THREADS:-2}
CONFIGS=${BENCH_CONFIGS:-sqlite redis amqp}
PAYLOADS=${BENCH_PAYLOADS:-report5 opened}
DRAIN_TIMEOUT=${BENCH_DRAIN_TIMEOUT:-300}
MH_LOG=${BENCH_RUST_LOG:-info}
PORT=${BENCH_PORT:-18700}
OUT=${BENCH_OUT:-bench/RESULTS.md}
PG_URL=${PG_URL:-postgres://postgres@127.0.0.1:5432}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379/0}
AMQP_URL=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}

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

log() { printf '==> %s\n' "$*" >&2; }
note() { printf '%s\n' "$*" >>"$NOTES"; log "NOTE: $*"; }
now() { date +%s.%N; }

stop_pid() { # pid: SIGTERM, then SIGKILL after 15 s
  local pid=$1
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 150); do
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local pid db q
  for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
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
  rm -rf "$WORK"
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

# ---------------------------------------------------------------------------------------------
# Build once
# ---------------------------------------------------------------------------------------------
BUILD_CMD="cargo build --release --bin mailhook --example bare_axum"
log "$BUILD_CMD"
$BUILD_CMD >&2
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
# Copy the binaries: the target dir is shared, and a concurrent build must not swap them mid-run.
mkdir -p "$WORK/bin"
cp "$TARGET_DIR/release/mailhook" "$WORK/bin/mailhook"
cp "$TARGET_DIR/release/examples/bare_axum" "$WORK/bin/bare_axum"
MAILHOOK=$WORK/bin/mailhook
BARE=$WORK/bin/bare_axum

# ---------------------------------------------------------------------------------------------
# Payloads: templates with @ID@ where each messageId goes (filled per request by post.lua)
# ---------------------------------------------------------------------------------------------
python3 - "$ROOT/tests/fixtures/examples" "$WORK" <<'PY'
import json, sys
src, work = sys.argv[1], sys.argv[2]
def template(name, out):
    d = json.load(open(f"{src}/{name}"))
    events = d["results"] if "results" in d else [d]
    for e in events:
        e["messageId"] = "@ID@"
    text = json.dumps(d, separators=(",", ":"), ensure_ascii=False)
    open(f"{work}/{out}.json", "w").write(text)
    open(f"{work}/{out}.events", "w").write(str(len(events)))
template("delivered-dict.json", "report5")
template("opened.json", "opened")
PY

# ---------------------------------------------------------------------------------------------
# Measurement helpers
# ---------------------------------------------------------------------------------------------
cpu_ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }
hwm_kb() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }

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

wait_port() { # port: bare_axum has no /health; wait until it accepts connections
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

count_rows() { # db_url
  case $1 in
    sqlite://*) sqlite3 -cmd '.timeout 10000' "${1#sqlite://}" 'SELECT count(*) FROM email_callback' ;;
    postgres://*) psql "$1" -qAtc 'SELECT count(*) FROM email_callback' ;;
  esac
}

run_wrk() { # url payload out_file
  wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --timeout 10s --latency \
    -s "$ROOT/bench/post.lua" "$1" -- "$WORK/$2.json" "$RUN_ID-$PHASE" >"$3" 2>&1
  grep '^WRKJSON ' "$3" | sed 's/^WRKJSON //'
}

PHASE=0
# One phase: fresh processes, load for DURATION, then wait for the table to hold every event.
phase() { # config payload
  local config=$1 payload=$2
  PHASE=$((PHASE + 1))
  local port=$((PORT + PHASE)) dir="$WORK/$config-$payload"
  local events_per_req
  events_per_req=$(cat "$WORK/$payload.events")
  mkdir -p "$dir"
  local queue="mailhook-bench-$RUN_ID-$PHASE"
  local db_url broker_url
  local -a pids=() names=()

  case $config in
    ceiling)
      "$BARE" "127.0.0.1:$port" >"$dir/bare.log" 2>&1 &
      pids=($!); names=(bare_axum); PIDS+=("$!")
      wait_port "$port" || { note "bare_axum did not start"; return 1; }
      ;;
    sqlite | redis | amqp)
      if [[ $config == sqlite ]]; then
        db_url="sqlite://$dir/mailhook.db"
        broker_url="sqlite://$dir/mailhook-queue.db"
      else
        local db="mailhook_bench_${RUN_ID}_$PHASE"
        psql "$PG_URL/postgres" -qAtc "CREATE DATABASE \"$db\"" >/dev/null
        PG_DBS+=("$db")
        db_url="$PG_URL/$db"
        if [[ $config == redis ]]; then broker_url=$REDIS_URL; else broker_url=$AMQP_URL; fi
      fi
      QUEUES+=("$queue")
      export DATABASE_URL=$db_url BROKER_URL=$broker_url MAILHOOK_QUEUE=$queue RUST_LOG=$MH_LOG
      "$MAILHOOK" migrate >"$dir/migrate.log" 2>&1 || {
        note "$config: migrate failed: $(tail -n1 "$dir/migrate.log")"; return 1; }
      if [[ $config == sqlite ]]; then
        "$MAILHOOK" serve --bind "127.0.0.1:$port" >"$dir/serve.log" 2>&1 &
        pids=($!); names=("mailhook serve"); PIDS+=("$!")
      else
        "$MAILHOOK" serve --no-worker --bind "127.0.0.1:$port" >"$dir/serve.log" 2>&1 &
        pids=($!); PIDS+=("$!")
        "$MAILHOOK" worker >"$dir/worker.log" 2>&1 &
        pids+=($!); PIDS+=("$!")
        names=("mailhook serve --no-worker" "mailhook worker")
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

  local -a cpu0=()
  local i
  for i in "${!pids[@]}"; do cpu0[i]=$(cpu_ticks "${pids[i]}"); done

  log "phase $PHASE: $config / $payload: ${DURATION}s, $CONNECTIONS connections"
  local t0 t_load wrk_json
  t0=$(now)
  wrk_json=$(run_wrk "http://127.0.0.1:$port/email" "$payload" "$dir/wrk.txt")
  t_load=$(now)
  [[ -n $wrk_json ]] || { note "$config/$payload: wrk printed no summary: $(tail -n3 "$dir/wrk.txt")"; return 1; }
  local requests status_errors
  requests=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["requests"])' "$wrk_json")
  status_errors=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["status_errors"])' "$wrk_json")
  local accepted=$((requests - status_errors))
  local expected=$((accepted * events_per_req))

  local rows_at_load_end=null rows=0 t_last="$t_load" drained=true
  if [[ $config != ceiling ]]; then
    rows_at_load_end=$(count_rows "$db_url")
    rows=$rows_at_load_end
    local prev=-1 deadline stable=0
    deadline=$(awk -v t="$t_load" -v d="$DRAIN_TIMEOUT" 'BEGIN{printf "%.3f", t + d}')
    # Until every accepted event is a row, then until the count stops moving (requests cut
    # off by wrk's deadline may have been committed too).
    while :; do
      local t
      t=$(now)
      rows=$(count_rows "$db_url")
      if [[ $rows != "$prev" ]]; then prev=$rows; t_last=$t; stable=0; else stable=$((stable + 1)); fi
      if ((rows >= expected && stable >= 4)); then break; fi
      if awk -v a="$t" -v b="$deadline" 'BEGIN{exit !(a > b)}'; then drained=false; break; fi
      sleep 0.25
    done
  fi

  local procs="[" sep=""
  for i in "${!pids[@]}"; do
    local pid=${pids[i]} hwm cpu
    if kill -0 "$pid" 2>/dev/null; then
      hwm=$(hwm_kb "$pid")
      cpu=$(awk -v a="$(cpu_ticks "$pid")" -v b="${cpu0[i]}" -v hz="$CLK_TCK" 'BEGIN{printf "%.3f", (a - b) / hz}')
    else
      hwm=null; cpu=null
      note "$config/$payload: ${names[i]} died during the phase"
    fi
    procs+="$sep{\"name\":\"${names[i]}\",\"vmhwm_kb\":$hwm,\"cpu_s\":$cpu}"
    sep=","
  done
  procs+="]"
  local pid; for pid in "${pids[@]}"; do stop_pid "$pid"; done

  printf '{"config":"%s","payload":"%s","events_per_request":%d,"t0":%s,"t_load_end":%s,"t_last_row":%s,"accepted":%d,"rows_at_load_end":%s,"rows":%d,"drained":%s,"wrk":%s,"procs":%s}\n' \
    "$config" "$payload" "$events_per_req" "$t0" "$t_load" "$t_last" "$accepted" \
    "$rows_at_load_end" "$rows" "$drained" "$wrk_json" "$procs" >>"$RESULTS"
  sleep 1
}

# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
for payload in $PAYLOADS; do phase ceiling "$payload" || true; done
for config in $CONFIGS; do
  for payload in $PAYLOADS; do
    phase "$config" "$payload" || break
  done
done

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
  echo "commit=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src Cargo.toml || echo ' (+ uncommitted changes)')"
  echo "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "load=$(cut -d' ' -f1-3 /proc/loadavg)"
} >"$WORK/machine.txt"

PLOT_DATA=$WORK/latency.dat
python3 - "$RESULTS" "$NOTES" "$WORK/machine.txt" "$OUT" "$PLOT_DATA" \
  "$DURATION" "$CONNECTIONS" "$THREADS" "$MH_LOG" "$BUILD_CMD" \
  "$(wc -c <"$WORK/report5.json")" "$(wc -c <"$WORK/opened.json")" <<'PY'
import json, sys
(results, notes, machine, out, plot, duration, conns, threads, mh_log, build_cmd,
 size5, size1) = sys.argv[1:]
rows = [json.loads(l) for l in open(results) if l.strip()]
notes = [l.rstrip() for l in open(notes) if l.strip()]
mach = dict(l.rstrip("\n").split("=", 1) for l in open(machine) if "=" in l)
ceil = {r["payload"]: r for r in rows if r["config"] == "ceiling"}
names = {"ceiling": "bare axum (ceiling)", "sqlite": "embedded SQLite",
         "redis": "Redis + PostgreSQL", "amqp": "RabbitMQ + PostgreSQL"}
payloads = {"report5": f"5-result delivery report ({size5} B)",
            "opened": f"1 tracking event, OPENED ({size1} B)"}

def rps(r): return r["wrk"]["requests"] / (r["wrk"]["duration_us"] / 1e6)
def acc_rps(r): return r["accepted"] / (r["wrk"]["duration_us"] / 1e6)
def ms(us): return us / 1000.0
def e2e(r):
    span = r["t_last_row"] - r["t0"]
    return r["rows"] / span if span > 0 else 0.0
def ratio(a, b): return f"{a / b:.2f}" if b else "n/a"
def cpu_total(r): return sum(p["cpu_s"] or 0 for p in r["procs"])
def hwm_mb(p): return "died" if p["vmhwm_kb"] is None else f"{p['vmhwm_kb'] / 1024:.1f}"

L = []
L.append("# mailhook benchmark results\n")
L.append(f"Generated by `bench/run.sh` on {mach.get('date')} (commit {mach.get('commit')}). "
         "Every ratio is to the bare-axum ceiling measured in the same run with the same load "
         "generator and payload.\n")
L.append("## Accept path (`POST /email`, answered 202 after the queue's commit)\n")
L.append(f"{conns} connections, {threads} wrk threads, {duration} s per phase; every request carries "
         "unique messageIds. `req/s` counts 2xx only; `ratio` is to the ceiling's req/s; latency "
         "as measured by wrk (ms), with the multiple of the ceiling's in parentheses.\n")
L.append("| configuration | payload | req/s | ratio | p50 ms | p99 ms | max ms | non-2xx | socket errors |")
L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
for r in rows:
    c = ceil.get(r["payload"]); w = r["wrk"]
    sock = w["connect_errors"] + w["read_errors"] + w["write_errors"] + w["timeouts"]
    if r["config"] == "ceiling":
        lat = [f"{ms(w[k]):.2f}" for k in ("lat_p50_us", "lat_p99_us", "lat_max_us")]
    else:
        cw = c["wrk"] if c else None
        lat = [f"{ms(w[k]):.2f} ({w[k] / cw[k]:.1f}x)" if cw and cw[k] else f"{ms(w[k]):.2f}"
               for k in ("lat_p50_us", "lat_p99_us", "lat_max_us")]
    L.append(f"| {names[r['config']]} | {payloads[r['payload']]} | {acc_rps(r):,.0f} | "
             f"{ratio(acc_rps(r), rps(c)) if c else 'n/a'} | {' | '.join(lat)} | "
             f"{w['status_errors']} | {sock} |")
L.append("")
L.append("## End to end (first POST to last row committed in `email_callback`)\n")
L.append("`events/s` = rows / (time of the last row - time of the first POST), the table polled with "
         "`SELECT count(*)` every 0.25 s after the load stops; `backlog` = events accepted but not yet "
         "stored when the load stopped; `ratio` is to the ceiling's events/s (its req/s x events per "
         "request).\n")
L.append("| configuration | payload | events accepted | rows | backlog at load end | drain s | events/s | ratio |")
L.append("|---|---|---:|---:|---:|---:|---:|---:|")
for r in rows:
    if r["config"] == "ceiling": continue
    c = ceil.get(r["payload"])
    ev = r["accepted"] * r["events_per_request"]
    backlog = max(0, ev - r["rows_at_load_end"])
    drain = r["t_last_row"] - r["t_load_end"]
    cev = rps(c) * r["events_per_request"] if c else 0
    flag = "" if r["drained"] else " (drain timed out)"
    L.append(f"| {names[r['config']]} | {payloads[r['payload']]} | {ev:,} | {r['rows']:,}{flag} | "
             f"{backlog:,} | {drain:.1f} | {e2e(r):,.0f} | {ratio(e2e(r), cev)} |")
L.append("")
L.append("## Memory and CPU\n")
L.append("Peak RSS is VmHWM from `/proc/PID/status` at the end of the phase (the process was fresh "
         "at its start); CPU is utime+stime from `/proc/PID/stat` over the load and the drain, per "
         "1000 events stored (for the ceiling, which stores nothing, per 1000 events carried: requests x events per request); the ratio "
         "is to the ceiling's CPU per 1000 events of the same payload.\n")
L.append("| configuration | payload | process | peak RSS MB | CPU s | CPU s / 1000 events | ratio |")
L.append("|---|---|---|---:|---:|---:|---:|")
for r in rows:
    c = ceil.get(r["payload"])
    cper = (cpu_total(c) / (c["wrk"]["requests"] * c["events_per_request"] / 1000)) if c else 0
    n = r["rows"] if r["config"] != "ceiling" else r["wrk"]["requests"] * r["events_per_request"]
    procs = r["procs"] + ([{"name": "total", "vmhwm_kb": sum(p["vmhwm_kb"] or 0 for p in r["procs"]),
                            "cpu_s": cpu_total(r)}] if len(r["procs"]) > 1 else [])
    for p in procs:
        per = (p["cpu_s"] or 0) / (n / 1000) if n else 0
        L.append(f"| {names[r['config']]} | {r['payload']} | {p['name']} | {hwm_mb(p)} | "
                 f"{(p['cpu_s'] or 0):.2f} | {per:.3f} | {ratio(per, cper)} |")
L.append("")
if notes:
    L.append("## Notes from the run\n")
    L += [f"- {n}" for n in notes]
    L.append("")
L.append("## How it was measured\n")
L.append("```sh")
L.append("bench/run.sh   # BENCH_DURATION=" + duration + " BENCH_CONNECTIONS=" + conns
         + " BENCH_THREADS=" + threads)
L.append(build_cmd)
L.append("# per phase, fresh processes, temp dir, database and queue name:")
L.append("mailhook migrate")
L.append("mailhook serve --bind 127.0.0.1:PORT                          # embedded SQLite (API + worker)")
L.append("mailhook serve --no-worker --bind 127.0.0.1:PORT & mailhook worker   # Redis / RabbitMQ + PostgreSQL")
L.append("bare_axum 127.0.0.1:PORT                                      # ceiling")
L.append(f"wrk -t{threads} -c{conns} -d{duration}s --timeout 10s --latency -s bench/post.lua "
         "http://127.0.0.1:PORT/email -- BODY_TEMPLATE RUN_PREFIX")
L.append("```\n")
L.append(f"mailhook ran with `RUST_LOG={mh_log}` (production default: one log line per callback, "
         "to a file) and default settings otherwise: SQLite WAL with `synchronous=FULL` and group "
         "commit; worker concurrency 1, prefetch 256. The load generator runs on the same 2 "
         "cores as the server, the worker and the databases.\n")
L.append("## Machine and versions\n")
for k in ("nproc", "cpu", "mem", "kernel", "os", "rustc", "wrk", "sqlite3", "postgresql",
          "redis", "rabbitmq", "load"):
    L.append(f"- {k}: {mach.get(k, '?')}")
L.append("")
open(out, "w").write("\n".join(L) + "\n")

with open(plot, "w") as f:
    for r in rows:
        w = r["wrk"]
        label = f"{r['config']}/{r['payload']}"
        f.write(f"\"{label}\" {ms(w['lat_p50_us']):.3f} {ms(w['lat_p90_us']):.3f} "
                f"{ms(w['lat_p99_us']):.3f}\n")
PY

if command -v gnuplot >/dev/null && [[ -s $PLOT_DATA ]]; then
  PNG="${OUT%.md}-latency.png"
  gnuplot <<GP && printf '\n![latency](%s)\n' "$(basename "$PNG")" >>"$OUT"
set terminal pngcairo size 1000,520 noenhanced
set output "$PNG"
set title "POST /email latency at $CONNECTIONS connections (wrk, ms, log scale)"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set logscale y
set ylabel "ms"
set xtics rotate by -25
set key top left
set grid ytics
plot "$PLOT_DATA" using 2:xtic(1) title "p50", "" using 3 title "p90", "" using 4 title "p99"
GP
fi
log "wrote $OUT"
cat "$OUT"
