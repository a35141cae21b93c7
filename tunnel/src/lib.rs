//! tunnel: NAT traversal, server and client, wire- and config-compatible with rathole 0.5.
//!
//! The public host runs a [`server::Server`], the home host a [`client::Client`]. Modules:
//! [`config`] reads rathole's TOML, [`protocol`] its messages, [`proxy_protocol`] the
//! headers that tell local services a visitor's address, [`transport`] makes the tunnel's
//! connections, [`forward`] carries visitor bytes, [`udp`] visitor datagrams, [`metrics`]
//! counts them, [`daemon`] runs
//! either side with reloads and graceful shutdown, [`watch`] sees config saves, [`keys`]
//! makes Noise key pairs, [`declare`] the messages and policy of services clients declare, [`status`] reads a running side's figures, [`cli`] is the command line.

pub mod cli;
mod client;
mod config;
mod daemon;
mod deadline;
mod declare;
mod error;
mod forward;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzz;
pub mod keys;
mod metrics;
pub mod protocol;
pub mod proxy_protocol;
mod server;
mod sockopt;
mod status;
mod transport;
mod udp;
mod watch;

use std::path::Path;

use labcore::Env;
use labcore::notify::Notifier;
use labcore::signals::Signals;

pub use error::Error;

use crate::client::Client;
use crate::config::{Mode, Settings, TransportType};
use crate::daemon::{Context, Outcome};
use crate::server::Server;
use crate::transport::{NoiseTransport, TcpTransport, TlsTransport, WebsocketTransport};
use crate::watch::Watcher;

/// Runs the side `mode` names (or the config's only one) until SIGTERM.
pub(crate) async fn run(path: &Path, mode: Option<Mode>, env: &Env) -> Result<(), Error> {
    let mut settings = daemon::load(path, env, mode)?;
    raise_fd_limit();
    let signals = Signals::install().map_err(|e| Error::io("installing signal handlers", e))?;
    let notifier = Notifier::from_env(env).map_err(|e| Error::io("opening $NOTIFY_SOCKET", e))?;
    let watcher = match Watcher::new(path) {
        Ok(watcher) => Some(watcher),
        Err(err) => {
            tracing::warn!(error = %err, "cannot watch the config file: reload with SIGHUP");
            None
        }
    };
    let mut cx = Context {
        path,
        env,
        signals,
        notifier,
        watcher,
    };
    // Where a transport type becomes a Rust type (a client's servers may each pick another
    // type of their own: `client::AnyTransport`).
    loop {
        let outcome = match settings {
            Settings::Server(s) => match s.common.transport.kind {
                TransportType::Tcp => daemon::serve::<Server<TcpTransport>>(s, &mut cx).await?,
                TransportType::Noise => daemon::serve::<Server<NoiseTransport>>(s, &mut cx).await?,
                TransportType::Tls => daemon::serve::<Server<TlsTransport>>(s, &mut cx).await?,
                TransportType::Websocket => {
                    daemon::serve::<Server<WebsocketTransport>>(s, &mut cx).await?
                }
            },
            Settings::Client(c) => match c.common.transport.kind {
                TransportType::Tcp => daemon::serve::<Client<TcpTransport>>(c, &mut cx).await?,
                TransportType::Noise => daemon::serve::<Client<NoiseTransport>>(c, &mut cx).await?,
                TransportType::Tls => daemon::serve::<Client<TlsTransport>>(c, &mut cx).await?,
                TransportType::Websocket => {
                    daemon::serve::<Client<WebsocketTransport>>(c, &mut cx).await?
                }
            },
        };
        match outcome {
            Outcome::Stopped => return Ok(()),
            Outcome::Restart(new) => settings = *new,
        }
    }
}

/// Each visitor connection holds two sockets and two pipes: lift the soft limit on open files
/// to the hard one, as a server with many visitors needs.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(err) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::debug!(error = %err, "could not raise the open file limit");
            }
        }
        _ => {}
    }
}
