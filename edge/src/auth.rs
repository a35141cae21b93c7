//! HTTP basic authentication against bcrypt hashes, as Caddy's `basic_auth` does.
//!
//! bcrypt is slow on purpose (cost 14 takes about a second), so checks run on the blocking
//! pool, never on the async workers, at most one per core at once in the whole process (a
//! flood of wrong passwords on one site queues there instead of taking every core from the
//! other sites), and a credential that verified is remembered by its SHA-256 (never the
//! password itself) in a small bounded cache, so a browser's every request does not pay the
//! cost again nor wait behind a flood. An unknown user is checked against one of the
//! configured hashes (the costliest), so it costs what a known user costs and response time
//! does not reveal which users exist.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};

use aws_lc_rs::digest;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hyper::http::HeaderValue;
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;

/// Remembered good credentials per site directive; past this, the cache starts over.
const CACHE_LIMIT: usize = 1024;

/// The process-wide bound on bcrypt checks running at once: one per core.
fn bcrypt_slots() -> &'static Semaphore {
    static SLOTS: OnceLock<Semaphore> = OnceLock::new();
    SLOTS
        .get_or_init(|| Semaphore::new(std::thread::available_parallelism().map_or(1, usize::from)))
}

/// One `basic_auth` directive: realm and users.
#[derive(Clone)]
pub(crate) struct BasicAuth {
    realm: String,
    users: Arc<Vec<(String, String)>>,
    /// The user whose hash unknown names are checked against: the costliest.
    dummy: usize,
    good: Arc<Mutex<HashSet<[u8; 32]>>>,
}

impl fmt::Debug for BasicAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Hashes are verifiers, not passwords, but still stay out of logs.
        f.debug_struct("BasicAuth")
            .field("realm", &self.realm)
            .field(
                "users",
                &self.users.iter().map(|(u, _)| u).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl BasicAuth {
    /// Checks each hash is bcrypt (raw `$2a$...` or base64 of it, as older Caddy printed).
    pub(crate) fn build(
        realm: Option<String>,
        users: &BTreeMap<String, String>,
    ) -> Result<BasicAuth, String> {
        let mut list = Vec::new();
        let mut costs = Vec::new();
        for (user, hash) in users {
            if user.is_empty() || user.contains(':') {
                return Err(format!("user name {user:?} is empty or holds a colon"));
            }
            let raw = if hash.starts_with("$2") {
                hash.clone()
            } else {
                STANDARD
                    .decode(hash)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .unwrap_or_default()
            };
            let Ok(parts) = raw.parse::<bcrypt::HashParts>() else {
                return Err(format!("the hash for user {user:?} is not a bcrypt hash"));
            };
            costs.push(parts.get_cost());
            list.push((user.clone(), raw));
        }
        let Some(dummy) = (0..costs.len()).max_by_key(|&i| costs[i]) else {
            return Err("basic_auth names no user".to_owned());
        };
        let realm = realm.unwrap_or_else(|| "restricted".to_owned());
        if realm.contains('"') || HeaderValue::from_str(&realm).is_err() {
            return Err(format!("realm {realm:?} cannot go in a header"));
        }
        Ok(BasicAuth {
            realm,
            users: Arc::new(list),
            dummy,
            good: Arc::new(Mutex::new(HashSet::new())),
        })
    }

    /// The `WWW-Authenticate` value for a 401.
    pub(crate) fn challenge(&self) -> HeaderValue {
        HeaderValue::from_str(&format!("Basic realm=\"{}\"", self.realm))
            .expect("realm was checked to be a valid header value")
    }

    /// The hash a password for `user` is checked against, and whether `user` is known: an
    /// unknown user gets a configured hash too, so both take the same bcrypt work.
    fn verifier(&self, user: &str) -> (&str, bool) {
        let found = self
            .users
            .iter()
            .find(|(u, _)| bool::from(u.as_bytes().ct_eq(user.as_bytes())));
        match found {
            Some((_, hash)) => (hash, true),
            None => (&self.users[self.dummy].1, false),
        }
    }

    /// Whether the `Authorization` header holds a known user's right password; returns the
    /// user name when it does.
    pub(crate) async fn check(&self, header: Option<&HeaderValue>) -> Option<String> {
        let (user, password) = parse_basic(header?)?;
        let digest = {
            let mut ctx = digest::Context::new(&digest::SHA256);
            ctx.update(user.as_bytes());
            ctx.update(b"\0");
            ctx.update(password.as_bytes());
            let out = ctx.finish();
            let mut key = [0u8; 32];
            key.copy_from_slice(out.as_ref());
            key
        };
        let (hash, known) = self.verifier(&user);
        if known && self.good.lock().is_ok_and(|g| g.contains(&digest)) {
            return Some(user);
        }
        let hash = hash.to_owned();
        // Never closed, so acquiring only waits.
        let _slot = bcrypt_slots().acquire().await.ok()?;
        let ok = tokio::task::spawn_blocking(move || {
            let verified = bcrypt::verify(password.as_bytes(), &hash).unwrap_or(false);
            verified && known
        })
        .await
        .unwrap_or(false);
        if ok {
            if let Ok(mut good) = self.good.lock() {
                if good.len() >= CACHE_LIMIT {
                    good.clear();
                }
                good.insert(digest);
            }
            Some(user)
        } else {
            None
        }
    }
}

/// Splits `Basic base64(user:password)`.
fn parse_basic(header: &HeaderValue) -> Option<(String, String)> {
    let text = header.to_str().ok()?;
    let (scheme, encoded) = text.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = STANDARD.decode(encoded.trim()).ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> BasicAuth {
        let hash = bcrypt::hash("hunter2", 4).unwrap();
        BasicAuth::build(None, &BTreeMap::from([("alice".to_owned(), hash)])).unwrap()
    }

    fn header(user: &str, password: &str) -> HeaderValue {
        let value = format!("Basic {}", STANDARD.encode(format!("{user}:{password}")));
        HeaderValue::from_str(&value).unwrap()
    }

    #[tokio::test]
    async fn the_right_password_passes_and_wrong_ones_do_not() {
        let auth = auth();
        assert_eq!(
            auth.check(Some(&header("alice", "hunter2")))
                .await
                .as_deref(),
            Some("alice")
        );
        // Second time from the cache.
        assert_eq!(
            auth.check(Some(&header("alice", "hunter2")))
                .await
                .as_deref(),
            Some("alice")
        );
        assert_eq!(auth.check(Some(&header("alice", "hunter3"))).await, None);
        assert_eq!(auth.check(Some(&header("bob", "hunter2"))).await, None);
        assert_eq!(auth.check(None).await, None);
        let garbage = HeaderValue::from_static("Basic !!!not-base64");
        assert_eq!(auth.check(Some(&garbage)).await, None);
    }

    #[test]
    fn an_unknown_user_costs_the_same_bcrypt_work_as_a_known_one() {
        let cost = |hash: &str| hash.parse::<bcrypt::HashParts>().unwrap().get_cost();
        let cheap = bcrypt::hash("x", 4).unwrap();
        let dear = bcrypt::hash("y", 5).unwrap();
        let auth = BasicAuth::build(
            None,
            &BTreeMap::from([("alice".to_owned(), cheap), ("bob".to_owned(), dear)]),
        )
        .unwrap();
        let (alice, known) = auth.verifier("alice");
        assert!(known && cost(alice) == 4);
        let (bob, known) = auth.verifier("bob");
        assert!(known && cost(bob) == 5);
        let (nobody, known) = auth.verifier("mallory");
        assert!(!known);
        assert_eq!(
            cost(nobody),
            5,
            "unknown users cost what the dearest known one costs"
        );
    }

    #[test]
    fn hashes_may_be_raw_or_base64_and_must_be_bcrypt() {
        let hash = bcrypt::hash("x", 4).unwrap();
        let b64 = STANDARD.encode(&hash);
        assert!(BasicAuth::build(None, &BTreeMap::from([("a".into(), b64)])).is_ok());
        let err =
            BasicAuth::build(None, &BTreeMap::from([("a".into(), "plain".into())])).unwrap_err();
        assert!(err.contains("not a bcrypt hash"), "{err}");
    }

    #[test]
    fn debug_output_shows_no_hash() {
        let shown = format!("{:?}", auth());
        assert!(shown.contains("alice") && !shown.contains("$2"), "{shown}");
    }

    proptest::proptest! {
        /// Authorization headers are untrusted bytes: anything is refused or parsed, never a panic.
        #[test]
        fn any_authorization_header_is_handled(bytes in proptest::collection::vec(0x20u8..0x7f, 0..80)) {
            if let Ok(value) = HeaderValue::from_bytes(&bytes) {
                let _ = parse_basic(&value);
            }
        }

        /// A user (no colon) and any password come back as they were sent.
        #[test]
        fn user_and_password_round_trip(user in "[^:]{0,20}", password in ".{0,40}") {
            proptest::prop_assert_eq!(parse_basic(&header(&user, &password)), Some((user, password)));
        }
    }
}
