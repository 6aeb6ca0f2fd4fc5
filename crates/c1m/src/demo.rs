//! `c1m demo`: the whole experiment in one command. Starts a server and a bench on
//! loopback (each multi-process as the connection count needs), ramps up, broadcasts a
//! few rounds, prints the bench's report and the server's memory per connection, and
//! stops every process it started, also on Ctrl-C or failure.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;

#[derive(Args, Debug)]
#[command(after_help = "Examples:
  c1m demo                              # 10,000 connections, under a minute, no tuning needed
  c1m demo --connections 100000
  sudo c1m tune --apply && c1m demo --connections 1000000     # the headline run")]
pub struct DemoArgs {
    /// Connections to open and hold.
    #[arg(long, short = 'c', default_value_t = 10_000)]
    connections: u64,

    /// Broadcast rounds to measure once everyone is connected.
    #[arg(long, default_value_t = 3)]
    rounds: u64,

    /// Time between broadcasts. Default: 2 s, or 25 µs per connection if longer, so one
    /// fan-out ends before the next begins (≈12 µs per connection was measured here).
    #[arg(long, value_parser = crate::cli::parse_duration)]
    interval: Option<Duration>,

    /// Connections opened per second.
    #[arg(long, default_value_t = 30_000.0)]
    rate: f64,

    /// Also write the bench's JSON result here.
    #[arg(long, value_name = "FILE")]
    json: Option<std::path::PathBuf>,
}

/// Kills (SIGTERM, then SIGKILL) and reaps the child when dropped: every exit path of
/// the demo, including errors and panics, cleans up.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.0.try_wait() {
            return;
        }
        // SAFETY: kill(2) on the PID of a child we started and have not reaped.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        for _ in 0..100 {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A process and its children (one level: the master's workers, the bench's workers).
fn tree(pid: u32) -> Vec<u32> {
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    std::iter::once(pid)
        .chain(children.split_whitespace().filter_map(|c| c.parse().ok()))
        .collect()
}

/// Sum of the RSS of a process tree, in bytes.
fn tree_rss(pid: u32) -> u64 {
    let rss = |p: u32| -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{p}/status")).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
    };
    tree(pid).into_iter().filter_map(rss).sum()
}

/// CPU seconds (user + system) used so far by a process tree.
fn tree_cpu_secs(pid: u32) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let cpu = |p: u32| -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of stat(5), i.e. 11 and 12 after the name.
        Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
    };
    tree(pid).into_iter().filter_map(cpu).sum::<u64>() as f64 / ticks
}

/// Source addresses for `n` connections. One address could take ~28,000 (the default
/// ephemeral port range), but the kernel's port search slows as a (source, destination)
/// pair fills up, so setup is much faster with ~5,000 connections per address.
fn sources_for(n: u64) -> String {
    let count = (n / 5_000).clamp(16, 4_000) as u32;
    let first = u32::from(std::net::Ipv4Addr::new(127, 0, 0, 2));
    let last = std::net::Ipv4Addr::from(first + count - 1);
    format!("127.0.0.2-{last}")
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    if args.connections == 0 || args.rounds == 0 {
        bail!("--connections and --rounds must be at least 1");
    }
    let interval = args.interval.unwrap_or_else(|| {
        Duration::from_micros(25 * args.connections).max(Duration::from_secs(2))
    });
    let stop = crate::bench::stop_flag()?;
    let exe = std::env::current_exe().context("finding the c1m executable")?;
    let n = args.connections;
    let nofile = crate::tune::nofile().0;
    let per_proc = nofile.saturating_sub(200).max(100);
    let procs = n.div_ceil(per_proc).max(1);
    if n > 100_000 {
        let short: Vec<String> = crate::tune::checks(n, true, true)
            .into_iter()
            // What `--apply` fixes, and memory; not the limits it cannot change (nofile,
            // the kernel's connection table: tune's table explains them).
            .filter(|c| !c.ok && (c.fixable() || c.name == "memory available"))
            .map(|c| c.name)
            .collect();
        if !short.is_empty() {
            eprintln!("c1m demo: warning: limits short for {n} connections ({}): run `c1m tune --connections {n} --apply` as root first", short.join(", "));
        }
    }

    eprintln!("c1m demo: starting a server for {n} connections");
    let mut server = Guard(
        Command::new(&exe)
            .args(["serve", "--listen", "127.0.0.1:0", "--stats-interval", "5s"])
            .args([
                "--max-connections",
                &n.to_string(),
                "--total",
                &n.to_string(),
            ])
            .args(["--interval", &format!("{}ms", interval.as_millis())])
            // The seed's experiment had no heartbeats; at 1M a ping sweep would be a
            // second fan-out running across the measured ones.
            .args(["--ping-interval", "0s", "--idle-timeout", "0s"])
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            // Only the server's warnings, unless the user asked for more.
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .spawn()
            .context("starting c1m serve")?,
    );
    let stdout = server.0.stdout.take().context("server stdout")?;
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .context("reading the server's address")?;
    let Some(addr) = line.trim().strip_prefix("listening on ") else {
        bail!("c1m serve did not start (it said {line:?})");
    };
    std::thread::sleep(Duration::from_millis(300)); // let the workers settle
    let idle_rss = tree_rss(server.0.id());

    eprintln!(
        "c1m demo: starting the bench: {n} connections from {procs} process(es), then {} rounds",
        args.rounds
    );
    let mut bench_cmd = Command::new(&exe);
    bench_cmd
        .args(["bench", "--url", &format!("ws://{addr}/"), "--quiet"])
        .args([
            "--connections",
            &n.to_string(),
            "--procs",
            &procs.to_string(),
        ])
        .args([
            "--rate",
            &args.rate.to_string(),
            "--messages",
            &args.rounds.to_string(),
        ])
        .args(["--source-ips", &sources_for(n)]);
    // Bounded: ramp time at the asked rate, the rounds, and generous slack.
    let limit = Duration::from_secs_f64(n as f64 / args.rate) * 3
        + interval * (args.rounds as u32 + 2)
        + Duration::from_secs(30);
    bench_cmd.args(["--duration", &format!("{}ms", limit.as_millis())]);
    if let Some(json) = &args.json {
        bench_cmd.arg("--json").arg(json);
    }
    let mut bench = Guard(bench_cmd.spawn().context("starting c1m bench")?);
    let started = Instant::now();
    let mut peak_rss = idle_rss;
    let (mut bench_rss, mut bench_cpu, mut server_cpu) = (0u64, 0f64, 0f64);
    let status = loop {
        if stop.load(Ordering::Relaxed) {
            bail!("interrupted: stopping the server and the bench");
        }
        if let Some(status) = bench.0.try_wait()? {
            break status;
        }
        if server.0.try_wait()?.is_some() {
            bail!("the server exited during the demo");
        }
        peak_rss = peak_rss.max(tree_rss(server.0.id()));
        bench_rss = bench_rss.max(tree_rss(bench.0.id()));
        bench_cpu = bench_cpu.max(tree_cpu_secs(bench.0.id()));
        server_cpu = server_cpu.max(tree_cpu_secs(server.0.id()));
        std::thread::sleep(Duration::from_millis(200));
    };
    if !status.success() {
        bail!("the bench failed ({status})");
    }
    let grown = peak_rss.saturating_sub(idle_rss);
    println!("-- Server ----------------------------------------------------------------------");
    println!("server memory (RSS of master + workers): {:.1} MiB idle, {:.1} MiB peak with {n} connections", idle_rss as f64 / 1048576.0, peak_rss as f64 / 1048576.0);
    println!(
        "server user-space memory per connection: {:.0} B",
        grown as f64 / n as f64
    );
    println!("server CPU time: {server_cpu:.1} s");
    println!("-- Bench -----------------------------------------------------------------------");
    println!(
        "bench memory (RSS of all its processes): {:.1} MiB peak, {:.0} B per connection",
        bench_rss as f64 / 1048576.0,
        bench_rss as f64 / n as f64
    );
    println!("bench CPU time (sampled every 200 ms): {bench_cpu:.1} s");
    println!("demo took {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
