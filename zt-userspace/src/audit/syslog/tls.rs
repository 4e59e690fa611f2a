//! RFC 5425, syslog over TLS: the client side the forwarder uses, with
//! rustls and its `ring` provider (no system library and no build tool
//! beyond a C compiler).
//!
//! The files are read and checked when the config is, so that `ztxdp
//! check` and `up` refuse a missing, unreadable or non-PEM file before
//! anything is attached, rather than the forwarder finding out at its first
//! connection while the trail is already being written. Every connection
//! then uses the one client configuration built here.

use std::{
    fmt,
    io::{self, Read as _},
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{
    ClientConfig, ClientConnection, RootCertStore,
    pki_types::{
        CertificateDer, PrivateKeyDer, ServerName,
        pem::{self, PemObject},
    },
};
use sha2::{Digest as _, Sha256};

/// The largest PEM file read. The whole Mozilla CA bundle is about 220 KB;
/// the bound keeps a wrong path (`/dev/zero`) from filling memory.
const MAX_PEM_BYTES: u64 = 4 << 20;

/// The crypto provider: ring, which builds with a C compiler alone.
#[expect(
    deprecated,
    reason = "rustls deprecates ring's provider for lacking post-quantum key \
              exchange; aws-lc-rs has it, at the cost of a much larger C build"
)]
fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// Why a TLS file or setting was refused; the config names the key.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is larger than {MAX_PEM_BYTES} bytes, too large for a PEM file", path.display())]
    TooLarge { path: PathBuf },
    #[error("{} is not PEM: {problem}", path.display())]
    Pem { path: PathBuf, problem: PemProblem },
    #[error(
        "{} holds no certificate; expected PEM (-----BEGIN CERTIFICATE-----)",
        path.display()
    )]
    NoCertificate { path: PathBuf },
    #[error("{}: certificate {index} (from 0) cannot be a trust anchor: {source}", path.display())]
    Anchor {
        path: PathBuf,
        index: usize,
        #[source]
        source: rustls::Error,
    },
    #[error(
        "{} holds no private key; expected PEM (-----BEGIN PRIVATE KEY-----, \
         RSA PRIVATE KEY or EC PRIVATE KEY)",
        path.display()
    )]
    NoKey { path: PathBuf },
    #[error("{} does not go with the client certificate: {source}", path.display())]
    ClientKey {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    /// The crypto provider lacks what the safe defaults need (a build
    /// without TLS 1.2 or 1.3).
    #[error("the TLS provider cannot make a client configuration: {source}")]
    Provider {
        #[source]
        source: rustls::Error,
    },
    #[error("\"{name}\" is neither a DNS name nor an IP address")]
    ServerName { name: String },
}

/// What is wrong with a file that should be PEM.
#[derive(Debug)]
pub enum PemProblem {
    /// A `-----BEGIN` line without its `-----END`.
    Unterminated,
    /// A malformed `-----BEGIN` line.
    BadStart,
    Base64(String),
    Other(String),
}

impl fmt::Display for PemProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unterminated => f.write_str("a section has no -----END line"),
            Self::BadStart => f.write_str("a -----BEGIN line is malformed"),
            Self::Base64(e) => write!(f, "a section is not valid base64 ({e})"),
            Self::Other(e) => f.write_str(e),
        }
    }
}

impl From<pem::Error> for PemProblem {
    fn from(e: pem::Error) -> Self {
        match e {
            pem::Error::MissingSectionEnd { .. } => Self::Unterminated,
            pem::Error::IllegalSectionStart { .. } => Self::BadStart,
            pem::Error::Base64Decode(e) => Self::Base64(e),
            other => Self::Other(other.to_string()),
        }
    }
}

/// Reads `path` whole, refusing more than [`MAX_PEM_BYTES`].
fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    let failed = |source| TlsError::Read {
        path: path.to_owned(),
        source,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_PEM_BYTES + 1).read_to_end(&mut bytes))
        .map_err(failed)?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(TlsError::TooLarge {
            path: path.to_owned(),
        });
    }
    Ok(bytes)
}

/// Every certificate of the PEM file at `path`, in order; at least one.
///
/// # Errors
/// When the file cannot be read, is not PEM, or holds no certificate.
pub fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(&read(path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            problem: e.into(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The first private key of the PEM file at `path`.
///
/// # Errors
/// When the file cannot be read, is not PEM, or holds no key.
pub fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(&read(path)?).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::NoKey {
            path: path.to_owned(),
        },
        e => TlsError::Pem {
            path: path.to_owned(),
            problem: e.into(),
        },
    })
}

/// The name the collector's certificate must carry: a DNS name, or an IP
/// address (`[::1]` as in an address, or bare).
///
/// # Errors
/// When `name` is neither.
pub fn server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    let bare = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name);
    ServerName::try_from(bare.to_owned()).map_err(|_| TlsError::ServerName {
        name: name.to_owned(),
    })
}

/// The client's own certificate, for a collector that asks for one.
pub struct ClientIdentity {
    pub cert_file: PathBuf,
    pub chain: Vec<CertificateDer<'static>>,
    pub key_file: PathBuf,
    pub key: PrivateKeyDer<'static>,
}

/// `audit.syslog.tls = true` and its files, read and checked.
#[derive(Clone)]
pub struct SyslogTls {
    /// `audit.syslog.ca_file`: the collector's certificate must chain to one of these.
    pub ca_file: PathBuf,
    /// `audit.syslog.cert_file` and `key_file`.
    pub client_files: Option<(PathBuf, PathBuf)>,
    /// `audit.syslog.server_name`, else the host of the address.
    pub server_name: ServerName<'static>,
    /// SHA-256 over what the files held: the running forwarder keeps
    /// using what it read at start, so a reload must see a changed file as
    /// a change of `[audit]` (which needs a restart), not as the same config.
    contents: [u8; 32],
    config: Arc<ClientConfig>,
}

impl SyslogTls {
    /// The client configuration: the anchors of `ca_file`, TLS 1.3 and 1.2
    /// with rustls' safe defaults, and `identity` when given.
    ///
    /// # Errors
    /// [`TlsError::Anchor`] when a CA certificate cannot be parsed as one,
    /// [`TlsError::ClientKey`] when the key does not match the certificate
    /// (or is of a kind the provider does not support), [`TlsError::Provider`]
    /// when the provider lacks the safe defaults' protocol versions.
    pub fn new(
        ca_file: PathBuf,
        anchors: Vec<CertificateDer<'static>>,
        identity: Option<ClientIdentity>,
        server_name: ServerName<'static>,
    ) -> Result<Self, TlsError> {
        let mut hash = Sha256::new();
        let mut roots = RootCertStore::empty();
        for (index, der) in anchors.into_iter().enumerate() {
            hash.update(&der);
            roots.add(der).map_err(|source| TlsError::Anchor {
                path: ca_file.clone(),
                index,
                source,
            })?;
        }
        // TLS 1.2 (which RFC 5425 requires) and 1.3, rustls' safe defaults.
        let builder = ClientConfig::builder_with_provider(Arc::new(provider()))
            .with_safe_default_protocol_versions()
            .map_err(|source| TlsError::Provider { source })?
            .with_root_certificates(roots);
        let (config, client_files) = match identity {
            None => (builder.with_no_client_auth(), None),
            Some(id) => {
                for der in &id.chain {
                    hash.update(der);
                }
                hash.update(id.key.secret_der());
                let config = builder
                    .with_client_auth_cert(id.chain, id.key)
                    .map_err(|source| TlsError::ClientKey {
                        path: id.key_file.clone(),
                        source,
                    })?;
                (config, Some((id.cert_file, id.key_file)))
            }
        };
        Ok(Self {
            ca_file,
            client_files,
            server_name,
            contents: hash.finalize().into(),
            config: Arc::new(config),
        })
    }

    /// A client session for one connection.
    ///
    /// # Errors
    /// Never with this configuration in practice; rustls' own errors.
    pub fn session(&self) -> Result<ClientConnection, rustls::Error> {
        let mut session =
            ClientConnection::new(Arc::clone(&self.config), self.server_name.clone())?;
        // The forwarder hands over one record at a time and takes its
        // ciphertext at once, so nothing accumulates; a limit would only
        // make a large record fail.
        session.set_buffer_limit(None);
        Ok(session)
    }
}

impl PartialEq for SyslogTls {
    fn eq(&self, other: &Self) -> bool {
        // `config` follows from the rest.
        self.ca_file == other.ca_file
            && self.client_files == other.client_files
            && self.server_name == other.server_name
            && self.contents == other.contents
    }
}

impl Eq for SyslogTls {}

impl fmt::Debug for SyslogTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SyslogTls")
            .field("ca_file", &self.ca_file)
            .field("client_files", &self.client_files)
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    use rustls::{
        ServerConfig,
        server::{WebPkiClientVerifier, danger::ClientCertVerifier},
    };

    use super::*;

    /// A CA made for a test, which signs certificates for collectors and
    /// clients.
    pub(crate) struct TestCa(CertifiedIssuer<'static, KeyPair>);

    impl TestCa {
        pub(crate) fn new(name: &str) -> Self {
            let mut params = CertificateParams::default();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            let key = KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
            Self(CertifiedIssuer::self_signed(params, key).unwrap_or_else(|e| panic!("{e}")))
        }

        pub(crate) fn der(&self) -> CertificateDer<'static> {
            self.0.der().clone()
        }

        pub(crate) fn pem(&self) -> String {
            self.0.pem()
        }

        /// A certificate for `names` (DNS names or IP addresses), and its key.
        pub(crate) fn issue(&self, names: &[&str]) -> (rcgen::Certificate, KeyPair) {
            let names: Vec<String> = names.iter().map(|&n| n.to_owned()).collect();
            let key = KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
            let cert = CertificateParams::new(names)
                .and_then(|p| p.signed_by(&key, &self.0))
                .unwrap_or_else(|e| panic!("{e}"));
            (cert, key)
        }

        /// A collector's configuration: a certificate from this CA for
        /// `names`, no client certificate asked for.
        pub(crate) fn server(&self, names: &[&str]) -> Arc<ServerConfig> {
            self.server_with(names, WebPkiClientVerifier::no_client_auth())
        }

        /// The same, requiring a client certificate from this CA.
        pub(crate) fn server_asking(&self, names: &[&str]) -> Arc<ServerConfig> {
            let mut roots = RootCertStore::empty();
            roots.add(self.der()).unwrap_or_else(|e| panic!("{e}"));
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::new(provider()))
                    .build()
                    .unwrap_or_else(|e| panic!("{e}"));
            self.server_with(names, verifier)
        }

        fn server_with(
            &self,
            names: &[&str],
            clients: Arc<dyn ClientCertVerifier>,
        ) -> Arc<ServerConfig> {
            let (cert, key) = self.issue(names);
            let key =
                PrivateKeyDer::try_from(key.serialize_der()).unwrap_or_else(|e| panic!("{e}"));
            let config = ServerConfig::builder_with_provider(Arc::new(provider()))
                .with_safe_default_protocol_versions()
                .unwrap_or_else(|e| panic!("{e}"))
                .with_client_cert_verifier(clients)
                .with_single_cert(vec![cert.der().clone()], key)
                .unwrap_or_else(|e| panic!("{e}"));
            Arc::new(config)
        }

        /// The forwarder's settings trusting this CA for a collector named `name`.
        pub(crate) fn client(&self, name: &str) -> SyslogTls {
            let server_name = server_name(name).unwrap_or_else(|e| panic!("{e}"));
            SyslogTls::new("ca.pem".into(), vec![self.der()], None, server_name)
                .unwrap_or_else(|e| panic!("{e}"))
        }
    }

    #[test]
    fn changed_contents_are_a_change_of_the_settings() {
        let (a, b) = (TestCa::new("a"), TestCa::new("b"));
        assert_eq!(a.client("127.0.0.1"), a.client("127.0.0.1"));
        assert_ne!(
            a.client("127.0.0.1"),
            b.client("127.0.0.1"),
            "the same path with another CA in it: a reload must not take it as unchanged"
        );
        assert_ne!(a.client("127.0.0.1"), a.client("localhost"));
    }

    #[test]
    fn server_names_are_dns_names_or_addresses() {
        for name in ["collector.example", "127.0.0.1", "::1", "[::1]"] {
            assert!(server_name(name).is_ok(), "{name}");
        }
        for name in ["", "a b", "[::1"] {
            assert!(
                matches!(server_name(name), Err(TlsError::ServerName { .. })),
                "{name}"
            );
        }
    }
}
