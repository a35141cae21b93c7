//! The storage in an S3 bucket (`storage s3 {…}`), shared by several edges: objects sealed
//! with the edges' common key (the `sealed` module), and per-name locks held as leases.
//!
//! Invariants:
//! - Every object but a lock is sealed under its full object name, so a reader never accepts
//!   an object another name's bytes were copied into, nor one a wrong key wrote. S3 puts are
//!   atomic per object, so a reader never sees half an object.
//! - A lock is the object `PREFIX/locks/NAME.lock` holding `{owner, expires_ms}`. It is made
//!   with `PutObject` + `If-None-Match: *` when the store honours it (probed once at start), and
//!   refreshed every third of the lease while held. An expired lease is taken over with
//!   `If-Match: ETAG` when the store honours that, else by delete then create-if-absent. A
//!   store that honours neither gets a plain write.
//! - Every take ends with a short wait ([`S3Store::settle`]) and a read-back: the lock is ours
//!   only if our owner string is still there. Honouring a condition is not the same as
//!   honouring it atomically: s3s-fs checks `If-None-Match` and then writes, so two edges
//!   whose renewals fall due in the same instant both "create" the lock; the read-back lets
//!   only the last writer through. Takes are rare (one per order), so the wait costs little.
//! - A holder whose lease is taken over while held (its refreshes failed for a whole lease)
//!   learns it from [`Lease::held`] and must not act on the lock any more.
//! - Releasing deletes the lock only if it is still ours, after the refresh task has stopped
//!   (so no late refresh brings it back).
//! - Calls block the calling thread (as the folder storage's file I/O does); the S3 client
//!   runs on a runtime of its own, on its own thread, so they work from any context.

use std::fmt;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::error::SdkError;
use aws_sdk_s3::primitives::ByteStream;
use labcore::s3::S3Settings;
use serde::{Deserialize, Serialize};

use crate::sealed::SealKey;

/// Default lease of a lock.
pub(crate) const DEFAULT_LEASE: Duration = Duration::from_secs(60);
/// Default interval at which certificates other edges stored are looked for.
pub(crate) const DEFAULT_POLL: Duration = Duration::from_secs(300);

/// Resolved `storage s3` settings.
#[derive(Clone)]
pub(crate) struct S3StorageConfig {
    /// How to reach the store.
    pub(crate) settings: S3Settings,
    /// The bucket.
    pub(crate) bucket: String,
    /// Prepended to every object name: empty or ending in `/`.
    pub(crate) prefix: String,
    /// The key objects are sealed with.
    pub(crate) key: Arc<SealKey>,
    /// How long a lock lasts unless refreshed.
    pub(crate) lease: Duration,
    /// How often stored certificates are checked for ones another edge renewed.
    pub(crate) poll_interval: Duration,
}

impl fmt::Debug for S3StorageConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3StorageConfig")
            .field("endpoint", &self.settings.endpoint_url())
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("lease", &self.lease)
            .field("poll_interval", &self.poll_interval)
            .finish_non_exhaustive()
    }
}

impl S3StorageConfig {
    /// `s3://BUCKET/PREFIX`, for messages.
    pub(crate) fn url(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }
}

/// Which conditional writes the store honours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Conditional {
    /// `If-None-Match: *` on `PutObject` (create only if absent).
    pub(crate) create: bool,
    /// `If-Match: ETAG` on `PutObject` (replace only that version).
    pub(crate) replace: bool,
}

/// An open bucket.
pub(crate) struct S3Store {
    client: Client,
    bucket: String,
    prefix: String,
    key: Arc<SealKey>,
    lease: Duration,
    poll_interval: Duration,
    runtime: tokio::runtime::Handle,
    conditional: Conditional,
}

impl fmt::Debug for S3Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Store")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("conditional", &self.conditional)
            .finish_non_exhaustive()
    }
}

/// What a conditional put did.
enum Put {
    /// Written; the new ETag.
    Done(Option<String>),
    /// The condition did not hold (412 or 409).
    Refused,
}

/// The condition of a put.
#[derive(Clone)]
enum Condition {
    None,
    Absent,
    Matches(String),
}

/// A lock object's content.
#[derive(Debug, Serialize, Deserialize)]
struct LeaseBody {
    owner: String,
    expires_ms: i64,
}

/// Whether a lock object's content names `owner`; content that does not parse names no one.
fn names_owner(bytes: &[u8], owner: &str) -> bool {
    serde_json::from_slice::<LeaseBody>(bytes).is_ok_and(|b| b.owner == owner)
}

fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

fn s3_error<E, R>(what: &str, err: SdkError<E, R>) -> io::Error
where
    E: std::error::Error + Send + Sync + 'static,
    R: fmt::Debug + Send + Sync + 'static,
{
    let kind = match &err {
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => io::ErrorKind::TimedOut,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, format!("{what}: {}", labcore::exit::chain(&err)))
}

fn status<E, R: HasStatus>(err: &SdkError<E, R>) -> Option<u16> {
    err.raw_response().map(HasStatus::status)
}

trait HasStatus {
    fn status(&self) -> u16;
}

impl HasStatus for aws_sdk_s3::config::http::HttpResponse {
    fn status(&self) -> u16 {
        self.status().as_u16()
    }
}

async fn get(
    client: &Client,
    bucket: &str,
    key: &str,
) -> io::Result<Option<(Vec<u8>, Option<String>)>> {
    let what = || format!("reading s3://{bucket}/{key}");
    match client.get_object().bucket(bucket).key(key).send().await {
        Ok(out) => {
            let etag = out.e_tag().map(str::to_owned);
            let body = out
                .body
                .collect()
                .await
                .map_err(|e| io::Error::other(format!("{}: {e}", what())))?;
            Ok(Some((body.into_bytes().to_vec(), etag)))
        }
        Err(err) if status(&err) == Some(404) => Ok(None),
        Err(err) => Err(s3_error(&what(), err)),
    }
}

async fn put(
    client: &Client,
    bucket: &str,
    key: &str,
    body: Vec<u8>,
    condition: Condition,
) -> io::Result<Put> {
    let mut req = client
        .put_object()
        .bucket(bucket)
        .key(key)
        .body(ByteStream::from(body));
    req = match condition {
        Condition::None => req,
        Condition::Absent => req.if_none_match("*"),
        Condition::Matches(etag) => req.if_match(etag),
    };
    match req.send().await {
        Ok(out) => Ok(Put::Done(out.e_tag().map(str::to_owned))),
        Err(err) if matches!(status(&err), Some(412 | 409)) => Ok(Put::Refused),
        Err(err) => Err(s3_error(&format!("writing s3://{bucket}/{key}"), err)),
    }
}

async fn delete(client: &Client, bucket: &str, key: &str) -> io::Result<()> {
    match client.delete_object().bucket(bucket).key(key).send().await {
        Ok(_) => Ok(()),
        Err(err) if status(&err) == Some(404) => Ok(()),
        Err(err) => Err(s3_error(&format!("deleting s3://{bucket}/{key}"), err)),
    }
}

/// Starts a current-thread runtime on a thread of its own, for the S3 client.
fn runtime() -> io::Result<tokio::runtime::Handle> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let handle = rt.handle().clone();
    std::thread::Builder::new()
        .name("edge-s3".into())
        .spawn(move || rt.block_on(std::future::pending::<()>()))?;
    Ok(handle)
}

impl S3Store {
    /// Connects to the bucket and probes which conditional writes it honours.
    pub(crate) fn open(config: &S3StorageConfig) -> io::Result<Arc<S3Store>> {
        let runtime = runtime()?;
        let settings = config.settings.clone();
        let (tx, rx) = mpsc::sync_channel(1);
        runtime.spawn(async move {
            let _ = tx.send(settings.client().await);
        });
        let client = rx
            .recv()
            .map_err(|_| io::Error::other("the S3 storage thread stopped"))?
            .map_err(|e| io::Error::other(labcore::exit::chain(&e)))?;
        let mut store = S3Store {
            client,
            bucket: config.bucket.clone(),
            prefix: config.prefix.clone(),
            key: config.key.clone(),
            lease: config.lease,
            poll_interval: config.poll_interval,
            runtime,
            conditional: Conditional {
                create: false,
                replace: false,
            },
        };
        store.conditional = store.probe()?;
        tracing::info!(
            storage = %config.url(),
            if_none_match = store.conditional.create,
            if_match = store.conditional.replace,
            "S3 storage open; conditional writes the store honours"
        );
        Ok(Arc::new(store))
    }

    /// Runs `fut` on the S3 runtime and waits for it.
    fn run<T: Send + 'static>(
        &self,
        fut: impl Future<Output = T> + Send + 'static,
    ) -> io::Result<T> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.runtime.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv()
            .map_err(|_| io::Error::other("the S3 storage thread stopped"))
    }

    fn object(&self, rel: &str) -> String {
        format!("{}{rel}", self.prefix)
    }

    /// `s3://BUCKET/PREFIXrel`, for messages.
    pub(crate) fn describe(&self, rel: &str) -> String {
        format!("s3://{}/{}", self.bucket, self.object(rel))
    }

    /// Which conditional writes the store honours.
    #[cfg(test)]
    pub(crate) fn conditional(&self) -> Conditional {
        self.conditional
    }

    /// How often to look for certificates other edges stored.
    pub(crate) fn poll_interval(&self) -> Duration {
        self.poll_interval
    }

    fn get_raw(&self, key: String) -> io::Result<Option<(Vec<u8>, Option<String>)>> {
        let (client, bucket) = (self.client.clone(), self.bucket.clone());
        self.run(async move { get(&client, &bucket, &key).await })?
    }

    fn put_raw(&self, key: String, body: Vec<u8>, condition: Condition) -> io::Result<Put> {
        let (client, bucket) = (self.client.clone(), self.bucket.clone());
        self.run(async move { put(&client, &bucket, &key, body, condition).await })?
    }

    fn delete_raw(&self, key: String) -> io::Result<()> {
        let (client, bucket) = (self.client.clone(), self.bucket.clone());
        self.run(async move { delete(&client, &bucket, &key).await })?
    }

    /// Writes a probe object twice with conditions that must fail, to learn whether the
    /// store honours them; the probe is deleted after.
    fn probe(&self) -> io::Result<Conditional> {
        let key = self.object(&format!("locks/.probe-{:016x}", rand::random::<u64>()));
        let result = (|| {
            self.put_raw(key.clone(), b"probe".to_vec(), Condition::None)?;
            let create = matches!(
                self.put_raw(key.clone(), b"probe".to_vec(), Condition::Absent)?,
                Put::Refused
            );
            let replace = matches!(
                self.put_raw(
                    key.clone(),
                    b"probe".to_vec(),
                    Condition::Matches("\"edge-probe-no-such-etag\"".into())
                )?,
                Put::Refused
            );
            Ok(Conditional { create, replace })
        })();
        let _ = self.delete_raw(key);
        result
    }

    /// Reads and opens `rel`, or `None` when it does not exist.
    pub(crate) fn read(&self, rel: &str) -> io::Result<Option<Vec<u8>>> {
        let name = self.object(rel);
        let Some((sealed, _)) = self.get_raw(name.clone())? else {
            return Ok(None);
        };
        self.key
            .open(&format!("s3://{}/{name}", self.bucket), &sealed)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// Seals and writes `rel` whole.
    pub(crate) fn write(&self, rel: &str, bytes: &[u8]) -> io::Result<()> {
        let name = self.object(rel);
        let sealed = self
            .key
            .seal(&format!("s3://{}/{name}", self.bucket), bytes);
        self.put_raw(name, sealed, Condition::None).map(|_| ())
    }

    /// Deletes `rel` (absent is fine).
    pub(crate) fn remove(&self, rel: &str) -> io::Result<()> {
        self.delete_raw(self.object(rel))
    }

    /// Takes the lock `name`, waiting while another edge's unexpired lease holds it.
    pub(crate) fn lock(self: &Arc<Self>, name: &str) -> io::Result<Lease> {
        let key = self.object(&format!("locks/{name}.lock"));
        let owner = format!(
            "pid {} id {:016x}",
            std::process::id(),
            rand::random::<u64>()
        );
        let wait = (self.lease / 4).clamp(Duration::from_millis(100), Duration::from_secs(1));
        let mut waited = false;
        loop {
            if let Some(etag) = self.try_take(&key, &owner)? {
                return Ok(self.hold(key, owner, etag));
            }
            if !waited {
                tracing::info!(lock = %key, "another edge holds the lock; waiting");
                waited = true;
            }
            std::thread::sleep(wait);
        }
    }

    fn body(&self, owner: &str) -> Vec<u8> {
        let body = LeaseBody {
            owner: owner.to_owned(),
            expires_ms: now_ms() + self.lease.as_millis() as i64,
        };
        serde_json::to_vec(&body).unwrap_or_default()
    }

    /// How long a take waits before reading the lock back: long enough for a racing write
    /// that passed the store's condition check with ours to land.
    fn settle(&self) -> Duration {
        (self.lease / 20).clamp(Duration::from_millis(100), Duration::from_secs(1))
    }

    /// One attempt at the lock: `Some(etag)` when taken and read back as ours.
    fn try_take(&self, key: &str, owner: &str) -> io::Result<Option<Option<String>>> {
        if self.try_write(key, owner)?.is_none() {
            return Ok(None);
        }
        std::thread::sleep(self.settle());
        Ok(match self.get_raw(key.to_owned())? {
            Some((bytes, etag)) if names_owner(&bytes, owner) => Some(etag),
            _ => {
                tracing::info!(lock = %key, "another edge wrote the lock at the same time; waiting");
                None
            }
        })
    }

    /// Writes the lock as ours unless another edge's unexpired lease holds it: `Some(etag)`
    /// when written.
    fn try_write(&self, key: &str, owner: &str) -> io::Result<Option<Option<String>>> {
        if self.conditional.create
            && let Put::Done(etag) =
                self.put_raw(key.to_owned(), self.body(owner), Condition::Absent)?
        {
            return Ok(Some(etag));
        }
        let current = self.get_raw(key.to_owned())?;
        if let Some((bytes, etag)) = &current {
            // A lock that does not parse is treated as expired: it would otherwise hold the
            // name forever.
            let held = serde_json::from_slice::<LeaseBody>(bytes).ok();
            if let Some(held) = &held
                && held.expires_ms > now_ms()
                && held.owner != owner
            {
                return Ok(None);
            }
            tracing::warn!(lock = %key, previous = ?held.map(|h| h.owner),
                "the lock's lease expired; taking it over");
            if self.conditional.replace
                && let Some(etag) = etag
            {
                return Ok(
                    match self.put_raw(
                        key.to_owned(),
                        self.body(owner),
                        Condition::Matches(etag.clone()),
                    )? {
                        Put::Done(etag) => Some(etag),
                        Put::Refused => None,
                    },
                );
            }
            if self.conditional.create {
                self.delete_raw(key.to_owned())?;
                return Ok(
                    match self.put_raw(key.to_owned(), self.body(owner), Condition::Absent)? {
                        Put::Done(etag) => Some(etag),
                        Put::Refused => None,
                    },
                );
            }
        } else if self.conditional.create {
            // Deleted between our put and our read: try again at once.
            return self.try_write(key, owner);
        }
        // The store ignores conditions: a plain write, which the read-back settles.
        Ok(
            match self.put_raw(key.to_owned(), self.body(owner), Condition::None)? {
                Put::Done(etag) => Some(etag),
                Put::Refused => None,
            },
        )
    }

    /// Keeps a taken lock fresh until the returned guard drops.
    fn hold(self: &Arc<Self>, key: String, owner: String, etag: Option<String>) -> Lease {
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        let held = Arc::new(AtomicBool::new(true));
        let task_held = held.clone();
        let store = self.clone();
        let (task_key, task_owner) = (key.clone(), owner.clone());
        self.runtime.spawn(async move {
            let (client, bucket) = (store.client.clone(), store.bucket.clone());
            let mut etag = etag;
            let mut lost = false;
            loop {
                tokio::select! {
                    _ = &mut stop_rx => break,
                    _ = tokio::time::sleep(store.lease / 3) => {}
                }
                let condition = match (&etag, store.conditional.replace) {
                    (Some(etag), true) => Condition::Matches(etag.clone()),
                    _ => {
                        let current = get(&client, &bucket, &task_key).await.ok().flatten();
                        let ours = current.is_some_and(|(b, _)| names_owner(&b, &task_owner));
                        if !ours {
                            lost = true;
                            break;
                        }
                        Condition::None
                    }
                };
                match put(
                    &client,
                    &bucket,
                    &task_key,
                    store.body(&task_owner),
                    condition,
                )
                .await
                {
                    Ok(Put::Done(new)) => etag = new,
                    Ok(Put::Refused) => {
                        lost = true;
                        break;
                    }
                    Err(err) => tracing::warn!(lock = %task_key, error = %err,
                        "refreshing the lock's lease failed; retrying"),
                }
            }
            if lost {
                task_held.store(false, Ordering::Release);
                tracing::error!(lock = %task_key,
                    "the lock's lease was taken over by another edge while held");
                // Wait for the release, which must not delete the new holder's lock.
                let _ = stop_rx.await;
            } else {
                let current = get(&client, &bucket, &task_key).await.ok().flatten();
                let ours = current.is_some_and(|(b, _)| names_owner(&b, &task_owner));
                if ours && let Err(err) = delete(&client, &bucket, &task_key).await {
                    tracing::warn!(lock = %task_key, error = %err,
                        "releasing the lock failed; it expires with its lease");
                }
            }
            let _ = done_tx.send(());
        });
        Lease {
            stop: Some(stop_tx),
            done: done_rx,
            held,
            key,
        }
    }
}

/// A held lock; released (deleted if still ours) on drop.
pub(crate) struct Lease {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: mpsc::Receiver<()>,
    /// Cleared when another edge took the lock over while this one held it.
    held: Arc<AtomicBool>,
    key: String,
}

impl Lease {
    /// Whether the lock is still this edge's: false once another edge took it over.
    pub(crate) fn held(&self) -> bool {
        self.held.load(Ordering::Acquire)
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease").field("key", &self.key).finish()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // Bounded: a store that hangs leaves the lock to expire.
        let _ = self.done.recv_timeout(Duration::from_secs(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(server: &testkit::S3Server, bucket: &str, lease: Duration) -> S3StorageConfig {
        S3StorageConfig {
            settings: server.settings(),
            bucket: bucket.to_owned(),
            prefix: "edge/".into(),
            key: Arc::new(SealKey::from_bytes(&[3; 32]).unwrap()),
            lease,
            poll_interval: DEFAULT_POLL,
        }
    }

    fn bucket(server: &testkit::S3Server) -> String {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(server.bucket())
            .unwrap()
    }

    fn lock_owner(store: &S3Store, name: &str) -> Option<String> {
        let (bytes, _) = store
            .get_raw(store.object(&format!("locks/{name}.lock")))
            .unwrap()?;
        Some(serde_json::from_slice::<LeaseBody>(&bytes).unwrap().owner)
    }

    #[test]
    fn objects_are_sealed_in_the_bucket_and_refused_under_another_name() {
        let server = testkit::S3Server::start().unwrap();
        let bucket = bucket(&server);
        let store = S3Store::open(&config(&server, &bucket, DEFAULT_LEASE)).unwrap();
        store
            .write("a.key", b"-----BEGIN PRIVATE KEY-----")
            .unwrap();
        assert_eq!(
            store.read("a.key").unwrap().unwrap(),
            b"-----BEGIN PRIVATE KEY-----"
        );
        assert!(store.read("absent").unwrap().is_none());
        let (raw, _) = store.get_raw(store.object("a.key")).unwrap().unwrap();
        assert!(!raw.windows(7).any(|w| w == b"PRIVATE"));
        // A copy of one object under another name is refused, by name.
        store
            .put_raw(store.object("b.key"), raw, Condition::None)
            .unwrap();
        let err = store.read("b.key").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("edge/b.key"), "{err}");
        // Another key cannot read it either.
        let mut other = config(&server, &bucket, DEFAULT_LEASE);
        other.key = Arc::new(SealKey::from_bytes(&[4; 32]).unwrap());
        let other = S3Store::open(&other).unwrap();
        let err = other.read("a.key").unwrap_err();
        assert!(err.to_string().contains("wrong key"), "{err}");
    }

    #[test]
    fn of_two_contenders_for_a_lock_one_wins_and_the_other_waits_for_its_release() {
        let server = testkit::S3Server::start().unwrap();
        let bucket = bucket(&server);
        let one = S3Store::open(&config(&server, &bucket, Duration::from_secs(30))).unwrap();
        let two = S3Store::open(&config(&server, &bucket, Duration::from_secs(30))).unwrap();
        assert!(one.conditional().create, "s3s-fs honours If-None-Match: *");
        let held = one.lock("cert-a").unwrap();
        let owner = lock_owner(&one, "cert-a").unwrap();
        assert!(
            two.try_take(&two.object("locks/cert-a.lock"), "other")
                .unwrap()
                .is_none()
        );
        let (tx, rx) = mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let lease = two.lock("cert-a").unwrap();
            tx.send(()).unwrap();
            drop(lease);
        });
        assert!(
            rx.recv_timeout(Duration::from_secs(1)).is_err(),
            "the second must wait"
        );
        assert_eq!(lock_owner(&one, "cert-a").unwrap(), owner);
        drop(held);
        rx.recv_timeout(Duration::from_secs(20)).unwrap();
        waiter.join().unwrap();
        assert!(
            lock_owner(&one, "cert-a").is_none(),
            "released locks are deleted"
        );
    }

    #[test]
    fn of_contenders_writing_the_lock_in_one_instant_exactly_one_wins() {
        // s3s-fs checks If-None-Match and then writes, so simultaneous creates can all
        // succeed; the read-back after each take must still let exactly one through.
        let server = testkit::S3Server::start().unwrap();
        let bucket = bucket(&server);
        let store = S3Store::open(&config(&server, &bucket, Duration::from_secs(2))).unwrap();
        for round in 0..5 {
            let key = store.object(&format!("locks/race-{round}.lock"));
            let start = Arc::new(std::sync::Barrier::new(8));
            let contenders: Vec<_> = (0..8)
                .map(|i| {
                    let (store, key, start) = (store.clone(), key.clone(), start.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        store.try_take(&key, &format!("contender {i}")).unwrap()
                    })
                })
                .collect();
            let winners = contenders
                .into_iter()
                .filter_map(|c| c.join().unwrap())
                .count();
            assert_eq!(
                winners, 1,
                "round {round}: {winners} contenders took the lock"
            );
        }
    }

    #[test]
    fn a_holder_whose_lease_another_edge_took_over_knows_it_no_longer_holds_it() {
        let server = testkit::S3Server::start().unwrap();
        let bucket = bucket(&server);
        let store = S3Store::open(&config(&server, &bucket, Duration::from_millis(600))).unwrap();
        let lease = store.lock("n").unwrap();
        assert!(lease.held());
        // Another edge's write, as after this one's refreshes failed for a whole lease.
        let other = serde_json::to_vec(&LeaseBody {
            owner: "another edge".into(),
            expires_ms: now_ms() + 60_000,
        })
        .unwrap();
        store
            .put_raw(store.object("locks/n.lock"), other, Condition::None)
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while lease.held() {
            assert!(
                std::time::Instant::now() < deadline,
                "the loss was never noticed"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(lease);
        assert_eq!(
            lock_owner(&store, "n").as_deref(),
            Some("another edge"),
            "the release left the new holder's lock alone"
        );
    }

    #[test]
    fn the_start_probe_finds_which_conditional_writes_each_store_honours() {
        for (server, create, replace) in [
            (testkit::S3Server::start().unwrap(), true, true),
            (testkit::S3Server::start_moto().unwrap(), true, false),
        ] {
            let bucket = bucket(&server);
            let store = S3Store::open(&config(&server, &bucket, DEFAULT_LEASE)).unwrap();
            println!("{:?}: {:?}", server.backend(), store.conditional());
            assert_eq!(
                store.conditional(),
                Conditional { create, replace },
                "{:?}",
                server.backend()
            );
        }
    }

    #[test]
    fn an_expired_lease_is_taken_over_and_a_live_one_is_not() {
        // s3s-fs takes over with If-Match; moto, which ignores If-Match, by delete and create.
        for server in [
            testkit::S3Server::start().unwrap(),
            testkit::S3Server::start_moto().unwrap(),
        ] {
            expired_lease_taken_over(&server);
        }
    }

    fn expired_lease_taken_over(server: &testkit::S3Server) {
        let bucket = bucket(server);
        let store = S3Store::open(&config(server, &bucket, Duration::from_secs(30))).unwrap();
        let key = store.object("locks/n.lock");
        let stale = |expires_ms| {
            serde_json::to_vec(&LeaseBody {
                owner: "pid 1 id dead".into(),
                expires_ms,
            })
            .unwrap()
        };
        store
            .put_raw(key.clone(), stale(now_ms() + 60_000), Condition::None)
            .unwrap();
        assert!(store.try_take(&key, "me").unwrap().is_none());
        store
            .put_raw(key.clone(), stale(now_ms() - 1), Condition::None)
            .unwrap();
        assert!(store.try_take(&key, "me").unwrap().is_some());
        assert_eq!(lock_owner(&store, "n").unwrap(), "me");
    }
}
