//! A site's TLS handshake options (a Caddyfile's `tls { protocols ciphers curves alpn }`) in
//! Caddy 2.6's names, mapped onto rustls with the aws-lc-rs provider.
//!
//! Invariants: a name rustls cannot do (TLS 1.0/1.1, CBC or RSA key exchange suites,
//! secp521r1) is refused when the config is resolved, never dropped silently; as in Go, which
//! Caddy runs on, a cipher list governs TLS 1.2 only (TLS 1.3 suites stay all enabled and
//! their names in the list change nothing), and the default stays TLS 1.2 to 1.3 with every
//! suite and group of the provider. Configuration data only: `server` builds the rustls
//! configs from it.

use rustls::SupportedCipherSuite;
use rustls::SupportedProtocolVersion;
use rustls::crypto::SupportedKxGroup;
use rustls::crypto::aws_lc_rs::{cipher_suite as cs, kx_group};

/// A site's handshake options, resolved to rustls values.
#[derive(Clone, Debug, Default)]
pub(crate) struct TlsOptions {
    /// Protocol versions offered (empty: TLS 1.2 and 1.3).
    pub(crate) versions: Vec<&'static SupportedProtocolVersion>,
    /// TLS 1.2 suites in the order given (empty: the provider's defaults).
    pub(crate) tls12_suites: Vec<SupportedCipherSuite>,
    /// Key exchange groups in the order given (empty: the provider's defaults).
    pub(crate) groups: Vec<&'static dyn SupportedKxGroup>,
    /// ALPN protocols offered (empty: h2 and http/1.1).
    pub(crate) alpn: Vec<Vec<u8>>,
}

/// Caddy's protocol name as a rustls version.
fn protocol(name: &str) -> Result<&'static SupportedProtocolVersion, String> {
    match name {
        "tls1.2" => Ok(&rustls::version::TLS12),
        "tls1.3" => Ok(&rustls::version::TLS13),
        "tls1.0" | "tls1.1" => Err(format!(
            "{name:?}: the edge speaks TLS 1.2 and 1.3 only (rustls has no older versions)"
        )),
        other => Err(format!("{other:?} is not a protocol (tls1.2 or tls1.3)")),
    }
}

/// A cipher suite by Go's name: `Some(suite)` for a TLS 1.2 suite, `None` for a TLS 1.3 one
/// (which Go, and so Caddy, does not let a list change).
fn cipher(name: &str) -> Result<Option<SupportedCipherSuite>, String> {
    Ok(Some(match name {
        "TLS_AES_128_GCM_SHA256" | "TLS_AES_256_GCM_SHA384" | "TLS_CHACHA20_POLY1305_SHA256" => {
            return Ok(None);
        }
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384" => cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256" => cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256" => {
            cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
        }
        "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384" => cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256" => cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256" => {
            cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256
        }
        other if other.contains("_CBC_") || other.starts_with("TLS_RSA_WITH_") => {
            return Err(format!(
                "{other:?}: rustls does not implement CBC or RSA key exchange suites (use the \
                 ECDHE GCM or CHACHA20 ones)"
            ));
        }
        other => return Err(format!("{other:?} is not a cipher suite Caddy knows")),
    }))
}

/// A curve by Caddy's name.
fn curve(name: &str) -> Result<&'static dyn SupportedKxGroup, String> {
    match name {
        "x25519" => Ok(kx_group::X25519),
        "secp256r1" => Ok(kx_group::SECP256R1),
        "secp384r1" => Ok(kx_group::SECP384R1),
        "secp521r1" => Err(format!(
            "{name:?}: rustls does not implement it (x25519, secp256r1, secp384r1)"
        )),
        other => Err(format!(
            "{other:?} is not a curve (x25519, secp256r1, secp384r1)"
        )),
    }
}

/// Resolves the TOML lists; the error names the key (`protocols`, `ciphers`, `curves`,
/// `alpn`) and the value.
pub(crate) fn resolve(
    protocols: &[String],
    ciphers: &[String],
    curves: &[String],
    alpn: &[String],
) -> Result<Option<TlsOptions>, (&'static str, String)> {
    if protocols.is_empty() && ciphers.is_empty() && curves.is_empty() && alpn.is_empty() {
        return Ok(None);
    }
    let mut options = TlsOptions::default();
    match protocols {
        [] => {}
        [min] | [min, _] => {
            let min = protocol(min).map_err(|m| ("protocols", m))?;
            let max = match protocols.get(1) {
                Some(max) => protocol(max).map_err(|m| ("protocols", m))?,
                None => &rustls::version::TLS13,
            };
            let rank = |v: &SupportedProtocolVersion| v.version == rustls::ProtocolVersion::TLSv1_3;
            if rank(min) && !rank(max) {
                return Err((
                    "protocols",
                    "the minimum (tls1.3) is above the maximum (tls1.2)".into(),
                ));
            }
            options.versions = if std::ptr::eq(min, max) {
                vec![min]
            } else {
                vec![&rustls::version::TLS13, &rustls::version::TLS12]
            };
        }
        _ => {
            return Err((
                "protocols",
                "takes a minimum and an optional maximum".into(),
            ));
        }
    }
    let mut tls13_named = false;
    for name in ciphers {
        match cipher(name).map_err(|m| ("ciphers", m))? {
            Some(suite) => {
                if !options.tls12_suites.contains(&suite) {
                    options.tls12_suites.push(suite);
                }
            }
            None => tls13_named = true,
        }
    }
    if !ciphers.is_empty() && options.tls12_suites.is_empty() && tls13_named {
        // Go with only TLS 1.3 names in the list offers no TLS 1.2 suite: TLS 1.2 handshakes
        // fail. The edge does the same by offering TLS 1.3 alone.
        options.versions = vec![&rustls::version::TLS13];
    }
    for name in curves {
        let group = curve(name).map_err(|m| ("curves", m))?;
        if !options.groups.iter().any(|g| g.name() == group.name()) {
            options.groups.push(group);
        }
    }
    for name in alpn {
        if name.is_empty() || name.len() > 255 {
            return Err(("alpn", format!("{name:?} is not an ALPN protocol name")));
        }
        options.alpn.push(name.as_bytes().to_vec());
    }
    Ok(Some(options))
}

impl TlsOptions {
    /// The provider with these suites and groups (the defaults where none are given).
    pub(crate) fn provider(&self) -> rustls::crypto::CryptoProvider {
        let mut provider = rustls::crypto::aws_lc_rs::default_provider();
        if !self.tls12_suites.is_empty() {
            let mut suites: Vec<SupportedCipherSuite> = provider
                .cipher_suites
                .iter()
                .copied()
                .filter(|s| s.version() == &rustls::version::TLS13)
                .collect();
            suites.extend(self.tls12_suites.iter().copied());
            provider.cipher_suites = suites;
        }
        if !self.groups.is_empty() {
            provider.kx_groups = self.groups.clone();
        }
        provider
    }

    /// The protocol versions to offer.
    pub(crate) fn versions(&self) -> Vec<&'static SupportedProtocolVersion> {
        if self.versions.is_empty() {
            vec![&rustls::version::TLS13, &rustls::version::TLS12]
        } else {
            self.versions.clone()
        }
    }

    /// The ALPN protocols to offer.
    pub(crate) fn alpn(&self) -> Vec<Vec<u8>> {
        if self.alpn.is_empty() {
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        } else {
            self.alpn.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| (*w).to_owned()).collect()
    }

    #[test]
    fn caddys_names_map_to_rustls_and_unsupported_ones_are_refused() {
        let options = resolve(
            &strings(&["tls1.3"]),
            &strings(&[
                "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
                "TLS_AES_128_GCM_SHA256",
            ]),
            &strings(&["x25519", "secp256r1"]),
            &strings(&["http/1.1"]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(options.versions(), vec![&rustls::version::TLS13]);
        assert_eq!(options.tls12_suites.len(), 1);
        assert_eq!(options.groups.len(), 2);
        let provider = options.provider();
        // Every TLS 1.3 suite stays, one TLS 1.2 suite.
        assert_eq!(provider.cipher_suites.len(), 4);
        assert_eq!(options.alpn(), vec![b"http/1.1".to_vec()]);

        for (protocols, ciphers, curves, key) in [
            (vec!["tls1.1"], vec![], vec![], "protocols"),
            (vec!["tls1.3", "tls1.2"], vec![], vec![], "protocols"),
            (
                vec![],
                vec!["TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA"],
                vec![],
                "ciphers",
            ),
            (
                vec![],
                vec!["TLS_RSA_WITH_AES_128_GCM_SHA256"],
                vec![],
                "ciphers",
            ),
            (vec![], vec!["NOT_A_SUITE"], vec![], "ciphers"),
            (vec![], vec![], vec!["secp521r1"], "curves"),
        ] {
            let err = resolve(
                &strings(&protocols),
                &strings(&ciphers),
                &strings(&curves),
                &[],
            )
            .unwrap_err();
            assert_eq!(
                err.0, key,
                "{protocols:?} {ciphers:?} {curves:?}: {}",
                err.1
            );
        }
        assert!(resolve(&[], &[], &[], &[]).unwrap().is_none());
    }

    #[test]
    fn a_protocol_range_offers_both_versions_and_a_single_one_offers_it_alone() {
        let both = resolve(&strings(&["tls1.2", "tls1.3"]), &[], &[], &[])
            .unwrap()
            .unwrap();
        assert_eq!(both.versions().len(), 2);
        let only12 = resolve(&strings(&["tls1.2", "tls1.2"]), &[], &[], &[])
            .unwrap()
            .unwrap();
        assert_eq!(only12.versions(), vec![&rustls::version::TLS12]);
    }
}
