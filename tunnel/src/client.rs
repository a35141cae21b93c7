//! The client: the home side. For each service it keeps a control channel open to each server
//! of `remote_addr`, opens a data channel whenever a server asks, and connects each started
//! data channel to the service's local address.
//!
//! With several servers, every one of them serves visitors (`mode = "active"`, for servers
//! behind DNS round robin), or only the first in `remote_addr`'s order whose control channel
//! is open (`mode = "failover"`): the others keep theirs open as hot standbys, and the data
//! channels they ask for wait (unopened) until their server is the first one up. Those a
//! standby opened while it was the first one up are closed, unused, once a server before it
//! is up again, so none of them carries a visitor past the handover. A server that goes away
//! is retried on its own; the others go on serving.
//!
//! Each server has its own transport (`[[client.servers]]` may give one its own table, of any
//! type): the Rust transport type is picked per server when its tasks start.
//!
//! Tasks and who owns them:
//! - one task per service and server runs that control channel and reconnects with capped,
//!   jittered exponential backoff when it fails (the cap is the service's `retry_interval`); a
//!   control channel with no command for `heartbeat_timeout` is dead;
//! - one task per data channel waits for the server's command (for as long as its control
//!   channel lives) and then forwards bytes ([`crate::forward`]), or for a UDP service
//!   datagrams, with a session per visitor ([`crate::udp`]). A UDP data channel ends with
//!   its service's stop (there is nothing to drain), a TCP one gets the grace period. A
//!   plain TCP data channel is opened without TCP keepalive, which is turned on only if it
//!   carries a visitor for [`KEEPALIVE_AFTER`] (or datagrams: at once).
//!
//! Each service has its own cancellation tokens, so reloads touch only what changed. The
//! [`Readiness`] set tells the daemon when every control channel it waits for is open.
//!
//! A service with `bind_port` is declared ([`crate::declare`]): its control channel names the
//! client instead of the service, and after the ack declares the service. A declaration the
//! server's policy refuses is not retried (nothing would change until the file does): it is
//! logged with the server's reason and the service no longer holds up readiness; one the
//! server cannot take now (its port is busy) is retried like a lost control channel.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use labcore::Secret;
use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{
    self, ClientService, ClientSettings, Mode, ServersMode, ServiceType, Settings,
    TransportSettings, TransportType,
};
use crate::daemon::{Node, Readiness};
use crate::deadline::Deadlines;
use crate::declare::{self, Declaration, Verdict};
use crate::error::Error;
use crate::forward;
use crate::metrics::{Endpoint, Metrics, ServiceMetrics};
use crate::protocol::{self, Ack, ControlCmd, DataCmd, Hello, SessionKey};
use crate::sockopt;
use crate::transport::{
    NoiseTransport, TcpTransport, TlsTransport, Transport, TunnelStream, WebsocketTransport,
};
use crate::udp;

/// The first pause before reconnecting (when the cap allows).
const FIRST_RETRY: Duration = Duration::from_millis(200);
/// How long a plain TCP data channel carries a visitor before TCP keepalive is turned on for
/// it ([`forward::LateKeepalive`]). Until then the server's side has keepalive (from its
/// listener) and an idle channel ends with its control channel, whose heartbeat finds a
/// dead server.
const KEEPALIVE_AFTER: Duration = Duration::from_secs(1);
/// A visitor's first bytes read with the command that starts a TCP data channel, at most (the
/// rest is forwarded as usual).
const FIRST_BYTES: usize = 512;

/// Which servers of one service have an open control channel, and in failover mode which
/// one gets data channels: the first one up in `remote_addr`'s order.
struct Servers {
    failover: bool,
    up: Mutex<Vec<bool>>,
    active: watch::Sender<Option<usize>>,
}

impl Servers {
    fn new(count: usize, mode: ServersMode) -> Servers {
        Servers {
            failover: mode == ServersMode::Failover,
            up: Mutex::new(vec![false; count]),
            active: watch::Sender::new(None),
        }
    }

    /// Records that server `index`'s control channel opened or closed.
    fn set(&self, index: usize, open: bool) {
        let mut up = self.up.lock().unwrap_or_else(|e| e.into_inner());
        up[index] = open;
        let first = up.iter().position(|u| *u);
        self.active.send_if_modified(|active| {
            let changed = *active != first;
            *active = first;
            changed
        });
    }

    /// Resolves once server `index` may carry visitors: at once in active mode, when it is
    /// the first server up in failover mode.
    async fn wait_turn(&self, index: usize) {
        if !self.failover {
            return;
        }
        let mut active = self.active.subscribe();
        if active.wait_for(|a| *a == Some(index)).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Resolves once server `index` may no longer carry visitors: in failover mode, when a
    /// server before it in `remote_addr` is up; never in active mode.
    async fn turn_lost(&self, index: usize) {
        if !self.failover {
            return std::future::pending().await;
        }
        let mut active = self.active.subscribe();
        if active.wait_for(|a| *a != Some(index)).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// What every task of one service and one server shares.
struct ServiceContext<T> {
    service: Arc<ClientService>,
    transport: Arc<T>,
    /// This server's control port.
    remote_addr: String,
    /// The token proved there.
    token: Secret,
    /// The client's name, if the service is declared.
    declare_as: Option<String>,
    /// Its place in `remote_addr`.
    server: usize,
    servers: Arc<Servers>,
    heartbeat_timeout: Option<Duration>,
    handshake_timeout: Duration,
    /// Bounds each data channel's opening and local connect by `handshake_timeout`.
    deadlines: Arc<Deadlines>,
    /// Turns keepalive on for data channels that last [`KEEPALIVE_AFTER`].
    keepalive_after: Arc<Deadlines>,
    stop: CancellationToken,
    abort: CancellationToken,
    tracker: TaskTracker,
    readiness: Arc<Readiness>,
    metrics: Arc<ServiceMetrics>,
    all_metrics: Arc<Metrics>,
}

struct ServiceHandle {
    service: Arc<ClientService>,
    stop: CancellationToken,
    abort: CancellationToken,
    /// One per server.
    tasks: Vec<JoinHandle<()>>,
}

/// One server's transport: each server of `[[client.servers]]` may have a type of its own,
/// so the client picks the Rust type per server here rather than once for the process.
enum AnyTransport {
    Tcp(Arc<TcpTransport>),
    Noise(Arc<NoiseTransport>),
    Tls(Arc<TlsTransport>),
    Websocket(Arc<WebsocketTransport>),
}

impl AnyTransport {
    fn new(settings: &TransportSettings) -> Result<AnyTransport, Error> {
        Ok(match settings.kind {
            TransportType::Tcp => AnyTransport::Tcp(Arc::new(TcpTransport::new(settings)?)),
            TransportType::Noise => AnyTransport::Noise(Arc::new(NoiseTransport::new(settings)?)),
            TransportType::Tls => AnyTransport::Tls(Arc::new(TlsTransport::new(settings)?)),
            TransportType::Websocket => {
                AnyTransport::Websocket(Arc::new(WebsocketTransport::new(settings)?))
            }
        })
    }
}

/// A running client. `T`, the type of `[client.transport]`, only chooses the daemon's
/// restart on a change of it; each server's connections use that server's own transport.
pub(crate) struct Client<T: Transport> {
    settings: ClientSettings,
    /// One per server: each may have settings, and a type, of its own.
    transports: Vec<AnyTransport>,
    _transport: std::marker::PhantomData<fn() -> T>,
    services: BTreeMap<String, ServiceHandle>,
    abort: CancellationToken,
    tracker: TaskTracker,
    readiness: Arc<Readiness>,
    deadlines: Arc<Deadlines>,
    keepalive_after: Arc<Deadlines>,
    metrics: Arc<Metrics>,
    endpoint: Option<Endpoint>,
}

impl<T: Transport> Client<T> {
    /// Starts the metrics endpoint if configured, and a control channel per service.
    pub(crate) async fn start(settings: ClientSettings) -> Result<Client<T>, Error> {
        let transports = settings
            .servers
            .iter()
            .map(|server| AnyTransport::new(&server.transport))
            .collect::<Result<Vec<_>, _>>()?;
        let metrics = Arc::new(Metrics::default());
        let endpoint = match &settings.common.metrics_addr {
            Some(addr) => Some(Endpoint::start(addr, metrics.clone()).await?),
            None => None,
        };
        let mut client = Client {
            settings: settings.clone(),
            transports,
            _transport: std::marker::PhantomData,
            services: BTreeMap::new(),
            abort: CancellationToken::new(),
            tracker: TaskTracker::new(),
            readiness: Arc::new(Readiness::default()),
            deadlines: Arc::new(Deadlines::start(settings.common.handshake_timeout)),
            keepalive_after: Arc::new(Deadlines::start(KEEPALIVE_AFTER)),
            metrics,
            endpoint,
        };
        for service in settings.services.into_values() {
            client.start_service(service);
        }
        Ok(client)
    }

    /// Which control channels are still awaited.
    pub(crate) fn readiness(&self) -> Arc<Readiness> {
        self.readiness.clone()
    }

    fn start_service(&mut self, service: ClientService) {
        let service = Arc::new(service);
        self.readiness.expect([service.name.clone()]);
        let stop = CancellationToken::new();
        let abort = self.abort.child_token();
        let remotes = &self.settings.servers;
        let servers = Arc::new(Servers::new(remotes.len(), self.settings.mode));
        let mut tasks = Vec::with_capacity(remotes.len());
        let declare_as = match (&service.bind_port, &self.settings.declare) {
            (Some(_), Some(identity)) => Some(identity.name.clone()),
            _ => None,
        };
        for (index, remote) in remotes.iter().enumerate() {
            // The same context for whichever transport type this server has.
            macro_rules! run_on {
                ($transport:expr) => {
                    tokio::spawn(run_service(Arc::new(ServiceContext {
                        service: service.clone(),
                        transport: $transport.clone(),
                        remote_addr: remote.addr.clone(),
                        token: self.settings.token(&service, index),
                        declare_as: declare_as.clone(),
                        server: index,
                        servers: servers.clone(),
                        heartbeat_timeout: self.settings.common.heartbeat_timeout,
                        handshake_timeout: self.settings.common.handshake_timeout,
                        deadlines: self.deadlines.clone(),
                        keepalive_after: self.keepalive_after.clone(),
                        stop: stop.clone(),
                        abort: abort.clone(),
                        tracker: self.tracker.clone(),
                        readiness: self.readiness.clone(),
                        metrics: self.metrics.service(&service.name),
                        all_metrics: self.metrics.clone(),
                    })))
                };
            }
            tasks.push(match &self.transports[index] {
                AnyTransport::Tcp(transport) => run_on!(transport),
                AnyTransport::Noise(transport) => run_on!(transport),
                AnyTransport::Tls(transport) => run_on!(transport),
                AnyTransport::Websocket(transport) => run_on!(transport),
            });
        }
        self.services.insert(
            service.name.clone(),
            ServiceHandle {
                service,
                stop,
                abort,
                tasks,
            },
        );
    }

    async fn stop_service(&mut self, name: &str) {
        let Some(handle) = self.services.remove(name) else {
            return;
        };
        handle.stop.cancel();
        handle.abort.cancel();
        for task in handle.tasks {
            let _ = task.await;
        }
        self.readiness.forget(name);
        tracing::info!(service = %name, "service stopped");
    }

    /// Applies a new config: only added, removed and changed services are touched; settings
    /// outside the services restart everything.
    pub(crate) async fn apply(&mut self, new: ClientSettings) -> Result<(), Error> {
        if self.settings.needs_restart(&new) {
            tracing::warn!("settings outside [client.services] changed: restarting everything");
            let names: Vec<String> = self.services.keys().cloned().collect();
            for name in names {
                self.stop_service(&name).await;
            }
            if let Some(endpoint) = self.endpoint.take() {
                endpoint.stop().await;
            }
            let readiness = self.readiness.clone();
            *self = Client::start(new).await?;
            // Whoever waits on the old readiness set learns about the new services too.
            readiness.expect(self.readiness.pending());
            self.readiness = readiness;
            return Ok(());
        }
        self.settings.common.grace_period = new.common.grace_period;
        let running = self.services.iter().map(|(n, h)| (n, &*h.service));
        for (name, removed) in config::stale_services(running, &new.services) {
            self.stop_service(&name).await;
            if removed {
                self.metrics.forget(&name);
            }
        }
        for (name, service) in &new.services {
            if !self.services.contains_key(name) {
                self.start_service(service.clone());
            }
        }
        self.settings.services = new.services;
        Ok(())
    }

    /// The grace period from the config.
    pub(crate) fn grace_period(&self) -> Duration {
        self.settings.common.grace_period
    }

    /// Closes the control channels, lets open connections finish for up to `grace`, then
    /// closes the rest.
    pub(crate) async fn shutdown(mut self, grace: Duration) {
        for handle in self.services.values() {
            handle.stop.cancel();
        }
        for (_, handle) in std::mem::take(&mut self.services) {
            for task in handle.tasks {
                let _ = task.await;
            }
        }
        if !labcore::signals::drain(&self.tracker, grace).await {
            tracing::warn!(
                connections = self.tracker.len(),
                "grace period over: closing open connections"
            );
            self.abort.cancel();
            self.tracker.wait().await;
        }
        if let Some(endpoint) = self.endpoint.take() {
            endpoint.stop().await;
        }
    }
}

/// Capped exponential backoff with ±20 % jitter.
struct Backoff {
    next: Duration,
    cap: Duration,
}

impl Backoff {
    fn new(cap: Duration) -> Backoff {
        Backoff {
            next: FIRST_RETRY.min(cap),
            cap,
        }
    }

    fn reset(&mut self) {
        self.next = FIRST_RETRY.min(self.cap);
    }

    fn next(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.cap);
        base.mul_f64(rand::rng().random_range(0.8..=1.2))
    }
}

/// A service's control channel to one server, reopened until the service is stopped.
async fn run_service<T: Transport>(context: Arc<ServiceContext<T>>) {
    let service = &context.service;
    let mut backoff = Backoff::new(service.retry_interval);
    let mut opened_before = false;
    loop {
        let opened = tokio::select! {
            _ = context.stop.cancelled() => return,
            opened = timeout(context.handshake_timeout, open_control(&context)) => opened,
        };
        match opened {
            Ok(Ok((control, key))) => {
                context.readiness.up(&service.name);
                backoff.reset();
                if std::mem::replace(&mut opened_before, true) {
                    context.metrics.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                context.metrics.control_open.fetch_add(1, Ordering::Relaxed);
                context.servers.set(context.server, true);
                context.metrics.peer_up(&context.remote_addr);
                tracing::info!(service = %service.name, server = %context.remote_addr, "control channel open");
                let ended = serve_control(&context, control, key).await;
                context.servers.set(context.server, false);
                context.metrics.control_open.fetch_sub(1, Ordering::Relaxed);
                match ended {
                    None => {
                        context.metrics.peer_left(&context.remote_addr);
                        return;
                    }
                    Some(reason) => {
                        context.metrics.peer_down(&context.remote_addr, &reason);
                        tracing::warn!(service = %service.name, server = %context.remote_addr, %reason, "control channel lost: reconnecting")
                    }
                }
            }
            Ok(Err(Error::Declined {
                service: name,
                reason,
                retry: false,
            })) => {
                let err = Error::Declined {
                    service: name,
                    reason,
                    retry: false,
                };
                context.all_metrics.handshake_failed(&err);
                context
                    .metrics
                    .failed(&context.remote_addr, &err.to_string());
                tracing::error!(
                    service = %service.name,
                    server = %context.remote_addr,
                    reason = %err,
                    "the server refused to expose the declared service: not retried until the config changes"
                );
                // Nothing to wait for: readiness is not held up by a service that cannot open.
                context.readiness.up(&service.name);
                context.stop.cancelled().await;
                return;
            }
            Ok(Err(err)) => {
                context.all_metrics.handshake_failed(&err);
                context
                    .metrics
                    .failed(&context.remote_addr, &labcore::exit::chain(&err));
                tracing::error!(
                    service = %service.name,
                    server = %context.remote_addr,
                    reason = %labcore::exit::chain(&err),
                    "could not open the control channel"
                )
            }
            Err(_) => {
                let err = Error::Timeout {
                    what: "the handshake",
                    after: context.handshake_timeout,
                };
                context.all_metrics.handshake_failed(&err);
                context
                    .metrics
                    .failed(&context.remote_addr, &err.to_string());
                tracing::error!(
                    service = %service.name,
                    server = %context.remote_addr,
                    reason = %err,
                    "could not open the control channel"
                )
            }
        }
        let pause = backoff.next();
        tracing::debug!(service = %service.name, retry_in_ms = pause.as_millis() as u64, "reconnecting");
        tokio::select! {
            _ = context.stop.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// The client's half of a control channel's handshake.
async fn open_control<T: Transport>(
    context: &ServiceContext<T>,
) -> Result<(T::Stream, SessionKey), Error> {
    let service = &context.service;
    let mut stream = context.transport.connect(&context.remote_addr).await?;
    sockopt::nodelay(stream.tcp(), true);
    let digest = match &context.declare_as {
        Some(client) => declare::client_digest(client),
        None => protocol::service_digest(&service.name),
    };
    let hello = Hello::Control(digest);
    protocol::write_all(&mut stream, &hello.encode(), "hello").await?;
    let mut answer = [0u8; protocol::HELLO_LEN];
    protocol::read_exact(&mut stream, &mut answer, "the server's hello").await?;
    let Hello::Control(nonce) = Hello::decode(&answer)? else {
        return Err(Error::Unexpected {
            what: "data channel hello from the server",
        });
    };
    let key = SessionKey::prove(context.token.expose().as_bytes(), &nonce);
    // A server that does not know the service answers before reading the proof and may
    // already have closed: its answer explains better than the failed write.
    let sent = protocol::write_all(&mut stream, key.bytes(), "auth").await;
    let mut ack = [0u8; protocol::TAG_LEN];
    let read = protocol::read_exact(&mut stream, &mut ack, "ack").await;
    match (read, sent) {
        (Ok(()), _) => match Ack::decode(&ack)? {
            Ack::Ok if context.declare_as.is_some() => {
                declare_service(&mut stream, service).await?;
                Ok((stream, key))
            }
            Ack::Ok => Ok((stream, key)),
            Ack::ServiceNotExist if context.declare_as.is_some() => Err(Error::Refused {
                service: service.name.clone(),
                reason: "the server does not know this client (no declared services for it)",
            }),
            reason => Err(Error::Refused {
                service: service.name.clone(),
                reason: reason.meaning(),
            }),
        },
        (Err(_), Err(err)) | (Err(err), Ok(())) => Err(err),
    }
}

/// Declares `service` on a control channel the server just acknowledged, and reads its
/// verdict.
async fn declare_service<S: TunnelStream>(
    stream: &mut S,
    service: &ClientService,
) -> Result<(), Error> {
    let declaration = Declaration {
        name: service.name.clone(),
        service_type: service.service_type,
        port: service
            .bind_port
            .expect("only declared services are declared"),
    };
    protocol::write_all(stream, &declaration.encode(), "declaration").await?;
    match Verdict::read(stream).await? {
        Verdict::Ok => Ok(()),
        Verdict::Refused(reason) => Err(Error::Declined {
            service: service.name.clone(),
            reason,
            retry: false,
        }),
        Verdict::NotNow(reason) => Err(Error::Declined {
            service: service.name.clone(),
            reason,
            retry: true,
        }),
    }
}

/// Serves an open control channel; `None` when the service was stopped, else why it ended.
async fn serve_control<T: Transport>(
    context: &Arc<ServiceContext<T>>,
    mut control: T::Stream,
    key: SessionKey,
) -> Option<String> {
    // Data channels still waiting for a visitor end with their control channel.
    let session = context.stop.child_token();
    let _end_session = session.clone().drop_guard();
    let mut commands = Commands::default();
    loop {
        let read = async {
            let read = commands.next(&mut control);
            match context.heartbeat_timeout {
                Some(limit) => timeout(limit, read).await.unwrap_or(Err(Error::Timeout {
                    what: "a heartbeat",
                    after: limit,
                })),
                None => read.await,
            }
        };
        let read = tokio::select! {
            _ = context.stop.cancelled() => return None,
            read = read => read,
        };
        match read.and_then(|cmd| ControlCmd::decode(&cmd)) {
            Ok(ControlCmd::CreateDataChannel) => {
                let context = context.clone();
                let session = session.clone();
                context
                    .tracker
                    .clone()
                    .spawn(async move { data_channel(&context, key, session).await });
            }
            Ok(ControlCmd::HeartBeat) => {
                tracing::trace!(service = %context.service.name, "heartbeat");
            }
            Err(err) => return Some(labcore::exit::chain(&err)),
        }
    }
}

/// Commands read from a control channel, several per read when the server wrote several. A
/// read that ends short of the buffer tells tokio the socket is drained, so waiting for the
/// next command makes no system call that finds nothing (as reading them one by one did).
/// Cancel-safe: bytes are taken into the buffer only by a read that completed.
#[derive(Default)]
struct Commands {
    buf: [u8; protocol::TAG_LEN * 8],
    start: usize,
    end: usize,
}

impl Commands {
    async fn next<S: TunnelStream>(
        &mut self,
        control: &mut S,
    ) -> Result<[u8; protocol::TAG_LEN], Error> {
        while self.end - self.start < protocol::TAG_LEN {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            let n = control
                .read(&mut self.buf[self.end..])
                .await
                .map_err(|err| Error::io("reading the a command", err))?;
            if n == 0 {
                return Err(Error::Closed { what: "a command" });
            }
            self.end += n;
        }
        let mut cmd = [0u8; protocol::TAG_LEN];
        cmd.copy_from_slice(&self.buf[self.start..self.start + protocol::TAG_LEN]);
        self.start += protocol::TAG_LEN;
        Ok(cmd)
    }
}

/// Reads a data channel's command into the front of `buf`, and whatever has arrived after it,
/// up to `buf`'s length: how many bytes were read (at least the command).
async fn read_command<S: TunnelStream>(stream: &mut S, buf: &mut [u8]) -> Result<usize, Error> {
    let what = "a data channel command";
    let mut got = 0;
    while got < protocol::TAG_LEN {
        match stream.read(&mut buf[got..]).await {
            Ok(0) => return Err(Error::Closed { what }),
            Ok(n) => got += n,
            Err(err) => return Err(Error::io(format!("reading the {what}"), err)),
        }
    }
    Ok(got)
}

/// One data channel: open it, wait for the server's command, connect the local service and
/// forward.
async fn data_channel<T: Transport>(
    context: &ServiceContext<T>,
    key: SessionKey,
    session: CancellationToken,
) {
    let service = &context.service;
    // A hot standby's data channels wait here, unopened, until their server's turn.
    tokio::select! {
        _ = session.cancelled() => return,
        () = context.servers.wait_turn(context.server) => {}
    }
    let open = async {
        let mut stream = context.transport.connect_data(&context.remote_addr).await?;
        // The transport set its own TCP_NODELAY: a second call only if the service differs.
        if service.nodelay != context.transport.tcp().nodelay() {
            sockopt::nodelay(stream.tcp(), service.nodelay);
        }
        protocol::write_all(&mut stream, &Hello::Data(key).encode(), "hello").await?;
        Ok::<_, Error>(stream)
    };
    let mut channel = match context.deadlines.within(open).await {
        Some(Ok(stream)) => stream,
        Some(Err(err)) => {
            tracing::warn!(service = %service.name, reason = %labcore::exit::chain(&err), "could not open a data channel");
            return;
        }
        None => {
            tracing::warn!(service = %service.name, "opening a data channel timed out");
            return;
        }
    };
    // A TCP service's command may come with the visitor's first bytes (the server writes
    // those it has in the same segment): one read takes both, and they are written to the
    // local service before the forwarding starts. A UDP service's command is read alone, as
    // the frames after it are the forwarding's.
    let mut first = [0u8; protocol::TAG_LEN + FIRST_BYTES];
    let want = match service.service_type {
        ServiceType::Tcp => first.len(),
        ServiceType::Udp => protocol::TAG_LEN,
    };
    let read = tokio::select! {
        _ = session.cancelled() => return,
        // A standby that was the first server up opened its data channels then; once a
        // server before it is up they are closed, so its visitors wait as a standby's do (the
        // server drops a closed channel from its pool and asks for another, which waits).
        () = context.servers.turn_lost(context.server) => {
            tracing::debug!(service = %service.name, server = %context.remote_addr, "idle data channel of a standby closed");
            return;
        }
        read = read_command(&mut channel, &mut first[..want]) => read,
    };
    let mut cmd = [0u8; protocol::TAG_LEN];
    cmd.copy_from_slice(&first[..protocol::TAG_LEN]);
    let early = match (
        read.and_then(|got| DataCmd::decode(&cmd).map(|cmd| (cmd, got))),
        service.service_type,
    ) {
        (Ok((DataCmd::StartForwardTcp, got)), ServiceType::Tcp) => &first[protocol::TAG_LEN..got],
        (Ok((DataCmd::StartForwardUdp, _)), ServiceType::Udp) => {
            return udp_channel(context, channel).await;
        }
        (Ok((DataCmd::StartForwardUdp, _)), ServiceType::Tcp) => {
            tracing::warn!(service = %service.name, "the server forwards UDP for this service, but it is a TCP service here");
            return;
        }
        (Ok((DataCmd::StartForwardTcp, _)), ServiceType::Udp) => {
            tracing::warn!(service = %service.name, "the server forwards TCP for this service, but it is a UDP service here");
            return;
        }
        (Err(Error::Closed { .. }), _) => {
            tracing::debug!(service = %service.name, "idle data channel closed by the server");
            return;
        }
        (Err(err), _) => {
            tracing::warn!(service = %service.name, reason = %labcore::exit::chain(&err), "data channel failed");
            return;
        }
    };
    let mut local = match context
        .deadlines
        .within(TcpStream::connect(&service.local_addr))
        .await
    {
        Some(Ok(local)) => local,
        Some(Err(err)) => {
            context.metrics.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(service = %service.name, local_addr = %service.local_addr, error = %err, "local service unreachable: visitor closed");
            return;
        }
        None => {
            context.metrics.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(service = %service.name, local_addr = %service.local_addr, "connecting to the local service timed out: visitor closed");
            return;
        }
    };
    sockopt::nodelay(&local, service.nodelay);
    if !early.is_empty() {
        // A fresh socket's buffer takes these few bytes at once.
        if let Err(err) = local.write_all(early).await {
            tracing::debug!(service = %service.name, error = %err, "connection ended");
            return;
        }
        context
            .metrics
            .to_service
            .fetch_add(early.len() as u64, Ordering::Relaxed);
    }
    let _open = context.metrics.connection();
    // The service is the local socket here.
    let meter = forward::Meter {
        inbound: &context.metrics.to_service,
        outbound: &context.metrics.to_visitor,
    };
    let late = forward::LateKeepalive {
        after: &context.keepalive_after,
        transport: context.transport.tcp(),
    };
    tokio::select! {
        _ = context.abort.cancelled() => {}
        carried = forward::forward(channel, local, meter, None, Some(late)) => match carried {
            Ok(carried) => tracing::debug!(
                service = %service.name,
                to_local = carried.inbound,
                from_local = carried.outbound,
                "connection finished"
            ),
            Err(err) => tracing::debug!(service = %service.name, error = %err, "connection ended"),
        },
    }
}

/// A started UDP data channel: datagrams to and from the local service, a session per
/// visitor, until the channel ends or the service stops.
async fn udp_channel<T: Transport>(context: &ServiceContext<T>, channel: T::Stream) {
    let service = &context.service;
    // Resolved once per channel: every session of it talks to the same address.
    let local = match tokio::net::lookup_host(&service.local_addr).await {
        Ok(mut addrs) => addrs.next(),
        Err(err) => {
            tracing::warn!(service = %service.name, local_addr = %service.local_addr, error = %err, "cannot resolve the local service");
            None
        }
    };
    let Some(local) = local else {
        context.metrics.refused.fetch_add(1, Ordering::Relaxed);
        return;
    };
    tracing::debug!(service = %service.name, %local, "udp data channel started");
    // It carries every visitor's datagrams for as long as it lives (`connect_data` left
    // keepalive off on a plain TCP channel).
    if channel.plain_tcp().is_some() {
        context.transport.tcp().keepalive(channel.tcp());
    }
    tokio::select! {
        _ = context.stop.cancelled() => {}
        ended = udp::serve_local(channel, local, &context.metrics, udp::Limits::DEFAULT) => match ended {
            Ok(()) => tracing::debug!(service = %service.name, "udp data channel closed by the server"),
            Err(err) => tracing::warn!(service = %service.name, reason = %labcore::exit::chain(&err), "udp data channel failed"),
        },
    }
}

impl<T: Transport> Node for Client<T> {
    type Settings = ClientSettings;
    const MODE: Mode = Mode::Client;

    async fn start(settings: ClientSettings) -> Result<Self, Error> {
        Client::start(settings).await
    }

    async fn apply(&mut self, settings: ClientSettings) -> Result<(), Error> {
        Client::apply(self, settings).await
    }

    fn readiness(&self) -> Option<Arc<Readiness>> {
        Some(Client::readiness(self))
    }

    fn reload_wait(settings: &ClientSettings) -> Duration {
        settings.common.handshake_timeout
    }

    fn transport_type(settings: &ClientSettings) -> TransportType {
        settings.common.transport.kind
    }

    fn settings(settings: Settings) -> Option<ClientSettings> {
        match settings {
            Settings::Client(s) => Some(s),
            Settings::Server(_) => None,
        }
    }

    fn wrap(settings: ClientSettings) -> Settings {
        Settings::Client(settings)
    }

    async fn shutdown(self) {
        let grace = self.grace_period();
        Client::shutdown(self, grace).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter() {
        let mut backoff = Backoff::new(Duration::from_secs(1));
        let pauses: Vec<Duration> = (0..6).map(|_| backoff.next()).collect();
        assert!(pauses[0] >= Duration::from_millis(160) && pauses[0] <= Duration::from_millis(240));
        assert!(pauses[1] >= Duration::from_millis(320) && pauses[1] <= Duration::from_millis(480));
        for pause in &pauses[3..] {
            assert!(*pause >= Duration::from_millis(800) && *pause <= Duration::from_millis(1200));
        }
        backoff.reset();
        assert!(backoff.next() <= Duration::from_millis(240));
    }
}
