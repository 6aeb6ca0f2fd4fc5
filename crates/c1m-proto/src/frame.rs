//! WebSocket frames (RFC 6455 §5): encoding, and a streaming decoder.
//!
//! The decoder is fed the bytes of each `read` as they come and calls back with
//! [`Event`]s. Data payloads are unmasked *in place* and handed out as slices of the
//! caller's buffer, so the decoder itself holds only a frame header in progress (at
//! most 14 bytes), the position inside the current payload, and — only while a control
//! frame is split across reads — up to 125 bytes of its payload.
//!
//! Every rule of §5 that a receiver must check is checked here, each failure mapped
//! to the close code the peer should be sent ([`ProtocolError::close_code`]).

use crate::close::CloseCode;
use crate::utf8::Utf8Validator;

/// Frame opcodes (RFC 6455 §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    Continuation = 0x0,
    Text = 0x1,
    Binary = 0x2,
    Close = 0x8,
    Ping = 0x9,
    Pong = 0xA,
}

impl OpCode {
    fn from_bits(bits: u8) -> Option<OpCode> {
        Some(match bits {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return None,
        })
    }

    /// Control frames (close, ping, pong) have opcodes with the high bit set.
    pub fn is_control(self) -> bool {
        (self as u8) & 0x8 != 0
    }
}

/// Which end of the connection the decoder sits at: servers only accept masked frames,
/// clients only unmasked ones (RFC 6455 §5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Server,
    Client,
}

/// The largest payload a control frame may carry.
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// Size of the header of a frame with a payload of `payload_len` bytes.
pub fn header_len(payload_len: usize, masked: bool) -> usize {
    let base = match payload_len {
        0..=125 => 2,
        126..=0xFFFF => 4,
        _ => 10,
    };
    base + if masked { 4 } else { 0 }
}

/// Appends one complete, final (FIN) frame to `out`. With `mask` (clients must mask),
/// the payload is masked with that key.
pub fn encode_frame(opcode: OpCode, payload: &[u8], mask: Option<[u8; 4]>, out: &mut Vec<u8>) {
    encode(0x80 | opcode as u8, payload, mask, out);
}

/// Like [`encode_frame`] for a message compressed with permessage-deflate: RSV1 set,
/// `payload` already compressed.
pub fn encode_compressed_frame(
    opcode: OpCode,
    payload: &[u8],
    mask: Option<[u8; 4]>,
    out: &mut Vec<u8>,
) {
    encode(0x80 | 0x40 | opcode as u8, payload, mask, out);
}

/// The opcode and payload of a complete, unmasked frame as [`encode_frame`] writes it
/// (a server's broadcast frame), or `None` if `frame` is not one.
pub fn split_frame(frame: &[u8]) -> Option<(OpCode, &[u8])> {
    let opcode = OpCode::from_bits(*frame.first()? & 0x0F)?;
    let (len, start): (usize, usize) = match *frame.get(1)? {
        126 => (
            u16::from_be_bytes([*frame.get(2)?, *frame.get(3)?]) as usize,
            4,
        ),
        127 => (
            u64::from_be_bytes(frame.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        short if short < 126 => (short as usize, 2),
        _ => return None, // masked
    };
    Some((opcode, frame.get(start..start.checked_add(len)?)?))
}

fn encode(first_byte: u8, payload: &[u8], mask: Option<[u8; 4]>, out: &mut Vec<u8>) {
    out.reserve(header_len(payload.len(), mask.is_some()) + payload.len());
    out.push(first_byte);
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        len @ 0..=125 => out.push(mask_bit | len as u8),
        len @ 126..=0xFFFF => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    match mask {
        None => out.extend_from_slice(payload),
        Some(key) => {
            out.extend_from_slice(&key);
            let start = out.len();
            out.extend_from_slice(payload);
            apply_mask(&mut out[start..], key, 0);
        }
    }
}

/// Encodes a close frame's payload: the code followed by a UTF-8 reason (trimmed so
/// the payload fits the 125-byte control frame limit).
pub fn close_payload(code: CloseCode, reason: &str) -> Vec<u8> {
    let mut reason = reason;
    while reason.len() > MAX_CONTROL_PAYLOAD - 2 {
        let mut cut = MAX_CONTROL_PAYLOAD - 2;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason = &reason[..cut];
    }
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.0.to_be_bytes());
    payload.extend_from_slice(reason.as_bytes());
    payload
}

/// XORs `data` with the masking key, starting at byte `offset` of the key cycle.
pub fn apply_mask(data: &mut [u8], key: [u8; 4], offset: usize) {
    // Rotate the key so the word-wise loop below can start at the slice's first byte.
    let key = [
        key[offset % 4],
        key[(offset + 1) % 4],
        key[(offset + 2) % 4],
        key[(offset + 3) % 4],
    ];
    let word = u32::from_ne_bytes(key);
    let mut chunks = data.chunks_exact_mut(4);
    for chunk in &mut chunks {
        let value = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]) ^ word;
        chunk.copy_from_slice(&value.to_ne_bytes());
    }
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= key[i];
    }
}

/// Something the peer sent, in the order it was sent.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A piece of a data message's payload, already unmasked (and, for uncompressed
    /// text, known to be valid UTF-8 so far). `message_end` marks the last piece of the
    /// message. `compressed`: the message is permessage-deflate data (RSV1), to be
    /// inflated (and then UTF-8 checked) by the caller.
    Data {
        text: bool,
        compressed: bool,
        payload: &'a [u8],
        message_end: bool,
    },
    /// A ping; the application answers with a pong carrying the same payload.
    Ping(&'a [u8]),
    /// A pong (solicited or not).
    Pong(&'a [u8]),
    /// A close frame: its code (absent when the payload was empty) and reason. After a
    /// close the decoder accepts nothing more.
    Close {
        code: Option<CloseCode>,
        reason: &'a str,
    },
}

/// A violation of RFC 6455 by the peer. The connection must be closed with
/// [`ProtocolError::close_code`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("reserved bits set without a negotiated extension")]
    ReservedBits,
    #[error("compressed bit on a continuation or control frame")]
    CompressedBitMisplaced,
    #[error("reserved opcode {0:#x}")]
    ReservedOpcode(u8),
    #[error("client frame is not masked")]
    UnmaskedFrame,
    #[error("server frame is masked")]
    MaskedFrame,
    #[error("control frame is fragmented")]
    FragmentedControl,
    #[error("control frame payload of {0} bytes exceeds 125")]
    ControlTooLong(u64),
    #[error("continuation frame without a message in progress")]
    UnexpectedContinuation,
    #[error("new data frame while a fragmented message is in progress")]
    ExpectedContinuation,
    #[error("64-bit payload length with the most significant bit set")]
    LengthOverflow,
    #[error("close frame with a 1-byte payload")]
    CloseTooShort,
    #[error("close code {0} is not allowed on the wire")]
    InvalidCloseCode(u16),
    #[error("frame received after a close frame")]
    DataAfterClose,
    #[error("text is not valid UTF-8")]
    InvalidUtf8,
    #[error("message exceeds the limit of {limit} bytes")]
    MessageTooBig { limit: u64 },
}

impl ProtocolError {
    /// The close code to send for this error (RFC 6455 §7.4.1).
    pub fn close_code(&self) -> CloseCode {
        match self {
            ProtocolError::InvalidUtf8 => CloseCode::INVALID_PAYLOAD,
            ProtocolError::MessageTooBig { .. } => CloseCode::TOO_BIG,
            _ => CloseCode::PROTOCOL,
        }
    }
}

/// Settings of a [`Decoder`].
#[derive(Debug, Clone, Copy)]
pub struct DecoderConfig {
    pub role: Role,
    /// Largest data message (sum of its fragments) accepted; larger ones fail with
    /// [`ProtocolError::MessageTooBig`] as soon as a frame header announces them, before
    /// any payload is read. For compressed messages it bounds the compressed size; the
    /// caller bounds the inflated size.
    pub max_message_size: u64,
    /// permessage-deflate was negotiated: RSV1 may mark the first frame of a message.
    pub compression: bool,
}

/// The frame whose payload is being read.
#[derive(Debug, Clone)]
struct FrameInProgress {
    opcode: OpCode,
    fin: bool,
    /// RSV1: the first frame of a compressed message.
    rsv1: bool,
    mask: Option<[u8; 4]>,
    remaining: u64,
    /// Bytes of payload already read (for the mask cycle).
    consumed: u64,
}

/// The data message being received (between its first frame and its FIN frame).
#[derive(Debug, Clone)]
struct MessageInProgress {
    text: bool,
    compressed: bool,
    size: u64,
    utf8: Utf8Validator,
}

/// Streaming decoder for one direction of one connection. See the module docs.
#[derive(Debug, Clone)]
pub struct Decoder {
    config: DecoderConfig,
    header: [u8; 14],
    header_len: u8,
    frame: Option<FrameInProgress>,
    message: Option<MessageInProgress>,
    /// Payload of a control frame split across reads (empty otherwise).
    control: Vec<u8>,
    closed: bool,
}

impl Decoder {
    pub fn new(config: DecoderConfig) -> Decoder {
        Decoder {
            config,
            header: [0; 14],
            header_len: 0,
            frame: None,
            message: None,
            control: Vec::new(),
            closed: false,
        }
    }

    /// True when the decoder sits between messages with nothing buffered, so a caller
    /// that wants to save memory may drop it and start a fresh one on the next read.
    pub fn is_idle(&self) -> bool {
        self.header_len == 0 && self.frame.is_none() && self.message.is_none() && !self.closed
    }

    /// Decodes `input` (which it unmasks in place), calling `on_event` for every event.
    /// Stops at the first protocol error; the input after it is not looked at.
    pub fn decode(
        &mut self,
        input: &mut [u8],
        mut on_event: impl FnMut(Event<'_>),
    ) -> Result<(), ProtocolError> {
        let mut input = input;
        loop {
            if self.frame.is_none() {
                if input.is_empty() {
                    return Ok(());
                }
                if self.closed {
                    return Err(ProtocolError::DataAfterClose);
                }
                let taken = self.fill_header(input);
                input = &mut input[taken..];
                match self.parse_header()? {
                    Some(frame) => self.start_frame(frame)?,
                    None => return Ok(()), // header still incomplete; input is used up
                }
            }
            let taken = self.payload(input, &mut on_event)?;
            input = &mut input[taken..];
            if input.is_empty() && self.frame.is_some() {
                return Ok(()); // the rest of this frame's payload comes in a later read
            }
        }
    }

    /// Copies header bytes from `input` until the header is complete; returns how many.
    fn fill_header(&mut self, input: &[u8]) -> usize {
        let mut taken = 0;
        loop {
            let have = self.header_len as usize;
            let needed = self.header_needed();
            if have >= needed || taken == input.len() {
                return taken;
            }
            let n = (needed - have).min(input.len() - taken);
            self.header[have..have + n].copy_from_slice(&input[taken..taken + n]);
            self.header_len += n as u8;
            taken += n;
        }
    }

    /// How long the header in progress is, as far as its bytes so far tell.
    fn header_needed(&self) -> usize {
        if self.header_len < 2 {
            return 2;
        }
        let masked = self.header[1] & 0x80 != 0;
        let extended = match self.header[1] & 0x7F {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        2 + extended + if masked { 4 } else { 0 }
    }

    /// Validates a complete header and turns it into a frame in progress.
    fn parse_header(&mut self) -> Result<Option<FrameInProgress>, ProtocolError> {
        let needed = self.header_needed();
        if (self.header_len as usize) < needed {
            return Ok(None);
        }
        let h = &self.header;
        let fin = h[0] & 0x80 != 0;
        let rsv1 = h[0] & 0x40 != 0;
        if h[0] & 0x30 != 0 || (rsv1 && !self.config.compression) {
            return Err(ProtocolError::ReservedBits);
        }
        let opcode =
            OpCode::from_bits(h[0] & 0x0F).ok_or(ProtocolError::ReservedOpcode(h[0] & 0x0F))?;
        if rsv1 && (opcode.is_control() || opcode == OpCode::Continuation) {
            return Err(ProtocolError::CompressedBitMisplaced);
        }
        let masked = h[1] & 0x80 != 0;
        match (self.config.role, masked) {
            (Role::Server, false) => return Err(ProtocolError::UnmaskedFrame),
            (Role::Client, true) => return Err(ProtocolError::MaskedFrame),
            _ => {}
        }
        let (len, mask_at) = match h[1] & 0x7F {
            126 => (u16::from_be_bytes([h[2], h[3]]) as u64, 4),
            127 => {
                let len = u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]);
                if len >> 63 != 0 {
                    return Err(ProtocolError::LengthOverflow);
                }
                (len, 10)
            }
            short => (short as u64, 2),
        };
        let mask = masked.then(|| [h[mask_at], h[mask_at + 1], h[mask_at + 2], h[mask_at + 3]]);
        self.header_len = 0;
        Ok(Some(FrameInProgress {
            opcode,
            fin,
            rsv1,
            mask,
            remaining: len,
            consumed: 0,
        }))
    }

    /// Applies the rules that relate a new frame to the message in progress.
    fn start_frame(&mut self, frame: FrameInProgress) -> Result<(), ProtocolError> {
        let limit = self.config.max_message_size;
        if frame.opcode.is_control() {
            if !frame.fin {
                return Err(ProtocolError::FragmentedControl);
            }
            if frame.remaining > MAX_CONTROL_PAYLOAD as u64 {
                return Err(ProtocolError::ControlTooLong(frame.remaining));
            }
        } else {
            match (frame.opcode, &mut self.message) {
                (OpCode::Continuation, None) => return Err(ProtocolError::UnexpectedContinuation),
                (OpCode::Continuation, Some(message)) => {
                    message.size = message.size.saturating_add(frame.remaining);
                    if message.size > limit {
                        return Err(ProtocolError::MessageTooBig { limit });
                    }
                }
                (_, Some(_)) => return Err(ProtocolError::ExpectedContinuation),
                (opcode, None) => {
                    if frame.remaining > limit {
                        return Err(ProtocolError::MessageTooBig { limit });
                    }
                    self.message = Some(MessageInProgress {
                        text: opcode == OpCode::Text,
                        compressed: frame.rsv1,
                        size: frame.remaining,
                        utf8: Utf8Validator::default(),
                    });
                }
            }
        }
        self.frame = Some(frame);
        Ok(())
    }

    /// Consumes payload bytes of the current frame from `input`; returns how many.
    fn payload(
        &mut self,
        input: &mut [u8],
        on_event: &mut impl FnMut(Event<'_>),
    ) -> Result<usize, ProtocolError> {
        let Some(frame) = self.frame.as_mut() else {
            return Ok(0);
        };
        let n = frame.remaining.min(input.len() as u64) as usize;
        let chunk = &mut input[..n];
        if let Some(key) = frame.mask {
            apply_mask(chunk, key, (frame.consumed % 4) as usize);
        }
        frame.remaining -= n as u64;
        frame.consumed += n as u64;
        let frame_done = frame.remaining == 0;
        let (opcode, fin) = (frame.opcode, frame.fin);
        if frame_done {
            self.frame = None;
        }

        if !opcode.is_control() {
            let message_end = fin && frame_done;
            let message = self
                .message
                .as_mut()
                .expect("start_frame opens a message for every data frame");
            let (text, compressed) = (message.text, message.compressed);
            if text && !compressed && message.utf8.feed(chunk, message_end).is_err() {
                return Err(ProtocolError::InvalidUtf8);
            }
            if message_end {
                self.message = None;
            }
            // Empty pieces carry no information unless they end a message.
            if n > 0 || message_end {
                on_event(Event::Data {
                    text,
                    compressed,
                    payload: chunk,
                    message_end,
                });
            }
            return Ok(n);
        }

        // Control frame: deliver it whole. It is usually complete in this read; only a
        // frame split across reads is copied aside.
        if !frame_done {
            self.control.extend_from_slice(chunk);
            return Ok(n);
        }
        let result = if self.control.is_empty() {
            self.control_frame(opcode, chunk, on_event)
        } else {
            let mut whole = std::mem::take(&mut self.control);
            whole.extend_from_slice(chunk);
            self.control_frame(opcode, &whole, on_event)
        };
        result.map(|()| n)
    }

    fn control_frame(
        &mut self,
        opcode: OpCode,
        payload: &[u8],
        on_event: &mut impl FnMut(Event<'_>),
    ) -> Result<(), ProtocolError> {
        match opcode {
            OpCode::Ping => on_event(Event::Ping(payload)),
            OpCode::Pong => on_event(Event::Pong(payload)),
            OpCode::Close => {
                let (code, reason) = parse_close_payload(payload)?;
                self.closed = true;
                on_event(Event::Close { code, reason });
            }
            _ => unreachable!("only control opcodes reach control_frame"),
        }
        Ok(())
    }
}

/// Splits and validates a close frame's payload (RFC 6455 §5.5.1).
pub fn parse_close_payload(payload: &[u8]) -> Result<(Option<CloseCode>, &str), ProtocolError> {
    match payload {
        [] => Ok((None, "")),
        [_] => Err(ProtocolError::CloseTooShort),
        [hi, lo, reason @ ..] => {
            let code = CloseCode(u16::from_be_bytes([*hi, *lo]));
            if !code.is_valid_on_wire() {
                return Err(ProtocolError::InvalidCloseCode(code.0));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| ProtocolError::InvalidUtf8)?;
            Ok((Some(code), reason))
        }
    }
}

#[cfg(test)]
mod tests;
