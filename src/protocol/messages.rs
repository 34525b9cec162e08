//! Messages idgate writes to a client (and the few backend messages it reads the fields of).

use super::frame::put_frame;

/// AuthenticationOk.
pub const AUTH_OK: i32 = 0;
/// AuthenticationCleartextPassword: the token is sent as the password (`'p'`).
pub const AUTH_CLEARTEXT_PASSWORD: i32 = 3;
/// Redshift native IdP: the token is sent in an `'i'` message.
pub const AUTH_REDSHIFT_IDP: i32 = 14;

/// `'R'` AuthenticationRequest with the given code and no payload.
pub fn authentication(out: &mut Vec<u8>, code: i32) {
    put_frame(out, b'R', &code.to_be_bytes());
}

/// `'S'` ParameterStatus.
pub fn parameter_status(out: &mut Vec<u8>, name: &str, value: &str) {
    let mut body = Vec::with_capacity(name.len() + value.len() + 2);
    put_cstr(&mut body, name);
    put_cstr(&mut body, value);
    put_frame(out, b'S', &body);
}

/// `'K'` BackendKeyData.
pub fn backend_key_data(out: &mut Vec<u8>, process_id: i32, secret_key: i32) {
    let mut body = [0u8; 8];
    body[..4].copy_from_slice(&process_id.to_be_bytes());
    body[4..].copy_from_slice(&secret_key.to_be_bytes());
    put_frame(out, b'K', &body);
}

/// `'Z'` ReadyForQuery with transaction status idle.
pub fn ready_for_query(out: &mut Vec<u8>) {
    put_frame(out, b'Z', b"I");
}

/// `'v'` NegotiateProtocolVersion: newest minor version supported and the unrecognized options.
pub fn negotiate_protocol_version(out: &mut Vec<u8>, minor: i32, unrecognized: &[String]) {
    let mut body = Vec::new();
    body.extend_from_slice(&minor.to_be_bytes());
    let n = i32::try_from(unrecognized.len()).unwrap_or(i32::MAX);
    body.extend_from_slice(&n.to_be_bytes());
    for option in unrecognized {
        put_cstr(&mut body, option);
    }
    put_frame(out, b'v', &body);
}

/// `'z'` CompressionAck with an empty algorithm list: compression stays off (redshift-wire.md §4.5).
pub fn compression_ack_none(out: &mut Vec<u8>) {
    put_frame(out, b'z', &[0]);
}

/// Severity of an ErrorResponse.
#[derive(Debug, Clone, Copy)]
pub enum Severity {
    /// The session ends.
    Fatal,
    /// The current command failed.
    Error,
}

/// `'E'` ErrorResponse. `detail` carries the session id for support.
pub fn error_response(
    out: &mut Vec<u8>,
    severity: Severity,
    code: &str,
    message: &str,
    detail: Option<&str>,
) {
    let sev = match severity {
        Severity::Fatal => "FATAL",
        Severity::Error => "ERROR",
    };
    let mut body = Vec::new();
    body.push(b'S');
    put_cstr(&mut body, sev);
    body.push(b'V');
    put_cstr(&mut body, sev);
    body.push(b'C');
    put_cstr(&mut body, code);
    body.push(b'M');
    put_cstr(&mut body, message);
    if let Some(detail) = detail {
        body.push(b'D');
        put_cstr(&mut body, detail);
    }
    body.push(0);
    put_frame(out, b'E', &body);
}

/// The fields of a backend ErrorResponse or NoticeResponse that idgate looks at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorFields {
    /// `C`: SQLSTATE.
    pub code: String,
    /// `M`: primary message.
    pub message: String,
    /// `S`: severity (localized).
    pub severity: String,
}

/// Parse the fields of an ErrorResponse body. Unknown fields are skipped; a malformed body yields
/// what could be read.
pub fn parse_error_fields(body: &[u8]) -> ErrorFields {
    let mut fields = ErrorFields::default();
    let mut rest = body;
    while let Some((&tag, tail)) = rest.split_first() {
        if tag == 0 {
            break;
        }
        let Some(end) = tail.iter().position(|b| *b == 0) else {
            break;
        };
        let value = String::from_utf8_lossy(&tail[..end]).into_owned();
        match tag {
            b'C' => fields.code = value,
            b'M' => fields.message = value,
            b'S' => fields.severity = value,
            _ => {}
        }
        rest = &tail[end + 1..];
    }
    fields
}

fn put_cstr(out: &mut Vec<u8>, s: &str) {
    // A NUL inside would end the string early on the client; drop it.
    out.extend(s.bytes().filter(|b| *b != 0));
    out.push(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_response_round_trips_through_parser() {
        let mut out = Vec::new();
        error_response(
            &mut out,
            Severity::Fatal,
            "28000",
            "token expired",
            Some("session id x"),
        );
        assert_eq!(out[0], b'E');
        let len = i32::from_be_bytes([out[1], out[2], out[3], out[4]]) as usize;
        assert_eq!(len + 1, out.len());
        let fields = parse_error_fields(&out[5..]);
        assert_eq!(fields.code, "28000");
        assert_eq!(fields.message, "token expired");
        assert_eq!(fields.severity, "FATAL");
    }

    #[test]
    fn compression_ack_matches_redshift_bytes() {
        let mut out = Vec::new();
        compression_ack_none(&mut out);
        assert_eq!(out, [0x7a, 0, 0, 0, 5, 0]);
    }

    #[test]
    fn auth_request_14_is_exact() {
        let mut out = Vec::new();
        authentication(&mut out, AUTH_REDSHIFT_IDP);
        assert_eq!(out, [0x52, 0, 0, 0, 8, 0, 0, 0, 0x0e]);
    }
}
