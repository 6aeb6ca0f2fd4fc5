//! The master of a multi-process server (`c1m serve --workers N`).
//!
//! Why processes: where the per-process open-file limit is capped (20,000 here), a
//! million connections need ~51 processes. The master:
//! - binds the listening socket once; every worker inherits it and accepts from it
//!   while it has room (see `Server::set_accepting`), so a full worker is never handed
//!   a connection it cannot take;
//! - keeps the clock: it stamps each broadcast once, encodes the frame once, and sends
//!   it to every worker over a Unix socket (a u32 length, then the frame);
//! - reads every worker's counters from the shared [`Scoreboard`] for the `--total`
//!   gate and one stats line for the whole server;
//! - respawns a worker that dies (its clients reconnect to the others; the other
//!   workers' clients are untouched);
//! - on SIGINT/SIGTERM passes SIGTERM to every worker (each closes its clients with
//!   1001), waits for them up to `close_timeout` + 2 s, then SIGKILLs what is left.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::process::Child;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGCHLD, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;

use crate::clock::Clock;
use crate::config::ServeConfig;
use crate::scoreboard::Scoreboard;
use crate::server::{listen_socket, ServeError};

const SIGNALS: Token = Token(0);

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
struct WorkerProcess {
    child: Option<Child>,
    /// Master's end of the control channel (non-blocking).
    control: UnixStream,
    /// Bytes of broadcasts not yet written to `control`.
    pending: Vec<u8>,
    restarts: u32,
}

/// Runs the master. `spawn` starts worker process `fds.index` so that it inherits the
/// three descriptors in `fds` (the binary knows how to re-execute itself).
pub fn run_master(
    config: ServeConfig,
    workers: usize,
    spawn: impl Fn(WorkerFds) -> io::Result<Child>,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<(), ServeError> {
    let addr = config.listen;
    let listen_error = |source| ServeError::Listen { addr, source };
    let listener = listen_socket(addr, config.backlog, config.reuse_port).map_err(listen_error)?;
    let local_addr = listener.local_addr()?;
    // Signal handlers first: a SIGTERM that arrives while workers start must still drain.
    let poll = Poll::new()?;
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGCHLD])?;
    poll.registry()
        .register(&mut signals, SIGNALS, Interest::READABLE)?;
    let scoreboard = Scoreboard::create(workers)?;
    let mut procs = Vec::with_capacity(workers);
    for index in 0..workers {
        procs.push(start_worker(
            &spawn,
            index,
            workers,
            listener.as_raw_fd(),
            &scoreboard,
        )?);
    }
    tracing::info!(addr = %local_addr, workers, "listening");
    on_listening(local_addr);

    let mut events = Events::with_capacity(64);
    let start = Instant::now();
    let mut clock = Clock::new(&config, start);
    let mut next_stats = start + config.stats_interval;
    let mut last_frames = (start, 0u64);
    let mut shutdown_deadline: Option<Instant> = None;
    let mut poll = poll;

    loop {
        let now = Instant::now();
        let wake = [clock.deadline(), Some(next_stats), shutdown_deadline]
            .into_iter()
            .flatten()
            .min()
            .map(|at| {
                at.saturating_duration_since(now)
                    .min(Duration::from_millis(50))
            });
        if let Err(e) = poll.poll(&mut events, wake) {
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e.into());
            }
        }
        let now = Instant::now();
        let mut reap = false;
        for signal in signals.pending() {
            match signal {
                SIGCHLD => reap = true,
                _ if shutdown_deadline.is_some() => {
                    tracing::warn!("second signal: killing workers now");
                    kill_all(&mut procs, libc::SIGKILL);
                    return Ok(());
                }
                _ => {
                    tracing::info!("shutting down: stopping every worker");
                    kill_all(&mut procs, libc::SIGTERM);
                    shutdown_deadline = Some(now + config.close_timeout + Duration::from_secs(2));
                }
            }
        }
        // Catch exits whose SIGCHLD merged with another, too.
        if reap || shutdown_deadline.is_some() {
            reap_exited(
                &mut procs,
                &scoreboard,
                shutdown_deadline.is_none(),
                |index| start_worker(&spawn, index, workers, listener.as_raw_fd(), &scoreboard),
            );
        }
        if let Some(deadline) = shutdown_deadline {
            if procs.iter().all(|p| p.child.is_none()) {
                tracing::info!("shutdown complete");
                return Ok(());
            }
            if now >= deadline {
                tracing::warn!("workers did not stop in time: killing them");
                kill_all(&mut procs, libc::SIGKILL);
                for p in &mut procs {
                    if let Some(mut child) = p.child.take() {
                        let _ = child.wait();
                    }
                }
                return Ok(());
            }
            continue;
        }
        for p in &mut procs {
            flush(p);
        }
        if clock.due(now, scoreboard.total_open() as usize) {
            let (stamp, frame) = clock.stamp();
            let mut message = Vec::with_capacity(4 + frame.len());
            message.extend_from_slice(&(frame.len() as u32).to_le_bytes());
            message.extend_from_slice(&frame);
            for p in &mut procs {
                if p.pending.len() > 1 << 20 {
                    tracing::warn!(
                        "a worker is not reading its broadcasts; skipping it this round"
                    );
                    continue;
                }
                p.pending.extend_from_slice(&message);
                flush(p);
            }
            tracing::debug!(stamp, "broadcast relayed to workers");
        }
        if now >= next_stats {
            next_stats = now + config.stats_interval;
            report(&scoreboard, now, &mut last_frames, &procs);
        }
    }
}

fn start_worker(
    spawn: &impl Fn(WorkerFds) -> io::Result<Child>,
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
    Ok(WorkerProcess {
        child: Some(child),
        control: master_end,
        pending: Vec::new(),
        restarts: 0,
    })
}

/// Writes what the control channel takes now; the rest waits for the next turn.
fn flush(p: &mut WorkerProcess) {
    while !p.pending.is_empty() {
        match p.control.write(&p.pending) {
            Ok(n) => {
                p.pending.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // WouldBlock: later. Other errors: the worker died; the reaper restarts it.
            Err(_) => return,
        }
    }
}

fn kill_all(procs: &mut [WorkerProcess], signal: libc::c_int) {
    for p in procs.iter() {
        if let Some(child) = &p.child {
            // SAFETY: kill(2) on the PID of a child we started and have not reaped.
            unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        }
    }
}

/// Collects exited workers; while serving, starts a replacement for each.
fn reap_exited(
    procs: &mut [WorkerProcess],
    scoreboard: &Scoreboard,
    respawn: bool,
    start: impl Fn(usize) -> io::Result<WorkerProcess>,
) {
    for (index, worker) in procs.iter_mut().enumerate() {
        let Some(child) = worker.child.as_mut() else {
            continue;
        };
        let Ok(Some(status)) = child.try_wait() else {
            continue;
        };
        worker.child = None;
        scoreboard.reset(index);
        if !respawn {
            continue;
        }
        tracing::warn!(worker = index, %status, "worker exited; starting a new one");
        match start(index) {
            Ok(mut fresh) => {
                fresh.restarts = worker.restarts + 1;
                *worker = fresh;
            }
            Err(error) => tracing::error!(worker = index, %error, "cannot restart worker"),
        }
    }
}

/// One stats line for the whole server, summed over the scoreboard.
fn report(
    scoreboard: &Scoreboard,
    now: Instant,
    last: &mut (Instant, u64),
    procs: &[WorkerProcess],
) {
    let slots = scoreboard.slots();
    let sum = |f: fn(&crate::scoreboard::Slot) -> u64| slots.iter().map(f).sum::<u64>();
    let frames = sum(|s| s.frames_out.load(Relaxed));
    let rate = (frames.saturating_sub(last.1)) as f64 / (now - last.0).as_secs_f64().max(1e-9);
    *last = (now, frames);
    let fanout_ms = slots
        .iter()
        .map(|s| s.last_fanout_us.load(Relaxed))
        .max()
        .unwrap_or(0) as f64
        / 1e3;
    tracing::info!(
        open = sum(|s| s.open.load(Relaxed)),
        sockets = sum(|s| s.open.load(Relaxed) + s.other_sockets.load(Relaxed)),
        workers = procs.iter().filter(|p| p.child.is_some()).count(),
        restarts = procs.iter().map(|p| p.restarts).sum::<u32>(),
        msgs_out_per_s = format_args!("{rate:.0}"),
        slowest_worker_fanout_ms = format_args!("{fanout_ms:.1}"),
        rss_mib = format_args!(
            "{:.1}",
            sum(|s| s.rss_bytes.load(Relaxed)) as f64 / (1 << 20) as f64
        ),
        rejected_full = sum(|s| s.rejected_full.load(Relaxed)),
        "stats"
    );
}
