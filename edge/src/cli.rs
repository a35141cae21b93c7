//! The command line: subcommands, their help (which becomes the man page), and dispatch.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use labcore::log::LogArgs;
use labcore::{Env, Format};
use serde::Serialize;

use crate::ca::Ca;
use crate::config::Config;
use crate::directives::Chain;
use crate::server::{self, Source};
use crate::site::Site;
use crate::{Error, acme, caddyfile, trust};

const AFTER_HELP: &str = "\
EXAMPLES:
    edge run -c /etc/labkit/edge.toml              serve (systemd Type=notify; SIGHUP reloads)
    edge run --caddyfile /etc/caddy/Caddyfile      serve a Caddyfile as it is
    edge check --caddyfile Caddyfile               validate and list the resolved sites
    edge adapt --caddyfile Caddyfile > edge.toml   the same config as TOML
    edge status -c edge.toml                       each name's certificate: issuer, expiry, renewal, errors
    edge ca root -c edge.toml > root.pem           the internal CA's root, for clients
    curl --cacert root.pem https://app.local/      trust it for one client
    sudo edge ca trust -c edge.toml                or for the whole system

EXIT STATUS:
    0 success; 64 usage; 65 a stored CA file is corrupt; 66 config file missing; 69 a port is in
    use or the trust store tool failed; 70 internal error; 74 I/O error; 77 permission denied
    (ports below 1024 need root or CAP_NET_BIND_SERVICE); 78 bad configuration.";

/// edge: a TLS reverse proxy with an internal CA, configured by TOML or a Caddyfile.
///
/// Terminates HTTPS (TLS 1.2/1.3, HTTP/1.1 and HTTP/2) for each site and proxies to its
/// upstreams, WebSockets included, streaming bodies both ways. Plain HTTP is redirected to
/// HTTPS. Certificates for localhost, IP addresses, *.internal, *.local, *.home.arpa and sites
/// with `tls internal` come from the edge's own CA, made on first start in the storage folder;
/// every other name gets a public certificate by ACME (Let's Encrypt unless `acme_ca` says
/// otherwise), answered on the HTTP port (HTTP-01) or the HTTPS port (TLS-ALPN-01), or
/// published by a DNS provider (DNS-01: RFC 2136, Cloudflare, deSEC or a program; wildcard
/// sites need it), stored, and renewed in the background when a third of its lifetime is left.
/// Access logs are JSON lines on stdout (a Caddyfile site's `log` block writes its own, in
/// Caddy's shape); diagnostics go to stderr. With `admin localhost:PORT` in the Caddyfile, a
/// loopback-only admin endpoint shows the running config (GET /config/) and loads a new
/// Caddyfile (POST /load).
/// `tls CERT KEY` files are read again on every reload.
#[derive(Debug, Parser)]
#[command(name = "edge", version, after_long_help = AFTER_HELP)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// Logging.
    #[command(flatten)]
    pub log: LogArgs,
}

/// The text of the edge-caddyfile(5) manual page, in the `TITLE:` sections `cargo xtask man`
/// renders.
pub const CADDYFILE_MANUAL: &str = include_str!("caddyfile.txt");

/// Which config to read.
#[derive(Debug, Args, Clone)]
pub struct ConfigArgs {
    /// The TOML config file [default: /etc/labkit/edge.toml]
    #[arg(short, long, value_name = "FILE", conflicts_with = "caddyfile")]
    pub config: Option<PathBuf>,
    /// Read a Caddyfile instead of TOML
    #[arg(long, value_name = "FILE")]
    pub caddyfile: Option<PathBuf>,
}

impl ConfigArgs {
    fn source(&self) -> Source {
        match (&self.caddyfile, &self.config) {
            (Some(file), _) => Source::Caddyfile(file.clone()),
            (None, Some(file)) => Source::Toml(file.clone()),
            (None, None) => Source::Toml(PathBuf::from("/etc/labkit/edge.toml")),
        }
    }
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve until SIGTERM; SIGHUP reloads sites and certificates without dropping connections.
    #[command(
        after_long_help = "EXAMPLES:\n    edge run -c /etc/labkit/edge.toml\n    edge run --caddyfile /etc/caddy/Caddyfile --log-format json"
    )]
    Run {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Validate the config and print the resolved sites.
    #[command(
        after_long_help = "EXAMPLES:\n    edge check -c edge.toml\n    edge check --caddyfile Caddyfile --format json"
    )]
    Check {
        #[command(flatten)]
        config: ConfigArgs,
        /// Output format
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Print each name's certificate state from the storage: issuer, expiry, next renewal and
    /// the last error. Reads only the storage, so it works with the edge running or not.
    ///
    /// Text: one line per name. JSON: one object per line with the keys name, issuer, expires,
    /// next_renewal, last_attempt, next_attempt, failures, last_error (times RFC 3339, absent
    /// values null).
    #[command(
        after_long_help = "EXAMPLES:\n    edge status -c /etc/labkit/edge.toml\n    edge status --caddyfile Caddyfile --format json | jq 'select(.last_error)'"
    )]
    Status {
        #[command(flatten)]
        config: ConfigArgs,
        /// Output format
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Print a Caddyfile as the equivalent TOML config.
    #[command(after_long_help = "EXAMPLES:\n    edge adapt --caddyfile Caddyfile > edge.toml")]
    Adapt {
        /// The Caddyfile
        #[arg(long, value_name = "FILE")]
        caddyfile: PathBuf,
    },
    /// The internal certificate authority.
    #[command(
        subcommand,
        after_long_help = "EXAMPLES:\n    edge ca root -c /etc/labkit/edge.toml > root.pem\n    sudo edge ca trust -c /etc/labkit/edge.toml"
    )]
    Ca(CaCommand),
}

/// `edge ca ...`.
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Print the internal root certificate (PEM) from the config's storage, making the CA if
    /// it does not exist yet.
    #[command(
        after_long_help = "EXAMPLES:\n    edge ca root -c edge.toml > root.pem\n    curl --cacert root.pem https://app.local/"
    )]
    Root {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Install the internal root into the system trust store (needs root).
    #[command(after_long_help = "EXAMPLES:\n    sudo edge ca trust -c /etc/labkit/edge.toml")]
    Trust {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Remove the internal root from the system trust store.
    #[command(after_long_help = "EXAMPLES:\n    sudo edge ca untrust -c /etc/labkit/edge.toml")]
    Untrust {
        #[command(flatten)]
        config: ConfigArgs,
    },
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<(), Error> {
    let env = Env::from_process();
    let mut log = cli.log.clone();
    // The config's `debug` sets the level when neither the flag nor the environment does; a
    // config that does not load is reported by the command itself below.
    if let Command::Run { config } = &cli.command
        && log.log_level.is_none()
        && env.get("LABKIT_LOG").is_none()
        && config.source().load(&env).is_ok_and(|c| c.debug)
    {
        log.log_level = Some("debug".into());
    }
    labcore::log::init(&log)?;
    match cli.command {
        Command::Run { config } => {
            // Signals, reload and the access log; connections get their own threads.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|source| Error::Io {
                    what: "starting the runtime".into(),
                    source,
                })?;
            runtime.block_on(server::run(config.source(), env))
        }
        Command::Check { config, format } => {
            let resolved = config.source().load(&env)?;
            print_sites(&resolved, format);
            Ok(())
        }
        Command::Adapt { caddyfile } => {
            // Resolve too, so adapt refuses what run would refuse.
            caddyfile::load(&caddyfile, &env)?;
            let text = std::fs::read_to_string(&caddyfile).map_err(|source| Error::Io {
                what: format!("reading {}", caddyfile.display()),
                source,
            })?;
            let parsed = caddyfile::parse(&caddyfile, &text, &env)?;
            let toml = toml::to_string(&parsed.toml)
                .map_err(|e| Error::Internal(format!("writing TOML: {e}")))?;
            print!("{toml}");
            Ok(())
        }
        Command::Status { config, format } => {
            let resolved = config.source().load(&env)?;
            print_status(&resolved, format)
        }
        Command::Ca(command) => ca(command, &env),
    }
}

fn print_status(config: &Config, format: Format) -> Result<(), Error> {
    let storage = server::open_storage(config)?;
    let (internal, plan) = server::cert_plan(config);
    let mut lines = Vec::new();
    for host in &internal {
        let name = crate::certs::key_of(host);
        let file = name.replace('*', "wildcard_");
        let crt = format!("certificates/local/{file}/{file}.crt");
        let validity = acme::stored_validity(&storage, &crt);
        lines.push(acme::StatusLine {
            name,
            issuer: "internal".into(),
            expires: validity.map(|v| acme::rfc3339(v.not_after)),
            next_renewal: validity.map(|v| acme::rfc3339(v.renew_at())),
            last_error: None,
            last_attempt: None,
            next_attempt: None,
            failures: 0,
        });
    }
    for (name, _) in &plan.names {
        lines.push(acme::status_of(&storage, &plan.settings(name), name));
    }
    for line in &lines {
        match format {
            Format::Json => {
                let text = serde_json::to_string(line)
                    .map_err(|e| Error::Internal(format!("writing JSON: {e}")))?;
                println!("{text}");
            }
            Format::Text => {
                let or_none = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
                let mut out = format!(
                    "{}  issuer {}  expires {}  renews {}",
                    line.name,
                    line.issuer,
                    line.expires.as_deref().unwrap_or("(no certificate)"),
                    or_none(&line.next_renewal),
                );
                if let Some(err) = &line.last_error {
                    out.push_str(&format!(
                        "  failures {}  next attempt {}  last error: {err}",
                        line.failures,
                        or_none(&line.next_attempt)
                    ));
                }
                println!("{out}");
            }
        }
    }
    Ok(())
}

fn open_ca(config: &ConfigArgs, env: &Env) -> Result<Ca, Error> {
    let resolved = config.source().load(env)?;
    let storage = server::open_storage(&resolved)?;
    Ok(Ca::open(&storage)?)
}

fn ca(command: CaCommand, env: &Env) -> Result<(), Error> {
    match command {
        CaCommand::Root { config } => {
            print!("{}", open_ca(&config, env)?.root_pem());
            Ok(())
        }
        CaCommand::Trust { config } => {
            let ca = open_ca(&config, env)?;
            let path = trust::trust(ca.root_pem())?;
            eprintln!("edge: installed the internal root as {}", path.display());
            Ok(())
        }
        CaCommand::Untrust { config } => {
            let ca = open_ca(&config, env)?;
            match trust::untrust(ca.root_pem())? {
                Some(path) => eprintln!("edge: removed {}", path.display()),
                None => eprintln!("edge: the internal root was not installed"),
            }
            Ok(())
        }
    }
}

#[derive(Serialize)]
struct SiteLine {
    address: String,
    tls: Option<&'static str>,
    routes: Vec<String>,
}

fn lines(site: &Site, chain: &Chain) -> Vec<SiteLine> {
    let routes = chain.describe();
    site.addresses
        .iter()
        .map(|address| SiteLine {
            address: address.to_string(),
            tls: (address.scheme == crate::site::Scheme::Https).then(|| {
                match site.tls_policy(&address.host) {
                    crate::site::TlsPolicy::Internal => "internal",
                    crate::site::TlsPolicy::Acme => "acme",
                    crate::site::TlsPolicy::Files => "files",
                    crate::site::TlsPolicy::OnDemand => "on_demand",
                }
            }),
            routes: routes.clone(),
        })
        .collect()
}

fn print_sites(config: &Config, format: Format) {
    for (site, chain) in config.sites.iter().zip(&config.chains) {
        for line in lines(site, chain) {
            match format {
                Format::Json => {
                    if let Ok(text) = serde_json::to_string(&line) {
                        println!("{text}");
                    }
                }
                Format::Text => {
                    let mut out = line.address.clone();
                    if let Some(tls) = line.tls {
                        out.push_str(&format!("  tls {tls}"));
                    }
                    for r in &line.routes {
                        out.push_str(&format!("  {r}"));
                    }
                    println!("{out}");
                }
            }
        }
    }
}
