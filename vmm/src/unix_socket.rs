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
    // Bound and listening under a temporary name first, then linked into
    // place: whoever waits for the path to appear (a script, a test, a
    // stale-socket check as above) never meets a file that refuses
    // connections because listen() has not run yet.
    let Some(tmp) = staging_path(path) else {
        return bind_listen(path);
    };
    // Left by a process of the same pid that died between bind and link.
    if let Ok(m) = std::fs::symlink_metadata(&tmp) {
        if m.file_type().is_socket() {
            std::fs::remove_file(&tmp)?;
        }
    }
    let listener = bind_listen(&tmp)?;
    link_into_place(&tmp, path)?;
    Ok(listener)
}

/// Links the bound socket file `tmp` to `path` and removes `tmp`. link()
/// fails with EEXIST should a file have appeared at `path` since
/// `bind_private`'s checks: it is never replaced.
fn link_into_place(tmp: &Path, path: &Path) -> io::Result<()> {
    let linked = std::fs::hard_link(tmp, path);
    let _ = std::fs::remove_file(tmp);
    linked.map_err(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists {
            error(
                path,
                e.kind(),
                "appeared while binding: refusing to replace it",
            )
        } else {
            e
        }
    })
}

/// A name next to `path` for binding before the socket listens, or None
/// when such a name would not fit in a socket address (`path` is then
/// bound directly, with the short bind-to-listen window).
fn staging_path(path: &Path) -> Option<std::path::PathBuf> {
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = format!(".ldt-vmm-{}-{seq}.sock", std::process::id());
    let tmp = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.join(name),
        _ => std::path::PathBuf::from(name),
    };
    (tmp.as_os_str().len() < SUN_PATH_LEN).then_some(tmp)
}

/// sizeof(sockaddr_un.sun_path), the terminating NUL included.
const SUN_PATH_LEN: usize = 108;

/// socket(), bind() to `path` with mode 0600, listen().
fn bind_listen(path: &Path) -> io::Result<UnixListener> {
    let bytes = path.as_os_str().as_encoded_bytes();
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    debug_assert_eq!(addr.sun_path.len(), SUN_PATH_LEN);
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
        {
            return Err(io::Error::last_os_error());
        }
    }
    // From here on the file exists: it goes again if listening fails.
    // SAFETY: listen on the descriptor bound above.
    if unsafe { libc::listen(raw, 16) } != 0 {
        let e = io::Error::last_os_error();
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    // Should a kernel not apply the inode mode, the file still ends 0600.
    if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE)) {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
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

    /// The staging names left in `dir`.
    fn leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".ldt-vmm-"))
            .collect()
    }

    #[test]
    fn the_path_appears_only_once_it_accepts_connections() {
        let dir = scratch("appear");
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("s.sock");
        for _ in 0..200 {
            let watch = p.clone();
            // Connects the moment the file exists: a refusal means the
            // path was visible before listen().
            let watcher = std::thread::spawn(move || loop {
                if std::fs::symlink_metadata(&watch).is_ok() {
                    return UnixStream::connect(&watch).map(drop);
                }
                std::hint::spin_loop();
            });
            let l = bind_private(&p).unwrap();
            watcher.join().unwrap().unwrap();
            drop(l);
            std::fs::remove_file(&p).unwrap();
        }
        assert_eq!(leftovers(&dir), Vec::<String>::new());
        std::fs::remove_dir(&dir).unwrap();
    }

    #[test]
    fn a_file_that_appears_while_binding_is_not_replaced_and_nothing_is_left() {
        let dir = scratch("race");
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("s.sock");
        // The staging name cannot be predicted from outside, so the race is
        // played by hand: bind under the staging name, then a file at `p`.
        let tmp = staging_path(&p).unwrap();
        let l = bind_listen(&tmp).unwrap();
        std::fs::write(&p, b"keep me").unwrap();
        let e = link_into_place(&tmp, &p).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert!(e.to_string().contains("appeared while binding"), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), b"keep me");
        assert_eq!(leftovers(&dir), Vec::<String>::new());
        drop(l);
        std::fs::remove_file(&p).unwrap();
        std::fs::remove_dir(&dir).unwrap();
    }

    #[test]
    fn a_path_with_no_room_for_the_staging_name_is_bound_directly() {
        // A directory so deep that only a short name fits after it.
        let base = scratch("deep");
        let pad = SUN_PATH_LEN - 1 - base.as_os_str().len() - "/s.sock".len() - 1;
        let dir = base.join("d".repeat(pad));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("s.sock");
        assert_eq!(p.as_os_str().len(), SUN_PATH_LEN - 1);
        assert!(staging_path(&p).is_none());
        let l = bind_private(&p).unwrap();
        UnixStream::connect(&p).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        drop(l);
        std::fs::remove_file(&p).unwrap();
        let e = bind_private(&dir.join("ss.sock")).unwrap_err().to_string();
        assert!(e.contains("too long"), "{e}");
        std::fs::remove_dir_all(&base).unwrap();
    }
}
