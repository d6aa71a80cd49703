//! Where a migration goes: `unix:PATH` or `tcp:HOST:PORT`, the latter
//! optionally with TLS 1.3 and mutual authentication (rustls): both sides
//! present a certificate signed by the CA the other trusts, and a peer
//! whose certificate does not verify is refused at the handshake. TLS is a
//! stream under `Connection`, so everything above it is the same.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use ldt_migration::{
    read_frame_rest, read_frame_start, read_unframed, write_frame_parts, Frame, FrameStart,
    MessageKind, PayloadReader, ProtocolError,
};

/// A migration endpoint.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(String),
    /// `tcp:HOST:PORT` with TLS and mutual authentication.
    TcpTls(String, TlsFiles),
}

impl Endpoint {
    /// This endpoint with TLS (`tcp:` only).
    pub fn with_tls(self, files: TlsFiles) -> Result<Endpoint, String> {
        match self {
            Endpoint::Tcp(a) | Endpoint::TcpTls(a, _) => Ok(Endpoint::TcpTls(a, files)),
            Endpoint::Unix(p) => Err(format!(
                "unix:{}: TLS applies to tcp: endpoints only",
                p.display()
            )),
        }
    }
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
            Endpoint::TcpTls(a, _) => write!(f, "tcp:{a} (TLS)"),
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
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.call(|s| s.write_vectored(bufs))
    }
    fn flush(&mut self) -> io::Result<()> {
        self.socket.flush()
    }
}

/// PEM files for TLS with mutual authentication: this side's certificate
/// chain and private key, and the CA that must have signed the peer's.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// Largest certificate or key file read (chains are a few KiB).
const MAX_PEM_FILE: u64 = 1 << 20;

/// How long a TLS handshake may take (a silent peer or a port probe must
/// not hold the listener).
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what)
}

impl TlsFiles {
    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// A PEM file's bytes: a regular file of a sane size (a FIFO or
    /// /dev/zero named by mistake must not hang or fill memory).
    fn pem(path: &Path) -> io::Result<Vec<u8>> {
        let (file, size) = crate::input_file::open(path, MAX_PEM_FILE)
            .map_err(|e| invalid(format!("TLS: {e}")))?;
        crate::input_file::read_all(path, file, size).map_err(|e| invalid(format!("TLS: {e}")))
    }

    fn certs(path: &Path) -> io::Result<Vec<CertificateDer<'static>>> {
        let certs = CertificateDer::pem_slice_iter(&Self::pem(path)?)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(format!("TLS certificates {}: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(invalid(format!("{} holds no certificate", path.display())));
        }
        Ok(certs)
    }

    fn identity(&self) -> io::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
        let key = PrivateKeyDer::from_pem_slice(&Self::pem(&self.key)?)
            .map_err(|e| invalid(format!("TLS key {}: {e}", self.key.display())))?;
        Ok((Self::certs(&self.cert)?, key))
    }

    fn roots(&self) -> io::Result<Arc<rustls::RootCertStore>> {
        let mut roots = rustls::RootCertStore::empty();
        for c in Self::certs(&self.ca)? {
            roots
                .add(c)
                .map_err(|e| invalid(format!("TLS CA {}: {e}", self.ca.display())))?;
        }
        Ok(Arc::new(roots))
    }

    /// The destination's side: TLS 1.3, a client certificate required.
    fn server_config(&self) -> io::Result<Arc<rustls::ServerConfig>> {
        let provider = Self::provider();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            self.roots()?,
            provider.clone(),
        )
        .build()
        .map_err(|e| invalid(format!("TLS CA {}: {e}", self.ca.display())))?;
        let (certs, key) = self.identity()?;
        rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| invalid(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .map(Arc::new)
            .map_err(|e| invalid(format!("TLS certificate {}: {e}", self.cert.display())))
    }

    /// The source's side: TLS 1.3, presenting its certificate.
    fn client_config(&self) -> io::Result<Arc<rustls::ClientConfig>> {
        let (certs, key) = self.identity()?;
        rustls::ClientConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| invalid(e.to_string()))?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(certs, key)
            .map(Arc::new)
            .map_err(|e| invalid(format!("TLS certificate {}: {e}", self.cert.display())))
    }
}

/// The TLS state both halves of a `Connection` share.
struct TlsShared {
    session: Mutex<rustls::Connection>,
    /// Ciphertext not yet on the socket; held while it goes out, so
    /// records never interleave. Kept across calls: a write that times out
    /// halfway resumes here instead of losing or repeating bytes.
    unsent: Mutex<Vec<u8>>,
}

/// One half of a TLS stream over TCP: blocking socket reads and writes
/// happen outside the session lock, so a reader waiting for data never
/// blocks a writer (or a timeout) on the other half.
struct TlsSocket {
    tcp: TcpStream,
    shared: Arc<TlsShared>,
    /// Ciphertext read from the socket that rustls has not taken yet.
    pending: Vec<u8>,
}

/// Bytes read from the socket at a time.
const TLS_READ_CHUNK: usize = 64 << 10;

impl TlsSocket {
    /// Runs the handshake on `tcp`; a peer whose certificate does not
    /// verify (or that speaks no TLS) fails it.
    fn handshake(mut tcp: TcpStream, mut session: rustls::Connection) -> io::Result<Self> {
        let peer = tcp
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "the peer".into());
        tcp.set_read_timeout(Some(TLS_HANDSHAKE_TIMEOUT))?;
        tcp.set_write_timeout(Some(TLS_HANDSHAKE_TIMEOUT))?;
        let done = (|| {
            while session.is_handshaking() {
                session.complete_io(&mut tcp)?;
            }
            while session.wants_write() {
                session.write_tls(&mut tcp)?;
            }
            Ok::<_, io::Error>(())
        })();
        done.map_err(|e| io::Error::new(e.kind(), format!("TLS handshake with {peer}: {e}")))?;
        tcp.set_read_timeout(None)?;
        tcp.set_write_timeout(None)?;
        Ok(TlsSocket {
            tcp,
            shared: Arc::new(TlsShared {
                session: Mutex::new(session),
                unsent: Mutex::new(Vec::new()),
            }),
            pending: Vec::new(),
        })
    }

    /// Sends whatever the session has queued (records, alerts, key updates).
    fn send_queued(&self) -> io::Result<()> {
        let mut out = self.shared.unsent.lock().unwrap();
        {
            let mut s = self.shared.session.lock().unwrap();
            while s.wants_write() {
                s.write_tls(&mut *out)?;
            }
        }
        while !out.is_empty() {
            match (&self.tcp).write(&out) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => drop(out.drain(..n)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl Read for TlsSocket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.shared.session.lock().unwrap().reader().read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                other => return other,
            }
            // No plaintext left: give rustls more ciphertext, read from the
            // socket only when none is pending.
            let eof = if self.pending.is_empty() {
                let mut raw = [0u8; TLS_READ_CHUNK];
                let n = self.tcp.read(&mut raw)?;
                self.pending.extend_from_slice(&raw[..n]);
                n == 0
            } else {
                false
            };
            let queued = {
                let mut s = self.shared.session.lock().unwrap();
                // Only as much as rustls takes now: what it decrypts must be
                // read out before it takes more ("plaintext buffer full").
                // An empty slice at EOF tells it the peer closed (an error
                // unless close_notify came first).
                let mut rest = &self.pending[..];
                let taken = s.read_tls(&mut rest)?;
                self.pending.drain(..taken);
                s.process_new_packets()
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                debug_assert!(!eof || taken == 0);
                s.wants_write()
            };
            if queued {
                self.send_queued()?;
            }
        }
    }
}

impl Write for TlsSocket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // What an earlier call left unsent goes first: a caller retrying
        // after a timeout must not hand the session its plaintext twice.
        self.send_queued()?;
        let n = self.shared.session.lock().unwrap().writer().write(buf)?;
        // Taken: from here a timeout only delays the ciphertext, which the
        // next write or flush sends.
        match self.send_queued() {
            Err(e)
                if !matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Err(e)
            }
            _ => Ok(n),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        self.send_queued()?;
        (&self.tcp).flush()
    }
}

impl Socket for TlsSocket {
    fn try_clone_box(&self) -> io::Result<Box<dyn Socket>> {
        Ok(Box::new(TlsSocket {
            tcp: self.tcp.try_clone()?,
            shared: self.shared.clone(),
            pending: Vec::new(),
        }))
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.tcp.set_read_timeout(t)
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.tcp.set_write_timeout(t)
    }
}

/// Where frames go: a connection or a snapshot file.
pub trait FrameSink {
    fn send(&mut self, kind: MessageKind, payload: &[u8]) -> io::Result<()> {
        self.send_parts(kind, &[payload])
    }
    /// Sends one frame whose payload is `parts` back to back.
    fn send_parts(&mut self, kind: MessageKind, parts: &[&[u8]]) -> io::Result<()>;
    /// Sends memory: a range table (`encode_memory_header`) and the data of
    /// its non-zero ranges in table order. The data must not change until
    /// this returns unless the sink reads it only once (a `Pages` stream).
    fn send_memory(&mut self, table: &[u8], data: &[&[u8]]) -> io::Result<()> {
        let mut parts = Vec::with_capacity(1 + data.len());
        parts.push(table);
        parts.extend_from_slice(data);
        self.send_parts(MessageKind::Memory, &parts)
    }
    fn flush(&mut self) -> io::Result<()>;
    /// Bytes written so far, headers included.
    fn bytes_sent(&self) -> u64;
}

impl FrameSink for Connection {
    fn send_parts(&mut self, kind: MessageKind, parts: &[&[u8]]) -> io::Result<()> {
        Connection::send_parts(self, kind, parts)
    }
    fn send_memory(&mut self, table: &[u8], data: &[&[u8]]) -> io::Result<()> {
        Connection::send_pages(self, table, data)
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
        self.send_parts(kind, &[payload])
    }

    /// Sends a frame whose payload is `parts` back to back (large parts go
    /// from where they are straight to the socket).
    pub fn send_parts(&mut self, kind: MessageKind, parts: &[&[u8]]) -> io::Result<()> {
        self.arm_writer();
        self.bytes_sent += parts.iter().map(|p| p.len() as u64).sum::<u64>() + 20;
        write_frame_parts(&mut self.writer, kind, parts)
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.arm_writer();
        self.writer.flush()
    }

    /// Sends a `Pages` message: the table as a frame, then the data as it
    /// is, with as few system calls as the socket allows (large runs go
    /// from where they are, guest memory, straight to the socket).
    pub fn send_pages(&mut self, table: &[u8], data: &[&[u8]]) -> io::Result<()> {
        self.send(MessageKind::Pages, table)?;
        let mut slices: Vec<io::IoSlice<'_>> = data
            .iter()
            .filter(|d| !d.is_empty())
            .map(|d| io::IoSlice::new(d))
            .collect();
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            match self.writer.write_vectored(rest) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.bytes_sent += n as u64;
                    io::IoSlice::advance_slices(&mut rest, n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes that follow a frame outside it (a `Pages`
    /// message's data), within the deadline of that frame's `recv_start`.
    pub fn recv_unframed(&mut self, buf: &mut [u8]) -> Result<(), ProtocolError> {
        read_unframed(&mut self.reader, buf)
    }

    /// Flushes, then waits for the next frame.
    pub fn recv(&mut self) -> Result<Frame, ProtocolError> {
        let start = self.recv_start()?;
        self.recv_rest(start)
    }

    /// Flushes, then waits for the next frame's header; its payload follows
    /// with `recv_rest` or piece by piece from `payload` (one deadline for
    /// the whole frame).
    pub fn recv_start(&mut self) -> Result<FrameStart, ProtocolError> {
        self.flush()?;
        self.reader.get_mut().deadline = self.op_deadline();
        read_frame_start(&mut self.reader)
    }

    /// The payload of the frame `start` began, whole.
    pub fn recv_rest(&mut self, start: FrameStart) -> Result<Frame, ProtocolError> {
        read_frame_rest(&mut self.reader, start)
    }

    /// The payload of the frame `start` began, to read in pieces (straight
    /// into their final place).
    pub fn payload(&mut self, start: &FrameStart) -> PayloadReader<'_, impl Read> {
        start.payload(&mut self.reader)
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
        Endpoint::TcpTls(a, files) => {
            let config = files.client_config()?;
            // The destination's certificate must name the host we dialled.
            let host = a.rsplit_once(':').map(|(h, _)| h).unwrap_or(a);
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let name = ServerName::try_from(host.to_string())
                .map_err(|e| invalid(format!("{host}: not a TLS server name: {e}")))?;
            let session =
                rustls::ClientConnection::new(config, name).map_err(|e| invalid(e.to_string()))?;
            let s = TcpStream::connect(a)?;
            s.set_nodelay(true)?;
            Box::new(TlsSocket::handshake(s, session.into())?)
        }
    };
    Connection::new(s)
}

/// A bound endpoint waiting for one source.
pub enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
    TcpTls(TcpListener, Arc<rustls::ServerConfig>),
}

impl Listener {
    pub fn bind(ep: &Endpoint) -> io::Result<Self> {
        Ok(match ep {
            Endpoint::Unix(p) => Listener::Unix(crate::unix_socket::bind_private(p)?, p.clone()),
            Endpoint::Tcp(a) => Listener::Tcp(TcpListener::bind(a)?),
            Endpoint::TcpTls(a, files) => {
                // Certificate files are checked before the port opens.
                let config = files.server_config()?;
                Listener::TcpTls(TcpListener::bind(a)?, config)
            }
        })
    }

    /// Accepts a connection if one is waiting (puts the listener in
    /// non-blocking mode until the next `accept`).
    pub fn try_accept(&self) -> io::Result<Option<Connection>> {
        match self.accept_mode(true) {
            Ok(c) => Ok(Some(c)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Accepts one connection.
    pub fn accept(&self) -> io::Result<Connection> {
        self.accept_mode(false)
    }

    fn accept_mode(&self, nonblocking: bool) -> io::Result<Connection> {
        match self {
            Listener::Unix(l, _) => {
                l.set_nonblocking(nonblocking)?;
                let s = l.accept()?.0;
                s.set_nonblocking(false)?;
                Connection::new(Box::new(s))
            }
            Listener::Tcp(l) | Listener::TcpTls(l, _) => {
                l.set_nonblocking(nonblocking)?;
                let s = l.accept()?.0;
                s.set_nonblocking(false)?;
                s.set_nodelay(true)?;
                let Listener::TcpTls(_, config) = self else {
                    return Connection::new(Box::new(s));
                };
                let session = rustls::ServerConnection::new(config.clone())
                    .map_err(|e| invalid(e.to_string()))?;
                Connection::new(Box::new(TlsSocket::handshake(s, session.into())?))
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

    #[test]
    fn tls_carries_a_long_stream_of_large_frames_intact() {
        let dir = std::env::temp_dir().join(format!("ldt-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = super::super::tls_certs::generate(&dir, "unit").unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let ep = Endpoint::Tcp(format!("127.0.0.1:{port}"))
            .with_tls(files)
            .unwrap();
        let listener = Listener::bind(&ep).unwrap();
        // Frames of odd sizes, so records and reads never line up.
        let sizes: Vec<usize> = (0..48).map(|i| (1 << 20) + i * 4099).collect();
        let sender = {
            let sizes = sizes.clone();
            std::thread::spawn(move || {
                let mut c = connect(&ep).unwrap();
                for (i, n) in sizes.iter().enumerate() {
                    c.send(MessageKind::Memory, &vec![i as u8; *n]).unwrap();
                }
                c.send(MessageKind::Commit, &[]).unwrap();
                // The answer proves the other direction works too.
                assert_eq!(c.recv().unwrap().kind, MessageKind::Resumed);
            })
        };
        let mut c = listener.accept().unwrap();
        for (i, n) in sizes.iter().enumerate() {
            let f = c.recv().unwrap();
            assert_eq!(f.payload.len(), *n);
            assert!(f.payload.iter().all(|b| *b == i as u8), "frame {i}");
        }
        assert_eq!(c.recv().unwrap().kind, MessageKind::Commit);
        c.send(MessageKind::Resumed, &[]).unwrap();
        c.flush().unwrap();
        sender.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
