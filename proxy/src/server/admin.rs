//! The admin listener: `GET /healthz` for liveness probes, `GET /readyz` for readiness
//! (in fleet mode: connected to Redis and subscribed), `GET /metrics` for
//! Prometheus, and `POST /purge`. Kept off the proxy port so it is never exposed with it.
//!
//! Purge: `POST /purge?route=NAME&path=/p?q=1[&host=H][&header=NAME:VALUE...][&soft=true]`
//! drops (or, soft, marks stale) what a GET of that URL would be served from, with all
//! its `Vary` variants; `POST /purge?tag=T[&soft=true]` does so for every entry tagged
//! `T` by its route's `tag_header`. In fleet mode both reach Redis and every instance.
//! The answer counts the entries removed, here and in Redis.
//!
//! Only purges change anything, so only purges are guarded (`guard`): by the admin
//! token when one is set, and always against browsers, so that no web page a
//! operator visits can purge through their machine. Health, readiness and metrics
//! stay open for probes and scrapers.

use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::cache::{Purged, SharedPurged};
use crate::config::AdminToken;
use crate::http::body::ProxyBody;
use crate::proxy::purge::{self, PurgeRequest, PurgeTarget};
use crate::proxy::Proxy;

const TEXT: &str = "text/plain; charset=utf-8";

/// A response of the admin listener before it is built.
struct Answer {
    status: StatusCode,
    content_type: &'static str,
    body: String,
    headers: Vec<(header::HeaderName, HeaderValue)>,
}

impl Answer {
    fn text(status: StatusCode, body: impl Into<String>) -> Answer {
        Answer {
            status,
            content_type: TEXT,
            body: body.into(),
            headers: Vec::new(),
        }
    }

    fn with(mut self, name: header::HeaderName, value: &'static str) -> Answer {
        self.headers.push((name, HeaderValue::from_static(value)));
        self
    }
}

/// Why a purge request was refused before it was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// A browser sent it (`Origin`, or `Sec-Fetch-Site` other than `none`).
    Browser,
    /// A body type an HTML form (or a fetch without preflight) can send.
    FormBody,
    /// A token is set and the request carries none.
    NoToken,
    /// A token is set and the request carries another.
    WrongToken,
}

impl Refusal {
    fn as_str(self) -> &'static str {
        match self {
            Refusal::Browser => "browser",
            Refusal::FormBody => "form body",
            Refusal::NoToken => "no token",
            Refusal::WrongToken => "wrong token",
        }
    }

    fn answer(self) -> Answer {
        const CHALLENGE: &str = "Bearer realm=\"corral-admin\"";
        match self {
            Refusal::Browser => Answer::text(
                StatusCode::FORBIDDEN,
                "purge refused: sent by a browser (Origin or Sec-Fetch-Site); the admin API is not for web pages\n",
            ),
            Refusal::FormBody => Answer::text(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "purge refused: form content type; purge takes its parameters in the query string, with no body (curl -X POST)\n",
            ),
            Refusal::NoToken => Answer::text(
                StatusCode::UNAUTHORIZED,
                "purge needs the admin token: send Authorization: Bearer <token>\n",
            )
            .with(header::WWW_AUTHENTICATE, CHALLENGE),
            Refusal::WrongToken => Answer::text(StatusCode::UNAUTHORIZED, "invalid admin token\n")
                .with(
                    header::WWW_AUTHENTICATE,
                    "Bearer realm=\"corral-admin\", error=\"invalid_token\"",
                ),
        }
    }
}

/// Whether a purge with these headers may run.
///
/// Browsers first: every cross-origin request a page can make without a CORS preflight
/// is a form (whose body has one of three content types) or a `fetch` (which, for a
/// POST, always carries `Origin`; modern browsers add `Sec-Fetch-Site`). The admin API
/// serves no pages, so any of these marks a request a page made on someone's behalf;
/// and the listener answers no preflight, so nothing else reaches it from a page.
/// Then the token, when set, compared in constant time.
fn guard(headers: &HeaderMap, token: Option<&AdminToken>) -> Result<(), Refusal> {
    let fetch_site = headers.get("sec-fetch-site").map(HeaderValue::as_bytes);
    if headers.contains_key(header::ORIGIN) || fetch_site.is_some_and(|s| s != b"none") {
        return Err(Refusal::Browser);
    }
    if headers
        .get_all(header::CONTENT_TYPE)
        .iter()
        .any(is_form_type)
    {
        return Err(Refusal::FormBody);
    }
    let Some(token) = token else { return Ok(()) };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim());
    match presented {
        None => Err(Refusal::NoToken),
        Some(t) if token.matches(t.as_bytes()) => Ok(()),
        Some(_) => Err(Refusal::WrongToken),
    }
}

/// The content types a form can send (and a `fetch` can send without a preflight).
fn is_form_type(value: &HeaderValue) -> bool {
    let essence = value
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    matches!(
        essence.as_str(),
        "application/x-www-form-urlencoded" | "multipart/form-data" | "text/plain"
    )
}

async fn purge(proxy: &Proxy, headers: &HeaderMap, query: &str) -> Answer {
    if let Err(refusal) = guard(headers, proxy.current().admin_token.as_ref()) {
        // Debug, not info: anyone who reaches the port could fill the log otherwise.
        tracing::debug!(reason = refusal.as_str(), "purge refused");
        return refusal.answer();
    }
    let req = match PurgeRequest::parse(query) {
        Ok(req) => req,
        Err(e) => return Answer::text(e.status(), format!("{e}\n")),
    };
    match purge::purge(proxy, &req).await {
        Ok(purged) => purged_answer(&req, purged),
        Err(e) => Answer::text(e.status(), format!("{e}\n")),
    }
}

/// `purged tag=T local=1 shared=2`: what was asked, and how many entries went, here
/// and in Redis. 503 when Redis could not be reached: the fleet may still serve them.
fn purged_answer(req: &PurgeRequest, purged: Purged) -> Answer {
    let mut line = String::from(if req.soft { "soft-purged" } else { "purged" });
    match &req.target {
        PurgeTarget::Tag(tag) => line.push_str(&format!(" tag={tag}")),
        PurgeTarget::Url { route, path, .. } => {
            line.push_str(&format!(" route={route} path={path}"))
        }
    }
    line.push_str(&format!(" local={}", purged.local));
    let status = match purged.shared {
        SharedPurged::NoFleet => StatusCode::OK,
        SharedPurged::Counted(Some(n)) => {
            line.push_str(&format!(" shared={n}"));
            StatusCode::OK
        }
        SharedPurged::Counted(None) => {
            line.push_str(" shared=unavailable");
            StatusCode::SERVICE_UNAVAILABLE
        }
    };
    line.push('\n');
    Answer::text(status, line)
}

pub(super) async fn handle(req: Request<Incoming>, proxy: Arc<Proxy>) -> Response<ProxyBody> {
    let answer = match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/healthz") => Answer::text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/metrics") => {
            let local = proxy.cache().local();
            local.sync();
            let text = proxy.metrics().encode(
                local.weighted_size(),
                local.entry_count(),
                proxy.fills().in_progress() as u64,
            );
            Answer {
                content_type: "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ..Answer::text(StatusCode::OK, text)
            }
        }
        (&Method::GET, "/readyz") => match proxy.redis() {
            Some(redis) if !redis.ready() => Answer::text(
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: connecting to redis (serving single-instance meanwhile)\n",
            ),
            _ => Answer::text(StatusCode::OK, "ready\n"),
        },
        (&Method::POST, "/purge") => {
            purge(&proxy, req.headers(), req.uri().query().unwrap_or("")).await
        }
        // No CORS headers on any answer, OPTIONS included: a browser's preflight fails.
        (_, path @ ("/healthz" | "/readyz" | "/metrics" | "/purge")) => {
            let allow = match path {
                "/purge" => "POST",
                "/healthz" => "GET, HEAD",
                _ => "GET",
            };
            Answer::text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
                .with(header::ALLOW, allow)
        }
        _ => Answer::text(
            StatusCode::NOT_FOUND,
            "not found; try /healthz, /readyz, /metrics or POST /purge\n",
        ),
    };
    let mut res = Response::new(ProxyBody::full(answer.body));
    *res.status_mut() = answer.status;
    let headers = res.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(answer.content_type),
    );
    for (name, value) in answer.headers {
        headers.insert(name, value);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn token() -> AdminToken {
        let text = "listen = \"127.0.0.1:1\"\nadmin_token = \"0123456789abcdef0123\"\n[[route]]\nname = \"r\"\nupstream = \"http://u\"\n";
        Config::parse(text, "t").unwrap().admin_token.unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn guard_refuses_browsers_forms_and_wrong_tokens() {
        let t = token();
        let ok = ("authorization", "Bearer 0123456789abcdef0123");
        assert_eq!(guard(&headers(&[ok]), Some(&t)), Ok(()));
        assert_eq!(
            guard(
                &headers(&[("authorization", "bearer  0123456789abcdef0123")]),
                Some(&t)
            ),
            Ok(())
        );
        assert_eq!(guard(&headers(&[]), Some(&t)), Err(Refusal::NoToken));
        assert_eq!(
            guard(&headers(&[("authorization", "Basic abc")]), Some(&t)),
            Err(Refusal::NoToken)
        );
        assert_eq!(
            guard(
                &headers(&[("authorization", "Bearer 0123456789abcdef0124")]),
                Some(&t)
            ),
            Err(Refusal::WrongToken)
        );
        assert_eq!(
            guard(&headers(&[ok, ("origin", "null")]), Some(&t)),
            Err(Refusal::Browser)
        );
        assert_eq!(
            guard(&headers(&[("sec-fetch-site", "cross-site")]), None),
            Err(Refusal::Browser)
        );
        assert_eq!(guard(&headers(&[("sec-fetch-site", "none")]), None), Ok(()));
        for form in [
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "Text/Plain;charset=utf-8",
        ] {
            assert_eq!(
                guard(&headers(&[ok, ("content-type", form)]), Some(&t)),
                Err(Refusal::FormBody),
                "{form}"
            );
        }
        assert_eq!(
            guard(&headers(&[("content-type", "application/json")]), None),
            Ok(())
        );
    }
}
