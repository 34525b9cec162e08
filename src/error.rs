//! Error classification shared by every phase.
//!
//! Each phase has its own `thiserror` enum. Every such enum implements [`Reportable`] (who has to
//! act) and [`UserFacing`] (what the client may see) with exhaustive matches, so a new variant
//! cannot compile until someone decides both. Client text is allow-listed here: internal and I/O
//! errors reach the client only as "internal error" plus the session id.

use std::borrow::Cow;

/// SQLSTATE codes idgate itself emits.
pub mod sqlstate {
    /// invalid_authorization_specification: bad, expired or refused token.
    pub const INVALID_AUTHORIZATION: &str = "28000";
    /// invalid_password: a backend refused the credentials idgate presented.
    pub const INVALID_PASSWORD: &str = "28P01";
    /// protocol_violation.
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    /// connection_failure: the backend or identity provider could not be reached.
    pub const CONNECTION_FAILURE: &str = "08006";
    /// too_many_connections.
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    /// admin_shutdown.
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    /// insufficient_privilege: an identity-changing startup option was refused.
    pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
    /// feature_not_supported.
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    /// internal_error.
    pub const INTERNAL: &str = "XX000";
}

/// Who has to act on an error. Used as an audit field and (later) a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The client sent something wrong (bad token, bad protocol, refused option).
    User,
    /// The client went away or timed out.
    ClientDisconnect,
    /// A connection or rate limit was hit.
    RateLimit,
    /// The identity provider (discovery/JWKS) could not be reached.
    IdentityProvider,
    /// No backend target could be reached.
    BackendUnavailable,
    /// The backend answered with an error.
    Backend,
    /// idgate is shutting down.
    Shutdown,
    /// A bug or a local resource problem in idgate.
    Internal,
}

/// Classification of an error by who has to act.
pub trait Reportable {
    /// The error's kind.
    fn kind(&self) -> ErrorKind;
    /// A stable snake_case reason code for the audit trail (precise; never sent to the client).
    fn reason(&self) -> Cow<'static, str>;
}

/// The only way error text reaches a client.
pub trait UserFacing: Reportable {
    /// The SQLSTATE sent to the client.
    fn sqlstate(&self) -> &'static str;
    /// The message sent to the client: says what to do, never leaks a secret.
    fn client_message(&self) -> Cow<'static, str>;
}
