//! Objects sealed with the key the edges of one bucket share: AES-256-GCM (aws-lc-rs), a
//! fresh random nonce per object, and the object's name bound as associated data.
//!
//! Layout: `EDGE-SEALED-1\n` (magic and version), 12 bytes of nonce, then ciphertext and the
//! 16-byte tag. Invariants: opening fails, with an error naming the object and never the key,
//! when the key is wrong, the object was moved to another name, or any byte was changed or cut
//! off; the key never shows in Debug or Display output.

use std::fmt;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use base64::Engine;

/// What every sealed object starts with.
const MAGIC: &[u8] = b"EDGE-SEALED-1\n";
/// Length of the GCM tag.
const TAG_LEN: usize = 16;

/// The shared 256-bit key.
pub(crate) struct SealKey {
    key: LessSafeKey,
}

impl fmt::Debug for SealKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SealKey([redacted])")
    }
}

/// Why an object could not be opened or a key read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum SealError {
    /// The key text is not 32 bytes in hex or base64.
    #[error("the encryption key must be 32 bytes written as 64 hex digits or base64")]
    BadKey,
    /// The object does not start with the sealed-object header.
    #[error("{0}: not sealed by edge (no EDGE-SEALED-1 header)")]
    NotSealed(String),
    /// The object ends before its nonce and tag.
    #[error("{0}: truncated ({1} bytes, too short for a sealed object)")]
    Truncated(String, usize),
    /// The tag does not verify.
    #[error(
        "{0}: does not decrypt with the storage encryption key (wrong key, or the object was \
         altered or copied from another name)"
    )]
    Refused(String),
}

impl SealKey {
    /// A key from its text: 64 hex digits, or base64 of 32 bytes (surrounding space ignored).
    pub(crate) fn parse(text: &str) -> Result<SealKey, SealError> {
        let text = text.trim();
        let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            (0..32)
                .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16))
                .collect::<Result<Vec<u8>, _>>()
                .map_err(|_| SealError::BadKey)?
        } else {
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|_| SealError::BadKey)?
        };
        SealKey::from_bytes(&bytes)
    }

    /// A key from 32 raw bytes.
    pub(crate) fn from_bytes(bytes: &[u8]) -> Result<SealKey, SealError> {
        if bytes.len() != 32 {
            return Err(SealError::BadKey);
        }
        let unbound = UnboundKey::new(&AES_256_GCM, bytes).map_err(|_| SealError::BadKey)?;
        Ok(SealKey {
            key: LessSafeKey::new(unbound),
        })
    }

    /// `plain` sealed for the object `name`.
    pub(crate) fn seal(&self, name: &str, plain: &[u8]) -> Vec<u8> {
        let nonce_bytes: [u8; NONCE_LEN] = rand::random();
        let mut body = plain.to_vec();
        // Sealing only fails for inputs of more than 64 GiB, far beyond any object here.
        let sealed = self.key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce_bytes),
            Aad::from(name.as_bytes()),
            &mut body,
        );
        if sealed.is_err() {
            body.clear();
        }
        let mut out = Vec::with_capacity(MAGIC.len() + NONCE_LEN + body.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&nonce_bytes);
        out.extend_from_slice(&body);
        out
    }

    /// The plaintext of the object `name`, if it was sealed with this key for this name.
    pub(crate) fn open(&self, name: &str, sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        let Some(rest) = sealed.strip_prefix(MAGIC) else {
            if MAGIC.starts_with(sealed) {
                return Err(SealError::Truncated(name.to_owned(), sealed.len()));
            }
            return Err(SealError::NotSealed(name.to_owned()));
        };
        if rest.len() < NONCE_LEN + TAG_LEN {
            return Err(SealError::Truncated(name.to_owned(), sealed.len()));
        }
        let (nonce, body) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce)
            .map_err(|_| SealError::Truncated(name.to_owned(), sealed.len()))?;
        let mut body = body.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(name.as_bytes()), &mut body)
            .map_err(|_| SealError::Refused(name.to_owned()))?;
        Ok(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    #[test]
    fn a_sealed_object_opens_only_under_its_own_name_with_the_same_key() {
        let key = SealKey::parse(HEX).unwrap();
        let sealed = key.seal("edge/a.key", b"private key");
        assert!(!sealed.windows(11).any(|w| w == b"private key"));
        assert_eq!(key.open("edge/a.key", &sealed).unwrap(), b"private key");
        // Two seals of the same bytes differ: a fresh nonce each time.
        assert_ne!(key.seal("edge/a.key", b"private key"), sealed);

        let err = key.open("edge/b.key", &sealed).unwrap_err();
        assert_eq!(err, SealError::Refused("edge/b.key".into()));
        assert!(
            err.to_string().contains("copied from another name"),
            "{err}"
        );

        let other = SealKey::from_bytes(&[7; 32]).unwrap();
        let err = other.open("edge/a.key", &sealed).unwrap_err();
        assert_eq!(err, SealError::Refused("edge/a.key".into()));
        assert!(err.to_string().contains("wrong key"), "{err}");
    }

    #[test]
    fn truncated_altered_and_unsealed_objects_are_refused_by_name() {
        let key = SealKey::parse(HEX).unwrap();
        let sealed = key.seal("x", b"secret");
        for cut in [0, 5, MAGIC.len(), MAGIC.len() + NONCE_LEN + TAG_LEN - 1] {
            let err = key.open("x", &sealed[..cut]).unwrap_err();
            assert_eq!(err, SealError::Truncated("x".into(), cut), "cut at {cut}");
            assert!(err.to_string().starts_with("x: truncated"), "{err}");
        }
        let err = key.open("x", &sealed[..sealed.len() - 1]).unwrap_err();
        assert_eq!(err, SealError::Refused("x".into()));
        let mut flipped = sealed.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(
            key.open("x", &flipped).unwrap_err(),
            SealError::Refused("x".into())
        );
        assert_eq!(
            key.open("x", b"-----BEGIN CERTIFICATE-----").unwrap_err(),
            SealError::NotSealed("x".into())
        );
    }

    #[test]
    fn keys_parse_from_hex_or_base64_and_never_print() {
        let b64 = base64::engine::general_purpose::STANDARD.encode([9u8; 32]);
        assert!(SealKey::parse(&format!("{b64}\n")).is_ok());
        assert_eq!(SealKey::parse("abc").unwrap_err(), SealError::BadKey);
        assert_eq!(SealKey::parse(&HEX[..62]).unwrap_err(), SealError::BadKey);
        let key = SealKey::parse(HEX).unwrap();
        assert_eq!(format!("{key:?}"), "SealKey([redacted])");
    }
}
