//! mailhook and Python Celery sharing a Redis queue, each test on its own queue name.
//! Redis, PostgreSQL and Python that are not usable are skipped locally and fail under CI=true.

mod common;

use std::time::Duration;

use common::celery::{self as py, PythonWorker, WorkerOpts};
use mailhook::queue::celery::DEFAULT_TASK;

/// The harness itself: Python's producer reaches Python's worker on a fresh queue.
#[tokio::test]
async fn python_harness_round_trip() {
    let Some(redis) = common::redis_url().await else {
        return;
    };
    let Some(venv) = py::ensure_venv() else {
        return;
    };
    let queue = common::unique_queue("py-harness");
    let worker = PythonWorker::start(&venv, &WorkerOpts::new(&redis, &queue)).await;
    let payload = common::example("opened");
    let ids = py::send_task(
        &venv,
        &redis,
        &queue,
        DEFAULT_TASK,
        std::slice::from_ref(&payload),
    );
    let got = worker.wait_received(1, Duration::from_secs(30)).await;
    assert_eq!(got[0]["task_id"], ids[0].as_str());
    let want: serde_json::Value = serde_json::from_str(&payload).expect("fixture is JSON");
    assert_eq!(got[0]["payload"], want);
}
