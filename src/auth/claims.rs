//! Claims: the duplicate-rejecting JSON object reader used for the untrusted header and payload,
//! and [`VerifiedClaims`], the proof type that only the validator (`jwt.rs`) can build.

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::{Map, Value};

use super::TokenVersion;

/// A top-level JSON object read without losing duplicate members.
///
/// `serde_json::Value` silently keeps the last of two equal keys, while a derived struct errors.
/// RFC 7519 §4 allows either; we reject, so the audit log and the validator can never read
/// different copies of a claim. Nested objects are not checked (no claim we act on is nested
/// except `_claim_names`, which is only tested for presence).
#[derive(Debug)]
pub(crate) struct JsonObject {
    /// The members (first occurrence wins when there is a duplicate; the object is then refused).
    pub(crate) map: Map<String, Value>,
    /// The first member name seen twice, if any.
    pub(crate) duplicate: Option<String>,
}

impl<'de> Deserialize<'de> for JsonObject {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjVisitor;
        impl<'de> Visitor<'de> for ObjVisitor {
            type Value = JsonObject;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<JsonObject, A::Error> {
                let mut map = Map::new();
                let mut duplicate = None;
                while let Some(key) = access.next_key::<String>()? {
                    if map.contains_key(&key) {
                        access.next_value::<IgnoredAny>()?;
                        if duplicate.is_none() {
                            duplicate = Some(key);
                        }
                    } else {
                        let value = access.next_value::<Value>()?;
                        map.insert(key, value);
                    }
                }
                Ok(JsonObject { map, duplicate })
            }
        }
        deserializer.deserialize_map(ObjVisitor)
    }
}

/// The claims of a token whose signature, lifetime, issuer, audience and permissions were all
/// checked. There is no public constructor: holding one proves the checks ran.
#[derive(Clone, Debug)]
pub struct VerifiedClaims {
    pub(super) issuer_name: Arc<str>,
    pub(super) version: TokenVersion,
    pub(super) tenant_id: String,
    pub(super) kid: String,
    pub(super) expires_at: SystemTime,
    pub(super) groups: Vec<String>,
    pub(super) groups_overage: bool,
    pub(super) app_roles: Vec<String>,
    pub(super) scopes: Vec<String>,
    pub(super) client_app_id: Option<String>,
    pub(super) claims: Map<String, Value>,
}

impl VerifiedClaims {
    /// Name of the configured issuer that accepted the token.
    pub fn issuer_name(&self) -> &str {
        &self.issuer_name
    }

    /// Token version (from `ver`, checked against the issuer form).
    pub fn version(&self) -> TokenVersion {
        self.version
    }

    /// Tenant GUID (`tid`), canonical lowercase.
    pub fn tenant_id(&self) -> &str {
        &self.tenant_id
    }

    /// The exact `iss` claim.
    pub fn issuer(&self) -> &str {
        self.claim_str("iss").unwrap_or_default()
    }

    /// Immutable object id (`oid`) of the user or service principal: the identity key, with
    /// [`Self::tenant_id`].
    pub fn object_id(&self) -> Option<&str> {
        self.claim_str("oid")
    }

    /// `sub` (pairwise per application).
    pub fn subject(&self) -> Option<&str> {
        self.claim_str("sub")
    }

    /// Unique token id: `uti`, else `jti`.
    pub fn token_id(&self) -> Option<&str> {
        self.claim_str("uti").or_else(|| self.claim_str("jti"))
    }

    /// `kid` of the key that signed the token (for the audit record).
    pub fn key_id(&self) -> &str {
        &self.kid
    }

    /// `exp` as a point in time.
    pub fn expires_at(&self) -> SystemTime {
        self.expires_at
    }

    /// Any top-level string claim (e.g. `upn`, `preferred_username`, `unique_name`, `email`).
    /// Those are display names: never authorize on them.
    pub fn claim_str(&self, name: &str) -> Option<&str> {
        self.claims.get(name).and_then(Value::as_str)
    }

    /// Any top-level claim, as JSON.
    pub fn claim(&self, name: &str) -> Option<&Value> {
        self.claims.get(name)
    }

    /// Group object ids from `groups` (empty when absent).
    pub fn groups(&self) -> &[String] {
        &self.groups
    }

    /// True when the group list is incomplete (`_claim_names.groups` present or
    /// `hasgroups: true`): treat groups as unknown and fail closed for group-gated rules.
    pub fn groups_overage(&self) -> bool {
        self.groups_overage
    }

    /// App roles (`roles`).
    pub fn app_roles(&self) -> &[String] {
        &self.app_roles
    }

    /// Delegated scopes (`scp`, split on spaces); empty for app-only tokens.
    pub fn scopes(&self) -> &[String] {
        &self.scopes
    }

    /// Client application id: `azp` (v2) or `appid` (v1).
    pub fn client_app_id(&self) -> Option<&str> {
        self.client_app_id.as_deref()
    }

    /// True for app-only (client-credentials) tokens: no `scp`.
    pub fn is_app_only(&self) -> bool {
        self.scopes.is_empty()
    }
}

#[cfg(test)]
impl VerifiedClaims {
    /// Claims as they would be after validation (v2, no scope or app-role requirement), for
    /// tests of what consumes them. `claims` must carry `exp`, `azp` and `scp` or `roles`.
    pub(crate) fn for_test(claims: Value) -> Result<Self, super::TokenError> {
        let map = match claims {
            Value::Object(map) => map,
            _ => Map::new(),
        };
        let issuer_name: Arc<str> = Arc::from("test");
        super::jwt::authorize(
            map,
            TokenVersion::V2,
            "00000000-0000-4000-8000-00000000c0de",
            "test-kid",
            &super::jwt::AuthzPolicy {
                issuer_name: &issuer_name,
                required_scopes: &[],
                required_app_roles: &[],
            },
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_are_detected_at_top_level_only() {
        let o: JsonObject =
            serde_json::from_str(r#"{"aud":"a","x":{"k":1,"k":2},"aud":"b"}"#).unwrap();
        assert_eq!(o.duplicate.as_deref(), Some("aud"));
        assert_eq!(o.map.get("aud"), Some(&Value::String("a".into())));
        let o: JsonObject = serde_json::from_str(r#"{"a":1,"b":[1,2]}"#).unwrap();
        assert!(o.duplicate.is_none());
        assert!(serde_json::from_str::<JsonObject>("[1]").is_err());
    }
}
