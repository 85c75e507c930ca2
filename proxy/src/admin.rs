//! The admin listener: `GET /healthz` for liveness probes, `GET /readyz` for readiness
//! (in fleet mode: connected to Redis and subscribed), `GET /metrics` for
//! Prometheus, and `POST /purge`. Kept off the proxy port so it is never exposed with it.
//!
//! Purge: `POST /purge?route=NAME&path=/p?q=1[&host=H][&soft=true]` drops (or, soft,
//! marks stale) what a GET of that URL would be served from, with all its `Vary`
//! variants; `POST /purge?tag=T[&soft=true]` does so for every entry tagged `T` by its
//! route's `tag_header`. In fleet mode both reach Redis and every instance.

use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::body::ProxyBody;
use crate::proxy::Proxy;

async fn purge(proxy: &Proxy, query: &str) -> (StatusCode, &'static str, String) {
    let text = "text/plain; charset=utf-8";
    let params: std::collections::HashMap<String, String> =
        form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect();
    let soft = matches!(
        params.get("soft").map(String::as_str),
        Some("1" | "true" | "yes")
    );
    let kind = if soft { "soft-purged" } else { "purged" };
    match (params.get("tag"), params.get("route"), params.get("path")) {
        (Some(tag), None, None) => {
            let n = proxy.purge_tag(tag, soft).await;
            (StatusCode::OK, text, format!("{kind} {n} keys tagged {tag}\n"))
        }
        (None, Some(route), Some(path)) => match proxy.purge_url(route, params.get("host").map(String::as_str), path, soft).await {
            Ok(()) => (StatusCode::OK, text, format!("{kind} {path} on route {route}\n")),
            Err(e @ crate::proxy::PurgeError::UnknownRoute(_)) => (StatusCode::NOT_FOUND, text, format!("{e}\n")),
            Err(e) => (StatusCode::BAD_REQUEST, text, format!("{e}\n")),
        },
        _ => (
            StatusCode::BAD_REQUEST,
            text,
            "give either tag=T, or route=NAME and path=/p (optionally host=H); add soft=true to mark stale instead\n".to_string(),
        ),
    }
}

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
        (&Method::GET, "/readyz") => match proxy.fleet() {
            Some(fleet) if !fleet.fleet().ready() => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain; charset=utf-8",
                "not ready: connecting to redis (serving single-instance meanwhile)\n".to_string(),
            ),
            _ => (
                StatusCode::OK,
                "text/plain; charset=utf-8",
                "ready\n".to_string(),
            ),
        },
        (&Method::POST, "/purge") => purge(&proxy, req.uri().query().unwrap_or("")).await,
        (_, "/healthz" | "/metrics" | "/purge") => (
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
