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
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use ldt_migration::{read_frame, write_frame, Frame, MessageKind, ProtocolError};

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
    /// Held while encrypted bytes go out, so records never interleave.
    writing: Mutex<()>,
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
                writing: Mutex::new(()),
            }),
            pending: Vec::new(),
        })
    }

    /// Sends whatever the session has queued (records, alerts, key updates).
    fn send_queued(&self) -> io::Result<()> {
        let _w = self.shared.writing.lock().unwrap();
        let mut out = Vec::new();
        {
            let mut s = self.shared.session.lock().unwrap();
            while s.wants_write() {
                s.write_tls(&mut out)?;
            }
        }
        (&self.tcp).write_all(&out)
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
        let n = self.shared.session.lock().unwrap().writer().write(buf)?;
        self.send_queued()?;
        Ok(n)
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
    fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.tcp.set_read_timeout(t)
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

    /// Accepts one connection.
    pub fn accept(&self) -> io::Result<Connection> {
        match self {
            Listener::Unix(l, _) => Connection::new(Box::new(l.accept()?.0)),
            Listener::Tcp(l) => {
                let s = l.accept()?.0;
                s.set_nodelay(true)?;
                Connection::new(Box::new(s))
            }
            Listener::TcpTls(l, config) => {
                let s = l.accept()?.0;
                s.set_nodelay(true)?;
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
