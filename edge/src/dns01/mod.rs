//! ACME DNS-01 (RFC 8555 §8.4): the TXT record `_acme-challenge.NAME` a DNS provider
//! publishes for the CA, the wait until the zone's servers (or the configured `resolvers`)
//! show it, and its removal.
//!
//! Providers, one module each with its settings and its calls: [`rfc2136`] (dynamic updates
//! signed with TSIG, for BIND, Knot, PowerDNS and routers), [`cloudflare`] and [`desec`]
//! (their HTTP APIs, through [`api`]), and [`exec`] (a program run with the action, the name
//! and the value). [`lookup`] asks DNS servers for TXT values and finds a name's zone.
//!
//! Invariants: a provider removes exactly the record it added (the value, or the id the API
//! gave it), never the other values of the name, so a wildcard and its apex ordered together
//! and another client's records survive; secrets (TSIG keys, API tokens, a script's
//! environment) are [`Secret`]s, printed nowhere; every network call has a time limit.

pub(crate) mod api;
pub(crate) mod cloudflare;
pub(crate) mod desec;
pub(crate) mod exec;
pub(crate) mod lookup;
pub(crate) mod rfc2136;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use labcore::config::{ConfigError, ConfigFile};
use labcore::{Env, Secret};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::site::parse_duration;

/// Caddy's default wait for a TXT record to show on the zone's servers.
const DEFAULT_PROPAGATION_TIMEOUT: Duration = Duration::from_secs(120);

/// TTL of the TXT records added (providers with a larger minimum use theirs).
const TXT_TTL: u32 = 120;

/// A secret as the config file gives it: a value, or `{env.NAME}` read from the environment
/// when the config loads. Only the reference is ever printed back (`edge adapt`, the admin
/// `/config/`); a value prints as `[redacted]`.
#[derive(Clone, Default, PartialEq, Eq)]
pub(crate) struct SecretText(Secret);

impl SecretText {
    /// Wraps a value written in a config.
    pub(crate) fn new(text: String) -> SecretText {
        SecretText(Secret::new(text))
    }

    /// The variable named by a `{env.NAME}` reference.
    fn env_name(&self) -> Option<&str> {
        let name = self.0.expose().strip_prefix("{env.")?.strip_suffix('}')?;
        let valid =
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        valid.then_some(name)
    }

    fn shown(&self) -> &str {
        if self.env_name().is_some() {
            self.0.expose()
        } else {
            "[redacted]"
        }
    }

    /// The secret, the environment's variable read for a reference; `key` names it in errors.
    pub(crate) fn resolve(
        &self,
        env: &Env,
        key: &str,
        file: &ConfigFile,
    ) -> Result<Secret, ConfigError> {
        if self.0.expose() == "[redacted]" {
            return Err(file.invalid(
                key,
                "is \"[redacted]\", what `edge adapt` prints for a secret: give the value, \
                 {env.NAME}, a *_file key or a systemd credential",
            ));
        }
        match self.env_name() {
            None => Ok(self.0.clone()),
            Some(name) => match env.get(name) {
                Some(value) if !value.is_empty() => Ok(Secret::from(value)),
                _ => Err(file.invalid(key, format!("{{env.{name}}}: {name} is not set"))),
            },
        }
    }
}

impl fmt::Debug for SecretText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.shown())
    }
}

impl Serialize for SecretText {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.shown())
    }
}

impl<'de> Deserialize<'de> for SecretText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<SecretText, D::Error> {
        String::deserialize(deserializer).map(SecretText::new)
    }
}

/// `[acme.dns]` and a site's `tls_dns`: the DNS provider and the propagation settings. A
/// site's table without `provider` takes the provider of `[acme.dns]`.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DnsToml {
    /// "rfc2136", "cloudflare", "desec" or "exec".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) provider: Option<String>,
    /// rfc2136: the primary server taking updates, "host:port" (port 53 if left out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) server: Option<String>,
    /// rfc2136: the TSIG key's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) key_name: Option<String>,
    /// rfc2136: "hmac-sha256" (default), "hmac-sha384" or "hmac-sha512".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) key_alg: Option<String>,
    /// rfc2136: the TSIG secret, base64 as BIND's `tsig-keygen` writes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) key: Option<SecretText>,
    /// rfc2136: a file holding `key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) key_file: Option<PathBuf>,
    /// cloudflare, desec: the API token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) token: Option<SecretText>,
    /// cloudflare, desec: a file holding `token`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) token_file: Option<PathBuf>,
    /// cloudflare, desec: the API's base URL instead of the public one (https://, or
    /// http:// to a loopback address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) api_url: Option<String>,
    /// exec: the program and its first arguments; the action ("present" or "cleanup"), the
    /// record's name (with a final dot) and its value follow.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) command: Vec<String>,
    /// exec: the program's environment besides PATH (secrets go here, never in `command`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) env: BTreeMap<String, SecretText>,
    /// Wait this long after adding the record before checking for it. Default "0s".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) propagation_delay: Option<String>,
    /// Give up when the record is not seen after this long; "-1" skips the check. Default "2m".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) propagation_timeout: Option<String>,
    /// DNS servers ("IP" or "IP:PORT") asked whether the record is visible, instead of the
    /// zone's authoritative servers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) resolvers: Vec<String>,
}

impl DnsToml {
    /// Whether nothing is set.
    pub(crate) fn is_empty(&self) -> bool {
        *self == DnsToml::default()
    }
}

/// A DNS provider, resolved.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Provider {
    /// RFC 2136 updates with TSIG.
    Rfc2136(rfc2136::Rfc2136),
    /// Cloudflare's API.
    Cloudflare(cloudflare::Cloudflare),
    /// deSEC's API.
    Desec(desec::Desec),
    /// A program.
    Exec(exec::Exec),
}

/// DNS-01 settings, resolved.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DnsConfig {
    /// Who publishes the records.
    pub(crate) provider: Provider,
    /// Wait before the first check.
    pub(crate) propagation_delay: Duration,
    /// Longest wait for the record to show; `None`: no check.
    pub(crate) propagation_timeout: Option<Duration>,
    /// Servers to check on instead of the zone's own.
    pub(crate) resolvers: Vec<SocketAddr>,
}

/// A record a provider added, as it needs it to remove exactly that record.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Presented {
    /// The record's name, without a final dot.
    pub(crate) fqdn: String,
    /// The TXT value.
    pub(crate) value: String,
    /// What the provider's API calls the record (Cloudflare's id), if anything.
    pub(crate) id: Option<String>,
    /// The zone the record went into, as the provider names it.
    pub(crate) zone: String,
}

/// Why publishing, checking or removing a record failed: the provider, what it talked to,
/// and what went wrong.
#[derive(Debug, thiserror::Error)]
#[error("DNS provider {provider} ({target}): {message}")]
pub(crate) struct DnsError {
    /// "rfc2136", "cloudflare", ...
    pub(crate) provider: &'static str,
    /// The server, API or program.
    pub(crate) target: String,
    /// What went wrong.
    pub(crate) message: String,
}

impl Provider {
    /// The provider's name as configs write it.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Provider::Rfc2136(_) => "rfc2136",
            Provider::Cloudflare(_) => "cloudflare",
            Provider::Desec(_) => "desec",
            Provider::Exec(_) => "exec",
        }
    }

    /// Adds TXT `fqdn` = `value`, beside any values the name has.
    pub(crate) async fn present(&self, fqdn: &str, value: &str) -> Result<Presented, DnsError> {
        match self {
            Provider::Rfc2136(p) => p.present(fqdn, value).await,
            Provider::Cloudflare(p) => p.present(fqdn, value).await,
            Provider::Desec(p) => p.present(fqdn, value).await,
            Provider::Exec(p) => p.run("present", fqdn, value).await.map(|()| Presented {
                fqdn: fqdn.to_owned(),
                value: value.to_owned(),
                id: None,
                zone: String::new(),
            }),
        }
    }

    /// Removes the record `present` added, and only it.
    pub(crate) async fn cleanup(&self, record: &Presented) -> Result<(), DnsError> {
        match self {
            Provider::Rfc2136(p) => p.cleanup(record).await,
            Provider::Cloudflare(p) => p.cleanup(record).await,
            Provider::Desec(p) => p.cleanup(record).await,
            Provider::Exec(p) => p.run("cleanup", &record.fqdn, &record.value).await,
        }
    }
}

/// The TXT record name for an ACME identifier: `_acme-challenge.NAME`, where a wildcard's
/// name is its base (`*.example.org` → `_acme-challenge.example.org`).
pub(crate) fn challenge_name(identifier: &str) -> String {
    let base = identifier.strip_prefix("*.").unwrap_or(identifier);
    format!("_acme-challenge.{}", base.trim_end_matches('.'))
}

impl DnsConfig {
    /// Publishes `value` for `identifier` and waits until it is visible (or the check is
    /// off). On a failed wait the record is already published: the caller removes it.
    pub(crate) async fn present(
        &self,
        identifier: &str,
        value: &str,
    ) -> Result<Presented, DnsError> {
        self.provider
            .present(&challenge_name(identifier), value)
            .await
    }

    /// Waits until `record` is visible: on `resolvers` if given, else on the zone's
    /// authoritative servers (found through the system's resolvers; the RFC 2136 server
    /// when they know no such zone, as on a LAN-only zone).
    pub(crate) async fn wait_visible(&self, record: &Presented) -> Result<(), DnsError> {
        if !self.propagation_delay.is_zero() {
            tokio::time::sleep(self.propagation_delay).await;
        }
        let Some(timeout) = self.propagation_timeout else {
            return Ok(());
        };
        let servers = if self.resolvers.is_empty() {
            let fallback = match &self.provider {
                Provider::Rfc2136(p) => p.address().await.ok(),
                _ => None,
            };
            lookup::authoritative_servers(&record.fqdn, fallback)
                .await
                .map_err(|message| DnsError {
                    provider: self.provider.name(),
                    target: "the system's resolvers".into(),
                    message: format!(
                        "finding the authoritative servers of {}: {message} (give `resolvers`)",
                        record.fqdn
                    ),
                })?
        } else {
            self.resolvers.clone()
        };
        lookup::wait_txt(&servers, &record.fqdn, &record.value, timeout)
            .await
            .map_err(|message| DnsError {
                provider: self.provider.name(),
                target: servers
                    .iter()
                    .map(SocketAddr::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
                message,
            })
    }
}

/// Resolves a site's `tls_dns` over the global `[acme.dns]`: `None` when neither names a
/// provider. `key` names the site's table in errors.
pub(crate) fn resolve(
    site: Option<&DnsToml>,
    global: Option<&DnsToml>,
    key: &str,
    file: &ConfigFile,
    env: &Env,
) -> Result<Option<DnsConfig>, ConfigError> {
    let site = site.filter(|s| !s.is_empty());
    let global = global.filter(|g| !g.is_empty());
    // The provider and its options come as a whole from one table.
    let (source, source_key) = match (site, global) {
        (Some(s), _) if s.provider.is_some() => (s, key.to_owned()),
        (_, Some(g)) if g.provider.is_some() => (g, "acme.dns".to_owned()),
        (Some(_), _) => {
            return Err(file.invalid(
                format!("{key}.provider"),
                "is missing, and no global acme.dns (acme_dns) provider is set",
            ));
        }
        (None, Some(_)) => {
            return Err(file.invalid("acme.dns.provider", "is missing"));
        }
        (None, None) => return Ok(None),
    };
    let at = |k: &str| format!("{source_key}.{k}");
    let name = source.provider.as_deref().unwrap_or_default();
    let refuse_other = |allowed: &[&str]| -> Result<(), ConfigError> {
        let set = [
            ("server", source.server.is_some()),
            ("key_name", source.key_name.is_some()),
            ("key_alg", source.key_alg.is_some()),
            ("key", source.key.is_some()),
            ("key_file", source.key_file.is_some()),
            ("token", source.token.is_some()),
            ("token_file", source.token_file.is_some()),
            ("api_url", source.api_url.is_some()),
            ("command", !source.command.is_empty()),
            ("env", !source.env.is_empty()),
        ];
        match set.iter().find(|(k, on)| *on && !allowed.contains(k)) {
            Some((k, _)) => Err(file.invalid(at(k), format!("is not an option of {name}"))),
            None => Ok(()),
        }
    };
    let secret = |k: &str, inline: &Option<SecretText>, path: &Option<PathBuf>| {
        let inline = inline
            .as_ref()
            .map(|s| s.resolve(env, &at(k), file))
            .transpose()?;
        file.secret(env, &at(k), inline, path.as_deref())?
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                file.invalid(
                    at(k),
                    format!(
                        "is missing: give {k}, {k}_file or a systemd credential {}",
                        at(k)
                    ),
                )
            })
    };
    let provider = match name {
        "rfc2136" => {
            refuse_other(&["server", "key_name", "key_alg", "key", "key_file"])?;
            let key = secret("key", &source.key, &source.key_file)?;
            Provider::Rfc2136(
                rfc2136::Rfc2136::resolve(source, key).map_err(|(k, m)| file.invalid(at(k), m))?,
            )
        }
        "cloudflare" | "desec" => {
            refuse_other(&["token", "token_file", "api_url"])?;
            let token = secret("token", &source.token, &source.token_file)?;
            let base = api::Base::resolve(source.api_url.as_deref(), name)
                .map_err(|m| file.invalid(at("api_url"), m))?;
            if name == "cloudflare" {
                Provider::Cloudflare(cloudflare::Cloudflare::new(base, token))
            } else {
                Provider::Desec(desec::Desec::new(base, token))
            }
        }
        "exec" => {
            refuse_other(&["command", "env"])?;
            let mut vars = BTreeMap::new();
            for (var, value) in &source.env {
                let k = at(&format!("env.{var}"));
                if var.is_empty() || var.contains('=') || var.contains('\0') {
                    return Err(file.invalid(k, "is not an environment variable name"));
                }
                vars.insert(var.clone(), value.resolve(env, &k, file)?);
            }
            Provider::Exec(
                exec::Exec::resolve(&source.command, vars, env)
                    .map_err(|m| file.invalid(at("command"), m))?,
            )
        }
        other => {
            return Err(file.invalid(
                at("provider"),
                format!("{other:?} is not a DNS provider (rfc2136, cloudflare, desec or exec)"),
            ));
        }
    };
    // Propagation settings: the site's, else the global table's.
    let pick = |f: fn(&DnsToml) -> Option<String>| -> (Option<String>, String) {
        match site.and_then(f) {
            Some(v) => (Some(v), key.to_owned()),
            None => (global.and_then(f), "acme.dns".to_owned()),
        }
    };
    let (delay, delay_key) = pick(|t| t.propagation_delay.clone());
    let propagation_delay = match delay {
        None => Duration::ZERO,
        Some(text) => parse_duration(&text).ok_or_else(|| {
            file.invalid(
                format!("{delay_key}.propagation_delay"),
                format!("{text:?} is not a duration (write \"30s\")"),
            )
        })?,
    };
    let (timeout, timeout_key) = pick(|t| t.propagation_timeout.clone());
    let propagation_timeout = match timeout.as_deref() {
        None => Some(DEFAULT_PROPAGATION_TIMEOUT),
        Some("-1") => None,
        Some(text) => Some(
            parse_duration(text)
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    file.invalid(
                        format!("{timeout_key}.propagation_timeout"),
                        format!(
                            "{text:?} is not a duration (write \"2m\", or -1 to skip the check)"
                        ),
                    )
                })?,
        ),
    };
    let (list, list_key): (&[String], String) = match (site, global) {
        (Some(s), _) if !s.resolvers.is_empty() => (&s.resolvers, key.to_owned()),
        (_, Some(g)) => (&g.resolvers, "acme.dns".to_owned()),
        _ => (&[], key.to_owned()),
    };
    let mut resolvers = Vec::new();
    for (i, text) in list.iter().enumerate() {
        resolvers.push(
            lookup::parse_server(text, 53)
                .map_err(|m| file.invalid(format!("{list_key}.resolvers[{i}]"), m))?,
        );
    }
    Ok(Some(DnsConfig {
        provider,
        propagation_delay,
        propagation_timeout,
        resolvers,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_and_its_base_share_one_challenge_name() {
        assert_eq!(
            challenge_name("*.example.org"),
            "_acme-challenge.example.org"
        );
        assert_eq!(challenge_name("example.org"), "_acme-challenge.example.org");
        assert_eq!(
            challenge_name("a.example.org."),
            "_acme-challenge.a.example.org"
        );
    }

    #[test]
    fn a_secret_prints_redacted_and_an_env_reference_prints_as_written() {
        let inline = SecretText::new("cf-token-value".into());
        assert_eq!(format!("{inline:?}"), "[redacted]");
        assert_eq!(serde_json::to_string(&inline).unwrap(), "\"[redacted]\"");
        let reference = SecretText::new("{env.CF_API_TOKEN}".into());
        assert_eq!(format!("{reference:?}"), "{env.CF_API_TOKEN}");
        let file = ConfigFile::new(std::path::Path::new("/etc/edge.toml"));
        let env = Env::from_pairs([("CF_API_TOKEN", "from-env")]);
        assert_eq!(
            reference
                .resolve(&env, "acme.dns.token", &file)
                .unwrap()
                .expose(),
            "from-env"
        );
        let err = reference
            .resolve(&Env::default(), "acme.dns.token", &file)
            .unwrap_err();
        assert!(err.to_string().contains("CF_API_TOKEN is not set"), "{err}");
        let err = SecretText::new("[redacted]".into())
            .resolve(&env, "acme.dns.token", &file)
            .unwrap_err();
        assert!(err.to_string().contains("edge adapt"), "{err}");
    }
}
