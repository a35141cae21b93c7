//! The PROXY protocol listener option (`servers { listener_wrappers { proxy_protocol { timeout D;
//! allow CIDR... } tls } }`, Caddy 2.7's spelling): a balancer or the tunnel in front of edge
//! opens each connection with a HAProxy PROXY header (v1 text or v2 binary) naming the client,
//! and edge takes that client as the connection's peer, before TLS.
//!
//! The header arrives before any authentication, so everything about it is bounded: a peer
//! outside `allow` is closed unread (its header would be a lie edge cannot check), the whole
//! header must arrive within `timeout` (default 5s, as Caddy), a v1 line is at most 107 bytes,
//! a v2 header's declared length is checked against [`V2_MAX_BODY`] before a byte of it is
//! read or a buffer is sized from it, and nothing past the header is read (those bytes are
//! the client's TLS or HTTP). A connection whose header is missing or malformed is closed.
//! v2 `LOCAL` (the balancer's own health checks), `UNKNOWN`/`UNSPEC` and unix-socket sources
//! keep the real peer; TLVs are checked for shape and otherwise ignored.
//!
//! Written here, not taken from a crate (`ppp` parses a complete buffer, so the bounded
//! reading, the part that matters, would be ours anyway): the decoder is small enough to read
//! whole, and it never allocates before the length is checked.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::matchers::Cidr;

/// The v2 header's first twelve bytes.
const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 header, `\r\n` included (the specification's bound).
const V1_MAX: usize = 107;
/// The most bytes of addresses and TLVs a v2 header may declare: the largest address block
/// (unix, 216 bytes) plus TLVs balancers send (AWS, Azure, GCP ids, HAProxy's SSL fields)
/// fit well within it; the format's own limit, 65535, is more than a peer should make edge
/// read before it has said anything else.
pub(crate) const V2_MAX_BODY: usize = 4096;
/// Caddy's default time for the header to arrive.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// `[proxy_protocol]` in edge.toml.
#[derive(Debug, Default, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(crate) struct Toml {
    /// Time the header has to arrive. Default "5s".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) timeout: Option<String>,
    /// Peers that may send a header (addresses, CIDR ranges, "private_ranges"); others are
    /// closed. Empty: any peer, and every one must send a header.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) allow: Vec<String>,
}

/// The checked option.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Settings {
    timeout: Duration,
    allow: Vec<Cidr>,
}

/// Why a connection was closed before its first request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The peer is not in `allow`.
    #[error("peer is not allowed to send PROXY headers")]
    NotAllowed,
    /// No complete header within the timeout.
    #[error("no PROXY header within {0:?}")]
    Timeout(Duration),
    /// The connection ended or failed first.
    #[error("connection ended before the PROXY header did")]
    Closed,
    /// The bytes are not a PROXY header, or not a valid one.
    #[error("{0}")]
    Malformed(&'static str),
}

impl Settings {
    /// Checks `toml`, naming the value at fault.
    pub(crate) fn build(toml: &Toml) -> Result<Settings, String> {
        let timeout = match &toml.timeout {
            None => DEFAULT_TIMEOUT,
            Some(text) => crate::site::parse_duration(text)
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    format!("proxy_protocol timeout: {text:?} is not a positive duration")
                })?,
        };
        let mut allow = Vec::new();
        for range in &toml.allow {
            allow.extend(Cidr::parse(range).map_err(|m| format!("proxy_protocol allow: {m}"))?);
        }
        Ok(Settings { timeout, allow })
    }

    /// Reads the header `peer` opens `stream` with and returns the client it names (the
    /// peer itself for LOCAL, UNKNOWN and unix sources). Reads nothing past the header.
    pub(crate) async fn accept<S: AsyncRead + Unpin>(
        &self,
        stream: &mut S,
        peer: SocketAddr,
    ) -> Result<SocketAddr, Refused> {
        if !self.allow.is_empty() && !self.allow.iter().any(|c| c.contains(peer.ip())) {
            return Err(Refused::NotAllowed);
        }
        match tokio::time::timeout(self.timeout, read_header(stream)).await {
            Err(_) => Err(Refused::Timeout(self.timeout)),
            Ok(Err(e)) => Err(e),
            Ok(Ok(source)) => Ok(source.unwrap_or(peer)),
        }
    }
}

/// Reads one header; `None` when it names no IP source.
async fn read_header<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Option<SocketAddr>, Refused> {
    let mut head = [0u8; 16];
    // Six bytes tell the versions apart ("PROXY " or the signature's start) and are within
    // the shortest v1 header ("PROXY UNKNOWN\r\n", 15 bytes).
    fill(stream, &mut head[..6]).await?;
    if &head[..6] == b"PROXY " {
        let mut line = [0u8; V1_MAX];
        line[..6].copy_from_slice(&head[..6]);
        let mut len = 6;
        // One byte at a time: the line's end is not known before it is read, and bytes past
        // it are the client's. At most 101 reads, for v1 senders only.
        loop {
            if len == V1_MAX {
                return Err(Refused::Malformed("PROXY v1 line longer than 107 bytes"));
            }
            fill(stream, &mut line[len..=len]).await?;
            len += 1;
            if line[len - 1] == b'\n' {
                return parse_v1(&line[..len]);
            }
        }
    }
    if head[..6] != SIGNATURE[..6] {
        return Err(Refused::Malformed("not a PROXY protocol header"));
    }
    fill(stream, &mut head[6..]).await?;
    let declared = usize::from(u16::from_be_bytes([head[14], head[15]]));
    if head[..12] != SIGNATURE {
        return Err(Refused::Malformed("not a PROXY protocol header"));
    }
    if declared > V2_MAX_BODY {
        return Err(Refused::Malformed(
            "PROXY v2 header longer than edge accepts",
        ));
    }
    let mut body = vec![0u8; declared];
    fill(stream, &mut body).await?;
    parse_v2(&head, &body)
}

async fn fill<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut [u8]) -> Result<(), Refused> {
    stream
        .read_exact(buf)
        .await
        .map(|_| ())
        .map_err(|_| Refused::Closed)
}

/// `PROXY TCP4|TCP6 SRC DST SPORT DPORT\r\n` or `PROXY UNKNOWN...\r\n`.
pub(crate) fn parse_v1(line: &[u8]) -> Result<Option<SocketAddr>, Refused> {
    let bad = Refused::Malformed("malformed PROXY v1 line");
    let text = line
        .strip_suffix(b"\r\n")
        .and_then(|l| std::str::from_utf8(l).ok())
        .ok_or(Refused::Malformed("malformed PROXY v1 line"))?;
    let mut fields = text.split(' ');
    if fields.next() != Some("PROXY") {
        return Err(bad);
    }
    let family = fields
        .next()
        .ok_or(Refused::Malformed("malformed PROXY v1 line"))?;
    if family == "UNKNOWN" {
        // The sender does not know the client; whatever follows is to be ignored.
        return Ok(None);
    }
    let parts: Vec<&str> = fields.collect();
    let [src, dst, sport, dport] = parts.as_slice() else {
        return Err(bad);
    };
    let port = |p: &str| -> Option<u16> {
        // Decimal without a sign or a leading zero, as the specification writes them.
        (!p.is_empty()
            && p.bytes().all(|b| b.is_ascii_digit())
            && (p == "0" || !p.starts_with('0')))
        .then(|| p.parse().ok())
        .flatten()
    };
    let (Some(sport), Some(_)) = (port(sport), port(dport)) else {
        return Err(bad);
    };
    let source: IpAddr = match family {
        "TCP4" => {
            let (Ok(s), Ok(_)) = (src.parse::<Ipv4Addr>(), dst.parse::<Ipv4Addr>()) else {
                return Err(bad);
            };
            s.into()
        }
        "TCP6" => {
            let (Ok(s), Ok(_)) = (src.parse::<Ipv6Addr>(), dst.parse::<Ipv6Addr>()) else {
                return Err(bad);
            };
            s.into()
        }
        _ => return Err(bad),
    };
    Ok(Some(SocketAddr::new(source, sport)))
}

/// A v2 header: `head` is its fixed 16 bytes, `body` the declared bytes after them.
pub(crate) fn parse_v2(head: &[u8; 16], body: &[u8]) -> Result<Option<SocketAddr>, Refused> {
    if head[12] >> 4 != 2 {
        return Err(Refused::Malformed("unsupported PROXY protocol version"));
    }
    let local = match head[12] & 0x0f {
        0 => true,
        1 => false,
        _ => return Err(Refused::Malformed("unknown PROXY v2 command")),
    };
    // Address family (high nibble) and transport (low nibble: 0 unspec, 1 stream, 2 dgram).
    let (family, transport) = (head[13] >> 4, head[13] & 0x0f);
    if transport > 2 || family > 3 {
        return Err(Refused::Malformed("unknown PROXY v2 address family"));
    }
    let address_len = match family {
        0 => 0,
        1 => 12,
        2 => 36,
        _ => 216,
    };
    if body.len() < address_len {
        return Err(Refused::Malformed("PROXY v2 address block too short"));
    }
    let (address, tlvs) = body.split_at(address_len);
    check_tlvs(tlvs)?;
    if local {
        // The balancer's own connection (a health check): it is the peer.
        return Ok(None);
    }
    Ok(match family {
        1 => {
            let ip = Ipv4Addr::new(address[0], address[1], address[2], address[3]);
            Some(SocketAddr::new(
                ip.into(),
                u16::from_be_bytes([address[8], address[9]]),
            ))
        }
        2 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&address[..16]);
            let port = u16::from_be_bytes([address[32], address[33]]);
            Some(SocketAddr::new(Ipv6Addr::from(octets).into(), port))
        }
        // UNSPEC and unix sockets name no IP client: the peer stays.
        _ => None,
    })
}

/// TLVs (type, 2-byte length, value) must fill the rest exactly; their values are not used.
fn check_tlvs(mut rest: &[u8]) -> Result<(), Refused> {
    while !rest.is_empty() {
        let [_, hi, lo, after @ ..] = rest else {
            return Err(Refused::Malformed("truncated PROXY v2 TLV"));
        };
        let len = usize::from(u16::from_be_bytes([*hi, *lo]));
        if after.len() < len {
            return Err(Refused::Malformed("PROXY v2 TLV longer than the header"));
        }
        rest = &after[len..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut out = SIGNATURE.to_vec();
        out.push(0x20 | command);
        out.push(family);
        out.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    fn tcp4_body(src: [u8; 4], sport: u16) -> Vec<u8> {
        let mut body = src.to_vec();
        body.extend_from_slice(&[192, 0, 2, 1]);
        body.extend_from_slice(&sport.to_be_bytes());
        body.extend_from_slice(&443u16.to_be_bytes());
        body
    }

    fn settings(allow: &[&str]) -> Settings {
        Settings::build(&Toml {
            timeout: Some("200ms".into()),
            allow: allow.iter().map(|s| (*s).to_owned()).collect(),
        })
        .unwrap()
    }

    fn peer() -> SocketAddr {
        "10.0.0.9:40000".parse().unwrap()
    }

    /// Runs `accept` over `bytes` followed by "rest", returning its verdict and what the
    /// stream still holds (the bytes after the header must be left for TLS or HTTP).
    async fn run(s: &Settings, bytes: &[u8]) -> (Result<SocketAddr, Refused>, Vec<u8>) {
        let mut input = bytes.to_vec();
        input.extend_from_slice(b"rest");
        let mut stream = &input[..];
        let verdict = s.accept(&mut stream, peer()).await;
        (verdict, stream.to_vec())
    }

    #[tokio::test]
    async fn a_v1_header_names_the_client_and_leaves_the_rest_unread() {
        let (v, rest) = run(
            &settings(&[]),
            b"PROXY TCP4 203.0.113.7 192.0.2.1 5555 443\r\n",
        )
        .await;
        assert_eq!(v, Ok("203.0.113.7:5555".parse().unwrap()));
        assert_eq!(rest, b"rest");
        let (v, _) = run(&settings(&[]), b"PROXY TCP6 2001:db8::7 ::1 1 2\r\n").await;
        assert_eq!(v, Ok("[2001:db8::7]:1".parse().unwrap()));
    }

    #[tokio::test]
    async fn a_v1_unknown_header_keeps_the_peer() {
        let (v, rest) = run(&settings(&[]), b"PROXY UNKNOWN\r\n").await;
        assert_eq!(v, Ok(peer()));
        assert_eq!(rest, b"rest");
        let (v, _) = run(&settings(&[]), b"PROXY UNKNOWN ffff::1 ::1 1 2\r\n").await;
        assert_eq!(v, Ok(peer()));
    }

    #[tokio::test]
    async fn a_v2_header_with_tlvs_names_the_client_and_leaves_the_rest_unread() {
        let mut body = tcp4_body([203, 0, 113, 7], 5555);
        // An ALPN TLV and a NOOP one.
        body.extend_from_slice(&[0x01, 0, 2, b'h', b'2', 0x04, 0, 0]);
        let (v, rest) = run(&settings(&[]), &v2(1, 0x11, &body)).await;
        assert_eq!(v, Ok("203.0.113.7:5555".parse().unwrap()));
        assert_eq!(rest, b"rest");
        let mut body6 = vec![0x20, 0x01, 0x0d, 0xb8];
        body6.extend_from_slice(&[0; 11]);
        body6.push(7);
        body6.extend_from_slice(&[0; 16]);
        body6.extend_from_slice(&[0x15, 0xb3, 0x01, 0xbb]);
        let (v, _) = run(&settings(&[]), &v2(1, 0x21, &body6)).await;
        assert_eq!(v, Ok("[2001:db8::7]:5555".parse().unwrap()));
    }

    #[tokio::test]
    async fn v2_local_unspec_and_unix_headers_keep_the_peer() {
        let (v, rest) = run(&settings(&[]), &v2(0, 0x11, &tcp4_body([1, 2, 3, 4], 1))).await;
        assert_eq!((v, rest.as_slice()), (Ok(peer()), &b"rest"[..]));
        let (v, _) = run(&settings(&[]), &v2(0, 0x00, &[])).await;
        assert_eq!(v, Ok(peer()));
        let (v, _) = run(&settings(&[]), &v2(1, 0x00, &[])).await;
        assert_eq!(v, Ok(peer()));
        let (v, rest) = run(&settings(&[]), &v2(1, 0x31, &[b'/'; 216])).await;
        assert_eq!((v, rest.as_slice()), (Ok(peer()), &b"rest"[..]));
    }

    #[tokio::test]
    async fn a_peer_outside_allow_is_refused_before_anything_is_read() {
        let header = b"PROXY TCP4 203.0.113.7 192.0.2.1 5555 443\r\n";
        let (v, rest) = run(&settings(&["192.168.0.0/16"]), header).await;
        assert_eq!(v, Err(Refused::NotAllowed));
        assert_eq!(rest.len(), header.len() + 4, "nothing was read");
        let (v, _) = run(&settings(&["10.0.0.0/8"]), header).await;
        assert_eq!(v, Ok("203.0.113.7:5555".parse().unwrap()));
    }

    #[tokio::test]
    async fn a_header_that_never_completes_times_out() {
        let (client, mut server) = tokio::io::duplex(64);
        let mut client = client;
        client.write_all(b"PROXY TCP4 1.2.3.4").await.unwrap();
        let started = std::time::Instant::now();
        let v = settings(&[]).accept(&mut server, peer()).await;
        assert_eq!(v, Err(Refused::Timeout(Duration::from_millis(200))));
        assert!(started.elapsed() < Duration::from_secs(5));
        drop(client);
    }

    #[tokio::test]
    async fn an_oversized_v2_length_is_refused_without_reading_it() {
        let mut header = SIGNATURE.to_vec();
        header.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        // The stream holds only the 16 bytes: reading the declared 65535 would wait.
        let mut stream = &header[..];
        let v = settings(&[]).accept(&mut stream, peer()).await;
        assert_eq!(
            v,
            Err(Refused::Malformed(
                "PROXY v2 header longer than edge accepts"
            ))
        );
    }

    #[tokio::test]
    async fn malformed_headers_are_each_refused() {
        let long_v1 = {
            let mut l = b"PROXY TCP4 ".to_vec();
            l.extend_from_slice(&[b'1'; 120]);
            l.extend_from_slice(b"\r\n");
            l
        };
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("no header at all", b"GET / HTTP/1.1\r\n\r\n".to_vec()),
            ("a TLS ClientHello", vec![0x16, 3, 1, 0, 0xc8, 1, 0, 0]),
            ("v1 over 107 bytes", long_v1),
            (
                "v1 without CR",
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n".to_vec(),
            ),
            ("v1 with v6 in TCP4", b"PROXY TCP4 ::1 ::1 1 2\r\n".to_vec()),
            (
                "v1 with v4 in TCP6",
                b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n".to_vec(),
            ),
            (
                "v1 port too large",
                b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n".to_vec(),
            ),
            (
                "v1 port with a sign",
                b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n".to_vec(),
            ),
            (
                "v1 leading zero",
                b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n".to_vec(),
            ),
            (
                "v1 missing field",
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n".to_vec(),
            ),
            (
                "v1 extra field",
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n".to_vec(),
            ),
            (
                "v1 double space",
                b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n".to_vec(),
            ),
            (
                "v1 unknown family",
                b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n".to_vec(),
            ),
            (
                "v1 not UTF-8",
                b"PROXY TCP4 \xff.2.3.4 5.6.7.8 1 2\r\n".to_vec(),
            ),
            ("v2 wrong signature", {
                let mut h = v2(1, 0x11, &tcp4_body([1, 2, 3, 4], 1));
                h[11] = b'X';
                h
            }),
            ("v2 version 1", {
                let mut h = v2(1, 0x11, &tcp4_body([1, 2, 3, 4], 1));
                h[12] = 0x11;
                h
            }),
            ("v2 command 2", v2(2, 0x11, &tcp4_body([1, 2, 3, 4], 1))),
            ("v2 family 4", v2(1, 0x41, &tcp4_body([1, 2, 3, 4], 1))),
            ("v2 transport 3", v2(1, 0x13, &tcp4_body([1, 2, 3, 4], 1))),
            ("v2 short v4 block", v2(1, 0x11, &[1, 2, 3, 4])),
            ("v2 short v6 block", v2(1, 0x21, &[0; 20])),
            ("v2 short unix block", v2(1, 0x31, &[0; 100])),
            ("v2 truncated TLV", {
                let mut b = tcp4_body([1, 2, 3, 4], 1);
                b.extend_from_slice(&[0x01, 0]);
                v2(1, 0x11, &b)
            }),
            ("v2 TLV past the end", {
                let mut b = tcp4_body([1, 2, 3, 4], 1);
                b.extend_from_slice(&[0x01, 0, 9, b'x']);
                v2(1, 0x11, &b)
            }),
        ];
        for (what, bytes) in cases {
            let (v, _) = run(&settings(&[]), &bytes).await;
            assert!(matches!(v, Err(Refused::Malformed(_))), "{what}: {v:?}");
        }
    }

    #[tokio::test]
    async fn every_truncation_of_a_header_is_refused_as_closed() {
        let mut body = tcp4_body([203, 0, 113, 7], 5555);
        body.extend_from_slice(&[0x01, 0, 2, b'h', b'2']);
        for header in [
            b"PROXY TCP4 203.0.113.7 192.0.2.1 5555 443\r\n".to_vec(),
            v2(1, 0x11, &body),
        ] {
            for cut in 0..header.len() {
                let mut stream = &header[..cut];
                let v = settings(&[]).accept(&mut stream, peer()).await;
                assert_eq!(v, Err(Refused::Closed), "cut at {cut}");
            }
        }
    }

    #[test]
    fn timeouts_must_be_positive_and_ranges_valid() {
        let err = Settings::build(&Toml {
            timeout: Some("0s".into()),
            ..Toml::default()
        })
        .unwrap_err();
        assert!(err.contains("\"0s\""), "{err}");
        let err = Settings::build(&Toml {
            allow: vec!["10.0.0.0/99".into()],
            ..Toml::default()
        })
        .unwrap_err();
        assert!(err.contains("10.0.0.0/99"), "{err}");
        assert_eq!(
            Settings::build(&Toml::default()).unwrap().timeout,
            DEFAULT_TIMEOUT
        );
    }

    proptest::proptest! {
        /// PROXY headers are the first untrusted bytes: any input is a verdict, never a
        /// panic, and an accepted header never consumes more than its own bytes.
        #[test]
        fn any_bytes_get_a_verdict(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300), v2_prefix in proptest::prelude::any::<bool>()) {
            let mut input = if v2_prefix { SIGNATURE.to_vec() } else { Vec::new() };
            input.extend_from_slice(&data);
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
            let s = settings(&[]);
            let mut stream = &input[..];
            let verdict = rt.block_on(s.accept(&mut stream, peer()));
            if verdict.is_ok() {
                proptest::prop_assert!(input.len() - stream.len() <= 16 + V2_MAX_BODY);
            }
        }
    }
}
