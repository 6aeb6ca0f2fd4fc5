//! The worker processes as the master sees them: starting, reading, writing, reaping.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::process::Child;

use mio::{Interest, Poll, Token};

use crate::control::{write_queued, Message};
use crate::scoreboard::Scoreboard;

/// Most bytes queued for one worker; past it the worker is not reading and misses
/// publications (logged, and the publishes it misses are answered as incomplete)
/// rather than growing the master without bound.
pub const MAX_PENDING_TO_WORKER: usize = 16 << 20;

/// The descriptors a worker process must inherit, and its place in the scoreboard.
#[derive(Debug, Clone, Copy)]
pub struct WorkerFds {
    pub index: usize,
    pub count: usize,
    pub listen_fd: RawFd,
    pub control_fd: RawFd,
    pub scoreboard_fd: RawFd,
}

/// One worker as the master sees it.
pub struct WorkerProcess {
    /// `None` once it exited (until its replacement starts).
    pub child: Option<Child>,
    /// Master's end of the control channel (non-blocking).
    control: UnixStream,
    /// Bytes of messages not yet written to `control`.
    pending: Vec<u8>,
    /// Bytes read from `control` not yet forming a complete message.
    incoming: Vec<u8>,
    pub restarts: u32,
    /// The channel reached end-of-file: the worker is exiting (see `take_hang_up`).
    hung_up: HangUp,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum HangUp {
    No,
    /// Seen, not yet taken by the master.
    Seen,
    Taken,
}

impl WorkerProcess {
    /// Starts worker `index` of `count` and watches its control channel (token = index).
    pub fn start(
        spawn: &impl Fn(WorkerFds) -> io::Result<Child>,
        poll: &Poll,
        index: usize,
        count: usize,
        listen_fd: RawFd,
        scoreboard: &Scoreboard,
    ) -> io::Result<WorkerProcess> {
        scoreboard.reset(index);
        let (master_end, worker_end) = UnixStream::pair()?;
        master_end.set_nonblocking(true)?;
        let child = spawn(WorkerFds {
            index,
            count,
            listen_fd,
            control_fd: worker_end.as_raw_fd(),
            scoreboard_fd: scoreboard.raw_fd(),
        })?;
        drop(worker_end); // the child has its copy
        let fd = master_end.as_raw_fd();
        poll.registry().register(
            &mut mio::unix::SourceFd(&fd),
            Token(index),
            Interest::READABLE,
        )?;
        Ok(WorkerProcess {
            child: Some(child),
            control: master_end,
            pending: Vec::new(),
            incoming: Vec::new(),
            restarts: 0,
            hung_up: HangUp::No,
        })
    }

    pub fn is_alive(&self) -> bool {
        self.child.is_some()
    }

    /// Reads what the worker sent; a worker that sends garbage is logged and ignored.
    pub fn read_messages(&mut self) -> Vec<Message> {
        if self.child.is_none() {
            return Vec::new();
        }
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match self.control.read(&mut chunk) {
                Ok(0) => {
                    // The worker is exiting; the reaper restarts it once it is gone.
                    if self.hung_up == HangUp::No {
                        self.hung_up = HangUp::Seen;
                    }
                    break;
                }
                Ok(n) => self.incoming.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break, // WouldBlock, or the worker died
            }
        }
        match Message::decode_all(&mut self.incoming) {
            Ok(messages) => messages,
            Err(error) => {
                tracing::warn!(%error, "bad message from a worker; dropping its input");
                self.incoming.clear();
                Vec::new()
            }
        }
    }

    /// True once, when the channel has just reached end-of-file: the worker is exiting,
    /// and since it keeps its end on its highest descriptor (`c1m serve`'s
    /// `to_highest_descriptor`), which the kernel releases first, this comes before its
    /// clients' sockets close: the moment to stop counting its connections, which are
    /// about to reconnect to the others.
    pub fn take_hang_up(&mut self) -> bool {
        let seen = self.hung_up == HangUp::Seen;
        if seen {
            self.hung_up = HangUp::Taken;
        }
        seen
    }

    /// Queues encoded message bytes unless the worker has stopped reading (its queue
    /// passed [`MAX_PENDING_TO_WORKER`]); returns whether they were queued.
    pub fn queue(&mut self, bytes: &[u8]) -> bool {
        if self.pending.len() > MAX_PENDING_TO_WORKER {
            return false;
        }
        self.pending.extend_from_slice(bytes);
        true
    }

    /// Queues a message for this worker alone (an answer to one of its requests), past
    /// the bound of [`WorkerProcess::queue`]: such answers are small and as many as the
    /// worker's own requests, and one dropped would leave a client waiting for good (a
    /// resume that is never answered, see `server/resume.rs`).
    pub fn send(&mut self, message: &Message) {
        message.encode(&mut self.pending);
    }

    /// Writes what the control channel takes now; the rest waits for the next turn.
    /// An error means the worker died: the reaper restarts it.
    pub fn flush(&mut self) {
        let _ = write_queued(&mut self.control, &mut self.pending);
    }

    pub fn signal(&self, signal: libc::c_int) {
        if let Some(child) = &self.child {
            // SAFETY: kill(2) on the PID of a child we started and have not reaped.
            unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        }
    }

    /// Whether the worker exited (reaping it).
    pub fn reap(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status)
    }
}
