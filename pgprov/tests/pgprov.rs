//! pgprov end to end: the real binary against a real PostgreSQL cluster (testkit), with the
//! created credentials tested by real logins over TCP with SCRAM.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::Signal;
use testkit::{PgCluster, Proc, ProcBuilder, Scratch};

const PGPROV: &str = env!("CARGO_BIN_EXE_pgprov");
const WAIT: Duration = Duration::from_secs(120);

/// A test's world: a cluster logging every statement, a scratch folder as HOME, and the
/// libpq environment that makes pgprov connect as superuser over the Unix socket.
struct Lab {
    cluster: PgCluster,
    dir: Scratch,
    env: Vec<(OsString, OsString)>,
}

impl Lab {
    fn new() -> Lab {
        let cluster = PgCluster::builder()
            .setting("log_statement", "all")
            .start()
            .unwrap();
        let dir = Scratch::new("pgprov").unwrap();
        let mut env = cluster.env();
        env.push(("HOME".into(), dir.path().into()));
        Lab { cluster, dir, env }
    }

    /// The same environment as another admin role.
    fn env_as(&self, user: &str) -> Vec<(OsString, OsString)> {
        let mut env: Vec<_> = self
            .env
            .iter()
            .filter(|(k, _)| k != "PGUSER")
            .cloned()
            .collect();
        env.push(("PGUSER".into(), user.into()));
        env
    }

    fn spawn(&self, env: &[(OsString, OsString)], args: &[&str]) -> Proc {
        ProcBuilder::new(PGPROV)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .spawn()
            .unwrap()
    }

    /// Runs pgprov, expects exit `code`; returns stdout and stderr.
    fn expect(&self, code: i32, args: &[&str]) -> (String, String) {
        self.expect_with(&self.env, code, args)
    }

    fn expect_with(
        &self,
        env: &[(OsString, OsString)],
        code: i32,
        args: &[&str],
    ) -> (String, String) {
        let proc = self.spawn(env, args);
        proc.expect_exit(code, WAIT).unwrap();
        (proc.stdout(), proc.stderr())
    }

    /// `pgprov create NAME --host 127.0.0.1 ARGS...`: the URI (or other format) on stdout.
    fn create(&self, name: &str, extra: &[&str]) -> String {
        let mut args = vec!["create", name, "--host", "127.0.0.1"];
        args.extend(extra);
        let (stdout, _) = self.expect(0, &args);
        stdout
    }

    fn sql(&self, db: &str, sql: &str) -> String {
        self.cluster.psql(db, sql).unwrap().trim().to_owned()
    }

    /// Runs psql with a connection string and nothing else from the environment (no PG*
    /// variables, HOME without a .pgpass), so the credentials alone must log in, over TCP.
    fn psql_as(&self, conninfo: &str, sql: &str) -> Result<String, testkit::Error> {
        testkit::proc::run(
            self.cluster.bin("psql"),
            &[
                "-X".as_ref(),
                "-A".as_ref(),
                "-t".as_ref(),
                "-w".as_ref(),
                "-v".as_ref(),
                "ON_ERROR_STOP=1".as_ref(),
                conninfo.as_ref(),
                "-c".as_ref(),
                sql.as_ref(),
            ],
            &[("HOME".into(), self.dir.path().into())],
        )
        .map(|out| out.trim().to_owned())
    }

    fn roles(&self, name: &str) -> String {
        self.sql(
            "postgres",
            &format!("SELECT count(*) FROM pg_roles WHERE rolname = '{name}'"),
        )
    }

    fn databases(&self, name: &str) -> String {
        self.sql(
            "postgres",
            &format!("SELECT count(*) FROM pg_database WHERE datname = '{name}'"),
        )
    }

    /// Roles, databases, their owners and privileges, and every default ACL: what pgprov
    /// could change.
    fn catalog_snapshot(&self) -> String {
        let mut out = self.sql(
            "postgres",
            "SELECT string_agg(rolname || ' ' || rolcanlogin || ' ' || rolconnlimit, ';' ORDER BY rolname) FROM pg_roles; \
             SELECT string_agg(datname || ' ' || pg_get_userbyid(datdba) || ' ' || coalesce(datacl::text, '-'), ';' ORDER BY datname) FROM pg_database",
        );
        for db in ["ci", "dw", "gitea", "jupyterhub", "metabase"] {
            if self.databases(db) == "1" {
                out.push_str(&self.sql(
                    db,
                    "SELECT coalesce(string_agg(defaclacl::text, ';'), '-') FROM pg_default_acl",
                ));
            }
        }
        out
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.join(name);
        fs::write(&path, text).unwrap();
        path
    }
}

fn stdout_line(stdout: &str) -> &str {
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line on stdout: {stdout:?}");
    lines[0]
}

/// Logs in with `config` (no TLS) and returns the one text value `sql` yields.
async fn query_as(config: &tokio_postgres::Config, sql: &str) -> String {
    let (client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    let driver = tokio::spawn(connection);
    let value: String = client.query_one(sql, &[]).await.unwrap().get(0);
    drop(client);
    driver.await.unwrap().unwrap();
    value
}

/// The same URI with another database.
fn in_db(uri: &str, db: &str) -> String {
    let slash = uri.rfind('/').unwrap();
    format!("{}/{db}", &uri[..slash])
}

/// The password inside a `postgresql://user:password@...` URI.
fn password_of(uri: &str) -> &str {
    let rest = uri.strip_prefix("postgresql://").unwrap();
    let userinfo = &rest[..rest.find('@').unwrap()];
    &userinfo[userinfo.find(':').unwrap() + 1..]
}

#[test]
fn create_prints_a_uri_that_owns_its_database_and_never_logs_the_password() {
    let lab = Lab::new();
    let stdout = lab.create("metabase", &[]);
    let uri = stdout_line(&stdout);
    let port = lab.cluster.port();
    assert!(
        uri.starts_with("postgresql://metabase:")
            && uri.ends_with(&format!("@127.0.0.1:{port}/metabase")),
        "{uri}"
    );
    let password = password_of(uri);
    assert_eq!(password.len(), 64, "32 random bytes as hex");

    // The role owns its database, so it may create tables in public on PostgreSQL 15+.
    lab.psql_as(uri, "create table t(x int); insert into t values (1)")
        .unwrap();
    assert_eq!(lab.psql_as(uri, "select current_user").unwrap(), "metabase");
    assert_eq!(
        lab.sql(
            "postgres",
            "SELECT pg_get_userbyid(datdba) || ' ' || pg_encoding_to_char(encoding) FROM pg_database WHERE datname = 'metabase'"
        ),
        "metabase UTF8"
    );

    // The server saw the verifier, never the password.
    let log = lab.cluster.log();
    assert!(
        log.contains("CREATE ROLE \"metabase\" LOGIN PASSWORD 'SCRAM-SHA-256$4096:"),
        "statements are logged"
    );
    assert!(!log.contains(password), "the password is in the server log");

    // Another provisioned role cannot connect to metabase: PUBLIC has no CONNECT.
    let other = lab.create("gitea", &[]);
    let other_uri = stdout_line(&other);
    let into_metabase = in_db(other_uri, "metabase");
    let err = lab
        .psql_as(&into_metabase, "select 1")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("permission denied for database \"metabase\""),
        "{err}"
    );
    assert!(!lab.cluster.log().contains(password_of(other_uri)));
}

#[tokio::test]
async fn every_credentials_format_parses_back() {
    let lab = Lab::new();

    // uri: tokio-postgres parses it and logs in.
    let uri = lab.create("ci", &["--format", "uri"]);
    let config: tokio_postgres::Config = uri.trim().parse().unwrap();
    assert_eq!(query_as(&config, "select current_user::text").await, "ci");

    // env: sh sources it; psql logs in with the PG* variables alone, and with DATABASE_URL.
    let env = lab.create("gitea", &["--format", "env"]);
    let env_file = lab.write("gitea.env", &env);
    let psql = lab.cluster.bin("psql");
    let script = "set -a; . \"$1\"; set +a; \
                  \"$2\" -X -A -t -w -c 'select current_user' && \
                  PGHOST= PGPORT= PGUSER= PGPASSWORD= PGDATABASE= \"$2\" -X -A -t -w \"$DATABASE_URL\" -c 'select current_database()'";
    let out = testkit::proc::run(
        "sh",
        &[
            "-c".as_ref(),
            script.as_ref(),
            "sh".as_ref(),
            env_file.as_os_str(),
            psql.as_os_str(),
        ],
        &[("HOME".into(), lab.dir.path().into())],
    )
    .unwrap();
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["gitea", "gitea"]
    );
    assert_eq!(env.lines().count(), 6, "{env}");

    // json: serde_json parses it; its fields log in.
    let json = lab.create("dw", &["--format", "json"]);
    let value: serde_json::Value = serde_json::from_str(stdout_line(&json)).unwrap();
    let mut config = tokio_postgres::Config::new();
    config
        .host(value["host"].as_str().unwrap())
        .port(u16::try_from(value["port"].as_u64().unwrap()).unwrap())
        .user(value["user"].as_str().unwrap())
        .password(value["password"].as_str().unwrap())
        .dbname(value["database"].as_str().unwrap());
    assert_eq!(
        query_as(&config, "select current_database()::text").await,
        "dw"
    );
    let config: tokio_postgres::Config = value["uri"].as_str().unwrap().parse().unwrap();
    assert_eq!(query_as(&config, "select current_user::text").await, "dw");

    // pgpass: libpq finds the password through PGPASSFILE.
    let line = lab.create("metabase", &["--format", "pgpass"]);
    let pgpass = lab.write("pgpass", &line);
    fs::set_permissions(&pgpass, fs::Permissions::from_mode(0o600)).unwrap();
    let port = lab.cluster.port().to_string();
    let out = testkit::proc::run(
        &psql,
        &[
            "-X",
            "-A",
            "-t",
            "-w",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "metabase",
            "-d",
            "metabase",
            "-c",
            "select current_user",
        ]
        .map(OsStr::new),
        &[
            ("HOME".into(), lab.dir.path().into()),
            ("PGPASSFILE".into(), pgpass.into()),
        ],
    )
    .unwrap();
    assert_eq!(out.trim(), "metabase");
}

#[test]
fn create_refuses_what_exists_with_73_unless_if_not_exists() {
    let lab = Lab::new();
    lab.create("metabase", &[]);
    let (stdout, stderr) = lab.expect(73, &["create", "metabase"]);
    assert!(stdout.is_empty());
    assert!(
        stderr.contains("role and database metabase already exist"),
        "{stderr}"
    );

    let (stdout, stderr) = lab.expect(0, &["create", "metabase", "--if-not-exists"]);
    assert!(stdout.is_empty(), "{stdout}");
    assert!(stderr.contains("nothing done"), "{stderr}");

    // A database of that name owned by someone else: refused before the role is made.
    lab.sql("postgres", "CREATE DATABASE gitea");
    let (stdout, stderr) = lab.expect(73, &["create", "gitea"]);
    assert!(stdout.is_empty());
    assert!(
        stderr.contains("database gitea already exists (owned by postgres)"),
        "{stderr}"
    );
    assert_eq!(lab.roles("gitea"), "0");
    assert_eq!(
        lab.sql(
            "postgres",
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'gitea'"
        ),
        "postgres"
    );

    // A role without its database.
    lab.sql("postgres", "CREATE ROLE ci LOGIN");
    let (_, stderr) = lab.expect(73, &["create", "ci"]);
    assert!(
        stderr.contains("role ci already exists (without a database ci)"),
        "{stderr}"
    );
    assert_eq!(lab.databases("ci"), "0");
}

#[tokio::test]
async fn a_failure_after_the_role_is_made_removes_the_role_again() {
    let lab = Lab::new();
    // A session in template1 makes CREATE DATABASE fail after CREATE ROLE succeeded.
    let blocker = lab.cluster.connect("template1").await.unwrap();
    blocker.simple_query("select 1").await.unwrap();
    let (stdout, stderr) = lab.expect(75, &["create", "metabase"]);
    assert!(stdout.is_empty(), "{stdout}");
    assert!(stderr.contains("creating database metabase"), "{stderr}");
    assert!(stderr.contains("being accessed by other users"), "{stderr}");
    assert!(
        lab.cluster.log().contains("CREATE ROLE \"metabase\""),
        "the role was made first"
    );
    assert_eq!(lab.roles("metabase"), "0", "the role was removed again");
    assert_eq!(lab.databases("metabase"), "0");
    drop(blocker);
}

#[tokio::test]
async fn a_stop_signal_during_create_is_held_until_the_create_is_whole_or_undone() {
    let lab = Lab::new();
    let blocker = lab.cluster.connect("template1").await.unwrap();
    blocker.simple_query("select 1").await.unwrap();
    let proc = lab.spawn(&lab.env, &["create", "metabase", "--log-level", "debug"]);
    proc.wait_stderr("creating database metabase", WAIT)
        .unwrap();
    proc.signal(Signal::SIGTERM).unwrap();
    proc.expect_exit(75, WAIT).unwrap();
    assert!(
        proc.stderr().contains("stop signal received"),
        "{}",
        proc.stderr()
    );
    assert_eq!(lab.roles("metabase"), "0");
    assert_eq!(lab.databases("metabase"), "0");
    drop(blocker);
}

#[test]
fn bad_names_exit_65_before_any_statement_is_sent() {
    let lab = Lab::new();
    let long = "a".repeat(64);
    let names = [
        "Metabase",
        "meta\"base",
        "meta base",
        "meta;base",
        "meta'base",
        &long,
        "postgres",
        "template0",
        "template1",
        "pg_stats",
        "public",
        "",
        "1abc",
    ];
    for name in names {
        let (stdout, stderr) = lab.expect(65, &["create", name]);
        assert!(stdout.is_empty());
        assert!(stderr.contains("invalid name"), "{name}: {stderr}");
    }
    lab.expect(65, &["drop", "Metabase", "--yes"]);
    lab.expect(65, &["rotate", "pg_x"]);
    lab.expect(65, &["grant", "metabase", "--on", "a;b", "--read"]);
    lab.expect(65, &["grant", "Metabase", "--on", "dw", "--write"]);
    let (_, stderr) = lab.expect(65, &["create", &long]);
    assert!(stderr.contains("64 bytes"), "{stderr}");
    let log = lab.cluster.log();
    assert!(
        !log.contains("statement:"),
        "a statement reached the server:\n{log}"
    );
}

#[test]
fn an_admin_without_createrole_or_createdb_exits_77_naming_the_privilege() {
    let lab = Lab::new();
    lab.sql(
        "postgres",
        "CREATE ROLE weak LOGIN; CREATE ROLE halfway LOGIN CREATEDB",
    );
    let (_, stderr) = lab.expect_with(&lab.env_as("weak"), 77, &["create", "metabase"]);
    assert!(
        stderr.contains("admin role \"weak\" lacks CREATEROLE and CREATEDB"),
        "{stderr}"
    );
    let (_, stderr) = lab.expect_with(&lab.env_as("halfway"), 77, &["create", "metabase"]);
    assert!(stderr.contains("lacks CREATEROLE:"), "{stderr}");
    lab.expect_with(&lab.env_as("weak"), 77, &["rotate", "metabase"]);
    lab.expect_with(&lab.env_as("weak"), 77, &["drop", "metabase", "--yes"]);
    assert_eq!(lab.roles("metabase"), "0");
    assert_eq!(lab.databases("metabase"), "0");
}

#[test]
fn an_admin_with_createrole_and_createdb_but_not_superuser_manages_services() {
    let lab = Lab::new();
    lab.sql(
        "postgres",
        "CREATE ROLE provisioner LOGIN CREATEROLE CREATEDB",
    );
    let env = lab.env_as("provisioner");
    let (dw, _) = lab.expect_with(&env, 0, &["create", "dw", "--host", "127.0.0.1"]);
    let (mb, _) = lab.expect_with(&env, 0, &["create", "metabase", "--host", "127.0.0.1"]);
    lab.psql_as(
        dw.trim(),
        "create table facts(x int); insert into facts values (42)",
    )
    .unwrap();
    lab.expect_with(&env, 0, &["grant", "metabase", "--on", "dw", "--read"]);
    let into_dw = in_db(mb.trim(), "dw");
    assert_eq!(lab.psql_as(&into_dw, "select x from facts").unwrap(), "42");
    lab.expect_with(&env, 0, &["rotate", "metabase"]);
    lab.expect_with(&env, 0, &["drop", "metabase", "--yes"]);
    lab.expect_with(&env, 0, &["drop", "dw", "--yes"]);
    assert_eq!(lab.roles("dw") + &lab.roles("metabase"), "00");
    assert_eq!(lab.databases("dw") + &lab.databases("metabase"), "00");
}

#[test]
fn a_server_that_is_down_exits_69() {
    let mut lab = Lab::new();
    lab.cluster.stop().unwrap();
    for args in [
        &["create", "metabase"][..],
        &["list"],
        &["rotate", "metabase"],
        &["drop", "metabase", "--yes"],
    ] {
        let (stdout, stderr) = lab.expect(69, args);
        assert!(stdout.is_empty());
        assert!(stderr.contains("connecting to PostgreSQL"), "{stderr}");
    }
}

#[test]
fn sslmode_from_the_environment_is_honoured() {
    let lab = Lab::new();
    // Over TCP with the admin password from PGPASSWORD. The test server has no TLS, so
    // require must fail rather than fall back to plain text.
    let tcp = |sslmode: &str| -> Vec<(OsString, OsString)> {
        vec![
            ("HOME".into(), lab.dir.path().into()),
            ("PGHOST".into(), "127.0.0.1".into()),
            ("PGPORT".into(), lab.cluster.port().to_string().into()),
            ("PGUSER".into(), "postgres".into()),
            ("PGPASSWORD".into(), lab.cluster.superuser_password().into()),
            ("PGDATABASE".into(), "postgres".into()),
            ("PGSSLMODE".into(), sslmode.into()),
        ]
    };
    let env = tcp("require");
    let proc = lab.spawn(&env, &["create", "metabase"]);
    let status = proc.wait_exit(WAIT).unwrap();
    assert_ne!(status.code(), Some(0), "{}", proc.stderr());
    assert_eq!(lab.roles("metabase"), "0");
    let pw_leak = proc.stderr().contains(lab.cluster.superuser_password());
    assert!(!pw_leak, "the admin password leaked into an error message");

    lab.expect_with(&tcp("disable"), 0, &["create", "metabase"]);
    let env = tcp("bogus");
    let (_, stderr) = lab.expect_with(&env, 78, &["list"]);
    assert!(stderr.contains("sslmode"), "{stderr}");
}

#[test]
fn rotate_refuses_the_old_password_and_accepts_the_new() {
    let lab = Lab::new();
    let old = lab.create("metabase", &[]);
    let (new, _) = lab.expect(0, &["rotate", "metabase", "--host", "127.0.0.1"]);
    let (old, new) = (stdout_line(&old), stdout_line(&new));
    assert_ne!(old, new);
    let err = lab.psql_as(old, "select 1").unwrap_err().to_string();
    assert!(
        err.contains("password authentication failed for user \"metabase\""),
        "{err}"
    );
    assert_eq!(lab.psql_as(new, "select current_user").unwrap(), "metabase");
    assert!(!lab.cluster.log().contains(password_of(new)));

    let (_, stderr) = lab.expect(66, &["rotate", "nobody"]);
    assert!(stderr.contains("role nobody does not exist"), "{stderr}");
}

#[test]
fn grant_read_covers_future_tables_and_write_allows_inserts() {
    let lab = Lab::new();
    let dw = lab.create("dw", &[]);
    let dw = dw.trim();
    let mb = lab.create("metabase", &[]);
    let mb_in_dw = in_db(mb.trim(), "dw");
    lab.psql_as(dw, "create schema mart; create table facts(x int); insert into facts values (1); create table mart.sales(y int)")
        .unwrap();
    lab.expect(0, &["grant", "metabase", "--on", "dw", "--read"]);
    lab.expect(0, &["grant", "metabase", "--on", "dw", "--read"]);
    assert_eq!(lab.psql_as(&mb_in_dw, "select x from facts").unwrap(), "1");
    assert_eq!(
        lab.psql_as(&mb_in_dw, "select count(*) from mart.sales")
            .unwrap(),
        "0"
    );
    lab.psql_as(dw, "create table later(z int); insert into later values (7); create schema newer; create table newer.t(a int)")
        .unwrap();
    assert_eq!(lab.psql_as(&mb_in_dw, "select z from later").unwrap(), "7");
    assert_eq!(
        lab.psql_as(&mb_in_dw, "select count(*) from newer.t")
            .unwrap(),
        "0"
    );
    let err = lab
        .psql_as(&mb_in_dw, "insert into facts values (2)")
        .unwrap_err()
        .to_string();
    assert!(err.contains("permission denied for table facts"), "{err}");

    lab.expect(0, &["grant", "metabase", "--on", "dw", "--write"]);
    lab.psql_as(
        &mb_in_dw,
        "insert into facts values (2); update later set z = 8",
    )
    .unwrap();
    assert_eq!(lab.sql("dw", "select sum(x) from facts"), "3");

    let (_, stderr) = lab.expect(66, &["grant", "nobody", "--on", "dw", "--read"]);
    assert!(stderr.contains("role nobody does not exist"), "{stderr}");
    let (_, stderr) = lab.expect(66, &["grant", "metabase", "--on", "nowhere", "--read"]);
    assert!(
        stderr.contains("database nowhere does not exist"),
        "{stderr}"
    );
    lab.expect(64, &["grant", "metabase", "--on", "dw"]);
}

#[test]
fn drop_refuses_without_yes_off_a_terminal_and_waits_for_force_on_busy_databases() {
    let lab = Lab::new();
    let dw = lab.create("dw", &[]);
    let mb = lab.create("metabase", &[]);
    lab.psql_as(dw.trim(), "create table facts(x int)").unwrap();
    lab.expect(0, &["grant", "metabase", "--on", "dw", "--read"]);

    let (_, stderr) = lab.expect(64, &["drop", "metabase"]);
    assert!(stderr.contains("without --yes"), "{stderr}");
    assert_eq!(lab.roles("metabase"), "1");

    // An open session blocks drop until --force.
    let session = ProcBuilder::new(lab.cluster.bin("psql"))
        .args([
            "-X",
            "-w",
            mb.trim(),
            "-c",
            "select 'connected'",
            "-c",
            "select pg_sleep(300)",
        ])
        .env("HOME", lab.dir.path())
        .spawn()
        .unwrap();
    session.wait_stdout("connected", WAIT).unwrap();
    let (_, stderr) = lab.expect(75, &["drop", "metabase", "--yes"]);
    assert!(stderr.contains("1 open session(s)"), "{stderr}");
    assert_eq!(lab.databases("metabase"), "1");

    lab.expect(0, &["drop", "metabase", "--yes", "--force"]);
    assert_eq!(lab.roles("metabase"), "0");
    assert_eq!(lab.databases("metabase"), "0");
    assert_ne!(
        session.wait_exit(WAIT).unwrap().code(),
        Some(0),
        "the session was terminated"
    );
    // Its grants in dw went with it; dw and its table stay.
    assert_eq!(lab.sql("dw", "select count(*) from facts"), "0");
    assert_eq!(lab.sql("dw", "select count(*) from pg_default_acl"), "0");

    let (_, stderr) = lab.expect(0, &["drop", "metabase", "--yes"]);
    assert!(stderr.contains("nothing to drop"), "{stderr}");
}

#[test]
fn drop_leaves_databases_pgprov_did_not_make() {
    let lab = Lab::new();
    lab.sql("postgres", "CREATE ROLE gitea LOGIN");
    lab.sql("postgres", "CREATE DATABASE gitea");
    let (_, stderr) = lab.expect(65, &["drop", "gitea", "--yes"]);
    assert!(stderr.contains("owned by role postgres"), "{stderr}");
    assert_eq!(lab.roles("gitea"), "1");
    assert_eq!(lab.databases("gitea"), "1");
}

#[test]
fn drop_asks_on_a_terminal_for_the_name() {
    let lab = Lab::new();
    lab.create("jupyterhub", &[]);
    // script(1) gives pgprov a pseudo-terminal as stdin and feeds it what we type.
    let typed = |answer: &str| {
        let proc = ProcBuilder::new("script")
            .args([
                "-q",
                "-e",
                "-c",
                &format!("{PGPROV} drop jupyterhub"),
                "/dev/null",
            ])
            .envs(lab.env.iter().map(|(k, v)| (k, v)))
            .stdin(format!("{answer}\n"))
            .spawn()
            .unwrap();
        let status = proc.wait_exit(WAIT).unwrap();
        (status.code(), proc.stdout())
    };
    let (code, out) = typed("jupyter");
    assert_eq!(code, Some(64), "{out}");
    assert!(out.contains("Type jupyterhub to confirm"), "{out}");
    assert!(out.contains("not confirmed"), "{out}");
    assert_eq!(lab.databases("jupyterhub"), "1");

    let (code, out) = typed("jupyterhub");
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(lab.databases("jupyterhub"), "0");
    assert_eq!(lab.roles("jupyterhub"), "0");
}

#[tokio::test]
async fn list_shows_provisioned_databases_with_owner_size_and_connections() {
    let lab = Lab::new();
    let mb = lab.create("metabase", &["--connection-limit", "5"]);
    lab.create("gitea", &[]);
    lab.sql("postgres", "CREATE DATABASE scratch");
    let (client, connection) = tokio_postgres::connect(mb.trim(), tokio_postgres::NoTls)
        .await
        .unwrap();
    let driver = tokio::spawn(connection);
    client.simple_query("select 1").await.unwrap();

    let (text, _) = lab.expect(0, &["list"]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[0].starts_with("NAME"), "{text}");
    let columns: Vec<&str> = lines[2].split_whitespace().collect();
    assert_eq!(columns[0], "metabase", "{text}");
    assert_eq!(columns[1], "metabase", "{text}");
    assert_eq!(columns[columns.len() - 2], "1", "one connection: {text}");
    assert_eq!(columns[columns.len() - 1], "5", "{text}");

    let (json, _) = lab.expect(0, &["list", "--format", "json"]);
    let rows: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1]["name"], "metabase");
    assert_eq!(rows[1]["connections"], 1);
    assert!(rows[1]["size_bytes"].as_i64().unwrap() > 1_000_000);

    let (all, _) = lab.expect(0, &["list", "--all"]);
    assert!(all.lines().any(|l| l.starts_with("scratch ")), "{all}");
    assert!(all.lines().any(|l| l.starts_with("postgres ")), "{all}");
    drop(client);
    driver.await.unwrap().unwrap();
}

#[test]
fn create_warns_when_pg_hba_conf_keeps_the_role_out() {
    let lab = Lab::new();
    let (_, stderr) = lab.expect(0, &["create", "ci"]);
    assert!(!stderr.contains("warning"), "{stderr}");

    let hba = lab.cluster.data_dir().join("pg_hba.conf");
    fs::write(
        &hba,
        "local all all trust\nhost all postgres 127.0.0.1/32 scram-sha-256\nhost all all 127.0.0.1/32 trust\n",
    )
    .unwrap();
    lab.sql("postgres", "SELECT pg_reload_conf()");
    let (stdout, stderr) = lab.expect(0, &["create", "metabase"]);
    assert_eq!(stdout.lines().count(), 1);
    assert!(
        stderr.contains("no pg_hba.conf line lets role metabase log in"),
        "{stderr}"
    );
    assert!(
        stderr
            .lines()
            .any(|l| l == "host    metabase    metabase    172.16.0.0/12    scram-sha-256"),
        "{stderr}"
    );
}

const LAB_TOML: &str = r#"
[[database]]
name = "ci"

[[database]]
name = "dw"
read = ["metabase"]

[[database]]
name = "gitea"

[[database]]
name = "jupyterhub"

[[database]]
name = "metabase"
"#;

#[test]
fn apply_makes_the_lab_once_and_then_changes_nothing() {
    let lab = Lab::new();
    let file = lab.write("lab.toml", &format!("host = \"127.0.0.1\"\n{LAB_TOML}"));
    let file = file.to_str().unwrap();
    let before = lab.catalog_snapshot();

    let (stdout, stderr) = lab.expect(0, &["apply", file, "--dry-run"]);
    assert!(stdout.is_empty(), "{stdout}");
    assert!(
        stderr.contains("would create database and role dw"),
        "{stderr}"
    );
    assert!(
        stderr.contains("would grant role metabase read access to database dw"),
        "{stderr}"
    );
    assert_eq!(
        lab.catalog_snapshot(),
        before,
        "--dry-run changed something"
    );

    let (stdout, stderr) = lab.expect(0, &["apply", file]);
    let uris: Vec<&str> = stdout.lines().collect();
    assert_eq!(uris.len(), 5, "{stdout}");
    for (uri, db) in uris
        .iter()
        .zip(["ci", "dw", "gitea", "jupyterhub", "metabase"])
    {
        assert_eq!(lab.psql_as(uri, "select current_database()").unwrap(), db);
    }
    assert!(stderr.contains("6 change(s) made"), "{stderr}");

    // metabase reads dw's tables, including ones made after the grant, and writes none.
    let dw = uris[1];
    lab.psql_as(
        dw,
        "create table facts(x int); insert into facts values (5)",
    )
    .unwrap();
    let mb_in_dw = in_db(uris[4], "dw");
    assert_eq!(lab.psql_as(&mb_in_dw, "select x from facts").unwrap(), "5");
    assert!(lab.psql_as(&mb_in_dw, "delete from facts").is_err());
    // Other services cannot reach dw.
    assert!(lab.psql_as(&in_db(uris[0], "dw"), "select 1").is_err());

    let after = lab.catalog_snapshot();
    let (stdout, stderr) = lab.expect(0, &["apply", file]);
    assert!(stdout.is_empty(), "{stdout}");
    assert!(
        stderr.contains("nothing to change: 5 of 5 database(s) up to date"),
        "{stderr}"
    );
    assert!(!stderr.contains("drift"), "{stderr}");
    let (_, stderr) = lab.expect(0, &["apply", file, "--dry-run"]);
    assert!(stderr.contains("nothing to change"), "{stderr}");
    assert_eq!(
        lab.catalog_snapshot(),
        after,
        "a second run changed something"
    );
    for uri in &uris {
        assert!(!lab.cluster.log().contains(password_of(uri)));
    }
}

#[test]
fn apply_reports_drift_and_drops_only_with_prune() {
    let lab = Lab::new();
    let first = lab.write(
        "first.toml",
        "[[database]]\nname = \"ci\"\n[[database]]\nname = \"gitea\"\nextensions = [\"pg_trgm\"]\n",
    );
    lab.expect(0, &["apply", first.to_str().unwrap()]);
    assert_eq!(
        lab.sql(
            "gitea",
            "select count(*) from pg_extension where extname = 'pg_trgm'"
        ),
        "1"
    );

    // ci is no longer listed, gitea has changed, and the old layout's metabase is owned by postgres.
    lab.sql("postgres", "CREATE ROLE metabase LOGIN");
    lab.sql("postgres", "CREATE DATABASE metabase");
    let second = lab.write(
        "second.toml",
        "[[database]]\nname = \"gitea\"\nconnection_limit = 9\n[[database]]\nname = \"metabase\"\n",
    );
    let second = second.to_str().unwrap();
    let (stdout, stderr) = lab.expect(0, &["apply", second]);
    assert!(stdout.is_empty(), "{stdout}");
    for drift in [
        "drift: database ci is provisioned but not in the file (--prune drops it)",
        "drift: role gitea has connection limit -1, the file says 9",
        "drift: database gitea has extension pg_trgm, which the file does not list",
        "drift: database metabase is owned by postgres, not by role metabase",
    ] {
        assert!(stderr.contains(drift), "{drift}: {stderr}");
    }
    assert_eq!(lab.databases("ci"), "1");

    let (_, stderr) = lab.expect(0, &["apply", second, "--prune", "--dry-run"]);
    assert!(
        stderr.contains("would drop database and role ci"),
        "{stderr}"
    );
    assert_eq!(lab.databases("ci"), "1");
    lab.expect(0, &["apply", second, "--prune"]);
    assert_eq!(lab.databases("ci"), "0");
    assert_eq!(lab.roles("ci"), "0");
    assert_eq!(
        lab.databases("metabase"),
        "1",
        "a database pgprov did not make stays"
    );
}

#[test]
fn apply_writes_credentials_files_0600_and_never_overwrites_one() {
    let lab = Lab::new();
    let out = lab.dir.join("creds");
    let out_s = out.to_str().unwrap();
    let file = lab.write(
        "lab.toml",
        "[[database]]\nname = \"ci\"\n[[database]]\nname = \"gitea\"\n",
    );
    let file = file.to_str().unwrap();
    let (stdout, stderr) = lab.expect(
        0,
        &[
            "apply",
            file,
            "--format",
            "env",
            "--out-dir",
            out_s,
            "--host",
            "127.0.0.1",
        ],
    );
    assert!(stdout.is_empty(), "{stdout}");
    assert!(stderr.contains("credentials in"), "{stderr}");
    for name in ["ci", "gitea"] {
        let path = out.join(format!("{name}.env"));
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", path.display());
        assert!(
            fs::read_to_string(&path)
                .unwrap()
                .contains(&format!("PGUSER={name}\n"))
        );
    }
    let names: Vec<String> = fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "no temporary files left: {names:?}");

    // A credentials file in the way: refused before anything is made.
    fs::write(out.join("jupyterhub.env"), "keep me").unwrap();
    let file = lab.write(
        "more.toml",
        "[[database]]\nname = \"dw\"\n[[database]]\nname = \"jupyterhub\"\n",
    );
    let (_, stderr) = lab.expect(
        73,
        &[
            "apply",
            file.to_str().unwrap(),
            "--format",
            "env",
            "--out-dir",
            out_s,
        ],
    );
    assert!(stderr.contains("jupyterhub.env already exists"), "{stderr}");
    assert_eq!(lab.databases("dw"), "0");
    assert_eq!(
        fs::read_to_string(out.join("jupyterhub.env")).unwrap(),
        "keep me"
    );
}

#[test]
fn apply_file_errors_name_the_line_and_column() {
    let lab = Lab::new();
    let bad_name = lab.write(
        "lab.toml",
        "[[database]]\nname = \"ci\"\n\n[[database]]\nname = \"Meta base\"\n",
    );
    let (_, stderr) = lab.expect(65, &["apply", bad_name.to_str().unwrap()]);
    assert!(
        stderr.contains(&format!(
            "{}:5:8: key \"database[1].name\": invalid name \"Meta base\"",
            bad_name.display()
        )),
        "{stderr}"
    );
    let unknown = lab.write(
        "typo.toml",
        "[[database]]\nname = \"ci\"\nreads = [\"x\"]\n",
    );
    let (_, stderr) = lab.expect(78, &["apply", unknown.to_str().unwrap()]);
    assert!(
        stderr.contains(":3:1: key \"database[0].reads\""),
        "{stderr}"
    );
    let (_, stderr) = lab.expect(
        66,
        &["apply", lab.dir.join("absent.toml").to_str().unwrap()],
    );
    assert!(stderr.contains("absent.toml"), "{stderr}");
    let unknown_role = lab.write(
        "role.toml",
        "[[database]]\nname = \"dw\"\nread = [\"metbase\"]\n",
    );
    let (_, stderr) = lab.expect(66, &["apply", unknown_role.to_str().unwrap()]);
    assert!(stderr.contains("role metbase"), "{stderr}");
    assert!(!lab.cluster.log().contains("CREATE"), "nothing was made");
}

#[test]
fn every_subcommand_has_a_man_page_quality_help_with_examples() {
    let lab = Lab::new();
    let (top, _) = lab.expect(0, &["--help"]);
    for section in [
        "EXAMPLES:",
        "ADMIN CONNECTION:",
        "EXIT STATUS:",
        "Commands:",
    ] {
        assert!(top.contains(section), "pgprov --help lacks {section}");
    }
    for command in [
        "create", "drop", "list", "rotate", "grant", "apply", "check",
    ] {
        let (help, _) = lab.expect(0, &[command, "--help"]);
        assert!(
            help.contains("EXAMPLES:"),
            "{command} --help lacks EXAMPLES"
        );
        assert!(
            help.contains(&format!("pgprov {command}")),
            "{command}: {help}"
        );
        assert!(
            help.lines().count() > 15,
            "{command} --help is too short:\n{help}"
        );
    }
    let (apply, _) = lab.expect(0, &["apply", "--help"]);
    assert!(apply.contains("FILE FORMAT:"), "{apply}");
    let (create, _) = lab.expect(0, &["create", "--help"]);
    assert!(create.contains("FORMATS:"), "{create}");
}

#[test]
fn list_into_a_closed_pipe_exits_quietly() {
    let lab = Lab::new();
    lab.create("metabase", &[]);
    for format in ["text", "json"] {
        // `pgprov list | head -0`: the reader is gone before the first line is written.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let output = std::process::Command::new(PGPROV)
            .args(["list", "--format", format])
            .env_clear()
            .envs(lab.env.iter().map(|(k, v)| (k, v)))
            .stdout(writer)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(0), "{format}: {stderr}");
        assert!(!stderr.contains("error"), "{format}: {stderr}");
    }
}

#[test]
fn check_validates_an_apply_file_without_a_server() {
    let dir = Scratch::new("pgprov-check").unwrap();
    // No libpq variables and nothing listening: check must not try to connect.
    let check = |file: &std::path::Path, code: i32| {
        let proc = ProcBuilder::new(PGPROV)
            .args([OsStr::new("check"), file.as_os_str()])
            .env("PGHOST", dir.path())
            .env("PGPORT", "1")
            .spawn()
            .unwrap();
        proc.expect_exit(code, WAIT).unwrap();
        (proc.stdout(), proc.stderr())
    };
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/pgprov/lab.toml");
    let (stdout, _) = check(&example, 0);
    assert!(stdout.contains("ok: 5 database(s)"), "{stdout}");

    let malformed = dir.join("malformed.toml");
    fs::write(
        &malformed,
        "[[database]]\nname = \"dw\"\nreed = [\"metabase\"]\n",
    )
    .unwrap();
    let (_, stderr) = check(&malformed, 78);
    assert!(
        stderr.contains(&format!("{}:3", malformed.display())),
        "{stderr}"
    );

    let bad_name = dir.join("bad-name.toml");
    fs::write(
        &bad_name,
        "[[database]]\nname = \"dw\"\n\n[[database]]\nname = \"Bad-Name\"\n",
    )
    .unwrap();
    let (_, stderr) = check(&bad_name, 65);
    assert!(
        stderr.contains(&format!("{}:5", bad_name.display())),
        "{stderr}"
    );
    assert!(stderr.contains("database[1].name"), "{stderr}");

    check(&dir.join("missing.toml"), 66);
}

#[test]
fn every_pgprov_example_checks() {
    let folder = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/pgprov");
    let mut checked = 0;
    for entry in fs::read_dir(&folder).unwrap() {
        let path = entry.unwrap().path();
        // No libpq variables and nothing listening: check reads only the file.
        let proc = ProcBuilder::new(PGPROV)
            .args([OsStr::new("check"), path.as_os_str()])
            .env("PGPORT", "1")
            .spawn()
            .unwrap();
        proc.expect_exit(0, WAIT)
            .unwrap_or_else(|e| panic!("{}: {e}: {}", path.display(), proc.stderr()));
        if path.ends_with("lab.toml") {
            // The lab's five databases.
            assert!(
                proc.stdout().contains("ok: 5 database(s)"),
                "{}",
                proc.stdout()
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 1, "the lab's lab.toml is there");
}
