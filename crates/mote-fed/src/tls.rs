//! TLS for the federation protocol (rustls with the `ring` provider, through tonic).
//!
//! A coordinator serves TLS by default. Without a configured certificate it makes a
//! self-signed one on first start (`<state_dir>/tls/cert.pem` and `key.pem`, the key
//! readable by its owner only) and keeps it across restarts, so clients pinned to it with
//! `--ca` keep working. Its SHA-256 fingerprint is printed for out-of-band checks.
//! Clients verify the coordinator against the CA they are given; they never fall back to
//! an unverified connection.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::error::{FedError, Result};

/// Largest certificate or key file read.
const MAX_PEM_BYTES: u64 = 1 << 20;

/// A server identity: certificate chain and private key, PEM.
#[derive(Clone)]
pub struct ServerIdentity {
    /// Certificate (chain), PEM.
    pub cert_pem: Vec<u8>,
    /// Private key, PEM.
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for ServerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerIdentity")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

fn tls_err(why: impl Into<String>) -> FedError {
    FedError::Config(why.into())
}

/// Read a PEM file with a size limit.
pub fn read_pem(path: &Path) -> Result<Vec<u8>> {
    let io = |e| FedError::Io {
        what: "cannot read",
        path: path.to_path_buf(),
        source: e,
    };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > MAX_PEM_BYTES {
        return Err(tls_err(format!(
            "{} is larger than 1 MiB; is it a PEM certificate or key?",
            path.display()
        )));
    }
    let bytes = std::fs::read(path).map_err(io)?;
    if !bytes.starts_with(b"-----BEGIN") {
        return Err(tls_err(format!(
            "{} is not PEM (it should start with -----BEGIN)",
            path.display()
        )));
    }
    Ok(bytes)
}

impl ServerIdentity {
    /// A fresh self-signed certificate for `names` (DNS names or IP addresses).
    pub fn self_signed(names: &[String]) -> Result<ServerIdentity> {
        let c = rcgen::generate_simple_self_signed(names.to_vec())
            .map_err(|e| tls_err(format!("cannot make a self-signed certificate: {e}")))?;
        Ok(ServerIdentity {
            cert_pem: c.cert.pem().into_bytes(),
            key_pem: c.signing_key.serialize_pem().into_bytes(),
        })
    }

    /// The identity in `dir` (`cert.pem`, `key.pem`), made and saved there on first use.
    /// Returns it and the certificate's path.
    pub fn load_or_create(dir: &Path, names: &[String]) -> Result<(ServerIdentity, PathBuf)> {
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        if cert.exists() && key.exists() {
            return Ok((
                ServerIdentity {
                    cert_pem: read_pem(&cert)?,
                    key_pem: read_pem(&key)?,
                },
                cert,
            ));
        }
        let id = ServerIdentity::self_signed(names)?;
        // Key first, owner-only, so a half-made pair never has a certificate without a key.
        crate::coordinator::write_atomic(&key, &id.key_pem)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).map_err(
                |e| FedError::Io {
                    what: "cannot restrict the permissions of",
                    path: key.clone(),
                    source: e,
                },
            )?;
        }
        crate::coordinator::write_atomic(&cert, &id.cert_pem)?;
        Ok((id, cert))
    }

    /// SHA-256 of the first certificate's DER bytes, as `sha256:hex`.
    pub fn fingerprint(&self) -> String {
        let der = pem_der(&self.cert_pem).unwrap_or_default();
        format!("sha256:{}", hex::encode(Sha256::digest(&der)))
    }

    /// tonic's server configuration.
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new().identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
    }
}

/// The DER bytes of the first PEM block.
fn pem_der(pem: &[u8]) -> Option<Vec<u8>> {
    use base64::Engine;
    let text = std::str::from_utf8(pem).ok()?;
    let body: String = text
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .ok()
        .filter(|der| !der.is_empty())
}

/// A client configuration trusting `ca_pem` (the coordinator's certificate or its CA).
pub fn client_config(ca_pem: &[u8]) -> Result<ClientTlsConfig> {
    if pem_der(ca_pem).is_none() {
        return Err(tls_err(
            "the CA file holds no PEM certificate; pass the coordinator's cert.pem",
        ));
    }
    Ok(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_persist_and_have_stable_fingerprints() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let (a, path) = ServerIdentity::load_or_create(dir.path(), &names).unwrap();
        let (b, _) = ServerIdentity::load_or_create(dir.path(), &names).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert!(a.fingerprint().starts_with("sha256:"));
        assert_eq!(std::fs::read(&path).unwrap(), a.cert_pem);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("key.pem"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "key readable by others: {mode:o}");
        }
        let other = ServerIdentity::self_signed(&names).unwrap();
        assert_ne!(other.fingerprint(), a.fingerprint());
        assert!(client_config(b"not pem").is_err());
        std::fs::write(dir.path().join("x.pem"), b"hello").unwrap();
        let e = read_pem(&dir.path().join("x.pem")).unwrap_err().to_string();
        assert!(e.contains("PEM"), "{e}");
    }
}
