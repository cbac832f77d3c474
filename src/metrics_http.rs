//! The `/metrics` endpoint (`--metrics-addr`): hyper's HTTP/1 server (already built for the
//! Transit client) instead of a hand-written responder. `GET /metrics` only, one request per
//! connection (`Connection: close`), a 5 s limit to send the request head, at most 16
//! connections at once; nothing from a request is echoed.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONNECTION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};

use crate::fs::SealFs;

const MAX_CONNECTIONS: usize = 16;

fn answer(fs: &Arc<SealFs>, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, body) = if req.method() == Method::GET && req.uri().path() == "/metrics" {
        (StatusCode::OK, crate::fs::metrics::render(fs))
    } else {
        (StatusCode::NOT_FOUND, "not found\n".to_string())
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r.headers_mut()
        .insert(CONNECTION, hyper::header::HeaderValue::from_static("close"));
    r
}

/// Serves scrapes until the task is aborted.
pub async fn serve(listener: tokio::net::TcpListener, fs: Arc<SealFs>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // EMFILE and the like: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        // A scraper that opens more connections than this waits for its next scrape.
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let fs = fs.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let r = answer(&fs, &req);
                async move { Ok::<_, Infallible>(r) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
            drop(permit);
        });
    }
}
