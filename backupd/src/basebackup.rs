//! Physical base backups of a `[[cluster]]`: `pg_basebackup -Ft -X none -D -` streamed through
//! zstd and age to the target, never staged on disk, and a signed manifest naming the start and
//! stop LSN, the timeline and the WAL range the backup needs.
//!
//! Layout: `cluster/NAME/base/STAMP/data.tar.zst[.age]`, then `manifest.sig`, then
//! `manifest.json` last (as for dumps, a folder without a manifest is an incomplete backup).
//! The start LSN, checkpoint and timeline come from the `backup_label` inside the tar stream
//! (read as the bytes pass by), the stop LSN from the `backup_manifest` PostgreSQL appends to
//! it. `-X none` leaves the WAL to the archive: the manifest is written only once every segment
//! from the start to the stop segment is stored, so a base backup that exists is restorable.

use std::io::{self, Read, Write};
use std::process::Stdio;
use std::time::Instant;

use jiff::Timestamp;
use labcore::Env;
use labcore::pg::PgSettings;
use serde::{Deserialize, Serialize};

use crate::backup::{capture, finish_child_pump, first_cause, spawn, stop};
use crate::catalog::{self, BackupId, DataInfo};
use crate::cluster::Cluster;
use crate::config::Config;
use crate::pipeline::{self, Counting, Encoder, Encoding};
use crate::postgres::{PgTools, server_version};
use crate::spool::stored_header;
use crate::store::Store;
use crate::wal::{self, DEFAULT_SEGMENT_SIZE, WalName};
use crate::{Error, VERSION};

/// The manifest format of base backups.
pub(crate) const FORMAT: u32 = 1;

/// A WAL position.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Lsn(pub(crate) u64);

impl std::str::FromStr for Lsn {
    type Err = String;

    fn from_str(text: &str) -> Result<Lsn, String> {
        let (high, low) = text
            .split_once('/')
            .ok_or_else(|| format!("{text:?} is not an LSN like 0/16B3748"))?;
        let part = |p: &str| {
            if p.is_empty() || p.len() > 8 {
                return Err(format!("{text:?} is not an LSN like 0/16B3748"));
            }
            u64::from_str_radix(p, 16).map_err(|_| format!("{text:?} is not an LSN like 0/16B3748"))
        };
        Ok(Lsn((part(high)? << 32) | part(low)?))
    }
}

impl std::fmt::Display for Lsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

impl Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Lsn, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Lsn {
    /// The number of the segment holding this position (16 MB segments).
    pub(crate) fn segment(self) -> u64 {
        self.0 / DEFAULT_SEGMENT_SIZE
    }
}

/// A base backup's manifest.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(crate) struct BaseManifest {
    /// Format version.
    pub(crate) format: u32,
    /// `cluster@STAMP`.
    pub(crate) id: String,
    /// The `[[cluster]]` name.
    pub(crate) cluster: String,
    /// When the backup started.
    pub(crate) started_at: Timestamp,
    /// When pg_basebackup finished (after PostgreSQL's backup stop).
    pub(crate) finished_at: Timestamp,
    /// The stored tar.
    pub(crate) data: DataInfo,
    /// `server_version_num`.
    pub(crate) server_version: u32,
    /// The timeline the backup started on.
    pub(crate) timeline: u32,
    /// Where replay starts (`START WAL LOCATION`).
    pub(crate) start_lsn: Lsn,
    /// The checkpoint replay starts from.
    pub(crate) checkpoint_lsn: Lsn,
    /// Where the backup becomes consistent.
    pub(crate) stop_lsn: Lsn,
    /// The timeline at the stop.
    pub(crate) stop_timeline: u32,
    /// The first WAL segment the backup needs.
    pub(crate) wal_start: String,
    /// The last WAL segment the backup needs.
    pub(crate) wal_stop: String,
    /// backupd's and pg_basebackup's versions.
    pub(crate) tools: BaseTools,
}

/// Program versions.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(crate) struct BaseTools {
    /// backupd.
    pub(crate) backupd: String,
    /// `pg_basebackup --version`.
    pub(crate) pg_basebackup: String,
}

impl BaseManifest {
    /// The segment names from `wal_start` to `wal_stop`.
    pub(crate) fn wal_range(&self) -> Result<(WalName, WalName), Error> {
        let parse = |s: &str| {
            s.parse::<WalName>()
                .map_err(|e| Error::Internal(format!("manifest {}: {e}", self.id)))
        };
        Ok((parse(&self.wal_start)?, parse(&self.wal_stop)?))
    }
}

/// The folder of a cluster's base backups on a target.
pub(crate) fn base_prefix(cluster: &str) -> String {
    format!("cluster/{cluster}/base/")
}

/// The folder of one base backup.
pub(crate) fn base_dir(cluster: &str, stamp: &str) -> String {
    format!("{}{stamp}", base_prefix(cluster))
}

/// What the tar stream told us.
#[derive(Debug, Default)]
struct Label {
    start: Option<Lsn>,
    checkpoint: Option<Lsn>,
    timeline: Option<u32>,
    stop: Option<(Lsn, u32)>,
}

/// Reads `START WAL LOCATION`, `CHECKPOINT LOCATION` and `START TIMELINE` from a backup_label.
fn parse_label(text: &str, label: &mut Label) {
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("START WAL LOCATION: ") {
            label.start = rest.split_whitespace().next().and_then(|l| l.parse().ok());
        } else if let Some(rest) = line.strip_prefix("CHECKPOINT LOCATION: ") {
            label.checkpoint = rest.trim().parse().ok();
        } else if let Some(rest) = line.strip_prefix("START TIMELINE: ") {
            label.timeline = rest.trim().parse().ok();
        }
    }
}

/// Reads the last WAL range's end and timeline from a backup_manifest.
fn parse_backup_manifest(bytes: &[u8], label: &mut Label) {
    #[derive(Deserialize)]
    struct Range {
        #[serde(rename = "Timeline")]
        timeline: u32,
        #[serde(rename = "End-LSN")]
        end: String,
    }
    #[derive(Deserialize)]
    struct Manifest {
        #[serde(rename = "WAL-Ranges")]
        ranges: Vec<Range>,
    }
    if let Ok(manifest) = serde_json::from_slice::<Manifest>(bytes)
        && let Some(last) = manifest.ranges.last()
        && let Ok(end) = last.end.parse::<Lsn>()
    {
        label.stop = Some((end, last.timeline));
    }
}

/// A reader that copies everything it reads into `sink`.
struct Tee<R, W> {
    inner: R,
    sink: W,
}

impl<R: Read, W: Write> Read for Tee<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sink.write_all(&buf[..n])?;
        Ok(n)
    }
}

/// Watches the tar stream pass into `sink`, keeping backup_label and backup_manifest.
fn pump_tar<R: Read, W: Write>(input: R, sink: W) -> io::Result<(Label, W)> {
    let mut tee = Tee { inner: input, sink };
    let mut label = Label::default();
    {
        let mut archive = tar::Archive::new(&mut tee);
        for entry in archive.entries()? {
            let mut entry = entry?;
            let path = entry.path()?.into_owned();
            match path.to_str() {
                Some("backup_label") => {
                    let mut text = String::new();
                    entry.by_ref().take(64 * 1024).read_to_string(&mut text)?;
                    parse_label(&text, &mut label);
                }
                // The manifest lists every file; 64 MB covers clusters of ~500 000 files.
                Some("backup_manifest") if entry.size() <= 64 * 1024 * 1024 => {
                    let mut bytes = Vec::new();
                    entry.read_to_end(&mut bytes)?;
                    parse_backup_manifest(&bytes, &mut label);
                }
                _ => {
                    io::copy(&mut entry, &mut io::sink())?;
                }
            }
        }
    }
    // The end-of-archive blocks and any padding after them belong to the backup too.
    io::copy(&mut tee, &mut io::sink())?;
    Ok((label, tee.sink))
}

/// `backupd basebackup`: one base backup of `cluster`; returns its manifest.
pub(crate) async fn take(
    config: &Config,
    cluster: &Cluster,
    store: &Store,
    env: &Env,
) -> Result<BaseManifest, Error> {
    let Some(key) = config.signing.key.as_ref() else {
        return Err(config
            .file
            .invalid(
                "signing.key_file",
                "base backups are signed, and no signing key is configured",
            )
            .into());
    };
    let pg = PgSettings::from_env(env)?;
    let client = pg.clone().with_dbname("postgres").connect().await?;
    let server = server_version(&client, "postgres").await?;
    let segment_size: String = client
        .query_one("SHOW wal_segment_size", &[])
        .await
        .map_err(|source| Error::Sql {
            what: "reading wal_segment_size".into(),
            database: "postgres".into(),
            source,
        })?
        .get(0);
    drop(client);
    if segment_size != "16MB" {
        return Err(Error::Usage(format!(
            "cluster {}: wal_segment_size is {segment_size}; backupd handles 16MB segments only",
            cluster.name
        )));
    }
    let tools = PgTools::find(config.pg_bin_dir.as_deref(), server / 10_000, env)?;
    let started_at = Timestamp::now();
    let id = BackupId::new(cluster.name.clone(), started_at);
    let dir = base_dir(&cluster.name, &id.stamp());
    let encoding = Encoding {
        level: config.compression_level,
        threads: match config.compression_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get().min(4) as u32),
            n => n,
        },
        recipients: config
            .encryption
            .as_ref()
            .map(|e| e.recipients.clone())
            .unwrap_or_default(),
    };
    let object = format!(
        "data.tar.zst{}",
        if encoding.recipients.is_empty() {
            ""
        } else {
            ".age"
        }
    );
    let data_key = format!("{dir}/{object}");
    tracing::info!(backup = %id, target = %store.location(&data_key), "base backup");
    let clock = Instant::now();

    let mut command = tools.command("pg_basebackup", env);
    command
        .args([
            "-D",
            "-",
            "-Ft",
            "-X",
            "none",
            "--checkpoint=fast",
            "--no-password",
        ])
        .arg(format!("--label=backupd {id}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = spawn(command, "pg_basebackup")?;
    let stderr = capture(child.stderr.take());
    let (writer, reader) = pipeline::channel();
    let pump_encoding = encoding.clone();
    let pump = tokio::task::spawn_blocking(move || {
        let result = (|| -> Result<(Label, u64), Error> {
            let stdout = child
                .stdout
                .take()
                .expect("pg_basebackup's stdout is piped");
            let sink = Counting::new(
                Encoder::new(writer, &pump_encoding).map_err(Error::pipeline)?,
                false,
            );
            let (label, sink) = pump_tar(stdout, sink).map_err(Error::pipeline)?;
            let (raw_size, _) = finish_child_pump(&mut child, "pg_basebackup", sink)?;
            Ok((label, raw_size))
        })();
        if result.is_err() {
            stop(&mut child);
        }
        result
    });
    let stored = store.put_stream(&data_key, reader).await;
    let pumped = pump
        .await
        .map_err(|e| Error::Internal(format!("base backup task: {e}")))?;
    let errors = stderr.join().unwrap_or_default();
    let ((label, raw_size), stored) = match first_cause(pumped, stored, &errors) {
        Ok(done) => done,
        Err(err) => {
            let _ = store.delete(std::slice::from_ref(&data_key)).await;
            return Err(err);
        }
    };
    let finished_at = Timestamp::now();
    let incomplete = |what: &str| {
        Error::Internal(format!(
            "the base backup stream held no {what}: is this PostgreSQL 13 or newer?"
        ))
    };
    let result = async {
        let start = label.start.ok_or_else(|| incomplete("backup_label"))?;
        let checkpoint = label.checkpoint.ok_or_else(|| incomplete("checkpoint"))?;
        let timeline = label.timeline.ok_or_else(|| incomplete("start timeline"))?;
        let (stop_lsn, stop_timeline) = label.stop.ok_or_else(|| incomplete("backup_manifest"))?;
        // The stop LSN is the end of the last record: a stop on a segment boundary needs only
        // the segment before it.
        let last = Lsn(stop_lsn.0.saturating_sub(1).max(start.0));
        let wal_start = WalName::segment(timeline, start.segment());
        let wal_stop = WalName::segment(stop_timeline, last.segment());
        wait_for_wal(store, cluster, timeline, start.segment(), last.segment()).await?;
        let manifest = BaseManifest {
            format: FORMAT,
            id: id.to_string(),
            cluster: cluster.name.clone(),
            started_at,
            finished_at,
            data: DataInfo {
                object,
                size: stored.size,
                sha256: stored.sha256,
                raw_size,
                raw_sha256: None,
                compression: "zstd".into(),
                compression_level: encoding.level,
                encrypted_to: encoding
                    .recipients
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
            },
            server_version: server,
            timeline,
            start_lsn: start,
            checkpoint_lsn: checkpoint,
            stop_lsn,
            stop_timeline,
            wal_start: wal_start.to_string(),
            wal_stop: wal_stop.to_string(),
            tools: BaseTools {
                backupd: VERSION.into(),
                pg_basebackup: tools.version.replace("pg_dump", "pg_basebackup"),
            },
        };
        let text = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| Error::Internal(format!("serialising a manifest: {e}")))?;
        store
            .put_bytes(
                &format!("{dir}/{}", crate::signing::SIGNATURE),
                key.sign(&text),
            )
            .await?;
        store
            .put_bytes(&format!("{dir}/{}", catalog::MANIFEST), text)
            .await?;
        Ok::<_, Error>(manifest)
    }
    .await;
    match result {
        Ok(manifest) => {
            tracing::info!(
                backup = %manifest.id,
                stored = manifest.data.size,
                raw = manifest.data.raw_size,
                seconds = clock.elapsed().as_secs_f64(),
                wal = format_args!("{}..{}", manifest.wal_start, manifest.wal_stop),
                "base backup complete"
            );
            Ok(manifest)
        }
        Err(err) => {
            let _ = store
                .delete(&[data_key, format!("{dir}/{}", crate::signing::SIGNATURE)])
                .await;
            Err(err)
        }
    }
}

/// Waits until segments `first..=last` of `timeline` are stored, up to the archive timeout.
async fn wait_for_wal(
    store: &Store,
    cluster: &Cluster,
    timeline: u32,
    first: u64,
    last: u64,
) -> Result<(), Error> {
    let deadline = Instant::now() + cluster.archive_timeout;
    for number in first..=last {
        let name = WalName::segment(timeline, number);
        let key = wal::object_key(&cluster.name, &name);
        loop {
            if stored_header(store, &key).await?.is_some() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(Error::WalGap {
                    cluster: cluster.name.clone(),
                    missing: format!(
                        "{name}, which the base backup needs, was not archived within {} s: is \
                         archive_command set to `backupd wal-push %p`, and is the spool draining?",
                        cluster.archive_timeout.as_secs()
                    ),
                });
            }
            // Archiving is PostgreSQL's; there is no signal to wait on but the object itself.
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsns_parse_print_and_map_to_segments() {
        let lsn: Lsn = "1/2000028".parse().unwrap();
        assert_eq!(lsn.0, 0x1_0200_0028);
        assert_eq!(lsn.to_string(), "1/2000028");
        assert_eq!(
            WalName::segment(1, lsn.segment()).as_str(),
            "000000010000000100000002"
        );
        for bad in ["", "1", "1/", "/1", "g/1", "123456789/0"] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_backup_label_and_manifest_give_the_wal_range() {
        let mut label = Label::default();
        parse_label(
            "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n\
             CHECKPOINT LOCATION: 0/2000060\nBACKUP METHOD: streamed\nSTART TIMELINE: 1\n",
            &mut label,
        );
        parse_backup_manifest(
            br#"{"PostgreSQL-Backup-Manifest-Version": 1, "Files": [],
                "WAL-Ranges": [{"Timeline": 1, "Start-LSN": "0/2000028", "End-LSN": "0/3000100"}]}"#,
            &mut label,
        );
        assert_eq!(label.start, Some(Lsn(0x200_0028)));
        assert_eq!(label.checkpoint, Some(Lsn(0x200_0060)));
        assert_eq!(label.timeline, Some(1));
        assert_eq!(label.stop, Some((Lsn(0x300_0100), 1)));
    }
}
