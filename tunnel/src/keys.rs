//! Noise static key pairs (x25519) for `tunnel genkey`, printed as rathole's `--genkey`
//! prints them: the server keeps the private key (`local_private_key`), clients get the
//! public one (`remote_public_key`), both base64.

use aws_lc_rs::agreement::{PrivateKey, X25519};
use aws_lc_rs::encoding::{AsBigEndian, Curve25519SeedBin};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use labcore::Secret;

use crate::error::Error;

/// A fresh key pair, base64.
pub(crate) struct KeyPair {
    /// The private key: a secret, never logged.
    pub(crate) private: Secret,
    /// The public key.
    pub(crate) public: String,
}

impl KeyPair {
    /// Makes a key pair from the system's random number generator.
    pub(crate) fn generate() -> Result<KeyPair, Error> {
        let private = PrivateKey::generate(&X25519).map_err(|_| Error::Random)?;
        let seed: Curve25519SeedBin<'static> = private.as_be_bytes().map_err(|_| Error::Random)?;
        let public = private.compute_public_key().map_err(|_| Error::Random)?;
        Ok(KeyPair {
            private: Secret::new(STANDARD.encode(seed.as_ref())),
            public: STANDARD.encode(public.as_ref()),
        })
    }

    /// The text rathole's `--genkey` prints.
    pub(crate) fn render(&self) -> String {
        format!(
            "Private Key:\n{}\n\nPublic Key:\n{}\n",
            self.private.expose(),
            self.public
        )
    }
}

/// The public key of a base64 private key, if it is one.
pub fn public_of(private: &str) -> Option<String> {
    let bytes = STANDARD.decode(private.trim()).ok()?;
    let key = PrivateKey::from_private_key(&X25519, &bytes).ok()?;
    let public = key.compute_public_key().ok()?;
    Some(STANDARD.encode(public.as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_are_fresh_thirty_two_byte_keys_whose_public_half_matches() {
        let a = KeyPair::generate().unwrap();
        let b = KeyPair::generate().unwrap();
        assert_ne!(a.public, b.public);
        for key in [a.private.expose(), a.public.as_str()] {
            assert_eq!(STANDARD.decode(key).unwrap().len(), 32);
        }
        assert_eq!(
            public_of(a.private.expose()).as_deref(),
            Some(a.public.as_str())
        );
        assert!(public_of("not base64!").is_none());
    }

    #[test]
    fn the_x25519_public_key_is_the_rfc_7748_one() {
        // RFC 7748, section 6.1: Alice's private and public keys.
        let private = STANDARD.encode(
            (0..32)
                .map(|i| {
                    u8::from_str_radix(
                        &"77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"
                            [i * 2..i * 2 + 2],
                        16,
                    )
                    .unwrap()
                })
                .collect::<Vec<u8>>(),
        );
        let public = STANDARD
            .decode(public_of(&private).unwrap())
            .unwrap()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>();
        assert_eq!(
            public,
            "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
        );
    }
}
