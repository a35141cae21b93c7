//! Point-in-time recovery end to end: a real PostgreSQL whose archive_command is the built
//! backupd, a real S3 server, base backups, restores to a moment, outages and retention.
//!
//! PostgreSQL runs as `nobody` under root, and so do its archive_command and restores: the
//! binary, config and keys live in a folder every user can read.

use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use testkit::{PgCluster, Proc, ProcBuilder, S3Server, Scratch};

const BACKUPD: &str = env!("CARGO_BIN_EXE_backupd");
const WAIT: Duration = Duration::from_secs(300);

fn nobody() -> (u32, u32) {
    let user = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    (user.uid.as_raw(), user.gid.as_raw())
}

/// A folder open to `nobody` holding backupd, its config and keys.
struct World {
    dir: Scratch,
    bin: PathBuf,
    config: PathBuf,
    spool: PathBuf,
    /// The public age recipient: all a bucket writer needs to make objects backupd decrypts.
    recipient: age::x25519::Recipient,
}

impl World {
    fn new(target: &str, extra: &str) -> World {
        let dir = Scratch::new("pitr").unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let bin = dir.join("backupd");
        if fs::hard_link(BACKUPD, &bin).is_err() {
            fs::copy(BACKUPD, &bin).unwrap();
        }
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
        let (uid, gid) = nobody();
        let spool = dir.join("spool");
        fs::create_dir(&spool).unwrap();
        nix::unistd::chown(&spool, Some(uid.into()), Some(gid.into())).unwrap();
        let restores = dir.join("restores");
        fs::create_dir(&restores).unwrap();
        nix::unistd::chown(&restores, Some(uid.into()), Some(gid.into())).unwrap();

        let key = dir.join("backupd.sign");
        run(
            &[bin.to_str().unwrap(), "keygen", "-o", key.to_str().unwrap()],
            &[],
        );
        let wal_key = dir.join("wal.sign");
        run(
            &[
                bin.to_str().unwrap(),
                "keygen",
                "--wal",
                "-o",
                wal_key.to_str().unwrap(),
            ],
            &[],
        );
        let identity = age::x25519::Identity::generate();
        let identity_file = dir.join("age.key");
        {
            use age::secrecy::ExposeSecret;
            fs::write(&identity_file, identity.to_string().expose_secret()).unwrap();
        }
        // Test keys readable by nobody, which archives and restores.
        for file in [&key, &wal_key, &identity_file] {
            fs::set_permissions(file, fs::Permissions::from_mode(0o644)).unwrap();
        }
        let config = dir.join("backupd.toml");
        fs::write(
            &config,
            format!(
                "lock_file = {lock:?}\n{target}\n\
                 [encryption]\nrecipients = [{recipient:?}]\nidentity_file = {identity:?}\n\
                 [signing]\nkey_file = {key:?}\nwal_key_file = {wal_key:?}\n\
                 [[cluster]]\nname = \"main\"\nspool_dir = {spool:?}\nparallel = 4\n\
                 archive_timeout_secs = 60\n{extra}\n",
                lock = dir.join("lock").display().to_string(),
                recipient = identity.to_public().to_string(),
                identity = identity_file.display().to_string(),
                key = key.display().to_string(),
                wal_key = wal_key.display().to_string(),
                spool = spool.display().to_string(),
            ),
        )
        .unwrap();
        fs::set_permissions(&config, fs::Permissions::from_mode(0o644)).unwrap();
        World {
            dir,
            bin,
            config,
            spool,
            recipient: identity.to_public(),
        }
    }

    fn archive_command(&self) -> String {
        format!(
            "{} wal-push -c {} %p",
            self.bin.display(),
            self.config.display()
        )
    }

    /// Runs backupd as root with `env`; expects `code`; returns stdout and stderr.
    fn backupd(&self, code: i32, args: &[&str], env: &[(OsString, OsString)]) -> (String, String) {
        let proc = ProcBuilder::new(&self.bin)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .spawn()
            .unwrap();
        proc.expect_exit(code, WAIT).unwrap();
        (proc.stdout(), proc.stderr())
    }

    /// Runs backupd as nobody (through setpriv), as the PostgreSQL user would.
    fn backupd_as_nobody(&self, code: i32, args: &[&str]) -> (String, String) {
        let (uid, gid) = nobody();
        let proc = ProcBuilder::new("setpriv")
            .args([
                format!("--reuid={uid}"),
                format!("--regid={gid}"),
                "--clear-groups".into(),
            ])
            .arg(&self.bin)
            .args(args)
            .env("PGUSER", "postgres")
            .current_dir(self.dir.path())
            .spawn()
            .unwrap();
        let status = proc.wait_exit(WAIT).unwrap();
        assert_eq!(
            status.code(),
            Some(code),
            "stdout: {}\nstderr: {}",
            proc.stdout(),
            proc.stderr()
        );
        (proc.stdout(), proc.stderr())
    }

    /// `wal-push --cluster main SEGMENT` with `config`; expects `code`; returns stderr.
    fn push_main(&self, code: i32, config: &str, segment: &Path) -> String {
        let args = [
            "wal-push",
            "-c",
            config,
            "--cluster",
            "main",
            segment.to_str().unwrap(),
        ];
        self.backupd(code, &args, &[]).1
    }

    fn restore_dir(&self, name: &str) -> PathBuf {
        self.dir.join("restores").join(name)
    }
}

fn run(argv: &[&str], env: &[(OsString, OsString)]) -> String {
    let proc = ProcBuilder::new(argv[0])
        .args(&argv[1..])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .spawn()
        .unwrap();
    proc.expect_exit(0, WAIT).unwrap();
    proc.stdout()
}

fn s3_target(server: &S3Server, bucket: &str) -> String {
    format!(
        "[[target]]\nname = \"s3\"\nurl = \"s3://{bucket}/lab\"\n\
         [s3]\nendpoint = {:?}\nregion = {:?}\naccess_key_id = {:?}\nsecret_access_key = {:?}\n",
        server.endpoint(),
        testkit::s3::REGION,
        testkit::s3::ACCESS_KEY,
        testkit::s3::SECRET_KEY
    )
}

fn archiving_cluster(world: &World) -> PgCluster {
    PgCluster::builder()
        .setting("archive_mode", "on")
        .setting("archive_command", &world.archive_command())
        .setting("wal_level", "replica")
        .start()
        .unwrap()
}

/// Switches to a new segment and waits until PostgreSQL reports it archived.
fn switch_and_wait_archived(pg: &PgCluster) -> String {
    let segment = pg
        .psql("postgres", "SELECT pg_walfile_name(pg_switch_wal())")
        .unwrap()
        .trim()
        .to_owned();
    wait_archived(pg, &segment);
    segment
}

/// Polls pg_stat_archiver (PostgreSQL's own record, the only signal there is) for `segment`.
fn wait_archived(pg: &PgCluster, segment: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let last = pg
            .psql(
                "postgres",
                "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver",
            )
            .unwrap();
        if last.trim() >= segment {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{segment} was not archived: last {last}; log:\n{}",
            pg.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Starts a server as nobody on a restored data folder; returns it and its socket folder.
fn start_restored(pg: &PgCluster, data: &Path) -> (Proc, Scratch) {
    let sockets = Scratch::new("pitr-sock").unwrap();
    fs::set_permissions(sockets.path(), fs::Permissions::from_mode(0o777)).unwrap();
    let (uid, gid) = nobody();
    let proc = ProcBuilder::new("setpriv")
        .args([
            format!("--reuid={uid}"),
            format!("--regid={gid}"),
            "--clear-groups".into(),
        ])
        .arg(pg.bin("postgres"))
        .arg("-D")
        .arg(data)
        .arg("-k")
        .arg(sockets.path())
        .args(["-c", "listen_addresses=", "-c", "port=5432"])
        .spawn()
        .unwrap();
    proc.wait_stderr("ready to accept connections", WAIT)
        .unwrap();
    (proc, sockets)
}

fn query(pg: &PgCluster, sockets: &Path, sql: &str) -> String {
    testkit::proc::run(
        pg.bin("psql"),
        &[
            "-X".as_ref(),
            "-A".as_ref(),
            "-t".as_ref(),
            "-h".as_ref(),
            sockets.as_os_str(),
            "-p".as_ref(),
            "5432".as_ref(),
            "-U".as_ref(),
            "postgres".as_ref(),
            "-d".as_ref(),
            "postgres".as_ref(),
            "-c".as_ref(),
            sql.as_ref(),
        ],
        &[],
    )
    .unwrap()
    .trim()
    .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn restore_to_a_moment_shows_exactly_the_rows_committed_before_it() {
    let server = S3Server::start().unwrap();
    let bucket = server.bucket().await.unwrap();
    let world = World::new(&s3_target(&server, &bucket), "");
    let pg = archiving_cluster(&world);
    pg.psql(
        "postgres",
        "CREATE TABLE t (id int PRIMARY KEY, at timestamptz DEFAULT clock_timestamp())",
    )
    .unwrap();
    let env = pg.env();
    let (stdout, _) = world.backupd(
        0,
        &["basebackup", "-c", world.config.to_str().unwrap()],
        &env,
    );
    assert!(stdout.starts_with("main@"), "{stdout}");

    // Commits 1..=3 at least, then a moment, then at least three more. In the suite that is
    // seconds; `BACKUPD_TEST_SPAN_SECS=300` spreads the commits over the several
    // minutes (a segment switch every 200 commits), with the moment in the middle.
    let half = Duration::from_secs(
        std::env::var("BACKUPD_TEST_SPAN_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    ) / 2;
    let mut id = 0;
    let commit = |id: u32| {
        pg.psql("postgres", &format!("INSERT INTO t (id) VALUES ({id})"))
            .unwrap();
        if id.is_multiple_of(200) {
            switch_and_wait_archived(&pg);
        }
    };
    let began = Instant::now();
    while id < 3 || began.elapsed() < half {
        id += 1;
        commit(id);
    }
    let before = id;
    // A moment after the last commit above and before the next, from the server's own clock.
    let moment = pg
        .psql(
            "postgres",
            "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
        )
        .unwrap()
        .trim()
        .to_owned();
    switch_and_wait_archived(&pg);
    let began = Instant::now();
    while id < before + 3 || began.elapsed() < half {
        id += 1;
        commit(id);
    }
    switch_and_wait_archived(&pg);
    eprintln!("{id} commits, the moment after commit {before}");
    let ids = |last: u32| {
        (1..=last)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };

    let (list, _) = world.backupd(0, &["list", "-c", world.config.to_str().unwrap()], &env);
    assert!(list.contains("cluster main: 1 base backups"), "{list}");
    assert!(!list.contains("MISSING"), "{list}");

    let middle = world.restore_dir("middle");
    let (stdout, _) = world.backupd_as_nobody(
        0,
        &[
            "restore",
            "-c",
            world.config.to_str().unwrap(),
            "--cluster",
            "main",
            "--to-time",
            &moment,
            "--to-dir",
            middle.to_str().unwrap(),
            "--start",
        ],
    );
    assert!(stdout.contains("replayed to"), "{stdout}");
    let (restored, sockets) = start_restored(&pg, &middle);
    assert_eq!(
        query(
            &pg,
            sockets.path(),
            "SELECT string_agg(id::text, ',' ORDER BY id) FROM t"
        ),
        ids(before)
    );
    restored.stop(WAIT).unwrap();

    let latest = world.restore_dir("latest");
    world.backupd_as_nobody(
        0,
        &[
            "restore",
            "-c",
            world.config.to_str().unwrap(),
            "--cluster",
            "main",
            "--latest",
            "--to-dir",
            latest.to_str().unwrap(),
            "--start",
        ],
    );
    let (restored, sockets) = start_restored(&pg, &latest);
    assert_eq!(
        query(
            &pg,
            sockets.path(),
            "SELECT string_agg(id::text, ',' ORDER BY id) FROM t"
        ),
        ids(id)
    );
    restored.stop(WAIT).unwrap();
}

#[test]
fn wal_push_is_idempotent_refuses_other_bytes_and_wal_fetch_checks_them() {
    let store = Scratch::new("pitr-store").unwrap();
    let world = World::new(
        &format!(
            "[[target]]\nname = \"local\"\nurl = {:?}\n",
            store.path().display().to_string()
        ),
        "",
    );
    let config = world.config.to_str().unwrap();
    let wal_dir = world.dir.join("pg_wal");
    fs::create_dir(&wal_dir).unwrap();
    let segment = wal_dir.join("000000010000000000000007");
    let bytes: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    fs::write(&segment, &bytes).unwrap();
    let seg = segment.to_str().unwrap();

    world.backupd(0, &["wal-push", "-c", config, seg], &[]);
    let object = store.join("cluster/main/wal/000000010000000000000007");
    let stored = fs::read(&object).unwrap();
    assert!(stored.starts_with(b"backupd-wal 2\n"), "a signed header");
    // A retry of the same file succeeds and changes nothing.
    world.backupd(0, &["wal-push", "-c", config, seg], &[]);
    assert_eq!(fs::read(&object).unwrap(), stored);

    // Other bytes under the same name: refused loudly, never overwritten.
    fs::write(&segment, b"not the same segment").unwrap();
    let (_, stderr) = world.backupd(65, &["wal-push", "-c", config, seg], &[]);
    assert!(stderr.contains("000000010000000000000007"), "{stderr}");
    assert!(stderr.contains("refusing to overwrite"), "{stderr}");
    assert_eq!(fs::read(&object).unwrap(), stored);

    let fetched = wal_dir.join("RECOVERYXLOG");
    world.backupd(
        0,
        &[
            "wal-fetch",
            "-c",
            config,
            "000000010000000000000007",
            fetched.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(fs::read(&fetched).unwrap(), bytes);

    // A segment the archive lacks ends recovery with "not found", not a crash.
    world.backupd(
        66,
        &[
            "wal-fetch",
            "-c",
            config,
            "000000010000000000000008",
            fetched.to_str().unwrap(),
        ],
        &[],
    );
    // Names that are not WAL file names never reach the store; as every failure but a missing
    // file, the status aborts PostgreSQL's recovery.
    let (_, stderr) = world.backupd(
        200,
        &[
            "wal-fetch",
            "-c",
            config,
            "../../etc/passwd",
            fetched.to_str().unwrap(),
        ],
        &[],
    );
    assert!(stderr.contains("is not a WAL file name"), "{stderr}");
    fs::write(wal_dir.join("notwal"), b"x").unwrap();
    world.backupd(
        64,
        &[
            "wal-push",
            "-c",
            config,
            wal_dir.join("notwal").to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(spooled(&world), 0, "nothing was spooled for a refused name");
}

/// WAL object names in the bucket, sorted.
async fn stored_wal(server: &S3Server, bucket: &str) -> Vec<String> {
    let listed = server
        .client()
        .await
        .list_objects_v2()
        .bucket(bucket)
        .prefix("lab/cluster/main/wal/")
        .send()
        .await
        .unwrap();
    let mut names: Vec<String> = listed
        .contents()
        .iter()
        .filter_map(|o| o.key())
        .map(|k| k.rsplit('/').next().unwrap().to_owned())
        .collect();
    names.sort();
    names
}

/// The stored bytes of a WAL object of cluster main.
async fn wal_object(server: &S3Server, bucket: &str, name: &str) -> Vec<u8> {
    let got = server
        .client()
        .await
        .get_object()
        .bucket(bucket)
        .key(format!("lab/cluster/main/wal/{name}"))
        .send()
        .await
        .unwrap();
    got.body.collect().await.unwrap().into_bytes().to_vec()
}

fn spooled(world: &World) -> usize {
    fs::read_dir(&world.spool)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().len() == 24)
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_store_outage_is_absorbed_by_the_spool_and_no_segment_is_lost() {
    let mut server = S3Server::start().unwrap();
    let bucket = server.bucket().await.unwrap();
    let world = World::new(&s3_target(&server, &bucket), "");
    let pg = archiving_cluster(&world);
    let config = world.config.to_str().unwrap().to_owned();
    pg.psql("postgres", "CREATE TABLE load (n int, pad text)")
        .unwrap();
    world.backupd(0, &["basebackup", "-c", &config], &pg.env());

    // The store goes away while PostgreSQL keeps writing and archiving.
    server.kill().unwrap();
    let outage = Instant::now();
    let mut during = Vec::new();
    // Six segments in the suite; `BACKUPD_TEST_OUTAGE_SECS=60` keeps the store down (and
    // PostgreSQL writing) for the full minute on demand.
    let hold = Duration::from_secs(
        std::env::var("BACKUPD_TEST_OUTAGE_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    );
    for round in 0.. {
        if round >= 6 && outage.elapsed() >= hold {
            break;
        }
        pg.psql(
            "postgres",
            &format!("INSERT INTO load SELECT g, repeat('x', 200) FROM generate_series(1, 20000) g; -- {round}"),
        )
        .unwrap();
        during.push(switch_and_wait_archived(&pg));
    }
    assert!(
        spooled(&world) >= 6,
        "the spool holds the segments archived during the outage"
    );
    let failed = pg
        .psql("postgres", "SELECT failed_count FROM pg_stat_archiver")
        .unwrap();
    assert_eq!(failed.trim(), "0", "the archiver never saw a failure");
    server.restart().unwrap();
    eprintln!(
        "store outage lasted {:?}, {} segments archived during it",
        outage.elapsed(),
        during.len()
    );

    // The next segment's push drains the spool.
    pg.psql("postgres", "INSERT INTO load VALUES (0, 'after')")
        .unwrap();
    let after = switch_and_wait_archived(&pg);
    assert_eq!(spooled(&world), 0, "the spool drained; log:\n{}", pg.log());
    let stored = stored_wal(&server, &bucket).await;
    for segment in during.iter().chain([&after]) {
        assert!(
            stored.contains(segment),
            "{segment} missing from {stored:?}"
        );
    }
    let (list, _) = world.backupd(0, &["list", "-c", &config], &pg.env());
    assert!(!list.contains("MISSING"), "{list}");
    let failed = pg
        .psql("postgres", "SELECT failed_count FROM pg_stat_archiver")
        .unwrap();
    assert_eq!(failed.trim(), "0");
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_drops_wal_older_than_the_kept_base_backup_and_verify_names_a_deleted_segment() {
    let server = S3Server::start().unwrap();
    let bucket = server.bucket().await.unwrap();
    let world = World::new(&s3_target(&server, &bucket), "[retention]\nkeep_last = 1\n");
    let pg = archiving_cluster(&world);
    let config = world.config.to_str().unwrap().to_owned();
    let env = pg.env();
    pg.psql("postgres", "CREATE TABLE t (id int)").unwrap();
    world.backupd(0, &["basebackup", "-c", &config], &env);
    pg.psql("postgres", "INSERT INTO t VALUES (1)").unwrap();
    switch_and_wait_archived(&pg);
    let (second, _) = world.backupd(0, &["basebackup", "-c", &config], &env);
    let wal_start = second
        .split_whitespace()
        .nth(1)
        .and_then(|range| range.split("..").next())
        .unwrap()
        .to_owned();
    for id in 2..=4 {
        pg.psql("postgres", &format!("INSERT INTO t VALUES ({id})"))
            .unwrap();
        switch_and_wait_archived(&pg);
    }
    let before = stored_wal(&server, &bucket).await;
    assert!(
        before.iter().any(|n| *n < wal_start),
        "{before:?} {wal_start}"
    );

    let (pruned, _) = world.backupd(0, &["prune", "-c", &config], &env);
    assert!(pruned.contains("deleted base backup main@"), "{pruned}");
    let after = stored_wal(&server, &bucket).await;
    let expected: Vec<String> = before
        .iter()
        .filter(|n| **n >= wal_start)
        .cloned()
        .collect();
    assert_eq!(
        after, expected,
        "exactly the WAL before the kept base backup went"
    );

    let (stdout, _) = world.backupd_as_nobody(0, &["verify", "-c", &config, "--cluster", "main"]);
    assert!(stdout.contains("cluster main: ok"), "{stdout}");

    // A segment lost in the middle of the chain is named.
    let lost = after[after.len() / 2 + 1].clone();
    assert!(lost > wal_start && lost < after[after.len() - 1]);
    server
        .client()
        .await
        .delete_object()
        .bucket(&bucket)
        .key(format!("lab/cluster/main/wal/{lost}"))
        .send()
        .await
        .unwrap();
    let (stdout, _) = world.backupd_as_nobody(65, &["verify", "-c", &config, "--cluster", "main"]);
    assert!(stdout.contains(&lost), "{stdout}");
    let (list, _) = world.backupd(0, &["list", "-c", &config], &env);
    assert!(list.contains(&format!("MISSING {lost}")), "{list}");
    // The JSON listing carries the same window.
    let (list, _) = world.backupd(0, &["list", "-c", &config, "--format", "json"], &env);
    let window: serde_json::Value = list
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v.get("cluster").is_some())
        .unwrap_or_else(|| panic!("no cluster window in {list}"));
    assert_eq!(window["target"], "s3", "{window}");
    assert_eq!(window["cluster"]["cluster"], "main", "{window}");
    assert_eq!(window["cluster"]["base_backups"], 1, "{window}");
    assert!(window["cluster"]["from"].is_string(), "{window}");
    assert_eq!(
        window["cluster"]["missing"],
        serde_json::json!([lost]),
        "{window}"
    );
}

#[test]
fn wal_push_uploads_the_segments_postgres_marked_ready_ahead_of_their_calls() {
    let store = Scratch::new("pitr-store").unwrap();
    let world = World::new(
        &format!(
            "[[target]]\nname = \"local\"\nurl = {:?}\n",
            store.path().display().to_string()
        ),
        "",
    );
    let config = world.config.to_str().unwrap();
    let wal_dir = world.dir.join("pg_wal");
    fs::create_dir_all(wal_dir.join("archive_status")).unwrap();
    let names = [
        "000000010000000000000010",
        "000000010000000000000011",
        "000000010000000000000012",
    ];
    for (i, name) in names.iter().enumerate() {
        fs::write(wal_dir.join(name), vec![i as u8; 100_000]).unwrap();
        fs::write(
            wal_dir.join("archive_status").join(format!("{name}.ready")),
            b"",
        )
        .unwrap();
    }
    let object = |name: &str| store.join(format!("cluster/main/wal/{name}"));
    world.backupd(
        0,
        &[
            "wal-push",
            "-c",
            config,
            wal_dir.join(names[0]).to_str().unwrap(),
        ],
        &[],
    );
    for name in names {
        assert!(object(name).exists(), "{name} was pushed ahead");
    }
    let stored = fs::read(object(names[1])).unwrap();
    // PostgreSQL's own call for a segment pushed ahead succeeds and stores nothing new.
    world.backupd(
        0,
        &[
            "wal-push",
            "-c",
            config,
            wal_dir.join(names[1]).to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(fs::read(object(names[1])).unwrap(), stored);
    // Other bytes than those pushed ahead are refused all the same.
    fs::write(wal_dir.join(names[2]), b"changed").unwrap();
    world.backupd(
        65,
        &[
            "wal-push",
            "-c",
            config,
            wal_dir.join(names[2]).to_str().unwrap(),
        ],
        &[],
    );
}

/// Issue 21's off-site point: the base backup and every WAL segment of a cluster reach the
/// `copy_to` store with the pass that follows, and a point-in-time restore works from the
/// off-site store alone (the home disk lost: the config points the cluster there).
#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_archive_reaches_the_offsite_store_and_restores_from_it_alone() {
    let local = S3Server::start().unwrap();
    let offsite = S3Server::start().unwrap();
    let (local_bucket, offsite_bucket) = (
        local.bucket().await.unwrap(),
        offsite.bucket().await.unwrap(),
    );
    let metrics = Scratch::new("pitr-metrics").unwrap();
    let metrics_file = metrics.join("backupd.prom");
    let targets = format!(
        "metrics_file = {metrics_file:?}\n\
         [[target]]\nname = \"local\"\nurl = \"s3://{local_bucket}/lab\"\ncopy_to = [\"offsite\"]\n\
         [[target]]\nname = \"offsite\"\nurl = \"s3://{offsite_bucket}/lab\"\nendpoint = {:?}\n\
         region = {:?}\npath_style = true\naccess_key_id = {:?}\nsecret_access_key = {:?}\n\
         [s3]\nendpoint = {:?}\nregion = {:?}\naccess_key_id = {:?}\nsecret_access_key = {:?}\n",
        offsite.endpoint(),
        testkit::s3::REGION,
        testkit::s3::ACCESS_KEY,
        testkit::s3::SECRET_KEY,
        local.endpoint(),
        testkit::s3::REGION,
        testkit::s3::ACCESS_KEY,
        testkit::s3::SECRET_KEY,
    );
    let world = World::new(&targets, "target = \"local\"");
    let config = world.config.to_str().unwrap().to_owned();
    let pg = archiving_cluster(&world);
    pg.psql("postgres", "CREATE TABLE t (id int PRIMARY KEY)")
        .unwrap();
    world.backupd(0, &["basebackup", "-c", &config], &pg.env());
    for id in 1..=3 {
        pg.psql("postgres", &format!("INSERT INTO t VALUES ({id})"))
            .unwrap();
    }
    let last = switch_and_wait_archived(&pg);

    // The pass copies what the off-site store lacks: the base backup and the WAL.
    world.backupd(0, &["run", "-c", &config], &pg.env());
    let at_home = stored_wal(&local, &local_bucket).await;
    assert!(at_home.contains(&last), "{last} not archived: {at_home:?}");
    assert_eq!(stored_wal(&offsite, &offsite_bucket).await, at_home);
    // Copied as it is: the off-site object carries the archiver's signature unchanged.
    let home_copy = wal_object(&local, &local_bucket, &last).await;
    assert!(home_copy.starts_with(b"backupd-wal 2\n"));
    assert_eq!(
        wal_object(&offsite, &offsite_bucket, &last).await,
        home_copy
    );
    // The pass's metrics carry the archive's lag: seconds since its newest segment was stored.
    let text = fs::read_to_string(&metrics_file).unwrap();
    let lag: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("backupd_wal_lag_seconds{cluster=\"main\"} "))
        .unwrap_or_else(|| panic!("no WAL lag in:\n{text}"))
        .parse()
        .unwrap();
    assert!((0.0..600.0).contains(&lag), "{lag}");

    // The home store is gone: the cluster restores from the off-site copy alone.
    drop(local);
    let away = world.dir.join("offsite.toml");
    let text = fs::read_to_string(&world.config)
        .unwrap()
        .replace("copy_to = [\"offsite\"]\n", "")
        .replace("target = \"local\"", "target = \"offsite\"");
    fs::write(&away, text).unwrap();
    fs::set_permissions(&away, fs::Permissions::from_mode(0o644)).unwrap();
    let restored_dir = world.restore_dir("offsite");
    let (stdout, _) = world.backupd_as_nobody(
        0,
        &[
            "restore",
            "-c",
            away.to_str().unwrap(),
            "--cluster",
            "main",
            "--latest",
            "--to-dir",
            restored_dir.to_str().unwrap(),
            "--start",
        ],
    );
    assert!(stdout.contains("replayed to"), "{stdout}");
    let (restored, sockets) = start_restored(&pg, &restored_dir);
    assert_eq!(
        query(
            &pg,
            sockets.path(),
            "SELECT string_agg(id::text, ',' ORDER BY id) FROM t"
        ),
        "1,2,3"
    );
    restored.stop(WAIT).unwrap();
}

fn sha256_hex(bytes: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A WAL object for `name` as anyone who can write the bucket makes one: a header, then
/// `plain` through zstd and age to the public recipient. `signature` is a (public key,
/// signature) pair for the header's `key` and `signature` lines; without one the object is of
/// the unsigned first version.
fn forged_object(
    world: &World,
    name: &str,
    plain: &[u8],
    signature: Option<(String, String)>,
) -> Vec<u8> {
    let version = if signature.is_some() { 2 } else { 1 };
    let mut header = format!(
        "backupd-wal {version}\nname {name}\nsize {}\nsha256 {}\nencoding zstd+age\n",
        plain.len(),
        sha256_hex(plain)
    );
    if let Some((key, signature)) = signature {
        header.push_str(&format!("key {key}\nsignature {signature}\n"));
    }
    header.push('\n');
    let mut object = header.into_bytes();
    let compressed = zstd::encode_all(plain, 3).unwrap();
    let recipients = [&world.recipient as &dyn age::Recipient];
    let encryptor = age::Encryptor::with_recipients(recipients.into_iter()).unwrap();
    let mut writer = encryptor.wrap_output(&mut object).unwrap();
    std::io::Write::write_all(&mut writer, &compressed).unwrap();
    writer.finish().unwrap();
    object
}

/// An archiving cluster, a base backup, rows 1..=3 archived and a restore of them laid out
/// (not started); then a row `planted` in a segment that no backupd signed: while the flag
/// file exists, archive_command copies segments aside instead of pushing them. A forger who
/// writes that segment into the bucket tries to get the row into the restored cluster.
struct Planted {
    server: S3Server,
    bucket: String,
    world: World,
    pg: PgCluster,
    /// The laid-out restore.
    restored: PathBuf,
    /// The segment holding the planted row, and its bytes.
    segment: String,
    bytes: Vec<u8>,
}

impl Planted {
    async fn new(allow_unsigned: bool) -> Planted {
        let server = S3Server::start().unwrap();
        let bucket = server.bucket().await.unwrap();
        let world = World::new(&s3_target(&server, &bucket), "");
        let config = world.config.to_str().unwrap().to_owned();
        let (flag, captured) = (world.dir.join("capture"), world.dir.join("captured"));
        fs::create_dir(&captured).unwrap();
        let (uid, gid) = nobody();
        nix::unistd::chown(&captured, Some(uid.into()), Some(gid.into())).unwrap();
        let command = format!(
            "if [ -e {} ]; then cp %p {}/%f; else {}; fi",
            flag.display(),
            captured.display(),
            world.archive_command()
        );
        let pg = PgCluster::builder()
            .setting("archive_mode", "on")
            .setting("archive_command", &command)
            .setting("wal_level", "replica")
            .start()
            .unwrap();
        pg.psql("postgres", "CREATE TABLE t (id int PRIMARY KEY, who text)")
            .unwrap();
        world.backupd(0, &["basebackup", "-c", &config], &pg.env());
        pg.psql(
            "postgres",
            "INSERT INTO t VALUES (1, 'archiver'), (2, 'archiver'), (3, 'archiver')",
        )
        .unwrap();
        switch_and_wait_archived(&pg);

        let restored = world.restore_dir("laid-out");
        let mut args = vec![
            "restore",
            "-c",
            &config,
            "--cluster",
            "main",
            "--latest",
            "--to-dir",
            restored.to_str().unwrap(),
        ];
        if allow_unsigned {
            args.push("--allow-unsigned");
        }
        world.backupd_as_nobody(0, &args);
        let settings = fs::read_to_string(restored.join("postgresql.auto.conf")).unwrap();
        let restore_command = settings
            .lines()
            .find(|l| l.starts_with("restore_command"))
            .unwrap();
        assert_eq!(
            restore_command.contains("--allow-unsigned"),
            allow_unsigned,
            "{restore_command}"
        );

        fs::write(&flag, b"").unwrap();
        pg.psql("postgres", "INSERT INTO t VALUES (4, 'planted')")
            .unwrap();
        let segment = switch_and_wait_archived(&pg);
        let bytes = fs::read(captured.join(&segment)).unwrap();
        Planted {
            server,
            bucket,
            world,
            pg,
            restored,
            segment,
            bytes,
        }
    }

    /// Writes `object` into the bucket under the planted segment's name.
    async fn plant(&self, object: Vec<u8>) {
        self.server
            .client()
            .await
            .put_object()
            .bucket(&self.bucket)
            .key(format!("lab/cluster/main/wal/{}", self.segment))
            .body(object.into())
            .send()
            .await
            .unwrap();
    }

    /// Starts the laid-out restore: its replay asks wal-fetch for the planted segment, which
    /// must be refused for `reason`, so the replay aborts and nothing planted is applied.
    fn assert_refused_on_replay(&self, reason: &str) {
        // wal-fetch's refusal exits above 125, so PostgreSQL aborts the recovery instead of
        // ending the archive there and promoting without the WAL after it: the server never
        // comes up, and nothing planted was replayed.
        let sockets = Scratch::new("pitr-sock").unwrap();
        fs::set_permissions(sockets.path(), fs::Permissions::from_mode(0o777)).unwrap();
        let (uid, gid) = nobody();
        let server = ProcBuilder::new("setpriv")
            .args([
                format!("--reuid={uid}"),
                format!("--regid={gid}"),
                "--clear-groups".into(),
            ])
            .arg(self.pg.bin("postgres"))
            .arg("-D")
            .arg(&self.restored)
            .arg("-k")
            .arg(sockets.path())
            .args(["-c", "listen_addresses=", "-c", "port=5432"])
            .spawn()
            .unwrap();
        let status = server.wait_exit(WAIT).unwrap();
        let log = server.stderr();
        assert!(!status.success(), "log:\n{log}");
        assert!(
            !log.contains("ready to accept connections"),
            "the restore came up:\n{log}"
        );
        assert!(log.contains("exit code 200"), "log:\n{log}");
        let refusal = log
            .lines()
            .find(|l| l.contains("refused WAL object"))
            .unwrap_or_else(|| panic!("no refusal in the log:\n{log}"));
        assert!(
            refusal.contains(&format!("cluster/main/wal/{}", self.segment))
                && refusal.contains(reason),
            "{refusal}"
        );
    }

    /// `restore --start` (with `extra` flags) and `verify --cluster` refuse before replaying,
    /// naming the planted segment and `reason`.
    fn assert_refused_up_front(&self, extra: &[&str], reason: &str) {
        let config = self.world.config.to_str().unwrap();
        let dir = self.world.restore_dir("refused");
        let mut args = vec![
            "restore",
            "-c",
            config,
            "--cluster",
            "main",
            "--latest",
            "--to-dir",
            dir.to_str().unwrap(),
            "--start",
        ];
        args.extend(extra);
        let (_, stderr) = self.world.backupd_as_nobody(77, &args);
        assert!(
            stderr.contains(&self.segment) && stderr.contains(reason),
            "{stderr}"
        );
        assert!(!dir.join("PG_VERSION").exists(), "nothing was laid out");
        let mut args = vec!["verify", "-c", config, "--cluster", "main"];
        args.extend(extra);
        let (stdout, _) = self.world.backupd_as_nobody(77, &args);
        assert!(
            stdout.contains(&self.segment) && stdout.contains(reason),
            "{stdout}"
        );
    }
}

/// Issue 21's attack: the age recipient is public, so a bucket writer can make a WAL object
/// wal-fetch decrypts. Unsigned, under the name the replay needs next, it is refused.
#[tokio::test(flavor = "multi_thread")]
async fn a_planted_unsigned_wal_segment_is_refused_by_name_and_its_rows_never_reach_the_restore() {
    let planted = Planted::new(false).await;
    planted
        .plant(forged_object(
            &planted.world,
            &planted.segment,
            &planted.bytes,
            None,
        ))
        .await;
    planted.assert_refused_on_replay("has no signature");
    planted.assert_refused_up_front(&[], "unsigned");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_planted_wal_segment_signed_by_an_untrusted_key_is_refused_even_with_allow_unsigned() {
    let planted = Planted::new(true).await;
    let (forger, _) =
        backupd::signing::SigningKey::generate_for(backupd::signing::KeyRole::Wal).unwrap();
    let signature = forger.sign_wal(
        "main",
        &planted.segment,
        planted.bytes.len() as u64,
        &sha256_hex(&planted.bytes),
    );
    planted
        .plant(forged_object(
            &planted.world,
            &planted.segment,
            &planted.bytes,
            Some((forger.public().to_string(), signature)),
        ))
        .await;
    planted.assert_refused_on_replay("not a trusted WAL key");
    planted.assert_refused_up_front(&["--allow-unsigned"], "untrusted key");
}

/// A local-folder target with a second cluster `other`: returns the world and the store.
fn two_cluster_world() -> (World, Scratch, Scratch) {
    let store = Scratch::new("pitr-store").unwrap();
    let other_spool = Scratch::new("pitr-spool").unwrap();
    let world = World::new(
        &format!(
            "[[target]]\nname = \"local\"\nurl = {:?}\n",
            store.path().display().to_string()
        ),
        &format!(
            "[[cluster]]\nname = \"other\"\nspool_dir = {:?}\n",
            other_spool.path().display().to_string()
        ),
    );
    (world, store, other_spool)
}

#[test]
fn wal_fetch_refuses_a_signed_segment_renamed_or_copied_into_another_cluster() {
    let (world, store, _spool) = two_cluster_world();
    let config = world.config.to_str().unwrap();
    let wal_dir = world.dir.join("pg_wal");
    fs::create_dir(&wal_dir).unwrap();
    let segment = wal_dir.join("000000010000000000000007");
    let bytes: Vec<u8> = (0..100_000u32).map(|i| (i % 241) as u8).collect();
    fs::write(&segment, &bytes).unwrap();
    world.push_main(0, config, &segment);
    let object = fs::read(store.join("cluster/main/wal/000000010000000000000007")).unwrap();
    let fetched = wal_dir.join("RECOVERYXLOG");
    let fetch = |code: i32, cluster: &str, name: &str, extra: &[&str]| {
        let mut args = vec!["wal-fetch", "-c", config, "--cluster", cluster];
        args.extend(extra);
        args.extend([name, fetched.to_str().unwrap()]);
        world.backupd(code, &args, &[]).1
    };
    fetch(0, "main", "000000010000000000000007", &[]);
    assert_eq!(fs::read(&fetched).unwrap(), bytes);
    fs::remove_file(&fetched).unwrap();

    // The same object under the next segment's name, its header's name rewritten to match:
    // the signature covers the name.
    let text = String::from_utf8_lossy(&object[..500]).into_owned();
    let header_len = text.find("\n\n").unwrap() + 2;
    let header = text[..header_len].replace(
        "name 000000010000000000000007",
        "name 000000010000000000000008",
    );
    let mut renamed = header.into_bytes();
    renamed.extend_from_slice(&object[header_len..]);
    fs::write(
        store.join("cluster/main/wal/000000010000000000000008"),
        &renamed,
    )
    .unwrap();
    for extra in [&[][..], &["--allow-unsigned"][..]] {
        let stderr = fetch(200, "main", "000000010000000000000008", extra);
        assert!(
            stderr.contains("refused WAL object")
                && stderr.contains("cluster/main/wal/000000010000000000000008")
                && stderr.contains("does not match"),
            "{stderr}"
        );
        assert!(!fetched.exists(), "nothing reached pg_wal");
    }

    // The object unchanged in another cluster's folder: the signature covers the cluster.
    fs::create_dir_all(store.join("cluster/other/wal")).unwrap();
    fs::write(
        store.join("cluster/other/wal/000000010000000000000007"),
        &object,
    )
    .unwrap();
    let stderr = fetch(200, "other", "000000010000000000000007", &[]);
    assert!(
        stderr.contains("cluster/other/wal/000000010000000000000007")
            && stderr.contains("does not match"),
        "{stderr}"
    );
    assert!(!fetched.exists(), "nothing reached pg_wal");
}

/// The retry rule with signatures: the same bytes stored unsigned, or signed by another key,
/// are stored again with this key's signature (the plain bytes are the same, so nothing is
/// lost, and the object becomes one a restore trusts); signed the same, nothing changes.
#[test]
fn a_re_push_of_the_same_bytes_signs_an_unsigned_or_otherwise_signed_copy_and_unsigned_needs_allowing()
 {
    let (world, store, _spool) = two_cluster_world();
    let config = world.config.to_str().unwrap();
    let wal_dir = world.dir.join("pg_wal");
    fs::create_dir(&wal_dir).unwrap();
    let name = "000000010000000000000009";
    let segment = wal_dir.join(name);
    let bytes: Vec<u8> = (0..50_000u32).map(|i| (i % 239) as u8).collect();
    fs::write(&segment, &bytes).unwrap();
    let object = store.join(format!("cluster/main/wal/{name}"));
    fs::create_dir_all(object.parent().unwrap()).unwrap();
    // As pushed before WAL was signed.
    fs::write(&object, forged_object(&world, name, &bytes, None)).unwrap();
    let fetched = wal_dir.join("RECOVERYXLOG");
    let fetch = |code: i32, config: &str, extra: &[&str]| {
        let mut args = vec!["wal-fetch", "-c", config, "--cluster", "main"];
        args.extend(extra);
        args.extend([name, fetched.to_str().unwrap()]);
        let (_, stderr) = world.backupd(code, &args, &[]);
        let _ = fs::remove_file(&fetched);
        stderr
    };
    let stderr = fetch(200, config, &[]);
    assert!(
        stderr.contains("has no signature") && stderr.contains(name),
        "{stderr}"
    );
    fetch(0, config, &["--allow-unsigned"]);

    let push = |config: &str| {
        world.push_main(0, config, &segment);
        fs::read(&object).unwrap()
    };
    let signed = push(config);
    assert!(
        signed.starts_with(b"backupd-wal 2\n"),
        "signed on the retry"
    );
    fetch(0, config, &[]);
    assert_eq!(push(config), signed, "signed the same: left as it is");

    // Another WAL key (a new archiver config): the same bytes are signed again with it, and a
    // host that does not trust that key refuses them.
    let other_key = world.dir.join("other-wal.sign");
    world.backupd(
        0,
        &["keygen", "--wal", "-o", other_key.to_str().unwrap()],
        &[],
    );
    let text = fs::read_to_string(&world.config).unwrap();
    let wal_line = text
        .lines()
        .find(|l| l.starts_with("wal_key_file"))
        .unwrap();
    let other_config = world.dir.join("other.toml");
    fs::write(
        &other_config,
        text.replace(wal_line, &format!("wal_key_file = {other_key:?}")),
    )
    .unwrap();
    let other_config = other_config.to_str().unwrap();
    let resigned = push(other_config);
    assert_ne!(resigned, signed);
    fetch(0, other_config, &[]);
    let stderr = fetch(200, config, &["--allow-unsigned"]);
    assert!(stderr.contains("not a trusted WAL key"), "{stderr}");

    // Without a WAL key, wal-push archives nothing; a WAL key trusted for manifests is refused.
    let keyless = world.dir.join("keyless.toml");
    fs::write(&keyless, text.replace(wal_line, "")).unwrap();
    let stderr = world.push_main(78, keyless.to_str().unwrap(), &segment);
    assert!(stderr.contains("wal_key_file"), "{stderr}");
    let mixed = world.dir.join("mixed.toml");
    fs::write(
        &mixed,
        text.replace(
            wal_line,
            &format!(
                "{wal_line}\npublic_keys = [{:?}]",
                fs::read_to_string(world.dir.join("wal.sign"))
                    .unwrap()
                    .lines()
                    .find_map(|l| l.strip_prefix("# public key: "))
                    .unwrap()
            ),
        ),
    )
    .unwrap();
    let (_, stderr) = world.backupd(78, &["check", "-c", mixed.to_str().unwrap()], &[]);
    assert!(stderr.contains("trusted for manifests too"), "{stderr}");
}

/// Issue 21: a short store outage never stalls the archiver, and a store that accepts
/// connections and never answers is an outage too. With upload_timeout_secs = 2, wal-push
/// spools the segment and succeeds within the bound (the SDK alone would wait 300 s), and the
/// spool drains once a working store is configured.
#[tokio::test(flavor = "multi_thread")]
async fn wal_push_to_a_store_that_never_answers_spools_within_the_upload_timeout() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hung = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        // Accepts and holds every connection, reads nothing, answers nothing.
        let mut held = Vec::new();
        for stream in listener.incoming() {
            held.push(stream);
        }
    });
    let target = |endpoint: &str, bucket: &str| {
        format!(
            "[[target]]\nname = \"s3\"\nurl = \"s3://{bucket}/lab\"\n\
             [s3]\nendpoint = {endpoint:?}\nregion = {:?}\naccess_key_id = {:?}\n\
             secret_access_key = {:?}\n",
            testkit::s3::REGION,
            testkit::s3::ACCESS_KEY,
            testkit::s3::SECRET_KEY
        )
    };
    let world = World::new(&target(&hung, "hung"), "upload_timeout_secs = 2");
    let config = world.config.to_str().unwrap().to_owned();
    let wal_dir = world.dir.join("pg_wal");
    fs::create_dir(&wal_dir).unwrap();
    let name = "000000010000000000000005";
    fs::write(wal_dir.join(name), vec![5u8; 1_000_000]).unwrap();

    let began = Instant::now();
    world.backupd(
        0,
        &[
            "wal-push",
            "-c",
            &config,
            wal_dir.join(name).to_str().unwrap(),
        ],
        &[],
    );
    let took = began.elapsed();
    assert!(took < Duration::from_secs(8), "wal-push took {took:?}");
    assert_eq!(spooled(&world), 1, "the segment waits in the spool");

    let server = S3Server::start().unwrap();
    let bucket = server.bucket().await.unwrap();
    let text = fs::read_to_string(&world.config)
        .unwrap()
        .replace(&target(&hung, "hung"), &target(&server.endpoint(), &bucket));
    fs::write(&world.config, text).unwrap();
    let (stdout, _) = world.backupd(0, &["wal-push", "-c", &config, "--drain"], &[]);
    assert!(stdout.contains("stored 1, still queued 0"), "{stdout}");
    assert_eq!(spooled(&world), 0);
    assert_eq!(stored_wal(&server, &bucket).await, [name]);
}
