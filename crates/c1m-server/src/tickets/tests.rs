use super::*;

fn ticketer(period: u64) -> (SharedTicketer, TicketKey) {
    let key = TicketKey::random(period);
    (SharedTicketer::new(key.clone()), key)
}

#[test]
fn a_ticket_opens_in_its_period_and_the_next_only() {
    let (ticketer, _) = ticketer(100);
    let ticket = ticketer.seal_at(b"session state", 100).unwrap();
    assert_eq!(ticketer.open_at(&ticket, 100).unwrap(), b"session state");
    assert_eq!(ticketer.open_at(&ticket, 101).unwrap(), b"session state");
    // Two periods on, its key is gone.
    assert_eq!(ticketer.open_at(&ticket, 102), None);
}

#[test]
fn processes_with_the_same_start_agree_on_every_later_key() {
    let (master, key) = ticketer(7);
    let worker = SharedTicketer::new(key.clone());
    // One seals in period 9, the other (started from the shared copy stepped to 8)
    // opens it: both stepped the same way.
    let late = SharedTicketer::new(key.advanced_to(8));
    let ticket = master.seal_at(b"x", 9).unwrap();
    assert_eq!(worker.open_at(&ticket, 9).unwrap(), b"x");
    assert_eq!(late.open_at(&ticket, 10).unwrap(), b"x");
    // Another server's key opens nothing.
    let (stranger, _) = ticketer(9);
    assert_eq!(stranger.open_at(&ticket, 9), None);
}

#[test]
fn a_later_key_gives_nothing_of_an_earlier_one() {
    let key = TicketKey::random(1);
    let later = key.advanced_to(2);
    assert_ne!(later.key, key.key);
    assert_eq!(later.period, 2);
    // Stepping is deterministic and only forward.
    assert_eq!(key.advanced_to(2), later);
    assert_eq!(later.advanced_to(1), later);
}

#[test]
fn a_clock_that_jumps_by_years_gets_a_fresh_key() {
    let key = TicketKey::random(1);
    let far = key.advanced_to(1 + MAX_STEPS + 1);
    assert_eq!(far.period, 1 + MAX_STEPS + 1);
    assert_ne!(
        far,
        key.advanced_to(1 + MAX_STEPS + 1),
        "random, not stepped"
    );
}

#[test]
fn damaged_or_short_tickets_open_to_nothing() {
    let (ticketer, _) = ticketer(5);
    let ticket = ticketer.seal_at(b"state", 5).unwrap();
    for cut in 0..ticket.len() {
        assert_eq!(ticketer.open_at(&ticket[..cut], 5), None, "cut at {cut}");
    }
    for i in 0..ticket.len() {
        let mut bad = ticket.clone();
        bad[i] ^= 1;
        assert_eq!(ticketer.open_at(&bad, 5), None, "byte {i} flipped");
    }
}

#[test]
fn the_key_never_shows_in_debug_output() {
    let key = TicketKey {
        period: 3,
        key: [0x5a; 32],
    };
    let shown = format!("{key:?} {:?}", SharedTicketer::new(key.clone()));
    assert!(!shown.contains("90"), "{shown}"); // 0x5a
    assert!(shown.contains("period: 3"), "{shown}");
}
