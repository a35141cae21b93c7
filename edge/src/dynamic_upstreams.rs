//! `reverse_proxy { dynamic a ... | dynamic srv ... }`: upstreams found in DNS when requests
//! need them, with Caddy 2.6's semantics (its `http.reverse_proxy.upstreams.a` and `.srv`).
//!
//! A request asks [`Dynamic::balancer`] for the current set: the answer of the last lookup
//! while it is younger than `refresh` (1 minute by default), else a new lookup, made by one
//! request while the others wait for it. Every address of the answer (A and AAAA records with
//! the configured port; SRV targets with their ports, by priority then weight) is an upstream
//! the `lb_policy` chooses among, with passive health kept per answer. A failed lookup is not
//! kept: the request falls back to the static upstreams (usually none, so 503), as in Caddy,
//! and the next request looks up again.
//!
//! Invariants: a static upstream list never reaches this module, so it costs nothing per
//! request; lookups skip any cache of the resolver (`refresh` is the only cache), so a
//! changed record is seen at the first lookup after `refresh`; resolvers are IP addresses,
//! never names that would need a resolver themselves.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    LookupIpStrategy, NameServerConfig, NameServerConfigGroup, ResolverConfig,
};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use labcore::Env;
use serde::{Deserialize, Serialize};

use crate::placeholders::Template;
use crate::proxy::{Balancer, Upstream};
use crate::site::parse_duration;
use crate::transport::{At, OptLine, at};

/// `dynamic a|srv ...` as TOML: each field is the Caddyfile option of the same name.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DynamicToml {
    /// "a" (A/AAAA records) or "srv".
    pub(crate) source: String,
    /// The name to look up (srv: the whole name, or the part after `_service._proto.`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) name: Option<String>,
    /// a: the upstreams' port. Default "80".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) port: Option<String>,
    /// srv: the service label ("http" for `_http._tcp.NAME`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) service: Option<String>,
    /// srv: the protocol label ("tcp").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) proto: Option<String>,
    /// How long an answer is used before the next lookup. Default "1m".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) refresh: Option<String>,
    /// DNS servers ("10.0.0.53", "udp/10.0.0.53:53", "tcp/[fd00::53]:5353"); none: the
    /// system's (/etc/resolv.conf).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) resolvers: Vec<String>,
    /// How long one query to a DNS server may take.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) dial_timeout: Option<String>,
    /// Accepted for Caddy's sake (Happy Eyeballs toward the DNS server); changes nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) dial_fallback_delay: Option<String>,
    /// a: "ipv4", "ipv6" or both (the default: both).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) versions: Vec<String>,
}

impl DynamicToml {
    /// Parses `dynamic KIND [ARGS] { OPTIONS }` (its words after `dynamic`), as Caddy does.
    pub(crate) fn parse(
        args: &[String],
        block: Option<&[OptLine<'_>]>,
        line: usize,
    ) -> Result<DynamicToml, At> {
        let Some((kind, rest)) = args.split_first() else {
            return Err(at(line, "dynamic takes a source: a or srv"));
        };
        let mut d = DynamicToml {
            source: kind.clone(),
            ..DynamicToml::default()
        };
        match (kind.as_str(), rest) {
            ("a", [] | [_] | [_, _]) => {
                d.name = rest.first().cloned();
                d.port = rest.get(1).cloned();
            }
            ("srv", [] | [_]) => d.name = rest.first().cloned(),
            ("a" | "srv", _) => {
                return Err(at(line, format!("dynamic {kind}: too many arguments")));
            }
            (other, _) => {
                return Err(at(
                    line,
                    format!("dynamic upstream source {other:?} is not supported (a or srv)"),
                ));
            }
        }
        for sub in block.unwrap_or_default() {
            let Some((name, args)) = sub.words.split_first() else {
                continue;
            };
            if sub.block.is_some() {
                return Err(at(
                    sub.line,
                    format!("dynamic {kind} {name} takes no block"),
                ));
            }
            let one = || match args {
                [v] => Ok(v.clone()),
                _ => Err(at(
                    sub.line,
                    format!("dynamic {kind} {name} takes one value"),
                )),
            };
            let duration = || {
                let v = one()?;
                match parse_duration(&v) {
                    Some(_) => Ok(Some(v)),
                    None => Err(at(sub.line, format!("{name}: {v:?} is not a duration"))),
                }
            };
            let set_once = |slot: &mut Option<String>, what: &str| {
                if slot.is_some() {
                    return Err(at(sub.line, format!("a {what} has already been specified")));
                }
                *slot = Some(one()?);
                Ok(())
            };
            match (kind.as_str(), name.as_str()) {
                (_, "name") => set_once(&mut d.name, "name")?,
                ("a", "port") => set_once(&mut d.port, "port")?,
                ("srv", "service") => set_once(&mut d.service, "service")?,
                ("srv", "proto") => set_once(&mut d.proto, "proto")?,
                (_, "refresh") => d.refresh = duration()?,
                (_, "dial_timeout") => d.dial_timeout = duration()?,
                (_, "dial_fallback_delay") => d.dial_fallback_delay = duration()?,
                (_, "resolvers") => {
                    if args.is_empty() {
                        return Err(at(sub.line, "must specify at least one resolver address"));
                    }
                    for a in args {
                        resolver_addr(a).map_err(|m| at(sub.line, m))?;
                    }
                    d.resolvers = args.to_vec();
                }
                ("a", "versions") => {
                    for v in args {
                        if v != "ipv4" && v != "ipv6" {
                            return Err(at(
                                sub.line,
                                format!("dynamic a versions: {v:?} is not ipv4 or ipv6"),
                            ));
                        }
                    }
                    d.versions = args.to_vec();
                }
                (_, other) => {
                    return Err(at(
                        sub.line,
                        format!("unrecognized dynamic {kind} option {other:?}"),
                    ));
                }
            }
        }
        Ok(d)
    }
}

/// A resolver address as Caddy writes it: `[udp/|tcp/]IP[:PORT]` (port 53 by default), as
/// the socket and whether to speak UDP (with TCP for long answers) or TCP only.
fn resolver_addr(text: &str) -> Result<(SocketAddr, bool), String> {
    let (tcp_only, rest) = match text.split_once('/') {
        Some(("udp", rest)) => (false, rest),
        Some(("tcp", rest)) => (true, rest),
        Some((net, _)) => {
            return Err(format!(
                "resolver {text:?}: network {net:?} is not udp or tcp"
            ));
        }
        None => (false, text),
    };
    let addr = match rest.parse::<SocketAddr>() {
        Ok(addr) => addr,
        Err(_) => {
            let bare = rest.trim_start_matches('[').trim_end_matches(']');
            let ip: IpAddr = bare.parse().map_err(|_| {
                format!("resolver {text:?} is not an IP address with an optional port")
            })?;
            SocketAddr::new(ip, 53)
        }
    };
    Ok((addr, tcp_only))
}

/// What is looked up.
#[derive(Debug)]
enum Query {
    /// A and/or AAAA records of the name; each address with this port.
    A { name: String, port: u16 },
    /// SRV records of the name.
    Srv { name: String },
}

/// A dynamic upstream source, ready to look up.
#[derive(Debug)]
pub(crate) struct Dynamic {
    query: Query,
    refresh: Duration,
    resolver: TokioResolver,
    /// The transport's tag, for the upstreams' pool keys.
    tag: String,
    /// The last answer and when it was looked up.
    current: Mutex<Option<(Instant, Arc<Balancer>)>>,
    /// Held by the one request looking up; the others wait for its answer.
    looking_up: tokio::sync::Mutex<()>,
}

impl Dynamic {
    /// Builds `d` for upstreams reached over the transport tagged `tag`; `env` renders the
    /// `{env.X}` placeholders in the name and port.
    pub(crate) fn build(d: &DynamicToml, tag: &str, env: &Env) -> Result<Dynamic, String> {
        let literal = |what: &str, text: &str| -> Result<String, String> {
            Template::parse(text, env)
                .ok()
                .and_then(|t| t.literal().map(str::to_owned))
                .ok_or_else(|| {
                    format!("dynamic {what} {text:?}: only {{env.*}} placeholders are supported")
                })
        };
        let name = literal(
            "name",
            d.name
                .as_deref()
                .ok_or_else(|| format!("dynamic {} needs a name", d.source))?,
        )?;
        if name.is_empty() {
            return Err(format!("dynamic {} needs a name", d.source));
        }
        let query = match d.source.as_str() {
            "a" => {
                let text = literal("port", d.port.as_deref().unwrap_or("80"))?;
                let port = text
                    .parse()
                    .map_err(|_| format!("dynamic a port {text:?} is not a port number"))?;
                Query::A { name, port }
            }
            "srv" => {
                let name = match (d.service.as_deref(), d.proto.as_deref()) {
                    (None | Some(""), None | Some("")) => name,
                    (service, proto) => format!(
                        "_{}._{}.{name}",
                        service.unwrap_or_default(),
                        proto.unwrap_or_default()
                    ),
                };
                Query::Srv { name }
            }
            other => return Err(format!("dynamic upstream source {other:?} is not a or srv")),
        };
        let dur = |v: &Option<String>, what: &str| -> Result<Option<Duration>, String> {
            v.as_deref()
                .map(|s| parse_duration(s).ok_or_else(|| format!("{what} {s:?} is not a duration")))
                .transpose()
        };
        let refresh = dur(&d.refresh, "refresh")?
            .filter(|r| !r.is_zero())
            .unwrap_or(Duration::from_secs(60));
        let timeout = dur(&d.dial_timeout, "dial_timeout")?.filter(|t| !t.is_zero());
        let has = |v: &str| d.versions.iter().any(|x| x == v);
        let strategy = match (has("ipv4"), has("ipv6")) {
            (true, false) => LookupIpStrategy::Ipv4Only,
            (false, true) => LookupIpStrategy::Ipv6Only,
            _ => LookupIpStrategy::Ipv4AndIpv6,
        };
        let provider = TokioConnectionProvider::default();
        let mut builder = if d.resolvers.is_empty() {
            TokioResolver::builder(provider).map_err(|e| {
                format!(
                    "dynamic {}: reading the system's DNS configuration: {e}",
                    d.source
                )
            })?
        } else {
            let mut servers = NameServerConfigGroup::new();
            for text in &d.resolvers {
                let (addr, tcp_only) = resolver_addr(text)?;
                if !tcp_only {
                    servers.push(NameServerConfig::new(addr, Protocol::Udp));
                }
                servers.push(NameServerConfig::new(addr, Protocol::Tcp));
            }
            TokioResolver::builder_with_config(
                ResolverConfig::from_parts(None, Vec::new(), servers),
                provider,
            )
        };
        let opts = builder.options_mut();
        // `refresh` is the cache: every lookup asks the server.
        opts.cache_size = 0;
        opts.positive_max_ttl = Some(Duration::ZERO);
        opts.negative_max_ttl = Some(Duration::ZERO);
        opts.ip_strategy = strategy;
        if let Some(t) = timeout {
            opts.timeout = t;
        }
        Ok(Dynamic {
            query,
            refresh,
            resolver: builder.build(),
            tag: tag.to_owned(),
            current: Mutex::new(None),
            looking_up: tokio::sync::Mutex::new(()),
        })
    }

    /// The upstreams to choose from now, looked up again when the last answer is older than
    /// `refresh`; `None` when the lookup failed (logged).
    pub(crate) async fn balancer(&self) -> Option<Arc<Balancer>> {
        if let Some(fresh) = self.fresh() {
            return Some(fresh);
        }
        let _one = self.looking_up.lock().await;
        // Another request may have looked up while this one waited.
        if let Some(fresh) = self.fresh() {
            return Some(fresh);
        }
        match self.look_up().await {
            Ok(upstreams) => {
                tracing::debug!(query = ?self.query, count = upstreams.len(), "dynamic upstreams looked up");
                let balancer = Arc::new(Balancer::of(upstreams));
                if let Ok(mut current) = self.current.lock() {
                    *current = Some((Instant::now(), balancer.clone()));
                }
                Some(balancer)
            }
            Err(message) => {
                tracing::error!(query = ?self.query, error = %message, "failed getting dynamic upstreams; falling back to static upstreams");
                None
            }
        }
    }

    fn fresh(&self) -> Option<Arc<Balancer>> {
        let current = self.current.lock().ok()?;
        let (at, balancer) = current.as_ref()?;
        (at.elapsed() < self.refresh).then(|| balancer.clone())
    }

    /// Asks DNS; the upstreams in the answer's order (SRV: by priority, then weighted
    /// random within one priority, as RFC 2782 and Go's resolver order them).
    async fn look_up(&self) -> Result<Vec<Arc<Upstream>>, String> {
        let dials: Vec<String> = match &self.query {
            Query::A { name, port } => {
                let answer = self
                    .resolver
                    .lookup_ip(name.as_str())
                    .await
                    .map_err(|e| format!("lookup {name}: {e}"))?;
                answer
                    .iter()
                    .map(|ip| SocketAddr::new(ip, *port).to_string())
                    .collect()
            }
            Query::Srv { name } => {
                let answer = self
                    .resolver
                    .srv_lookup(name.as_str())
                    .await
                    .map_err(|e| format!("lookup SRV {name}: {e}"))?;
                let mut records: Vec<(u16, u16, String)> = answer
                    .iter()
                    .map(|srv| {
                        let target = srv.target().to_utf8();
                        // The root's final dot is no part of the name a socket dials.
                        let host = target.strip_suffix('.').unwrap_or(&target);
                        let dial = match host.parse::<IpAddr>() {
                            Ok(IpAddr::V6(v6)) => format!("[{v6}]:{}", srv.port()),
                            _ => format!("{host}:{}", srv.port()),
                        };
                        (srv.priority(), srv.weight(), dial)
                    })
                    .collect();
                by_priority_and_weight(&mut records);
                records.into_iter().map(|(_, _, dial)| dial).collect()
            }
        };
        dials
            .iter()
            .map(|dial| Upstream::parse_with(dial, &self.tag))
            .collect()
    }
}

/// Orders SRV records as RFC 2782 asks: lower priority first; within one priority, each
/// place drawn at random with odds in proportion to weight (a zero weight has a small chance).
fn by_priority_and_weight(records: &mut [(u16, u16, String)]) {
    records.sort_by_key(|r| r.0);
    let mut start = 0;
    while start < records.len() {
        let priority = records[start].0;
        let end = start
            + records[start..]
                .iter()
                .take_while(|r| r.0 == priority)
                .count();
        for place in start..end {
            let total: u32 = records[place..end].iter().map(|r| u32::from(r.1) + 1).sum();
            let mut pick = rand::random_range(0..total);
            let mut chosen = place;
            for (i, r) in records[place..end].iter().enumerate() {
                let w = u32::from(r.1) + 1;
                if pick < w {
                    chosen = place + i;
                    break;
                }
                pick -= w;
            }
            records.swap(place, chosen);
        }
        start = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(text: &str) -> Vec<String> {
        text.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn caddy_forms_of_dynamic_a_and_srv_parse() {
        let d = DynamicToml::parse(&words("a app.lan 8080"), None, 1).unwrap();
        assert_eq!(
            (d.name.as_deref(), d.port.as_deref()),
            (Some("app.lan"), Some("8080"))
        );
        let lines = [words("name app.lan"), words("port 80"), words("port 81")];
        let block: Vec<OptLine<'_>> = lines
            .iter()
            .enumerate()
            .map(|(i, w)| OptLine {
                words: w,
                line: 10 + i,
                block: None,
            })
            .collect();
        let err = DynamicToml::parse(&words("a"), Some(&block), 9).unwrap_err();
        assert_eq!(err.0, 12, "the second port is the culprit: {}", err.1);
        let err = DynamicToml::parse(&words("multi"), None, 3).unwrap_err();
        assert!(err.1.contains("\"multi\""), "{}", err.1);
        assert!(DynamicToml::parse(&words("srv a b"), None, 1).is_err());
    }

    #[test]
    fn resolver_addresses_take_caddy_forms_and_refuse_names() {
        assert_eq!(
            resolver_addr("10.0.0.53").unwrap(),
            ("10.0.0.53:53".parse().unwrap(), false)
        );
        assert_eq!(
            resolver_addr("tcp/[::1]:5353").unwrap(),
            ("[::1]:5353".parse().unwrap(), true)
        );
        assert_eq!(
            resolver_addr("[::1]").unwrap(),
            ("[::1]:53".parse().unwrap(), false)
        );
        assert!(resolver_addr("dns.example:53").is_err());
        assert!(resolver_addr("quic/10.0.0.53").is_err());
    }

    #[test]
    fn srv_records_come_in_priority_order() {
        let mut records = vec![
            (20, 5, "c".to_owned()),
            (10, 0, "a".to_owned()),
            (20, 5, "d".to_owned()),
            (10, 0, "b".to_owned()),
        ];
        by_priority_and_weight(&mut records);
        let priorities: Vec<u16> = records.iter().map(|r| r.0).collect();
        assert_eq!(priorities, [10, 10, 20, 20]);
        let mut names: Vec<&str> = records.iter().map(|r| r.2.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["a", "b", "c", "d"], "nothing lost or doubled");
    }
}
