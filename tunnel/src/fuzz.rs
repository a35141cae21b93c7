//! Fuzz entry points (feature `fuzzing`, off by default): one function per decoder that faces
//! the network or a config file, for the `fuzz` crate's harness and afl.
//!
//! Invariants: every function takes arbitrary bytes and returns normally; a panic is a bug in
//! the decoder (or an oracle here saw a wrong answer). Nothing here reaches past the decoder's
//! own inputs: the handshakes talk to a client on loopback, the config resolves against an
//! empty environment (the harness runs inside an empty root, so no path the input names can be
//! read). These functions are not an API: they exist so the decoders can stay private.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::pin;
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use labcore::{Env, Secret};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

use crate::config::{
    ConfigToml, DEFAULT_NOISE_PATTERN, NoiseSettings, ProxyKind, ProxySettings, TcpSettings,
    TransportSettings, TransportType, WebsocketSettings,
};
use crate::protocol::{
    AUTH_LEN, Ack, ControlCmd, DataCmd, HELLO_LEN, Hello, TAG_LEN, UDP_HEAD_MAX, UdpHead,
};
use crate::transport::{NoiseTransport, Transport, WebsocketTransport};
use crate::udp::{FrameReader, FrameWriter};

/// The Noise server's static private key in the `noise_handshake` target: 32 bytes of 7.
/// The corpus's first handshake message was made for its public key.
pub const NOISE_SERVER_KEY: &str = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=";

/// Longest any loopback exchange may take before it counts as a hang.
const HANG: Duration = Duration::from_secs(10);

/// Polls a future that must finish without waiting (it reads from memory only).
fn now<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("a read from memory waited"),
    }
}

/// rathole's fixed-size messages: each decodes to something that encodes back to the same
/// bytes, or is refused. The input is cut into a hello, an auth, three tags and a UDP header.
pub fn frames(data: &[u8]) {
    let mut rest = data;
    let mut take = |n: usize| -> Option<Vec<u8>> {
        let (head, tail) = rest.split_at_checked(n)?;
        rest = tail;
        Some(head.to_vec())
    };
    if let Some(bytes) = take(HELLO_LEN) {
        let bytes: [u8; HELLO_LEN] = bytes.try_into().expect("taken at that length");
        if let Ok(hello) = Hello::decode(&bytes) {
            assert_eq!(hello.encode(), bytes, "hello does not round-trip");
        }
    }
    let _ = take(AUTH_LEN);
    for _ in 0..3 {
        let Some(bytes) = take(TAG_LEN) else { break };
        let bytes: [u8; TAG_LEN] = bytes.try_into().expect("taken at that length");
        if let Ok(ack) = Ack::decode(&bytes) {
            assert_eq!(ack.encode(), bytes, "ack does not round-trip");
            let _ = ack.to_string();
        }
        if let Ok(cmd) = ControlCmd::decode(&bytes) {
            assert_eq!(cmd.encode(), bytes, "control command does not round-trip");
        }
        if let Ok(cmd) = DataCmd::decode(&bytes) {
            assert_eq!(cmd.encode(), bytes, "data command does not round-trip");
        }
    }
    if let Ok(head) = UdpHead::decode(rest) {
        let mut out = [0u8; UDP_HEAD_MAX];
        let n = head.encode(&mut out);
        assert_eq!(&out[1..n], &rest[..n - 1], "udp header does not round-trip");
    }
}

/// A reader handing out at most `chunk` bytes a read, as a socket may.
struct Trickle<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl AsyncRead for Trickle<'_> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self.chunk.min(self.data.len()).min(buf.remaining());
        let (head, tail) = self.data.split_at(n);
        buf.put_slice(head);
        self.data = tail;
        Poll::Ready(Ok(()))
    }
}

/// UDP framing on a data channel: the first byte sets how many bytes each read returns, the
/// rest is the channel's bytes. Every frame read must be written back as one that reads the
/// same.
pub fn udp_frames(data: &[u8]) {
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1) * 97;
    let mut reader = FrameReader::new();
    let mut channel = Trickle {
        data: stream,
        chunk,
    };
    let mut frames: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
    while let Ok(Some((from, payload))) = now(reader.next(&mut channel)) {
        frames.push((from, payload.to_vec()));
    }
    let mut writer = FrameWriter::new();
    let mut wire: Vec<u8> = Vec::new();
    for (from, payload) in &frames {
        writer.push(*from, payload);
        now(writer.flush(&mut wire)).expect("writing to memory");
    }
    let mut again = FrameReader::new();
    let mut wire = &wire[..];
    for (from, payload) in &frames {
        let (got_from, got) = now(again.next(&mut wire))
            .expect("re-encoded frame reads")
            .expect("re-encoded frame is there");
        assert_eq!(
            (got_from, got),
            (*from, &payload[..]),
            "udp frame round trip"
        );
    }
    assert!(
        matches!(now(again.next(&mut wire)), Ok(None)),
        "re-encoding added frames"
    );
}

/// The config's TOML, parsed and resolved as `tunnel check` does, as a file in an empty folder.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/nonexistent/tunnel.toml");
    let Ok(raw) = labcore::config::parse_str::<ConfigToml>(path, text) else {
        return;
    };
    let file = labcore::config::ConfigFile::new(path);
    let env = Env::from_pairs(std::iter::empty::<(&str, &str)>());
    if let Ok(settings) = crate::config::resolve(raw, &file, &env, None) {
        let _ = format!("{settings:?}");
    }
}

/// The loopback harness for handshakes: a runtime and a listener, made once per process.
struct Loopback {
    runtime: Runtime,
    listener: TcpListener,
    addr: SocketAddr,
}

fn loopback() -> &'static Loopback {
    static LOOPBACK: OnceLock<Loopback> = OnceLock::new();
    LOOPBACK.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime");
        let listener = runtime
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("binding a loopback port");
        let addr = listener.local_addr().expect("a bound listener's address");
        Loopback {
            runtime,
            listener,
            addr,
        }
    })
}

/// Runs `server` on an accepted connection whose peer sends `data`, closes its sending side
/// and reads whatever comes back until the server closes.
fn serve<F, Fut>(data: &[u8], server: F)
where
    F: FnOnce(TcpStream) -> Fut,
    Fut: Future<Output = ()>,
{
    let lo = loopback();
    lo.runtime.block_on(async {
        let peer = async {
            let mut tcp = TcpStream::connect(lo.addr).await?;
            tcp.write_all(data).await?;
            tcp.shutdown().await?;
            let mut sink = Vec::new();
            tcp.read_to_end(&mut sink).await?;
            io::Result::Ok(())
        };
        let accepted = async {
            let (tcp, _) = lo.listener.accept().await.expect("accepting on loopback");
            server(tcp).await;
        };
        let ((), _peer_result) = tokio::time::timeout(HANG, async { tokio::join!(accepted, peer) })
            .await
            .expect("a handshake on loopback hung");
    });
}

fn settings(kind: TransportType) -> TransportSettings {
    TransportSettings {
        kind,
        tcp: TcpSettings {
            nodelay: true,
            keepalive_time: Duration::from_secs(20),
            keepalive_interval: Duration::from_secs(8),
        },
        noise: Some(NoiseSettings {
            pattern: DEFAULT_NOISE_PATTERN.into(),
            local_private_key: Some(Secret::from(NOISE_SERVER_KEY)),
            remote_public_key: None,
        }),
        tls: None,
        websocket: Some(WebsocketSettings { tls: false }),
        proxy: None,
    }
}

/// Reads a tunnel stream to its end (bounded), as a control channel would before auth.
async fn drain<S: AsyncRead + Unpin>(mut stream: S) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut total = 0usize;
    while let Ok(n) = stream.read(&mut buf).await {
        total += n;
        if n == 0 || total > 1 << 20 {
            break;
        }
    }
}

/// The server side of the Noise handshake (rathole's NK pattern with [`NOISE_SERVER_KEY`]),
/// then the encrypted stream, fed `data` by a client on loopback.
pub fn noise_handshake(data: &[u8]) {
    let transport = NoiseTransport::new(&settings(TransportType::Noise)).expect("noise settings");
    serve(data, |tcp| async move {
        if let Ok(stream) = transport.handshake(tcp).await {
            drain(stream).await;
        }
    });
}

/// The server side of the WebSocket handshake over plain TCP, then the message stream, fed
/// `data` by a client on loopback.
pub fn websocket_handshake(data: &[u8]) {
    let transport =
        WebsocketTransport::new(&settings(TransportType::Websocket)).expect("websocket settings");
    serve(data, |tcp| async move {
        if let Ok(stream) = transport.handshake(tcp).await {
            drain(stream).await;
        }
    });
}

/// The client's HTTP CONNECT through a proxy that answers `data`: the reply parser alone,
/// then the whole exchange on loopback (which reads the reply's head and nothing after it).
pub fn connect_reply(data: &[u8]) {
    use crate::transport::proxy::{MAX_REPLY, header_end, parse_reply};
    if let Some(end) = header_end(data) {
        assert!(end <= data.len() && data[..end].ends_with(b"\r\n\r\n"));
        let _ = parse_reply(&data[..end]);
    }
    let _ = parse_reply(data);
    let lo = loopback();
    let proxy = ProxySettings {
        kind: ProxyKind::Http,
        addr: lo.addr.to_string(),
        auth: None,
    };
    lo.runtime.block_on(async {
        let client = async {
            match crate::transport::proxy::connect(&proxy, "tunnel.example:2333").await {
                Ok(mut tcp) => {
                    // Connected: the head ended within the bound and was a 2xx, and every
                    // byte after it is still there for the tunnel.
                    let end = header_end(data).expect("connected without a whole head");
                    assert!(end <= MAX_REPLY, "accepted a head past the bound");
                    assert!(parse_reply(&data[..end]).is_ok(), "accepted a refusal");
                    let mut rest = Vec::new();
                    let _ = tcp.read_to_end(&mut rest).await;
                    assert_eq!(rest, &data[end..], "bytes after the head were lost");
                }
                Err(err) => {
                    let _ = err.to_string();
                }
            }
        };
        let proxy_side = async {
            let (mut tcp, _) = lo.listener.accept().await.expect("accepting on loopback");
            let _ = tcp.write_all(data).await;
            let _ = tcp.shutdown().await;
            let mut request = Vec::new();
            let _ = tcp.read_to_end(&mut request).await;
        };
        tokio::time::timeout(HANG, async { tokio::join!(client, proxy_side) })
            .await
            .expect("a CONNECT on loopback hung");
    });
}

/// The PROXY protocol header decoder as a local service's reader uses it: a verdict on a
/// buffer must not change when more bytes arrive, and a header's length is within the bytes.
pub fn proxy_header(data: &[u8]) {
    use crate::proxy_protocol::{Proxied, decode, encode};
    let verdict = decode(data);
    if let Ok(Some((proxied, len))) = verdict {
        assert!(
            len > 0 && len <= data.len(),
            "header length {len} out of range"
        );
        assert_eq!(
            decode(&data[..len]),
            verdict,
            "the header's own bytes decode differently"
        );
        // Every shorter prefix of a header asks for more bytes.
        for cut in (0..len).rev().take(256) {
            assert_eq!(decode(&data[..cut]), Ok(None), "prefix {cut} of {len}");
        }
        if let Proxied::Tcp {
            source,
            destination,
        } = proxied
        {
            for version in [
                crate::proxy_protocol::Version::V1,
                crate::proxy_protocol::Version::V2,
            ] {
                let header = encode(version, source, destination);
                let Ok(Some((again, n))) = decode(header.as_bytes()) else {
                    panic!("a re-encoded header does not decode");
                };
                assert_eq!(n, header.as_bytes().len());
                // The encoder writes IPv4-mapped addresses as IPv4 when both sides are.
                let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
                let Proxied::Tcp {
                    source: s,
                    destination: d,
                } = again
                else {
                    panic!("{version:?} re-encoding lost the addresses");
                };
                if canonical(source).is_ipv4() == canonical(destination).is_ipv4() {
                    assert_eq!(
                        (canonical(s), canonical(d)),
                        (canonical(source), canonical(destination)),
                        "{version:?} round trip"
                    );
                }
            }
        }
    }
}
