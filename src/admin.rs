//! The operations endpoint on `--metrics-listen`: `GET /metrics` (Prometheus text),
//! `GET /healthz` and `GET /readyz`. HTTP is hyper's; nothing here parses HTTP by hand.
//! It runs on its own listener, so nothing sent to it can affect the SMTP side.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::shutdown::Shutdown;

/// What `/readyz` reports on.
#[derive(Clone)]
pub struct Readiness {
    pub backend_up: watch::Receiver<bool>,
    /// What `/readyz` says while `backend_up` is false.
    pub backend_down: &'static str,
    /// Whether the credential source answers: without it no client can log in.
    pub source_up: watch::Receiver<bool>,
    pub draining: Shutdown,
}

impl Readiness {
    /// `Ok` when new sessions can be served, else the one-line reason.
    fn check(&self) -> Result<(), &'static str> {
        if self.draining.is_stopping() {
            Err("draining: shutting down")
        } else if !*self.backend_up.borrow() {
            Err(self.backend_down)
        } else if !*self.source_up.borrow() {
            Err("credential source unavailable")
        } else {
            Ok(())
        }
    }
}

/// A slow or idle scraper cannot hold a connection open forever.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the endpoint until the process exits.
pub async fn serve(listener: TcpListener, handle: PrometheusHandle, readiness: Readiness) {
    let state = Arc::new((handle, readiness));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(pair) => pair,
            Err(error) => {
                tracing::warn!(%error, "metrics listener accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&request, &state.0, &state.1)) }
            });
            let mut builder = http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Binds the endpoint's listener.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("binding --metrics-listen {addr}: {e}"))
}

fn route(
    request: &Request<Incoming>,
    handle: &PrometheusHandle,
    readiness: &Readiness,
) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    if !matches!(path, "/metrics" | "/healthz" | "/readyz") {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        response
            .headers_mut()
            .insert(ALLOW, hyper::header::HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match path {
        "/metrics" => {
            let mut response = Response::new(Full::new(Bytes::from(handle.render())));
            response.headers_mut().insert(
                CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        _ => match readiness.check() {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(reason) => text(StatusCode::SERVICE_UNAVAILABLE, &format!("{reason}\n")),
        },
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
