"""Reads `strace -f -y -ttt -T -e trace=fsync,fdatasync` output of a mailhook process and
prints, as one JSON object, what the flushes during the load cost, per file:

- calls, p50/p99/max duration (ms) and the time spent in them;
- for the queue's WAL (each group commit of the queue writer ends with one): the gap between
  consecutive flushes (p50/p99/max ms; a long gap is a commit that took long to get to its
  flush: the writer busy with a claim or an ack, checkpointing, or waiting for the CPU), and the
  duration of the flushes that overlapped a checkpoint's flush of a database file against those
  that did not;
- inline checkpoints: flushes of the queue's database file by the queue writer's own thread
  (sqlx runs each connection on a thread of its own; the writer is the thread that flushes the
  queue's WAL most), which SQLite does inside a commit when the WAL has passed
  `wal_autocheckpoint` pages; the Checkpointer flushes from a thread of its own;
- the three longest gaps between queue commits, with every flush that ran in them.

usage: flushes.py STRACE_FILE T_LOAD_START T_LOAD_END
"""
import json
import re
import sys

path, t0, t1 = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])

# One call is one line, or two when another thread's call came in between:
#   TID TIME fsync(12</x/q.db-wal>) = 0 <0.001234>
#   TID TIME fsync(12</x/q.db-wal> <unfinished ...>   ...   TID TIME <... fsync resumed>) = 0 <0.001234>
FULL = re.compile(r"(\d+)\s+([\d.]+)\s+(fsync|fdatasync)\(\d+<([^>]*)>\).*<([\d.]+)>\s*$")
START = re.compile(r"(\d+)\s+([\d.]+)\s+(fsync|fdatasync)\(\d+<([^>]*)>\s*<unfinished")
RESUME = re.compile(r"(\d+)\s+[\d.]+\s+<\.\.\. (fsync|fdatasync) resumed>.*<([\d.]+)>\s*$")

calls = []  # (start, duration_s, call, file, tid)
pending = {}
for line in open(path):
    m = FULL.match(line)
    if m:
        calls.append((float(m[2]), float(m[5]), m[3], m[4].rsplit("/", 1)[-1], m[1]))
        continue
    m = START.match(line)
    if m:
        pending[m[1]] = (float(m[2]), m[3], m[4].rsplit("/", 1)[-1])
        continue
    m = RESUME.match(line)
    if m and m[1] in pending:
        start, call, f = pending.pop(m[1])
        calls.append((start, float(m[3]), call, f, m[1]))
calls = [c for c in calls if t0 <= c[0] <= t1]
calls.sort()


def q(v, f):
    return v[min(len(v) - 1, round((len(v) - 1) * f))] if v else 0.0


def summary(ms):
    ms = sorted(ms)
    return {"n": len(ms), "p50_ms": round(q(ms, .5), 3), "p99_ms": round(q(ms, .99), 3),
            "max_ms": round(ms[-1], 3) if ms else 0.0, "total_s": round(sum(ms) / 1e3, 3)}


out = {"span_s": round(t1 - t0, 3), "files": {}}
for key in sorted({f"{c[2]} {c[3]}" for c in calls}):
    out["files"][key] = summary([c[1] * 1e3 for c in calls if f"{c[2]} {c[3]}" == key])

queue_wal = [c for c in calls if c[3].endswith("queue.db-wal")]
db_files = [c for c in calls if c[3].endswith(".db")]  # checkpoints write and flush these
if len(queue_wal) > 1:
    gaps = [(b[0] - a[0]) * 1e3 for a, b in zip(queue_wal, queue_wal[1:])]
    out["queue_wal_gap"] = summary(gaps)

    def overlaps(c):
        return any(d[0] < c[0] + c[1] and c[0] < d[0] + d[1] for d in db_files)

    out["queue_wal_during_checkpoint_flush"] = summary([c[1] * 1e3 for c in queue_wal if overlaps(c)])
    out["queue_wal_otherwise"] = summary([c[1] * 1e3 for c in queue_wal if not overlaps(c)])
    tids = [c[4] for c in queue_wal]
    writer = {max(set(tids), key=tids.count)}
    out["queue_inline_checkpoints"] = summary(
        [c[1] * 1e3 for c in calls if c[3].endswith("queue.db") and c[4] in writer])
    longest = sorted(zip(queue_wal, queue_wal[1:]), key=lambda ab: ab[0][0] - ab[1][0])[:3]
    out["longest_queue_gaps"] = [
        {"at_s": round(a[0] - t0, 3), "gap_ms": round((b[0] - a[0]) * 1e3, 1),
         "flushes": [f"{c[3]}{' (queue writer)' if c[4] in writer else ''} {c[1] * 1e3:.1f} ms"
                     for c in calls if a[0] <= c[0] < b[0] and c is not a]}
        for a, b in longest]
print(json.dumps(out))
