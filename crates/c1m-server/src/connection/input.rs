//! What the bytes a connection reads mean: the HTTP request head (an upgrade, or a plain
//! request with its body) until the handshake is over, WebSocket frames after it. Split
//! from `connection.rs` so the struct and its life cycle read apart from the parsing.

use super::*;

impl<S: Stream> Connection<S> {
    pub(super) fn handshake_input(&mut self, input: &[u8], cx: &mut ReadContext<'_>) -> Next {
        let limits = cx.limits;
        let extra = self.extra();
        extra.head.extend_from_slice(input);
        let (request, used) = match handshake::parse_request(&extra.head, limits.max_head_bytes) {
            Ok(None) => return Next::Keep,
            Ok(Some(parsed)) => parsed,
            Err(error) => {
                cx.counters.handshake_rejects += 1;
                return self.finish_with(handshake::rejection(&error), cx.closing_deadline, limits);
            }
        };
        match request {
            Request::Upgrade(upgrade) => {
                let admission = decide(cx, |gate| gate.admit(&upgrade));
                let admission = match admission {
                    Ok(admission) => admission,
                    Err(response) => {
                        cx.counters.handshake_rejects += 1;
                        return self.finish_with(response, cx.closing_deadline, limits);
                    }
                };
                self.kind = PhaseKind::Open;
                let extra = self.extra();
                let mut head = std::mem::take(&mut extra.head);
                extra.deadline = None;
                let agreement = limits
                    .deflate
                    .then(|| deflate::negotiate(upgrade.extensions.iter().map(String::as_str)))
                    .flatten();
                let response = match agreement {
                    Some(agreement) => {
                        self.set_deflate_window(agreement.server_window_bits);
                        handshake::switching_protocols_with(
                            &upgrade.key,
                            &[("Sec-WebSocket-Extensions", &agreement.response())],
                        )
                    }
                    None => handshake::switching_protocols(&upgrade.key),
                };
                if let Err(SendError::Io(_)) = self.send(&Bytes::from(response), limits) {
                    return Next::Remove(End::Io);
                }
                cx.actions.push(Action::Joined(admission));
                // Frames the client sent right behind its request.
                let rest = &mut head[used..];
                let next = if rest.is_empty() {
                    Next::Keep
                } else {
                    self.frame_input(rest, cx)
                };
                self.tidy();
                next
            }
            Request::Plain(plain)
                if plain.method == "GET" && crate::sse::is_sse_target(&plain.path) =>
            {
                let admission = match decide(cx, |gate| gate.admit_sse(&plain)) {
                    Ok(admission) => admission,
                    Err(response) => {
                        cx.counters.handshake_rejects += 1;
                        return self.finish_with(response, cx.closing_deadline, limits);
                    }
                };
                self.kind = PhaseKind::Open;
                self.set_flag(SSE, true);
                let extra = self.extra();
                extra.head = Vec::new();
                extra.deadline = None;
                self.tidy();
                // A page from another origin may read the stream if the gate let it in.
                let allow_origin = match &plain.origin {
                    Some(origin) if cx.gate.restricts_origins() => origin.as_str(),
                    _ => "*",
                };
                let head = crate::sse::response_head(allow_origin);
                if let Err(SendError::Io(_)) = self.send(&Bytes::from(head), limits) {
                    return Next::Remove(End::Io);
                }
                cx.counters.sse_opened += 1;
                cx.actions.push(Action::Joined(admission));
                Next::Keep
            }
            Request::Plain(plain) => {
                if plain.content_length > limits.max_body_bytes {
                    cx.counters.handshake_rejects += 1;
                    let body = format!(
                        "request body too large: the limit is {} bytes\n",
                        limits.max_body_bytes
                    );
                    let response = handshake::http_response(413, "Content Too Large", &[], &body);
                    return self.finish_with(response, cx.closing_deadline, limits);
                }
                let extra = self.extra();
                if extra.head.len() < used + plain.content_length {
                    return Next::Keep; // the body is still arriving
                }
                let body = extra.head[used..used + plain.content_length].to_vec();
                // What follows the body is a pipelined request (see `answer_http`).
                extra.head.drain(..used + plain.content_length);
                if extra.head.is_empty() {
                    extra.head = Vec::new();
                }
                self.kind = PhaseKind::Http;
                cx.counters.plain_http += 1;
                cx.actions.push(Action::Http(plain, body));
                Next::Keep
            }
        }
    }

    pub(super) fn frame_input(&mut self, input: &mut [u8], cx: &mut ReadContext<'_>) -> Next {
        let limits = cx.limits;
        let window = self.deflate_window();
        let extra = self.extra();
        let mut decoder = extra.decoder.take().unwrap_or_else(|| {
            Decoder::new(DecoderConfig {
                compression: window.is_some(),
                ..limits.decoder
            })
        });
        let mut message = std::mem::take(&mut extra.message);
        let mut skipping = extra.skip_message;
        // Answers (pongs, echoes) in the order their causes arrived.
        let mut replies: Vec<Vec<u8>> = Vec::new();
        let mut peer_close: Option<Option<CloseCode>> = None;
        // A failure found after decoding (bad compressed data): close with this.
        let mut failure: Option<(CloseCode, &'static str)> = None;
        let stats = &mut *cx.counters;
        let actions = &mut *cx.actions;
        let inflater = &mut *cx.inflater;
        let inflated = &mut *cx.inflated;
        let result = decoder.decode(input, |event| match event {
            Event::Data {
                text,
                compressed,
                payload,
                message_end,
            } => {
                if failure.is_some() {
                    return;
                }
                stats.messages_in += message_end as u64;
                // Echo keeps every message; otherwise only text up to the command size
                // is kept (binary messages are ignored, longer text is not a command).
                let keep = limits.echo
                    || (text && !skipping && message.len() + payload.len() <= MAX_COMMAND_BYTES);
                if !keep {
                    skipping |= text;
                    message = Vec::new();
                    if message_end && std::mem::take(&mut skipping) {
                        actions.push(Action::OversizedCommand);
                    }
                    return;
                }
                let whole: &[u8] = if message.is_empty() && message_end {
                    payload // the common case: the whole message in this read, no copy
                } else {
                    message.extend_from_slice(payload);
                    if !message_end {
                        return;
                    }
                    &message
                };
                let data: &[u8] = if compressed {
                    let limit = limits.decoder.max_message_size as usize;
                    match inflater.inflate(whole, limit, inflated) {
                        Ok(()) => inflated,
                        Err(InflateError::TooBig { .. }) => {
                            failure = Some((CloseCode::TOO_BIG, "inflated message too big"));
                            return;
                        }
                        Err(InflateError::Invalid) => {
                            failure = Some((CloseCode::INVALID_PAYLOAD, "invalid compressed data"));
                            return;
                        }
                    }
                } else {
                    whole
                };
                // The decoder checked uncompressed text; inflated text is checked here.
                if text && compressed && std::str::from_utf8(data).is_err() {
                    failure = Some((CloseCode::INVALID_PAYLOAD, "text is not valid UTF-8"));
                    return;
                }
                if limits.echo {
                    let opcode = if text { OpCode::Text } else { OpCode::Binary };
                    let mut frame = Vec::new();
                    match window {
                        Some(bits) => {
                            let compressed = deflate::compress_with_window(data, bits);
                            encode_compressed_frame(opcode, &compressed, None, &mut frame);
                        }
                        None => encode_frame(opcode, data, None, &mut frame),
                    }
                    replies.push(frame);
                } else if data.len() <= MAX_COMMAND_BYTES {
                    actions.push(Action::Command(String::from_utf8_lossy(data).into_owned()));
                } else {
                    actions.push(Action::OversizedCommand);
                }
                message = Vec::new();
            }
            Event::Ping(payload) => {
                let mut frame = Vec::with_capacity(2 + payload.len());
                encode_frame(OpCode::Pong, payload, None, &mut frame);
                replies.push(frame);
            }
            Event::Pong(_) => {}
            Event::Close { code, .. } => peer_close = Some(code),
        });
        if inflated.capacity() > 1 << 20 {
            *inflated = Vec::new(); // do not keep a big message's buffer for the worker's life
        }
        for reply in replies {
            match self.send(&Bytes::from(reply), limits) {
                Ok(()) => {}
                Err(SendError::Overflow) => return Next::Remove(End::SlowConsumer),
                Err(SendError::Io(_)) => return Next::Remove(End::Io),
            }
        }
        if let Some((code, reason)) = failure {
            cx.counters.protocol_errors += 1;
            return self.begin_close(code, reason, cx.closing_deadline, limits);
        }
        if let Some(code) = peer_close {
            // Echo the peer's code (RFC 6455 §5.5.1); an empty close gets an empty one.
            let mut frame = Vec::new();
            let payload = code.map(|c| c.0.to_be_bytes().to_vec()).unwrap_or_default();
            encode_frame(OpCode::Close, &payload, None, &mut frame);
            return self.finish_with(frame, cx.closing_deadline, limits);
        }
        match result {
            Ok(()) => {
                let extra = self.extra();
                if !decoder.is_idle() {
                    extra.decoder = Some(decoder);
                }
                extra.message = message;
                extra.skip_message = skipping;
                self.tidy();
                Next::Keep
            }
            Err(error) => {
                cx.counters.protocol_errors += 1;
                tracing::debug!(%error, "protocol error");
                self.begin_close(
                    error.close_code(),
                    &error.to_string(),
                    cx.closing_deadline,
                    limits,
                )
            }
        }
    }
}

/// Whether an upgrade or an event stream may open now: the server's room, the client
/// address's limit, the gate (`ask_gate`: origin, token, topics) and the accept rate.
/// `Err` holds the complete HTTP refusal.
fn decide(
    cx: &mut ReadContext<'_>,
    ask_gate: impl FnOnce(&Gate) -> Result<Admission, Vec<u8>>,
) -> Result<Admission, Vec<u8>> {
    match cx.admit {
        Admit::Yes => ask_gate(cx.gate).and_then(|admission| match cx.accept_rate {
            Some(rate) if !rate.try_admit(monotonic_ms()) => {
                cx.counters.rejected_rate += 1;
                Err(rate.refusal())
            }
            _ => Ok(admission),
        }),
        Admit::ServerFull => {
            cx.counters.rejected_full += 1;
            // A Pusher client is told in its protocol (error 4100, "over capacity"),
            // which pusher-js answers by coming back after a while; an HTTP refusal
            // would only be a failed WebSocket to it.
            if let Ok(mut admission) = ask_gate(cx.gate) {
                if admission.pusher.is_some() {
                    admission.pusher = Some(PusherEntry::OverCapacity);
                    return Ok(admission);
                }
            }
            Err(handshake::http_response(
                503,
                "Service Unavailable",
                &[("Retry-After", "5")],
                "server full: --max-connections reached\n",
            ))
        }
        Admit::TooManyFromAddress => {
            cx.counters.rejected_per_ip += 1;
            Err(handshake::http_response(
                429,
                "Too Many Requests",
                &[("Retry-After", "5")],
                "too many connections from this address\n",
            ))
        }
    }
}
