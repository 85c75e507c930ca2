//! Errors of the request path, and the one place where they become HTTP responses.

use std::time::Duration;

use http::header::{self, HeaderName, HeaderValue};
use http::{Response, StatusCode};

use crate::http::body::{ClientBlame, ProxyBody};
use crate::http::cache_status::{CacheStatus, Detail};
use crate::http::request::BadRequest;
use crate::upstream::{FailureKind, UpstreamError};

/// Why corral could not produce the upstream's response. Each variant records whose
/// fault it was: the client's (`BadRequest`, `NoRoute`, `MethodNotAllowed`, `ClientBody`,
/// `ClientBodyTimeout`), the upstream's (`Upstream`, `SharedFailure`), the wait bound's
/// (`WaitTimedOut`), or corral's own capacity (`Overloaded`).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyError {
    #[error("bad request: {0}")]
    BadRequest(#[from] BadRequest),
    #[error("no route matches the request")]
    NoRoute,
    /// The client's request body broke off or was malformed while it was forwarded.
    #[error("the client's request body was malformed or cut off")]
    ClientBody,
    /// The client stopped sending its request body while corral waited on it.
    #[error("the client stopped sending its request body")]
    ClientBodyTimeout,
    /// `max_requests` requests were already in progress.
    #[error("too many requests in progress")]
    Overloaded,
    #[error("method not allowed through a reverse proxy")]
    MethodNotAllowed,
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("the fetch this request waited on failed: {}", .0.as_str())]
    SharedFailure(FailureKind),
    #[error("waited {0:?} for another request's fetch")]
    WaitTimedOut(Duration),
}

impl From<ClientBlame> for ProxyError {
    fn from(blame: ClientBlame) -> ProxyError {
        match blame {
            ClientBlame::Malformed => ProxyError::ClientBody,
            ClientBlame::Stalled => ProxyError::ClientBodyTimeout,
        }
    }
}

impl ProxyError {
    pub(crate) fn status(&self) -> StatusCode {
        let by_kind = |kind: FailureKind| match kind {
            FailureKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
            FailureKind::Connect | FailureKind::Protocol | FailureKind::Status => {
                StatusCode::BAD_GATEWAY
            }
            // Refused by the route's upstream caps, before anything was sent.
            FailureKind::QueueFull | FailureKind::QueueTimeout => StatusCode::SERVICE_UNAVAILABLE,
        };
        match self {
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::ClientBody => StatusCode::BAD_REQUEST,
            ProxyError::ClientBodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ProxyError::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::Upstream(e) => by_kind(e.kind()),
            ProxyError::SharedFailure(kind) => by_kind(*kind),
            ProxyError::WaitTimedOut(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// A short token for `Cache-Status` details and logs.
    pub(crate) fn detail(&self) -> Detail {
        Detail::Reason(self.token())
    }

    fn token(&self) -> &'static str {
        match self {
            ProxyError::BadRequest(bad) => bad.detail(),
            ProxyError::NoRoute => "no-route",
            ProxyError::ClientBody => "client-body",
            ProxyError::ClientBodyTimeout => "client-body-timeout",
            ProxyError::Overloaded => "overloaded",
            ProxyError::MethodNotAllowed => "method",
            ProxyError::Upstream(e) => e.kind().detail(),
            ProxyError::SharedFailure(kind) => kind.detail(),
            ProxyError::WaitTimedOut(_) => "wait-timeout",
        }
    }
}

/// The response for `err`: its status, a one-line plain-text body, and a `Cache-Status`
/// naming the error (the request path replaces it with the request's full status; a
/// request refused before it has one, for no route or a malformed target, keeps it).
pub(crate) fn error_response(err: &ProxyError) -> Response<ProxyBody> {
    let status = err.status();
    let body = match err {
        ProxyError::BadRequest(_) => "bad request\n",
        ProxyError::NoRoute => "no route for this host and path\n",
        ProxyError::ClientBody => "malformed request body\n",
        ProxyError::ClientBodyTimeout => "request body timed out\n",
        ProxyError::Overloaded => "too many requests in progress; retry shortly\n",
        ProxyError::MethodNotAllowed => "method not allowed\n",
        _ if status == StatusCode::SERVICE_UNAVAILABLE => "upstream busy; retry shortly\n",
        _ if status == StatusCode::GATEWAY_TIMEOUT => "upstream timed out\n",
        _ => "upstream unavailable\n",
    };
    let mut res = Response::new(ProxyBody::full(body));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res.headers_mut().insert(
        HeaderName::from_static("cache-status"),
        CacheStatus::error(None, err.detail()).header_value(),
    );
    if status == StatusCode::METHOD_NOT_ALLOWED {
        res.headers_mut().insert(
            header::ALLOW,
            HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
        );
    }
    if status == StatusCode::SERVICE_UNAVAILABLE {
        // Too many requests in progress here, or queued for the upstream: each is
        // short-lived (bounded by its timeouts), so a place comes free soon.
        res.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    res
}
