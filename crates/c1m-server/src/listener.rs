//! Accepting connections: the listening socket, its place in the epoll set, and the
//! back-off after running out of descriptors.
//!
//! Why the listener leaves the epoll set: every worker of a multi-process server waits
//! on the same listening socket. A worker that is full (`max_sockets`) or out of
//! descriptors takes it out of its epoll set, so the kernel keeps new connections for
//! the others instead of handing them to a worker that cannot take them.
//! A worker past its fair share of the node's sockets leaves too (see
//! `Server::within_fair_share`).

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Poll, Token};
use socket2::{Domain, Socket, Type};

/// After an accept error such as EMFILE, wait this long before accepting again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

pub struct Acceptor {
    /// `None` once shutdown has begun.
    listener: Option<TcpListener>,
    /// The token its readiness events carry.
    token: Token,
    /// Whether the listener is in the epoll set.
    accepting: bool,
    /// Set after a resource-exhaustion error: no accepts until then.
    paused_until: Option<Instant>,
}

/// What one accept call gave.
pub enum Accepted {
    Connection(TcpStream, SocketAddr),
    /// Nothing more to take now (the queue is empty, another worker took it, or
    /// accepting is off).
    Nothing,
}

impl Acceptor {
    pub fn new(listener: TcpListener, token: Token) -> Acceptor {
        Acceptor {
            listener: Some(listener),
            token,
            accepting: false,
            paused_until: None,
        }
    }

    pub fn is_accepting(&self) -> bool {
        self.accepting
    }

    pub fn paused_until(&self) -> Option<Instant> {
        self.paused_until
    }

    /// Takes one connection off the queue. Errors that concern only that connection
    /// (a reset before we took it) are skipped; running out of descriptors pauses
    /// accepting for [`ACCEPT_BACKOFF`].
    pub fn accept(&mut self, now: Instant, open: usize) -> Accepted {
        let Some(listener) = self.listener.as_ref() else {
            return Accepted::Nothing;
        };
        loop {
            match listener.accept() {
                Ok((stream, peer)) => return Accepted::Connection(stream, peer),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Accepted::Nothing,
                Err(e) if is_resource_exhaustion(&e) => {
                    tracing::warn!(error = %e, open, "accept failed; pausing accepts briefly");
                    self.paused_until = Some(now + ACCEPT_BACKOFF);
                    return Accepted::Nothing;
                }
                Err(_) => continue,
            }
        }
    }

    /// Puts the listener in the epoll set when `room` (and no pause is running), and
    /// takes it out otherwise.
    pub fn update(&mut self, poll: &Poll, room: bool, now: Instant) {
        if self.paused_until.is_some_and(|until| now >= until) {
            self.paused_until = None;
        }
        let want = room && self.paused_until.is_none();
        if let Err(error) = self.set_accepting(poll, want) {
            tracing::warn!(%error, "cannot change the listener registration");
        }
    }

    /// Stops accepting for good (shutdown): the listening socket is closed.
    pub fn close(&mut self, poll: &Poll) {
        let _ = self.set_accepting(poll, false);
        self.listener = None;
    }

    /// Adds the listener to (or removes it from) the epoll set.
    ///
    /// Registered by hand rather than through mio, to use `EPOLLEXCLUSIVE`: without it
    /// each new connection would wake every worker. Level-triggered, so a worker that
    /// stops accepting with connections still queued leaves them for the others.
    fn set_accepting(&mut self, poll: &Poll, on: bool) -> io::Result<()> {
        let Some(listener) = self.listener.as_ref() else {
            return Ok(());
        };
        if on == self.accepting {
            return Ok(());
        }
        let mut event = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLEXCLUSIVE) as u32,
            u64: self.token.0 as u64,
        };
        let op = if on {
            libc::EPOLL_CTL_ADD
        } else {
            libc::EPOLL_CTL_DEL
        };
        // SAFETY: both descriptors are open and owned (the poll by the caller, the
        // listener by `self`); `event` is a valid epoll_event. mio never sees this
        // registration: its events carry `self.token`, which the loop handles.
        let rc = unsafe { libc::epoll_ctl(poll.as_raw_fd(), op, listener.as_raw_fd(), &mut event) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        self.accepting = on;
        Ok(())
    }
}

/// A non-blocking listening socket with the backlog we ask for. (`std`'s and tokio's
/// `bind` use a fixed backlog of 128 or 1024, which throttles a fast ramp-up.)
pub fn listen_socket(addr: SocketAddr, backlog: i32, reuse_port: bool) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    Ok(TcpListener::from_std(socket.into()))
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
    )
}
