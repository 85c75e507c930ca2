//! The admin listener: `GET /healthz` for liveness probes and `GET /metrics` for
//! Prometheus. Kept off the proxy port so it is never exposed with it.

use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::body::ProxyBody;
use crate::proxy::Proxy;

pub async fn handle(req: Request<Incoming>, proxy: Arc<Proxy>) -> Response<ProxyBody> {
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/healthz") => (
            StatusCode::OK,
            "text/plain; charset=utf-8",
            "ok\n".to_string(),
        ),
        (&Method::GET, "/metrics") => {
            let local = proxy.cache().local();
            local.sync().await;
            let text = proxy.metrics().encode(
                local.weighted_size(),
                local.entry_count(),
                proxy.fills().in_progress() as u64,
            );
            (
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                text,
            )
        }
        (_, "/healthz" | "/metrics") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "method not allowed\n".to_string(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found; try /healthz or /metrics\n".to_string(),
        ),
    };
    let mut res = Response::new(ProxyBody::full(body));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    res
}
