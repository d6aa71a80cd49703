//! Where a migration goes: `unix:PATH` or `tcp:HOST:PORT`.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use ldt_migration::{read_frame, write_frame, Frame, MessageKind, ProtocolError};

/// A migration endpoint.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(String),
}

impl FromStr for Endpoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("unix: needs a path".into());
            }
            Ok(Endpoint::Unix(p.into()))
        } else if let Some(a) = s.strip_prefix("tcp:") {
            match a.rsplit_once(':') {
                Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => {
                    Ok(Endpoint::Tcp(a.into()))
                }
                _ => Err(format!("tcp:{a}: expected tcp:HOST:PORT")),
            }
        } else {
            Err(format!("{s}: expected unix:PATH or tcp:HOST:PORT"))
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

trait Socket: Read + Write + Send {
    fn try_clone_box(&self) -> io::Result<Box<dyn Socket>>;
    fn set_timeout(&self, t: Option<Duration>) -> io::Result<()>;
}

impl Socket for UnixStream {
    fn try_clone_box(&self) -> io::Result<Box<dyn Socket>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)
    }
}

impl Socket for TcpStream {
    fn try_clone_box(&self) -> io::Result<Box<dyn Socket>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)
    }
}

/// Where frames go: a connection or a snapshot file.
pub trait FrameSink {
    fn send(&mut self, kind: MessageKind, payload: &[u8]) -> io::Result<()>;
    fn flush(&mut self) -> io::Result<()>;
    /// Bytes written so far, headers included.
    fn bytes_sent(&self) -> u64;
}

impl FrameSink for Connection {
    fn send(&mut self, kind: MessageKind, payload: &[u8]) -> io::Result<()> {
        Connection::send(self, kind, payload)
    }
    fn flush(&mut self) -> io::Result<()> {
        Connection::flush(self)
    }
    fn bytes_sent(&self) -> u64 {
        self.bytes_sent
    }
}

/// A framed, buffered connection.
pub struct Connection {
    reader: BufReader<Box<dyn Socket>>,
    writer: BufWriter<Box<dyn Socket>>,
    pub bytes_sent: u64,
}

impl Connection {
    fn new(s: Box<dyn Socket>) -> io::Result<Self> {
        let w = s.try_clone_box()?;
        Ok(Connection {
            reader: BufReader::with_capacity(1 << 20, s),
            writer: BufWriter::with_capacity(1 << 20, w),
            bytes_sent: 0,
        })
    }

    /// Sends a frame (buffered; `flush` or `recv` pushes it out).
    pub fn send(&mut self, kind: MessageKind, payload: &[u8]) -> io::Result<()> {
        self.bytes_sent += payload.len() as u64 + 20;
        write_frame(&mut self.writer, kind, payload)
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.writer.flush()
    }

    /// Flushes, then waits for the next frame.
    pub fn recv(&mut self) -> Result<Frame, ProtocolError> {
        self.writer.flush()?;
        read_frame(&mut self.reader)
    }

    /// Bounds how long `recv` waits (a hung peer then fails the migration).
    pub fn set_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        self.reader.get_ref().set_timeout(t)
    }
}

/// Connects to a waiting destination.
pub fn connect(ep: &Endpoint) -> io::Result<Connection> {
    let s: Box<dyn Socket> = match ep {
        Endpoint::Unix(p) => Box::new(UnixStream::connect(p)?),
        Endpoint::Tcp(a) => {
            let s = TcpStream::connect(a)?;
            s.set_nodelay(true)?;
            Box::new(s)
        }
    };
    Connection::new(s)
}

/// A bound endpoint waiting for one source.
pub enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Listener {
    pub fn bind(ep: &Endpoint) -> io::Result<Self> {
        Ok(match ep {
            Endpoint::Unix(p) => Listener::Unix(crate::unix_socket::bind_private(p)?, p.clone()),
            Endpoint::Tcp(a) => Listener::Tcp(TcpListener::bind(a)?),
        })
    }

    /// Accepts one connection.
    pub fn accept(&self) -> io::Result<Connection> {
        match self {
            Listener::Unix(l, _) => Connection::new(Box::new(l.accept()?.0)),
            Listener::Tcp(l) => {
                let s = l.accept()?.0;
                s.set_nodelay(true)?;
                Connection::new(Box::new(s))
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_and_print() {
        assert_eq!(
            "unix:/tmp/m.sock".parse(),
            Ok(Endpoint::Unix("/tmp/m.sock".into()))
        );
        assert_eq!(
            "tcp:127.0.0.1:4444".parse(),
            Ok(Endpoint::Tcp("127.0.0.1:4444".into()))
        );
        assert_eq!(Endpoint::Tcp("h:1".into()).to_string(), "tcp:h:1");
        for bad in [
            "unix:",
            "tcp:host",
            "tcp:host:port",
            "tcp::80",
            "/tmp/x",
            "udp:1:2",
        ] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad}");
        }
    }
}
