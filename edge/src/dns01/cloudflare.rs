//! The `cloudflare` provider: TXT records through Cloudflare's v4 API with an API token
//! (`Authorization: Bearer`), as Caddy's cloudflare module makes them.
//!
//! The zone is the longest parent of the record's name that the API lists under the token
//! (`GET /zones?name=`); a record is created with `POST /zones/ID/dns_records` and removed by
//! the id that call returned, so only that record goes.
//!
//! Invariants: the token is a [`Secret`] that reaches only the request header; an answer
//! with `"success": false` or a status outside 2xx is an error carrying the API's messages.

use hyper::Method;
use labcore::Secret;
use serde_json::{Value, json};

use super::api::{self, Base};
use super::{DnsError, Presented, TXT_TTL};

/// Whether an id from the API can go into a path as it is.
fn safe_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Cloudflare settings, resolved.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Cloudflare {
    base: Base,
    token: Secret,
}

impl Cloudflare {
    /// A client of the API at `base` with `token`.
    pub(crate) fn new(base: Base, token: Secret) -> Cloudflare {
        Cloudflare { base, token }
    }

    fn error(&self, message: impl Into<String>) -> DnsError {
        DnsError {
            provider: "cloudflare",
            target: self.base.url(),
            message: message.into(),
        }
    }

    /// Calls the API and returns the `result` of a successful answer.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, DnsError> {
        let auth = format!("Bearer {}", self.token.expose());
        let answer = api::call(&self.base, method.clone(), path, &auth, body)
            .await
            .map_err(|m| self.error(m))?;
        let parsed: Value = serde_json::from_slice(&answer.body).unwrap_or(Value::Null);
        let success = parsed.get("success").and_then(Value::as_bool) == Some(true);
        if (200..300).contains(&answer.status) && success {
            return Ok(parsed.get("result").cloned().unwrap_or(Value::Null));
        }
        let messages: Vec<String> = parsed
            .get("errors")
            .and_then(Value::as_array)
            .map(|errors| {
                errors
                    .iter()
                    .map(|e| {
                        format!(
                            "{} (code {})",
                            e.get("message").and_then(Value::as_str).unwrap_or("?"),
                            e.get("code").map_or_else(|| "?".into(), Value::to_string)
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let why = if messages.is_empty() {
            answer.text()
        } else {
            messages.join("; ")
        };
        Err(self.error(format!("{method} {path}: status {}: {why}", answer.status)))
    }

    /// The id of the zone holding `name`: its longest parent the token can see.
    async fn zone_of(&self, name: &str) -> Result<(String, String), DnsError> {
        let labels: Vec<&str> = name.trim_end_matches('.').split('.').collect();
        for start in 1..labels.len().saturating_sub(1) {
            let candidate = labels[start..].join(".");
            let result = self
                .call(Method::GET, &format!("/zones?name={candidate}"), None)
                .await?;
            if let Some(id) = result
                .as_array()
                .and_then(|zones| zones.first())
                .and_then(|z| z.get("id"))
                .and_then(Value::as_str)
                .filter(|id| safe_id(id))
            {
                return Ok((id.to_owned(), candidate));
            }
        }
        Err(self.error(format!(
            "no zone holding {name} is visible to this token (it needs Zone:Read and DNS:Edit)"
        )))
    }

    /// Creates TXT `name` = `value`.
    pub(crate) async fn present(&self, name: &str, value: &str) -> Result<Presented, DnsError> {
        let (zone_id, zone) = self.zone_of(name).await?;
        let body = json!({
            "type": "TXT",
            "name": name,
            "content": format!("\"{value}\""),
            "ttl": TXT_TTL,
        });
        let result = self
            .call(
                Method::POST,
                &format!("/zones/{zone_id}/dns_records"),
                Some(&body),
            )
            .await?;
        let id = result
            .get("id")
            .and_then(Value::as_str)
            .filter(|id| safe_id(id))
            .ok_or_else(|| self.error("the created record has no usable id"))?;
        tracing::info!(name, zone, "DNS-01 record added");
        Ok(Presented {
            fqdn: name.to_owned(),
            value: value.to_owned(),
            id: Some(id.to_owned()),
            zone: zone_id,
        })
    }

    /// Deletes the record `present` created, by its id.
    pub(crate) async fn cleanup(&self, record: &Presented) -> Result<(), DnsError> {
        let id = record
            .id
            .as_deref()
            .ok_or_else(|| self.error("the record to delete has no id"))?;
        self.call(
            Method::DELETE,
            &format!("/zones/{}/dns_records/{id}", record.zone),
            None,
        )
        .await?;
        tracing::info!(name = %record.fqdn, "DNS-01 record deleted");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns01::api::fake::{FakeApi, Seen};

    fn client(api: &FakeApi) -> Cloudflare {
        let base = Base::resolve(Some(&api.url("/client/v4")), "cloudflare").unwrap();
        Cloudflare::new(base, Secret::from("cf-token"))
    }

    fn seen(method: &str, path: &str, body: Option<Value>) -> Seen {
        Seen {
            method: method.into(),
            path: path.into(),
            auth: "Bearer cf-token".into(),
            body,
        }
    }

    #[tokio::test]
    async fn cloudflare_finds_the_zone_creates_the_record_and_deletes_it_by_its_id() {
        let api = FakeApi::start(|req| match (req.method.as_str(), req.path.as_str()) {
            ("GET", "/client/v4/zones?name=a.test.example") => {
                (200, json!({"success": true, "errors": [], "result": []}))
            }
            ("GET", "/client/v4/zones?name=test.example") => (
                200,
                json!({"success": true, "errors": [], "result": [{"id": "zone123", "name": "test.example"}]}),
            ),
            ("POST", "/client/v4/zones/zone123/dns_records") => (
                200,
                json!({"success": true, "errors": [], "result": {"id": "rec456", "type": "TXT"}}),
            ),
            ("DELETE", "/client/v4/zones/zone123/dns_records/rec456") => {
                (200, json!({"success": true, "errors": [], "result": {"id": "rec456"}}))
            }
            _ => (404, json!({"success": false, "errors": [{"code": 7003, "message": "no route"}]})),
        })
        .await;
        let cf = client(&api);
        let record = cf
            .present("_acme-challenge.a.test.example", "tok-digest")
            .await
            .unwrap();
        assert_eq!(record.id.as_deref(), Some("rec456"));
        cf.cleanup(&record).await.unwrap();
        assert_eq!(
            api.seen(),
            [
                seen("GET", "/client/v4/zones?name=a.test.example", None),
                seen("GET", "/client/v4/zones?name=test.example", None),
                seen(
                    "POST",
                    "/client/v4/zones/zone123/dns_records",
                    Some(json!({
                        "type": "TXT",
                        "name": "_acme-challenge.a.test.example",
                        "content": "\"tok-digest\"",
                        "ttl": 120,
                    }))
                ),
                seen(
                    "DELETE",
                    "/client/v4/zones/zone123/dns_records/rec456",
                    None
                ),
            ]
        );
    }

    #[tokio::test]
    async fn a_cloudflare_error_answer_is_reported_with_its_messages_and_without_the_token() {
        let api = FakeApi::start(|_| {
            (
                403,
                json!({"success": false, "errors": [{"code": 10000, "message": "Authentication error"}], "result": null}),
            )
        })
        .await;
        let err = client(&api)
            .present("_acme-challenge.test.example", "v")
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("DNS provider cloudflare (http://127.0.0.1:"),
            "{err}"
        );
        assert!(
            err.contains("status 403: Authentication error (code 10000)"),
            "{err}"
        );
        assert!(!err.contains("cf-token"), "{err}");
    }
}
