//! Multipart uploads of local files that survive the run: an upload cut short (a dropped
//! store, SIGTERM, `kill -9`, a reboot) goes on in the next run from the parts already stored,
//! and `s3sync cleanup` aborts the ones nobody came back for.
//!
//! A file larger than one part goes up in parts of a size fixed by the file's size (S3's
//! 10,000-part rule, doubling every 1,000 parts as labcore's streaming upload does), each read
//! at its offset, so part N always holds the same bytes. Before the first part, a state file
//! records the upload: `$XDG_STATE_HOME/labkit/s3sync/uploads/MD5.json` (else
//! `~/.local/state/...`), named by the endpoint, bucket and key, holding the upload ID and the
//! file's path, size, mtime (to the nanosecond) and part size. It is local because the store
//! cannot keep it: the metadata given to CreateMultipartUpload is not returned by
//! ListMultipartUploads or ListParts, only by HeadObject once the upload completes.
//!
//! The next upload of the same key finds the state file, checks that the file still has that
//! path, size, mtime and part size, and asks the store with ListParts which parts it holds.
//! A stored part counts only if its size is the planned one and its ETag equals the MD5 of
//! those bytes of the local file, read again now; the others are uploaded, then the upload is
//! completed. An upload that no longer matches (the file changed, a part's bytes differ) is
//! aborted and started over; one the store no longer knows is started over. The state file goes
//! once the upload completes or is aborted.
//!
//! Failures keep the upload and its state file: the next run resumes it. Without a state file
//! (no `$HOME` or `$XDG_STATE_HOME`, or it could not be written) nothing could resume it, so a
//! failure aborts it. Streams (standard input, store-to-store copies) cannot be read twice and
//! keep labcore's abort-on-failure.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use aws_sdk_s3::Client;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::CompletedPart;
use bytes::Bytes;
use indicatif::ProgressBar;
use labcore::Env;
use labcore::Exit;
use labcore::s3::upload::{
    AbortOutcome, MAX_PART_SIZE, MAX_PARTS, abort_multipart, complete_multipart, part_size,
};
use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::limit::{CHUNK, Limits};
use crate::location::S3Url;
use crate::meta;

/// What a resumable upload needs from the run (the transfer layer builds it: this module sits
/// below it).
#[derive(Clone)]
pub(crate) struct Uploader {
    /// The client of the destination's store.
    pub(crate) client: Client,
    /// The destination store's endpoint, naming the state file.
    pub(crate) endpoint: String,
    /// Where state files live (`None`: uploads cannot resume).
    pub(crate) state_folder: Option<PathBuf>,
    /// First part size.
    pub(crate) part_size: usize,
    /// Parts in flight.
    pub(crate) part_concurrency: usize,
    /// Bandwidth and request limits.
    pub(crate) limits: Limits,
    /// Bytes moved.
    pub(crate) progress: ProgressBar,
    /// Cancelled by a stop signal.
    pub(crate) cancel: CancellationToken,
    /// Parts found stored and kept, for the run's summary.
    pub(crate) resumed_parts: Arc<AtomicU64>,
}

/// Runs blocking file work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::Runtime {
            what: "a file task failed",
            source: io::Error::other(e),
        })?
}

/// What a state file records about one upload in progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    endpoint: String,
    bucket: String,
    key: String,
    upload_id: String,
    file: PathBuf,
    size: u64,
    /// The file's mtime in nanoseconds since the epoch, as text (JSON numbers are doubles).
    mtime: String,
    part_size: u64,
}

/// The folder of upload state files.
pub(crate) fn folder(env: &Env) -> Option<PathBuf> {
    let base = env
        .path("XDG_STATE_HOME")
        .filter(|p| p.is_absolute())
        .or_else(|| env.home().map(|h| h.join(".local").join("state")))?;
    Some(base.join("labkit").join("s3sync").join("uploads"))
}

fn state_path(folder: &Path, endpoint: &str, url: &S3Url) -> PathBuf {
    let id =
        serde_json::to_vec(&(endpoint, &url.bucket, &url.key)).expect("strings always serialize");
    let name: String = Md5::digest(&id)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    folder.join(format!("{name}.json"))
}

fn mtime_text(mtime: Option<SystemTime>) -> String {
    mtime
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or_else(|| "-".into(), |d| d.as_nanos().to_string())
}

/// The first part's size for a file of `size` bytes: the option, raised so 10,000 parts
/// (doubling every 1,000) hold the file, in whole MiB.
fn base_part_size(size: u64, option: usize) -> usize {
    let needed = size.div_ceil(u64::from(MAX_PARTS)).div_ceil(1 << 20) << 20;
    option
        .max(usize::try_from(needed).unwrap_or(MAX_PART_SIZE))
        .min(MAX_PART_SIZE)
}

/// The parts of a file: `(number, offset, length)`.
fn plan(size: u64, base: usize) -> Vec<(i32, u64, u64)> {
    let mut parts = Vec::new();
    let mut offset = 0;
    let mut number = 1u32;
    while offset < size {
        let len = (part_size(number, base) as u64).min(size - offset);
        parts.push((number as i32, offset, len));
        offset += len;
        number += 1;
    }
    parts
}

/// MD5 of `len` bytes of `file` at `offset` (blocking).
fn md5_at(file: &File, path: &Path, offset: u64, len: u64) -> Result<[u8; 16], Error> {
    let mut hasher = Md5::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    while done < len {
        let want = (len - done).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..want], offset + done)
            .map_err(|e| Error::local("reading", path, e))?;
        hasher.update(&buf[..want]);
        done += want as u64;
    }
    Ok(hasher.finalize().into())
}

/// An upload's parts as the store lists them: `(number, size, ETag)`.
async fn list_parts(
    client: &Client,
    url: &S3Url,
    upload_id: &str,
) -> Result<Vec<(i32, u64, String)>, Error> {
    let mut parts = Vec::new();
    let mut marker: Option<String> = None;
    loop {
        let out = client
            .list_parts()
            .bucket(&url.bucket)
            .key(&url.key)
            .upload_id(upload_id)
            .set_part_number_marker(marker.clone())
            .send()
            .await
            .map_err(|e| Error::s3("ListParts", url.to_string(), &e))?;
        for part in out.parts() {
            if let (Some(number), Some(etag)) = (part.part_number(), part.e_tag()) {
                let size = part.size().unwrap_or(-1).max(0) as u64;
                parts.push((number, size, etag.to_owned()));
            }
        }
        match (out.is_truncated(), out.next_part_number_marker()) {
            (Some(true), Some(next)) if Some(next) != marker.as_deref() => {
                marker = Some(next.to_owned());
            }
            _ => return Ok(parts),
        }
    }
}

/// What [`upload_file`] did.
pub(crate) struct Resumed {
    /// Bytes the object holds.
    pub(crate) size: u64,
    /// Its ETag.
    pub(crate) etag: Option<String>,
}

/// Uploads the open `file` (of `size` bytes, larger than one part) to `dst` as a multipart
/// upload that a later run can resume; see the module's comment.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn upload_file(
    t: &Uploader,
    path: &Path,
    file: File,
    dst: &S3Url,
    size: u64,
    mtime: Option<SystemTime>,
    metadata: Vec<(String, String)>,
) -> Result<Resumed, Error> {
    let client = t.client.clone();
    let base = base_part_size(size, t.part_size);
    let parts = plan(size, base);
    let file = Arc::new(file);
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let record = Record {
        endpoint: t.endpoint.clone(),
        bucket: dst.bucket.clone(),
        key: dst.key.clone(),
        upload_id: String::new(),
        file: absolute,
        size,
        mtime: mtime_text(mtime),
        part_size: base as u64,
    };
    let state = t
        .state_folder
        .as_deref()
        .map(|f| state_path(f, &record.endpoint, dst));

    // What an earlier run left: the upload ID and the parts that still match.
    let mut stored: Vec<CompletedPart> = Vec::new();
    let mut upload_id = None;
    if let Some(state) = &state
        && let Some(old) = read_state(state)
    {
        let same_file = Record {
            upload_id: old.upload_id.clone(),
            ..record.clone()
        } == old;
        let kept = if same_file {
            matching_parts(t, &client, dst, &old.upload_id, &parts, &file, path).await
        } else {
            tracing::info!(%dst, "the file changed since an earlier upload began: starting over");
            None
        };
        match kept {
            Some(kept) => {
                tracing::info!(
                    %dst,
                    stored = kept.len(),
                    parts = parts.len(),
                    "resuming an interrupted upload"
                );
                t.resumed_parts
                    .fetch_add(kept.len() as u64, Ordering::Relaxed);
                stored = kept;
                upload_id = Some(old.upload_id);
            }
            None => {
                if let AbortOutcome::Failed(id) =
                    abort_multipart(&client, &dst.bucket, &dst.key, &old.upload_id).await
                {
                    tracing::warn!(%dst, upload_id = %id, "aborting the earlier upload failed; s3sync cleanup removes it later");
                }
                remove_state(state);
            }
        }
    }
    // Whether a failure may leave the upload for the next run: only when a state file names it.
    let (upload_id, resumable) = match upload_id {
        Some(id) => (id, true),
        None => {
            let id = create(t, &client, dst, metadata).await?;
            let saved = state.as_deref().is_some_and(|state| {
                write_state(
                    state,
                    &Record {
                        upload_id: id.clone(),
                        ..record.clone()
                    },
                )
            });
            (id, saved)
        }
    };
    let result = send_parts(t, &client, dst, &upload_id, &parts, stored, &file, path).await;
    match &result {
        Ok(_) => {
            if let Some(state) = &state {
                remove_state(state);
            }
        }
        Err(_) if !resumable => {
            // Nothing could resume it: leave no parts behind.
            if let AbortOutcome::Failed(id) =
                abort_multipart(&client, &dst.bucket, &dst.key, &upload_id).await
            {
                tracing::warn!(%dst, upload_id = %id, "aborting the multipart upload failed; it is still open");
            }
        }
        Err(_) => {}
    }
    result.map(|etag| Resumed { size, etag })
}

/// Uploads the parts not in `stored`, then completes the upload; returns its ETag.
#[allow(clippy::too_many_arguments)]
async fn send_parts(
    t: &Uploader,
    client: &Client,
    dst: &S3Url,
    upload_id: &str,
    parts: &[(i32, u64, u64)],
    stored: Vec<CompletedPart>,
    file: &Arc<File>,
    path: &Path,
) -> Result<Option<String>, Error> {
    let have: std::collections::HashSet<i32> =
        stored.iter().filter_map(|p| p.part_number()).collect();
    let skipped: u64 = parts
        .iter()
        .filter(|(n, ..)| have.contains(n))
        .map(|(_, _, len)| len)
        .sum();
    t.progress.inc(skipped);
    let mut tasks: JoinSet<Result<CompletedPart, Error>> = JoinSet::new();
    let mut completed = stored;
    let mut todo = parts.iter().filter(|(n, ..)| !have.contains(n)).copied();
    let concurrency = t.part_concurrency.max(1);
    loop {
        while tasks.len() < concurrency
            && let Some((number, offset, len)) = todo.next()
        {
            if t.cancel.is_cancelled() {
                break;
            }
            let part = PartUpload {
                t: t.clone(),
                client: client.clone(),
                dst: dst.clone(),
                upload_id: upload_id.to_owned(),
                file: file.clone(),
                path: path.to_owned(),
            };
            tasks.spawn(part.run(number, offset, len));
        }
        let Some(joined) = tasks.join_next().await else {
            break;
        };
        let part = joined.map_err(|e| Error::Runtime {
            what: "a part upload task failed",
            source: io::Error::other(e),
        });
        match part.and_then(|p| p) {
            Ok(part) => completed.push(part),
            Err(err) => {
                // The parts stored so far stay for the next run (the state file names them).
                tasks.abort_all();
                return Err(if t.cancel.is_cancelled() {
                    Error::Interrupted
                } else {
                    err
                });
            }
        }
    }
    if t.cancel.is_cancelled() || completed.len() != parts.len() {
        return Err(Error::Interrupted);
    }
    t.limits.request().await;
    Ok(complete_multipart(client, &dst.bucket, &dst.key, upload_id, completed).await?)
}

/// The stored parts of `upload_id` that hold exactly the planned bytes of the file; `None`
/// when the upload is gone or holds a part that does not match.
async fn matching_parts(
    t: &Uploader,
    client: &Client,
    dst: &S3Url,
    upload_id: &str,
    parts: &[(i32, u64, u64)],
    file: &Arc<File>,
    path: &Path,
) -> Option<Vec<CompletedPart>> {
    t.limits.request().await;
    let listed = match list_parts(client, dst, upload_id).await {
        Ok(listed) => listed,
        Err(err) => {
            tracing::info!(%dst, "cannot resume the earlier upload: {}", labcore::exit::chain(&err));
            return None;
        }
    };
    let mut kept = Vec::new();
    for (number, size, etag) in listed {
        let Some(&(_, offset, len)) = parts.iter().find(|(n, ..)| *n == number) else {
            tracing::info!(%dst, number, "the earlier upload has a part beyond the file's end");
            return None;
        };
        let Some(want) = meta::etag_md5(&etag) else {
            // Not an MD5 (an encrypted store): the part cannot be proven, so it goes again.
            continue;
        };
        let (file, owned) = (file.clone(), path.to_owned());
        let local = blocking(move || md5_at(&file, &owned, offset, len)).await;
        if size != len || local.ok() != Some(want) {
            tracing::info!(%dst, number, "a stored part no longer matches the file");
            return None;
        }
        kept.push(
            CompletedPart::builder()
                .part_number(number)
                .e_tag(etag)
                .build(),
        );
    }
    Some(kept)
}

async fn create(
    t: &Uploader,
    client: &Client,
    dst: &S3Url,
    metadata: Vec<(String, String)>,
) -> Result<String, Error> {
    t.limits.request().await;
    let mut request = client
        .create_multipart_upload()
        .bucket(&dst.bucket)
        .key(&dst.key);
    for (name, value) in metadata {
        request = request.metadata(name, value);
    }
    request
        .send()
        .await
        .map_err(|e| Error::s3("CreateMultipartUpload", dst.to_string(), &e))?
        .upload_id()
        .map(str::to_owned)
        .ok_or_else(|| Error::S3 {
            operation: "CreateMultipartUpload",
            target: dst.to_string(),
            detail: "the store returned no upload ID".into(),
            exit: Exit::Unavailable,
        })
}

/// One part: read at its offset, paced by `--bwlimit`, sent.
struct PartUpload {
    t: Uploader,
    client: Client,
    dst: S3Url,
    upload_id: String,
    file: Arc<File>,
    path: PathBuf,
}

impl PartUpload {
    async fn run(self, number: i32, offset: u64, len: u64) -> Result<CompletedPart, Error> {
        let (file, path) = (self.file.clone(), self.path.clone());
        let body = blocking(move || {
            let mut buf = vec![0u8; len as usize];
            file.read_exact_at(&mut buf, offset)
                .map_err(|e| Error::local("reading", &path, e))?;
            Ok(Bytes::from(buf))
        })
        .await?;
        // The rate limit paces each part by chunks, so the progress moves as the slots pass.
        let mut left = len as usize;
        while left > 0 {
            let step = left.min(CHUNK);
            self.t.limits.up(step).await;
            self.t.progress.inc(step as u64);
            left -= step;
        }
        if self.t.cancel.is_cancelled() {
            return Err(Error::Interrupted);
        }
        self.t.limits.request().await;
        let out = self
            .client
            .upload_part()
            .bucket(&self.dst.bucket)
            .key(&self.dst.key)
            .upload_id(&self.upload_id)
            .part_number(number)
            .content_length(len as i64)
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| Error::s3("UploadPart", self.dst.to_string(), &e))?;
        Ok(CompletedPart::builder()
            .part_number(number)
            .set_e_tag(out.e_tag().map(str::to_owned))
            .build())
    }
}

fn read_state(path: &Path) -> Option<Record> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return None,
        Err(err) => {
            tracing::warn!(path = %path.display(), "ignoring the upload state: {err}");
            return None;
        }
    };
    serde_json::from_slice(&bytes)
        .inspect_err(|err| {
            tracing::warn!(path = %path.display(), "ignoring the upload state: {err}");
        })
        .ok()
}

/// Writes the state file through a temporary one, so a kill never leaves half a file; says
/// whether it was saved.
fn write_state(path: &Path, record: &Record) -> bool {
    let written = (|| {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let temp = path.with_extension(format!("{:08x}.tmp", rand::random::<u32>()));
        std::fs::write(&temp, serde_json::to_vec(record).map_err(io::Error::other)?)?;
        std::fs::rename(&temp, path)
    })();
    if let Err(err) = &written {
        tracing::warn!(path = %path.display(), "cannot save the upload state ({err}): an interrupted upload will start over");
    }
    written.is_ok()
}

fn remove_state(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => tracing::warn!(path = %path.display(), "cannot remove the upload state: {err}"),
    }
}

/// `s3sync cleanup`: aborts the multipart uploads under `url` begun more than `older_than`
/// ago; returns how many were found.
pub(crate) async fn cleanup(
    client: &Client,
    limits: &Limits,
    url: &S3Url,
    older_than: Duration,
    dry_run: bool,
    json: bool,
) -> Result<usize, Error> {
    let cutoff = SystemTime::now()
        .checked_sub(older_than)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let mut found = 0;
    let (mut key_marker, mut id_marker): (Option<String>, Option<String>) = (None, None);
    loop {
        limits.request().await;
        let out = client
            .list_multipart_uploads()
            .bucket(&url.bucket)
            .prefix(&url.key)
            .set_key_marker(key_marker.clone())
            .set_upload_id_marker(id_marker.clone())
            .send()
            .await
            .map_err(|e| Error::s3("ListMultipartUploads", url.to_string(), &e))?;
        for upload in out.uploads() {
            let (Some(key), Some(id)) = (upload.key(), upload.upload_id()) else {
                continue;
            };
            let started = upload
                .initiated()
                .and_then(|d| SystemTime::try_from(*d).ok());
            if started.is_some_and(|s| s > cutoff) {
                continue;
            }
            found += 1;
            let target = url.with_key(key).to_string();
            let when = upload
                .initiated()
                .and_then(|d| d.fmt(aws_smithy_types::date_time::Format::DateTime).ok())
                .unwrap_or_else(|| "-".into());
            let status = if dry_run {
                "planned"
            } else {
                match abort_multipart(client, &url.bucket, key, id).await {
                    AbortOutcome::Failed(_) => "failed",
                    _ => "aborted",
                }
            };
            let line = if json {
                serde_json::json!({
                    "action": "abort", "destination": target, "upload_id": id,
                    "initiated": when, "status": status,
                })
                .to_string()
            } else {
                let verb = match status {
                    "planned" => "would abort",
                    "failed" => "FAILED to abort",
                    _ => "aborted",
                };
                format!("{verb} {target} (upload {id}, begun {when})")
            };
            println!("{line}");
        }
        let truncated = out.is_truncated().unwrap_or(false);
        let next = (
            out.next_key_marker().map(str::to_owned),
            out.next_upload_id_marker().map(str::to_owned),
        );
        if !truncated || next.0.is_none() || (next.0 == key_marker && next.1 == id_marker) {
            return Ok(found);
        }
        (key_marker, id_marker) = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_cover_the_file_exactly_and_grow_like_labcores() {
        let base = 5 << 20;
        let parts = plan((12 << 20) + 3, base);
        assert_eq!(
            parts,
            vec![
                (1, 0, 5 << 20),
                (2, 5 << 20, 5 << 20),
                (3, 10 << 20, (2 << 20) + 3)
            ]
        );
        let huge = 5u64 << 40;
        let base = base_part_size(huge, 8 << 20);
        let parts = plan(huge, base);
        assert!(parts.len() <= MAX_PARTS as usize, "{}", parts.len());
        assert_eq!(parts.iter().map(|p| p.2).sum::<u64>(), huge);
    }
}
