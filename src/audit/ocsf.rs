//! OCSF mapping for SIEMs (AWS Security Lake and others): logins, refusals and logoffs become
//! OCSF 1.1 **Authentication** events (class 3002, category 3 "Identity & Access Management"), so
//! no mapping layer is needed. Other kinds (connection, TLS, query, alert) have no Authentication
//! meaning and are not written in this format.
//!
//! | idgate event | activity | status |
//! |---|---|---|
//! | `session_routed` (backend login done) | 1 Logon | 1 Success |
//! | `auth_failed`, `backend_login_failed` | 1 Logon | 2 Failure, `status_detail` = reason |
//! | `session_ended` | 2 Logoff | 1 Success |

use serde_json::{json, Value};

/// OCSF schema version the events follow.
pub const OCSF_VERSION: &str = "1.1.0";
/// Authentication class.
pub const CLASS_AUTHENTICATION: u32 = 3002;
/// Identity & Access Management category.
pub const CATEGORY_IAM: u32 = 3;

/// Map one native event (as JSON) to an OCSF Authentication event, or `None` if it is not one.
pub fn to_ocsf(e: &Value) -> Option<Value> {
    let kind = e["kind"].as_str()?;
    let (activity_id, activity, success) = match kind {
        "session_routed" => (1, "Logon", true),
        "auth_failed" | "backend_login_failed" => (1, "Logon", false),
        "session_ended" => (2, "Logoff", true),
        _ => return None,
    };
    let time_ms = e["time"]
        .as_str()
        .and_then(|t| humantime::parse_rfc3339(t).ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as u64)?;
    let (status_id, status, severity_id, severity) = if success {
        (1, "Success", 1, "Informational")
    } else {
        (2, "Failure", 3, "Medium")
    };
    let src = e["client_addr"]
        .as_str()
        .and_then(|a| a.parse::<std::net::SocketAddr>().ok());
    let dst = e["target"].as_str().map(|t| {
        let (host, port) = t.rsplit_once(':').unwrap_or((t, ""));
        let mut d = json!({ "hostname": host, "svc_name": e["pool"] });
        if let Ok(ip) = host.parse::<std::net::IpAddr>() {
            d["ip"] = json!(ip.to_string());
        }
        if let Ok(p) = port.parse::<u16>() {
            d["port"] = json!(p);
        }
        d
    });
    let user_name = e["db_user"].as_str().or_else(|| e["client_user"].as_str());
    let mut user = json!({});
    if let Some(n) = user_name {
        user["name"] = json!(n);
    }
    if let Some(oid) = e["object_id"].as_str() {
        user["uid"] = json!(oid);
    }
    if let Some(tid) = e["tenant"].as_str() {
        user["org"] = json!({ "uid": tid });
    }
    if let Some(roles) = e["roles"].as_array() {
        user["groups"] = Value::Array(roles.iter().map(|r| json!({ "name": r })).collect());
    }
    let mut out = json!({
        "class_uid": CLASS_AUTHENTICATION,
        "class_name": "Authentication",
        "category_uid": CATEGORY_IAM,
        "category_name": "Identity & Access Management",
        "activity_id": activity_id,
        "activity_name": activity,
        "type_uid": CLASS_AUTHENTICATION * 100 + activity_id,
        "type_name": format!("Authentication: {activity}"),
        "severity_id": severity_id,
        "severity": severity,
        "status_id": status_id,
        "status": status,
        "time": time_ms,
        "auth_protocol_id": 6,
        "auth_protocol": "OAUTH 2.0",
        "is_cleartext": false,
        "user": user,
        "session": { "uid": e["session_id"] },
        "service": { "name": e["pool"] },
        "metadata": {
            "version": OCSF_VERSION,
            "uid": e["event_id"],
            "correlation_uid": e["session_id"],
            "original_time": e["time"],
            "log_name": "idgate-audit",
            "product": {
                "name": "idgate",
                "vendor_name": "idgate",
                "version": env!("CARGO_PKG_VERSION"),
            },
        },
        "unmapped": {
            "idgate_kind": kind,
            "auth_method": e["auth_method"],
            "issuer": e["issuer"],
            "token_id": e["token_id"],
            "database": e["database"],
            "application_name": e["application_name"],
            "driver_version": e["driver_version"],
            "plugin_name": e["plugin_name"],
            "tls": e["tls"],
        },
    });
    if let Some(src) = src {
        out["src_endpoint"] = json!({ "ip": src.ip().to_string(), "port": src.port() });
    }
    if let Some(dst) = dst {
        out["dst_endpoint"] = dst;
    }
    if !success {
        out["status_detail"] = e["reason"].clone();
        out["status_code"] = e["reason"].clone();
    }
    if kind == "session_ended" {
        out["duration"] = e["duration_ms"].clone();
        out["message"] = json!(format!(
            "session ended: {}",
            e["end_reason"].as_str().unwrap_or("unknown")
        ));
    } else if success {
        out["message"] = json!("login succeeded");
    } else {
        out["message"] = json!(format!(
            "login refused: {}",
            e["reason"].as_str().unwrap_or("unknown")
        ));
    }
    strip_nulls(&mut out);
    Some(out)
}

fn strip_nulls(v: &mut Value) {
    if let Value::Object(map) = v {
        map.retain(|_, x| !x.is_null());
        for x in map.values_mut() {
            strip_nulls(x);
        }
    }
}
