//! `c1m tune`: checks the operating-system limits a target number of connections needs,
//! prints current vs needed with the command that fixes each, and with `--apply` fixes
//! what it can (sysctls, as root).
//!
//! The estimates come from measurements on this machine kind (DESIGN.md): ~4.9 KB of
//! kernel memory per loopback TCP socket, ~100 B of c1m server memory and ~500 B of
//! bench memory per connection, ~28,000 usable ephemeral ports per source address with
//! the default port range.

use std::fmt::Write as _;

use anyhow::Context;
use clap::{Args, ValueEnum};
use serde::Serialize;

#[derive(Args, Debug)]
#[command(after_help = "Examples:
  c1m tune --connections 1000000                 # check both ends on this machine
  sudo c1m tune --connections 1000000 --apply    # and fix what can be fixed
  c1m tune --connections 200000 --role server --json")]
pub struct TuneArgs {
    /// Target number of concurrent connections.
    #[arg(long, short = 'c', default_value_t = 1_000_000)]
    connections: u64,

    /// What runs on this machine: the server, the bench client, or both (loopback).
    #[arg(long, value_enum, default_value = "both")]
    role: RoleArg,

    /// Apply the fixes that can be applied (sysctls; needs root).
    #[arg(long)]
    apply: bool,

    /// Print the checks as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum RoleArg {
    Server,
    Client,
    Both,
}

/// One limit: what it is now, what the target needs, and how to fix it.
#[derive(Debug, Serialize)]
pub struct Check {
    pub name: String,
    pub current: String,
    pub needed: String,
    pub ok: bool,
    /// A shell command that fixes it, if one exists.
    pub fix: Option<String>,
    /// A sysctl path and value `--apply` writes.
    #[serde(skip)]
    apply: Option<(String, String)>,
    pub note: Option<String>,
}

impl Check {
    /// Whether `--apply` can fix it (a sysctl it may write).
    pub fn fixable(&self) -> bool {
        self.apply.is_some()
    }
}

const KERNEL_BYTES_PER_SOCKET: u64 = 4_900;
const SERVER_BYTES_PER_CONN: u64 = 100;
const BENCH_BYTES_PER_CONN: u64 = 500;
/// Descriptors a c1m process keeps for itself besides connections.
const FD_MARGIN: u64 = 200;

fn read_sysctl(name: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/sys/{}", name.replace('.', "/")))
        .ok()
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// A source address should use at most 1/PORT_SHARE of the ephemeral ports: past
/// that the kernel's search for a free port in connect() (`__inet_hash_connect`, which
/// walks taken ports checking each 4-tuple) takes most of the CPU. Measured: a wss://
/// bench of 1,007,000 connections from 59 addresses stalled at ~776,000 (13,000 per
/// address, 46 % of 28,232 ports) with 89 % of both cores in that search.
pub const PORT_SHARE: u64 = 4;

/// How many source addresses keep each at most 1/PORT_SHARE of its `ports` used for
/// `connections`.
pub fn roomy_sources(connections: u64, ports: u64) -> u64 {
    connections.div_ceil((ports / PORT_SHARE).max(1))
}

/// How many ephemeral ports one source address has (`ip_local_port_range`).
pub fn ephemeral_ports() -> Option<u64> {
    let range = read_sysctl("net.ipv4.ip_local_port_range")?;
    match numbers(&range)[..] {
        [lo, hi] if hi >= lo => Some(hi - lo + 1),
        _ => None,
    }
}

/// The last address of a `--source-ips 127.0.0.2-…` range of `count` addresses.
pub fn last_source(count: u64) -> std::net::Ipv4Addr {
    let last = 0x7f00_0001u32 + count.clamp(1, 0xff_fff0) as u32;
    std::net::Ipv4Addr::from(last)
}

fn numbers(value: &str) -> Vec<u64> {
    value
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect()
}

/// A sysctl that must be at least `min` (in its `index`th field).
fn at_least(name: &str, index: usize, min: u64, want: &str, note: Option<String>) -> Check {
    let current = read_sysctl(name).unwrap_or_else(|| "unreadable".into());
    let ok = numbers(&current).get(index).is_some_and(|&v| v >= min);
    Check {
        name: name.to_string(),
        needed: want.to_string(),
        ok,
        fix: (!ok).then(|| format!("sysctl -w {name}=\"{want}\"")),
        apply: (!ok).then(|| (name.to_string(), want.to_string())),
        current,
        note,
    }
}

/// The kernel finds the socket of every arriving TCP segment in one hash table of
/// established connections, sized at boot from memory (`thash_entries`; 262,144 buckets on
/// this 24 GiB machine kind). Past a few sockets per bucket each lookup walks a chain of
/// cache misses: at 2,014,000 loopback sockets (~8 per bucket) `__inet_lookup_established`
/// took 13 % of both cores during a broadcast. It cannot be resized at run time, but a
/// network namespace made after `tcp_child_ehash_entries` is set gets a table of that
/// size (Linux ≥ 6.1; bench/storm.sh --netns). None on kernels that do not show the size.
fn established_hash(sockets: u64) -> Option<Check> {
    established_hash_check(&read_sysctl("net.ipv4.tcp_ehash_entries")?, sockets)
}

fn established_hash_check(current: &str, sockets: u64) -> Option<Check> {
    // A namespace that shares the host's table shows its size negated.
    let buckets = current.trim_start_matches('-').parse::<u64>().ok()?;
    let advised = sockets.max(1).next_power_of_two();
    let ok = buckets.saturating_mul(MAX_SOCKETS_PER_BUCKET) >= sockets;
    Some(Check {
        name: "net.ipv4.tcp_ehash_entries".into(),
        current: buckets.to_string(),
        needed: format!("≥ {} (read-only)", sockets.div_ceil(MAX_SOCKETS_PER_BUCKET)),
        ok,
        fix: (!ok).then(|| {
            format!(
                "boot with thash_entries={advised}, or run in a network namespace made after \
                 `sysctl -w net.ipv4.tcp_child_ehash_entries={advised}` (a container: on its host, \
                 before it starts)"
            )
        }),
        apply: None,
        note: (!ok).then(|| {
            format!(
                "the table of established TCP connections: {sockets} sockets in {buckets} buckets \
                 is ~{} per lookup chain, and every arriving segment walks one (13 % of the CPU \
                 at 2,014,000 sockets in 262,144 buckets, BENCHMARKS.md); not fatal",
                sockets.div_ceil(buckets.max(1))
            )
        }),
    })
}

/// Sockets per bucket of the established-connections table before `c1m tune` calls it short.
const MAX_SOCKETS_PER_BUCKET: u64 = 2;

fn mem_available() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

pub fn checks(connections: u64, server: bool, client: bool) -> Vec<Check> {
    let n = connections;
    let sockets = n * (server as u64 + client as u64);
    let mut out = Vec::new();

    // Open files per process: c1m uses more processes when the hard limit is low.
    let (soft, hard) = nofile();
    let per_process = hard.saturating_sub(FD_MARGIN).max(1);
    let procs = n.div_ceil(per_process);
    out.push(Check {
        name: "nofile (per process)".into(),
        current: format!("soft {soft}, hard {hard}"),
        needed: format!("{} for one process per side", n + FD_MARGIN),
        ok: hard >= n + FD_MARGIN,
        fix: (hard < n + FD_MARGIN).then(|| {
            format!("ulimit -Hn {} (from a privileged parent: limits.conf, systemd LimitNOFILE)", n + FD_MARGIN)
        }),
        apply: None,
        note: (hard < n + FD_MARGIN).then(|| {
            format!(
                "not fatal: c1m runs {procs} worker processes per side of ≤{per_process} connections \
                 (serve --workers auto, bench --procs {procs})"
            )
        }),
    });
    out.push(at_least(
        "fs.file-max",
        0,
        sockets + 100_000,
        &(sockets + 100_000).max(2_200_000).to_string(),
        None,
    ));
    out.push(at_least(
        "fs.nr_open",
        0,
        per_process.min(n) + FD_MARGIN,
        "1048576",
        None,
    ));
    if server {
        out.push(at_least("net.core.somaxconn", 0, 65535, "65535", None));
        out.push(at_least(
            "net.ipv4.tcp_max_syn_backlog",
            0,
            65535,
            "65535",
            None,
        ));
    }
    if client {
        let ports = ephemeral_ports().unwrap_or(0);
        let sources = n.div_ceil(ports.max(1));
        let roomy = roomy_sources(n, ports);
        let mut check = at_least(
            "net.ipv4.ip_local_port_range",
            1,
            65000,
            "1024 65000",
            Some(format!(
                "{ports} ports per source address: {n} connections need ≥ {sources} source addresses, \
                 and ≥ {roomy} to keep each address's ports at most 1/{PORT_SHARE} used (bench \
                 --source-ips 127.0.0.2-{}): fuller, connect() spends its time in the kernel's port \
                 search (89 % of the CPU at 13,000 connections per address, BENCHMARKS.md)",
                last_source(roomy)
            )),
        );
        // The range itself is fine if the sources suffice; widening it only saves addresses.
        check.ok = check.ok || sources <= 250;
        if check.ok {
            check.fix = None;
            check.apply = None;
        }
        out.push(check);
        out.push(at_least("net.ipv4.tcp_tw_reuse", 0, 1, "1", None));
    }
    out.extend(established_hash(sockets));
    // tcp_mem is in pages; an idle socket holds little, but a broadcast briefly queues a
    // page per socket on both ends.
    let pages = sockets + 65536;
    let wanted = format!("{} {} {}", pages / 2, pages * 3 / 4, pages);
    if read_sysctl("net.ipv4.tcp_mem").is_none() && read_sysctl("net.ipv4.tcp_rmem").is_some() {
        // A network namespace other than the host's: tcp_mem is global and shown only there.
        out.push(Check {
            name: "net.ipv4.tcp_mem".into(),
            current: "not in this namespace".into(),
            needed: wanted,
            ok: true,
            fix: None,
            apply: None,
            note: Some("global: check and apply it from the host's network namespace".into()),
        });
    } else {
        out.push(at_least(
            "net.ipv4.tcp_mem",
            2,
            pages,
            &wanted,
            Some("pages of 4 KiB for all TCP buffers".into()),
        ));
    }
    // Default per-socket buffer sizes: allocated on demand, so idle sockets cost nothing
    // here, but large defaults let a broadcast burst pin more memory per socket.
    for name in ["net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem"] {
        let current = read_sysctl(name).unwrap_or_else(|| "unreadable".into());
        let ok = numbers(&current).get(1).is_some_and(|&v| v <= 131_072);
        out.push(Check {
            name: name.to_string(),
            needed: "default (middle) ≤ 131072".into(),
            ok,
            fix: (!ok).then(|| format!("sysctl -w {name}=\"4096 16384 4194304\"")),
            apply: (!ok).then(|| (name.to_string(), "4096 16384 4194304".to_string())),
            current,
            note: None,
        });
    }
    let needed_memory = sockets * KERNEL_BYTES_PER_SOCKET
        + if server { n * SERVER_BYTES_PER_CONN } else { 0 }
        + if client { n * BENCH_BYTES_PER_CONN } else { 0 };
    let available = mem_available().unwrap_or(0);
    out.push(Check {
        name: "memory available".into(),
        current: format!("{:.1} GiB", available as f64 / (1u64 << 30) as f64),
        needed: format!(
            "{:.1} GiB (estimate)",
            needed_memory as f64 / (1u64 << 30) as f64
        ),
        ok: available >= needed_memory,
        fix: None,
        apply: None,
        note: Some(format!(
            "≈{KERNEL_BYTES_PER_SOCKET} B kernel per socket × {sockets} sockets, plus c1m's own; \
             short memory means the OOM killer, so lower --connections"
        )),
    });
    out
}

/// This process's open-file limit: (soft, hard).
pub fn nofile() -> (u64, u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        (limit.rlim_cur, limit.rlim_max)
    } else {
        (0, 0)
    }
}

pub fn run(args: TuneArgs) -> anyhow::Result<()> {
    let (server, client) = match args.role {
        RoleArg::Server => (true, false),
        RoleArg::Client => (false, true),
        RoleArg::Both => (true, true),
    };
    let mut list = checks(args.connections, server, client);
    if args.apply {
        for check in list.iter_mut().filter(|c| !c.ok) {
            let Some((name, value)) = &check.apply else {
                continue;
            };
            let path = format!("/proc/sys/{}", name.replace('.', "/"));
            match std::fs::write(&path, value) {
                Ok(()) => {
                    check.note = Some(format!("applied: {name} = {value}"));
                    check.current = read_sysctl(name).unwrap_or_default();
                    check.ok = true;
                    check.fix = None;
                }
                Err(e) => check.note = Some(format!("could not apply ({e}); run as root")),
            }
        }
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&list).context("serializing checks")?
        );
    } else {
        print!("{}", table(&list, args.connections));
    }
    Ok(())
}

fn table(list: &[Check], connections: u64) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "c1m tune: limits for {connections} connections\n");
    let _ = writeln!(
        out,
        "{:<30} {:<26} {:<28} status",
        "limit", "current", "needed"
    );
    for c in list {
        let status = if c.ok { "ok" } else { "SHORT" };
        let _ = writeln!(
            out,
            "{:<30} {:<26} {:<28} {status}",
            c.name, c.current, c.needed
        );
        if let Some(fix) = &c.fix {
            let _ = writeln!(out, "{:<30} fix: {fix}", "");
        }
        if let Some(note) = &c.note {
            let _ = writeln!(out, "{:<30} note: {note}", "");
        }
    }
    let fixable = list.iter().filter(|c| !c.ok && c.fixable()).count();
    let other = list.iter().filter(|c| !c.ok && !c.fixable()).count();
    if fixable > 0 {
        let _ = writeln!(out, "\n{fixable} limit(s) short: run `c1m tune --connections {connections} --apply` as root.");
    }
    if other > 0 {
        let _ = writeln!(
            out,
            "{other} limit(s) that --apply cannot change: see the notes above."
        );
    }
    if fixable + other == 0 {
        let _ = writeln!(out, "\nready.");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_source_address_counts_from_127_0_0_2() {
        assert_eq!(last_source(1).to_string(), "127.0.0.2");
        assert_eq!(last_source(201).to_string(), "127.0.0.202");
        assert_eq!(last_source(300).to_string(), "127.0.1.45");
    }

    #[test]
    fn a_crowded_established_hash_is_short_with_the_boot_parameter_and_the_namespace_way() {
        let short = established_hash_check("262144", 2_014_000).expect("a number");
        assert!(!short.ok);
        let fix = short.fix.expect("a fix");
        assert!(fix.contains("thash_entries=2097152"), "{fix}");
        assert!(fix.contains("tcp_child_ehash_entries=2097152"), "{fix}");
        assert!(short.note.expect("a note").contains("~8 per lookup chain"));
        // Shared with the host: the size is shown negated.
        assert!(
            !established_hash_check("-262144", 2_014_000)
                .expect("a number")
                .ok
        );
        let roomy = established_hash_check("2097152", 2_014_000).expect("a number");
        assert!(roomy.ok && roomy.fix.is_none() && roomy.note.is_none());
        assert!(
            established_hash_check("262144", 380_000)
                .expect("a number")
                .ok
        );
        assert!(established_hash_check("unreadable", 10).is_none());
    }
}
