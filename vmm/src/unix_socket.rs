//! Listening unix sockets (the API socket, `--incoming unix:`): created
//! owner-only (0600) whatever the umask, since whoever may connect controls
//! the VM; never over a file that is not a socket; over a socket only when
//! no process listens on it any more (left by a VMM that died).

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::{FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

/// Mode of the socket file: read and write (= connect) for the owner only.
pub const SOCKET_MODE: u32 = 0o600;

fn error(path: &Path, kind: io::ErrorKind, why: &str) -> io::Error {
    io::Error::new(kind, format!("{} {why}", path.display()))
}

/// Binds and listens on `path` (see the module comment).
pub fn bind_private(path: &Path) -> io::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => {
            return Err(error(
                path,
                io::ErrorKind::AlreadyExists,
                "exists and is not a socket: refusing to replace it",
            ))
        }
        Ok(_) if UnixStream::connect(path).is_ok() => {
            return Err(error(
                path,
                io::ErrorKind::AddrInUse,
                "is in use by a running process",
            ))
        }
        Ok(_) => std::fs::remove_file(path)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let bytes = path.as_os_str().as_encoded_bytes();
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(error(
            path,
            io::ErrorKind::InvalidInput,
            "is too long for a unix socket path",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket creation; the descriptor is owned right below.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let raw = std::os::unix::io::AsRawFd::as_raw_fd(&fd);
    // Linux creates the socket file with the socket inode's mode minus the
    // umask: setting the inode to 0600 before bind means the file never
    // exists with more (no window between bind and a chmod).
    // SAFETY: fchmod, bind and listen on the descriptor owned above, with a
    // sockaddr_un that lives across the call.
    unsafe {
        if libc::fchmod(raw, SOCKET_MODE) != 0
            || libc::bind(
                raw,
                (&addr as *const libc::sockaddr_un).cast(),
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            ) != 0
            || libc::listen(raw, 16) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    // Should a kernel not apply the inode mode, the file still ends 0600.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))?;
    Ok(UnixListener::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn scratch(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("ldt-sock-{}-{name}", std::process::id()))
    }

    #[test]
    fn a_regular_file_is_never_replaced() {
        let p = scratch("file");
        std::fs::write(&p, b"keep me").unwrap();
        let e = bind_private(&p).unwrap_err().to_string();
        assert!(e.contains("is not a socket: refusing to replace it"), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), b"keep me");
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn a_live_socket_is_refused_and_a_stale_one_replaced() {
        let p = scratch("live");
        let l = bind_private(&p).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        let e = bind_private(&p).unwrap_err().to_string();
        assert!(e.contains("in use"), "{e}");
        drop(l); // the file stays: a stale socket
        let l = bind_private(&p).unwrap();
        drop(l);
        std::fs::remove_file(&p).unwrap();
    }
}
