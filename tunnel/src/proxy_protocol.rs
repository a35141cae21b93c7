//! PROXY protocol headers (HAProxy's v1 text and v2 binary formats), which tell a local service
//! the visitor's real address.
//!
//! The server writes one at the start of a data channel's stream, right after
//! `StartForwardTcp`, for services with `proxy_protocol` set: the client, whichever it is,
//! passes it on to the local service with the visitor's bytes, so the wire protocol does not
//! change. [`decode`] reads a header back, for services written against this crate and for
//! the tests.
//!
//! Written here rather than taken from a crate: the encoder is forty lines over a fixed
//! array (no allocation per connection), and the decoder must never allocate or read past
//! the header's bound, which is easiest to see when it is this small.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The v2 header's first twelve bytes.
const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 header, `\r\n` included (the specification's bound).
const V1_MAX: usize = 107;
/// The longest header [`encode`] writes: 107 bytes, v1's bound (v2 needs at most 52).
pub(crate) const MAX_LEN: usize = V1_MAX;

/// A header version, from `proxy_protocol = "v1" | "v2"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Version {
    /// Text: `PROXY TCP4 src dst sport dport\r\n`.
    V1,
    /// Binary, with a fixed-size address block.
    V2,
}

/// An encoded header.
#[derive(Clone, Copy)]
pub(crate) struct Header {
    bytes: [u8; MAX_LEN],
    len: usize,
}

impl Header {
    /// The header's bytes.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl std::fmt::Debug for Header {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Header({:?})", String::from_utf8_lossy(self.as_bytes()))
    }
}

/// What a header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proxied {
    /// A TCP connection from `source` (the visitor) to `destination` (the port it reached).
    Tcp {
        /// The visitor's address.
        source: SocketAddr,
        /// The address the visitor connected to.
        destination: SocketAddr,
    },
    /// No address: v1 `UNKNOWN`, a v2 `LOCAL` command or an address family other than TCP.
    Unknown,
}

/// Why bytes are not a PROXY header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Neither the v1 `PROXY ` prefix nor the v2 signature.
    #[error("not a PROXY protocol header")]
    NotProxy,
    /// A v1 line longer than 107 bytes.
    #[error("PROXY v1 line longer than 107 bytes")]
    TooLong,
    /// A v1 line that does not parse.
    #[error("malformed PROXY v1 line")]
    BadV1,
    /// A v2 header with another version or command, or too short an address block.
    #[error("malformed PROXY v2 header")]
    BadV2,
}

/// The header for a visitor at `source` who connected to `destination`.
pub(crate) fn encode(version: Version, source: SocketAddr, destination: SocketAddr) -> Header {
    let (source, destination) = same_family(source, destination);
    let mut header = Header {
        bytes: [0; MAX_LEN],
        len: 0,
    };
    match version {
        Version::V1 => {
            let family = if source.is_ipv4() { "TCP4" } else { "TCP6" };
            let mut line = Line::default();
            // Two IPv6 addresses and ports come to 104 bytes: the line always fits.
            let _ = write!(
                line,
                "PROXY {family} {} {} {} {}\r\n",
                source.ip(),
                destination.ip(),
                source.port(),
                destination.port()
            );
            header.bytes[..line.len].copy_from_slice(&line.bytes[..line.len]);
            header.len = line.len;
        }
        Version::V2 => {
            let mut out = Cursor {
                bytes: &mut header.bytes,
                len: 0,
            };
            out.put(&SIGNATURE);
            // Version 2, command PROXY.
            out.put(&[0x21]);
            match (source.ip(), destination.ip()) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    out.put(&[0x11]);
                    out.put(&12u16.to_be_bytes());
                    out.put(&s.octets());
                    out.put(&d.octets());
                }
                (s, d) => {
                    out.put(&[0x21]);
                    out.put(&36u16.to_be_bytes());
                    out.put(&v6(s).octets());
                    out.put(&v6(d).octets());
                }
            }
            out.put(&source.port().to_be_bytes());
            out.put(&destination.port().to_be_bytes());
            header.len = out.len;
        }
    }
    header
}

/// Reads a header at the start of `buf`: `Ok(None)` while more bytes are needed, else what it
/// says and its length (the service's own bytes follow). Never reads past 107 bytes for v1
/// or past the v2 length field's bound, and never allocates.
pub fn decode(buf: &[u8]) -> Result<Option<(Proxied, usize)>, HeaderError> {
    const V1_PREFIX: &[u8] = b"PROXY ";
    if buf.starts_with(&SIGNATURE) {
        return decode_v2(buf);
    }
    if buf.starts_with(V1_PREFIX) {
        return decode_v1(buf);
    }
    if SIGNATURE.starts_with(buf) || V1_PREFIX.starts_with(buf) {
        return Ok(None);
    }
    Err(HeaderError::NotProxy)
}

fn decode_v1(buf: &[u8]) -> Result<Option<(Proxied, usize)>, HeaderError> {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Err(HeaderError::TooLong)
        } else {
            Ok(None)
        };
    };
    let line = std::str::from_utf8(&window[..end]).map_err(|_| HeaderError::BadV1)?;
    let mut fields = line.split(' ');
    fields.next(); // "PROXY"
    let proxied = match fields.next() {
        Some("UNKNOWN") => Proxied::Unknown,
        Some(family @ ("TCP4" | "TCP6")) => {
            let ip = |text: Option<&str>| -> Result<IpAddr, HeaderError> {
                let text = text.ok_or(HeaderError::BadV1)?;
                let ip = if family == "TCP4" {
                    text.parse::<Ipv4Addr>().map(IpAddr::V4)
                } else {
                    text.parse::<Ipv6Addr>().map(IpAddr::V6)
                };
                ip.map_err(|_| HeaderError::BadV1)
            };
            let source = ip(fields.next())?;
            let destination = ip(fields.next())?;
            let source_port = port(fields.next())?;
            let destination_port = port(fields.next())?;
            if fields.next().is_some() {
                return Err(HeaderError::BadV1);
            }
            Proxied::Tcp {
                source: SocketAddr::new(source, source_port),
                destination: SocketAddr::new(destination, destination_port),
            }
        }
        _ => return Err(HeaderError::BadV1),
    };
    Ok(Some((proxied, end + 2)))
}

/// A v1 port: decimal digits only, at most 65535.
fn port(text: Option<&str>) -> Result<u16, HeaderError> {
    let text = text.ok_or(HeaderError::BadV1)?;
    if text.is_empty() || text.len() > 5 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HeaderError::BadV1);
    }
    text.parse().map_err(|_| HeaderError::BadV1)
}

fn decode_v2(buf: &[u8]) -> Result<Option<(Proxied, usize)>, HeaderError> {
    let Some(&[version_command, family, hi, lo]) = buf.get(12..16) else {
        return Ok(None);
    };
    let len = 16 + usize::from(u16::from_be_bytes([hi, lo]));
    let Some(block) = buf.get(16..len) else {
        return Ok(None);
    };
    let proxied = match (version_command, family) {
        (0x20, _) => Proxied::Unknown,
        (0x21, 0x11) => {
            let a: [u8; 12] = block
                .get(..12)
                .and_then(|b| b.try_into().ok())
                .ok_or(HeaderError::BadV2)?;
            let ip = |i: usize| Ipv4Addr::new(a[i], a[i + 1], a[i + 2], a[i + 3]);
            Proxied::Tcp {
                source: SocketAddr::new(ip(0).into(), u16::from_be_bytes([a[8], a[9]])),
                destination: SocketAddr::new(ip(4).into(), u16::from_be_bytes([a[10], a[11]])),
            }
        }
        (0x21, 0x21) => {
            let a: [u8; 36] = block
                .get(..36)
                .and_then(|b| b.try_into().ok())
                .ok_or(HeaderError::BadV2)?;
            let ip = |i: usize| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&a[i..i + 16]);
                Ipv6Addr::from(octets)
            };
            Proxied::Tcp {
                source: SocketAddr::new(ip(0).into(), u16::from_be_bytes([a[32], a[33]])),
                destination: SocketAddr::new(ip(16).into(), u16::from_be_bytes([a[34], a[35]])),
            }
        }
        (0x21, _) => Proxied::Unknown,
        _ => return Err(HeaderError::BadV2),
    };
    Ok(Some((proxied, len)))
}

/// Both addresses in one family: IPv4-mapped IPv6 addresses (a dual-stack listener's view
/// of IPv4 visitors) become IPv4, and a mixed pair becomes IPv6.
fn same_family(source: SocketAddr, destination: SocketAddr) -> (SocketAddr, SocketAddr) {
    let plain = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let (s, d) = (plain(source), plain(destination));
    if s.is_ipv4() == d.is_ipv4() {
        (s, d)
    } else {
        let mapped = |a: SocketAddr| SocketAddr::new(IpAddr::V6(v6(a.ip())), a.port());
        (mapped(s), mapped(d))
    }
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// A fixed buffer the v1 line is formatted into.
struct Line {
    bytes: [u8; V1_MAX],
    len: usize,
}

impl Default for Line {
    fn default() -> Line {
        Line {
            bytes: [0; V1_MAX],
            len: 0,
        }
    }
}

impl std::fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len + s.len();
        let room = self.bytes.get_mut(self.len..end).ok_or(std::fmt::Error)?;
        room.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// Appends to a fixed buffer; v2 headers are at most 52 bytes, well inside it.
struct Cursor<'a> {
    bytes: &'a mut [u8; MAX_LEN],
    len: usize,
}

impl Cursor<'_> {
    fn put(&mut self, data: &[u8]) {
        self.bytes[self.len..self.len + data.len()].copy_from_slice(data);
        self.len += data.len();
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn v1_is_the_specifications_text() {
        let h = encode(
            Version::V1,
            addr("192.0.2.1:56324"),
            addr("198.51.100.7:443"),
        );
        assert_eq!(
            h.as_bytes(),
            b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\r\n"
        );
        let h = encode(Version::V1, addr("[2001:db8::1]:1"), addr("[::1]:22"));
        assert_eq!(h.as_bytes(), b"PROXY TCP6 2001:db8::1 ::1 1 22\r\n");
        let widest = addr("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535");
        assert_eq!(encode(Version::V1, widest, widest).as_bytes().len(), 104);
    }

    #[test]
    fn v2_is_signature_command_family_length_addresses_ports() {
        let h = encode(
            Version::V2,
            addr("192.0.2.1:56324"),
            addr("198.51.100.7:443"),
        );
        let mut expected = SIGNATURE.to_vec();
        expected.extend_from_slice(&[0x21, 0x11, 0, 12, 192, 0, 2, 1, 198, 51, 100, 7]);
        expected.extend_from_slice(&56324u16.to_be_bytes());
        expected.extend_from_slice(&443u16.to_be_bytes());
        assert_eq!(h.as_bytes(), expected);
        let h = encode(Version::V2, addr("[2001:db8::1]:1"), addr("[::1]:22"));
        assert_eq!(h.as_bytes().len(), 16 + 36);
        assert_eq!(&h.as_bytes()[12..16], &[0x21, 0x21, 0, 36]);
    }

    #[test]
    fn mapped_and_mixed_addresses_share_one_family() {
        let h = encode(
            Version::V1,
            addr("[::ffff:192.0.2.1]:5"),
            addr("[::ffff:10.0.0.1]:6"),
        );
        assert_eq!(h.as_bytes(), b"PROXY TCP4 192.0.2.1 10.0.0.1 5 6\r\n");
        let h = encode(Version::V1, addr("192.0.2.1:5"), addr("[2001:db8::2]:6"));
        assert_eq!(
            h.as_bytes(),
            b"PROXY TCP6 ::ffff:192.0.2.1 2001:db8::2 5 6\r\n"
        );
    }

    #[test]
    fn partial_headers_ask_for_more_and_garbage_is_refused() {
        let h = encode(Version::V2, addr("[2001:db8::1]:1"), addr("[::1]:22"));
        for cut in 0..h.as_bytes().len() {
            assert_eq!(decode(&h.as_bytes()[..cut]), Ok(None), "v2 cut at {cut}");
        }
        let h = encode(Version::V1, addr("192.0.2.1:1"), addr("192.0.2.2:2"));
        for cut in 0..h.as_bytes().len() {
            assert_eq!(decode(&h.as_bytes()[..cut]), Ok(None), "v1 cut at {cut}");
        }
        assert_eq!(decode(b"GET / HTTP/1.1\r\n"), Err(HeaderError::NotProxy));
        assert_eq!(decode(b"SSH-2.0-x"), Err(HeaderError::NotProxy));
        assert_eq!(decode(&[b'P'; 200]), Err(HeaderError::NotProxy));
        let mut long = b"PROXY TCP4 ".to_vec();
        long.resize(200, b'1');
        assert_eq!(decode(&long), Err(HeaderError::TooLong));
        assert_eq!(
            decode(b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n"),
            Err(HeaderError::BadV1)
        );
        assert_eq!(
            decode(b"PROXY UNKNOWN\r\nrest"),
            Ok(Some((Proxied::Unknown, 15)))
        );
    }

    fn any_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((ip, port))),
            (any::<[u8; 16]>(), any::<u16>())
                .prop_map(|(ip, port)| SocketAddr::from((Ipv6Addr::from(ip), port))),
        ]
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics_or_overreaches(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(Some((_, len))) = decode(&bytes) {
                prop_assert!(len <= bytes.len());
            }
        }

        #[test]
        fn decoding_mutated_headers_never_panics(
            source in any_addr(),
            destination in any_addr(),
            v2 in any::<bool>(),
            at in any::<usize>(),
            byte in any::<u8>(),
        ) {
            let version = if v2 { Version::V2 } else { Version::V1 };
            let mut bytes = encode(version, source, destination).as_bytes().to_vec();
            let i = at % bytes.len();
            bytes[i] = byte;
            if let Ok(Some((_, len))) = decode(&bytes) {
                prop_assert!(len <= bytes.len());
            }
        }

        #[test]
        fn every_header_decodes_to_the_addresses_it_was_made_from(
            source in any_addr(),
            destination in any_addr(),
            v2 in any::<bool>(),
            tail in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let version = if v2 { Version::V2 } else { Version::V1 };
            let header = encode(version, source, destination);
            let mut bytes = header.as_bytes().to_vec();
            bytes.extend_from_slice(&tail);
            let (s, d) = same_family(source, destination);
            prop_assert_eq!(
                decode(&bytes),
                Ok(Some((Proxied::Tcp { source: s, destination: d }, header.as_bytes().len())))
            );
        }
    }
}
