//! Manifest and WAL signatures: proof that a backup, or an archived WAL file, was written by
//! the backup host or the database's archiver, not by whoever can write the bucket.
//!
//! age encrypts to a public recipient, so anyone who reads a manifest can make data backupd
//! decrypts; the SHA-256 in the manifest only says the data matches the manifest. So each
//! manifest is signed at backup time with an ed25519 key that lives on the backup host only
//! (`[signing] key_file`, or the systemd credential `signing.key`), and restore and verify
//! check the signature against trusted public keys before they read the data object.
//!
//! Invariants:
//! - The signature covers the exact bytes of `manifest.json`, prefixed with [`CONTEXT`]; the
//!   manifest holds the backup's ID and the data object's name, size and SHA-256, so one
//!   signature binds all of them. Nothing is re-serialised before checking.
//! - The signature is stored as `manifest.sig`, written before the manifest: the manifest
//!   stays the last object of a backup, the mark that it is complete.
//! - A backup without a signature is refused unless the caller allows unsigned backups
//!   (`--allow-unsigned`, for backups made before signing existed); a signature by a key not
//!   in the trusted set, or one that does not match, is always refused.
//!
//! WAL files are signed too, with a key of their own (`[signing] wal_key_file`, or the systemd
//! credential `signing.wal_key`): `wal-push` runs as the PostgreSQL user, which must not hold
//! the backup host's manifest key. A compromised PostgreSQL user can already write the
//! database, so a WAL key in its hands adds nothing; the manifest key would let it forge base
//! backups and dumps restored anywhere. So the two trusted sets stay apart: `public_keys`
//! (and `key_file`) for manifests, `wal_public_keys` (and `wal_key_file`) for WAL, and a key
//! in both is a configuration error.
//! - A WAL signature covers [`WAL_CONTEXT`], the cluster's name, the file's name, its size and
//!   the SHA-256 of its plain bytes ([`wal_message`]): a signed segment copied under another
//!   name, or into another cluster's folder, does not verify.
//! - `wal-fetch` checks it before a byte reaches `pg_wal`, with the same rules as manifests:
//!   unsigned is refused unless allowed, untrusted or mismatched always.

use std::fmt;
use std::io::Write;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use aws_lc_rs::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use labcore::{Exit, ExitStatus, Secret};
use serde::{Deserialize, Serialize};

/// The signature object's name beside `manifest.json`.
pub const SIGNATURE: &str = "manifest.sig";
/// Signed before the manifest bytes, so a signature made for anything else never verifies here.
pub const CONTEXT: &[u8] = b"backupd manifest signature v1\n";
/// Signed before a WAL file's fields: a WAL signature never verifies as a manifest's.
pub const WAL_CONTEXT: &[u8] = b"backupd wal signature v1\n";
/// Every refusal of a WAL object starts with this, so a replay can find one in the server log.
pub const WAL_REFUSED: &str = "refused WAL object";
/// How a public key is written: `backupd-ed25519:` and 32 bytes in base64.
const PUBLIC_PREFIX: &str = "backupd-ed25519:";
/// The line of a key file that holds the secret key (PKCS#8, base64).
const SECRET_PREFIX: &str = "BACKUPD-ED25519-SECRET-KEY:";

/// The backup host's key.
#[derive(Clone)]
pub struct SigningKey(Arc<Ed25519KeyPair>);

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({})", self.public())
    }
}

impl SigningKey {
    /// A new random key and its key file text.
    pub fn generate() -> Result<(SigningKey, Secret), String> {
        SigningKey::generate_for(KeyRole::Manifest)
    }

    /// A new random key for `role` and its key file text (only the comment differs).
    pub fn generate_for(role: KeyRole) -> Result<(SigningKey, Secret), String> {
        let pair = Ed25519KeyPair::generate().map_err(|_| "generating an ed25519 key")?;
        let pkcs8 = pair
            .to_pkcs8()
            .map_err(|_| "encoding the ed25519 key".to_owned())?;
        let key = SigningKey(Arc::new(pair));
        let comment = match role {
            KeyRole::Manifest => "backupd manifest signing key: keep it on the backup host only",
            KeyRole::Wal => {
                "backupd WAL signing key: for the archiver (the PostgreSQL user) only; \
                 list its public key in [signing] wal_public_keys, never in public_keys"
            }
        };
        let text = format!(
            "# {comment}\n# public key: {}\n{SECRET_PREFIX}{}\n",
            key.public(),
            BASE64.encode(pkcs8.as_ref())
        );
        Ok((key, Secret::new(text)))
    }

    /// Parses a key file's text (comment lines start with `#`).
    pub fn parse(text: &str) -> Result<SigningKey, String> {
        let mut lines = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'));
        let (Some(line), None) = (lines.next(), lines.next()) else {
            return Err(format!(
                "expected one {SECRET_PREFIX} line (make a key with `backupd keygen`)"
            ));
        };
        let encoded = line
            .strip_prefix(SECRET_PREFIX)
            .ok_or_else(|| format!("the key line does not start with {SECRET_PREFIX}"))?;
        let der = BASE64
            .decode(encoded)
            .map_err(|_| "the key is not valid base64".to_owned())?;
        let pair = Ed25519KeyPair::from_pkcs8(&der)
            .map_err(|e| format!("the key is not an ed25519 key: {e}"))?;
        Ok(SigningKey(Arc::new(pair)))
    }

    /// Its public key.
    pub fn public(&self) -> PublicKey {
        let bytes = self.0.public_key().as_ref();
        PublicKey(bytes.try_into().expect("ed25519 public keys are 32 bytes"))
    }

    /// The signature object for `manifest` (the exact bytes stored as `manifest.json`).
    pub fn sign(&self, manifest: &[u8]) -> Vec<u8> {
        let mut message = CONTEXT.to_vec();
        message.extend_from_slice(manifest);
        let signature = SignatureFile {
            algorithm: "ed25519".into(),
            key: self.public().to_string(),
            signature: BASE64.encode(self.0.sign(&message).as_ref()),
        };
        serde_json::to_vec_pretty(&signature).expect("a signature serialises")
    }

    /// The signature (base64) of a WAL file of `cluster`: see [`wal_message`].
    pub fn sign_wal(&self, cluster: &str, name: &str, size: u64, sha256: &str) -> String {
        let message = wal_message(cluster, name, size, sha256);
        BASE64.encode(self.0.sign(&message).as_ref())
    }
}

/// What a key is for: its key file says so, and the config keeps the two trusted sets apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyRole {
    /// Manifests of dumps and base backups (the backup host).
    Manifest,
    /// WAL files (the archiver, as the PostgreSQL user).
    Wal,
}

/// The bytes a WAL signature covers: [`WAL_CONTEXT`], then one line each for the cluster, the
/// file's name, its size and the SHA-256 of its plain bytes. Cluster and file names never hold
/// a newline (both are validated), so the lines cannot be shifted into one another.
pub fn wal_message(cluster: &str, name: &str, size: u64, sha256: &str) -> Vec<u8> {
    let mut message = WAL_CONTEXT.to_vec();
    message.extend_from_slice(
        format!("cluster {cluster}\nname {name}\nsize {size}\nsha256 {sha256}\n").as_bytes(),
    );
    message
}

/// A public key that restore and verify trust.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey([u8; 32]);

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PUBLIC_PREFIX}{}", BASE64.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for PublicKey {
    type Err = String;

    fn from_str(text: &str) -> Result<PublicKey, String> {
        let encoded = text.trim().strip_prefix(PUBLIC_PREFIX).ok_or_else(|| {
            format!("{text:?} is not a backupd public key ({PUBLIC_PREFIX}..., as `backupd keygen` prints)")
        })?;
        let bytes = BASE64
            .decode(encoded)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| format!("{text:?} is not a valid ed25519 public key"))?;
        Ok(PublicKey(bytes))
    }
}

/// `manifest.sig` as stored.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignatureFile {
    /// `ed25519`.
    algorithm: String,
    /// The signer's public key, so a refusal can say whose it was.
    key: String,
    /// The signature, base64.
    signature: String,
}

/// The `[signing]` settings, resolved.
#[derive(Clone, Debug, Default)]
pub struct Signing {
    /// The key `run` signs with (only the backup host has it).
    pub key: Option<SigningKey>,
    /// Other keys whose backups restore and verify accept.
    pub public_keys: Vec<PublicKey>,
    /// The key `wal-push` signs WAL with (only the archiver needs it).
    pub wal_key: Option<SigningKey>,
    /// Other keys whose WAL `wal-fetch`, restore and verify accept.
    pub wal_public_keys: Vec<PublicKey>,
}

impl Signing {
    /// What restore and verify accept: the public keys, and this host's own key.
    pub fn trust(&self, allow_unsigned: bool) -> Trust {
        let mut keys = self.public_keys.clone();
        keys.extend(self.key.as_ref().map(SigningKey::public));
        Trust {
            keys,
            allow_unsigned,
        }
    }

    /// What wal-fetch, restore and verify accept of WAL: the WAL public keys and this host's
    /// own WAL key, never the manifest keys' set (see the module comment).
    pub fn wal_trust(&self, allow_unsigned: bool) -> Trust {
        let mut keys = self.wal_public_keys.clone();
        keys.extend(self.wal_key.as_ref().map(SigningKey::public));
        Trust {
            keys,
            allow_unsigned,
        }
    }
}

/// A WAL object's signature, as its header holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalSignature {
    /// The signer's public key.
    pub key: PublicKey,
    /// The signature, base64.
    pub signature: String,
}

/// Which manifests restore and verify accept.
#[derive(Clone, Debug, Default)]
pub struct Trust {
    /// Keys whose signatures are accepted.
    pub keys: Vec<PublicKey>,
    /// Accept manifests without a signature (backups made before signing existed).
    pub allow_unsigned: bool,
}

/// Why a manifest is not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    /// No signature, and unsigned backups are not allowed.
    #[error(
        "backup {id} has no signature ({SIGNATURE}): it was made before backups were signed, or \
         by someone else; give --allow-unsigned to restore it anyway if you trust the store"
    )]
    Unsigned {
        /// The backup.
        id: String,
    },
    /// Signed by a key this host does not trust.
    #[error(
        "backup {id} is signed by {key}, which is not a trusted key ([signing] key_file or \
         public_keys): refusing it"
    )]
    Untrusted {
        /// The backup.
        id: String,
        /// The key it names.
        key: String,
    },
    /// The signature does not match the manifest.
    #[error(
        "backup {id}: the signature does not match the manifest: it was changed after it was \
         signed; refusing it"
    )]
    Invalid {
        /// The backup.
        id: String,
    },
    /// The signature object is unreadable.
    #[error("backup {id}: {SIGNATURE} is malformed: {detail}")]
    Malformed {
        /// The backup.
        id: String,
        /// What is wrong.
        detail: String,
    },
    /// The manifest is signed, but this host trusts no key at all.
    #[error(
        "backup {id} is signed by {key}, but no key is configured to check it: set \
         [signing] key_file (the backup host) or public_keys (other hosts)"
    )]
    NoTrustedKeys {
        /// The backup.
        id: String,
        /// The key it names.
        key: String,
    },
    /// A WAL object without a signature, and unsigned WAL is not allowed.
    #[error(
        "{WAL_REFUSED} {object}: it has no signature (pushed before WAL was signed, or written \
         by someone else); give --allow-unsigned (to restore, verify or wal-fetch) to accept it \
         anyway if you trust the store"
    )]
    WalUnsigned {
        /// Where the object is.
        object: String,
    },
    /// A WAL object signed by a key not trusted for WAL.
    #[error(
        "{WAL_REFUSED} {object}: it is signed by {key}, which is not a trusted WAL key \
         ([signing] wal_key_file or wal_public_keys)"
    )]
    WalUntrusted {
        /// Where the object is.
        object: String,
        /// The key it names.
        key: String,
    },
    /// A WAL object whose signature does not cover its header, cluster and name.
    #[error(
        "{WAL_REFUSED} {object}: the signature does not match its cluster, name, size and \
         SHA-256: it was changed, renamed or copied from elsewhere after it was signed"
    )]
    WalInvalid {
        /// Where the object is.
        object: String,
    },
    /// A WAL object is signed, but this host trusts no WAL key at all.
    #[error(
        "{WAL_REFUSED} {object}: it is signed by {key}, but no WAL key is configured to check \
         it: set [signing] wal_key_file (the database host) or wal_public_keys"
    )]
    WalNoTrustedKeys {
        /// Where the object is.
        object: String,
        /// The key it names.
        key: String,
    },
    /// WAL files a restore or verify would replay are refused (each named with its reason).
    #[error("cluster {cluster}: {WAL_REFUSED}s: {refused}")]
    WalChain {
        /// The cluster.
        cluster: String,
        /// `NAME (why)`, for each refused file.
        refused: String,
    },
    /// A replay met a WAL file that wal-fetch refused (the server's log line).
    #[error("the replay stopped at a refused WAL file: {line}")]
    WalReplay {
        /// The refusal as the server logged it.
        line: String,
    },
    /// Signed correctly, but the manifest names another backup or a data object elsewhere.
    #[error("backup {id}: the signed manifest {detail}; refusing it")]
    Mismatch {
        /// The backup.
        id: String,
        /// What does not fit.
        detail: String,
    },
}

impl ExitStatus for SignatureError {
    fn exit(&self) -> Exit {
        match self {
            SignatureError::NoTrustedKeys { .. } | SignatureError::WalNoTrustedKeys { .. } => {
                Exit::Config
            }
            _ => Exit::NoPerm,
        }
    }
}

impl Trust {
    /// Checks `signature` (the `manifest.sig` object, if any) over `manifest` (the exact bytes
    /// of `manifest.json`) of backup `id`.
    pub fn check(
        &self,
        id: &str,
        manifest: &[u8],
        signature: Option<&[u8]>,
    ) -> Result<(), SignatureError> {
        let Some(signature) = signature else {
            if self.allow_unsigned {
                tracing::warn!(
                    backup = id,
                    "accepting an unsigned backup (--allow-unsigned)"
                );
                return Ok(());
            }
            return Err(SignatureError::Unsigned { id: id.to_owned() });
        };
        let malformed = |detail: String| SignatureError::Malformed {
            id: id.to_owned(),
            detail,
        };
        let file: SignatureFile =
            serde_json::from_slice(signature).map_err(|e| malformed(e.to_string()))?;
        if file.algorithm != "ed25519" {
            return Err(malformed(format!("unknown algorithm {:?}", file.algorithm)));
        }
        let key: PublicKey = file.key.parse().map_err(malformed)?;
        let bytes = BASE64
            .decode(&file.signature)
            .map_err(|_| malformed("the signature is not base64".into()))?;
        if self.keys.is_empty() {
            return Err(SignatureError::NoTrustedKeys {
                id: id.to_owned(),
                key: key.to_string(),
            });
        }
        if !self.keys.contains(&key) {
            return Err(SignatureError::Untrusted {
                id: id.to_owned(),
                key: key.to_string(),
            });
        }
        let mut message = CONTEXT.to_vec();
        message.extend_from_slice(manifest);
        UnparsedPublicKey::new(&ED25519, key.0)
            .verify(&message, &bytes)
            .map_err(|_| SignatureError::Invalid { id: id.to_owned() })
    }
}

impl Trust {
    /// Checks the signature of the WAL object at `object` (a location, for messages), which
    /// claims to hold `name` of `cluster` with `size` bytes and `sha256`.
    pub fn check_wal(
        &self,
        object: &str,
        cluster: &str,
        name: &str,
        size: u64,
        sha256: &str,
        signature: Option<&WalSignature>,
    ) -> Result<(), SignatureError> {
        let Some(signature) = signature else {
            if self.allow_unsigned {
                tracing::warn!(object, "accepting an unsigned WAL file (--allow-unsigned)");
                return Ok(());
            }
            return Err(SignatureError::WalUnsigned {
                object: object.to_owned(),
            });
        };
        if self.keys.is_empty() {
            return Err(SignatureError::WalNoTrustedKeys {
                object: object.to_owned(),
                key: signature.key.to_string(),
            });
        }
        if !self.keys.contains(&signature.key) {
            return Err(SignatureError::WalUntrusted {
                object: object.to_owned(),
                key: signature.key.to_string(),
            });
        }
        let invalid = || SignatureError::WalInvalid {
            object: object.to_owned(),
        };
        let bytes = BASE64.decode(&signature.signature).map_err(|_| invalid())?;
        UnparsedPublicKey::new(&ED25519, signature.key.0)
            .verify(&wal_message(cluster, name, size, sha256), &bytes)
            .map_err(|_| invalid())
    }
}

/// `backupd keygen`: writes a new key file to `output` (created with mode 0600, never
/// replacing a file) or to stdout, and returns the public key.
pub fn keygen(output: Option<&Path>, role: KeyRole) -> Result<PublicKey, crate::Error> {
    let (key, text) = SigningKey::generate_for(role).map_err(crate::Error::Internal)?;
    match output {
        Some(path) => {
            use std::os::unix::fs::OpenOptionsExt;
            let io = |source| crate::Error::Io {
                what: format!("writing the key file {}", path.display()),
                source,
            };
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(io)?;
            file.write_all(text.as_bytes()).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        None => {
            let mut stdout = std::io::stdout().lock();
            stdout
                .write_all(text.as_bytes())
                .map_err(crate::Error::pipeline)?;
        }
    }
    Ok(key.public())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_only_for_its_manifest_and_trusted_key() {
        let (key, text) = SigningKey::generate().unwrap();
        let parsed = SigningKey::parse(text.expose()).unwrap();
        assert_eq!(parsed.public(), key.public());
        assert_eq!(
            key.public().to_string().parse::<PublicKey>().unwrap(),
            key.public()
        );
        let manifest = br#"{"id":"files@20261125T031500.123Z"}"#;
        let signature = key.sign(manifest);
        let trust = Trust {
            keys: vec![key.public()],
            allow_unsigned: false,
        };
        trust.check("x", manifest, Some(&signature)).unwrap();
        assert!(matches!(
            trust.check("x", b"{\"id\":\"other\"}", Some(&signature)),
            Err(SignatureError::Invalid { .. })
        ));
        let (other, _) = SigningKey::generate().unwrap();
        assert!(matches!(
            trust.check("x", manifest, Some(&other.sign(manifest))),
            Err(SignatureError::Untrusted { .. })
        ));
        assert!(matches!(
            trust.check("x", manifest, None),
            Err(SignatureError::Unsigned { .. })
        ));
        assert!(matches!(
            Trust::default().check("x", manifest, Some(&signature)),
            Err(SignatureError::NoTrustedKeys { .. })
        ));
        assert!(
            !format!("{key:?}").contains(text.expose().lines().last().unwrap()),
            "Debug shows only the public key"
        );
    }

    #[test]
    fn key_files_and_public_keys_with_mistakes_are_refused() {
        assert!(SigningKey::parse("").is_err());
        assert!(SigningKey::parse("BACKUPD-ED25519-SECRET-KEY:bm90IGEga2V5").is_err());
        assert!("backupd-ed25519:AAAA".parse::<PublicKey>().is_err());
        assert!("age1xyz".parse::<PublicKey>().is_err());
    }
}
