//! rathole 0.5's wire protocol: fixed-size messages in bincode 1.x's default encoding.
//!
//! Every message has a fixed length and is read whole with `read_exact`, so a decoder here
//! takes an array, never a slice of unknown length, and can allocate nothing. Enums are a
//! little-endian `u32` tag followed by their fields; byte arrays have no length prefix.
//!
//! ```text
//! Hello  = tag u32 (0 control, 1 data) | version u8 (= 1) | digest [u8; 32]   37 bytes
//! Auth   = sha256(token ‖ nonce)                                              32 bytes
//! Ack    = tag u32: 0 Ok, 1 ServiceNotExist, 2 AuthFailed                      4 bytes
//! ControlChannelCmd = tag u32: 0 CreateDataChannel, 1 HeartBeat               4 bytes
//! DataChannelCmd    = tag u32: 0 StartForwardTcp, 1 StartForwardUdp          4 bytes
//! ```
//!
//! A control channel opens with the client's `Hello::Control(sha256(service name))`; the server
//! answers `Hello::Control(nonce)` and then, for a known service, reads `Auth` and answers an
//! `Ack`. The auth digest is the session key: data channels open with `Hello::Data(key)`.
//!
//! After `StartForwardUdp` a data channel carries datagrams both ways, each as a frame:
//!
//! ```text
//! head_len u8 | UdpHeader (head_len bytes) | payload (len bytes)
//! UdpHeader = from SocketAddr | len u16
//! SocketAddr = tag u32 (0 V4, 1 V6) | ip octets (4 or 16) | port u16
//!   V4: head_len 12, 00000000 a b c d pppp llll
//!   V6: head_len 24, 01000000 16 octets pppp llll
//! ```
//!
//! `from` is the visitor's address both ways (the client answers with the address it was
//! given). A V6 address loses its flow info and scope id, as in bincode. [`UdpHead::decode`]
//! takes the `head_len` bytes, which a `u8` bounds, and ignores bytes past the header as
//! rathole's decoder does; the payload's length is a `u16`, so a frame never needs more than
//! [`UDP_FRAME_MAX`] bytes of buffer.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use serde::Deserialize;
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::Error;

/// A service's kind: rathole's `type` key.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ServiceType {
    /// TCP connections.
    #[default]
    Tcp,
    /// UDP datagrams.
    Udp,
}

/// The protocol version rathole 0.5 speaks and accepts (and nothing else).
pub(crate) const VERSION: u8 = 1;
/// Length of a `Hello` on the wire.
pub const HELLO_LEN: usize = 37;
/// Length of an `Auth` on the wire.
pub(crate) const AUTH_LEN: usize = 32;
/// Length of an `Ack`, a `ControlChannelCmd` or a `DataChannelCmd` on the wire.
pub const TAG_LEN: usize = 4;

/// The longest `UdpHeader` labkit writes (a V6 address), with its length byte.
pub(crate) const UDP_HEAD_MAX: usize = 1 + 24;
/// The most bytes one UDP frame can take on the wire: a `u8` header length, at most 255
/// header bytes, at most `u16::MAX` payload bytes.
pub(crate) const UDP_FRAME_MAX: usize = 1 + u8::MAX as usize + u16::MAX as usize;

/// A SHA-256 digest: of a service name, a nonce, or a session key.
pub type Digest = [u8; 32];

/// SHA-256 of `parts` concatenated.
pub(crate) fn digest(parts: &[&[u8]]) -> Digest {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for part in parts {
        ctx.update(part);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// The digest a service is known by on the wire: sha256 of its name.
pub fn service_digest(name: &str) -> Digest {
    digest(&[name.as_bytes()])
}

/// A random 32-byte nonce from the system's CSPRNG.
pub(crate) fn nonce() -> Result<Digest, Error> {
    let mut out = [0u8; 32];
    aws_lc_rs::rand::fill(&mut out).map_err(|_| Error::Random)?;
    Ok(out)
}

/// The proof of a token and the session key of the control channel it opens:
/// sha256(token ‖ nonce). It is a secret: `Debug` never shows it and it compares in constant
/// time.
#[derive(Clone, Copy, Eq)]
pub struct SessionKey(Digest);

impl SessionKey {
    /// The key proving `token` for the server's `nonce`.
    pub fn prove(token: &[u8], nonce: &Digest) -> SessionKey {
        SessionKey(digest(&[token, nonce]))
    }

    /// The key's bytes, for the wire.
    pub fn bytes(&self) -> &Digest {
        &self.0
    }

    /// Wraps bytes read from the wire.
    pub fn from_bytes(bytes: Digest) -> SessionKey {
        SessionKey(bytes)
    }
}

impl PartialEq for SessionKey {
    fn eq(&self, other: &SessionKey) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl std::hash::Hash for SessionKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionKey([redacted])")
    }
}

/// The first message on every connection to the server's control port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hello {
    /// Opens a control channel: sha256(service name) from the client, a nonce from the server.
    Control(Digest),
    /// Opens a data channel for the control channel with this session key.
    Data(SessionKey),
}

impl Hello {
    /// The message's bytes.
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let (tag, body) = match self {
            Hello::Control(digest) => (0u32, digest),
            Hello::Data(key) => (1u32, key.bytes()),
        };
        let mut out = [0u8; HELLO_LEN];
        out[..4].copy_from_slice(&tag.to_le_bytes());
        out[4] = VERSION;
        out[5..].copy_from_slice(body);
        out
    }

    /// Reads a hello; refuses unknown kinds and any version but [`VERSION`].
    pub fn decode(bytes: &[u8; HELLO_LEN]) -> Result<Hello, Error> {
        let tag = tag_of(bytes);
        let version = bytes[4];
        let mut body = [0u8; 32];
        body.copy_from_slice(&bytes[5..]);
        let hello = match tag {
            0 => Hello::Control(body),
            1 => Hello::Data(SessionKey(body)),
            _ => {
                return Err(Error::Malformed { what: "hello", tag });
            }
        };
        if version != VERSION {
            return Err(Error::Version { got: version });
        }
        Ok(hello)
    }
}

fn tag_of(bytes: &[u8]) -> u32 {
    let mut tag = [0u8; 4];
    tag.copy_from_slice(&bytes[..4]);
    u32::from_le_bytes(tag)
}

/// Defines a fieldless message encoded as its `u32` tag.
macro_rules! tag_message {
    ($(#[$meta:meta])* $vis:vis $name:ident, $what:literal, { $($(#[$vmeta:meta])* $variant:ident = $tag:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        $vis enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// The message's bytes.
            $vis fn encode(self) -> [u8; TAG_LEN] {
                let tag: u32 = match self { $($name::$variant => $tag),+ };
                tag.to_le_bytes()
            }

            /// Reads the message; an unknown tag is an error.
            $vis fn decode(bytes: &[u8; TAG_LEN]) -> Result<$name, Error> {
                match tag_of(bytes) {
                    $($tag => Ok($name::$variant),)+
                    tag => Err(Error::Malformed { what: $what, tag }),
                }
            }
        }
    };
}

tag_message!(
    /// The server's answer to a control channel's hello or auth.
    pub Ack, "ack", {
        /// The token is right: the control channel is open.
        Ok = 0,
        /// No service has that name.
        ServiceNotExist = 1,
        /// The token is wrong.
        AuthFailed = 2,
    }
);

tag_message!(
    /// What the server asks of a client on an open control channel.
    pub(crate) ControlCmd, "control channel command", {
        /// Open one more data channel.
        CreateDataChannel = 0,
        /// Nothing: the server is alive.
        HeartBeat = 1,
    }
);

tag_message!(
    /// What the server tells a data channel when a visitor is paired with it.
    pub(crate) DataCmd, "data channel command", {
        /// Carry one TCP connection's bytes both ways from now on.
        StartForwardTcp = 0,
        /// Carry UDP datagrams in rathole's UDP framing from now on.
        StartForwardUdp = 1,
    }
);

impl Ack {
    /// What the answer means, in words.
    pub(crate) fn meaning(self) -> &'static str {
        match self {
            Ack::Ok => "ok",
            Ack::ServiceNotExist => "no such service",
            Ack::AuthFailed => "wrong token",
        }
    }
}

impl fmt::Display for Ack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.meaning())
    }
}

/// The header of one UDP frame: the visitor's address and the payload's length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct UdpHead {
    /// The visitor the datagram came from or goes to.
    pub(crate) from: SocketAddr,
    /// The payload's length.
    pub(crate) len: u16,
}

impl UdpHead {
    /// Writes the length byte and the header at the start of `out`; returns how many bytes
    /// that took (13 for V4, 25 for V6).
    pub(crate) fn encode(&self, out: &mut [u8; UDP_HEAD_MAX]) -> usize {
        let head_len = match self.from {
            SocketAddr::V4(addr) => {
                out[1..5].copy_from_slice(&0u32.to_le_bytes());
                out[5..9].copy_from_slice(&addr.ip().octets());
                9
            }
            SocketAddr::V6(addr) => {
                out[1..5].copy_from_slice(&1u32.to_le_bytes());
                out[5..21].copy_from_slice(&addr.ip().octets());
                21
            }
        };
        out[head_len..head_len + 2].copy_from_slice(&self.from.port().to_le_bytes());
        out[head_len + 2..head_len + 4].copy_from_slice(&self.len.to_le_bytes());
        let total = head_len + 4;
        out[0] = (total - 1) as u8;
        total
    }

    /// Reads the `head_len` bytes after the length byte; bytes past the header are ignored.
    pub(crate) fn decode(bytes: &[u8]) -> Result<UdpHead, Error> {
        let short = || Error::UdpHeader { len: bytes.len() };
        let tag = bytes.get(..4).ok_or_else(short)?;
        let tag = tag_of(tag);
        let (ip, rest): (IpAddr, &[u8]) = match tag {
            0 => {
                let octets: [u8; 4] = bytes
                    .get(4..8)
                    .ok_or_else(short)?
                    .try_into()
                    .map_err(|_| short())?;
                (IpAddr::from(octets), &bytes[8..])
            }
            1 => {
                let octets: [u8; 16] = bytes
                    .get(4..20)
                    .ok_or_else(short)?
                    .try_into()
                    .map_err(|_| short())?;
                (IpAddr::from(octets), &bytes[20..])
            }
            tag => {
                return Err(Error::Malformed {
                    what: "udp header address",
                    tag,
                });
            }
        };
        let rest = rest.get(..4).ok_or_else(short)?;
        let port = u16::from_le_bytes([rest[0], rest[1]]);
        let len = u16::from_le_bytes([rest[2], rest[3]]);
        Ok(UdpHead {
            from: SocketAddr::new(ip, port),
            len,
        })
    }
}

/// Reads exactly one message of `buf`'s length; `what` names it in errors.
pub(crate) async fn read_exact<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut [u8],
    what: &'static str,
) -> Result<(), Error> {
    match stream.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => Err(Error::Closed { what }),
        Err(err) => Err(Error::io(format!("reading the {what}"), err)),
    }
}

/// Writes and flushes one message; `what` names it in errors.
pub(crate) async fn write_all<S: AsyncWrite + Unpin>(
    stream: &mut S,
    bytes: &[u8],
    what: &'static str,
) -> Result<(), Error> {
    let result = async {
        stream.write_all(bytes).await?;
        stream.flush().await
    };
    result
        .await
        .map_err(|err| Error::io(format!("writing the {what}"), err))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn lengths_match_rathole_0_5() {
        assert_eq!(Hello::Control([0; 32]).encode().len(), 37);
        assert_eq!(Ack::Ok.encode().len(), 4);
        assert_eq!(AUTH_LEN, 32);
    }

    #[test]
    fn hello_is_tag_version_digest() {
        let digest = service_digest("ssh");
        let bytes = Hello::Control(digest).encode();
        assert_eq!(&bytes[..5], &[0, 0, 0, 0, 1]);
        assert_eq!(&bytes[5..], &digest);
        let data = Hello::Data(SessionKey([7; 32])).encode();
        assert_eq!(&data[..5], &[1, 0, 0, 0, 1]);
        assert_eq!(
            Hello::decode(&data).unwrap(),
            Hello::Data(SessionKey([7; 32]))
        );
    }

    #[test]
    fn service_digest_is_sha256_of_the_name() {
        assert_eq!(
            service_digest("abc")[..4],
            [0xba, 0x78, 0x16, 0xbf],
            "sha256(\"abc\") starts ba7816bf"
        );
    }

    #[test]
    fn session_key_is_sha256_of_token_then_nonce() {
        let nonce = [1u8; 32];
        let key = SessionKey::prove(b"tok", &nonce);
        let mut joined = b"tok".to_vec();
        joined.extend_from_slice(&nonce);
        assert_eq!(key.bytes(), &digest(&[&joined]));
        assert_eq!(format!("{key:?}"), "SessionKey([redacted])");
    }

    #[test]
    fn a_newer_version_is_refused() {
        let mut bytes = Hello::Control([0; 32]).encode();
        bytes[4] = 2;
        let err = Hello::decode(&bytes).unwrap_err();
        assert!(err.to_string().contains("version 2"), "{err}");
    }

    #[test]
    fn unknown_tags_are_refused() {
        assert!(Ack::decode(&[3, 0, 0, 0]).is_err());
        assert!(ControlCmd::decode(&[0, 0, 0, 1]).is_err());
        assert_eq!(
            DataCmd::decode(&[1, 0, 0, 0]).unwrap(),
            DataCmd::StartForwardUdp
        );
        let err = Hello::decode(&[9; HELLO_LEN]).unwrap_err();
        assert!(err.to_string().contains("malformed hello"), "{err}");
    }

    #[test]
    fn udp_heads_are_bincode_socket_addrs_and_a_u16_length() {
        let mut out = [0u8; UDP_HEAD_MAX];
        let v4 = UdpHead {
            from: "192.0.2.7:5353".parse().unwrap(),
            len: 65_507,
        };
        let n = v4.encode(&mut out);
        assert_eq!(
            &out[..n],
            &[12, 0, 0, 0, 0, 192, 0, 2, 7, 0xe9, 0x14, 0xe3, 0xff],
            "length 12, tag 0, octets, port 5353 LE, len 65507 LE"
        );
        assert_eq!(UdpHead::decode(&out[1..n]).unwrap(), v4);
        let v6 = UdpHead {
            from: "[2001:db8::1]:53".parse().unwrap(),
            len: 3,
        };
        let n = v6.encode(&mut out);
        assert_eq!(n, UDP_HEAD_MAX);
        assert_eq!(&out[..5], &[24, 1, 0, 0, 0]);
        assert_eq!(&out[5..7], &[0x20, 0x01]);
        assert_eq!(&out[21..25], &[53, 0, 3, 0]);
        assert_eq!(UdpHead::decode(&out[1..n]).unwrap(), v6);
    }

    #[test]
    fn udp_heads_that_are_short_or_of_an_unknown_family_are_refused() {
        let err = UdpHead::decode(&[0, 0, 0, 0, 127, 0, 0, 1, 0]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "malformed udp header: 9 bytes is too short"
        );
        let err = UdpHead::decode(&[2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap_err();
        assert!(err.to_string().contains("unknown tag 2"), "{err}");
        assert!(UdpHead::decode(&[]).is_err());
        // Trailing bytes are ignored, as bincode 1 does for rathole.
        let head = UdpHead::decode(&[0, 0, 0, 0, 10, 0, 0, 1, 80, 0, 1, 0, 9, 9]).unwrap();
        assert_eq!(head.from, "10.0.0.1:80".parse::<SocketAddr>().unwrap());
        assert_eq!(head.len, 1);
    }

    proptest! {
        #[test]
        fn udp_head_decoding_never_panics_and_round_trips(bytes in proptest::collection::vec(any::<u8>(), 0..=255)) {
            if let Ok(head) = UdpHead::decode(&bytes) {
                let mut out = [0u8; UDP_HEAD_MAX];
                let n = head.encode(&mut out);
                prop_assert_eq!(usize::from(out[0]), n - 1);
                prop_assert_eq!(&out[1..n], &bytes[..n - 1]);
                prop_assert_eq!(UdpHead::decode(&out[1..n]).unwrap(), head);
            }
        }

        #[test]
        fn udp_heads_round_trip_for_every_address(v6 in any::<bool>(), octets in proptest::array::uniform16(any::<u8>()), port in any::<u16>(), len in any::<u16>()) {
            let ip = if v6 {
                IpAddr::from(octets)
            } else {
                IpAddr::from([octets[0], octets[1], octets[2], octets[3]])
            };
            let head = UdpHead { from: SocketAddr::new(ip, port), len };
            let mut out = [0u8; UDP_HEAD_MAX];
            let n = head.encode(&mut out);
            prop_assert_eq!(n, if v6 { 25 } else { 13 });
            prop_assert_eq!(UdpHead::decode(&out[1..n]).unwrap(), head);
        }

        #[test]
        fn auth_and_session_keys_round_trip(bytes in proptest::array::uniform32(any::<u8>())) {
            let key = SessionKey::from_bytes(bytes);
            prop_assert_eq!(key.bytes(), &bytes);
            prop_assert_eq!(Hello::decode(&Hello::Data(key).encode()).unwrap(), Hello::Data(key));
        }

        #[test]
        fn hello_decoding_never_panics_and_round_trips(bytes in proptest::array::uniform32(any::<u8>()), head in proptest::array::uniform5(any::<u8>())) {
            let mut wire = [0u8; HELLO_LEN];
            wire[..5].copy_from_slice(&head);
            wire[5..].copy_from_slice(&bytes);
            if let Ok(hello) = Hello::decode(&wire) {
                prop_assert_eq!(hello.encode(), wire);
            }
        }

        #[test]
        fn tag_decoding_never_panics_and_round_trips(wire in proptest::array::uniform4(any::<u8>())) {
            if let Ok(ack) = Ack::decode(&wire) { prop_assert_eq!(ack.encode(), wire); }
            if let Ok(cmd) = ControlCmd::decode(&wire) { prop_assert_eq!(cmd.encode(), wire); }
            if let Ok(cmd) = DataCmd::decode(&wire) { prop_assert_eq!(cmd.encode(), wire); }
        }
    }
}
