//! The internal certificate authority: a long-lived root and a short-lived intermediate,
//! both kept in the storage folder, and short-lived leaf certificates signed on demand.
//!
//! Like Caddy's `tls internal`: the root (10 years) is what clients trust (`edge ca root`,
//! `edge ca trust`); the intermediate (7 days) signs leaves (12 hours) and is replaced when a
//! third of its life is left, so a stolen intermediate key is soon worthless. Creation happens
//! under the storage lock so edges sharing a folder agree on one root. A corrupt or
//! half-present root is an error naming the file, never silently replaced: clients trust it.

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use time::OffsetDateTime;

use crate::site::Host;
use crate::storage::{CERT_MODE, KEY_MODE, Storage};

/// Root certificate lifetime.
pub(crate) const ROOT_LIFETIME: Duration = Duration::from_secs(3650 * 24 * 3600);
/// Intermediate certificate lifetime.
pub(crate) const INTERMEDIATE_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
/// Leaf certificate lifetime.
pub(crate) const LEAF_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Validity starts this much before issuance, for clients whose clocks run behind.
const BACKDATE: Duration = Duration::from_secs(5 * 60);

const ROOT_CERT: &str = "pki/authorities/local/root.crt";
const ROOT_KEY: &str = "pki/authorities/local/root.key";
const INTERMEDIATE_CERT: &str = "pki/authorities/local/intermediate.crt";
const INTERMEDIATE_KEY: &str = "pki/authorities/local/intermediate.key";

/// Why the CA could not do its work.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// Reading or writing the storage failed.
    #[error("storage {}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// A stored file cannot be used.
    #[error("{} is corrupt: {reason}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Signing failed (a bug or an unusable key).
    #[error("signing a certificate")]
    Sign(#[from] rcgen::Error),
}

/// When a certificate is valid, in Unix seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Validity {
    /// Start.
    pub(crate) not_before: i64,
    /// End.
    pub(crate) not_after: i64,
}

impl Validity {
    /// When to replace it: a third of its lifetime before the end.
    pub(crate) fn renew_at(&self) -> i64 {
        self.not_after - (self.not_after - self.not_before) / 3
    }

    /// Reads the validity of a DER certificate.
    pub(crate) fn of(der: &[u8]) -> Result<Validity, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
        let v = cert.validity();
        Ok(Validity {
            not_before: v.not_before.timestamp(),
            not_after: v.not_after.timestamp(),
        })
    }
}

/// Seconds since the Unix epoch, now.
pub(crate) fn now() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

struct Intermediate {
    der: CertificateDer<'static>,
    pem: String,
    key: KeyPair,
    validity: Validity,
}

/// A leaf certificate: the chain (leaf, intermediate) and key, as PEM.
#[derive(Clone)]
pub(crate) struct Leaf {
    /// Leaf then intermediate.
    pub(crate) chain_pem: String,
    /// PKCS#8 private key.
    pub(crate) key_pem: String,
}

/// The internal CA.
pub(crate) struct Ca {
    storage: Storage,
    root_pem: String,
    root_der: CertificateDer<'static>,
    root_key: KeyPair,
    intermediate: Mutex<Arc<Intermediate>>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("storage", &self.storage.root())
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Loads the CA from storage, creating the root and intermediate on first start and
    /// replacing an intermediate that is due.
    pub(crate) fn open(storage: &Storage) -> Result<Ca, CaError> {
        let _lock = storage.lock("ca").map_err(|source| CaError::Io {
            path: storage.path("locks/ca.lock"),
            source,
        })?;
        let (root_pem, root_der, root_key) = load_or_create_root(storage)?;
        let ca = Ca {
            storage: storage.clone(),
            root_pem,
            root_der,
            intermediate: Mutex::new(Arc::new(placeholder_intermediate()?)),
            root_key,
        };
        let intermediate = match ca.load_intermediate() {
            Ok(Some(i)) if now() < i.validity.renew_at() => i,
            Ok(_) => ca.create_intermediate()?,
            Err(reason) => {
                tracing::warn!(path = %storage.path(INTERMEDIATE_CERT).display(), %reason,
                    "intermediate certificate unusable; making a new one");
                ca.create_intermediate()?
            }
        };
        *ca.intermediate.lock().expect("CA lock poisoned") = Arc::new(intermediate);
        Ok(ca)
    }

    /// The root certificate as PEM (what clients trust).
    pub(crate) fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// The root certificate as DER.
    pub(crate) fn root_der(&self) -> &CertificateDer<'static> {
        &self.root_der
    }

    /// When the intermediate should be replaced.
    pub(crate) fn intermediate_renew_at(&self) -> i64 {
        self.current().validity.renew_at()
    }

    /// Replaces the intermediate if a third of its life is left; returns whether it did.
    pub(crate) fn renew_intermediate_if_due(&self) -> Result<bool, CaError> {
        if now() < self.intermediate_renew_at() {
            return Ok(false);
        }
        let _lock = self.storage.lock("ca").map_err(|source| CaError::Io {
            path: self.storage.path("locks/ca.lock"),
            source,
        })?;
        // Another edge sharing the storage may have done it already.
        let fresh = match self.load_intermediate() {
            Ok(Some(i)) if now() < i.validity.renew_at() => i,
            _ => self.create_intermediate()?,
        };
        *self.intermediate.lock().expect("CA lock poisoned") = Arc::new(fresh);
        Ok(true)
    }

    fn current(&self) -> Arc<Intermediate> {
        self.intermediate.lock().expect("CA lock poisoned").clone()
    }

    fn load_intermediate(&self) -> Result<Option<Intermediate>, String> {
        let read = |rel| self.storage.read(rel).map_err(|e| e.to_string());
        let (Some(cert), Some(key)) = (read(INTERMEDIATE_CERT)?, read(INTERMEDIATE_KEY)?) else {
            return Ok(None);
        };
        let pem = String::from_utf8(cert).map_err(|_| "not PEM".to_owned())?;
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| e.to_string())?;
        let key = KeyPair::from_pem(&String::from_utf8_lossy(&key)).map_err(|e| e.to_string())?;
        check_key_matches(&der, &key)?;
        let validity = Validity::of(&der)?;
        Ok(Some(Intermediate {
            der,
            pem,
            key,
            validity,
        }))
    }

    fn create_intermediate(&self) -> Result<Intermediate, CaError> {
        let key = KeyPair::generate()?;
        let mut params = ca_params("labkit edge Local Authority - ECC Intermediate", 0)?;
        let start = OffsetDateTime::now_utc() - BACKDATE;
        params.not_before = start;
        params.not_after = start + INTERMEDIATE_LIFETIME;
        let issuer = Issuer::from_ca_cert_der(&self.root_der, &self.root_key)?;
        let cert = params.signed_by(&key, &issuer)?;
        let der = cert.der().clone();
        let pem = cert.pem();
        self.write(INTERMEDIATE_KEY, key.serialize_pem().as_bytes(), KEY_MODE)?;
        self.write(INTERMEDIATE_CERT, pem.as_bytes(), CERT_MODE)?;
        let validity = Validity::of(&der).map_err(|reason| CaError::Corrupt {
            path: self.storage.path(INTERMEDIATE_CERT),
            reason,
        })?;
        tracing::info!(
            not_after = validity.not_after,
            "made a new intermediate certificate"
        );
        Ok(Intermediate {
            der,
            pem,
            key,
            validity,
        })
    }

    fn write(&self, rel: &str, bytes: &[u8], mode: u32) -> Result<(), CaError> {
        self.storage
            .write(rel, bytes, mode)
            .map_err(|source| CaError::Io {
                path: self.storage.path(rel),
                source,
            })
    }

    /// Signs a fresh leaf certificate for `host` with a new P-256 key.
    pub(crate) fn issue(&self, host: &Host) -> Result<Leaf, CaError> {
        let intermediate = self.current();
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        let san = match host {
            Host::Name(name) => SanType::DnsName(name.clone().try_into()?),
            Host::Wildcard(suffix) => SanType::DnsName(format!("*{suffix}").try_into()?),
            Host::Ip(ip) => SanType::IpAddress(*ip),
            Host::Any => {
                return Err(CaError::Sign(rcgen::Error::InvalidAsn1String(
                    rcgen::InvalidAsn1String::PrintableString("no host".into()),
                )));
            }
        };
        params.subject_alt_names = vec![san];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        let start = OffsetDateTime::now_utc() - BACKDATE;
        params.not_before = start;
        params.not_after = start + LEAF_LIFETIME;
        let issuer = Issuer::from_ca_cert_der(&intermediate.der, &intermediate.key)?;
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Leaf {
            chain_pem: format!("{}{}", cert.pem(), intermediate.pem),
            key_pem: key.serialize_pem(),
        })
    }
}

fn placeholder_intermediate() -> Result<Intermediate, CaError> {
    // Only lives until `open` loads or creates the real one.
    let key = KeyPair::generate()?;
    let params = ca_params("placeholder", 0)?;
    let cert = params.self_signed(&key)?;
    Ok(Intermediate {
        der: cert.der().clone(),
        pem: cert.pem(),
        key,
        validity: Validity {
            not_before: 0,
            not_after: 0,
        },
    })
}

fn ca_params(common_name: &str, path_len: u8) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "labkit edge");
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(random_serial());
    Ok(params)
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    // Fails only if the OS has no randomness at all; a zero serial still works for a private CA.
    let _ = aws_lc_rs::rand::fill(&mut bytes);
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

fn load_or_create_root(
    storage: &Storage,
) -> Result<(String, CertificateDer<'static>, KeyPair), CaError> {
    let read = |rel: &str| {
        storage.read(rel).map_err(|source| CaError::Io {
            path: storage.path(rel),
            source,
        })
    };
    let corrupt = |rel: &str, reason: String| CaError::Corrupt {
        path: storage.path(rel),
        reason,
    };
    match (read(ROOT_CERT)?, read(ROOT_KEY)?) {
        (Some(cert), Some(key)) => {
            let pem = String::from_utf8(cert).map_err(|_| corrupt(ROOT_CERT, "not PEM".into()))?;
            let der = CertificateDer::from_pem_slice(pem.as_bytes())
                .map_err(|e| corrupt(ROOT_CERT, e.to_string()))?;
            let key = KeyPair::from_pem(&String::from_utf8_lossy(&key))
                .map_err(|e| corrupt(ROOT_KEY, e.to_string()))?;
            check_key_matches(&der, &key).map_err(|r| corrupt(ROOT_KEY, r))?;
            let validity = Validity::of(&der).map_err(|r| corrupt(ROOT_CERT, r))?;
            if now() >= validity.not_after {
                return Err(corrupt(
                    ROOT_CERT,
                    "the root certificate has expired: move the pki folder away to make a new one"
                        .into(),
                ));
            }
            Ok((pem, der, key))
        }
        (None, None) => {
            let key = KeyPair::generate()?;
            let year = OffsetDateTime::now_utc().year();
            let mut params =
                ca_params(&format!("labkit edge Local Authority - {year} ECC Root"), 1)?;
            let start = OffsetDateTime::now_utc() - BACKDATE;
            params.not_before = start;
            params.not_after = start + ROOT_LIFETIME;
            let cert = params.self_signed(&key)?;
            let pem = cert.pem();
            let write = |rel: &str, bytes: &[u8], mode| {
                storage
                    .write(rel, bytes, mode)
                    .map_err(|source| CaError::Io {
                        path: storage.path(rel),
                        source,
                    })
            };
            write(ROOT_KEY, key.serialize_pem().as_bytes(), KEY_MODE)?;
            write(ROOT_CERT, pem.as_bytes(), CERT_MODE)?;
            tracing::info!(path = %storage.path(ROOT_CERT).display(), "made a new root certificate");
            Ok((pem, cert.der().clone(), key))
        }
        (Some(_), None) => Err(corrupt(
            ROOT_KEY,
            "missing while the root certificate exists".into(),
        )),
        (None, Some(_)) => Err(corrupt(
            ROOT_CERT,
            "missing while the root key exists".into(),
        )),
    }
}

/// Checks that `key` is the key of certificate `der`.
fn check_key_matches(der: &[u8], key: &KeyPair) -> Result<(), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    if cert.public_key().subject_public_key.data.as_ref() == key.public_key_raw() {
        Ok(())
    } else {
        Err("the key does not belong to the certificate".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_open_makes_a_root_and_later_opens_keep_it() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path()).unwrap();
        let first = Ca::open(&storage).unwrap();
        let second = Ca::open(&storage).unwrap();
        assert_eq!(first.root_pem(), second.root_pem());
        let mode = std::fs::metadata(storage.path(ROOT_KEY)).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o600
        );
    }

    #[test]
    fn leaves_chain_to_the_root_and_live_twelve_hours() {
        use rustls::client::danger::ServerCertVerifier;
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::open(&Storage::open(dir.path()).unwrap()).unwrap();
        let leaf = ca.issue(&Host::Name("app.local".into())).unwrap();
        let chain: Vec<_> = CertificateDer::pem_slice_iter(leaf.chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
        let validity = Validity::of(&chain[0]).unwrap();
        let lifetime = validity.not_after - validity.not_before;
        assert_eq!(lifetime, LEAF_LIFETIME.as_secs() as i64);
        assert_eq!(chain.len(), 2);
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.root_der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap();
        let name = rustls::pki_types::ServerName::try_from("app.local").unwrap();
        verifier
            .verify_server_cert(
                &chain[0],
                &chain[1..],
                &name,
                &[],
                rustls::pki_types::UnixTime::now(),
            )
            .unwrap();
    }

    #[test]
    fn a_half_present_root_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path()).unwrap();
        Ca::open(&storage).unwrap();
        std::fs::remove_file(storage.path(ROOT_KEY)).unwrap();
        let err = Ca::open(&storage).unwrap_err().to_string();
        assert!(err.contains("root.key is corrupt"), "{err}");
    }

    #[test]
    fn a_corrupt_intermediate_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path()).unwrap();
        Ca::open(&storage).unwrap();
        std::fs::write(storage.path(INTERMEDIATE_CERT), "garbage").unwrap();
        let ca = Ca::open(&storage).unwrap();
        assert!(ca.issue(&Host::Name("x.local".into())).is_ok());
    }
}
