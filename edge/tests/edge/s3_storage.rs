//! Two edges sharing one bucket (testkit's s3s-fs) and one Pebble: one orders, the other
//! answers Pebble's validation from the bucket and serves the same certificate; a killed lock
//! holder's lease expires and the other edge takes over, and the renewal one edge makes is
//! served by both.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use testkit::{Pebble, S3Server, Scratch};
use tokio::net::TcpStream;

use crate::support::{Edge, Upstreams, WAIT, client_config};

const NAME: &str = "lab.example.org";

/// The parts both edges share.
struct Shared {
    s3: S3Server,
    bucket: String,
    pebble: Pebble,
    /// Pebble's issuing root, for checking what the edges serve.
    root: PathBuf,
    ups: Upstreams,
    upstream: String,
    key_file: PathBuf,
    secret_file: PathBuf,
    /// Holds the two files above.
    _secrets: Scratch,
}

impl Shared {
    /// Pebble (validating at `http_port` and `https_port`), a bucket, the edges' keys and
    /// an upstream.
    fn start(http_port: u16, https_port: u16) -> Shared {
        let pebble = Pebble::builder()
            .http_port(http_port)
            .tls_port(https_port)
            .cert_validity(Duration::from_secs(30))
            .start()
            .unwrap();
        let s3 = S3Server::start().unwrap();
        let ups = Upstreams::new();
        let bucket = ups.runtime.block_on(s3.bucket()).unwrap();
        let root_pem = ups.runtime.block_on(pebble.issuing_root_pem()).unwrap();
        let root = pebble.api_ca_path().with_file_name("issuing-root.pem");
        std::fs::write(&root, root_pem).unwrap();
        let upstream = ups.http("web").to_string();
        let secrets = Scratch::new("s3-secrets").unwrap();
        let key_file = secrets.join("edge.key");
        std::fs::write(&key_file, format!("{:064x}\n", rand::random::<u128>())).unwrap();
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let secret_file = secrets.join("s3.secret");
        std::fs::write(&secret_file, testkit::s3::SECRET_KEY).unwrap();
        std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        Shared {
            s3,
            bucket,
            pebble,
            root,
            ups,
            upstream,
            key_file,
            secret_file,
            _secrets: secrets,
        }
    }

    fn client(&self) -> aws_sdk_s3::Client {
        self.ups.runtime.block_on(self.s3.client())
    }

    fn lock_key(&self, what: &str) -> String {
        let ca = edge::acme::ca_key(&self.pebble.directory_url());
        format!("edge/locks/acme-{ca}-{what}.lock")
    }

    /// The lock object's owner, if the lock is held.
    fn lock_owner(&self, what: &str) -> Option<String> {
        let client = self.client();
        let key = self.lock_key(what);
        self.ups.runtime.block_on(async {
            let out = client
                .get_object()
                .bucket(&self.bucket)
                .key(&key)
                .send()
                .await
                .ok()?;
            let body = out.body.collect().await.ok()?.into_bytes();
            let value: serde_json::Value = serde_json::from_slice(&body).ok()?;
            value["owner"].as_str().map(str::to_owned)
        })
    }

    /// Holds the lock `what` as a foreign owner (an edge that never lets go).
    fn hold_lock(&self, what: &str) {
        let client = self.client();
        let body = serde_json::json!({
            "owner": "the test",
            "expires_ms": jiff::Timestamp::now().as_millisecond() + 600_000,
        });
        self.ups.runtime.block_on(async {
            client
                .put_object()
                .bucket(&self.bucket)
                .key(self.lock_key(what))
                .body(body.to_string().into_bytes().into())
                .send()
                .await
                .unwrap();
        });
    }

    fn release_lock(&self, what: &str) {
        let client = self.client();
        self.ups.runtime.block_on(async {
            client
                .delete_object()
                .bucket(&self.bucket)
                .key(self.lock_key(what))
                .send()
                .await
                .unwrap();
        });
    }

    /// Waits until `cond` holds, failing after `WAIT`.
    fn wait_for(&self, what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + WAIT;
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// An edge config on the given ports, sharing the bucket; `site` is added to the site.
    fn config(&self, dir: &Scratch, http_port: u16, https_port: u16, site: &str) -> PathBuf {
        let text = format!(
            "http_port = {http_port}\nhttps_port = {https_port}\nbind = [\"127.0.0.1\"]\n\
             storage = \"{storage}\"\nemail = \"ops@example.org\"\nacme_ca = \"{ca}\"\n\
             acme_ca_root = \"{ca_root}\"\n\n\
             [acme]\nretry_base = \"200ms\"\nrenewal_window_ratio = 0.7\n\n\
             [storage_s3]\nbucket = \"{bucket}\"\nprefix = \"edge\"\nendpoint = \"{endpoint}\"\n\
             region = \"{region}\"\naccess_key_id = \"{access}\"\n\
             secret_access_key_file = \"{secret}\"\nencryption_key_file = \"{key}\"\n\
             lease = \"2s\"\npoll_interval = \"2s\"\n\n\
             [[site]]\naddresses = [\"{NAME}\"]\n{site}[[site.reverse_proxy]]\nto = [\"{upstream}\"]\n",
            storage = dir.join("storage").display(),
            ca = self.pebble.directory_url(),
            ca_root = self.pebble.api_ca_path().display(),
            bucket = self.bucket,
            endpoint = self.s3.endpoint(),
            region = testkit::s3::REGION,
            access = testkit::s3::ACCESS_KEY,
            secret = self.secret_file.display(),
            key = self.key_file.display(),
            upstream = self.upstream,
        );
        let path = dir.join("edge.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    /// The serial number of the certificate served for `NAME` on `port`, verified against
    /// Pebble's root.
    fn served_serial(&self, port: u16) -> String {
        let config = client_config(&self.root, &[b"http/1.1"]);
        self.ups.runtime.block_on(async {
            let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(ServerName::try_from(NAME).unwrap(), tcp)
                .await
                .unwrap();
            let der = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
            let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
            cert.raw_serial_as_string()
        })
    }
}

fn start_edge(dir: Scratch, config: PathBuf) -> Edge {
    Edge::start(dir, config, "-c")
}

fn pid_of(owner: &str) -> Option<u32> {
    owner.strip_prefix("pid ")?.split(' ').next()?.parse().ok()
}

#[test]
fn two_edges_share_one_order_answer_each_others_challenges_and_survive_a_killed_lock_holder() {
    let a_http = testkit::ports::free_port().unwrap();
    let a_https = testkit::ports::free_port().unwrap();
    let b_http = testkit::ports::free_port().unwrap();
    let b_https = testkit::ports::free_port().unwrap();
    // Pebble validates at edge A's ports, while edge B places the order.
    let shared = Shared::start(a_http, a_https);

    // The ACME account lock is held by the test, so whoever takes the name's lock stops
    // before ordering until the test lets go.
    shared.hold_lock("account");
    let a_dir = Scratch::new("edge-a").unwrap();
    let a_config = shared.config(&a_dir, a_http, a_https, "");
    let a = start_edge(a_dir, a_config.clone());
    let a_pid = a.proc.pid();
    shared.wait_for("edge A to take the name's lock", || {
        shared.lock_owner(NAME).and_then(|o| pid_of(&o)) == Some(a_pid)
    });
    let b_dir = Scratch::new("edge-b").unwrap();
    let b_config = shared.config(&b_dir, b_http, b_https, "");
    let b = start_edge(b_dir, b_config);
    b.proc
        .wait_output("another edge holds the lock; waiting", WAIT)
        .unwrap();

    // A dies holding the lock; its lease runs out and B takes the lock over.
    a.proc.kill().unwrap();
    shared.wait_for("edge B to take over the expired lease", || {
        shared.lock_owner(NAME).and_then(|o| pid_of(&o)) == Some(b.proc.pid())
    });
    b.proc
        .wait_output("the lock's lease expired; taking it over", WAIT)
        .unwrap();
    // A comes back on its ports, where Pebble validates, and waits behind B.
    let a2 = start_edge(Scratch::new("edge-a2").unwrap(), a_config);
    a2.proc
        .wait_output("another edge holds the lock; waiting", WAIT)
        .unwrap();
    assert_eq!(
        shared.pebble.orders(),
        0,
        "nobody ordered while the account was locked"
    );

    // B orders; Pebble fetches the challenge from A, which has it only in the bucket.
    shared.release_lock("account");
    b.proc
        .wait_output(&format!("certificate obtained name={NAME}"), WAIT)
        .unwrap();
    a2.proc
        .wait_output("using the certificate found in storage", WAIT)
        .unwrap();
    // Logged once installed, after the line above.
    a2.proc
        .wait_output(&format!("certificate obtained name={NAME}"), WAIT)
        .unwrap();
    assert_eq!(shared.pebble.orders(), 1, "{}", shared.pebble.log());
    let serial = shared.served_serial(b_https);
    assert_eq!(
        shared.served_serial(a_https),
        serial,
        "both edges serve one certificate"
    );
    assert!(
        !a2.proc.stderr().contains("ordering a certificate")
            && !a2.proc.stdout().contains("ordering a certificate"),
        "edge A ordered too"
    );

    // Renewal is due 9 s after issue: one edge renews, the other serves the renewal.
    shared.wait_for("a renewed certificate on both edges", || {
        let (x, y) = (shared.served_serial(a_https), shared.served_serial(b_https));
        x != serial && x == y
    });
    assert_eq!(shared.pebble.orders(), 2, "{}", shared.pebble.log());
    a2.stop();
    b.stop();
}

#[test]
fn an_order_placed_by_one_edge_validates_by_tls_alpn01_at_the_other_from_the_bucket() {
    // HTTP-01 is off for the site, and Pebble connects to edge A's TLS port only: A answers
    // the challenge edge B's order put in the bucket.
    let a_http = testkit::ports::free_port().unwrap();
    let a_https = testkit::ports::free_port().unwrap();
    let b_http = testkit::ports::free_port().unwrap();
    let b_https = testkit::ports::free_port().unwrap();
    let shared = Shared::start(a_http, a_https);
    let tls_only = "tls_challenges = [\"tls-alpn-01\"]\n";
    // B takes the name's lock and waits on the account, held by the test, while A starts
    // and waits behind B.
    shared.hold_lock("account");
    let b_dir = Scratch::new("edge-b").unwrap();
    let b_config = shared.config(&b_dir, b_http, b_https, tls_only);
    let b = start_edge(b_dir, b_config);
    let b_pid = b.proc.pid();
    shared.wait_for("edge B to take the name's lock", || {
        shared.lock_owner(NAME).and_then(|o| pid_of(&o)) == Some(b_pid)
    });
    let a_dir = Scratch::new("edge-a").unwrap();
    let a_config = shared.config(&a_dir, a_http, a_https, tls_only);
    let a = start_edge(a_dir, a_config);
    a.proc
        .wait_output("another edge holds the lock; waiting", WAIT)
        .unwrap();

    shared.release_lock("account");
    b.proc
        .wait_output(&format!("certificate obtained name={NAME}"), WAIT)
        .unwrap();
    a.proc
        .wait_output(&format!("certificate obtained name={NAME}"), WAIT)
        .unwrap();
    let log = shared.pebble.log();
    assert_eq!(shared.pebble.orders(), 1, "{log}");
    assert!(
        b.proc.stderr().contains("challenge=TlsAlpn01")
            && !b.proc.stderr().contains("challenge=Http01"),
        "{}",
        b.proc.stderr()
    );
    assert_eq!(
        shared.served_serial(a_https),
        shared.served_serial(b_https),
        "both edges serve one certificate"
    );
    a.stop();
    b.stop();
}
