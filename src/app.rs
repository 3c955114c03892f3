//! Builds the running service (store, broker, router, workers) in one place, for `main` and tests.

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{CommonArgs, ServeArgs, WorkerArgs};
use crate::http::{self, AppState};
use crate::queue::{self, Broker, QueueError};
use crate::store::{self, Store, StoreError};
use crate::worker::Worker;

/// Why the service could not start.
#[derive(Debug, Error)]
pub enum StartError {
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Opens the store and applies its migrations.
pub async fn open_store(
    common: &CommonArgs,
    max_connections: u32,
) -> Result<Arc<dyn Store>, StoreError> {
    let store = store::connect(&common.database_url, max_connections).await?;
    store.migrate().await?;
    Ok(store)
}

/// Starts `n` consume loops on `set`.
pub fn spawn_workers(
    set: &mut JoinSet<()>,
    broker: &Arc<dyn Broker>,
    store: &Arc<dyn Store>,
    args: &WorkerArgs,
    task_name: &str,
    shutdown: &CancellationToken,
) {
    for _ in 0..args.concurrency.max(1) {
        let w = Worker::new(broker.clone(), store.clone(), args.config(task_name));
        set.spawn(w.run(shutdown.child_token()));
    }
}

/// A built service, listening, not yet serving.
pub struct App {
    listener: TcpListener,
    router: axum::Router,
    broker: Arc<dyn Broker>,
    store: Option<Arc<dyn Store>>,
    common: CommonArgs,
    args: ServeArgs,
}

impl App {
    /// Connects everything and binds the listener (port 0 picks a free port).
    pub async fn build(common: CommonArgs, args: ServeArgs) -> Result<App, StartError> {
        let store = if args.no_worker {
            None
        } else {
            Some(open_store(&common, 4).await?)
        };
        let broker = queue::connect(&common.broker(args.worker.prefetch)).await?;
        let state = AppState {
            broker: broker.clone(),
            task_name: common.task_name.as_str().into(),
            queue: common.queue.as_str().into(),
            body_limit: args.body_limit,
            in_flight: Arc::new(tokio::sync::Semaphore::new(args.max_in_flight.max(1))),
        };
        let auth = http::auth::Auth::from_args(&args);
        auth.warn_if_exposed(args.bind);
        let router = http::authenticated_router(
            state,
            Duration::from_secs(args.request_timeout),
            Arc::new(auth),
        );
        let listener = TcpListener::bind(args.bind)
            .await
            .map_err(|source| StartError::Bind {
                addr: args.bind,
                source,
            })?;
        Ok(App {
            listener,
            router,
            broker,
            store,
            common,
            args,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` fires, then drains requests in flight and lets workers finish
    /// their batch, within the shutdown deadline.
    pub async fn run(self, shutdown: CancellationToken) -> std::io::Result<()> {
        let mut workers = JoinSet::new();
        let worker_stop = CancellationToken::new();
        if let Some(store) = &self.store {
            spawn_workers(
                &mut workers,
                &self.broker,
                store,
                &self.args.worker,
                &self.common.task_name,
                &worker_stop,
            );
        }
        tracing::info!(
            addr = %self.listener.local_addr()?,
            queue = %self.common.queue,
            worker = self.store.is_some(),
            "mailhook listening"
        );
        let server = axum::serve(self.listener, self.router)
            .with_graceful_shutdown(shutdown.clone().cancelled_owned())
            .into_future();
        tokio::pin!(server);
        tokio::select! {
            r = &mut server => return r, // only on a listener error: shutdown is handled below
            () = shutdown.cancelled() => {}
        }
        // Stop taking connections, drain requests in flight, and let workers finish and ack the
        // batch in hand, all within one deadline. Anything unacked stays on the queue.
        worker_stop.cancel();
        let deadline = Duration::from_secs(self.args.worker.shutdown_timeout);
        let drained = tokio::time::timeout(deadline, async {
            let served = server.await;
            while workers.join_next().await.is_some() {}
            served
        })
        .await;
        match drained {
            Ok(served) => served?,
            Err(_) => tracing::warn!(?deadline, "shutdown deadline reached; exiting anyway"),
        }
        Ok(())
    }
}
