//! Reading the timestamp out of a received message.
//!
//! Accepted: a decimal number of milliseconds, microseconds or nanoseconds since the
//! Unix epoch (told apart by magnitude: today that is 13, 16 or 19 digits), or a JSON
//! object with a numeric `ts` field in any of those units, or with a numeric `data`
//! field (c1m's envelope, `?envelope=1`, around a stamp; or a Pusher event, whose
//! `data` is a string holding the number). Anything else is counted as
//! an unparsable payload by the caller, never a crash.

/// Microseconds since the epoch at which the message was stamped, if it says.
pub fn stamp_micros(payload: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(payload).ok()?.trim();
    let value = if text.starts_with('{') {
        json_ts(text)?
    } else {
        text.parse::<u64>().ok()?
    };
    to_micros(value)
}

/// Scales a timestamp in ms, µs or ns (by magnitude) to µs. Values before 2001 or
/// after 2286 in every unit are rejected as not a timestamp.
fn to_micros(value: u64) -> Option<u64> {
    const MS_LO: u64 = 1_000_000_000_000; // 2001-09-09 in ms
    const MS_HI: u64 = 10_000_000_000_000; // 2286-11-20 in ms
    match value {
        v if (MS_LO..MS_HI).contains(&v) => Some(v * 1_000),
        v if (MS_LO * 1_000..MS_HI * 1_000).contains(&v) => Some(v),
        v if (MS_LO * 1_000_000..MS_HI.saturating_mul(1_000_000)).contains(&v) => Some(v / 1_000),
        _ => None,
    }
}

/// The numeric `ts` field of a JSON object, else its `data` field (an envelope).
fn json_ts(text: &str) -> Option<u64> {
    let value: serde_json::Value = serde_json::from_str(text).ok()?;
    let ts = value.get("ts").or_else(|| value.get("data"))?;
    json_number(ts)
}

/// The stamp in µs of an already parsed JSON value: a number, or an object with a
/// numeric `ts` (an envelope's `data`, as `--recover` reads it).
pub fn stamp_of_value(value: &serde_json::Value) -> Option<u64> {
    to_micros(json_number(value.get("ts").unwrap_or(value))?)
}

/// A number, or a string holding one (a Pusher event's `data` is a string).
fn json_number(value: &serde_json::Value) -> Option<u64> {
    value
        .as_u64()
        .or_else(|| value.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
        .or_else(|| value.as_str()?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pusher_event_carries_its_stamp_as_a_string() {
        let event = br#"{"event":"message","channel":"time","data":"1795629229358"}"#;
        assert_eq!(stamp_micros(event), Some(1_795_629_229_358_000));
        assert_eq!(stamp_micros(br#"{"event":"e","data":"soon"}"#), None);
    }

    #[test]
    fn units_are_told_apart_by_magnitude() {
        assert_eq!(stamp_micros(b"1795629229358"), Some(1_795_629_229_358_000));
        assert_eq!(
            stamp_micros(b"1795629229358123"),
            Some(1_795_629_229_358_123)
        );
        assert_eq!(
            stamp_micros(b"1795629229358123456"),
            Some(1_795_629_229_358_123)
        );
    }

    #[test]
    fn json_ts_is_accepted() {
        assert_eq!(
            stamp_micros(br#"{"topic":"a","ts":1795629229358,"data":[1,2]}"#),
            Some(1_795_629_229_358_000)
        );
        assert_eq!(
            stamp_micros(br#"{"ts":1795629229358.7}"#),
            Some(1_795_629_229_358_000)
        );
        assert_eq!(
            stamp_micros(br#"{"topic":"time","offset":3,"epoch":"e","data":1795629229358}"#),
            Some(1_795_629_229_358_000),
            "an envelope around a stamp"
        );
        let data = serde_json::json!({"ts": 1795629229358u64});
        assert_eq!(stamp_of_value(&data), Some(1_795_629_229_358_000));
        assert_eq!(stamp_of_value(&serde_json::json!("soon")), None);
    }

    #[test]
    fn garbage_is_rejected_not_panicking() {
        for garbage in [
            &b""[..],
            b"hello",
            b"-1795629229358",
            b"17956292293580000000000000",
            b"42",
            b"{\"ts\":\"soon\"}",
            b"{\"ts\":",
            b"\xff\xfe",
            b"{}",
        ] {
            assert_eq!(stamp_micros(garbage), None, "{garbage:?}");
        }
    }
}
