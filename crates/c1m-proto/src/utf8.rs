//! Incremental UTF-8 validation for text messages that arrive in pieces.
//!
//! A text message may be split across frames and across reads at any byte, including
//! in the middle of a multi-byte character. `std::str::from_utf8` tells a *truncated*
//! sequence at the end of a slice (`error_len() == None`) apart from an invalid one, so
//! the validator only has to carry the (at most 3) bytes of an unfinished character
//! from one piece to the next. Invalid input is reported as early as possible (RFC 6455
//! §8.1 "fail fast"), not at the end of the message.

/// Validates a byte stream as UTF-8, one piece at a time.
#[derive(Debug, Default, Clone)]
pub struct Utf8Validator {
    /// Bytes of a character cut off at the end of the previous piece.
    pending: [u8; 4],
    pending_len: u8,
}

/// The stream is not valid UTF-8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidUtf8;

impl Utf8Validator {
    /// Feeds the next piece; `last` says whether the stream ends with it.
    pub fn feed(&mut self, mut piece: &[u8], last: bool) -> Result<(), InvalidUtf8> {
        // First finish the character left over from the previous piece, byte by byte.
        while self.pending_len > 0 {
            let Some((&byte, rest)) = piece.split_first() else {
                return if last { Err(InvalidUtf8) } else { Ok(()) };
            };
            self.pending[self.pending_len as usize] = byte;
            self.pending_len += 1;
            piece = rest;
            match std::str::from_utf8(&self.pending[..self.pending_len as usize]) {
                Ok(_) => self.pending_len = 0,
                Err(e) if e.error_len().is_some() => return Err(InvalidUtf8),
                Err(_) => {} // still truncated: need more bytes
            }
        }
        match std::str::from_utf8(piece) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_some() => Err(InvalidUtf8),
            Err(e) => {
                if last {
                    return Err(InvalidUtf8);
                }
                let tail = &piece[e.valid_up_to()..];
                self.pending[..tail.len()].copy_from_slice(tail);
                self.pending_len = tail.len() as u8;
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn split_validate(bytes: &[u8], cuts: &[usize]) -> bool {
        let mut v = Utf8Validator::default();
        let mut start = 0;
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        points.sort_unstable();
        for p in points {
            if v.feed(&bytes[start..p], false).is_err() {
                return false;
            }
            start = p;
        }
        v.feed(&bytes[start..], true).is_ok()
    }

    #[test]
    fn truncated_character_at_the_end_is_invalid() {
        let mut v = Utf8Validator::default();
        assert!(v.feed(&[0xE2, 0x82], false).is_ok());
        assert_eq!(v.feed(&[], true), Err(InvalidUtf8));
    }

    #[test]
    fn invalid_byte_fails_fast() {
        let mut v = Utf8Validator::default();
        assert_eq!(v.feed(&[b'a', 0xFF], false), Err(InvalidUtf8));
        let mut v = Utf8Validator::default();
        assert!(v.feed(&[0xE2], false).is_ok());
        assert_eq!(v.feed(&[0x28], false), Err(InvalidUtf8));
    }

    #[test]
    fn character_split_three_ways() {
        let euro = "€".as_bytes();
        let mut v = Utf8Validator::default();
        assert!(v.feed(&euro[..1], false).is_ok());
        assert!(v.feed(&euro[1..2], false).is_ok());
        assert!(v.feed(&euro[2..], true).is_ok());
    }

    proptest! {
        #[test]
        fn agrees_with_std_on_any_split(bytes in proptest::collection::vec(any::<u8>(), 0..64),
                                         cuts in proptest::collection::vec(any::<usize>(), 0..6)) {
            prop_assert_eq!(split_validate(&bytes, &cuts), std::str::from_utf8(&bytes).is_ok());
        }

        #[test]
        fn valid_strings_pass_on_any_split(s in "\\PC{0,40}", cuts in proptest::collection::vec(any::<usize>(), 0..6)) {
            prop_assert!(split_validate(s.as_bytes(), &cuts));
        }
    }
}
