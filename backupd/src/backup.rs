//! Taking one backup: a source item streamed through compression and encryption into a
//! target, checked, and recorded by a manifest written last.
//!
//! If anything fails (the source program's exit status, the archive check, the store), the
//! data object is removed again and no manifest is written, so the failed attempt does not
//! exist for any other command.
//!
//! Every manifest is signed with the config's signing key ([`crate::signing`]); the signature
//! is stored before the manifest, which stays the last object written. Without a signing key
//! nothing is backed up: an unsigned backup would be refused by every restore.

use std::io::{Read, Write};
use std::process::{Child, Stdio};
use std::thread::JoinHandle;

use jiff::Timestamp;
use labcore::Env;
use labcore::pg::PgSettings;

use crate::archive::{self, Excludes};
use crate::catalog::{self, BackupId, Content, DataInfo, Manifest, SourceInfo, Tools};
use crate::config::Config;
use crate::pipeline::{self, ChannelWriter, Counting, Encoder, Encoding};
use crate::postgres::{PgTools, Snapshot, server_version};
use crate::store::{Store, Stored};
use crate::{Error, VERSION, signing};

/// One thing to back up.
#[derive(Clone, Debug)]
pub enum Item {
    /// A database of a postgres source.
    Database {
        /// The source's name.
        source: String,
        /// The database.
        database: String,
    },
    /// The globals of a cluster.
    Globals {
        /// The source's name.
        source: String,
    },
    /// A folder.
    Folder {
        /// The source's name.
        source: String,
        /// The folder.
        path: std::path::PathBuf,
        /// Exclude patterns.
        exclude: Vec<String>,
    },
}

impl Item {
    /// The subject its backups are filed under.
    pub fn subject(&self) -> String {
        match self {
            Item::Database { source, database } => catalog::subject(source, Some(database)),
            Item::Globals { source } | Item::Folder { source, .. } => {
                catalog::subject(source, None)
            }
        }
    }
}

/// What a backup needs besides the item and the target.
pub struct Context<'a> {
    /// The config.
    pub config: &'a Config,
    /// The environment (libpq variables reach the PostgreSQL programs through it).
    pub env: &'a Env,
    /// The admin connection settings, for database items.
    pub pg: Option<&'a PgSettings>,
}

impl Context<'_> {
    fn encoding(&self) -> Encoding {
        let threads = match self.config.compression_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get().min(4) as u32),
            n => n,
        };
        Encoding {
            level: self.config.compression_level,
            threads,
            recipients: self
                .config
                .encryption
                .as_ref()
                .map(|e| e.recipients.clone())
                .unwrap_or_default(),
        }
    }

    fn pg(&self) -> Result<&PgSettings, Error> {
        self.pg
            .ok_or_else(|| Error::Usage("no PostgreSQL connection settings".into()))
    }
}

/// Backs `item` up into `store`; returns the manifest written.
pub async fn back_up(item: &Item, ctx: &Context<'_>, store: &Store) -> Result<Manifest, Error> {
    let Some(key) = ctx.config.signing.key.as_ref() else {
        return Err(ctx
            .config
            .file
            .invalid(
                "signing.key_file",
                "backups are signed, and no signing key is configured: make one with \
                 `backupd keygen -o /etc/labkit/backupd.sign`, then set key_file in [signing] \
                 (or pass it as the systemd credential signing.key)",
            )
            .into());
    };
    let started_at = Timestamp::now();
    let id = BackupId::new(item.subject(), started_at);
    let encoding = ctx.encoding();
    let extension = match item {
        Item::Database { .. } => "pgdump",
        Item::Globals { .. } => "sql",
        Item::Folder { .. } => "tar",
    };
    let object = format!(
        "data.{extension}.zst{}",
        if encoding.recipients.is_empty() {
            ""
        } else {
            ".age"
        }
    );
    let data_key = format!("{}/{object}", id.dir());
    tracing::info!(backup = %id, target = %store.location(&data_key), "backing up");

    let result = match item {
        Item::Database { source, database } => {
            dump_database(ctx, source, database, &encoding, store, &data_key).await
        }
        Item::Globals { source } => dump_globals(ctx, source, &encoding, store, &data_key).await,
        Item::Folder {
            source,
            path,
            exclude,
        } => archive_folder(source, path, exclude, &encoding, store, &data_key).await,
    };
    let produced = match result {
        Ok(produced) => produced,
        Err(err) => {
            // The upload was aborted or never completed; a local temp file was removed. A
            // completed object without a manifest is removed too.
            let _ = store.delete(std::slice::from_ref(&data_key)).await;
            return Err(err);
        }
    };
    let manifest = Manifest {
        format: catalog::FORMAT,
        id: id.to_string(),
        source: produced.source,
        started_at,
        finished_at: Timestamp::now(),
        data: DataInfo {
            object,
            size: produced.stored.size,
            sha256: produced.stored.sha256,
            raw_size: produced.raw_size,
            raw_sha256: produced.raw_sha256,
            compression: "zstd".into(),
            compression_level: encoding.level,
            encrypted_to: encoding
                .recipients
                .iter()
                .map(ToString::to_string)
                .collect(),
        },
        content: produced.content,
        tools: Tools {
            backupd: VERSION.into(),
            pg_dump: produced.pg_dump,
        },
    };
    let text = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| Error::Internal(format!("serialising a manifest: {e}")))?;
    let signature_key = format!("{}/{}", id.dir(), signing::SIGNATURE);
    let stored = async {
        store.put_bytes(&signature_key, key.sign(&text)).await?;
        store
            .put_bytes(&format!("{}/{}", id.dir(), catalog::MANIFEST), text)
            .await
    };
    if let Err(err) = stored.await {
        let _ = store.delete(&[data_key, signature_key]).await;
        return Err(err.into());
    }
    tracing::info!(
        backup = %id,
        stored = manifest.data.size,
        raw = manifest.data.raw_size,
        seconds = manifest.finished_at.duration_since(started_at).as_secs_f64(),
        "backup complete"
    );
    Ok(manifest)
}

/// What a source produced and the store kept.
struct Produced {
    source: SourceInfo,
    stored: Stored,
    raw_size: u64,
    raw_sha256: Option<String>,
    content: Content,
    pg_dump: Option<String>,
}

/// Reads a child's stderr in the background, keeping the last 16 KiB.
pub(crate) fn capture(stream: Option<impl Read + Send + 'static>) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        if let Some(mut stream) = stream {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 {
                    break;
                }
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > 32 * 1024 {
                    kept.drain(..kept.len() - 16 * 1024);
                }
            }
        }
        String::from_utf8_lossy(&kept).trim().to_owned()
    })
}

pub(crate) fn spawn(mut command: std::process::Command, name: &str) -> Result<Child, Error> {
    command.spawn().map_err(|source| Error::Spawn {
        program: name.to_owned(),
        source,
    })
}

pub(crate) fn child_failed(
    program: &str,
    status: std::process::ExitStatus,
    stderr: String,
) -> Error {
    Error::Child {
        program: program.to_owned(),
        status: status.to_string(),
        stderr,
    }
}

/// Of a producer's and the store's results, the error that caused the failure: a source that
/// failed makes the store fail too (its stream ended early), and a store that failed makes the
/// producer fail (its pipe broke). The source program's stderr joins its error.
pub(crate) fn first_cause<T>(
    produced: Result<T, Error>,
    stored: Result<Stored, crate::store::StoreError>,
    source_stderr: &str,
) -> Result<(T, Stored), Error> {
    let with_stderr = |err: Error| match err {
        Error::Child {
            program, status, ..
        } => Error::Child {
            program,
            status,
            stderr: source_stderr.to_owned(),
        },
        other => other,
    };
    match (produced, stored) {
        (Ok(produced), Ok(stored)) => Ok((produced, stored)),
        (Err(err), Ok(_)) => Err(with_stderr(err)),
        (Ok(_), Err(err)) => Err(err.into()),
        (Err(Error::Pipeline(io)), Err(err)) if io.kind() == std::io::ErrorKind::BrokenPipe => {
            Err(err.into())
        }
        (Err(err), Err(_)) => Err(with_stderr(err)),
    }
}

/// Kills and reaps a child that is no longer wanted.
/// Ends a pump into the store: finishes the encoder under `sink` and closes the channel, the
/// one way the store sees a clean end. Returns the plain bytes counted and their SHA-256 (if
/// `sink` hashes).
fn close_sink(sink: Counting<Encoder<ChannelWriter>>) -> Result<(u64, Option<String>), Error> {
    let (encoder, raw_size, raw_sha256) = sink.finish();
    encoder
        .finish()
        .map_err(Error::pipeline)?
        .close()
        .map_err(Error::pipeline)?;
    Ok((raw_size, raw_sha256))
}

/// Ends a pump of `program`'s stdout: waits for it and fails if it failed, so the store sees
/// an aborted stream and never keeps a partial dump; only then closes `sink` ([`close_sink`]).
pub(crate) fn finish_child_pump(
    child: &mut Child,
    program: &str,
    sink: Counting<Encoder<ChannelWriter>>,
) -> Result<(u64, Option<String>), Error> {
    let status = child.wait().map_err(Error::pipeline)?;
    if !status.success() {
        return Err(child_failed(program, status, String::new()));
    }
    close_sink(sink)
}

pub(crate) fn stop(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

async fn dump_database(
    ctx: &Context<'_>,
    source: &str,
    database: &str,
    encoding: &Encoding,
    store: &Store,
    data_key: &str,
) -> Result<Produced, Error> {
    let snapshot = Snapshot::open(ctx.pg()?, database).await?;
    let server_version = snapshot.server_version;
    let tools = PgTools::find(
        ctx.config.pg_bin_dir.as_deref(),
        snapshot.server_version / 10_000,
        ctx.env,
    )?;
    let database_info = snapshot.database_info().await?;

    let mut dump = tools.command("pg_dump", ctx.env);
    dump.args(["--format=custom", "--compress=0", "--no-password"])
        .arg(format!("--snapshot={}", snapshot.name))
        .env("PGDATABASE", database)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut dump = spawn(dump, "pg_dump")?;
    let mut list = tools.command("pg_restore", ctx.env);
    list.arg("--list")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut list = match spawn(list, "pg_restore") {
        Ok(list) => list,
        Err(err) => {
            stop(&mut dump);
            return Err(err);
        }
    };
    let dump_stderr = capture(dump.stderr.take());
    let list_stderr = capture(list.stderr.take());
    let list_stdout = capture(list.stdout.take());

    let (writer, reader) = pipeline::channel();
    let encoding = encoding.clone();
    let pump = tokio::task::spawn_blocking(move || {
        let result = (|| -> Result<u64, Error> {
            let mut stdout = dump.stdout.take().expect("pg_dump's stdout is piped");
            let mut toc_input = list.stdin.take();
            let mut sink = Counting::new(
                Encoder::new(writer, &encoding).map_err(Error::pipeline)?,
                false,
            );
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = stdout.read(&mut buf).map_err(Error::pipeline)?;
                if n == 0 {
                    break;
                }
                // pg_restore --list stops reading once it has the table of contents.
                if let Some(input) = &mut toc_input
                    && input.write_all(&buf[..n]).is_err()
                {
                    toc_input = None;
                }
                sink.write_all(&buf[..n]).map_err(Error::pipeline)?;
            }
            drop(toc_input);
            let (raw_size, _) = finish_child_pump(&mut dump, "pg_dump", sink)?;
            Ok(raw_size)
        })();
        if result.is_err() {
            stop(&mut dump);
        }
        let list_status = list.wait();
        (result, list_status)
    });

    let (stored, tables) = tokio::join!(store.put_stream(data_key, reader), snapshot.table_rows());
    let (pumped, list_status) = pump
        .await
        .map_err(|e| Error::Internal(format!("dump task: {e}")))?;
    let dump_errors = dump_stderr.join().unwrap_or_default();
    let (raw_size, stored) = first_cause(pumped, stored, &dump_errors)?;
    let tables = tables?;
    snapshot.close().await?;

    let toc = list_stdout.join().unwrap_or_default();
    let list_errors = list_stderr.join().unwrap_or_default();
    let list_status = list_status.map_err(Error::pipeline)?;
    let toc_entries = toc
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with(';'))
        .count() as u64;
    // An empty database (a service's right after `pgprov create`) has no entries, so the proof
    // that pg_restore read the whole table of contents is the header it prints for it.
    let toc_read = toc.lines().any(|l| l.starts_with("; Archive created at"));
    if !list_status.success() || !toc_read {
        return Err(child_failed(
            "pg_restore --list (archive check)",
            list_status,
            list_errors,
        ));
    }
    if !dump_errors.is_empty() {
        tracing::warn!(database, stderr = %dump_errors, "pg_dump printed warnings");
    }
    Ok(Produced {
        source: SourceInfo {
            name: source.to_owned(),
            kind: "postgres".into(),
            database: Some(database.to_owned()),
            path: None,
        },
        stored,
        raw_size,
        raw_sha256: None,
        content: Content::Postgres {
            server_version,
            database: database_info,
            tables,
            toc_entries,
        },
        pg_dump: Some(tools.version),
    })
}

async fn dump_globals(
    ctx: &Context<'_>,
    source: &str,
    encoding: &Encoding,
    store: &Store,
    data_key: &str,
) -> Result<Produced, Error> {
    let client = ctx.pg()?.clone().with_dbname("postgres").connect().await?;
    let server = server_version(&client, "postgres").await?;
    drop(client);
    let tools = PgTools::find(ctx.config.pg_bin_dir.as_deref(), server / 10_000, ctx.env)?;
    let mut dumpall = tools.command("pg_dumpall", ctx.env);
    dumpall
        .args(["--globals-only", "--no-password"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut dumpall = spawn(dumpall, "pg_dumpall")?;
    let stderr = capture(dumpall.stderr.take());
    let (writer, reader) = pipeline::channel();
    let encoding = encoding.clone();
    let pump = tokio::task::spawn_blocking(move || {
        let result = (|| -> Result<(u64, Option<String>), Error> {
            let mut stdout = dumpall.stdout.take().expect("pg_dumpall's stdout is piped");
            let mut sink = Counting::new(
                Encoder::new(writer, &encoding).map_err(Error::pipeline)?,
                true,
            );
            std::io::copy(&mut stdout, &mut sink).map_err(Error::pipeline)?;
            finish_child_pump(&mut dumpall, "pg_dumpall", sink)
        })();
        if result.is_err() {
            stop(&mut dumpall);
        }
        result
    });
    let stored = store.put_stream(data_key, reader).await;
    let pumped = pump
        .await
        .map_err(|e| Error::Internal(format!("dump task: {e}")))?;
    let errors = stderr.join().unwrap_or_default();
    let ((raw_size, raw_sha256), stored) = first_cause(pumped, stored, &errors)?;
    Ok(Produced {
        source: SourceInfo {
            name: source.to_owned(),
            kind: "globals".into(),
            database: None,
            path: None,
        },
        stored,
        raw_size,
        raw_sha256,
        content: Content::Globals {
            server_version: server,
        },
        pg_dump: Some(tools.version.replace("pg_dump", "pg_dumpall")),
    })
}

async fn archive_folder(
    source: &str,
    path: &std::path::Path,
    exclude: &[String],
    encoding: &Encoding,
    store: &Store,
    data_key: &str,
) -> Result<Produced, Error> {
    let excludes =
        Excludes::new(exclude).map_err(|e| Error::Usage(format!("exclude pattern: {e}")))?;
    let (writer, reader) = pipeline::channel();
    let encoding = encoding.clone();
    let root = path.to_owned();
    let pump = tokio::task::spawn_blocking(move || -> Result<_, Error> {
        let sink = Counting::new(
            Encoder::new(writer, &encoding).map_err(Error::pipeline)?,
            true,
        );
        let (entries, sink) = archive::write_tar(&root, &excludes, sink)?;
        let (raw_size, raw_sha256) = close_sink(sink)?;
        Ok((entries, raw_size, raw_sha256))
    });
    let stored = store.put_stream(data_key, reader).await;
    let pumped = pump
        .await
        .map_err(|e| Error::Internal(format!("archive task: {e}")))?;
    let ((entries, raw_size, raw_sha256), stored) = first_cause(pumped, stored, "")?;
    Ok(Produced {
        source: SourceInfo {
            name: source.to_owned(),
            kind: "folder".into(),
            database: None,
            path: Some(path.display().to_string()),
        },
        stored,
        raw_size,
        raw_sha256,
        content: Content::Folder { entries },
        pg_dump: None,
    })
}
