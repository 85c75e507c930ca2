//! A stored response's head, kept once, the way HTTP/1.1 writes it: the status line,
//! the stored fields, and `Via`. The fast path sends it as it is; every other reader
//! (hyper's path, conditional requests, purge tags, the Redis codec) reads the fields
//! back out of it. A parsed `HeaderMap` beside it cost about 1.4 KB per entry, more
//! than a 1 KiB body (`cargo bench --bench entry_memory`).
//!
//! The format is exact, so reading it needs no general parser: every line ends in
//! CRLF, which no header value contains; a field line is the lowercase name, `": "`,
//! and the value's bytes as they were; the `Via` line is last and always the same.

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, StatusCode};

use crate::http::headers::VIA;

/// What follows the stored fields.
fn via_line_len() -> usize {
    b"via: ".len() + VIA.len() + 2
}

/// The head's length for `status` and `headers` (to size the one buffer that holds
/// head and body together).
pub(super) fn len(status: StatusCode, headers: &HeaderMap) -> usize {
    let status_line =
        b"HTTP/1.1 ".len() + 3 + 1 + status.canonical_reason().map_or(0, str::len) + 2;
    let fields: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + 2 + value.len() + 2)
        .sum();
    status_line + fields + via_line_len()
}

/// Appends the head for `status` and `headers` to `out` ([`len`] bytes).
pub(super) fn write(status: StatusCode, headers: &HeaderMap, out: &mut Vec<u8>) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"via: ");
    out.extend_from_slice(VIA.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// The stored fields of a head [`write`] wrote, in their order: (name, value).
pub(crate) fn fields(head: &[u8]) -> Fields<'_> {
    let end = head.len().saturating_sub(via_line_len());
    let start = line_end(head).min(end);
    Fields {
        rest: &head[start..end],
    }
}

/// The index just past the first line end of `bytes` (its length without one). Every
/// line of a head ends in CRLF, and no value holds an LF: the LF ends the line.
fn line_end(bytes: &[u8]) -> usize {
    memchr::memchr(b'\n', bytes).map_or(bytes.len(), |at| at + 1)
}

/// Iterator over a head's fields; see [`fields`].
#[derive(Clone)]
pub(crate) struct Fields<'a> {
    rest: &'a [u8],
}

impl Fields<'_> {
    /// How many fields are left (one per line end).
    pub(crate) fn len(&self) -> usize {
        memchr::memchr_iter(b'\n', self.rest).count()
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let end = line_end(self.rest);
        let line = self.rest[..end]
            .strip_suffix(b"\r\n")
            .unwrap_or(&self.rest[..end]);
        self.rest = &self.rest[end..];
        // Names hold no colon; the value starts after exactly ": ".
        let colon = memchr::memchr(b':', line).unwrap_or(line.len());
        let value = line.get(colon + 2..).unwrap_or_default();
        Some((&line[..colon], value))
    }
}

/// The fields of `head` as a map whose values are slices of `head` (no copy).
pub(super) fn header_map(head: &Bytes) -> HeaderMap {
    let fields = fields(head);
    let mut map = HeaderMap::with_capacity(fields.len() + 3);
    for (name, value) in fields {
        // Both were a valid name and value when the head was written.
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name),
            HeaderValue::from_maybe_shared(head.slice_ref(value)),
        ) {
            map.append(name, value);
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head_of(status: u16, headers: &[(&str, &[u8])]) -> (Bytes, HeaderMap) {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_bytes(value).unwrap(),
            );
        }
        let status = StatusCode::from_u16(status).unwrap();
        let mut out = Vec::new();
        write(status, &map, &mut out);
        assert_eq!(out.len(), len(status, &map));
        (Bytes::from(out), map)
    }

    #[test]
    fn fields_read_back_what_was_written_in_order_and_byte_for_byte() {
        let (head, map) = head_of(
            299,
            &[
                ("x-a", b"1"),
                ("etag", b"\"v1\""),
                ("x-a", b"two: with colon"),
                ("x-spaces", b" leading and trailing "),
                ("x-empty", b""),
                ("x-obs", b"caf\xe9"),
            ],
        );
        let read: Vec<(&[u8], &[u8])> = fields(&head).collect();
        let written: Vec<(&[u8], &[u8])> = map
            .iter()
            .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()))
            .collect();
        assert_eq!(read, written);
        assert_eq!(header_map(&head), map);
    }

    #[test]
    fn a_head_without_fields_has_none() {
        for status in [200, 299, 599] {
            let (head, _) = head_of(status, &[]);
            assert_eq!(fields(&head).count(), 0, "{status}");
            assert!(head.ends_with(b"via: 1.1 corral\r\n"));
        }
    }
}
