//! Where the serial console's output goes.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

/// Serial output: the process's stdout (flushed per write, so a console
/// line appears when the guest writes it) or a buffer tests can read.
#[derive(Clone)]
pub enum ConsoleOut {
    Stdout,
    Buffer(Arc<Mutex<Vec<u8>>>),
    Discard,
}

impl ConsoleOut {
    /// A fresh capture buffer and the writer feeding it.
    pub fn buffer() -> (ConsoleOut, Arc<Mutex<Vec<u8>>>) {
        let b = Arc::new(Mutex::new(Vec::new()));
        (ConsoleOut::Buffer(b.clone()), b)
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            ConsoleOut::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(buf)?;
                out.flush()?;
            }
            ConsoleOut::Buffer(b) => b.lock().unwrap().extend_from_slice(buf),
            ConsoleOut::Discard => {}
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            ConsoleOut::Stdout => io::stdout().flush(),
            _ => Ok(()),
        }
    }
}
