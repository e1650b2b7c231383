//! TLS termination: certificates from PEM files, chosen by SNI (the first pair is the default),
//! TLS 1.2 and 1.3 only with rustls's modern suites, ALPN `h2` and `http/1.1`, on the crypto
//! provider the rest of the binary uses (aws-lc-rs).
//!
//! The files are read again every [`RELOAD_EVERY`]: when their content changes (cert-manager
//! renewing a Secret, which Kubernetes swaps into the volume with an atomic symlink change), the
//! new pair is checked (parses, the key matches the certificate) and used for new connections;
//! established ones keep theirs. A pair that fails the check keeps the old one serving, and the
//! reason is logged and shown in `/status`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Serialize;

use crate::metrics::Metrics;

/// How often the certificate files are read again.
pub const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// One certificate's PEM files: the chain (leaf first) and its private key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertFiles {
    /// Certificate chain, PEM.
    pub cert: PathBuf,
    /// Private key (PKCS#8, PKCS#1 or SEC1), PEM.
    pub key: PathBuf,
}

/// A loaded certificate.
#[derive(Clone)]
struct Loaded {
    key: Arc<CertifiedKey>,
    /// DNS names it is valid for (lower case; `*.example.com` for a wildcard).
    names: Vec<String>,
    /// Expiry, Unix seconds.
    not_after: i64,
    /// Content of the files it came from, to notice changes.
    digest: u64,
}

impl Loaded {
    /// Whether a name of this certificate is `sni` exactly.
    fn names_exactly(&self, sni: &str) -> bool {
        self.names.iter().any(|n| n.eq_ignore_ascii_case(sni))
    }

    /// Whether a wildcard of this certificate covers `sni` (one label).
    fn covers(&self, sni: &str) -> bool {
        self.names.iter().any(|n| {
            n.strip_prefix("*.").is_some_and(|parent| {
                sni.split_once('.').is_some_and(|(label, rest)| {
                    !label.is_empty() && rest.eq_ignore_ascii_case(parent)
                })
            })
        })
    }
}

/// What `/status` says about one certificate.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CertStatus {
    /// The certificate file.
    pub cert: String,
    /// Names it serves.
    pub names: Vec<String>,
    /// Expiry (RFC 3339).
    pub not_after: String,
    /// Why the files' current content is not in use (the previous certificate still is).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The certificates in use, swapped as files change. Cheap to clone.
#[derive(Clone)]
pub struct Certs {
    inner: Arc<Inner>,
}

struct Inner {
    files: Vec<CertFiles>,
    loaded: ArcSwap<Vec<Loaded>>,
    /// Per pair: the digest that last failed and why.
    failed: Mutex<Vec<Option<(u64, String)>>>,
    /// Per pair: content that failed once (see `reload`).
    suspect: Mutex<Vec<Option<u64>>>,
    provider: Arc<CryptoProvider>,
}

/// Why a certificate could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CertError(String);

impl Certs {
    /// Loads every pair; fails naming the first that does not load (at startup a bad
    /// certificate is a configuration error, not something to serve without).
    pub fn load(files: Vec<CertFiles>) -> Result<Self, CertError> {
        if files.is_empty() {
            return Err(CertError("no certificate given".into()));
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut loaded = Vec::with_capacity(files.len());
        for f in &files {
            let (cert, key, digest) = read(f).map_err(CertError)?;
            loaded.push(
                parse(&provider, &cert, &key, digest)
                    .map_err(|e| CertError(format!("{}: {e}", f.cert.display())))?,
            );
        }
        Ok(Self {
            inner: Arc::new(Inner {
                failed: Mutex::new(vec![None; files.len()]),
                suspect: Mutex::new(vec![None; files.len()]),
                files,
                loaded: ArcSwap::from_pointee(loaded),
                provider,
            }),
        })
    }

    /// The rustls configuration serving these certificates.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, CertError> {
        let mut cfg = ServerConfig::builder_with_provider(self.inner.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| CertError(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(self.clone()));
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }

    /// Reads the files again; a pair whose content changed and loads is used from now on.
    /// Returns whether anything changed.
    pub fn reload(&self) -> bool {
        let inner = &self.inner;
        let current = inner.loaded.load();
        let mut next: Option<Vec<Loaded>> = None;
        let mut failed = inner.failed.lock().unwrap_or_else(|p| p.into_inner());
        let mut suspect = inner.suspect.lock().unwrap_or_else(|p| p.into_inner());
        for (i, f) in inner.files.iter().enumerate() {
            let (cert, key, digest) = match read(f) {
                Ok(x) => x,
                Err(e) => {
                    // A file missing or unreadable (mid-swap, a Secret gone): said once.
                    if failed[i].as_ref().is_none_or(|(_, said)| *said != e) {
                        tracing::error!(cert = %f.cert.display(), error = %e, "cannot read the certificate files; the loaded certificate keeps serving");
                        failed[i] = Some((0, e));
                    }
                    continue;
                }
            };
            if digest == current[i].digest {
                failed[i] = None; // Back to the content in use.
                continue;
            }
            if failed[i].as_ref().is_some_and(|(d, _)| *d == digest) {
                continue; // Already refused and said.
            }
            match parse(&inner.provider, &cert, &key, digest) {
                Ok(l) => {
                    tracing::info!(cert = %f.cert.display(), names = ?l.names, not_after = %rfc3339(l.not_after), "certificate reloaded");
                    failed[i] = None;
                    suspect[i] = None;
                    next.get_or_insert_with(|| current.to_vec())[i] = l;
                }
                // A writer that replaces the two files one after the other can be read in
                // between (a new certificate, the old key): only content that fails twice in a
                // row, RELOAD_EVERY apart, is refused and said.
                Err(_) if suspect[i] != Some(digest) => suspect[i] = Some(digest),
                Err(e) => {
                    tracing::error!(cert = %f.cert.display(), error = %e, "new certificate not loaded; the previous one keeps serving");
                    failed[i] = Some((digest, e));
                }
            }
        }
        match next {
            Some(n) => {
                inner.loaded.store(Arc::new(n));
                true
            }
            None => false,
        }
    }

    /// Each certificate as `/status` shows it.
    pub fn status(&self) -> Vec<CertStatus> {
        let loaded = self.inner.loaded.load();
        let failed = self.inner.failed.lock().unwrap_or_else(|p| p.into_inner());
        self.inner
            .files
            .iter()
            .zip(loaded.iter())
            .zip(failed.iter())
            .map(|((f, l), e)| CertStatus {
                cert: f.cert.display().to_string(),
                names: l.names.clone(),
                not_after: rfc3339(l.not_after),
                error: e.as_ref().map(|(_, e)| e.clone()),
            })
            .collect()
    }

    /// Sets the expiry gauges.
    pub fn export(&self, metrics: &Metrics) {
        for (f, l) in self.inner.files.iter().zip(self.inner.loaded.load().iter()) {
            metrics
                .tls_cert_expiry
                .with_label_values(&[&f.cert.display().to_string()])
                .set(l.not_after as f64);
        }
    }

    /// Reloads every [`RELOAD_EVERY`] and keeps the expiry gauges current, for as long as the
    /// task runs.
    pub fn watch(&self, metrics: Metrics) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        this.export(&metrics);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RELOAD_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let me = this.clone();
                // File reads and parsing off the async threads.
                if let Ok(true) = tokio::task::spawn_blocking(move || me.reload()).await {
                    this.export(&metrics);
                }
            }
        })
    }
}

impl std::fmt::Debug for Certs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certs")
            .field("files", &self.inner.files)
            .finish()
    }
}

impl ResolvesServerCert for Certs {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let loaded = self.inner.loaded.load();
        // An exact name first, then a wildcard, then the default (as nginx does): a wildcard
        // listed before an exact certificate does not hide it.
        hello
            .server_name()
            .and_then(|sni| {
                loaded
                    .iter()
                    .find(|l| l.names_exactly(sni))
                    .or_else(|| loaded.iter().find(|l| l.covers(sni)))
            })
            .or_else(|| loaded.first())
            .map(|l| l.key.clone())
    }
}

/// Both files' bytes and a digest of them.
fn read(f: &CertFiles) -> Result<(Vec<u8>, Vec<u8>, u64), String> {
    let cert = std::fs::read(&f.cert).map_err(|e| format!("{}: {e}", f.cert.display()))?;
    let key = std::fs::read(&f.key).map_err(|e| format!("{}: {e}", f.key.display()))?;
    let digest = {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let h = BuildHasherDefault::<DefaultHasher>::default();
        h.hash_one((&cert, &key))
    };
    Ok((cert, key, digest))
}

/// A certificate chain and key from PEM, checked: at least one certificate, a key rustls can
/// sign with, the key matching the leaf.
fn parse(
    provider: &CryptoProvider,
    cert: &[u8],
    key: &[u8],
    digest: u64,
) -> Result<Loaded, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("certificate PEM: {e}"))?;
    let Some(leaf) = chain.first() else {
        return Err("no certificate in the file".into());
    };
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| format!("private key PEM: {e}"))?;
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("private key: {e}"))?;
    let (_, x509) =
        x509_parser::parse_x509_certificate(leaf).map_err(|e| format!("certificate: {e}"))?;
    let not_after = x509.validity().not_after.timestamp();
    let not_before = x509.validity().not_before.timestamp();
    let mut names: Vec<String> = x509
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => {
                        Some(d.to_ascii_lowercase())
                    }
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    if names.is_empty() {
        // No SAN: the subject's common name, as old certificates carry it.
        names.extend(
            x509.subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok())
                .map(str::to_ascii_lowercase),
        );
    }
    let now = jiff::Timestamp::now().as_second();
    if now >= not_after {
        return Err(format!("the certificate expired at {}", rfc3339(not_after)));
    }
    if now < not_before {
        return Err(format!(
            "the certificate is not valid before {}",
            rfc3339(not_before)
        ));
    }
    let key = CertifiedKey::new(chain, signing);
    key.keys_match()
        .map_err(|e| format!("the private key does not match the certificate: {e}"))?;
    Ok(Loaded {
        key: Arc::new(key),
        names,
        not_after,
        digest,
    })
}

/// Unix seconds as RFC 3339 (UTC).
fn rfc3339(secs: i64) -> String {
    jiff::Timestamp::from_second(secs).map_or_else(|_| secs.to_string(), |t| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::rfc3339;

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
