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

/// Whether a server URL carries `user:password@` in its authority: refused by the key
/// clients before the URL is echoed anywhere (it names the server in every error and log
/// line). Checked on the text, so that even a URL that does not parse is never shown.
pub fn has_userinfo(url: &str) -> bool {
    url.split_once("://")
        .map(|(_, rest)| {
            rest.split(['/', '?', '#'])
                .next()
                .unwrap_or("")
                .contains('@')
        })
        .unwrap_or(false)
}

/// The HTTP/1 client both key-manager clients use: `https://` (or plain `http://`, which
/// the callers allow only to loopback), a connect timeout, no Nagle, pooled connections
/// dropped after `idle`. Redirects are never followed (hyper's client does not).
pub fn https_client<B>(
    tls: rustls::ClientConfig,
    connect_timeout: std::time::Duration,
    idle: std::time::Duration,
) -> hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    B,
>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
{
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_timer(hyper_util::rt::TokioTimer::new())
        .pool_idle_timeout(idle)
        .build(https)
}

/// Why an answer's body was not read whole.
pub enum BodyError {
    /// Longer than the caller's bound: hostile, not an outage.
    TooLong,
    /// The connection failed mid-body.
    Transport(String),
}

/// Sends `req` and reads its answer's body (at most `max` bytes, zeroizing): the status,
/// the headers and the body. A failure to send is `Transport`, as one mid-body.
pub async fn round_trip<B>(
    client: &hyper_util::client::legacy::Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        B,
    >,
    req: hyper::Request<B>,
    max: usize,
) -> Result<
    (
        hyper::StatusCode,
        hyper::HeaderMap,
        zeroize::Zeroizing<Vec<u8>>,
    ),
    BodyError,
>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let resp = client
        .request(req)
        .await
        .map_err(|e| BodyError::Transport(crate::error_chain(&e)))?;
    let (parts, body) = resp.into_parts();
    let out = read_body(body, max).await?;
    Ok((parts.status, parts.headers, out))
}

/// An answer's body, at most `max` bytes, into a zeroizing buffer (answers carry keys).
async fn read_body(
    mut body: hyper::body::Incoming,
    max: usize,
) -> Result<zeroize::Zeroizing<Vec<u8>>, BodyError> {
    use http_body_util::BodyExt;
    let mut out = zeroize::Zeroizing::new(Vec::with_capacity(4096));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| BodyError::Transport(crate::error_chain(&e)))?;
        if let Some(d) = frame.data_ref() {
            if out.len() + d.len() > max {
                return Err(BodyError::TooLong);
            }
            out.extend_from_slice(d);
        }
    }
    Ok(out)
}
