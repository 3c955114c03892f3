//! The `mailhook` command line: parses it, sets up logging and signals, and dispatches to `app`.

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use mailhook::app::{self, App};
use mailhook::config::{Cli, Command, CommonArgs, DlqCommand};
use mailhook::secret::redact_url;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        // Colour codes only on a terminal: redirected to a file, logs stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        // A log line that cannot be written (stdout on a full disk) is dropped. By default the
        // subscriber reports it with `eprintln!`, which panics when stderr fails too: that
        // panic killed the queue's writer thread and request handlers mid-answer.
        .log_internal_errors(false)
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let common = cli.common;
    match cli.command {
        Command::Serve(args) => {
            let app = App::build(common, args)
                .await
                .context("starting mailhook")?;
            app.run(shutdown_signal()).await.context("serving")?;
        }
        Command::Worker(args) => app::run_worker(common, args, shutdown_signal())
            .await
            .context("starting the worker")?,
        Command::Migrate => {
            app::open_store(&common, 1)
                .await
                .context("applying migrations")?;
            tracing::info!(database = %redact_url(&common.database_url), "migrations applied");
        }
        Command::Dlq(cmd) => dlq(&common, cmd).await?,
    }
    Ok(())
}

/// `mailhook dlq ...`: dead letters as JSON lines, or replayed onto the queue.
async fn dlq(common: &CommonArgs, cmd: DlqCommand) -> anyhow::Result<()> {
    let broker = app::connect_broker(common, 1)
        .await
        .context("connecting to the broker")?;
    match cmd {
        DlqCommand::List { limit } => {
            for d in broker.dlq_list(limit).await? {
                println!("{}", serde_json::to_string(&d)?);
            }
        }
        DlqCommand::Replay { id: Some(id), .. } => {
            broker.dlq_replay(&id).await?;
            println!("replayed 1 message(s) onto {}", common.queue);
        }
        DlqCommand::Replay { id: None, .. } => {
            // Drawn only on a terminal (indicatif hides it otherwise).
            let bar = indicatif::ProgressBar::new(0).with_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} replayed ({eta} left)",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            let n = broker
                .dlq_replay_all(|done, total| {
                    bar.set_length(total as u64);
                    bar.set_position(done as u64);
                })
                .await?;
            bar.finish_and_clear();
            println!("replayed {n} message(s) onto {}", common.queue);
        }
    }
    Ok(())
}

/// A token cancelled on SIGTERM or SIGINT.
fn shutdown_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot listen for SIGTERM");
                        let _ = ctrl_c.await;
                        t.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown requested");
        t.cancel();
    });
    token
}
