//! Wires the running service from its configuration (store, broker, router, workers) in one
//! place, for `main` and the tests. The one module that imports every other: `config` says what
//! was asked for, and this module turns it into each layer's own settings.

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{CommonArgs, ServeArgs, WorkerArgs};
use crate::health::{supervise, Health};
use crate::http::{self, auth::Auth, AppState};
use crate::queue::{self, Broker, BrokerConfig, QueueError};
use crate::secret::redact_url;
use crate::store::{self, Store, StoreError};
use crate::worker::{Worker, WorkerConfig};

mod startup;

/// Why the service could not start.
#[derive(Debug, Error)]
pub enum StartError {
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// One start-up attempt got no answer in time.
    #[error("no answer within {0:?}")]
    NoAnswer(Duration),
    /// The start-up deadline passed (`source`: the last attempt's error, if one finished).
    #[error("gave up after {waited:.1?} waiting for {what} (--startup-timeout)")]
    GaveUp {
        what: String,
        waited: Duration,
        source: Option<Box<StartError>>,
    },
}

/// Opens the store and applies its migrations, retrying until the start-up deadline.
pub async fn open_store(
    common: &CommonArgs,
    max_connections: u32,
) -> Result<Arc<dyn Store>, StartError> {
    let what = format!("the database {}", redact_url(&common.database_url));
    startup::wait_for(&what, common.startup_timeout(), || async {
        let store = store::connect(&common.database_url, max_connections).await?;
        store.migrate().await?;
        Ok::<_, StoreError>(store)
    })
    .await
}

/// The broker settings of `common`, for a consumer holding up to `prefetch` messages.
pub fn broker_config(common: &CommonArgs, prefetch: u16) -> BrokerConfig {
    BrokerConfig {
        url: common.broker_url(),
        queue: common.queue.clone(),
        visibility_timeout: common.visibility_timeout(),
        prefetch,
    }
}

/// Connects to the broker `common` names, retrying until the start-up deadline.
pub async fn connect_broker(common: &CommonArgs, prefetch: u16) -> Result<Broker, StartError> {
    let cfg = broker_config(common, prefetch);
    let what = format!("the broker {}", redact_url(&cfg.url));
    startup::wait_for(&what, common.startup_timeout(), || queue::connect(&cfg)).await
}

/// The worker settings of `args`, for messages named `task_name`.
pub fn worker_config(args: &WorkerArgs, task_name: &str) -> WorkerConfig {
    WorkerConfig {
        task_name: task_name.to_owned(),
        batch_size: usize::from(args.prefetch.max(1)),
        max_attempts: args.max_attempts.max(1),
        ..WorkerConfig::default()
    }
}

/// The webhook credentials `mailhook serve` accepts.
pub fn auth(args: &ServeArgs) -> Auth {
    Auth::new(
        &args.basic_auth,
        args.auth_header.clone(),
        &args.auth_secret,
    )
}

/// The consume loops of one process.
struct Workers(JoinSet<()>);

impl Workers {
    /// Starts `args.concurrency` loops; each finishes its batch in hand once `stop` fires. A
    /// loop that panics is started again (and the worker's health says so meanwhile).
    fn start(
        broker: &Broker,
        store: &Arc<dyn Store>,
        args: &WorkerArgs,
        task_name: &str,
        stop: &CancellationToken,
        health: &Arc<Health>,
    ) -> Self {
        let mut set = JoinSet::new();
        for _ in 0..args.concurrency.max(1) {
            let (broker, store, health, stop) =
                (broker.clone(), store.clone(), health.clone(), stop.clone());
            let cfg = worker_config(args, task_name);
            set.spawn(supervise(
                "a worker loop",
                health.worker.clone(),
                move || {
                    Worker::new(broker.clone(), store.clone(), cfg.clone())
                        .with_health(health.clone())
                        .run(stop.child_token())
                },
            ));
        }
        Workers(set)
    }

    /// Waits until every loop has stopped.
    async fn finished(mut self) {
        while self.0.join_next().await.is_some() {}
    }
}

/// `mailhook worker`: consume loops only, until `shutdown` fires; then each loop stores and acks
/// the batch in hand, within the shutdown deadline (what is left unacked stays on the queue).
pub async fn run_worker(
    common: CommonArgs,
    args: WorkerArgs,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    // One connection per loop, and one to spare for migrations.
    let connections = u32::try_from(args.concurrency).unwrap_or(1).max(1) + 1;
    let store = open_store(&common, connections).await?;
    let broker = connect_broker(&common, args.prefetch).await?;
    let health = Arc::new(Health::default());
    let workers = Workers::start(
        &broker,
        &store,
        &args,
        &common.task_name,
        &shutdown,
        &health,
    );
    tracing::info!(queue = %common.queue, concurrency = args.concurrency, "worker started");
    shutdown.cancelled().await;
    let deadline = Duration::from_secs(args.shutdown_timeout);
    if tokio::time::timeout(deadline, workers.finished())
        .await
        .is_err()
    {
        tracing::warn!(
            ?deadline,
            "workers did not finish within the shutdown deadline"
        );
    }
    Ok(())
}

/// A built service, listening, not yet serving.
pub struct App {
    listener: TcpListener,
    router: axum::Router,
    broker: Broker,
    store: Option<Arc<dyn Store>>,
    health: Arc<Health>,
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
        let broker = connect_broker(&common, args.worker.prefetch).await?;
        let health = Arc::new(Health {
            queue: broker.part(),
            ..Health::new(Duration::from_secs(args.stall_after))
        });
        let state = AppState {
            health: health.clone(),
            worker: store.is_some(),
            broker: broker.clone(),
            task_name: common.task_name.as_str().into(),
            queue: common.queue.as_str().into(),
            body_limit: args.body_limit,
            in_flight: Arc::new(tokio::sync::Semaphore::new(args.max_in_flight.max(1))),
        };
        let auth = auth(&args);
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
            health,
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
        let worker_stop = CancellationToken::new();
        let workers = self.store.as_ref().map(|store| {
            Workers::start(
                &self.broker,
                store,
                &self.args.worker,
                &self.common.task_name,
                &worker_stop,
                &self.health,
            )
        });
        tracing::info!(
            addr = %self.listener.local_addr()?,
            queue = %self.common.queue,
            worker = workers.is_some(),
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
            if let Some(workers) = workers {
                workers.finished().await;
            }
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
