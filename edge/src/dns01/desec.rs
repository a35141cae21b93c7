//! The `desec` provider: TXT records through deSEC's API with a token
//! (`Authorization: Token`), as Caddy's desec module makes them.
//!
//! deSEC keeps a name's records of one type as one RRset: the domain holding the name comes
//! from `GET /domains/?owns_qname=`, the RRset is read, our value added to (or taken from) its
//! records, and the RRset written back with `PUT /domains/DOMAIN/rrsets/` (an empty record
//! list deletes it). deSEC's smallest TTL is 3600 s.
//!
//! Invariants: the token is a [`Secret`] that reaches only the request header; other values
//! of the RRset are written back as they were read; a status outside 2xx is an error carrying
//! the API's answer.

use hyper::Method;
use labcore::Secret;
use serde_json::{Value, json};

use super::api::{self, Base};
use super::{DnsError, Presented};

/// deSEC's smallest TTL.
const MIN_TTL: u64 = 3600;

/// deSEC settings, resolved.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Desec {
    base: Base,
    token: Secret,
}

impl Desec {
    /// A client of the API at `base` with `token`.
    pub(crate) fn new(base: Base, token: Secret) -> Desec {
        Desec { base, token }
    }

    fn error(&self, message: impl Into<String>) -> DnsError {
        DnsError {
            provider: "desec",
            target: self.base.url(),
            message: message.into(),
        }
    }

    /// Calls the API: `Some(body)` on 2xx, `None` on 404 when `missing_ok`.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        missing_ok: bool,
    ) -> Result<Option<Value>, DnsError> {
        let auth = format!("Token {}", self.token.expose());
        let answer = api::call(&self.base, method.clone(), path, &auth, body)
            .await
            .map_err(|m| self.error(m))?;
        if missing_ok && answer.status == 404 {
            return Ok(None);
        }
        if !(200..300).contains(&answer.status) {
            return Err(self.error(format!(
                "{method} {path}: status {}: {}",
                answer.status,
                answer.text()
            )));
        }
        if answer.body.is_empty() {
            return Ok(Some(Value::Null));
        }
        serde_json::from_slice(&answer.body)
            .map(Some)
            .map_err(|e| self.error(format!("{method} {path}: not JSON: {e}")))
    }

    /// The domain holding `name` and `name`'s subname in it.
    async fn domain_of(&self, name: &str) -> Result<(String, String), DnsError> {
        let found = self
            .call(
                Method::GET,
                &format!("/domains/?owns_qname={name}"),
                None,
                false,
            )
            .await?
            .unwrap_or(Value::Null);
        let domain = found
            .as_array()
            .and_then(|d| d.first())
            .and_then(|d| d.get("name"))
            .and_then(Value::as_str)
            .filter(|d| valid_name(d))
            .ok_or_else(|| self.error(format!("no domain of this account holds {name}")))?;
        let subname = if name == domain {
            String::new()
        } else {
            name.strip_suffix(&format!(".{domain}"))
                .ok_or_else(|| self.error(format!("domain {domain} does not hold {name}")))?
                .to_owned()
        };
        Ok((domain.to_owned(), subname))
    }

    /// The RRset's records and TTL, if it exists.
    async fn rrset(&self, domain: &str, subname: &str) -> Result<(Vec<String>, u64), DnsError> {
        let path = format!("/domains/{domain}/rrsets/{}/TXT/", rrset_subname(subname));
        let Some(found) = self.call(Method::GET, &path, None, true).await? else {
            return Ok((Vec::new(), MIN_TTL));
        };
        let records = found
            .get("records")
            .and_then(Value::as_array)
            .map(|r| {
                r.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        let ttl = found.get("ttl").and_then(Value::as_u64).unwrap_or(MIN_TTL);
        Ok((records, ttl.max(MIN_TTL)))
    }

    async fn write(
        &self,
        domain: &str,
        subname: &str,
        records: &[String],
        ttl: u64,
    ) -> Result<(), DnsError> {
        let body = json!([{
            "subname": subname,
            "type": "TXT",
            "ttl": ttl,
            "records": records,
        }]);
        self.call(
            Method::PUT,
            &format!("/domains/{domain}/rrsets/"),
            Some(&body),
            false,
        )
        .await
        .map(|_| ())
    }

    /// Adds `value` to TXT `name`.
    pub(crate) async fn present(&self, name: &str, value: &str) -> Result<Presented, DnsError> {
        let (domain, subname) = self.domain_of(name).await?;
        let (mut records, ttl) = self.rrset(&domain, &subname).await?;
        let quoted = format!("\"{value}\"");
        if !records.contains(&quoted) {
            records.push(quoted);
        }
        self.write(&domain, &subname, &records, ttl).await?;
        tracing::info!(name, domain, "DNS-01 record added");
        Ok(Presented {
            fqdn: name.to_owned(),
            value: value.to_owned(),
            id: None,
            zone: domain,
        })
    }

    /// Takes the value `present` added out of its RRset.
    pub(crate) async fn cleanup(&self, record: &Presented) -> Result<(), DnsError> {
        let (domain, subname) = self.domain_of(&record.fqdn).await?;
        let (mut records, ttl) = self.rrset(&domain, &subname).await?;
        let quoted = format!("\"{}\"", record.value);
        let before = records.len();
        records.retain(|r| *r != quoted);
        if records.len() != before {
            self.write(&domain, &subname, &records, ttl).await?;
        }
        tracing::info!(name = %record.fqdn, "DNS-01 record deleted");
        Ok(())
    }
}

/// The subname in an RRset's path: deSEC writes the apex as `@`.
fn rrset_subname(subname: &str) -> &str {
    if subname.is_empty() { "@" } else { subname }
}

/// Whether a domain from the API can go into a path as it is.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
        && !name.contains("..")
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::dns01::api::fake::FakeApi;

    fn client(api: &FakeApi) -> Desec {
        let base = Base::resolve(Some(&api.url("/api/v1")), "desec").unwrap();
        Desec::new(base, Secret::from("desec-token"))
    }

    #[tokio::test]
    async fn desec_adds_its_value_beside_the_others_and_takes_only_it_away() {
        // The RRset as the fake deSEC holds it.
        let records = Arc::new(Mutex::new(vec!["\"someone-elses\"".to_owned()]));
        let state = records.clone();
        let api = FakeApi::start(move |req| {
            assert_eq!(req.auth, "Token desec-token");
            match (req.method.as_str(), req.path.as_str()) {
                ("GET", "/api/v1/domains/?owns_qname=_acme-challenge.test.example") => {
                    (200, json!([{"name": "test.example", "minimum_ttl": 3600}]))
                }
                ("GET", "/api/v1/domains/test.example/rrsets/_acme-challenge/TXT/") => {
                    let records = state.lock().unwrap().clone();
                    (200, json!({"subname": "_acme-challenge", "type": "TXT", "ttl": 3600, "records": records}))
                }
                ("PUT", "/api/v1/domains/test.example/rrsets/") => {
                    let body = req.body.clone().unwrap();
                    let rrset = &body[0];
                    assert_eq!(rrset["subname"], "_acme-challenge");
                    assert_eq!(rrset["type"], "TXT");
                    assert_eq!(rrset["ttl"], 3600);
                    *state.lock().unwrap() = rrset["records"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|r| r.as_str().unwrap().to_owned())
                        .collect();
                    (200, body)
                }
                _ => (404, json!({"detail": "Not found."})),
            }
        })
        .await;
        let desec = client(&api);
        let record = desec
            .present("_acme-challenge.test.example", "tok-digest")
            .await
            .unwrap();
        assert_eq!(
            *records.lock().unwrap(),
            ["\"someone-elses\"", "\"tok-digest\""]
        );
        desec.cleanup(&record).await.unwrap();
        assert_eq!(*records.lock().unwrap(), ["\"someone-elses\""]);
        let calls: Vec<(String, String)> =
            api.seen().into_iter().map(|s| (s.method, s.path)).collect();
        let put = (
            "PUT".to_owned(),
            "/api/v1/domains/test.example/rrsets/".to_owned(),
        );
        assert_eq!(calls.iter().filter(|c| **c == put).count(), 2, "{calls:?}");
    }

    #[tokio::test]
    async fn a_desec_error_answer_is_reported_with_its_detail_and_without_the_token() {
        let api = FakeApi::start(|_| (401, json!({"detail": "Invalid token."}))).await;
        let err = client(&api)
            .present("_acme-challenge.test.example", "v")
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("DNS provider desec (http://127.0.0.1:"),
            "{err}"
        );
        assert!(err.contains("status 401"), "{err}");
        assert!(err.contains("Invalid token."), "{err}");
        assert!(!err.contains("desec-token"), "{err}");
    }
}
