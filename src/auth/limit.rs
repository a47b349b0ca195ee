//! Login rate limits: fixed one-minute windows per client address and per username.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::RateLimit;

const WINDOW: Duration = Duration::from_secs(60);
/// Expired windows are swept once the table holds this many keys.
const SWEEP_AT: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Address(IpAddr),
    Username(String),
}

/// Counts login attempts.
pub(super) struct LoginLimiter {
    limits: RateLimit,
    windows: Mutex<HashMap<Key, (Instant, u32)>>,
}

impl LoginLimiter {
    pub(super) fn new(limits: RateLimit) -> Self {
        Self {
            limits,
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// Counts an attempt; false when the address or the username is over its limit.
    pub(super) fn attempt(&self, address: Option<IpAddr>, username: &str) -> bool {
        let Ok(mut windows) = self.windows.lock() else {
            return false;
        };
        let now = Instant::now();
        if windows.len() >= SWEEP_AT {
            windows.retain(|_, (start, _)| now.duration_since(*start) < WINDOW);
        }
        let mut allowed = true;
        let mut keys = vec![(Key::Username(username.to_lowercase()), self.limits.per_username)];
        if let Some(address) = address {
            keys.push((Key::Address(address), self.limits.per_address));
        }
        for (key, limit) in keys {
            let (start, count) = windows.entry(key).or_insert((now, 0));
            if now.duration_since(*start) >= WINDOW {
                *start = now;
                *count = 0;
            }
            *count += 1;
            allowed &= *count <= limit;
        }
        allowed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_apply_per_username_and_per_address() {
        let limiter = LoginLimiter::new(RateLimit {
            per_address: 3,
            per_username: 2,
        });
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        assert!(limiter.attempt(Some(a), "x@y.z"));
        assert!(limiter.attempt(Some(a), "X@Y.Z"));
        assert!(!limiter.attempt(Some(a), "x@y.z"), "third try for one username");
        assert!(!limiter.attempt(Some(a), "other@y.z"), "fourth try from one address");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        assert!(limiter.attempt(Some(b), "other@y.z"));
    }
}
