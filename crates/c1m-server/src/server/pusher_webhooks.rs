//! Which Pusher webhook events a process sends (see `webhooks`), so that each goes out
//! once per cluster:
//! - `member_added` / `member_removed`: by whoever keeps the node's presence table
//!   (the single process here; the master for workers), for its own sockets' changes;
//! - `channel_occupied` / `channel_vacated`: by the node whose first subscriber came or
//!   last one left, when no other node has subscribers (in a cluster the nodes tell
//!   each other which channels they have, see `cluster_presence`);
//! - `client_event`: by the process the client sent it to (a worker hands it to its
//!   master);
//! - for a node that went silent: by the live node with the least name.

use std::time::Instant;

use serde_json::Value;

use crate::cluster_presence::Expired;
use crate::control::Message;
use crate::upstream::Upstream;
use crate::webhooks::{event, is_app_channel};

use super::Server;

impl Server {
    /// Sends `event` with the node's webhooks: batched here, or handed to the master.
    pub(super) fn webhook(&mut self, event: Value, now: Instant) {
        match (self.webhooks.as_mut(), &self.upstream) {
            (Some(webhooks), _) => webhooks.push(event, now),
            (None, Upstream::ViaMaster(_)) if self.config.pusher_webhook.is_some() => {
                let json = serde_json::to_vec(&event).unwrap_or_default();
                self.send_to_master(&Message::Webhook { json });
            }
            _ => {}
        }
    }

    /// `topic` got its first (`on`) or lost its last subscriber in this process: a
    /// single process tells the app, unless another node of the cluster has some.
    pub(super) fn occupancy_webhook(&mut self, topic: &str, on: bool, now: Instant) {
        // (A worker: its master decides for the node.)
        if self.webhooks.is_none() || !is_app_channel(topic) {
            return;
        }
        if let Upstream::ViaBroker(cluster) = &self.upstream {
            if cluster.others_occupy(topic) {
                return;
            }
        }
        let event = if on {
            event::channel_occupied(topic)
        } else {
            event::channel_vacated(topic)
        };
        self.webhook(event, now);
    }

    /// Other nodes went silent: their members leave (told to the members here); the
    /// node that speaks for the cluster tells the app.
    pub(super) fn presence_expired(&mut self, expired: Expired, speaks: bool, now: Instant) {
        for (channel, change) in expired.changes {
            if speaks {
                self.webhook(event::member(&channel, &change), now);
            }
            self.presence_publish(&channel, &change, None, now);
        }
        if speaks {
            for channel in expired.vacated {
                self.webhook(event::channel_vacated(&channel), now);
            }
        }
    }
}
