//! The running edge: listeners, TLS handshakes, HTTP/1.1 and HTTP/2 connections, the QUIC
//! endpoints of HTTP/3 (served by [`crate::http3`]), reload on SIGHUP and the drain on SIGTERM.
//!
//! Ownership: every accept loop and connection task lives in a `TaskTracker`; upgraded
//! (WebSocket) connections in another. A reload swaps the router, certificates and upstream
//! client under the running connections, binds listeners for new ports and stops accepting on
//! ports no longer used, so open connections, WebSockets included, carry on. A stop closes the
//! listeners, asks every connection to finish its requests, waits up to the grace period, then
//! ends what is left.
//!
//! Connections are served by one single-threaded runtime per core ([`Workers`]), each
//! accepting on its own `SO_REUSEPORT` socket of every listener, so a connection's whole life
//! (TLS, HTTP, the upstream exchange through [`crate::pool`]) stays on one thread and no
//! request wakes another thread; the main runtime keeps signals, reload, certificate renewal
//! (the internal CA's and ACME's, [`crate::acme`]) and the access log writer. Router,
//! certificates and limits are shared by all. A TLS handshake offering only `acme-tls/1` is a
//! CA checking a TLS-ALPN-01 challenge: it gets the challenge certificate and nothing else.
//!
//! Listeners may be configured on port 0 (tests): the bound addresses are logged and sent as
//! the sd_notify `STATUS=` line (`listening http=ADDR https=ADDR`) before `READY=1`.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::{HttpService, service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use labcore::Env;
use labcore::notify::Notifier;
use labcore::signals::Signals;
use rustls::ServerConfig;
use rustls::server::{Acceptor, ResolvesServerCert};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::runtime::Handle;
use tokio_rustls::LazyConfigAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Error;
use crate::access_log::{self, AccessLog};
use crate::acme::{Acme, Challenges, Plan};
use crate::activity::Activity;
use crate::admin;
use crate::body::ReqBody;
use crate::ca::Ca;
use crate::caddyfile;
use crate::certs::{Certs, ChallengeResponder, Entry, Fixed, Resolver, key_of};
use crate::config::{self, Config, Limits, LogOutput, LogSpec};
use crate::handler::{self, Conn, State};
use crate::http3;
use crate::limit::{ConnLimit, ConnPermit};
use crate::on_demand::{self, OnDemand};
use crate::proxy::Client;
use crate::router::Router;
use crate::site::{Host, Scheme, TlsPolicy};
use crate::storage::Storage;

/// The ALPN protocol of TLS-ALPN-01 challenges (RFC 8737).
const ACME_TLS: &[u8] = b"acme-tls/1";

/// Where the config comes from (read again on reload).
#[derive(Clone, Debug)]
pub(crate) enum Source {
    /// A TOML file.
    Toml(PathBuf),
    /// A Caddyfile.
    Caddyfile(PathBuf),
}

impl Source {
    /// Reads and resolves the config.
    pub(crate) fn load(&self, env: &Env) -> Result<Config, Error> {
        match self {
            Source::Toml(path) => Ok(config::load_toml(path, env)?),
            Source::Caddyfile(path) => Ok(caddyfile::load(path, env)?),
        }
    }
}

/// Opens the config's storage: its bucket when `storage s3` is set, else its folder. A reload
/// keeps the storage opened at start.
pub(crate) fn open_storage(config: &Config) -> Result<Storage, Error> {
    match &config.storage_s3 {
        Some(s3) => Storage::open_s3(s3).map_err(|source| Error::Io {
            what: format!("opening storage {}", s3.url()),
            source,
        }),
        None => Storage::open(&config.storage).map_err(|source| Error::Io {
            what: format!("opening storage {}", config.storage.display()),
            source,
        }),
    }
}

/// The hosts needing certificates from the internal CA, and the ACME plan for the others.
pub(crate) fn cert_plan(config: &Config) -> (Vec<Host>, Plan) {
    let mut internal = Vec::new();
    let mut names: Vec<(String, Option<String>)> = Vec::new();
    let mut challenges = HashMap::new();
    let mut dns = HashMap::new();
    let mut issuers = HashMap::new();
    for (i, site) in config.sites.iter().enumerate() {
        if !config.auto_certs {
            // auto_https off or disable_certs: only sites' own files are served.
            break;
        }
        for host in site.tls_hosts() {
            match site.tls_policy(host) {
                TlsPolicy::Internal => internal.push(host.clone()),
                // Read by `load_cert_files`; nothing to order or issue.
                TlsPolicy::Files => {}
                // Ordered at the first handshake naming it (`on_demand`).
                TlsPolicy::OnDemand => {}
                TlsPolicy::Acme => {
                    let name = key_of(host);
                    if !names.iter().any(|(n, _)| *n == name) {
                        let email = site.tls_email.clone().or_else(|| config.email.clone());
                        if let Some(only) = config.site_challenges.get(i).filter(|c| !c.is_empty())
                        {
                            challenges.insert(name.clone(), only.clone());
                        }
                        if let Some(Some(provider)) = config.site_dns.get(i) {
                            dns.insert(name.clone(), provider.clone());
                        }
                        if let Some(Some(issuer)) = config.site_issuers.get(i) {
                            issuers.insert(name.clone(), issuer.clone());
                        }
                        names.push((name, email));
                    }
                }
            }
        }
    }
    internal.sort();
    internal.dedup();
    let plan = Plan {
        acme: config.acme.clone(),
        names,
        challenges,
        dns,
        issuers,
    };
    (internal, plan)
}

/// Reads every site's certificate files (`tls CERT KEY`), keyed by the names they serve.
/// Blocking.
fn load_cert_files(config: &Config, certs: &Certs) -> Result<Vec<(String, Arc<Entry>)>, Error> {
    let mut loaded: Vec<(String, Arc<Entry>)> = Vec::new();
    for site in &config.sites {
        let Some(files) = &site.cert_files else {
            continue;
        };
        let entry = Arc::new(certs.load_files(files)?);
        for host in site.tls_hosts() {
            loaded.push((key_of(host), entry.clone()));
        }
    }
    Ok(loaded)
}

/// The TLS configs of sites with `client_auth` or handshake options (`protocols`,
/// `ciphers`, `curves`, `alpn`), by the names they serve ("" for a site without a host);
/// the CA files are read here (start and every reload) and named when unusable.
fn site_tls_configs(
    config: &Config,
    shared: &Shared,
) -> Result<HashMap<String, Arc<ServerConfig>>, Error> {
    let mut by_name = HashMap::new();
    for site in &config.sites {
        let options = site.tls_options.as_deref().cloned().unwrap_or_default();
        let provider = match &site.tls_options {
            Some(o) => Arc::new(o.provider()),
            None => shared.provider.clone(),
        };
        let Some(auth) = &site.client_auth else {
            if site.tls_options.is_none() {
                continue;
            }
            let mut tls = ServerConfig::builder_with_provider(provider)
                .with_protocol_versions(&options.versions())
                .map_err(Error::Tls)?
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(Resolver(shared.certs.clone())));
            tls.alpn_protocols = options.alpn();
            tls.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().map_err(Error::Tls)?;
            let tls = Arc::new(tls);
            for host in site.tls_hosts() {
                by_name.insert(key_of(host), tls.clone());
            }
            continue;
        };
        let mut roots = rustls::RootCertStore::empty();
        for path in &auth.cas {
            let bad = |reason: String, source: Option<io::Error>| {
                Error::CertFile(crate::certs::CertFileError {
                    path: path.clone(),
                    reason,
                    source,
                })
            };
            let pem = std::fs::read(path).map_err(|e| bad(e.to_string(), Some(e)))?;
            let mut found = 0;
            for cert in <rustls::pki_types::CertificateDer<'_> as rustls::pki_types::pem::PemObject>::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| bad(format!("not a PEM certificate: {e}"), None))?;
                roots
                    .add(cert)
                    .map_err(|e| bad(format!("not a usable CA certificate: {e}"), None))?;
                found += 1;
            }
            if found == 0 {
                return Err(bad("holds no PEM certificate".into(), None));
            }
        }
        let builder = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        );
        let builder = if auth.require {
            builder
        } else {
            builder.allow_unauthenticated()
        };
        let verifier = builder
            .build()
            .map_err(|e| Error::Internal(format!("client certificate verifier: {e}")))?;
        let mut tls = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&options.versions())
            .map_err(Error::Tls)?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(Resolver(shared.certs.clone())));
        tls.alpn_protocols = options.alpn();
        let tls = Arc::new(tls);
        for host in site.tls_hosts() {
            by_name.insert(key_of(host), tls.clone());
        }
    }
    Ok(by_name)
}

/// What the on-demand module needs of `config`; `None` without an on-demand site.
fn on_demand_settings(config: &Config) -> Result<Option<on_demand::Settings>, Error> {
    let mut hosts = Vec::new();
    for site in &config.sites {
        if !site.on_demand || !config.auto_certs {
            continue;
        }
        let email = site.tls_email.clone().or_else(|| config.email.clone());
        for host in site.tls_hosts() {
            if site.tls_policy(host) == TlsPolicy::OnDemand {
                hosts.push((host.clone(), email.clone()));
            }
        }
    }
    if hosts.is_empty() {
        return Ok(None);
    }
    let od = config.on_demand.clone().unwrap_or(config::OnDemandConfig {
        ask: None,
        rate: None,
    });
    if od.ask.is_none() && od.rate.is_none() {
        tracing::warn!(
            "on-demand TLS is enabled with neither on_demand_tls ask nor a rate limit: anyone \
             can make this edge order certificates for names of their choosing"
        );
    }
    let transport = match &od.ask {
        Some(ask) => Some(
            crate::transport::Transport::build(None, ask.address.scheme, 0)
                .map_err(|e| Error::Internal(format!("on_demand_tls ask: {e}")))?,
        ),
        None => None,
    };
    Ok(Some(on_demand::Settings {
        config: od,
        acme: config.acme.clone(),
        hosts,
        transport,
    }))
}

fn acme_names(plan: &Plan) -> Vec<String> {
    plan.names.iter().map(|(n, _)| n.clone()).collect()
}

/// The writers of the sites' own logs, one per distinct [`LogSpec`], kept across reloads
/// while a site still names them.
#[derive(Default)]
struct SiteLogs {
    open: HashMap<LogSpec, (AccessLog, CancellationToken)>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl SiteLogs {
    /// The log of each site of `config`, opening those not open yet.
    async fn open(&mut self, config: &Config) -> Result<Vec<Option<AccessLog>>, Error> {
        let mut logs = Vec::with_capacity(config.site_logs.len());
        for spec in &config.site_logs {
            let Some(spec) = spec else {
                logs.push(None);
                continue;
            };
            if let Some((log, _)) = self.open.get(spec) {
                logs.push(Some(log.clone()));
                continue;
            }
            let stop = CancellationToken::new();
            let (log, task) =
                AccessLog::start_spec(spec, stop.clone())
                    .await
                    .map_err(|source| Error::Io {
                        what: match &spec.output {
                            LogOutput::File { path, .. } => {
                                format!("opening log {}", path.display())
                            }
                            _ => "opening a site's log".into(),
                        },
                        source,
                    })?;
            self.tasks.extend(task);
            self.open.insert(spec.clone(), (log.clone(), stop));
            logs.push(Some(log));
        }
        Ok(logs)
    }

    /// Closes the logs `config` no longer names (after its router is in place).
    fn retire(&mut self, config: &Config) {
        self.open.retain(|spec, (_, stop)| {
            let keep = config.site_logs.iter().flatten().any(|s| s == spec);
            if !keep {
                stop.cancel();
            }
            keep
        });
    }

    /// Closes every log and waits (a bounded time) for the last lines to be written.
    async fn close(self) {
        for (_, stop) in self.open.values() {
            stop.cancel();
        }
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }
}

/// A bound listener and its accept loop.
struct Listener {
    addrs: Vec<SocketAddr>,
    stop: CancellationToken,
    /// HTTP/3 on the UDP twin of an HTTPS listener.
    quic: Option<Quic>,
}

/// The QUIC endpoints of one HTTPS listener. They outlive a reload (its connections and
/// their streams carry on); stopping one ends its accept loops and refuses new connections
/// while the open ones finish.
struct Quic {
    endpoints: Vec<quinn::Endpoint>,
    stop: CancellationToken,
}

impl Quic {
    fn stop(&self) {
        self.stop.cancel();
        for endpoint in &self.endpoints {
            endpoint.set_server_config(None);
        }
    }
}

/// What the accept loops and connections share, besides [`State`].
struct Shared {
    state: Arc<State>,
    certs: Arc<Certs>,
    challenges: Arc<Challenges>,
    tls: Arc<ServerConfig>,
    /// TLS configs of sites asking for client certificates or with handshake options, by
    /// name (`client_auth`, `protocols`...).
    by_name: ArcSwap<HashMap<String, Arc<ServerConfig>>>,
    /// Certificates ordered at handshakes (`on_demand`).
    on_demand: Arc<OnDemand>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    limits: ArcSwap<Limits>,
    limit: ConnLimit,
    conns: TaskTracker,
    drain: CancellationToken,
    workers: Vec<Handle>,
}

/// The threads serving connections: one single-threaded runtime per core.
struct Workers {
    handles: Vec<Handle>,
    threads: Vec<std::thread::JoinHandle<()>>,
    stop: CancellationToken,
}

impl Workers {
    fn start() -> io::Result<Workers> {
        let n = std::thread::available_parallelism().map_or(1, usize::from);
        let stop = CancellationToken::new();
        let mut workers = Workers {
            handles: Vec::with_capacity(n),
            threads: Vec::with_capacity(n),
            stop: stop.clone(),
        };
        for i in 0..n {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .on_thread_park(access_log::flush_this_thread)
                .build()?;
            workers.handles.push(runtime.handle().clone());
            let stop = stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("edge-worker-{i}"))
                .spawn(move || {
                    access_log::batch_on_this_thread();
                    runtime.block_on(heartbeat(stop));
                    // Connections cut at the end log their lines as they are dropped.
                    drop(runtime);
                    access_log::flush_this_thread();
                })?;
            workers.threads.push(thread);
        }
        Ok(workers)
    }

    /// Ends the runtimes (dropping what still runs on them) and joins their threads.
    async fn stop(self) {
        self.stop.cancel();
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
    }
}

/// How often a worker's runtime wakes with nothing to do (see [`heartbeat`]).
const HEARTBEAT: Duration = Duration::from_secs(1);

/// A worker's main future: ticks every [`HEARTBEAT`] until `stop`.
///
/// The tick is there for tokio's timer: registering a timer that is due before the runtime's
/// next planned wake-up writes the runtime's wake fd (a syscall, and a spurious `epoll_wait`
/// return after it). Each request registered two (hyper's header read timeout, 10 s, now only
/// for a connection's first head or a split one, see [`HeadTimer`], and the upstream response
/// timeout, 60 s); whenever a worker had no header timer pending, the next
/// one was due earliest and paid that write, about 0.28 times per request under load. With a
/// tick never more than a second away, a timer of a second or more is never the earliest.
async fn heartbeat(stop: CancellationToken) {
    let mut ticks = tokio::time::interval(HEARTBEAT);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
    }
}

/// Runs the edge until SIGTERM/SIGINT.
pub(crate) async fn run(source: Source, env: Env) -> Result<(), Error> {
    let config = source.load(&env)?;
    let notifier = Notifier::from_env(&env).map_err(|source| Error::Io {
        what: "opening the sd_notify socket".into(),
        source,
    })?;
    let mut signals = Signals::install().map_err(|source| Error::Io {
        what: "installing signal handlers".into(),
        source,
    })?;
    let shutdown = signals.shutdown();

    let storage = open_storage(&config)?;
    let ca = Arc::new(Ca::open(&storage)?);
    let certs = Arc::new(Certs::new(ca, storage.clone()).map_err(Error::Tls)?);
    crate::metrics::watch_certs(Arc::downgrade(&certs) as _);
    let (internal, plan) = cert_plan(&config);
    let loaded = load_cert_files(&config, &certs)?;
    certs.ensure(&internal, &acme_names(&plan), &loaded)?;
    let acme = Arc::new(Acme::new(storage, certs.clone()));
    acme.serve_stored(&plan);
    let (plan_tx, plan_rx) = tokio::sync::watch::channel(plan);
    let on_demand = {
        let plan_tx = plan_tx.clone();
        Arc::new(OnDemand::new(
            acme.clone(),
            certs.clone(),
            Box::new(move |name, email| {
                plan_tx.send_modify(|plan| {
                    if !plan.names.iter().any(|(n, _)| n == name) {
                        plan.names.push((name.to_owned(), email));
                    }
                });
            }),
        ))
    };
    on_demand.configure(on_demand_settings(&config)?);

    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls = server_config(
        provider.clone(),
        Arc::new(Resolver(certs.clone())),
        vec![b"h2".to_vec(), b"http/1.1".to_vec()],
    )?;
    let log_stop = CancellationToken::new();
    let (log, log_task) = AccessLog::start(&config.access_log, log_stop.clone())
        .await
        .map_err(|source| Error::Io {
            what: "opening the access log".into(),
            source,
        })?;
    let workers = Workers::start().map_err(|source| Error::Io {
        what: "starting the worker threads".into(),
        source,
    })?;
    let upgraded = TaskTracker::new();
    let hard_stop = CancellationToken::new();
    let shared = Arc::new(Shared {
        state: Arc::new(State {
            router: ArcSwap::from_pointee(Router::new(&[], &[], &|p, _| p)),
            client: ArcSwap::from_pointee(client_for(&config.limits)),
            log,
            upgraded: upgraded.clone(),
            stop: hard_stop.clone(),
            challenges: Some(acme.challenges() as Arc<dyn ChallengeResponder>),
        }),
        certs: certs.clone(),
        challenges: acme.challenges(),
        by_name: ArcSwap::from_pointee(HashMap::new()),
        on_demand: on_demand.clone(),
        tls,
        provider,
        limits: ArcSwap::from_pointee(config.limits.clone()),
        limit: ConnLimit::new(config.limits.max_connections),
        conns: TaskTracker::new(),
        drain: CancellationToken::new(),
        workers: workers.handles.clone(),
    });

    shared
        .by_name
        .store(Arc::new(site_tls_configs(&config, &shared)?));
    let mut listeners: HashMap<(u16, Scheme), Listener> = HashMap::new();
    bind_missing(&config, &mut listeners, &shared).await?;
    let mut site_logs = SiteLogs::default();
    let mut router = router_for(&config, &listeners);
    router.set_logs(site_logs.open(&config).await?);
    shared.state.router.store(Arc::new(router));

    let admin_json = Arc::new(ArcSwap::from_pointee(admin::redacted(&config.toml)));
    let (load_tx, mut load_rx) = tokio::sync::mpsc::channel::<admin::Load>(4);
    let admin_stop = CancellationToken::new();
    let admin_task = match &config.admin {
        Some(listen) => {
            let (shown, task) = admin::start(
                listen,
                admin_json.clone(),
                load_tx.clone(),
                shutdown.clone(),
                admin_stop.clone(),
            )
            .await
            .map_err(|source| Error::Io {
                what: format!("starting the admin endpoint on {listen:?}"),
                source,
            })?;
            tracing::info!(admin = %shown, "admin endpoint listening");
            Some(task)
        }
        None => None,
    };
    drop(load_tx);

    let renew_stop = CancellationToken::new();
    let renewal = tokio::spawn(certs.clone().renew_loop(renew_stop.clone()));
    let acme_task = tokio::spawn(acme.clone().run(plan_rx, renew_stop.clone()));

    let status = status_line(&config, &listeners);
    tracing::info!(sites = config.sites.len(), "{status}");
    notifier.status(&status);
    notifier.ready();

    let mut current = config;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = signals.reload() => {
                notifier.reloading();
                match reload(None, &source, &env, &mut listeners, &shared, &acme, &plan_tx, &mut site_logs).await {
                    Ok(config) => {
                        let status = status_line(&config, &listeners);
                        tracing::info!(sites = config.sites.len(), "reloaded; {status}");
                        notifier.status(&status);
                        admin_moved(&current, &config);
                        admin_json.store(Arc::new(admin::redacted(&config.toml)));
                        current = config;
                    }
                    Err(err) => tracing::error!(
                        error = %labcore::exit::chain(&err),
                        "new config rejected; still serving the old one"
                    ),
                }
                notifier.ready();
            }
            Some(load) = load_rx.recv() => {
                notifier.reloading();
                // Imports in the text are relative to the Caddyfile the edge runs from.
                let path = match &source {
                    Source::Caddyfile(path) => path.clone(),
                    Source::Toml(path) => path.with_file_name("Caddyfile"),
                };
                let result = match caddyfile::load_text(&path, &load.text, &env) {
                    Ok(config) => reload(Some(config), &source, &env, &mut listeners, &shared, &acme, &plan_tx, &mut site_logs)
                        .await
                        .map_err(|err| labcore::exit::chain(&err)),
                    Err(err) => Err(err.to_string()),
                };
                match result {
                    Ok(config) => {
                        let status = status_line(&config, &listeners);
                        tracing::info!(sites = config.sites.len(), "loaded by the admin endpoint; {status}");
                        notifier.status(&status);
                        admin_moved(&current, &config);
                        admin_json.store(Arc::new(admin::redacted(&config.toml)));
                        current = config;
                        let _ = load.reply.send(Ok(()));
                    }
                    Err(why) => {
                        tracing::error!(error = %why, "config from the admin endpoint rejected; still serving the old one");
                        let _ = load.reply.send(Err(why));
                    }
                }
                notifier.ready();
            }
        }
    }

    notifier.stopping();
    admin_stop.cancel();
    if let Some(task) = admin_task {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    for listener in listeners.values() {
        if let Some(quic) = &listener.quic {
            quic.stop();
        }
        listener.stop.cancel();
    }
    shared.drain.cancel();
    let grace = current.grace_period;
    let drained = labcore::signals::drain(&shared.conns, grace).await;
    if !drained {
        tracing::warn!(grace = ?grace, "connections still open after the grace period; closing them");
    }
    for quic in listeners.values().filter_map(|l| l.quic.as_ref()) {
        for endpoint in &quic.endpoints {
            // H3_NO_ERROR to whatever outlived the grace period.
            endpoint.close(quinn::VarInt::from_u32(0x100), b"");
        }
    }
    hard_stop.cancel();
    let _ = labcore::signals::drain(&upgraded, Duration::from_secs(2)).await;
    workers.stop().await;
    renew_stop.cancel();
    let _ = renewal.await;
    let _ = acme_task.await;
    site_logs.close().await;
    log_stop.cancel();
    if let Some(task) = log_task {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    tracing::info!("stopped");
    Ok(())
}

fn client_for(limits: &Limits) -> Client {
    Client::new(
        limits.upstream_connect_timeout,
        limits.upstream_response_timeout,
        limits.idle_timeout,
    )
}

/// A TLS 1.2/1.3 server config over `resolver` offering `alpn`.
fn server_config(
    provider: Arc<rustls::crypto::CryptoProvider>,
    resolver: Arc<dyn ResolvesServerCert>,
    alpn: Vec<Vec<u8>>,
) -> Result<Arc<ServerConfig>, Error> {
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(Error::Tls)?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = alpn;
    config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().map_err(Error::Tls)?;
    Ok(Arc::new(config))
}

fn status_line(config: &Config, listeners: &HashMap<(u16, Scheme), Listener>) -> String {
    let mut parts = vec!["listening".to_owned()];
    let mut keys: Vec<&(u16, Scheme)> = listeners.keys().collect();
    keys.sort_by_key(|(port, scheme)| {
        (
            *port != config.http_port,
            *port != config.https_port,
            *scheme,
            *port,
        )
    });
    for key in keys {
        let listener = &listeners[key];
        let name = match key {
            (p, Scheme::Http) if *p == config.http_port => "http".to_owned(),
            (p, Scheme::Https) if *p == config.https_port => "https".to_owned(),
            (p, s) => format!("{}:{p}", s.as_str()),
        };
        for addr in &listener.addrs {
            parts.push(format!("{name}={addr}"));
        }
    }
    parts.join(" ")
}

fn router_for(config: &Config, listeners: &HashMap<(u16, Scheme), Listener>) -> Router {
    let mut router = Router::new(&config.sites, &config.chains, &|port, scheme| {
        listeners
            .get(&(port, scheme))
            .and_then(|l| l.addrs.first())
            .map_or(port, |a| a.port())
    });
    if !config.redirects {
        router.disable_redirects();
    }
    router.set_client_ip(config.client_ip.clone());
    let http3_ports: Vec<u16> = listeners
        .values()
        .filter(|l| l.quic.is_some())
        .filter_map(|l| l.addrs.first().map(|a| a.port()))
        .collect();
    router.set_http3_ports(&http3_ports);
    router.set_alt_svc(
        config
            .sites
            .iter()
            .map(|s| s.client_auth.is_none() && s.tls_options.is_none())
            .collect(),
    );
    router.set_strict_sni(
        config
            .sites
            .iter()
            .map(|s| s.client_auth.is_some())
            .collect(),
    );
    router
}

/// Says so when a reload changes what applies only on restart: the admin endpoint and
/// `debug`.
fn admin_moved(old: &Config, new: &Config) {
    if old.admin != new.admin {
        tracing::warn!("the admin endpoint's address changed; it moves when the edge restarts");
    }
    if old.debug != new.debug {
        tracing::warn!("debug changed; the log level changes when the edge restarts");
    }
}

/// Loads the config from `source` (or takes `given`) and swaps it in.
#[allow(clippy::too_many_arguments)]
async fn reload(
    given: Option<Config>,
    source: &Source,
    env: &Env,
    listeners: &mut HashMap<(u16, Scheme), Listener>,
    shared: &Arc<Shared>,
    acme: &Arc<Acme>,
    plan_tx: &tokio::sync::watch::Sender<Plan>,
    site_logs: &mut SiteLogs,
) -> Result<Config, Error> {
    let config = match given {
        Some(config) => config,
        None => source.load(env)?,
    };
    let logs = site_logs.open(&config).await?;
    let by_name = site_tls_configs(&config, shared)?;
    let certs = shared.certs.clone();
    let (hosts, mut plan) = cert_plan(&config);
    let settings = on_demand_settings(&config)?;
    shared.on_demand.configure(settings);
    for (name, email) in shared.on_demand.obtained() {
        if !plan.names.iter().any(|(n, _)| *n == name) {
            plan.names.push((name, email));
        }
    }
    let names = acme_names(&plan);
    let acme = acme.clone();
    let files = config.clone();
    let plan = tokio::task::spawn_blocking(move || {
        let loaded = load_cert_files(&files, &certs)?;
        certs.ensure(&hosts, &names, &loaded)?;
        acme.serve_stored(&plan);
        Ok::<_, Error>(plan)
    })
    .await
    .map_err(|e| Error::Internal(format!("certificate task: {e}")))??;
    plan_tx.send_replace(plan);
    bind_missing(&config, listeners, shared).await?;
    let wanted = config.listeners();
    listeners.retain(|key, listener| {
        let keep = wanted.contains(key);
        if !keep {
            tracing::info!(addrs = ?listener.addrs, "port no longer used; closing its listener");
            if let Some(quic) = &listener.quic {
                quic.stop();
            }
            listener.stop.cancel();
        }
        keep
    });
    let limits_changed = **shared.limits.load() != config.limits;
    for ((_, scheme), listener) in listeners.iter_mut() {
        if *scheme != Scheme::Https {
            continue;
        }
        match &listener.quic {
            None if config.limits.http3 => {
                listener.quic = Some(bind_quic(
                    &listener.addrs,
                    &listener.stop,
                    shared,
                    &config.limits,
                )?);
            }
            Some(quic) if !config.limits.http3 => {
                tracing::info!(addrs = ?listener.addrs, "HTTP/3 turned off; open QUIC connections finish");
                quic.stop();
                listener.quic = None;
            }
            Some(quic) if limits_changed => {
                // New connections get the new bounds; open ones keep theirs.
                let quic_config = quic_config(shared, &config.limits)?;
                for endpoint in &quic.endpoints {
                    endpoint.set_server_config(Some(quic_config.clone()));
                }
            }
            _ => {}
        }
    }
    if limits_changed {
        shared
            .state
            .client
            .store(Arc::new(client_for(&config.limits)));
        shared.limit.resize(config.limits.max_connections);
        shared.limits.store(Arc::new(config.limits.clone()));
    }
    let mut router = router_for(&config, listeners);
    router.set_logs(logs);
    shared.by_name.store(Arc::new(by_name));
    shared.state.router.store(Arc::new(router));
    site_logs.retire(&config);
    Ok(config)
}

/// Binds the listeners `config` needs and `listeners` lacks, and starts their accept loops,
/// one per worker.
async fn bind_missing(
    config: &Config,
    listeners: &mut HashMap<(u16, Scheme), Listener>,
    shared: &Arc<Shared>,
) -> Result<(), Error> {
    for (port, scheme) in config.listeners() {
        if listeners.contains_key(&(port, scheme)) {
            continue;
        }
        let sockets = bind(&config.bind, port, shared.workers.len())?;
        let stop = CancellationToken::new();
        let mut addrs = Vec::new();
        for (addr, group) in sockets {
            addrs.push(addr);
            for (socket, worker) in group.into_iter().zip(&shared.workers) {
                worker.spawn(shared.conns.track_future(accept_loop(
                    socket,
                    addr.port(),
                    scheme,
                    shared.clone(),
                    stop.clone(),
                )));
            }
        }
        let quic = if scheme == Scheme::Https && config.limits.http3 {
            Some(bind_quic(&addrs, &stop, shared, &config.limits)?)
        } else {
            None
        };
        listeners.insert((port, scheme), Listener { addrs, stop, quic });
    }
    Ok(())
}

/// The QUIC server config for HTTP/3: TLS 1.3 with the live certificates, ALPN `h3`.
fn quic_config(shared: &Shared, limits: &Limits) -> Result<quinn::ServerConfig, Error> {
    let mut tls = ServerConfig::builder_with_provider(shared.provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(Error::Tls)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Resolver(shared.certs.clone())));
    tls.alpn_protocols = vec![http3::ALPN.to_vec()];
    tls.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().map_err(Error::Tls)?;
    // No 0-RTT: rustls' max_early_data_size stays 0.
    http3::server_config(Arc::new(tls), limits).map_err(Error::Internal)
}

/// Binds a QUIC endpoint on the UDP twin of each of `addrs` and starts its accept loop (on
/// the main runtime, which also drives the endpoints; connections go to the workers).
fn bind_quic(
    addrs: &[SocketAddr],
    listener_stop: &CancellationToken,
    shared: &Arc<Shared>,
    limits: &Limits,
) -> Result<Quic, Error> {
    let config = quic_config(shared, limits)?;
    let stop = listener_stop.child_token();
    let mut endpoints = Vec::with_capacity(addrs.len());
    for addr in addrs {
        let socket = udp_socket(*addr).map_err(|source| Error::Bind {
            addr: *addr,
            source,
        })?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(config.clone()),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| Error::Bind {
            addr: *addr,
            source,
        })?;
        tokio::spawn(shared.conns.track_future(quic_accept_loop(
            endpoint.clone(),
            addr.port(),
            shared.clone(),
            stop.clone(),
        )));
        endpoints.push(endpoint);
    }
    Ok(Quic { endpoints, stop })
}

async fn quic_accept_loop(
    endpoint: quinn::Endpoint,
    port: u16,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let mut next = 0usize;
    loop {
        let incoming = tokio::select! {
            _ = stop.cancelled() => return,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => return,
            },
        };
        // A QUIC client cannot wait in a backlog: over the limit it is refused and falls
        // back to TCP, where it waits for a place.
        let Some(permit) = shared.limit.try_acquire() else {
            incoming.refuse();
            continue;
        };
        let worker = &shared.workers[next % shared.workers.len()];
        next = next.wrapping_add(1);
        worker.spawn(
            shared
                .conns
                .track_future(serve_quic(incoming, port, shared.clone(), permit)),
        );
    }
}

/// HTTP/3's "retry over HTTP/1.1" (RFC 9114, 8.1).
const H3_VERSION_FALLBACK: u32 = 0x110;

async fn serve_quic(incoming: quinn::Incoming, port: u16, shared: Arc<Shared>, permit: ConnPermit) {
    let peer = incoming.remote_address();
    let limits = shared.limits.load_full();
    let connecting = match incoming.accept() {
        Ok(connecting) => connecting,
        Err(err) => {
            tracing::info!(%peer, error = %err, "QUIC connection refused");
            return;
        }
    };
    let connection = match tokio::time::timeout(limits.tls_handshake_timeout, connecting).await {
        Err(_) => {
            tracing::info!(%peer, "QUIC handshake timed out");
            return;
        }
        Ok(Err(err)) => {
            tracing::info!(%peer, error = %err, "QUIC handshake failed");
            return;
        }
        Ok(Ok(connection)) => connection,
    };
    let sni = connection
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.server_name)
        .map(|n| n.to_ascii_lowercase());
    if let Some(name) = &sni {
        // Client certificates and a site's own handshake options apply to TCP handshakes
        // only: such a site is not served over HTTP/3 (its clients fall back to TCP).
        let by_name = shared.by_name.load();
        let wildcard = name
            .split_once('.')
            .map(|(_, parent)| format!("*.{parent}"));
        if by_name.contains_key(name.as_str())
            || wildcard.is_some_and(|w| by_name.contains_key(&w))
            || by_name.contains_key("")
        {
            tracing::info!(%peer, sni = name, "this name has TLS settings of its own; refusing HTTP/3");
            connection.close(
                quinn::VarInt::from_u32(H3_VERSION_FALLBACK),
                b"served over TCP only",
            );
            return;
        }
    }
    let conn = Arc::new(Conn::new(
        shared.state.clone(),
        peer,
        port,
        Scheme::Https,
        permit,
    ));
    if let Some(name) = sni {
        let _ = conn.sni.set(name);
    }
    http3::serve(connection, conn, limits, shared.drain.child_token()).await;
}

/// Binds `ips` on `port`, `copies` sockets per address (`SO_REUSEPORT`: the kernel spreads
/// new connections over them), and returns each bound address with its sockets.
fn bind(
    ips: &[IpAddr],
    port: u16,
    copies: usize,
) -> Result<Vec<(SocketAddr, Vec<std::net::TcpListener>)>, Error> {
    let mut bound = Vec::new();
    let mut port = port;
    for ip in ips {
        let addr = SocketAddr::new(*ip, port);
        let first = match listen(addr) {
            // No IPv6 on this host: the wildcard falls back to IPv4.
            Err(err)
                if ip.is_unspecified()
                    && ip.is_ipv6()
                    && err.kind() != io::ErrorKind::AddrInUse =>
            {
                listen(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port))
            }
            other => other,
        }
        .map_err(|source| Error::Bind { addr, source })?;
        let local = first.local_addr().map_err(|source| Error::Io {
            what: "reading a listener's address".into(),
            source,
        })?;
        if port == 0 {
            // Several addresses on "port 0" share the port the first one got.
            port = local.port();
        }
        let mut group = vec![first];
        for _ in 1..copies {
            group.push(listen(local).map_err(|source| Error::Bind { addr, source })?);
        }
        bound.push((local, group));
    }
    Ok(bound)
}

/// A UDP socket for QUIC with `SO_REUSEPORT`, as the TCP listeners have it: two edges (an
/// upgrade, or two sharing one storage) can hold the same HTTPS port, and the kernel keeps each
/// client's packets on one socket by their address pair.
fn udp_socket(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// A listening socket with `SO_REUSEPORT`, not yet tied to a runtime.
fn listen(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = if addr.is_ipv6() {
        TcpSocket::new_v6()?
    } else {
        TcpSocket::new_v4()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    let listener = socket.listen(1024)?;
    listener.into_std()
}

async fn accept_loop(
    listener: std::net::TcpListener,
    port: u16,
    scheme: Scheme,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    // Registered with the runtime of the worker running this loop.
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(err) => {
            tracing::error!(error = %err, port, "registering a listener failed");
            return;
        }
    };
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                // Over the limit, this connection waits here for a place and the ones after it
                // wait in the kernel's backlog. Taking the place only once a connection is in
                // hand keeps idle accept loops from holding places their sockets cannot use.
                let permit = tokio::select! {
                    _ = stop.cancelled() => return,
                    permit = shared.limit.acquire() => match permit {
                        Ok(p) => p,
                        Err(_) => return,
                    },
                };
                shared.conns.spawn(serve_conn(
                    stream,
                    peer,
                    port,
                    scheme,
                    shared.clone(),
                    permit,
                ));
            }
            Err(err) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_conn(
    stream: TcpStream,
    peer: SocketAddr,
    port: u16,
    scheme: Scheme,
    shared: Arc<Shared>,
    permit: ConnPermit,
) {
    let _ = stream.set_nodelay(true);
    let local = stream.local_addr().ok();
    let limits = shared.limits.load_full();
    let mut stream = stream;
    let peer = match &limits.proxy_protocol {
        None => peer,
        Some(pp) => match pp.accept(&mut stream, peer).await {
            Ok(client) => client,
            Err(err) => {
                tracing::info!(%peer, error = %err, "closing a connection without a usable PROXY header");
                return;
            }
        },
    };
    let activity = Arc::new(AtomicU64::new(0));
    let io = Activity::new(stream, activity.clone());
    let conn = Arc::new(Conn::new(shared.state.clone(), peer, port, scheme, permit));
    match scheme {
        Scheme::Http => serve_http(io, false, conn, &shared, &limits, activity).await,
        Scheme::Https => {
            let handshake = handshake(io, local.map(|a| a.ip()), peer, &shared);
            match tokio::time::timeout(limits.tls_handshake_timeout, handshake).await {
                Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                Ok(Err(err)) => tracing::info!(%peer, error = %err, "TLS handshake failed"),
                Ok(Ok(mut tls)) => {
                    if tls.get_ref().1.alpn_protocol() == Some(ACME_TLS) {
                        // A TLS-ALPN-01 check ends with the handshake.
                        tracing::debug!(%peer, "answered an acme-tls/1 challenge");
                        let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
                        return;
                    }
                    if let Some(name) = tls.get_ref().1.server_name() {
                        let _ = conn.sni.set(name.to_ascii_lowercase());
                    }
                    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                    serve_http(tls, h2, conn, &shared, &limits, activity).await;
                }
            }
        }
    }
}

/// Reads the ClientHello, picks the certificate source and finishes the handshake.
async fn handshake(
    io: Activity<TcpStream>,
    local_ip: Option<IpAddr>,
    peer: SocketAddr,
    shared: &Shared,
) -> io::Result<tokio_rustls::server::TlsStream<Activity<TcpStream>>> {
    let start = LazyConfigAcceptor::new(Acceptor::default(), io).await?;
    let hello = start.client_hello();
    let acme_only = hello
        .alpn()
        .map(|mut protocols| protocols.next() == Some(ACME_TLS) && protocols.next().is_none())
        .unwrap_or(false);
    if acme_only {
        let name = hello.server_name().unwrap_or("").to_owned();
        return match shared.challenges.tls_alpn01(&name) {
            Some(cert) => {
                let config = server_config(
                    shared.provider.clone(),
                    Arc::new(Fixed(cert)),
                    vec![ACME_TLS.to_vec()],
                )
                .map_err(io::Error::other)?;
                start.into_stream(config).await
            }
            None => {
                tracing::info!(%peer, sni = name, "acme-tls/1 handshake with no pending challenge; refusing it");
                Err(io::Error::other("no pending TLS-ALPN-01 challenge"))
            }
        };
    }
    let config = match hello.server_name() {
        Some(name) => {
            if !shared.certs.serves(name) {
                match shared.on_demand.wait(name).await {
                    on_demand::Outcome::Ready => {}
                    on_demand::Outcome::NotCovered => {
                        tracing::info!(%peer, sni = name, "no site serves this TLS name; refusing the handshake");
                    }
                    on_demand::Outcome::Refused(why) => {
                        tracing::info!(%peer, sni = name, %why, "no on-demand certificate for this TLS name; refusing the handshake");
                        return Err(io::Error::other("no certificate for this name"));
                    }
                }
            }
            let by_name = shared.by_name.load();
            if by_name.is_empty() {
                shared.tls.clone()
            } else {
                let wildcard = name
                    .split_once('.')
                    .map(|(_, parent)| format!("*.{parent}"));
                match by_name
                    .get(name)
                    .or_else(|| wildcard.and_then(|w| by_name.get(&w)))
                    .or_else(|| by_name.get(""))
                {
                    Some(site) => site.clone(),
                    None => shared.tls.clone(),
                }
            }
        }
        None => match local_ip.and_then(|ip| shared.certs.for_ip(ip)) {
            Some(certified) => server_config(
                shared.provider.clone(),
                Arc::new(Fixed(certified)),
                vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            )
            .map_err(io::Error::other)?,
            None => {
                tracing::info!(%peer, "client sent no TLS name and no site serves this address; refusing the handshake");
                shared.tls.clone()
            }
        },
    };
    start.into_stream(config).await
}

async fn serve_http<I>(
    io: I,
    h2: bool,
    conn: Arc<Conn>,
    shared: &Arc<Shared>,
    limits: &Limits,
    activity: Arc<AtomicU64>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Only HTTP/1.1 has them: one exchange at a time on the connection.
    let deadlines = (!h2 && (limits.read_body_timeout.is_some() || limits.write_timeout.is_some()))
        .then(|| Deadlines {
            exchange: Arc::new(Exchange::default()),
            read_body: limits.read_body_timeout,
            write: limits.write_timeout,
        });
    let exchange = deadlines.as_ref().map(|d| d.exchange.clone());
    let head_timer = HeadTimer {
        reads: activity.clone(),
        conn: conn.clone(),
        exchange: exchange.clone(),
    };
    let watch = Watch {
        conn: conn.clone(),
        // HTTP/2 keep-alive pings move bytes on an idle connection: there only requests count.
        bytes: (!h2).then_some(activity),
        idle: limits.idle_timeout,
        // A token of its own: waiting on the shared one would take the lock of its waiter list,
        // shared by every connection of every worker, each time the connection is polled.
        drain: shared.drain.child_token(),
        deadlines,
    };
    let service = service_fn(move |req: hyper::Request<Incoming>| {
        let req = match &exchange {
            None => req.map(ReqBody::Hyper),
            Some(exchange) => exchange.begin(req),
        };
        handler::handle(req, conn.clone())
    });
    let io = TokioIo::new(io);
    if h2 {
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits.h2_max_concurrent_streams)
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
            // Pings find dead peers; more often than the idle timeout, so one is found before
            // an idle close would have been due.
            .keep_alive_interval(Some(limits.idle_timeout.min(Duration::from_secs(120)) / 2))
            .keep_alive_timeout(Duration::from_secs(20));
        watch.drive(builder.serve_connection(io, service)).await;
    } else {
        let mut builder = http1::Builder::new();
        builder
            .timer(head_timer)
            .header_read_timeout(limits.header_read_timeout)
            .max_header_size(limits.max_header_bytes)
            .keep_alive(true);
        watch
            .drive(builder.serve_connection(io, service).with_upgrades())
            .await;
    }
}

/// The timer of an HTTP/1.1 connection, for hyper's header read timeout, which hyper starts
/// as soon as it waits for a request head: after a response, that is while the connection
/// idles, so a keep-alive connection would be closed at the header timeout instead of the
/// idle one ([`Watch`]). As Go's server (Caddy) does, the header time of a request after the
/// first starts with the first byte read after hyper began to wait; the first request's
/// starts when the connection is served. hyper polls the timer only after reading found no
/// complete head, so the first byte is seen at the poll after it is read.
///
/// Cost: the one box per request head hyper made with `TokioTimer`; for a head after the
/// first, one `Arc` clone and two atomic loads instead of a timer registration, and a second
/// box and the timer only when the head does not come whole.
/// A head whose start hyper had already read with the previous request (pipelined, or in
/// one TLS record) is bounded by the idle timeout only.
#[derive(Clone)]
struct HeadTimer {
    /// The connection's [`Activity`] counter.
    reads: Arc<AtomicU64>,
    conn: Arc<Conn>,
    /// hyper waiting for a head means the last exchange is over.
    exchange: Option<Arc<Exchange>>,
}

impl hyper::rt::Timer for HeadTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(std::time::Instant::now() + duration)
    }

    fn sleep_until(&self, deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        if let Some(exchange) = &self.exchange {
            exchange.end();
        }
        if self.conn.requests.load(Ordering::Relaxed) == 0 {
            return TokioTimer::new().sleep_until(deadline);
        }
        Box::pin(HeadSleep {
            counter: self.reads.clone(),
            waiting: Waiting::Idle {
                reads: crate::activity::reads(self.reads.load(Ordering::Relaxed)),
                timeout: deadline.saturating_duration_since(std::time::Instant::now()),
            },
        })
    }
}

/// [`HeadTimer`]'s sleep.
struct HeadSleep {
    counter: Arc<AtomicU64>,
    waiting: Waiting,
}

enum Waiting {
    /// No byte of the head yet: reads were `reads`; the timeout starts at the next one.
    Idle { reads: u32, timeout: Duration },
    /// The header time runs.
    Armed(Pin<Box<tokio::time::Sleep>>),
}

impl Future for HeadSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if let Waiting::Idle { reads, timeout } = this.waiting {
            // Pending without a waker is right here: hyper polls this only after its read of
            // the stream returned pending, and that read wakes the task when bytes come.
            if crate::activity::reads(this.counter.load(Ordering::Relaxed)) == reads {
                return Poll::Pending;
            }
            this.waiting = Waiting::Armed(Box::pin(tokio::time::sleep(timeout)));
        }
        match &mut this.waiting {
            Waiting::Armed(sleep) => sleep.as_mut().poll(cx),
            Waiting::Idle { .. } => Poll::Pending,
        }
    }
}

impl hyper::rt::Sleep for HeadSleep {}

/// Where an HTTP/1.1 connection's exchange stands, for `read_body` and `write` ([`Watch`]).
/// Made only when one of them is set.
#[derive(Default)]
struct Exchange {
    /// A request was read and hyper has not yet gone back to waiting for the next head: its
    /// body is still arriving or its response still being written.
    busy: AtomicBool,
    /// The request's body is still arriving (its handler or hyper's drain reads it).
    body: AtomicBool,
}

impl Exchange {
    /// A request's head was read: its exchange begins; a body to come is watched.
    fn begin(self: &Arc<Self>, req: hyper::Request<Incoming>) -> hyper::Request<ReqBody> {
        self.busy.store(true, Ordering::Relaxed);
        if hyper::body::Body::is_end_stream(req.body()) {
            return req.map(ReqBody::Hyper);
        }
        self.body.store(true, Ordering::Relaxed);
        let exchange = self.clone();
        req.map(|inner| {
            ReqBody::other(http_body_util::BodyExt::boxed_unsync(Arriving {
                inner,
                exchange,
            }))
        })
    }

    /// hyper waits for the next head: the body was read (or drained) and the response
    /// written.
    fn end(&self) {
        self.busy.store(false, Ordering::Relaxed);
        self.body.store(false, Ordering::Relaxed);
    }
}

/// A request body that tells its [`Exchange`] when it has all arrived.
struct Arriving {
    inner: Incoming,
    exchange: Arc<Exchange>,
}

impl hyper::body::Body for Arriving {
    type Data = bytes::Bytes;
    type Error = crate::body::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.exchange.body.store(false, Ordering::Relaxed);
        }
        polled.map(|frame| frame.map(|f| f.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// `servers { timeouts { read_body write } }` of an HTTP/1.1 connection. As Go's server
/// (Caddy) sets its connection deadlines, both run from a request's head (here: from when
/// it was read): a body still arriving at `read_body`, or an exchange not over at `write`
/// (its response not all written: a client not reading, a slow upstream), closes the
/// connection unanswered or mid-response. A timer per request, only when one is set.
struct Deadlines {
    exchange: Arc<Exchange>,
    read_body: Option<Duration>,
    write: Option<Duration>,
}

/// Connections that can be asked to finish their requests and close.
trait Graceful: Future<Output = Result<(), hyper::Error>> {
    fn shut(self: Pin<&mut Self>);
}

impl<I, S, B> Graceful for http1::UpgradeableConnection<I, S>
where
    S: HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn shut(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S, B> Graceful for http2::Connection<I, S, TokioExecutor>
where
    S: HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    TokioExecutor: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn shut(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Watches a connection: closes it when idle (no request and, for HTTP/1.1, no bytes for the
/// idle timeout) or when the edge drains.
struct Watch {
    conn: Arc<Conn>,
    bytes: Option<Arc<AtomicU64>>,
    idle: Duration,
    drain: CancellationToken,
    deadlines: Option<Deadlines>,
}

impl Watch {
    async fn drive<C: Graceful>(self, conn: C) {
        let mut conn = std::pin::pin!(conn);
        let mut idle = std::pin::pin!(tokio::time::sleep(self.idle));
        let mut drain = std::pin::pin!(self.drain.cancelled());
        let peer = self.conn.peer;
        let activity = || {
            let bytes = self.bytes.as_ref().map_or(0, |b| b.load(Ordering::Relaxed));
            bytes.wrapping_add(self.conn.requests.load(Ordering::Relaxed))
        };
        let mut seen = activity();
        let mut closing = false;
        // Whether the drain signal and the idle timer hold this task's waker. They keep the
        // waker of their last poll, and this future is its task's own (the waker never
        // changes), so once they hold it a wake-up only looks at them, an atomic load each.
        // The connection wakes the task several times a request: polling both on every
        // wake-up cost more than the look.
        let (mut drain_waits, mut idle_waits) = (false, false);
        // The request the deadlines run for, and when they fall.
        // Made at the first deadline, so connections without any pay nothing for it.
        let mut deadline: Option<Pin<Box<tokio::time::Sleep>>> = None;
        let mut deadlines_of = self.conn.requests.load(Ordering::Relaxed);
        let (mut body_at, mut write_at) = (None, None);
        let result = std::future::poll_fn(|cx| {
            loop {
                if let Poll::Ready(result) = conn.as_mut().poll(cx) {
                    return Poll::Ready(result);
                }
                if let Some(d) = &self.deadlines {
                    let request = self.conn.requests.load(Ordering::Relaxed);
                    let now = tokio::time::Instant::now();
                    if request != deadlines_of {
                        deadlines_of = request;
                        body_at = d.read_body.map(|t| now + t);
                        write_at = d.write.map(|t| now + t);
                    }
                    let due = |at: &mut Option<tokio::time::Instant>, open: &AtomicBool| {
                        let passed = at.is_some_and(|at| at <= now);
                        if passed || !open.load(Ordering::Relaxed) {
                            *at = None;
                        }
                        passed && open.load(Ordering::Relaxed)
                    };
                    if due(&mut body_at, &d.exchange.body) {
                        tracing::info!(%peer, "request body not received within read_body; closing");
                        return Poll::Ready(Ok(()));
                    }
                    if due(&mut write_at, &d.exchange.busy) {
                        tracing::info!(%peer, "response not written within write; closing");
                        return Poll::Ready(Ok(()));
                    }
                    if let Some(at) = body_at.into_iter().chain(write_at).min() {
                        let sleep = deadline
                            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
                        if sleep.deadline() != at {
                            sleep.as_mut().reset(at);
                        }
                        if sleep.as_mut().poll(cx).is_ready() {
                            continue;
                        }
                    }
                }
                if !closing {
                    let drained = if drain_waits {
                        self.drain.is_cancelled()
                    } else {
                        drain_waits = true;
                        drain.as_mut().poll(cx).is_ready()
                    };
                    if drained {
                        closing = true;
                        conn.as_mut().shut();
                        continue;
                    }
                }
                let elapsed = if idle_waits {
                    idle.is_elapsed()
                } else {
                    idle_waits = true;
                    idle.as_mut().poll(cx).is_ready()
                };
                if elapsed {
                    let now = activity();
                    if !closing && now == seen && self.conn.in_flight.load(Ordering::Relaxed) == 0 {
                        tracing::debug!(%peer, "idle connection closed");
                        closing = true;
                        conn.as_mut().shut();
                    }
                    seen = now;
                    idle.as_mut().reset(tokio::time::Instant::now() + self.idle);
                    idle_waits = false;
                    continue;
                }
                return Poll::Pending;
            }
        })
        .await;
        if let Err(err) = result {
            tracing::info!(%peer, error = %labcore::exit::chain(&err), "connection closed on error");
        }
    }
}
