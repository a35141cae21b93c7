//! The edge's configuration: the TOML file's serde types, and `resolve()` into a validated
//! [`Config`] the server runs from.
//!
//! The TOML types ([`EdgeToml`] and the tables under it) mirror the file key for key and are
//! also what `edge adapt` prints for a Caddyfile, so the two front ends meet here and share one
//! resolution step. [`resolve`] turns strings into types that cannot hold invalid states:
//! addresses into [`crate::site::Address`], durations into [`Duration`], bcrypt hashes checked,
//! upstreams parsed, and every name given a certificate policy: the internal CA for local
//! names and `tls internal` sites, ACME ([`AcmeConfig`]) for every other name.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use labcore::Env;
use labcore::config::{ConfigError, ConfigFile};
use serde::{Deserialize, Serialize};

use std::sync::Arc;

use crate::directives::{
    BasicAuthToml, Build, BuildError, Chain, DirectiveToml, HeaderToml, ProxyToml, RedirToml,
    RouteToml, Routes,
};
use crate::dns01::{self, DnsConfig, DnsToml};
use crate::log_roll::{Roll, parse_roll_size};
use crate::matchers::MatcherToml;
use crate::s3_storage::S3StorageConfig;
use crate::sealed::SealKey;
pub(crate) use crate::site::parse_duration;
use crate::site::{Address, CertFiles, ClientAuth, Host, Scheme, Site, TlsPolicy};

/// The TOML config file, key for key.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EdgeToml {
    /// Contact email for ACME accounts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) email: Option<String>,
    /// ACME directory URL (Caddy's `acme_ca`). Default: Let's Encrypt production.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) acme_ca: Option<String>,
    /// PEM file of the root that the ACME server's own HTTPS certificate chains to, for a
    /// private ACME server (Caddy's `acme_ca_root`). Default: the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) acme_ca_root: Option<PathBuf>,
    /// Key type of ACME certificates: "p256" (ECDSA P-256, default), "p384", "ed25519",
    /// "rsa2048" or "rsa4096".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) key_type: Option<String>,
    /// External account binding of new ACME accounts (Caddy's `acme_eab`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) acme_eab: Option<crate::issuer::EabToml>,
    /// ACME tuning.
    #[serde(default, skip_serializing_if = "AcmeToml::is_empty")]
    pub(crate) acme: AcmeToml,
    /// Every site's certificates from the internal CA, as `tls = "internal"` on each
    /// (Caddy's `local_certs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) local_certs: Option<bool>,
    /// What approves on-demand certificates (Caddy's `on_demand_tls`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) on_demand_tls: Option<OnDemandToml>,
    /// Port for plain HTTP (redirects to HTTPS, ACME HTTP-01). Default 80; 0 picks a free one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) http_port: Option<u16>,
    /// Port for HTTPS. Default 443; 0 picks a free one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) https_port: Option<u16>,
    /// Addresses to listen on. Default: every address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) bind: Vec<String>,
    /// Folder holding the internal CA, certificates and locks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) storage: Option<PathBuf>,
    /// An S3 bucket holding them instead, shared by several edges (`storage s3 {…}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) storage_s3: Option<StorageS3Toml>,
    /// Where JSON access log lines go: "stdout" (default), "stderr", "off" or a file path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) access_log: Option<String>,
    /// Diagnostics at debug level from the start (Caddy's `debug`), unless `--log-level` or
    /// `LABKIT_LOG` says otherwise. A reload does not change it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) debug: Option<bool>,
    /// The admin endpoint (Caddy's `admin`): "off" (default), "localhost:PORT",
    /// "127.0.0.1:PORT", "[::1]:PORT" or "unix//PATH".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) admin: Option<String>,
    /// Let the admin endpoint listen beyond loopback. Whoever reaches it can replace the
    /// configuration: put it behind a firewall. Default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) admin_allow_remote: Option<bool>,
    /// Automatic HTTPS (Caddy's `auto_https`): "on" (default), "off" (neither redirects nor
    /// certificates), "disable_redirects", "disable_certs" (only `tls_certificate` files are
    /// served) or "ignore_loaded_certs" (the edge's way anyway: loaded files never stop
    /// another site's names from being managed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) auto_https: Option<String>,
    /// The default for sites' `log` tables that name no output or format (a Caddyfile's
    /// global `log` block).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) log: Option<LogToml>,
    /// How long a stop waits for open requests before closing them ("10s").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) grace_period: Option<String>,
    /// Limits and timeouts.
    #[serde(default, skip_serializing_if = "LimitsToml::is_empty")]
    pub(crate) limits: LimitsToml,
    /// Count requests for the Prometheus exposition (`caddy_http_*`, Caddy's
    /// `servers { metrics }`). Default false: requests pay nothing for metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) metrics: Option<bool>,
    /// Trusted proxies and where they name the client (`servers { trusted_proxies ... }`).
    #[serde(default, skip_serializing_if = "crate::client_ip::Toml::is_empty")]
    pub(crate) client_ip: crate::client_ip::Toml,
    /// A PROXY protocol header opens every connection (`listener_wrappers { proxy_protocol }`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) proxy_protocol: Option<crate::proxy_protocol::Toml>,
    /// Where directives outside Caddy's standard order sort (Caddy's `order`):
    /// "rate_limit before|after DIRECTIVE" or "rate_limit first|last". Default: before
    /// basic_auth.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) order: Vec<String>,
    /// The sites.
    #[serde(default, rename = "site", skip_serializing_if = "Vec::is_empty")]
    pub(crate) sites: Vec<SiteToml>,
}

/// `[acme]`: how certificates are ordered and renewed; every key optional.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AcmeToml {
    /// Challenge types offered to the CA: "http-01" (on the HTTP port) and "tls-alpn-01" (on
    /// the HTTPS port). Default both; give only "tls-alpn-01" when port 80 is closed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) challenges: Vec<String>,
    /// Renew when this fraction of a certificate's lifetime is left. Default 0.3333.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) renewal_window_ratio: Option<f64>,
    /// First delay after a failed order; each further failure doubles it, up to a day, with
    /// jitter. Default "1m".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) retry_base: Option<String>,
    /// Orders in flight at once. Default 4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) max_concurrent_orders: Option<usize>,
    /// Time one order may take, from new order to downloaded chain. Default "2m".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) order_timeout: Option<String>,
    /// The DNS provider of every ACME name (a Caddyfile's `acme_dns`): DNS-01 instead of the
    /// other challenges, and wildcards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) dns: Option<DnsToml>,
}

impl AcmeToml {
    fn is_empty(&self) -> bool {
        *self == AcmeToml::default()
    }
}

/// `[on_demand_tls]`: what approves a certificate for a name first seen in a handshake.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct OnDemandToml {
    /// URL asked `GET URL?domain=NAME` before ordering; a 2xx answer approves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) ask: Option<String>,
    /// With `burst`: at most `burst` orders per `interval` ("1m").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) interval: Option<String>,
    /// Orders allowed per `interval`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) burst: Option<usize>,
}

/// `[limits]`: every key optional, with sane defaults.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LimitsToml {
    /// Time a client has to send a request's headers (slowloris). Default "10s".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) header_read_timeout: Option<String>,
    /// Largest request head in bytes (431 beyond). Default 65536.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) max_header_bytes: Option<usize>,
    /// A connection with no request and no traffic for this long is closed; an upgraded
    /// (WebSocket) one moving no bytes either way too. Default "2m".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) idle_timeout: Option<String>,
    /// Time a client has to send an HTTP/1.1 request's body, from its head (Caddy's
    /// `servers { timeouts { read_body } }`): a body still arriving then closes the
    /// connection. Default none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) read_body_timeout: Option<String>,
    /// Time the edge has to write an HTTP/1.1 response, from the request's head (Caddy's
    /// `servers { timeouts { write } }`): a response not written by then (a client not
    /// reading) closes the connection. Default none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) write_timeout: Option<String>,
    /// Time a client has to finish the TLS handshake. Default "10s".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) tls_handshake_timeout: Option<String>,
    /// Time to connect to an upstream (502 beyond). Default "5s".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) upstream_connect_timeout: Option<String>,
    /// Time an upstream has to send response headers (504 beyond). Default "60s".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) upstream_response_timeout: Option<String>,
    /// Concurrent HTTP/2 streams per connection. Default 250.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) h2_max_concurrent_streams: Option<u32>,
    /// Open client connections at once, upgraded ones included until they close; more wait
    /// in the kernel's backlog. A reload applies a new value. Default 10000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) max_connections: Option<usize>,
    /// HTTP/3 (QUIC) on the UDP twin of every HTTPS port, advertised by `Alt-Svc`; a
    /// Caddyfile's `servers { protocols h1 h2 }` turns it off. Its connections count under
    /// `max_connections` and get `h2_max_concurrent_streams` streams. Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) http3: Option<bool>,
}

impl LimitsToml {
    fn is_empty(&self) -> bool {
        *self == LimitsToml::default()
    }
}

/// `[[site]]`: one site, served on one or more addresses.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SiteToml {
    /// Addresses as Caddy writes them: "example.org", "https://a.example.org:8443",
    /// "http://intranet.local", "*.example.org", "localhost", "127.0.0.1".
    pub(crate) addresses: Vec<String>,
    /// Certificate source: "internal" (the edge's own CA) or "acme" (public, from the ACME CA;
    /// the default for every name but localhost, IP addresses and local suffixes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) tls: Option<String>,
    /// ACME account email for this site (`tls EMAIL` in a Caddyfile).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) tls_email: Option<String>,
    /// The ACME directory this site's names are ordered from, over `acme_ca` (a
    /// Caddyfile's `tls { ca URL }`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) tls_ca: Option<String>,
    /// The root of `tls_ca`'s own HTTPS certificate, over `acme_ca_root` (`tls { ca_root }`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) tls_ca_root: Option<PathBuf>,
    /// External account binding for this site's ACME account, over `acme_eab`
    /// (`tls { eab KEY_ID MAC_KEY }`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) tls_eab: Option<crate::issuer::EabToml>,
    /// Key type of this site's certificates, over `key_type` (`tls { key_type }`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) tls_key_type: Option<String>,
    /// Client certificates (a Caddyfile's `tls { client_auth { ... } }`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) client_auth: Option<ClientAuthToml>,
    /// ACME challenges offered for this site's names, a subset of `acme.challenges` (a
    /// Caddyfile's `tls { issuer acme { disable_http_challenge } }`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) tls_challenges: Vec<String>,
    /// The DNS provider publishing this site's ACME challenges (DNS-01, which wildcards
    /// need), over `acme.dns` (a Caddyfile's `tls { dns ... }`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) tls_dns: Option<DnsToml>,
    /// PEM certificate chain served for every name of the site, with `tls_key` (`tls CERT
    /// KEY` in a Caddyfile); read on start and on every reload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) tls_certificate: Option<PathBuf>,
    /// PEM private key of `tls_certificate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) tls_key: Option<PathBuf>,
    /// TLS versions, a minimum and an optional maximum: "tls1.2", "tls1.3" (Caddy's
    /// `tls { protocols }`). Default both.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) tls_protocols: Vec<String>,
    /// TLS 1.2 cipher suites by Go's names, in preference order (`tls { ciphers }`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) tls_ciphers: Vec<String>,
    /// Key exchange groups: "x25519", "secp256r1", "secp384r1" (`tls { curves }`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) tls_curves: Vec<String>,
    /// ALPN protocols offered (`tls { alpn }`). Default "h2", "http/1.1".
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) tls_alpn: Vec<String>,
    /// Certificates for this site's names are ordered from the ACME CA at the first TLS
    /// handshake naming them, once `on_demand_tls.ask` approves (`tls { on_demand }`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) tls_on_demand: Option<bool>,
    /// The site's own access log, in Caddy's shape (a Caddyfile's `log` block); its requests
    /// are written there instead of to `access_log`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) log: Option<LogToml>,
    /// Response compressions offered, in preference order: "zstd", "gzip".
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) encode: Vec<String>,
    /// Responses smaller than this are not compressed. Default 512.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) encode_minimum_length: Option<u64>,
    /// Redirects.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) redir: Vec<RedirToml>,
    /// Response header changes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) header: Vec<HeaderToml>,
    /// HTTP basic authentication.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) basic_auth: Vec<BasicAuthToml>,
    /// Reverse proxies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) reverse_proxy: Vec<ProxyToml>,
    /// Named matchers, for routes' `match = "@name"`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) matchers: BTreeMap<String, MatcherToml>,
    /// Routes: directives with their matchers, run in Caddy's directive order (after the
    /// tables above, which are routes too).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) route: Vec<RouteToml>,
    /// Routes for requests that failed (`handle_errors`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) handle_errors: Vec<RouteToml>,
}

/// `client_auth`: which client certificates a site's TLS handshakes ask for.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ClientAuthToml {
    /// "require_and_verify" (default when CAs are given) or "verify_if_given".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) mode: Option<String>,
    /// PEM files of the CAs client certificates must chain to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) trusted_ca_cert_files: Vec<PathBuf>,
}

/// `log`: an access log in Caddy's shape; every key optional.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LogToml {
    /// The logger's name, shown in each line as `http.log.access.NAME`. Default "log0".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) name: Option<String>,
    /// "stderr" (default), "stdout", "discard" or a file path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) output: Option<String>,
    /// A file rolls before it passes this size ("100MB", the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) roll_size: Option<String>,
    /// Rolled files kept. Default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) roll_keep: Option<usize>,
    /// Rolled files older than this are removed ("2160h", the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) roll_keep_for: Option<String>,
    /// Name rolled files by local time rather than UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) roll_local_time: Option<bool>,
    /// Never roll the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) roll_disabled: Option<bool>,
    /// "json" (default) or "console".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) format: Option<String>,
    /// "DEBUG" or "INFO" (every request, the default), "WARN" or "ERROR" (5xx answers only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) level: Option<String>,
}

/// Where a log goes and what its lines look like, resolved.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct LogSpec {
    /// Destination.
    pub(crate) output: LogOutput,
    /// Shape of each line.
    pub(crate) format: LogFormat,
    /// Only 5xx answers (Caddy logs them at ERROR, the rest at INFO).
    pub(crate) errors_only: bool,
    /// The logger name in each line ("http.log.access.log0").
    pub(crate) logger: String,
}

/// A log's destination.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum LogOutput {
    /// Nowhere.
    Discard,
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
    /// Appended to a file, rolled by size unless `roll` is `None`.
    File {
        /// The file.
        path: PathBuf,
        /// How it rolls.
        roll: Option<Roll>,
    },
}

/// Which shape a log writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) enum LogFormat {
    /// edge's own JSON line (`ts`, `remote`, `path`, `bytes`, `duration_ms`...).
    #[default]
    Edge,
    /// Caddy's JSON.
    Json,
    /// Caddy's console text.
    Console,
}

impl LogFormat {
    /// Whether lines of this shape hold the request's and response's headers.
    pub(crate) fn wants_headers(self) -> bool {
        self != LogFormat::Edge
    }
}

impl LogSpec {
    /// The edge's own access log (`access_log`) as a spec.
    pub(crate) fn edge(target: &AccessLog) -> LogSpec {
        LogSpec {
            output: match target {
                AccessLog::Off => LogOutput::Discard,
                AccessLog::Stdout => LogOutput::Stdout,
                AccessLog::Stderr => LogOutput::Stderr,
                AccessLog::File(path) => LogOutput::File {
                    path: path.clone(),
                    roll: None,
                },
            },
            format: LogFormat::Edge,
            errors_only: false,
            logger: String::new(),
        }
    }
}

/// Resolves a site's `log` table over the global default `global`; `key` names it in errors.
fn resolve_log(
    raw: &LogToml,
    global: Option<&LogToml>,
    key: &str,
    file: &ConfigFile,
) -> Result<LogSpec, ConfigError> {
    let pick = |f: fn(&LogToml) -> Option<String>| f(raw).or_else(|| global.and_then(f));
    let at = |k: &str| format!("{key}.{k}");
    let format = match pick(|l| l.format.clone()).as_deref() {
        None | Some("json") => LogFormat::Json,
        Some("console") => LogFormat::Console,
        Some(other) => {
            return Err(file.invalid(
                at("format"),
                format!("{other:?} is not a log format (\"json\" or \"console\")"),
            ));
        }
    };
    let errors_only = match pick(|l| l.level.clone())
        .map(|l| l.to_ascii_uppercase())
        .as_deref()
    {
        None | Some("DEBUG") | Some("INFO") => false,
        Some("WARN") | Some("ERROR") => true,
        Some(other) => {
            return Err(file.invalid(
                at("level"),
                format!("{other:?} is not a log level (DEBUG, INFO, WARN or ERROR)"),
            ));
        }
    };
    // The roll options go with the output that names the file.
    let own_output = raw.output.is_some();
    let source = if own_output {
        raw
    } else {
        global.unwrap_or(raw)
    };
    let output = match source.output.as_deref() {
        None | Some("stderr") => LogOutput::Stderr,
        Some("stdout") => LogOutput::Stdout,
        Some("discard") => LogOutput::Discard,
        Some("") => return Err(file.invalid(at("output"), "is empty")),
        Some(path) => {
            let roll = if source.roll_disabled == Some(true) {
                None
            } else {
                let defaults = Roll::default();
                Some(Roll {
                    size: match &source.roll_size {
                        None => defaults.size,
                        Some(text) => parse_roll_size(text).ok_or_else(|| {
                            file.invalid(
                                at("roll_size"),
                                format!("{text:?} is not a size (write \"10MB\")"),
                            )
                        })?,
                    },
                    keep: source.roll_keep.unwrap_or(defaults.keep),
                    keep_for: match &source.roll_keep_for {
                        None => defaults.keep_for,
                        Some(text) => parse_duration(text).ok_or_else(|| {
                            file.invalid(
                                at("roll_keep_for"),
                                format!("{text:?} is not a duration (write \"720h\")"),
                            )
                        })?,
                    },
                    local_time: source.roll_local_time.unwrap_or(false),
                })
            };
            LogOutput::File {
                path: file.resolve_path(Path::new(path)),
                roll,
            }
        }
    };
    let name = raw.name.clone().unwrap_or_else(|| "log0".into());
    Ok(LogSpec {
        output,
        format,
        errors_only,
        logger: format!("http.log.access.{name}"),
    })
}

/// Where the admin endpoint listens, resolved (the admin module serves it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum AdminListen {
    /// A TCP address (loopback unless allowed otherwise).
    Tcp(std::net::SocketAddr),
    /// A unix socket path.
    Unix(PathBuf),
}

/// Where the admin endpoint listens: a loopback address or a unix socket, unless `remote`.
fn resolve_admin(text: &str, remote: bool) -> Result<AdminListen, String> {
    if let Some(path) = text.strip_prefix("unix/") {
        if !path.starts_with('/') {
            return Err(format!("{text:?}: write unix//ABSOLUTE/PATH"));
        }
        return Ok(AdminListen::Unix(PathBuf::from(path)));
    }
    let (host, port) = crate::site::split_host_port(text)
        .and_then(|(h, p)| Some((h, p?)))
        .ok_or_else(|| format!("{text:?} is not HOST:PORT or unix//PATH"))?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let ip: IpAddr = if bare.eq_ignore_ascii_case("localhost") {
        IpAddr::from([127, 0, 0, 1])
    } else if bare.is_empty() {
        IpAddr::from([0u8; 16])
    } else {
        bare.parse().map_err(|_| {
            format!("{text:?}: the admin endpoint listens on an IP address or localhost")
        })?
    };
    if !ip.is_loopback() && !remote {
        return Err(format!(
            "{text:?} listens beyond loopback, where anyone who reaches it can replace the \
             configuration: use localhost:{port} or unix//PATH (or admin_allow_remote = true \
             in TOML, behind a firewall)"
        ));
    }
    Ok(AdminListen::Tcp(std::net::SocketAddr::new(ip, port)))
}

/// Limits and timeouts, resolved.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Limits {
    /// See [`LimitsToml::header_read_timeout`].
    pub(crate) header_read_timeout: Duration,
    /// See [`LimitsToml::max_header_bytes`].
    pub(crate) max_header_bytes: usize,
    /// See [`LimitsToml::idle_timeout`].
    pub(crate) idle_timeout: Duration,
    /// See [`LimitsToml::read_body_timeout`].
    pub(crate) read_body_timeout: Option<Duration>,
    /// See [`LimitsToml::write_timeout`].
    pub(crate) write_timeout: Option<Duration>,
    /// See [`LimitsToml::tls_handshake_timeout`].
    pub(crate) tls_handshake_timeout: Duration,
    /// See [`LimitsToml::upstream_connect_timeout`].
    pub(crate) upstream_connect_timeout: Duration,
    /// See [`LimitsToml::upstream_response_timeout`].
    pub(crate) upstream_response_timeout: Duration,
    /// See [`LimitsToml::h2_max_concurrent_streams`].
    pub(crate) h2_max_concurrent_streams: u32,
    /// See [`LimitsToml::max_connections`].
    pub(crate) max_connections: usize,
    /// See [`LimitsToml::http3`].
    pub(crate) http3: bool,
    /// The PROXY protocol header every connection opens with, if one does.
    pub(crate) proxy_protocol: Option<Arc<crate::proxy_protocol::Settings>>,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            idle_timeout: Duration::from_secs(120),
            read_body_timeout: None,
            write_timeout: None,
            tls_handshake_timeout: Duration::from_secs(10),
            upstream_connect_timeout: Duration::from_secs(5),
            upstream_response_timeout: Duration::from_secs(60),
            h2_max_concurrent_streams: 250,
            max_connections: 10_000,
            http3: true,
            proxy_protocol: None,
        }
    }
}

/// Let's Encrypt's production directory, the default ACME CA.
pub(crate) const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";

pub(crate) use crate::issuer::KeyType;

/// An ACME challenge type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Challenge {
    /// HTTP-01, answered on the HTTP port.
    Http01,
    /// TLS-ALPN-01, answered on the HTTPS port.
    TlsAlpn01,
    /// DNS-01, published by a DNS provider (never listed in `challenges`: a provider
    /// configured for a name makes it that name's only challenge).
    Dns01,
}

/// ACME settings, resolved.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct AcmeConfig {
    /// Directory URL.
    pub(crate) directory: String,
    /// Root to trust for the directory's HTTPS.
    pub(crate) root: Option<PathBuf>,
    /// Certificate key type.
    pub(crate) key_type: KeyType,
    /// Challenge types offered, in preference order.
    pub(crate) challenges: Vec<Challenge>,
    /// Fraction of the lifetime left when renewal starts.
    pub(crate) renewal_window_ratio: f64,
    /// First retry delay.
    pub(crate) retry_base: Duration,
    /// Orders at once.
    pub(crate) max_concurrent_orders: usize,
    /// Time limit of one order.
    pub(crate) order_timeout: Duration,
    /// The DNS provider of an order using DNS-01 (set per name from the site's settings).
    pub(crate) dns: Option<Arc<DnsConfig>>,
    /// External account binding for new accounts (`acme_eab`, a site's `tls { eab }`).
    pub(crate) eab: Option<Arc<crate::issuer::Eab>>,
}

impl Default for AcmeConfig {
    fn default() -> AcmeConfig {
        AcmeConfig {
            directory: LETS_ENCRYPT.to_owned(),
            root: None,
            key_type: KeyType::P256,
            challenges: vec![Challenge::Http01, Challenge::TlsAlpn01],
            renewal_window_ratio: 1.0 / 3.0,
            retry_base: Duration::from_secs(60),
            max_concurrent_orders: 4,
            order_timeout: Duration::from_secs(120),
            dns: None,
            eab: None,
        }
    }
}

/// Where access log lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AccessLog {
    /// Nowhere.
    Off,
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
    /// Appended to a file.
    File(PathBuf),
}

/// `on_demand_tls`, resolved.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct OnDemandConfig {
    /// The ask endpoint, `http://` or `https://`, without its `domain` parameter.
    pub(crate) ask: Option<AskUrl>,
    /// At most this many orders per interval.
    pub(crate) rate: Option<(Duration, usize)>,
}

/// The ask endpoint's URL, split for building requests.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct AskUrl {
    /// As written, for logs.
    pub(crate) text: String,
    /// Where to connect.
    pub(crate) address: crate::transport::Address,
    /// The Host header.
    pub(crate) host: String,
    /// The path and the query without `domain`, ready for `domain=NAME` to be appended.
    pub(crate) path_and_query: String,
}

impl AskUrl {
    /// Parses an `http://` or `https://` URL.
    pub(crate) fn parse(text: &str) -> Result<AskUrl, String> {
        let rest = text
            .strip_prefix("http://")
            .or_else(|| text.strip_prefix("https://"))
            .ok_or_else(|| format!("{text:?} is not an http:// or https:// URL"))?;
        let scheme_len = text.len() - rest.len();
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(split);
        if authority.is_empty() || authority.contains('@') || tail.contains('#') {
            return Err(format!(
                "{text:?}: the ask URL needs a host, and takes no user or fragment"
            ));
        }
        let address =
            crate::transport::Address::parse(&format!("{}{authority}", &text[..scheme_len]))
                .map_err(|e| format!("ask: {e}"))?;
        let (path, query) = match tail.split_once('?') {
            Some((p, q)) => (p, q),
            None => (tail, ""),
        };
        let path = if path.is_empty() { "/" } else { path };
        // Caddy sets `domain`, replacing one the URL already has.
        let kept: Vec<&str> = query
            .split('&')
            .filter(|p| !p.is_empty() && !p.starts_with("domain=") && *p != "domain")
            .collect();
        let mut path_and_query = format!("{path}?");
        for part in kept {
            path_and_query.push_str(part);
            path_and_query.push('&');
        }
        path_and_query
            .parse::<hyper::Uri>()
            .map_err(|e| format!("{text:?}: {e}"))?;
        Ok(AskUrl {
            text: text.to_owned(),
            address,
            host: authority.to_owned(),
            path_and_query,
        })
    }
}

/// `[storage_s3]`: certificates, keys, the ACME account, challenges and locks in a bucket.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StorageS3Toml {
    /// The bucket (required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) bucket: Option<String>,
    /// Folder of the bucket the objects go under, such as `edge/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) prefix: Option<String>,
    /// Endpoint URL. Default: `AWS_ENDPOINT_URL_S3`/`AWS_ENDPOINT_URL`, else AWS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) endpoint: Option<String>,
    /// Region. Default: `AWS_REGION`, else us-east-1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) region: Option<String>,
    /// Address the bucket as ENDPOINT/BUCKET (default for endpoints outside amazonaws.com).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) path_style: Option<bool>,
    /// Access key ID. Default: `AWS_ACCESS_KEY_ID`, else the AWS profile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) access_key_id: Option<String>,
    /// Secret access key, inline (prefer the file or the systemd credential).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) secret_access_key: Option<labcore::secret::Secret>,
    /// Secret access key, from a file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) secret_access_key_file: Option<PathBuf>,
    /// Extra PEM roots to trust for the endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) ca_bundle: Option<PathBuf>,
    /// File (mode 0600) holding the 32-byte key the edges seal objects with, as 64 hex
    /// digits or base64 (required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) encryption_key_file: Option<PathBuf>,
    /// How long a lock lasts unless its holder refreshes it ("60s").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) lease: Option<String>,
    /// How often certificates other edges renewed are looked for ("5m").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) poll_interval: Option<String>,
}

/// Resolves `[storage_s3]`.
fn resolve_storage_s3(
    raw: &StorageS3Toml,
    file: &ConfigFile,
    env: &Env,
) -> Result<S3StorageConfig, ConfigError> {
    let bucket = match raw.bucket.as_deref() {
        Some(b) if !b.is_empty() && !b.contains('/') => b.to_owned(),
        _ => return Err(file.invalid("storage_s3.bucket", "a bucket name is required")),
    };
    let mut prefix = raw.prefix.clone().unwrap_or_default();
    prefix = prefix.trim_matches('/').to_owned();
    if !prefix.is_empty() {
        prefix.push('/');
    }
    let table = labcore::s3::S3Config {
        endpoint: raw.endpoint.clone(),
        region: raw.region.clone(),
        path_style: raw.path_style,
        profile: None,
        access_key_id: raw.access_key_id.clone(),
        secret_access_key: raw.secret_access_key.clone(),
        secret_access_key_file: raw.secret_access_key_file.clone(),
        ca_bundle: raw.ca_bundle.clone(),
    };
    let settings = labcore::s3::S3Settings::resolve(
        &labcore::s3::S3Args::default(),
        Some((&table, file)),
        env,
    )
    .map_err(|e| file.invalid("storage_s3", labcore::exit::chain(&e)))?;
    let Some(key_file) = &raw.encryption_key_file else {
        return Err(file.invalid(
            "storage_s3.encryption_key_file",
            "is required: the edges sharing the bucket seal keys with it",
        ));
    };
    let key_path = file.resolve_path(key_file);
    let key_err = |message: String| file.invalid("storage_s3.encryption_key_file", message);
    let meta = std::fs::metadata(&key_path)
        .map_err(|e| key_err(format!("{}: {e}", key_path.display())))?;
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(key_err(format!(
                "{} is mode {:04o}; it must be readable by its owner only (chmod 600)",
                key_path.display(),
                mode & 0o7777
            )));
        }
    }
    let text = labcore::secret::read_file(&key_path)
        .map_err(|e| key_err(format!("{}: {e}", key_path.display())))?;
    let key = SealKey::parse(text.expose())
        .map_err(|e| key_err(format!("{}: {e}", key_path.display())))?;
    let duration = |key: &str, text: &Option<String>, default: Duration| match text {
        None => Ok(default),
        Some(t) => match parse_duration(t) {
            Some(d) if !d.is_zero() => Ok(d),
            _ => Err(file.invalid(
                format!("storage_s3.{key}"),
                format!("{t:?} is not a duration"),
            )),
        },
    };
    Ok(S3StorageConfig {
        settings,
        bucket,
        prefix,
        key: Arc::new(key),
        lease: duration("lease", &raw.lease, crate::s3_storage::DEFAULT_LEASE)?,
        poll_interval: duration(
            "poll_interval",
            &raw.poll_interval,
            crate::s3_storage::DEFAULT_POLL,
        )?,
    })
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    /// ACME account email.
    pub(crate) email: Option<String>,
    /// ACME settings.
    pub(crate) acme: AcmeConfig,
    /// Plain HTTP port.
    pub(crate) http_port: u16,
    /// HTTPS port.
    pub(crate) https_port: u16,
    /// Addresses to listen on.
    pub(crate) bind: Vec<IpAddr>,
    /// Storage folder.
    pub(crate) storage: PathBuf,
    /// The bucket storage instead of the folder, when configured.
    pub(crate) storage_s3: Option<S3StorageConfig>,
    /// Access log target.
    pub(crate) access_log: AccessLog,
    /// Each site's ACME challenges when it narrows `acme.challenges` (empty: all), by index.
    pub(crate) site_challenges: Vec<Vec<Challenge>>,
    /// Each site's DNS provider (its own or `acme.dns`), by index: its names use DNS-01.
    pub(crate) site_dns: Vec<Option<Arc<DnsConfig>>>,
    /// Each site's own ACME issuer (`tls { ca ca_root eab key_type }` over the global
    /// settings), by index; `None`: `acme`.
    pub(crate) site_issuers: Vec<Option<Arc<AcmeConfig>>>,
    /// The admin endpoint, if on.
    pub(crate) admin: Option<AdminListen>,
    /// `debug`: diagnostics at debug level unless the command line or environment say.
    pub(crate) debug: bool,
    /// The configuration as the file gave it, for the admin endpoint's `/config/`.
    pub(crate) toml: EdgeToml,
    /// Plain HTTP requests for HTTPS hosts are redirected (auto_https).
    pub(crate) redirects: bool,
    /// Certificates are made or ordered for names without files (auto_https).
    pub(crate) auto_certs: bool,
    /// Each site's own log (`log` in a Caddyfile), by the site's index.
    pub(crate) site_logs: Vec<Option<LogSpec>>,
    /// Drain time on stop.
    pub(crate) grace_period: Duration,
    /// Limits and timeouts.
    pub(crate) limits: Limits,
    /// The sites, in file order.
    pub(crate) sites: Vec<Site>,
    /// Each site's handler chain, indexed like `sites`.
    pub(crate) chains: Vec<Arc<Chain>>,
    /// `on_demand_tls`, when given.
    pub(crate) on_demand: Option<OnDemandConfig>,
    /// Trusted proxies, when some are (`servers { trusted_proxies ... }`).
    pub(crate) client_ip: Option<Arc<crate::client_ip::Policy>>,
}

impl Config {
    /// Every port a listener is needed on, with whether it speaks TLS.
    pub(crate) fn listeners(&self) -> Vec<(u16, Scheme)> {
        let mut ports: Vec<(u16, Scheme)> = vec![(self.http_port, Scheme::Http)];
        for site in &self.sites {
            for address in &site.addresses {
                if !ports.contains(&(address.port, address.scheme)) {
                    ports.push((address.port, address.scheme));
                }
            }
        }
        ports
    }
}

/// Reads and resolves a TOML config file.
pub(crate) fn load_toml(path: &Path, env: &Env) -> Result<Config, ConfigError> {
    let (raw, file): (EdgeToml, ConfigFile) = labcore::config::load(path)?;
    resolve(raw, &file, env)
}

/// Turns the file's types into a [`Config`], naming the key at fault on error.
pub(crate) fn resolve(raw: EdgeToml, file: &ConfigFile, env: &Env) -> Result<Config, ConfigError> {
    let duration = |key: &str, value: &Option<String>, default: Duration| match value {
        None => Ok(default),
        Some(text) => parse_duration(text).ok_or_else(|| {
            file.invalid(
                key,
                format!("{text:?} is not a duration (write \"10s\", \"2m\", \"500ms\")"),
            )
        }),
    };
    let mut order = crate::directives::Order::default();
    for (j, line) in raw.order.iter().enumerate() {
        let words: Vec<&str> = line.split_whitespace().collect();
        order
            .place(&words)
            .map_err(|m| file.invalid(format!("order[{j}]"), m))?;
    }
    let defaults = Limits::default();
    let l = &raw.limits;
    let limits = Limits {
        header_read_timeout: duration(
            "limits.header_read_timeout",
            &l.header_read_timeout,
            defaults.header_read_timeout,
        )?,
        max_header_bytes: match l.max_header_bytes {
            Some(n) if !(1024..=16 * 1024 * 1024).contains(&n) => {
                return Err(file.invalid(
                    "limits.max_header_bytes",
                    "must be between 1024 and 16777216",
                ));
            }
            Some(n) => n,
            None => defaults.max_header_bytes,
        },
        idle_timeout: duration(
            "limits.idle_timeout",
            &l.idle_timeout,
            defaults.idle_timeout,
        )?,
        read_body_timeout: l
            .read_body_timeout
            .as_ref()
            .map(|_| {
                duration(
                    "limits.read_body_timeout",
                    &l.read_body_timeout,
                    Duration::ZERO,
                )
            })
            .transpose()?,
        write_timeout: l
            .write_timeout
            .as_ref()
            .map(|_| duration("limits.write_timeout", &l.write_timeout, Duration::ZERO))
            .transpose()?,
        tls_handshake_timeout: duration(
            "limits.tls_handshake_timeout",
            &l.tls_handshake_timeout,
            defaults.tls_handshake_timeout,
        )?,
        upstream_connect_timeout: duration(
            "limits.upstream_connect_timeout",
            &l.upstream_connect_timeout,
            defaults.upstream_connect_timeout,
        )?,
        upstream_response_timeout: duration(
            "limits.upstream_response_timeout",
            &l.upstream_response_timeout,
            defaults.upstream_response_timeout,
        )?,
        h2_max_concurrent_streams: match l.h2_max_concurrent_streams {
            Some(0) => {
                return Err(file.invalid("limits.h2_max_concurrent_streams", "must be at least 1"));
            }
            Some(n) => n,
            None => defaults.h2_max_concurrent_streams,
        },
        max_connections: match l.max_connections {
            Some(0) => return Err(file.invalid("limits.max_connections", "must be at least 1")),
            Some(n) => n,
            None => defaults.max_connections,
        },
        http3: l.http3.unwrap_or(defaults.http3),
        proxy_protocol: match &raw.proxy_protocol {
            None => None,
            Some(pp) => Some(Arc::new(
                crate::proxy_protocol::Settings::build(pp)
                    .map_err(|m| file.invalid("proxy_protocol", m))?,
            )),
        },
    };
    let client_ip = crate::client_ip::Policy::build(&raw.client_ip)
        .map_err(|m| file.invalid("client_ip", m))?
        .map(Arc::new);
    for (key, value) in [
        ("limits.header_read_timeout", limits.header_read_timeout),
        ("limits.idle_timeout", limits.idle_timeout),
        ("limits.tls_handshake_timeout", limits.tls_handshake_timeout),
        (
            "limits.upstream_connect_timeout",
            limits.upstream_connect_timeout,
        ),
        (
            "limits.upstream_response_timeout",
            limits.upstream_response_timeout,
        ),
    ] {
        if value.is_zero() {
            return Err(file.invalid(key, "must be longer than zero"));
        }
    }

    let http_port = raw.http_port.unwrap_or(80);
    let https_port = raw.https_port.unwrap_or(443);
    if http_port == https_port && http_port != 0 {
        return Err(file.invalid("https_port", "must differ from http_port"));
    }
    let mut bind = Vec::new();
    for (i, text) in raw.bind.iter().enumerate() {
        let ip = text
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| {
                file.invalid(
                    format!("bind[{i}]"),
                    format!("{text:?} is not an IP address"),
                )
            })?;
        bind.push(ip);
    }
    if bind.is_empty() {
        bind.push(IpAddr::from([0u8; 16]));
    }
    let storage = match &raw.storage {
        Some(path) => file.resolve_path(path),
        None => default_storage(env),
    };
    let storage_s3 = match &raw.storage_s3 {
        Some(table) => Some(resolve_storage_s3(table, file, env)?),
        None => None,
    };
    let access_log = match raw.access_log.as_deref() {
        None | Some("stdout") => AccessLog::Stdout,
        Some("stderr") => AccessLog::Stderr,
        Some("off") => AccessLog::Off,
        Some("") => return Err(file.invalid("access_log", "is empty")),
        Some(path) => AccessLog::File(file.resolve_path(Path::new(path))),
    };
    let grace_period = duration("grace_period", &raw.grace_period, Duration::from_secs(10))?;
    if let Some(email) = &raw.email {
        check_email(email).map_err(|m| file.invalid("email", m))?;
    }
    let acme = resolve_acme(&raw, file, env, &duration)?;
    let on_demand = match &raw.on_demand_tls {
        None => None,
        Some(t) => Some(resolve_on_demand(t, file, &duration)?),
    };
    let local_certs = raw.local_certs == Some(true);
    // Checked even when no site uses it, so a typo shows at `edge check`.
    dns01::resolve(None, raw.acme.dns.as_ref(), "acme.dns", file, env)?;

    let mut sites = Vec::new();
    let mut chains = Vec::new();
    let mut seen: BTreeMap<(String, u16), usize> = BTreeMap::new();
    let toml = raw.clone();
    let admin = match raw.admin.as_deref() {
        None | Some("off") => None,
        Some(text) => Some(
            resolve_admin(text, raw.admin_allow_remote == Some(true))
                .map_err(|m| file.invalid("admin", m))?,
        ),
    };
    let (redirects, auto_certs) = match raw.auto_https.as_deref() {
        None | Some("on") | Some("ignore_loaded_certs") => (true, true),
        Some("off") => (false, false),
        Some("disable_redirects") => (false, true),
        Some("disable_certs") => (true, false),
        Some(other) => {
            return Err(file.invalid(
                "auto_https",
                format!("{other:?} is not a mode (on, off, disable_redirects, disable_certs, ignore_loaded_certs)"),
            ));
        }
    };
    let mut site_logs: Vec<Option<LogSpec>> = Vec::new();
    let mut site_challenges: Vec<Vec<Challenge>> = Vec::new();
    let mut site_dns: Vec<Option<Arc<DnsConfig>>> = Vec::new();
    let mut site_issuers: Vec<Option<Arc<AcmeConfig>>> = Vec::new();
    for (i, mut site) in raw.sites.into_iter().enumerate() {
        site_issuers.push(site_issuer(&site, &acme, i, file, env)?.map(Arc::new));
        let log = match site.log.take() {
            None => None,
            Some(l) => Some(resolve_log(
                &l,
                raw.log.as_ref(),
                &format!("site[{i}].log"),
                file,
            )?),
        };
        // Two writers on one file would roll it under each other.
        if let Some(
            spec @ LogSpec {
                output: LogOutput::File { path, .. },
                ..
            },
        ) = &log
            && site_logs.iter().flatten().any(|o| {
                matches!(&o.output, LogOutput::File { path: p, .. } if p == path) && o != spec
            })
        {
            return Err(file.invalid(
                format!("site[{i}].log.output"),
                format!(
                    "{} is written by another site's log with other options: give both the same",
                    path.display()
                ),
            ));
        }
        site_logs.push(log);
        let mut challenges = Vec::new();
        for (j, name) in site.tls_challenges.iter().enumerate() {
            let challenge = match name.as_str() {
                "http-01" => Challenge::Http01,
                "tls-alpn-01" => Challenge::TlsAlpn01,
                other => {
                    return Err(file.invalid(
                        format!("site[{i}].tls_challenges[{j}]"),
                        format!("{other:?} is not supported (\"http-01\" or \"tls-alpn-01\")"),
                    ));
                }
            };
            if acme.challenges.contains(&challenge) {
                challenges.push(challenge);
            }
        }
        if !site.tls_challenges.is_empty() && challenges.is_empty() {
            return Err(file.invalid(
                format!("site[{i}].tls_challenges"),
                "leaves no ACME challenge the edge offers (http-01 or tls-alpn-01)",
            ));
        }
        site_challenges.push(challenges);
        let dns = dns01::resolve(
            site.tls_dns.as_ref(),
            raw.acme.dns.as_ref(),
            &format!("site[{i}].tls_dns"),
            file,
            env,
        )?
        .map(Arc::new);
        let dns01 = dns.is_some();
        site_dns.push(dns);
        let (site, chain) = resolve_site(
            site,
            i,
            file,
            (http_port, https_port),
            local_certs,
            dns01,
            (env, order),
        )?;
        chains.push(chain);
        for address in &site.addresses {
            let key = (address.host.to_string(), address.port);
            if let Some(other) = seen.insert(key, i) {
                return Err(file.invalid(
                    format!("site[{i}].addresses"),
                    format!("{address} is also served by site[{other}]"),
                ));
            }
        }
        sites.push(site);
    }
    if raw.metrics == Some(true) {
        meter_chains(&sites, &mut chains);
    }
    let chains = chains.into_iter().map(Arc::new).collect();
    Ok(Config {
        email: raw.email,
        acme,
        http_port,
        https_port,
        bind,
        storage,
        storage_s3,
        access_log,
        site_challenges,
        site_dns,
        site_issuers,
        admin,
        debug: raw.debug == Some(true),
        toml,
        redirects,
        auto_certs,
        site_logs,
        grace_period,
        limits,
        sites,
        chains,
        on_demand,
        client_ip,
    })
}

fn resolve_on_demand(
    t: &OnDemandToml,
    file: &ConfigFile,
    duration: DurationKey<'_>,
) -> Result<OnDemandConfig, ConfigError> {
    let ask = t
        .ask
        .as_deref()
        .map(AskUrl::parse)
        .transpose()
        .map_err(|m| file.invalid("on_demand_tls.ask", m))?;
    let rate = match (&t.interval, t.burst) {
        (None, None) => None,
        (Some(_), Some(0)) => {
            return Err(file.invalid("on_demand_tls.burst", "must be at least 1"));
        }
        (Some(_), Some(burst)) => {
            let interval = duration("on_demand_tls.interval", &t.interval, Duration::ZERO)?;
            if interval.is_zero() {
                return Err(file.invalid("on_demand_tls.interval", "must be longer than zero"));
            }
            Some((interval, burst))
        }
        (None, Some(_)) => {
            return Err(file.invalid(
                "on_demand_tls.burst",
                "needs interval (a burst of orders per interval)",
            ));
        }
        (Some(_), None) => {
            return Err(file.invalid(
                "on_demand_tls.interval",
                "needs burst (a burst of orders per interval)",
            ));
        }
    };
    Ok(OnDemandConfig { ask, rate })
}

/// The storage folder when the config names none: systemd's `StateDirectory`, else the XDG
/// data folder, else `/var/lib/labkit/edge`.
pub(crate) fn default_storage(env: &Env) -> PathBuf {
    if let Some(dir) = env.path("STATE_DIRECTORY") {
        // systemd may list several, colon-separated; the first is ours.
        let first = dir
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or("")
            .to_owned();
        return PathBuf::from(first);
    }
    if let Some(dir) = env.path("XDG_DATA_HOME") {
        return dir.join("labkit/edge");
    }
    match env.home() {
        Some(home) if home != Path::new("/") && home != Path::new("/root") => {
            home.join(".local/share/labkit/edge")
        }
        _ => PathBuf::from("/var/lib/labkit/edge"),
    }
}

/// Reads an optional duration key, with its default.
type DurationKey<'a> = &'a dyn Fn(&str, &Option<String>, Duration) -> Result<Duration, ConfigError>;

fn resolve_acme(
    raw: &EdgeToml,
    file: &ConfigFile,
    env: &Env,
    duration: DurationKey<'_>,
) -> Result<AcmeConfig, ConfigError> {
    let defaults = AcmeConfig::default();
    let directory = match &raw.acme_ca {
        None => defaults.directory,
        Some(url) => crate::issuer::directory(url, "acme_ca", file)?,
    };
    let root = raw.acme_ca_root.as_ref().map(|p| file.resolve_path(p));
    let key_type = match raw.key_type.as_deref() {
        None => KeyType::P256,
        Some(text) => crate::issuer::key_type(text, "key_type", file)?,
    };
    let eab = raw
        .acme_eab
        .as_ref()
        .map(|e| crate::issuer::resolve_eab(e, "acme_eab", file, env))
        .transpose()?;
    let a = &raw.acme;
    let mut challenges = Vec::new();
    for (i, name) in a.challenges.iter().enumerate() {
        let challenge = match name.as_str() {
            "http-01" => Challenge::Http01,
            "tls-alpn-01" => Challenge::TlsAlpn01,
            other => {
                return Err(file.invalid(
                    format!("acme.challenges[{i}]"),
                    format!("{other:?} is not supported (\"http-01\" or \"tls-alpn-01\")"),
                ));
            }
        };
        if !challenges.contains(&challenge) {
            challenges.push(challenge);
        }
    }
    if challenges.is_empty() {
        challenges = defaults.challenges;
    }
    let renewal_window_ratio = match a.renewal_window_ratio {
        None => defaults.renewal_window_ratio,
        Some(r) if r > 0.0 && r < 1.0 => r,
        Some(r) => {
            return Err(file.invalid(
                "acme.renewal_window_ratio",
                format!("{r} is not between 0 and 1 (exclusive)"),
            ));
        }
    };
    let retry_base = duration("acme.retry_base", &a.retry_base, defaults.retry_base)?;
    if retry_base.is_zero() {
        return Err(file.invalid("acme.retry_base", "must be longer than zero"));
    }
    let order_timeout = duration(
        "acme.order_timeout",
        &a.order_timeout,
        defaults.order_timeout,
    )?;
    if order_timeout.is_zero() {
        return Err(file.invalid("acme.order_timeout", "must be longer than zero"));
    }
    let max_concurrent_orders = match a.max_concurrent_orders {
        Some(0) => return Err(file.invalid("acme.max_concurrent_orders", "must be at least 1")),
        Some(n) => n,
        None => defaults.max_concurrent_orders,
    };
    Ok(AcmeConfig {
        directory,
        root,
        key_type,
        challenges,
        renewal_window_ratio,
        retry_base,
        max_concurrent_orders,
        order_timeout,
        dns: None,
        eab,
    })
}

/// A site's own issuer: the global ACME settings with its `tls_ca`, `tls_ca_root`,
/// `tls_eab` and `tls_key_type` over them (Caddy fills a site's issuer in from the global
/// options the same way); `None` when it sets none.
fn site_issuer(
    site: &SiteToml,
    global: &AcmeConfig,
    i: usize,
    file: &ConfigFile,
    env: &Env,
) -> Result<Option<AcmeConfig>, ConfigError> {
    let key = |k: &str| format!("site[{i}].{k}");
    let set = [
        ("tls_ca", site.tls_ca.is_some()),
        ("tls_ca_root", site.tls_ca_root.is_some()),
        ("tls_eab", site.tls_eab.is_some()),
        ("tls_key_type", site.tls_key_type.is_some()),
    ];
    let Some((first, _)) = set.iter().find(|(_, on)| *on) else {
        return Ok(None);
    };
    // The on-demand orderer and the internal CA take the global settings only.
    if site.tls.as_deref() == Some("internal") || site.tls_on_demand == Some(true) {
        return Err(file.invalid(
            key(first),
            "applies to ACME certificates ordered ahead: not with tls internal or on_demand",
        ));
    }
    let mut acme = global.clone();
    if let Some(url) = &site.tls_ca {
        acme.directory = crate::issuer::directory(url, &key("tls_ca"), file)?;
    }
    if let Some(root) = &site.tls_ca_root {
        acme.root = Some(file.resolve_path(root));
    }
    if let Some(eab) = &site.tls_eab {
        acme.eab = Some(crate::issuer::resolve_eab(eab, &key("tls_eab"), file, env)?);
    }
    if let Some(text) = &site.tls_key_type {
        acme.key_type = crate::issuer::key_type(text, &key("tls_key_type"), file)?;
    }
    Ok(Some(acme))
}

fn check_email(email: &str) -> Result<(), &'static str> {
    match email.split_once('@') {
        Some((user, domain)) if !user.is_empty() && domain.contains('.') => Ok(()),
        _ => Err("is not an email address"),
    }
}

fn resolve_site(
    raw: SiteToml,
    i: usize,
    file: &ConfigFile,
    (http_port, https_port): (u16, u16),
    local_certs: bool,
    dns01: bool,
    (env, order): (&Env, crate::directives::Order),
) -> Result<(Site, Chain), ConfigError> {
    let key = |k: &str| format!("site[{i}].{k}");
    if raw.addresses.is_empty() {
        return Err(file.invalid(key("addresses"), "a site needs at least one address"));
    }
    let has_files = raw.tls_certificate.is_some() || raw.tls_key.is_some();
    let explicit_internal = (local_certs && !has_files && raw.tls_email.is_none())
        || match raw.tls.as_deref() {
            None | Some("acme") => false,
            Some("internal") => true,
            Some(other) => {
                return Err(file.invalid(
                    key("tls"),
                    format!("{other:?} is not a certificate source (\"internal\" or \"acme\")"),
                ));
            }
        };
    let tls_options = crate::tls_options::resolve(
        &raw.tls_protocols,
        &raw.tls_ciphers,
        &raw.tls_curves,
        &raw.tls_alpn,
    )
    .map_err(|(k, m)| file.invalid(key(&format!("tls_{k}")), m))?
    .map(Arc::new);
    let on_demand = raw.tls_on_demand == Some(true);
    if on_demand && (explicit_internal || has_files) {
        return Err(file.invalid(
            key("tls_on_demand"),
            "on-demand certificates come from the ACME CA: not with tls internal, local_certs \
             or certificate files",
        ));
    }
    if let Some(email) = &raw.tls_email {
        check_email(email).map_err(|m| file.invalid(key("tls_email"), m))?;
    }
    let tls_email = raw.tls_email.clone();
    let cert_files = match (&raw.tls_certificate, &raw.tls_key) {
        (None, None) => None,
        (Some(cert), Some(key_file)) => {
            if explicit_internal || tls_email.is_some() {
                return Err(file.invalid(
                    key("tls_certificate"),
                    "certificate files and another certificate source in one site",
                ));
            }
            Some(CertFiles {
                cert: file.resolve_path(cert),
                key: file.resolve_path(key_file),
            })
        }
        (Some(_), None) => return Err(file.invalid(key("tls_key"), "is missing")),
        (None, Some(_)) => return Err(file.invalid(key("tls_certificate"), "is missing")),
    };
    let client_auth = match &raw.client_auth {
        None => None,
        Some(auth) => {
            let require = match auth.mode.as_deref() {
                None | Some("require_and_verify") => true,
                Some("verify_if_given") => false,
                Some(other) => {
                    return Err(file.invalid(
                        key("client_auth.mode"),
                        format!("{other:?}: only require_and_verify and verify_if_given are supported (certificates are always verified)"),
                    ));
                }
            };
            if auth.trusted_ca_cert_files.is_empty() {
                return Err(file.invalid(
                    key("client_auth"),
                    "needs trusted_ca_cert_file: the CA client certificates must chain to",
                ));
            }
            Some(ClientAuth {
                require,
                cas: auth
                    .trusted_ca_cert_files
                    .iter()
                    .map(|p| file.resolve_path(p))
                    .collect(),
            })
        }
    };
    let mut addresses = Vec::new();
    for (j, text) in raw.addresses.iter().enumerate() {
        let address = Address::parse(text, http_port, https_port)
            .map_err(|m| file.invalid(format!("site[{i}].addresses[{j}]"), m))?;
        if client_auth.is_some()
            && address.scheme == Scheme::Https
            && matches!(address.host, Host::Any | Host::Ip(_))
        {
            // Handshakes pick client_auth by TLS name; a client sending none would skip it.
            return Err(file.invalid(
                format!("site[{i}].addresses[{j}]"),
                format!("{text:?}: client_auth needs host names (clients without a TLS name would bypass it)"),
            ));
        }
        if address.scheme == Scheme::Https
            && address.host == Host::Any
            && cert_files.is_none()
            && !on_demand
        {
            return Err(file.invalid(
                format!("site[{i}].addresses[{j}]"),
                format!("{text:?}: an HTTPS site without a host name needs `tls CERT KEY` files"),
            ));
        }
        if address.scheme == Scheme::Https && cert_files.is_none() && !on_demand {
            TlsPolicy::for_host(&address.host, explicit_internal, dns01)
                .map_err(|m| file.invalid(format!("site[{i}].addresses[{j}]"), m))?;
        }
        addresses.push(address);
    }

    let chain = resolve_chain(raw, i, file, (env, order))?;
    Ok((
        Site {
            addresses,
            tls_internal: explicit_internal,
            tls_email,
            cert_files,
            client_auth,
            on_demand,
            tls_options,
            dns01,
        },
        chain,
    ))
}

/// Turns on request metrics with Caddy's `server` and `handler` labels: its servers are the
/// listener ports grouped by the sites they serve, named `srv0`, `srv1`, ... in the order of
/// their first address as text (`:8080`); a site is wrapped in Caddy's subroute unless it is
/// its server's only site and has no host names.
fn meter_chains(sites: &[Site], chains: &mut [Chain]) {
    let mut by_port: BTreeMap<u16, Vec<usize>> = BTreeMap::new();
    for (i, site) in sites.iter().enumerate() {
        for address in &site.addresses {
            let served = by_port.entry(address.port).or_default();
            if !served.contains(&i) {
                served.push(i);
            }
        }
    }
    let mut servers: Vec<(String, Vec<usize>)> = Vec::new();
    for (port, served) in by_port {
        let key = format!(":{port}");
        match servers.iter_mut().find(|(_, s)| *s == served) {
            Some((first, _)) => *first = std::cmp::min(first.clone(), key),
            None => servers.push((key, served)),
        }
    }
    servers.sort();
    let mut named = vec![false; chains.len()];
    for (n, (_, served)) in servers.iter().enumerate() {
        for &i in served {
            if std::mem::replace(&mut named[i], true) {
                continue;
            }
            let wrapped =
                served.len() > 1 || sites[i].addresses.iter().any(|a| a.host != Host::Any);
            crate::directives::metrics::instrument(&mut chains[i], &format!("srv{n}"), wrapped);
        }
    }
}

/// The site's routes: the TOML tables (`redir`, `header`, `basic_auth`, `reverse_proxy`,
/// `encode`) as routes with their path matchers, then `route`, compiled in Caddy's order.
fn resolve_chain(
    raw: SiteToml,
    i: usize,
    file: &ConfigFile,
    (env, order): (&Env, crate::directives::Order),
) -> Result<Chain, ConfigError> {
    let mut routes: Vec<RouteToml> = Vec::new();
    let mut keys: Vec<String> = Vec::new();
    let legacy = |table: &str, j: usize| format!("site[{i}].{table}[{j}]");
    for (j, mut r) in raw.redir.into_iter().enumerate() {
        keys.push(legacy("redir", j));
        routes.push(RouteToml {
            matcher: r.path.take(),
            directive: DirectiveToml::Redir(r),
        });
    }
    for (j, mut h) in raw.header.into_iter().enumerate() {
        keys.push(legacy("header", j));
        routes.push(RouteToml {
            matcher: h.path.take(),
            directive: DirectiveToml::Header(h),
        });
    }
    for (j, mut a) in raw.basic_auth.into_iter().enumerate() {
        keys.push(legacy("basic_auth", j));
        routes.push(RouteToml {
            matcher: a.path.take(),
            directive: DirectiveToml::BasicAuth(a),
        });
    }
    for (j, mut p) in raw.reverse_proxy.into_iter().enumerate() {
        keys.push(legacy("reverse_proxy", j));
        routes.push(RouteToml {
            matcher: p.path.take(),
            directive: DirectiveToml::ReverseProxy(p),
        });
    }
    if !raw.encode.is_empty() {
        keys.push(format!("site[{i}].encode"));
        routes.push(RouteToml {
            matcher: None,
            directive: DirectiveToml::Encode(crate::directives::EncodeToml {
                encodings: raw.encode,
                minimum_length: raw.encode_minimum_length,
            }),
        });
    }
    let legacy_count = routes.len();
    for (j, r) in raw.route.iter().enumerate() {
        keys.push(format!("site[{i}].route[{j}]"));
        routes.push(r.clone());
    }
    // A path inside a route's table is the TOML tables' form only.
    for (n, r) in routes.iter().enumerate().skip(legacy_count) {
        let has_path = match &r.directive {
            DirectiveToml::Redir(t) => t.path.is_some(),
            DirectiveToml::Header(t) => t.path.is_some(),
            DirectiveToml::BasicAuth(t) => t.path.is_some(),
            DirectiveToml::ReverseProxy(t) => t.path.is_some(),
            _ => false,
        };
        if has_path {
            return Err(file.invalid(format!("{}.path", keys[n]), "write `match` in a route"));
        }
    }
    let mut b = Build::new(&raw.matchers, env, raw.addresses.join(" "), order);
    // Keys of compile errors are "route[N]..." over the list above: map N back.
    let locate = |e: BuildError| {
        let rest = e.key.strip_prefix("route[").unwrap_or("");
        let (n, tail) = rest.split_once(']').unwrap_or(("", ""));
        let key = match n.parse::<usize>().ok().and_then(|n| keys.get(n)) {
            Some(k) => format!("{k}{tail}"),
            None => format!("site[{i}].{}", e.key),
        };
        file.invalid(key, e.message)
    };
    let compiled = Routes::build(&routes, "route", true, &mut b).map_err(locate)?;
    let errors = if raw.handle_errors.is_empty() {
        None
    } else {
        Some(
            Routes::build(&raw.handle_errors, "handle_errors", true, &mut b)
                .map_err(|e| file.invalid(format!("site[{i}].{}", e.key), e.message))?,
        )
    };
    Ok(Chain {
        routes: compiled,
        errors,
        metrics: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ask_url_keeps_its_query_and_replaces_domain() {
        let ask = AskUrl::parse("http://127.0.0.1:5555/check?token=abc&domain=x").unwrap();
        assert_eq!(ask.path_and_query, "/check?token=abc&");
        assert_eq!(ask.host, "127.0.0.1:5555");
        let ask = AskUrl::parse("https://auth.example.org").unwrap();
        assert_eq!(ask.path_and_query, "/?");
        assert!(AskUrl::parse("ftp://x").is_err());
        assert!(AskUrl::parse("http://user@host/").is_err());
    }

    fn resolve_text(text: &str) -> Result<Config, ConfigError> {
        let path = Path::new("/etc/labkit/edge.toml");
        let raw: EdgeToml = labcore::config::parse_str(path, text)?;
        resolve(raw, &ConfigFile::new(path), &Env::default())
    }

    #[test]
    fn a_minimal_site_resolves_with_defaults() {
        let config = resolve_text(
            "[[site]]\naddresses = [\"localhost\"]\n[[site.reverse_proxy]]\nto = [\"127.0.0.1:8000\"]\n",
        )
        .unwrap();
        assert_eq!(config.http_port, 80);
        assert_eq!(config.https_port, 443);
        assert_eq!(config.limits, Limits::default());
        assert_eq!(config.sites[0].addresses[0].port, 443);
        assert_eq!(config.storage, PathBuf::from("/var/lib/labkit/edge"));
    }

    #[test]
    fn a_public_name_gets_acme_and_a_public_wildcard_is_refused() {
        let site = |addr: &str| {
            format!(
                "[[site]]\naddresses = [\"{addr}\"]\n[[site.reverse_proxy]]\nto = [\"localhost:7001\"]\n"
            )
        };
        let config = resolve_text(&site("lab.example.org")).unwrap();
        let host = &config.sites[0].addresses[0].host;
        assert_eq!(config.sites[0].tls_policy(host), TlsPolicy::Acme);
        assert_eq!(config.acme.directory, LETS_ENCRYPT);
        assert_eq!(config.acme.key_type, KeyType::P256);
        let err = resolve_text(&site("*.example.org")).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("site[0].addresses[0]"), "{text}");
        assert!(text.contains("DNS-01"), "{text}");
        assert_eq!(labcore::ExitStatus::exit(&err), labcore::Exit::Config);
    }

    #[test]
    fn acme_keys_resolve_and_bad_ones_name_their_key() {
        let config = resolve_text(
            "acme_ca = \"https://ca.test/dir\"\nkey_type = \"rsa2048\"\n[acme]\nchallenges = [\"tls-alpn-01\"]\nrenewal_window_ratio = 0.5\nretry_base = \"2s\"\n",
        )
        .unwrap();
        assert_eq!(config.acme.directory, "https://ca.test/dir");
        assert_eq!(config.acme.key_type, KeyType::Rsa2048);
        assert_eq!(config.acme.challenges, vec![Challenge::TlsAlpn01]);
        assert_eq!(config.acme.renewal_window_ratio, 0.5);
        assert_eq!(config.acme.retry_base, Duration::from_secs(2));
        for (text, key) in [
            ("acme_ca = \"http://ca.test/dir\"\n", "acme_ca"),
            ("key_type = \"rsa1024\"\n", "key_type"),
            ("[acme]\nchallenges = [\"dns-01\"]\n", "acme.challenges[0]"),
            (
                "[acme]\nrenewal_window_ratio = 1.5\n",
                "acme.renewal_window_ratio",
            ),
            ("[acme]\nretry_base = \"0s\"\n", "acme.retry_base"),
        ] {
            let err = resolve_text(text).unwrap_err();
            assert!(err.to_string().contains(key), "{key}: {err}");
        }
    }

    #[test]
    fn dns_tables_resolve_and_each_mistake_names_its_key() {
        let site =
            "[[site]]\naddresses = [\"*.example.org\"]\n[[site.reverse_proxy]]\nto = [\":1\"]\n";
        let config = resolve_text(&format!(
            "[acme.dns]\nprovider = \"rfc2136\"\nserver = \"127.0.0.1\"\nkey_name = \"k\"\nkey = \"c2VjcmV0\"\nresolvers = [\"127.0.0.1:5353\"]\n{site}"
        ))
        .unwrap();
        let dns = config.site_dns[0].as_ref().unwrap();
        assert_eq!(dns.provider.name(), "rfc2136");
        assert_eq!(dns.resolvers, ["127.0.0.1:5353".parse().unwrap()]);
        assert_eq!(dns.propagation_timeout, Some(Duration::from_secs(120)));
        let host = &config.sites[0].addresses[0].host;
        assert_eq!(config.sites[0].tls_policy(host), TlsPolicy::Acme);
        assert!(!format!("{config:?}").contains("c2VjcmV0"));
        for (text, key) in [
            ("[acme.dns]\nprovider = \"route53\"\n", "acme.dns.provider"),
            ("[acme.dns]\nprovider = \"cloudflare\"\n", "acme.dns.token"),
            (
                "[acme.dns]\nprovider = \"cloudflare\"\ntoken = \"t\"\nserver = \"x:53\"\n",
                "acme.dns.server",
            ),
            (
                "[acme.dns]\nprovider = \"rfc2136\"\nserver = \"x\"\nkey_name = \"k\"\nkey = \"%%\"\n",
                "acme.dns.key",
            ),
            (
                "[acme.dns]\nprovider = \"rfc2136\"\nserver = \"x\"\nkey_name = \"k\"\nkey = \"c2VjcmV0\"\nkey_alg = \"hmac-md5\"\n",
                "acme.dns.key_alg",
            ),
            (
                "[acme.dns]\nprovider = \"desec\"\ntoken = \"t\"\napi_url = \"http://desec.io/api\"\n",
                "acme.dns.api_url",
            ),
            ("[acme.dns]\nprovider = \"exec\"\n", "acme.dns.command"),
            (
                "[acme.dns]\nprovider = \"exec\"\ncommand = [\"/bin/true\"]\npropagation_timeout = \"soon\"\n",
                "acme.dns.propagation_timeout",
            ),
            (
                "[acme.dns]\nprovider = \"exec\"\ncommand = [\"/bin/true\"]\nresolvers = [\"dns.google\"]\n",
                "acme.dns.resolvers[0]",
            ),
        ] {
            let err = resolve_text(text).unwrap_err();
            assert!(err.to_string().contains(key), "{key}: {err}");
            assert_eq!(labcore::ExitStatus::exit(&err), labcore::Exit::Config);
        }
        // A site's table without a provider, and no global one.
        let err = resolve_text(&format!(
            "{site}[site.tls_dns]\npropagation_delay = \"1s\"\n"
        ))
        .unwrap_err();
        assert!(
            err.to_string().contains("site[0].tls_dns.provider"),
            "{err}"
        );
    }

    #[test]
    fn bad_durations_and_codes_name_their_key() {
        let err = resolve_text("[limits]\nidle_timeout = \"soon\"\n").unwrap_err();
        assert!(err.to_string().contains("limits.idle_timeout"), "{err}");
        let err = resolve_text(
            "[[site]]\naddresses = [\"localhost\"]\n[[site.redir]]\nto = \"/x\"\ncode = 200\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("site[0].redir[0]"), "{err}");
        assert!(
            err.to_string().contains("200 is not a redirect status"),
            "{err}"
        );
    }

    #[test]
    fn two_sites_on_one_address_are_refused() {
        let site = "[[site]]\naddresses = [\"localhost\"]\n[[site.reverse_proxy]]\nto = [\":1\"]\n";
        let err = resolve_text(&format!("{site}{site}")).unwrap_err();
        assert!(err.to_string().contains("also served by site[0]"), "{err}");
    }

    #[test]
    fn durations_read_like_caddys() {
        assert_eq!(parse_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("soon"), None);
        assert_eq!(parse_duration("-1s"), None);
    }
}
