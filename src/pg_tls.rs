//! TLS to PostgreSQL, with libpq's settings: `sslmode` (`disable`, `prefer`, `require`,
//! `verify-ca`, `verify-full`) and `sslrootcert` (a CA file, or `system` for the operating
//! system's CA bundle), in the URL or as `PGSSLMODE` / `PGSSLROOTCERT`.
//!
//! They are read here once and applied to both kinds of connection quill opens, the query
//! pool (sqlx) and the LISTEN session (tokio-postgres, which knows neither `verify-*` nor
//! certificate files), the way libpq reads them: `prefer` and `require` encrypt without
//! checking the certificate, unless a root certificate is given, which makes `require` act
//! as `verify-ca`; `verify-ca` checks the chain, `verify-full` the host name too, and both
//! need a root certificate; `sslrootcert=system` means the system's CA bundle and
//! `verify-full`.

use std::str::FromStr;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sqlx::postgres::{PgConnectOptions, PgSslMode};
use tokio_postgres_rustls::MakeRustlsConnect;

/// Where libpq's `sslrootcert=system` looks (OpenSSL's default bundle on each platform).
const SYSTEM_BUNDLES: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
    "/usr/local/etc/openssl/cert.pem",
];

/// Why a database URL's TLS settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("invalid database URL: {0}")]
    Url(String),
    #[error("sslmode '{0}' is not one of disable, allow, prefer, require, verify-ca, verify-full")]
    Mode(String),
    #[error("sslmode={0} needs sslrootcert: a CA file, or 'system' for the system's CA bundle")]
    NoRootCert(&'static str),
    #[error("sslrootcert=system needs sslmode=verify-full (or no sslmode)")]
    SystemNeedsVerifyFull,
    #[error("sslrootcert=system: no CA bundle found (looked in {0})")]
    NoSystemBundle(String),
    #[error("cannot read sslrootcert {path}: {reason}")]
    RootCert { path: String, reason: String },
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
}

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(text: &str) -> Result<Self, TlsError> {
        Ok(match text {
            "disable" => SslMode::Disable,
            // `allow` tries plain text first; encrypting when offered is no worse.
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => return Err(TlsError::Mode(other.to_owned())),
        })
    }
}

/// A database URL's TLS settings, as libpq would apply them.
#[derive(Debug, Clone)]
pub struct DbTls {
    /// The URL without `sslmode`, `sslrootcert`, `sslcert` and `sslkey`.
    url: String,
    mode: SslMode,
    root_cert: Option<String>,
}

impl DbTls {
    /// Reads the settings of a database URL (and the `PGSSL…` environment).
    pub fn from_url(database_url: &str) -> Result<DbTls, TlsError> {
        let (base, query) = database_url.split_once('?').unwrap_or((database_url, ""));
        let mut mode = None;
        let mut root_cert = None;
        let mut kept = form_urlencoded::Serializer::new(String::new());
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            match key.as_ref() {
                "sslmode" => mode = Some(SslMode::parse(&value)?),
                "sslrootcert" => root_cert = Some(value.into_owned()),
                // Client certificates are not supported.
                "sslcert" | "sslkey" => {}
                _ => {
                    kept.append_pair(&key, &value);
                }
            }
        }
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let mode = match mode {
            Some(mode) => Some(mode),
            None => env("PGSSLMODE").map(|m| SslMode::parse(&m)).transpose()?,
        };
        let root_cert = root_cert.or_else(|| env("PGSSLROOTCERT"));
        let (mode, root_cert) = match (mode, root_cert) {
            (None | Some(SslMode::VerifyFull), Some(root)) if root == "system" => {
                (SslMode::VerifyFull, Some(system_bundle()?))
            }
            (Some(_), Some(root)) if root == "system" => return Err(TlsError::SystemNeedsVerifyFull),
            // A root certificate makes `require` check the chain, as libpq does.
            (Some(SslMode::Require), Some(root)) => (SslMode::VerifyCa, Some(root)),
            (Some(SslMode::VerifyCa), None) => return Err(TlsError::NoRootCert("verify-ca")),
            (Some(SslMode::VerifyFull), None) => return Err(TlsError::NoRootCert("verify-full")),
            (mode, root) => (mode.unwrap_or(SslMode::Prefer), root),
        };
        let kept = kept.finish();
        let url = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{kept}")
        };
        Ok(DbTls { url, mode, root_cert })
    }

    pub fn mode(&self) -> SslMode {
        self.mode
    }

    /// The query pool's connect options.
    pub fn pool_options(&self) -> Result<PgConnectOptions, TlsError> {
        let options = PgConnectOptions::from_str(&self.url).map_err(|e| TlsError::Url(e.to_string()))?;
        let options = options.ssl_mode(match self.mode {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Prefer => PgSslMode::Prefer,
            SslMode::Require => PgSslMode::Require,
            SslMode::VerifyCa => PgSslMode::VerifyCa,
            SslMode::VerifyFull => PgSslMode::VerifyFull,
        });
        Ok(match &self.root_cert {
            Some(path) => options.ssl_root_cert(path.as_str()),
            None => options,
        })
    }

    /// The LISTEN connection's config and TLS connector.
    pub fn listener(&self) -> Result<(tokio_postgres::Config, MakeRustlsConnect), TlsError> {
        let mut config = tokio_postgres::Config::from_str(&self.url).map_err(|e| TlsError::Url(e.to_string()))?;
        config.ssl_mode(match self.mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        let tls = client_config(self.mode, self.root_cert.as_deref())?;
        Ok((config, MakeRustlsConnect::new(tls)))
    }
}

/// The LISTEN connection's config and TLS connector for a database URL.
pub fn listener_config(database_url: &str) -> Result<(tokio_postgres::Config, MakeRustlsConnect), TlsError> {
    DbTls::from_url(database_url)?.listener()
}

fn system_bundle() -> Result<String, TlsError> {
    SYSTEM_BUNDLES
        .iter()
        .find(|p| std::path::Path::new(p).is_file())
        .map(|p| (*p).to_owned())
        .ok_or_else(|| TlsError::NoSystemBundle(SYSTEM_BUNDLES.join(", ")))
}

fn client_config(mode: SslMode, root_cert: Option<&str>) -> Result<ClientConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
    let verifier: Arc<dyn ServerCertVerifier> = match (mode, root_cert) {
        (SslMode::VerifyCa | SslMode::VerifyFull, Some(path)) => {
            let roots = Arc::new(roots(path)?);
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
            if mode == SslMode::VerifyFull {
                webpki
            } else {
                Arc::new(AnyName(webpki))
            }
        }
        (SslMode::VerifyCa, None) => return Err(TlsError::NoRootCert("verify-ca")),
        (SslMode::VerifyFull, None) => return Err(TlsError::NoRootCert("verify-full")),
        _ => Arc::new(Unverified(provider)),
    };
    Ok(builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// The certificates of a root certificate file.
fn roots(path: &str) -> Result<RootCertStore, TlsError> {
    let failed = |reason: String| TlsError::RootCert {
        path: path.to_owned(),
        reason,
    };
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path).map_err(|e| failed(e.to_string()))?;
    // A bundle may hold certificates webpki cannot use; the others still count.
    for cert in certs.flatten() {
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(failed("no usable certificate in the file".into()));
    }
    Ok(roots)
}

/// `prefer` and `require`: encrypted, not authenticated (libpq's behaviour without a root
/// certificate). Signatures are still checked, so the handshake itself is sound.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to a root, whatever name the certificate carries.
#[derive(Debug)]
struct AnyName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForNameContext { .. })) => {
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_settings_are_read_and_removed_from_what_tokio_postgres_sees() {
        let (config, _) =
            listener_config("postgres://u@db.example:5432/app?sslmode=require&application_name=x").expect("config");
        assert_eq!(config.get_ssl_mode(), tokio_postgres::config::SslMode::Require);
        assert_eq!(config.get_application_name(), Some("x"));
        let (config, _) = listener_config("postgres://u@localhost/app?sslmode=disable").expect("config");
        assert_eq!(config.get_ssl_mode(), tokio_postgres::config::SslMode::Disable);
        assert!(matches!(
            listener_config("postgres://u@localhost/app?sslmode=sometimes"),
            Err(TlsError::Mode(_))
        ));
        assert!(matches!(
            listener_config("postgres://u@localhost/app?sslmode=verify-full&sslrootcert=/nonexistent.pem"),
            Err(TlsError::RootCert { .. })
        ));
    }

    #[test]
    fn modes_resolve_as_libpq_resolves_them() {
        let mode = |url: &str| DbTls::from_url(url).map(|t| (t.mode(), t.root_cert.clone()));
        assert_eq!(
            mode("postgres://h/db?sslmode=require&sslrootcert=/ca.pem").expect("ok"),
            (SslMode::VerifyCa, Some("/ca.pem".into())),
            "a root certificate makes require check the chain"
        );
        assert!(matches!(
            mode("postgres://h/db?sslmode=verify-ca"),
            Err(TlsError::NoRootCert(_))
        ));
        assert!(matches!(
            mode("postgres://h/db?sslmode=verify-full"),
            Err(TlsError::NoRootCert(_))
        ));
        assert!(matches!(
            mode("postgres://h/db?sslmode=require&sslrootcert=system"),
            Err(TlsError::SystemNeedsVerifyFull)
        ));
        if let Ok((mode, root)) = mode("postgres://h/db?sslrootcert=system") {
            assert_eq!(mode, SslMode::VerifyFull);
            assert!(root.is_some_and(|r| SYSTEM_BUNDLES.contains(&r.as_str())));
        }
        let t = DbTls::from_url("postgres://h/db?sslmode=disable&application_name=x").expect("ok");
        assert_eq!(t.url, "postgres://h/db?application_name=x");
    }
}
