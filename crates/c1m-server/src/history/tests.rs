use super::*;
use std::collections::HashMap;

fn policy(size: usize, ttl_ms: Option<u64>) -> Policy {
    Policy {
        default: Limits {
            size,
            ttl: ttl_ms.map(Duration::from_millis),
        },
        ..Policy::default()
    }
}

fn payloads(publications: &[(u64, Bytes)]) -> Vec<(u64, &str)> {
    publications
        .iter()
        .map(|(o, p)| (*o, std::str::from_utf8(p).unwrap()))
        .collect()
}

#[test]
fn offsets_are_contiguous_per_topic_and_start_at_one() {
    let mut h = History::new(policy(10, None));
    let now = Instant::now();
    let a1 = h.append("a", Bytes::from("x"), now).unwrap();
    let b1 = h.append("b", Bytes::from("y"), now).unwrap();
    let a2 = h.append("a", Bytes::from("z"), now).unwrap();
    assert_eq!((a1.offset, b1.offset, a2.offset), (1, 1, 2));
    assert_eq!(a1.epoch, a2.epoch);
    assert_eq!(a1.epoch.len(), 8);
    assert_eq!(h.position("a"), Some(a2));
    assert_eq!(h.position("c"), None);
}

#[test]
fn no_history_means_no_offsets() {
    let mut h = History::new(policy(0, None));
    assert_eq!(h.append("a", Bytes::from("x"), Instant::now()), None);
    assert_eq!(
        h.recover("a", "e", 0, Instant::now()),
        Recovery::NotRecovered {
            reason: NotRecovered::NoHistory,
            position: None
        }
    );
}

#[test]
fn recovers_what_was_missed_in_order() {
    let mut h = History::new(policy(10, None));
    let now = Instant::now();
    let first = h.append("a", Bytes::from("1"), now).unwrap();
    h.append("a", Bytes::from("2"), now);
    h.append("a", Bytes::from("3"), now);
    match h.recover("a", &first.epoch, 1, now) {
        Recovery::Recovered {
            publications,
            position,
        } => {
            assert_eq!(payloads(&publications), [(2, "2"), (3, "3")]);
            assert_eq!(position.offset, 3);
        }
        other => panic!("{other:?}"),
    }
    // Up to date: recovered, nothing to send.
    assert!(matches!(
        h.recover("a", &first.epoch, 3, now),
        Recovery::Recovered { publications, .. } if publications.is_empty()
    ));
}

#[test]
fn says_why_it_cannot_recover() {
    let mut h = History::new(Policy {
        recovery_limit: 4,
        ..policy(3, None)
    });
    let now = Instant::now();
    let epoch = h.append("a", Bytes::from("1"), now).unwrap().epoch;
    for i in 2..=5 {
        h.append("a", Bytes::from(i.to_string()), now);
    }
    // Kept: 3, 4, 5.
    let reason = |h: &mut History, epoch: &str, since| match h.recover("a", epoch, since, now) {
        Recovery::NotRecovered { reason, position } => {
            assert_eq!(position.unwrap().offset, 5);
            reason
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(reason(&mut h, &epoch, 1), NotRecovered::TooOld);
    assert_eq!(reason(&mut h, "00000000", 4), NotRecovered::EpochChanged);
    assert_eq!(reason(&mut h, &epoch, 6), NotRecovered::AheadOfTopic);
    assert_eq!(reason(&mut h, &epoch, 0), NotRecovered::OverLimit);
    assert!(matches!(
        h.recover("a", &epoch, 2, now),
        Recovery::Recovered { .. }
    ));
    // A topic with history on but nothing published since start-up: any old
    // position is from a lost epoch.
    assert_eq!(
        h.recover("fresh", "abcd0123", 7, now),
        Recovery::NotRecovered {
            reason: NotRecovered::EpochChanged,
            position: None
        }
    );
}

#[test]
fn age_limit_drops_publications_but_keeps_the_epoch() {
    let mut h = History::new(policy(10, Some(1000)));
    let t0 = Instant::now();
    let p = h.append("a", Bytes::from("old"), t0).unwrap();
    let later = t0 + Duration::from_millis(1500);
    h.expire(later);
    assert_eq!(h.usage().publications, 0);
    assert_eq!(h.position("a"), Some(p.clone()), "epoch and offset stay");
    // Caught up at 1: nothing missed, recovered.
    assert!(matches!(
        h.recover("a", &p.epoch, 1, later),
        Recovery::Recovered { .. }
    ));
    // Behind at 0: the one publication is gone.
    assert!(matches!(
        h.recover("a", &p.epoch, 0, later),
        Recovery::NotRecovered {
            reason: NotRecovered::TooOld,
            ..
        }
    ));
    let next = h.append("a", Bytes::from("new"), later).unwrap();
    assert_eq!((next.offset, next.epoch), (2, p.epoch));
}

#[test]
fn memory_stays_bounded_under_a_flood_of_topics() {
    let max_bytes = 200_000;
    let mut h = History::new(Policy {
        max_bytes,
        ..policy(100, None)
    });
    let now = Instant::now();
    let payload = Bytes::from(vec![b'x'; 100]);
    for i in 0..100_000 {
        h.append(&format!("topic-{i}"), payload.clone(), now);
        assert!(h.usage().bytes <= max_bytes, "at {i}: {:?}", h.usage());
    }
    let usage = h.usage();
    assert!(usage.topics < 2_000, "{usage:?}");
    assert!(usage.evicted > 90_000, "{usage:?}");
    // The newest topic is there, an old one was forgotten with its epoch.
    assert!(h.position("topic-99999").is_some());
    assert!(h.position("topic-0").is_none());
}

#[test]
fn a_recreated_topic_gets_a_new_epoch() {
    let mut h = History::new(Policy {
        max_bytes: 1_000,
        ..policy(10, None)
    });
    let now = Instant::now();
    let first = h.append("a", Bytes::from("1"), now).unwrap();
    for i in 0..50 {
        h.append(&format!("other-{i}"), Bytes::from("x"), now);
    }
    assert_eq!(h.position("a"), None, "evicted");
    let again = h.append("a", Bytes::from("2"), now).unwrap();
    assert_eq!(again.offset, 1);
    assert_ne!(again.epoch, first.epoch);
}

#[test]
fn rules_override_the_default_by_pattern() {
    let p = Policy {
        rules: vec![
            Rule {
                pattern: "prices.*".into(),
                limits: Limits {
                    size: 50,
                    ttl: Some(Duration::from_secs(60)),
                },
            },
            Rule {
                pattern: "*.private".into(),
                limits: Limits { size: 0, ttl: None },
            },
        ],
        ..policy(5, None)
    };
    assert_eq!(p.limits("prices.eur").size, 50);
    assert_eq!(p.limits("chat.private").size, 0);
    assert_eq!(p.limits("chat").size, 5);
    assert_eq!(p.limits("time").size, 0, "the clock keeps none by default");
    assert!(p.enabled());
    assert!(!Policy::default().enabled());
}

#[test]
fn glob_matches_like_a_shell() {
    for (pattern, name, expect) in [
        ("a", "a", true),
        ("a", "ab", false),
        ("a*", "ab", true),
        ("*b", "ab", true),
        ("*", "", true),
        ("a*c", "abc", true),
        ("a*c", "ac", true),
        ("a*c", "acb", false),
        ("a*b*c", "a-b-c", true),
        ("a*b*c", "a-c-b", false),
        ("ab*ba", "aba", false),
    ] {
        assert_eq!(glob_match(pattern, name), expect, "{pattern} vs {name}");
    }
}

#[test]
fn a_page_is_cut_at_its_limit_and_checks_the_epoch() {
    let mut h = History::new(policy(10, None));
    let now = Instant::now();
    let epoch = h.append("a", Bytes::from("1"), now).unwrap().epoch;
    for i in 2..=6 {
        h.append("a", Bytes::from(i.to_string()), now);
    }
    let (page, position) = h.page("a", None, 2, 2, now).unwrap();
    assert_eq!(payloads(&page), [(3, "3"), (4, "4")]);
    assert_eq!(position.offset, 6);
    assert_eq!(
        h.page("a", Some("ffffffff"), 0, 10, now).unwrap_err(),
        NotRecovered::EpochChanged
    );
    assert!(h.page("a", Some(&epoch), 0, 10, now).is_ok());
    assert_eq!(
        h.page("nope", None, 0, 10, now).unwrap_err(),
        NotRecovered::NoHistory
    );
}

proptest::proptest! {
    /// Whatever the sequence of publications, expiries and recoveries: the store stays
    /// within its memory bound (plus at most the newest publication), offsets of a
    /// topic run 1, 2, 3, ... within an epoch, and a recovery answers with exactly the
    /// publications after the position, contiguous, up to where the topic stands.
    #[test]
    fn bounds_and_contiguity_hold(
        steps in proptest::collection::vec((0u8..4, 0usize..6, 0usize..200, 0u64..12), 1..200)
    ) {
        let max_bytes = 2_000;
        let mut h = History::new(Policy {
            max_bytes,
            recovery_limit: 5,
            ..policy(4, Some(50))
        });
        let t0 = Instant::now();
        let mut last: HashMap<String, Position> = HashMap::new();
        for (i, (kind, topic, size, back)) in steps.into_iter().enumerate() {
            let now = t0 + Duration::from_millis(i as u64 * 7);
            let topic = format!("t{topic}");
            match kind {
                0 | 1 => {
                    let p = h.append(&topic, Bytes::from(vec![b'x'; size]), now).unwrap();
                    if let Some(prev) = last.get(&topic) {
                        if prev.epoch == p.epoch {
                            proptest::prop_assert_eq!(p.offset, prev.offset + 1);
                        } else {
                            proptest::prop_assert_eq!(p.offset, 1, "a new epoch starts at 1");
                        }
                    }
                    last.insert(topic, p);
                    proptest::prop_assert!(h.usage().bytes <= max_bytes + PER_PUBLICATION + 200);
                }
                2 => h.expire(now),
                _ => {
                    let Some(p) = h.position(&topic) else { continue };
                    let since = p.offset.saturating_sub(back);
                    if let Recovery::Recovered { publications, position } =
                        h.recover(&topic, &p.epoch, since, now)
                    {
                        let offsets: Vec<u64> = publications.iter().map(|(o, _)| *o).collect();
                        let expected: Vec<u64> = (since + 1..=position.offset).collect();
                        proptest::prop_assert_eq!(offsets, expected);
                    }
                }
            }
        }
    }
}

#[test]
fn positions_given_by_a_cluster_are_kept_and_a_hole_starts_a_new_run() {
    let mut h = History::new(policy(10, None));
    let now = Instant::now();
    let at = |offset: u64, epoch: &str| Position {
        offset,
        epoch: epoch.into(),
    };
    assert!(h.record("a", &at(5, "e1"), Bytes::from("5"), now));
    assert!(h.record("a", &at(6, "e1"), Bytes::from("6"), now));
    assert!(
        !h.record("a", &at(6, "e1"), Bytes::from("6"), now),
        "a repeat"
    );
    assert_eq!(h.position("a"), Some(at(6, "e1")));
    match h.recover("a", "e1", 5, now) {
        Recovery::Recovered { publications, .. } => assert_eq!(payloads(&publications), [(6, "6")]),
        other => panic!("{other:?}"),
    }
    // What came before this node heard of the topic is not here.
    assert!(matches!(
        h.recover("a", "e1", 3, now),
        Recovery::NotRecovered {
            reason: NotRecovered::TooOld,
            ..
        }
    ));
    // A hole (this node missed 7 and 8): a recovery must not span it.
    assert!(h.record("a", &at(9, "e1"), Bytes::from("9"), now));
    assert!(matches!(
        h.recover("a", "e1", 6, now),
        Recovery::NotRecovered {
            reason: NotRecovered::TooOld,
            ..
        }
    ));
    assert_eq!(h.usage().publications, 1);
    // A new epoch (the broker lost its history) starts over.
    assert!(h.record("a", &at(1, "e2"), Bytes::from("1"), now));
    assert_eq!(h.position("a"), Some(at(1, "e2")));
    assert!(matches!(
        h.recover("a", "e1", 9, now),
        Recovery::NotRecovered {
            reason: NotRecovered::EpochChanged,
            ..
        }
    ));
    assert!(
        !h.record("b", &at(0, "e"), Bytes::from("x"), now),
        "offset 0 is none"
    );
}
