//! The `rfc2136` provider: DNS UPDATE messages (RFC 2136) signed with a TSIG key (RFC 8945),
//! sent to the zone's primary server, as BIND's `nsupdate -y` sends them.
//!
//! The zone is the one the server names in the SOA of its answer for the record's name, so
//! no zone is configured. Adding is "add this TXT value" and removing "delete this TXT
//! value" (RFC 2136 §2.5.1 and §2.5.4): other values of the name stay.
//!
//! Invariants: every update is signed and the server's answer verified against the key
//! before it counts as done; the key is a [`Secret`], never printed; an answer refusing the
//! key names the key and the server (never the secret).

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use hickory_proto::dnssec::rdata::tsig::TsigAlgorithm;
use hickory_proto::dnssec::tsig::TSigner;
use hickory_proto::op::{Message, ResponseCode, update_message};
use hickory_proto::rr::rdata::TXT;
use hickory_proto::rr::{Name, RData, Record, RecordSet};
use labcore::Secret;

use super::lookup::{self, exchange, fqdn};
use super::{DnsError, DnsToml, Presented, TXT_TTL};
use crate::site::split_host_port;

/// The time difference allowed between the edge's clock and the server's (BIND's default).
const FUDGE: u16 = 300;

/// RFC 2136 settings, resolved.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Rfc2136 {
    /// "host:port" of the primary.
    server_text: String,
    /// The primary, when `server_text` is an IP address (else looked up at each use).
    server: Option<SocketAddr>,
    /// The TSIG key's name.
    key_name: Name,
    /// Its algorithm.
    algorithm: TsigAlgorithm,
    /// Its secret, base64.
    key: Secret,
}

impl Rfc2136 {
    /// Checks the table's rfc2136 options; an error names the key at fault.
    pub(crate) fn resolve(raw: &DnsToml, key: Secret) -> Result<Rfc2136, (&'static str, String)> {
        let server_text = raw.server.clone().ok_or((
            "server",
            "is missing (the primary server, host:port)".to_owned(),
        ))?;
        let (host, port) = split_host_port(&server_text)
            .filter(|(h, _)| !h.is_empty())
            .ok_or(("server", format!("{server_text:?} is not host:port")))?;
        let server = lookup::parse_server(host, port.unwrap_or(53)).ok();
        let server_text = format!("{host}:{}", port.unwrap_or(53));
        let key_name = raw
            .key_name
            .as_deref()
            .ok_or(("key_name", "is missing (the TSIG key's name)".to_owned()))
            .and_then(|n| fqdn(n).map_err(|m| ("key_name", m)))?;
        let algorithm = match raw
            .key_alg
            .as_deref()
            .unwrap_or("hmac-sha256")
            .trim_end_matches('.')
            .to_ascii_lowercase()
            .as_str()
        {
            "hmac-sha256" => TsigAlgorithm::HmacSha256,
            "hmac-sha384" => TsigAlgorithm::HmacSha384,
            "hmac-sha512" => TsigAlgorithm::HmacSha512,
            other => {
                return Err((
                    "key_alg",
                    format!("{other:?} is not supported (hmac-sha256, hmac-sha384 or hmac-sha512)"),
                ));
            }
        };
        match base64::engine::general_purpose::STANDARD.decode(key.expose().trim()) {
            Ok(bytes) if !bytes.is_empty() => {}
            _ => return Err(("key", "is not a base64 TSIG secret".to_owned())),
        }
        Ok(Rfc2136 {
            server_text,
            server,
            key_name,
            algorithm,
            key,
        })
    }

    fn error(&self, message: impl Into<String>) -> DnsError {
        DnsError {
            provider: "rfc2136",
            target: self.server_text.clone(),
            message: message.into(),
        }
    }

    /// The primary's address: the configured IP, or the name looked up now.
    pub(crate) async fn address(&self) -> Result<SocketAddr, DnsError> {
        if let Some(addr) = self.server {
            return Ok(addr);
        }
        let found = tokio::time::timeout(
            lookup::EXCHANGE_TIMEOUT,
            tokio::net::lookup_host(self.server_text.as_str()),
        )
        .await
        .map_err(|_| self.error("looking up the server's address timed out"))?
        .map_err(|e| self.error(format!("looking up the server's address: {e}")))?
        .next();
        found.ok_or_else(|| self.error("the server's name has no address"))
    }

    /// Adds TXT `fqdn` = `value` in the zone the server holds it in.
    pub(crate) async fn present(&self, name: &str, value: &str) -> Result<Presented, DnsError> {
        let server = self.address().await?;
        let owner = fqdn(name).map_err(|m| self.error(m))?;
        let zone = lookup::find_zone(server, &owner)
            .await
            .map_err(|m| self.error(format!("finding the zone of {name}: {m}")))?;
        let message = update_message::append(self.rrset(&owner, value), zone.clone(), false, false);
        self.send(server, message, &format!("adding TXT {name}"))
            .await?;
        tracing::info!(name, zone = %zone, server = %self.server_text, "DNS-01 record added");
        Ok(Presented {
            fqdn: name.to_owned(),
            value: value.to_owned(),
            id: None,
            zone: zone.to_string(),
        })
    }

    /// Deletes the value `present` added.
    pub(crate) async fn cleanup(&self, record: &Presented) -> Result<(), DnsError> {
        let server = self.address().await?;
        let owner = fqdn(&record.fqdn).map_err(|m| self.error(m))?;
        let zone = fqdn(&record.zone).map_err(|m| self.error(m))?;
        if !zone.zone_of(&owner) {
            return Err(self.error(format!("{} is not in zone {zone}", record.fqdn)));
        }
        let message =
            update_message::delete_by_rdata(self.rrset(&owner, &record.value), zone, false);
        self.send(server, message, &format!("deleting TXT {}", record.fqdn))
            .await?;
        tracing::info!(name = %record.fqdn, server = %self.server_text, "DNS-01 record deleted");
        Ok(())
    }

    fn rrset(&self, owner: &Name, value: &str) -> RecordSet {
        let record = Record::from_rdata(
            owner.clone(),
            TXT_TTL,
            RData::TXT(TXT::new(vec![value.to_owned()])),
        );
        RecordSet::from(record)
    }

    /// Signs `message`, sends it, and checks the server's signed answer says done.
    async fn send(
        &self,
        server: SocketAddr,
        mut message: Message,
        what: &str,
    ) -> Result<(), DnsError> {
        let secret = base64::engine::general_purpose::STANDARD
            .decode(self.key.expose().trim())
            .map_err(|_| self.error("the TSIG secret is not base64"))?;
        let signer = TSigner::new(secret, self.algorithm.clone(), self.key_name.clone(), FUDGE)
            .map_err(|e| self.error(format!("TSIG key {}: {e}", self.key_name)))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let verifier = message
            .finalize(&signer, u32::try_from(now).unwrap_or(u32::MAX))
            .map_err(|e| self.error(format!("signing the update: {e}")))?;
        let bytes = message
            .to_vec()
            .map_err(|e| self.error(format!("encoding the update: {e}")))?;
        let answer = exchange(server, &bytes)
            .await
            .map_err(|m| self.error(format!("{what}: {m}")))?;
        let parsed = Message::from_vec(&answer)
            .map_err(|e| self.error(format!("{what}: a bad answer: {e}")))?;
        match parsed.response_code() {
            ResponseCode::NoError => {}
            ResponseCode::NotAuth => {
                return Err(self.error(format!(
                    "{what}: the server refused TSIG key {} ({}) with NOTAUTH: a wrong secret, \
                     key name or algorithm, or clocks more than {FUDGE} s apart",
                    self.key_name,
                    self.algorithm.to_name()
                )));
            }
            ResponseCode::Refused => {
                return Err(self.error(format!(
                    "{what}: the server refused the update (does its allow-update or \
                     update-policy grant key {} this name?)",
                    self.key_name
                )));
            }
            other => {
                return Err(self.error(format!("{what}: the server answered {other}")));
            }
        }
        let mut verifier =
            verifier.ok_or_else(|| self.error("the update was not signed".to_owned()))?;
        verifier(&answer).map_err(|e| {
            self.error(format!(
                "{what}: the server's answer fails TSIG verification with key {}: {e}",
                self.key_name
            ))
        })?;
        Ok(())
    }
}
