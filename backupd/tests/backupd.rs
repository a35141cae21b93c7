//! backupd end to end: the real binary against a real PostgreSQL cluster, a real S3 server and
//! local folders.

use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use testkit::{PgCluster, Proc, ProcBuilder, S3Server, Scratch};

const BACKUPD: &str = env!("CARGO_BIN_EXE_backupd");
const WAIT: Duration = Duration::from_secs(300);

/// A test's world: a cluster (unless only folders are backed up), a scratch folder, and the
/// environment for the binary.
struct Lab {
    cluster: Option<PgCluster>,
    dir: Scratch,
    env: Vec<(OsString, OsString)>,
}

impl Lab {
    fn new() -> Lab {
        let cluster = PgCluster::start().unwrap();
        let dir = Scratch::new("backupd").unwrap();
        let mut env = cluster.env();
        env.push(("HOME".into(), dir.path().into()));
        Lab {
            cluster: Some(cluster),
            dir,
            env,
        }
    }

    /// A lab for folder backups only: no PostgreSQL.
    fn without_postgres() -> Lab {
        let dir = Scratch::new("backupd").unwrap();
        let env = vec![("HOME".into(), dir.path().into())];
        Lab {
            cluster: None,
            dir,
            env,
        }
    }

    fn pg(&self) -> &PgCluster {
        self.cluster.as_ref().expect("this lab runs PostgreSQL")
    }

    fn with_s3(&mut self, server: &S3Server) {
        self.env.extend(server.env());
    }

    /// Writes a config with its own lock file and this lab's signing key (made by `backupd
    /// keygen` on first use).
    fn write_config(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.join(name);
        let lock = self.dir.join(format!("{name}.lock"));
        let key = self.signing_key();
        fs::write(
            &path,
            format!(
                "lock_file = {:?}\n{text}\n[signing]\nkey_file = {:?}\n",
                lock.display().to_string(),
                key.display().to_string()
            ),
        )
        .unwrap();
        path
    }

    /// The lab's signing key file, made with `backupd keygen` if it does not exist yet.
    fn signing_key(&self) -> PathBuf {
        let key = self.dir.join("backupd.sign");
        if !key.exists() {
            let (stdout, _) = self.expect(0, &["keygen", "-o", key.to_str().unwrap()]);
            assert!(stdout.starts_with("backupd-ed25519:"), "{stdout}");
        }
        key
    }

    fn backupd(&self, args: &[&str]) -> Proc {
        ProcBuilder::new(BACKUPD)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .spawn()
            .unwrap()
    }

    /// Runs backupd and expects `code`; returns its stdout.
    fn expect(&self, code: i32, args: &[&str]) -> (String, String) {
        let proc = self.backupd(args);
        proc.expect_exit(code, WAIT).unwrap();
        (proc.stdout(), proc.stderr())
    }

    /// IDs of the backups on one target, from `backupd list`.
    fn ids_on(&self, config: &str, target: &str) -> Vec<String> {
        let (stdout, _) = self.expect(0, &["list", "-c", config, "--target", target]);
        stdout
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_owned)
            .collect()
    }

    fn sql(&self, db: &str, sql: &str) -> String {
        self.pg().psql(db, sql).unwrap()
    }

    /// `pg_dump` of a database as plain SQL, for comparing schema and data.
    fn dump(&self, db: &str) -> String {
        let port = self.pg().port().to_string();
        testkit::proc::run(
            self.pg().bin("pg_dump"),
            &[
                "-h".as_ref(),
                self.pg().socket_dir().as_os_str(),
                "-p".as_ref(),
                port.as_ref(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "--no-comments".as_ref(),
                db.as_ref(),
            ],
            &[],
        )
        .unwrap()
    }
}

/// Asserts two plain dumps are equal, ignoring pg_dump's per-run `\restrict` key; on a
/// difference, shows the first differing line rather than both dumps.
fn assert_same_dump(original: &str, restored: &str, what: &str) {
    let keep = |l: &&str| !l.starts_with("\\restrict ") && !l.starts_with("\\unrestrict ");
    let a: Vec<&str> = original.lines().filter(keep).collect();
    let b: Vec<&str> = restored.lines().filter(keep).collect();
    if let Some(i) = (0..a.len().max(b.len())).find(|&i| a.get(i) != b.get(i)) {
        panic!(
            "{what}: dumps differ at line {}: {:?} vs {:?}",
            i + 1,
            a.get(i),
            b.get(i)
        );
    }
    assert!(a.len() > 20, "{what}: the dump is suspiciously short");
}

fn make_folder(root: &Path) {
    fs::create_dir_all(root.join("repos/lab.git/objects")).unwrap();
    fs::write(root.join("repos/lab.git/HEAD"), "ref: refs/heads/main\n").unwrap();
    let blob: Vec<u8> = (0..200_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    fs::write(root.join("repos/lab.git/objects/pack"), &blob).unwrap();
    fs::write(root.join("app.ini"), "[database]\nDB_TYPE = postgres\n").unwrap();
    fs::set_permissions(root.join("app.ini"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(root.join("scratch.tmp"), "excluded").unwrap();
    fs::write(root.join("empty"), "").unwrap();
    std::os::unix::fs::symlink("app.ini", root.join("config")).unwrap();
    let when = nix::sys::time::TimeSpec::new(1_700_000_000, 0);
    for path in ["app.ini", "repos/lab.git/objects/pack", "repos/lab.git"] {
        nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            &root.join(path),
            &when,
            &when,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .unwrap();
    }
}

/// Every entry under `root` with its kind, mode, mtime and content (or link), sorted.
fn tree(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut pending = vec![root.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = fs::symlink_metadata(&path).unwrap();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            use std::os::unix::fs::MetadataExt;
            let detail = if meta.is_dir() {
                pending.push(path.clone());
                format!("dir {:o} {}", meta.mode() & 0o7777, meta.mtime())
            } else if meta.file_type().is_symlink() {
                format!("link {}", fs::read_link(&path).unwrap().display())
            } else {
                let bytes = fs::read(&path).unwrap();
                format!(
                    "file {:o} {} {} {:x}",
                    meta.mode() & 0o7777,
                    meta.mtime(),
                    bytes.len(),
                    md5ish(&bytes)
                )
            };
            out.push(format!("{rel}: {detail}"));
        }
    }
    out.sort();
    out
}

fn md5ish(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100000001b3)
    })
}

fn ids(stdout: &str) -> Vec<String> {
    stdout.lines().map(str::to_owned).collect()
}

fn age_keys() -> (String, String) {
    let identity = age::x25519::Identity::generate();
    use age::secrecy::ExposeSecret;
    (
        identity.to_string().expose_secret().to_owned(),
        identity.to_public().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn lab_databases_and_a_folder_restore_identically_from_s3_and_a_local_folder() {
    let mut lab = Lab::new();
    let s3 = S3Server::start().unwrap();
    let bucket = s3.bucket().await.unwrap();
    lab.with_s3(&s3);
    for db in ["ci", "dw", "gitea", "jupyterhub", "metabase"] {
        lab.sql("postgres", &format!("CREATE DATABASE {db}"));
        lab.sql(
            db,
            &format!(
                "CREATE TABLE items (id serial PRIMARY KEY, name text NOT NULL, digest text); \
                 INSERT INTO items (name, digest) SELECT '{db}-' || g, md5(g::text) FROM generate_series(1, 500) g; \
                 CREATE INDEX ON items (digest); CREATE VIEW recent AS SELECT * FROM items WHERE id > 400; \
                 REVOKE ALL ON DATABASE {db} FROM PUBLIC"
            ),
        );
    }
    let port = lab.pg().port().to_string();
    testkit::proc::run(
        lab.pg().bin("pgbench"),
        &["-i", "-s", "20", "-q", "-h"]
            .map(OsString::from)
            .iter()
            .map(|s| s.as_os_str())
            .chain([
                lab.pg().socket_dir().as_os_str(),
                "-p".as_ref(),
                port.as_ref(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "dw".as_ref(),
            ])
            .collect::<Vec<_>>(),
        &[],
    )
    .unwrap();
    let folder = lab.dir.join("gitea-data");
    make_folder(&folder);
    let (identity, recipient) = age_keys();
    let identity_file = lab.dir.join("backup.key");
    fs::write(&identity_file, &identity).unwrap();
    fs::set_permissions(&identity_file, fs::Permissions::from_mode(0o600)).unwrap();
    let config = lab.write_config(
        "backupd.toml",
        &format!(
            r#"
[[source]]
name = "lab"
type = "postgres"
databases = ["ci", "dw", "gitea", "jupyterhub", "metabase"]

[[source]]
name = "gitea-data"
type = "folder"
path = "gitea-data"
exclude = ["*.tmp"]

[[target]]
name = "s3"
url = "s3://{bucket}/nightly"

[[target]]
name = "disk"
url = "local-backups"

[encryption]
recipients = ["{recipient}"]
identity_file = "backup.key"
"#
        ),
    );
    let config = config.to_str().unwrap();
    let (stdout, _) = lab.expect(0, &["run", "-c", config]);
    let made = ids(&stdout);
    assert_eq!(made.len(), 12, "6 items to 2 targets: {made:?}");

    let (listing, _) = lab.expect(0, &["list", "-c", config, "--format", "json"]);
    assert_eq!(listing.lines().count(), 12, "{listing}");

    // Every database restored from S3 (the first target) dumps identically.
    for db in ["ci", "dw", "gitea", "jupyterhub", "metabase"] {
        let id = made
            .iter()
            .find(|i| i.starts_with(&format!("lab.{db}@")))
            .unwrap();
        let copy = format!("{db}_restored");
        lab.expect(
            0,
            &[
                "restore", "-c", config, id, "--to-db", &copy, "--target", "s3",
            ],
        );
        assert_same_dump(&lab.dump(db), &lab.dump(&copy), db);
        let acl = lab.sql(
            "postgres",
            &format!("SELECT datacl::text FROM pg_database WHERE datname = '{copy}'"),
        );
        assert!(
            !acl.contains("=Tc/"),
            "PUBLIC's database privileges stay revoked: {acl}"
        );
    }
    // And from the local folder too (each target holds its own backups, with their own IDs).
    let on_disk = lab.ids_on(config, "disk");
    assert_eq!(on_disk.len(), 6);
    let id = on_disk.iter().find(|i| i.starts_with("lab.dw@")).unwrap();
    lab.expect(
        0,
        &[
            "restore",
            "-c",
            config,
            id,
            "--to-db",
            "dw_from_disk",
            "--target",
            "disk",
        ],
    );
    assert_same_dump(&lab.dump("dw"), &lab.dump("dw_from_disk"), "dw from disk");
    assert_eq!(
        lab.sql("dw_from_disk", "SELECT count(*) FROM pgbench_accounts")
            .trim(),
        "2000000"
    );

    // The folder comes back with contents, modes and mtimes.
    for target in ["s3", "disk"] {
        let on_target = lab.ids_on(config, target);
        let id = on_target
            .iter()
            .find(|i| i.starts_with("gitea-data@"))
            .unwrap();
        let dest = lab.dir.join(format!("restored-{target}"));
        lab.expect(
            0,
            &[
                "restore",
                "-c",
                config,
                id,
                "--to-dir",
                dest.to_str().unwrap(),
                "--target",
                target,
            ],
        );
        let mut expected = tree(&folder);
        expected.retain(|line| !line.starts_with("scratch.tmp"));
        assert_eq!(tree(&dest), expected, "{target}");
    }

    // A restore onto a non-empty target is refused without --force.
    let id = made.iter().find(|i| i.starts_with("gitea-data@")).unwrap();
    let (_, stderr) = lab.expect(
        73,
        &[
            "restore",
            "-c",
            config,
            id,
            "--to-dir",
            folder.to_str().unwrap(),
        ],
    );
    assert!(stderr.contains("--force"), "{stderr}");
    let id = made.iter().find(|i| i.starts_with("lab.ci@")).unwrap();
    lab.expect(73, &["restore", "-c", config, id, "--to-db", "ci"]);
    lab.expect(
        0,
        &["restore", "-c", config, id, "--to-db", "ci", "--force"],
    );
}

/// A one-database lab with a small table, and a config backing it up to a local folder.
fn small_lab(extra: &str) -> (Lab, PathBuf) {
    let lab = Lab::new();
    lab.sql("postgres", "CREATE DATABASE shop");
    lab.sql("shop", "CREATE TABLE orders AS SELECT g AS id, md5(g::text) AS note FROM generate_series(1, 20000) g");
    let config = lab.write_config(
        "backupd.toml",
        &format!("[[source]]\nname = \"shop\"\ntype = \"postgres\"\ndatabases = [\"shop\"]\n\n[[target]]\nname = \"disk\"\nurl = \"backups\"\n{extra}"),
    );
    (lab, config)
}

/// Files under a folder (recursively), relative, sorted.
fn files_under(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut pending = vec![root.to_owned()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                out.push(path.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn encrypted_backups_are_unreadable_without_the_identity_and_restores_touch_nothing() {
    let (identity, recipient) = age_keys();
    let (lab, config) = small_lab(&format!("[encryption]\nrecipients = [\"{recipient}\"]\n"));
    let config = config.to_str().unwrap();
    let (stdout, _) = lab.expect(0, &["run", "-c", config]);
    let id = stdout.trim().to_owned();
    let data = files_under(&lab.dir.join("backups"))
        .into_iter()
        .find(|f| f.ends_with(".age"))
        .expect("an encrypted data object");
    let bytes = fs::read(lab.dir.join("backups").join(&data)).unwrap();
    assert!(
        bytes.starts_with(b"age-encryption.org/v1\n"),
        "stored bytes start with the age header"
    );
    assert!(
        !bytes.windows(5).any(|w| w == b"PGDMP"),
        "no plaintext dump inside"
    );

    let (_, stderr) = lab.expect(64, &["restore", "-c", config, &id, "--to-db", "shop_copy"]);
    assert!(stderr.contains("encrypted"), "{stderr}");
    let (other, _) = age_keys();
    let wrong = lab.dir.join("wrong.key");
    fs::write(&wrong, other).unwrap();
    let (_, stderr) = lab.expect(
        77,
        &[
            "restore",
            "-c",
            config,
            &id,
            "--to-db",
            "shop_copy",
            "--identity",
            wrong.to_str().unwrap(),
        ],
    );
    assert!(stderr.contains("does not decrypt"), "{stderr}");
    assert_eq!(
        lab.sql(
            "postgres",
            "SELECT count(*) FROM pg_database WHERE datname LIKE 'shop_%'"
        )
        .trim(),
        "0"
    );
    let dump_file = lab.dir.join("out.dump");
    lab.expect(
        77,
        &[
            "restore",
            "-c",
            config,
            &id,
            "--to-file",
            dump_file.to_str().unwrap(),
            "--identity",
            wrong.to_str().unwrap(),
        ],
    );
    assert!(!dump_file.exists());

    let right = lab.dir.join("right.key");
    fs::write(&right, identity).unwrap();
    fs::set_permissions(&right, fs::Permissions::from_mode(0o600)).unwrap();
    lab.expect(
        0,
        &[
            "restore",
            "-c",
            config,
            &id,
            "--to-db",
            "shop_copy",
            "--identity",
            right.to_str().unwrap(),
        ],
    );
    assert_eq!(
        lab.sql("shop_copy", "SELECT count(*) FROM orders").trim(),
        "20000"
    );
}

#[test]
fn a_missing_database_fails_without_a_manifest_runs_on_failure_and_keeps_older_backups() {
    let (lab, config) = small_lab("");
    let config_text = fs::read_to_string(&config).unwrap();
    let hook_out = lab.dir.join("hook.txt");
    fs::write(
        &config,
        format!(
            "{config_text}\n[[source]]\nname = \"ghost\"\ntype = \"postgres\"\ndatabases = [\"nope\"]\n\n[retention]\nkeep_last = 1\n\n\
             [hooks]\non_failure = [\"/bin/sh\", \"-c\", \"echo \\\"$BACKUPD_STATUS: $BACKUPD_REASON\\\" > {}\"]\n",
            hook_out.display()
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let (first, _) = lab.expect(0, &["run", "-c", config, "--source", "shop"]);
    let (_, stderr) = lab.expect(1, &["run", "-c", config]);
    assert!(stderr.contains("1 of 2 backups failed"), "{stderr}");
    assert!(stderr.contains("\"nope\""), "{stderr}");
    let hook = fs::read_to_string(&hook_out).unwrap();
    assert!(hook.starts_with("failure: ghost.nope to disk"), "{hook}");
    // Nothing was pruned despite keep_last = 1, and no trace of the failed backup exists.
    let listed = lab.ids_on(config, "disk");
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(listed.contains(&first.trim().to_owned()));
    assert!(
        !files_under(&lab.dir.join("backups"))
            .iter()
            .any(|f| f.starts_with("ghost"))
    );
}

#[test]
fn a_wrong_password_is_permission_denied() {
    let (mut lab, config) = small_lab("");
    lab.env.retain(|(k, _)| k != "PGHOST");
    lab.env.push(("PGHOST".into(), "127.0.0.1".into()));
    lab.env
        .push(("PGPASSWORD".into(), "not-the-password".into()));
    let (_, stderr) = lab.expect(77, &["run", "-c", config.to_str().unwrap()]);
    assert!(
        stderr.contains("password authentication failed"),
        "{stderr}"
    );
    assert!(!stderr.contains("not-the-password"));
    assert!(files_under(&lab.dir.join("backups")).is_empty());
}

/// A bin folder with the cluster's programs, where `pg_dump` is replaced by `script`.
fn fake_bin(lab: &Lab, script: &str) -> PathBuf {
    let bin = lab.dir.join("bin");
    fs::create_dir(&bin).unwrap();
    for entry in fs::read_dir(lab.pg().bin_dir()).unwrap().flatten() {
        if entry.file_name() != "pg_dump" {
            std::os::unix::fs::symlink(entry.path(), bin.join(entry.file_name())).unwrap();
        }
    }
    let real = lab.pg().bin("pg_dump");
    fs::write(
        bin.join("pg_dump"),
        format!("#!/bin/sh\nREAL={}\n{script}", real.display()),
    )
    .unwrap();
    fs::set_permissions(bin.join("pg_dump"), fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

#[test]
fn pg_dump_killed_mid_stream_leaves_no_backup() {
    let (lab, config) = small_lab("");
    // Passes --version through; otherwise dies by SIGKILL after 5,000 bytes of a real dump.
    let bin = fake_bin(
        &lab,
        "case \"$1\" in --version) exec \"$REAL\" --version;; esac\n\"$REAL\" \"$@\" | head -c 5000\nkill -9 $$\n",
    );
    let text = fs::read_to_string(&config).unwrap();
    fs::write(
        &config,
        format!(
            "{text}\n[postgres]\nbin_dir = {:?}\n",
            bin.display().to_string()
        ),
    )
    .unwrap();
    let (_, stderr) = lab.expect(69, &["run", "-c", config.to_str().unwrap()]);
    assert!(stderr.contains("pg_dump failed"), "{stderr}");
    assert!(
        files_under(&lab.dir.join("backups")).is_empty(),
        "{:?}",
        files_under(&lab.dir.join("backups"))
    );
}

#[test]
fn a_second_run_exits_75_naming_the_lock_holder() {
    let (lab, config) = small_lab("");
    let lock_path = lab.dir.join("backupd.toml.lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .unwrap();
    let mut held =
        nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).unwrap();
    use std::io::Write;
    held.write_all(b"pid 4242 since 2026-11-25T03:15:00Z\n")
        .unwrap();
    let (_, stderr) = lab.expect(75, &["run", "-c", config.to_str().unwrap()]);
    assert!(stderr.contains("pid 4242"), "{stderr}");
    drop(held);
    lab.expect(0, &["run", "-c", config.to_str().unwrap()]);
}

#[test]
fn a_corrupted_object_fails_verify_naming_it() {
    let (lab, config) = small_lab("");
    let config = config.to_str().unwrap();
    let (stdout, _) = lab.expect(0, &["run", "-c", config]);
    let id = stdout.trim().to_owned();
    let (out, _) = lab.expect(0, &["verify", "-c", config, &id]);
    assert!(out.contains("20000 rows match"), "{out}");
    let data = files_under(&lab.dir.join("backups"))
        .into_iter()
        .find(|f| f.contains("data.pgdump"))
        .unwrap();
    let path = lab.dir.join("backups").join(&data);
    let mut bytes = fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    fs::write(&path, bytes).unwrap();
    let (out, stderr) = lab.expect(65, &["verify", "-c", config, &id]);
    assert!(
        out.contains("FAILED") && stderr.contains(&id),
        "{out}\n{stderr}"
    );
    let (listing, _) = lab.expect(0, &["list", "-c", config]);
    assert!(
        listing.contains("FAILED"),
        "the failed check is recorded: {listing}"
    );
}

#[test]
fn retention_prunes_after_success_and_keeps_the_newest_verified() {
    let (lab, config) = small_lab("[retention]\nkeep_last = 1\n");
    let config = config.to_str().unwrap();
    for _ in 0..3 {
        lab.expect(0, &["run", "-c", config]);
    }
    let listed = lab.ids_on(config, "disk");
    assert_eq!(listed.len(), 1, "{listed:?}");
    lab.expect(0, &["verify", "-c", config, "--latest"]);
    let verified = listed[0].clone();
    lab.expect(0, &["run", "-c", config]);
    lab.expect(0, &["run", "-c", config]);
    let listed = lab.ids_on(config, "disk");
    assert_eq!(
        listed.len(),
        2,
        "the newest and the newest verified: {listed:?}"
    );
    assert!(listed.contains(&verified));
    let (plan, _) = lab.expect(0, &["prune", "-c", config, "--dry-run"]);
    assert!(plan.trim().is_empty(), "{plan}");
}

#[test]
fn disk_full_on_a_local_target_leaves_no_partial_file() {
    let lab = Lab::new();
    let target = lab.dir.join("tiny");
    fs::create_dir(&target).unwrap();
    let mount = testkit::proc::run(
        "mount",
        &[
            "-t".as_ref(),
            "tmpfs".as_ref(),
            "-o".as_ref(),
            "size=256k".as_ref(),
            "tmpfs".as_ref(),
            target.as_os_str(),
        ],
        &[],
    );
    mount.unwrap();
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = testkit::proc::run("umount", &[self.0.as_os_str()], &[]);
        }
    }
    let _unmount = Unmount(target.clone());
    let folder = lab.dir.join("data");
    fs::create_dir(&folder).unwrap();
    let mut noise = vec![0u8; 2_000_000];
    use std::io::Read;
    fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut noise)
        .unwrap();
    fs::write(folder.join("noise.bin"), noise).unwrap();
    let config = lab.write_config(
        "backupd.toml",
        "compression = 1\n[[source]]\nname = \"data\"\ntype = \"folder\"\npath = \"data\"\n\n[[target]]\nname = \"tiny\"\nurl = \"tiny\"\n",
    );
    let (_, stderr) = lab.expect(73, &["run", "-c", config.to_str().unwrap()]);
    assert!(stderr.contains("No space left"), "{stderr}");
    assert!(
        files_under(&target).is_empty(),
        "{:?}",
        files_under(&target)
    );
}

#[test]
fn globals_and_folders_verify_and_restore_to_a_file() {
    let lab = Lab::new();
    lab.sql("postgres", "CREATE ROLE metabase LOGIN");
    let folder = lab.dir.join("files");
    make_folder(&folder);
    let config = lab.write_config(
        "backupd.toml",
        "[[source]]\nname = \"globals\"\ntype = \"globals\"\n\n[[source]]\nname = \"files\"\ntype = \"folder\"\npath = \"files\"\n\n[[target]]\nname = \"disk\"\nurl = \"backups\"\n\n[verify]\nafter_run = true\n",
    );
    let config = config.to_str().unwrap();
    let (stdout, _) = lab.expect(0, &["run", "-c", config]);
    let globals = stdout.lines().find(|l| l.starts_with("globals@")).unwrap();
    let (listing, _) = lab.expect(0, &["list", "-c", config]);
    assert_eq!(
        listing.matches(" yes").count(),
        2,
        "both verified after the run: {listing}"
    );
    let sql = lab.dir.join("globals.sql");
    lab.expect(
        0,
        &[
            "restore",
            "-c",
            config,
            globals,
            "--to-file",
            sql.to_str().unwrap(),
        ],
    );
    assert!(
        fs::read_to_string(&sql)
            .unwrap()
            .contains("CREATE ROLE metabase")
    );
    let (_, stderr) = lab.expect(64, &["restore", "-c", config, globals, "--to-db", "x"]);
    assert!(stderr.contains("--to-file"), "{stderr}");
}

#[tokio::test]
async fn hooks_and_healthchecks_report_success() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (lab, config) = small_lab("");
    let hook_out = lab.dir.join("hook.txt");
    let text = fs::read_to_string(&config).unwrap();
    fs::write(
        &config,
        format!(
            "{text}\n[hooks]\nhealthcheck_url = \"http://127.0.0.1:{port}/ping/abc\"\non_success = \"echo $BACKUPD_STATUS $BACKUPD_BACKUPS > {}\"\n",
            hook_out.display()
        ),
    )
    .unwrap();
    let server = tokio::spawn(async move {
        let mut requests = Vec::new();
        for _ in 0..2 {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = socket.read(&mut buf).await.unwrap();
            let head = String::from_utf8_lossy(&buf[..n])
                .lines()
                .next()
                .unwrap_or("")
                .to_owned();
            socket
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nOK")
                .await
                .unwrap();
            requests.push(head);
        }
        requests
    });
    let proc = lab.backupd(&["run", "-c", config.to_str().unwrap()]);
    let status =
        tokio::task::spawn_blocking(move || proc.expect_exit(0, WAIT).map(|_| proc.stdout()))
            .await
            .unwrap();
    let id = status.unwrap();
    let requests = server.await.unwrap();
    assert_eq!(
        requests,
        ["POST /ping/abc/start HTTP/1.1", "POST /ping/abc HTTP/1.1"]
    );
    assert_eq!(
        fs::read_to_string(&hook_out).unwrap().trim(),
        format!("success {}", id.trim())
    );
}

#[test]
fn the_daemon_is_ready_reloads_and_stops_cleanly() {
    let (lab, config) = small_lab("[schedule]\nat = [\"03:15\"]\n");
    let daemon = ProcBuilder::new(BACKUPD)
        .args(["daemon", "-c", config.to_str().unwrap()])
        .envs(lab.env.iter().map(|(k, v)| (k, v)))
        .notify()
        .spawn()
        .unwrap();
    daemon.wait_ready(WAIT).unwrap();
    let text = fs::read_to_string(&config).unwrap();
    fs::write(&config, text.replace("03:15", "99:99")).unwrap();
    daemon.signal(nix::sys::signal::Signal::SIGHUP).unwrap();
    daemon.wait_notification("RELOADING=1", WAIT).unwrap();
    daemon.wait_ready(WAIT).unwrap();
    daemon.wait_stderr("keeping the old one", WAIT).unwrap();
    daemon.stop(WAIT).unwrap();
    assert!(daemon.notifications().iter().any(|n| n == "STOPPING=1"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_store_that_dies_mid_upload_leaves_no_backup() {
    let mut lab = Lab::new();
    let mut s3 = S3Server::start().unwrap();
    let bucket = s3.bucket().await.unwrap();
    lab.with_s3(&s3);
    lab.sql("postgres", "CREATE DATABASE shop");
    let started = lab.dir.join("started");
    let go = lab.dir.join("go");
    for fifo in [&started, &go] {
        nix::unistd::mkfifo(fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    }
    // 12 MB of noise (more than one 8 MiB part), then wait for the test to kill the store.
    let bin = fake_bin(
        &lab,
        &format!(
            "case \"$1\" in --version) exec \"$REAL\" --version;; esac\n\
             head -c 12000000 /dev/urandom\necho started > {}\ncat {} > /dev/null\nhead -c 1000 /dev/urandom\n",
            started.display(),
            go.display()
        ),
    );
    let config = lab.write_config(
        "backupd.toml",
        &format!(
            "[[source]]\nname = \"shop\"\ntype = \"postgres\"\ndatabases = [\"shop\"]\n\n[[target]]\nname = \"s3\"\nurl = \"s3://{bucket}/b\"\n\n[postgres]\nbin_dir = {:?}\n",
            bin.display().to_string()
        ),
    );
    let run = lab.backupd(&["run", "-c", config.to_str().unwrap()]);
    let started_fifo = started.clone();
    tokio::task::spawn_blocking(move || fs::read_to_string(started_fifo).unwrap())
        .await
        .unwrap();
    s3.kill().unwrap();
    let go_fifo = go.clone();
    tokio::task::spawn_blocking(move || fs::write(go_fifo, "go\n").unwrap())
        .await
        .unwrap();
    let run = tokio::task::spawn_blocking(move || run.expect_exit(69, WAIT).map(|_| run.stderr()))
        .await
        .unwrap();
    let stderr = run.unwrap();
    assert!(
        stderr.contains(&format!("s3://{bucket}/b/shop.shop/")),
        "{stderr}"
    );
    s3.restart().unwrap();
    let listed = s3
        .client()
        .await
        .list_objects_v2()
        .bucket(&bucket)
        .send()
        .await
        .unwrap();
    assert_eq!(
        listed.key_count(),
        Some(0),
        "no data object and no manifest: {:?}",
        listed.contents()
    );
}

#[test]
fn an_empty_database_backs_up_verifies_and_restores() {
    // A service's database right after `pgprov create`: no tables, no objects at all.
    let (lab, config) = small_lab("");
    lab.sql("postgres", "CREATE DATABASE fresh");
    let text = fs::read_to_string(&config).unwrap().replace(
        "databases = [\"shop\"]",
        "databases = [\"shop\", \"fresh\"]",
    );
    fs::write(&config, text).unwrap();
    let config = config.to_str().unwrap();
    let (stdout, stderr) = lab.expect(0, &["run", "-c", config]);
    let fresh: Vec<String> = ids(&stdout)
        .into_iter()
        .filter(|id| id.starts_with("shop.fresh@"))
        .collect();
    assert_eq!(fresh.len(), 1, "{stdout}\n{stderr}");
    lab.expect(0, &["verify", "-c", config, &fresh[0]]);
    lab.expect(
        0,
        &["restore", "-c", config, &fresh[0], "--to-db", "fresh_copy"],
    );
    assert_eq!(
        lab.sql(
            "postgres",
            "SELECT count(*) FROM pg_database WHERE datname = 'fresh_copy'"
        ),
        "1\n"
    );
}

#[test]
fn every_backupd_example_checks() {
    // No libpq or S3 variables at all, and nothing listening: check reads only files.
    let folder = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/backupd");
    let mut checked = 0;
    for entry in std::fs::read_dir(&folder).unwrap() {
        let path = entry.unwrap().path();
        let proc = ProcBuilder::new(BACKUPD)
            .args(["check", "-c", path.to_str().unwrap()])
            .spawn()
            .unwrap();
        proc.expect_exit(0, WAIT)
            .unwrap_or_else(|e| panic!("{}: {e}: {}", path.display(), proc.stderr()));
        if path.ends_with("backupd.toml") {
            let out = proc.stdout();
            for source in ["lab", "globals", "gitea-data"] {
                assert!(out.contains(&format!("source {source}:")), "{out}");
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 1, "the lab's backupd.toml is there");
}

/// A folder source backed up to a local folder: no PostgreSQL, no S3.
/// `extra` is appended as tables; the config signs with a key of its own, made by `backupd
/// keygen` in `dir`.
fn folder_only(dir: &Scratch, extra: &str) -> PathBuf {
    make_folder(&dir.join("data"));
    let key = dir.join("signing.key");
    backupd_alone(&["keygen", "-o", key.to_str().unwrap()])
        .expect_exit(0, WAIT)
        .unwrap();
    let path = dir.join("backupd.toml");
    fs::write(
        &path,
        format!(
            "lock_file = \"backupd.lock\"\n\n[[source]]\nname = \"files\"\ntype = \"folder\"\n\
             path = \"data\"\n\n[[target]]\nname = \"disk\"\nurl = \"backups\"\n{extra}\n\
             [signing]\nkey_file = \"signing.key\"\n"
        ),
    )
    .unwrap();
    path
}

fn backupd_alone(args: &[&str]) -> Proc {
    ProcBuilder::new(BACKUPD).args(args).spawn().unwrap()
}

#[test]
fn list_into_a_closed_pipe_exits_quietly() {
    let dir = Scratch::new("backupd-pipe").unwrap();
    let config = folder_only(&dir, "");
    let config = config.to_str().unwrap();
    for _ in 0..2 {
        backupd_alone(&["run", "-c", config])
            .expect_exit(0, WAIT)
            .unwrap();
    }
    for format in ["text", "json"] {
        // `backupd list | head -0`: the reader is gone before the first line is written.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let output = std::process::Command::new(BACKUPD)
            .args(["list", "-c", config, "--format", format])
            .stdout(writer)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(0), "{format}: {stderr}");
        assert!(!stderr.contains("error"), "{format}: {stderr}");
    }
}

#[test]
fn the_healthcheck_url_is_never_logged_whole() {
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    // Refuse both pings (start, success), so backupd logs them as warnings.
    let refuser = std::thread::spawn(move || {
        let mut heads = Vec::new();
        for _ in 0..2 {
            let (mut socket, _) = server.accept().unwrap();
            let mut buf = vec![0u8; 4096];
            let n = std::io::Read::read(&mut socket, &mut buf).unwrap();
            heads.push(
                String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_owned(),
            );
            std::io::Write::write_all(
                &mut socket,
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            )
            .unwrap();
        }
        heads
    });
    let dir = Scratch::new("backupd-hc").unwrap();
    let secret = "0b5e7d4c-secret-check-token";
    let config = folder_only(
        &dir,
        &format!("\n[hooks]\nhealthcheck_url = \"http://127.0.0.1:{port}/ping/{secret}\"\n"),
    );
    let run = backupd_alone(&[
        "run",
        "-c",
        config.to_str().unwrap(),
        "--log-level",
        "debug",
    ]);
    run.expect_exit(0, WAIT).unwrap();
    let heads = refuser.join().unwrap();
    assert_eq!(heads[0], format!("POST /ping/{secret}/start HTTP/1.1"));
    let stderr = run.stderr();
    assert!(stderr.contains("healthcheck ping refused"), "{stderr}");
    assert!(stderr.contains(&format!("127.0.0.1:{port}")), "{stderr}");
    assert!(!stderr.contains(secret), "{stderr}");
    assert!(!stderr.contains("/ping"), "{stderr}");

    let check = backupd_alone(&["check", "-c", config.to_str().unwrap()]);
    check.expect_exit(0, WAIT).unwrap();
    assert!(!check.stdout().contains(secret), "{}", check.stdout());
    let bad = dir.join("bad.toml");
    fs::write(
        &bad,
        format!(
            "{}\n[hooks]\nhealthcheck_url = \"ftp://hc.example/{secret}\"\n",
            "[[source]]\nname = \"a\"\ntype = \"globals\"\n"
        ),
    )
    .unwrap();
    let check = backupd_alone(&["check", "-c", bad.to_str().unwrap()]);
    check.expect_exit(78, WAIT).unwrap();
    assert!(
        check.stderr().contains("hooks.healthcheck_url"),
        "{}",
        check.stderr()
    );
    assert!(!check.stderr().contains(secret), "{}", check.stderr());
}

#[test]
fn sources_whose_backups_would_share_a_subject_are_refused_naming_both() {
    let dir = Scratch::new("backupd-subjects").unwrap();
    let cases = [
        (
            "[[source]]\nname = \"pg\"\ntype = \"postgres\"\ndatabases = [\"app\"]\n\
             [[source]]\nname = \"pg.app\"\ntype = \"folder\"\npath = \"/srv\"\n",
            ["source \"pg\"", "source \"pg.app\""],
        ),
        (
            "[[source]]\nname = \"pg.app\"\ntype = \"globals\"\n\
             [[source]]\nname = \"pg\"\ntype = \"postgres\"\ndatabases = [\"app\"]\n",
            ["source \"pg.app\"", "source \"pg\""],
        ),
        (
            "[[source]]\nname = \"a\"\ntype = \"postgres\"\ndatabases = [\"b.c\"]\n\
             [[source]]\nname = \"a.b\"\ntype = \"postgres\"\ndatabases = [\"c\"]\n",
            ["source \"a\"", "source \"a.b\""],
        ),
        (
            "[[source]]\nname = \"pg\"\ntype = \"postgres\"\ndatabases = \"all\"\n\
             [[source]]\nname = \"pg.files\"\ntype = \"folder\"\npath = \"/srv\"\n",
            ["source \"pg\"", "source \"pg.files\""],
        ),
        (
            "[[source]]\nname = \"pg\"\ntype = \"postgres\"\ndatabases = [\"app\", \"app\"]\n",
            ["source \"pg\"", "\"app\""],
        ),
    ];
    for (i, (text, names)) in cases.iter().enumerate() {
        let path = dir.join(format!("case{i}.toml"));
        fs::write(&path, text).unwrap();
        let check = backupd_alone(&["check", "-c", path.to_str().unwrap()]);
        check.expect_exit(78, WAIT).unwrap();
        let stderr = check.stderr();
        for name in names {
            assert!(stderr.contains(name), "case {i}: {stderr}");
        }
        assert!(
            stderr.contains(&path.display().to_string()),
            "case {i}: {stderr}"
        );
    }
}

// Attacks on restore: a bucket (or folder target) written by someone else.

/// A folder backup on a local folder target, encrypted, with what a forger would read.
struct FolderBackup {
    lab: Lab,
    config: String,
    id: String,
    /// The backup's folder on the target.
    dir: PathBuf,
    /// The age recipient printed in the manifest.
    recipient: age::x25519::Recipient,
}

fn folder_backup() -> FolderBackup {
    let lab = Lab::without_postgres();
    make_folder(&lab.dir.join("files"));
    let (identity, recipient) = age_keys();
    let key = lab.dir.join("backup.key");
    fs::write(&key, identity).unwrap();
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
    let config = lab.write_config(
        "backupd.toml",
        &format!(
            "[[source]]\nname = \"files\"\ntype = \"folder\"\npath = \"files\"\n\n\
             [[target]]\nname = \"disk\"\nurl = \"backups\"\n\n\
             [encryption]\nrecipients = [\"{recipient}\"]\nidentity_file = \"backup.key\"\n"
        ),
    );
    let config = config.to_str().unwrap().to_owned();
    let (stdout, _) = lab.expect(0, &["run", "-c", &config]);
    let id = stdout.trim().to_owned();
    let (subject, stamp) = id.rsplit_once('@').unwrap();
    let dir = lab.dir.join("backups").join(subject).join(stamp);
    FolderBackup {
        recipient: recipient.parse().unwrap(),
        lab,
        config,
        id,
        dir,
    }
}

impl FolderBackup {
    /// Runs backupd; returns its exit code, stdout and stderr.
    fn run(&self, args: &[&str]) -> (i32, String, String) {
        let proc = self.lab.backupd(args);
        let status = proc.wait_exit(WAIT).unwrap();
        (status.code().unwrap_or(-1), proc.stdout(), proc.stderr())
    }

    fn manifest(&self) -> serde_json::Value {
        serde_json::from_slice(&fs::read(self.dir.join("manifest.json")).unwrap()).unwrap()
    }

    fn data_path(&self) -> PathBuf {
        self.dir
            .join(self.manifest()["data"]["object"].as_str().unwrap())
    }

    /// Signs the manifest as it is now with the key in `key_file`, as `run` does.
    fn sign_with(&self, key_file: &Path) {
        let key =
            backupd::signing::SigningKey::parse(&fs::read_to_string(key_file).unwrap()).unwrap();
        let manifest = fs::read(self.dir.join("manifest.json")).unwrap();
        fs::write(self.dir.join("manifest.sig"), key.sign(&manifest)).unwrap();
    }

    /// Replaces the data object with `tar`, compressed and encrypted as backupd does; with
    /// `update_manifest`, also rewrites the manifest's sizes and hashes to match, as a forger
    /// who can write the bucket would.
    fn forge(&self, tar: &[u8], update_manifest: bool) {
        let compressed = zstd::encode_all(tar, 3).unwrap();
        let recipients = [&self.recipient as &dyn age::Recipient];
        let encryptor = age::Encryptor::with_recipients(recipients.into_iter()).unwrap();
        let mut stored = Vec::new();
        let mut writer = encryptor.wrap_output(&mut stored).unwrap();
        std::io::Write::write_all(&mut writer, &compressed).unwrap();
        writer.finish().unwrap();
        fs::write(self.data_path(), &stored).unwrap();
        if update_manifest {
            let mut manifest = self.manifest();
            manifest["data"]["size"] = stored.len().into();
            manifest["data"]["sha256"] = sha256_hex(&stored).into();
            manifest["data"]["raw_size"] = tar.len().into();
            manifest["data"]["raw_sha256"] = sha256_hex(tar).into();
            manifest["content"]["entries"] = serde_json::json!([]);
            fs::write(
                self.dir.join("manifest.json"),
                serde_json::to_vec_pretty(&manifest).unwrap(),
            )
            .unwrap();
        }
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A tar built header by header with the paths written raw (the tar crate's own setters
/// refuse `..` and absolute paths, which is what these tests need to send): (path, type,
/// link target, contents). Every entry claims mode 0777 and owner 4242:4242.
fn raw_tar(entries: &[(&str, tar::EntryType, &str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, kind, link, data) in entries {
        let mut header = tar::Header::new_gnu();
        header.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
        header.set_entry_type(*kind);
        header.set_mode(0o777);
        header.set_uid(4242);
        header.set_gid(4242);
        header.set_mtime(1_700_000_000);
        header.set_size(data.len() as u64);
        header.set_link_name_literal(link).unwrap();
        header.set_cksum();
        builder.append(&header, *data).unwrap();
    }
    builder.into_inner().unwrap()
}

/// The issue's archive: a symlink `x -> outside`, then folders `x/` and `x/planted/`.
fn planting_tar(outside: &Path) -> Vec<u8> {
    use tar::EntryType;
    raw_tar(&[
        ("x", EntryType::Symlink, outside.to_str().unwrap(), b""),
        ("x/", EntryType::Directory, "", b""),
        ("x/planted/", EntryType::Directory, "", b""),
    ])
}

/// A folder outside every restore target, root's with mode 0750, that the archives aim at.
fn outside_folder(lab: &Lab) -> PathBuf {
    let outside = lab.dir.join("outside");
    fs::create_dir(&outside).unwrap();
    fs::set_permissions(&outside, fs::Permissions::from_mode(0o750)).unwrap();
    outside
}

fn assert_untouched(outside: &Path) {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::symlink_metadata(outside).unwrap();
    assert_eq!(meta.mode() & 0o7777, 0o750, "mode of {}", outside.display());
    assert_eq!(
        (meta.uid(), meta.gid()),
        (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw()
        ),
        "owner of {}",
        outside.display()
    );
    let inside: Vec<_> = fs::read_dir(outside).unwrap().flatten().collect();
    assert!(
        inside.is_empty(),
        "planted in {}: {inside:?}",
        outside.display()
    );
}

/// Nothing was left beside a restore target: no target, no staging folder, no spool file.
fn assert_nothing_beside(target: &Path) {
    let parent = target.parent().unwrap();
    let name = target.file_name().unwrap().to_str().unwrap();
    let left: Vec<String> = fs::read_dir(parent)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(name))
        .collect();
    assert!(left.is_empty(), "left beside the target: {left:?}");
}

#[test]
fn restore_to_dir_refuses_a_forged_archive_that_plants_through_its_own_symlink() {
    let backup = folder_backup();
    let outside = outside_folder(&backup.lab);
    backup.forge(&planting_tar(&outside), true);
    let target = backup.lab.dir.join("restored");
    let (code, _, stderr) = backup.run(&[
        "restore",
        "-c",
        &backup.config,
        &backup.id,
        "--to-dir",
        target.to_str().unwrap(),
    ]);
    assert_untouched(&outside);
    assert_nothing_beside(&target);
    assert_eq!(code, 77, "{stderr}");
}

#[test]
fn verify_refuses_a_forged_archive_that_plants_through_its_own_symlink() {
    let backup = folder_backup();
    let outside = outside_folder(&backup.lab);
    backup.forge(&planting_tar(&outside), true);
    let (code, stdout, stderr) = backup.run(&["verify", "-c", &backup.config, &backup.id]);
    assert_untouched(&outside);
    assert_eq!(code, 77, "{stdout}\n{stderr}");
    let (listing, _) = backup.lab.expect(0, &["list", "-c", &backup.config]);
    assert!(!listing.contains(" yes"), "marked verified: {listing}");
}

#[test]
fn a_data_object_swapped_under_an_intact_manifest_writes_nothing() {
    let backup = folder_backup();
    let outside = outside_folder(&backup.lab);
    backup.forge(&planting_tar(&outside), false);
    let target = backup.lab.dir.join("restored");
    let (code, _, stderr) = backup.run(&[
        "restore",
        "-c",
        &backup.config,
        &backup.id,
        "--to-dir",
        target.to_str().unwrap(),
    ]);
    assert_untouched(&outside);
    assert_nothing_beside(&target);
    assert_eq!(code, 65, "{stderr}");
    assert!(stderr.contains("sha256"), "{stderr}");
    let (code, _, stderr) = backup.run(&["verify", "-c", &backup.config, &backup.id]);
    assert_untouched(&outside);
    assert_eq!(code, 65, "{stderr}");
}

#[test]
fn a_manifest_resigned_with_another_key_is_refused_and_not_marked_verified() {
    let backup = folder_backup();
    let outside = outside_folder(&backup.lab);
    backup.forge(&planting_tar(&outside), true);
    let other = backup.lab.dir.join("other.sign");
    backup
        .lab
        .expect(0, &["keygen", "-o", other.to_str().unwrap()]);
    backup.sign_with(&other);
    let target = backup.lab.dir.join("restored");
    for allow in [&[][..], &["--allow-unsigned"][..]] {
        let mut args = vec![
            "restore",
            "-c",
            &backup.config,
            &backup.id,
            "--to-dir",
            target.to_str().unwrap(),
        ];
        args.extend_from_slice(allow);
        let (code, _, stderr) = backup.run(&args);
        assert_eq!(code, 77, "{stderr}");
        assert!(stderr.contains("not a trusted key"), "{stderr}");
        assert_untouched(&outside);
        assert_nothing_beside(&target);
    }
    let (code, stdout, stderr) = backup.run(&["verify", "-c", &backup.config, &backup.id]);
    assert_eq!(code, 77, "{stdout}\n{stderr}");
    assert_untouched(&outside);
    let (listing, _) = backup.lab.expect(0, &["list", "-c", &backup.config]);
    assert!(!listing.contains(" yes"), "marked verified: {listing}");
    assert!(
        !backup.dir.join("verify.json").exists(),
        "a refused backup gets no record"
    );
}

#[test]
fn an_unsigned_manifest_is_refused_unless_allow_unsigned_is_given() {
    let backup = folder_backup();
    // What a backup made before signing existed looks like.
    fs::remove_file(backup.dir.join("manifest.sig")).unwrap();
    let target = backup.lab.dir.join("restored");
    let restore = [
        "restore",
        "-c",
        &backup.config,
        &backup.id,
        "--to-dir",
        target.to_str().unwrap(),
    ];
    let (code, _, stderr) = backup.run(&restore);
    assert_eq!(code, 77, "{stderr}");
    assert!(stderr.contains("--allow-unsigned"), "{stderr}");
    assert_nothing_beside(&target);
    let (code, _, stderr) = backup.run(&["verify", "-c", &backup.config, &backup.id]);
    assert_eq!(code, 77, "{stderr}");
    let (listing, _) = backup.lab.expect(0, &["list", "-c", &backup.config]);
    assert!(!listing.contains(" yes"), "marked verified: {listing}");

    let mut allowed = restore.to_vec();
    allowed.push("--allow-unsigned");
    backup.lab.expect(0, &allowed);
    assert_eq!(tree(&target), tree(&backup.lab.dir.join("files")));
}

#[test]
fn a_signed_archive_whose_entries_escape_or_pass_through_a_symlink_is_refused() {
    use tar::EntryType;
    let backup = folder_backup();
    let outside = outside_folder(&backup.lab);
    let abs = backup.lab.dir.join("absolute-escape");
    let archives = [
        ("x", planting_tar(&outside)),
        (
            "../../dotdot-escape",
            raw_tar(&[("../../dotdot-escape", EntryType::Regular, "", b"owned")]),
        ),
        (
            abs.to_str().unwrap(),
            raw_tar(&[(abs.to_str().unwrap(), EntryType::Regular, "", b"owned")]),
        ),
        (
            "link/through",
            raw_tar(&[
                ("link", EntryType::Symlink, outside.to_str().unwrap(), b""),
                ("link/through", EntryType::Regular, "", b"owned"),
            ]),
        ),
    ];
    let target = backup.lab.dir.join("restored");
    for (culprit, tar) in archives {
        // Signed with the trusted key: extraction alone must stop it.
        backup.forge(&tar, true);
        backup.sign_with(&backup.lab.signing_key());
        let (code, _, stderr) = backup.run(&[
            "restore",
            "-c",
            &backup.config,
            &backup.id,
            "--to-dir",
            target.to_str().unwrap(),
        ]);
        assert_eq!(code, 65, "{culprit}: {stderr}");
        assert!(stderr.contains(culprit), "{culprit}: {stderr}");
        assert_untouched(&outside);
        assert_nothing_beside(&target);
        assert!(!backup.lab.dir.join("dotdot-escape").exists());
        assert!(!abs.exists());
    }
}

#[test]
fn database_privileges_of_roles_named_with_equals_or_quotes_survive_a_restore() {
    let (lab, config) = small_lab("");
    lab.sql(
        "postgres",
        r#"CREATE ROLE "we=ird"; CREATE ROLE "quo""te"; CREATE ROLE "a/b=c";
           GRANT CONNECT ON DATABASE shop TO "we=ird";
           GRANT TEMPORARY ON DATABASE shop TO "quo""te" WITH GRANT OPTION;
           GRANT CREATE, CONNECT ON DATABASE shop TO "a/b=c""#,
    );
    let config = config.to_str().unwrap();
    let (stdout, _) = lab.expect(0, &["run", "-c", config]);
    let id = stdout.trim();
    lab.expect(0, &["restore", "-c", config, id, "--to-db", "shop_copy"]);
    let acl = |db: &str| {
        lab.sql(
            "postgres",
            &format!(
                "SELECT string_agg(a::text, ' ' ORDER BY a::text) FROM pg_database d, \
                 unnest(d.datacl) a WHERE d.datname = '{db}'"
            ),
        )
    };
    let original = acl("shop");
    assert!(original.contains(r#""we=ird"=c/"#), "{original}");
    assert!(original.contains(r#""quo""te"=T*/"#), "{original}");
    assert_eq!(acl("shop_copy"), original);
}

#[test]
fn a_dump_swapped_under_an_intact_manifest_never_reaches_pg_restore() {
    let (lab, config) = small_lab("");
    // A database whose dump, when restored, writes a file on the server: pg_restore refreshes
    // the materialized view, which calls plant().
    let out = lab.dir.join("pg-out");
    fs::create_dir(&out).unwrap();
    fs::set_permissions(&out, fs::Permissions::from_mode(0o777)).unwrap();
    let planted = out.join("planted");
    lab.sql("postgres", "CREATE DATABASE evil");
    lab.sql(
        "evil",
        &format!(
            "CREATE FUNCTION plant() RETURNS int LANGUAGE plpgsql AS $$ BEGIN \
             EXECUTE format('COPY (SELECT 1) TO %L', '{}'); RETURN 1; END $$; \
             CREATE MATERIALIZED VIEW m AS SELECT plant() AS x",
            planted.display()
        ),
    );
    assert!(planted.exists(), "the trap works when it runs");
    fs::remove_file(&planted).unwrap();
    let text = fs::read_to_string(&config)
        .unwrap()
        .replace("databases = [\"shop\"]", "databases = [\"shop\", \"evil\"]");
    fs::write(&config, text).unwrap();
    let config = config.to_str().unwrap();
    let (stdout, _) = lab.expect(0, &["run", "-c", config]);
    let made = ids(&stdout);
    let object = |prefix: &str| {
        let id = made.iter().find(|i| i.starts_with(prefix)).unwrap();
        let (subject, stamp) = id.rsplit_once('@').unwrap();
        (
            id.clone(),
            lab.dir
                .join("backups")
                .join(subject)
                .join(stamp)
                .join("data.pgdump.zst"),
        )
    };
    let (shop, shop_data) = object("shop.shop@");
    let (_, evil_data) = object("shop.evil@");
    fs::copy(&evil_data, &shop_data).unwrap();
    let restore = lab.backupd(&["restore", "-c", config, &shop, "--to-db", "copy"]);
    let status = restore.wait_exit(WAIT).unwrap();
    assert!(!planted.exists(), "pg_restore ran on the swapped dump");
    assert_eq!(status.code(), Some(65), "{}", restore.stderr());
    assert!(restore.stderr().contains("sha256"), "{}", restore.stderr());
    let (out_text, _) = lab.expect(65, &["verify", "-c", config, &shop]);
    assert!(out_text.contains("FAILED"), "{out_text}");
    assert!(!planted.exists(), "pg_restore ran on the swapped dump");
    assert_eq!(
        lab.sql(
            "postgres",
            "SELECT count(*) FROM pg_database WHERE datname LIKE 'copy%' OR datname LIKE 'backupd_verify%'"
        )
        .trim(),
        "0"
    );
}
