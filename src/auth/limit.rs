//! Login and sign-up rate limits: fixed one-minute windows per client address and per
//! username, in bounded memory.
//!
//! A login attempt counts when it starts and is taken back when it succeeds, so only
//! failures use up the limit (a user with several devices is never locked out) and
//! attempts running in parallel cannot slip past it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::RateLimit;

const WINDOW: Duration = Duration::from_secs(60);
/// The most keys kept. Past it, expired windows go first, then the half with the fewest
/// attempts (a key near its limit is the one worth keeping).
const MAX_KEYS: usize = 100_000;
/// Usernames are counted by at most this many bytes, so a key costs bounded memory.
const MAX_USERNAME_BYTES: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    LoginFrom(IpAddr),
    LoginAs(String),
    SignupFrom(IpAddr),
}

/// Counts attempts per key.
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

    /// Counts a login attempt; false (and nothing counted) when the address or the
    /// username has used up its failures.
    pub(super) fn begin_login(&self, address: Option<IpAddr>, username: &str) -> bool {
        let mut keys = vec![(username_key(username), self.limits.per_username)];
        if let Some(address) = address {
            keys.push((Key::LoginFrom(network_of(address)), self.limits.per_address));
        }
        self.take(&keys)
    }

    /// The login succeeded: it does not count against anyone.
    pub(super) fn login_succeeded(&self, address: Option<IpAddr>, username: &str) {
        let Ok(mut windows) = self.windows.lock() else {
            return;
        };
        let keys = [
            Some(username_key(username)),
            address.map(|a| Key::LoginFrom(network_of(a))),
        ];
        for key in keys.into_iter().flatten() {
            if let Some((_, count)) = windows.get_mut(&key) {
                *count = count.saturating_sub(1);
            }
        }
    }

    /// Counts a sign-up; false when the address has used up its sign-ups.
    pub(super) fn signup(&self, address: IpAddr) -> bool {
        self.take(&[(Key::SignupFrom(network_of(address)), self.limits.signups_per_address)])
    }

    /// Counts one attempt on every key if each is under its limit.
    fn take(&self, keys: &[(Key, u32)]) -> bool {
        let Ok(mut windows) = self.windows.lock() else {
            return false;
        };
        let now = Instant::now();
        if windows.len() + keys.len() > MAX_KEYS {
            make_room(&mut windows, now);
        }
        let current = |windows: &HashMap<Key, (Instant, u32)>, key: &Key| match windows.get(key) {
            Some((start, count)) if now.duration_since(*start) < WINDOW => *count,
            _ => 0,
        };
        if keys.iter().any(|(key, limit)| current(&windows, key) >= *limit) {
            return false;
        }
        for (key, _) in keys {
            let (start, count) = windows.entry(key.clone()).or_insert((now, 0));
            if now.duration_since(*start) >= WINDOW {
                *start = now;
                *count = 0;
            }
            *count += 1;
        }
        true
    }

    #[cfg(test)]
    fn keys(&self) -> usize {
        self.windows.lock().map_or(0, |w| w.len())
    }
}

/// An IPv6 client counts by its /64 (one end site gets a /64 or more, so single addresses
/// cost an attacker nothing); IPv4 by its address.
pub fn network_of(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut segments = v6.segments();
                segments[4..].fill(0);
                IpAddr::V6(segments.into())
            }
        },
        v4 => v4,
    }
}

fn username_key(username: &str) -> Key {
    let mut end = username.len().min(MAX_USERNAME_BYTES);
    while !username.is_char_boundary(end) {
        end -= 1;
    }
    Key::LoginAs(username[..end].to_lowercase())
}

fn make_room(windows: &mut HashMap<Key, (Instant, u32)>, now: Instant) {
    windows.retain(|_, (start, count)| now.duration_since(*start) < WINDOW && *count > 0);
    if windows.len() < MAX_KEYS / 2 {
        return;
    }
    let mut counts: Vec<u32> = windows.values().map(|(_, c)| *c).collect();
    let middle = counts.len() / 2;
    let (_, median, _) = counts.select_nth_unstable(middle);
    let median = *median;
    windows.retain(|_, (_, count)| *count > median);
    // All equal: keep none of them rather than all (the limits restart for those keys).
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_address: u32, per_username: u32) -> RateLimit {
        RateLimit {
            per_address,
            per_username,
            signups_per_address: 2,
        }
    }

    #[test]
    fn failures_count_per_username_and_per_address() {
        let limiter = LoginLimiter::new(limits(3, 2));
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        assert!(limiter.begin_login(Some(a), "x@y.z"));
        assert!(limiter.begin_login(Some(a), "X@Y.Z"));
        assert!(!limiter.begin_login(Some(a), "x@y.z"), "third failure for one username");
        assert!(limiter.begin_login(Some(a), "other@y.z"));
        assert!(
            !limiter.begin_login(Some(a), "third@y.z"),
            "fourth failure from one address"
        );
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        assert!(limiter.begin_login(Some(b), "other@y.z"));
    }

    #[test]
    fn successes_do_not_count() {
        let limiter = LoginLimiter::new(limits(100, 2));
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        for _ in 0..15 {
            assert!(limiter.begin_login(Some(a), "me@y.z"));
            limiter.login_succeeded(Some(a), "me@y.z");
        }
    }

    #[test]
    fn an_ipv6_client_counts_by_its_64() {
        let limiter = LoginLimiter::new(limits(2, 100));
        let a: IpAddr = "2001:db8:1:2::1".parse().expect("ip");
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().expect("ip");
        assert!(limiter.begin_login(Some(a), "x@y.z"));
        assert!(limiter.begin_login(Some(b), "y@y.z"));
        assert!(!limiter.begin_login(Some(a), "z@y.z"), "same /64");
        assert!(limiter.begin_login(Some("2001:db8:1:3::1".parse().expect("ip")), "z@y.z"));
    }

    #[test]
    fn sign_ups_are_limited_per_address() {
        let limiter = LoginLimiter::new(limits(100, 10));
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        assert!(limiter.signup(a) && limiter.signup(a));
        assert!(!limiter.signup(a));
        assert!(limiter.signup("10.0.0.2".parse().expect("ip")));
    }

    #[test]
    fn memory_stays_bounded_under_100000_usernames_and_an_attacked_one_stays_limited() {
        let limiter = LoginLimiter::new(limits(u32::MAX, 3));
        for _ in 0..3 {
            assert!(limiter.begin_login(None, "victim@y.z"));
        }
        for i in 0..100_000 {
            limiter.begin_login(None, &format!("user{i}@spray.example"));
        }
        assert!(limiter.keys() <= MAX_KEYS, "{} keys", limiter.keys());
        assert!(!limiter.begin_login(None, "victim@y.z"), "still limited");
        let long = "x".repeat(100_000);
        assert!(limiter.begin_login(None, &long));
        assert!(
            limiter
                .windows
                .lock()
                .expect("lock")
                .keys()
                .all(|k| !matches!(k, Key::LoginAs(u) if u.len() > MAX_USERNAME_BYTES))
        );
    }
}
