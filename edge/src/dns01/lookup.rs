//! Asking DNS servers what DNS-01 needs: the TXT values of a name, the zone a name belongs
//! to (from the SOA an answer carries), and a zone's authoritative servers. One question per
//! exchange, over UDP, asked again over TCP when the answer comes back truncated.
//!
//! Invariants: answers are parsed by hickory-proto (this module decodes nothing by hand); an
//! answer whose ID or question differs from the request is ignored, not believed; every
//! exchange has a time limit.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// Time one exchange may take, UDP tries and the TCP retry together.
pub(crate) const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// Time one UDP try waits for its answer before sending again.
const UDP_TRY: Duration = Duration::from_secs(2);

/// Parses "IP", "IP:PORT" or "[IPv6]:PORT".
pub(crate) fn parse_server(text: &str, default_port: u16) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let bare = text.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, default_port))
        .map_err(|_| format!("{text:?} is not IP or IP:PORT"))
}

/// A name as hickory wants it, fully qualified.
pub(crate) fn fqdn(name: &str) -> Result<Name, String> {
    let mut parsed =
        Name::from_ascii(name.trim_end_matches('.')).map_err(|e| format!("{name:?}: {e}"))?;
    parsed.set_fqdn(true);
    Ok(parsed)
}

/// Sends `request` (a whole message, ID first) to `server` and returns the answer with the
/// same ID: over UDP, and over TCP when the UDP answer is truncated.
pub(crate) async fn exchange(server: SocketAddr, request: &[u8]) -> Result<Vec<u8>, String> {
    tokio::time::timeout(EXCHANGE_TIMEOUT, exchange_untimed(server, request))
        .await
        .map_err(|_| format!("no answer from {server} within {EXCHANGE_TIMEOUT:?}"))?
}

async fn exchange_untimed(server: SocketAddr, request: &[u8]) -> Result<Vec<u8>, String> {
    if request.len() < 12 {
        return Err("a DNS message shorter than its header".into());
    }
    let id = &request[..2];
    let local: SocketAddr = if server.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let socket = UdpSocket::bind(local)
        .await
        .map_err(|e| format!("UDP socket: {e}"))?;
    socket
        .connect(server)
        .await
        .map_err(|e| format!("UDP to {server}: {e}"))?;
    let mut buf = vec![0u8; 65_535];
    let answer = 'tries: {
        for _ in 0..3 {
            socket
                .send(request)
                .await
                .map_err(|e| format!("sending to {server}: {e}"))?;
            let deadline = tokio::time::Instant::now() + UDP_TRY;
            loop {
                match tokio::time::timeout_at(deadline, socket.recv(&mut buf)).await {
                    Err(_) => break,
                    Ok(Err(e)) => return Err(format!("reading from {server}: {e}")),
                    // Another ID: a late answer to an earlier try, or a forgery.
                    Ok(Ok(n)) if n < 12 || buf[..2] != *id => continue,
                    Ok(Ok(n)) => break 'tries buf[..n].to_vec(),
                }
            }
        }
        return Err(format!("no answer from {server} over UDP after 3 tries"));
    };
    // TC: the answer did not fit; ask again over TCP.
    if answer[2] & 0x02 == 0 {
        return Ok(answer);
    }
    let mut tcp = TcpStream::connect(server)
        .await
        .map_err(|e| format!("TCP to {server}: {e}"))?;
    let len = u16::try_from(request.len()).map_err(|_| "a DNS message over 64 KiB")?;
    let mut framed = len.to_be_bytes().to_vec();
    framed.extend_from_slice(request);
    tcp.write_all(&framed)
        .await
        .map_err(|e| format!("sending to {server} over TCP: {e}"))?;
    let n = tcp
        .read_u16()
        .await
        .map_err(|e| format!("reading from {server} over TCP: {e}"))?;
    let mut answer = vec![0u8; usize::from(n)];
    tcp.read_exact(&mut answer)
        .await
        .map_err(|e| format!("reading from {server} over TCP: {e}"))?;
    if answer.len() < 12 || answer[..2] != *id {
        return Err(format!("{server} answered another question over TCP"));
    }
    Ok(answer)
}

/// Asks `server` one question and returns its parsed answer.
pub(crate) async fn query(
    server: SocketAddr,
    name: &Name,
    rtype: RecordType,
) -> Result<Message, String> {
    let mut message = Message::new();
    message
        .set_id(rand::random())
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(name.clone(), rtype));
    let bytes = message
        .to_vec()
        .map_err(|e| format!("encoding a query: {e}"))?;
    let answer = exchange(server, &bytes).await?;
    let parsed =
        Message::from_vec(&answer).map_err(|e| format!("{server} sent a bad answer: {e}"))?;
    let same = parsed
        .queries()
        .first()
        .is_some_and(|q| q.name() == name && q.query_type() == rtype);
    if !same {
        return Err(format!("{server} answered another question"));
    }
    Ok(parsed)
}

/// The TXT values of `name` on `server` (each value's strings joined, as RFC 7208 reads
/// them).
pub(crate) async fn txt_values(server: SocketAddr, name: &Name) -> Result<Vec<String>, String> {
    let answer = query(server, name, RecordType::TXT).await?;
    match answer.response_code() {
        ResponseCode::NoError | ResponseCode::NXDomain => {}
        other => return Err(format!("{server} answered {other}")),
    }
    Ok(answer
        .answers()
        .iter()
        .filter(|r| r.name() == name)
        .filter_map(|r| match r.data() {
            RData::TXT(txt) => Some(
                txt.txt_data()
                    .iter()
                    .map(|part| String::from_utf8_lossy(part))
                    .collect::<String>(),
            ),
            _ => None,
        })
        .collect())
}

/// The zone `name` belongs to, as `server` says: the owner of the SOA in its answer or in
/// its authority section.
pub(crate) async fn find_zone(server: SocketAddr, name: &Name) -> Result<Name, String> {
    let answer = query(server, name, RecordType::SOA).await?;
    match answer.response_code() {
        ResponseCode::NoError | ResponseCode::NXDomain => {}
        ResponseCode::Refused => {
            return Err(format!(
                "{server} refused to answer for {name} (is it a server of this zone?)"
            ));
        }
        other => return Err(format!("{server} answered {other} for {name}")),
    }
    answer
        .answers()
        .iter()
        .chain(answer.name_servers())
        .find(|r| r.record_type() == RecordType::SOA && r.name().zone_of(name))
        .map(|r| r.name().clone())
        .ok_or_else(|| format!("{server} names no zone holding {name}"))
}

/// The nameservers in /etc/resolv.conf (port 53), the system's resolvers.
fn system_resolvers() -> Vec<SocketAddr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| {
            let ip = rest.trim().split('%').next()?;
            ip.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53))
        })
        .collect()
}

/// The authoritative servers of the zone holding `fqdn`, found through the system's
/// resolvers; `fallback` when they know no such zone.
pub(crate) async fn authoritative_servers(
    fqdn: &str,
    fallback: Option<SocketAddr>,
) -> Result<Vec<SocketAddr>, String> {
    let name = self::fqdn(fqdn)?;
    let mut last = "no nameserver in /etc/resolv.conf".to_owned();
    for resolver in system_resolvers() {
        match servers_via(resolver, &name).await {
            Ok(found) if !found.is_empty() => return Ok(found),
            Ok(_) => last = format!("{resolver} knows no address of the zone's servers"),
            Err(err) => last = err,
        }
    }
    fallback.map(|f| vec![f]).ok_or(last)
}

async fn servers_via(resolver: SocketAddr, name: &Name) -> Result<Vec<SocketAddr>, String> {
    let zone = find_zone(resolver, name).await?;
    let answer = query(resolver, &zone, RecordType::NS).await?;
    let mut found = Vec::new();
    for record in answer.answers() {
        let RData::NS(ns) = record.data() else {
            continue;
        };
        for rtype in [RecordType::A, RecordType::AAAA] {
            let Ok(addresses) = query(resolver, &ns.0, rtype).await else {
                continue;
            };
            for r in addresses.answers() {
                let ip: IpAddr = match r.data() {
                    RData::A(a) => a.0.into(),
                    RData::AAAA(a) => a.0.into(),
                    _ => continue,
                };
                let addr = SocketAddr::new(ip, 53);
                if !found.contains(&addr) {
                    found.push(addr);
                }
            }
        }
    }
    Ok(found)
}

/// Waits until every server in `servers` has `value` among the TXT values of `fqdn`, asking
/// each again (from 250 ms apart up to 2 s apart) until `timeout`.
pub(crate) async fn wait_txt(
    servers: &[SocketAddr],
    fqdn: &str,
    value: &str,
    timeout: Duration,
) -> Result<(), String> {
    let name = self::fqdn(fqdn)?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut pending: Vec<SocketAddr> = servers.to_vec();
    let mut pause = Duration::from_millis(250);
    let mut last = String::new();
    loop {
        let mut still = Vec::new();
        for server in pending {
            match txt_values(server, &name).await {
                Ok(values) if values.iter().any(|v| v == value) => {}
                Ok(values) => {
                    last = format!("{server} has {} other value(s)", values.len());
                    still.push(server);
                }
                Err(err) => {
                    last = err;
                    still.push(server);
                }
            }
        }
        if still.is_empty() {
            return Ok(());
        }
        pending = still;
        if tokio::time::Instant::now() + pause > deadline {
            return Err(format!(
                "TXT {fqdn} not visible after {timeout:?} ({last}); raise propagation_timeout"
            ));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_parse_with_and_without_ports() {
        assert_eq!(
            parse_server("127.0.0.1", 53).unwrap(),
            "127.0.0.1:53".parse().unwrap()
        );
        assert_eq!(
            parse_server("127.0.0.1:5353", 53).unwrap(),
            "127.0.0.1:5353".parse().unwrap()
        );
        assert_eq!(
            parse_server("::1", 53).unwrap(),
            "[::1]:53".parse().unwrap()
        );
        assert!(parse_server("ns1.example.org", 53).is_err());
    }
}
