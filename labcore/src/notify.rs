//! systemd's readiness protocol (`sd_notify`): `READY=1`, `RELOADING=1`, `STOPPING=1`,
//! `STATUS=` and the watchdog.
//!
//! Messages go as datagrams to `$NOTIFY_SOCKET` (a path, or an abstract socket written with a
//! leading `@`). Without that variable every call is a no-op, so tools call these freely. Tests
//! use the same protocol to know when a tool is ready instead of sleeping. A failed send is
//! logged, never fatal: readiness is a courtesy to the supervisor.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::env::Env;

/// A handle on the service manager's notification socket, if there is one.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` from `env`.
    pub fn from_env(env: &Env) -> io::Result<Notifier> {
        let target = match env.get("NOTIFY_SOCKET") {
            None => None,
            Some(path) => {
                let addr = match path.strip_prefix('@') {
                    Some(name) => SocketAddr::from_abstract_name(name.as_bytes())?,
                    None => SocketAddr::from_pathname(path)?,
                };
                Some((UnixDatagram::unbound()?, addr))
            }
        };
        let pid_matches = env
            .get("WATCHDOG_PID")
            .is_none_or(|pid| pid.parse::<u32>().ok() == Some(std::process::id()));
        let watchdog = env
            .get("WATCHDOG_USEC")
            .and_then(|usec| usec.parse::<u64>().ok())
            .filter(|&usec| usec > 0 && pid_matches)
            .map(|usec| Duration::from_micros(usec / 2));
        Ok(Notifier { target, watchdog })
    }

    /// Whether a service manager listens.
    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Tells the manager the service is ready.
    pub fn ready(&self) {
        self.send("READY=1");
    }

    /// Tells the manager a reload started; follow with [`Notifier::ready`] when it is done.
    pub fn reloading(&self) {
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000)
            .unwrap_or(0);
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={now}"));
    }

    /// Tells the manager the service is stopping.
    pub fn stopping(&self) {
        self.send("STOPPING=1");
    }

    /// A one-line status shown by `systemctl status`.
    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={}", status.replace('\n', " ")));
    }

    /// How often to send `WATCHDOG=1` (half of `WATCHDOG_USEC`), if a watchdog is armed.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.filter(|_| self.is_enabled())
    }

    /// Sends `WATCHDOG=1` at the watchdog interval until `stop` is cancelled; `None` when no
    /// watchdog is armed. The caller owns the task.
    pub fn spawn_watchdog(
        self: &std::sync::Arc<Self>,
        stop: CancellationToken,
    ) -> Option<JoinHandle<()>> {
        let interval = self.watchdog_interval()?;
        let notifier = self.clone();
        Some(tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = ticks.tick() => notifier.send("WATCHDOG=1"),
                }
            }
        }))
    }

    /// Sends a raw notification message.
    pub fn send(&self, message: &str) {
        if let Some((socket, addr)) = &self.target
            && let Err(err) = socket.send_to_addr(message.as_bytes(), addr)
        {
            tracing::warn!(error = %err, "could not notify the service manager");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_reach_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        let env = Env::from_pairs([("NOTIFY_SOCKET", &path)]);
        let notifier = Notifier::from_env(&env).unwrap();
        notifier.ready();
        notifier.reloading();
        let mut buf = [0u8; 256];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        let n = listener.recv(&mut buf).unwrap();
        let text = std::str::from_utf8(&buf[..n]).unwrap();
        assert!(text.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{text}");
    }

    #[test]
    fn messages_reach_an_abstract_socket() {
        let name = format!("labkit-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        let env = Env::from_pairs([("NOTIFY_SOCKET", format!("@{name}"))]);
        Notifier::from_env(&env).unwrap().stopping();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
    }

    #[test]
    fn watchdog_runs_at_half_the_timeout_for_our_pid_only() {
        let pid = std::process::id().to_string();
        let ours = Env::from_pairs([
            ("NOTIFY_SOCKET", "/nonexistent"),
            ("WATCHDOG_USEC", "4000000"),
            ("WATCHDOG_PID", pid.as_str()),
        ]);
        let notifier = Notifier::from_env(&ours).unwrap();
        assert_eq!(notifier.watchdog_interval(), Some(Duration::from_secs(2)));
        let other = Env::from_pairs([
            ("NOTIFY_SOCKET", "/nonexistent"),
            ("WATCHDOG_USEC", "4000000"),
            ("WATCHDOG_PID", "1"),
        ]);
        assert_eq!(
            Notifier::from_env(&other).unwrap().watchdog_interval(),
            None
        );
    }

    #[test]
    fn without_a_socket_nothing_is_sent() {
        let notifier = Notifier::from_env(&Env::default()).unwrap();
        assert!(!notifier.is_enabled());
        notifier.ready();
    }
}
