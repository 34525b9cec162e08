//! rustls configuration for the client side (TLS 1.2 and 1.3 only, ALPN `postgresql`) and for
//! connections to backends.

use std::sync::Arc;

use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName};

use crate::config::TlsFiles;

/// The ALPN protocol PostgreSQL 17 clients offer (required for direct TLS).
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// A TLS setup problem.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// The certificate file holds no PEM certificate.
    #[error("{0}: no PEM certificate found")]
    NoCertificate(String),
    /// The key file holds no usable PEM private key.
    #[error("{0}: no PEM private key found")]
    NoKey(String),
    /// A PEM block could not be parsed.
    #[error("{path}: {message}")]
    Pem {
        /// File.
        path: String,
        /// Parser message.
        message: String,
    },
    /// rustls refused the pair (e.g. key does not match certificate).
    #[error("certificate and key are not usable together: {0}")]
    Rustls(#[from] rustls::Error),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parse PEM certificates.
pub fn parse_certs(pem: &[u8], path: &str) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsSetupError::Pem {
            path: path.into(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsSetupError::NoCertificate(path.into()));
    }
    Ok(certs)
}

/// Build the client-facing server configuration.
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsSetupError> {
    let cert_path = files.cert_file.display().to_string();
    let key_path = files.key_file.display().to_string();
    let certs = parse_certs(&files.cert_pem, &cert_path)?;
    let key = PrivateKeyDer::from_pem_slice(files.key_pem.expose())
        .map_err(|_| TlsSetupError::NoKey(key_path))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    // Offer ALPN "postgresql"; clients that offer ALPN without it are refused by rustls.
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(Arc::new(config))
}

/// Build a backend-facing client configuration: `ca_pem` (or the web roots) when `verify`,
/// no verification otherwise.
pub fn backend_client_config(
    verify: bool,
    ca_pem: Option<&[u8]>,
) -> Result<Arc<rustls::ClientConfig>, TlsSetupError> {
    backend_client_config_with_cert(verify, ca_pem, None)
}

/// Like [`backend_client_config`], presenting `client` (certificate chain and key) when the
/// server asks for a client certificate (`backend_auth = "client_cert"`).
pub fn backend_client_config_with_cert(
    verify: bool,
    ca_pem: Option<&[u8]>,
    client: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<Arc<rustls::ClientConfig>, TlsSetupError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let config = if verify {
        let mut roots = rustls::RootCertStore::empty();
        match ca_pem {
            Some(pem) => {
                for cert in parse_certs(pem, "backend_ca_file")? {
                    roots.add(cert)?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let builder = builder.with_root_certificates(roots);
        match client {
            Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
            None => builder.with_no_client_auth(),
        }
    } else {
        let builder = builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider())));
        match client {
            Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
            None => builder.with_no_client_auth(),
        }
    };
    Ok(Arc::new(config))
}

/// A server name for `host` (DNS name or IP address).
pub fn server_name(host: &str) -> Option<ServerName<'static>> {
    ServerName::try_from(host.to_owned()).ok()
}

/// `backend_tls = "require"`: encrypt, but accept any certificate (like libpq's sslmode=require).
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
