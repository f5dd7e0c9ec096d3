//! The TLS listener's certificate: read from PEM files and read again when they change
//! (cert-manager and Let's Encrypt renew by replacing the files, Kubernetes secrets by
//! swapping a symlink), so a renewal needs no restart. A file that does not parse keeps the
//! certificate in use and says why in the log. HTTP/2 is offered over ALPN.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::ring::sign::any_supported_type;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// How often the files are checked for a change.
const RELOAD_CHECK: Duration = Duration::from_secs(2);

/// The certificate and key files.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Hands rustls the current certificate.
#[derive(Debug)]
struct Current(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.read().ok().map(|c| c.clone())
    }
}

fn load(files: &TlsFiles) -> Result<CertifiedKey, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| format!("{}: {e}", files.cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", files.cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", files.cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| format!("{}: {e}", files.key.display()))?;
    let key = any_supported_type(&key).map_err(|e| format!("{}: {e}", files.key.display()))?;
    let certified = CertifiedKey::new(certs, key);
    certified.keys_match().map_err(|e| {
        format!(
            "{} does not belong to {}: {e}",
            files.key.display(),
            files.cert.display()
        )
    })?;
    Ok(certified)
}

/// Modification times of both files (following symlinks), to notice a renewal.
fn stamp(files: &TlsFiles) -> Option<(SystemTime, SystemTime)> {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    Some((m(&files.cert)?, m(&files.key)?))
}

/// Loads the certificate (failing when it cannot) and keeps it current; the rustls config
/// to accept connections with.
pub fn server_config(files: TlsFiles) -> Result<Arc<rustls::ServerConfig>, String> {
    let current = Arc::new(Current(RwLock::new(Arc::new(load(&files)?))));
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(current.clone());
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    tracing::info!(cert = %files.cert.display(), "TLS certificate loaded");
    let mut seen = stamp(&files);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(RELOAD_CHECK).await;
            let now = stamp(&files);
            if now.is_none() || now == seen {
                continue;
            }
            seen = now;
            match load(&files) {
                Ok(c) => {
                    if let Ok(mut slot) = current.0.write() {
                        *slot = Arc::new(c);
                    }
                    tracing::info!(cert = %files.cert.display(), "TLS certificate changed on disk: reloaded");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "TLS certificate changed on disk but cannot be used; keeping the one in use")
                }
            }
        }
    });
    Ok(Arc::new(config))
}
