//! Non-blocking glue between a socket and a rustls session (feature `tls`).
//!
//! rustls is sans-I/O like the rest of this crate: the caller owns the socket. These
//! two functions are the whole dance for an event loop with edge-triggered readiness,
//! shared by the server (`wss://`) and the bench (`wss://` client): read the socket
//! into the session, decrypt, hand out plaintext, and push any records the session
//! wants to send (handshake messages, alerts, encrypted output).

use std::io::{self, Read, Write};

use rustls::ConnectionCommon;

/// Reads decrypted bytes into `buf`: `Ok(0)` at the end of the stream (close_notify,
/// or EOF without it), `WouldBlock` once the socket is drained. Handshake replies are
/// written on the way.
pub fn read<D>(
    session: &mut ConnectionCommon<D>,
    socket: &mut (impl Read + Write),
    buf: &mut [u8],
) -> io::Result<usize> {
    loop {
        match session.reader().read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            // EOF without close_notify: an ordinary end of stream for a WebSocket,
            // whose own close handshake says whether the end was orderly.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
            Err(e) => return Err(e),
        }
        if session.read_tls(socket)? == 0 {
            return Ok(0);
        }
        if let Err(error) = session.process_new_packets() {
            // Send the alert that explains the failure, then give up.
            let _ = flush(session, socket);
            return Err(io::Error::new(io::ErrorKind::InvalidData, error));
        }
        flush(session, socket)?;
    }
}

/// Writes pending TLS records to the socket. `Ok(true)` when nothing is left.
pub fn flush<D>(session: &mut ConnectionCommon<D>, socket: &mut impl Write) -> io::Result<bool> {
    while session.wants_write() {
        match session.write_tls(socket) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}
