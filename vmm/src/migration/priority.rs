//! The CPU priority of the threads that copy memory while the guest runs.
//!
//! Pre-copy competes with the guest's own vCPU threads for the host's CPUs
//! (on a loaded host, or with source and destination on one host). A nice
//! value on the copying threads alone lets the vCPUs win: the guest keeps
//! its speed and the pre-copy takes what is left. Linux's setpriority(2)
//! with PRIO_PROCESS and a thread id changes that one thread (a documented
//! deviation from POSIX, which is per process); threads it spawns inherit
//! it. Raising a nice value needs no privilege, lowering it does, so only
//! a thread that ends with the pre-copy is made nicer: never one that goes
//! on to run vCPUs or the switch-over.

use std::io;

use super::MigrationError;

/// The highest nice value Linux has.
pub const MAX_NICE: u8 = 19;

fn current_tid() -> libc::id_t {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as libc::id_t }
}

/// The calling thread's nice value.
pub fn current_thread_nice() -> io::Result<i32> {
    let tid = current_tid();
    // getpriority returns the nice value itself, so -1 is a valid result:
    // errno tells an error from it.
    // SAFETY: errno is this thread's; the call only reads the scheduler's
    // value for `tid`.
    unsafe {
        *libc::__errno_location() = 0;
        let n = libc::getpriority(libc::PRIO_PROCESS, tid);
        match *libc::__errno_location() {
            0 => Ok(n),
            e => Err(io::Error::from_raw_os_error(e)),
        }
    }
}

/// Makes the calling thread at least as nice as `nice` (0 = leave it).
/// A thread already nicer stays as it is (lowering needs privilege).
/// Returns the thread's nice value afterwards.
pub fn lower_current_thread(nice: u8) -> io::Result<i32> {
    let now = current_thread_nice()?;
    let want = i32::from(nice.min(MAX_NICE));
    if want <= now {
        return Ok(now);
    }
    // SAFETY: changes only this thread's scheduling weight.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, current_tid(), want) } != 0 {
        return Err(io::Error::last_os_error());
    }
    current_thread_nice()
}

/// Runs `f` on a thread of its own named `name`, made at least as nice as
/// `nice` first (`lower_current_thread`), and waits for it; `f` gets the
/// nice value it runs at. The caller's own priority is never touched, so
/// whatever it does afterwards (a switch-over, starting vCPUs) keeps it.
pub fn run_at_nice<T: Send>(
    name: &str,
    nice: u8,
    f: impl FnOnce(i32) -> Result<T, MigrationError> + Send,
) -> Result<T, MigrationError> {
    std::thread::scope(|s| {
        let t = std::thread::Builder::new()
            .name(name.into())
            .spawn_scoped(s, || {
                f(lower_current_thread(nice).map_err(MigrationError::Priority)?)
            })
            .map_err(MigrationError::Priority)?;
        t.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_calling_thread_and_what_it_spawns_get_nicer() {
        let before = current_thread_nice().unwrap();
        let (mine, child) = std::thread::spawn(move || {
            let mine = lower_current_thread((before + 7).min(19) as u8).unwrap();
            let child = std::thread::spawn(|| current_thread_nice().unwrap())
                .join()
                .unwrap();
            (mine, child)
        })
        .join()
        .unwrap();
        assert_eq!(mine, (before + 7).min(19));
        assert_eq!(child, mine, "a thread spawned by it inherits it");
        assert_eq!(
            current_thread_nice().unwrap(),
            before,
            "the caller's is untouched"
        );
    }

    #[test]
    fn a_nicer_thread_stays_as_it_is_and_zero_changes_nothing() {
        let got = std::thread::spawn(|| {
            let ten = lower_current_thread(10).unwrap();
            let five = lower_current_thread(5).unwrap();
            let zero = lower_current_thread(0).unwrap();
            let max = lower_current_thread(200).unwrap();
            (ten, five, zero, max)
        })
        .join()
        .unwrap();
        assert_eq!(got, (10, 10, 10, i32::from(MAX_NICE)));
    }
}
