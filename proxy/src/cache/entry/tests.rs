//! Building entries: framing, the stored head, and what an entry keeps.

use super::*;
use http::header::HeaderValue;
use http::Response;

fn head(status: u16, headers: &[(&str, &str)]) -> response::Parts {
    let mut res = Response::builder().status(status);
    for (name, value) in headers {
        res = res.header(*name, *value);
    }
    res.body(()).unwrap().into_parts().0
}

fn lifetime() -> Lifetime {
    Lifetime {
        received_at: SystemTime::now(),
        age: Duration::ZERO,
        fresh_for: Duration::from_secs(60),
        stale_while_revalidate: Duration::ZERO,
        stale_if_error: Duration::ZERO,
        keep: Duration::ZERO,
    }
}

fn build(status: u16, headers: &[(&str, &str)], body: &'static [u8]) -> CacheEntry {
    CacheEntry::new(
        head(status, headers),
        Bytes::from_static(body),
        lifetime(),
        &HeaderMap::new(),
    )
    .unwrap()
}

/// Headers as hyper parses them: slices of one read buffer. The entry keeps none
/// of that buffer (it would pin the whole buffer for as long as it lives).
#[test]
fn stored_headers_do_not_point_into_the_buffer_they_were_parsed_from() {
    let buffer = Bytes::from_static(b"x-custom-name: shared value\r\nx-other: 2\r\n");
    let within = |p: *const u8| {
        let start = buffer.as_ptr() as usize;
        (start..start + buffer.len()).contains(&(p as usize))
    };
    let mut res = head(200, &[]);
    let name = HeaderName::from_bytes(&buffer[..13]).unwrap();
    let value = HeaderValue::from_maybe_shared(buffer.slice(15..27)).unwrap();
    assert!(
        within(value.as_bytes().as_ptr()),
        "the test's value is a slice"
    );
    res.headers.append(name, value);
    let entry =
        CacheEntry::new(res, Bytes::from_static(b"b"), lifetime(), &HeaderMap::new()).unwrap();
    let stored = entry
        .header(&HeaderName::from_static("x-custom-name"))
        .expect("kept");
    assert_eq!(stored, b"shared value");
    assert!(!within(stored.as_ptr()));
    for (name, value) in entry.fields() {
        assert!(!within(name.as_ptr()) && !within(value.as_ptr()));
    }
    for (name, value) in &entry.headers() {
        assert!(!within(name.as_str().as_ptr()) && !within(value.as_bytes().as_ptr()));
    }
}

/// Head and body of a small entry are one allocation, the body right after the head,
/// and neither is the filler's buffer.
#[test]
fn a_small_entry_keeps_head_and_body_in_one_buffer_of_its_own() {
    let body = Bytes::from(vec![b'x'; 1024]);
    let res = head(200, &[("etag", "\"v1\""), ("x-a", "1")]);
    let entry = CacheEntry::new(res, body.clone(), lifetime(), &HeaderMap::new()).unwrap();
    assert_eq!(entry.body(), body);
    assert_ne!(entry.body().as_ptr(), body.as_ptr());
    let head_end = entry.http1_head().as_ptr_range().end;
    assert_eq!(entry.body().as_ptr(), head_end);
    let fields: Vec<(&[u8], &[u8])> = entry.fields().collect();
    assert_eq!(
        fields,
        [
            (&b"etag"[..], &b"\"v1\""[..]),
            (b"x-a", b"1"),
            (b"content-length", b"1024")
        ]
    );
    assert!(!entry.has_date());
}

/// A soft purge changes the lifetime only: the copy shares head and body.
#[test]
fn a_soft_purged_copy_shares_head_and_body() {
    let entry = build(200, &[("x-a", "1")], b"body");
    let purged = entry.soft_purged(SystemTime::now());
    assert_eq!(purged.http1_head().as_ptr(), entry.http1_head().as_ptr());
    assert_eq!(purged.body().as_ptr(), entry.body().as_ptr());
    assert!(!purged.freshness(SystemTime::now()).is_fresh());
    assert!(entry.freshness(SystemTime::now()).is_fresh());
}

#[test]
fn upstream_framing_is_replaced_by_the_bodys_length() {
    let entry = build(
        200,
        &[
            ("transfer-encoding", "chunked"),
            ("content-length", "999"),
            ("content-length", "3"),
            ("connection", "close, x-hop"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("upgrade", "h2c"),
            ("trailer", "x-sum"),
            ("proxy-authenticate", "Basic"),
            ("proxy-status", "origin; error=x"),
            ("age", "100"),
            ("x-kept", "yes"),
        ],
        b"hello",
    );
    let headers = entry.headers();
    let mut names: Vec<&str> = headers.keys().map(|n| n.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["content-length", "x-kept"]);
    assert_eq!(headers[header::CONTENT_LENGTH], "5");
    let head = std::str::from_utf8(entry.http1_head()).unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert_eq!(head.matches("content-length").count(), 1, "{head}");
}

#[test]
fn interim_statuses_are_refused() {
    for status in [100, 101, 103] {
        let res = CacheEntry::new(
            head(status, &[("upgrade", "websocket")]),
            Bytes::new(),
            lifetime(),
            &HeaderMap::new(),
        );
        assert_eq!(res.unwrap_err(), Unframeable::Status(status));
    }
}

#[test]
fn responses_without_content_carry_no_length_and_no_body() {
    for status in [204, 304] {
        let entry = build(status, &[("content-length", "10")], b"");
        assert!(entry.header(&header::CONTENT_LENGTH).is_none());
        let res = CacheEntry::new(
            head(status, &[]),
            Bytes::from_static(b"x"),
            lifetime(),
            &HeaderMap::new(),
        );
        assert!(matches!(res, Err(Unframeable::BodyNotAllowed { .. })));
    }
}

proptest::proptest! {
    /// Whatever framing the upstream sent, the prebuilt head frames the body.
    #[test]
    fn any_upstream_head_is_framed_by_the_body(
        status in 200u16..=599,
        fields in proptest::collection::vec((
            proptest::prop_oneof![
                proptest::strategy::Just("content-length"),
                proptest::strategy::Just("transfer-encoding"),
                proptest::strategy::Just("connection"),
                proptest::strategy::Just("upgrade"),
                proptest::strategy::Just("x-a"),
            ],
            "[ -~]{0,12}",
        ), 0..6),
        body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..32),
    ) {
        let fields: Vec<(&str, &str)> = fields.iter().map(|(n, v)| (*n, v.trim())).collect();
        let bodiless = status == 204 || status == 304;
        let body = if bodiless { Bytes::new() } else { Bytes::from(body) };
        let entry = CacheEntry::new(head(status, &fields), body, lifetime(), &HeaderMap::new()).unwrap();
        proptest::prop_assert_eq!(entry.status().as_u16(), status);
        let mut wire = entry.http1_head().to_vec();
        wire.extend_from_slice(b"\r\n");
        let mut parsed = [httparse::EMPTY_HEADER; 16];
        let mut res = httparse::Response::new(&mut parsed);
        proptest::prop_assert!(res.parse(&wire).unwrap().is_complete());
        let lengths: Vec<&[u8]> = res.headers.iter().filter(|h| h.name == "content-length").map(|h| h.value).collect();
        let expected = entry.body().len().to_string();
        if bodiless {
            proptest::prop_assert!(lengths.is_empty());
        } else {
            proptest::prop_assert_eq!(lengths, vec![expected.as_bytes()]);
        }
        proptest::prop_assert!(res.headers.iter().all(|h| !["transfer-encoding", "connection", "upgrade"].contains(&h.name)));
    }
}

/// A large body lives in a sealed file: the entry weighs the file's pages as the
/// kernel allocated them, the head's own allocation, and no copy of the body.
#[test]
fn a_large_entry_weighs_its_files_pages_and_no_heap_copy() {
    let len = crate::cache::body_file::MIN_BYTES * 4 + 1;
    let entry = CacheEntry::new(
        head(200, &[("etag", "\"v1\"")]),
        Bytes::from(vec![b'x'; len]),
        lifetime(),
        &HeaderMap::new(),
    )
    .unwrap();
    let file = entry.body_file.as_ref().expect("a large body gets a file");
    assert_eq!(entry.body().len(), len);
    assert_eq!(
        entry.data.len(),
        entry.http1_head().len(),
        "no heap copy of the body"
    );
    let pages = rustix::fs::fstat(file).unwrap().st_blocks as usize * 512;
    assert!(pages >= len);
    let weight = entry.weight() as usize;
    assert!(
        weight >= pages + entry.http1_head().len() && weight <= pages + 4096,
        "weight {weight}, file pages {pages}"
    );
}
