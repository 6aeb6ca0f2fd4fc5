//! Sockets for the bench's connections: opening one from a chosen source address, and
//! naming what went wrong.

use super::*;

/// Opens a non-blocking connection from `source` (port chosen at connect time).
pub(super) fn connect(target: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(target), Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    socket.set_nodelay(true)?;
    if let Some(source) = source {
        set_bind_address_no_port(&socket)?;
        socket.bind(&SocketAddr::new(source, 0).into())?;
    }
    match socket.connect(&target.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(socket.into()))
}

/// `IP_BIND_ADDRESS_NO_PORT`: defer the port choice from `bind` to `connect`.
/// (socket2 does not expose this Linux option, so it is set by hand.)
fn set_bind_address_no_port(socket: &Socket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: a valid socket fd, a pointer to a live c_int and its exact size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A short, stable name for an I/O error, used as an error cause.
/// The error cause of a failed read or write: `tls.*` for a TLS failure (for example
/// an untrusted certificate), else `io.*`.
pub(super) fn error_cause(e: &io::Error) -> String {
    use c1m_proto::tls_lean::TlsError;
    let Some(tls) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<TlsError>())
    else {
        return format!("io.{}", io_cause(e));
    };
    match tls {
        TlsError::Handshake(rustls::Error::InvalidCertificate(_)) => "tls.bad_certificate".into(),
        TlsError::Handshake(rustls::Error::AlertReceived(_)) | TlsError::Alert(_) => {
            "tls.alert_received".into()
        }
        _ => "tls.error".into(),
    }
}

pub fn io_cause(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "refused",
        Some(libc::ECONNRESET) => "reset",
        Some(libc::ETIMEDOUT) => "timeout",
        Some(libc::EADDRNOTAVAIL) => "no_source_port",
        Some(libc::EADDRINUSE) => "address_in_use",
        Some(libc::EMFILE) | Some(libc::ENFILE) => "too_many_open_files",
        Some(libc::ENETUNREACH) | Some(libc::EHOSTUNREACH) => "unreachable",
        Some(libc::EPIPE) => "broken_pipe",
        _ => "other",
    }
}
