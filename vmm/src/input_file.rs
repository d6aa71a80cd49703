//! Files the operator names (kernel, initrd, flat payload, snapshots):
//! regular files only, their size known before anything reads them. A
//! FIFO would block the open, `/dev/zero` would be read until memory ran
//! out, a directory fails late with a confusing message.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Why an input file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("cannot read {path}: {err}")]
    Read { path: PathBuf, err: std::io::Error },
    #[error("{path} is {kind}, not a regular file")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{path} is {size} bytes, more than the {max} bytes it may have here")]
    TooBig { path: PathBuf, size: u64, max: u64 },
}

fn kind(t: std::fs::FileType) -> &'static str {
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "a special file"
    }
}

/// Opens `path` for reading if it is a regular file of at most `max`
/// bytes; returns the file and its size.
pub fn open(path: &Path, max: u64) -> Result<(File, u64), InputError> {
    let read = |err| InputError::Read {
        path: path.into(),
        err,
    };
    // O_NONBLOCK: opening a FIFO must not wait for a writer.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(read)?;
    let meta = file.metadata().map_err(read)?;
    if !meta.is_file() {
        return Err(InputError::NotRegular {
            path: path.into(),
            kind: kind(meta.file_type()),
        });
    }
    // SAFETY: F_SETFL on a descriptor this function owns; clears O_NONBLOCK
    // (meaningless for regular files, but reads should not see it).
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, 0) } != 0 {
        return Err(read(std::io::Error::last_os_error()));
    }
    if meta.len() > max {
        return Err(InputError::TooBig {
            path: path.into(),
            size: meta.len(),
            max,
        });
    }
    Ok((file, meta.len()))
}

/// Reads all of a file `open` accepted (`size` bytes; never more, should
/// it grow meanwhile).
pub fn read_all(path: &Path, file: File, size: u64) -> Result<Vec<u8>, InputError> {
    let mut data = Vec::with_capacity(size as usize);
    file.take(size)
        .read_to_end(&mut data)
        .map_err(|err| InputError::Read {
            path: path.into(),
            err,
        })?;
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_files_are_refused_by_kind() {
        let e = open(Path::new("/dev/zero"), u64::MAX).unwrap_err();
        assert_eq!(
            e.to_string(),
            "/dev/zero is a character device, not a regular file"
        );
        let e = open(Path::new("/"), u64::MAX).unwrap_err();
        assert!(e.to_string().contains("is a directory"), "{e}");
    }

    #[test]
    fn a_file_over_the_limit_is_refused_before_reading() {
        let me = std::env::current_exe().unwrap();
        let (f, size) = open(&me, u64::MAX).unwrap();
        assert!(size > 0);
        assert_eq!(read_all(&me, f, size).unwrap().len() as u64, size);
        let e = open(&me, size - 1).unwrap_err();
        assert!(matches!(e, InputError::TooBig { .. }), "{e}");
    }
}
