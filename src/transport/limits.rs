//! How many long-lived connections (WebSockets at `/ws`, socket.io sockets) the process and
//! each client address may hold. A permit is taken before a connection is served and given
//! back when it is dropped.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use crate::auth::network_of;
use crate::config::Limits;
use crate::error::{Error, ErrorKind};

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("too many connections to this server")]
    Full,
    #[error("too many connections from this address")]
    AddressFull,
}

impl From<Refused> for Error {
    fn from(refused: Refused) -> Error {
        let kind = match refused {
            Refused::Full => ErrorKind::Unavailable,
            Refused::AddressFull => ErrorKind::TooManyRequests,
        };
        Error::new(kind, refused.to_string())
    }
}

#[derive(Default)]
struct Counts {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
}

pub struct ConnectionLimiter {
    max_total: usize,
    max_per_address: usize,
    counts: Mutex<Counts>,
}

/// One admitted connection; dropping it frees its place.
pub struct ConnectionPermit {
    limiter: Arc<ConnectionLimiter>,
    address: Option<IpAddr>,
}

impl ConnectionLimiter {
    pub fn new(limits: &Limits) -> Arc<Self> {
        Arc::new(Self {
            max_total: limits.max_connections,
            max_per_address: limits.connections_per_address,
            counts: Mutex::default(),
        })
    }

    /// Admits a connection from `address` (unknown for in-process sessions) or says why not.
    /// IPv6 clients count by their /64.
    pub fn admit(self: &Arc<Self>, address: Option<IpAddr>) -> Result<ConnectionPermit, Refused> {
        let address = address.map(network_of);
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if counts.total >= self.max_total {
            return Err(Refused::Full);
        }
        if let Some(address) = address {
            let held = counts.by_address.entry(address).or_default();
            if *held >= self.max_per_address {
                return Err(Refused::AddressFull);
            }
            *held += 1;
        }
        counts.total += 1;
        Ok(ConnectionPermit {
            limiter: self.clone(),
            address,
        })
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let mut counts = self.limiter.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts.total = counts.total.saturating_sub(1);
        if let Some(address) = self.address
            && let Some(held) = counts.by_address.get_mut(&address)
        {
            *held = held.saturating_sub(1);
            if *held == 0 {
                counts.by_address.remove(&address);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_are_counted_per_address_and_in_total_and_given_back_on_drop() {
        let limiter = ConnectionLimiter::new(&Limits {
            max_connections: 3,
            connections_per_address: 2,
            ..Limits::default()
        });
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let first = limiter.admit(Some(a)).expect("first");
        let _second = limiter.admit(Some(a)).expect("second");
        assert_eq!(limiter.admit(Some(a)).err(), Some(Refused::AddressFull));
        let _third = limiter.admit(Some(b)).expect("another address");
        assert_eq!(limiter.admit(Some(b)).err(), Some(Refused::Full));
        drop(first);
        assert!(limiter.admit(Some(a)).is_ok(), "a dropped permit frees its place");
    }
}
