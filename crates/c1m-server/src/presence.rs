//! Presence channels (`presence-*` in the Pusher protocol), sans-I/O: who is in each
//! channel, and the member events that follow from a socket joining or leaving.
//!
//! Pusher counts *users*, not sockets: a user with two tabs open is one member, added
//! when their first socket joins and removed when their last one leaves. The table
//! therefore keeps, per channel, the users (id, info, how many sockets) and the
//! sockets (which user each one is). A socket is named by its [`SocketRef`] (process
//! token and slot: unique across the processes of a node and the nodes of a cluster),
//! and carries an `owner`: who holds it (a worker of the master, a node of the
//! cluster), so that when an owner goes away every socket it held leaves at once.
//!
//! One table per node lives with whoever orders the node's publications (the single
//! process, or the master for its workers); see `server/pusher_clients.rs`. In a cluster
//! every node keeps a replica of every node's members (`cluster_presence`), so a member
//! is stored compactly: its id once (shared by the user and their sockets), its info as
//! the JSON text it is only ever written out as.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde_json::{json, Value};

use crate::pusher::SocketRef;

/// Longest `channel_data` accepted (Pusher's limit on user info is 1 KB; ids and the
/// JSON around them get the rest).
pub const MAX_CHANNEL_DATA: usize = 2048;

/// Most members one presence channel holds (Pusher's limit is 100 by default, up to
/// 1,000 on request: every member's info goes to every newcomer).
pub const MAX_MEMBERS: usize = 1000;

/// A user as a presence channel's `channel_data` names them.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    /// As the app gave it (a string or a number): member events repeat it as is.
    pub user_id: Value,
    pub user_info: Value,
}

impl Member {
    /// Reads `channel_data` (`{"user_id":ID,"user_info":{…}}`, `user_info` optional);
    /// `Err` says what is wrong.
    pub fn parse(channel_data: &str) -> Result<Member, String> {
        if channel_data.len() > MAX_CHANNEL_DATA {
            return Err(format!(
                "channel_data is {} bytes, over the limit of {MAX_CHANNEL_DATA}",
                channel_data.len()
            ));
        }
        let value: Value = serde_json::from_str(channel_data)
            .map_err(|_| "channel_data is not JSON".to_string())?;
        let user_id = match value.get("user_id") {
            Some(Value::String(id)) if !id.is_empty() => Value::String(id.clone()),
            Some(Value::Number(id)) => Value::Number(id.clone()),
            _ => return Err("channel_data needs a user_id (a string or a number)".into()),
        };
        let user_info = value.get("user_info").cloned().unwrap_or(Value::Null);
        Ok(Member { user_id, user_info })
    }

    /// The id as members' hash keys have it (JSON object keys are strings).
    fn key(&self) -> String {
        key_of(&self.user_id)
    }
}

fn key_of(user_id: &Value) -> String {
    match user_id {
        Value::String(id) => id.clone(),
        other => other.to_string(),
    }
}

/// A change of membership that members of the channel are told about: the `data`
/// string of `pusher_internal:member_added` / `member_removed`.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Added(String),
    Removed(String),
}

impl Change {
    /// The Pusher event name.
    pub fn event(&self) -> &'static str {
        match self {
            Change::Added(_) => "pusher_internal:member_added",
            Change::Removed(_) => "pusher_internal:member_removed",
        }
    }

    pub fn data(&self) -> &str {
        match self {
            Change::Added(data) | Change::Removed(data) => data,
        }
    }
}

/// A user of a channel as the table keeps them (the id is the map's key).
#[derive(Debug)]
struct User {
    /// `user_info` as JSON text; `None` for `null` (or none given), which costs no
    /// allocation.
    info: Option<Box<str>>,
    /// Whether the app gave the id as a JSON number (the key is then its text).
    numeric: bool,
    /// How many of the user's sockets are in the channel.
    sockets: u32,
}

impl User {
    /// The id as the app gave it (a string, or a number).
    fn id(&self, key: &str) -> Value {
        if self.numeric {
            if let Ok(number) = serde_json::from_str::<serde_json::Number>(key) {
                return Value::Number(number);
            }
        }
        Value::String(key.to_string())
    }

    fn member(&self, key: &str) -> Member {
        Member {
            user_id: self.id(key),
            user_info: self
                .info
                .as_deref()
                .and_then(|info| serde_json::from_str(info).ok())
                .unwrap_or(Value::Null),
        }
    }
}

#[derive(Debug, Default)]
struct Channel {
    /// Ordered by id so that a channel's member list reads the same on every node.
    users: BTreeMap<Arc<str>, User>,
    /// Each socket's user (the same key as in `users`) and owner.
    sockets: HashMap<SocketRef, (Arc<str>, u32)>,
}

/// Every presence channel's members.
#[derive(Debug, Default)]
pub struct Presence {
    channels: HashMap<String, Channel>,
}

/// Why a join was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    Full,
}

impl Presence {
    /// `socket` (held by `owner`) joins `channel` as `member`. `Ok(Some(_))`: the user
    /// is new to the channel, and the others are told. A socket already in the channel
    /// stays who it joined as (a second subscribe changes nothing).
    pub fn join(
        &mut self,
        channel: &str,
        socket: SocketRef,
        owner: u32,
        member: Member,
    ) -> Result<Option<Change>, Refused> {
        let key = member.key();
        let entry = self.channels.get(channel);
        if entry.is_some_and(|c| c.sockets.contains_key(&socket)) {
            return Ok(None);
        }
        let known = entry.is_some_and(|c| c.users.contains_key(key.as_str()));
        if !known && entry.map_or(0, |c| c.users.len()) >= MAX_MEMBERS {
            return Err(Refused::Full);
        }
        let entry = self.channels.entry(channel.to_string()).or_default();
        // The user's key, shared with the entry in `users` when they are there already.
        let key: Arc<str> = match entry.users.get_key_value(key.as_str()) {
            Some((shared, _)) => Arc::clone(shared),
            None => Arc::from(key),
        };
        entry.sockets.insert(socket, (Arc::clone(&key), owner));
        let user = entry.users.entry(key).or_insert_with(|| User {
            info: (!member.user_info.is_null())
                .then(|| member.user_info.to_string().into_boxed_str()),
            numeric: member.user_id.is_number(),
            sockets: 0,
        });
        user.sockets += 1;
        if user.sockets > 1 {
            return Ok(None);
        }
        let data = json!({"user_id": member.user_id, "user_info": member.user_info});
        Ok(Some(Change::Added(data.to_string())))
    }

    /// `socket` leaves `channel`. `Some(_)`: it was its user's last socket there.
    pub fn leave(&mut self, channel: &str, socket: SocketRef) -> Option<Change> {
        let entry = self.channels.get_mut(channel)?;
        let (key, _) = entry.sockets.remove(&socket)?;
        let user = entry.users.get_mut(&key)?;
        user.sockets -= 1;
        let change = if user.sockets == 0 {
            let user = entry.users.remove(&key)?;
            let data = json!({"user_id": user.id(&key)});
            Some(Change::Removed(data.to_string()))
        } else {
            None
        };
        if entry.sockets.is_empty() {
            self.channels.remove(channel);
        }
        change
    }

    /// Every socket held by `owner` leaves (a worker died, a node left the cluster):
    /// the changes, by channel.
    pub fn leave_owner(&mut self, owner: u32) -> Vec<(String, Change)> {
        let gone: Vec<(String, SocketRef)> = self
            .channels
            .iter()
            .flat_map(|(name, channel)| {
                channel
                    .sockets
                    .iter()
                    .filter(|(_, (_, o))| *o == owner)
                    .map(move |(socket, _)| (name.clone(), *socket))
            })
            .collect();
        gone.into_iter()
            .filter_map(|(channel, socket)| {
                let change = self.leave(&channel, socket)?;
                Some((channel, change))
            })
            .collect()
    }

    /// The `data` string of a presence channel's `subscription_succeeded`:
    /// `{"presence":{"ids":[…],"hash":{ID:INFO,…},"count":N}}`.
    pub fn subscription_data(&self, channel: &str) -> String {
        // Written out by hand: the infos are JSON text already and go in as they are,
        // not parsed again for every newcomer.
        let mut ids = Vec::new();
        let mut hash = Vec::new();
        for (key, user) in self
            .channels
            .get(channel)
            .into_iter()
            .flat_map(|c| &c.users)
        {
            let quoted = Value::String(key.to_string()).to_string();
            ids.push(if user.numeric {
                key.to_string()
            } else {
                quoted.clone()
            });
            hash.push(format!(
                "{quoted}:{}",
                user.info.as_deref().unwrap_or("null")
            ));
        }
        format!(
            r#"{{"presence":{{"ids":[{}],"hash":{{{}}},"count":{}}}}}"#,
            ids.join(","),
            hash.join(","),
            ids.len()
        )
    }

    /// How many distinct users are in `channel`.
    pub fn user_count(&self, channel: &str) -> usize {
        self.channels.get(channel).map_or(0, |c| c.users.len())
    }

    /// The ids of `channel`'s users, in id order (the read API's `users`).
    pub fn user_ids(&self, channel: &str) -> Vec<Value> {
        self.channels.get(channel).map_or_else(Vec::new, |c| {
            c.users.iter().map(|(key, user)| user.id(key)).collect()
        })
    }

    /// Every presence channel with members, and its user count.
    pub fn channels(&self) -> impl Iterator<Item = (&str, usize)> {
        self.channels
            .iter()
            .map(|(name, channel)| (name.as_str(), channel.users.len()))
    }

    /// Every socket whose owner passes `owned`, with its channel and member (what a
    /// node tells the others in a cluster).
    pub fn held_where(&self, owned: impl Fn(u32) -> bool) -> Vec<(String, SocketRef, Member)> {
        let mut out = Vec::new();
        for (name, channel) in &self.channels {
            for (socket, (key, o)) in &channel.sockets {
                if owned(*o) {
                    if let Some(user) = channel.users.get(key) {
                        out.push((name.clone(), *socket, user.member(key)));
                    }
                }
            }
        }
        out
    }

    /// How many sockets the table holds (all channels).
    pub fn socket_count(&self) -> usize {
        self.channels.values().map(|c| c.sockets.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str) -> Member {
        Member::parse(&format!(
            r#"{{"user_id":"{id}","user_info":{{"name":"{id}"}}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn a_user_is_added_with_their_first_socket_and_removed_with_their_last() {
        let mut p = Presence::default();
        let added = p.join("presence-a", (1, 1), 0, member("u1")).unwrap();
        assert_eq!(
            added,
            Some(Change::Added(
                r#"{"user_id":"u1","user_info":{"name":"u1"}}"#.into()
            ))
        );
        assert_eq!(p.join("presence-a", (1, 2), 0, member("u1")).unwrap(), None);
        assert_eq!(p.user_count("presence-a"), 1);
        assert_eq!(p.leave("presence-a", (1, 1)), None);
        assert_eq!(
            p.leave("presence-a", (1, 2)),
            Some(Change::Removed(r#"{"user_id":"u1"}"#.into()))
        );
        assert_eq!(p.user_count("presence-a"), 0);
        assert_eq!(p.socket_count(), 0);
        assert_eq!(
            p.leave("presence-a", (1, 2)),
            None,
            "leaving twice is nothing"
        );
    }

    #[test]
    fn subscription_data_is_pushers_shape() {
        let mut p = Presence::default();
        p.join("presence-a", (1, 1), 0, member("b")).unwrap();
        p.join("presence-a", (1, 2), 0, member("a")).unwrap();
        let data: Value = serde_json::from_str(&p.subscription_data("presence-a")).unwrap();
        assert_eq!(
            data,
            json!({"presence": {"ids": ["a", "b"], "hash": {"a": {"name": "a"}, "b": {"name": "b"}}, "count": 2}})
        );
        let empty: Value = serde_json::from_str(&p.subscription_data("presence-x")).unwrap();
        assert_eq!(
            empty,
            json!({"presence": {"ids": [], "hash": {}, "count": 0}})
        );
    }

    #[test]
    fn numeric_ids_stay_numbers_in_events_and_keys_are_strings() {
        let mut p = Presence::default();
        let m = Member::parse(r#"{"user_id":7}"#).unwrap();
        let added = p.join("presence-a", (1, 1), 0, m).unwrap().unwrap();
        assert_eq!(added.data(), r#"{"user_id":7,"user_info":null}"#);
        let data: Value = serde_json::from_str(&p.subscription_data("presence-a")).unwrap();
        assert_eq!(data["presence"]["hash"], json!({"7": null}));
        assert_eq!(data["presence"]["ids"], json!([7]));
    }

    #[test]
    fn members_come_back_out_as_they_went_in() {
        let mut p = Presence::default();
        let info = r#"{"name":"Zoë \"Z\"","tags":["a",1],"nested":{"x":null}}"#;
        let ann = Member::parse(&format!(r#"{{"user_id":"a\"1","user_info":{info}}}"#)).unwrap();
        let bob = Member::parse(r#"{"user_id":12.5}"#).unwrap();
        p.join("presence-a", (1, 1), 3, ann.clone()).unwrap();
        p.join("presence-a", (1, 2), 3, bob.clone()).unwrap();
        p.join("presence-a", (1, 3), 4, ann.clone()).unwrap();
        let mut held = p.held_where(|o| o == 3);
        held.sort_by_key(|(_, socket, _)| *socket);
        assert_eq!(
            held,
            vec![
                ("presence-a".to_string(), (1, 1), ann.clone()),
                ("presence-a".to_string(), (1, 2), bob.clone()),
            ]
        );
        let data: Value = serde_json::from_str(&p.subscription_data("presence-a")).unwrap();
        assert_eq!(data["presence"]["ids"], json!([12.5, "a\"1"]));
        assert_eq!(data["presence"]["hash"]["a\"1"], ann.user_info);
        assert_eq!(data["presence"]["hash"]["12.5"], Value::Null);
        assert_eq!(data["presence"]["count"], 2);
        assert_eq!(p.user_ids("presence-a"), vec![json!(12.5), json!("a\"1")]);
        assert_eq!(
            p.leave("presence-a", (1, 2)),
            Some(Change::Removed(r#"{"user_id":12.5}"#.into()))
        );
    }

    #[test]
    fn an_owner_going_away_removes_its_sockets_users() {
        let mut p = Presence::default();
        p.join("presence-a", (1, 1), 0, member("u1")).unwrap();
        p.join("presence-a", (2, 1), 1, member("u1")).unwrap();
        p.join("presence-a", (2, 2), 1, member("u2")).unwrap();
        p.join("presence-b", (2, 3), 1, member("u3")).unwrap();
        let mut changes = p.leave_owner(1);
        changes.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            changes,
            vec![
                (
                    "presence-a".into(),
                    Change::Removed(r#"{"user_id":"u2"}"#.into())
                ),
                (
                    "presence-b".into(),
                    Change::Removed(r#"{"user_id":"u3"}"#.into())
                ),
            ]
        );
        assert_eq!(
            p.user_count("presence-a"),
            1,
            "u1 still has a socket of owner 0"
        );
        assert_eq!(p.held_where(|o| o == 0).len(), 1);
    }

    #[test]
    fn a_socket_joining_again_stays_who_it_was() {
        let mut p = Presence::default();
        p.join("presence-a", (1, 1), 0, member("u1")).unwrap();
        assert_eq!(p.join("presence-a", (1, 1), 0, member("u1")).unwrap(), None);
        assert_eq!(p.join("presence-a", (1, 1), 0, member("u2")).unwrap(), None);
        assert_eq!(p.user_ids("presence-a"), vec![json!("u1")]);
        assert!(p.leave("presence-a", (1, 1)).is_some());
    }

    #[test]
    fn bad_channel_data_is_refused_with_a_reason() {
        for bad in [
            "",
            "{",
            "[]",
            r#"{"user_info":{}}"#,
            r#"{"user_id":""}"#,
            r#"{"user_id":{}}"#,
        ] {
            assert!(Member::parse(bad).is_err(), "{bad:?}");
        }
        let long = format!(
            r#"{{"user_id":"a","user_info":"{}"}}"#,
            "x".repeat(MAX_CHANNEL_DATA)
        );
        assert!(Member::parse(&long).unwrap_err().contains("over the limit"));
    }

    #[test]
    fn a_full_channel_refuses_new_users_but_not_known_ones() {
        let mut p = Presence::default();
        for i in 0..MAX_MEMBERS {
            p.join("presence-a", (1, i as u32), 0, member(&i.to_string()))
                .unwrap();
        }
        assert_eq!(
            p.join("presence-a", (2, 0), 0, member("new")),
            Err(Refused::Full)
        );
        assert_eq!(p.join("presence-a", (2, 0), 0, member("0")), Ok(None));
    }
}
