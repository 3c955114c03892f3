"""Publishes Infobip payloads the way a Python Celery producer does: app.send_task(...).

usage: send.py --queue QUEUE [--task NAME] [--received-at ISO] [FILE ...]

Each FILE holds one JSON payload; with no FILE (or `-`), payloads are read from stdin, one JSON
document per line. Prints one task id per line, in input order, once every message is published.
The broker URL comes from CELERY_BROKER_URL, as for tasks.py.
"""

import argparse
import json
import sys

from tasks import TASK_NAME, app


def payloads(files):
    if not files or files == ["-"]:
        for line in sys.stdin:
            if line.strip():
                yield json.loads(line)
        return
    for name in files:
        with open(name, encoding="utf-8") as f:
            yield json.load(f)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--queue", required=True)
    p.add_argument("--task", default=TASK_NAME)
    p.add_argument("--received-at", help="also send kwargs received_at (as mailhook does)")
    p.add_argument("files", nargs="*")
    a = p.parse_args()
    kwargs = {"received_at": a.received_at} if a.received_at else {}
    ids = []
    with app.producer_or_acquire() as producer:
        for payload in payloads(a.files):
            r = app.send_task(
                a.task, args=[payload], kwargs=kwargs, queue=a.queue, producer=producer
            )
            ids.append(r.id)
    for i in ids:
        print(i)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
