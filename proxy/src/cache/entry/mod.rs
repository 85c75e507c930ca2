//! A cached response: what is served for it, and the instants at which it turns stale
//! and stops being servable at all.
//!
//! An entry is small on purpose (issue 13: the local tier's capacity is its hit ratio):
//! its head, written once as HTTP/1.1 sends it, and its body share one allocation; the
//! header fields are read from that head ([`head`]) rather than kept again in a map;
//! the instants are derived from the [`Lifetime`] when asked.

mod framing;
pub(crate) mod head;
mod revalidate;
mod times;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{response, HeaderMap, StatusCode};

use super::body_file::BodyFile;
use super::key::vary_values;
use super::policy::Lifetime;
use super::weight;
pub(crate) use framing::frame;
pub use framing::Unframeable;
use times::Times;

/// A stored response. Immutable once built; a refresh builds a new one.
#[derive(Debug)]
pub struct CacheEntry {
    /// The head (`..head_len`): the status line, the stored fields and `Via`, as
    /// HTTP/1.1 writes them, which a hit on the HTTP/1 fast path sends before its
    /// `Age` and `Cache-Status`, and where every reader finds the fields
    /// ([`CacheEntry::fields`]; no hop-by-hop field, `Content-Length` set: see
    /// [`frame`]). Then the body, unless it lives in `body_file`.
    data: Bytes,
    head_len: u32,
    /// How long the fetch that made this entry took, in milliseconds (saturating at
    /// about 65 s): what early refresh weighs its odds by.
    fetch_ms: u16,
    /// Whether the stored fields include `Date` (a hit adds one when they do not).
    has_date: bool,
    /// Set by the first hit that starts this copy's early refresh: one attempt per
    /// copy, whatever comes of it (a failure, a refusal, a pass for that request, the
    /// lock held elsewhere, or an entry that expires no later), never one per hit.
    early_refresh_started: AtomicBool,
    /// A large body's sealed file, which a hit sends without copying.
    pub(crate) body_file: Option<Arc<BodyFile>>,
    /// For a response with `Vary` (boxed: most have none).
    vary: Option<Box<Vary>>,
    times: Times,
    fence: u64,
}

/// The headers a response varies on (lowercase), and the filling request's values of
/// them, as [`vary_values`] writes them.
#[derive(Debug, Clone)]
struct Vary {
    names: Box<[HeaderName]>,
    values: Box<str>,
}

fn vary_names(headers: &HeaderMap) -> Box<[HeaderName]> {
    headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect()
}

/// The head for `status` and `headers`, and the body after it (none for a body kept
/// in a file), in one allocation of exactly their size. Copying every header into
/// this buffer is also what keeps the entry from pointing into hyper's read buffer:
/// headers parsed by hyper are slices of its connection's buffer, and one kept would
/// pin that whole buffer (8 KiB and more) for the entry's life (`benches/memory.sh`
/// measured 8,237 bytes of RSS per cached 1 KiB object before the copy).
fn head_and_body(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> (Bytes, u32) {
    let head_len = head::len(status, headers);
    let mut buf = Vec::with_capacity(head_len + body.len());
    head::write(status, headers, &mut buf);
    buf.extend_from_slice(body);
    // A head is a few kilobytes at most (hyper refuses larger ones).
    (
        Bytes::from(buf),
        u32::try_from(head_len).unwrap_or(u32::MAX),
    )
}

/// Where an entry stands at a given instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Servable as is, for `ttl` more.
    Fresh { ttl: Duration },
    /// Past its freshness by `by`.
    Stale { by: Duration },
}

impl Freshness {
    pub(crate) fn is_fresh(self) -> bool {
        matches!(self, Freshness::Fresh { .. })
    }
}

impl CacheEntry {
    /// Builds an entry from a response's head and full body. `req_headers` are the
    /// filling request's, for `Vary`. Fails only for a response no cache may replay:
    /// an interim status, or content on a 204 or 304 (see [`Unframeable`]).
    pub fn new(
        mut head: response::Parts,
        body: Bytes,
        lifetime: Lifetime,
        req_headers: &HeaderMap,
    ) -> Result<CacheEntry, Unframeable> {
        frame(head.status, &mut head.headers, body.len())?;
        let names = vary_names(&head.headers);
        let values = vary_values(&names, req_headers).into();
        Ok(CacheEntry::from_parts(
            head.status,
            &head.headers,
            &body,
            &lifetime,
            (names, values),
            0,
        ))
    }

    /// An entry from parts read back from the shared tier, which may have been written
    /// by anything: framed again exactly as a response from the upstream is.
    pub(crate) fn restored(
        status: StatusCode,
        mut headers: HeaderMap,
        body: Bytes,
        lifetime: Lifetime,
        vary_values: Box<str>,
        fence: u64,
    ) -> Result<CacheEntry, Unframeable> {
        frame(status, &mut headers, body.len())?;
        let names = vary_names(&headers);
        Ok(CacheEntry::from_parts(
            status,
            &headers,
            &body,
            &lifetime,
            (names, vary_values),
            fence,
        ))
    }

    /// An entry from parts whose headers went through [`frame`], with the names they
    /// vary on and the filling request's values of them. A large body gets a sealed
    /// file.
    fn from_parts(
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
        lifetime: &Lifetime,
        (names, vary_values): (Box<[HeaderName]>, Box<str>),
        fence: u64,
    ) -> CacheEntry {
        let body_file = BodyFile::store(body);
        let in_buffer = if body_file.is_some() { &[][..] } else { body };
        let (data, head_len) = head_and_body(status, headers, in_buffer);
        let vary = (!names.is_empty() || !vary_values.is_empty()).then(|| {
            Box::new(Vary {
                names,
                values: vary_values,
            })
        });
        CacheEntry {
            data,
            head_len,
            fetch_ms: 0,
            has_date: headers.contains_key(header::DATE),
            early_refresh_started: AtomicBool::new(false),
            body_file,
            vary,
            times: Times::pack(lifetime),
            fence,
        }
    }

    /// The fencing token of the lock grant under which this entry was written to the
    /// shared tier; 0 for an entry that never was.
    pub fn fence(&self) -> u64 {
        self.fence
    }

    #[cfg(test)]
    pub(crate) fn with_fence(mut self, fence: u64) -> CacheEntry {
        self.fence = fence;
        self
    }

    /// The response's status, read from the head's status line (the head always
    /// starts with `HTTP/1.1 ` and three digits: see [`head::write`]).
    pub(crate) fn status(&self) -> StatusCode {
        self.data
            .get(9..12)
            .and_then(|code| StatusCode::from_bytes(code).ok())
            .unwrap_or(StatusCode::OK)
    }

    /// How long the fetch that made this entry took (to the millisecond; zero when
    /// unknown, as for an entry written by an older instance).
    pub fn fetch_time(&self) -> Duration {
        Duration::from_millis(u64::from(self.fetch_ms))
    }

    /// This entry, made by a fetch that took `took`.
    pub(crate) fn fetched_in(mut self, took: Duration) -> CacheEntry {
        self.fetch_ms = u16::try_from(took.as_millis()).unwrap_or(u16::MAX);
        self
    }

    /// The entry's lifetime (to the millisecond).
    pub fn lifetime(&self) -> Lifetime {
        self.times.lifetime()
    }

    /// The head as HTTP/1.1 writes it (see the `data` field).
    pub(crate) fn http1_head(&self) -> &[u8] {
        &self.data[..self.head_len as usize]
    }

    /// The body's bytes.
    pub(crate) fn body(&self) -> &[u8] {
        match &self.body_file {
            Some(file) => file.bytes(),
            None => &self.data[self.head_len as usize..],
        }
    }

    /// The body, for a response to carry (shares the entry's memory).
    pub fn body_bytes(&self) -> Bytes {
        match &self.body_file {
            Some(file) => file.bytes().clone(),
            None => self.data.slice(self.head_len as usize..),
        }
    }

    /// The headers this response varies on (lowercase); empty without `Vary`.
    pub(crate) fn vary(&self) -> &[HeaderName] {
        self.vary.as_ref().map_or(&[], |v| &v.names)
    }

    /// The filling request's values of the headers in [`CacheEntry::vary`].
    pub(crate) fn vary_values(&self) -> &str {
        self.vary.as_ref().map_or("", |v| &v.values)
    }

    /// This entry, selected by the request headers `req_headers` (a renewed entry
    /// keeps the body, but it is the variant of the request that renewed it).
    pub(crate) fn for_request(mut self, req_headers: &HeaderMap) -> CacheEntry {
        if let Some(vary) = &mut self.vary {
            vary.values = vary_values(&vary.names, req_headers).into();
        }
        self
    }

    /// The stored header fields, in order: (lowercase name, value).
    pub(crate) fn fields(&self) -> head::Fields<'_> {
        head::fields(self.http1_head())
    }

    /// The values of the stored field `name`, in order.
    pub(crate) fn header_values<'a, 'n>(
        &'a self,
        name: &'n HeaderName,
    ) -> impl Iterator<Item = &'a [u8]> + 'n
    where
        'a: 'n,
    {
        let name = name.as_str().as_bytes();
        self.fields()
            .filter(move |(n, _)| *n == name)
            .map(|(_, v)| v)
    }

    /// The first value of the stored field `name`.
    pub(crate) fn header(&self, name: &HeaderName) -> Option<&[u8]> {
        self.header_values(name).next()
    }

    /// Whether the stored fields include `Date`.
    pub(crate) fn has_date(&self) -> bool {
        self.has_date
    }

    /// The stored fields as a map (for hyper's path and the rare merges), the values
    /// slices of the stored head: nothing is copied.
    pub fn headers(&self) -> HeaderMap {
        head::header_map(&self.data.slice(..self.head_len as usize))
    }

    /// A copy that turned stale at `at` (soft purge): still servable within its stale
    /// windows and revalidatable, but never again fresh without asking the upstream.
    /// Head and body are shared with this one.
    pub(crate) fn soft_purged(&self, at: SystemTime) -> CacheEntry {
        CacheEntry {
            data: self.data.clone(),
            head_len: self.head_len,
            fetch_ms: self.fetch_ms,
            has_date: self.has_date,
            early_refresh_started: AtomicBool::new(false),
            body_file: self.body_file.clone(),
            vary: self.vary.clone(),
            times: self.times.stale_from(at),
            fence: self.fence,
        }
    }

    pub fn freshness(&self, now: SystemTime) -> Freshness {
        match self.times.fresh_left(now) {
            Ok(ttl) if !ttl.is_zero() => Freshness::Fresh { ttl },
            Ok(_) => Freshness::Stale { by: Duration::ZERO },
            Err(by) => Freshness::Stale { by },
        }
    }

    /// Whether this copy's early refresh has started.
    pub(crate) fn early_refresh_started(&self) -> bool {
        self.early_refresh_started.load(Ordering::Relaxed)
    }

    /// Whether this call is the first to start this copy's early refresh.
    pub(crate) fn start_early_refresh(&self) -> bool {
        !self.early_refresh_started.swap(true, Ordering::Relaxed)
    }

    /// This copy, counted as already refreshed early (a refresh that made no entry
    /// fresher than the one it replaced must not start again on every hit).
    pub(crate) fn early_refreshed(self) -> CacheEntry {
        self.early_refresh_started.store(true, Ordering::Relaxed);
        self
    }

    /// The response's age when it was received (its `Age`, and transit).
    pub(crate) fn age_at_receipt(&self) -> Duration {
        self.times.age()
    }

    /// When the response was received (to the millisecond).
    pub fn received_at(&self) -> SystemTime {
        self.times.received_at()
    }

    /// When the entry stops being fresh.
    pub fn fresh_until(&self) -> SystemTime {
        self.times.fresh_until()
    }

    /// Whether a stale copy may be served at once while a refresh runs.
    pub(crate) fn within_stale_while_revalidate(&self, now: SystemTime) -> bool {
        now < self.times.stale_while_revalidate_until()
    }

    /// Whether a stale copy may be served when the upstream fails.
    pub(crate) fn within_stale_if_error(&self, now: SystemTime) -> bool {
        now < self.times.stale_if_error_until()
    }

    /// After this instant the entry can serve no one, nor be revalidated: drop it.
    pub(crate) fn keep_until(&self) -> SystemTime {
        self.times.keep_until()
    }

    /// The `Age` to send, in seconds.
    pub fn age(&self, now: SystemTime) -> u64 {
        self.times
            .age()
            .saturating_add(self.times.resident(now))
            .as_secs()
    }

    /// What the entry costs the process, in bytes, as the allocator counts it: the
    /// entry itself, its head and body (or head, file pages and mapping), and its
    /// `Vary` data. The local tier adds its own per-entry records and the key.
    pub fn weight(&self) -> u32 {
        let file = self
            .body_file
            .as_ref()
            .map_or(0, |f| f.bytes().len() + f.overhead());
        let vary = self.vary.as_ref().map_or(0, |v| {
            weight::allocation(std::mem::size_of::<Vary>())
                + weight::allocation(std::mem::size_of_val(&*v.names))
                + v.names.iter().map(weight::header_name).sum::<usize>()
                + weight::allocation(v.values.len())
        });
        let total = weight::allocation(weight::ARC_HEADER + std::mem::size_of::<CacheEntry>())
            + weight::allocation(self.data.len())
            + weight::SHARED_BYTES
            + file
            + vary;
        u32::try_from(total).unwrap_or(u32::MAX)
    }

    /// Whether this entry is the variant for a request with `req_headers`.
    pub(crate) fn matches_vary(&self, req_headers: &HeaderMap) -> bool {
        match &self.vary {
            Some(vary) if !vary.names.is_empty() => {
                *vary_values(&vary.names, req_headers) == *vary.values
            }
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests;
