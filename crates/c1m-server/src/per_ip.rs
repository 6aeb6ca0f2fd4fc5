//! `--max-connections-per-ip`: how many sockets each client address may hold.
//!
//! Counted for the whole server at accept time: in this process's memory for a single
//! process, in the shared scoreboard for the workers of a multi-process server (so
//! each worker sees the others' sockets; see `scoreboard`). Counted (every socket: handshaking, open or closing), so a
//! single address cannot fill a worker with idle handshakes either. A socket accepted past
//! the limit is not dropped at once (its request would be lost and the client would see a
//! reset, not a reason): it is marked, and its upgrade request is answered with 429.
//! The bookkeeping exists only when the limit is set. Across workers the check and the
//! count are two steps, so two workers accepting from one address at the same instant
//! may both admit the last socket: the limit can be passed by at most one socket per
//! worker, and only in that race.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use crate::scoreboard::Scoreboard;

/// Where the sockets per address are counted.
#[derive(Debug)]
enum Counts {
    /// This process is the whole server.
    Local(HashMap<IpAddr, u32>),
    /// A worker: its own column of the shared table.
    Shared {
        board: Arc<Scoreboard>,
        worker: usize,
    },
}

#[derive(Debug)]
pub struct PerIp {
    limit: u32,
    counts: Counts,
    /// Slab key → (its address, whether it was within the limit when accepted).
    sockets: HashMap<usize, (IpAddr, bool)>,
}

impl PerIp {
    /// The limit for a single-process server.
    pub fn new(limit: u32) -> PerIp {
        PerIp {
            limit,
            counts: Counts::Local(HashMap::new()),
            sockets: HashMap::new(),
        }
    }

    /// The limit for worker `worker` of a multi-process server.
    pub fn shared(limit: u32, board: Arc<Scoreboard>, worker: usize) -> PerIp {
        PerIp {
            limit,
            counts: Counts::Shared { board, worker },
            sockets: HashMap::new(),
        }
    }

    /// Counts a newly accepted socket.
    pub fn add(&mut self, key: usize, ip: IpAddr) {
        let within = match &mut self.counts {
            Counts::Local(counts) => {
                let count = counts.entry(ip).or_default();
                *count += 1;
                *count <= self.limit
            }
            Counts::Shared { board, worker } => {
                let before = board.ip_count(ip);
                board.ip_add(*worker, ip);
                before < self.limit
            }
        };
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
        match &mut self.counts {
            Counts::Local(counts) => {
                if let Some(count) = counts.get_mut(&ip) {
                    *count -= 1;
                    if *count == 0 {
                        counts.remove(&ip);
                    }
                }
            }
            Counts::Shared { board, worker } => board.ip_remove(*worker, ip),
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
        assert!(per_ip.sockets.is_empty());
        assert!(matches!(&per_ip.counts, Counts::Local(c) if c.is_empty()));
    }

    #[test]
    fn workers_count_each_others_sockets() {
        let board = Arc::new(Scoreboard::create(2).unwrap());
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let mut first = PerIp::shared(2, board.clone(), 0);
        let mut second = PerIp::shared(2, board, 1);
        first.add(0, a);
        second.add(0, a);
        second.add(1, a);
        assert!(first.within_limit(0) && second.within_limit(0));
        assert!(
            !second.within_limit(1),
            "third from the address, server-wide"
        );
        first.remove(0);
        second.remove(1);
        second.add(1, a);
        assert!(second.within_limit(1), "room again");
    }
}
