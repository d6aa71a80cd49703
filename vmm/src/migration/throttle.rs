//! Auto-converge: a guest that dirties memory faster than it can be sent is
//! slowed down by parking its vCPUs for a growing share of every period
//! (the idea of QEMU's cpu-throttle), so the rounds shrink.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use crate::runner::{RunState, VmControl};

/// Length of one throttle period.
const PERIOD: Duration = Duration::from_millis(20);
/// First throttle step, increment per round, and ceiling (percent).
pub const INITIAL_PCT: u32 = 20;
pub const STEP_PCT: u32 = 10;
pub const MAX_PCT: u32 = 90;

/// Shared between the migration thread and the throttle thread.
#[derive(Default)]
pub struct Throttle {
    pct: AtomicU32,
    stop: AtomicBool,
}

impl Throttle {
    /// Current share of each period the vCPUs are parked.
    pub fn pct(&self) -> u32 {
        self.pct.load(Ordering::Relaxed)
    }

    /// Throttles harder: the first call starts at `INITIAL_PCT`.
    pub fn increase(&self) -> u32 {
        let next = match self.pct() {
            0 => INITIAL_PCT,
            p => (p + STEP_PCT).min(MAX_PCT),
        };
        self.pct.store(next, Ordering::Relaxed);
        next
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// The throttle thread's loop; returns (with the VM running) on `stop`.
    pub fn run(&self, ctl: &VmControl) {
        while !self.stop.load(Ordering::Relaxed) {
            let p = self.pct();
            if p == 0 {
                std::thread::sleep(PERIOD);
                continue;
            }
            if ctl.pause() != RunState::Paused {
                return;
            }
            std::thread::sleep(PERIOD * p / 100);
            ctl.resume();
            std::thread::sleep(PERIOD * (100 - p) / 100);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_steps_up_to_its_ceiling() {
        let t = Throttle::default();
        assert_eq!(t.pct(), 0);
        assert_eq!(t.increase(), INITIAL_PCT);
        assert_eq!(t.increase(), INITIAL_PCT + STEP_PCT);
        for _ in 0..20 {
            t.increase();
        }
        assert_eq!(t.pct(), MAX_PCT);
    }
}
