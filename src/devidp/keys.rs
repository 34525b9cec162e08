//! RSA signing keys of the dev IdP and raw JWS signing (with any header, so tests can craft
//! hostile tokens).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey};
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::pkcs8::{EncodePublicKey, LineEnding};
use rsa::traits::PublicKeyParts;
use rsa::RsaPrivateKey;
use sha2::{Digest, Sha256};

use super::DevIdpError;

/// One RSA-2048 signing key with its JWK parts.
pub(crate) struct DevKey {
    pub(crate) kid: String,
    pub(crate) encoding: EncodingKey,
    pub(crate) n: String,
    pub(crate) e: String,
    pub(crate) public_pem: String,
}

impl DevKey {
    /// Generate a key (CPU-heavy: call from `spawn_blocking` in async code).
    pub(crate) fn generate() -> Result<DevKey, DevIdpError> {
        let private = RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048)
            .map_err(|e| DevIdpError::Key(e.to_string()))?;
        let der = private
            .to_pkcs1_der()
            .map_err(|e| DevIdpError::Key(e.to_string()))?;
        let public = private.to_public_key();
        let public_pem = public
            .to_public_key_pem(LineEnding::LF)
            .map_err(|e| DevIdpError::Key(e.to_string()))?;
        let n_bytes = public.n().to_bytes_be();
        // Entra's kid is the base64url SHA-1 thumbprint of the certificate (27 chars); we have no
        // certificate, so use 20 bytes of SHA-256 over the modulus, which has the same shape.
        let digest = Sha256::digest(&n_bytes);
        let kid = URL_SAFE_NO_PAD.encode(&digest[..20]);
        Ok(DevKey {
            kid,
            encoding: EncodingKey::from_rsa_der(der.as_bytes()),
            n: URL_SAFE_NO_PAD.encode(&n_bytes),
            e: URL_SAFE_NO_PAD.encode(public.e().to_bytes_be()),
            public_pem,
        })
    }

    /// The JWK entry as Entra publishes it: no `alg` member.
    pub(crate) fn jwk(&self, issuer: Option<&str>) -> serde_json::Value {
        let mut k = serde_json::json!({
            "kty": "RSA",
            "use": "sig",
            "kid": self.kid,
            "x5t": self.kid,
            "n": self.n,
            "e": self.e,
        });
        if let (Some(iss), Some(o)) = (issuer, k.as_object_mut()) {
            o.insert("issuer".into(), iss.into());
        }
        k
    }
}

/// `base64url(header).base64url(payload).signature`, signed with `alg` over the raw bytes.
/// HMAC algorithms use `hmac_secret` (tests pass the RSA public key PEM, the classic
/// key-confusion attack); the others use `key`.
pub(crate) fn sign_bytes(
    header: &[u8],
    payload: &[u8],
    key: &DevKey,
    alg: Algorithm,
    hmac_secret: &[u8],
) -> Result<String, DevIdpError> {
    let message = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(payload)
    );
    let signature = match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => jsonwebtoken::crypto::sign(
            message.as_bytes(),
            &EncodingKey::from_secret(hmac_secret),
            alg,
        ),
        _ => jsonwebtoken::crypto::sign(message.as_bytes(), &key.encoding, alg),
    }
    .map_err(|e| DevIdpError::Signing(e.to_string()))?;
    Ok(format!("{message}.{signature}"))
}
