//! Rate-limited warnings for failures a guest can repeat at will (a serial
//! byte written to `/dev/full` fails once per byte; a driver can break and
//! reset a virtio device in a loop): the first occurrence is logged, later
//! ones are counted, and at most one summary line per interval reports how
//! many were held back. [`crate::warn_limited!`] takes a limiter the caller keeps;
//! [`crate::warn_rate_limited!`] keeps one per call site.

use std::time::{Duration, Instant};

/// How often a repeating failure may log a line.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);

/// Decides which occurrences of one repeating failure get logged.
#[derive(Debug)]
pub struct WarnLimiter {
    interval: Duration,
    last_logged: Option<Instant>,
    held_back: u64,
}

impl Default for WarnLimiter {
    fn default() -> Self {
        Self::new(DEFAULT_INTERVAL)
    }
}

impl WarnLimiter {
    pub const fn new(interval: Duration) -> Self {
        WarnLimiter {
            interval,
            last_logged: None,
            held_back: 0,
        }
    }

    /// Records one occurrence at `now`. `Some(n)`: log this one, saying
    /// that `n` were held back since the last line; `None`: stay quiet.
    pub fn occurred(&mut self, now: Instant) -> Option<u64> {
        match self.last_logged {
            Some(t) if now.saturating_duration_since(t) < self.interval => {
                self.held_back = self.held_back.saturating_add(1);
                None
            }
            _ => {
                self.last_logged = Some(now);
                Some(std::mem::take(&mut self.held_back))
            }
        }
    }

    /// Occurrences counted but not yet reported.
    pub fn held_back(&self) -> u64 {
        self.held_back
    }
}

/// Logs `$($arg)+` at warn level through `$limiter`, appending the number of
/// occurrences held back since the previous line.
#[macro_export]
macro_rules! warn_limited {
    ($limiter:expr, $($arg:tt)+) => {
        match $limiter.occurred(::std::time::Instant::now()) {
            Some(0) => ::log::warn!($($arg)+),
            Some(n) => ::log::warn!("{} ({} more like it since the last report)", format_args!($($arg)+), n),
            None => {}
        }
    };
}

/// [`warn_limited!`] with a limiter of the call site's own (one per
/// process: one vmm runs one VM, one backend serves one device), for places that have no state to keep
/// one in, such as failures a guest can make a device repeat.
#[macro_export]
macro_rules! warn_rate_limited {
    ($($arg:tt)+) => {{
        static LIMITER: ::std::sync::Mutex<$crate::ratelimit::WarnLimiter> = ::std::sync::Mutex::new(
            $crate::ratelimit::WarnLimiter::new($crate::ratelimit::DEFAULT_INTERVAL),
        );
        let mut limiter = LIMITER
            .lock()
            .unwrap_or_else(::std::sync::PoisonError::into_inner);
        $crate::warn_limited!(limiter, $($arg)+);
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_is_logged_then_one_summary_per_interval() {
        let mut l = WarnLimiter::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(l.occurred(t0), Some(0));
        let logged = (1..=600u64)
            .map(|i| l.occurred(t0 + Duration::from_millis(i * 5)))
            .filter(Option::is_some)
            .count();
        assert_eq!(logged, 0, "600 failures in 3 s log nothing more");
        assert_eq!(l.held_back(), 600);
        assert_eq!(l.occurred(t0 + Duration::from_secs(10)), Some(600));
        assert_eq!(l.held_back(), 0);
        assert_eq!(l.occurred(t0 + Duration::from_secs(11)), None);
        assert_eq!(l.occurred(t0 + Duration::from_secs(25)), Some(1));
    }
}
