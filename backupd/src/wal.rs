//! WAL files as names and as stored objects: what `wal-push` and `wal-fetch` accept, where a
//! file lives on a target, and the object format.
//!
//! Names come from PostgreSQL (`%f`, `%p`) and from bucket listings, so neither is trusted:
//! [`WalName`] holds only the four shapes PostgreSQL writes (a segment `TTTTTTTTXXXXXXXXYYYYYYYY`,
//! `TTTTTTTT.history`, `SEGMENT.partial`, `SEGMENT.XXXXXXXX.backup`), upper-case hex, so a name
//! can never hold a `/`, `..` or anything else that would leave the archive's folder.
//!
//! A stored WAL file is one object, `cluster/NAME/wal/FILE`: a short text header, then the
//! file through zstd and (when recipients are configured) age, as dumps are. The header names
//! the file, its size and the SHA-256 of its plain bytes, so
//! - a retried push can tell "already stored, same bytes" (success) from "another file under
//!   this name" (refused, never overwritten) by reading only the header, without the identity;
//! - `wal-fetch` checks the decoded bytes against the header, and the header's name against the
//!   name asked for, before the file gets its real name in `pg_wal`.
//!
//! The header is signed ([`crate::signing`]): version 2 (`backupd-wal 2`) adds the signer's
//! public key and an ed25519 signature over the cluster, name, size and SHA-256, made by
//! `wal-push` with the archiver's own WAL key. Someone who can write the bucket has the age
//! recipient (it is public) and can write an object `wal-fetch` would decrypt; without a
//! trusted WAL key they cannot sign it, and a signed object copied under another name or into
//! another cluster's folder no longer verifies. `wal-fetch` checks the signature before it
//! decodes a byte. Version 1 objects (written before WAL was signed) are still read, and
//! refused unless unsigned WAL is allowed (`--allow-unsigned`).

use std::fmt;
use std::io::{self, Read, Write};
use std::path::Path;
use std::str::FromStr;

use crate::Error;
use crate::signing::{PublicKey, SigningKey, Trust, WalSignature};

/// The first line of a stored WAL object without a signature (written before WAL was signed).
const MAGIC_V1: &str = "backupd-wal 1";
/// The first line of a signed WAL object.
const MAGIC_V2: &str = "backupd-wal 2";
/// Headers are short; a longer one is not ours.
const HEADER_MAX: usize = 512;
/// Bytes in a WAL segment at PostgreSQL's default `--wal-segsize`.
pub(crate) const DEFAULT_SEGMENT_SIZE: u64 = 16 * 1024 * 1024;

/// What kind of WAL file a name is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum WalKind {
    /// A whole segment.
    Segment,
    /// A timeline history file.
    History,
    /// The last, incomplete segment of a timeline (written at promotion).
    Partial,
    /// A backup history file.
    Backup,
}

/// A valid WAL file name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct WalName(String);

fn upper_hex(text: &str, len: usize) -> bool {
    text.len() == len
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
}

impl WalName {
    /// What kind of file this is.
    pub(crate) fn kind(&self) -> WalKind {
        let name = self.0.as_str();
        if name.ends_with(".history") {
            WalKind::History
        } else if name.ends_with(".partial") {
            WalKind::Partial
        } else if name.ends_with(".backup") {
            WalKind::Backup
        } else {
            WalKind::Segment
        }
    }

    /// The name as text.
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }

    /// The timeline.
    pub(crate) fn timeline(&self) -> u32 {
        u32::from_str_radix(&self.0[..8], 16).expect("validated hex")
    }

    /// For segments (whole, partial or backup history): the segment number on its timeline,
    /// with 16 MB segments (`log * 0x100 + seg`).
    pub(crate) fn segment_number(&self) -> Option<u64> {
        if self.kind() == WalKind::History {
            return None;
        }
        let log = u64::from_str_radix(&self.0[8..16], 16).ok()?;
        let seg = u64::from_str_radix(&self.0[16..24], 16).ok()?;
        Some(log * 0x100 + seg)
    }

    /// The segment `number` of `timeline` (16 MB segments).
    pub(crate) fn segment(timeline: u32, number: u64) -> WalName {
        WalName(format!(
            "{timeline:08X}{:08X}{:08X}",
            number / 0x100,
            number % 0x100
        ))
    }

    /// The name of the file at `path` (`%p`), which must be a valid WAL file name.
    pub(crate) fn of_path(path: &Path) -> Result<WalName, Error> {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| Error::Usage(format!("{} names no WAL file", path.display())))?;
        name.parse().map_err(Error::Usage)
    }
}

impl FromStr for WalName {
    type Err = String;

    fn from_str(name: &str) -> Result<WalName, String> {
        let valid = match name.len() {
            24 => upper_hex(name, 24),
            16 => name
                .strip_suffix(".history")
                .is_some_and(|t| upper_hex(t, 8)),
            32 => name
                .strip_suffix(".partial")
                .is_some_and(|s| upper_hex(s, 24)),
            40 => name.strip_suffix(".backup").is_some_and(|rest| {
                rest.split_once('.')
                    .is_some_and(|(seg, off)| upper_hex(seg, 24) && upper_hex(off, 8))
            }),
            _ => false,
        };
        if valid {
            Ok(WalName(name.to_owned()))
        } else {
            Err(format!(
                "{:?} is not a WAL file name (a segment like 000000010000000000000001, \
                 00000002.history, SEGMENT.partial or SEGMENT.XXXXXXXX.backup)",
                name.chars().take(80).collect::<String>()
            ))
        }
    }
}

impl fmt::Display for WalName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The folder of a cluster's WAL on a target.
pub(crate) fn wal_prefix(cluster: &str) -> String {
    format!("cluster/{cluster}/wal/")
}

/// The object key of a WAL file.
pub(crate) fn object_key(cluster: &str, name: &WalName) -> String {
    format!("{}{name}", wal_prefix(cluster))
}

/// A stored WAL object's header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    /// The WAL file's name.
    pub(crate) name: WalName,
    /// Its size.
    pub(crate) size: u64,
    /// SHA-256 of its bytes (hex).
    pub(crate) sha256: String,
    /// Whether the body is age-encrypted (always zstd-compressed).
    pub(crate) encrypted: bool,
    /// Who signed it, and the signature (none in version 1 objects).
    pub(crate) signature: Option<WalSignature>,
}

impl Header {
    /// A header for `name` of `cluster`, signed with `key`.
    pub(crate) fn signed(
        key: &SigningKey,
        cluster: &str,
        name: WalName,
        size: u64,
        sha256: String,
        encrypted: bool,
    ) -> Header {
        let signature = WalSignature {
            key: key.public(),
            signature: key.sign_wal(cluster, name.as_str(), size, &sha256),
        };
        Header {
            name,
            size,
            sha256,
            encrypted,
            signature: Some(signature),
        }
    }

    /// Checks the signature for `cluster` against `trust`; `object` names it in refusals.
    pub(crate) fn check(
        &self,
        trust: &Trust,
        object: &str,
        cluster: &str,
    ) -> Result<(), crate::signing::SignatureError> {
        trust.check_wal(
            object,
            cluster,
            self.name.as_str(),
            self.size,
            &self.sha256,
            self.signature.as_ref(),
        )
    }

    /// Whether `stored` (an object's header) holds the same bytes with this header's
    /// signature: a retried push has nothing to do. ed25519 signatures are deterministic, so
    /// the same key over the same fields gives the same signature.
    pub(crate) fn same_signed(&self, stored: &Header) -> bool {
        self.same_bytes(stored) && self.signature == stored.signature
    }

    /// Whether `stored` holds the same plain bytes, whoever signed it.
    pub(crate) fn same_bytes(&self, stored: &Header) -> bool {
        self.size == stored.size && self.sha256 == stored.sha256
    }

    /// The header's bytes, ending with the blank line.
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        let mut text = format!(
            "{}\nname {}\nsize {}\nsha256 {}\nencoding {}\n",
            if self.signature.is_some() {
                MAGIC_V2
            } else {
                MAGIC_V1
            },
            self.name,
            self.size,
            self.sha256,
            if self.encrypted { "zstd+age" } else { "zstd" }
        );
        if let Some(signed) = &self.signature {
            text.push_str(&format!(
                "key {}\nsignature {}\n",
                signed.key, signed.signature
            ));
        }
        text.push('\n');
        text.into_bytes()
    }

    /// Reads a header from the start of an object, leaving `reader` at the body.
    pub(crate) fn read_from<R: Read>(reader: &mut R) -> Result<Header, io::Error> {
        let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, why.to_owned());
        let mut bytes = Vec::with_capacity(160);
        let mut byte = [0u8; 1];
        while !bytes.ends_with(b"\n\n") {
            if bytes.len() >= HEADER_MAX {
                return Err(bad("the WAL object's header is too long"));
            }
            if reader.read(&mut byte)? == 0 {
                return Err(bad("the WAL object ends inside its header"));
            }
            bytes.push(byte[0]);
        }
        let text =
            std::str::from_utf8(&bytes).map_err(|_| bad("the WAL object's header is not text"))?;
        let mut lines = text.lines();
        let signed = match lines.next() {
            Some(MAGIC_V1) => false,
            Some(MAGIC_V2) => true,
            _ => return Err(bad("not a backupd WAL object")),
        };
        let mut field = |key: &str| {
            lines
                .next()
                .and_then(|l| l.strip_prefix(key))
                .and_then(|l| l.strip_prefix(' '))
                .map(str::to_owned)
                .ok_or_else(|| bad(&format!("the WAL object's header lacks {key}")))
        };
        let name = field("name")?
            .parse::<WalName>()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let size = field("size")?
            .parse::<u64>()
            .map_err(|_| bad("the WAL object's size is not a number"))?;
        let sha256 = field("sha256")?;
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad("the WAL object's sha256 is not 64 hex digits"));
        }
        let encrypted = match field("encoding")?.as_str() {
            "zstd" => false,
            "zstd+age" => true,
            _ => return Err(bad("the WAL object's encoding is unknown")),
        };
        let signature = if signed {
            let key = field("key")?
                .parse::<PublicKey>()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            let signature = field("signature")?;
            if signature.is_empty() || signature.len() > 100 {
                return Err(bad("the WAL object's signature is malformed"));
            }
            Some(WalSignature { key, signature })
        } else {
            None
        };
        Ok(Header {
            name,
            size,
            sha256,
            encrypted,
            signature,
        })
    }
}

/// Reads a whole file through SHA-256: its size and hash.
pub(crate) fn hash_file(path: &Path) -> Result<(u64, String), Error> {
    let file = std::fs::File::open(path).map_err(|source| Error::Io {
        what: format!("opening the WAL file {}", path.display()),
        source,
    })?;
    let mut hashing = crate::pipeline::Hashing::new(file);
    io::copy(&mut hashing, &mut io::sink()).map_err(|source| Error::Io {
        what: format!("reading the WAL file {}", path.display()),
        source,
    })?;
    Ok(hashing.finish())
}

/// WAL files up to this size are read once, into memory ([`read_once`]); larger ones (a
/// cluster made with a bigger `--wal-segsize`) are read twice, hashed then streamed, so memory
/// stays bounded whatever the segment size.
pub(crate) const ONE_PASS_MAX: u64 = 2 * DEFAULT_SEGMENT_SIZE;
/// Bytes read at a time by [`read_once`] (pgBackRest reads 1 MiB too).
const READ_CHUNK: usize = 1024 * 1024;
/// Chunks between the reading (and hashing) thread and the encoding one.
const CHUNKS_IN_FLIGHT: usize = 3;

/// A WAL file read once: what its header needs, and its encoded body.
pub(crate) struct Encoded {
    /// Bytes read.
    pub(crate) size: u64,
    /// Their SHA-256 (hex).
    pub(crate) sha256: String,
    /// Their encoding (zstd, then age if there are recipients), without a header.
    pub(crate) body: Vec<u8>,
}

/// Reads the file at `path` once: this thread reads and hashes each chunk while another
/// compresses (and encrypts) it into memory, so the SHA-256 the header signs and the body
/// come from the same bytes, and the disk, the hash and zstd work at the same time (reading
/// it twice, hash first, left the cold read of each segment alone on the clock). `None` if
/// the file is larger than [`ONE_PASS_MAX`]: the caller hashes and streams it instead.
pub(crate) fn read_once(
    path: &Path,
    encoding: &crate::pipeline::Encoding,
) -> Result<Option<Encoded>, Error> {
    let reading = |source| Error::Io {
        what: format!("reading the WAL file {}", path.display()),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(|source| Error::Io {
        what: format!("opening the WAL file {}", path.display()),
        source,
    })?;
    let expected = file.metadata().map_err(reading)?.len();
    if expected > ONE_PASS_MAX {
        return Ok(None);
    }
    // Full chunks go to the encoder, empty ones come back: no allocation per chunk.
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<(Vec<u8>, usize)>(CHUNKS_IN_FLIGHT);
    let (empty_tx, empty_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(CHUNKS_IN_FLIGHT + 1);
    for _ in 0..=CHUNKS_IN_FLIGHT {
        let _ = empty_tx.send(vec![0; READ_CHUNK]);
    }
    std::thread::scope(|scope| {
        let encoder = scope.spawn(move || -> io::Result<Vec<u8>> {
            let body = Vec::with_capacity(usize::try_from(expected / 2).unwrap_or(0));
            let mut encoder = crate::pipeline::Encoder::new(body, encoding)?;
            for (chunk, len) in full_rx {
                encoder.write_all(&chunk[..len])?;
                // The reader may be done already.
                let _ = empty_tx.send(chunk);
            }
            encoder.finish()
        });
        let mut hasher = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        let mut size = 0u64;
        let read = (|| -> Result<(), Error> {
            // A closed channel means the encoder failed: its error is the one to report.
            while let Ok(mut chunk) = empty_rx.recv() {
                let mut len = 0;
                while len < chunk.len() {
                    match file.read(&mut chunk[len..]) {
                        Ok(0) => break,
                        Ok(n) => len += n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(reading(e)),
                    }
                }
                if len == 0 {
                    return Ok(());
                }
                size += len as u64;
                if size > ONE_PASS_MAX {
                    return Err(reading(io::Error::other(format!(
                        "it grew past {ONE_PASS_MAX} bytes while being read"
                    ))));
                }
                hasher.update(&chunk[..len]);
                if full_tx.send((chunk, len)).is_err() {
                    return Ok(());
                }
            }
            Ok(())
        })();
        // Ends the encoder's input.
        drop(full_tx);
        let encoded = encoder
            .join()
            .map_err(|_| Error::Internal("the WAL encoding thread panicked".into()))?;
        read?;
        let body = encoded.map_err(|source| Error::Io {
            what: format!("encoding the WAL file {}", path.display()),
            source,
        })?;
        Ok(Some(Encoded {
            size,
            sha256: crate::pipeline::hex(hasher.finish().as_ref()),
            body,
        }))
    })
}

/// Writes `header` then the encoded bytes of `input` to `out`.
pub(crate) fn encode<R: Read, W: Write>(
    header: &Header,
    mut input: R,
    mut out: W,
    encoding: &crate::pipeline::Encoding,
) -> io::Result<W> {
    out.write_all(&header.to_bytes())?;
    let mut encoder = crate::pipeline::Encoder::new(out, encoding)?;
    io::copy(&mut input, &mut encoder)?;
    encoder.finish()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn the_four_shapes_of_wal_names_are_accepted_and_classified() {
        let cases = [
            ("000000010000000000000003", WalKind::Segment),
            ("00000002.history", WalKind::History),
            ("000000010000000A000000FF.partial", WalKind::Partial),
            ("000000010000000000000002.00000028.backup", WalKind::Backup),
        ];
        for (name, kind) in cases {
            let parsed: WalName = name.parse().unwrap();
            assert_eq!(parsed.kind(), kind, "{name}");
        }
        let seg: WalName = "000000010000000A000000FF".parse().unwrap();
        assert_eq!(seg.segment_number(), Some(0xA * 0x100 + 0xFF));
        assert_eq!(WalName::segment(1, 0xA * 0x100 + 0xFF), seg);
        assert_eq!(seg.timeline(), 1);
    }

    #[test]
    fn names_that_could_leave_the_archive_folder_are_refused() {
        for bad in [
            "",
            "../../etc/passwd",
            "000000010000000000000003/..",
            "00000001000000000000000g",
            "000000010000000000000003.history",
            "0000000100000000000000031",
            "00000002.HISTORY",
            "000000010000000000000003.partial/x",
            "000000010000000000000002.0000002.backup",
            "RECOVERYXLOG",
        ] {
            assert!(bad.parse::<WalName>().is_err(), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn any_accepted_name_is_a_plain_file_name(name in "[0-9A-Fa-f./]{0,42}") {
            if let Ok(parsed) = name.parse::<WalName>() {
                prop_assert!(!parsed.as_str().contains('/'));
                prop_assert!(!parsed.as_str().starts_with('.'));
                prop_assert_eq!(parsed.to_string().parse::<WalName>().unwrap(), parsed);
            }
        }

        #[test]
        fn header_parsing_never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = Header::read_from(&mut &bytes[..]);
        }
    }

    #[test]
    fn a_file_read_once_is_hashed_and_encoded_from_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("000000010000000000000001");
        // Not a whole number of read chunks, and not all alike.
        let data: Vec<u8> = (0..(3 * READ_CHUNK as u32 + 12_345))
            .map(|i| (i % 251) as u8 ^ (i / 4096) as u8)
            .collect();
        std::fs::write(&path, &data).unwrap();
        let identity = age::x25519::Identity::generate();
        for recipients in [vec![], vec![identity.to_public()]] {
            let encoding = crate::pipeline::Encoding {
                level: 3,
                threads: 0,
                recipients,
            };
            let encoded = read_once(&path, &encoding).unwrap().unwrap();
            assert_eq!(
                (encoded.size, encoded.sha256.clone()),
                hash_file(&path).unwrap()
            );
            let identities: Vec<Box<dyn age::Identity>> = vec![Box::new(identity.clone())];
            let encrypted = !encoding.recipients.is_empty();
            let mut plain = Vec::new();
            crate::pipeline::decoder(&encoded.body[..], encrypted, Some(&identities))
                .unwrap()
                .read_to_end(&mut plain)
                .unwrap();
            assert!(plain == data, "the body decodes to the file");
        }
    }

    #[test]
    fn a_file_larger_than_one_pass_allows_is_left_to_two_passes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("000000010000000000000001");
        let file = std::fs::File::create(&path).unwrap();
        // Sparse: nothing is written.
        file.set_len(ONE_PASS_MAX + 1).unwrap();
        let encoding = crate::pipeline::Encoding {
            level: 3,
            threads: 0,
            recipients: vec![],
        };
        assert!(read_once(&path, &encoding).unwrap().is_none());
    }

    #[test]
    fn headers_round_trip_and_leave_the_reader_at_the_body() {
        let (key, _) = SigningKey::generate_for(crate::signing::KeyRole::Wal).unwrap();
        let unsigned = Header {
            name: "00000002.history".parse().unwrap(),
            size: 42,
            sha256: "ab".repeat(32),
            encrypted: true,
            signature: None,
        };
        let signed = Header::signed(
            &key,
            "main",
            "000000010000000A000000FF.partial".parse().unwrap(),
            16 * 1024 * 1024,
            "cd".repeat(32),
            true,
        );
        for header in [unsigned, signed] {
            let mut bytes = header.to_bytes();
            assert!(bytes.len() < HEADER_MAX, "{}", bytes.len());
            bytes.extend_from_slice(b"BODY");
            let mut reader = &bytes[..];
            assert_eq!(Header::read_from(&mut reader).unwrap(), header);
            assert_eq!(reader, b"BODY");
        }
    }

    #[test]
    fn a_signed_header_verifies_only_for_its_cluster_name_and_bytes_and_a_trusted_key() {
        use crate::signing::SignatureError;
        let (key, _) = SigningKey::generate_for(crate::signing::KeyRole::Wal).unwrap();
        let name: WalName = "000000010000000000000007".parse().unwrap();
        let header = Header::signed(&key, "main", name, 100, "ab".repeat(32), true);
        let trust = Trust {
            keys: vec![key.public()],
            allow_unsigned: false,
        };
        header.check(&trust, "x", "main").unwrap();
        assert!(matches!(
            header.check(&trust, "x", "other"),
            Err(SignatureError::WalInvalid { .. })
        ));
        let renamed = Header {
            name: "000000010000000000000008".parse().unwrap(),
            ..header.clone()
        };
        assert!(matches!(
            renamed.check(&trust, "x", "main"),
            Err(SignatureError::WalInvalid { .. })
        ));
        let resized = Header {
            size: 101,
            ..header.clone()
        };
        assert!(matches!(
            resized.check(&trust, "x", "main"),
            Err(SignatureError::WalInvalid { .. })
        ));
        let (other, _) = SigningKey::generate().unwrap();
        let forged = Header::signed(
            &other,
            "main",
            header.name.clone(),
            100,
            "ab".repeat(32),
            true,
        );
        for allow_unsigned in [false, true] {
            let trust = Trust {
                allow_unsigned,
                ..trust.clone()
            };
            assert!(matches!(
                forged.check(&trust, "x", "main"),
                Err(SignatureError::WalUntrusted { .. })
            ));
        }
        let unsigned = Header {
            signature: None,
            ..header.clone()
        };
        assert!(matches!(
            unsigned.check(&trust, "x", "main"),
            Err(SignatureError::WalUnsigned { .. })
        ));
        let allowing = Trust {
            allow_unsigned: true,
            ..trust.clone()
        };
        unsigned.check(&allowing, "x", "main").unwrap();
        assert!(header.same_signed(&header.clone()));
        assert!(!header.same_signed(&forged) && header.same_bytes(&forged));
        assert!(!header.same_signed(&unsigned));
    }
}
