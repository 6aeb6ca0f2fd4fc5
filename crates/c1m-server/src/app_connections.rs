//! Pusher connections per app, for each app's `max_connections` (Pusher's
//! "connection quota": past it a new connection gets error 4004).
//!
//! Counted like `--max-connections-per-ip` (see `per_ip`): in this process's memory for
//! a single process, in the shared scoreboard for the workers of a multi-process
//! server, so every worker sees the node's whole count without a round trip. In a
//! cluster the other nodes' counts come from their once-a-second reports
//! (`node_stats::NodeReport::pusher_apps`), so the quota holds for the cluster up to
//! what the other nodes opened in the last second. As with the other limits, the check
//! and the count are two steps: workers (or nodes) admitting at the same instant may
//! pass the quota by one connection each.
//!
//! A connection counts from its upgrade until it leaves the open state (see
//! `registry::Registry::after`).

use std::sync::Arc;

use crate::scoreboard::{Scoreboard, APPS};

#[derive(Debug)]
enum Counts {
    /// This process is the whole node.
    Local(Box<[u32; APPS]>),
    /// A worker: its own column of the shared table.
    Shared {
        board: Arc<Scoreboard>,
        worker: usize,
    },
}

/// The node's Pusher connections per app number (see `connection::pusher_app`).
#[derive(Debug)]
pub struct AppConnections {
    counts: Counts,
}

impl AppConnections {
    /// For a single-process server.
    pub fn local() -> AppConnections {
        AppConnections {
            counts: Counts::Local(Box::new([0; APPS])),
        }
    }

    /// For worker `worker` of a multi-process server.
    pub fn shared(board: Arc<Scoreboard>, worker: usize) -> AppConnections {
        AppConnections {
            counts: Counts::Shared { board, worker },
        }
    }

    /// A connection of app `app` opened.
    pub fn opened(&mut self, app: usize) {
        let app = app.min(APPS - 1);
        match &mut self.counts {
            Counts::Local(counts) => counts[app] += 1,
            Counts::Shared { board, worker } => board.app_add(*worker, app),
        }
    }

    /// A connection of app `app` closed.
    pub fn closed(&mut self, app: usize) {
        let app = app.min(APPS - 1);
        match &mut self.counts {
            Counts::Local(counts) => counts[app] = counts[app].saturating_sub(1),
            Counts::Shared { board, worker } => board.app_remove(*worker, app),
        }
    }

    /// Connections of app `app` on this node (every worker).
    pub fn on_node(&self, app: usize) -> u64 {
        let app = app.min(APPS - 1);
        match &self.counts {
            Counts::Local(counts) => u64::from(counts[app]),
            Counts::Shared { board, .. } => board.app_count(app),
        }
    }

    /// Connections of app `app` on the cluster's other nodes, as the master last
    /// wrote them (a worker); a single process asks its cluster view instead.
    pub fn elsewhere(&self, app: usize) -> u64 {
        match &self.counts {
            Counts::Local(_) => 0,
            Counts::Shared { board, .. } => board.app_count_elsewhere(app.min(APPS - 1)),
        }
    }
}

/// The open connections of each app that has some, by app id (for a node report):
/// `count(app number)`.
pub fn by_app_id(
    apps: &[crate::pusher::App],
    count: impl Fn(usize) -> u64,
) -> std::collections::BTreeMap<String, u64> {
    apps.iter()
        .enumerate()
        .map(|(number, app)| (app.id.clone(), count(number)))
        .filter(|&(_, n)| n > 0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_follow_opens_and_closes_and_never_wrap() {
        let mut local = AppConnections::local();
        local.opened(2);
        local.opened(2);
        local.opened(APPS + 10); // out of range: the last (unknown) column
        local.closed(2);
        assert_eq!((local.on_node(2), local.on_node(APPS - 1)), (1, 1));
        local.closed(0);
        assert_eq!(local.on_node(0), 0);

        let board = Arc::new(Scoreboard::create(2).unwrap());
        let mut zero = AppConnections::shared(board.clone(), 0);
        let mut one = AppConnections::shared(board.clone(), 1);
        zero.opened(1);
        one.opened(1);
        assert_eq!(zero.on_node(1), 2);
        one.closed(1);
        assert_eq!(zero.on_node(1), 1);
        board.set_apps_elsewhere(&[0, 40]);
        assert_eq!((one.elsewhere(1), local.elsewhere(1)), (40, 0));
    }
}
