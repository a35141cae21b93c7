//! Declared services (labkit only): the wire messages and the server's policy check.
//!
//! In this opt-in mode a client names itself and proves one client token, then declares a
//! service (name, type, requested port) on the control channel; the server checks the
//! declaration against its `[server.declared]` policy and either exposes the service or
//! answers why not. A rathole peer never sees these messages:
//!
//! - the client's hello carries [`client_digest`], sha256 of a labkit-only prefix and the
//!   client's name, where a rathole client sends sha256 of a service name. A rathole server
//!   knows no service by that digest, answers `ServiceNotExist` and closes, as it does for
//!   any unknown service, before the client has written anything labkit-only;
//! - the client writes its [`Declaration`] only after the server's `Ack::Ok`, which only a
//!   labkit server with the mode on gives for such a digest.
//!
//! ```text
//! Declaration = version u8 (= 1) | type u8 (0 tcp, 1 udp) | port u16 LE | len u8 | name (len bytes)
//! Verdict     = code u8 (0 ok, 1 refused, 2 not now) | len u8 | reason (len bytes, UTF-8)
//! ```
//!
//! Both are bounded by their `u8` lengths, so a reader never allocates more than 255 bytes
//! for a peer. After `Verdict::Ok` the control channel is an ordinary one (heartbeats and
//! `CreateDataChannel`), and data channels are opened with the session key as for any
//! service. A service name is 1 to [`MAX_NAME_LEN`] bytes of ASCII letters, digits, `-`, `_`
//! and `.`, starting with a letter or digit: it ends up in logs, metrics labels and status
//! output, so nothing else is let through. Reasons from a server are shown with anything
//! outside printable ASCII escaped.

use std::fmt;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::error::Error;
use crate::protocol::ServiceType;
use crate::protocol::{self, Digest};

/// The version of the declaration messages.
const VERSION: u8 = 1;
/// The longest service name a declaration may carry.
pub(crate) const MAX_NAME_LEN: usize = 63;
/// The fixed part of a [`Declaration`] on the wire.
const DECLARATION_HEAD: usize = 5;

/// The hello digest a declaring client is known by: never the digest of a service name a
/// rathole client could send, unless a service were named with this prefix and a NUL.
pub(crate) fn client_digest(client: &str) -> Digest {
    protocol::digest(&[b"labkit declaring client\0", client.as_bytes()])
}

/// The digest the server registers a declared service under (not reachable by a hello).
pub(crate) fn service_digest(client: &str, service: &str) -> Digest {
    protocol::digest(&[
        b"labkit declared service\0",
        client.as_bytes(),
        b"\0",
        service.as_bytes(),
    ])
}

/// Whether `name` may name a declared service (see the module doc); the client checks its own
/// config with this too.
pub(crate) fn valid_name(name: &str) -> Result<(), &'static str> {
    let bytes = name.as_bytes();
    if bytes.is_empty() {
        return Err("the name is empty");
    }
    if bytes.len() > MAX_NAME_LEN {
        return Err("the name is longer than 63 bytes");
    }
    if !bytes[0].is_ascii_alphanumeric() {
        return Err("the name must start with a letter or digit");
    }
    if !bytes
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err("the name may hold only ASCII letters, digits, '-', '_' and '.'");
    }
    Ok(())
}

/// What a client asks the server to expose.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Declaration {
    /// The service's name (checked with [`valid_name`] by the server, not by the decoder).
    pub(crate) name: String,
    /// TCP or UDP.
    pub(crate) service_type: ServiceType,
    /// The port asked for on the server.
    pub(crate) port: u16,
}

impl Declaration {
    /// The message's bytes; the name must be valid (the client's config checked it).
    pub(crate) fn encode(&self) -> Vec<u8> {
        let name = self.name.as_bytes();
        let len = u8::try_from(name.len()).expect("a valid name is at most 63 bytes");
        let mut out = Vec::with_capacity(DECLARATION_HEAD + name.len());
        out.push(VERSION);
        out.push(match self.service_type {
            ServiceType::Tcp => 0,
            ServiceType::Udp => 1,
        });
        out.extend_from_slice(&self.port.to_le_bytes());
        out.push(len);
        out.extend_from_slice(name);
        out
    }

    /// Reads a declaration: the fixed head, then at most 255 bytes of name. Bytes that are
    /// not UTF-8 are kept (lossily) so the refusal can show them escaped.
    pub(crate) async fn read<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Declaration, Error> {
        let mut head = [0u8; DECLARATION_HEAD];
        protocol::read_exact(stream, &mut head, "declaration").await?;
        let mut name = [0u8; u8::MAX as usize];
        let name = &mut name[..usize::from(head[4])];
        protocol::read_exact(stream, name, "declaration").await?;
        Declaration::decode(&head, name)
    }

    fn decode(head: &[u8; DECLARATION_HEAD], name: &[u8]) -> Result<Declaration, Error> {
        if head[0] != VERSION {
            return Err(Error::BadDeclaration("unknown declaration version"));
        }
        let service_type = match head[1] {
            0 => ServiceType::Tcp,
            1 => ServiceType::Udp,
            _ => return Err(Error::BadDeclaration("unknown service type")),
        };
        Ok(Declaration {
            name: String::from_utf8_lossy(name).into_owned(),
            service_type,
            port: u16::from_le_bytes([head[2], head[3]]),
        })
    }
}

/// The server's answer to a declaration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The service is exposed: the control channel is open.
    Ok,
    /// The policy forbids it: asking again without changing the declaration is pointless.
    Refused(String),
    /// Not now (the port is taken, another connection holds the name): worth retrying.
    NotNow(String),
}

impl Verdict {
    /// The message's bytes; a reason is cut to 255 bytes (at a character boundary).
    pub(crate) fn encode(&self) -> Vec<u8> {
        let (code, reason) = match self {
            Verdict::Ok => (0u8, ""),
            Verdict::Refused(reason) => (1, reason.as_str()),
            Verdict::NotNow(reason) => (2, reason.as_str()),
        };
        let mut end = reason.len().min(u8::MAX as usize);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        let mut out = Vec::with_capacity(2 + end);
        out.push(code);
        out.push(end as u8);
        out.extend_from_slice(&reason.as_bytes()[..end]);
        out
    }

    /// Reads a verdict; the reason is shown escaped (it comes from the peer).
    pub(crate) async fn read<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Verdict, Error> {
        let mut head = [0u8; 2];
        protocol::read_exact(stream, &mut head, "verdict").await?;
        let mut reason = [0u8; u8::MAX as usize];
        let reason = &mut reason[..usize::from(head[1])];
        protocol::read_exact(stream, reason, "verdict").await?;
        let reason = escaped(reason);
        match head[0] {
            0 => Ok(Verdict::Ok),
            1 => Ok(Verdict::Refused(reason)),
            2 => Ok(Verdict::NotNow(reason)),
            tag => Err(Error::Malformed {
                what: "verdict",
                tag: u32::from(tag),
            }),
        }
    }

    /// Writes the verdict.
    pub(crate) async fn write<S: AsyncWrite + Unpin>(&self, stream: &mut S) -> Result<(), Error> {
        protocol::write_all(stream, &self.encode(), "verdict").await
    }
}

/// Bytes from a peer as text safe to log: printable ASCII as is, the rest as `\xNN`.
pub(crate) fn escaped(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if b == b' ' || b.is_ascii_graphic() {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// A declared name for logs: valid names as they are, others escaped and quoted.
pub(crate) struct ShownName<'a>(pub(crate) &'a str);

impl fmt::Display for ShownName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match valid_name(self.0) {
            Ok(()) => f.write_str(self.0),
            Err(_) => write!(f, "\"{}\"", escaped(self.0.as_bytes())),
        }
    }
}

/// An inclusive range of ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PortRange {
    /// The first port.
    pub(crate) first: u16,
    /// The last port.
    pub(crate) last: u16,
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// What the server lets a declaring client expose (`[server.declared]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Policy {
    /// The ports a declaration may ask for (never port 0).
    pub(crate) ports: Vec<PortRange>,
    /// The service types allowed.
    pub(crate) types: Vec<ServiceType>,
    /// The most services one client may have declared at once.
    pub(crate) max_services: usize,
    /// A declared service's name must start with this (empty: any valid name).
    pub(crate) name_prefix: String,
}

impl Policy {
    /// Why the policy forbids `declaration`, if it does (the per-client count is checked by
    /// the server, which knows what is running).
    pub(crate) fn check(&self, declaration: &Declaration) -> Result<(), String> {
        valid_name(&declaration.name).map_err(str::to_owned)?;
        if !declaration.name.starts_with(&self.name_prefix) {
            return Err(format!("the name must start with \"{}\"", self.name_prefix));
        }
        if !self.types.contains(&declaration.service_type) {
            return Err(format!(
                "{} services are not allowed here",
                type_name(declaration.service_type)
            ));
        }
        let port = declaration.port;
        if !self
            .ports
            .iter()
            .any(|range| (range.first..=range.last).contains(&port))
        {
            let allowed: Vec<String> = self.ports.iter().map(ToString::to_string).collect();
            return Err(format!(
                "port {port} is outside the allowed ports ({})",
                allowed.join(", ")
            ));
        }
        Ok(())
    }
}

/// `tcp` or `udp`.
pub(crate) fn type_name(service_type: ServiceType) -> &'static str {
    match service_type {
        ServiceType::Tcp => "tcp",
        ServiceType::Udp => "udp",
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn policy() -> Policy {
        Policy {
            ports: vec![
                PortRange {
                    first: 20000,
                    last: 20009,
                },
                PortRange {
                    first: 8022,
                    last: 8022,
                },
            ],
            types: vec![ServiceType::Tcp],
            max_services: 4,
            name_prefix: String::new(),
        }
    }

    fn declaration(name: &str, port: u16) -> Declaration {
        Declaration {
            name: name.into(),
            service_type: ServiceType::Tcp,
            port,
        }
    }

    #[test]
    fn a_declaration_is_version_type_port_and_name() {
        let bytes = declaration("ssh", 8022).encode();
        assert_eq!(bytes, [1, 0, 0x56, 0x1f, 3, b's', b's', b'h']);
        let head: [u8; 5] = bytes[..5].try_into().unwrap();
        assert_eq!(
            Declaration::decode(&head, &bytes[5..]).unwrap(),
            declaration("ssh", 8022)
        );
    }

    #[test]
    fn the_policy_refuses_ports_outside_its_ranges_and_types_it_does_not_allow() {
        let policy = policy();
        assert_eq!(policy.check(&declaration("web", 20009)), Ok(()));
        assert_eq!(policy.check(&declaration("web", 8022)), Ok(()));
        let err = policy.check(&declaration("web", 22)).unwrap_err();
        assert_eq!(
            err,
            "port 22 is outside the allowed ports (20000-20009, 8022)"
        );
        assert!(policy.check(&declaration("web", 0)).is_err());
        let udp = Declaration {
            service_type: ServiceType::Udp,
            ..declaration("dns", 20001)
        };
        assert_eq!(
            policy.check(&udp).unwrap_err(),
            "udp services are not allowed here"
        );
        let prefixed = Policy {
            name_prefix: "home-".into(),
            ..policy
        };
        assert!(prefixed.check(&declaration("home-web", 20000)).is_ok());
        assert!(prefixed.check(&declaration("web", 20000)).is_err());
    }

    #[test]
    fn names_with_odd_bytes_are_refused_and_shown_escaped() {
        for name in [
            "",
            ".hidden",
            "a b",
            "ssh\nINFO forged log line",
            "caf\u{e9}",
            "a/b",
            &"x".repeat(64),
        ] {
            assert!(valid_name(name).is_err(), "{name:?}");
        }
        assert!(valid_name(&"x".repeat(63)).is_ok());
        assert_eq!(
            ShownName("ssh\nINFO x\x1b[0m").to_string(),
            "\"ssh\\x0aINFO x\\x1b[0m\""
        );
        assert_eq!(ShownName("web-1.a_b").to_string(), "web-1.a_b");
    }

    #[test]
    fn verdict_reasons_are_cut_at_255_bytes_on_a_character_boundary() {
        let long = "\u{e9}".repeat(200);
        let bytes = Verdict::Refused(long).encode();
        assert_eq!(bytes[0], 1);
        assert_eq!(usize::from(bytes[1]), bytes.len() - 2);
        assert!(bytes.len() - 2 <= 255);
        assert!(std::str::from_utf8(&bytes[2..]).is_ok());
    }

    proptest! {
        #[test]
        fn declaration_decoding_never_panics_and_round_trips_valid_names(head in proptest::array::uniform5(any::<u8>()), name in proptest::collection::vec(any::<u8>(), 0..=255)) {
            if let Ok(decl) = Declaration::decode(&head, &name)
                && valid_name(&decl.name).is_ok()
            {
                let bytes = decl.encode();
                prop_assert_eq!(&bytes[5..], &name[..]);
                prop_assert_eq!(&bytes[..4], &head[..4]);
            }
        }

        #[test]
        fn escaped_text_is_printable_ascii(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let shown = escaped(&bytes);
            prop_assert!(shown.bytes().all(|b| b == b' ' || b.is_ascii_graphic()));
        }
    }
}
