//! Which ACME CA a name is ordered from, and how: the global `acme_eab` and `key_type`, and a
//! site's `tls { ca; ca_root; eab; key_type }` (Caddy's per-site ACME issuer, as ZeroSSL
//! users and old clients needing RSA write it). Holds their TOML types, their resolution at
//! load, and the certificate keys of each key type.
//!
//! Invariants: a site's issuer is the global one with the site's values over it, as Caddy
//! fills a site's issuer in from the global options; every value is checked at load, so a
//! bad URL, key type or MAC key is refused by `edge check` naming its key. The EAB MAC key
//! is a secret: it lives in a [`Secret`], prints as `[redacted]` in Debug, `edge adapt` and
//! the admin `/config/`, and no error or log line carries it.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use base64::Engine;
use labcore::config::{ConfigError, ConfigFile};
use labcore::env::Env;
use labcore::secret::Secret;
use serde::{Deserialize, Serialize};

use crate::dns01::SecretText;

/// The key of a certificate ordered by ACME (Caddy's `key_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyType {
    /// ECDSA P-256, Caddy's default.
    P256,
    /// ECDSA P-384.
    P384,
    /// Ed25519 (few clients take it; Caddy offers it).
    Ed25519,
    /// RSA 2048, for old clients.
    Rsa2048,
    /// RSA 4096.
    Rsa4096,
}

/// `acme_eab` and a site's `tls_eab`: the external account a CA binds new ACME accounts to
/// (ZeroSSL, Google, a private CA that requires it).
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EabToml {
    /// The key identifier the CA gave.
    pub(crate) key_id: String,
    /// The HMAC key the CA gave, base64url (padding optional), or `{env.NAME}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) mac_key: Option<SecretText>,
    /// A file holding `mac_key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) mac_key_file: Option<PathBuf>,
}

/// External account binding, resolved: the MAC key checked to decode.
#[derive(Clone, PartialEq)]
pub(crate) struct Eab {
    /// The key identifier (not a secret: the CA shows it in its dashboards).
    pub(crate) key_id: String,
    /// The base64url MAC key as given.
    mac_key: Secret,
}

impl fmt::Debug for Eab {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Eab")
            .field("key_id", &self.key_id)
            .field("mac_key", &"[redacted]")
            .finish()
    }
}

impl Eab {
    /// The key instant-acme signs the account request with.
    pub(crate) fn key(&self) -> instant_acme::ExternalAccountKey {
        // Checked at load; an empty key cannot happen, so a decode failure here gives the
        // CA an empty MAC it refuses, never a panic.
        let raw = decode_mac(self.mac_key.expose()).unwrap_or_default();
        instant_acme::ExternalAccountKey::new(self.key_id.clone(), &raw)
    }
}

/// Caddy (through acmez) reads the MAC key as unpadded base64url; padded text is accepted
/// too, as CAs' dashboards show either.
fn decode_mac(text: &str) -> Option<Vec<u8>> {
    let trimmed = text.trim().trim_end_matches('=');
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(trimmed)
        .ok()
        .filter(|raw| !raw.is_empty())
}

/// Resolves an `acme_eab` or `tls_eab` table found at `key`.
pub(crate) fn resolve_eab(
    raw: &EabToml,
    key: &str,
    file: &ConfigFile,
    env: &Env,
) -> Result<Arc<Eab>, ConfigError> {
    if raw.key_id.is_empty() {
        return Err(file.invalid(format!("{key}.key_id"), "is empty"));
    }
    let mac_key_at = format!("{key}.mac_key");
    let inline = raw
        .mac_key
        .as_ref()
        .map(|s| s.resolve(env, &mac_key_at, file))
        .transpose()?;
    let mac_key = file
        .secret(env, &mac_key_at, inline, raw.mac_key_file.as_deref())?
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            file.invalid(
                &mac_key_at,
                "is missing: give mac_key, mac_key_file or a systemd credential",
            )
        })?;
    if decode_mac(mac_key.expose()).is_none() {
        // The value itself stays out of the message.
        return Err(file.invalid(&mac_key_at, "is not base64url (as the CA gives it)"));
    }
    Ok(Arc::new(Eab {
        key_id: raw.key_id.clone(),
        mac_key,
    }))
}

/// Caddy's `key_type` names; `key` names the setting in the error.
pub(crate) fn key_type(text: &str, key: &str, file: &ConfigFile) -> Result<KeyType, ConfigError> {
    match text {
        "p256" => Ok(KeyType::P256),
        "p384" => Ok(KeyType::P384),
        "ed25519" => Ok(KeyType::Ed25519),
        "rsa2048" => Ok(KeyType::Rsa2048),
        "rsa4096" => Ok(KeyType::Rsa4096),
        other => Err(file.invalid(
            key,
            format!(
                "{other:?} is not supported (\"p256\", \"p384\", \"ed25519\", \"rsa2048\" or \"rsa4096\")"
            ),
        )),
    }
}

/// A fresh certificate key of `kind`.
pub(crate) fn generate(kind: KeyType) -> Result<rcgen::KeyPair, rcgen::Error> {
    match kind {
        KeyType::P256 => rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
        KeyType::P384 => rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384),
        KeyType::Ed25519 => rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519),
        KeyType::Rsa2048 => {
            rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
        }
        KeyType::Rsa4096 => {
            rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_4096)
        }
    }
}

/// Checks an ACME directory URL (`key` names it in the error).
pub(crate) fn directory(url: &str, key: &str, file: &ConfigFile) -> Result<String, ConfigError> {
    if url.starts_with("https://") && url.len() > "https://".len() {
        Ok(url.to_owned())
    } else {
        Err(file.invalid(
            key,
            format!("{url:?} is not an https:// ACME directory URL"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file() -> ConfigFile {
        ConfigFile::new(std::path::Path::new("/etc/edge/edge.toml"))
    }

    #[test]
    fn a_mac_key_decodes_padded_or_not_and_never_shows_in_debug_or_errors() {
        let env = Env::default();
        let raw = EabToml {
            key_id: "kid-1".into(),
            mac_key: Some(SecretText::new("c2VjcmV0LW1hYy1rZXk=".into())),
            mac_key_file: None,
        };
        let eab = resolve_eab(&raw, "acme_eab", &file(), &env).unwrap();
        assert_eq!(decode_mac(eab.mac_key.expose()).unwrap(), b"secret-mac-key");
        let shown = format!("{eab:?} {raw:?} {}", toml::to_string(&raw).unwrap());
        assert!(!shown.contains("c2VjcmV0"), "{shown}");
        assert!(shown.contains("[redacted]"), "{shown}");

        let bad = EabToml {
            mac_key: Some(SecretText::new("not base64 !!".into())),
            ..raw
        };
        let err = resolve_eab(&bad, "acme_eab", &file(), &env).unwrap_err();
        let text = labcore::exit::chain(&err).to_string();
        assert!(text.contains("acme_eab.mac_key"), "{text}");
        assert!(!text.contains("not base64 !!"), "{text}");
    }

    #[test]
    fn every_caddy_key_type_makes_a_key_rustls_can_serve() {
        use rustls::pki_types::pem::PemObject;
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        for name in ["p256", "p384", "ed25519", "rsa2048"] {
            let kind = key_type(name, "key_type", &file()).unwrap();
            let pem = generate(kind).unwrap().serialize_pem();
            let der = rustls::pki_types::PrivateKeyDer::from_pem_slice(pem.as_bytes()).unwrap();
            assert!(
                provider.key_provider.load_private_key(der).is_ok(),
                "{name}"
            );
        }
        assert!(key_type("rsa8192", "key_type", &file()).is_err());
    }
}
