//! idgate's own small certificate authority, used by `backend_auth = "client_cert"`.
//!
//! The CA's certificate and private key come from files (`[ca] cert_file`, `key_file`; PEM, the
//! key in PKCS#8). For every mapped database user idgate mints a short-lived client certificate
//! whose subject CN is the user name (rcgen, ECDSA P-256). PostgreSQL trusts the CA through
//! `ssl_ca_file` and maps the CN to the role with `hostssl … cert`, so no password exists.
//!
//! The CA certificate may come from any tool (openssl, a corporate PKI): its subject name is read
//! with `x509-cert` and reproduced value by value (same string types), so issued certificates
//! name their issuer exactly as the CA certificate names itself. `idgate ca init` writes a fresh
//! pair for development.

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use x509_cert::der::{asn1, DecodePem, Tag, Tagged};

use crate::types::Secret;

/// Client certificates are valid from this long before they are minted (clock skew).
const BACKDATE: Duration = Duration::from_secs(60);

/// A problem loading or using the CA.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The certificate file holds no parsable PEM certificate.
    #[error("CA certificate: {0}")]
    Certificate(String),
    /// The key file holds no usable PKCS#8 private key, or it does not fit the certificate.
    #[error("CA private key: {0}")]
    Key(String),
    /// Signing a client certificate failed.
    #[error("cannot issue a client certificate: {0}")]
    Issue(String),
    /// Writing `idgate ca init` files failed.
    #[error("cannot write {path}: {source}")]
    Write {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// A client certificate minted for one database user.
pub struct IssuedCert {
    /// Certificate, DER.
    pub cert_der: Vec<u8>,
    /// PKCS#8 private key, DER.
    pub key_der: Secret<Vec<u8>>,
    /// Serial number (PostgreSQL shows it in `pg_stat_ssl.client_serial`).
    pub serial: u64,
    /// End of validity.
    pub not_after: SystemTime,
}

/// idgate's CA: the issuer (subject name, key) that signs client certificates.
pub struct IdgateCa {
    issuer: rcgen::Certificate,
    key: rcgen::KeyPair,
    cert_pem: String,
    serial: AtomicU64,
}

impl std::fmt::Debug for IdgateCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdgateCa").finish_non_exhaustive()
    }
}

impl IdgateCa {
    /// A fresh CA (for `idgate ca init` and tests).
    pub fn generate(common_name: &str) -> Result<Self, CaError> {
        let key = rcgen::KeyPair::generate().map_err(|e| CaError::Key(e.to_string()))?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
            .map_err(|e| CaError::Certificate(e.to_string()))?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        params.not_before = at(SystemTime::now() - BACKDATE);
        params.not_after = at(SystemTime::now() + Duration::from_secs(10 * 365 * 86_400));
        let cert = params
            .self_signed(&key)
            .map_err(|e| CaError::Certificate(e.to_string()))?;
        let cert_pem = cert.pem();
        Ok(Self {
            issuer: cert,
            key,
            cert_pem,
            serial: AtomicU64::new(initial_serial()),
        })
    }

    /// Load a CA from PEM text: the certificate and its PKCS#8 private key.
    pub fn from_pem(cert_pem: &str, key_pem: &Secret<String>) -> Result<Self, CaError> {
        let cert = x509_cert::Certificate::from_pem(cert_pem.as_bytes())
            .map_err(|e| CaError::Certificate(format!("not a PEM X.509 certificate: {e}")))?;
        let key = rcgen::KeyPair::from_pem(key_pem.expose())
            .map_err(|e| CaError::Key(format!("not a PEM PKCS#8 key rcgen can use: {e}")))?;
        let spki = &cert.tbs_certificate.subject_public_key_info;
        if spki.subject_public_key.raw_bytes() != key.public_key_raw() {
            return Err(CaError::Key(
                "the key does not belong to the certificate".into(),
            ));
        }
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
            .map_err(|e| CaError::Certificate(e.to_string()))?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name = subject_name(&cert.tbs_certificate.subject)?;
        // Only the name and key of this stand-in are used when signing.
        let issuer = params
            .self_signed(&key)
            .map_err(|e| CaError::Certificate(e.to_string()))?;
        Ok(Self {
            issuer,
            key,
            cert_pem: cert_pem.to_owned(),
            serial: AtomicU64::new(initial_serial()),
        })
    }

    /// The CA certificate, PEM (what PostgreSQL's `ssl_ca_file` must hold).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PEM (PKCS#8).
    pub fn key_pem(&self) -> Secret<String> {
        Secret::new(self.key.serialize_pem())
    }

    /// Mint a client certificate with subject CN = `user`, valid for `lifetime`.
    pub fn issue_client_cert(&self, user: &str, lifetime: Duration) -> Result<IssuedCert, CaError> {
        let issue = |e: rcgen::Error| CaError::Issue(e.to_string());
        let key = rcgen::KeyPair::generate().map_err(issue)?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(issue)?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, user);
        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial.to_be_bytes()));
        let now = SystemTime::now();
        let not_after = now + lifetime;
        params.not_before = at(now - BACKDATE);
        params.not_after = at(not_after);
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params
            .signed_by(&key, &self.issuer, &self.key)
            .map_err(issue)?;
        Ok(IssuedCert {
            cert_der: cert.der().to_vec(),
            key_der: Secret::new(key.serialize_der()),
            serial,
            not_after,
        })
    }

    /// `idgate ca init`: write `ca.pem` and `ca-key.pem` (mode 0600) into `dir`.
    pub fn write_new(dir: &Path, common_name: &str) -> Result<(PathBuf, PathBuf), CaError> {
        let ca = Self::generate(common_name)?;
        let write = |path: PathBuf, text: &str, private: bool| -> Result<PathBuf, CaError> {
            let err = |source| CaError::Write {
                path: path.clone(),
                source,
            };
            std::fs::create_dir_all(dir).map_err(err)?;
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            if private {
                use std::os::unix::fs::OpenOptionsExt;
                options.mode(0o600);
            }
            let mut file = options.open(&path).map_err(err)?;
            std::io::Write::write_all(&mut file, text.as_bytes()).map_err(err)?;
            Ok(path)
        };
        let cert = write(dir.join("ca.pem"), ca.cert_pem(), false)?;
        let key = write(dir.join("ca-key.pem"), ca.key_pem().expose(), true)?;
        Ok((cert, key))
    }
}

/// A serial number start that differs between runs (time based), so restarts do not reissue
/// serials PostgreSQL already saw.
fn initial_serial() -> u64 {
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(1);
    // Keep the top bit clear: a DER INTEGER with it set would need a leading zero byte.
    (micros << 8) & (u64::MAX >> 1)
}

fn at(t: SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from(t)
}

/// Reproduce a certificate's subject name for rcgen, keeping each value's string type.
fn subject_name(name: &x509_cert::name::Name) -> Result<rcgen::DistinguishedName, CaError> {
    let mut dn = rcgen::DistinguishedName::new();
    for rdn in name.0.iter() {
        for atv in rdn.0.iter() {
            let oid: Vec<u64> = atv.oid.arcs().map(u64::from).collect();
            let bad = |e: x509_cert::der::Error| {
                CaError::Certificate(format!("subject attribute {}: {e}", atv.oid))
            };
            let value = match atv.value.tag() {
                Tag::Utf8String => rcgen::DnValue::Utf8String(
                    atv.value
                        .decode_as::<asn1::Utf8StringRef<'_>>()
                        .map_err(bad)?
                        .as_str()
                        .to_owned(),
                ),
                Tag::PrintableString => {
                    let s = atv
                        .value
                        .decode_as::<asn1::PrintableStringRef<'_>>()
                        .map_err(bad)?;
                    rcgen::DnValue::PrintableString(
                        rcgen::PrintableString::try_from(s.as_str())
                            .map_err(|e| CaError::Certificate(e.to_string()))?,
                    )
                }
                Tag::Ia5String => {
                    let s = atv
                        .value
                        .decode_as::<asn1::Ia5StringRef<'_>>()
                        .map_err(bad)?;
                    rcgen::DnValue::Ia5String(
                        rcgen::Ia5String::try_from(s.as_str())
                            .map_err(|e| CaError::Certificate(e.to_string()))?,
                    )
                }
                other => {
                    return Err(CaError::Certificate(format!(
                        "subject attribute {} uses string type {other:?}, which idgate cannot reproduce; use UTF8String or PrintableString",
                        atv.oid
                    )))
                }
            };
            dn.push(rcgen::DnType::from_oid(&oid), value);
        }
    }
    Ok(dn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loaded_ca_issues_certificates_that_chain_to_it() {
        let ca = IdgateCa::generate("idgate test CA").unwrap();
        let loaded = IdgateCa::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
        let cert = loaded
            .issue_client_cert("aad:alice@corp.com", Duration::from_secs(60))
            .unwrap();
        let parsed =
            <x509_cert::Certificate as x509_cert::der::Decode>::from_der(&cert.cert_der).unwrap();
        let issuer = parsed.tbs_certificate.issuer.to_string();
        let ca_cert = x509_cert::Certificate::from_pem(ca.cert_pem().as_bytes()).unwrap();
        assert_eq!(issuer, ca_cert.tbs_certificate.subject.to_string());
        assert_eq!(
            parsed.tbs_certificate.subject.to_string(),
            "CN=aad:alice@corp.com"
        );
        let other = IdgateCa::generate("other").unwrap();
        assert!(IdgateCa::from_pem(ca.cert_pem(), &other.key_pem()).is_err());
    }
}
