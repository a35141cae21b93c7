//! Serving certificates: a per-name map swapped live under TLS handshakes, filled from the
//! storage, the internal CA or ACME (the `acme` module), and renewed in the background.
//!
//! The map sits behind an `ArcSwap`, so a handshake reads it without a lock and a renewal or
//! reload replaces it whole; connections already up keep the certificate they started with.
//! Leaves are stored (`certificates/local/NAME/NAME.crt|.key`, chain and key) so a restart
//! serves them at once; a stored file that is corrupt, expiring or signed by another root is
//! reported by name and replaced. [`ChallengeResponder`] is where ACME answers its challenges
//! (`/.well-known/acme-challenge/` on the HTTP port, `acme-tls/1` on the HTTPS port).

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::ca::{Ca, CaError, Validity, now};
use crate::site::{CertFiles, Host};
use crate::storage::{CERT_MODE, KEY_MODE, Storage};

/// Answers ACME challenges; the ACME issuer registers one. Without it, challenge requests get
/// 404 and `acme-tls/1` handshakes are refused.
pub(crate) trait ChallengeResponder: Send + Sync + fmt::Debug {
    /// The key authorization for an HTTP-01 `token` on `host`, if one is pending.
    fn http01(&self, host: &str, token: &str) -> Option<String>;
    /// The TLS-ALPN-01 challenge certificate for `host`, if one is pending.
    fn tls_alpn01(&self, host: &str) -> Option<Arc<CertifiedKey>>;
}

/// A site's certificate or key file that cannot be served.
#[derive(Debug, thiserror::Error)]
#[error("certificate file {}: {reason}", path.display())]
pub struct CertFileError {
    /// The file.
    pub path: std::path::PathBuf,
    /// What is wrong.
    pub reason: String,
    /// The OS's error, when the file could not be read.
    pub source: Option<std::io::Error>,
}

/// A certificate being served.
#[derive(Debug)]
pub(crate) struct Entry {
    /// Chain and signing key for rustls.
    pub(crate) certified: Arc<CertifiedKey>,
    /// The leaf's validity.
    pub(crate) validity: Validity,
    /// Ordered from an ACME CA (renewed by the `acme` module), not made by the internal CA.
    pub(crate) acme: bool,
    /// Read from the site's own files (`tls CERT KEY`): never renewed here, read again on
    /// reload.
    pub(crate) loaded: bool,
}

/// Every certificate the edge serves, by name.
pub(crate) struct Certs {
    ca: Arc<Ca>,
    storage: Storage,
    provider: Arc<CryptoProvider>,
    verifier: Arc<dyn ServerCertVerifier>,
    map: ArcSwap<HashMap<String, Arc<Entry>>>,
    changed: Notify,
}

impl fmt::Debug for Certs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certs")
            .field("names", &self.map.load().keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl crate::metrics::Expiries for Certs {
    fn expiries(&self) -> Vec<(String, i64)> {
        self.map
            .load()
            .iter()
            .map(|(name, entry)| (name.clone(), entry.validity.not_after))
            .collect()
    }
}

/// The map key of a host: its name, `*.suffix`, or its IP address without brackets.
pub(crate) fn key_of(host: &Host) -> String {
    match host {
        Host::Name(n) => n.clone(),
        Host::Wildcard(s) => format!("*{s}"),
        Host::Ip(ip) => ip.to_string(),
        Host::Any => String::new(),
    }
}

impl Certs {
    /// A store over `ca`, empty until [`Certs::ensure`].
    pub(crate) fn new(ca: Arc<Ca>, storage: Storage) -> Result<Certs, rustls::Error> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.root_der().clone())?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        Ok(Certs {
            ca,
            storage,
            provider,
            verifier,
            map: ArcSwap::from_pointee(HashMap::new()),
            changed: Notify::new(),
        })
    }

    /// Makes the served set exactly `hosts` from the internal CA plus the ACME names in
    /// `acme` that are served already: keeps what is served and fresh, loads what the storage
    /// holds, issues the rest. ACME names not served yet are the `acme` module's to add.
    /// Blocking (file I/O and signing).
    /// Names in `loaded` get the entries read from their site's files (see
    /// [`Certs::load_files`]), whatever else was served for them.
    pub(crate) fn ensure(
        &self,
        hosts: &[Host],
        acme: &[String],
        loaded: &[(String, Arc<Entry>)],
    ) -> Result<(), CaError> {
        let current = self.map.load_full();
        let mut next: HashMap<String, Arc<Entry>> = loaded.iter().cloned().collect();
        for host in hosts {
            let key = key_of(host);
            if next.contains_key(&key) {
                continue;
            }
            let entry = match current.get(&key) {
                Some(e) if !e.acme && now() < e.validity.renew_at() => e.clone(),
                _ => self.load_or_issue(host, &key)?,
            };
            next.insert(key, entry);
        }
        for name in acme {
            if let Some(e) = current.get(name).filter(|e| e.acme) {
                next.insert(name.clone(), e.clone());
            }
        }
        self.map.store(Arc::new(next));
        self.changed.notify_one();
        Ok(())
    }

    /// Serves `entry` for `key` from the next handshake on, replacing what was served.
    pub(crate) fn install(&self, key: &str, entry: Arc<Entry>) {
        self.map.rcu(|map| {
            let mut next = HashMap::clone(map);
            next.insert(key.to_owned(), entry.clone());
            next
        });
    }

    /// What is served for `key`.
    pub(crate) fn get(&self, key: &str) -> Option<Arc<Entry>> {
        self.map.load().get(key).cloned()
    }

    /// Renews the intermediate and every leaf that is due; returns how many leaves.
    pub(crate) fn renew_due(&self) -> Result<usize, CaError> {
        if self.ca.renew_intermediate_if_due()? {
            tracing::info!("internal CA intermediate renewed");
        }
        let current = self.map.load_full();
        let due: Vec<String> = current
            .iter()
            .filter(|(_, e)| !e.acme && !e.loaded && now() >= e.validity.renew_at())
            .map(|(k, _)| k.clone())
            .collect();
        if due.is_empty() {
            return Ok(0);
        }
        let mut next = (*current).clone();
        for key in &due {
            let host = Host::parse(key).map_err(|reason| CaError::Corrupt {
                path: self.storage.path("certificates/local"),
                reason,
            })?;
            let entry = self.issue_and_store(&host, key)?;
            tracing::info!(name = %key, not_after = entry.validity.not_after, "certificate renewed");
            next.insert(key.clone(), entry);
        }
        self.map.store(Arc::new(next));
        Ok(due.len())
    }

    /// When the next renewal is due (Unix seconds).
    pub(crate) fn next_renewal(&self) -> i64 {
        self.map
            .load()
            .values()
            .filter(|e| !e.acme && !e.loaded)
            .map(|e| e.validity.renew_at())
            .chain([self.ca.intermediate_renew_at()])
            .min()
            .unwrap_or(i64::MAX)
    }

    /// The certificate for an SNI name: exact, then the wildcard one label up.
    pub(crate) fn lookup(&self, sni: &str) -> Option<Arc<CertifiedKey>> {
        let map = self.map.load();
        if let Some(e) = map.get(sni) {
            return Some(e.certified.clone());
        }
        if let Some((_, parent)) = sni.split_once('.')
            && let Some(e) = map.get(&format!("*.{parent}"))
        {
            return Some(e.certified.clone());
        }
        // A site without a host (`:443` with `tls CERT KEY`) serves its files for any name.
        map.get("").map(|e| e.certified.clone())
    }

    /// Whether a name (as SNI) has a certificate.
    pub(crate) fn serves(&self, sni: &str) -> bool {
        self.lookup(sni).is_some()
    }

    /// The certificate for a client that sent no SNI, by the address it connected to.
    pub(crate) fn for_ip(&self, ip: IpAddr) -> Option<Arc<CertifiedKey>> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        let map = self.map.load();
        map.get(&ip.to_string())
            .or_else(|| map.get(""))
            .map(|e| e.certified.clone())
    }

    fn paths(key: &str) -> (String, String) {
        let file = key.replace('*', "wildcard_");
        (
            format!("certificates/local/{file}/{file}.crt"),
            format!("certificates/local/{file}/{file}.key"),
        )
    }

    fn load_or_issue(&self, host: &Host, key: &str) -> Result<Arc<Entry>, CaError> {
        let (crt, _) = Certs::paths(key);
        let _lock = self
            .storage
            .lock(&format!("cert-{}", key.replace('*', "wildcard_")))
            .map_err(|source| CaError::Io {
                path: self.storage.path("locks"),
                source,
            })?;
        match self.load(host, key) {
            Ok(Some(entry)) => return Ok(entry),
            Ok(None) => {}
            Err(reason) => tracing::warn!(
                path = %self.storage.path(&crt).display(),
                %reason,
                "stored certificate unusable; issuing a new one"
            ),
        }
        self.issue_and_store(host, key)
    }

    /// A stored certificate that is whole, chains to our root, names `host` and is not due.
    fn load(&self, host: &Host, key: &str) -> Result<Option<Arc<Entry>>, String> {
        let (crt, key_file) = Certs::paths(key);
        let read = |rel: &str| self.storage.read(rel).map_err(|e| e.to_string());
        let (Some(chain_pem), Some(key_pem)) = (read(&crt)?, read(&key_file)?) else {
            return Ok(None);
        };
        let entry = self.entry(&chain_pem, &key_pem, false)?;
        if now() >= entry.validity.renew_at() {
            return Ok(None);
        }
        let chain = &entry.certified.cert;
        let probe = match host {
            Host::Wildcard(suffix) => format!("edge-check{suffix}"),
            other => key_of(other),
        };
        let name = ServerName::try_from(probe).map_err(|e| e.to_string())?;
        self.verifier
            .verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now())
            .map_err(|e| format!("does not verify against the internal root: {e}"))?;
        Ok(Some(Arc::new(entry)))
    }

    /// Parses a PEM chain and key into a servable entry; the error says what is wrong.
    pub(crate) fn entry(
        &self,
        chain_pem: &[u8],
        key_pem: &[u8],
        acme: bool,
    ) -> Result<Entry, String> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("certificate chain: {e}"))?;
        if chain.is_empty() {
            return Err("no certificate in the chain file".into());
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("key: {e}"))?;
        let signing = self
            .provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| format!("key: {e}"))?;
        let validity = Validity::of(&chain[0])?;
        let certified = CertifiedKey::new(chain, signing);
        certified
            .keys_match()
            .map_err(|e| format!("key does not match the certificate: {e}"))?;
        Ok(Entry {
            certified: Arc::new(certified),
            validity,
            acme,
            loaded: false,
        })
    }

    /// Reads a site's certificate chain and key files; the error names the file at fault.
    /// Blocking.
    pub(crate) fn load_files(&self, files: &CertFiles) -> Result<Entry, CertFileError> {
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|source| CertFileError {
                path: path.to_owned(),
                reason: source.to_string(),
                source: Some(source),
            })
        };
        let chain_pem = read(&files.cert)?;
        let key_pem = read(&files.key)?;
        let bad = |path: &std::path::Path, reason: String| CertFileError {
            path: path.to_owned(),
            reason,
            source: None,
        };
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&chain_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| bad(&files.cert, format!("not a PEM certificate chain: {e}")))?;
        if chain.is_empty() {
            return Err(bad(&files.cert, "holds no PEM certificate".into()));
        }
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| bad(&files.key, format!("not a PEM private key: {e}")))?;
        let signing = self
            .provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| bad(&files.key, format!("unusable private key: {e}")))?;
        let validity = Validity::of(&chain[0]).map_err(|e| bad(&files.cert, e))?;
        let certified = CertifiedKey::new(chain, signing);
        certified.keys_match().map_err(|_| {
            bad(
                &files.key,
                format!(
                    "is not the key of the certificate in {}",
                    files.cert.display()
                ),
            )
        })?;
        Ok(Entry {
            certified: Arc::new(certified),
            validity,
            acme: false,
            loaded: true,
        })
    }

    fn issue_and_store(&self, host: &Host, key: &str) -> Result<Arc<Entry>, CaError> {
        let leaf = self.ca.issue(host)?;
        let (crt, key_file) = Certs::paths(key);
        let write = |rel: &str, bytes: &[u8], mode| {
            self.storage
                .write(rel, bytes, mode)
                .map_err(|source| CaError::Io {
                    path: self.storage.path(rel),
                    source,
                })
        };
        write(&key_file, leaf.key_pem.as_bytes(), KEY_MODE)?;
        write(&crt, leaf.chain_pem.as_bytes(), CERT_MODE)?;
        let entry = self
            .entry(leaf.chain_pem.as_bytes(), leaf.key_pem.as_bytes(), false)
            .map_err(|reason| CaError::Corrupt {
                path: self.storage.path(&crt),
                reason,
            })?;
        tracing::debug!(name = %key, not_after = entry.validity.not_after, "certificate issued");
        Ok(Arc::new(entry))
    }

    /// Renews certificates when due until `stop`; failures retry with growing delays.
    pub(crate) async fn renew_loop(self: Arc<Self>, stop: CancellationToken) {
        let mut backoff = Duration::from_secs(30);
        let mut failed = false;
        loop {
            let wait = if failed {
                backoff
            } else {
                let secs = (self.next_renewal() - now()).clamp(1, 3600);
                Duration::from_secs(secs as u64)
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.changed.notified() => continue,
                _ = tokio::time::sleep(wait) => {}
            }
            let certs = self.clone();
            match tokio::task::spawn_blocking(move || certs.renew_due()).await {
                Ok(Ok(_)) => {
                    failed = false;
                    backoff = Duration::from_secs(30);
                }
                Ok(Err(err)) => {
                    tracing::warn!(error = %labcore::exit::chain(&err), retry_in = ?backoff,
                        "certificate renewal failed; the current certificates keep serving");
                    failed = true;
                    backoff = (backoff * 2).min(Duration::from_secs(3600));
                }
                Err(err) => {
                    tracing::error!(error = %err, "certificate renewal task failed");
                    failed = true;
                }
            }
        }
    }
}

/// rustls's view of [`Certs`]: certificates by SNI, none for unknown names.
#[derive(Debug)]
pub(crate) struct Resolver(pub Arc<Certs>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.lookup(hello.server_name()?)
    }
}

/// Always the same certificate (a client without SNI reaching an IP address site, or an
/// ACME TLS-ALPN-01 challenge).
#[derive(Debug)]
pub(crate) struct Fixed(pub Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certs(dir: &std::path::Path) -> Certs {
        let storage = Storage::open(dir).unwrap();
        let ca = Arc::new(Ca::open(&storage).unwrap());
        Certs::new(ca, storage).unwrap()
    }

    #[test]
    fn names_wildcards_and_ips_are_served_and_others_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let certs = certs(dir.path());
        let hosts = [
            Host::parse("app.local").unwrap(),
            Host::parse("*.lab.internal").unwrap(),
            Host::parse("127.0.0.1").unwrap(),
        ];
        certs.ensure(&hosts, &[], &[]).unwrap();
        assert!(certs.serves("app.local"));
        assert!(certs.serves("git.lab.internal"));
        assert!(!certs.serves("a.b.lab.internal"));
        assert!(!certs.serves("other.local"));
        assert!(certs.for_ip("127.0.0.1".parse().unwrap()).is_some());
        assert!(certs.for_ip("::ffff:127.0.0.1".parse().unwrap()).is_some());
    }

    #[test]
    fn a_restart_reuses_stored_leaves_and_replaces_corrupt_ones() {
        let dir = tempfile::tempdir().unwrap();
        let host = [Host::parse("app.local").unwrap()];
        let first = certs(dir.path());
        first.ensure(&host, &[], &[]).unwrap();
        let served = first.lookup("app.local").unwrap().cert[0].clone();

        let second = certs(dir.path());
        second.ensure(&host, &[], &[]).unwrap();
        assert_eq!(second.lookup("app.local").unwrap().cert[0], served);

        std::fs::write(
            dir.path()
                .join("certificates/local/app.local/app.local.key"),
            "junk",
        )
        .unwrap();
        let third = certs(dir.path());
        third.ensure(&host, &[], &[]).unwrap();
        assert_ne!(third.lookup("app.local").unwrap().cert[0], served);
    }

    #[test]
    fn dropping_a_name_on_reload_stops_serving_it() {
        let dir = tempfile::tempdir().unwrap();
        let certs = certs(dir.path());
        certs
            .ensure(
                &[
                    Host::parse("a.local").unwrap(),
                    Host::parse("b.local").unwrap(),
                ],
                &[],
                &[],
            )
            .unwrap();
        certs
            .ensure(&[Host::parse("a.local").unwrap()], &[], &[])
            .unwrap();
        assert!(certs.serves("a.local") && !certs.serves("b.local"));
    }
}
