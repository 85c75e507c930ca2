//! The upstream client as a tower stack: [`CapLayer`] (a slot under the route's caps,
//! waited for in its queue) over [`Exchange`] (one request under the response
//! timeout). The queue wait is not counted against the response timeout: a request
//! that waited for its turn still gets the whole timeout at the upstream.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::BoxFuture;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use tower::{Layer, Service};

use super::cap::{Priority, UpstreamCap};
use super::{within, UpstreamError};
use crate::http::body::{ProxyBody, UpstreamBody};

pub(super) type HttpClient = Client<HttpsConnector<HttpConnector>, ProxyBody>;

/// One request to the upstream, answered (its head) within the response timeout.
#[derive(Clone)]
pub(super) struct Exchange {
    pub(super) client: HttpClient,
    pub(super) response_timeout: Duration,
    pub(super) display: Arc<str>,
}

impl Service<Request<ProxyBody>> for Exchange {
    type Response = Response<Incoming>;
    type Error = UpstreamError;
    type Future = BoxFuture<'static, Result<Response<Incoming>, UpstreamError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), UpstreamError>> {
        // The pooled client takes any number of requests.
        Poll::Ready(Ok(()))
    }

    /// While a client's body is forwarded, the timeout counts from its last move, so an
    /// upload that keeps moving is never cut for its length (the body's own timer
    /// bounds a client that stops; see [`ProxyBody::from_client`]).
    fn call(&mut self, req: Request<ProxyBody>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let client_body = req.body().client_fault();
            let upstream = || this.display.to_string();
            match within(
                this.response_timeout,
                this.client.request(req),
                client_body.as_ref(),
            )
            .await
            {
                Some(Ok(res)) => Ok(res),
                Some(Err(source)) if source.is_connect() => Err(UpstreamError::Connect {
                    upstream: upstream(),
                    source,
                }),
                Some(Err(source)) => Err(UpstreamError::Request {
                    upstream: upstream(),
                    source,
                }),
                None => Err(UpstreamError::Timeout {
                    upstream: upstream(),
                    timeout: this.response_timeout,
                }),
            }
        })
    }
}

/// Puts a route's cap (if it has one) in front of a service.
#[derive(Clone)]
pub(super) struct CapLayer(pub(super) Option<Arc<UpstreamCap>>);

impl<S> Layer<S> for CapLayer {
    type Service = Capped<S>;

    fn layer(&self, inner: S) -> Capped<S> {
        Capped {
            cap: self.0.clone(),
            inner,
        }
    }
}

/// A service whose requests each wait for a slot first (at the [`Priority`] in their
/// extensions; one without is not capped); the slot rides in the response body.
#[derive(Clone)]
pub(super) struct Capped<S> {
    cap: Option<Arc<UpstreamCap>>,
    inner: S,
}

impl<S> Service<Request<ProxyBody>> for Capped<S>
where
    S: Service<Request<ProxyBody>, Response = Response<Incoming>, Error = UpstreamError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = Response<UpstreamBody>;
    type Error = UpstreamError;
    type Future = BoxFuture<'static, Result<Response<UpstreamBody>, UpstreamError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), UpstreamError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ProxyBody>) -> Self::Future {
        // The clone readied by `poll_ready` serves this request (tower's convention).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let cap = self.cap.clone();
        Box::pin(async move {
            let priority = req.extensions().get::<Priority>().copied();
            let slot = match (cap, priority) {
                (Some(cap), Some(priority)) => {
                    Some(cap.admit(priority).await.map_err(UpstreamError::Shed)?)
                }
                _ => None,
            };
            let res = inner.call(req).await?;
            Ok(res.map(|body| UpstreamBody::holding(body, slot)))
        })
    }
}
