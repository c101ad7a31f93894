//! Loading certificates and keys into rustls configs (proxy termination, upstream TLS, peers),
//! and the terminated client connection (`conn`).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

mod conn;
pub use crate::net::Transport;
pub use conn::TlsConn;

/// Why TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: bad PEM: {source}", path.display())]
    Pem {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: no certificate found (expected PEM)", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: no private key found (expected PEM)", path.display())]
    NoKey { path: PathBuf },
    #[error("certificate and key do not match or are unusable: {0}")]
    Unusable(#[source] rustls::Error),
    #[error("unusable CA certificate: {0}")]
    Ca(#[source] rustls::Error),
    #[error("cannot verify client certificates with this CA: {0}")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Read every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let data = read(path)?;
    let certs = rustls_pemfile::certs(&mut data.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// Read the first private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let data = read(path)?;
    rustls_pemfile::private_key(&mut data.as_slice())
        .map_err(|source| TlsError::Pem {
            path: path.to_path_buf(),
            source,
        })?
        .ok_or_else(|| TlsError::NoKey {
            path: path.to_path_buf(),
        })
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// TLS termination for the proxy listeners: two configs over one certificate, one session cache
/// and one ALPN list (h2, http/1.1), told apart by the cipher suite order they follow.
///
/// Shoal prefers AES-128-GCM with SHA-256 over the client's usual first choice, AES-256-GCM with
/// SHA-384 (OpenSSL's order, which nginx and HAProxy follow): both are strong, but a handshake
/// hashes its transcript and derives its keys with the suite's hash, and SHA-256 runs on the
/// CPU's SHA instructions where SHA-384 has none (measured with ring on AMD CPUs: SHA-384 was
/// 12 % of a resumed handshake's CPU). A client that puts ChaCha20 first (one without AES
/// instructions, typically) gets its own order, as BoringSSL and Go servers do.
///
/// TLS 1.3 sessions resume through stateless tickets (two per handshake, as OpenSSL sends them),
/// sealed by a key this process makes and rotates (`Ticketer`), so resumption needs no cache
/// and survives any number of clients. (nginx 1.22 by default resumes TLS 1.2 sessions instead:
/// TLS 1.3 is off there before 1.23.4.)
pub struct Termination {
    /// The server's order: AES-128-GCM first.
    ours: Arc<rustls::ServerConfig>,
    /// The client's order (same certificate, cache and ALPN).
    theirs: Arc<rustls::ServerConfig>,
}

impl Termination {
    /// The config for a connection whose ClientHello offers `suites`, in the client's order.
    fn config_for(&self, suites: &[rustls::CipherSuite]) -> Arc<rustls::ServerConfig> {
        let first = suites.iter().find(|s| {
            self.ours
                .crypto_provider()
                .cipher_suites
                .iter()
                .any(|ours| ours.suite() == **s)
        });
        let chacha = first.is_some_and(|s| {
            matches!(
                s,
                rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
                    | rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
                    | rustls::CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256
            )
        });
        if chacha {
            self.theirs.clone()
        } else {
            self.ours.clone()
        }
    }

    /// The TLS handshake on an accepted connection, with the config its ClientHello calls for.
    pub async fn accept<IO: Transport>(&self, io: IO) -> io::Result<TlsConn<IO>> {
        conn::accept(io, |hello| self.config_for(hello.cipher_suites())).await
    }
}

/// The suites of `provider` in termination order: TLS 1.3 then 1.2, each AES-128-GCM first,
/// then AES-256-GCM, then ChaCha20 (a stable sort keeps the provider's order within a rank).
fn termination_order(
    mut provider: rustls::crypto::CryptoProvider,
) -> rustls::crypto::CryptoProvider {
    use rustls::CipherSuite as S;
    provider.cipher_suites.sort_by_key(|s| {
        let tls12 = matches!(s, rustls::SupportedCipherSuite::Tls12(_));
        let rank = match s.suite() {
            S::TLS13_AES_128_GCM_SHA256
            | S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            | S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 0,
            S::TLS13_AES_256_GCM_SHA384
            | S::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
            | S::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => 1,
            _ => 2,
        };
        (tls12, rank)
    });
    provider
}

/// The proxy's TLS termination, offering h2 and http/1.1 by ALPN.
pub fn load_termination(cert: &Path, key: &Path) -> Result<Arc<Termination>, TlsError> {
    let certs = load_certs(cert)?;
    let key = load_key(key)?;
    let provider = termination_order(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Unusable)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(TlsError::Unusable)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    cfg.ignore_client_order = true;
    cfg.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().map_err(TlsError::Unusable)?;
    let mut theirs = cfg.clone();
    theirs.ignore_client_order = false;
    Ok(Arc::new(Termination {
        ours: Arc::new(cfg),
        theirs: Arc::new(theirs),
    }))
}

/// A client config for upstream TLS: the system's roots (and `SSL_CERT_FILE` if set), offering
/// ALPN http/1.1 (clone it and change `alpn_protocols` for h2).
pub fn upstream_client_config() -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(c);
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Unusable)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Mutual TLS between peers: a server config that requires a client certificate from `ca`, and
/// a client config that presents `cert`, both trusting only `ca`.
pub fn load_mutual(
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<(rustls::ServerConfig, rustls::ClientConfig), TlsError> {
    let provider = provider();
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(ca)? {
        roots.add(c).map_err(TlsError::Ca)?;
    }
    let roots = Arc::new(roots);
    let certs = load_certs(cert)?;
    let key = load_key(key)?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots.clone(),
        provider.clone(),
    )
    .build()
    .map_err(TlsError::Verifier)?;
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Unusable)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs.clone(), key.clone_key())
        .map_err(TlsError::Unusable)?;
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Unusable)?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(TlsError::Unusable)?;
    Ok((server, client))
}
