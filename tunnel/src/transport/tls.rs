//! TLS, rathole's `type = "tls"`: TCP, then TLS 1.2 or 1.3 with rustls (aws-lc-rs ciphers).
//!
//! rathole 0.5 uses native-tls (OpenSSL): its server loads a PKCS#12 file (`pkcs12`,
//! `pkcs12_password`), its client trusts a PEM file (`trusted_root`, else the system's roots)
//! and checks the name `hostname` (else `remote_addr`'s host). labkit reads the same keys, and
//! PEM `cert` and `key` on the server. PKCS#12 files are parsed without OpenSSL: both what
//! `openssl pkcs12 -export` writes by default since OpenSSL 3 (PBES2, AES-256-CBC,
//! PBKDF2-HMAC-SHA256) and the legacy kind (RC2/3DES, SHA-1).
//!
//! rustls reads the socket 4 KiB at a time; a TLS record is up to 16 KiB, so the socket sits
//! behind a 64 KiB read buffer and a record costs one system call instead of five. The
//! password and private keys are never logged or put in an error.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::BufReader;
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::{TcpTransport, Transport, TunnelStream};
use crate::config::{TlsIdentity, TlsSettings, TransportSettings};
use crate::error::Error;

/// The read buffer under rustls (see the module docs).
const READ_BUFFER: usize = 64 * 1024;

/// A TLS connection over TCP, either side.
pub(crate) type TlsStream = tokio_rustls::TlsStream<BufReader<TcpStream>>;

/// Why the TLS settings cannot be used, naming the config key at fault.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsError {
    /// A file could not be read.
    #[error("reading {}", path.display())]
    Read {
        /// The config key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// A file holds nothing usable.
    #[error("{}: {message}", path.display())]
    Content {
        /// The config key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// rustls refused the certificate and key.
    #[error("the certificate and key do not make a TLS server: {0}")]
    Rustls(rustls::Error),
    /// `hostname` (or `remote_addr`'s host) is not a DNS name or an IP address.
    #[error("{0:?} is not a DNS name or an IP address")]
    Hostname(String),
}

impl TlsError {
    /// The leaf of the config key at fault (`pkcs12`, `trusted_root`, ...).
    pub(crate) fn culprit(&self) -> &'static str {
        match self {
            TlsError::Read { key, .. } | TlsError::Content { key, .. } => key,
            TlsError::Rustls(_) => "cert",
            TlsError::Hostname(_) => "hostname",
        }
    }
}

/// Loads everything `settings` name, as the transport will, and reports the first problem.
pub(crate) fn check(settings: &TlsSettings) -> Result<(), TlsError> {
    match settings {
        TlsSettings::Server(identity) => server_config(identity).map(drop),
        TlsSettings::Client {
            trusted_root,
            hostname,
        } => {
            if let Some(name) = hostname {
                server_name(name)?;
            }
            client_config(trusted_root.as_deref()).map(drop)
        }
    }
}

/// The rustls server config presenting `identity`.
pub(crate) fn server_config(identity: &TlsIdentity) -> Result<Arc<ServerConfig>, TlsError> {
    let (certs, key) = match identity {
        TlsIdentity::Pem { cert, key } => (read_certs(cert, "cert")?, read_key(key)?),
        TlsIdentity::Pkcs12 { path, password } => read_pkcs12(path, password.expose())?,
    };
    let config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(TlsError::Rustls)?;
    Ok(Arc::new(config))
}

/// The rustls client config trusting the certificates in `trusted_root`, or the system's.
pub(crate) fn client_config(trusted_root: Option<&Path>) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    match trusted_root {
        Some(path) => {
            let certs = read_certs(path, "trusted_root")?;
            let (_, unusable) = roots.add_parsable_certificates(certs);
            if roots.is_empty() {
                return Err(TlsError::Content {
                    key: "trusted_root",
                    path: path.to_owned(),
                    message: format!("none of its {unusable} certificates can be a trust anchor"),
                });
            }
        }
        None => {
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        }
    }
    let config = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

fn server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(name.to_owned()).map_err(|_| TlsError::Hostname(name.to_owned()))
}

fn read_certs(path: &Path, key: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        key,
        path: path.to_owned(),
        source,
    })?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|err| TlsError::Content {
            key,
            path: path.to_owned(),
            message: format!("not PEM certificates ({err})"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Content {
            key,
            path: path.to_owned(),
            message: "no PEM certificate (-----BEGIN CERTIFICATE-----) in it".into(),
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        key: "key",
        path: path.to_owned(),
        source,
    })?;
    // The error says only which kind of problem: never any of the key's bytes.
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|err| TlsError::Content {
        key: "key",
        path: path.to_owned(),
        message: match err {
            rustls::pki_types::pem::Error::NoItemsFound => {
                "no PEM private key (PKCS#8, PKCS#1 or SEC1) in it".into()
            }
            _ => "not a readable PEM private key".into(),
        },
    })
}

type Identity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

fn read_pkcs12(path: &Path, password: &str) -> Result<Identity, TlsError> {
    let content = |message: String| TlsError::Content {
        key: "pkcs12",
        path: path.to_owned(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        key: "pkcs12",
        path: path.to_owned(),
        source,
    })?;
    let store = p12_keystore::KeyStore::from_pkcs12(
        &bytes,
        password,
        p12_keystore::Pkcs12ImportPolicy::Relaxed,
    )
    .map_err(|err| match err {
        p12_keystore::error::Error::MacError(_) => TlsError::Content {
            key: "pkcs12_password",
            path: path.to_owned(),
            message: "wrong password (the file's integrity check fails)".into(),
        },
        other => content(format!("not a PKCS#12 file this tunnel can read ({other})")),
    })?;
    let (_, chain) = store
        .private_key_chain()
        .ok_or_else(|| content("holds no private key with its certificate".into()))?;
    if chain.certs().is_empty() {
        return Err(content("holds a private key but no certificate".into()));
    }
    let certs = chain
        .certs()
        .iter()
        .map(|cert| CertificateDer::from(cert.as_der().to_vec()))
        .collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(chain.key().as_der().to_vec()));
    Ok((certs, key))
}

/// The TLS transport.
pub(crate) struct TlsTransport {
    tcp: TcpTransport,
    side: Side,
}

enum Side {
    Server(TlsAcceptor),
    Client {
        connector: TlsConnector,
        hostname: Option<ServerName<'static>>,
    },
}

impl TlsTransport {
    /// The transport for `settings`, with `tcp` underneath.
    pub(crate) fn with(tcp: TcpTransport, settings: &TlsSettings) -> Result<TlsTransport, Error> {
        let side = match settings {
            TlsSettings::Server(identity) => {
                Side::Server(TlsAcceptor::from(server_config(identity).map_err(config)?))
            }
            TlsSettings::Client {
                trusted_root,
                hostname,
            } => Side::Client {
                connector: TlsConnector::from(
                    client_config(trusted_root.as_deref()).map_err(config)?,
                ),
                hostname: match hostname {
                    Some(name) => Some(server_name(name).map_err(config)?),
                    None => None,
                },
            },
        };
        Ok(TlsTransport { tcp, side })
    }

    /// The server side of the TLS handshake on an accepted connection.
    pub(crate) async fn accept_tls(&self, tcp: TcpStream) -> Result<TlsStream, Error> {
        let Side::Server(acceptor) = &self.side else {
            return Err(Error::Unsupported {
                what: "accepting TLS connections without a certificate".into(),
            });
        };
        let stream = acceptor
            .accept(BufReader::with_capacity(READ_BUFFER, tcp))
            .await
            .map_err(tls_failed)?;
        Ok(stream.into())
    }

    /// Connects to `addr` and runs the client side of the TLS handshake.
    pub(crate) async fn connect_tls(&self, addr: &str) -> Result<TlsStream, Error> {
        let Side::Client {
            connector,
            hostname,
        } = &self.side
        else {
            return Err(Error::Unsupported {
                what: "connecting with the server's TLS settings".into(),
            });
        };
        let name = match hostname {
            Some(name) => name.clone(),
            None => server_name(host_of(addr)).map_err(config)?,
        };
        let tcp = self.tcp.connect(addr).await?;
        let stream = connector
            .connect(name, BufReader::with_capacity(READ_BUFFER, tcp))
            .await
            .map_err(tls_failed)?;
        Ok(stream.into())
    }
}

/// The host part of `HOST:PORT`, without an IPv6 address's brackets.
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

fn config(err: TlsError) -> Error {
    Error::Tls {
        reason: labcore::exit::chain(&err),
    }
}

fn tls_failed(err: io::Error) -> Error {
    // rustls puts its alert or certificate error inside the io::Error.
    let reason = match err.get_ref() {
        Some(inner) => format!("handshake failed: {inner}"),
        None if err.kind() == io::ErrorKind::UnexpectedEof => {
            "handshake failed: the peer closed the connection (it may not trust this side's \
             certificate, or not speak TLS)"
                .into()
        }
        None => format!("handshake failed: {err}"),
    };
    Error::Tls { reason }
}

impl Transport for TlsTransport {
    type Stream = TlsStream;

    fn new(settings: &TransportSettings) -> Result<TlsTransport, Error> {
        let tls = settings.tls.as_ref().ok_or(Error::Unsupported {
            what: "type = \"tls\" without [transport.tls]".into(),
        })?;
        TlsTransport::with(TcpTransport::new(settings)?, tls)
    }

    fn tcp(&self) -> &TcpTransport {
        &self.tcp
    }

    async fn handshake(&self, tcp: TcpStream) -> Result<TlsStream, Error> {
        self.accept_tls(tcp).await
    }

    async fn connect(&self, addr: &str) -> Result<TlsStream, Error> {
        self.connect_tls(addr).await
    }
}

impl TunnelStream for TlsStream {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0.get_ref()
    }

    fn plain_tcp(&self) -> Option<&TcpStream> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use labcore::Secret;

    /// A self-signed certificate and key as PEM files, and PKCS#12 files of them that the
    /// `openssl` command makes with OpenSSL 3's defaults and with `-legacy`.
    fn openssl_files(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
        let export = |name: &str, extra: &[&str]| {
            let status = std::process::Command::new("openssl")
                .current_dir(dir)
                .args(["pkcs12", "-export", "-in", "cert.pem", "-inkey", "key.pem"])
                .args(extra)
                .args(["-passout", "pass:right", "-out", name])
                .status()
                .expect("openssl is installed (scripts/test installs it)");
            assert!(status.success(), "openssl pkcs12 -export {extra:?}");
            dir.join(name)
        };
        (
            dir.join("cert.pem"),
            export("modern.p12", &[]),
            export("legacy.p12", &["-legacy"]),
        )
    }

    #[test]
    fn pkcs12_files_from_openssl_load_modern_and_legacy_and_a_wrong_password_is_named() {
        let dir = std::env::temp_dir().join(format!("tunnel-p12-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, modern, legacy) = openssl_files(&dir);
        let pem_cert = read_certs(&cert, "cert").unwrap();
        for path in [&modern, &legacy] {
            let (certs, _) = read_pkcs12(path, "right").unwrap();
            assert_eq!(certs, pem_cert, "{}", path.display());
            let identity = TlsIdentity::Pkcs12 {
                path: path.clone(),
                password: Secret::new("right".into()),
            };
            server_config(&identity).unwrap();
            let err = read_pkcs12(path, "wrong").unwrap_err();
            assert_eq!(err.culprit(), "pkcs12_password");
            let shown = labcore::exit::chain(&err);
            assert!(shown.contains("wrong password"), "{shown}");
            assert!(!shown.contains("right"), "{shown}");
        }
        let pem = TlsIdentity::Pem {
            cert: cert.clone(),
            key: dir.join("key.pem"),
        };
        server_config(&pem).unwrap();
        let garbage = dir.join("garbage.p12");
        std::fs::write(&garbage, b"not a pkcs12 file").unwrap();
        let err = read_pkcs12(&garbage, "right").unwrap_err();
        assert_eq!(err.culprit(), "pkcs12");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_host_of_an_address_drops_the_port_and_brackets() {
        assert_eq!(host_of("lab.example.org:7000"), "lab.example.org");
        assert_eq!(host_of("127.0.0.1:1"), "127.0.0.1");
        assert_eq!(host_of("[::1]:7000"), "::1");
    }
}
