//! Running a server or client as a daemon: readiness, reloads and shutdown.
//!
//! The same loop runs both sides through the [`Node`] trait. Reloads come from SIGHUP and from
//! saves of the config file ([`crate::watch`]); each is bracketed by `RELOADING=1` and
//! `READY=1`. A config that fails to load is logged and the running one stays. A reload that
//! changes the transport type needs other Rust types, so it returns [`Outcome::Restart`] and
//! the caller starts over with the new settings. SIGTERM stops accepting and gives open
//! connections the grace period.

use std::collections::HashSet;
use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use labcore::Env;
use labcore::notify::Notifier;
use labcore::signals::Signals;
use tokio::sync::Notify;

use crate::config::{self, Mode, Settings, TransportType};
use crate::error::Error;
use crate::transport;
use crate::watch::Watcher;

/// A server or a client, as the daemon loop drives it.
pub(crate) trait Node: Sized {
    /// Its resolved config.
    type Settings: Clone;

    /// Which side it is.
    const MODE: Mode;

    /// Starts serving.
    fn start(settings: Self::Settings) -> impl Future<Output = Result<Self, Error>>;

    /// Applies a new config.
    fn apply(&mut self, settings: Self::Settings) -> impl Future<Output = Result<(), Error>>;

    /// What to wait for before `READY=1`, if anything.
    fn readiness(&self) -> Option<Arc<Readiness>>;

    /// How long a reload may wait for readiness before `READY=1` anyway.
    fn reload_wait(settings: &Self::Settings) -> Duration;

    /// The transport type, which a reload cannot change in place.
    fn transport_type(settings: &Self::Settings) -> TransportType;

    /// Picks this side's settings out of a loaded config.
    fn settings(settings: Settings) -> Option<Self::Settings>;

    /// Wraps this side's settings back into a config.
    fn wrap(settings: Self::Settings) -> Settings;

    /// Stops accepting and drains for the configured grace period.
    fn shutdown(self) -> impl Future<Output = ()>;
}

/// Services whose control channel the daemon still waits for.
#[derive(Default)]
pub(crate) struct Readiness {
    pending: Mutex<HashSet<String>>,
    changed: Notify,
}

impl Readiness {
    pub(crate) fn expect(&self, names: impl IntoIterator<Item = String>) {
        self.lock().extend(names);
    }

    pub(crate) fn up(&self, name: &str) {
        let mut pending = self.lock();
        if pending.remove(name) && pending.is_empty() {
            self.changed.notify_waiters();
        }
    }

    pub(crate) fn forget(&self, name: &str) {
        self.up(name);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Resolves once no service is pending.
    pub(crate) async fn wait(&self) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.lock().is_empty() {
                return;
            }
            notified.await;
        }
    }

    /// The services still pending, sorted.
    pub(crate) fn pending(&self) -> Vec<String> {
        let mut names: Vec<String> = self.lock().iter().cloned().collect();
        names.sort();
        names
    }
}

/// How a run of the loop ended.
pub(crate) enum Outcome {
    /// Stopped by a signal.
    Stopped,
    /// The config now asks for another transport: start over with these settings.
    Restart(Box<Settings>),
}

/// What the loop needs from the process: its signals, notifier, environment, config path.
pub(crate) struct Context<'a> {
    /// The config file.
    pub(crate) path: &'a Path,
    /// The environment secrets and credentials come from.
    pub(crate) env: &'a Env,
    /// Signals.
    pub(crate) signals: Signals,
    /// The service manager.
    pub(crate) notifier: Notifier,
    /// Config file saves, when inotify works here.
    pub(crate) watcher: Option<Watcher>,
}

/// Runs `N` until a stop signal, or until a reload asks for another transport.
pub(crate) async fn serve<N: Node>(
    settings: N::Settings,
    cx: &mut Context<'_>,
) -> Result<Outcome, Error> {
    let transport = N::transport_type(&settings);
    let mut node = N::start(settings).await?;
    let shutdown = cx.signals.shutdown();
    // Some(deadline) while READY=1 is owed; no deadline at start: ready means ready.
    let mut owed: Option<Option<tokio::time::Instant>> = Some(None);
    loop {
        let ready = async {
            match (&owed, node.readiness()) {
                (None, _) => std::future::pending::<()>().await,
                (Some(_), None) => {}
                (Some(deadline), Some(readiness)) => match deadline {
                    None => readiness.wait().await,
                    Some(deadline) => {
                        if tokio::time::timeout_at(*deadline, readiness.wait())
                            .await
                            .is_err()
                        {
                            tracing::warn!(
                                services = ?readiness.pending(),
                                "reloaded, but these control channels are not open yet"
                            );
                        }
                    }
                },
            }
        };
        let reload = tokio::select! {
            _ = shutdown.cancelled() => break,
            () = ready => {
                owed = None;
                cx.notifier.ready();
                tracing::info!(mode = ?N::MODE, "ready");
                continue;
            }
            _ = cx.signals.reload() => "SIGHUP",
            changed = changed(&cx.watcher) => match changed {
                Ok(()) => "the config file changed",
                Err(err) => {
                    tracing::warn!(error = %err, "watching the config file failed: reload with SIGHUP");
                    cx.watcher = None;
                    continue;
                }
            },
        };
        cx.notifier.reloading();
        tracing::info!(cause = %reload, path = %cx.path.display(), "reloading");
        let loaded = load(cx.path, cx.env, Some(N::MODE));
        let new = match loaded.map(N::settings) {
            Ok(Some(new)) => new,
            Ok(None) => {
                // load() with a mode returns that mode's settings; kept as a plain refusal.
                tracing::error!("new config has no table for this mode; keeping the old one");
                cx.notifier.ready();
                continue;
            }
            Err(err) => {
                tracing::error!(
                    error = %labcore::exit::chain(&err),
                    "new config rejected; keeping the old one"
                );
                cx.notifier.ready();
                continue;
            }
        };
        if N::transport_type(&new) != transport {
            tracing::warn!("the transport type changed: restarting everything");
            cx.notifier.stopping();
            node.shutdown().await;
            return Ok(Outcome::Restart(Box::new(N::wrap(new))));
        }
        let wait = N::reload_wait(&new);
        node.apply(new).await?;
        tracing::info!("config reloaded");
        owed = Some(Some(tokio::time::Instant::now() + wait));
    }
    cx.notifier.stopping();
    tracing::info!("stopping");
    node.shutdown().await;
    tracing::info!("stopped");
    Ok(Outcome::Stopped)
}

/// Reads the config at `path` for `mode` and checks that its transport can be built.
pub(crate) fn load(path: &Path, env: &Env, mode: Option<Mode>) -> Result<Settings, Error> {
    let settings = config::load(path, env, mode)?;
    transport::check(&settings, path)?;
    Ok(settings)
}

async fn changed(watcher: &Option<Watcher>) -> std::io::Result<()> {
    match watcher {
        Some(watcher) => watcher.changed().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn readiness_resolves_when_every_service_is_up() {
        let readiness = Arc::new(Readiness::default());
        readiness.expect(["a".to_owned(), "b".to_owned()]);
        let waiter = tokio::spawn({
            let readiness = readiness.clone();
            async move { readiness.wait().await }
        });
        readiness.up("a");
        assert_eq!(readiness.pending(), ["b"]);
        readiness.up("b");
        waiter.await.unwrap();
    }
}
