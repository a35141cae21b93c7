//! The server: the public side. It listens on the control port for clients and on each
//! service's port for visitors, and pairs every visitor with a data channel from the client
//! that serves that service.
//!
//! Tasks and who owns them:
//! - the control port's accept loop (one task) hands each new connection to a handshake task,
//!   bounded by `handshake_timeout` and by [`MAX_HANDSHAKES`] in progress at once, of which
//!   one source address gets only its share once most are taken (so connections that never
//!   speak cannot lock clients out); a control channel that authenticates, or a
//!   data channel that names an open session, is sent to its service's task;
//! - one task per service owns its listener, its clients' sessions (each with its pool of
//!   idle data channels) and its queue of visitors waiting for one; it asks for data channels
//!   (eight per client up front, then one per visitor, as rathole does, but in batches of
//!   [`REFILL`] replacements, or at once for a visitor who has to wait);
//! - one task per control channel writes those `CreateDataChannel`s and the `HeartBeat`s, and
//!   reports the channel's end to the service's task, so a client slow to read stalls only
//!   its own channel;
//! - one task per visitor connection forwards bytes ([`crate::forward`]).
//!
//! A service takes one client (rathole's rule: a new control channel replaces the old one)
//! or, with `clients = "many"`, several, and spreads visitors over those with an idle data
//! channel by round robin or least connections. A client found dead (its control channel
//! ends: closed, or a heartbeat unacknowledged past `heartbeat_timeout`) is out at once, and
//! each of its visitors that has not yet sent or received a byte goes back to the queue for
//! another client: nothing of the visitor is read before its first byte is there, so a
//! retry replays nothing (the buffer for retries is zero bytes). Past the first byte, a
//! visitor stays with its client;
//! - a UDP service (`type = "udp"`, one client only) binds a UDP socket instead, asks for two data channels up
//!   front (as rathole does) and none per visitor: one task carries every visitor's
//!   datagrams over one started channel ([`crate::udp`]), the other waits as a spare, started
//!   as soon as the first breaks (and a new spare is asked for). With no client, datagrams
//!   are read and dropped (counted), so none wait stale in the kernel for the next client.
//!
//! With `[server.declared]`, clients may also declare services of their own
//! ([`crate::declare`]); each declared service runs as a service task like the others,
//! started by its control channel's handshake and ended with it ([`declared`]).
//!
//! Service listeners are bound at start, so the server is ready when every port is; a visitor
//! who arrives while no client serves the service is closed at once. Each service has its own
//! cancellation tokens, so removing or changing one on reload closes its port and its
//! connections and nothing else. On shutdown the listeners close first and open connections
//! get `grace_period` to finish.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior, timeout};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{
    self, Balance, Mode, ServerService, ServerSettings, ServiceType, Settings, TransportType,
};
use crate::daemon::{Node, Readiness};
use crate::deadline::Deadlines;
use crate::error::Error;
use crate::forward;
use crate::metrics::{Endpoint, Metrics, ServiceMetrics};
use crate::protocol::{self, Ack, ControlCmd, DataCmd, Digest, Hello, SessionKey};
use crate::proxy_protocol;
use crate::sockopt;
use crate::transport::{Transport, TunnelStream};
use crate::udp;

mod declared;

use declared::Declared;

/// Data channels a client is asked for as soon as its control channel opens (rathole: 8).
const POOL_SIZE: usize = 8;
/// Replacements for pooled data channels that visitors took are asked for this many at once:
/// the client then dials them together and the server accepts them together, so the
/// `CreateDataChannel` write, the client's read of it and the wake-ups of both sides are
/// shared by several visitors. The pool dips to `POOL_SIZE - REFILL` between refills; a
/// visitor who finds it empty still gets a channel asked for at once.
const REFILL: usize = 4;
/// The same for a UDP service (rathole: 2): one carries the datagrams, one is the spare.
const UDP_POOL_SIZE: usize = 2;
/// The longest message that starts a data channel: the command, a PROXY protocol header and
/// the visitor's first bytes, as many as the forwarding copies in one chunk.
const START_LEN: usize = protocol::TAG_LEN + proxy_protocol::MAX_LEN + forward::SMALL_CHUNK;
/// Idle data channels kept per service; more are closed.
const MAX_IDLE: usize = 256;
/// Visitors that may wait for a data channel per service; more are closed.
const MAX_WAITING: usize = 4096;
/// Connections on the control port that may be in their handshake at once.
const MAX_HANDSHAKES: usize = 1024;
/// Handshakes any source may hold while fewer than this many are in progress. A client's
/// burst of data channels (one per visitor arriving at once, each in its handshake for a
/// round trip or two) may be hundreds from one address, so sources are not limited while
/// there is room.
const SHARED_HANDSHAKES: usize = MAX_HANDSHAKES * 3 / 4;
/// Past [`SHARED_HANDSHAKES`], a source (an IPv4 address, or an IPv6 /64, which one host
/// usually holds whole) that has this many handshakes in progress gets no more: silent
/// connections from one host then take at most three quarters of the slots, and the rest
/// stay for everyone else.
const MAX_HANDSHAKES_PER_SOURCE: usize = 128;
/// Messages queued from the control port to one service's task.
const EVENT_QUEUE: usize = 256;
/// How long writing `StartForwardTcp` on an idle data channel may take before the channel
/// counts as broken; it is written from the service's task, which must not stall.
const START_LIMIT: Duration = Duration::from_secs(1);

/// A connection for a service's task, after its handshake.
enum Event<S> {
    /// An authenticated control channel.
    Control {
        stream: S,
        key: SessionKey,
        peer: SocketAddr,
        /// What tells the client its channel is open.
        welcome: Welcome,
    },
    /// A data channel naming this service's session.
    Data { stream: S, key: SessionKey },
    /// A control channel's task ended (the client went or misbehaved).
    Ended { id: u64, reason: String },
    /// A visitor whose client went away before any byte moved, for another client.
    Retry(Waiting),
}

/// The message that opens an authenticated control channel, written by the service's task
/// once it holds the session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Welcome {
    /// rathole's `Ack::Ok`.
    Ack,
    /// A declared service's `Verdict::Ok` (the ack came before the declaration).
    Declared,
}

/// What the control port's handshakes look services and sessions up in.
struct Registry<S> {
    services: RwLock<HashMap<Digest, Arc<Entry<S>>>>,
    sessions: RwLock<HashMap<SessionKey, mpsc::Sender<Event<S>>>>,
}

struct Entry<S> {
    service: Arc<ServerService>,
    events: mpsc::Sender<Event<S>>,
    /// The open sessions' keys: one, or several if the service takes many clients.
    sessions: Mutex<Vec<SessionKey>>,
    /// Declared by a client: opened by a declaration only, never by a hello naming it.
    declared: bool,
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    // A panic while holding the lock leaves plain maps behind: still usable.
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

impl<S> Registry<S> {
    fn new() -> Registry<S> {
        Registry {
            services: RwLock::new(HashMap::new()),
            sessions: RwLock::new(HashMap::new()),
        }
    }

    fn service(&self, digest: &Digest) -> Option<Arc<Entry<S>>> {
        read(&self.services).get(digest).cloned()
    }

    fn session(&self, key: &SessionKey) -> Option<mpsc::Sender<Event<S>>> {
        read(&self.sessions).get(key).cloned()
    }

    /// Adds `key` to the sessions of `entry`'s service; unless the service takes many
    /// clients, it replaces the one before.
    fn open_session(&self, entry: &Entry<S>, key: SessionKey) {
        let mut current = entry.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let mut sessions = write(&self.sessions);
        if !entry.service.many_clients {
            for old in current.drain(..) {
                sessions.remove(&old);
            }
        }
        current.push(key);
        sessions.insert(key, entry.events.clone());
    }

    /// Forgets one session of the service known by `digest`.
    fn close_session(&self, digest: &Digest, key: &SessionKey) {
        let Some(entry) = self.service(digest) else {
            return;
        };
        let mut current = entry.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(at) = current.iter().position(|k| k == key) {
            current.remove(at);
            write(&self.sessions).remove(key);
        }
    }

    fn insert(&self, entry: Arc<Entry<S>>) {
        write(&self.services).insert(entry.service.digest, entry);
    }

    fn remove(&self, digest: &Digest) {
        let Some(entry) = write(&self.services).remove(digest) else {
            return;
        };
        let current = entry.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let mut sessions = write(&self.sessions);
        for key in current.iter() {
            sessions.remove(key);
        }
    }
}

/// A running service: its task and the tokens that stop it.
struct ServiceHandle {
    service: Arc<ServerService>,
    /// Closes the listener and the control channel.
    stop: CancellationToken,
    /// Closes the service's open connections.
    abort: CancellationToken,
    task: JoinHandle<()>,
}

/// A running server.
pub(crate) struct Server<T: Transport> {
    settings: ServerSettings,
    registry: Arc<Registry<T::Stream>>,
    spawner: Spawner<T::Stream>,
    /// The services clients declare, if `[server.declared]` allows them.
    declared: Option<Arc<Declared<T::Stream>>>,
    services: BTreeMap<String, ServiceHandle>,
    control_stop: CancellationToken,
    control_task: JoinHandle<()>,
    abort: CancellationToken,
    tracker: TaskTracker,
    metrics: Arc<Metrics>,
    endpoint: Option<Endpoint>,
}

impl<T: Transport> Server<T> {
    /// Binds the control port and every service's port and starts serving.
    pub(crate) async fn start(settings: ServerSettings) -> Result<Server<T>, Error> {
        Server::start_on(settings, None).await
    }

    /// [`Server::start`], on a control port already bound if one is given.
    async fn start_on(
        settings: ServerSettings,
        control: Option<TcpListener>,
    ) -> Result<Server<T>, Error> {
        let transport = Arc::new(T::new(&settings.common.transport)?);
        let registry = Arc::new(Registry::new());
        let tracker = TaskTracker::new();
        let metrics = Arc::new(Metrics::default());
        let endpoint = match &settings.common.metrics_addr {
            Some(addr) => Some(Endpoint::start(addr, metrics.clone()).await?),
            None => None,
        };
        let listener = match control {
            Some(listener) => listener,
            None => transport.bind(&settings.bind_addr).await?,
        };
        let control_addr = T::local_addr(&listener)?;
        tracing::info!(addr = %control_addr, "control port listening");
        let abort = CancellationToken::new();
        let spawner = Spawner {
            registry: registry.clone(),
            heartbeat: settings.heartbeat_interval,
            dead_after: settings.common.heartbeat_timeout,
            handshake_timeout: settings.common.handshake_timeout,
            tunnel_nodelay: settings.common.transport.tcp.nodelay,
            abort: abort.clone(),
            tracker: tracker.clone(),
            metrics: metrics.clone(),
        };
        let declared = settings.declared.clone().map(|declared| {
            Arc::new(Declared::new(
                declared,
                settings.common.transport.tcp.nodelay,
                spawner.clone(),
            ))
        });
        let control_stop = CancellationToken::new();
        let control_task = tokio::spawn(accept_clients(
            transport.clone(),
            listener,
            Lookup {
                registry: registry.clone(),
                declared: declared.clone(),
            },
            tracker.clone(),
            control_stop.clone(),
            settings.common.handshake_timeout,
            metrics.clone(),
        ));
        let mut server = Server {
            settings: settings.clone(),
            registry,
            spawner,
            declared,
            services: BTreeMap::new(),
            control_stop,
            control_task,
            abort,
            tracker,
            metrics,
            endpoint,
        };
        for service in settings.services.values() {
            if let Err(err) = server.start_service(service.clone()).await {
                server.shutdown(Duration::ZERO).await;
                return Err(err);
            }
        }
        Ok(server)
    }

    async fn start_service(&mut self, service: ServerService) -> Result<(), Error> {
        let listener = bind_service(&service).await?;
        self.start_service_on(service, listener)
    }

    /// Starts `service` on a port already bound.
    fn start_service_on(
        &mut self,
        service: ServerService,
        listener: Listener,
    ) -> Result<(), Error> {
        let started = self.spawner.task(service, listener, false)?;
        let task = tokio::spawn(started.task.run());
        self.services.insert(
            started.service.name.clone(),
            ServiceHandle {
                service: started.service,
                stop: started.stop,
                abort: started.abort,
                task,
            },
        );
        Ok(())
    }

    async fn stop_service(&mut self, name: &str) {
        let Some(handle) = self.services.remove(name) else {
            return;
        };
        self.registry.remove(&handle.service.digest);
        handle.stop.cancel();
        handle.abort.cancel();
        // The task ends at its next await; the listener is closed once it has.
        let _ = handle.task.await;
        tracing::info!(service = %name, "service stopped");
    }

    /// Applies a new config: services added, removed or changed start, stop or restart; the
    /// others and their connections are left alone. Settings outside the services restart
    /// everything.
    pub(crate) async fn apply(&mut self, new: ServerSettings) -> Result<(), Error> {
        if self.settings.needs_restart(&new) {
            tracing::warn!("settings outside [server.services] changed: restarting everything");
            // A new control port is bound before the old one is let go, so one that is taken
            // leaves the running server as it is.
            let control = if new.bind_addr == self.settings.bind_addr {
                None
            } else {
                let bound = match T::new(&new.common.transport) {
                    Ok(transport) => transport.bind(&new.bind_addr).await,
                    Err(err) => Err(err),
                };
                match bound {
                    Ok(listener) => Some(listener),
                    Err(err) => {
                        self.reload_failed(&err, "the running server is kept");
                        return Ok(());
                    }
                }
            };
            let old = self.settings.clone();
            self.stop_all().await;
            match Server::start_on(new, control).await {
                Ok(server) => *self = server,
                Err(err) => {
                    // The old ports were freed just now: the old config starts again on them.
                    *self = Server::start(old).await?;
                    self.reload_failed(&err, "the old config is running again");
                }
            }
            return Ok(());
        }
        self.settings.common.grace_period = new.common.grace_period;
        let mut new = new;
        let running = self.services.iter().map(|(n, h)| (n, &*h.service));
        let stale = config::stale_services(running, &new.services);
        let mut bound = BTreeMap::new();
        for (name, removed) in stale {
            if let Some(service) = new.services.get(&name)
                && let Some(old) = self.services.get(&name).map(|h| h.service.clone())
                && (old.bind_addr != service.bind_addr || old.service_type != service.service_type)
            {
                // A service moving to another port binds it before it lets go of the old one:
                // if the new port is taken, the service runs on as it was.
                match bind_service(service).await {
                    Ok(listener) => {
                        bound.insert(name.clone(), listener);
                    }
                    Err(err) => {
                        self.reload_failed(&err, "the service runs on as it was");
                        new.services.insert(name, (*old).clone());
                        continue;
                    }
                }
            }
            self.stop_service(&name).await;
            if removed {
                self.metrics.forget(&name);
            }
        }
        for (name, service) in &new.services {
            if self.services.contains_key(name) {
                continue;
            }
            if let Some(declared) = &self.declared {
                // The config wins over a client's declaration of the same name.
                declared.remove(name).await;
            }
            let started = match bound.remove(name) {
                Some(listener) => self.start_service_on(service.clone(), listener),
                None => self.start_service(service.clone()).await,
            };
            if let Err(err) = started {
                self.reload_failed(&err, "the service is not running");
            }
        }
        self.settings.services = new.services;
        Ok(())
    }

    /// Reports a reload that could not be applied: logged, and counted in the metrics.
    fn reload_failed(&self, err: &Error, outcome: &str) {
        self.metrics.reload_failures.fetch_add(1, Ordering::Relaxed);
        tracing::error!(error = %labcore::exit::chain(err), "reload not applied: {outcome}");
    }

    /// Closes every port and connection at once.
    async fn stop_all(&mut self) {
        self.control_stop.cancel();
        let _ = (&mut self.control_task).await;
        let names: Vec<String> = self.services.keys().cloned().collect();
        for name in names {
            self.stop_service(&name).await;
        }
        if let Some(declared) = &self.declared {
            declared.stop_all(true).await;
        }
        self.abort.cancel();
        self.tracker.close();
        self.tracker.wait().await;
        if let Some(endpoint) = self.endpoint.take() {
            endpoint.stop().await;
        }
    }

    /// Stops accepting, lets open connections finish for up to `grace`, then closes the rest.
    pub(crate) async fn shutdown(mut self, grace: Duration) {
        self.control_stop.cancel();
        for handle in self.services.values() {
            handle.stop.cancel();
        }
        let _ = (&mut self.control_task).await;
        for (_, handle) in std::mem::take(&mut self.services) {
            let _ = handle.task.await;
        }
        if let Some(declared) = &self.declared {
            declared.stop_all(false).await;
        }
        let open = self.tracker.len();
        if open > 0 {
            tracing::info!(
                connections = open,
                grace_secs = grace.as_secs(),
                "waiting for open connections"
            );
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

    /// The grace period from the config.
    pub(crate) fn grace_period(&self) -> Duration {
        self.settings.common.grace_period
    }
}

/// What starting a service's task takes: shared by the services of the config and those
/// clients declare.
struct Spawner<S> {
    registry: Arc<Registry<S>>,
    heartbeat: Option<Duration>,
    dead_after: Option<Duration>,
    handshake_timeout: Duration,
    /// Whether the tunnel's own connections have TCP_NODELAY (a visitor's is set again only
    /// when its service differs).
    tunnel_nodelay: bool,
    /// Closes every connection of the server.
    abort: CancellationToken,
    tracker: TaskTracker,
    metrics: Arc<Metrics>,
}

impl<S> Clone for Spawner<S> {
    fn clone(&self) -> Self {
        Spawner {
            registry: self.registry.clone(),
            heartbeat: self.heartbeat,
            dead_after: self.dead_after,
            handshake_timeout: self.handshake_timeout,
            tunnel_nodelay: self.tunnel_nodelay,
            abort: self.abort.clone(),
            tracker: self.tracker.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

/// A service's task, registered but not spawned yet, with what stops it.
struct Started<S> {
    task: ServiceTask<S>,
    service: Arc<ServerService>,
    entry: Arc<Entry<S>>,
    /// Closes the listener and the control channels.
    stop: CancellationToken,
    /// Closes the service's open connections.
    abort: CancellationToken,
}

impl<S: TunnelStream> Spawner<S> {
    /// Registers `service` (its control channels may open from now on) and makes its task on
    /// `listener`; `declared` marks a service a client declared.
    fn task(
        &self,
        service: ServerService,
        listener: Listener,
        declared: bool,
    ) -> Result<Started<S>, Error> {
        let addr = match &listener {
            Listener::Tcp(listener) => listener.local_addr(),
            Listener::Udp(socket) => socket.local_addr(),
        };
        let addr = addr.map_err(|e| Error::io("reading a service port's address", e))?;
        let kind = match service.service_type {
            ServiceType::Tcp => "tcp",
            ServiceType::Udp => "udp",
        };
        tracing::info!(service = %service.name, %addr, protocol = kind, declared, "service listening");
        let service = Arc::new(service);
        let (events_tx, events) = mpsc::channel(EVENT_QUEUE);
        let entry = Arc::new(Entry {
            service: service.clone(),
            events: events_tx.clone(),
            sessions: Mutex::new(Vec::new()),
            declared,
        });
        self.registry.insert(entry.clone());
        let stop = CancellationToken::new();
        let abort = self.abort.child_token();
        let task = ServiceTask {
            service: service.clone(),
            listener,
            events,
            events_tx,
            registry: self.registry.clone(),
            heartbeat: self.heartbeat,
            dead_after: self.dead_after,
            handshake_timeout: self.handshake_timeout,
            tunnel_nodelay: self.tunnel_nodelay,
            stop: stop.clone(),
            abort: abort.clone(),
            tracker: self.tracker.clone(),
            metrics: self.metrics.service(&service.name),
            reconnected: false,
            sessions: Vec::new(),
            next_id: 0,
            cursor: 0,
            waiting: VecDeque::new(),
            udp: None,
            slots: Arc::new(Semaphore::new(max_connections(&service))),
            ends_with_client: declared,
            start: Box::new([0; START_LEN]),
        };
        Ok(Started {
            task,
            service,
            entry,
            stop,
            abort,
        })
    }
}

/// Handshakes in progress, in all and per source address.
#[derive(Default)]
struct Sources(Mutex<SourceCounts>);

#[derive(Default)]
struct SourceCounts {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// One handshake in progress from `source`, counted until it drops.
struct SourceSlot {
    sources: Arc<Sources>,
    source: IpAddr,
}

impl Sources {
    /// Counts a handshake from `peer`, unless every slot is taken, or most are and its
    /// source already has its share.
    fn enter(self: &Arc<Self>, peer: SocketAddr) -> Option<SourceSlot> {
        let source = source_of(peer.ip());
        let mut counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let own = counts.by_source.get(&source).copied().unwrap_or(0);
        if counts.total >= MAX_HANDSHAKES
            || (counts.total >= SHARED_HANDSHAKES && own >= MAX_HANDSHAKES_PER_SOURCE)
        {
            return None;
        }
        counts.total += 1;
        *counts.by_source.entry(source).or_default() += 1;
        Some(SourceSlot {
            sources: self.clone(),
            source,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut counts = self.sources.0.lock().unwrap_or_else(|e| e.into_inner());
        counts.total -= 1;
        if let Some(count) = counts.by_source.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                counts.by_source.remove(&self.source);
            }
        }
    }
}

/// What handshakes are counted by: the IPv4 address, or the IPv6 /64.
fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let segments = v6.segments();
                IpAddr::V6(Ipv6Addr::new(
                    segments[0],
                    segments[1],
                    segments[2],
                    segments[3],
                    0,
                    0,
                    0,
                    0,
                ))
            }
        },
    }
}

/// Where a handshake finds what a hello names: services, sessions, declaring clients.
struct Lookup<S> {
    registry: Arc<Registry<S>>,
    declared: Option<Arc<Declared<S>>>,
}

/// The control port: accepts clients and runs each connection's handshake.
async fn accept_clients<T: Transport>(
    transport: Arc<T>,
    listener: TcpListener,
    lookup: Lookup<T::Stream>,
    tracker: TaskTracker,
    stop: CancellationToken,
    handshake_timeout: Duration,
    metrics: Arc<Metrics>,
) {
    let sources = Arc::new(Sources::default());
    // Handshake tasks hold it, so it outlives this loop while any is in progress.
    let deadlines = Arc::new(Deadlines::start(handshake_timeout));
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = transport.accept(&listener) => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(conn) => conn,
            Err(err) => {
                // Out of file descriptors or memory: wait a moment instead of spinning.
                tracing::warn!(error = %err, "accepting on the control port failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Closed at once, and logged at debug level only: a flood must not flood the log.
        let Some(slot) = sources.enter(peer) else {
            tracing::debug!(%peer, "too many handshakes in progress: connection closed");
            continue;
        };
        let transport = transport.clone();
        let registry = lookup.registry.clone();
        let declared = lookup.declared.clone();
        let metrics = metrics.clone();
        let deadlines = deadlines.clone();
        tracker.spawn(async move {
            let _slot = slot;
            let handshake = handshake(&*transport, tcp, peer, &registry, declared.as_ref());
            let failed = match deadlines.within(handshake).await {
                Some(Ok(())) => return,
                Some(Err(err)) => err,
                None => Error::Timeout {
                    what: "the handshake",
                    after: handshake_timeout,
                },
            };
            metrics.handshake_failed(&failed);
            tracing::warn!(%peer, reason = %labcore::exit::chain(&failed), "connection refused");
        });
    }
}

/// Reads a new connection's hello and hands it to its service.
async fn handshake<T: Transport>(
    transport: &T,
    tcp: TcpStream,
    peer: SocketAddr,
    registry: &Registry<T::Stream>,
    declared: Option<&Arc<Declared<T::Stream>>>,
) -> Result<(), Error> {
    let mut stream = transport.handshake(tcp).await?;
    let hello = read_hello(&mut stream).await?;
    match Hello::decode(&hello)? {
        Hello::Control(digest) => control_handshake(stream, digest, peer, registry, declared).await,
        Hello::Data(key) => {
            let events = registry.session(&key).ok_or(Error::UnknownSession)?;
            stream.authenticated();
            events
                .send(Event::Data { stream, key })
                .await
                .map_err(|_| Error::UnknownSession)
        }
    }
}

/// Reads a new connection's hello. A client says nothing more until it is answered (a data
/// channel waits for its command, a control channel for the nonce), so a byte past the hello
/// breaks the protocol. It is read into a buffer one byte longer than the hello: the read
/// that ends short tells tokio the socket is drained, so the first read of a visitor's bytes
/// on a data channel waits for them instead of making a system call to find nothing.
async fn read_hello<S: TunnelStream>(stream: &mut S) -> Result<[u8; protocol::HELLO_LEN], Error> {
    let mut buf = [0u8; protocol::HELLO_LEN + 1];
    let mut got = 0;
    while got < protocol::HELLO_LEN {
        let n = stream
            .read(&mut buf[got..])
            .await
            .map_err(|err| Error::io("reading the hello", err))?;
        if n == 0 {
            return Err(Error::Closed { what: "hello" });
        }
        got += n;
    }
    if got > protocol::HELLO_LEN {
        return Err(Error::Unexpected {
            what: "bytes after the hello",
        });
    }
    let mut hello = [0u8; protocol::HELLO_LEN];
    hello.copy_from_slice(&buf[..protocol::HELLO_LEN]);
    Ok(hello)
}

/// The server's half of a control channel's handshake: nonce, service lookup, token proof.
async fn control_handshake<S: TunnelStream>(
    mut stream: S,
    digest: Digest,
    peer: SocketAddr,
    registry: &Registry<S>,
    declared: Option<&Arc<Declared<S>>>,
) -> Result<(), Error> {
    let nonce = protocol::nonce()?;
    protocol::write_all(&mut stream, &Hello::Control(nonce).encode(), "hello").await?;
    let Some(entry) = registry.service(&digest).filter(|entry| !entry.declared) else {
        if let Some(declared) = declared
            && let Some(client) = declared.client(&digest)
        {
            return declared.handshake(stream, &nonce, client, peer).await;
        }
        protocol::write_all(&mut stream, &Ack::ServiceNotExist.encode(), "ack").await?;
        return Err(Error::UnknownService {
            digest_prefix: digest[..4].iter().map(|b| format!("{b:02x}")).collect(),
        });
    };
    let mut auth = [0u8; protocol::AUTH_LEN];
    protocol::read_exact(&mut stream, &mut auth, "auth").await?;
    let key = SessionKey::prove(entry.service.token.as_bytes(), &nonce);
    if key != SessionKey::from_bytes(auth) {
        protocol::write_all(&mut stream, &Ack::AuthFailed.encode(), "ack").await?;
        return Err(Error::AuthFailed {
            service: match &entry.service.group {
                Some(group) => format!("{} (group {group})", entry.service.name),
                None => entry.service.name.clone(),
            },
        });
    }
    stream.authenticated();
    // The service's task writes `Ack::Ok` once it holds the session, so a client that has
    // seen the ack never finds its visitors turned away for want of a session.
    sockopt::nodelay(stream.tcp(), true);
    registry.open_session(&entry, key);
    entry
        .events
        .send(Event::Control {
            stream,
            key,
            peer,
            welcome: Welcome::Ack,
        })
        .await
        .map_err(|_| Error::UnknownService {
            digest_prefix: "(service removed)".into(),
        })
}

/// An open control channel, as its service's task sees it.
struct Session<S> {
    /// Tells this session from the others of the service (session keys are secrets).
    id: u64,
    key: SessionKey,
    peer: SocketAddr,
    /// Data channels of this client waiting for a visitor.
    idle: VecDeque<S>,
    /// Visitor connections open through this client (for `least_connections`).
    open: Arc<AtomicUsize>,
    /// Cancelled when the session ends: visitors of it that have not sent or received a
    /// byte yet go back to the queue for another client.
    gone: CancellationToken,
    /// Data channels to ask for, written by the control channel's task.
    asks: Arc<Asks>,
    /// Replacements for pooled channels that visitors took, not asked for yet (fewer than
    /// [`REFILL`]).
    owed: usize,
}

/// Requests for `CreateDataChannel`, counted here and written by the control channel's own
/// task, so a client slow to read its control channel never stalls the service's task.
#[derive(Default)]
struct Asks {
    count: AtomicUsize,
    ready: Notify,
}

impl Asks {
    fn add(&self, n: usize) {
        self.count.fetch_add(n, Ordering::Relaxed);
        self.ready.notify_one();
    }
}

/// A service's port.
enum Listener {
    /// A TCP service's listener.
    Tcp(TcpListener),
    /// A UDP service's socket, shared with the task carrying its datagrams.
    Udp(Arc<UdpSocket>),
}

/// The task carrying a UDP service's datagrams over one data channel.
struct UdpForwarding {
    task: JoinHandle<Error>,
    /// Ends the task when this goes (a new control channel, the service stopped).
    _stop: tokio_util::sync::DropGuard,
}

/// One service: its port, its clients' control channels and data channels, its visitors.
struct ServiceTask<S> {
    service: Arc<ServerService>,
    listener: Listener,
    events: mpsc::Receiver<Event<S>>,
    /// For the control channels' and visitors' tasks to report back.
    events_tx: mpsc::Sender<Event<S>>,
    registry: Arc<Registry<S>>,
    heartbeat: Option<Duration>,
    dead_after: Option<Duration>,
    handshake_timeout: Duration,
    /// TCP_NODELAY as the transport sets it on every data channel.
    tunnel_nodelay: bool,
    stop: CancellationToken,
    abort: CancellationToken,
    tracker: TaskTracker,
    metrics: Arc<ServiceMetrics>,
    /// Whether a control channel was open before (the next one is a reconnect).
    reconnected: bool,
    /// Open control channels: at most one unless the service takes many clients.
    sessions: Vec<Session<S>>,
    next_id: u64,
    /// Where round robin looks first.
    cursor: usize,
    waiting: VecDeque<Waiting>,
    /// A UDP service's forwarding, while a data channel carries it.
    udp: Option<UdpForwarding>,
    /// Visitor connections the service may still take (`max_connections`, or by default
    /// what the file limit allows).
    slots: Arc<Semaphore>,
    /// A declared service: the task ends when its last control channel does.
    ends_with_client: bool,
    /// Where the message that starts a data channel is put together.
    start: Box<[u8; START_LEN]>,
}

/// A visitor waiting for a data channel.
struct Waiting {
    visitor: TcpStream,
    peer: SocketAddr,
    since: Instant,
    /// Held until the connection ends.
    slot: OwnedSemaphorePermit,
    /// Whether a data channel was asked for it while it waited (then the one it gets needs
    /// no replacement): one ask per visitor keeps the pools at their size.
    asked: bool,
}

impl<S: TunnelStream> ServiceTask<S> {
    async fn run(mut self) {
        loop {
            let expiry = self
                .waiting
                .front()
                .map(|w| w.since + self.handshake_timeout);
            tokio::select! {
                _ = self.stop.cancelled() => break,
                accepted = accept(&self.listener) => match accepted {
                    Ok((visitor, peer)) => self.visitor(visitor, peer).await,
                    Err(err) => {
                        tracing::warn!(service = %self.service.name, error = %err, "accepting a visitor failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                () = unserved(&self.listener), if self.sessions.is_empty() => {
                    if let Listener::Udp(socket) = &self.listener {
                        let dropped = udp::discard(socket, &mut [0u8; 1]);
                        self.metrics.datagrams_dropped.fetch_add(dropped, Ordering::Relaxed);
                        tracing::debug!(service = %self.service.name, datagrams = dropped, "no client serves this service: datagrams dropped");
                    }
                },
                reason = forwarding_ended(&mut self.udp) => {
                    self.udp = None;
                    tracing::info!(service = %self.service.name, %reason, "udp data channel ended: starting the spare");
                    self.ask(0, 1);
                    self.start_udp().await;
                },
                event = self.events.recv() => match event {
                    Some(event) => {
                        self.event(event).await;
                        if self.ends_with_client && self.sessions.is_empty() {
                            break;
                        }
                    }
                    None => break,
                },
                _ = tokio::time::sleep_until(expiry.unwrap_or_else(Instant::now)), if expiry.is_some() => {
                    self.expire_waiting();
                }
            }
        }
        for session in self.sessions.drain(..) {
            self.metrics.peer_left(&session.peer.to_string());
            session.gone.cancel();
        }
        if let Some(forwarding) = self.udp.take() {
            // The socket must be closed when the task ends, so a restart can bind it again.
            let UdpForwarding { task, _stop } = forwarding;
            drop(_stop);
            let _ = task.await;
        }
        tracing::debug!(service = %self.service.name, "service task ended");
    }

    async fn visitor(&mut self, visitor: TcpStream, peer: SocketAddr) {
        let name = &self.service.name;
        if self.sessions.is_empty() {
            self.metrics.refused.fetch_add(1, Ordering::Relaxed);
            tracing::info!(service = %name, visitor = %peer, "no client serves this service: visitor closed");
            return;
        }
        if self.waiting.len() >= MAX_WAITING {
            self.metrics.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(service = %name, visitor = %peer, "too many visitors waiting: visitor closed");
            return;
        }
        let slot = match self.slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                self.metrics.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(service = %name, visitor = %peer, max_connections = max_connections(&self.service), "connection limit reached: visitor closed");
                return;
            }
        };
        // TCP_NODELAY came with the listener's (`bind_service`).
        tracing::debug!(service = %name, visitor = %peer, "visitor connected");
        self.waiting.push_back(Waiting {
            visitor,
            peer,
            since: Instant::now(),
            slot,
            asked: false,
        });
        // Start the visitor on an idle channel first, then ask for its replacement (in
        // `pair`): the client sees `StartForwardTcp` before `CreateDataChannel`, so it
        // connects the visitor's local connection before it dials the spare.
        self.pair().await;
        self.ask_for_waiting();
    }

    /// Asks the client next in turn for one data channel per waiting visitor none was asked
    /// for yet.
    fn ask_for_waiting(&mut self) {
        for at in 0..self.waiting.len() {
            if self.waiting[at].asked {
                continue;
            }
            let Some(index) = self.choose(false) else {
                return;
            };
            self.ask(index, 1);
            self.waiting[at].asked = true;
        }
    }

    /// Asks session `index` for `count` data channels.
    fn ask(&self, index: usize, count: usize) {
        if let Some(session) = self.sessions.get(index) {
            session.asks.add(count);
        }
    }

    /// The session the next visitor goes to: by the service's balance, among those with an
    /// idle data channel if `idle`, else among all.
    fn choose(&mut self, idle: bool) -> Option<usize> {
        let usable = |s: &Session<S>| !idle || !s.idle.is_empty();
        let count = self.sessions.len();
        match self.service.balance {
            Balance::RoundRobin => {
                let found = (0..count)
                    .map(|step| (self.cursor + step) % count)
                    .find(|&i| usable(&self.sessions[i]))?;
                self.cursor = (found + 1) % count;
                Some(found)
            }
            Balance::LeastConnections => self
                .sessions
                .iter()
                .enumerate()
                .filter(|(_, s)| usable(s))
                .min_by_key(|(_, s)| {
                    s.open.load(Ordering::Relaxed) + usize::from(s.idle.is_empty())
                })
                .map(|(i, _)| i),
        }
    }

    async fn event(&mut self, event: Event<S>) {
        match event {
            Event::Control {
                mut stream,
                key,
                peer,
                welcome,
            } => {
                let ok = match welcome {
                    Welcome::Ack => Ack::Ok.encode().to_vec(),
                    Welcome::Declared => crate::declare::Verdict::Ok.encode(),
                };
                let ack = protocol::write_all(&mut stream, &ok, "ack");
                if let Err(err) =
                    timeout(self.handshake_timeout, ack)
                        .await
                        .unwrap_or(Err(Error::Timeout {
                            what: "the ack to be sent",
                            after: self.handshake_timeout,
                        }))
                {
                    let reason = labcore::exit::chain(&err);
                    tracing::warn!(service = %self.service.name, client = %peer, %reason, "control channel failed");
                    self.metrics.failed(&peer.to_string(), &reason);
                    self.registry.close_session(&self.service.digest, &key);
                    return;
                }
                if !self.service.many_clients {
                    for old in std::mem::take(&mut self.sessions) {
                        tracing::info!(service = %self.service.name, old_client = %old.peer, "control channel replaced by a new one");
                        self.metrics
                            .peer_down(&old.peer.to_string(), "replaced by a new control channel");
                        old.gone.cancel();
                    }
                    // What was asked of the old client will never come.
                    for waiting in &mut self.waiting {
                        waiting.asked = false;
                    }
                    self.stop_udp().await;
                }
                if let (Some(limit), Some(_)) = (self.dead_after, self.heartbeat) {
                    sockopt::user_timeout(stream.tcp(), limit);
                }
                if std::mem::replace(&mut self.reconnected, true) {
                    self.metrics.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                tracing::info!(service = %self.service.name, client = %peer, "control channel open");
                self.metrics.peer_up(&peer.to_string());
                let id = self.next_id;
                self.next_id += 1;
                let gone = self.stop.child_token();
                let asks = Arc::new(Asks::default());
                self.tracker.spawn(run_control(
                    stream,
                    ControlTask {
                        id,
                        heartbeat: self.heartbeat,
                        write_limit: self.handshake_timeout,
                        asks: asks.clone(),
                        gone: gone.clone(),
                        events: self.events_tx.clone(),
                    },
                ));
                self.sessions.push(Session {
                    id,
                    key,
                    peer,
                    idle: VecDeque::new(),
                    open: Arc::new(AtomicUsize::new(0)),
                    gone,
                    asks,
                    owed: 0,
                });
                self.metrics
                    .control_open
                    .store(self.sessions.len() as u64, Ordering::Relaxed);
                let wanted = match self.service.service_type {
                    ServiceType::Tcp => POOL_SIZE,
                    ServiceType::Udp => UDP_POOL_SIZE,
                };
                self.ask(self.sessions.len() - 1, wanted);
                self.ask_for_waiting();
            }
            Event::Data { stream, key } => {
                let Some(session) = self.sessions.iter_mut().find(|s| s.key == key) else {
                    tracing::debug!(service = %self.service.name, "data channel of an old session closed");
                    return;
                };
                // The control port's listener gave it the transport's setting.
                if self.service.nodelay != self.tunnel_nodelay {
                    sockopt::nodelay(stream.tcp(), self.service.nodelay);
                }
                if session.idle.len() >= MAX_IDLE {
                    session.idle.pop_front();
                }
                session.idle.push_back(stream);
                match self.service.service_type {
                    ServiceType::Tcp => self.pair().await,
                    ServiceType::Udp => self.start_udp().await,
                }
            }
            Event::Ended { id, reason } => self.end_session(id, &reason).await,
            Event::Retry(waiting) => {
                if self.sessions.is_empty() {
                    self.metrics.refused.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(service = %self.service.name, visitor = %waiting.peer, "no client left to retry on: visitor closed");
                    return;
                }
                tracing::info!(service = %self.service.name, visitor = %waiting.peer, "visitor retried on another client");
                self.waiting.push_front(waiting);
                self.pair().await;
                self.ask_for_waiting();
            }
        }
    }

    /// Starts carrying a UDP service's datagrams on an idle data channel, if none does yet.
    async fn start_udp(&mut self) {
        let Listener::Udp(socket) = &self.listener else {
            return;
        };
        let socket = socket.clone();
        while self.udp.is_none() {
            let Some(mut channel) = self.sessions.first_mut().and_then(|s| s.idle.pop_front())
            else {
                return;
            };
            let limit = START_LIMIT.min(self.handshake_timeout);
            let len = start_message(&mut self.start, DataCmd::StartForwardUdp, &[]);
            let started = !sockopt::is_closed(channel.tcp())
                && start_forwarding(&mut channel, &self.start[..len], limit).await;
            if !started {
                tracing::debug!(service = %self.service.name, "stale data channel dropped");
                self.ask(0, 1);
                continue;
            }
            tracing::debug!(service = %self.service.name, "udp data channel started");
            let stop = self.stop.child_token();
            let abort = stop.clone();
            let metrics = self.metrics.clone();
            let socket = socket.clone();
            let task = self.tracker.spawn(async move {
                tokio::select! {
                    _ = abort.cancelled() => Error::Closed { what: "udp frames (stopped)" },
                    reason = udp::serve_visitors(channel, &socket, &metrics, udp::Limits::DEFAULT) => reason,
                }
            });
            self.udp = Some(UdpForwarding {
                task,
                _stop: stop.drop_guard(),
            });
        }
    }

    /// Ends a UDP service's forwarding (its channel belongs to a control channel now gone).
    async fn stop_udp(&mut self) {
        if let Some(UdpForwarding { task, _stop }) = self.udp.take() {
            drop(_stop);
            let _ = task.await;
        }
    }

    /// Hands idle data channels to waiting visitors, spread over the clients by the
    /// service's balance: writes `StartForwardTcp` on the channel, followed by the PROXY
    /// protocol header if the service wants one (here, as rathole does: a few bytes on a
    /// channel nothing was written to yet do not wait for the peer) and by what the visitor
    /// has sent so far, asks that client for a replacement, and leaves the forwarding to a
    /// task of its own.
    async fn pair(&mut self) {
        while !self.waiting.is_empty() {
            let Some(index) = self.choose(true) else {
                return;
            };
            let Some(Waiting {
                visitor,
                peer,
                asked,
                ..
            }) = self.waiting.front()
            else {
                return;
            };
            let asked = *asked;
            let header = match self.service.proxy_protocol {
                None => None,
                Some(version) => match visitor.local_addr() {
                    Ok(local) => Some(proxy_protocol::encode(version, *peer, local)),
                    Err(err) => {
                        tracing::debug!(service = %self.service.name, visitor = %peer, error = %err, "visitor gone before forwarding");
                        self.waiting.pop_front();
                        continue;
                    }
                },
            };
            let session = &mut self.sessions[index];
            let Some(mut channel) = session.idle.pop_front() else {
                return;
            };
            if !asked {
                session.owed += 1;
                if session.owed >= REFILL {
                    session.asks.add(std::mem::take(&mut session.owed));
                }
            }
            let header = header
                .as_ref()
                .map_or(&[][..], proxy_protocol::Header::as_bytes);
            let limit = START_LIMIT.min(self.handshake_timeout);
            if sockopt::is_closed(channel.tcp()) {
                // The client dropped it while it sat in the pool: ask for another.
                tracing::debug!(service = %self.service.name, "stale data channel dropped");
                if asked {
                    self.sessions[index].asks.add(1);
                }
                continue;
            }
            let mut len = start_message(&mut self.start, DataCmd::StartForwardTcp, header);
            // The visitor's first bytes, if they are here already (a client that speaks
            // first), go in the same write as the command: one segment, one system call and
            // one wake-up of the client instead of two. A client, rathole's too, reads exactly
            // the command and forwards what follows. Plain TCP only, the transport where the
            // saving was measured (the others keep a write per message). Not for a service
            // with many clients, whose visitors may be retried on another client only while
            // nothing of them was read.
            let early = match (&self.waiting.front(), channel.plain_tcp()) {
                (Some(waiting), Some(_)) if !self.service.many_clients => {
                    forward::early_bytes(&waiting.visitor, &mut self.start[len..])
                }
                _ => 0,
            };
            len += early;
            if !start_forwarding(&mut channel, &self.start[..len], limit).await {
                if early > 0 {
                    // Its first bytes went nowhere: the visitor cannot be started again.
                    if let Some(waiting) = self.waiting.pop_front() {
                        tracing::debug!(service = %self.service.name, visitor = %waiting.peer, "data channel broke under the visitor's first bytes: visitor closed");
                    }
                    self.metrics.refused.fetch_add(1, Ordering::Relaxed);
                } else {
                    tracing::debug!(service = %self.service.name, "stale data channel dropped");
                }
                if asked {
                    self.sessions[index].asks.add(1);
                }
                continue;
            }
            self.metrics
                .to_service
                .fetch_add(early as u64, Ordering::Relaxed);
            let Some(waiting) = self.waiting.pop_front() else {
                return;
            };
            let session = &self.sessions[index];
            tracing::debug!(service = %self.service.name, visitor = %waiting.peer, client = %session.peer, "visitor paired");
            let gone = session.gone.clone();
            let open = session.open.clone();
            let service = self.service.clone();
            let abort = self.abort.clone();
            let metrics = self.metrics.clone();
            let retry = self.service.many_clients.then(|| self.events_tx.clone());
            self.tracker.spawn(async move {
                let _open = metrics.connection();
                open.fetch_add(1, Ordering::Relaxed);
                let _count = scopeguard(open);
                tokio::select! {
                    _ = abort.cancelled() => {}
                    () = carry(channel, waiting, &service, &metrics, gone, retry) => {}
                }
            });
        }
    }

    /// Ends session `id`: its data channels go, and its visitors that have not yet sent or
    /// received a byte are retried on another client (by their own tasks).
    async fn end_session(&mut self, id: u64, reason: &str) {
        let Some(index) = self.sessions.iter().position(|s| s.id == id) else {
            return;
        };
        let session = self.sessions.remove(index);
        session.gone.cancel();
        self.registry
            .close_session(&self.service.digest, &session.key);
        tracing::warn!(service = %self.service.name, client = %session.peer, reason, "control channel closed");
        self.metrics.peer_down(&session.peer.to_string(), reason);
        self.metrics
            .control_open
            .store(self.sessions.len() as u64, Ordering::Relaxed);
        if index == 0 {
            // A UDP service's forwarding runs on the first session's channel.
            if let Some(UdpForwarding { task, _stop }) = self.udp.take() {
                drop(_stop);
                task.abort();
            }
        }
        if self.sessions.is_empty() {
            if !self.waiting.is_empty() {
                let closed = self.waiting.len() as u64;
                self.metrics.refused.fetch_add(closed, Ordering::Relaxed);
                tracing::info!(service = %self.service.name, visitors = self.waiting.len(), "waiting visitors closed");
                self.waiting.clear();
            }
        } else {
            self.cursor %= self.sessions.len();
            // What was asked of the client gone will never come: ask the others.
            for waiting in &mut self.waiting {
                waiting.asked = false;
            }
            self.ask_for_waiting();
            if self.service.service_type == ServiceType::Udp {
                self.start_udp().await;
            }
        }
    }

    fn expire_waiting(&mut self) {
        let now = Instant::now();
        while let Some(Waiting { peer, since, .. }) = self.waiting.front() {
            if *since + self.handshake_timeout > now {
                break;
            }
            tracing::warn!(service = %self.service.name, visitor = %peer, "no data channel from the client in time: visitor closed");
            self.waiting.pop_front();
            self.metrics.refused.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Takes one off a session's count of open connections when dropped.
struct OpenCount(Arc<AtomicUsize>);

fn scopeguard(open: Arc<AtomicUsize>) -> OpenCount {
    OpenCount(open)
}

impl Drop for OpenCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a control channel's task needs.
struct ControlTask<S> {
    id: u64,
    heartbeat: Option<Duration>,
    write_limit: Duration,
    asks: Arc<Asks>,
    gone: CancellationToken,
    events: mpsc::Sender<Event<S>>,
}

/// Runs one control channel: writes heartbeats and the data channels asked for, and reads
/// nothing but its end. Reports the end to the service's task unless the session was ended
/// there first.
async fn run_control<S: TunnelStream>(mut control: S, task: ControlTask<S>) {
    let mut heartbeat = task.heartbeat.map(|period| {
        let mut ticks = tokio::time::interval_at(Instant::now() + period, period);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        ticks
    });
    let mut buf = [0u8; 16];
    let reason = loop {
        let tick = async {
            match heartbeat.as_mut() {
                Some(ticks) => {
                    ticks.tick().await;
                }
                None => std::future::pending().await,
            }
        };
        let (cmd, count) = tokio::select! {
            _ = task.gone.cancelled() => return,
            read = control.read(&mut buf) => break match read {
                Ok(0) => "closed by the client".to_owned(),
                Ok(_) => "the client sent bytes on the control channel".to_owned(),
                Err(err) => format!("reading the control channel: {err}"),
            },
            () = tick => (ControlCmd::HeartBeat, 1),
            () = task.asks.ready.notified() => {
                (ControlCmd::CreateDataChannel, task.asks.count.swap(0, Ordering::Relaxed))
            }
        };
        if let Err(reason) = command(&mut control, cmd, count, task.write_limit).await {
            break reason;
        }
    };
    let _ = task
        .events
        .send(Event::Ended {
            id: task.id,
            reason,
        })
        .await;
}

/// Writes `count` copies of `cmd` on a control channel, each batch within `limit`.
async fn command<S: TunnelStream>(
    control: &mut S,
    cmd: ControlCmd,
    count: usize,
    limit: Duration,
) -> Result<(), String> {
    let bytes = cmd.encode();
    let mut buf = [0u8; protocol::TAG_LEN * 16];
    let mut left = count;
    while left > 0 {
        let n = left.min(16);
        for chunk in buf.chunks_exact_mut(protocol::TAG_LEN).take(n) {
            chunk.copy_from_slice(&bytes);
        }
        let written = timeout(limit, async {
            control.write_all(&buf[..n * protocol::TAG_LEN]).await?;
            control.flush().await
        })
        .await;
        match written {
            Ok(Ok(())) => left -= n,
            Ok(Err(err)) => return Err(format!("writing to the control channel: {err}")),
            Err(_) => return Err("the client stopped reading the control channel".to_owned()),
        }
    }
    Ok(())
}

/// Binds a service's port.
async fn bind_service(service: &ServerService) -> Result<Listener, Error> {
    let bind_error = |source| Error::Bind {
        what: format!("service {}", service.name),
        addr: service.bind_addr.clone(),
        source,
    };
    Ok(match service.service_type {
        ServiceType::Tcp => {
            let listener = sockopt::listen(&service.bind_addr)
                .await
                .map_err(bind_error)?;
            // Visitors inherit it from the listener: no system call per visitor.
            sockopt::nodelay(&listener, service.nodelay);
            Listener::Tcp(listener)
        }
        ServiceType::Udp => Listener::Udp(Arc::new(
            udp::bind(&service.bind_addr).await.map_err(bind_error)?,
        )),
    })
}

/// Descriptors one visitor connection holds on the server: its socket, its data channel, and
/// the two pipes splicing between them.
const FDS_PER_CONNECTION: u64 = 6;

/// A TCP service's limit on open visitor connections: `max_connections`, or else what three
/// quarters of the process's open file limit holds at [`FDS_PER_CONNECTION`] each, the last
/// quarter left for the control port, handshakes and idle data channels. (The limit is read
/// after `run` raised the soft limit to the hard one.) Past it a visitor is closed on
/// arrival instead of an `accept` failing for want of descriptors, which would stall every
/// service.
fn max_connections(service: &ServerService) -> usize {
    service.max_connections.unwrap_or_else(|| {
        use nix::sys::resource::{Resource, getrlimit};
        let files = getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft);
        let connections = files.saturating_mul(3) / 4 / FDS_PER_CONNECTION;
        usize::try_from(connections).unwrap_or(usize::MAX).max(1)
    })
}

/// Accepts a TCP service's next visitor; never resolves for a UDP service.
async fn accept(listener: &Listener) -> std::io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Listener::Tcp(listener) => listener.accept().await,
        Listener::Udp(_) => std::future::pending().await,
    }
}

/// Resolves when a UDP service's socket has datagrams (to drop while no client serves it);
/// never for a TCP service, whose visitors are turned away as they are accepted.
async fn unserved(listener: &Listener) {
    match listener {
        Listener::Udp(socket) => {
            if socket.readable().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        Listener::Tcp(_) => std::future::pending().await,
    }
}

/// Resolves with why a UDP service's forwarding ended; never while there is none.
async fn forwarding_ended(udp: &mut Option<UdpForwarding>) -> String {
    match udp {
        Some(forwarding) => match (&mut forwarding.task).await {
            Ok(reason) => labcore::exit::chain(&reason),
            Err(err) => format!("the forwarding task failed: {err}"),
        },
        None => std::future::pending().await,
    }
}

/// Puts `cmd` and then `header` at the front of `buf`; returns their length (the visitor's
/// first bytes may follow).
fn start_message(buf: &mut [u8; START_LEN], cmd: DataCmd, header: &[u8]) -> usize {
    buf[..protocol::TAG_LEN].copy_from_slice(&cmd.encode());
    let len = protocol::TAG_LEN + header.len();
    buf[protocol::TAG_LEN..len].copy_from_slice(header);
    len
}

/// Writes `start` (a command, maybe a header and a visitor's first bytes) on an idle data
/// channel, in one write; false if it broke or stalled.
async fn start_forwarding<S: TunnelStream>(channel: &mut S, start: &[u8], limit: Duration) -> bool {
    let start = async {
        channel.write_all(start).await?;
        channel.flush().await
    };
    matches!(timeout(limit, start).await, Ok(Ok(())))
}

/// How a visitor's connection through a data channel began.
enum Start {
    /// A byte is ready on either side (or one side closed): forward from now on.
    Commit,
    /// The client went away (or closed the channel) before any byte moved: try another.
    Retry,
}

/// Waits, for a service with many clients, until the first byte moves either way on a started
/// data channel, or the client is found gone first. No byte of the visitor is read before
/// then, so a visitor retried elsewhere loses nothing: the buffer for retries is zero bytes.
async fn first_byte<S: TunnelStream>(
    channel: &S,
    visitor: &TcpStream,
    gone: &CancellationToken,
) -> Start {
    let (mut byte, mut own) = ([0u8; 1], [0u8; 1]);
    tokio::select! {
        biased;
        _ = gone.cancelled() => Start::Retry,
        // Peeked, not read: the byte stays for the forwarding (readiness alone may be stale).
        _ = visitor.peek(&mut own) => Start::Commit,
        // An end of stream or an error before any byte: the client dropped the channel
        // without connecting the visitor, so nothing reached the service.
        peeked = channel.tcp().peek(&mut byte) => match peeked {
            Ok(0) | Err(_) => Start::Retry,
            Ok(_) => Start::Commit,
        },
    }
}

/// Carries a visitor's bytes over a started data channel; with `retry`, first hands the
/// visitor back for another client if its client goes away before any byte moved.
async fn carry<S: TunnelStream>(
    channel: S,
    waiting: Waiting,
    service: &ServerService,
    metrics: &ServiceMetrics,
    gone: CancellationToken,
    retry: Option<mpsc::Sender<Event<S>>>,
) {
    if let Some(retry) = retry
        && let Start::Retry = first_byte(&channel, &waiting.visitor, &gone).await
    {
        tracing::debug!(service = %service.name, visitor = %waiting.peer, "client gone before the first byte");
        drop(channel);
        let again = Waiting {
            since: Instant::now(),
            asked: false,
            ..waiting
        };
        let _ = retry.send(Event::Retry(again)).await;
        return;
    }
    let Waiting {
        visitor,
        peer,
        slot: _slot,
        ..
    } = waiting;
    // The visitor is the local socket here.
    let meter = forward::Meter {
        inbound: &metrics.to_visitor,
        outbound: &metrics.to_service,
    };
    match forward::forward(channel, visitor, meter, service.idle_timeout, None).await {
        Ok(carried) => tracing::debug!(
            service = %service.name,
            visitor = %peer,
            to_visitor = carried.inbound,
            from_visitor = carried.outbound,
            "visitor connection finished"
        ),
        Err(err) => {
            tracing::debug!(service = %service.name, visitor = %peer, error = %err, "visitor connection ended")
        }
    }
}

impl<T: Transport> Node for Server<T> {
    type Settings = ServerSettings;
    const MODE: Mode = Mode::Server;

    async fn start(settings: ServerSettings) -> Result<Self, Error> {
        Server::start(settings).await
    }

    async fn apply(&mut self, settings: ServerSettings) -> Result<(), Error> {
        Server::apply(self, settings).await
    }

    fn readiness(&self) -> Option<Arc<Readiness>> {
        None
    }

    fn reload_wait(_: &ServerSettings) -> Duration {
        Duration::ZERO
    }

    fn transport_type(settings: &ServerSettings) -> TransportType {
        settings.common.transport.kind
    }

    fn settings(settings: Settings) -> Option<ServerSettings> {
        match settings {
            Settings::Server(s) => Some(s),
            Settings::Client(_) => None,
        }
    }

    fn wrap(settings: ServerSettings) -> Settings {
        Settings::Server(settings)
    }

    async fn shutdown(self) {
        let grace = self.grace_period();
        Server::shutdown(self, grace).await
    }
}
