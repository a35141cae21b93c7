//! Restores and restore tests.
//!
//! The store is not trusted: whoever can write the bucket can write a manifest and a data
//! object that age decrypts (the recipient is public). So before anything is decoded:
//! 1. the manifest's signature is checked against the trusted keys ([`Restorer::authenticate`],
//!    [`crate::signing`]), and only the manifest read from the bytes that were checked is used;
//! 2. the data object is copied into an unnamed private file (`O_TMPFILE`, beside the target
//!    for folders and files, else in `$TMPDIR` or `/var/tmp`) while it is hashed, and compared
//!    with the manifest's size and SHA-256 ([`Restorer::spool`]); the copy stops at the size
//!    the manifest gives, so a store cannot fill the disk.
//!
//! Only then are age, zstd, tar or `pg_restore` given the bytes, from that local copy, which
//! no one else can change. Reading the object twice from the store instead (hash, then
//! restore) would let the store serve different bytes the second time; extracting into
//! staging and checking afterwards would still run `pg_restore` (which executes the archive's
//! SQL as the admin role) and tar on forged data. The price is local disk for the stored
//! (compressed) size, and a restore that starts once the download ended; memory stays a few
//! buffers.
//!
//! A restore never half-writes its target. A database is restored into a fresh scratch
//! database, which is renamed to the target name only once `pg_restore` succeeded; a folder
//! is extracted into a private (0700) staging folder beside the target and renamed into place.
//! The age identity is checked against the backup before anything is created, so a missing or
//! wrong identity leaves the target untouched.
//!
//! [`verify`] is a restore into a scratch database or folder that is then compared with the
//! manifest (row counts of every table, or every file's size, mode, mtime and SHA-256), and
//! removed; the outcome is recorded next to the backup as `verify.json`. A backup whose
//! signature is missing or untrusted is refused before that and gets no record.

use std::io::{Read, Seek};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use jiff::Timestamp;
use labcore::pg::{PgSettings, quote_ident};
use labcore::{Env, Secret};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::io::SyncIoBridge;

use crate::Error;
use crate::archive;
use crate::catalog::{self, BackupId, Content, Manifest, VerifyRecord};
use crate::inventory::Listed;
use crate::pipeline::{self, Hashing, hex};
use crate::postgres::{self, PgTools};
use crate::signing::{self, SignatureError, Trust};
use crate::store::{Store, StoreError};

mod table;
pub(crate) use table::{TableDestination, TableName};

/// Where a restore goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    /// A database (created, or replaced with `--force`).
    Database(String),
    /// A folder (created, or replaced with `--force`).
    Dir(PathBuf),
    /// A file holding the decoded data as `pg_dump` or tar wrote it.
    File(PathBuf),
}

/// What a restore needs.
pub struct Restorer<'a> {
    /// The target holding the backup.
    pub store: &'a Store,
    /// The environment for PostgreSQL programs.
    pub env: &'a Env,
    /// The admin connection.
    pub pg: Option<&'a PgSettings>,
    /// Fixed PostgreSQL program folder.
    pub pg_bin_dir: Option<&'a Path>,
    /// The age identity, for encrypted backups.
    pub identity: Option<&'a Secret>,
    /// Pass `--no-owner` to `pg_restore`.
    pub no_owner: bool,
    /// Which manifest signatures are accepted.
    pub trust: &'a Trust,
}

impl Restorer<'_> {
    /// The identity text for an encrypted backup (parsed on the thread that decodes: age
    /// identities cannot move between threads).
    fn identity_for(&self, manifest: &Manifest) -> Result<Option<Secret>, Error> {
        if !manifest.data.encrypted() {
            return Ok(None);
        }
        let identity = self.identity.ok_or(pipeline::DecodeError::NoIdentity)?;
        pipeline::identities(identity.expose())?;
        Ok(Some(identity.clone()))
    }

    fn pg(&self) -> Result<&PgSettings, Error> {
        self.pg
            .ok_or_else(|| Error::Usage("no PostgreSQL connection settings".into()))
    }

    fn data_key(listed: &Listed) -> Result<String, Error> {
        let id: BackupId = listed.id.parse().map_err(Error::Internal)?;
        Ok(format!("{}/{}", id.dir(), listed.manifest.data.object))
    }

    /// Checks that the backup's data opens with the identity we have, reading only its header.
    async fn check_identity(&self, listed: &Listed) -> Result<(), Error> {
        if !listed.manifest.data.encrypted() {
            return Ok(());
        }
        let identity = self.identity_for(&listed.manifest)?;
        let stream = self.store.get_stream(&Self::data_key(listed)?).await?;
        let bridge = SyncIoBridge::new(stream);
        tokio::task::spawn_blocking(move || -> Result<(), Error> {
            let identities = parse_identities(identity.as_ref())?;
            pipeline::decoder(bridge, true, identities.as_deref())?;
            Ok(())
        })
        .await
        .map_err(|e| Error::Internal(format!("identity check: {e}")))?
    }

    /// Reads the backup's manifest again with its signature and checks it against the trusted
    /// keys; returns the backup with the manifest parsed from exactly the bytes that were
    /// checked, which is the only one a restore may use.
    pub async fn authenticate(&self, listed: &Listed) -> Result<Listed, Error> {
        let id: BackupId = listed.id.parse().map_err(Error::Internal)?;
        let manifest_key = format!("{}/{}", id.dir(), catalog::MANIFEST);
        let bytes = self
            .store
            .get_bytes(&manifest_key)
            .await?
            .ok_or_else(|| Error::NotFound {
                id: listed.id.clone(),
                target: self.store.location(""),
            })?;
        let signature = self
            .store
            .get_bytes(&format!("{}/{}", id.dir(), signing::SIGNATURE))
            .await?;
        self.trust.check(&listed.id, &bytes, signature.as_deref())?;
        let manifest: Manifest =
            serde_json::from_slice(&bytes).map_err(|source| Error::Manifest {
                location: self.store.location(&manifest_key),
                source,
            })?;
        let mismatch = |detail: String| {
            Error::from(SignatureError::Mismatch {
                id: listed.id.clone(),
                detail,
            })
        };
        // A signed manifest copied under another ID would restore other data than asked for.
        if manifest.id != listed.id {
            return Err(mismatch(format!("is for backup {}", manifest.id)));
        }
        let object = &manifest.data.object;
        if object.is_empty()
            || object.starts_with('.')
            || object.contains('/')
            || object == catalog::MANIFEST
            || object == catalog::VERIFY
            || object == signing::SIGNATURE
        {
            return Err(mismatch(format!("names the data object {object:?}")));
        }
        Ok(Listed {
            id: listed.id.clone(),
            manifest,
            verify: listed.verify.clone(),
        })
    }

    /// Where database restores and restore tests keep their copy of the stored object:
    /// `$TMPDIR`, else `/var/tmp` (on disk; `/tmp` is often memory).
    fn spool_dir(&self) -> PathBuf {
        self.env
            .path("TMPDIR")
            .unwrap_or_else(|| PathBuf::from("/var/tmp"))
    }

    /// Copies the stored object into an unnamed private file in `dir`, hashing it on the way,
    /// and checks it against the manifest; returns the file, rewound. Nothing is decoded here.
    async fn spool(&self, listed: &Listed, dir: &Path) -> Result<std::fs::File, Error> {
        let key = Self::data_key(listed)?;
        let location = self.store.location(&key);
        let data = &listed.manifest.data;
        let file = tempfile::tempfile_in(dir).map_err(|source| Error::Io {
            what: format!("creating a private spool file in {}", dir.display()),
            source,
        })?;
        let spool_err = |source| Error::Io {
            what: format!("writing the spool file in {}", dir.display()),
            source,
        };
        let mut stream = self.store.get_stream(&key).await?;
        let mut out = tokio::fs::File::from_std(file);
        let mut hasher = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        let mut size = 0u64;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = stream
                .read(&mut buf)
                .await
                .map_err(|source| StoreError::Read {
                    location: location.clone(),
                    source,
                })?;
            if n == 0 {
                break;
            }
            size += n as u64;
            if size > data.size {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).await.map_err(spool_err)?;
        }
        let sha256 = hex(hasher.finish().as_ref());
        if size != data.size || sha256 != data.sha256 {
            let size = if size > data.size {
                format!("more than {} bytes", data.size)
            } else {
                format!("{size} bytes, sha256 {sha256}")
            };
            return Err(Error::VerifyFailed {
                id: location,
                detail: format!(
                    "the stored object has {size}; the manifest says {} bytes, sha256 {}: it \
                     was changed or corrupted, and nothing was restored from it",
                    data.size, data.sha256
                ),
            });
        }
        out.flush().await.map_err(spool_err)?;
        let mut file = out.into_std().await;
        file.rewind().map_err(spool_err)?;
        Ok(file)
    }

    /// Spools the stored object into `dir` and checks it ([`Restorer::spool`]), then streams
    /// the decoded data into `consume` on a blocking thread.
    async fn stream_plain<T: Send + 'static>(
        &self,
        listed: &Listed,
        dir: &Path,
        consume: impl FnOnce(&mut dyn Read) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let identity = self.identity_for(&listed.manifest)?;
        let encrypted = listed.manifest.data.encrypted();
        let file = self.spool(listed, dir).await?;
        tokio::task::spawn_blocking(move || {
            let identities = parse_identities(identity.as_ref())?;
            let mut plain = pipeline::decoder(
                std::io::BufReader::new(file),
                encrypted,
                identities.as_deref(),
            )?;
            consume(&mut plain)
        })
        .await
        .map_err(|e| Error::Internal(format!("restore task: {e}")))?
    }

    /// Restores `listed` to `destination`.
    pub async fn restore(
        &self,
        listed: &Listed,
        destination: &Destination,
        force: bool,
    ) -> Result<(), Error> {
        let listed = &self.authenticate(listed).await?;
        match (&listed.manifest.content, destination) {
            (_, Destination::File(path)) => self.restore_file(listed, path, force).await,
            (Content::Postgres { .. }, Destination::Database(name)) => {
                self.restore_database(listed, name, force).await.map(drop)
            }
            (Content::Folder { .. }, Destination::Dir(path)) => {
                self.restore_dir(listed, path, force).await
            }
            (content, _) => Err(Error::Usage(format!(
                "backup {} is a {} backup: restore it {}",
                listed.id,
                kind(content),
                match content {
                    Content::Postgres { .. } => "with --to-db NAME (or --to-file FILE)",
                    Content::Folder { .. } => "with --to-dir PATH (or --to-file FILE)",
                    Content::Globals { .. } => "with --to-file FILE, then run it with psql",
                }
            ))),
        }
    }

    async fn restore_file(&self, listed: &Listed, path: &Path, force: bool) -> Result<(), Error> {
        if path.exists() && !force {
            return Err(Error::TargetNotEmpty(path.display().to_string()));
        }
        self.check_identity(listed).await?;
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let temp = tempfile::NamedTempFile::new_in(dir).map_err(|source| Error::Io {
            what: format!("creating a temporary file in {}", dir.display()),
            source,
        })?;
        let temp = self
            .stream_plain(listed, dir, move |plain| {
                let mut file = temp;
                std::io::copy(plain, &mut file).map_err(Error::pipeline)?;
                file.as_file().sync_all().map_err(Error::pipeline)?;
                Ok(file)
            })
            .await?;
        temp.persist(path).map_err(|e| Error::Io {
            what: format!("renaming into {}", path.display()),
            source: e.error,
        })?;
        Ok(())
    }

    async fn restore_dir(&self, listed: &Listed, path: &Path, force: bool) -> Result<(), Error> {
        let exists = path.exists();
        let empty = !exists
            || std::fs::read_dir(path)
                .map(|mut d| d.next().is_none())
                .map_err(|source| Error::Io {
                    what: format!("reading {}", path.display()),
                    source,
                })?;
        if !empty && !force {
            return Err(Error::TargetNotEmpty(path.display().to_string()));
        }
        self.check_identity(listed).await?;
        // Private staging: the spool file and the tree being extracted are reachable by no one
        // else until the tree is renamed into place.
        let staging = sibling(path, "restore")?;
        let tree = staging.join("tree");
        let extracted = async {
            std::fs::create_dir(&tree).map_err(|source| Error::Io {
                what: format!("creating {}", tree.display()),
                source,
            })?;
            let dest = tree.clone();
            self.stream_plain(listed, &staging, move |plain| {
                archive::extract(plain, &dest).map_err(Error::from)
            })
            .await
        }
        .await;
        if let Err(err) = extracted {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(err);
        }
        let io = |what: String| move |source| Error::Io { what, source };
        if exists {
            let old = sibling(path, "old")?;
            std::fs::remove_dir(&old)
                .map_err(io(format!("preparing to replace {}", path.display())))?;
            std::fs::rename(path, &old).map_err(io(format!("moving {} aside", path.display())))?;
            std::fs::rename(&tree, path)
                .map_err(io(format!("renaming into {}", path.display())))?;
            std::fs::remove_dir_all(&old)
                .map_err(io(format!("removing the old {}", old.display())))?;
        } else {
            std::fs::rename(&tree, path)
                .map_err(io(format!("renaming into {}", path.display())))?;
        }
        std::fs::remove_dir(&staging).map_err(io(format!(
            "removing the staging folder {}",
            staging.display()
        )))?;
        Ok(())
    }

    /// Restores into `name` through a scratch database; returns the scratch database's final
    /// name (the target).
    async fn restore_database(
        &self,
        listed: &Listed,
        name: &str,
        force: bool,
    ) -> Result<String, Error> {
        let Content::Postgres { database, .. } = &listed.manifest.content else {
            return Err(Error::Internal("not a database backup".into()));
        };
        let admin = self.pg()?.clone().with_dbname("postgres").connect().await?;
        let sql = |what: &str| {
            let what = what.to_owned();
            move |source| Error::Sql {
                what,
                database: "postgres".into(),
                source,
            }
        };
        let exists = admin
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
            .await
            .map_err(sql("looking up the target database"))?
            .is_some();
        if exists && !force && !database_is_empty(self.pg()?, name).await? {
            return Err(Error::TargetNotEmpty(format!("database {name:?}")));
        }
        self.check_identity(listed).await?;

        let scratch = scratch_name(name);
        self.fill_scratch_database(listed, &admin, &scratch, database)
            .await?;
        let swap = async {
            if exists {
                admin
                    .batch_execute(&format!("DROP DATABASE {} WITH (FORCE)", quote_ident(name)))
                    .await
                    .map_err(sql("dropping the database being replaced"))?;
            }
            admin
                .batch_execute(&format!(
                    "ALTER DATABASE {} RENAME TO {}",
                    quote_ident(&scratch),
                    quote_ident(name)
                ))
                .await
                .map_err(sql("renaming the restored database into place"))
        };
        if let Err(err) = swap.await {
            drop_database(&admin, &scratch).await;
            return Err(err);
        }
        tracing::info!(backup = %listed.id, database = name, "restored");
        Ok(name.to_owned())
    }

    /// Creates `scratch` and restores the backup into it; drops it again on any failure.
    async fn fill_scratch_database(
        &self,
        listed: &Listed,
        admin: &tokio_postgres::Client,
        scratch: &str,
        info: &catalog::DatabaseInfo,
    ) -> Result<(), Error> {
        let sql = |what: &str| {
            let what = what.to_owned();
            move |source| Error::Sql {
                what,
                database: "postgres".into(),
                source,
            }
        };
        let create = format!(
            "CREATE DATABASE {} TEMPLATE template0 ENCODING '{}' LC_COLLATE '{}' LC_CTYPE '{}'",
            quote_ident(scratch),
            info.encoding.replace('\'', "''"),
            info.collate.replace('\'', "''"),
            info.ctype.replace('\'', "''"),
        );
        if let Err(err) = admin.batch_execute(&create).await {
            // The recorded locale may not exist on this machine: fall back to the server's.
            tracing::warn!(error = %err, "creating the database with its recorded locale failed; using the server default");
            admin
                .batch_execute(&format!(
                    "CREATE DATABASE {} TEMPLATE template0",
                    quote_ident(scratch)
                ))
                .await
                .map_err(sql("creating the scratch database"))?;
        }
        let filled = async {
            let server_major = postgres::server_version(admin, "postgres").await? / 10_000;
            let tools = PgTools::find(self.pg_bin_dir, server_major, self.env)?;
            let mut command = tools.command("pg_restore", self.env);
            command
                .args(["--exit-on-error", "--no-password"])
                .args(self.no_owner.then_some("--no-owner"))
                .arg("--dbname")
                .arg(format!("dbname={}", conninfo_quote(scratch)))
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            let mut child = command.spawn().map_err(|source| Error::Spawn {
                program: "pg_restore".into(),
                source,
            })?;
            let mut stdin = child.stdin.take().expect("pg_restore's stdin is piped");
            let mut stderr = child.stderr.take().expect("pg_restore's stderr is piped");
            let errors = std::thread::spawn(move || {
                let mut text = String::new();
                let _ = stderr.read_to_string(&mut text);
                text
            });
            let fed = self
                .stream_plain(listed, &self.spool_dir(), move |plain| {
                    // pg_restore may stop reading early on an error; its status says why.
                    let copied = std::io::copy(plain, &mut stdin);
                    drop(stdin);
                    match copied {
                        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                            Err(Error::pipeline(e))
                        }
                        _ => Ok(()),
                    }
                })
                .await;
            let status = tokio::task::spawn_blocking(move || child.wait())
                .await
                .map_err(|e| Error::Internal(format!("pg_restore task: {e}")))?
                .map_err(Error::pipeline)?;
            let errors = errors.join().unwrap_or_default();
            fed?;
            if !status.success() {
                return Err(Error::Child {
                    program: "pg_restore".into(),
                    status: status.to_string(),
                    stderr: errors.trim().to_owned(),
                });
            }
            for statement in postgres::database_acl_sql(scratch, info) {
                if let Err(err) = admin.batch_execute(&statement).await {
                    tracing::warn!(%statement, error = %err, "could not re-apply a database privilege");
                }
            }
            Ok(())
        };
        match filled.await {
            Ok(()) => Ok(()),
            Err(err) => {
                drop_database(admin, scratch).await;
                Err(err)
            }
        }
    }
}

/// Restores `listed` into scratch space, compares it with the manifest, removes the scratch
/// copy and records the outcome next to the backup.
pub async fn verify(restorer: &Restorer<'_>, listed: &Listed) -> Result<VerifyRecord, Error> {
    // Refused before anything is recorded: a record is for backups this host made, and one
    // in a store written by someone else proves nothing either way.
    let listed = &restorer.authenticate(listed).await?;
    let started = Instant::now();
    let (ok, detail) = match check(restorer, listed).await {
        Ok(detail) => (true, detail),
        Err(Error::VerifyFailed { detail, .. }) => (false, detail),
        Err(err) if is_data_problem(&err) => (false, labcore::exit::chain(&err)),
        // A problem of this machine (no identity, server down) says nothing about the backup.
        Err(err) => return Err(err),
    };
    let record = VerifyRecord {
        verified_at: Timestamp::now(),
        ok,
        detail: detail.clone(),
        duration_ms: started.elapsed().as_millis() as u64,
    };
    let id: BackupId = listed.id.parse().map_err(Error::Internal)?;
    let text = serde_json::to_vec_pretty(&record).map_err(|e| Error::Internal(e.to_string()))?;
    restorer
        .store
        .put_bytes(&format!("{}/{}", id.dir(), catalog::VERIFY), text)
        .await?;
    if ok {
        tracing::info!(backup = %listed.id, %detail, "verified");
        Ok(record)
    } else {
        Err(Error::VerifyFailed {
            id: listed.id.clone(),
            detail,
        })
    }
}

/// Errors that mean the backup itself is bad.
fn is_data_problem(err: &Error) -> bool {
    matches!(
        err,
        Error::Child { .. }
            | Error::Pipeline(_)
            | Error::Archive(_)
            | Error::Decode(pipeline::DecodeError::Header(_) | pipeline::DecodeError::Io(_))
    )
}

async fn check(restorer: &Restorer<'_>, listed: &Listed) -> Result<String, Error> {
    let mismatch = |detail: String| Error::VerifyFailed {
        id: listed.id.clone(),
        detail,
    };
    match &listed.manifest.content {
        Content::Postgres {
            database, tables, ..
        } => {
            let admin = restorer
                .pg()?
                .clone()
                .with_dbname("postgres")
                .connect()
                .await?;
            let scratch = format!("backupd_verify_{:08x}", rand::random::<u32>());
            restorer.check_identity(listed).await?;
            restorer
                .fill_scratch_database(listed, &admin, &scratch, database)
                .await?;
            let counted = async {
                let client = restorer
                    .pg()?
                    .clone()
                    .with_dbname(&scratch)
                    .connect()
                    .await?;
                postgres::count_rows(&client, &scratch).await
            }
            .await;
            drop_database(&admin, &scratch).await;
            let counted = counted?;
            if &counted != tables {
                let differences: Vec<String> = tables
                    .iter()
                    .filter(|t| !counted.contains(t))
                    .map(|t| {
                        let now = counted.iter().find(|c| c.table == t.table).map(|c| c.rows);
                        format!("{}: {} rows recorded, {:?} restored", t.table, t.rows, now)
                    })
                    .take(10)
                    .collect();
                return Err(mismatch(format!(
                    "row counts differ: {}",
                    differences.join("; ")
                )));
            }
            let rows: i64 = tables.iter().map(|t| t.rows).sum();
            Ok(format!(
                "restored into a scratch database: {} tables, {rows} rows match",
                tables.len()
            ))
        }
        Content::Folder { entries } => {
            restorer.check_identity(listed).await?;
            let scratch = tempfile::tempdir().map_err(|source| Error::Io {
                what: "creating a scratch folder".into(),
                source,
            })?;
            let tree = scratch.path().join("tree");
            std::fs::create_dir(&tree).map_err(|source| Error::Io {
                what: format!("creating {}", tree.display()),
                source,
            })?;
            let dest = tree.clone();
            restorer
                .stream_plain(listed, scratch.path(), move |plain| {
                    archive::extract(plain, &dest).map_err(Error::from)
                })
                .await?;
            let problems = archive::compare(&tree, entries);
            if !problems.is_empty() {
                return Err(mismatch(problems.join("; ")));
            }
            let files = entries.iter().filter(|e| e.kind == "file").count();
            Ok(format!(
                "extracted into a scratch folder: {} entries, {files} files match",
                entries.len()
            ))
        }
        Content::Globals { .. } => {
            restorer.check_identity(listed).await?;
            let (size, sha256) = restorer
                .stream_plain(listed, &restorer.spool_dir(), |plain| {
                    let mut hashing = Hashing::new(plain);
                    std::io::copy(&mut hashing, &mut std::io::sink()).map_err(Error::pipeline)?;
                    Ok(hashing.finish())
                })
                .await?;
            let data = &listed.manifest.data;
            if size != data.raw_size || Some(&sha256) != data.raw_sha256.as_ref() {
                return Err(mismatch(format!(
                    "decoded SQL has {size} bytes, sha256 {sha256}; the manifest differs"
                )));
            }
            Ok(format!("decoded {size} bytes of SQL, sha256 matches"))
        }
    }
}

fn parse_identities(
    identity: Option<&Secret>,
) -> Result<Option<Vec<Box<dyn age::Identity>>>, Error> {
    Ok(identity
        .map(|i| pipeline::identities(i.expose()))
        .transpose()?)
}

fn kind(content: &Content) -> &'static str {
    match content {
        Content::Postgres { .. } => "database",
        Content::Globals { .. } => "globals",
        Content::Folder { .. } => "folder",
    }
}

/// Whether a database has no tables, views, sequences or functions of its own.
async fn database_is_empty(pg: &PgSettings, name: &str) -> Result<bool, Error> {
    let client = pg.clone().with_dbname(name).connect().await?;
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
               WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_toast%') \
             + (SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
               WHERE n.nspname NOT IN ('pg_catalog', 'information_schema'))",
            &[],
        )
        .await
        .map_err(|source| Error::Sql {
            what: "checking whether the target is empty".into(),
            database: name.to_owned(),
            source,
        })?;
    Ok(row.get::<_, i64>(0) == 0)
}

async fn drop_database(admin: &tokio_postgres::Client, name: &str) {
    if let Err(err) = admin
        .batch_execute(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            quote_ident(name)
        ))
        .await
    {
        tracing::warn!(database = name, error = %err, "could not drop a scratch database; drop it by hand");
    }
}

/// A scratch database name derived from the target's, within PostgreSQL's 63-byte limit.
fn scratch_name(target: &str) -> String {
    let suffix = format!("_restore_{:08x}", rand::random::<u32>());
    let mut base: String = target.chars().collect();
    while base.len() + suffix.len() > 63 {
        base.pop();
    }
    format!("{base}{suffix}")
}

/// A value quoted for a libpq connection string.
fn conninfo_quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// An empty private (0700) hidden folder beside `path` (same filesystem, so a rename moves
/// what is in it into place).
fn sibling(path: &Path, what: &str) -> Result<PathBuf, Error> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|source| Error::Io {
        what: format!("creating {}", parent.display()),
        source,
    })?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let sibling = parent.join(format!(
        ".{name}.backupd-{what}-{:08x}",
        rand::random::<u32>()
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&sibling)
        .map_err(|source| Error::Io {
            what: format!("creating {}", sibling.display()),
            source,
        })?;
    Ok(sibling)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_names_fit_postgres_limits() {
        let long = "x".repeat(63);
        assert!(scratch_name(&long).len() <= 63);
        assert!(scratch_name("shop").starts_with("shop_restore_"));
        assert_eq!(conninfo_quote("a'b\\c"), "'a\\'b\\\\c'");
    }
}
