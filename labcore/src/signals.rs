//! Shutdown and reload signals for daemons.
//!
//! `SIGTERM` or `SIGINT` cancels the shutdown token every task watches; a second one ends the
//! process at once (exit 1), for an operator who does not want to wait for the drain.
//! `SIGHUP` arrives as a message on the reload channel; several before the daemon looks are
//! coalesced into one.

use std::io;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The signals a daemon reacts to.
#[derive(Debug)]
pub struct Signals {
    shutdown: CancellationToken,
    reload: mpsc::Receiver<()>,
    listener: JoinHandle<()>,
}

impl Signals {
    /// Starts listening for signals; call inside a tokio runtime.
    pub fn install() -> io::Result<Signals> {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        let shutdown = CancellationToken::new();
        let (reload_tx, reload) = mpsc::channel(1);
        let token = shutdown.clone();
        let listener = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                    _ = hup.recv() => {
                        // A full channel already holds a pending reload: this one joins it.
                        let _ = reload_tx.try_send(());
                        continue;
                    }
                }
                if token.is_cancelled() {
                    tracing::warn!("second stop signal: exiting without waiting");
                    std::process::exit(1);
                }
                tracing::info!("stop signal received: draining");
                token.cancel();
            }
        });
        Ok(Signals {
            shutdown,
            reload,
            listener,
        })
    }

    /// The token cancelled by the first `SIGTERM`/`SIGINT`.
    pub fn shutdown(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits for the next `SIGHUP`.
    pub async fn reload(&mut self) {
        if self.reload.recv().await.is_none() {
            // The listener task is gone; no reload can ever come.
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for Signals {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

/// Closes `tracker` and waits up to `grace` for its tasks to finish; returns whether they all
/// did.
pub async fn drain(tracker: &TaskTracker, grace: Duration) -> bool {
    tracker.close();
    tokio::time::timeout(grace, tracker.wait()).await.is_ok()
}
