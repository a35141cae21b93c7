//! Service passwords: made from a CSPRNG, sent to the server only as a SCRAM-SHA-256 verifier.
//!
//! A password is 32 random bytes (256 bits) from aws-lc-rs's system CSPRNG, written as 64
//! lower-case hex digits: no character needs escaping in a URI, a shell, a `.pgpass` line, a
//! Docker env file or YAML. The server only ever sees the verifier
//! (`SCRAM-SHA-256$4096:salt$StoredKey:ServerKey`), computed here with a random salt, so
//! neither `log_statement = 'all'` nor `pg_stat_statements` can reveal the password.

use labcore::Secret;
use zeroize::Zeroizing;

/// Random bytes in a password.
const BYTES: usize = 32;

/// Makes a new random password.
pub(crate) fn generate() -> Result<Secret, aws_lc_rs::error::Unspecified> {
    let mut raw = Zeroizing::new([0u8; BYTES]);
    aws_lc_rs::rand::fill(raw.as_mut())?;
    let mut text = String::with_capacity(BYTES * 2);
    for byte in raw.iter() {
        text.push(char::from(HEX[usize::from(byte >> 4)]));
        text.push(char::from(HEX[usize::from(byte & 0xf)]));
    }
    Ok(Secret::new(text))
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// The SCRAM-SHA-256 verifier PostgreSQL stores for `password` (a fresh salt each call).
pub(crate) fn verifier(password: &Secret) -> String {
    postgres_protocol::password::scram_sha_256(password.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_64_hex_digits_and_differ() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        assert_eq!(a.expose().len(), 64);
        assert!(a.expose().bytes().all(|c| HEX.contains(&c)));
        assert_ne!(a, b);
    }

    #[test]
    fn the_verifier_does_not_contain_the_password() {
        let password = generate().unwrap();
        let verifier = verifier(&password);
        assert!(verifier.starts_with("SCRAM-SHA-256$4096:"), "{verifier}");
        assert!(!verifier.contains(password.expose()));
        assert!(!verifier.contains('\''));
    }
}
