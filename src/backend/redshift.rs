//! The upstream half of the Redshift native IdP exchange (`kind = "redshift"`,
//! `backend_auth = "token"`), as `../shared/docs/redshift-wire.md` §2-4 describe it.
//!
//! idgate logs in to the workgroup the way a Redshift driver would: a StartupMessage with the
//! client's Redshift keys (`client_protocol_version`, `driver_version`, `os_version`,
//! `driver_discovery_version`, `application_name`, …, already filtered by
//! [`crate::session::params::backend_params`]) plus `idp_type`, so the server answers
//! AuthenticationRequest 14; then one `'i'` message carrying the client's own token. No `user`
//! is sent (the workgroup takes the identity from the token), and never `plugin_name`,
//! `provider_name`, `token_type` or `identity_namespace`. The server's ParameterStatus messages
//! (`server_protocol_version`, `server_version`, `driver_token`, …) go back to the client as
//! they came.

use bytes::{BufMut, BytesMut};

use crate::{session::params::NEVER_FORWARD, types::Secret};

/// The `idp_type` idgate announces upstream: Entra ID tokens are Redshift's `AzureAD` native IdP.
pub const UPSTREAM_IDP_TYPE: &str = "AzureAD";

/// The StartupMessage pairs for a Redshift workgroup: the forwarded parameters plus `idp_type`.
pub fn startup_pairs(params: &[(String, String)]) -> Vec<(&str, &str)> {
    params
        .iter()
        // Already filtered by backend_params; checked again so no caller can leak an IdP key.
        .filter(|(k, _)| !NEVER_FORWARD.contains(&k.to_ascii_lowercase().as_str()))
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .chain(std::iter::once(("idp_type", UPSTREAM_IDP_TYPE)))
        .collect()
}

/// The `'i'` message answering AuthenticationRequest 14: the raw token, no trailing NUL (as the
/// Python driver sends it; servers strip one if present).
pub fn idp_token_message(token: &Secret<String>, out: &mut BytesMut) {
    let body = token.expose().as_bytes();
    out.put_u8(b'i');
    out.put_u32((body.len() + 4) as u32);
    out.put_slice(body);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_keeps_redshift_keys_and_asks_for_code_14() {
        let params: Vec<(String, String)> = [
            ("database", "dev"),
            ("client_protocol_version", "2"),
            ("driver_version", "Redshift Python Driver 2.2.0"),
            ("plugin_name", "x"),
            ("token_type", "EXT_JWT"),
            ("idp_type", "AwsIdc"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(
            startup_pairs(&params),
            [
                ("database", "dev"),
                ("client_protocol_version", "2"),
                ("driver_version", "Redshift Python Driver 2.2.0"),
                ("idp_type", "AzureAD"),
            ]
        );
        let mut out = BytesMut::new();
        idp_token_message(&Secret::new("a.b.c".into()), &mut out);
        assert_eq!(&out[..], b"i\0\0\0\x09a.b.c");
    }
}
