//! TLS for the NBD TCP listener (rustls through tokio-rustls, ring crypto).
//!
//! This module owns the server's TLS configuration: the certificate chain and key it
//! presents and, optionally, the CA that client certificates must chain to. NBD over TCP
//! is only ever served with TLS (`NBD_OPT_STARTTLS`, FORCEDTLS mode, see
//! [`super::server`]); unix sockets never use it.
//!
//! Invariants: TLS 1.2 and 1.3 only (the spec's minimum is 1.2); when a client CA is given
//! every client must present a certificate that chains to it, or the handshake fails and
//! the connection is dropped.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// Errors building a [`TlsConfig`].
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("Cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("No PEM {what} found")]
    Pem {
        what: &'static str,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("The certificate chain is empty")]
    NoCertificate,
    #[error("Invalid TLS configuration")]
    Rustls(#[from] rustls::Error),
    #[error("Invalid client CA")]
    ClientVerifier(#[from] rustls::server::VerifierBuilderError),
}

/// The TLS identity of the server and its client-certificate policy. Cheap to clone.
#[derive(Clone)]
pub struct TlsConfig {
    acceptor: TlsAcceptor,
    verifies_clients: bool,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("verifies_clients", &self.verifies_clients)
            .finish_non_exhaustive()
    }
}

impl TlsConfig {
    /// Loads a PEM certificate chain and private key, and optionally a PEM bundle of CAs
    /// that client certificates must chain to (then a client certificate is required).
    pub fn from_pem_files(
        cert_chain: &Path,
        key: &Path,
        client_ca: Option<&Path>,
    ) -> Result<Self, TlsError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| TlsError::Read {
                path: path.to_owned(),
                source,
            })
        };
        let ca = client_ca.map(read).transpose()?;
        Self::from_pem(&read(cert_chain)?, &read(key)?, ca.as_deref())
    }

    /// Like [`TlsConfig::from_pem_files`] with the PEM text in memory.
    pub fn from_pem(
        cert_chain: &[u8],
        key: &[u8],
        client_ca: Option<&[u8]>,
    ) -> Result<Self, TlsError> {
        let certs = parse_certs(cert_chain, "certificate")?;
        if certs.is_empty() {
            return Err(TlsError::NoCertificate);
        }
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|source| TlsError::Pem {
            what: "private key",
            source,
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let builder = match client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in parse_certs(ca, "client CA certificate")? {
                    roots.add(cert)?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let config = builder.with_single_cert(certs, key)?;
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            verifies_clients: client_ca.is_some(),
        })
    }

    /// Whether clients must present a certificate.
    pub fn verifies_clients(&self) -> bool {
        self.verifies_clients
    }

    /// Runs the server side of the TLS handshake on `stream`.
    pub(crate) async fn accept(&self, stream: TcpStream) -> io::Result<TlsStream<TcpStream>> {
        self.acceptor.accept(stream).await
    }
}

fn parse_certs(pem: &[u8], what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem { what, source })
}
