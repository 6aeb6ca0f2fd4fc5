//! Where a publication goes, and what came of it: the two values every path of a
//! publication (local, relayed by the master, through the broker) hands around.
//!
//! Types instead of placeholder values: before, the empty topic name meant "every
//! connection" and a count of `u64::MAX - 1` meant "refused", and every module that
//! touched a publication imported the control protocol for those constants. The empty
//! name survives only on the wire ([`Target::to_wire`]), where no topic can have it
//! (`topics::validate_name` refuses empty names).

/// The connections a publication is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// Every open connection (`POST /broadcast`).
    All,
    /// The subscribers of one topic.
    Topic(String),
}

impl Target {
    /// The topic's name; `None` for a broadcast to every connection.
    pub fn topic(&self) -> Option<&str> {
        match self {
            Target::All => None,
            Target::Topic(name) => Some(name),
        }
    }

    /// The name on the control channel and the broker: empty for [`Target::All`].
    pub fn to_wire(&self) -> &str {
        self.topic().unwrap_or("")
    }

    /// The inverse of [`Target::to_wire`].
    pub fn from_wire(name: String) -> Target {
        if name.is_empty() {
            Target::All
        } else {
            Target::Topic(name)
        }
    }
}

/// What a publish came to, as its HTTP answer reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// It reached `connections` connections. `complete` is false when some of the
    /// processes that should have counted did not answer in time (a stopped or
    /// overloaded worker): the count is then a lower bound.
    Counted { connections: u64, complete: bool },
    /// The cluster's broker did not take it (down, or no confirmation): not published.
    Refused,
}

impl Delivery {
    /// A count every process answered.
    pub fn whole(connections: u64) -> Delivery {
        Delivery::Counted {
            connections,
            complete: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names_round_trip() {
        for target in [Target::All, Target::Topic("prices".into())] {
            let wire = target.to_wire().to_string();
            assert_eq!(Target::from_wire(wire), target);
        }
        assert_eq!(Target::All.to_wire(), "");
    }
}
