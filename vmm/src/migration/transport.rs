//! Where a migration goes: `unix:PATH` or `tcp:HOST:PORT`.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, Instant};

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
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()>;
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()>;
}

impl Socket for UnixStream {
    fn try_clone_box(&self) -> io::Result<Box<dyn Socket>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, t)
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        UnixStream::set_write_timeout(self, t)
    }
}

impl Socket for TcpStream {
    fn try_clone_box(&self) -> io::Result<Box<dyn Socket>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, t)
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        TcpStream::set_write_timeout(self, t)
    }
}

/// One direction of a socket with a deadline: every read or write system
/// call waits at most until `deadline`, and once it has passed every call
/// fails at once. A per-call timeout alone would let a peer that trickles a
/// byte a second hold the other side forever; a deadline cannot be stretched.
struct DeadlineIo {
    socket: Box<dyn Socket>,
    deadline: Option<Instant>,
    /// The timeout last given to the socket, to skip redundant setsockopts.
    armed: Option<Duration>,
    write: bool,
}

impl DeadlineIo {
    fn new(socket: Box<dyn Socket>, write: bool) -> Self {
        DeadlineIo {
            socket,
            deadline: None,
            armed: None,
            write,
        }
    }

    /// Arms the socket's timeout with what is left until the deadline.
    fn arm(&mut self) -> io::Result<()> {
        let Some(d) = self.deadline else {
            if self.armed.is_some() {
                self.set(None)?;
            }
            return Ok(());
        };
        let left = d.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timed_out(self.write));
        }
        // Round up to whole milliseconds: most calls then need no setsockopt.
        let left = Duration::from_millis(left.as_millis() as u64 + 1);
        if self
            .armed
            .is_none_or(|a| a > left || a + Duration::from_millis(50) < left)
        {
            self.set(Some(left))?;
        }
        Ok(())
    }

    fn set(&mut self, t: Option<Duration>) -> io::Result<()> {
        if self.write {
            self.socket.set_write_timeout(t)?;
        } else {
            self.socket.set_read_timeout(t)?;
        }
        self.armed = t;
        Ok(())
    }

    /// Runs one system call, again while a socket timeout fired before the
    /// deadline (the socket's timeout may be shorter than what is left).
    fn call<T>(&mut self, mut op: impl FnMut(&mut dyn Socket) -> io::Result<T>) -> io::Result<T> {
        loop {
            self.arm()?;
            match op(self.socket.as_mut()) {
                Err(e)
                    if self.deadline.is_some()
                        && matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) => {}
                r => return r,
            }
        }
    }
}

fn timed_out(write: bool) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        if write {
            "timed out: the peer stopped reading before the deadline"
        } else {
            "timed out: the peer sent nothing (or too little) before the deadline"
        },
    )
}

impl Read for DeadlineIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.call(|s| s.read(buf))
    }
}

impl Write for DeadlineIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.call(|s| s.write(buf))
    }
    fn flush(&mut self) -> io::Result<()> {
        self.socket.flush()
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

/// A framed, buffered connection. Every send, flush and receive is bounded
/// by a deadline: the nearer of the per-operation timeout (`set_timeout`)
/// counted from the operation's start, and an absolute deadline
/// (`set_deadline`) such as the end of the switch-over budget.
pub struct Connection {
    reader: BufReader<DeadlineIo>,
    writer: BufWriter<DeadlineIo>,
    pub bytes_sent: u64,
    op_timeout: Option<Duration>,
    deadline: Option<Instant>,
}

impl Connection {
    fn new(s: Box<dyn Socket>) -> io::Result<Self> {
        let w = s.try_clone_box()?;
        Ok(Connection {
            reader: BufReader::with_capacity(1 << 20, DeadlineIo::new(s, false)),
            writer: BufWriter::with_capacity(1 << 20, DeadlineIo::new(w, true)),
            bytes_sent: 0,
            op_timeout: None,
            deadline: None,
        })
    }

    /// The deadline of an operation starting now.
    fn op_deadline(&self) -> Option<Instant> {
        let op = self.op_timeout.map(|t| Instant::now() + t);
        match (op, self.deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn arm_writer(&mut self) {
        self.writer.get_mut().deadline = self.op_deadline();
    }

    /// Sends a frame (buffered; `flush` or `recv` pushes it out).
    pub fn send(&mut self, kind: MessageKind, payload: &[u8]) -> io::Result<()> {
        self.arm_writer();
        self.bytes_sent += payload.len() as u64 + 20;
        write_frame(&mut self.writer, kind, payload)
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.arm_writer();
        self.writer.flush()
    }

    /// Flushes, then waits for the next frame.
    pub fn recv(&mut self) -> Result<Frame, ProtocolError> {
        self.flush()?;
        self.reader.get_mut().deadline = self.op_deadline();
        read_frame(&mut self.reader)
    }

    /// Bounds every later send, flush and receive to `t` each (`None`: no
    /// per-operation bound). A hung or trickling peer then fails the
    /// migration instead of holding it.
    pub fn set_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        self.op_timeout = t;
        Ok(())
    }

    /// Ends every operation at `at` at the latest (`None`: no such bound).
    pub fn set_deadline(&mut self, at: Option<Instant>) {
        self.deadline = at;
    }

    /// Best effort, bounded by `within`: tells the peer why we give up.
    pub fn send_abort(&mut self, why: &str, within: Duration) {
        self.deadline = Some(Instant::now() + within);
        let _ = self.send(MessageKind::Abort, why.as_bytes());
        let _ = self.flush();
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
            Endpoint::Unix(p) => {
                if p.exists() && UnixStream::connect(p).is_err() {
                    std::fs::remove_file(p)?;
                }
                Listener::Unix(UnixListener::bind(p)?, p.clone())
            }
            Endpoint::Tcp(a) => Listener::Tcp(TcpListener::bind(a)?),
        })
    }

    /// Accepts a connection if one is waiting (puts the listener in
    /// non-blocking mode: use it for polling only from then on).
    pub fn try_accept(&self) -> io::Result<Option<Connection>> {
        let r = match self {
            Listener::Unix(l, _) => {
                l.set_nonblocking(true)?;
                l.accept().and_then(|(s, _)| {
                    s.set_nonblocking(false)?;
                    Connection::new(Box::new(s))
                })
            }
            Listener::Tcp(l) => {
                l.set_nonblocking(true)?;
                l.accept().and_then(|(s, _)| {
                    s.set_nonblocking(false)?;
                    s.set_nodelay(true)?;
                    Connection::new(Box::new(s))
                })
            }
        };
        match r {
            Ok(c) => Ok(Some(c)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
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
