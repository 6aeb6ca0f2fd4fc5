//! Close status codes (RFC 6455 §7.4) and the rule for which ones may appear on the wire.

/// A WebSocket close status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseCode(pub u16);

impl CloseCode {
    /// 1000: normal closure.
    pub const NORMAL: CloseCode = CloseCode(1000);
    /// 1001: the endpoint is going away (server shutdown).
    pub const GOING_AWAY: CloseCode = CloseCode(1001);
    /// 1002: protocol error.
    pub const PROTOCOL: CloseCode = CloseCode(1002);
    /// 1007: payload data not consistent with the message type (invalid UTF-8).
    pub const INVALID_PAYLOAD: CloseCode = CloseCode(1007);
    /// 1008: policy violation (e.g. a slow consumer).
    pub const POLICY: CloseCode = CloseCode(1008);
    /// 1009: message too big.
    pub const TOO_BIG: CloseCode = CloseCode(1009);
    /// 1011: unexpected server condition.
    pub const INTERNAL: CloseCode = CloseCode(1011);
    /// 1013: try again later.
    pub const TRY_AGAIN_LATER: CloseCode = CloseCode(1013);

    /// Whether this code may be sent in a close frame. 1004–1006 and 1015 are reserved
    /// for local use, 1016–2999 are reserved for future RFCs, below 1000 is invalid;
    /// 3000–4999 belong to libraries and applications.
    pub fn is_valid_on_wire(self) -> bool {
        matches!(self.0, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_validity_follows_rfc_6455_and_iana() {
        for ok in [
            1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 4999,
        ] {
            assert!(CloseCode(ok).is_valid_on_wire(), "{ok}");
        }
        for bad in [
            0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ] {
            assert!(!CloseCode(bad).is_valid_on_wire(), "{bad}");
        }
    }
}
