//! Services clients declare (`[server.declared]`): admitting a declaration, running the
//! service it makes, and removing it when its client goes.
//!
//! A declaring client's control channel authenticates with its client token, then declares
//! one service ([`crate::declare`]). The policy is checked first (name, type, port range),
//! then what is running: a name configured on this server or held by another client is
//! refused, as is a client's service past `max_services`; the same client declaring the same
//! service again (a reconnect the server has not noticed the end of) takes the running
//! service over, as a rathole control channel replaces the one before, and a changed
//! declaration of its own stops the old one first. Declarations are admitted one at a time,
//! so two clients racing for one name or port cannot both win, and the count a client holds
//! cannot overshoot.
//!
//! The service then runs as a service task like any other, registered under a digest no
//! hello can open ([`Entry::declared`]), and ends when its last control channel ends: the
//! client went away, or a reload of its config dropped or changed the service. Its port
//! closes and its name is free again. A reload of the server's config that adds a service of
//! the same name stops the declared one: the config wins.
//!
//! Which refusals the client retries: those the policy makes are final until the client's
//! config changes; a port that cannot be bound, a name another connection holds, or a full
//! quota may clear (a reload removing one service while adding another), so the client asks
//! again after its backoff.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use labcore::Secret;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{Entry, Event, Spawner, Welcome, bind_service};
use crate::config::DeclaredSettings;
use crate::declare::{Declaration, ShownName, Verdict, type_name};
use crate::error::Error;
use crate::protocol::{self, Ack, Digest, SessionKey};
use crate::transport::TunnelStream;

/// A declared service that runs.
struct Running {
    client: String,
    declaration: Declaration,
    /// Tells this run from a later one of the same name.
    generation: u64,
    digest: Digest,
    stop: CancellationToken,
    abort: CancellationToken,
    task: JoinHandle<()>,
}

/// The declared services of a server, and who may declare them.
pub(super) struct Declared<S> {
    settings: DeclaredSettings,
    /// Client names by their hello digest.
    clients: HashMap<Digest, String>,
    /// TCP_NODELAY for the services (the transport's setting).
    nodelay: bool,
    spawner: Spawner<S>,
    running: Mutex<BTreeMap<String, Running>>,
    /// Held while a declaration is admitted: one at a time.
    admitting: tokio::sync::Mutex<()>,
    next_generation: AtomicU64,
}

impl<S: TunnelStream> Declared<S> {
    pub(super) fn new(settings: DeclaredSettings, nodelay: bool, spawner: Spawner<S>) -> Self {
        let clients = settings
            .clients
            .keys()
            .map(|name| (crate::declare::client_digest(name), name.clone()))
            .collect();
        Declared {
            settings,
            clients,
            nodelay,
            spawner,
            running: Mutex::new(BTreeMap::new()),
            admitting: tokio::sync::Mutex::new(()),
            next_generation: AtomicU64::new(0),
        }
    }

    fn running(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Running>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The declaring client a hello's digest names, if any.
    pub(super) fn client(&self, digest: &Digest) -> Option<&str> {
        self.clients.get(digest).map(String::as_str)
    }

    /// The rest of a declaring client's handshake, after the server's hello: the token's
    /// proof, the ack, the declaration, and the verdict (written by the service's task when
    /// it is `Ok`, once it holds the session).
    pub(super) async fn handshake(
        self: &Arc<Self>,
        mut stream: S,
        nonce: &Digest,
        client: &str,
        peer: SocketAddr,
    ) -> Result<(), Error> {
        let token = self.token(client);
        let mut auth = [0u8; protocol::AUTH_LEN];
        protocol::read_exact(&mut stream, &mut auth, "auth").await?;
        // Compared in constant time (SessionKey's PartialEq).
        if SessionKey::prove(token.expose().as_bytes(), nonce) != SessionKey::from_bytes(auth) {
            protocol::write_all(&mut stream, &Ack::AuthFailed.encode(), "ack").await?;
            return Err(Error::AuthFailed {
                service: format!("(declaring client {client})"),
            });
        }
        let key = SessionKey::from_bytes(auth);
        stream.authenticated();
        protocol::write_all(&mut stream, &Ack::Ok.encode(), "ack").await?;
        let declaration = Declaration::read(&mut stream).await?;
        let entry = match self.admit(client, &declaration).await {
            Ok(entry) => entry,
            Err(verdict) => {
                let (reason, retry) = match &verdict {
                    Verdict::Refused(reason) => (reason.clone(), false),
                    Verdict::NotNow(reason) => (reason.clone(), true),
                    Verdict::Ok => unreachable!("admit refuses with a reason"),
                };
                verdict.write(&mut stream).await?;
                return Err(Error::Declined {
                    service: format!(
                        "{} ({} port {}, client {client})",
                        ShownName(&declaration.name),
                        type_name(declaration.service_type),
                        declaration.port
                    ),
                    reason,
                    retry,
                });
            }
        };
        crate::sockopt::nodelay(stream.tcp(), true);
        self.spawner.registry.open_session(&entry, key);
        entry
            .events
            .send(Event::Control {
                stream,
                key,
                peer,
                welcome: Welcome::Declared,
            })
            .await
            .map_err(|_| Error::Declined {
                service: declaration.name.clone(),
                reason: "the service stopped while it was declared".into(),
                retry: true,
            })
    }

    fn token(&self, client: &str) -> Secret {
        // Every name in `clients` comes from `settings.clients`.
        self.settings
            .clients
            .get(client)
            .cloned()
            .unwrap_or_else(|| Secret::new(String::new()))
    }

    /// Checks `declaration` of `client` against the policy and what runs, and starts its
    /// service (or finds it running); the verdict if it is refused.
    async fn admit(
        self: &Arc<Self>,
        client: &str,
        declaration: &Declaration,
    ) -> Result<Arc<Entry<S>>, Verdict> {
        let _one_at_a_time = self.admitting.lock().await;
        self.settings
            .policy
            .check(declaration)
            .map_err(Verdict::Refused)?;
        let name = &declaration.name;
        let registry = &self.spawner.registry;
        if registry.service(&protocol::service_digest(name)).is_some() {
            return Err(Verdict::Refused(format!(
                "the server's config has a service named {name}"
            )));
        }
        let replaced = {
            let mut running = self.running();
            match running.get(name) {
                Some(other) if other.client != client => {
                    return Err(Verdict::NotNow(format!(
                        "another client has declared a service named {name}"
                    )));
                }
                Some(same) if same.declaration == *declaration => {
                    // A reconnect: the running service takes the new control channel.
                    let digest = same.digest;
                    drop(running);
                    return registry
                        .service(&digest)
                        .ok_or_else(|| Verdict::NotNow("the service is being removed".into()));
                }
                Some(_) => running.remove(name),
                None => None,
            }
        };
        if let Some(old) = replaced {
            old.stop.cancel();
            old.abort.cancel();
            let _ = old.task.await;
            registry.remove(&old.digest);
            tracing::info!(service = %name, client, "declared service changed: the old one is stopped");
        }
        let count = self
            .running()
            .values()
            .filter(|r| r.client == client)
            .count();
        if count >= self.settings.policy.max_services {
            return Err(Verdict::NotNow(format!(
                "client {client} already has {count} declared services, the most allowed"
            )));
        }
        let service = self
            .settings
            .service(client, declaration, self.token(client), self.nodelay);
        let listener = bind_service(&service).await.map_err(|err| {
            let why = match &err {
                Error::Bind { source, .. } => source.to_string(),
                other => other.to_string(),
            };
            Verdict::NotNow(format!("port {} cannot be bound: {why}", declaration.port))
        })?;
        let started = self
            .spawner
            .task(service, listener, true)
            .map_err(|err| Verdict::NotNow(labcore::exit::chain(&err)))?;
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let this = self.clone();
        let task_name = name.clone();
        let task = started.task;
        let handle = tokio::spawn(async move {
            task.run().await;
            this.ended(&task_name, generation);
        });
        tracing::info!(service = %name, client, port = declaration.port, "declared service exposed");
        self.running().insert(
            name.clone(),
            Running {
                client: client.to_owned(),
                declaration: declaration.clone(),
                generation,
                digest: started.service.digest,
                stop: started.stop,
                abort: started.abort,
                task: handle,
            },
        );
        Ok(started.entry)
    }

    /// Forgets run `generation` of `name`, whose task has ended (its client went), unless a
    /// later declaration took its place.
    fn ended(&self, name: &str, generation: u64) {
        let mut running = self.running();
        if running.get(name).map(|r| r.generation) != Some(generation) {
            return;
        }
        if let Some(gone) = running.remove(name) {
            self.spawner.registry.remove(&gone.digest);
            self.spawner.metrics.forget(name);
            tracing::info!(service = %name, client = %gone.client, "declared service removed: its control channel ended");
        }
    }

    /// Stops the declared service `name`, if one runs: the server's config now has a service
    /// of that name (its client, asking again, is refused for that reason).
    pub(super) async fn remove(&self, name: &str) {
        let _one_at_a_time = self.admitting.lock().await;
        let Some(running) = self.running().remove(name) else {
            return;
        };
        running.stop.cancel();
        running.abort.cancel();
        let _ = running.task.await;
        self.spawner.registry.remove(&running.digest);
        self.spawner.metrics.forget(name);
        tracing::warn!(service = %name, client = %running.client, "declared service stopped: the server's config now has a service of that name");
    }

    /// Stops every declared service: at once (`abort`), or leaving open connections to the
    /// server's grace period.
    pub(super) async fn stop_all(&self, abort: bool) {
        let all = std::mem::take(&mut *self.running());
        for (_, running) in all {
            running.stop.cancel();
            if abort {
                running.abort.cancel();
            }
            let _ = running.task.await;
            self.spawner.registry.remove(&running.digest);
        }
    }
}
