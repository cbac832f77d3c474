//! TLS trust for the key managers sealfs talks to over HTTPS (Transit, a KBS): a PEM CA
//! bundle given by the operator, or the system roots; rustls with aws-lc-rs, as the AWS
//! SDK uses. Errors are one line naming the file; the caller adds which variable named it.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;

/// The most a PEM bundle may hold.
pub const MAX_PEM: usize = 1 << 20;

/// The certificates of a PEM file (at most [`MAX_PEM`] bytes, at least one certificate).
pub fn pem_certs(what: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let bytes = crate::localfile::read_bounded(path, MAX_PEM, &format!("a {what}"), false)
        .map_err(|r| format!("{what} {}: {r}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{what} {}: no PEM certificate in it",
            path.display()
        ));
    }
    Ok(certs)
}

/// The roots to verify a server with: the bundle at `ca` only, or the system's.
pub fn roots(ca: Option<&Path>) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(p) => {
            for c in pem_certs("CA certificate file", p)? {
                roots
                    .add(c)
                    .map_err(|e| format!("CA certificate file {}: {e}", p.display()))?;
            }
        }
        None => {
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        }
    }
    Ok(roots)
}

/// A client configuration builder trusting `roots` (safe default protocol versions).
pub fn client(
    roots: rustls::RootCertStore,
) -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>, String> {
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS: {e}"))?
    .with_root_certificates(roots))
}
