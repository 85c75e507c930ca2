//! A minimal RESP2 client: one command at a time on one connection, enough for the
//! launchers to drive and inspect Redis (and for tests to poke a node) without making
//! every user of this crate build the `redis` crate.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// How long one command may take on a local node before it counts as failed (a frozen
/// or dying node must not stall a poll past its deadline).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// One RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Status(String),
    /// An error reply, such as `MOVED 3999 127.0.0.1:6381`.
    Error(String),
    Int(i64),
    /// `None` for the null bulk string.
    Bulk(Option<Vec<u8>>),
    /// `None` for the null array.
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// A status or bulk string reply as text (lossy UTF-8); `None` for the others.
    pub fn text(&self) -> Option<String> {
        match self {
            Reply::Status(s) => Some(s.clone()),
            Reply::Bulk(Some(bytes)) => Some(String::from_utf8_lossy(bytes).into_owned()),
            _ => None,
        }
    }

    /// The elements of an array reply; empty for anything else.
    pub fn into_array(self) -> Vec<Reply> {
        match self {
            Reply::Array(Some(items)) => items,
            _ => Vec::new(),
        }
    }
}

/// One connection to one node of 127.0.0.1.
pub struct Conn {
    stream: BufReader<TcpStream>,
}

impl Conn {
    pub async fn connect(port: u16) -> io::Result<Conn> {
        let stream = TcpStream::connect(("127.0.0.1", port)).await?;
        Ok(Conn {
            stream: BufReader::new(stream),
        })
    }

    /// Sends one command and reads its reply; an error reply is `Ok(Reply::Error)`.
    pub async fn cmd<A: AsRef<[u8]>>(&mut self, args: &[A]) -> io::Result<Reply> {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for arg in args {
            let arg = arg.as_ref();
            out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            out.extend_from_slice(arg);
            out.extend_from_slice(b"\r\n");
        }
        let exchange = async {
            self.stream.get_mut().write_all(&out).await?;
            read_reply(&mut self.stream).await
        };
        tokio::time::timeout(COMMAND_TIMEOUT, exchange)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no reply in time"))?
    }
}

/// One command on a fresh connection to `port`.
pub async fn command<A: AsRef<[u8]>>(port: u16, args: &[A]) -> io::Result<Reply> {
    let connect = tokio::time::timeout(COMMAND_TIMEOUT, Conn::connect(port))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no connection in time"))?;
    connect?.cmd(args).await
}

/// Reads one reply; boxed because arrays nest.
fn read_reply(
    stream: &mut BufReader<TcpStream>,
) -> Pin<Box<dyn Future<Output = io::Result<Reply>> + Send + '_>> {
    Box::pin(async move {
        let mut line = String::new();
        if stream.read_line(&mut line).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let line = line.trim_end_matches("\r\n");
        let (kind, rest) = line.split_at(line.len().min(1));
        let number = || {
            rest.parse::<i64>()
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, line.to_string()))
        };
        Ok(match kind {
            "+" => Reply::Status(rest.to_string()),
            "-" => Reply::Error(rest.to_string()),
            ":" => Reply::Int(number()?),
            "$" => match usize::try_from(number()?) {
                Err(_) => Reply::Bulk(None),
                Ok(len) => {
                    let mut bytes = vec![0; len + 2];
                    stream.read_exact(&mut bytes).await?;
                    bytes.truncate(len);
                    Reply::Bulk(Some(bytes))
                }
            },
            "*" => match usize::try_from(number()?) {
                Err(_) => Reply::Array(None),
                Ok(len) => {
                    let mut items = Vec::with_capacity(len);
                    for _ in 0..len {
                        items.push(read_reply(stream).await?);
                    }
                    Reply::Array(Some(items))
                }
            },
            _ => return Err(io::Error::new(io::ErrorKind::InvalidData, line.to_string())),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RedisServer;

    fn bulk(text: &str) -> Reply {
        Reply::Bulk(Some(text.as_bytes().to_vec()))
    }

    #[tokio::test]
    async fn every_kind_of_reply_is_read() {
        let server = RedisServer::start().await;
        let mut conn = Conn::connect(server.port).await.unwrap();
        let set = conn.cmd(&["SET", "k", "a\r\nb"]).await.unwrap();
        assert_eq!(set, Reply::Status("OK".into()));
        assert_eq!(conn.cmd(&["GET", "k"]).await.unwrap(), bulk("a\r\nb"));
        assert_eq!(conn.cmd(&["GET", "none"]).await.unwrap(), Reply::Bulk(None));
        assert_eq!(conn.cmd(&["STRLEN", "k"]).await.unwrap(), Reply::Int(4));
        conn.cmd(&["RPUSH", "l", "x", ""]).await.unwrap();
        let list = conn.cmd(&["LRANGE", "l", "0", "-1"]).await.unwrap();
        assert_eq!(list.into_array(), vec![bulk("x"), bulk("")]);
        let pop = conn.cmd(&["BLPOP", "none", "0.01"]).await.unwrap();
        assert_eq!(pop, Reply::Array(None));
        let err = conn.cmd(&["INCR", "k"]).await.unwrap();
        assert!(matches!(err, Reply::Error(e) if e.starts_with("ERR ")));
        let reply = command(server.port, &[b"GET".to_vec(), b"k".to_vec()]).await;
        assert_eq!(reply.unwrap().text().as_deref(), Some("a\r\nb"));
    }
}
