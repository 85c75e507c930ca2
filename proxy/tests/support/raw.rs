//! Raw sockets on both sides of corral, for the hostile-client suite: a client that
//! writes exactly the bytes a test gives it and reads responses off the wire, and an
//! origin that records exactly the bytes it received and how they were framed.
//!
//! The origin frames requests the way a plain HTTP/1.1 server does (RFC 9112 §6:
//! `Transfer-Encoding: chunked`, else `Content-Length`, else no body), so a request
//! that corral forwards with a length but without its bytes makes the origin wait for
//! them, and the next request on that connection becomes its "body": the smuggling a
//! test must be able to see.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use super::DEADLINE;

/// A response read off the wire.
#[derive(Debug, Clone)]
pub struct Wire {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Wire {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn cache_status(&self) -> &str {
        self.header("cache-status").unwrap_or("")
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One client connection that writes raw bytes and reads responses one by one.
pub struct RawClient {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl RawClient {
    pub async fn connect(addr: SocketAddr) -> RawClient {
        RawClient {
            stream: TcpStream::connect(addr).await.expect("connects"),
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, raw: &[u8]) {
        self.stream.write_all(raw).await.expect("request written");
    }

    /// Reads more bytes; false at the end of the stream (or a reset).
    pub async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        let n = tokio::time::timeout(DEADLINE, self.stream.read(&mut chunk))
            .await
            .expect("the server answers in time")
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n > 0
    }

    /// The next response; `head_only` for the answer to a HEAD.
    pub async fn response(&mut self, head_only: bool) -> Wire {
        loop {
            if let Some((wire, used)) = parse_response(&self.buf, head_only) {
                self.buf.drain(..used);
                return wire;
            }
            assert!(
                self.fill().await,
                "connection closed before a whole response; got {:?}",
                String::from_utf8_lossy(&self.buf)
            );
        }
    }

    /// Sends `raw` and reads one response.
    pub async fn exchange(&mut self, raw: &[u8]) -> Wire {
        self.send(raw).await;
        self.response(raw.starts_with(b"HEAD ")).await
    }

    /// A GET of `path` (host 127.0.0.1), and its response.
    pub async fn get(&mut self, path: &str) -> Wire {
        self.exchange(format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n").as_bytes())
            .await
    }

    /// Whether the server closed the connection (after any bytes still buffered).
    pub async fn closed(&mut self) -> bool {
        self.buf.is_empty() && !self.fill().await
    }
}

/// An h2c (HTTP/2 with prior knowledge) client connection to `addr`, driven in the
/// background.
pub async fn h2c<B>(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<B>
where
    B: http_body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(addr).await.expect("connects");
    let io = hyper_util::rt::TokioIo::new(stream);
    let (send, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .expect("h2c handshake");
    tokio::spawn(conn);
    send
}

/// Sends `raw` on a fresh connection and reads one response.
pub async fn exchange(addr: SocketAddr, raw: &[u8]) -> Wire {
    RawClient::connect(addr).await.exchange(raw).await
}

/// A whole response at the front of `buf`, and how many bytes it took.
/// (Also for streams other than `RawClient`s, such as a TLS client's.)
pub fn parse_response(buf: &[u8], head_only: bool) -> Option<(Wire, usize)> {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut res = httparse::Response::new(&mut headers);
    let len = match res.parse(buf).expect("a valid response head") {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial => return None,
    };
    let status = res.code.expect("status");
    let headers: Vec<(String, String)> = res
        .headers
        .iter()
        .map(|h| {
            let value = String::from_utf8_lossy(h.value).into_owned();
            (h.name.to_ascii_lowercase(), value)
        })
        .collect();
    let find = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v);
    let no_body = head_only || status == 304 || status == 204 || (100..200).contains(&status);
    let (body, used) = if no_body {
        (Vec::new(), len)
    } else if find("transfer-encoding").is_some_and(|te| te.contains("chunked")) {
        let (body, used) = dechunk(&buf[len..])?;
        (body, len + used)
    } else if let Some(cl) = find("content-length") {
        let cl: usize = cl.trim().parse().expect("numeric length");
        if buf.len() < len + cl {
            return None;
        }
        (buf[len..len + cl].to_vec(), len + cl)
    } else {
        panic!("response without framing (corral always frames): {headers:?}");
    };
    Some((
        Wire {
            status,
            headers,
            body,
        },
        used,
    ))
}

/// A chunked body at the front of `buf` (trailers skipped): its data and the bytes used.
fn dechunk(buf: &[u8]) -> Option<(Vec<u8>, usize)> {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let line_end = find_crlf(&buf[at..])? + at;
        let size_text = std::str::from_utf8(&buf[at..line_end]).ok()?;
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).ok()?;
        at = line_end + 2;
        if size == 0 {
            // Trailer fields, then the empty line.
            loop {
                let end = find_crlf(&buf[at..])? + at;
                let empty = end == at;
                at = end + 2;
                if empty {
                    return Some((body, at));
                }
            }
        }
        if buf.len() < at + size + 2 {
            return None;
        }
        body.extend_from_slice(&buf[at..at + size]);
        at += size + 2;
    }
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

/// One request as the origin parsed it off its connection.
#[derive(Debug, Clone)]
pub struct Received {
    /// Which accepted connection it came on (0, 1, ...).
    pub conn: usize,
    pub method: String,
    pub target: String,
    /// Header names lowercased; values byte for byte.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body as framed by the request's own headers (de-chunked).
    pub body: Vec<u8>,
    /// Every byte of the message: head and body as sent.
    pub raw: Vec<u8>,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }

    pub fn header_count(&self, name: &str) -> usize {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .count()
    }

    /// The path of the target (origin-form), without the query.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }
}

/// How the recording origin answers each request.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    /// Extra header lines (name, value); framing is added by the origin.
    pub headers: Vec<(String, String)>,
    /// `None`: the body names the request (`METHOD target`), so a test can tell which
    /// request an answer (or a cached copy) came from.
    pub body: Option<Vec<u8>>,
    /// Time before the answer is written.
    pub delay: Duration,
}

impl Default for Answer {
    fn default() -> Answer {
        Answer {
            status: 200,
            headers: vec![("cache-control".into(), "max-age=60".into())],
            body: None,
            delay: Duration::ZERO,
        }
    }
}

#[derive(Default)]
struct Record {
    received: Vec<Received>,
    /// Every byte each connection delivered, in order, whether or not it parsed.
    raw: Vec<Vec<u8>>,
    /// Connections whose bytes stopped parsing as HTTP/1.1 requests.
    garbled: Vec<usize>,
}

/// An HTTP/1.1 origin on raw sockets that records exactly what it receives.
#[derive(Clone)]
pub struct RecordingOrigin {
    addr: SocketAddr,
    answer: Arc<Mutex<Answer>>,
    record: Arc<Mutex<Record>>,
    arrived: Arc<Notify>,
}

impl RecordingOrigin {
    pub async fn start() -> RecordingOrigin {
        RecordingOrigin::answering(Answer::default()).await
    }

    pub async fn answering(answer: Answer) -> RecordingOrigin {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("origin binds");
        let origin = RecordingOrigin {
            addr: listener.local_addr().expect("bound"),
            answer: Arc::new(Mutex::new(answer)),
            record: Arc::default(),
            arrived: Arc::default(),
        };
        let accepting = origin.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let conn = {
                    let mut record = accepting.record.lock().unwrap();
                    record.raw.push(Vec::new());
                    record.raw.len() - 1
                };
                tokio::spawn(accepting.clone().serve(stream, conn));
            }
        });
        origin
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_answer(&self, answer: Answer) {
        *self.answer.lock().unwrap() = answer;
    }

    /// Every request parsed so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.record.lock().unwrap().received.clone()
    }

    /// The requests whose path (without query) is `path`.
    pub fn received_for(&self, path: &str) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.path() == path)
            .collect()
    }

    /// Every byte connection `conn` delivered.
    pub fn raw(&self, conn: usize) -> Vec<u8> {
        self.record.lock().unwrap().raw[conn].clone()
    }

    /// Connections whose bytes did not parse as a sequence of requests.
    pub fn garbled(&self) -> Vec<usize> {
        self.record.lock().unwrap().garbled.clone()
    }

    /// Waits until at least `n` requests have arrived; returns them.
    pub async fn wait_for(&self, n: usize) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let notified = self.arrived.notified();
            let received = self.received();
            if received.len() >= n {
                return received;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!("the origin received {} requests, not {n}", received.len());
            }
        }
    }

    async fn serve(self, mut stream: TcpStream, conn: usize) {
        let mut buf = Vec::new();
        loop {
            match parse_request(&buf) {
                Parsed::Complete(mut req, used) => {
                    req.conn = conn;
                    req.raw = buf[..used].to_vec();
                    buf.drain(..used);
                    let head_request = req.method == "HEAD";
                    let target = format!("{} {}", req.method, req.target);
                    self.record.lock().unwrap().received.push(req);
                    self.arrived.notify_waiters();
                    let answer = self.answer.lock().unwrap().clone();
                    tokio::time::sleep(answer.delay).await;
                    let bytes = render(&answer, &target, head_request);
                    if stream.write_all(&bytes).await.is_err() {
                        return;
                    }
                    continue;
                }
                Parsed::Garbled => {
                    self.record.lock().unwrap().garbled.push(conn);
                    self.arrived.notify_waiters();
                    let _ = stream
                        .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .await;
                    return;
                }
                Parsed::Partial => {}
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            buf.extend_from_slice(&chunk[..n]);
            self.record.lock().unwrap().raw[conn].extend_from_slice(&chunk[..n]);
        }
    }
}

fn render(answer: &Answer, target: &str, head_request: bool) -> Vec<u8> {
    let body = answer
        .body
        .clone()
        .unwrap_or_else(|| format!("answer to {target}").into_bytes());
    let mut out = format!("HTTP/1.1 {} X\r\n", answer.status).into_bytes();
    for (name, value) in &answer.headers {
        out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    let bodiless = answer.status == 204 || answer.status == 304;
    if !bodiless {
        out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    if !bodiless && !head_request {
        out.extend_from_slice(&body);
    }
    out
}

enum Parsed {
    Complete(Received, usize),
    Partial,
    Garbled,
}

fn parse_request(buf: &[u8]) -> Parsed {
    if buf.is_empty() {
        return Parsed::Partial;
    }
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Garbled,
    };
    let headers: Vec<(String, Vec<u8>)> = req
        .headers
        .iter()
        .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
        .collect();
    let value = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    };
    let (body, used) = if let Some(te) = value("transfer-encoding") {
        if !te.trim().eq_ignore_ascii_case("chunked") {
            return Parsed::Garbled;
        }
        match dechunk(&buf[len..]) {
            Some((body, used)) => (body, len + used),
            None => return Parsed::Partial,
        }
    } else if let Some(cl) = value("content-length") {
        let Ok(cl) = cl.trim().parse::<usize>() else {
            return Parsed::Garbled;
        };
        if buf.len() < len + cl {
            return Parsed::Partial;
        }
        (buf[len..len + cl].to_vec(), len + cl)
    } else {
        (Vec::new(), len)
    };
    Parsed::Complete(
        Received {
            conn: 0,
            method: req.method.unwrap_or("").to_string(),
            target: req.path.unwrap_or("").to_string(),
            headers,
            body,
            raw: Vec::new(),
        },
        used,
    )
}
