//! A table of per-worker counters in shared memory, read by every process of a server.
//!
//! The master creates it (`memfd_create` + `mmap`) before spawning workers, each worker
//! maps the same file through an inherited descriptor and writes only its own slot; the
//! master sums the slots for the stats line and the `--total` gate, and workers sum
//! the `open` column to enforce `--max-connections` across the whole server without a
//! round trip. Plain atomics with relaxed ordering: every value is an independent
//! counter, and a stale read by a few microseconds is harmless.
//!
//! Written by hand with `libc` because no crate offers a shared, fixed-layout table of
//! atomics across `exec`; the unsafe parts are the `mmap` calls and the cast of the
//! mapping to `[Slot]`, both commented below.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// One worker's counters, aligned to cache lines so workers never share a line.
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub struct Slot {
    pub pid: AtomicU64,
    /// Upgraded connections.
    pub open: AtomicU64,
    /// Accepted sockets not yet upgraded or being closed.
    pub other_sockets: AtomicU64,
    pub frames_out: AtomicU64,
    pub broadcasts: AtomicU64,
    pub last_fanout_us: AtomicU64,
    pub rss_bytes: AtomicU64,
    pub rejected_full: AtomicU64,
    // Totals for `/metrics` (see `Stats` for their meaning).
    pub accepted: AtomicU64,
    pub bytes_out: AtomicU64,
    pub messages_in: AtomicU64,
    pub dropped: AtomicU64,
    pub handshake_rejects: AtomicU64,
    pub peer_closed: AtomicU64,
    pub io_errors: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub slow_consumers: AtomicU64,
    pub idle_timeouts: AtomicU64,
    pub handshake_timeouts: AtomicU64,
    pub rejected_per_ip: AtomicU64,
}

/// The shared table. Dropping it unmaps the memory (the file lives while any process
/// holds its descriptor or mapping).
#[derive(Debug)]
pub struct Scoreboard {
    fd: OwnedFd,
    ptr: *mut Slot,
    slots: usize,
}

// SAFETY: the mapping is only accessed through `&Slot` (atomics), which are Sync.
unsafe impl Send for Scoreboard {}
unsafe impl Sync for Scoreboard {}

impl Scoreboard {
    /// Creates a zeroed table of `slots` slots (master side).
    pub fn create(slots: usize) -> io::Result<Scoreboard> {
        // SAFETY: a valid NUL-terminated name and flags; the result is checked.
        let fd = unsafe { libc::memfd_create(c"c1m-scoreboard".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let len = (slots * std::mem::size_of::<Slot>()) as libc::off_t;
        // SAFETY: fd is a valid memfd; ftruncate zero-fills the new length.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Scoreboard::map(fd, slots)
    }

    /// Maps an inherited table (worker side). Takes ownership of `fd`.
    ///
    /// # Safety
    /// `fd` must be a descriptor of a scoreboard created with `slots` slots, owned by
    /// nothing else in this process.
    pub unsafe fn from_fd(fd: RawFd, slots: usize) -> io::Result<Scoreboard> {
        Scoreboard::map(OwnedFd::from_raw_fd(fd), slots)
    }

    fn map(fd: OwnedFd, slots: usize) -> io::Result<Scoreboard> {
        let len = slots * std::mem::size_of::<Slot>();
        // SAFETY: mapping `len` bytes of a file at least that long, shared, read-write.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Scoreboard {
            fd,
            ptr: ptr.cast(),
            slots,
        })
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    pub fn slots(&self) -> &[Slot] {
        // SAFETY: the mapping is page-aligned, `slots` Slots long and zero-initialised
        // (a valid bit pattern for atomics), and lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.slots) }
    }

    pub fn slot(&self, index: usize) -> &Slot {
        &self.slots()[index]
    }

    /// Upgraded connections over all workers.
    pub fn total_open(&self) -> u64 {
        self.slots().iter().map(|s| s.open.load(Relaxed)).sum()
    }

    /// Zeroes a slot (for a respawned worker).
    pub fn reset(&self, index: usize) {
        let s = self.slot(index);
        for counter in [
            &s.pid,
            &s.open,
            &s.other_sockets,
            &s.frames_out,
            &s.broadcasts,
            &s.last_fanout_us,
            &s.rss_bytes,
            &s.rejected_full,
        ] {
            counter.store(0, Relaxed);
        }
    }
}

impl Drop for Scoreboard {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the region mapped in `map`.
        unsafe { libc::munmap(self.ptr.cast(), self.slots * std::mem::size_of::<Slot>()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_mappings_see_the_same_counters() {
        let a = Scoreboard::create(3).unwrap();
        // SAFETY: dup gives a new descriptor of the same memfd, owned by `b` alone.
        let b = unsafe { Scoreboard::from_fd(libc::dup(a.raw_fd()), 3).unwrap() };
        a.slot(1).open.store(5, Relaxed);
        b.slot(2).open.store(7, Relaxed);
        assert_eq!(b.total_open(), 12);
        assert_eq!(a.total_open(), 12);
        b.reset(1);
        assert_eq!(a.total_open(), 7);
    }
}
