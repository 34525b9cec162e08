//! `backend_auth = "client_cert"`: one short-lived client certificate per database user, minted
//! by idgate's CA and cached (as a ready rustls client configuration) until shortly before it
//! expires.
//!
//! Concurrent logins of one user share one mint (moka coalesces the initialisation), and an
//! entry leaves the cache at its refresh time, so the next login mints a fresh certificate
//! before the old one could expire mid-handshake.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::{
    ca::{CaError, IdgateCa},
    config::BackendTls,
    net::tls::{self, TlsSetupError},
};

/// Certificates are replaced this long before they expire, at most.
const MAX_REFRESH_MARGIN: Duration = Duration::from_secs(300);
/// Cached users per pool.
const MAX_CACHED_USERS: u64 = 100_000;

/// Why no client certificate could be prepared.
#[derive(Debug, thiserror::Error)]
pub enum ClientCertError {
    /// The CA could not sign.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// rustls refused the certificate or the backend CA bundle.
    #[error("TLS setup: {0}")]
    Tls(#[from] TlsSetupError),
    /// The pool does not use TLS, so no certificate can be presented.
    #[error("backend_tls = \"disable\" cannot carry a client certificate")]
    NoTls,
}

/// A minted certificate, ready to use.
pub struct ClientCert {
    /// TLS client configuration presenting the certificate.
    pub tls: Arc<rustls::ClientConfig>,
    /// The certificate's serial number (PostgreSQL shows it in `pg_stat_ssl.client_serial`).
    pub serial: u64,
    refresh_at: Instant,
}

struct RefreshAt;

impl moka::Expiry<String, Arc<ClientCert>> for RefreshAt {
    fn expire_after_create(
        &self,
        _key: &String,
        value: &Arc<ClientCert>,
        created_at: Instant,
    ) -> Option<Duration> {
        Some(value.refresh_at.saturating_duration_since(created_at))
    }
}

/// Mints and caches client certificates for one pool.
pub struct ClientCertIssuer {
    ca: Arc<IdgateCa>,
    lifetime: Duration,
    verify: bool,
    backend_ca: Option<Vec<u8>>,
    disabled: bool,
    cache: moka::future::Cache<String, Arc<ClientCert>>,
    minted: AtomicU64,
}

impl std::fmt::Debug for ClientCertIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCertIssuer")
            .field("lifetime", &self.lifetime)
            .field("minted", &self.minted())
            .finish_non_exhaustive()
    }
}

impl ClientCertIssuer {
    /// An issuer for a pool with `backend_tls` (`Disable` is refused at login time).
    pub fn new(ca: Arc<IdgateCa>, lifetime: Duration, backend_tls: &BackendTls) -> Self {
        let (verify, backend_ca) = match backend_tls {
            BackendTls::Disable | BackendTls::Require => (false, None),
            BackendTls::VerifyFull { ca_pem } => (true, ca_pem.clone()),
        };
        Self {
            ca,
            lifetime,
            verify,
            backend_ca,
            disabled: matches!(backend_tls, BackendTls::Disable),
            cache: moka::future::Cache::builder()
                .max_capacity(MAX_CACHED_USERS)
                .expire_after(RefreshAt)
                .build(),
            minted: AtomicU64::new(0),
        }
    }

    /// How many certificates this issuer has minted.
    pub fn minted(&self) -> u64 {
        self.minted.load(Ordering::Relaxed)
    }

    /// The client certificate for `user`: cached, or minted now.
    pub async fn for_user(&self, user: &str) -> Result<Arc<ClientCert>, ClientCertError> {
        self.cache
            .try_get_with(user.to_owned(), async { self.mint(user).map(Arc::new) })
            .await
            .map_err(|e| match Arc::try_unwrap(e) {
                Ok(e) => e,
                Err(shared) => match &*shared {
                    ClientCertError::Ca(c) => ClientCertError::Ca(CaError::Issue(c.to_string())),
                    ClientCertError::Tls(t) => {
                        ClientCertError::Ca(CaError::Issue(format!("TLS setup: {t}")))
                    }
                    ClientCertError::NoTls => ClientCertError::NoTls,
                },
            })
    }

    fn mint(&self, user: &str) -> Result<ClientCert, ClientCertError> {
        if self.disabled {
            return Err(ClientCertError::NoTls);
        }
        let issued = self.ca.issue_client_cert(user, self.lifetime)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(issued.key_der.expose().clone()));
        let chain = vec![CertificateDer::from(issued.cert_der)];
        let tls = tls::backend_client_config_with_cert(
            self.verify,
            self.backend_ca.as_deref(),
            Some((chain, key)),
        )?;
        self.minted.fetch_add(1, Ordering::Relaxed);
        let margin = (self.lifetime / 5).min(MAX_REFRESH_MARGIN);
        Ok(ClientCert {
            tls,
            serial: issued.serial,
            refresh_at: Instant::now() + self.lifetime.saturating_sub(margin),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn concurrent_logins_share_one_certificate_and_expired_ones_are_replaced() {
        let ca = Arc::new(IdgateCa::generate("t").unwrap());
        let issuer = Arc::new(ClientCertIssuer::new(
            ca,
            Duration::from_secs(2),
            &BackendTls::Require,
        ));
        let tasks: Vec<_> = (0..100)
            .map(|_| {
                let issuer = issuer.clone();
                tokio::spawn(async move { issuer.for_user("aad:a@b.c").await.unwrap().serial })
            })
            .collect();
        let mut serials = Vec::new();
        for t in tasks {
            serials.push(t.await.unwrap());
        }
        assert!(serials.iter().all(|s| *s == serials[0]));
        assert_eq!(issuer.minted(), 1);
        tokio::time::sleep(Duration::from_millis(1800)).await;
        let fresh = issuer.for_user("aad:a@b.c").await.unwrap();
        assert_ne!(fresh.serial, serials[0]);
        assert_eq!(issuer.minted(), 2);
        assert!(matches!(
            ClientCertIssuer::new(
                Arc::new(IdgateCa::generate("t").unwrap()),
                Duration::from_secs(60),
                &BackendTls::Disable
            )
            .for_user("x")
            .await,
            Err(ClientCertError::NoTls)
        ));
    }
}
