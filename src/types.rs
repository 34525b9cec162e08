//! Small newtypes shared across phases.

use std::fmt;

/// A value that must never be printed: `Debug` and `Display` show `[redacted]`.
#[derive(Clone, Default)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    /// Wrap a secret.
    pub fn new(value: T) -> Self {
        Self(value)
    }

    /// Read the secret where it is really needed.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// Replace anything that looks like a JWT (three base64url segments, the first starting with
/// `eyJ`) by `[redacted token]`. Applied to every client-supplied value that is audited or echoed
/// (user, database, application_name, …), because people do paste tokens into the wrong field.
pub fn redact_tokens(value: &str) -> std::borrow::Cow<'_, str> {
    let is_b64 = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    let mut out = String::new();
    let mut last = 0;
    let mut search = 0;
    while let Some(found) = value[search..].find("eyJ") {
        let start = search + found;
        // The candidate runs over base64url characters and dots.
        let end = value[start..]
            .find(|c: char| !(is_b64(c) || c == '.'))
            .map_or(value.len(), |e| start + e);
        let candidate = &value[start..end];
        let segments: Vec<&str> = candidate.split('.').collect();
        if segments.len() >= 3
            && segments.iter().take(3).all(|s| !s.is_empty())
            && candidate.len() >= 20
        {
            out.push_str(&value[last..start]);
            out.push_str("[redacted token]");
            last = end;
        }
        search = end.max(start + 3);
    }
    if last == 0 {
        return std::borrow::Cow::Borrowed(value);
    }
    out.push_str(&value[last..]);
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwt_shaped_values_are_redacted() {
        let jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlLXNpZ25hdHVyZQ";
        assert_eq!(redact_tokens(jwt), "[redacted token]");
        assert_eq!(
            redact_tokens(&format!("user {jwt} x")),
            "user [redacted token] x"
        );
        assert_eq!(
            redact_tokens("alice@contoso.example"),
            "alice@contoso.example"
        );
        assert_eq!(redact_tokens("eyJ.not"), "eyJ.not");
    }
}

/// A session's id: one per accepted client connection, in every audit event and error detail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct SessionId(uuid::Uuid);

impl SessionId {
    /// A fresh random id.
    pub fn new() -> Self {
        Self(uuid::Uuid::new_v4())
    }

    /// The nil id, used by gateway-level audit events that belong to no session.
    pub fn nil() -> Self {
        Self(uuid::Uuid::nil())
    }
}

impl Default for SessionId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
