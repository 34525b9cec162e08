//! The OTLP logs sink: audit events as OpenTelemetry log records, POSTed to
//! `{endpoint}/v1/logs` in the OTLP/HTTP JSON encoding.
//!
//! The request is written by hand rather than through the SDK's batch exporter on purpose: the
//! shipper only advances its cursor when the collector answered 2xx, so a collector outage delays
//! events and never drops them, exactly like the other sinks.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

/// Why a delivery to the collector failed (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    /// The request could not be sent or timed out (the error carries no URL: an endpoint may
    /// hold credentials).
    #[error("OTLP request failed: {0}")]
    Request(reqwest::Error),
    /// The collector answered with an error status.
    #[error("OTLP collector answered {0}")]
    Status(u16),
    /// The HTTP client could not be built (its TLS back end failed to initialise); events wait
    /// in the spool.
    #[error("OTLP client unavailable: {0}")]
    Client(String),
}

/// Fields copied into log record attributes (besides the full event as the body).
const ATTRIBUTES: &[&str] = &[
    "kind",
    "session_id",
    "event_id",
    "reason",
    "db_user",
    "tenant",
    "object_id",
    "client_addr",
    "pool",
    "target",
    "issuer",
    "end_reason",
];

/// Delivers batches to one collector.
pub(crate) struct OtlpSink {
    url: String,
    client: Result<reqwest::Client, String>,
}

impl OtlpSink {
    pub(crate) fn new(endpoint: &str) -> Self {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| e.without_url().to_string());
        Self {
            url: format!("{}/v1/logs", endpoint.trim_end_matches('/')),
            client,
        }
    }

    pub(crate) async fn deliver(&self, events: &[Value]) -> Result<(), OtlpError> {
        let body = export_request(events);
        let client = self
            .client
            .as_ref()
            .map_err(|e| OtlpError::Client(e.clone()))?;
        let resp = client
            .post(&self.url)
            .json(&body)
            .send()
            .await
            .map_err(|e| OtlpError::Request(e.without_url()))?;
        let status = resp.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(OtlpError::Status(status.as_u16()))
        }
    }
}

/// An `ExportLogsServiceRequest` (OTLP JSON) for `events`.
pub fn export_request(events: &[Value]) -> Value {
    let observed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let records: Vec<Value> = events
        .iter()
        .map(|e| {
            let time = e["time"]
                .as_str()
                .and_then(|t| humantime::parse_rfc3339(t).ok())
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_nanos())
                .unwrap_or(observed);
            let failure = e["kind"] == "auth_failed"
                || e["kind"] == "backend_login_failed"
                || e["kind"] == "alert";
            let attributes: Vec<Value> = ATTRIBUTES
                .iter()
                .filter_map(|k| {
                    e[*k].as_str().map(|v| {
                        let key = if *k == "kind" {
                            "event.name".to_owned()
                        } else {
                            format!("idgate.{k}")
                        };
                        json!({"key": key, "value": {"stringValue": v}})
                    })
                })
                .collect();
            json!({
                "timeUnixNano": time.to_string(),
                "observedTimeUnixNano": observed.to_string(),
                "severityNumber": if failure { 13 } else { 9 },
                "severityText": if failure { "WARN" } else { "INFO" },
                "body": {"stringValue": e.to_string()},
                "attributes": attributes,
            })
        })
        .collect();
    json!({
        "resourceLogs": [{
            "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "idgate"}}]},
            "scopeLogs": [{"scope": {"name": "idgate.audit"}, "logRecords": records}],
        }]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_become_log_records_with_attributes() {
        let e = json!({"kind": "auth_failed", "time": "2026-01-01T00:00:00.000Z", "reason": "token_expired",
                       "session_id": "s", "event_id": "e"});
        let req = export_request(&[e]);
        let rec = &req["resourceLogs"][0]["scopeLogs"][0]["logRecords"][0];
        assert_eq!(rec["timeUnixNano"], "1767225600000000000");
        assert_eq!(rec["severityText"], "WARN");
        let attrs = rec["attributes"].as_array().unwrap();
        assert!(attrs
            .iter()
            .any(|a| a["key"] == "event.name" && a["value"]["stringValue"] == "auth_failed"));
        assert!(attrs
            .iter()
            .any(|a| a["key"] == "idgate.reason" && a["value"]["stringValue"] == "token_expired"));
        assert!(rec["body"]["stringValue"]
            .as_str()
            .unwrap()
            .contains("token_expired"));
    }
}
