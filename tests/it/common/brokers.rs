//! Brokers for tests: one fixture per backend, each on a queue no other test uses, and the
//! helpers every broker test needs (fetching until a count, counting what waits, cleaning up).

use std::time::Duration;

use mailhook::queue::{self, Broker, BrokerConfig, Delivery};

/// A Redis URL for an isolated test (`MAILHOOK_TEST_REDIS`, default local Redis db 0), or
/// `None` (skip) when Redis is absent outside CI. Tests isolate by queue name.
pub async fn redis_url() -> Option<String> {
    super::require_service("Redis", "MAILHOOK_TEST_REDIS", "redis://127.0.0.1:6379/0").await
}

/// An AMQP URL (`MAILHOOK_TEST_AMQP`, default local RabbitMQ), or `None` (skip) when RabbitMQ
/// is absent outside CI. Tests isolate by queue name.
pub async fn amqp_url() -> Option<String> {
    super::require_service(
        "RabbitMQ",
        "MAILHOOK_TEST_AMQP",
        "amqp://guest:guest@127.0.0.1:5672/%2f",
    )
    .await
}

/// `url` with its database number replaced by `db`.
///
/// kombu keeps one `unacked` bookkeeping per Redis database, and whoever restores it uses its
/// own visibility timeout for every queue there: a test with a short timeout gets a database of
/// its own, so it never hands back another test's in-flight messages.
pub fn redis_db(url: &str, db: u8) -> String {
    match url.rsplit_once('/') {
        Some((base, n)) if n.parse::<u8>().is_ok() => format!("{base}/{db}"),
        _ => format!("{}/{db}", url.trim_end_matches('/')),
    }
}

/// Broker settings for tests: `queue` at `url`, 256 messages of prefetch (above what any test
/// holds unacked at once: RabbitMQ stops delivering at the limit).
pub fn broker_cfg(url: &str, queue: &str, visibility: Duration) -> BrokerConfig {
    BrokerConfig {
        url: url.to_owned(),
        queue: queue.to_owned(),
        visibility_timeout: visibility,
        prefetch: 256,
    }
}

/// Fetches until `n` deliveries arrived or 15 s passed.
pub async fn fetch_n(b: &Broker, n: usize) -> Vec<Delivery> {
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while got.len() < n && std::time::Instant::now() < deadline {
        got.extend(
            b.fetch(n - got.len(), Duration::from_millis(300))
                .await
                .expect("fetch"),
        );
    }
    got
}

/// A connection to Redis at `url`.
pub async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis connection")
}

/// Messages waiting on a Redis queue's list.
pub async fn redis_ready(url: &str, queue: &str) -> i64 {
    redis::cmd("LLEN")
        .arg(queue)
        .query_async(&mut redis_conn(url).await)
        .await
        .expect("LLEN")
}

/// Messages still on a RabbitMQ queue (ready, not unacked), read with a passive declare.
pub async fn amqp_ready(url: &str, queue: &str) -> u32 {
    use lapin::options::QueueDeclareOptions;
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    let q = ch
        .queue_declare(
            queue,
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("queue exists");
    let _ = conn.close(200, "counted").await;
    q.message_count()
}

/// Removes a test queue's Redis keys so runs do not pile up on the server.
pub async fn cleanup_redis(url: &str, queue: &str) {
    let _: Result<(), _> = redis::cmd("DEL")
        .arg(queue)
        .arg(format!("{queue}.dlq"))
        .arg(format!("_kombu.binding.{queue}"))
        .arg(format!("_kombu.binding_permanent.{queue}"))
        .query_async(&mut redis_conn(url).await)
        .await;
}

/// Removes a test queue's RabbitMQ queues and exchange so runs do not pile up on the server.
pub async fn cleanup_amqp(url: &str, queue: &str) {
    use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
    let Ok(conn) = lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await
    else {
        return;
    };
    if let Ok(ch) = conn.create_channel().await {
        for q in [queue.to_owned(), format!("{queue}.dlq")] {
            let _ = ch.queue_delete(&q, QueueDeleteOptions::default()).await;
        }
        let _ = ch
            .exchange_delete(queue, ExchangeDeleteOptions::default())
            .await;
    }
    let _ = conn.close(200, "test done").await;
}

/// How long a fetched, unacked message stays hidden in a fixture.
#[derive(Debug, Clone, Copy)]
pub enum Lease {
    /// The backend's default (SQLite 30 s, Redis 3600 s): nothing comes back during a test.
    Long,
    /// 2 s, for tests that wait for unacked messages to come back; on Redis in database
    /// `redis_db`, which no other test uses (see [`redis_db`]).
    Short { redis_db: u8 },
}

/// A short visibility timeout.
pub const SHORT_LEASE: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Sqlite,
    Redis,
    Amqp,
}

/// A broker backend on a queue of its own, for one test.
pub struct BrokerFixture {
    /// Where and how to connect.
    pub cfg: BrokerConfig,
    kind: Kind,
    /// The SQLite files (queue, and a database for tests that store rows).
    dir: Option<tempfile::TempDir>,
}

impl BrokerFixture {
    /// The embedded queue in a temp dir of its own.
    pub async fn sqlite(lease: Lease) -> Option<Self> {
        let dir = tempfile::tempdir().expect("dir");
        let url = format!("sqlite://{}", dir.path().join("q.db").display());
        let visibility = match lease {
            Lease::Long => Duration::from_secs(30),
            Lease::Short { .. } => SHORT_LEASE,
        };
        Some(BrokerFixture {
            cfg: broker_cfg(&url, &super::unique_queue("contract"), visibility),
            kind: Kind::Sqlite,
            dir: Some(dir),
        })
    }

    /// Redis, or `None` (skip) without it.
    pub async fn redis(lease: Lease) -> Option<Self> {
        let url = redis_url().await?;
        let (url, visibility) = match lease {
            Lease::Long => (url, Duration::from_secs(3600)),
            Lease::Short { redis_db: db } => (redis_db(&url, db), SHORT_LEASE),
        };
        Some(BrokerFixture {
            cfg: broker_cfg(&url, &super::unique_queue("contract"), visibility),
            kind: Kind::Redis,
            dir: None,
        })
    }

    /// RabbitMQ, or `None` (skip) without it. Unacked messages come back when their consumer's
    /// channel closes, so the lease does not matter.
    pub async fn amqp(_lease: Lease) -> Option<Self> {
        let url = amqp_url().await?;
        Some(BrokerFixture {
            cfg: broker_cfg(&url, &super::unique_queue("contract"), SHORT_LEASE),
            kind: Kind::Amqp,
            dir: None,
        })
    }

    /// A new connection to the fixture's queue.
    pub async fn connect(&self) -> Broker {
        queue::connect(&self.cfg).await.expect("broker connects")
    }

    /// A database for rows: SQLite beside the queue, else a fresh PostgreSQL database (`None`:
    /// skip without PostgreSQL).
    pub async fn database(&self) -> Option<String> {
        match &self.dir {
            Some(dir) => Some(format!(
                "sqlite://{}",
                dir.path().join("mailhook.db").display()
            )),
            None => super::databases::pg_database().await,
        }
    }

    /// App settings on this broker's queue, with rows in `database`.
    pub fn common_args(&self, database: &str) -> mailhook::config::CommonArgs {
        let visibility = self.cfg.visibility_timeout.as_secs().to_string();
        super::app::common_args(&[
            "--database-url",
            database,
            "--broker-url",
            &self.cfg.url,
            "--queue",
            &self.cfg.queue,
            "--visibility-timeout",
            &visibility,
        ])
    }

    /// Removes what the test left on the server (the SQLite files go with the fixture).
    pub async fn cleanup(self) {
        match self.kind {
            Kind::Sqlite => {}
            Kind::Redis => cleanup_redis(&self.cfg.url, &self.cfg.queue).await,
            Kind::Amqp => cleanup_amqp(&self.cfg.url, &self.cfg.queue).await,
        }
    }
}
