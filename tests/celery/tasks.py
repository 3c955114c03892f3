"""A Python Celery app standing in for the Flask + Celery service mailhook replaces.

Everything comes from the environment, so one file serves Redis and RabbitMQ tests alike:

  CELERY_BROKER_URL            broker (redis://... or amqp://...), default local Redis db 0
  MAILHOOK_TASK_NAME           task name, default mailhook.process_email_callback
  MAILHOOK_OUT                 file the task appends one JSON line per call to (required by the task)
  MAILHOOK_VISIBILITY_TIMEOUT  Redis visibility timeout in seconds (must match mailhook's), default 3600
  MAILHOOK_TASK_FAIL           if set, the task raises instead of recording (to test redelivery)
  MAILHOOK_TASK_SLEEP          seconds the task sleeps before recording (to kill it mid-task)
  MAILHOOK_RESTORE_INTERVAL    Redis: seconds between kombu's sweeps of expired unacked messages
                               (kombu's default is about 100 s: 10 s interval x throttle 10)

Each call appends `{"task_id": ..., "payload": ..., "received_at": ...}` and fsyncs before it
returns, so with acks_late a line on disk means the message was handled (a crash before the line
redelivers it; a crash between line and ack can double it, which the tests account for).
"""

import json
import os
import time

from celery import Celery

BROKER_URL = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
TASK_NAME = os.environ.get("MAILHOOK_TASK_NAME", "mailhook.process_email_callback")
VISIBILITY_TIMEOUT = int(os.environ.get("MAILHOOK_VISIBILITY_TIMEOUT", "3600"))

app = Celery("tasks", broker=BROKER_URL)

transport_options = {}
if BROKER_URL.startswith(("redis://", "rediss://")):
    # kombu's Redis transport restores *every* unacked message older than this, ours included:
    # both sides must agree, or one steals the other's in-flight messages.
    transport_options["visibility_timeout"] = VISIBILITY_TIMEOUT
    if os.environ.get("MAILHOOK_RESTORE_INTERVAL"):
        transport_options["unacked_restore_interval"] = int(
            os.environ["MAILHOOK_RESTORE_INTERVAL"]
        )
        transport_options["unacked_restore_throttle"] = 1
elif BROKER_URL.startswith(("amqp://", "amqps://", "pyamqp://")):
    # send.py must not exit before RabbitMQ has the message.
    transport_options["confirm_publish"] = True

app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    result_backend=None,
    task_ignore_result=True,
    # As mailhook does: ack only after the work is done, one message at a time.
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    broker_transport_options=transport_options,
    worker_hijack_root_logger=False,
)


@app.task(name=TASK_NAME, bind=True)
def process_email_callback(self, payload, received_at=None):
    """Records the callback as one JSON line; the test reads the file."""
    if os.environ.get("MAILHOOK_TASK_FAIL"):
        raise RuntimeError("MAILHOOK_TASK_FAIL is set")
    if os.environ.get("MAILHOOK_TASK_SLEEP"):
        time.sleep(float(os.environ["MAILHOOK_TASK_SLEEP"]))
    line = json.dumps(
        {"task_id": self.request.id, "payload": payload, "received_at": received_at}
    )
    with open(os.environ["MAILHOOK_OUT"], "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())
