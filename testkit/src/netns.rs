//! Hosts on one machine: network namespaces joined by veth pairs, with a NAT router between a
//! public host and a home host that can only dial out.
//!
//! ```text
//!   public 198.18.K.1 ── 198.18.K.2 router 198.19.K.1 ── 198.19.K.2 home
//!                                   masquerade out of the public side;
//!                                   forward: established + from home only
//! ```
//!
//! The public host has a route to the home network, so a connection attempt from outside
//! really reaches the router and is dropped there (it times out), as behind a home router.
//! Names carry the test process's PID, so parallel runs never collide and namespaces left by
//! a killed run are removed by the next one. Needs root, `ip` and `nft` (Debian `nftables`).
//!
//! Tests use a host through [`Host::proc`] (a child process inside it) or [`Host::enter`] (a
//! closure on a thread inside it); sockets made there stay in that namespace when used from
//! other threads, so a tokio test can serve and connect on any host.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use nix::sched::CloneFlags;

use crate::Error;
use crate::proc::{ProcBuilder, run, which};
use crate::scratch::pid_alive;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// One host: a network namespace with one address.
#[derive(Debug)]
pub struct Host {
    ns: String,
    addr: Ipv4Addr,
}

impl Host {
    /// The namespace's name (for `ip netns exec`).
    pub fn name(&self) -> &str {
        &self.ns
    }

    /// The host's address (the router's public-side address for the router).
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// An open handle on the namespace.
    pub fn open(&self) -> std::io::Result<OwnedFd> {
        Ok(File::open(Path::new("/run/netns").join(&self.ns))?.into())
    }

    /// A process that will run inside this host.
    pub fn proc(&self, program: impl AsRef<std::ffi::OsStr>) -> Result<ProcBuilder, Error> {
        Ok(ProcBuilder::new(program).netns(self.open()?))
    }

    /// Runs `f` on a thread inside this host and returns its result.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, Error> {
        let ns = self.open()?;
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    nix::sched::setns(ns.as_fd(), CloneFlags::CLONE_NEWNET)
                        .map_err(|e| Error::Setup(format!("entering network namespace: {e}")))?;
                    Ok(f())
                })
                .join()
                .map_err(|_| Error::Setup("a closure inside a network namespace panicked".into()))?
        })
    }

    /// A TCP listener on `0.0.0.0:port` inside this host (0 for any free port).
    pub fn tcp_listen(&self, port: u16) -> Result<TcpListener, Error> {
        Ok(self.enter(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)))??)
    }

    /// A TCP connection from this host.
    pub fn tcp_connect(&self, to: SocketAddr, timeout: Duration) -> Result<TcpStream, Error> {
        Ok(self.enter(|| TcpStream::connect_timeout(&to, timeout))??)
    }

    /// A UDP socket bound inside this host.
    pub fn udp_bind(&self, port: u16) -> Result<UdpSocket, Error> {
        Ok(self.enter(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)))??)
    }
}

/// A public host, a NAT router and a home host behind it; deleted on drop.
#[derive(Debug)]
pub struct Nat {
    public: Host,
    router: Host,
    home: Host,
}

impl Nat {
    /// Builds the topology.
    pub fn new() -> Result<Nat, Error> {
        if which("nft").is_none() && !Path::new("/usr/sbin/nft").exists() {
            return Err(Error::Missing(
                "nft not found: apt-get install nftables".into(),
            ));
        }
        sweep_stale();
        let pid = std::process::id();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let id = format!("lk{pid:x}n{n}");
        let k = ((pid as usize).wrapping_mul(31).wrapping_add(n) % 250 + 1) as u8;
        let nat = Nat {
            public: Host {
                ns: format!("{id}p"),
                addr: Ipv4Addr::new(198, 18, k, 1),
            },
            router: Host {
                ns: format!("{id}r"),
                addr: Ipv4Addr::new(198, 18, k, 2),
            },
            home: Host {
                ns: format!("{id}h"),
                addr: Ipv4Addr::new(198, 19, k, 2),
            },
        };
        // From here on, Drop removes whatever was made.
        nat.build(&id, k)?;
        Ok(nat)
    }

    fn build(&self, id: &str, k: u8) -> Result<(), Error> {
        let (p, r, h) = (&self.public.ns, &self.router.ns, &self.home.ns);
        let (pa, pb, ha, hb) = (
            format!("{id}pa"),
            format!("{id}pb"),
            format!("{id}ha"),
            format!("{id}hb"),
        );
        for ns in [p, r, h] {
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        ip(&[
            "link", "add", &pa, "netns", p, "type", "veth", "peer", "name", &pb, "netns", r,
        ])?;
        ip(&[
            "link", "add", &ha, "netns", h, "type", "veth", "peer", "name", &hb, "netns", r,
        ])?;
        let public_net = format!("198.18.{k}");
        let home_net = format!("198.19.{k}");
        for (ns, dev, addr) in [
            (p, &pa, format!("{public_net}.1/24")),
            (r, &pb, format!("{public_net}.2/24")),
            (r, &hb, format!("{home_net}.1/24")),
            (h, &ha, format!("{home_net}.2/24")),
        ] {
            ip(&["-n", ns, "addr", "add", &addr, "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        ip(&[
            "-n",
            h,
            "route",
            "add",
            "default",
            "via",
            &format!("{home_net}.1"),
        ])?;
        ip(&[
            "-n",
            p,
            "route",
            "add",
            &format!("{home_net}.0/24"),
            "via",
            &format!("{public_net}.2"),
        ])?;
        ip(&[
            "netns",
            "exec",
            r,
            "sh",
            "-c",
            "echo 1 > /proc/sys/net/ipv4/ip_forward",
        ])?;
        let rules = format!(
            "table ip nat {{\n\
             \tchain postrouting {{ type nat hook postrouting priority srcnat; policy accept;\n\
             \t\toifname \"{pb}\" masquerade\n\
             \t}}\n\
             }}\n\
             table inet filter {{\n\
             \tchain forward {{ type filter hook forward priority filter; policy drop;\n\
             \t\tct state established,related accept\n\
             \t\tiifname \"{hb}\" accept\n\
             \t}}\n\
             }}\n"
        );
        let scratch = crate::scratch::Scratch::new("nft")?;
        let rules_path = scratch.join("rules.nft");
        std::fs::write(&rules_path, rules)?;
        ip(&[
            "netns",
            "exec",
            r,
            "nft",
            "-f",
            &rules_path.to_string_lossy(),
        ])?;
        Ok(())
    }

    /// The public host (the VM side of the lab).
    pub fn public(&self) -> &Host {
        &self.public
    }

    /// The NAT router; its address is the one the public host sees home connections come from.
    pub fn router(&self) -> &Host {
        &self.router
    }

    /// The home host, which can only dial out.
    pub fn home(&self) -> &Host {
        &self.home
    }
}

impl Drop for Nat {
    fn drop(&mut self) {
        for host in [&self.home, &self.router, &self.public] {
            let _ = ip(&["netns", "del", &host.ns]);
        }
    }
}

fn ip(args: &[&str]) -> Result<String, Error> {
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
    run("ip", &args, &[])
}

/// Deletes namespaces left by test processes that no longer run.
fn sweep_stale() {
    let Ok(list) = ip(&["netns", "list"]) else {
        return;
    };
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(pid) = name
            .strip_prefix("lk")
            .and_then(|rest| rest.split_once('n'))
            .and_then(|(hex, _)| u32::from_str_radix(hex, 16).ok())
        else {
            continue;
        };
        if pid != std::process::id() && !pid_alive(pid) {
            let _ = ip(&["netns", "del", name]);
        }
    }
}
