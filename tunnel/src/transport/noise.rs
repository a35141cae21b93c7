//! The Noise transport, rathole's `type = "noise"`: TCP, then a Noise handshake (rathole's
//! default pattern `Noise_NK_25519_ChaChaPoly_BLAKE2s`: the client knows the server's static
//! public key, the server proves it holds the private one), then every message encrypted.
//!
//! The framing is snowstorm 0.4's, which rathole 0.5 uses: each handshake and transport
//! message is a little-endian `u16` length and that many bytes, at most 65,535. The Noise
//! state machine is the `snow` crate's, with aws-lc-rs's ciphers plugged in; the framing and
//! the stream are written here because snowstorm pins an old snow.
//!
//! A stream holds one receive buffer (a whole frame plus what follows it), one buffer of
//! decrypted bytes and one encrypted frame on its way out: three 64 KiB buffers made once the
//! handshake is done, none per message. The handshake itself runs in small buffers on the
//! stack: a peer that announces a handshake message longer than [`MAX_HANDSHAKE_MESSAGE`] is
//! refused before anything is read, so a connection that never completes a handshake costs
//! a socket and a task, not 192 KiB.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use aws_lc_rs::aead;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use snow::params::{CipherChoice, DHChoice, HashChoice, NoiseParams};
use snow::resolvers::{CryptoResolver, DefaultResolver, FallbackResolver};
use snow::types::{Cipher, Dh, Hash, Random};
use snow::{Builder, HandshakeState, TransportState};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::{TcpTransport, Transport, TunnelStream};
use crate::config::{NoiseSettings, TransportSettings};
use crate::error::Error;

/// The longest Noise message.
const MAX_MESSAGE: usize = 65_535;
/// The authentication tag each transport message carries.
const TAG: usize = 16;
/// The most plaintext one message carries.
const MAX_PAYLOAD: usize = MAX_MESSAGE - TAG;
/// The length prefix.
const LEN: usize = 2;
/// The longest handshake message accepted. The patterns this tunnel runs send at most 96
/// bytes (an ephemeral key, an encrypted static key, an empty payload's tag), as rathole does.
const MAX_HANDSHAKE_MESSAGE: usize = 1024;

/// Which setting a Noise handshake cannot be built from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum KeyError {
    /// The pattern does not parse or is not supported.
    #[error(
        "not a Noise pattern this tunnel supports (rathole's default is Noise_NK_25519_ChaChaPoly_BLAKE2s)"
    )]
    Pattern,
    /// The private key is not 32 bytes of base64, or the pattern needs one.
    #[error("must be 32 bytes in base64 (tunnel genkey makes a pair), and this pattern needs it")]
    LocalKey,
    /// The public key is not 32 bytes of base64, or the pattern needs one.
    #[error("must be 32 bytes in base64 (the server's public key), and this pattern needs it")]
    RemoteKey,
}

fn key_bytes(base64: &str) -> Option<[u8; 32]> {
    STANDARD.decode(base64.trim()).ok()?.try_into().ok()
}

/// This side's handshake from `settings`: the client initiates, the server responds.
pub(crate) fn handshake_state(
    settings: &NoiseSettings,
    initiator: bool,
) -> Result<HandshakeState, KeyError> {
    let params: NoiseParams = settings.pattern.parse().map_err(|_| KeyError::Pattern)?;
    let local = match &settings.local_private_key {
        Some(key) => Some(key_bytes(key.expose()).ok_or(KeyError::LocalKey)?),
        None => None,
    };
    let remote = match &settings.remote_public_key {
        Some(key) => Some(key_bytes(key).ok_or(KeyError::RemoteKey)?),
        None => None,
    };
    let mut builder = Builder::with_resolver(params.clone(), resolver());
    // As rathole does: a side without a private key gets a throwaway one.
    let generated;
    let local = match &local {
        Some(key) => &key[..],
        None => {
            generated = Builder::new(params)
                .generate_keypair()
                .map_err(|_| KeyError::LocalKey)?;
            &generated.private[..]
        }
    };
    builder = builder
        .local_private_key(local)
        .map_err(|_| KeyError::LocalKey)?;
    if let Some(remote) = &remote {
        builder = builder
            .remote_public_key(remote)
            .map_err(|_| KeyError::RemoteKey)?;
    }
    let built = if initiator {
        builder.build_initiator()
    } else {
        builder.build_responder()
    };
    built.map_err(|_| {
        if initiator {
            KeyError::RemoteKey
        } else {
            KeyError::LocalKey
        }
    })
}

/// snow's primitives, but with aws-lc-rs's assembly ChaCha20-Poly1305 and AES-256-GCM, which
/// carry the data path (measured here: rathole's RustCrypto ciphers cost more CPU per GB).
fn resolver() -> snow::resolvers::BoxedCryptoResolver {
    Box::new(FallbackResolver::new(
        Box::new(AwsLcCiphers),
        Box::new(DefaultResolver),
    ))
}

struct AwsLcCiphers;

impl CryptoResolver for AwsLcCiphers {
    fn resolve_rng(&self) -> Option<Box<dyn Random>> {
        None
    }

    fn resolve_dh(&self, _: &DHChoice) -> Option<Box<dyn Dh>> {
        None
    }

    fn resolve_hash(&self, _: &HashChoice) -> Option<Box<dyn Hash>> {
        None
    }

    fn resolve_cipher(&self, choice: &CipherChoice) -> Option<Box<dyn Cipher>> {
        let (algorithm, name, big_endian) = match choice {
            CipherChoice::ChaChaPoly => (&aead::CHACHA20_POLY1305, "ChaChaPoly", false),
            CipherChoice::AESGCM => (&aead::AES_256_GCM, "AESGCM", true),
        };
        Some(Box::new(AeadCipher {
            algorithm,
            name,
            big_endian,
            key: None,
        }))
    }
}

/// A Noise cipher over an aws-lc-rs AEAD. Nonces are the Noise spec's: four zero bytes and
/// the 64-bit counter, little-endian for ChaChaPoly and big-endian for AESGCM.
struct AeadCipher {
    algorithm: &'static aead::Algorithm,
    name: &'static str,
    big_endian: bool,
    key: Option<aead::LessSafeKey>,
}

impl AeadCipher {
    fn nonce(&self, counter: u64) -> aead::Nonce {
        let mut bytes = [0u8; 12];
        bytes[4..].copy_from_slice(&if self.big_endian {
            counter.to_be_bytes()
        } else {
            counter.to_le_bytes()
        });
        aead::Nonce::assume_unique_for_key(bytes)
    }
}

impl Cipher for AeadCipher {
    fn name(&self) -> &'static str {
        self.name
    }

    fn set(&mut self, key: &[u8; 32]) {
        self.key = aead::UnboundKey::new(self.algorithm, key)
            .ok()
            .map(aead::LessSafeKey::new);
    }

    fn encrypt(&self, nonce: u64, authtext: &[u8], plaintext: &[u8], out: &mut [u8]) -> usize {
        let len = plaintext.len();
        let (Some(key), Some(body)) = (&self.key, out.get_mut(..len + TAG)) else {
            return 0;
        };
        let (text, tag_out) = body.split_at_mut(len);
        text.copy_from_slice(plaintext);
        match key.seal_in_place_separate_tag(self.nonce(nonce), aead::Aad::from(authtext), text) {
            Ok(tag) => {
                tag_out.copy_from_slice(tag.as_ref());
                len + TAG
            }
            // Only for a message longer than the AEAD allows, which Noise's 64 KiB never is.
            Err(_) => 0,
        }
    }

    fn decrypt(
        &self,
        nonce: u64,
        authtext: &[u8],
        ciphertext: &[u8],
        out: &mut [u8],
    ) -> Result<usize, snow::Error> {
        let key = self.key.as_ref().ok_or(snow::Error::Decrypt)?;
        let len = ciphertext
            .len()
            .checked_sub(TAG)
            .ok_or(snow::Error::Decrypt)?;
        let (text, tag) = ciphertext.split_at(len);
        let out = out.get_mut(..len).ok_or(snow::Error::Decrypt)?;
        key.open_separate_gather(self.nonce(nonce), aead::Aad::from(authtext), text, tag, out)
            .map_err(|_| snow::Error::Decrypt)?;
        Ok(len)
    }
}

/// The Noise transport.
pub(crate) struct NoiseTransport {
    tcp: TcpTransport,
    settings: NoiseSettings,
}

impl Transport for NoiseTransport {
    type Stream = NoiseStream;

    fn new(settings: &TransportSettings) -> Result<NoiseTransport, Error> {
        let noise = settings.noise.clone().ok_or(Error::Unsupported {
            what: "type = \"noise\" without [transport.noise]".into(),
        })?;
        Ok(NoiseTransport {
            tcp: TcpTransport::new(settings)?,
            settings: noise,
        })
    }

    fn tcp(&self) -> &TcpTransport {
        &self.tcp
    }

    async fn handshake(&self, tcp: TcpStream) -> Result<NoiseStream, Error> {
        let state = handshake_state(&self.settings, false).map_err(noise_error)?;
        NoiseStream::handshake(tcp, state).await
    }

    async fn connect(&self, addr: &str) -> Result<NoiseStream, Error> {
        let tcp = self.tcp.connect(addr).await?;
        let state = handshake_state(&self.settings, true).map_err(noise_error)?;
        NoiseStream::handshake(tcp, state).await
    }
}

fn noise_error(err: impl std::fmt::Display) -> Error {
    Error::Noise {
        reason: err.to_string(),
    }
}

/// A TCP connection after a Noise handshake.
pub(crate) struct NoiseStream {
    tcp: TcpStream,
    state: TransportState,
    /// Received bytes not yet decrypted: `received[..filled]`.
    received: Box<[u8]>,
    filled: usize,
    /// Decrypted bytes not yet read: `plain[start..end]`.
    plain: Box<[u8]>,
    start: usize,
    end: usize,
    /// An encrypted frame on its way out: `outgoing[sent..queued]`.
    outgoing: Box<[u8]>,
    sent: usize,
    queued: usize,
}

impl NoiseStream {
    /// Runs the handshake on `tcp` in the role `state` was built for.
    pub(crate) async fn handshake(
        mut tcp: TcpStream,
        mut state: HandshakeState,
    ) -> Result<NoiseStream, Error> {
        let mut frame = [0u8; LEN + MAX_HANDSHAKE_MESSAGE];
        let mut message = [0u8; MAX_HANDSHAKE_MESSAGE];
        let mut payload = [0u8; MAX_HANDSHAKE_MESSAGE];
        while !state.is_handshake_finished() {
            if state.is_my_turn() {
                let len = state
                    .write_message(&[], &mut frame[LEN..])
                    .map_err(noise_error)?;
                frame[..LEN].copy_from_slice(&(len as u16).to_le_bytes());
                tcp.write_all(&frame[..LEN + len])
                    .await
                    .map_err(|e| Error::io("sending a Noise handshake message", e))?;
            } else {
                let len = usize::from(tcp.read_u16_le().await.map_err(handshake_read)?);
                if len > MAX_HANDSHAKE_MESSAGE {
                    return Err(Error::Noise {
                        reason: format!(
                            "a handshake message of {len} bytes, longer than any this tunnel's \
                             patterns send ({MAX_HANDSHAKE_MESSAGE})"
                        ),
                    });
                }
                tcp.read_exact(&mut message[..len])
                    .await
                    .map_err(handshake_read)?;
                state
                    .read_message(&message[..len], &mut payload)
                    .map_err(|err| Error::Noise {
                        reason: format!(
                            "handshake failed ({err}): the peer's key does not match this side's"
                        ),
                    })?;
            }
        }
        let state = state.into_transport_mode().map_err(noise_error)?;
        Ok(NoiseStream {
            tcp,
            state,
            received: vec![0u8; LEN + MAX_MESSAGE].into_boxed_slice(),
            filled: 0,
            plain: vec![0u8; MAX_MESSAGE].into_boxed_slice(),
            start: 0,
            end: 0,
            outgoing: vec![0u8; LEN + MAX_MESSAGE].into_boxed_slice(),
            sent: 0,
            queued: 0,
        })
    }

    /// Decrypts the first whole frame in `received`, if there is one.
    fn decrypt_frame(&mut self) -> io::Result<bool> {
        let Some(&[lo, hi]) = self.received.get(..LEN).filter(|_| self.filled >= LEN) else {
            return Ok(false);
        };
        let total = LEN + usize::from(u16::from_le_bytes([lo, hi]));
        if self.filled < total {
            return Ok(false);
        }
        let n = self
            .state
            .read_message(&self.received[LEN..total], &mut self.plain)
            .map_err(|err| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("Noise message failed to decrypt: {err}"),
                )
            })?;
        self.start = 0;
        self.end = n;
        self.received.copy_within(total..self.filled, 0);
        self.filled -= total;
        Ok(true)
    }

    /// Writes out the frame in flight, if any.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.queued {
            let n = ready!(
                Pin::new(&mut self.tcp).poll_write(cx, &self.outgoing[self.sent..self.queued])
            )?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.sent = 0;
        self.queued = 0;
        Poll::Ready(Ok(()))
    }
}

fn handshake_read(err: io::Error) -> Error {
    if err.kind() == io::ErrorKind::UnexpectedEof {
        Error::Closed {
            what: "the Noise handshake",
        }
    } else {
        Error::io("reading a Noise handshake message", err)
    }
}

impl AsyncRead for NoiseStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.start < this.end {
                let n = (this.end - this.start).min(buf.remaining());
                buf.put_slice(&this.plain[this.start..this.start + n]);
                this.start += n;
                return Poll::Ready(Ok(()));
            }
            if this.decrypt_frame()? {
                continue;
            }
            let mut space = ReadBuf::new(&mut this.received[this.filled..]);
            ready!(Pin::new(&mut this.tcp).poll_read(cx, &mut space))?;
            let n = space.filled().len();
            if n == 0 {
                return Poll::Ready(if this.filled == 0 {
                    Ok(())
                } else {
                    Err(io::ErrorKind::UnexpectedEof.into())
                });
            }
            this.filled += n;
        }
    }
}

impl AsyncWrite for NoiseStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let take = buf.len().min(MAX_PAYLOAD);
        let n = this
            .state
            .write_message(&buf[..take], &mut this.outgoing[LEN..])
            .map_err(|err| io::Error::other(format!("Noise encryption failed: {err}")))?;
        this.outgoing[..LEN].copy_from_slice(&(n as u16).to_le_bytes());
        this.queued = LEN + n;
        // The bytes are ours now; start sending them, and finish on the next call.
        if let Poll::Ready(Err(err)) = this.poll_send(cx) {
            return Poll::Ready(Err(err));
        }
        Poll::Ready(Ok(take))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

impl TunnelStream for NoiseStream {
    fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    fn plain_tcp(&self) -> Option<&TcpStream> {
        None
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use tokio::io::AsyncWriteExt;

    use super::*;
    use crate::forward::tests::{pair, round_trip};
    use crate::keys::KeyPair;

    fn settings(private: Option<&str>, public: Option<&str>) -> NoiseSettings {
        NoiseSettings {
            pattern: crate::config::DEFAULT_NOISE_PATTERN.to_owned(),
            local_private_key: private.map(|k| labcore::Secret::new(k.to_owned())),
            remote_public_key: public.map(str::to_owned),
        }
    }

    #[tokio::test]
    async fn large_writes_arrive_whole_in_order_and_half_close() {
        let keys = KeyPair::generate().unwrap();
        let server_side = settings(Some(keys.private.expose()), None);
        let client_side = settings(None, Some(&keys.public));
        let (client_tcp, server_tcp) = pair().await;
        let (client, server) = tokio::join!(
            NoiseStream::handshake(client_tcp, handshake_state(&client_side, true).unwrap()),
            NoiseStream::handshake(server_tcp, handshake_state(&server_side, false).unwrap()),
        );
        round_trip(client.unwrap(), server.unwrap(), 1_000_000).await;
    }

    #[tokio::test]
    async fn a_client_with_the_wrong_public_key_is_refused() {
        let keys = KeyPair::generate().unwrap();
        let other = KeyPair::generate().unwrap();
        let server_side = settings(Some(keys.private.expose()), None);
        let client_side = settings(None, Some(&other.public));
        let (client_tcp, server_tcp) = pair().await;
        let (_, server) = tokio::join!(
            NoiseStream::handshake(client_tcp, handshake_state(&client_side, true).unwrap()),
            NoiseStream::handshake(server_tcp, handshake_state(&server_side, false).unwrap()),
        );
        let err = server.err().unwrap().to_string();
        assert!(err.contains("key does not match"), "{err}");
    }

    #[tokio::test]
    async fn a_handshake_message_longer_than_any_pattern_sends_is_refused_before_it_is_read() {
        let keys = KeyPair::generate().unwrap();
        let server_side = settings(Some(keys.private.expose()), None);
        let (mut peer, server_tcp) = pair().await;
        // The peer announces 65,535 bytes and sends none: a server that waited for them would
        // hold a 64 KiB buffer per connection until the handshake timeout.
        peer.write_all(&u16::MAX.to_le_bytes()).await.unwrap();
        let state = handshake_state(&server_side, false).unwrap();
        let handshake = NoiseStream::handshake(server_tcp, state);
        let result = tokio::time::timeout(std::time::Duration::from_secs(5), handshake).await;
        let err = result
            .expect("refused without waiting for the bytes")
            .err()
            .unwrap();
        assert!(err.to_string().contains("65535 bytes"), "{err}");
        drop(peer);
    }

    #[test]
    fn aws_lc_ciphers_agree_with_snows_own_both_ways() {
        for choice in [CipherChoice::ChaChaPoly, CipherChoice::AESGCM] {
            let mut ours = AwsLcCiphers.resolve_cipher(&choice).unwrap();
            let mut theirs = DefaultResolver.resolve_cipher(&choice).unwrap();
            assert_eq!(ours.name(), theirs.name());
            let key = [7u8; 32];
            ours.set(&key);
            theirs.set(&key);
            let plain = b"the same bytes on the wire";
            for nonce in [0u64, 1, 0x0102_0304_0506_0708] {
                let mut a = [0u8; 64];
                let mut b = [0u8; 64];
                let n = ours.encrypt(nonce, b"ad", plain, &mut a);
                assert_eq!(n, theirs.encrypt(nonce, b"ad", plain, &mut b));
                assert_eq!(a[..n], b[..n], "{} nonce {nonce}", ours.name());
                let mut back = [0u8; 64];
                let m = ours.decrypt(nonce, b"ad", &b[..n], &mut back).unwrap();
                assert_eq!(&back[..m], plain);
                a[0] ^= 1;
                assert!(ours.decrypt(nonce, b"ad", &a[..n], &mut back).is_err());
            }
        }
    }

    #[test]
    fn bad_patterns_and_keys_name_the_setting() {
        let keys = KeyPair::generate().unwrap();
        let mut s = settings(Some(keys.private.expose()), None);
        s.pattern = "Noise_XX_448_Foo_Bar".into();
        assert_eq!(handshake_state(&s, false).err(), Some(KeyError::Pattern));
        let s = settings(Some("c2hvcnQ="), None);
        assert_eq!(handshake_state(&s, false).err(), Some(KeyError::LocalKey));
        // NK: the client must know the server's key.
        let s = settings(None, None);
        assert_eq!(handshake_state(&s, true).err(), Some(KeyError::RemoteKey));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn a_server_reading_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                let keys = KeyPair::generate().unwrap();
                let server_side = settings(Some(keys.private.expose()), None);
                let (mut peer, server_tcp) = pair().await;
                peer.write_all(&bytes).await.unwrap();
                peer.shutdown().await.unwrap();
                let result = NoiseStream::handshake(server_tcp, handshake_state(&server_side, false).unwrap()).await;
                prop_assert!(result.is_err());
                Ok(())
            })?;
        }
    }
}
