//! The command line: `tunnel server|client|check -c FILE`, or `tunnel -c FILE` choosing the
//! side from the file, and what each command does.

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};
use labcore::Env;
use labcore::log::LogArgs;

use crate::config::{self, Mode, Settings};
use crate::error::Error;
use crate::keys::KeyPair;

const EXAMPLES: &str = "\
EXAMPLES:
  On the public server, expose the home services listed in server.toml:
    tunnel server -c /etc/labkit/server.toml

  At home, connect them (the side is chosen from the file's [client] table):
    tunnel -c /etc/labkit/client.toml

  Check a config (rathole's format runs unchanged) without starting anything:
    tunnel check -c server.toml

  Make a Noise key pair (the server keeps the private key, clients get the public one):
    tunnel genkey

  Reload after editing the config (saving the file reloads too):
    systemctl reload tunnel   # sends SIGHUP

  See what a running side is doing (needs metrics_addr in its config):
    tunnel status -c /etc/labkit/server.toml

A config is rathole 0.5's TOML: [server] with bind_addr and [server.services.NAME] tables
(bind_addr, token), or [client] with remote_addr and [client.services.NAME] tables
(local_addr, token). Tokens may also come from token_file = \"PATH\", from default_token,
or from the systemd credential named after the key (e.g. server.services.ssh.token);
a token shorter than 8 bytes (an empty token_file too) is refused with exit status 78.
A server service with proxy_protocol = \"v1\" or \"v2\" sends its local service a PROXY
protocol header with the visitor's address, through any client (rathole's too), and
max_connections = N closes visitors past N open connections on arrival (by default N is
what three quarters of the open file limit hold, at six descriptors per connection).
idle_timeout = SECS closes a visitor connection that carried nothing either way for that
long: 3600 by default, 0 for never (for services that keep idle connections, such as SSH
without keepalives). A service with type = \"udp\" on both sides carries datagrams (up to
65,507 bytes), with a session per visitor address that closes after 60 s idle; when 4,096
are open, a new visitor takes the place of the least recently active one. metrics_addr =
\"127.0.0.1:9090\" in [server] or [client] serves Prometheus metrics at /metrics.
For high availability, remote_addr = [\"vm1:7000\", \"vm2:7000\"] keeps a control channel
to each server: all of them carry visitors, or with mode = \"failover\" only the first one
up. On a server, clients = \"many\" in a TCP service lets several clients serve it at once,
visitors spread by balance = \"round_robin\" (default) or \"least_connections\"; a visitor
whose client is found gone before any byte moved is retried on another. A service may
instead name group = \"NAME\" with [server.groups.NAME] token = \"...\": every client that
proves the group's token serves it. On a client, [[client.servers]] tables (remote_addr,
token, [client.servers.transport]) give each server its own token and transport (one
may be plain TCP, another Noise or TLS).

Declared services (labkit only): with [server.declared] (ports = [2222, \"20000-20099\"],
optional types, max_services, bind_ip, name_prefix) and [server.declared.clients.NAME]
token = \"...\", a client with [client.declare] name = \"NAME\" and that token declares each
of its services that has bind_port = PORT: the server exposes it without an entry of its
own, refuses what the policy forbids (the reason is logged on both sides), and closes the
port when the client goes away or its file drops the service. Adding a service is one edit
of the client's file. Rathole peers never see these messages.

EXIT STATUS:
    0 ok, 64 usage, 66 config missing, 69 a port cannot be bound, 77 permission denied, 78 bad
    config.";

/// Expose services behind NAT through a public server; rathole-compatible.
///
/// The server runs on a host visitors can reach and listens on one port per service; the
/// client runs next to the services, dials out to the server and carries each visitor's
/// connection to its service. Config and wire protocol are rathole 0.5's, so either side
/// works with a rathole peer.
#[derive(Debug, Parser)]
#[command(name = "tunnel", version, after_long_help = EXAMPLES)]
pub struct Cli {
    /// What to do (default: run the side the config file's table names)
    #[command(subcommand)]
    pub command: Option<Command>,

    /// The config file (rathole 0.5 format)
    #[arg(short, long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Logging flags.
    #[command(flatten)]
    pub log: LogArgs,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the public side from the file's [server] table
    #[command(
        after_long_help = "EXAMPLES:\n    tunnel server -c /etc/labkit/tunnel-server.toml\n    systemctl reload tunnel-server     # after editing: SIGHUP reloads, connections stay"
    )]
    Server,
    /// Run the home side from the file's [client] table
    #[command(
        after_long_help = "EXAMPLES:\n    tunnel client -c /etc/labkit/tunnel-client.toml\n    tunnel client -c client.toml --log-level debug"
    )]
    Client,
    /// Check the config, print what it sets up, and exit
    #[command(
        after_long_help = "EXAMPLES:\n    tunnel check -c /etc/labkit/tunnel-server.toml\n    tunnel check -c rathole-server.toml   # a rathole config runs unchanged"
    )]
    Check,
    /// Print a new Noise key pair (x25519, base64), as rathole --genkey does
    #[command(
        after_long_help = "EXAMPLES:\n    tunnel genkey     # the private key goes in the server's config, the public one in the clients'"
    )]
    Genkey,
    /// Print what a running server or client is doing: per service, who is connected,
    /// visitors, bytes and the last error (read from its metrics_addr)
    #[command(
        after_long_help = "EXAMPLES:\n    tunnel status -c /etc/labkit/tunnel-server.toml   # needs metrics_addr in the config"
    )]
    Status,
}

/// Runs the command line.
pub fn run(cli: Cli) -> Result<(), Error> {
    labcore::log::init(&cli.log)?;
    if let Some(Command::Genkey) = cli.command {
        print!("{}", KeyPair::generate()?.render());
        return Ok(());
    }
    let env = Env::from_process();
    let Some(path) = cli.config.as_deref() else {
        return Err(Error::Usage(
            "no config file: pass -c FILE (see tunnel --help)".into(),
        ));
    };
    let mode = match cli.command {
        Some(Command::Check) => return check(path, &env),
        Some(Command::Genkey) => return Ok(()),
        Some(Command::Status) => return status(path, &env),
        Some(Command::Server) => Some(Mode::Server),
        Some(Command::Client) => Some(Mode::Client),
        None => None,
    };
    // One thread: with splice(2) the kernel moves the bytes and the process only steers, so
    // one core carries several GB/s, while a multi-threaded runtime wakes idle workers on
    // every connection (measured: p50 connect+echo 291 µs here against 332 µs with two
    // workers; scripts/bench/tunnel). Encrypted transports may want more workers.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the runtime", e))?;
    runtime.block_on(crate::run(path, mode, &env))
}

fn status(path: &Path, env: &Env) -> Result<(), Error> {
    let sides = config::load_all(path, env)?;
    let found = sides.iter().find_map(|side| match side {
        Settings::Server(s) => s.common.metrics_addr.as_deref().map(|a| (a, "clients")),
        Settings::Client(c) => c.common.metrics_addr.as_deref().map(|a| (a, "servers")),
    });
    let Some((addr, peers)) = found else {
        return Err(Error::Mode {
            path: path.to_owned(),
            message: "has no metrics_addr: tunnel status reads the running side's metrics endpoint"
                .into(),
        });
    };
    let text = crate::status::fetch(addr)?;
    print!(
        "{}",
        crate::status::render(&crate::status::parse(&text), peers)
    );
    Ok(())
}

fn check(path: &Path, env: &Env) -> Result<(), Error> {
    let all = config::load_all(path, env)?;
    for settings in &all {
        crate::transport::check(settings, path)?;
    }
    for settings in all {
        match settings {
            Settings::Server(s) => {
                println!(
                    "{}: server, control port {}, {} services",
                    path.display(),
                    s.bind_addr,
                    s.services.len()
                );
                for service in s.services.values() {
                    println!(
                        "  {} on {}{}",
                        service.name,
                        service.bind_addr,
                        udp_mark(service.service_type)
                    );
                }
                if let Some(declared) = &s.declared {
                    let ports: Vec<String> = declared
                        .policy
                        .ports
                        .iter()
                        .map(ToString::to_string)
                        .collect();
                    let clients: Vec<&str> = declared.clients.keys().map(String::as_str).collect();
                    println!(
                        "  declared services: clients {}, ports {}, at most {} each",
                        clients.join(", "),
                        ports.join(", "),
                        declared.policy.max_services
                    );
                }
            }
            Settings::Client(c) => {
                println!(
                    "{}: client of {}, {} services",
                    path.display(),
                    c.servers
                        .iter()
                        .map(|s| s.addr.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    c.services.len()
                );
                for service in c.services.values() {
                    let declared = match service.bind_port {
                        Some(port) => format!(", declared on port {port}"),
                        None => String::new(),
                    };
                    println!(
                        "  {} to {}{}{declared}",
                        service.name,
                        service.local_addr,
                        udp_mark(service.service_type)
                    );
                }
            }
        }
    }
    Ok(())
}

/// What `tunnel check` adds after a UDP service's address.
fn udp_mark(kind: config::ServiceType) -> &'static str {
    match kind {
        config::ServiceType::Tcp => "",
        config::ServiceType::Udp => " (udp)",
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn every_flag_and_command_has_help() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["tunnel", "server", "-c", "s.toml"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Server)));
        assert_eq!(cli.config.as_deref(), Some(Path::new("s.toml")));
        let cli = Cli::try_parse_from(["tunnel", "-c", "c.toml"]).unwrap();
        assert!(cli.command.is_none());
    }
}
