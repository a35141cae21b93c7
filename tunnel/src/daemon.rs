//! Running a server or client as a daemon: readiness, reloads and shutdown.
//!
//! The same loop runs both sides through the [`Node`] trait. Reloads come from SIGHUP and from
//! saves of the config file ([`crate::watch`]); each is bracketed by `RELOADING=1` and
//! `READY=1`. A config that fails to load is logged and the running one stays. A reload that
//! changes the transport type needs other Rust types, so it returns [`Outcome::Restart`] and
//! the caller starts over with the new settings. SIGTERM stops accepting and gives open
//! connections the grace period.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use labcore::Env;
use labcore::notify::Notifier;
use labcore::signals::Signals;

use crate::client::{Client, Readiness};
use crate::config::{self, ClientSettings, Mode, ServerSettings, Settings, TransportType};
use crate::error::Error;
use crate::server::Server;
use crate::transport::Transport;
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

impl<T: Transport> Node for Server<T> {
    type Settings = ServerSettings;
    const MODE: Mode = Mode::Server;

    async fn start(settings: ServerSettings) -> Result<Self, Error> {
        Server::start(settings).await
    }

    async fn apply(&mut self, settings: ServerSettings) -> Result<(), Error> {
        Server::apply(self, settings).await
    }

    fn readiness(&self) -> Option<Arc<Readiness>> {
        None
    }

    fn reload_wait(_: &ServerSettings) -> Duration {
        Duration::ZERO
    }

    fn transport_type(settings: &ServerSettings) -> TransportType {
        settings.transport.kind
    }

    fn settings(settings: Settings) -> Option<ServerSettings> {
        match settings {
            Settings::Server(s) => Some(s),
            Settings::Client(_) => None,
        }
    }

    fn wrap(settings: ServerSettings) -> Settings {
        Settings::Server(settings)
    }

    async fn shutdown(self) {
        let grace = self.grace_period();
        Server::shutdown(self, grace).await
    }
}

impl<T: Transport> Node for Client<T> {
    type Settings = ClientSettings;
    const MODE: Mode = Mode::Client;

    async fn start(settings: ClientSettings) -> Result<Self, Error> {
        Client::start(settings).await
    }

    async fn apply(&mut self, settings: ClientSettings) -> Result<(), Error> {
        Client::apply(self, settings).await
    }

    fn readiness(&self) -> Option<Arc<Readiness>> {
        Some(Client::readiness(self))
    }

    fn reload_wait(settings: &ClientSettings) -> Duration {
        settings.handshake_timeout
    }

    fn transport_type(settings: &ClientSettings) -> TransportType {
        settings.transport.kind
    }

    fn settings(settings: Settings) -> Option<ClientSettings> {
        match settings {
            Settings::Client(s) => Some(s),
            Settings::Server(_) => None,
        }
    }

    fn wrap(settings: ClientSettings) -> Settings {
        Settings::Client(settings)
    }

    async fn shutdown(self) {
        let grace = self.grace_period();
        Client::shutdown(self, grace).await
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
        let loaded = config::load(cx.path, cx.env, Some(N::MODE));
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

async fn changed(watcher: &Option<Watcher>) -> std::io::Result<()> {
    match watcher {
        Some(watcher) => watcher.changed().await,
        None => std::future::pending().await,
    }
}

/// What a reload does to the running services: the names a new config changes or removes
/// (to stop), each with whether it is removed (its metrics go too). Services the new config
/// adds, or that were just stopped for a change, are the ones then not running.
pub(crate) fn stale_services<'a, S: PartialEq + 'a>(
    running: impl IntoIterator<Item = (&'a String, &'a S)>,
    new: &std::collections::BTreeMap<String, S>,
) -> Vec<(String, bool)> {
    running
        .into_iter()
        .filter(|(name, service)| new.get(*name) != Some(*service))
        .map(|(name, _)| (name.clone(), !new.contains_key(name)))
        .collect()
}
