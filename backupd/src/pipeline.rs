//! The byte pipeline: source bytes -> zstd -> age -> store, and back.
//!
//! Compression and encryption are synchronous libraries, so each direction runs on a blocking
//! thread and meets the async store through a bounded channel of chunks ([`ChannelWriter`]
//! into [`ChannelReader`], or tokio's `SyncIoBridge` the other way). The channel holds at most
//! a few chunks, so memory stays small whatever the size of the dump, and back-pressure from a
//! slow store reaches the source process through its pipe.

use std::io::{self, Read, Write};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use age::x25519;
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::mpsc;

/// Chunk size between the blocking pipeline and the async store.
const CHUNK: usize = 256 * 1024;
/// Chunks in flight between them.
const CHUNKS_IN_FLIGHT: usize = 8;

/// How stored bytes are encoded.
#[derive(Clone)]
pub struct Encoding {
    /// zstd level.
    pub level: i32,
    /// zstd worker threads (0: single-threaded).
    pub threads: u32,
    /// age recipients; empty means no encryption.
    pub recipients: Vec<x25519::Recipient>,
}

/// A writer whose bytes come out of a [`ChannelReader`]. Only [`ChannelWriter::close`] ends
/// the stream cleanly; a writer dropped without it (its producer failed) makes the reader fail,
/// so a half-written dump can never be stored as if it were whole.
pub struct ChannelWriter {
    buffer: BytesMut,
    sender: mpsc::Sender<Bytes>,
    closed: Arc<AtomicBool>,
}

/// The reading end of a [`ChannelWriter`].
pub struct ChannelReader {
    current: Bytes,
    receiver: mpsc::Receiver<Bytes>,
    closed: Arc<AtomicBool>,
}

/// A bounded byte channel from a blocking thread to async code.
pub fn channel() -> (ChannelWriter, ChannelReader) {
    let (sender, receiver) = mpsc::channel(CHUNKS_IN_FLIGHT);
    let closed = Arc::new(AtomicBool::new(false));
    (
        ChannelWriter {
            buffer: BytesMut::with_capacity(CHUNK),
            sender,
            closed: closed.clone(),
        },
        ChannelReader {
            current: Bytes::new(),
            receiver,
            closed,
        },
    )
}

impl ChannelWriter {
    fn send_buffer(&mut self) -> io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let chunk = self.buffer.split().freeze();
        self.buffer.reserve(CHUNK);
        self.sender
            .blocking_send(chunk)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the store stopped reading"))
    }

    /// Sends what is buffered and ends the stream cleanly.
    pub fn close(mut self) -> io::Result<()> {
        self.send_buffer()?;
        // Set before the sender drops: the reader sees the end only after this.
        self.closed.store(true, Ordering::Release);
        Ok(())
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = CHUNK - self.buffer.len();
        let n = data.len().min(room);
        self.buffer.extend_from_slice(&data[..n]);
        if self.buffer.len() >= CHUNK {
            self.send_buffer()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_buffer()
    }
}

impl AsyncRead for ChannelReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        while self.current.is_empty() {
            match self.receiver.poll_recv(cx) {
                Poll::Ready(Some(chunk)) => self.current = chunk,
                Poll::Ready(None) if self.closed.load(Ordering::Acquire) => {
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(None) => {
                    let aborted = io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the backup source failed before its end",
                    );
                    return Poll::Ready(Err(aborted));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
        let n = buf.remaining().min(self.current.len());
        let chunk = self.current.split_to(n);
        buf.put_slice(&chunk);
        Poll::Ready(Ok(()))
    }
}

/// Wraps `sink` in age encryption (if there are recipients) and zstd compression; write the
/// plain bytes to the result and call [`Encoder::finish`].
pub struct Encoder<W: Write> {
    inner: EncoderStack<W>,
}

enum EncoderStack<W: Write> {
    Plain(zstd::stream::write::Encoder<'static, W>),
    Encrypted(zstd::stream::write::Encoder<'static, age::stream::StreamWriter<W>>),
}

impl<W: Write> Encoder<W> {
    /// Starts encoding into `sink`.
    pub fn new(sink: W, encoding: &Encoding) -> io::Result<Encoder<W>> {
        let inner = if encoding.recipients.is_empty() {
            EncoderStack::Plain(zstd_encoder(sink, encoding)?)
        } else {
            let recipients = encoding.recipients.iter().map(|r| r as &dyn age::Recipient);
            let encryptor =
                age::Encryptor::with_recipients(recipients).map_err(io::Error::other)?;
            EncoderStack::Encrypted(zstd_encoder(encryptor.wrap_output(sink)?, encoding)?)
        };
        Ok(Encoder { inner })
    }

    /// Flushes every layer and returns the sink.
    pub fn finish(self) -> io::Result<W> {
        match self.inner {
            EncoderStack::Plain(zstd) => zstd.finish(),
            EncoderStack::Encrypted(zstd) => zstd.finish()?.finish(),
        }
    }
}

fn zstd_encoder<T: Write>(
    inner: T,
    encoding: &Encoding,
) -> io::Result<zstd::stream::write::Encoder<'static, T>> {
    let mut encoder = zstd::stream::write::Encoder::new(inner, encoding.level)?;
    if encoding.threads > 0 {
        encoder.multithread(encoding.threads)?;
    }
    Ok(encoder)
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        match &mut self.inner {
            EncoderStack::Plain(zstd) => zstd.write(data),
            EncoderStack::Encrypted(zstd) => zstd.write(data),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.inner {
            EncoderStack::Plain(zstd) => zstd.flush(),
            EncoderStack::Encrypted(zstd) => zstd.flush(),
        }
    }
}

/// Why stored bytes cannot be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The backup is encrypted and no identity was given.
    #[error(
        "the backup is encrypted: give the age identity (--identity FILE or encryption.identity_file)"
    )]
    NoIdentity,
    /// The identity does not open the backup.
    #[error("the age identity does not decrypt this backup")]
    WrongIdentity,
    /// The identity file is not an age identity.
    #[error("reading the age identity")]
    BadIdentity(#[source] io::Error),
    /// The age header is malformed.
    #[error("the backup's age header is invalid")]
    Header(#[source] age::DecryptError),
    /// Reading failed.
    #[error("reading the backup")]
    Io(#[from] io::Error),
}

/// Parses age identities (the text of an identity file).
pub fn identities(text: &str) -> Result<Vec<Box<dyn age::Identity>>, DecodeError> {
    let file = age::IdentityFile::from_buffer(text.as_bytes()).map_err(DecodeError::BadIdentity)?;
    let identities = file.into_identities().map_err(|e| {
        DecodeError::BadIdentity(io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
    })?;
    if identities.is_empty() {
        return Err(DecodeError::BadIdentity(io::Error::new(
            io::ErrorKind::InvalidData,
            "no identity found",
        )));
    }
    Ok(identities)
}

/// Opens stored bytes for reading plain data: age (if `encrypted`), then zstd.
pub fn decoder<'a, R: Read + 'a>(
    source: R,
    encrypted: bool,
    identities: Option<&[Box<dyn age::Identity>]>,
) -> Result<Box<dyn Read + 'a>, DecodeError> {
    let plain: Box<dyn Read + 'a> = if encrypted {
        let identities = identities.ok_or(DecodeError::NoIdentity)?;
        let decryptor = age::Decryptor::new(source).map_err(DecodeError::Header)?;
        let reader = decryptor
            .decrypt(identities.iter().map(|i| i.as_ref() as &dyn age::Identity))
            .map_err(|e| match e {
                age::DecryptError::NoMatchingKeys => DecodeError::WrongIdentity,
                other => DecodeError::Header(other),
            })?;
        Box::new(reader)
    } else {
        Box::new(source)
    };
    Ok(Box::new(zstd::stream::read::Decoder::new(plain)?))
}

/// Counts and hashes what passes through a reader.
pub struct Hashing<R> {
    inner: R,
    hasher: aws_lc_rs::digest::Context,
    count: u64,
}

impl<R> Hashing<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> Hashing<R> {
        Hashing {
            inner,
            hasher: aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256),
            count: 0,
        }
    }

    /// Bytes read and their SHA-256 in hex.
    pub fn finish(self) -> (u64, String) {
        (self.count, hex(self.hasher.finish().as_ref()))
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// Counts and (optionally) hashes what passes through a writer.
pub struct Counting<W> {
    inner: W,
    hasher: Option<aws_lc_rs::digest::Context>,
    count: u64,
}

impl<W> Counting<W> {
    /// Wraps `inner`; `hash` also computes a SHA-256.
    pub fn new(inner: W, hash: bool) -> Counting<W> {
        Counting {
            inner,
            hasher: hash.then(|| aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256)),
            count: 0,
        }
    }

    /// The inner writer, bytes written and their SHA-256 in hex (if hashed).
    pub fn finish(self) -> (W, u64, Option<String>) {
        (
            self.inner,
            self.count,
            self.hasher.map(|h| hex(h.finish().as_ref())),
        )
    }
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(data)?;
        if let Some(hasher) = &mut self.hasher {
            hasher.update(&data[..n]);
        }
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use age::secrecy::ExposeSecret;

    use super::*;

    fn round_trip(encoding: &Encoding, identity: Option<&x25519::Identity>) -> Vec<u8> {
        let data: Vec<u8> = (0..300_000u32).flat_map(|i| i.to_le_bytes()).collect();
        let mut encoder = Encoder::new(Vec::new(), encoding).unwrap();
        encoder.write_all(&data).unwrap();
        let stored = encoder.finish().unwrap();
        assert!(stored.len() < data.len());
        let boxed: Option<Vec<Box<dyn age::Identity>>> =
            identity.map(|i| vec![Box::new(i.clone()) as Box<dyn age::Identity>]);
        let mut plain = Vec::new();
        decoder(
            &stored[..],
            !encoding.recipients.is_empty(),
            boxed.as_deref(),
        )
        .unwrap()
        .read_to_end(&mut plain)
        .unwrap();
        assert_eq!(plain, data);
        stored
    }

    #[test]
    fn compressed_and_encrypted_bytes_round_trip() {
        let identity = x25519::Identity::generate();
        let plain = Encoding {
            level: 3,
            threads: 0,
            recipients: vec![],
        };
        let stored = round_trip(&plain, None);
        assert_eq!(&stored[..4], &[0x28, 0xb5, 0x2f, 0xfd], "zstd magic");
        let encrypted = Encoding {
            level: 3,
            threads: 2,
            recipients: vec![identity.to_public()],
        };
        let stored = round_trip(&encrypted, Some(&identity));
        assert!(stored.starts_with(b"age-encryption.org/v1\n"));
    }

    #[test]
    fn a_wrong_or_missing_identity_is_refused_before_any_plaintext() {
        let encoding = Encoding {
            level: 1,
            threads: 0,
            recipients: vec![x25519::Identity::generate().to_public()],
        };
        let mut encoder = Encoder::new(Vec::new(), &encoding).unwrap();
        encoder.write_all(b"secret rows").unwrap();
        let stored = encoder.finish().unwrap();
        let other: Vec<Box<dyn age::Identity>> = vec![Box::new(x25519::Identity::generate())];
        assert!(matches!(
            decoder(&stored[..], true, Some(&other)),
            Err(DecodeError::WrongIdentity)
        ));
        assert!(matches!(
            decoder(&stored[..], true, None),
            Err(DecodeError::NoIdentity)
        ));
    }

    #[tokio::test]
    async fn only_a_closed_writer_ends_the_stream_cleanly() {
        use tokio::io::AsyncReadExt;
        let (mut writer, mut reader) = channel();
        let producer = std::thread::spawn(move || {
            writer.write_all(&[7u8; 600_000]).unwrap();
            writer.close().unwrap();
        });
        let mut got = Vec::new();
        reader.read_to_end(&mut got).await.unwrap();
        producer.join().unwrap();
        assert_eq!(got.len(), 600_000);

        let (mut writer, mut reader) = channel();
        let producer = std::thread::spawn(move || {
            writer.write_all(&[7u8; 1000]).unwrap();
            drop(writer);
        });
        let mut got = Vec::new();
        let err = reader.read_to_end(&mut got).await.unwrap_err();
        producer.join().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn identity_files_parse_and_garbage_is_refused() {
        let identity = x25519::Identity::generate();
        let text = format!(
            "# created: today\n{}\n",
            identity.to_string().expose_secret()
        );
        assert_eq!(identities(&text).unwrap().len(), 1);
        assert!(matches!(
            identities("not a key"),
            Err(DecodeError::BadIdentity(_))
        ));
    }
}
