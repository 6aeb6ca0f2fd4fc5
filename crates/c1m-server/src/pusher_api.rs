//! The read side of Pusher's HTTP API, sans-I/O: `GET /apps/{id}/channels`, one
//! channel, and a presence channel's users. The request is checked (signature in
//! `http.rs`, parameters here) into a [`Read`]; whoever holds the numbers answers it
//! with [`answer`]: the single process, or the master for its workers.
//!
//! Where the numbers come from, and how fresh they are (docs/server.md, "Pusher
//! protocol"): presence members from the node's presence table (in a cluster, its
//! replica of every node's members); subscriptions per channel from this process's
//! own count (exact) plus the latest reports of the node's other workers and of the
//! cluster's other nodes (each at most a second old, each listing its 1,000 largest
//! channels, see `node_stats`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::presence::Presence;
use crate::pusher::{app_of, channel_kind, channel_of, App, ChannelKind, PRESENCE_PREFIX};

/// A checked read request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Read {
    /// Occupied channels, those starting with `prefix` if given.
    Channels {
        prefix: Option<String>,
        user_count: bool,
        subscription_count: bool,
    },
    Channel {
        name: String,
        user_count: bool,
        subscription_count: bool,
    },
    /// A presence channel's users.
    Users { name: String },
}

/// Why a read was refused: status and message.
pub type Refusal = (u16, String);

impl Read {
    /// Reads `rest` (the path after `/apps/{id}/`) and the decoded query parameters.
    pub fn parse(rest: &str, params: &[(String, String)]) -> Result<Read, Refusal> {
        let param = |name: &str| {
            params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        let info: Vec<&str> = param("info")
            .map(|i| i.split(',').filter(|s| !s.is_empty()).collect())
            .unwrap_or_default();
        for attribute in &info {
            if !matches!(*attribute, "user_count" | "subscription_count") {
                return Err((400, format!("unknown info attribute {attribute:?}")));
            }
        }
        let user_count = info.contains(&"user_count");
        let subscription_count = info.contains(&"subscription_count");
        let bad_name = |name: &str| {
            crate::pusher::validate_channel(name)
                .map_err(|e| (400, format!("channel {name:?}: {e}")))
        };
        let presence_only = |name: &str, what: &str| {
            if channel_kind(name) == ChannelKind::Presence {
                Ok(())
            } else {
                Err((400, format!("{what} is for presence channels only")))
            }
        };
        if rest == "channels" {
            let prefix = param("filter_by_prefix").map(str::to_string);
            if user_count
                && !prefix
                    .as_deref()
                    .is_some_and(|p| p.starts_with(PRESENCE_PREFIX))
            {
                return Err((
                    400,
                    "info=user_count needs filter_by_prefix=presence-".to_string(),
                ));
            }
            return Ok(Read::Channels {
                prefix,
                user_count,
                subscription_count,
            });
        }
        let Some(name) = rest.strip_prefix("channels/") else {
            return Err((404, format!("no such API path /apps/ID/{rest}")));
        };
        if let Some(name) = name.strip_suffix("/users") {
            bad_name(name)?;
            presence_only(name, "/users")?;
            return Ok(Read::Users { name: name.into() });
        }
        bad_name(name)?;
        if user_count {
            presence_only(name, "info=user_count")?;
        }
        Ok(Read::Channel {
            name: name.into(),
            user_count,
            subscription_count,
        })
    }
}

/// [`answer`] for app number `app` of `apps`: its channels among `by_topic`
/// (subscribers per topic, the node's or the cluster's) and among `presence`'s
/// channels (members per topic). Users' own channels (`#server-to-user-…`) are left out.
pub fn answer_for_app(
    apps: &[App],
    app: usize,
    read: &Read,
    by_topic: &BTreeMap<String, u64>,
    presence: &Presence,
) -> (u16, Value) {
    let mine = |topic: &str| {
        (app_of(apps, topic) == Some(app) && !channel_of(topic).starts_with('#'))
            .then(|| channel_of(topic).to_string())
    };
    let counts: BTreeMap<String, u64> = by_topic
        .iter()
        .filter_map(|(topic, n)| Some((mine(topic)?, *n)))
        .collect();
    let members: BTreeMap<String, Vec<Value>> = presence
        .channels()
        .filter_map(|(topic, _)| Some((mine(topic)?, presence.user_ids(topic))))
        .collect();
    answer(read, &counts, &members)
}

/// The answer to `read`: `subscriptions` are subscribers per channel (the node's, or
/// the cluster's), `members` the user ids of each presence channel with any.
pub fn answer(
    read: &Read,
    subscriptions: &BTreeMap<String, u64>,
    members: &BTreeMap<String, Vec<Value>>,
) -> (u16, Value) {
    let count = |name: &str| subscriptions.get(name).copied().unwrap_or(0);
    let users_in = |name: &str| members.get(name).map_or(0, Vec::len);
    match read {
        Read::Channels {
            prefix,
            user_count,
            subscription_count,
        } => {
            let mut names: Vec<&str> = subscriptions
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(name, _)| name.as_str())
                .chain(members.keys().map(String::as_str))
                .filter(|name| prefix.as_deref().is_none_or(|p| name.starts_with(p)))
                .collect();
            names.sort_unstable();
            names.dedup();
            let channels: Map<String, Value> = names
                .into_iter()
                .map(|name| {
                    let mut info = Map::new();
                    if *user_count {
                        info.insert("user_count".into(), users_in(name).into());
                    }
                    if *subscription_count {
                        info.insert("subscription_count".into(), count(name).into());
                    }
                    (name.to_string(), Value::Object(info))
                })
                .collect();
            (200, json!({ "channels": channels }))
        }
        Read::Channel {
            name,
            user_count,
            subscription_count,
        } => {
            let users = users_in(name);
            let mut body = Map::new();
            body.insert("occupied".into(), (count(name) > 0 || users > 0).into());
            if *user_count {
                body.insert("user_count".into(), users.into());
            }
            if *subscription_count {
                body.insert("subscription_count".into(), count(name).into());
            }
            (200, Value::Object(body))
        }
        Read::Users { name } => {
            let users: Vec<Value> = members
                .get(name)
                .into_iter()
                .flatten()
                .map(|id| json!({ "id": id }))
                .collect();
            (200, json!({ "users": users }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presence::Member;

    fn params(query: &str) -> Vec<(String, String)> {
        form_urlencoded::parse(query.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    }

    #[test]
    fn reads_parse_and_bad_ones_say_why() {
        assert_eq!(
            Read::parse(
                "channels",
                &params("filter_by_prefix=presence-&info=user_count")
            ),
            Ok(Read::Channels {
                prefix: Some("presence-".into()),
                user_count: true,
                subscription_count: false
            })
        );
        assert_eq!(
            Read::parse("channels/presence-a/users", &[]),
            Ok(Read::Users {
                name: "presence-a".into()
            })
        );
        for (rest, query, status) in [
            ("channels", "info=user_count", 400),
            ("channels", "info=bogus", 400),
            ("channels/news", "info=user_count", 400),
            ("channels/news/users", "", 400),
            ("channels/bad name", "", 400),
            ("elsewhere", "", 404),
        ] {
            let refused = Read::parse(rest, &params(query)).unwrap_err();
            assert_eq!(refused.0, status, "{rest}?{query}: {refused:?}");
        }
    }

    #[test]
    fn each_app_sees_its_own_channels() {
        let apps = [App::parse("1:a:s").unwrap(), App::parse("2:b:s").unwrap()];
        let counts: BTreeMap<String, u64> = [
            ("news", 1),
            ("2~news", 2),
            ("2~sports", 3),
            ("#server-to-user-u", 1),
        ]
        .into_iter()
        .map(|(t, n)| (t.to_string(), n))
        .collect();
        let all = Read::parse("channels", &params("info=subscription_count")).unwrap();
        let presence = Presence::default();
        assert_eq!(
            answer_for_app(&apps, 0, &all, &counts, &presence).1,
            json!({"channels": {"news": {"subscription_count": 1}}})
        );
        assert_eq!(
            answer_for_app(&apps, 1, &all, &counts, &presence).1,
            json!({"channels": {"news": {"subscription_count": 2}, "sports": {"subscription_count": 3}}})
        );
    }

    #[test]
    fn answers_have_pushers_shapes() {
        let mut presence = Presence::default();
        let member = |id: &str| Member::parse(&format!(r#"{{"user_id":"{id}"}}"#)).unwrap();
        presence
            .join("presence-a", (1, 1), 0, member("u1"))
            .unwrap();
        presence
            .join("presence-a", (1, 2), 0, member("u2"))
            .unwrap();
        let counts: BTreeMap<String, u64> = [
            ("news".to_string(), 3),
            ("presence-a".to_string(), 2),
            ("empty".to_string(), 0),
        ]
        .into_iter()
        .collect();
        let apps = [App::parse("1:a:s").unwrap()];
        let answer = |read: &Read, counts: &BTreeMap<String, u64>, presence: &Presence| {
            answer_for_app(&apps, 0, read, counts, presence)
        };
        let all = Read::parse("channels", &params("info=subscription_count")).unwrap();
        assert_eq!(
            answer(&all, &counts, &presence).1,
            json!({"channels": {"news": {"subscription_count": 3}, "presence-a": {"subscription_count": 2}}})
        );
        let present = Read::parse(
            "channels",
            &params("filter_by_prefix=presence-&info=user_count"),
        )
        .unwrap();
        assert_eq!(
            answer(&present, &counts, &presence).1,
            json!({"channels": {"presence-a": {"user_count": 2}}})
        );
        let one = Read::parse(
            "channels/presence-a",
            &params("info=user_count,subscription_count"),
        )
        .unwrap();
        assert_eq!(
            answer(&one, &counts, &presence).1,
            json!({"occupied": true, "user_count": 2, "subscription_count": 2})
        );
        let vacant = Read::parse("channels/nobody", &[]).unwrap();
        assert_eq!(
            answer(&vacant, &counts, &presence).1,
            json!({"occupied": false})
        );
        let users = Read::parse("channels/presence-a/users", &[]).unwrap();
        assert_eq!(
            answer(&users, &counts, &presence).1,
            json!({"users": [{"id": "u1"}, {"id": "u2"}]})
        );
    }
}
