//! The tunnel's config: rathole 0.5's TOML format key for key, plus a few labkit keys.
//!
//! The serde types mirror the file (`deny_unknown_fields`, so a typo is an error naming file,
//! line, column and key); [`load`] resolves them into [`ServerSettings`] or [`ClientSettings`],
//! which hold durations, secrets and defaults already applied. Tokens come inline, from
//! `token_file`, from a systemd credential named after the key, or from the table's
//! `default_token` (with the same three sources). A token shorter than 8 bytes is refused,
//! wherever it comes from ([`MIN_TOKEN_LEN`]).
//!
//! labkit additions (all optional): `token_file`, `default_token_file`, `handshake_timeout`
//! and `grace_period` (seconds), the server's `heartbeat_timeout` (seconds a heartbeat may go
//! unacknowledged before the client counts as dead; rathole's server has no such check), a
//! server service's `proxy_protocol = "v1" | "v2"` (rathole main's `enable_proxy_protocol =
//! true` is read as v1), `max_connections` and `idle_timeout` (seconds a visitor connection
//! may carry nothing before it is closed; default 3600, 0 for never), either side's `metrics_addr` (a Prometheus
//! endpoint), `local_private_key_file` for Noise, and for TLS the server's PEM `cert` and
//! `key` (instead of rathole's `pkcs12`) and `pkcs12_password_file`.
//!
//! For high availability (labkit only): the client's `remote_addr` may be a list of servers,
//! each given a control channel, and `mode = "active"` (the default: every server carries
//! visitors) or `"failover"` (only the first one up does); a server service's
//! `clients = "many"` lets several clients serve it at once, spread by `balance =
//! "round_robin"` (the default) or `"least_connections"`. Neither changes the wire: a rathole
//! peer sees an ordinary client or server. Instead of `remote_addr`, `[[client.servers]]`
//! lists servers each with its own `remote_addr`, `token` (proved by services without their
//! own, in place of `default_token`) and `transport` table (of any type; it replaces
//! `[client.transport]` for that server). A server service may name a `group`
//! (`[server.groups.NAME] token = ...`): its clients prove the group's token, and it takes
//! many of them.
//!
//! Declared services (labkit only, [`crate::declare`]): `[server.declared]` sets the policy
//! (`ports`, a list of ports and `"FIRST-LAST"` ranges; `types`; `max_services` per client,
//! 16 by default; `bind_ip`; `name_prefix`) and `[server.declared.clients.NAME]` each
//! client's token. A client names itself in `[client.declare]` (`name`, `token` or
//! `token_file`), and a client service with `bind_port` is declared under that identity.
//!
//! `type = "udp"` services are rathole's; `proxy_protocol`, `enable_proxy_protocol = true`,
//! `max_connections`, `clients = "many"` and `balance` are refused on them (a PROXY header
//! would have to prefix every datagram, which local UDP services do not expect; a UDP service
//! has sessions, not connections; and one data channel carries all its datagrams).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use labcore::config::{self, ConfigError, ConfigFile};
use labcore::{Env, Secret};
use serde::Deserialize;

use crate::declare::{self, Declaration, Policy, PortRange};
use crate::error::Error;
pub(crate) use crate::protocol::ServiceType;
use crate::protocol::{self, Digest};
use crate::proxy_protocol;

const DEFAULT_HEARTBEAT_INTERVAL: u64 = 30;
const DEFAULT_HEARTBEAT_TIMEOUT: u64 = 40;
const DEFAULT_RETRY_INTERVAL: u64 = 1;
const DEFAULT_HANDSHAKE_TIMEOUT: u64 = 10;
const DEFAULT_GRACE_PERIOD: u64 = 30;
/// Services one client may have declared at once, unless `max_services` says otherwise:
/// enough for a home server's handful, few enough that a leaked client token cannot open
/// hundreds of ports.
const DEFAULT_MAX_DECLARED: usize = 16;
/// A visitor connection with no byte either way for this long is closed (a TCP service's
/// `idle_timeout`; 0 turns it off). An hour: long enough for an interactive session left
/// open over lunch, short enough that connections whose peer vanished without a FIN do not
/// pile up for good.
const DEFAULT_IDLE_TIMEOUT: u64 = 3600;
/// The shortest token accepted, in bytes. A control channel proves its token with
/// sha256(token ‖ nonce), which crosses plain TCP in the clear, so a short token falls to
/// guessing offline from one recorded handshake, and an empty one (an empty `token_file`)
/// proves nothing. Eight bytes refuses the empty and the trivial without breaking the
/// configs people run: rathole's examples and the lab's (`change-me-ssh`) are longer.
const MIN_TOKEN_LEN: usize = 8;

/// The whole file: a `[server]` table, a `[client]` table, or both.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ConfigToml {
    server: Option<ServerToml>,
    client: Option<ClientToml>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerToml {
    bind_addr: String,
    default_token: Option<Secret>,
    default_token_file: Option<PathBuf>,
    #[serde(default)]
    services: BTreeMap<String, ServerServiceToml>,
    #[serde(default)]
    transport: TransportToml,
    heartbeat_interval: Option<u64>,
    heartbeat_timeout: Option<u64>,
    handshake_timeout: Option<u64>,
    grace_period: Option<u64>,
    metrics_addr: Option<String>,
    /// labkit: clients may declare their own services under this policy.
    declared: Option<DeclaredToml>,
    /// labkit: groups of clients that serve a service together, each with its own token.
    #[serde(default)]
    groups: BTreeMap<String, GroupToml>,
}

/// `[server.declared]`: the policy for services clients declare.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeclaredToml {
    ports: Vec<PortRangeToml>,
    types: Option<Vec<ServiceType>>,
    max_services: Option<usize>,
    bind_ip: Option<String>,
    name_prefix: Option<String>,
    #[serde(default)]
    clients: BTreeMap<String, TokenToml>,
}

/// A table holding only a token: a declaring client, a group.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenToml {
    token: Option<Secret>,
    token_file: Option<PathBuf>,
}

type GroupToml = TokenToml;

/// A port (`8022`) or an inclusive range (`"20000-20099"`); port 0 is refused where it is
/// read, so the error has its line.
#[derive(Debug)]
struct PortRangeToml(PortRange);

impl<'de> Deserialize<'de> for PortRangeToml {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = PortRangeToml;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a port (8022) or a range of ports (\"20000-20099\")")
            }
            fn visit_i64<E: serde::de::Error>(self, port: i64) -> Result<PortRangeToml, E> {
                let port = port_number::<E>(&port.to_string())?;
                Ok(PortRangeToml(PortRange {
                    first: port,
                    last: port,
                }))
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<PortRangeToml, E> {
                let (first, last) = text.split_once('-').unwrap_or((text, text));
                let (first, last) = (port_number::<E>(first)?, port_number::<E>(last)?);
                if first > last {
                    return Err(E::custom(format!(
                        "the range {text:?} ends before it starts"
                    )));
                }
                Ok(PortRangeToml(PortRange { first, last }))
            }
        }
        de.deserialize_any(Visitor)
    }
}

/// A port number from 1 to 65535.
fn port_number<E: serde::de::Error>(text: &str) -> Result<u16, E> {
    match text.trim().parse::<u16>() {
        Ok(0) => Err(E::custom("port 0 cannot be declared (it means any port)")),
        Ok(port) => Ok(port),
        Err(_) => Err(E::custom(format!("{text:?} is not a port from 1 to 65535"))),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerServiceToml {
    #[serde(rename = "type", default)]
    service_type: ServiceType,
    bind_addr: String,
    token: Option<Secret>,
    token_file: Option<PathBuf>,
    nodelay: Option<bool>,
    proxy_protocol: Option<ProxyProtocolToml>,
    /// rathole's unreleased main branch: `true` means v1.
    enable_proxy_protocol: Option<bool>,
    max_connections: Option<usize>,
    idle_timeout: Option<u64>,
    clients: Option<ClientsToml>,
    balance: Option<Balance>,
    /// labkit: the group of clients serving this service, whose token they prove.
    group: Option<String>,
}

/// `proxy_protocol = "v1" | "v2"`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum ProxyProtocolToml {
    V1,
    V2,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientToml {
    remote_addr: Option<RemoteAddrToml>,
    /// labkit: servers with their own transport and token, instead of `remote_addr`.
    servers: Option<Vec<ServerEntryToml>>,
    mode: Option<ServersMode>,
    /// labkit: the identity services with a `bind_port` are declared under.
    declare: Option<DeclareToml>,
    default_token: Option<Secret>,
    default_token_file: Option<PathBuf>,
    #[serde(default)]
    services: BTreeMap<String, ClientServiceToml>,
    #[serde(default)]
    transport: TransportToml,
    heartbeat_timeout: Option<u64>,
    retry_interval: Option<u64>,
    handshake_timeout: Option<u64>,
    grace_period: Option<u64>,
    metrics_addr: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientServiceToml {
    #[serde(rename = "type", default)]
    service_type: ServiceType,
    local_addr: String,
    token: Option<Secret>,
    token_file: Option<PathBuf>,
    nodelay: Option<bool>,
    retry_interval: Option<u64>,
    /// labkit: declare the service to the server, asking for this port.
    bind_port: Option<u16>,
}

/// `[[client.servers]]`: one server with, optionally, its own transport and token.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerEntryToml {
    remote_addr: String,
    token: Option<Secret>,
    token_file: Option<PathBuf>,
    transport: Option<TransportToml>,
}

/// `[client.declare]`: the client's name and token on servers with declared services.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeclareToml {
    name: String,
    token: Option<Secret>,
    token_file: Option<PathBuf>,
}

/// `remote_addr`: one server (rathole's) or a list of them (labkit's).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RemoteAddrToml {
    One(String),
    Many(Vec<String>),
}

/// How a client with several servers uses them: the `[client]` key `mode`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum ServersMode {
    /// Every server gets data channels: visitors come through all of them.
    #[default]
    Active,
    /// Every server has a control channel, but only the first one (in `remote_addr`'s order)
    /// whose control channel is open gets data channels; the others are hot standbys.
    Failover,
}

/// How a server spreads a service's visitors over its clients (`balance`).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Balance {
    /// Each client in turn.
    #[default]
    RoundRobin,
    /// The client with the fewest open visitor connections.
    LeastConnections,
}

/// Whether a server service takes one client (rathole's) or several at once (`clients`).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ClientsToml {
    /// A new control channel replaces the one before, as in rathole.
    #[default]
    One,
    /// Control channels add up; visitors are spread across them.
    Many,
}

/// The transport a tunnel's connections run on: rathole's `[*.transport] type`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum TransportType {
    /// Plain TCP.
    #[default]
    Tcp,
    /// TLS.
    Tls,
    /// Noise protocol.
    Noise,
    /// WebSocket.
    Websocket,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TransportToml {
    #[serde(rename = "type", default)]
    transport_type: TransportType,
    #[serde(default)]
    tcp: TcpToml,
    tls: Option<TlsToml>,
    noise: Option<NoiseToml>,
    websocket: Option<WebsocketToml>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TcpToml {
    nodelay: Option<bool>,
    keepalive_secs: Option<u64>,
    keepalive_interval: Option<u64>,
    /// A secret: the URL may carry the proxy's password.
    proxy: Option<Secret>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsToml {
    hostname: Option<String>,
    trusted_root: Option<PathBuf>,
    pkcs12: Option<PathBuf>,
    pkcs12_password: Option<Secret>,
    pkcs12_password_file: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoiseToml {
    pattern: Option<String>,
    local_private_key: Option<Secret>,
    local_private_key_file: Option<PathBuf>,
    remote_public_key: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WebsocketToml {
    tls: bool,
}

/// TCP socket options for the tunnel's own connections (control and data channels).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TcpSettings {
    /// TCP_NODELAY on the tunnel's connections.
    pub(crate) nodelay: bool,
    /// Idle time before TCP keepalive probes start.
    pub(crate) keepalive_time: Duration,
    /// Time between keepalive probes.
    pub(crate) keepalive_interval: Duration,
}

/// The transport, resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TransportSettings {
    /// Which transport.
    pub(crate) kind: TransportType,
    /// TCP options.
    pub(crate) tcp: TcpSettings,
    /// Noise options, for `type = "noise"`.
    pub(crate) noise: Option<NoiseSettings>,
    /// TLS options, for `type = "tls"` and WebSocket over TLS.
    pub(crate) tls: Option<TlsSettings>,
    /// WebSocket options, for `type = "websocket"`.
    pub(crate) websocket: Option<WebsocketSettings>,
    /// The proxy the client reaches the server through, if any.
    pub(crate) proxy: Option<ProxySettings>,
}

/// The TLS transport's settings for one side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum TlsSettings {
    /// The server: the certificate chain and key it presents.
    Server(TlsIdentity),
    /// The client: whom it trusts and the name it expects.
    Client {
        /// PEM file of the certificates (CAs or the server's own) to trust; `None` trusts
        /// the system's roots.
        trusted_root: Option<PathBuf>,
        /// The name the server's certificate must carry; `None` takes `remote_addr`'s host.
        hostname: Option<String>,
    },
}

/// Where a TLS server's certificate chain and private key come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum TlsIdentity {
    /// rathole's `pkcs12` and `pkcs12_password`.
    Pkcs12 {
        /// The PKCS#12 (`.p12`, `.pfx`) file.
        path: PathBuf,
        /// Its password.
        password: Secret,
    },
    /// labkit's `cert` and `key`: PEM files.
    Pem {
        /// The certificate chain, leaf first.
        cert: PathBuf,
        /// The private key (PKCS#8, PKCS#1 or SEC1).
        key: PathBuf,
    },
}

/// The WebSocket transport's settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct WebsocketSettings {
    /// WebSocket over TLS (`[transport.tls]`) rather than over plain TCP.
    pub(crate) tls: bool,
}

/// A proxy to reach the server through: `[client.transport.tcp] proxy`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ProxySettings {
    /// HTTP CONNECT or SOCKS5.
    pub(crate) kind: ProxyKind,
    /// The proxy's `HOST:PORT`.
    pub(crate) addr: String,
    /// User name and password, if the URL has them.
    pub(crate) auth: Option<(Secret, Secret)>,
}

/// Which proxy protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ProxyKind {
    /// `http://`: an HTTP `CONNECT` request.
    Http,
    /// `socks5://`: SOCKS5 `CONNECT` with the server's name resolved by the proxy.
    Socks5,
}

/// The Noise transport's settings, checked: the pattern parses and keys are 32 bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct NoiseSettings {
    /// The handshake pattern, rathole's default `Noise_NK_25519_ChaChaPoly_BLAKE2s`.
    pub(crate) pattern: String,
    /// This side's static private key (base64), if given.
    pub(crate) local_private_key: Option<Secret>,
    /// The peer's static public key (base64), if given.
    pub(crate) remote_public_key: Option<String>,
}

/// rathole's default Noise pattern.
pub(crate) const DEFAULT_NOISE_PATTERN: &str = "Noise_NK_25519_ChaChaPoly_BLAKE2s";

/// One service the server exposes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ServerService {
    /// The service's name (the key under `services`).
    pub(crate) name: String,
    /// sha256 of the name: how clients ask for it.
    pub(crate) digest: Digest,
    /// TCP connections or UDP datagrams.
    pub(crate) service_type: ServiceType,
    /// Where visitors connect.
    pub(crate) bind_addr: String,
    /// The shared token.
    pub(crate) token: Secret,
    /// TCP_NODELAY on this service's data channels and visitor connections.
    pub(crate) nodelay: bool,
    /// The PROXY protocol header the local service gets first, if any.
    pub(crate) proxy_protocol: Option<proxy_protocol::Version>,
    /// Visitor connections open at once, at most; more are closed on arrival. `None`: what
    /// the process's file limit allows (the server works it out).
    pub(crate) max_connections: Option<usize>,
    /// A visitor connection with no byte either way for this long is closed; `None`: never.
    pub(crate) idle_timeout: Option<Duration>,
    /// Several clients at once (`clients = "many"`) instead of the latest one only.
    pub(crate) many_clients: bool,
    /// How visitors are spread when several clients serve the service.
    pub(crate) balance: Balance,
    /// The group of clients serving it (`token` is the group's), if it names one.
    pub(crate) group: Option<String>,
}

/// `[server.declared]`, resolved: who may declare services and what they may declare.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DeclaredSettings {
    /// What a declaration may ask for.
    pub(crate) policy: Policy,
    /// The address declared services listen on.
    pub(crate) bind_ip: IpAddr,
    /// The declaring clients' tokens, by client name.
    pub(crate) clients: BTreeMap<String, Secret>,
}

impl DeclaredSettings {
    /// The service `declaration` of `client` becomes, once the policy allowed it: an
    /// ordinary TCP or UDP service with the defaults of one written in the config.
    pub(crate) fn service(
        &self,
        client: &str,
        declaration: &Declaration,
        token: Secret,
        nodelay: bool,
    ) -> ServerService {
        ServerService {
            name: declaration.name.clone(),
            digest: declare::service_digest(client, &declaration.name),
            service_type: declaration.service_type,
            bind_addr: SocketAddr::new(self.bind_ip, declaration.port).to_string(),
            token,
            nodelay,
            proxy_protocol: None,
            max_connections: None,
            idle_timeout: match declaration.service_type {
                ServiceType::Tcp => nonzero_secs(DEFAULT_IDLE_TIMEOUT),
                ServiceType::Udp => None,
            },
            many_clients: false,
            balance: Balance::RoundRobin,
            group: None,
        }
    }
}

/// The settings `[server]` and `[client]` have in common.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Common {
    /// The server: a client that leaves a heartbeat unacknowledged this long is dead
    /// (TCP_USER_TIMEOUT on the control channel). The client: a control channel with no
    /// command for this long is dead. `None`: never (TCP keepalive still runs).
    pub(crate) heartbeat_timeout: Option<Duration>,
    /// How long connecting and a new connection's handshake may take.
    pub(crate) handshake_timeout: Duration,
    /// How long open connections may run on after SIGTERM.
    pub(crate) grace_period: Duration,
    /// The transport.
    pub(crate) transport: TransportSettings,
    /// Where the Prometheus endpoint listens, if anywhere.
    pub(crate) metrics_addr: Option<String>,
}

impl Common {
    /// Whether going from `self` to `new` needs everything restarted: a change to any field
    /// does, except the grace period, which applies from the next shutdown on. Compared as a
    /// whole, so a field added later restarts everything unless it is exempted here.
    fn needs_restart(&self, new: &Common) -> bool {
        let exempt = Common {
            grace_period: new.grace_period,
            ..self.clone()
        };
        exempt != *new
    }
}

/// A resolved `[server]` table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ServerSettings {
    /// The control port.
    pub(crate) bind_addr: String,
    /// Heartbeat period on control channels; `None` disables heartbeats.
    pub(crate) heartbeat_interval: Option<Duration>,
    /// What both sides have.
    pub(crate) common: Common,
    /// Services by name.
    pub(crate) services: BTreeMap<String, ServerService>,
    /// Whether clients may declare services, and the policy they are held to.
    pub(crate) declared: Option<DeclaredSettings>,
}

impl ServerSettings {
    /// Whether `new` changes settings outside the services, so that applying it means
    /// restarting everything (the services alone are applied one by one).
    pub(crate) fn needs_restart(&self, new: &ServerSettings) -> bool {
        // Destructured so that a field added to one side must be placed here.
        let ServerSettings {
            bind_addr,
            heartbeat_interval,
            common,
            services: _,
            declared,
        } = new;
        self.bind_addr != *bind_addr
            || self.heartbeat_interval != *heartbeat_interval
            || self.common.needs_restart(common)
            || self.declared != *declared
    }
}

/// One service the client forwards to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ClientService {
    /// The service's name.
    pub(crate) name: String,
    /// TCP connections or UDP datagrams.
    pub(crate) service_type: ServiceType,
    /// The local address the service listens on.
    pub(crate) local_addr: String,
    /// Its own token; without one, the server's or the table's default is proved.
    pub(crate) token: Option<Secret>,
    /// Declared to the server (under `[client.declare]`), asking for this port.
    pub(crate) bind_port: Option<u16>,
    /// TCP_NODELAY on this service's data channels and local connections.
    pub(crate) nodelay: bool,
    /// The longest pause between reconnection attempts.
    pub(crate) retry_interval: Duration,
}

/// One server of a client: `remote_addr`'s, or a `[[client.servers]]` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ServerEntry {
    /// Its control port.
    pub(crate) addr: String,
    /// The token proved there by services without their own (in place of `default_token`).
    pub(crate) token: Option<Secret>,
    /// How to reach it: its own `transport` table, or the client's.
    pub(crate) transport: TransportSettings,
}

/// `[client.declare]`, resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ClientIdentity {
    /// The name the server knows this client by.
    pub(crate) name: String,
    /// The client token, if given here (else a server's token or `default_token`).
    pub(crate) token: Option<Secret>,
}

/// A resolved `[client]` table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ClientSettings {
    /// The servers, in order of preference (at least one).
    pub(crate) servers: Vec<ServerEntry>,
    /// How the servers share the visitors.
    pub(crate) mode: ServersMode,
    /// The token of services with none of their own, where the server has none either.
    pub(crate) default_token: Option<Secret>,
    /// The identity declared services are declared under.
    pub(crate) declare: Option<ClientIdentity>,
    /// What both sides have.
    pub(crate) common: Common,
    /// Services by name.
    pub(crate) services: BTreeMap<String, ClientService>,
}

impl ClientSettings {
    /// Whether `new` changes settings outside the services, so that applying it means
    /// restarting everything.
    pub(crate) fn needs_restart(&self, new: &ClientSettings) -> bool {
        let ClientSettings {
            servers,
            mode,
            default_token,
            declare,
            common,
            services: _,
        } = new;
        self.servers != *servers
            || self.mode != *mode
            || self.default_token != *default_token
            || self.declare != *declare
            || self.common.needs_restart(common)
    }

    /// The token `service` proves to server `index`: its own, else that server's, else the
    /// default (for a declared service: the client token, else the server's, else the
    /// default). `resolve` made sure one exists.
    pub(crate) fn token(&self, service: &ClientService, index: usize) -> Secret {
        let own = match (&service.bind_port, &self.declare) {
            (Some(_), Some(identity)) => identity.token.as_ref(),
            _ => service.token.as_ref(),
        };
        own.or(self.servers.get(index).and_then(|s| s.token.as_ref()))
            .or(self.default_token.as_ref())
            .cloned()
            .unwrap_or_else(|| Secret::new(String::new()))
    }
}

/// What a reload does to the running services: the names a new config changes or removes
/// (to stop), each with whether it is removed (its metrics go too). Services the new config
/// adds, or that were just stopped for a change, are the ones then not running.
pub(crate) fn stale_services<'a, S: PartialEq + 'a>(
    running: impl IntoIterator<Item = (&'a String, &'a S)>,
    new: &BTreeMap<String, S>,
) -> Vec<(String, bool)> {
    running
        .into_iter()
        .filter(|(name, service)| new.get(*name) != Some(*service))
        .map(|(name, _)| (name.clone(), !new.contains_key(name)))
        .collect()
}

/// Which side a config is run as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// `[server]`.
    Server,
    /// `[client]`.
    Client,
}

/// A config resolved for one mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Settings {
    /// A server.
    Server(ServerSettings),
    /// A client.
    Client(ClientSettings),
}

/// Reads `path` and resolves the table for `mode`, or for the only table there when `mode` is
/// `None`.
pub(crate) fn load(path: &Path, env: &Env, mode: Option<Mode>) -> Result<Settings, Error> {
    let (raw, file): (ConfigToml, _) = config::load(path)?;
    resolve(raw, &file, env, mode)
}

/// Reads `path` and resolves every table in it (for `tunnel check`).
pub(crate) fn load_all(path: &Path, env: &Env) -> Result<Vec<Settings>, Error> {
    let (raw, file): (ConfigToml, _) = config::load(path)?;
    let mut out = Vec::new();
    if let Some(server) = raw.server {
        out.push(Settings::Server(resolve_server(server, &file, env)?));
    }
    if let Some(client) = raw.client {
        out.push(Settings::Client(resolve_client(client, &file, env)?));
    }
    if out.is_empty() {
        return Err(no_table(path));
    }
    Ok(out)
}

fn no_table(path: &Path) -> Error {
    Error::Mode {
        path: path.to_owned(),
        message: "neither a [server] nor a [client] table".into(),
    }
}

/// Resolves parsed text (the part of [`load`] after reading the file).
pub(crate) fn resolve(
    raw: ConfigToml,
    file: &ConfigFile,
    env: &Env,
    mode: Option<Mode>,
) -> Result<Settings, Error> {
    let path = file.path();
    let mode = match (mode, &raw.server, &raw.client) {
        (Some(mode), _, _) => mode,
        (None, Some(_), None) => Mode::Server,
        (None, None, Some(_)) => Mode::Client,
        (None, Some(_), Some(_)) => {
            return Err(Error::Mode {
                path: path.to_owned(),
                message: "has both [server] and [client]: run `tunnel server` or `tunnel client`"
                    .into(),
            });
        }
        (None, None, None) => return Err(no_table(path)),
    };
    match mode {
        Mode::Server => match raw.server {
            Some(server) => Ok(Settings::Server(resolve_server(server, file, env)?)),
            None => Err(Error::Mode {
                path: path.to_owned(),
                message: "no [server] table".into(),
            }),
        },
        Mode::Client => match raw.client {
            Some(client) => Ok(Settings::Client(resolve_client(client, file, env)?)),
            None => Err(Error::Mode {
                path: path.to_owned(),
                message: "no [client] table".into(),
            }),
        },
    }
}

fn resolve_server(raw: ServerToml, file: &ConfigFile, env: &Env) -> Result<ServerSettings, Error> {
    check_addr(file, "server.bind_addr", &raw.bind_addr)?;
    let transport = resolve_transport(raw.transport, file, env, "server")?;
    let default_token = default_token(
        file,
        env,
        "server",
        raw.default_token,
        raw.default_token_file,
    )?;
    let mut groups = BTreeMap::new();
    for (name, group) in raw.groups {
        let key = format!("server.groups.{name}");
        let token = token(file, env, &key, group.token, group.token_file, &None)?;
        groups.insert(name, token);
    }
    let mut services = BTreeMap::new();
    for (name, service) in raw.services {
        let key = format!("server.services.{name}");
        check_addr(file, &format!("{key}.bind_addr"), &service.bind_addr)?;
        check_udp_service(file, &key, &service)?;
        let token = match &service.group {
            None => token(
                file,
                env,
                &key,
                service.token,
                service.token_file,
                &default_token,
            )?,
            Some(group) => group_token(file, &key, &service, group, &groups)?,
        };
        services.insert(
            name.clone(),
            ServerService {
                digest: protocol::service_digest(&name),
                name,
                service_type: service.service_type,
                bind_addr: service.bind_addr,
                token,
                nodelay: service.nodelay.unwrap_or(transport.tcp.nodelay),
                proxy_protocol: proxy_protocol_version(
                    file,
                    &key,
                    service.proxy_protocol,
                    service.enable_proxy_protocol,
                )?,
                max_connections: match service.max_connections {
                    Some(0) => {
                        return Err(file
                            .invalid(
                                format!("{key}.max_connections"),
                                "must be at least 1 (leave it out for no limit)",
                            )
                            .into());
                    }
                    max => max,
                },
                idle_timeout: nonzero_secs(service.idle_timeout.unwrap_or(DEFAULT_IDLE_TIMEOUT)),
                many_clients: service.group.is_some()
                    || service.clients.unwrap_or_default() == ClientsToml::Many,
                balance: service.balance.unwrap_or_default(),
                group: service.group,
            },
        );
    }
    let declared = match raw.declared {
        Some(declared) => Some(resolve_declared(declared, file, env, &default_token)?),
        None => None,
    };
    Ok(ServerSettings {
        bind_addr: raw.bind_addr,
        heartbeat_interval: nonzero_secs(
            raw.heartbeat_interval.unwrap_or(DEFAULT_HEARTBEAT_INTERVAL),
        ),
        common: Common {
            heartbeat_timeout: nonzero_secs(
                raw.heartbeat_timeout.unwrap_or(DEFAULT_HEARTBEAT_TIMEOUT),
            ),
            handshake_timeout: timeout_secs(
                file,
                "server.handshake_timeout",
                raw.handshake_timeout,
            )?,
            grace_period: Duration::from_secs(raw.grace_period.unwrap_or(DEFAULT_GRACE_PERIOD)),
            transport,
            metrics_addr: metrics_addr(file, "server.metrics_addr", raw.metrics_addr)?,
        },
        services,
        declared,
    })
}

/// The token of a service that names `group`: the group's. A group stands for several
/// clients, so the service takes many; its own token or `clients = "one"` contradicts that.
fn group_token(
    file: &ConfigFile,
    key: &str,
    service: &ServerServiceToml,
    group: &str,
    groups: &BTreeMap<String, Secret>,
) -> Result<Secret, Error> {
    if service.token.is_some() || service.token_file.is_some() {
        return Err(file
            .invalid(
                format!("{key}.token"),
                format!("the service names group {group:?}: its clients prove the group's token, so give none here"),
            )
            .into());
    }
    if service.clients == Some(ClientsToml::One) {
        return Err(file
            .invalid(
                format!("{key}.clients"),
                "a service with a group takes the group's many clients",
            )
            .into());
    }
    match groups.get(group) {
        Some(token) => Ok(token.clone()),
        None => Err(file
            .invalid(
                format!("{key}.group"),
                format!("no [server.groups.{group}] table gives this group a token"),
            )
            .into()),
    }
}

/// Resolves `[server.declared]`: at least one port and one client, each client named as a
/// service may be and with a token of its own (or `default_token`).
fn resolve_declared(
    raw: DeclaredToml,
    file: &ConfigFile,
    env: &Env,
    default_token: &Option<Secret>,
) -> Result<DeclaredSettings, Error> {
    let key = "server.declared";
    if raw.ports.is_empty() {
        return Err(file
            .invalid(
                format!("{key}.ports"),
                "allows no port: give at least one port or range",
            )
            .into());
    }
    if raw.clients.is_empty() {
        return Err(file
            .invalid(
                format!("{key}.clients"),
                "names no client: add [server.declared.clients.NAME] with the client's token",
            )
            .into());
    }
    let max_services = match raw.max_services {
        Some(0) => {
            return Err(file
                .invalid(format!("{key}.max_services"), "must be at least 1")
                .into());
        }
        Some(max) => max,
        None => DEFAULT_MAX_DECLARED,
    };
    let bind_ip = match raw.bind_ip.as_deref() {
        None => IpAddr::from([0, 0, 0, 0]),
        Some(ip) => ip.parse().map_err(|_| {
            file.invalid(
                format!("{key}.bind_ip"),
                format!("{ip:?} is not an IP address"),
            )
        })?,
    };
    let name_prefix = raw.name_prefix.unwrap_or_default();
    if !name_prefix.is_empty()
        && let Err(why) = declare::valid_name(&name_prefix)
    {
        return Err(file
            .invalid(format!("{key}.name_prefix"), why.replace("name", "prefix"))
            .into());
    }
    let mut clients = BTreeMap::new();
    for (name, client) in raw.clients {
        let client_key = format!("{key}.clients.{name}");
        if let Err(why) = declare::valid_name(&name) {
            return Err(file.invalid(client_key, why).into());
        }
        let token = token(
            file,
            env,
            &client_key,
            client.token,
            client.token_file,
            default_token,
        )?;
        clients.insert(name, token);
    }
    Ok(DeclaredSettings {
        policy: Policy {
            ports: raw.ports.into_iter().map(|p| p.0).collect(),
            types: raw
                .types
                .unwrap_or_else(|| vec![ServiceType::Tcp, ServiceType::Udp]),
            max_services,
            name_prefix,
        },
        bind_ip,
        clients,
    })
}

fn resolve_client(raw: ClientToml, file: &ConfigFile, env: &Env) -> Result<ClientSettings, Error> {
    let transport = resolve_transport(raw.transport, file, env, "client")?;
    let servers = resolve_servers(raw.remote_addr, raw.servers, &transport, file, env)?;
    let default_token = default_token(
        file,
        env,
        "client",
        raw.default_token,
        raw.default_token_file,
    )?;
    let declare = match raw.declare {
        Some(declare) => {
            if let Err(why) = declare::valid_name(&declare.name) {
                return Err(file.invalid("client.declare.name", why).into());
            }
            let token = file.secret(
                env,
                "client.declare.token",
                declare.token,
                declare.token_file.as_deref(),
            )?;
            if let Some(token) = &token {
                check_token(file, "client.declare.token".into(), token)?;
            }
            Some(ClientIdentity {
                name: declare.name,
                token,
            })
        }
        None => None,
    };
    // Whether every server has a token for a service without its own.
    let fallback = default_token.is_some() || servers.iter().all(|s| s.token.is_some());
    let retry_default = raw.retry_interval.unwrap_or(DEFAULT_RETRY_INTERVAL);
    let mut services = BTreeMap::new();
    for (name, service) in raw.services {
        let key = format!("client.services.{name}");
        check_addr(file, &format!("{key}.local_addr"), &service.local_addr)?;
        let token_key = format!("{key}.token");
        let token = file.secret(
            env,
            &token_key,
            service.token,
            service.token_file.as_deref(),
        )?;
        if let Some(token) = &token {
            check_token(file, token_key.clone(), token)?;
        }
        if let Some(port) = service.bind_port {
            let Some(identity) = &declare else {
                return Err(file
                    .invalid(
                        format!("{key}.bind_port"),
                        "a declared service needs a [client.declare] table naming this client",
                    )
                    .into());
            };
            if port == 0 {
                return Err(file
                    .invalid(format!("{key}.bind_port"), "must be a port from 1 to 65535")
                    .into());
            }
            if let Err(why) = declare::valid_name(&name) {
                return Err(file
                    .invalid(key, format!("cannot be declared: {why}"))
                    .into());
            }
            if token.is_some() {
                return Err(file
                    .invalid(
                        token_key,
                        "a declared service proves the client token of [client.declare]: give none here",
                    )
                    .into());
            }
            if identity.token.is_none() && !fallback {
                return Err(file
                    .invalid(
                        "client.declare.token",
                        "no token: give token, token_file, a systemd credential of that name, \
                         a token for every server, or default_token",
                    )
                    .into());
            }
        } else if token.is_none() && !fallback {
            return Err(file
                .invalid(
                    token_key,
                    "no token: give token, token_file, a systemd credential of that name, or \
                     default_token",
                )
                .into());
        }
        services.insert(
            name.clone(),
            ClientService {
                name,
                service_type: service.service_type,
                local_addr: service.local_addr,
                token,
                bind_port: service.bind_port,
                nodelay: service.nodelay.unwrap_or(transport.tcp.nodelay),
                // A zero interval would retry in a busy loop.
                retry_interval: Duration::from_secs(
                    service.retry_interval.unwrap_or(retry_default).max(1),
                ),
            },
        );
    }
    Ok(ClientSettings {
        servers,
        mode: raw.mode.unwrap_or_default(),
        default_token,
        declare,
        common: Common {
            heartbeat_timeout: nonzero_secs(
                raw.heartbeat_timeout.unwrap_or(DEFAULT_HEARTBEAT_TIMEOUT),
            ),
            handshake_timeout: timeout_secs(
                file,
                "client.handshake_timeout",
                raw.handshake_timeout,
            )?,
            grace_period: Duration::from_secs(raw.grace_period.unwrap_or(DEFAULT_GRACE_PERIOD)),
            transport,
            metrics_addr: metrics_addr(file, "client.metrics_addr", raw.metrics_addr)?,
        },
        services,
    })
}

/// The client's servers from `remote_addr` (one or a list, with the client's transport and
/// tokens) or from `[[client.servers]]` (each with its own, if given); one of the two, at
/// least one server, none twice.
fn resolve_servers(
    remote_addr: Option<RemoteAddrToml>,
    entries: Option<Vec<ServerEntryToml>>,
    transport: &TransportSettings,
    file: &ConfigFile,
    env: &Env,
) -> Result<Vec<ServerEntry>, Error> {
    let (key, servers) = match (remote_addr, entries) {
        (Some(_), Some(_)) => {
            return Err(file
                .invalid(
                    "client.servers",
                    "give either remote_addr or [[client.servers]], not both",
                )
                .into());
        }
        (None, None) => {
            return Err(file
                .invalid(
                    "client.remote_addr",
                    "names no server: give remote_addr or [[client.servers]]",
                )
                .into());
        }
        (Some(addrs), None) => {
            let addrs = match addrs {
                RemoteAddrToml::One(addr) => vec![addr],
                RemoteAddrToml::Many(addrs) => addrs,
            };
            let servers = addrs
                .into_iter()
                .map(|addr| ServerEntry {
                    addr,
                    token: None,
                    transport: transport.clone(),
                })
                .collect();
            ("client.remote_addr", servers)
        }
        (None, Some(entries)) => {
            let mut servers = Vec::with_capacity(entries.len());
            for (i, entry) in entries.into_iter().enumerate() {
                let key = format!("client.servers.{i}");
                let token = file.secret(
                    env,
                    &format!("{key}.token"),
                    entry.token,
                    entry.token_file.as_deref(),
                )?;
                if let Some(token) = &token {
                    check_token(file, format!("{key}.token"), token)?;
                }
                let own = match entry.transport {
                    Some(raw) => resolve_transport(raw, file, env, &key)?,
                    None => transport.clone(),
                };
                servers.push(ServerEntry {
                    addr: entry.remote_addr,
                    token,
                    transport: own,
                });
            }
            ("client.servers", servers)
        }
    };
    if servers.is_empty() {
        return Err(file
            .invalid(key, "names no server: give at least one")
            .into());
    }
    for (i, server) in servers.iter().enumerate() {
        if servers[..i].iter().any(|s| s.addr == server.addr) {
            return Err(file
                .invalid(key, format!("names {} twice", server.addr))
                .into());
        }
        check_addr(file, key, &server.addr)?;
    }
    Ok(servers)
}

fn metrics_addr(
    file: &ConfigFile,
    key: &str,
    addr: Option<String>,
) -> Result<Option<String>, ConfigError> {
    if let Some(addr) = &addr {
        check_addr(file, key, addr)?;
    }
    Ok(addr)
}

fn resolve_transport(
    raw: TransportToml,
    file: &ConfigFile,
    env: &Env,
    side: &str,
) -> Result<TransportSettings, Error> {
    let kind = raw.transport_type;
    let noise = match kind {
        TransportType::Noise => Some(resolve_noise(
            raw.noise.unwrap_or_default(),
            file,
            env,
            side,
        )?),
        _ => None,
    };
    let websocket = match (kind, raw.websocket) {
        (TransportType::Websocket, Some(ws)) => Some(WebsocketSettings { tls: ws.tls }),
        (TransportType::Websocket, None) => {
            return Err(file
                .invalid(
                    format!("{side}.transport.websocket"),
                    "type = \"websocket\" needs a [transport.websocket] table with tls = true or false",
                )
                .into());
        }
        _ => None,
    };
    let tls = match kind {
        TransportType::Tls => true,
        TransportType::Websocket => websocket.is_some_and(|ws| ws.tls),
        _ => false,
    };
    let tls = if tls {
        Some(resolve_tls(raw.tls.unwrap_or_default(), file, env, side)?)
    } else {
        None
    };
    // Only the client connects out; a server's proxy key is ignored, as rathole does.
    let proxy = match raw.tcp.proxy {
        Some(url) if side.starts_with("client") => Some(resolve_proxy(&url, file, side)?),
        _ => None,
    };
    Ok(TransportSettings {
        kind,
        noise,
        tls,
        websocket,
        proxy,
        tcp: TcpSettings {
            nodelay: raw.tcp.nodelay.unwrap_or(true),
            keepalive_time: Duration::from_secs(raw.tcp.keepalive_secs.unwrap_or(20).max(1)),
            keepalive_interval: Duration::from_secs(raw.tcp.keepalive_interval.unwrap_or(8).max(1)),
        },
    })
}

fn resolve_tls(
    raw: TlsToml,
    file: &ConfigFile,
    env: &Env,
    side: &str,
) -> Result<TlsSettings, Error> {
    let key = |name: &str| format!("{side}.transport.tls.{name}");
    let settings = if side == "server" {
        let password = file.secret(
            env,
            &key("pkcs12_password"),
            raw.pkcs12_password,
            raw.pkcs12_password_file.as_deref(),
        )?;
        let identity = match (raw.pkcs12, raw.cert, raw.key) {
            (Some(path), None, None) => TlsIdentity::Pkcs12 {
                path: file.resolve_path(&path),
                // rathole requires the key; an unprotected file has the empty password.
                password: password.unwrap_or_else(|| Secret::new(String::new())),
            },
            (None, Some(cert), Some(pem_key)) => TlsIdentity::Pem {
                cert: file.resolve_path(&cert),
                key: file.resolve_path(&pem_key),
            },
            (None, Some(_), None) => {
                return Err(file.invalid(key("key"), "cert is given without key").into());
            }
            (None, None, Some(_)) => {
                return Err(file
                    .invalid(key("cert"), "key is given without cert")
                    .into());
            }
            (Some(_), _, _) => {
                return Err(file
                    .invalid(
                        key("pkcs12"),
                        "give either pkcs12 or cert and key, not both",
                    )
                    .into());
            }
            (None, None, None) => {
                return Err(file
                    .invalid(
                        key("pkcs12"),
                        "a TLS server needs its certificate: give pkcs12 (and pkcs12_password) \
                         or cert and key (PEM files)",
                    )
                    .into());
            }
        };
        TlsSettings::Server(identity)
    } else {
        TlsSettings::Client {
            trusted_root: raw.trusted_root.map(|path| file.resolve_path(&path)),
            hostname: raw.hostname,
        }
    };
    // Whether the files load is checked by `transport::check`.
    Ok(settings)
}

/// Parses `http://[user:pass@]host:port` or `socks5://…`. Errors never repeat the URL, which
/// may hold a password.
fn resolve_proxy(url: &Secret, file: &ConfigFile, side: &str) -> Result<ProxySettings, Error> {
    let key = format!("{side}.transport.tcp.proxy");
    let invalid = |message: &str| Error::from(file.invalid(key.clone(), message.to_owned()));
    let url = url.expose();
    let (kind, rest) = if let Some(rest) = url.strip_prefix("http://") {
        (ProxyKind::Http, rest)
    } else if let Some(rest) = url.strip_prefix("socks5://") {
        (ProxyKind::Socks5, rest)
    } else {
        return Err(invalid(
            "must start with http:// (HTTP CONNECT) or socks5:// (SOCKS5)",
        ));
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let (auth, addr) = match rest.rsplit_once('@') {
        Some((auth, addr)) => {
            let (user, pass) = auth.split_once(':').unwrap_or((auth, ""));
            let decode = |part: &str| {
                percent_encoding::percent_decode_str(part)
                    .decode_utf8()
                    .map(|text| Secret::new(text.into_owned()))
                    .map_err(|_| {
                        invalid("the user name or password is not valid percent-encoded UTF-8")
                    })
            };
            (Some((decode(user)?, decode(pass)?)), addr)
        }
        None => (None, rest),
    };
    if addr.contains('/') || addr.contains('?') {
        return Err(invalid(
            "must be scheme://[user:password@]host:port with nothing after the port",
        ));
    }
    check_addr(file, &key, addr).map_err(|_| invalid("the proxy's address is not host:port"))?;
    Ok(ProxySettings {
        kind,
        addr: addr.to_owned(),
        auth,
    })
}

fn resolve_noise(
    raw: NoiseToml,
    file: &ConfigFile,
    env: &Env,
    side: &str,
) -> Result<NoiseSettings, Error> {
    let key = |name: &str| format!("{side}.transport.noise.{name}");
    let pattern = raw
        .pattern
        .unwrap_or_else(|| DEFAULT_NOISE_PATTERN.to_owned());
    let local_private_key = file.secret(
        env,
        &key("local_private_key"),
        raw.local_private_key,
        raw.local_private_key_file.as_deref(),
    )?;
    // Whether a handshake can be built from these is checked by `transport::check`.
    Ok(NoiseSettings {
        pattern,
        local_private_key,
        remote_public_key: raw.remote_public_key,
    })
}

/// Refuses the TCP-only keys on a UDP service, naming the key.
fn check_udp_service(
    file: &ConfigFile,
    key: &str,
    service: &ServerServiceToml,
) -> Result<(), ConfigError> {
    if service.service_type != ServiceType::Udp {
        return Ok(());
    }
    let refuse = |name: &str, why: &str| {
        Err(file.invalid(format!("{key}.{name}"), format!("a udp service {why}")))
    };
    if service.proxy_protocol.is_some() || service.enable_proxy_protocol == Some(true) {
        let name = match service.proxy_protocol {
            Some(_) => "proxy_protocol",
            None => "enable_proxy_protocol",
        };
        return refuse(
            name,
            "cannot send a PROXY protocol header (it is for tcp services only)",
        );
    }
    if service.max_connections.is_some() {
        return refuse(
            "max_connections",
            "has no connections to limit (it is for tcp services only)",
        );
    }
    if service.clients == Some(ClientsToml::Many)
        || service.balance.is_some()
        || service.group.is_some()
    {
        let name = match (&service.balance, &service.group) {
            (Some(_), _) => "balance",
            (None, Some(_)) => "group",
            (None, None) => "clients",
        };
        return refuse(
            name,
            "is carried by one data channel at a time (clients = \"many\" is for tcp services only)",
        );
    }
    if service.idle_timeout.is_some() {
        return refuse(
            "idle_timeout",
            "closes sessions idle for 60 s on its own (idle_timeout is for tcp services only)",
        );
    }
    Ok(())
}

/// The header version from `proxy_protocol`, or from rathole main's `enable_proxy_protocol`.
fn proxy_protocol_version(
    file: &ConfigFile,
    key: &str,
    version: Option<ProxyProtocolToml>,
    enable: Option<bool>,
) -> Result<Option<proxy_protocol::Version>, ConfigError> {
    match (version, enable) {
        (Some(_), Some(_)) => Err(file.invalid(
            format!("{key}.enable_proxy_protocol"),
            "give proxy_protocol = \"v1\" or \"v2\", or enable_proxy_protocol, not both",
        )),
        (Some(ProxyProtocolToml::V1), None) | (None, Some(true)) => {
            Ok(Some(proxy_protocol::Version::V1))
        }
        (Some(ProxyProtocolToml::V2), None) => Ok(Some(proxy_protocol::Version::V2)),
        (None, Some(false) | None) => Ok(None),
    }
}

/// A service's token from `token`, `token_file`, the systemd credential named after the key,
/// or else the table's default; refused if shorter than [`MIN_TOKEN_LEN`].
fn token(
    file: &ConfigFile,
    env: &Env,
    key: &str,
    inline: Option<Secret>,
    token_file: Option<PathBuf>,
    default: &Option<Secret>,
) -> Result<Secret, Error> {
    let token_key = format!("{key}.token");
    let from_file = token_file.is_some();
    match file.secret(env, &token_key, inline, token_file.as_deref())? {
        Some(token) => {
            let culprit = if from_file {
                format!("{token_key}_file")
            } else {
                token_key
            };
            check_token(file, culprit, &token)?;
            Ok(token)
        }
        None => default.clone().ok_or_else(|| {
            Error::from(file.invalid(
                token_key,
                "no token: give token, token_file, a systemd credential of that name, or \
                 default_token",
            ))
        }),
    }
}

/// A table's `default_token` from its three sources, checked like a service's own.
fn default_token(
    file: &ConfigFile,
    env: &Env,
    side: &str,
    inline: Option<Secret>,
    token_file: Option<PathBuf>,
) -> Result<Option<Secret>, Error> {
    let key = format!("{side}.default_token");
    let from_file = token_file.is_some();
    let token = file.secret(env, &key, inline, token_file.as_deref())?;
    if let Some(token) = &token {
        let culprit = if from_file {
            format!("{key}_file")
        } else {
            key
        };
        check_token(file, culprit, token)?;
    }
    Ok(token)
}

/// Refuses an empty or short token, naming the key it came from (never its value).
fn check_token(file: &ConfigFile, key: String, token: &Secret) -> Result<(), ConfigError> {
    let len = token.expose().len();
    if len >= MIN_TOKEN_LEN {
        return Ok(());
    }
    let what = if len == 0 {
        "the token is empty".to_owned()
    } else {
        format!("the token is {len} bytes long")
    };
    Err(file.invalid(
        key,
        format!(
            "{what}: a token needs at least {MIN_TOKEN_LEN} bytes, since a short one can be \
             guessed from a single recorded handshake"
        ),
    ))
}

/// Checks that an address looks like `HOST:PORT` (the host is resolved when used).
fn check_addr(file: &ConfigFile, key: &str, addr: &str) -> Result<(), ConfigError> {
    let port = addr
        .rsplit_once(':')
        .map(|(host, port)| (host, port.parse::<u16>()));
    match port {
        Some((host, Ok(_))) if !host.is_empty() => Ok(()),
        _ => Err(file.invalid(key, format!("{addr:?} is not HOST:PORT"))),
    }
}

fn nonzero_secs(secs: u64) -> Option<Duration> {
    (secs > 0).then(|| Duration::from_secs(secs))
}

fn timeout_secs(file: &ConfigFile, key: &str, secs: Option<u64>) -> Result<Duration, ConfigError> {
    match secs.unwrap_or(DEFAULT_HANDSHAKE_TIMEOUT) {
        0 => Err(file.invalid(key, "must be at least 1 second")),
        secs => Ok(Duration::from_secs(secs)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses and resolves `text`, then checks its transport as loading does.
    fn parse(text: &str, mode: Option<Mode>) -> Result<Settings, Error> {
        let path = Path::new("/etc/labkit/tunnel.toml");
        let raw: ConfigToml = config::parse_str(path, text)?;
        let settings = resolve(raw, &ConfigFile::new(path), &Env::default(), mode)?;
        crate::transport::check(&settings, path)?;
        Ok(settings)
    }

    #[test]
    fn every_setting_outside_the_services_but_the_grace_period_needs_a_restart() {
        let base = "[server]\nbind_addr = \"0.0.0.0:1\"\ndefault_token = \"t-long-enough\"\n";
        let old = server(base);
        let with = |line: &str| server(&format!("{base}{line}\n"));
        assert!(!old.needs_restart(&with("grace_period = 5")));
        assert!(!old.needs_restart(&with("[server.services.a]\nbind_addr = \"0.0.0.0:2\"")));
        for line in [
            "heartbeat_interval = 5",
            "heartbeat_timeout = 5",
            "handshake_timeout = 5",
            "metrics_addr = \"127.0.0.1:9\"",
            "[server.transport.tcp]\nkeepalive_secs = 5",
        ] {
            assert!(old.needs_restart(&with(line)), "{line}");
        }
        assert!(old.needs_restart(&server(
            "[server]\nbind_addr = \"0.0.0.0:3\"\ndefault_token = \"t-long-enough\"\n"
        )));
        let client = |line: &str| {
            client(&format!(
                "[client]\nremote_addr = \"a:1\"\ndefault_token = \"t-long-enough\"\n{line}\n"
            ))
        };
        assert!(!client("").needs_restart(&client("grace_period = 1")));
        assert!(!client("").needs_restart(&client("retry_interval = 9")));
        assert!(client("").needs_restart(&client("heartbeat_timeout = 1")));
    }

    fn server(text: &str) -> ServerSettings {
        match parse(text, None).unwrap() {
            Settings::Server(s) => s,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_reference_lab_configs_parse() {
        let server = server(include_str!("../../examples/tunnel/server.toml"));
        assert_eq!(server.bind_addr, "0.0.0.0:7000");
        assert_eq!(server.services.len(), 4);
        assert_eq!(server.services["ssh"].bind_addr, "0.0.0.0:3389");
        assert_eq!(server.services["ssh"].token.expose(), "change-me-ssh");
        assert_eq!(server.heartbeat_interval, Some(Duration::from_secs(30)));
        let Settings::Client(client) =
            parse(include_str!("../../examples/tunnel/client.toml"), None).unwrap()
        else {
            panic!("client expected")
        };
        assert_eq!(addrs(&client), ["lab.example.org:7000"]);
        assert_eq!(client.services["gitssh"].local_addr, "127.0.0.1:222");
        assert_eq!(
            client.common.heartbeat_timeout,
            Some(Duration::from_secs(40))
        );
        assert_eq!(
            client.services["web"].retry_interval,
            Duration::from_secs(1)
        );
    }

    #[test]
    fn the_declared_examples_parse_and_agree() {
        let s = server(include_str!("../../examples/tunnel/declared-server.toml"));
        let c = client(include_str!("../../examples/tunnel/declared-client.toml"));
        let declared = s.declared.as_ref().unwrap();
        let identity = c.declare.as_ref().unwrap();
        assert_eq!(
            declared.clients[&identity.name],
            *identity.token.as_ref().unwrap()
        );
        let mut checked = 0;
        for service in c.services.values() {
            let Some(port) = service.bind_port else {
                // Not declared: the server has the service, with the same token.
                assert_eq!(
                    s.services[&service.name].token,
                    c.token(service, 0),
                    "{}",
                    service.name
                );
                continue;
            };
            let declaration = Declaration {
                name: service.name.clone(),
                service_type: service.service_type,
                port,
            };
            assert_eq!(
                declared.policy.check(&declaration),
                Ok(()),
                "{}",
                service.name
            );
            checked += 1;
        }
        assert_eq!(checked, 2);
        assert!(s.services["web"].many_clients);
    }

    #[test]
    fn every_rathole_key_parses() {
        let text = r#"
[server]
bind_addr = "0.0.0.0:2333"
default_token = "default-token"
heartbeat_interval = 0
[server.transport]
type = "tcp"
[server.transport.tcp]
nodelay = false
keepalive_secs = 30
keepalive_interval = 10
[server.transport.tls]
pkcs12 = "identity.pfx"
pkcs12_password = "1234"
hostname = "x"
trusted_root = "ca.pem"
[server.transport.noise]
pattern = "Noise_NK_25519_ChaChaPoly_BLAKE2s"
local_private_key = "key"
remote_public_key = "pub"
[server.transport.websocket]
tls = true
[server.services.echo]
type = "tcp"
bind_addr = "0.0.0.0:2334"
nodelay = true
[server.services.web]
bind_addr = "[::]:8080"
token = "own-token"
"#;
        let s = server(text);
        assert_eq!(s.heartbeat_interval, None);
        assert_eq!(s.services["echo"].token.expose(), "default-token");
        assert_eq!(s.services["web"].token.expose(), "own-token");
        assert!(s.services["echo"].nodelay);
        assert!(
            !s.services["web"].nodelay,
            "falls back to transport.tcp.nodelay"
        );
        assert_eq!(
            s.common.transport.tcp.keepalive_time,
            Duration::from_secs(30)
        );
    }

    fn addrs(client: &ClientSettings) -> Vec<&str> {
        client.servers.iter().map(|s| s.addr.as_str()).collect()
    }

    fn client(text: &str) -> ClientSettings {
        match parse(text, None).unwrap() {
            Settings::Client(c) => c,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn proxy_urls_parse_with_and_without_credentials() {
        let c = client(
            "[client]\nremote_addr = \"a:1\"\n[client.transport.tcp]\nproxy = \"socks5://127.0.0.1:1080\"\n",
        );
        let proxy = c.common.transport.proxy.unwrap();
        assert_eq!(proxy.kind, ProxyKind::Socks5);
        assert_eq!(proxy.addr, "127.0.0.1:1080");
        assert!(proxy.auth.is_none());
        let c = client(
            "[client]\nremote_addr = \"a:1\"\n[client.transport.tcp]\nproxy = \"http://me:p%40ss@proxy.lan:3128/\"\n",
        );
        let proxy = c.common.transport.proxy.unwrap();
        assert_eq!(proxy.kind, ProxyKind::Http);
        assert_eq!(proxy.addr, "proxy.lan:3128");
        let (user, password) = proxy.auth.clone().unwrap();
        assert_eq!((user.expose(), password.expose()), ("me", "p@ss"));
        assert!(!format!("{proxy:?}").contains("p@ss"), "Debug redacts");
    }

    #[test]
    fn a_bad_proxy_url_names_its_key_and_never_shows_the_password() {
        for url in [
            "ftp://me:hunter2@proxy:21",
            "http://me:hunter2@proxy",
            "socks5://me:hunter2@proxy:1080/path",
        ] {
            let err = parse(
                &format!(
                    "[client]\nremote_addr = \"a:1\"\n[client.transport.tcp]\nproxy = \"{url}\"\n"
                ),
                None,
            )
            .unwrap_err();
            let shown = labcore::exit::chain(&err);
            assert!(shown.contains("client.transport.tcp.proxy"), "{shown}");
            assert!(!shown.contains("hunter2"), "{shown}");
            assert_eq!(labcore::ExitStatus::exit(&err), labcore::Exit::Config);
        }
    }

    #[test]
    fn tls_settings_without_what_a_side_needs_name_the_key() {
        for (text, key) in [
            (
                "[server]\nbind_addr = \"0.0.0.0:1\"\n[server.transport]\ntype = \"tls\"\n",
                "server.transport.tls.pkcs12",
            ),
            (
                "[server]\nbind_addr = \"0.0.0.0:1\"\n[server.transport]\ntype = \"tls\"\n\
                 [server.transport.tls]\ncert = \"c.pem\"\n",
                "server.transport.tls.key",
            ),
            (
                "[server]\nbind_addr = \"0.0.0.0:1\"\n[server.transport]\ntype = \"tls\"\n\
                 [server.transport.tls]\npkcs12 = \"/nonexistent/id.p12\"\npkcs12_password = \"x\"\n",
                "server.transport.tls.pkcs12",
            ),
            (
                "[client]\nremote_addr = \"a:1\"\n[client.transport]\ntype = \"tls\"\n\
                 [client.transport.tls]\ntrusted_root = \"/nonexistent/ca.pem\"\n",
                "client.transport.tls.trusted_root",
            ),
            (
                "[client]\nremote_addr = \"a:1\"\n[client.transport]\ntype = \"websocket\"\n",
                "client.transport.websocket",
            ),
        ] {
            let err = parse(text, None).unwrap_err();
            let shown = labcore::exit::chain(&err);
            assert!(shown.contains(key), "{shown}");
            assert_eq!(labcore::ExitStatus::exit(&err), labcore::Exit::Config);
        }
    }

    #[test]
    fn udp_services_parse_on_both_sides() {
        let s = server(
            "[server]\nbind_addr = \"0.0.0.0:1\"\ndefault_token = \"t-long-enough\"\n\
             [server.services.dns]\ntype = \"udp\"\nbind_addr = \"0.0.0.0:53\"\n",
        );
        assert_eq!(s.services["dns"].service_type, ServiceType::Udp);
        let Settings::Client(c) = parse(
            "[client]\nremote_addr = \"a:1\"\ndefault_token = \"t-long-enough\"\n\
             [client.services.dns]\ntype = \"udp\"\nlocal_addr = \"127.0.0.1:53\"\n\
             [client.services.ssh]\nlocal_addr = \"127.0.0.1:22\"\n",
            None,
        )
        .unwrap() else {
            panic!("client expected")
        };
        assert_eq!(c.services["dns"].service_type, ServiceType::Udp);
        assert_eq!(c.services["ssh"].service_type, ServiceType::Tcp);
    }

    #[test]
    fn tcp_only_keys_on_a_udp_service_name_their_key() {
        for (extra, key) in [
            (
                "proxy_protocol = \"v2\"",
                "server.services.dns.proxy_protocol",
            ),
            (
                "enable_proxy_protocol = true",
                "server.services.dns.enable_proxy_protocol",
            ),
            (
                "max_connections = 10",
                "server.services.dns.max_connections",
            ),
        ] {
            let text = format!(
                "[server]\nbind_addr = \"0.0.0.0:1\"\ndefault_token = \"t-long-enough\"\n\
                 [server.services.dns]\ntype = \"udp\"\nbind_addr = \"0.0.0.0:53\"\n{extra}\n"
            );
            let err = parse(&text, None).unwrap_err();
            let shown = err.to_string();
            assert!(shown.contains(key), "{shown}");
            assert!(shown.contains("for tcp services only"), "{shown}");
            assert_eq!(labcore::ExitStatus::exit(&err), labcore::Exit::Config);
        }
    }

    #[test]
    fn noise_settings_that_cannot_make_a_handshake_name_their_key() {
        for (text, key) in [
            (
                "[server]\nbind_addr = \"0.0.0.0:1\"\n[server.transport]\ntype = \"noise\"\n\
                 [server.transport.noise]\nlocal_private_key = \"c2hvcnQ=\"\n",
                "server.transport.noise.local_private_key",
            ),
            (
                "[client]\nremote_addr = \"a:1\"\n[client.transport]\ntype = \"noise\"\n",
                "client.transport.noise.remote_public_key",
            ),
            (
                "[client]\nremote_addr = \"a:1\"\n[client.transport]\ntype = \"noise\"\n\
                 [client.transport.noise]\npattern = \"Noise_ZZ\"\n",
                "client.transport.noise.pattern",
            ),
        ] {
            let err = parse(text, None).unwrap_err();
            let shown = err.to_string();
            assert!(shown.contains(key), "{shown}");
            assert_eq!(labcore::ExitStatus::exit(&err), labcore::Exit::Config);
        }
    }

    #[test]
    fn a_service_without_any_token_names_its_key() {
        let err = parse(
            "[client]\nremote_addr = \"a:1\"\n[client.services.web]\nlocal_addr = \"127.0.0.1:80\"\n",
            None,
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("key \"client.services.web.token\": no token"),
            "{err}"
        );
    }

    #[test]
    fn mode_comes_from_the_table_or_the_command() {
        let both = "[server]\nbind_addr = \"0.0.0.0:1\"\n[client]\nremote_addr = \"a:1\"\n";
        let err = parse(both, None).unwrap_err();
        assert!(
            err.to_string().contains("both [server] and [client]"),
            "{err}"
        );
        assert!(matches!(
            parse(both, Some(Mode::Client)),
            Ok(Settings::Client(_))
        ));
        let err = parse("[server]\nbind_addr = \"0.0.0.0:1\"\n", Some(Mode::Client)).unwrap_err();
        assert!(err.to_string().contains("no [client] table"), "{err}");
        let err = parse("", None).unwrap_err();
        assert!(err.to_string().contains("neither"), "{err}");
    }

    #[test]
    fn addresses_must_be_host_and_port() {
        let err = parse("[server]\nbind_addr = \"7000\"\n", None).unwrap_err();
        assert!(err.to_string().contains("server.bind_addr"), "{err}");
        assert!(err.to_string().contains("not HOST:PORT"), "{err}");
    }

    #[test]
    fn remote_addr_takes_one_server_or_a_list_and_refuses_an_empty_or_repeated_one() {
        let many = client("[client]\nremote_addr = [\"a:1\", \"b:2\"]\nmode = \"failover\"\n");
        assert_eq!(addrs(&many), ["a:1", "b:2"]);
        assert_eq!(many.mode, ServersMode::Failover);
        assert_eq!(
            client("[client]\nremote_addr = \"a:1\"\n").mode,
            ServersMode::Active
        );
        let err = parse("[client]\nremote_addr = []\n", None).unwrap_err();
        assert!(err.to_string().contains("client.remote_addr"), "{err}");
        assert!(err.to_string().contains("at least one"), "{err}");
        let err = parse("[client]\nremote_addr = [\"a:1\", \"a:1\"]\n", None).unwrap_err();
        assert!(err.to_string().contains("names a:1 twice"), "{err}");
    }

    #[test]
    fn many_clients_parse_on_tcp_services_and_are_refused_on_udp_ones() {
        let s = server(
            "[server]\nbind_addr = \"0.0.0.0:1\"\n[server.services.web]\nbind_addr = \"0.0.0.0:2\"\n\
             token = \"t-long-enough\"\nclients = \"many\"\nbalance = \"least_connections\"\n",
        );
        let web = &s.services["web"];
        assert!(web.many_clients);
        assert_eq!(web.balance, Balance::LeastConnections);
        let err = parse(
            "[server]\nbind_addr = \"0.0.0.0:1\"\n[server.services.dns]\ntype = \"udp\"\n\
             bind_addr = \"0.0.0.0:2\"\ntoken = \"t-long-enough\"\nclients = \"many\"\n",
            None,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("server.services.dns.clients"),
            "{err}"
        );
    }

    fn parse_err(text: &str) -> String {
        let err = parse(text, None).unwrap_err();
        assert_eq!(
            labcore::ExitStatus::exit(&err),
            labcore::Exit::Config,
            "{err}"
        );
        err.to_string()
    }

    const DECLARED: &str = "[server]\nbind_addr = \"0.0.0.0:7000\"\n[server.declared]\n";

    #[test]
    fn the_declared_policy_takes_ports_and_ranges_and_each_clients_token() {
        let s = server(&format!(
            "{DECLARED}ports = [8022, \"20000-20099\"]\ntypes = [\"tcp\"]\nmax_services = 3\n\
             name_prefix = \"home-\"\n[server.declared.clients.home]\ntoken = \"home-token-1\"\n"
        ));
        let declared = s.declared.unwrap();
        assert_eq!(
            declared.policy.ports,
            [
                PortRange {
                    first: 8022,
                    last: 8022
                },
                PortRange {
                    first: 20000,
                    last: 20099
                }
            ]
        );
        assert_eq!(declared.policy.types, [ServiceType::Tcp]);
        assert_eq!(declared.policy.max_services, 3);
        assert_eq!(declared.policy.name_prefix, "home-");
        assert_eq!(declared.clients["home"].expose(), "home-token-1");
        assert_eq!(declared.bind_ip, IpAddr::from([0, 0, 0, 0]));
        assert!(!format!("{declared:?}").contains("home-token-1"));
        // Without the table, nothing can be declared.
        assert!(
            server("[server]\nbind_addr = \"0.0.0.0:7000\"\n")
                .declared
                .is_none()
        );
    }

    #[test]
    fn bad_declared_ports_are_config_errors_with_their_line() {
        for (ports, message) in [
            ("0", "port 0 cannot be declared"),
            ("\"9-3\"", "ends before it starts"),
            ("\"http\"", "is not a port from 1 to 65535"),
            ("70000", "is not a port from 1 to 65535"),
        ] {
            let text = format!(
                "{DECLARED}ports = [{ports}]\n[server.declared.clients.home]\ntoken = \"home-token-1\"\n"
            );
            let err = parse_err(&text);
            assert!(err.contains("tunnel.toml:4:"), "{ports}: {err}");
            assert!(err.contains(message), "{ports}: {err}");
        }
        for (extra, key) in [
            (
                "ports = []\n[server.declared.clients.home]\ntoken = \"home-token-1\"",
                "server.declared.ports",
            ),
            ("ports = [1]", "server.declared.clients"),
            (
                "ports = [1]\nmax_services = 0\n[server.declared.clients.home]\ntoken = \"home-token-1\"",
                "server.declared.max_services",
            ),
            (
                "ports = [1]\n[server.declared.clients.\"a b\"]\ntoken = \"home-token-1\"",
                "server.declared.clients.a b",
            ),
            (
                "ports = [1]\n[server.declared.clients.home]\ntoken = \"short\"",
                "server.declared.clients.home.token",
            ),
        ] {
            let err = parse_err(&format!("{DECLARED}{extra}\n"));
            assert!(err.contains(&format!("key \"{key}")), "{extra}: {err}");
        }
    }

    #[test]
    fn a_declared_service_needs_the_clients_identity_and_no_token_of_its_own() {
        let base = "[client]\nremote_addr = \"a:1\"\n";
        let c = client(&format!(
            "{base}[client.declare]\nname = \"home\"\ntoken = \"home-token-1\"\n\
             [client.services.web]\nlocal_addr = \"127.0.0.1:80\"\nbind_port = 8080\n"
        ));
        assert_eq!(c.services["web"].bind_port, Some(8080));
        assert_eq!(c.token(&c.services["web"], 0).expose(), "home-token-1");
        for (text, key) in [
            (
                "[client.services.web]\nlocal_addr = \"127.0.0.1:80\"\nbind_port = 8080\ntoken = \"t-long-enough\"",
                "client.services.web.bind_port",
            ),
            (
                "[client.declare]\nname = \"home\"\ntoken = \"home-token-1\"\n\
                 [client.services.web]\nlocal_addr = \"127.0.0.1:80\"\nbind_port = 8080\ntoken = \"t-long-enough\"",
                "client.services.web.token",
            ),
            (
                "[client.declare]\nname = \"home\"\ntoken = \"home-token-1\"\n\
                 [client.services.web]\nlocal_addr = \"127.0.0.1:80\"\nbind_port = 0",
                "client.services.web.bind_port",
            ),
            (
                "[client.declare]\nname = \"home\"\n[client.services.web]\nlocal_addr = \"127.0.0.1:80\"\nbind_port = 80",
                "client.declare.token",
            ),
            (
                "[client.declare]\nname = \"-home\"\ntoken = \"home-token-1\"",
                "client.declare.name",
            ),
        ] {
            let err = parse_err(&format!("{base}{text}\n"));
            assert!(err.contains(&format!("key \"{key}\"")), "{text}: {err}");
        }
    }

    #[test]
    fn a_group_gives_its_services_its_token_and_many_clients() {
        let s = server(
            "[server]\nbind_addr = \"0.0.0.0:1\"\n[server.groups.farm]\ntoken = \"farm-token-1\"\n\
             [server.services.web]\nbind_addr = \"0.0.0.0:2\"\ngroup = \"farm\"\n",
        );
        let web = &s.services["web"];
        assert_eq!(web.token.expose(), "farm-token-1");
        assert!(web.many_clients);
        assert_eq!(web.group.as_deref(), Some("farm"));
        for (extra, key) in [
            (
                "group = \"farm\"\ntoken = \"own-token-1\"",
                "server.services.web.token",
            ),
            ("group = \"nope\"", "server.services.web.group"),
            (
                "group = \"farm\"\nclients = \"one\"",
                "server.services.web.clients",
            ),
            (
                "group = \"farm\"\ntype = \"udp\"",
                "server.services.web.group",
            ),
        ] {
            let err = parse_err(&format!(
                "[server]\nbind_addr = \"0.0.0.0:1\"\n[server.groups.farm]\ntoken = \"farm-token-1\"\n\
                 [server.services.web]\nbind_addr = \"0.0.0.0:2\"\n{extra}\n"
            ));
            assert!(err.contains(&format!("key \"{key}\"")), "{extra}: {err}");
        }
    }

    #[test]
    fn client_servers_carry_their_own_address_token_and_transport_settings() {
        let two = "[client]\n[[client.servers]]\nremote_addr = \"vm1:7000\"\ntoken = \"vm1-token-1\"\n\
                   [[client.servers]]\nremote_addr = \"vm2:7000\"\n";
        let c = client(&format!(
            "{two}token = \"vm2-token-1\"\n[client.servers.transport.tcp]\nkeepalive_secs = 5\n\
             [client.services.web]\nlocal_addr = \"127.0.0.1:80\"\n\
             [client.services.ssh]\nlocal_addr = \"127.0.0.1:22\"\ntoken = \"ssh-token-1\"\n"
        ));
        assert_eq!(addrs(&c), ["vm1:7000", "vm2:7000"]);
        assert_eq!(c.servers[0].transport, c.common.transport);
        assert_eq!(
            c.servers[1].transport.tcp.keepalive_time,
            Duration::from_secs(5)
        );
        assert_eq!(c.token(&c.services["web"], 0).expose(), "vm1-token-1");
        assert_eq!(c.token(&c.services["web"], 1).expose(), "vm2-token-1");
        assert_eq!(c.token(&c.services["ssh"], 1).expose(), "ssh-token-1");
        assert!(!format!("{c:?}").contains("vm1-token-1"));
        for (text, key) in [
            (
                format!("{two}[client.services.web]\nlocal_addr = \"127.0.0.1:80\""),
                "client.services.web.token",
            ),
            (
                format!("{two}[client.servers.transport]\ntype = \"noise\""),
                "client.servers.1.transport.noise.remote_public_key",
            ),
            (
                "[client]\nremote_addr = \"a:1\"\n[[client.servers]]\nremote_addr = \"b:1\""
                    .to_owned(),
                "client.servers",
            ),
            (
                "[client]\nmode = \"failover\"".to_owned(),
                "client.remote_addr",
            ),
            (
                format!("{two}[[client.servers]]\nremote_addr = \"vm1:7000\""),
                "client.servers",
            ),
        ] {
            let err = parse_err(&format!("{text}\n"));
            assert!(err.contains(&format!("key \"{key}\"")), "{text}: {err}");
        }
    }
}
