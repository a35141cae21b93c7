//! backupd with several stores, one-table restores and the operational options (pre_hook,
//! retention by year and span, metrics): the real binary against real PostgreSQL clusters and
//! real S3 servers.

use std::ffi::OsString;
use std::fs;

use std::time::Duration;

use testkit::{PgCluster, Proc, ProcBuilder, S3Server, Scratch};

const BACKUPD: &str = env!("CARGO_BIN_EXE_backupd");
const WAIT: Duration = Duration::from_secs(300);

/// A cluster, a scratch folder, and the environment for the binary (no `AWS_*`: each target
/// of these tests names its own store).
struct Lab {
    cluster: PgCluster,
    dir: Scratch,
    env: Vec<(OsString, OsString)>,
}

impl Lab {
    fn new() -> Lab {
        let cluster = PgCluster::start().unwrap();
        let dir = Scratch::new("backupd-stores").unwrap();
        let mut env = cluster.env();
        env.push(("HOME".into(), dir.path().into()));
        env.push(("AWS_CONFIG_FILE".into(), "/dev/null".into()));
        env.push(("AWS_SHARED_CREDENTIALS_FILE".into(), "/dev/null".into()));
        env.push(("AWS_EC2_METADATA_DISABLED".into(), "true".into()));
        Lab { cluster, dir, env }
    }

    /// Writes a config with its own lock file and a signing key made by `backupd keygen`.
    fn write_config(&self, text: &str) -> String {
        let key = self.dir.join("backupd.sign");
        if !key.exists() {
            self.expect(0, &["keygen", "-o", key.to_str().unwrap()]);
        }
        let path = self.dir.join("backupd.toml");
        let lock = self.dir.join("backupd.lock");
        fs::write(
            &path,
            format!(
                "lock_file = {:?}\n{text}\n[signing]\nkey_file = {:?}\n",
                lock.display().to_string(),
                key.display().to_string()
            ),
        )
        .unwrap();
        path.to_str().unwrap().to_owned()
    }

    fn backupd(&self, args: &[&str]) -> Proc {
        ProcBuilder::new(BACKUPD)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .spawn()
            .unwrap()
    }

    /// Runs backupd and expects `code`; returns stdout and stderr.
    fn expect(&self, code: i32, args: &[&str]) -> (String, String) {
        let proc = self.backupd(args);
        proc.expect_exit(code, WAIT)
            .unwrap_or_else(|e| panic!("backupd {args:?}: {e}: {}", proc.stderr()));
        (proc.stdout(), proc.stderr())
    }

    /// IDs of the backups on one target, sorted.
    fn ids_on(&self, config: &str, target: &str) -> Vec<String> {
        let (stdout, _) = self.expect(0, &["list", "-c", config, "--target", target]);
        let mut ids: Vec<String> = stdout
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_owned)
            .collect();
        ids.sort();
        ids
    }

    fn sql(&self, db: &str, sql: &str) -> String {
        self.cluster.psql(db, sql).unwrap().trim().to_owned()
    }
}

/// The rows of a table as one checksum, in a stable order.
fn table_digest(lab: &Lab, db: &str, table: &str) -> String {
    lab.sql(
        db,
        &format!("SELECT count(*) || ':' || md5(string_agg(t::text, ',' ORDER BY t::text)) FROM {table} t"),
    )
}

fn sorted(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread")]
async fn backups_reach_the_offsite_store_which_delays_only_the_copy_while_down() {
    let lab = Lab::new();
    let local = S3Server::start().unwrap();
    let mut offsite = S3Server::start().unwrap();
    let (local_bucket, offsite_bucket) = (
        local.bucket().await.unwrap(),
        offsite.bucket().await.unwrap(),
    );
    lab.sql("postgres", "CREATE DATABASE shop");
    lab.sql(
        "shop",
        "CREATE TABLE items (id serial PRIMARY KEY, name text); \
         INSERT INTO items (name) SELECT 'item-' || g FROM generate_series(1, 300) g",
    );
    fs::create_dir_all(lab.dir.join("data")).unwrap();
    fs::write(lab.dir.join("data/app.ini"), "[server]\nDOMAIN = lab\n").unwrap();
    // The local store's key comes from [s3]; the off-site one's from its own table and the
    // systemd credential named after the target.
    let secret = lab.dir.join("local.secret");
    fs::write(&secret, testkit::s3::SECRET_KEY).unwrap();
    let credentials = lab.dir.join("credentials");
    fs::create_dir_all(&credentials).unwrap();
    fs::write(
        credentials.join("target.offsite.secret_access_key"),
        testkit::s3::SECRET_KEY,
    )
    .unwrap();
    let mut lab = lab;
    lab.env
        .push(("CREDENTIALS_DIRECTORY".into(), credentials.into()));
    let config = lab.write_config(&format!(
        r#"
[[source]]
name = "shop"
type = "postgres"
databases = ["shop"]

[[source]]
name = "files"
type = "folder"
path = "data"

[[target]]
name = "local"
url = "s3://{local_bucket}/lab"
copy_to = ["offsite"]

[[target]]
name = "offsite"
url = "s3://{offsite_bucket}/lab"
endpoint = "{offsite_endpoint}"
region = "{region}"
path_style = true
access_key_id = "{access}"

[target.retention]
keep_last = 3

[retention]
keep_last = 2

[s3]
endpoint = "{local_endpoint}"
region = "{region}"
access_key_id = "{access}"
secret_access_key_file = "local.secret"
"#,
        offsite_endpoint = offsite.endpoint(),
        local_endpoint = local.endpoint(),
        region = testkit::s3::REGION,
        access = testkit::s3::ACCESS_KEY,
    ));
    let config = config.as_str();

    // 1. Both stores up: every backup is on both.
    let (first, _) = lab.expect(0, &["run", "-c", config]);
    let first = sorted(first.lines().map(str::to_owned).collect());
    assert_eq!(first.len(), 2, "{first:?}");
    assert_eq!(lab.ids_on(config, "local"), first);
    assert_eq!(lab.ids_on(config, "offsite"), first);

    // 2. The off-site store is down: the backup is made and pruned locally, the copy is
    //    reported pending with status 75, and nothing else fails.
    offsite.kill().unwrap();
    let (second, stderr) = lab.expect(75, &["run", "-c", config]);
    let second = sorted(second.lines().map(str::to_owned).collect());
    assert_eq!(second.len(), 2, "the backups are made: {second:?}");
    assert!(
        stderr.contains("copy from target local to offsite is pending"),
        "{stderr}"
    );
    let on_local = lab.ids_on(config, "local");
    assert_eq!(on_local, sorted([first.clone(), second.clone()].concat()));

    // 3. Back up: the next pass copies what it missed; the off-site store keeps three a
    //    subject, the local one two.
    offsite.restart().unwrap();
    let (third, _) = lab.expect(0, &["run", "-c", config]);
    let third = sorted(third.lines().map(str::to_owned).collect());
    assert_eq!(
        lab.ids_on(config, "local"),
        sorted([second.clone(), third.clone()].concat())
    );
    assert_eq!(
        lab.ids_on(config, "offsite"),
        sorted([first.clone(), second.clone(), third.clone()].concat())
    );
    let (fourth, _) = lab.expect(0, &["run", "-c", config]);
    let fourth = sorted(fourth.lines().map(str::to_owned).collect());
    assert_eq!(
        lab.ids_on(config, "offsite"),
        sorted([second.clone(), third.clone(), fourth.clone()].concat()),
        "off-site retention keeps three a subject"
    );
    assert_eq!(
        lab.ids_on(config, "local"),
        sorted([third.clone(), fourth.clone()].concat())
    );

    // 4. A restore works from either store. The second pass's backups were made while the
    //    off-site store was down; they restore from there all the same.
    let database = second
        .iter()
        .find(|id| id.starts_with("shop.shop@"))
        .unwrap();
    let files = fourth.iter().find(|id| id.starts_with("files@")).unwrap();
    lab.sql(
        "shop",
        "INSERT INTO items (name) VALUES ('after the backups')",
    );
    lab.expect(
        0,
        &[
            "restore",
            "-c",
            config,
            database,
            "--target",
            "offsite",
            "--to-db",
            "shop_offsite",
        ],
    );
    let fresh = fourth
        .iter()
        .find(|id| id.starts_with("shop.shop@"))
        .unwrap();
    lab.expect(
        0,
        &[
            "restore",
            "-c",
            config,
            fresh,
            "--target",
            "local",
            "--to-db",
            "shop_local",
        ],
    );
    let digest = table_digest(&lab, "shop_offsite", "items");
    assert!(digest.starts_with("300:"), "{digest}");
    assert_eq!(digest, table_digest(&lab, "shop_local", "items"));
    for target in ["local", "offsite"] {
        let to = lab.dir.join(format!("restored-{target}"));
        lab.expect(
            0,
            &[
                "restore",
                "-c",
                config,
                files,
                "--target",
                target,
                "--to-dir",
                to.to_str().unwrap(),
            ],
        );
        assert_eq!(
            fs::read_to_string(to.join("app.ini")).unwrap(),
            "[server]\nDOMAIN = lab\n"
        );
    }
    drop(local);
}

#[test]
fn one_table_restores_from_a_dump_equal_to_the_original() {
    let lab = Lab::new();
    lab.sql("postgres", "CREATE DATABASE shop");
    lab.sql(
        "shop",
        r#"CREATE SCHEMA "Sales Dept";
           CREATE TABLE "Sales Dept"."order.lines" (id int PRIMARY KEY, item text, qty numeric, at timestamptz);
           INSERT INTO "Sales Dept"."order.lines"
             SELECT g, 'item ' || g || E'\t"quoted"', g * 1.5, '2026-01-01'::timestamptz + g * interval '1 hour'
             FROM generate_series(1, 2000) g;
           CREATE TABLE public.other (id int);
           INSERT INTO public.other SELECT generate_series(1, 10);"#,
    );
    let config = lab.write_config(
        "[[source]]\nname = \"shop\"\ntype = \"postgres\"\ndatabases = [\"shop\"]\n\
         [[target]]\nname = \"disk\"\nurl = \"backups\"\n",
    );
    let config = config.as_str();
    let (made, _) = lab.expect(0, &["run", "-c", config]);
    let id = made.trim();
    let table = r#""Sales Dept"."order.lines""#;
    let original = table_digest(&lab, "shop", table);
    assert!(original.starts_with("2000:"), "{original}");
    // Into a scratch database that does not exist yet: only that table is there.
    lab.expect(
        0,
        &[
            "restore", "-c", config, id, "--table", table, "--to-db", "scratch",
        ],
    );
    assert_eq!(table_digest(&lab, "scratch", table), original);
    assert_eq!(
        lab.sql("scratch", "SELECT count(*) FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"),
        "1"
    );
    // Beside the original under a new name, after the original changed.
    lab.sql("shop", &format!("DELETE FROM {table} WHERE id > 10"));
    lab.expect(
        0,
        &[
            "restore",
            "-c",
            config,
            id,
            "--table",
            table,
            "--to-table",
            "lines_before",
        ],
    );
    assert_eq!(
        table_digest(&lab, "shop", r#""Sales Dept".lines_before"#),
        original
    );
    // A second time is refused, unless forced.
    let (_, stderr) = lab.expect(
        73,
        &[
            "restore",
            "-c",
            config,
            id,
            "--table",
            table,
            "--to-table",
            "lines_before",
        ],
    );
    assert!(stderr.contains("lines_before"), "{stderr}");
    lab.expect(
        0,
        &[
            "restore",
            "-c",
            config,
            id,
            "--table",
            table,
            "--to-table",
            "lines_before",
            "--force",
        ],
    );
    // A table the dump does not hold is named, and nothing is created.
    let (_, stderr) = lab.expect(
        64,
        &[
            "restore",
            "-c",
            config,
            id,
            "--table",
            "public.missing",
            "--to-db",
            "nowhere",
        ],
    );
    assert!(
        stderr.contains(r#"table "public"."missing" is not in backup"#),
        "{stderr}"
    );
    assert_eq!(
        lab.sql("postgres", "SELECT count(*) FROM pg_database WHERE datname = 'nowhere' OR datname LIKE 'backupd_table%'"),
        "0"
    );
}

#[test]
fn a_failing_pre_hook_skips_its_source_reports_it_and_prunes_nothing() {
    let lab = Lab::new();
    for folder in ["gitea", "other"] {
        fs::create_dir_all(lab.dir.join(folder)).unwrap();
        fs::write(lab.dir.join(folder).join("file"), folder).unwrap();
    }
    fs::write(lab.dir.join("allow"), "").unwrap();
    let allow = lab.dir.join("allow");
    let post = lab.dir.join("post-ran");
    let metrics = lab.dir.join("backupd.prom");
    let config = lab.write_config(&format!(
        r#"metrics_file = "backupd.prom"

[[source]]
name = "gitea"
type = "folder"
path = "gitea"
pre_hook = "test -e {allow} || {{ echo 'gitea is busy' >&2; exit 3; }}"
post_hook = ["/bin/sh", "-c", "echo $BACKUPD_SOURCE > {post}"]

[[source]]
name = "other"
type = "folder"
path = "other"

[[target]]
name = "disk"
url = "backups"

[retention]
keep_last = 1
"#,
        allow = allow.display(),
        post = post.display(),
    ));
    let config = config.as_str();
    let (first, _) = lab.expect(0, &["run", "-c", config]);
    assert_eq!(first.lines().count(), 2, "{first}");
    assert_eq!(fs::read_to_string(&post).unwrap(), "gitea\n");
    let text = fs::read_to_string(&metrics).unwrap();
    assert!(text.contains("backupd_pass_success 1\n"), "{text}");
    for subject in ["gitea", "other"] {
        assert!(
            text.contains(&format!(
                "backupd_last_size_bytes{{source=\"{subject}\",subject=\"{subject}\",target=\"disk\"}}"
            )),
            "{text}"
        );
    }

    fs::remove_file(&allow).unwrap();
    fs::remove_file(&post).unwrap();
    let (second, stderr) = lab.expect(1, &["run", "-c", config]);
    assert_eq!(second.lines().count(), 1, "only the other source: {second}");
    assert!(second.starts_with("other@"), "{second}");
    assert!(
        stderr.contains("the pre_hook of source gitea failed") && stderr.contains("gitea is busy"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("test -e"),
        "the command line is not logged: {stderr}"
    );
    assert!(!post.exists(), "no post_hook after a failed pre_hook");
    // Nothing is pruned: the other source keeps both of its backups.
    let ids = lab.ids_on(config, "disk");
    assert_eq!(
        ids.iter().filter(|id| id.starts_with("other@")).count(),
        2,
        "{ids:?}"
    );
    assert_eq!(
        ids.iter().filter(|id| id.starts_with("gitea@")).count(),
        1,
        "{ids:?}"
    );
    let text = fs::read_to_string(&metrics).unwrap();
    assert!(text.contains("backupd_pass_success 0\n"), "{text}");
    assert!(text.contains("backupd_pass_failures 1\n"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_target_of_its_own_stores_with_its_storage_class() {
    let lab = Lab::new();
    // moto records the storage class of each object and reports it back.
    let store = S3Server::start_moto().unwrap();
    let bucket = store.bucket().await.unwrap();
    fs::create_dir_all(lab.dir.join("data")).unwrap();
    fs::write(lab.dir.join("data/big"), vec![7u8; 64 * 1024]).unwrap();
    let secret = lab.dir.join("offsite.secret");
    fs::write(&secret, testkit::s3::SECRET_KEY).unwrap();
    let config = lab.write_config(&format!(
        r#"
[[source]]
name = "files"
type = "folder"
path = "data"

[[target]]
name = "cold"
url = "s3://{bucket}/lab"
endpoint = "{endpoint}"
region = "{region}"
access_key_id = "{access}"
secret_access_key_file = "offsite.secret"
storage_class = "STANDARD_IA"
"#,
        endpoint = store.endpoint(),
        region = testkit::s3::REGION,
        access = testkit::s3::ACCESS_KEY,
    ));
    let (made, _) = lab.expect(0, &["run", "-c", &config]);
    let id = made.trim();
    let (subject, stamp) = id.split_once('@').unwrap();
    let client = store.client().await;
    let listed = client
        .list_objects_v2()
        .bucket(&bucket)
        .prefix(format!("lab/{subject}/{stamp}/"))
        .send()
        .await
        .unwrap();
    let keys: Vec<&str> = listed.contents().iter().filter_map(|o| o.key()).collect();
    assert!(keys.len() >= 3, "data, signature and manifest: {keys:?}");
    for key in keys {
        let head = client
            .head_object()
            .bucket(&bucket)
            .key(key)
            .send()
            .await
            .unwrap();
        assert_eq!(
            head.storage_class().map(|c| c.as_str()),
            Some("STANDARD_IA"),
            "{key}"
        );
    }
    lab.expect(0, &["verify", "-c", &config, id]);
}

#[test]
fn the_daemon_serves_the_metrics_of_every_target() {
    let lab = Lab::new();
    fs::create_dir_all(lab.dir.join("data")).unwrap();
    fs::write(lab.dir.join("data/file"), "x").unwrap();
    let config = lab.write_config(
        "metrics_addr = \"127.0.0.1:0\"\n\
         [[source]]\nname = \"files\"\ntype = \"folder\"\npath = \"data\"\n\
         [[target]]\nname = \"disk\"\nurl = \"backups\"\n\
         [schedule]\nat = [\"03:15\"]\n",
    );
    lab.expect(0, &["run", "-c", &config]);
    let daemon = ProcBuilder::new(BACKUPD)
        .args(["daemon", "-c", &config])
        .envs(lab.env.iter().map(|(k, v)| (k, v)))
        .notify()
        .spawn()
        .unwrap();
    daemon.wait_ready(WAIT).unwrap();
    let line = daemon.wait_output("serving metrics", WAIT).unwrap();
    let addr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_owned();
    let get = |path: &str| {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(&addr).unwrap();
        write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    };
    let response = get("/metrics");
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    assert!(
        response.contains("backupd_last_success_timestamp_seconds{source=\"files\",subject=\"files\",target=\"disk\"}"),
        "{response}"
    );
    assert!(
        response.contains("backupd_target_up{target=\"disk\"} 1"),
        "{response}"
    );
    assert!(get("/").starts_with("HTTP/1.1 404"));
    daemon.stop(WAIT).unwrap();
}

/// Files under a folder target, relative to it, sorted.
fn files_under(root: &std::path::Path) -> Vec<String> {
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
fn a_copy_takes_loose_objects_leaves_unfinished_backups_and_refuses_forged_data() {
    let lab = Lab::new();
    fs::create_dir_all(lab.dir.join("data")).unwrap();
    fs::write(lab.dir.join("data/file"), "x".repeat(1000)).unwrap();
    let config = lab.write_config(
        "[[source]]\nname = \"files\"\ntype = \"folder\"\npath = \"data\"\n\
         [[target]]\nname = \"home\"\nurl = \"home\"\ncopy_to = [\"away\"]\n\
         [[target]]\nname = \"away\"\nurl = \"away\"\n\
         [target.retention]\nkeep_last = 1\n",
    );
    let (home, away) = (lab.dir.join("home"), lab.dir.join("away"));
    // What another writer left under the source target: a WAL segment (copied as it is) and
    // a backup that never got its manifest (not copied).
    fs::create_dir_all(home.join("wal/main")).unwrap();
    fs::write(home.join("wal/main/000000010000000000000001"), "segment").unwrap();
    fs::create_dir_all(home.join("files/20200101T000000.000Z")).unwrap();
    fs::write(home.join("files/20200101T000000.000Z/data.tar.zst"), "half").unwrap();
    let (first, _) = lab.expect(0, &["run", "-c", &config]);
    let first = first.trim().to_owned();
    let on_away = files_under(&away);
    assert!(
        on_away.contains(&"wal/main/000000010000000000000001".to_owned()),
        "{on_away:?}"
    );
    assert!(
        !on_away.iter().any(|f| f.starts_with("files/20200101")),
        "{on_away:?}"
    );
    assert_eq!(lab.ids_on(&config, "away"), [first]);

    let (second, stderr) = lab.expect(0, &["run", "-c", &config]);
    let second = second.trim().to_owned();
    assert_eq!(
        lab.ids_on(&config, "away"),
        std::slice::from_ref(&second),
        "keep_last = 1 off-site: {stderr}"
    );

    // A backup made to the source alone (by a config without the destination) has its data swapped
    // there (same size): the next copy refuses it, writes no manifest for it, and prunes
    // nothing off-site.
    let home_only = lab.dir.join("home-only.toml");
    fs::write(
        &home_only,
        fs::read_to_string(&config)
            .unwrap()
            .replace("copy_to = [\"away\"]\n", "")
            .replace(
                "[[target]]\nname = \"away\"\nurl = \"away\"\n[target.retention]\nkeep_last = 1\n",
                "",
            ),
    )
    .unwrap();
    let home_only = home_only.to_str().unwrap();
    let (forged_id, _) = lab.expect(0, &["run", "-c", home_only]);
    let (subject, stamp) = forged_id.trim().split_once('@').unwrap();
    let folder = format!("{subject}/{stamp}");
    let data = files_under(&home.join(&folder))
        .into_iter()
        .find(|f| f.starts_with("data."))
        .unwrap();
    let mut forged = fs::read(home.join(&folder).join(&data)).unwrap();
    let middle = forged.len() / 2;
    forged[middle] ^= 0xff;
    fs::write(home.join(&folder).join(&data), &forged).unwrap();
    let (third, stderr) = lab.expect(75, &["run", "-c", &config]);
    let third = third.trim().to_owned();
    assert!(stderr.contains("does not match its manifest"), "{stderr}");
    assert!(
        !away.join(&folder).exists(),
        "neither the refused data nor a manifest for it: {:?}",
        files_under(&away)
    );
    assert_eq!(
        lab.ids_on(&config, "away"),
        sorted(vec![second.clone(), third.clone()]),
        "nothing pruned off-site while the copy is incomplete"
    );
    // Older than what the destination holds now, the refused backup is not retried; the
    // next pass completes and retention resumes.
    let (fourth, _) = lab.expect(0, &["run", "-c", &config]);
    assert_eq!(lab.ids_on(&config, "away"), [fourth.trim().to_owned()]);
}
