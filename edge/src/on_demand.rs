//! On-demand TLS (a Caddyfile's `on_demand_tls { ask; interval; burst }` with
//! `tls { on_demand }`): a certificate for a name first seen in a TLS handshake, ordered
//! from the ACME CA while that handshake waits.
//!
//! At a handshake for a name nothing serves, [`OnDemand::wait`] checks that an on-demand
//! site covers it and that it is a public host name (never built from raw SNI otherwise),
//! asks the `ask` endpoint (`GET URL?domain=NAME`, a 2xx approves, anything else or no
//! answer within [`ASK_TIMEOUT`] refuses), takes a place in the rate limit, and orders
//! through the `acme` module. The certificate is installed in `certs` and the name joins the
//! ACME plan, so it is renewed like the others.
//!
//! Invariants, with an attacker flooding random SNI names in mind: one order per name at a
//! time (every handshake for a name waits on the same attempt, which runs on a task of its
//! own so a handshake giving up does not cancel it); at most [`MAX_PENDING`] names are
//! asked about or ordered at once (further new names are refused without asking); a refused
//! or failed name is remembered for [`REFUSED_FOR`] and refused at once meanwhile, in a
//! table of at most [`MAX_REFUSED`] names. The handshake path for names already served never
//! reaches this module.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::sync::watch;

use crate::acme::Acme;
use crate::certs::Certs;
use crate::config::{AcmeConfig, AskUrl, OnDemandConfig};
use crate::site::Host;
use crate::transport::Transport;

/// How long the ask endpoint has to answer (Caddy 2.6 gives it 10 s).
pub(crate) const ASK_TIMEOUT: Duration = Duration::from_secs(10);
/// Names being asked about or ordered at once.
pub(crate) const MAX_PENDING: usize = 256;
/// How long a refused or failed name is refused without asking again.
pub(crate) const REFUSED_FOR: Duration = Duration::from_secs(60);
/// Refused names remembered at once.
pub(crate) const MAX_REFUSED: usize = 10_000;

/// What the running config says about on-demand names.
#[derive(Debug)]
pub(crate) struct Settings {
    /// `on_demand_tls`.
    pub(crate) config: OnDemandConfig,
    /// ACME settings for the orders.
    pub(crate) acme: AcmeConfig,
    /// The hosts of on-demand sites, each with its account email.
    pub(crate) hosts: Vec<(Host, Option<String>)>,
    /// How the ask endpoint is reached.
    pub(crate) transport: Option<Transport>,
}

/// The outcome of [`OnDemand::wait`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// No on-demand site covers the name: the handshake goes on as without on-demand TLS.
    NotCovered,
    /// The certificate is served now.
    Ready,
    /// Refused (by ask, the rate limit, the CA, or because too much is pending).
    Refused(String),
}

/// Where an attempt's outcome arrives: `None` while it runs, then approved or why not.
type Waiting = watch::Receiver<Option<Result<(), String>>>;

/// Told each name obtained, with its account email.
pub(crate) type OnObtained = Box<dyn Fn(&str, Option<String>) + Send + Sync>;

/// On-demand certificates of one edge.
pub(crate) struct OnDemand {
    settings: ArcSwapOption<Settings>,
    acme: Arc<Acme>,
    certs: Arc<Certs>,
    /// The runtime the attempts run on (the main one, not a connection's worker).
    runtime: tokio::runtime::Handle,
    /// Names being attempted, each with the channel its outcome is sent on.
    pending: Mutex<HashMap<String, Waiting>>,
    /// Names refused recently, until when.
    refused: Mutex<HashMap<String, Instant>>,
    /// When the orders in the rate limit's window started.
    orders: Mutex<VecDeque<Instant>>,
    /// Names obtained, with their account emails, for the ACME plan (renewal).
    obtained: Mutex<Vec<(String, Option<String>)>>,
    /// Called with each obtained name (adds it to the running plan).
    on_obtained: OnObtained,
}

impl std::fmt::Debug for OnDemand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnDemand").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether `name` may have a public certificate ordered: a DNS name of at least two labels,
/// not local, no wildcard.
fn public_name(name: &str) -> Option<String> {
    match Host::parse(name) {
        Ok(host @ Host::Name(_)) if !host.internal_by_default() => {
            let key = crate::certs::key_of(&host);
            (key.contains('.') && !key.ends_with('.')).then_some(key)
        }
        _ => None,
    }
}

impl OnDemand {
    /// Off until [`OnDemand::configure`]; attempts run on the current runtime.
    pub(crate) fn new(acme: Arc<Acme>, certs: Arc<Certs>, on_obtained: OnObtained) -> OnDemand {
        OnDemand {
            settings: ArcSwapOption::empty(),
            acme,
            certs,
            runtime: tokio::runtime::Handle::current(),
            pending: Mutex::default(),
            refused: Mutex::default(),
            orders: Mutex::default(),
            obtained: Mutex::default(),
            on_obtained,
        }
    }

    /// Takes the running config's settings (`None`: no on-demand site).
    pub(crate) fn configure(&self, settings: Option<Settings>) {
        if settings.is_none() {
            lock(&self.refused).clear();
        }
        self.settings.store(settings.map(Arc::new));
    }

    /// The names obtained so far that the current settings still cover, with their emails.
    pub(crate) fn obtained(&self) -> Vec<(String, Option<String>)> {
        let Some(settings) = self.settings.load_full() else {
            return Vec::new();
        };
        lock(&self.obtained)
            .iter()
            .filter(|(n, _)| settings.hosts.iter().any(|(h, _)| h.matches(n)))
            .cloned()
            .collect()
    }

    /// Gets a certificate for the SNI `name` if an on-demand site covers it, waiting for the
    /// attempt under way if there is one.
    pub(crate) async fn wait(self: &Arc<Self>, name: &str) -> Outcome {
        let Some(settings) = self.settings.load_full() else {
            return Outcome::NotCovered;
        };
        let Some(name) = public_name(name) else {
            return if settings.hosts.iter().any(|(h, _)| *h == Host::Any) {
                Outcome::Refused("not a public host name".into())
            } else {
                Outcome::NotCovered
            };
        };
        let Some(email) = settings
            .hosts
            .iter()
            .find(|(h, _)| h.matches(&name))
            .map(|(_, e)| e.clone())
        else {
            return Outcome::NotCovered;
        };
        {
            let mut refused = lock(&self.refused);
            if let Some(until) = refused.get(&name) {
                if Instant::now() < *until {
                    return Outcome::Refused("refused recently".into());
                }
                refused.remove(&name);
            }
        }
        let mut rx = {
            let mut pending = lock(&self.pending);
            match pending.get(&name) {
                Some(rx) => rx.clone(),
                None => {
                    if self.certs.serves(&name) {
                        // Installed while this handshake looked.
                        return Outcome::Ready;
                    }
                    if pending.len() >= MAX_PENDING {
                        return Outcome::Refused("too many names pending".into());
                    }
                    let (tx, rx) = watch::channel(None);
                    pending.insert(name.clone(), rx.clone());
                    let this = self.clone();
                    self.runtime.spawn(async move {
                        let result = this.attempt(&settings, &name, email.clone()).await;
                        this.finish(&name, email, &result);
                        let _ = tx.send(Some(result));
                    });
                    rx
                }
            }
        };
        match rx.wait_for(Option::is_some).await {
            Ok(done) => match done.as_ref() {
                Some(Ok(())) => Outcome::Ready,
                Some(Err(why)) => Outcome::Refused(why.clone()),
                None => Outcome::Refused("no outcome".into()),
            },
            Err(_) => Outcome::Refused("the attempt ended without an outcome".into()),
        }
    }

    /// Ask, rate limit, order, install.
    async fn attempt(
        &self,
        settings: &Settings,
        name: &str,
        email: Option<String>,
    ) -> Result<(), String> {
        if let (Some(ask), Some(transport)) = (&settings.config.ask, &settings.transport) {
            match tokio::time::timeout(ASK_TIMEOUT, ask_once(ask, transport, name)).await {
                Ok(Ok(status)) if (200..300).contains(&status) => {}
                Ok(Ok(status)) => {
                    tracing::info!(
                        name,
                        status,
                        "the ask endpoint refused an on-demand certificate"
                    );
                    return Err(format!("the ask endpoint answered {status}"));
                }
                Ok(Err(why)) => {
                    tracing::error!(name, endpoint = %ask.text, error = %why, "request to the ask endpoint failed");
                    return Err(format!("asking failed: {why}"));
                }
                Err(_) => {
                    tracing::error!(name, endpoint = %ask.text, "the ask endpoint did not answer in time");
                    return Err("the ask endpoint did not answer in time".into());
                }
            }
        }
        // Last, as Caddy does: taking a place in the window is a reservation.
        if let Some((interval, burst)) = settings.config.rate {
            let mut orders = lock(&self.orders);
            let now = Instant::now();
            while orders
                .front()
                .is_some_and(|t| now.duration_since(*t) >= interval)
            {
                orders.pop_front();
            }
            if orders.len() >= burst {
                tracing::warn!(name, "on-demand rate limit reached; refusing");
                return Err("on-demand rate limit exceeded".into());
            }
            orders.push_back(now);
        }
        let acme = &settings.acme;
        let result = match tokio::time::timeout(
            acme.order_timeout,
            self.acme.obtain(acme, name, email.as_deref()),
        )
        .await
        {
            Ok(result) => result.map_err(|e| labcore::exit::chain(&e).to_string()),
            Err(_) => Err(format!(
                "the order took longer than {:?}",
                acme.order_timeout
            )),
        };
        match result {
            Ok(entry) => {
                tracing::info!(
                    name,
                    not_after = entry.validity.not_after,
                    "certificate obtained on demand"
                );
                self.certs.install(name, entry);
                Ok(())
            }
            Err(why) => {
                tracing::warn!(name, error = %why, "on-demand certificate order failed");
                Err(why)
            }
        }
    }

    /// Records the outcome: remembers a refusal, or adds the name to the plan.
    fn finish(&self, name: &str, email: Option<String>, result: &Result<(), String>) {
        match result {
            Ok(()) => {
                {
                    let mut obtained = lock(&self.obtained);
                    if !obtained.iter().any(|(n, _)| n == name) {
                        obtained.push((name.to_owned(), email.clone()));
                    }
                }
                (self.on_obtained)(name, email);
            }
            Err(_) => {
                let mut refused = lock(&self.refused);
                let now = Instant::now();
                if refused.len() >= MAX_REFUSED {
                    refused.retain(|_, until| *until > now);
                }
                if refused.len() >= MAX_REFUSED {
                    // Still full of live entries: forget the ones ending soonest.
                    let mut ends: Vec<Instant> = refused.values().copied().collect();
                    ends.sort_unstable();
                    let cut = ends[ends.len() / 2];
                    refused.retain(|_, until| *until > cut);
                }
                refused.insert(name.to_owned(), now + REFUSED_FOR);
            }
        }
        lock(&self.pending).remove(name);
    }
}

/// One ask request; the answer's status.
async fn ask_once(ask: &AskUrl, transport: &Transport, name: &str) -> Result<u16, String> {
    let stream = transport
        .connect(&ask.address, ASK_TIMEOUT)
        .await
        .map_err(|e| format!("connecting to {}: {e}", ask.address.dial))?;
    // `name` is a checked host name: letters, digits, '-', '_' and dots need no escaping.
    let uri = format!("{}domain={name}", ask.path_and_query);
    let req = hyper::Request::get(uri.as_str())
        .header(hyper::header::HOST, ask.host.as_str())
        .header(hyper::header::USER_AGENT, "labkit-edge")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let response = sender.send_request(req).await.map_err(|e| e.to_string())?;
    // Redirects are not followed (as in Caddy): a 3xx refuses.
    Ok(response.status().as_u16())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_host_names_are_ordered_on_demand() {
        assert_eq!(
            public_name("App.Example.org").as_deref(),
            Some("app.example.org")
        );
        for bad in [
            "localhost",
            "example",
            "127.0.0.1",
            "x.local",
            "*.example.org",
            "a b.example.org",
            "a/../b.example.org",
            "a%2f.example.org",
            "a?x=1.example.org",
        ] {
            assert_eq!(public_name(bad), None, "{bad}");
        }
    }
}
