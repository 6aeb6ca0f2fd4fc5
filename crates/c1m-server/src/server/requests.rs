//! What a connection asks of its server: reads and writes, the client's commands, and
//! plain HTTP requests (`http::route` decides; this carries the outcome out, at once or
//! once another process answered).

use std::time::Instant;

use bytes::Bytes;

use crate::commands::{self, Command};
use crate::connection::{Action, Admit, Next, PhaseKind, ReadContext};
use crate::history::Position;
use crate::http::{self, Outcome};
use crate::target::{Delivery, Target};
use crate::topics::validate_name;
use crate::upstream::{Upstream, Waiting, WaitingFor};

use super::delivery::WhenDelivered;
use super::Server;

impl Server {
    /// Upgraded connections in the whole server (all workers).
    fn total_open(&self) -> u64 {
        let here = self.registry.counters.open as u64;
        match &self.upstream {
            Upstream::ViaMaster(link) => {
                let board = &link.scoreboard;
                let mine = board
                    .slot(link.index)
                    .open
                    .load(std::sync::atomic::Ordering::Relaxed);
                board.total_open() - mine + here
            }
            _ => here,
        }
    }

    /// Whether a new upgrade may be accepted under `--max-connections`.
    pub(super) fn has_room(&self) -> bool {
        self.config
            .max_connections
            .is_none_or(|max| self.total_open() < max)
    }

    pub(super) fn read(&mut self, key: usize, now: Instant) {
        let Some(conn) = self.registry.conns.get(key) else {
            return;
        };
        let before = conn.kind();
        let admit = if before != PhaseKind::Handshake {
            Admit::Yes // only an upgrade request uses it
        } else if !self.has_room() {
            Admit::ServerFull
        } else if !self.registry.within_ip_limit(key) {
            Admit::TooManyFromAddress
        } else {
            Admit::Yes
        };
        let buffers = &mut self.buffers;
        let mut actions = std::mem::take(&mut buffers.actions);
        let registry = &mut self.registry;
        let mut cx = ReadContext {
            scratch: &mut buffers.scratch,
            limits: &registry.limits,
            gate: &self.gate,
            admit,
            accept_rate: self.accept_rate.as_ref(),
            closing_deadline: now + self.config.close_timeout,
            counters: &mut registry.counters,
            actions: &mut actions,
            inflater: &mut buffers.inflater,
            inflated: &mut buffers.inflated,
        };
        let mut next = registry.conns[key].on_readable(&mut cx);
        for action in actions.drain(..) {
            if let Next::Remove(end) = self.apply(key, action, now) {
                next = Next::Remove(end);
            }
        }
        self.buffers.actions = actions;
        self.registry.after(key, before, next);
    }

    pub(super) fn write(&mut self, key: usize) {
        let Some(conn) = self.registry.conns.get_mut(key) else {
            return;
        };
        let before = conn.kind();
        let next = conn.on_writable();
        self.registry.after(key, before, next);
    }

    /// Does what a connection asked for after a read.
    fn apply(&mut self, key: usize, action: Action, now: Instant) -> Next {
        match action {
            Action::Joined(admission) => {
                // The same read may already have closed it (a close right behind the
                // upgrade request): then it joins nothing.
                if self.registry.conns[key].kind() != PhaseKind::Open {
                    return Next::Keep;
                }
                if let Some(entry) = admission.pusher {
                    return self.pusher_opened(key, entry, now);
                }
                // A resumed topic is joined by the resume (see `resume`): a worker's
                // when the master's history comes, and in a cluster, one this process
                // cannot answer alone when the broker's does (`cluster_resume`).
                let deferred = self.resumes_via_master();
                let mut via_broker = Vec::new();
                for (topic, offset, epoch) in &admission.since {
                    if !deferred && self.resumes_via_broker(topic, &(*offset, epoch.clone()), now) {
                        via_broker.push(topic.clone());
                    }
                }
                for name in &admission.topics {
                    if let Some((_, since, _)) = admission.since.iter().find(|(t, ..)| t == name) {
                        if !deferred && !via_broker.contains(name) {
                            self.join_resumed(key, name, *since);
                        }
                        continue;
                    }
                    self.registry.subscribe(key, name);
                }
                if admission.envelope {
                    self.registry.conns[key].set_envelope();
                }
                self.registry.conns[key].set_allowed_topics(admission.allowed);
                self.registry.set_token_expiry(key, admission.expires);
                // Resumes asked for in the URL: each answered as a subscribe would be.
                for (topic, offset, epoch) in admission.since {
                    if deferred {
                        self.ask_master_to_recover(key, &topic, (offset, epoch));
                        continue;
                    }
                    if via_broker.contains(&topic) {
                        self.ask_broker_to_recover(key, &topic, (offset, epoch), now);
                        continue;
                    }
                    let (fields, recovered) = self.resume(&topic, Some(&(offset, epoch)), now);
                    let answer = commands::ok_reply_with("subscribe", &topic, fields);
                    let next = self.reply_then_recovered(key, &answer, &recovered);
                    if next != Next::Keep {
                        return next;
                    }
                }
                Next::Keep
            }
            Action::Command(text) if self.registry.conns[key].is_pusher() => {
                self.pusher_message(key, &text, now)
            }
            // Text that is not a JSON object is not meant as a command: no answer.
            Action::Command(text) if !commands::is_command(&text) => Next::Keep,
            Action::Command(text) => match self.command(key, &text, now) {
                // Answered later (a worker's resume waits for the master).
                (reply, _) if reply.is_empty() => Next::Keep,
                (reply, recovered) => self.reply_then_recovered(key, &reply, &recovered),
            },
            Action::OversizedCommand if self.registry.conns[key].is_pusher() => {
                let too_large = format!(
                    "a client message has at most {} bytes",
                    crate::connection::MAX_COMMAND_BYTES
                );
                self.reply(
                    key,
                    &crate::pusher::error(crate::pusher::code::GENERIC, &too_large),
                )
            }
            Action::OversizedCommand => self.reply(key, &commands::malformed_reply()),
            Action::Http(request, body) => self.http(key, request, body, now),
        }
    }

    /// Sends a command's answer to an open connection.
    pub(super) fn reply(&mut self, key: usize, reply: &str) -> Next {
        let registry = &mut self.registry;
        match registry.conns.get_mut(key) {
            Some(conn) if conn.kind() == PhaseKind::Open => {
                conn.reply(reply.as_bytes(), &registry.limits)
            }
            _ => Next::Keep,
        }
    }

    /// Runs a client's command; returns the answer to send it, and the missed
    /// publications to send after it (a subscribe that resumes from a position).
    fn command(&mut self, key: usize, text: &str, now: Instant) -> (String, Vec<Bytes>) {
        let command = match commands::parse(text) {
            Ok(command) => command,
            Err(reply) => return (reply, Vec::new()),
        };
        let (op, name) = match &command {
            Command::Subscribe { topic, .. } => ("subscribe", topic.as_str()),
            Command::Unsubscribe(name) => ("unsubscribe", name.as_str()),
            Command::Refresh(token) => return (self.refresh(key, token), Vec::new()),
        };
        let error = |e: &str| (commands::error_reply(Some(op), Some(name), e), Vec::new());
        if let Err(e) = validate_name(name) {
            return error(&e);
        }
        let registry = &mut self.registry;
        let conn = &registry.conns[key];
        match &command {
            Command::Subscribe { since, .. } => {
                if !conn.may_join(name) {
                    return error("forbidden");
                }
                let already = registry
                    .topics
                    .id(name)
                    .is_some_and(|id| conn.is_subscribed(id));
                if already && since.is_some() {
                    // It already gets the topic live: a recovery now could repeat what
                    // is on its way.
                    return error(
                        "already subscribed: unsubscribe first to resume from a position",
                    );
                }
                if !already && conn.subscription_count() >= self.config.max_topics_per_connection {
                    return error(&format!(
                        "at most {} topics per connection",
                        self.config.max_topics_per_connection
                    ));
                }
                if since.is_some() {
                    registry.conns[key].set_envelope();
                }
                if let (Some(since), true) = (since, self.resumes_via_master()) {
                    // Answered when the master's history comes (see `resume`).
                    self.ask_master_to_recover(key, name, since.clone());
                    return (String::new(), Vec::new());
                }
                if let Some(since) = since.as_ref().filter(|_| !already) {
                    if self.resumes_via_broker(name, since, now) {
                        // Answered when the broker's history comes (`cluster_resume`).
                        self.ask_broker_to_recover(key, name, since.clone(), now);
                        return (String::new(), Vec::new());
                    }
                }
                match since {
                    Some((offset, _)) if !already => self.join_resumed(key, name, *offset),
                    None if !already => self.registry.subscribe(key, name),
                    _ => {}
                }
                let (fields, recovered) = self.resume(name, since.as_ref(), now);
                return (commands::ok_reply_with(op, name, fields), recovered);
            }
            Command::Unsubscribe(_) => {
                if let Some(id) = registry.topics.id(name) {
                    registry.unsubscribe(key, id);
                }
                // A resume still waiting to join does not join after this.
                registry
                    .pending_joins
                    .retain(|(owner, topic, _)| *owner != key || topic != name);
            }
            Command::Refresh(_) => unreachable!("answered above"),
        }
        (commands::ok_reply(op, name), Vec::new())
    }

    /// `{"op":"refresh","token":...}`: a fresh token moves the connection's expiry. It
    /// must verify like an upgrade's token and allow every topic the connection is in;
    /// its topics claim then limits later subscribes. A refused token changes nothing.
    fn refresh(&mut self, key: usize, token: &str) -> String {
        let error = |e: &str| commands::refresh_reply(Err(e));
        let conn = &self.registry.conns[key];
        let topics: Vec<String> = conn
            .subscriptions()
            .map(|s| self.registry.topics.name(s.topic).to_string())
            .collect();
        let grant = match self.gate.verify_refresh(token) {
            Ok(grant) => grant,
            Err(e) => return error(e),
        };
        if let Some(allowed) = &grant.allowed {
            if !topics.iter().all(|t| allowed.iter().any(|a| **a == **t)) {
                return error("the token does not allow every topic this connection is in");
            }
        }
        let expires = grant.expires;
        self.registry.conns[key].set_allowed_topics(grant.allowed);
        self.registry.set_token_expiry(key, expires);
        commands::refresh_reply(Ok(expires))
    }

    /// Answers a plain HTTP request, at once or once another process answered.
    fn http(
        &mut self,
        key: usize,
        request: c1m_proto::handshake::PlainRequest,
        body: Vec<u8>,
        now: Instant,
    ) -> Next {
        let keep_alive = request.keep_alive;
        let cluster_up = self.upstream.cluster_up();
        let ready =
            self.shutdown_deadline.is_none() && self.has_room() && cluster_up != Some(false);
        let render = || self.render_metrics();
        let cx = http::Context {
            api_key: self.config.api_key.as_deref(),
            ready,
            metrics: &render,
            pusher_apps: &self.config.pusher_apps,
            max_event_bytes: usize::try_from(self.config.max_message_size).unwrap_or(usize::MAX),
        };
        let outcome = http::route(&request, &body, &cx);
        if let Outcome::Respond(answer) = &outcome {
            if request.path.starts_with("/apps/") && !answer.starts_with(b"HTTP/1.1 2") {
                self.registry.counters.pusher_api_refused += 1;
            }
        }
        let waiting = |this: &Self, request| {
            Waiting::new(&this.registry.conns[key], key, keep_alive, request, now)
        };
        let response = match outcome {
            Outcome::Respond(response) => response,
            Outcome::Stats { cluster } if matches!(self.upstream, Upstream::ViaMaster(_)) => {
                // The master sums the workers (and holds the cluster view).
                let parked = waiting(self, WaitingFor::Stats);
                self.ask_master_for_stats(parked, cluster, now);
                return Next::Keep;
            }
            Outcome::Stats { cluster } => {
                let (status, body) = self.node_stats(cluster, now);
                http::json_answer(status, &body)
            }
            Outcome::PusherRead(app, read) if matches!(self.upstream, Upstream::ViaMaster(_)) => {
                // The master keeps the node's presence members and workers' counts.
                let parked = waiting(self, WaitingFor::Stats);
                self.ask_master_for_pusher_read(parked, app, &read, now);
                return Next::Keep;
            }
            Outcome::PusherTerminate(topic) => {
                self.terminate_user(&topic, now);
                http::json_answer(200, &serde_json::json!({}))
            }
            Outcome::PusherRead(app, read) => {
                let (status, body) = self.pusher_read(app, &read, now);
                http::json_answer(status, &body)
            }
            Outcome::History(query) if self.resumes_via_master() => {
                // The master keeps the node's history.
                let parked = waiting(self, WaitingFor::Stats);
                self.ask_master_for_history(parked, &query, now);
                return Next::Keep;
            }
            Outcome::History(query) if self.history_is_the_brokers() => {
                // A cluster's positions are the broker's: read its history there.
                let parked = waiting(self, WaitingFor::Stats);
                self.read_broker_history(parked, query, now);
                return Next::Keep;
            }
            Outcome::History(query) => {
                let (status, body) = http::history_answer(self.history.as_mut(), &query, now);
                http::json_answer(status, &body)
            }
            Outcome::PusherEvents(app, triggers) => match self.pusher_trigger(app, triggers, now) {
                Ok(()) => http::json_answer(200, &serde_json::json!({})),
                Err(refusal) => refusal,
            },
            Outcome::Publish { .. } if cluster_up == Some(false) => http::broker_refusal(),
            Outcome::Publish { target, frame } => {
                if matches!(self.upstream, Upstream::Local) {
                    if !self.publications.has_room() {
                        self.registry.counters.publishes_refused_busy += 1;
                        http::fan_out_busy()
                    } else {
                        // Answered when its fan-out is over (`delivery.rs`).
                        let position = self.keep_in_history(&target, &frame, now);
                        let parked =
                            waiting(self, WaitingFor::Publish(target.clone(), position.clone()));
                        self.publish_at(target, frame, position, WhenDelivered::Answer(parked));
                        return Next::Keep;
                    }
                } else {
                    let parked = waiting(self, WaitingFor::Publish(target.clone(), None));
                    match self.publish_upstream(parked, (target, None), frame.to_vec(), now) {
                        Ok(()) => return Next::Keep, // answered when it is counted
                        Err(response) => response,
                    }
                }
            }
        };
        self.registry.answer_http(key, response, keep_alive, now)
    }

    /// Keeps a publication to a topic with history; its position, for the answer.
    pub(super) fn keep_in_history(
        &mut self,
        target: &Target,
        frame: &Bytes,
        now: Instant,
    ) -> Option<Position> {
        let (history, Target::Topic(name)) = (self.history.as_mut()?, target) else {
            return None;
        };
        history.append(name, frame.clone(), now)
    }

    /// Sends `response` to the client of a request that waited, if it is still there
    /// (it may have gone away or timed out meanwhile).
    pub(super) fn answer_waiting(&mut self, waiting: &Waiting, response: Vec<u8>, now: Instant) {
        let key = waiting.key;
        let same = self
            .registry
            .conns
            .get(key)
            .is_some_and(|c| c.kind() == PhaseKind::Http && c.deadline() == waiting.deadline);
        if !same {
            return;
        }
        let next = self
            .registry
            .answer_http(key, response, waiting.keep_alive, now);
        self.registry.after(key, PhaseKind::Http, next);
        if matches!(waiting.request, WaitingFor::Publish(..)) {
            self.publish_seconds
                .observe(now.saturating_duration_since(waiting.started));
        }
    }

    /// Answers a waiting publish with what it came to.
    pub(super) fn answer_publish(&mut self, waiting: Waiting, delivery: Delivery, now: Instant) {
        let response = match &waiting.request {
            WaitingFor::Publish(target, position) => {
                http::published(target, position.as_ref(), delivery)
            }
            // Never sent: the master answers `/stats` with `Answer`.
            WaitingFor::Stats => http::published(&Target::All, None, delivery),
        };
        self.answer_waiting(&waiting, response, now);
    }
}
