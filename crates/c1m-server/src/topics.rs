//! Topics: which connections receive a published message.
//!
//! A topic is a name and the list of its subscribers' slab keys (4 bytes each), so
//! publishing walks exactly the connections that want the message, and a topic with a
//! million subscribers costs 4 MB, not a hash set. Each connection remembers, per topic,
//! its position in that list ([`Subscription`]); leaving a topic is then a
//! `swap_remove` plus one fix-up of the connection that was moved into the hole, O(1)
//! whatever the topic's size. Keeping the two sides in step is the job of
//! `Server::subscribe`/`unsubscribe`, which own both the slab and this registry.
//!
//! Topics are created by their first subscriber and forgotten with their last, except
//! the built-in [`TIME`] topic of the clock broadcast, so clients that make up names
//! cannot grow the registry beyond the live subscriptions.

use std::collections::HashMap;

/// A topic's index in the registry. Small and `Copy`, stored in every subscription.
pub type TopicId = u32;

/// The clock broadcast's topic; connections that ask for no topic join it.
pub const TIME: &str = "time";

/// Longest topic name accepted.
pub const MAX_TOPIC_NAME: usize = 128;

/// One topic a connection is in, and where it sits in that topic's subscriber list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subscription {
    pub topic: TopicId,
    pub position: u32,
}

#[derive(Debug)]
struct Topic {
    name: Box<str>,
    subscribers: Vec<u32>,
    /// Messages published to this topic since start-up.
    published: u64,
}

/// Every topic that has subscribers (and `time`).
#[derive(Debug)]
pub struct Topics {
    by_name: HashMap<Box<str>, TopicId>,
    /// Indexed by `TopicId`; `None` for a freed id (kept for reuse in `free`).
    topics: Vec<Option<Topic>>,
    free: Vec<TopicId>,
    time: TopicId,
}

impl Default for Topics {
    fn default() -> Self {
        let mut topics = Topics {
            by_name: HashMap::new(),
            topics: Vec::new(),
            free: Vec::new(),
            time: 0,
        };
        topics.time = topics.get_or_create(TIME);
        topics
    }
}

/// Checks a topic name: 1 to 128 characters from `A-Z a-z 0-9 _ - . :`.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_TOPIC_NAME {
        return Err(format!("a topic name has 1 to {MAX_TOPIC_NAME} characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
    {
        return Err("a topic name uses only A-Z a-z 0-9 _ - . :".into());
    }
    Ok(())
}

impl Topics {
    /// The id of the built-in clock topic.
    pub fn time(&self) -> TopicId {
        self.time
    }

    pub fn id(&self, name: &str) -> Option<TopicId> {
        self.by_name.get(name).copied()
    }

    pub fn get_or_create(&mut self, name: &str) -> TopicId {
        if let Some(&id) = self.by_name.get(name) {
            return id;
        }
        let topic = Topic {
            name: name.into(),
            subscribers: Vec::new(),
            published: 0,
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.topics[id as usize] = Some(topic);
                id
            }
            None => {
                self.topics.push(Some(topic));
                (self.topics.len() - 1) as TopicId
            }
        };
        self.by_name.insert(name.into(), id);
        id
    }

    /// The slab keys of a topic's subscribers (empty for an unknown id).
    pub fn subscribers(&self, id: TopicId) -> &[u32] {
        match self.topics.get(id as usize) {
            Some(Some(topic)) => &topic.subscribers,
            _ => &[],
        }
    }

    pub fn name(&self, id: TopicId) -> &str {
        match self.topics.get(id as usize) {
            Some(Some(topic)) => &topic.name,
            _ => "",
        }
    }

    /// Counts a message published to the topic.
    pub fn count_published(&mut self, id: TopicId) {
        if let Some(Some(topic)) = self.topics.get_mut(id as usize) {
            topic.published += 1;
        }
    }

    /// Adds `key` to the topic's subscribers; returns its subscription.
    pub fn add(&mut self, id: TopicId, key: usize) -> Subscription {
        let topic = self.topics[id as usize]
            .as_mut()
            .expect("subscribing to a live topic");
        topic.subscribers.push(key as u32);
        Subscription {
            topic: id,
            position: (topic.subscribers.len() - 1) as u32,
        }
    }

    /// Removes the subscriber at `sub.position`. Returns the key of the subscriber that
    /// was moved into its place (whose subscription must now say `sub.position`), if any.
    /// Forgets the topic when its last subscriber leaves (except `time`).
    pub fn remove(&mut self, sub: Subscription) -> Option<usize> {
        let slot = self.topics.get_mut(sub.topic as usize)?;
        let topic = slot.as_mut()?;
        let position = sub.position as usize;
        if position >= topic.subscribers.len() {
            return None;
        }
        topic.subscribers.swap_remove(position);
        let moved = topic.subscribers.get(position).map(|&k| k as usize);
        if topic.subscribers.is_empty() && sub.topic != self.time {
            let topic = slot.take().expect("checked above");
            self.by_name.remove(&topic.name);
            self.free.push(sub.topic);
        } else if topic.subscribers.capacity() > 64
            && topic.subscribers.len() * 4 < topic.subscribers.capacity()
        {
            // Give memory back after a mass disconnect.
            topic.subscribers.shrink_to(topic.subscribers.len() * 2);
        }
        moved
    }

    /// (name, subscribers) of every topic, in no particular order: cheap enough to run
    /// every second with a million topics (no sort, no allocation).
    pub fn subscriber_counts(&self) -> impl Iterator<Item = (&str, u64)> {
        self.topics
            .iter()
            .flatten()
            .map(|t| (&*t.name, t.subscribers.len() as u64))
    }

    /// (name, subscribers, messages published) of every topic, in name order.
    pub fn summary(&self) -> Vec<(&str, usize, u64)> {
        let mut all: Vec<_> = self
            .topics
            .iter()
            .flatten()
            .map(|t| (&*t.name, t.subscribers.len(), t.published))
            .collect();
        all.sort_unstable_by(|a, b| a.0.cmp(b.0));
        all
    }

    /// Number of live topics.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remove_moves_the_last_subscriber_into_the_hole() {
        let mut topics = Topics::default();
        let a = topics.get_or_create("a");
        let s0 = topics.add(a, 10);
        let _s1 = topics.add(a, 11);
        let _s2 = topics.add(a, 12);
        assert_eq!(topics.remove(s0), Some(12));
        assert_eq!(topics.subscribers(a), &[12, 11]);
    }

    #[test]
    fn empty_topics_are_forgotten_but_time_stays() {
        let mut topics = Topics::default();
        let a = topics.get_or_create("a");
        let s = topics.add(a, 1);
        assert_eq!(topics.remove(s), None);
        assert_eq!(topics.id("a"), None);
        let t = topics.time();
        let s = topics.add(t, 1);
        topics.remove(s);
        assert_eq!(topics.id(TIME), Some(t));
        // The freed id is reused.
        assert_eq!(topics.get_or_create("b"), a);
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("prices.EUR-USD:1_m").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("a b").is_err());
        assert!(validate_name(&"x".repeat(129)).is_err());
    }
}
