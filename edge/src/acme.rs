//! Public certificates from an ACME CA (RFC 8555): accounts, orders, HTTP-01 and TLS-ALPN-01
//! challenges, renewal with capped backoff, and the per-name state `edge status` reads.
//!
//! Storage layout, under the storage folder (`CA` is the directory URL made a file name,
//! `acme-v02.api.letsencrypt.org-directory`):
//! - `acme/CA/accounts/EMAIL.json`: the account's credentials, private key included (0600);
//! - `certificates/acme/CA/NAME/NAME.crt|.key|.json`: chain, key (0600), and the name's state
//!   (expiry, next renewal, last attempt and error);
//! - `acme/challenges/NAME.json`: a pending challenge's key authorization, so a second edge
//!   sharing the folder (and the port, behind one address) answers it too;
//! - `locks/acme-CA-NAME.lock`: held while a name is ordered, so two edges never order the
//!   same name at once; the second one then finds the first one's certificate in storage.
//!
//! Invariants: a served certificate is replaced only by a whole new one (chain and key
//! written, parsed and matched first), never removed because an order failed; a stored
//! certificate is served at start without contacting the CA; a stored file that does not
//! parse is reported by path and the name re-ordered; one name failing never holds up
//! another (orders run in a bounded [`JoinSet`], each under a time limit).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, Problem, RetryPolicy,
};
use rcgen::{CertificateParams, CustomExtension, DistinguishedName, KeyPair};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;
use rustls::sign::CertifiedKey;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::ca::now;
use crate::certs::{Certs, ChallengeResponder, Entry};
use crate::config::{AcmeConfig, Challenge};
use crate::dns01::{DnsConfig, DnsError, Presented};
use crate::storage::{CERT_MODE, KEY_MODE, Storage};

/// Longest delay between retries of a failing name.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(24 * 3600);

/// What went wrong getting a certificate.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AcmeError {
    /// The CA answered with a problem document.
    #[error("the CA refused: {}", problem_text(.0))]
    Problem(Problem),
    /// Talking to the CA failed.
    #[error("talking to the ACME CA")]
    Client(#[source] instant_acme::Error),
    /// A challenge or the order did not validate.
    #[error("{0}")]
    Invalid(String),
    /// The order took longer than `acme.order_timeout`.
    #[error("the order took longer than {0:?}")]
    Timeout(Duration),
    /// Reading or writing the storage failed.
    #[error("storage {path}")]
    Storage {
        /// The file.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Making a key or request failed.
    #[error("making the key or request: {0}")]
    Key(String),
    /// The DNS provider could not publish a DNS-01 record, or it did not show.
    #[error(transparent)]
    Dns(#[from] DnsError),
}

impl From<instant_acme::Error> for AcmeError {
    fn from(err: instant_acme::Error) -> AcmeError {
        match err {
            instant_acme::Error::Api(problem) => AcmeError::Problem(problem),
            other => AcmeError::Client(other),
        }
    }
}

/// A problem document as one line: type, detail, status and subproblems.
pub(crate) fn problem_text(p: &Problem) -> String {
    let mut text = p.r#type.clone().unwrap_or_else(|| "(no type)".into());
    if let Some(detail) = &p.detail {
        text.push_str(&format!(": {detail}"));
    }
    if let Some(status) = p.status {
        text.push_str(&format!(" (status {status})"));
    }
    for sub in &p.subproblems {
        text.push_str(&format!("; {sub}"));
    }
    text
}

/// The storage folder name of a CA: its directory URL without the scheme, made safe.
pub fn ca_key(directory: &str) -> String {
    let rest = directory
        .strip_prefix("https://")
        .unwrap_or(directory)
        .trim_end_matches('/');
    rest.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect()
}

/// Where a name's files live for a CA (a wildcard's `*` written `wildcard_`, as Caddy does).
pub(crate) fn cert_paths(directory: &str, name: &str) -> (String, String, String) {
    let name = name.replace('*', "wildcard_");
    let dir = format!("certificates/acme/{}/{name}", ca_key(directory));
    (
        format!("{dir}/{name}.crt"),
        format!("{dir}/{name}.key"),
        format!("{dir}/{name}.json"),
    )
}

/// A name's state as stored next to its certificate (`NAME.json`), for `edge status`.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct NameState {
    /// The name.
    pub(crate) name: String,
    /// The ACME directory URL.
    pub(crate) issuer: String,
    /// The stored certificate's end (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) not_after: Option<i64>,
    /// When renewal is due (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) renew_at: Option<i64>,
    /// The last order attempt (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) last_attempt: Option<i64>,
    /// The last attempt's error; absent once an order succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) last_error: Option<String>,
    /// Failed attempts in a row.
    #[serde(default)]
    pub(crate) failures: u32,
    /// When the next attempt is planned after a failure (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) next_attempt: Option<i64>,
}

/// When a certificate valid from `not_before` to `not_after` is due: when `ratio` of its
/// lifetime is left.
pub(crate) fn renew_at(not_before: i64, not_after: i64, ratio: f64) -> i64 {
    let lifetime = (not_after - not_before).max(0) as f64;
    not_after - (lifetime * ratio) as i64
}

/// The delay after the `failures`-th failure in a row: `base` doubled per failure, capped at
/// [`MAX_BACKOFF`], times a jitter in [0.8, 1.0) so edges that failed together spread out.
/// Below the cap each delay is longer than the one before (2 × 0.8 > 1).
pub(crate) fn backoff(base: Duration, failures: u32, jitter: f64) -> Duration {
    let exp = failures.saturating_sub(1).min(40);
    let raw = base.saturating_mul(1u32 << exp.min(31)).min(MAX_BACKOFF);
    raw.mul_f64(0.8 + 0.2 * jitter.clamp(0.0, 0.999))
}

/// Pending challenges, answered by the HTTP handler and the TLS handshake.
#[derive(Debug)]
pub(crate) struct Challenges {
    storage: Storage,
    provider: Arc<CryptoProvider>,
    /// (host, token) to key authorization.
    http: Mutex<HashMap<(String, String), String>>,
    /// host to challenge certificate.
    tls: Mutex<HashMap<String, Arc<CertifiedKey>>>,
    /// Storage lookups lately made for hosts with no local challenge.
    lookups: Mutex<Lookups>,
}

/// How long "no challenge stored for this host" is believed without asking the storage again.
const NEGATIVE_TTL: Duration = Duration::from_millis(500);
/// At most this many hosts remembered as having no stored challenge.
const NEGATIVE_HOSTS: usize = 4096;
/// At most this many storage lookups of challenges per second, whatever the requests: a flood
/// of random tokens or hosts costs the bucket this much and no more.
const LOOKUPS_PER_SECOND: u32 = 50;

/// The bounds on challenge lookups in the storage: a short negative cache per host and a
/// budget per second.
#[derive(Debug)]
struct Lookups {
    /// host to when the storage last said it holds no challenge for it.
    absent: HashMap<String, std::time::Instant>,
    /// Start of the current one-second window.
    window: std::time::Instant,
    /// Lookups made in it.
    made: u32,
    /// Lookups made in all (for tests and debugging).
    total: u64,
}

impl Default for Lookups {
    fn default() -> Lookups {
        Lookups {
            absent: HashMap::new(),
            window: std::time::Instant::now(),
            made: 0,
            total: 0,
        }
    }
}

impl Lookups {
    /// Whether the storage may be asked about `host` now; counts the lookup when it may.
    fn admit(&mut self, host: &str) -> bool {
        let now = std::time::Instant::now();
        if self
            .absent
            .get(host)
            .is_some_and(|at| now.duration_since(*at) < NEGATIVE_TTL)
        {
            return false;
        }
        if now.duration_since(self.window) >= Duration::from_secs(1) {
            self.window = now;
            self.made = 0;
        }
        if self.made >= LOOKUPS_PER_SECOND {
            return false;
        }
        self.made += 1;
        self.total += 1;
        true
    }

    /// Remembers that the storage holds no challenge for `host`.
    fn absent(&mut self, host: &str) {
        let now = std::time::Instant::now();
        if self.absent.len() >= NEGATIVE_HOSTS {
            self.absent
                .retain(|_, at| now.duration_since(*at) < NEGATIVE_TTL);
        }
        if self.absent.len() < NEGATIVE_HOSTS {
            self.absent.insert(host.to_owned(), now);
        }
    }
}

/// Whether `token` can be an ACME challenge token (base64url, RFC 8555 section 8.1): only
/// such tokens are looked up in the storage.
fn well_formed_token(token: &str) -> bool {
    (16..=256).contains(&token.len())
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Whether `host` can be a name edge orders for (letters, digits, `-`, `.`, `*`).
fn well_formed_host(host: &str) -> bool {
    (1..=253).contains(&host.len())
        && !host.starts_with('.')
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'*')
}

/// A challenge written to the storage for other edges sharing it.
#[derive(Debug, Serialize, Deserialize)]
struct SharedChallenge {
    token: String,
    key_authorization: String,
    kind: String,
}

impl Challenges {
    /// No challenges pending.
    pub(crate) fn new(storage: Storage, provider: Arc<CryptoProvider>) -> Challenges {
        Challenges {
            storage,
            provider,
            http: Mutex::default(),
            tls: Mutex::default(),
            lookups: Mutex::default(),
        }
    }

    fn shared_path(host: &str) -> String {
        format!("acme/challenges/{host}.json")
    }

    /// The challenge another edge stored for `host`, within the bounds of [`Lookups`].
    fn shared(&self, host: &str) -> Option<SharedChallenge> {
        if !well_formed_host(host) || !lock(&self.lookups).admit(host) {
            return None;
        }
        let found = match self.storage.read(&Challenges::shared_path(host)) {
            Ok(found) => found,
            Err(err) => {
                tracing::warn!(host = %host, error = %err, "reading a shared challenge failed");
                return None;
            }
        };
        let Some(bytes) = found else {
            lock(&self.lookups).absent(host);
            return None;
        };
        serde_json::from_slice(&bytes).ok()
    }

    /// Storage lookups made so far.
    #[cfg(test)]
    fn lookups_made(&self) -> u64 {
        lock(&self.lookups).total
    }

    fn add(
        &self,
        host: &str,
        kind: Challenge,
        token: &str,
        key_auth: &str,
    ) -> Result<(), AcmeError> {
        match kind {
            Challenge::Http01 => {
                lock(&self.http).insert((host.to_owned(), token.to_owned()), key_auth.to_owned());
            }
            Challenge::TlsAlpn01 => {
                let cert = self.alpn_cert(host, key_auth)?;
                lock(&self.tls).insert(host.to_owned(), cert);
            }
            // Published by the DNS provider: nothing for this edge to answer.
            Challenge::Dns01 => return Ok(()),
        }
        let shared = SharedChallenge {
            token: token.to_owned(),
            key_authorization: key_auth.to_owned(),
            kind: match kind {
                Challenge::Http01 => "http-01".into(),
                Challenge::TlsAlpn01 => "tls-alpn-01".into(),
                Challenge::Dns01 => "dns-01".into(),
            },
        };
        let rel = Challenges::shared_path(host);
        let bytes = serde_json::to_vec(&shared).map_err(|e| AcmeError::Key(e.to_string()))?;
        self.storage
            .write(&rel, &bytes, KEY_MODE)
            .map_err(|source| AcmeError::Storage {
                path: self.storage.path(&rel).display().to_string(),
                source,
            })
    }

    fn remove(&self, host: &str) {
        lock(&self.http).retain(|(h, _), _| h != host);
        lock(&self.tls).remove(host);
        if let Err(err) = self.storage.remove(&Challenges::shared_path(host)) {
            tracing::warn!(host = %host, error = %err, "removing a shared challenge failed");
        }
    }

    /// The TLS-ALPN-01 certificate (RFC 8737): a self-signed certificate for `host` holding
    /// the SHA-256 of the key authorization in a critical acmeIdentifier extension.
    fn alpn_cert(&self, host: &str, key_auth: &str) -> Result<Arc<CertifiedKey>, AcmeError> {
        let key_err = |e: rcgen::Error| AcmeError::Key(e.to_string());
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, key_auth.as_bytes());
        let mut params = CertificateParams::new(vec![host.to_owned()]).map_err(key_err)?;
        params
            .custom_extensions
            .push(CustomExtension::new_acme_identifier(digest.as_ref()));
        let key = KeyPair::generate().map_err(key_err)?;
        let cert = params.self_signed(&key).map_err(key_err)?;
        let der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let signing = self
            .provider
            .key_provider
            .load_private_key(der)
            .map_err(|e| AcmeError::Key(e.to_string()))?;
        Ok(Arc::new(CertifiedKey::new(
            vec![cert.der().clone()],
            signing,
        )))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ChallengeResponder for Challenges {
    fn http01(&self, host: &str, token: &str) -> Option<String> {
        if let Some(answer) = lock(&self.http).get(&(host.to_owned(), token.to_owned())) {
            return Some(answer.clone());
        }
        if !well_formed_token(token) {
            return None;
        }
        let shared = self.shared(host)?;
        (shared.kind == "http-01" && shared.token == token).then_some(shared.key_authorization)
    }

    fn tls_alpn01(&self, host: &str) -> Option<Arc<CertifiedKey>> {
        if let Some(cert) = lock(&self.tls).get(host) {
            return Some(cert.clone());
        }
        let shared = self.shared(host)?;
        if shared.kind != "tls-alpn-01" {
            return None;
        }
        self.alpn_cert(host, &shared.key_authorization).ok()
    }
}

/// Removes a name's pending challenges when its order ends, however it ends.
struct ChallengeGuard<'a> {
    challenges: &'a Challenges,
    host: &'a str,
}

impl Drop for ChallengeGuard<'_> {
    fn drop(&mut self) {
        self.challenges.remove(self.host);
    }
}

/// The names to keep certificates for, and how.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Plan {
    /// ACME settings.
    pub(crate) acme: AcmeConfig,
    /// Each name with its account email.
    pub(crate) names: Vec<(String, Option<String>)>,
    /// Names whose site narrows the challenges offered (`issuer acme { disable_... }`).
    pub(crate) challenges: HashMap<String, Vec<Challenge>>,
    /// Names whose challenges a DNS provider publishes (DNS-01, their only challenge).
    pub(crate) dns: HashMap<String, Arc<DnsConfig>>,
    /// Names whose site has its own issuer (`tls { ca ca_root eab key_type }`).
    pub(crate) issuers: HashMap<String, Arc<AcmeConfig>>,
}

impl Plan {
    /// The ACME settings `name` is ordered, stored and renewed with: its site's issuer or
    /// the global one, narrowed to its site's challenges or its DNS provider.
    pub(crate) fn settings(&self, name: &str) -> AcmeConfig {
        let mut settings = match self.issuers.get(name) {
            Some(issuer) => (**issuer).clone(),
            None => self.acme.clone(),
        };
        if let Some(only) = self.challenges.get(name) {
            settings.challenges = only.clone();
        }
        if let Some(dns) = self.dns.get(name) {
            settings.challenges = vec![Challenge::Dns01];
            settings.dns = Some(dns.clone());
        }
        settings
    }
}

/// The DNS-01 records published for one order, removed when the order ends: by
/// [`Published::remove_all`] on every return, or, when the order is dropped (its time
/// limit, a stop), by a task of the tracker that [`Acme::run`] waits for.
struct Published {
    dns: Option<Arc<DnsConfig>>,
    records: Vec<Presented>,
    tracker: TaskTracker,
}

impl Published {
    async fn remove_all(&mut self) {
        let records = std::mem::take(&mut self.records);
        if let Some(dns) = &self.dns {
            remove_records(dns, records).await;
        }
    }
}

async fn remove_records(dns: &DnsConfig, records: Vec<Presented>) {
    for record in records {
        let removal = tokio::time::timeout(CLEANUP_TIMEOUT, dns.provider.cleanup(&record));
        match removal.await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::warn!(name = %record.fqdn, error = %err,
                "removing a DNS-01 record failed; remove it by hand"),
            Err(_) => tracing::warn!(name = %record.fqdn, provider = dns.provider.name(),
                "removing a DNS-01 record timed out; remove it by hand"),
        }
    }
}

/// Time the removal of one DNS-01 record may take.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(60);

impl Drop for Published {
    fn drop(&mut self) {
        let records = std::mem::take(&mut self.records);
        let (Some(dns), false) = (self.dns.clone(), records.is_empty()) else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            self.tracker
                .spawn_on(async move { remove_records(&dns, records).await }, &runtime);
        }
    }
}

/// An account's directory, email and EAB key id.
type AccountKey = (String, Option<String>, Option<String>);

/// The ACME client of one edge.
pub(crate) struct Acme {
    storage: Storage,
    certs: Arc<Certs>,
    challenges: Arc<Challenges>,
    accounts: tokio::sync::Mutex<HashMap<AccountKey, Account>>,
    /// Removals of DNS-01 records whose order was dropped.
    cleanups: TaskTracker,
}

impl fmt::Debug for Acme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Acme").finish_non_exhaustive()
    }
}

/// A name's schedule in the running loop.
#[derive(Debug, Default, Clone, Copy)]
struct Schedule {
    failures: u32,
    /// Not before this (tokio time) after a failure.
    retry_at: Option<tokio::time::Instant>,
}

impl Acme {
    /// A client storing into `storage` and serving through `certs`.
    pub(crate) fn new(storage: Storage, certs: Arc<Certs>) -> Acme {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        Acme {
            challenges: Arc::new(Challenges::new(storage.clone(), provider)),
            storage,
            certs,
            accounts: tokio::sync::Mutex::default(),
            cleanups: TaskTracker::new(),
        }
    }

    /// What answers the CA's challenges.
    pub(crate) fn challenges(&self) -> Arc<Challenges> {
        self.challenges.clone()
    }

    /// Serves every stored certificate of `plan` that is whole and unexpired, without
    /// contacting the CA; a corrupt one is reported by path and left for the loop to re-order.
    /// Blocking (file I/O).
    pub(crate) fn serve_stored(&self, plan: &Plan) {
        for (name, _) in &plan.names {
            if self.certs.get(name).is_some_and(|e| e.acme) {
                continue;
            }
            match self.load_stored(&plan.settings(name).directory, name) {
                Ok(Some(entry)) => {
                    tracing::info!(name = %name, not_after = entry.validity.not_after,
                        "serving the stored certificate");
                    self.certs.install(name, entry);
                    tracing::debug!(name = %name, "certificate installed");
                }
                Ok(None) => {}
                Err(reason) => tracing::warn!(name = %name, %reason,
                    "stored certificate unusable; ordering a new one"),
            }
        }
    }

    /// Serves the stored certificates of `plan` that outlast the served ones: renewed by
    /// another edge sharing the bucket. Names in `busy` are skipped: their order task takes
    /// what is stored itself, under the name's lock, and says so once. Blocking (storage I/O).
    fn pick_up_renewed(&self, plan: &Plan, busy: &HashSet<String>) {
        for (name, _) in &plan.names {
            if busy.contains(name) {
                continue;
            }
            let served = self.certs.get(name).filter(|e| e.acme);
            if let Ok(Some(stored)) = self.load_stored(&plan.settings(name).directory, name)
                && served.is_none_or(|s| s.validity.not_after < stored.validity.not_after)
            {
                tracing::info!(name = %name, not_after = stored.validity.not_after,
                    "serving the certificate another edge stored");
                self.certs.install(name, stored);
            }
        }
    }

    /// A stored certificate for `name` that parses, matches its key, names `name` and has
    /// not expired; `Err` says which file is wrong and how.
    fn load_stored(&self, directory: &str, name: &str) -> Result<Option<Arc<Entry>>, String> {
        let (crt, key, _) = cert_paths(directory, name);
        let read = |rel: &str| {
            self.storage
                .read(rel)
                .map_err(|e| format!("{}: {e}", self.storage.path(rel).display()))
        };
        let (Some(chain), Some(key_pem)) = (read(&crt)?, read(&key)?) else {
            return Ok(None);
        };
        let entry = self.certs.entry(&chain, &key_pem, true).map_err(|reason| {
            let culprit = if reason.starts_with("key:") {
                &key
            } else {
                &crt
            };
            format!("{}: {reason}", self.storage.path(culprit).display())
        })?;
        if now() >= entry.validity.not_after {
            return Err(format!("{}: expired", self.storage.path(&crt).display()));
        }
        if !names_host(&entry.certified.cert[0], name) {
            return Err(format!(
                "{}: does not name {name}",
                self.storage.path(&crt).display()
            ));
        }
        Ok(Some(Arc::new(entry)))
    }

    fn read_state(&self, directory: &str, name: &str) -> NameState {
        let (_, _, meta) = cert_paths(directory, name);
        self.storage
            .read(&meta)
            .ok()
            .flatten()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_else(|| NameState {
                name: name.to_owned(),
                issuer: directory.to_owned(),
                ..NameState::default()
            })
    }

    fn write_state(&self, directory: &str, state: &NameState) {
        let (_, _, meta) = cert_paths(directory, &state.name);
        let result = serde_json::to_vec_pretty(state)
            .map_err(std::io::Error::other)
            .and_then(|bytes| self.storage.write(&meta, &bytes, CERT_MODE));
        if let Err(err) = result {
            tracing::warn!(path = %self.storage.path(&meta).display(), error = %err,
                "writing the certificate state failed");
        }
    }

    /// Keeps a certificate for every name of the plan until `stop`: orders what is missing,
    /// renews what is due, retries failures with growing delays. `plan` changes on reload.
    pub(crate) async fn run(
        self: Arc<Self>,
        mut plan: watch::Receiver<Plan>,
        stop: CancellationToken,
    ) {
        let mut schedules: HashMap<String, Schedule> = HashMap::new();
        let mut running: HashSet<String> = HashSet::new();
        let mut jobs: JoinSet<(String, Result<Arc<Entry>, AcmeError>)> = JoinSet::new();
        // A shared bucket: other edges renew too, and what they store is picked up this often.
        let poll = self.storage.poll_interval();
        let mut next_poll = poll.map(|p| tokio::time::Instant::now() + p);
        loop {
            let current = plan.borrow_and_update().clone();
            let wanted: HashSet<&String> = current.names.iter().map(|(n, _)| n).collect();
            schedules.retain(|name, _| wanted.contains(name));
            let now_t = tokio::time::Instant::now();
            let mut next_wake = now_t + Duration::from_secs(3600);
            if let Some(at) = next_poll {
                next_wake = next_wake.min(at);
            }
            for (name, email) in &current.names {
                if running.contains(name) {
                    continue;
                }
                let settings = current.settings(name);
                let due = self.due_at(&settings, name, schedules.get(name));
                if due > tokio::time::Instant::now() {
                    next_wake = next_wake.min(due);
                    continue;
                }
                if running.len() >= current.acme.max_concurrent_orders {
                    break;
                }
                running.insert(name.clone());
                let acme = self.clone();
                let (name, email) = (name.clone(), email.clone());
                jobs.spawn(async move {
                    let result = match tokio::time::timeout(
                        settings.order_timeout,
                        acme.obtain(&settings, &name, email.as_deref()),
                    )
                    .await
                    {
                        Ok(result) => result,
                        Err(_) => Err(AcmeError::Timeout(settings.order_timeout)),
                    };
                    (name, result)
                });
            }
            tokio::select! {
                _ = stop.cancelled() => {
                    jobs.shutdown().await;
                    self.wait_cleanups().await;
                    return;
                }
                changed = plan.changed() => {
                    if changed.is_err() {
                        jobs.shutdown().await;
                        self.wait_cleanups().await;
                        return;
                    }
                }
                Some(done) = jobs.join_next() => {
                    let Ok((name, result)) = done else {
                        tracing::error!("a certificate order task failed");
                        running.clear();
                        continue;
                    };
                    running.remove(&name);
                    self.finished(&current.settings(&name), &name, result, &mut schedules);
                }
                _ = tokio::time::sleep_until(next_wake) => {
                    if let (Some(at), Some(every)) = (next_poll, poll)
                        && tokio::time::Instant::now() >= at
                    {
                        next_poll = Some(tokio::time::Instant::now() + every);
                        let acme = self.clone();
                        let plan = current.clone();
                        let busy = running.clone();
                        let _ = tokio::task::spawn_blocking(move || acme.pick_up_renewed(&plan, &busy))
                            .await;
                    }
                }
            }
        }
    }

    /// Waits (boundedly) for the removal of DNS-01 records of orders cut short.
    async fn wait_cleanups(&self) {
        self.cleanups.close();
        let _ = tokio::time::timeout(CLEANUP_TIMEOUT, self.cleanups.wait()).await;
    }

    /// When `name` needs work: now if nothing is served, its renewal time if served, and
    /// never before a failure's retry time.
    fn due_at(
        &self,
        acme: &AcmeConfig,
        name: &str,
        schedule: Option<&Schedule>,
    ) -> tokio::time::Instant {
        let now_t = tokio::time::Instant::now();
        if let Some(at) = schedule.and_then(|s| s.retry_at) {
            return at;
        }
        match self.certs.get(name).filter(|e| e.acme) {
            None => now_t,
            Some(e) => {
                let at = renew_at(
                    e.validity.not_before,
                    e.validity.not_after,
                    acme.renewal_window_ratio,
                );
                let wait = (at - now()).max(0) as u64;
                now_t + Duration::from_secs(wait)
            }
        }
    }

    fn finished(
        &self,
        acme: &AcmeConfig,
        name: &str,
        result: Result<Arc<Entry>, AcmeError>,
        schedules: &mut HashMap<String, Schedule>,
    ) {
        let mut state = self.read_state(&acme.directory, name);
        state.issuer = acme.directory.clone();
        state.last_attempt = Some(now());
        match result {
            Ok(entry) => {
                schedules.remove(name);
                let v = entry.validity;
                let renew = renew_at(v.not_before, v.not_after, acme.renewal_window_ratio);
                let renewed = self.certs.get(name).is_some_and(|e| e.acme);
                self.certs.install(name, entry);
                tracing::debug!(name = %name, "certificate installed");
                state.not_after = Some(v.not_after);
                state.renew_at = Some(renew);
                state.last_error = None;
                state.failures = 0;
                state.next_attempt = None;
                // The state first: whoever reads the log line and then `edge status` sees it.
                self.write_state(&acme.directory, &state);
                tracing::info!(name = %name, not_after = v.not_after, renew_at = renew,
                    "{}", if renewed { "certificate renewed" } else { "certificate obtained" });
            }
            Err(err) => {
                let schedule = schedules.entry(name.to_owned()).or_default();
                schedule.failures += 1;
                let delay = backoff(acme.retry_base, schedule.failures, rand::random::<f64>());
                schedule.retry_at = Some(tokio::time::Instant::now() + delay);
                let text = labcore::exit::chain(&err).to_string();
                let serving = self.certs.get(name).is_some();
                state.last_error = Some(text.clone());
                state.failures = schedule.failures;
                state.next_attempt = Some(now() + delay.as_secs() as i64);
                self.write_state(&acme.directory, &state);
                tracing::warn!(
                    name = %name,
                    attempt = schedule.failures,
                    retry_in_ms = delay.as_millis() as u64,
                    serving,
                    error = %text,
                    "certificate order failed; {}",
                    if serving { "the current certificate keeps serving" } else { "the name is not served until it succeeds" }
                );
            }
        }
    }

    /// Gets a certificate for `name`: from the storage when another edge has just stored a
    /// fresh one, else by an order. Holds the name's lock throughout.
    pub(crate) async fn obtain(
        &self,
        acme: &AcmeConfig,
        name: &str,
        email: Option<&str>,
    ) -> Result<Arc<Entry>, AcmeError> {
        let lock_name = format!(
            "acme-{}-{}",
            ca_key(&acme.directory),
            name.replace('*', "wildcard_")
        );
        let storage = self.storage.clone();
        let lock_path = self.storage.path(&format!("locks/{lock_name}"));
        let lock = tokio::task::spawn_blocking(move || storage.lock(&lock_name))
            .await
            .map_err(|e| AcmeError::Key(format!("lock task: {e}")))?
            .map_err(|source| AcmeError::Storage {
                path: lock_path.display().to_string(),
                source,
            })?;
        match self.load_stored(&acme.directory, name) {
            Ok(Some(stored)) => {
                let v = stored.validity;
                if now() < renew_at(v.not_before, v.not_after, acme.renewal_window_ratio) {
                    // Stored since this name was last looked at (by another edge, or before
                    // a reload added the name): nothing to order.
                    tracing::info!(name = %name, "using the certificate found in storage");
                    return Ok(stored);
                }
                if self.certs.get(name).is_none() {
                    // Due but unexpired: serve it while the order runs.
                    self.certs.install(name, stored);
                }
            }
            Ok(None) => {}
            Err(reason) => {
                tracing::warn!(name = %name, %reason, "stored certificate unusable; ordering a new one");
            }
        }
        // The account may wait on a lock of its own; a bucket's lease on the name can be
        // lost meanwhile (refreshes failing for a whole lease), and then another edge may be
        // ordering: leave it the name, and pick up what it stores on the retry.
        let account = self.account(acme, email).await?;
        if !lock.held() {
            return Err(AcmeError::Storage {
                path: lock_path.display().to_string(),
                source: std::io::Error::other(
                    "another edge took the name's lock over while this one waited; not ordering",
                ),
            });
        }
        self.order(acme, name, &account).await
    }

    async fn account(&self, acme: &AcmeConfig, email: Option<&str>) -> Result<Account, AcmeError> {
        // An account bound to an external account is its own: a site without the binding
        // on the same CA never borrows it (nor the other way round).
        let eab_id = acme.eab.as_ref().map(|e| e.key_id.clone());
        let key = (
            acme.directory.clone(),
            email.map(str::to_owned),
            eab_id.clone(),
        );
        let mut accounts = self.accounts.lock().await;
        if let Some(account) = accounts.get(&key) {
            return Ok(account.clone());
        }
        let ca = ca_key(&acme.directory);
        let mut file_name = email.unwrap_or("default").replace('/', "_");
        if let Some(id) = &eab_id {
            file_name.push_str(&format!("-eab-{}", id.replace('/', "_")));
        }
        let rel = format!("acme/{ca}/accounts/{file_name}.json");
        let storage = self.storage.clone();
        let lock_name = format!("acme-{ca}-account");
        let _lock = tokio::task::spawn_blocking(move || storage.lock(&lock_name))
            .await
            .map_err(|e| AcmeError::Key(format!("lock task: {e}")))?
            .map_err(|source| AcmeError::Storage {
                path: self.storage.path("locks").display().to_string(),
                source,
            })?;
        let storage_err = |source| AcmeError::Storage {
            path: self.storage.path(&rel).display().to_string(),
            source,
        };
        let builder = || match &acme.root {
            Some(root) => Account::builder_with_root(root),
            None => Account::builder(),
        };
        let stored = self.storage.read(&rel).map_err(storage_err)?;
        let account = match stored.map(|b| serde_json::from_slice::<AccountCredentials>(&b)) {
            Some(Ok(credentials)) => builder()?.from_credentials(credentials).await?,
            other => {
                if let Some(Err(err)) = other {
                    tracing::warn!(path = %self.storage.path(&rel).display(), error = %err,
                        "stored ACME account unreadable; creating a new account");
                }
                let contact = email.map(|e| format!("mailto:{e}"));
                let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
                let eab = acme.eab.as_ref().map(|e| e.key());
                let (account, credentials) = builder()?
                    .create(
                        &NewAccount {
                            contact: &contacts,
                            terms_of_service_agreed: true,
                            only_return_existing: false,
                        },
                        acme.directory.clone(),
                        eab.as_ref(),
                    )
                    .await?;
                let bytes = serde_json::to_vec(&credentials)
                    .map_err(|e| AcmeError::Key(format!("account credentials: {e}")))?;
                self.storage
                    .write(&rel, &bytes, KEY_MODE)
                    .map_err(storage_err)?;
                tracing::info!(directory = %acme.directory, email = email.unwrap_or("(none)"),
                    "ACME account created");
                account
            }
        };
        accounts.insert(key, account.clone());
        Ok(account)
    }

    /// Orders a certificate for `name`; DNS-01 records published for it are removed
    /// whatever the outcome.
    async fn order(
        &self,
        acme: &AcmeConfig,
        name: &str,
        account: &Account,
    ) -> Result<Arc<Entry>, AcmeError> {
        let mut published = Published {
            dns: acme.dns.clone(),
            records: Vec::new(),
            tracker: self.cleanups.clone(),
        };
        let result = self.order_steps(acme, name, account, &mut published).await;
        published.remove_all().await;
        result
    }

    async fn order_steps(
        &self,
        acme: &AcmeConfig,
        name: &str,
        account: &Account,
        published: &mut Published,
    ) -> Result<Arc<Entry>, AcmeError> {
        tracing::info!(name = %name, directory = %acme.directory, "ordering a certificate");
        let identifiers = [Identifier::Dns(name.to_owned())];
        let mut order = account.new_order(&NewOrder::new(&identifiers)).await?;
        let _guard = ChallengeGuard {
            challenges: &self.challenges,
            host: name,
        };
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz?;
            match authz.status {
                AuthorizationStatus::Valid => continue,
                AuthorizationStatus::Pending => {}
                other => {
                    return Err(AcmeError::Invalid(format!(
                        "authorization for {name} is {other:?}"
                    )));
                }
            }
            let offered: Vec<ChallengeType> =
                authz.challenges.iter().map(|c| c.r#type.clone()).collect();
            let Some(kind) = acme
                .challenges
                .iter()
                .copied()
                .find(|k| offered.contains(&challenge_type(*k)))
            else {
                return Err(AcmeError::Invalid(format!(
                    "the CA offers {offered:?} for {name}, none of the configured challenges"
                )));
            };
            let mut challenge = authz
                .challenge(challenge_type(kind))
                .ok_or_else(|| AcmeError::Invalid("challenge vanished".into()))?;
            let key_auth = challenge.key_authorization();
            if let (Challenge::Dns01, Some(dns)) = (kind, &acme.dns) {
                let record = dns.present(name, &key_auth.dns_value()).await?;
                published.records.push(record.clone());
                dns.wait_visible(&record).await?;
            } else {
                self.challenges
                    .add(name, kind, &challenge.token, key_auth.as_str())?;
            }
            tracing::debug!(name = %name, challenge = ?kind, "challenge ready");
            challenge.set_ready().await?;
        }
        let retry = RetryPolicy::new()
            .initial_delay(Duration::from_millis(250))
            .backoff(1.5)
            .timeout(acme.order_timeout);
        let status = order.poll_ready(&retry).await?;
        if status != OrderStatus::Ready {
            return Err(AcmeError::Invalid(self.why_invalid(&mut order, name).await));
        }
        let key =
            crate::issuer::generate(acme.key_type).map_err(|e| AcmeError::Key(e.to_string()))?;
        let mut params = CertificateParams::new(vec![name.to_owned()])
            .map_err(|e| AcmeError::Key(e.to_string()))?;
        params.distinguished_name = DistinguishedName::new();
        let csr = params
            .serialize_request(&key)
            .map_err(|e| AcmeError::Key(e.to_string()))?;
        order.finalize_csr(csr.der()).await?;
        let chain = order.poll_certificate(&retry).await?;
        let key_pem = key.serialize_pem();
        let entry = self
            .certs
            .entry(chain.as_bytes(), key_pem.as_bytes(), true)
            .map_err(|reason| AcmeError::Invalid(format!("the CA's chain: {reason}")))?;
        let (crt, key_file, _) = cert_paths(&acme.directory, name);
        for (rel, bytes, mode) in [
            (&key_file, key_pem.as_bytes(), KEY_MODE),
            (&crt, chain.as_bytes(), CERT_MODE),
        ] {
            self.storage
                .write(rel, bytes, mode)
                .map_err(|source| AcmeError::Storage {
                    path: self.storage.path(rel).display().to_string(),
                    source,
                })?;
        }
        Ok(Arc::new(entry))
    }

    /// The CA's reasons an order went invalid: each challenge's problem document.
    async fn why_invalid(&self, order: &mut instant_acme::Order, name: &str) -> String {
        let mut reasons = Vec::new();
        let mut authorizations = order.authorizations();
        while let Some(Ok(mut authz)) = authorizations.next().await {
            if let Ok(state) = authz.refresh().await {
                for c in &state.challenges {
                    if let Some(problem) = &c.error {
                        reasons.push(format!("{:?}: {}", c.r#type, problem_text(problem)));
                    }
                }
            }
        }
        if reasons.is_empty() {
            format!("the order for {name} is invalid")
        } else {
            format!("validating {name} failed: {}", reasons.join("; "))
        }
    }
}

/// The ACME type of a challenge.
fn challenge_type(kind: Challenge) -> ChallengeType {
    match kind {
        Challenge::Http01 => ChallengeType::Http01,
        Challenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
        Challenge::Dns01 => ChallengeType::Dns01,
    }
}

/// Whether a certificate names `host` among its DNS names.
fn names_host(der: &[u8], host: &str) -> bool {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return false;
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return false;
    };
    san.value.general_names.iter().any(|n| {
        matches!(n, x509_parser::extensions::GeneralName::DNSName(d) if d.eq_ignore_ascii_case(host))
    })
}

/// One line of `edge status`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct StatusLine {
    /// The name.
    pub(crate) name: String,
    /// "internal" or the ACME directory URL.
    pub(crate) issuer: String,
    /// Stored certificate's end (RFC 3339), if one is stored and readable.
    pub(crate) expires: Option<String>,
    /// When renewal is due (RFC 3339).
    pub(crate) next_renewal: Option<String>,
    /// The last failed attempt's error, if the last attempt failed.
    pub(crate) last_error: Option<String>,
    /// When the last attempt was (RFC 3339).
    pub(crate) last_attempt: Option<String>,
    /// When the next attempt is planned after failures (RFC 3339).
    pub(crate) next_attempt: Option<String>,
    /// Failures in a row.
    pub(crate) failures: u32,
}

/// Unix seconds as RFC 3339.
pub(crate) fn rfc3339(secs: i64) -> String {
    jiff::Timestamp::from_second(secs).map_or_else(|_| secs.to_string(), |t| t.to_string())
}

/// The validity of the leaf in a stored certificate chain, if it is there and parses.
pub(crate) fn stored_validity(storage: &Storage, path: &str) -> Option<crate::ca::Validity> {
    let pem = storage.read(path).ok().flatten()?;
    let der = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
        .next()?
        .ok()?;
    crate::ca::Validity::of(&der).ok()
}

/// The status of an ACME name from the storage alone.
pub(crate) fn status_of(storage: &Storage, acme: &AcmeConfig, name: &str) -> StatusLine {
    let (crt, _, meta) = cert_paths(&acme.directory, name);
    let state: NameState = storage
        .read(&meta)
        .ok()
        .flatten()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let validity = stored_validity(storage, &crt);
    let (expires, next_renewal, stored_error) = match validity {
        Some(v) => (
            Some(rfc3339(v.not_after)),
            Some(rfc3339(renew_at(
                v.not_before,
                v.not_after,
                acme.renewal_window_ratio,
            ))),
            None,
        ),
        None if storage.exists(&crt) => (
            None,
            None,
            Some(format!("{}: unreadable", storage.path(&crt).display())),
        ),
        None => (None, None, None),
    };
    StatusLine {
        name: name.to_owned(),
        issuer: acme.directory.clone(),
        expires,
        next_renewal,
        last_error: state.last_error.or(stored_error),
        last_attempt: state.last_attempt.map(rfc3339),
        next_attempt: state.next_attempt.map(rfc3339),
        failures: state.failures,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_below_the_cap_whatever_the_jitter_and_stays_under_a_day() {
        let base = Duration::from_secs(60);
        let mut last = Duration::ZERO;
        for failures in 1..=10 {
            let slowest_now = backoff(base, failures, 0.0);
            assert!(
                slowest_now > last,
                "{failures}: {slowest_now:?} <= {last:?}"
            );
            last = backoff(base, failures, 0.999);
        }
        for jitter in [0.0, 0.5, 0.999] {
            assert!(backoff(base, 60, jitter) <= MAX_BACKOFF);
            assert!(backoff(base, 60, jitter) >= MAX_BACKOFF.mul_f64(0.8));
        }
    }

    #[test]
    fn renewal_is_due_when_the_ratio_of_the_lifetime_is_left() {
        assert_eq!(renew_at(0, 90, 1.0 / 3.0), 60);
        assert_eq!(renew_at(100, 200, 0.5), 150);
    }

    #[test]
    fn ca_keys_are_file_names() {
        assert_eq!(
            ca_key("https://acme-v02.api.letsencrypt.org/directory"),
            "acme-v02.api.letsencrypt.org-directory"
        );
        assert_eq!(ca_key("https://localhost:14000/dir"), "localhost-14000-dir");
    }

    #[test]
    fn a_tls_alpn_certificate_carries_the_key_authorization_digest() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path()).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let challenges = Challenges::new(storage, provider);
        challenges
            .add("a.example.org", Challenge::TlsAlpn01, "tok", "tok.thumb")
            .unwrap();
        let cert = challenges.tls_alpn01("a.example.org").unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert.cert[0]).unwrap();
        let ext = parsed
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .unwrap();
        assert!(ext.critical);
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b"tok.thumb");
        // An OCTET STRING of 32 bytes: tag, length, digest.
        assert_eq!(&ext.value[2..], digest.as_ref());
        assert!(names_host(&cert.cert[0], "a.example.org"));
        challenges.remove("a.example.org");
        assert!(challenges.tls_alpn01("a.example.org").is_none());
    }

    #[test]
    fn a_challenge_written_by_one_edge_is_answered_by_another_sharing_the_storage() {
        let dir = tempfile::tempdir().unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let one = Challenges::new(Storage::open(dir.path()).unwrap(), provider.clone());
        let two = Challenges::new(Storage::open(dir.path()).unwrap(), provider);
        let tok = "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0";
        one.add("a.example.org", Challenge::Http01, tok, "tok.thumb")
            .unwrap();
        assert_eq!(
            two.http01("a.example.org", tok).as_deref(),
            Some("tok.thumb")
        );
        assert_eq!(two.http01("a.example.org", &tok.replace('L', "M")), None);
        assert_eq!(two.http01("../x", tok), None);
        one.remove("a.example.org");
        assert_eq!(two.http01("a.example.org", tok), None);
    }

    #[test]
    fn a_flood_of_random_challenge_tokens_makes_few_storage_lookups() {
        let dir = tempfile::tempdir().unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let edge = Challenges::new(Storage::open(dir.path()).unwrap(), provider);
        let started = std::time::Instant::now();
        for i in 0..20_000u32 {
            let token = format!("{:032x}", rand::random::<u128>() ^ u128::from(i));
            assert_eq!(edge.http01("a.example.org", &token), None);
            // Malformed tokens and hosts never reach the storage.
            assert_eq!(edge.http01("a.example.org", "../../etc/passwd"), None);
            assert_eq!(edge.http01("a.example.org", "short"), None);
            assert_eq!(edge.http01(&format!("h{i}.example.org/x"), &token), None);
        }
        // Random hosts: bounded by the budget per second, not by the number of requests.
        for i in 0..20_000u32 {
            assert_eq!(
                edge.http01(&format!("h{i}.example.org"), "A".repeat(43).as_str()),
                None
            );
        }
        let seconds = started.elapsed().as_secs() + 1;
        let made = edge.lookups_made();
        assert!(
            made <= seconds * u64::from(LOOKUPS_PER_SECOND),
            "{made} lookups in {seconds} s"
        );
        assert!(made >= 1, "the first lookup goes to the storage");
        // A challenge stored by another edge is still found once the negative entry is stale.
        let tok = "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0";
        let other = Challenges::new(
            Storage::open(dir.path()).unwrap(),
            Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
        );
        other
            .add("b.example.org", Challenge::Http01, tok, "tok.thumb")
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while edge.http01("b.example.org", tok).is_none() {
            assert!(std::time::Instant::now() < deadline, "never found");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
