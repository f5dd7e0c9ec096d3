//! How many passwords a client may have checked: a burst, then one every few seconds (a
//! token bucket per address; an IPv6 client by its /64, which one host usually holds whole).
//!
//! Each check of credentials not yet remembered costs a bcrypt run, and only a few run at
//! once: without a limit, one client's flood of guesses queued every other client's first
//! login behind it, and guessing went as fast as bcrypt allowed. A right password gives its
//! guess back, so a client that logs in is never held up by its own checks.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Checks a client may have in a row before it has to wait.
pub const BURST: u32 = 10;
/// How often a client gets one more check.
pub const REFILL: Duration = Duration::from_secs(6);
/// Clients kept track of at most: past it, those with their whole allowance are forgotten.
const CLIENTS_MAX: usize = 4096;

/// What each client has left.
pub struct Guesses {
    burst: u32,
    refill: Duration,
    clients: Mutex<HashMap<IpAddr, Allowance>>,
}

struct Allowance {
    /// Checks left (fractions accrue between refills).
    left: f64,
    /// When `left` was last brought up to date.
    at: Instant,
    /// Whether its running out has been logged.
    told: bool,
}

/// A client that must wait before its next check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wait {
    /// Until its next check.
    pub wait: Duration,
    /// Whether this is the first refusal since it last had checks left (to log once).
    pub first: bool,
}

impl Default for Guesses {
    fn default() -> Self {
        Guesses::new(BURST, REFILL)
    }
}

impl Guesses {
    /// `burst` checks at once, one more every `refill`.
    pub fn new(burst: u32, refill: Duration) -> Self {
        Guesses {
            burst: burst.max(1),
            refill: refill.max(Duration::from_millis(1)),
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one check of `client`'s allowance, or says how long it must wait.
    pub fn take(&self, client: Option<IpAddr>) -> Result<(), Wait> {
        let now = Instant::now();
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        if clients.len() >= CLIENTS_MAX {
            clients.retain(|_, a| self.brought_up(a, now) < f64::from(self.burst));
            if clients.len() >= CLIENTS_MAX {
                // More clients guessing at once than can be kept apart: start over rather
                // than grow (each is still held to the few checks that run at once).
                clients.clear();
            }
        }
        let allowance = clients.entry(key(client)).or_insert(Allowance {
            left: f64::from(self.burst),
            at: now,
            told: false,
        });
        let left = self.brought_up(allowance, now);
        if left >= 1.0 {
            allowance.left = left - 1.0;
            allowance.told = false;
            return Ok(());
        }
        let first = !allowance.told;
        allowance.told = true;
        Err(Wait {
            wait: self.refill.mul_f64(1.0 - left),
            first,
        })
    }

    /// Gives back the check a right password took.
    pub fn give_back(&self, client: Option<IpAddr>) {
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(a) = clients.get_mut(&key(client)) {
            a.left = (a.left + 1.0).min(f64::from(self.burst));
        }
    }

    /// `a`'s checks left at `now`, its refills counted in.
    fn brought_up(&self, a: &mut Allowance, now: Instant) -> f64 {
        let refilled = now.saturating_duration_since(a.at).as_secs_f64() / self.refill.as_secs_f64();
        a.left = (a.left + refilled).min(f64::from(self.burst));
        a.at = now;
        a.left
    }
}

/// Whose allowance a client uses: its IPv4 address, or its IPv6 /64.
fn key(client: Option<IpAddr>) -> IpAddr {
    match client {
        None => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        Some(IpAddr::V4(v4)) => IpAddr::V4(v4),
        Some(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn a_burst_then_one_per_refill_each_client_on_its_own() {
        let g = Guesses::new(3, Duration::from_millis(200));
        for _ in 0..3 {
            assert!(g.take(ip("127.0.0.1")).is_ok());
        }
        let refused = g.take(ip("127.0.0.1")).unwrap_err();
        assert!(refused.first && refused.wait <= Duration::from_millis(200));
        assert!(!g.take(ip("127.0.0.1")).unwrap_err().first, "told once");
        // Another client has its own allowance.
        assert!(g.take(ip("127.0.0.2")).is_ok());
        std::thread::sleep(Duration::from_millis(220));
        assert!(g.take(ip("127.0.0.1")).is_ok(), "refilled");
        assert!(g.take(ip("127.0.0.1")).is_err(), "by one only");
    }

    #[test]
    fn a_right_password_gives_its_check_back() {
        let g = Guesses::new(2, Duration::from_secs(60));
        for _ in 0..10 {
            assert!(g.take(ip("10.1.2.3")).is_ok());
            g.give_back(ip("10.1.2.3"));
        }
        assert!(g.take(ip("10.1.2.3")).is_ok());
        assert!(g.take(ip("10.1.2.3")).is_ok());
        assert!(g.take(ip("10.1.2.3")).is_err());
    }

    #[test]
    fn an_ipv6_host_is_one_client_and_mapped_ipv4_is_its_ipv4() {
        let g = Guesses::new(1, Duration::from_secs(60));
        assert!(g.take(ip("2001:db8:1:2::1")).is_ok());
        assert!(g.take(ip("2001:db8:1:2:ffff::9")).is_err(), "the same /64");
        assert!(g.take(ip("2001:db8:1:3::1")).is_ok(), "another /64");
        assert!(g.take(ip("192.0.2.7")).is_ok());
        assert!(g.take(ip("::ffff:192.0.2.7")).is_err(), "the same IPv4 client");
    }

    #[test]
    fn many_clients_are_kept_within_bounds() {
        let g = Guesses::new(1, Duration::from_secs(60));
        for i in 0..(3 * CLIENTS_MAX as u32) {
            let _ = g.take(Some(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))));
        }
        assert!(g.clients.lock().unwrap().len() <= CLIENTS_MAX);
    }
}
