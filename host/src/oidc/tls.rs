//! Transport security towards identity providers: which URLs may be fetched without TLS
//! (loopback only) and which certificate authorities an HTTPS IdP may present, beyond the
//! bundled Mozilla roots (`[tls] ca_file`).

use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// Why a URL or a CA file was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsError {
    /// Not an absolute `https://` (or loopback `http://`) URL.
    #[error("must be an https:// URL (http:// only for a loopback host), got {0:?}")]
    Insecure(String),
    /// The CA file could not be read.
    #[error("cannot read CA file {path}: {reason}")]
    Read {
        path: PathBuf,
        /// What reading or parsing it said.
        reason: String,
    },
    /// The CA file holds no usable PEM certificate.
    #[error("CA file {path}: {reason}")]
    Pem {
        path: PathBuf,
        /// What reading or parsing it said.
        reason: String,
    },
}

/// Accepts `https://` URLs, and `http://` only towards a loopback host, where nobody else is
/// on the path: a plain-HTTP issuer lets any network peer swap the keys and forge tokens.
pub fn check_url(url: &str) -> Result<(), TlsError> {
    let insecure = || TlsError::Insecure(url.to_owned());
    let parsed = reqwest::Url::parse(url).map_err(|_| insecure())?;
    match parsed.scheme() {
        "https" if parsed.host_str().is_some() => Ok(()),
        "http" if parsed.host_str().is_some_and(is_loopback) => Ok(()),
        _ => Err(insecure()),
    }
}

fn is_loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => bare.eq_ignore_ascii_case("localhost"),
    }
}

/// Certificate authorities trusted for HTTPS to identity providers besides the bundled ones.
#[derive(Clone, Default)]
pub struct TrustRoots {
    extra: Vec<reqwest::Certificate>,
}

impl std::fmt::Debug for TrustRoots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustRoots")
            .field("extra", &self.extra.len())
            .finish()
    }
}

impl TrustRoots {
    /// The bundled roots, plus every certificate of the PEM file at `ca_file`. Read at start
    /// so a missing or empty file stops the service instead of failing every logout later.
    pub fn load(ca_file: Option<&Path>) -> Result<Self, TlsError> {
        let Some(path) = ca_file else {
            return Ok(TrustRoots::default());
        };
        let pem = std::fs::read(path).map_err(|e| TlsError::Read {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let pem_error = |reason: String| TlsError::Pem {
            path: path.to_owned(),
            reason,
        };
        let extra = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| pem_error(format!("not a PEM bundle: {e}")))?;
        if extra.is_empty() {
            return Err(pem_error("holds no certificate".into()));
        }
        Ok(TrustRoots { extra })
    }

    /// Number of extra authorities.
    pub fn extra_count(&self) -> usize {
        self.extra.len()
    }

    /// A client builder that trusts these roots (and refuses plain HTTP to anything but what
    /// [`check_url`] let through, which the caller checked).
    pub fn apply(&self, builder: reqwest::ClientBuilder) -> reqwest::ClientBuilder {
        self.extra
            .iter()
            .cloned()
            .fold(builder.tls_built_in_root_certs(true), |b, cert| {
                b.add_root_certificate(cert)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_is_accepted_only_towards_loopback() {
        for ok in [
            "https://idp.example.com/realms/acme",
            "https://10.0.0.7:8443/realms/acme",
            "http://127.0.0.1:8180/realms/acme",
            "http://127.3.4.5/realms/acme",
            "http://localhost:8180/realms/acme",
            "http://LOCALHOST/realms/acme",
            "http://[::1]:8180/realms/acme",
        ] {
            assert_eq!(check_url(ok), Ok(()), "{ok}");
        }
        for bad in [
            "http://idp.example.com/realms/acme",
            "http://10.0.0.7:8180/realms/acme",
            "http://localhost.example.com/realms/acme",
            "http://127.0.0.1.nip.io/realms/acme",
            "http://[::ffff:10.0.0.1]/realms/acme",
            "ftp://127.0.0.1/realms/acme",
            "https://",
            "127.0.0.1:8180/realms/acme",
            "",
        ] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_ca_file_must_exist_and_hold_a_certificate() {
        assert_eq!(TrustRoots::load(None).unwrap().extra_count(), 0);
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        assert!(matches!(
            TrustRoots::load(Some(&missing)),
            Err(TlsError::Read { .. })
        ));
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no certificates here\n").unwrap();
        assert!(matches!(
            TrustRoots::load(Some(&empty)),
            Err(TlsError::Pem { .. })
        ));
        let ca = rcgen::generate_simple_self_signed(vec!["ca.test".into()]).unwrap();
        let good = dir.path().join("ca.pem");
        std::fs::write(&good, ca.cert.pem()).unwrap();
        assert_eq!(TrustRoots::load(Some(&good)).unwrap().extra_count(), 1);
    }
}
