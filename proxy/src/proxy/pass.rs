//! Forwarding without the cache: the request streamed to the upstream with its own
//! body, the response streamed back; a failure blamed on whoever caused it.

use http::{Method, Response};

use super::error::{error_response, ProxyError};
use super::{ClientRequest, Proxy};
use crate::http::body::ProxyBody;
use crate::http::cache_status::{CacheStatus, Fwd};
use crate::http::headers;
use crate::metrics::UpstreamReason;
use crate::route::Route;
use crate::upstream::cap::Priority;
use crate::upstream::FailureKind;

impl Proxy {
    /// Forwards a request without caching it, streaming both bodies.
    pub(super) async fn pass(
        &self,
        route: &Route,
        req: &ClientRequest,
        body: ProxyBody,
        status: CacheStatus,
    ) -> (Response<ProxyBody>, CacheStatus) {
        route.metrics.upstream_request(UpstreamReason::Pass);
        let client_fault = body.client_fault();
        // An upload moves at its client's pace: it is not counted under the caps, or a
        // slow client could hold a capped route's slots and shut everyone out.
        let priority = http_body::Body::is_end_stream(&body).then_some(Priority::Request);
        let upstream_req = route.upstream.request(
            req.head.method.clone(),
            req.head.uri.path_and_query(),
            req.forwarded_headers(),
            req.original_host.as_ref(),
            route.config.preserve_host,
            body,
        );
        let sent_at = std::time::Instant::now();
        let sent = route.upstream.send(upstream_req, priority).await;
        let status = status.with_upstream_time(sent_at.elapsed());
        // Whether a failure was the client's: its body failed or stalled.
        let blame = match &sent {
            Err(err) => client_fault.and_then(|f| f.blame(err.kind() == FailureKind::Timeout)),
            Ok(_) => None,
        };
        match (sent, blame) {
            (Ok(res), _) => {
                route.note_upstream_status(res.status());
                let (mut head, body) = res.into_parts();
                headers::forward_response(&mut head.headers);
                let body = if req.head.method == Method::HEAD {
                    ProxyBody::empty()
                } else {
                    ProxyBody::streaming(body)
                };
                (Response::from_parts(head, body), status)
            }
            // The client's body failed or stalled: its fault, not the upstream's (no
            // fault log, no upstream error counted), whatever the upstream client said.
            (Err(_), Some(blame)) => {
                let err = ProxyError::from(blame);
                tracing::debug!(error = %err, "client request body failed while forwarded");
                (error_response(&err), CacheStatus::error(None, err.detail()))
            }
            (Err(err), None) => {
                route.note_upstream_error(&err);
                let err = ProxyError::from(err);
                (
                    error_response(&err),
                    CacheStatus::error(Some(Fwd::Miss), err.detail()),
                )
            }
        }
    }
}
