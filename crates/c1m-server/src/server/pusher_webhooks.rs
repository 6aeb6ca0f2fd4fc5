//! Which Pusher webhook events a process sends (see `webhooks`), so that each goes out
//! once per cluster, to the app whose channel it is:
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
use crate::pusher::{app_of, channel_of};
use crate::upstream::Upstream;
use crate::webhooks::{event, is_app_channel};

use super::Server;

impl Server {
    /// Sends the event `make` writes for the channel of `topic` with the webhooks of
    /// the topic's app, if it has any: batched here, or handed to the master.
    pub(super) fn webhook_for(
        &mut self,
        topic: &str,
        make: impl FnOnce(&str) -> Value,
        now: Instant,
    ) {
        let apps = &self.config.pusher_apps;
        if !matches!(self.upstream, Upstream::ViaMaster(_)) {
            return self.webhooks.push_for(apps, topic, make, now);
        }
        // A worker hands the event to its master, which sends the node's webhooks.
        let Some(app) = app_of(apps, topic).filter(|&app| apps[app].webhook.is_some()) else {
            return;
        };
        let json = serde_json::to_vec(&make(channel_of(topic))).unwrap_or_default();
        let app = app as u32;
        self.send_to_master(&Message::Webhook { app, json });
    }

    /// `topic` got its first (`on`) or lost its last subscriber in this process: a
    /// single process tells the app, unless another node of the cluster has some.
    pub(super) fn occupancy_webhook(&mut self, topic: &str, on: bool, now: Instant) {
        // (A worker: its master decides for the node.)
        if !self.webhooks.any() || !is_app_channel(channel_of(topic)) {
            return;
        }
        if let Upstream::ViaBroker(cluster) = &self.upstream {
            if cluster.others_occupy(topic) {
                return;
            }
        }
        let make = if on {
            event::channel_occupied
        } else {
            event::channel_vacated
        };
        self.webhook_for(topic, make, now);
    }

    /// Other nodes went silent: their members leave (told to the members here); the
    /// node that speaks for the cluster tells the app.
    pub(super) fn presence_expired(&mut self, expired: Expired, speaks: bool, now: Instant) {
        if speaks {
            let apps = &self.config.pusher_apps;
            self.webhooks.push_expired(apps, &expired, now);
        }
        self.presence_publish_all(expired.changes, now);
    }
}
