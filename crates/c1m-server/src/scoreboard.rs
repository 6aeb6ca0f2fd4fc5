//! A table of per-worker counters in shared memory, read by every process of a server.
//!
//! The master creates it (`memfd_create` + `mmap`) before spawning workers, each worker
//! maps the same file through an inherited descriptor and writes only its own slot; the
//! master sums the slots for the stats line and the `--total` gate, and workers sum
//! the `open` column to enforce `--max-connections` across the whole server without a
//! round trip. Plain atomics with relaxed ordering: every value is an independent
//! counter, and a stale read by a few microseconds is harmless.
//!
//! Behind the slots, each worker has a table of sockets per client address (hashed)
//! for `--max-connections-per-ip`, so the limit holds for the whole server: a worker
//! adds and removes its own sockets in its own table, and a lookup sums every
//! worker's. Two rows with different hashes, and the smaller sum counts (a count-min
//! sketch): a collision can only make the limit stricter for an address, never
//! looser, and needs a collision in both rows. A dead worker's table is emptied with
//! its slot. The tables cost nothing until used: the memfd is sparse, and emptying
//! punches a hole instead of writing zeroes. The same table counts the worker's Pusher
//! connections per app (for each app's `max_connections`), and the master writes the
//! other nodes' counts of a cluster beside the slots.
//!
//! Written by hand with `libc` because no crate offers a shared, fixed-layout table of
//! atomics across `exec`; the unsafe parts are the `mmap` calls and the cast of the
//! mapping to `[Slot]`, both commented below.

use std::hash::{Hash, Hasher};
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{
    fence, AtomicU32, AtomicU64, Ordering::Acquire, Ordering::Relaxed, Ordering::Release,
};

/// Buckets per row of a worker's per-address table.
const IP_BUCKETS: usize = 32 * 1024;
/// Rows (hash functions) of a per-address table.
const IP_ROWS: usize = 2;
/// Pusher apps counted (every app number a connection can carry, and one for
/// connections with an unknown key).
pub const APPS: usize = crate::connection::MAX_PUSHER_APPS + 1;

/// One worker's sockets per client address, hashed (see the module doc), and its
/// Pusher connections per app.
#[repr(C)]
struct WorkerTable {
    rows: [[AtomicU32; IP_BUCKETS]; IP_ROWS],
    pusher_apps: [AtomicU32; APPS],
}

/// Node-wide values behind the slots, on a cache line of their own.
#[repr(C, align(64))]
struct NodeWide {
    /// The `--max-accept-rate` window (see `admission`).
    accept_window: AtomicU64,
    /// The master's topic history, for the workers' `/metrics`: topics,
    /// publications, bytes, evicted (see `history::Usage`).
    history: [AtomicU64; 4],
    /// Pusher connections per app on the cluster's other nodes, as of their latest
    /// reports (written by the master).
    pusher_apps_elsewhere: [AtomicU64; APPS],
    /// The node's TLS session-ticket key (see `tickets`), written by the master and
    /// read by workers as they start: a sequence lock (odd while being written), the
    /// key's period, and the key.
    ticket_seq: AtomicU64,
    ticket_period: AtomicU64,
    ticket_key: [AtomicU64; 4],
}

/// Bytes of the slot area (the slots, then [`NodeWide`]), rounded up to whole pages so
/// the tables behind it can be punched.
fn slots_len(slots: usize) -> usize {
    let page = 4096;
    (slots * std::mem::size_of::<Slot>() + std::mem::size_of::<NodeWide>()).div_ceil(page) * page
}

/// Bytes of a whole scoreboard of `slots` workers.
fn total_len(slots: usize) -> usize {
    slots_len(slots) + slots * std::mem::size_of::<WorkerTable>()
}

/// The bucket of `ip` in row `row`.
fn bucket(ip: IpAddr, row: usize) -> usize {
    // SipHash with fixed keys: the same in every process of the server.
    let mut hasher = std::hash::DefaultHasher::new();
    (row, ip).hash(&mut hasher);
    (hasher.finish() % IP_BUCKETS as u64) as usize
}

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
    // Totals for `/metrics` (see `Counters` for their meaning).
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
    pub rejected_rate: AtomicU64,
    pub ticks_coalesced: AtomicU64,
    pub publishes_refused_busy: AtomicU64,
    pub publications_queued: AtomicU64,
    pub tls_handshakes: AtomicU64,
    pub tls_resumed: AtomicU64,
    pub tls_handshaking: AtomicU64,
    /// By cause, in the order of `TlsFailure::ALL`.
    pub tls_failures: [AtomicU64; crate::counters::TlsFailure::ALL.len()],
    /// Written by the master: publications it could not queue for this worker (its
    /// control queue was past `master::MAX_PENDING_TO_WORKER`).
    pub publications_skipped: AtomicU64,
}

impl Slot {
    /// Every counter of the slot (all its fields are `AtomicU64`).
    fn counters(&self) -> &[AtomicU64] {
        // SAFETY: `Slot` is `repr(C)` and holds only `AtomicU64` fields, so it is an
        // array of them; the padding up to its 64-byte alignment is a whole number of
        // u64s of zero-filled shared memory, valid as atomics too.
        unsafe {
            std::slice::from_raw_parts(
                (self as *const Slot).cast::<AtomicU64>(),
                std::mem::size_of::<Slot>() / 8,
            )
        }
    }
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
        let len = total_len(slots) as libc::off_t;
        // SAFETY: fd is a valid memfd; ftruncate zero-fills the new length.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Scoreboard::map(fd, slots)
    }

    /// Maps an inherited table (worker side). Takes ownership of `fd`. A file whose
    /// size is not that of a `slots`-slot scoreboard is an error (mapping it would turn
    /// a wrong `--worker-count` into a SIGBUS at the first access past its end).
    ///
    /// # Safety
    /// `fd` must be an open descriptor owned by nothing else in this process.
    pub unsafe fn from_fd(fd: RawFd, slots: usize) -> io::Result<Scoreboard> {
        let fd = OwnedFd::from_raw_fd(fd);
        let mut stat: libc::stat = std::mem::zeroed();
        if libc::fstat(fd.as_raw_fd(), &mut stat) != 0 {
            return Err(io::Error::last_os_error());
        }
        let expected = total_len(slots);
        if slots == 0 || stat.st_size as usize != expected {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "the scoreboard is {} bytes, not the {expected} of {slots} workers (wrong --worker-count?)",
                    stat.st_size
                ),
            ));
        }
        Scoreboard::map(fd, slots)
    }

    fn map(fd: OwnedFd, slots: usize) -> io::Result<Scoreboard> {
        let len = total_len(slots);
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

    fn node_wide(&self) -> &NodeWide {
        // SAFETY: `NodeWide` follows the slots inside the slot area (see `slots_len`),
        // 64-byte aligned since `Slot` is; zero-filled memory is valid atomics.
        unsafe { &*self.ptr.add(self.slots).cast::<NodeWide>() }
    }

    /// The node's `--max-accept-rate` window word (see `admission`).
    pub fn accept_window(&self) -> &AtomicU64 {
        &self.node_wide().accept_window
    }

    /// The master publishes the node's ticket key (it is the only writer).
    pub fn put_ticket_key(&self, key: &crate::tickets::TicketKey) {
        let wide = self.node_wide();
        let seq = wide.ticket_seq.load(Relaxed);
        wide.ticket_seq.store(seq | 1, Relaxed);
        fence(Release);
        wide.ticket_period.store(key.period, Relaxed);
        for (cell, word) in wide.ticket_key.iter().zip(key.key.chunks_exact(8)) {
            cell.store(
                u64::from_ne_bytes(word.try_into().unwrap_or_default()),
                Relaxed,
            );
        }
        wide.ticket_seq.store((seq | 1) + 1, Release);
    }

    /// The node's ticket key, once the master has put one (a read that keeps meeting
    /// a write in progress gives up: the caller makes its own key).
    pub fn ticket_key(&self) -> Option<crate::tickets::TicketKey> {
        let wide = self.node_wide();
        for _ in 0..1000 {
            let before = wide.ticket_seq.load(Acquire);
            if before == 0 {
                return None;
            }
            let period = wide.ticket_period.load(Relaxed);
            let words = wide.ticket_key.each_ref().map(|c| c.load(Relaxed));
            fence(Acquire);
            if before & 1 == 0 && wide.ticket_seq.load(Relaxed) == before {
                let mut key = [0u8; 32];
                for (bytes, word) in key.chunks_exact_mut(8).zip(words) {
                    bytes.copy_from_slice(&word.to_ne_bytes());
                }
                return Some(crate::tickets::TicketKey { period, key });
            }
            std::hint::spin_loop();
        }
        None
    }

    /// The master publishes its history's usage here, once a second.
    pub fn set_history_usage(&self, usage: &crate::history::Usage) {
        let values = [
            usage.topics as u64,
            usage.publications as u64,
            usage.bytes as u64,
            usage.evicted,
        ];
        for (cell, value) in self.node_wide().history.iter().zip(values) {
            cell.store(value, Relaxed);
        }
    }

    /// The master's history usage as of its last second.
    pub fn history_usage(&self) -> crate::history::Usage {
        let [topics, publications, bytes, evicted] =
            self.node_wide().history.each_ref().map(|c| c.load(Relaxed));
        crate::history::Usage {
            topics: topics as usize,
            publications: publications as usize,
            bytes: bytes as usize,
            evicted,
        }
    }

    /// Upgraded connections over all workers.
    pub fn total_open(&self) -> u64 {
        self.slots().iter().map(|s| s.open.load(Relaxed)).sum()
    }

    /// The mean number of sockets (upgraded or not) of the live workers, counting
    /// worker `index` as holding `mine` (its own slot may be a turn old).
    pub fn mean_sockets(&self, index: usize, mine: u64) -> u64 {
        let (mut live, mut sum) = (0u64, 0u64);
        for (i, slot) in self.slots().iter().enumerate() {
            if i == index {
                (live, sum) = (live + 1, sum + mine);
            } else if slot.pid.load(Relaxed) != 0 {
                let sockets = slot.open.load(Relaxed) + slot.other_sockets.load(Relaxed);
                (live, sum) = (live + 1, sum + sockets);
            }
        }
        sum / live.max(1)
    }

    /// Zeroes a slot and empties its per-address table (a worker that died or starts).
    pub fn reset(&self, index: usize) {
        for counter in self.slot(index).counters() {
            counter.store(0, Relaxed);
        }
        let size = std::mem::size_of::<WorkerTable>();
        let offset = slots_len(self.slots) + index * size;
        // SAFETY: punching a hole in our own memfd, inside its length: the range reads
        // as zeroes afterwards (for every process mapping it) and its pages are freed.
        let rc = unsafe {
            libc::fallocate(
                self.fd.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                size as libc::off_t,
            )
        };
        if rc != 0 {
            // Not expected on a memfd; zero by hand instead.
            let table = self.worker_table(index);
            for count in table.rows.iter().flatten().chain(&table.pusher_apps) {
                count.store(0, Relaxed);
            }
        }
    }

    fn worker_table(&self, index: usize) -> &WorkerTable {
        assert!(index < self.slots, "worker index out of range");
        // SAFETY: the tables follow the page-aligned slot area, one per worker, inside
        // the mapping (whose size `map` made sure of); zero-filled memory is a valid
        // table of atomics.
        unsafe {
            let base = self.ptr.cast::<u8>().add(slots_len(self.slots));
            &*base.cast::<WorkerTable>().add(index)
        }
    }

    /// Sockets from `ip` over every worker (an upper bound: see the module doc).
    pub fn ip_count(&self, ip: IpAddr) -> u32 {
        (0..IP_ROWS)
            .map(|row| {
                let b = bucket(ip, row);
                (0..self.slots)
                    .map(|w| self.worker_table(w).rows[row][b].load(Relaxed))
                    .sum::<u32>()
            })
            .min()
            .unwrap_or(0)
    }

    /// Worker `index` holds one more socket from `ip`.
    pub fn ip_add(&self, index: usize, ip: IpAddr) {
        for row in 0..IP_ROWS {
            self.worker_table(index).rows[row][bucket(ip, row)].fetch_add(1, Relaxed);
        }
    }

    /// Worker `index` holds one socket from `ip` fewer.
    pub fn ip_remove(&self, index: usize, ip: IpAddr) {
        for row in 0..IP_ROWS {
            let count = &self.worker_table(index).rows[row][bucket(ip, row)];
            // Never below zero, even after a reset raced with a removal.
            let _ = count.fetch_update(Relaxed, Relaxed, |n| Some(n.saturating_sub(1)));
        }
    }
}

/// Pusher connections per app (see `app_connections`).
impl Scoreboard {
    /// Worker `index` holds one more connection of app `app`.
    pub fn app_add(&self, index: usize, app: usize) {
        self.worker_table(index).pusher_apps[app].fetch_add(1, Relaxed);
    }

    /// Worker `index` holds one connection of app `app` fewer.
    pub fn app_remove(&self, index: usize, app: usize) {
        let count = &self.worker_table(index).pusher_apps[app];
        // Never below zero, even after a reset raced with a removal.
        let _ = count.fetch_update(Relaxed, Relaxed, |n| Some(n.saturating_sub(1)));
    }

    /// Connections of app `app` over every worker of this node.
    pub fn app_count(&self, app: usize) -> u64 {
        (0..self.slots)
            .map(|w| u64::from(self.worker_table(w).pusher_apps[app].load(Relaxed)))
            .sum()
    }

    /// The master writes the other nodes' connections of each app (`counts[app]`).
    pub fn set_apps_elsewhere(&self, counts: &[u64]) {
        let cells = &self.node_wide().pusher_apps_elsewhere;
        for (app, cell) in cells.iter().enumerate() {
            cell.store(counts.get(app).copied().unwrap_or(0), Relaxed);
        }
    }

    /// Connections of app `app` on the cluster's other nodes (0 without a cluster).
    pub fn app_count_elsewhere(&self, app: usize) -> u64 {
        self.node_wide().pusher_apps_elsewhere[app].load(Relaxed)
    }
}

impl Drop for Scoreboard {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the region mapped in `map`.
        unsafe { libc::munmap(self.ptr.cast(), total_len(self.slots)) };
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

    #[test]
    fn the_ticket_key_put_by_the_master_is_read_by_a_worker() {
        let a = Scoreboard::create(2).unwrap();
        // SAFETY: dup gives a new descriptor of the same memfd, owned by `b` alone.
        let b = unsafe { Scoreboard::from_fd(libc::dup(a.raw_fd()), 2).unwrap() };
        assert_eq!(b.ticket_key(), None);
        let key = crate::tickets::TicketKey::random(42);
        a.put_ticket_key(&key);
        assert_eq!(b.ticket_key(), Some(key.clone()));
        let next = key.advanced_to(43);
        a.put_ticket_key(&next);
        assert_eq!(b.ticket_key(), Some(next));
    }

    #[test]
    fn mean_sockets_counts_live_workers_and_the_callers_own_count() {
        let board = Scoreboard::create(4).unwrap();
        // Worker 0 (the caller) holds 30 by its own count, its slot says 10 (a turn old).
        board.slot(0).pid.store(100, Relaxed);
        board.slot(0).open.store(10, Relaxed);
        board.slot(1).pid.store(101, Relaxed);
        board.slot(1).open.store(40, Relaxed);
        board.slot(1).other_sockets.store(2, Relaxed);
        // Slot 2 is dead (pid 0): not counted, whatever it says. Slot 3 live, empty.
        board.slot(2).open.store(1000, Relaxed);
        board.slot(3).pid.store(103, Relaxed);
        assert_eq!(board.mean_sockets(0, 30), (30 + 42) / 3);
    }

    #[test]
    fn reset_zeroes_every_counter_of_the_slot_and_no_other() {
        let board = Scoreboard::create(2).unwrap();
        for slot in board.slots() {
            for counter in slot.counters() {
                counter.store(9, Relaxed);
            }
        }
        board.reset(0);
        let s = board.slot(0);
        assert!(s.counters().iter().all(|c| c.load(Relaxed) == 0));
        assert_eq!(s.counters().len(), std::mem::size_of::<Slot>() / 8);
        // The named fields are among them.
        assert_eq!(s.rejected_per_ip.load(Relaxed), 0);
        assert_eq!(s.handshake_timeouts.load(Relaxed), 0);
        assert_eq!(board.slot(1).idle_timeouts.load(Relaxed), 9);
    }

    #[test]
    fn a_file_of_the_wrong_size_is_an_error_not_a_sigbus() {
        let board = Scoreboard::create(2).unwrap();
        for slots in [0, 1, 3, 64] {
            // SAFETY: dup gives a new descriptor owned by the call alone.
            let result = unsafe { Scoreboard::from_fd(libc::dup(board.raw_fd()), slots) };
            let error = result.expect_err("wrong size");
            assert!(error.to_string().contains("--worker-count"), "{error}");
        }
        // SAFETY: as above.
        assert!(unsafe { Scoreboard::from_fd(libc::dup(board.raw_fd()), 2) }.is_ok());
    }

    #[test]
    fn sockets_per_address_are_summed_over_workers_and_freed_with_a_worker() {
        let a = Scoreboard::create(3).unwrap();
        // SAFETY: as above.
        let b = unsafe { Scoreboard::from_fd(libc::dup(a.raw_fd()), 3).unwrap() };
        let one: IpAddr = "127.0.0.2".parse().unwrap();
        let two: IpAddr = "::1".parse().unwrap();
        a.ip_add(0, one);
        b.ip_add(1, one);
        b.ip_add(2, one);
        b.ip_add(2, two);
        assert_eq!((a.ip_count(one), a.ip_count(two)), (3, 1));
        b.ip_remove(1, one);
        assert_eq!(a.ip_count(one), 2);
        // Worker 2 died: its sockets are gone with it.
        a.reset(2);
        assert_eq!((b.ip_count(one), b.ip_count(two)), (1, 0));
        a.ip_remove(2, two); // a late removal does not wrap below zero
        assert_eq!(a.ip_count(two), 0);
    }

    #[test]
    fn pusher_connections_per_app_are_summed_over_workers() {
        let a = Scoreboard::create(2).unwrap();
        // SAFETY: as above.
        let b = unsafe { Scoreboard::from_fd(libc::dup(a.raw_fd()), 2).unwrap() };
        a.app_add(0, 3);
        b.app_add(1, 3);
        b.app_add(1, APPS - 1);
        assert_eq!(
            (a.app_count(3), a.app_count(0), a.app_count(APPS - 1)),
            (2, 0, 1)
        );
        a.app_remove(0, 3);
        assert_eq!(b.app_count(3), 1);
        a.reset(1);
        assert_eq!(b.app_count(3), 0);
        b.app_remove(1, 3); // late
        assert_eq!(a.app_count(3), 0);
        a.set_apps_elsewhere(&[5, 0, 0, 7]);
        assert_eq!((b.app_count_elsewhere(0), b.app_count_elsewhere(3)), (5, 7));
        assert_eq!(b.app_count_elsewhere(APPS - 1), 0);
    }
}
