//! Request smuggling: what the origin receives is always a correctly framed message,
//! whatever framing the client tried.

use crate::support::raw::{exchange, RecordingOrigin};
use crate::support::Setup;

#[tokio::test]
async fn get_body_is_forwarded_with_its_bytes_or_not_at_all() {
    let origin = RecordingOrigin::start().await;
    let corral = Setup::default().start_in_front_of(&origin.url()).await;
    // The "body" is a whole second request: if corral forwarded the length without
    // the bytes, the origin would read the next request into it (or wait forever).
    let smuggled = b"GET /internal HTTP/1.1\r\nhost: x\r\n\r\n";
    let req = format!(
        "GET /x HTTP/1.1\r\nhost: a\r\ncontent-length: {}\r\n\r\n",
        smuggled.len()
    );
    let mut raw = req.into_bytes();
    raw.extend_from_slice(smuggled);
    let res = exchange(corral.addr(), &raw).await;
    assert_eq!(res.status, 200, "{res:?}");
    let next = exchange(corral.addr(), b"GET /y HTTP/1.1\r\nhost: a\r\n\r\n").await;
    assert_eq!(next.text(), "answer to GET /y");
    let got = origin.wait_for(2).await;
    assert!(origin.received_for("/internal").is_empty(), "{got:?}");
    assert!(origin.garbled().is_empty());
    for r in &got {
        let declared: usize = r.header("content-length").map_or(0, |v| v.parse().unwrap());
        assert_eq!(declared, r.body.len(), "framing of {r:?}");
    }
}
