//! Property tests of the fast path's head parser: no input makes it panic, and a
//! request it parses is handed on byte for byte, with the body length it declared.

use bytes::BytesMut;
use proptest::prelude::*;

use super::{parse, Parse};

fn header_line() -> impl Strategy<Value = String> {
    ("[a-zA-Z][a-zA-Z0-9-]{0,12}", "[ -~]{0,20}").prop_map(|(n, v)| format!("{n}: {v}\r\n"))
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut buf = BytesMut::from(&bytes[..]);
        let before = buf.clone();
        match parse(&mut buf) {
            // Nothing taken: the bytes go to hyper as they came.
            Parse::Partial | Parse::NotPlainHttp1 => prop_assert_eq!(buf, before),
            Parse::Complete(head) => {
                let mut joined = head.bytes.to_vec();
                joined.extend_from_slice(&buf);
                prop_assert_eq!(&joined[..], &before[..]);
            }
        }
    }

    #[test]
    fn parsed_heads_are_handed_on_whole(
        method in prop_oneof!["GET", "HEAD", "POST", "PUT"],
        path in "/[a-zA-Z0-9/._~%-]{0,30}",
        headers in proptest::collection::vec(header_line(), 0..6),
        body in proptest::collection::vec(any::<u8>(), 0..64),
        rest in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nhost: a\r\n{}content-length: {}\r\n\r\n",
            headers.concat(),
            body.len()
        );
        let mut raw = head.clone().into_bytes();
        raw.extend_from_slice(&body);
        raw.extend_from_slice(&rest);
        let mut buf = BytesMut::from(&raw[..]);
        match parse(&mut buf) {
            Parse::Complete(parsed) => {
                prop_assert_eq!(&parsed.bytes[..], head.as_bytes());
                prop_assert_eq!(parsed.body_len, body.len() as u64);
                prop_assert_eq!(&buf[..body.len()], &body[..]);
            }
            // A generated header the parser leaves to hyper (Content-Length twice,
            // Transfer-Encoding, Upgrade, a value it cannot read): all bytes kept.
            Parse::NotPlainHttp1 => prop_assert_eq!(&buf[..], &raw[..]),
            Parse::Partial => prop_assert!(false, "a whole head reported partial"),
        }
    }
}
