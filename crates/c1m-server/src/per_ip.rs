//! `--max-connections-per-ip`: how many sockets each client address may hold.
//!
//! Counted per process at accept time (every socket: handshaking, open or closing), so a
//! single address cannot fill a worker with idle handshakes either. A socket accepted past
//! the limit is not dropped at once (its request would be lost and the client would see a
//! reset, not a reason): it is marked, and its upgrade request is answered with 429.
//! The bookkeeping exists only when the limit is set.

use std::collections::HashMap;
use std::net::IpAddr;

#[derive(Debug)]
pub struct PerIp {
    limit: u32,
    counts: HashMap<IpAddr, u32>,
    /// Slab key → (its address, whether it was within the limit when accepted).
    sockets: HashMap<usize, (IpAddr, bool)>,
}

impl PerIp {
    pub fn new(limit: u32) -> PerIp {
        PerIp {
            limit,
            counts: HashMap::new(),
            sockets: HashMap::new(),
        }
    }

    /// Counts a newly accepted socket.
    pub fn add(&mut self, key: usize, ip: IpAddr) {
        let count = self.counts.entry(ip).or_default();
        let within = *count < self.limit;
        *count += 1;
        self.sockets.insert(key, (ip, within));
    }

    /// Whether the socket at `key` may upgrade.
    pub fn within_limit(&self, key: usize) -> bool {
        self.sockets.get(&key).is_none_or(|&(_, within)| within)
    }

    /// Forgets a closed socket.
    pub fn remove(&mut self, key: usize) {
        let Some((ip, _)) = self.sockets.remove(&key) else {
            return;
        };
        if let Some(count) = self.counts.get_mut(&ip) {
            *count -= 1;
            if *count == 0 {
                self.counts.remove(&ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_past_the_limit_are_marked_until_others_leave() {
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "::1".parse().unwrap();
        let mut per_ip = PerIp::new(2);
        per_ip.add(0, a);
        per_ip.add(1, a);
        per_ip.add(2, a);
        per_ip.add(3, b);
        assert!(per_ip.within_limit(0) && per_ip.within_limit(1));
        assert!(!per_ip.within_limit(2), "third from the same address");
        assert!(per_ip.within_limit(3), "another address");
        per_ip.remove(0);
        per_ip.remove(2);
        per_ip.add(4, a);
        assert!(per_ip.within_limit(4), "room again");
        per_ip.remove(1);
        per_ip.remove(4);
        per_ip.remove(3);
        assert!(per_ip.counts.is_empty() && per_ip.sockets.is_empty());
    }
}
