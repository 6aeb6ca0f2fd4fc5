//! `c1m bench`: flags, and the supervision of worker processes.
//!
//! With `--procs 1` the worker runs in this process. With more, this process re-executes
//! itself once per worker (`--worker-index I --worker-count P`, hidden flags), each
//! child taking its share of connections, rate and source addresses; every second
//! each child prints its cumulative snapshot as one JSON line on stdout, and this
//! process merges them (HdrHistograms added exactly), ticks the meters and prints.

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use c1m_bench::report::{console, Aggregator, BenchResult};
use c1m_bench::snapshot::Snapshot;
use c1m_bench::target::{parse_sources, Target};
use c1m_bench::worker::{self, WorkerConfig};
use clap::Args;

use crate::cli::parse_duration;

#[derive(Args, Debug, Clone)]
#[command(after_help = "Examples:
  c1m bench --url ws://127.0.0.1:8088/ --connections 10000 --rate 5000 --messages 3
  c1m bench --connections 100000 --procs 6 --source-ips 127.0.0.2-127.0.0.100 --duration 2m --json run.json
  c1m report merge machine1.json machine2.json")]
pub struct BenchArgs {
    /// WebSocket URL to connect to (ws://HOST:PORT/PATH, or wss:// for TLS). tcp://HOST:PORT
    /// loads a plain TCP server instead (the raw-TCP baseline of bench/compare: no
    /// handshake, one newline-terminated timestamp per message).
    #[arg(long, default_value = "ws://127.0.0.1:8088/")]
    url: String,

    /// wss:// only: accept any server certificate (for self-signed test certificates).
    /// The report notes it.
    #[arg(long)]
    insecure: bool,

    /// wss:// only: trust the CAs in this PEM file instead of the system's bundle.
    #[arg(long, value_name = "FILE", conflicts_with = "insecure")]
    ca_cert: Option<PathBuf>,

    /// wss:// only: never resume a TLS session (by default a reconnect offers the
    /// server's ticket from an earlier connection, and the report counts how many
    /// handshakes resumed); to measure what full handshakes cost.
    #[arg(long)]
    no_tls_resume: bool,

    /// Connections to open in total (over all worker processes).
    #[arg(long, short = 'c', default_value_t = 1000)]
    connections: usize,

    /// Connections opened per second in total, paced evenly.
    #[arg(long, default_value_t = 5000.0)]
    rate: f64,

    /// Worker processes. Each process may hold at most its open-file limit of sockets
    /// (about 19,000 here), so 100,000 connections need at least 6.
    #[arg(long, default_value_t = 1)]
    procs: usize,

    /// Source addresses to connect from, as a list and/or ranges, IPv4 or IPv6
    /// (e.g. 127.0.0.2-127.0.0.254,127.0.1.1). Each address gives ~64k connections to
    /// one server port; connections rotate over them. Default: the kernel's choice.
    #[arg(long, value_name = "LIST")]
    source_ips: Option<String>,

    /// Stop after this long (e.g. 60s, 10m).
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,

    /// Stop once every connection has received this many messages.
    #[arg(long, value_name = "K")]
    messages: Option<u64>,

    /// Time between reports.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    report_interval: Duration,

    /// Reopen connections that fail or end, after a jittered exponential backoff
    /// (0.1 s doubling to 10 s; reset by a successful connection). An upgrade refused
    /// with `Retry-After` (a 503 or 429) is retried no sooner than the server asked, and
    /// at most a fifth of it later (up to 1 s), so clients told the same second spread out.
    #[arg(long)]
    reconnect: bool,

    /// With --reconnect: never lose a message across a reconnect, and prove it. Each
    /// connection asks for envelopes (`?envelope=1`), keeps its last offset and epoch
    /// per topic, and resumes from them (`?since=TOPIC:EPOCH:OFFSET`) every time it
    /// comes back. Reported under "recovery": resumes, `recovered: true` answers,
    /// `recovered: false` answers by reason, publications replayed, and publications
    /// missed (holes in a topic's offsets) or received twice. The server needs history
    /// for the topics (e.g. `c1m serve --history-for time=1000`).
    #[arg(long, requires = "reconnect")]
    recover: bool,

    /// The protocol the clients speak: `native` (c1m's own: the topics are in the URL)
    /// or `pusher` (Pusher Channels protocol 7, as pusher-js: the URL is the app's,
    /// ws://HOST:PORT/app/KEY, and each connection subscribes to --pusher-channel,
    /// `time` by default: the clock of `c1m serve --pusher-app ID:KEY:SECRET`).
    #[arg(long, value_enum, default_value_t = ProtocolArg::Native)]
    protocol: ProtocolArg,

    /// Speak the Pusher protocol (implies --protocol pusher): subscribe each connection
    /// to this channel right after its upgrade (`pusher:subscribe`), and read Pusher
    /// events (the stamp in their `data`); the protocol's own messages (`pusher:…`,
    /// `pusher_internal:…`) are not counted.
    #[arg(long, value_name = "CHANNEL", conflicts_with = "recover")]
    pusher_channel: Option<String>,

    /// With the Pusher protocol: spread the connections over N channels, CHANNEL-0 …
    /// CHANNEL-(N-1) (connection i on i % N); e.g. presence channels hold at most
    /// 1,000 members each.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pusher_channels: u32,

    /// With the Pusher protocol on a private- or presence- channel: the app's secret,
    /// to sign each subscription as the app's auth endpoint would (a presence member
    /// is named by its socket id). Also read from C1M_PUSHER_SECRET.
    #[arg(
        long,
        value_name = "SECRET",
        env = "C1M_PUSHER_SECRET",
        hide_env_values = true
    )]
    pusher_secret: Option<String>,

    /// Close each connection cleanly after about this long (±50 %), to generate churn;
    /// with --reconnect it is reopened right away.
    #[arg(long, value_parser = parse_duration)]
    lifetime: Option<Duration>,

    /// A connect or handshake that takes longer than this is an error.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    connect_timeout: Duration,

    /// Write the full result (config, counters, histogram, rounds) as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,

    /// Print only the final report.
    #[arg(long, short = 'q')]
    quiet: bool,

    #[arg(long, hide = true)]
    worker_index: Option<usize>,

    #[arg(long, hide = true, default_value_t = 1)]
    worker_count: usize,
}

/// What the bench's clients speak (`--protocol`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum ProtocolArg {
    /// c1m's own: topics in the URL, publications as they are.
    Native,
    /// Pusher Channels protocol 7 (pusher-js, Laravel Echo).
    Pusher,
}

impl BenchArgs {
    /// The channel every Pusher connection subscribes to, if the run speaks Pusher.
    fn pusher_channel(&self) -> Option<String> {
        match (&self.pusher_channel, self.protocol) {
            (Some(channel), _) => Some(channel.clone()),
            (None, ProtocolArg::Pusher) => Some(c1m_server::topics::TIME.to_string()),
            (None, ProtocolArg::Native) => None,
        }
    }

    /// The Pusher side of the run, if it speaks Pusher (the app key from the URL).
    fn pusher_plan(&self) -> Option<c1m_bench::pusher::PusherPlan> {
        let channel = self.pusher_channel()?;
        let key = self
            .url
            .split_once("/app/")
            .map(|(_, rest)| {
                rest.split(['?', '/'])
                    .next()
                    .unwrap_or_default()
                    .to_string()
            })
            .unwrap_or_default();
        Some(c1m_bench::pusher::PusherPlan {
            channel,
            channels: self.pusher_channels,
            key,
            secret: self.pusher_secret.clone(),
        })
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.connections == 0 {
            bail!("--connections must be at least 1");
        }
        if !(self.rate.is_finite() && self.rate > 0.0) {
            bail!("--rate must be a positive number of connections per second");
        }
        let pusher = self.pusher_channel().is_some();
        if pusher && self.url.starts_with("tcp://") {
            bail!("the Pusher protocol needs a WebSocket server (ws:// or wss://)");
        }
        if pusher && !self.url.contains("/app/") {
            bail!("the Pusher protocol needs the app's URL: ws://HOST:PORT/app/KEY");
        }
        if pusher && self.recover {
            bail!("--recover is for the native protocol (Pusher clients do not resume)");
        }
        if !pusher && (self.pusher_secret.is_some() || self.pusher_channels != 1) {
            bail!("--pusher-secret and --pusher-channels need --protocol pusher");
        }
        if self.recover && self.url.starts_with("tcp://") {
            bail!("--recover needs a WebSocket server (ws:// or wss://): it resumes by position");
        }
        if self.procs == 0 || self.procs > self.connections {
            bail!("--procs must be between 1 and --connections");
        }
        if self.duration.is_none() && self.messages.is_none() {
            tracing::warn!("neither --duration nor --messages given: running until Ctrl-C");
        }
        Ok(())
    }

    fn config_json(&self) -> serde_json::Value {
        serde_json::json!({
            "url": self.url,
            "connections": self.connections,
            "rate": self.rate,
            "procs": self.procs,
            "source_ips": self.source_ips,
            "duration_secs": self.duration.map(|d| d.as_secs_f64()),
            "messages": self.messages,
            "reconnect": self.reconnect,
            "recover": self.recover,
            "lifetime_secs": self.lifetime.map(|d| d.as_secs_f64()),
            "tls_insecure": self.url.starts_with("wss://") && self.insecure,
        })
    }

    /// The share of the work of worker `index` out of `count`.
    fn worker_config(&self, index: usize, count: usize) -> anyhow::Result<WorkerConfig> {
        let target = Target::parse(&self.url).context("--url")?;
        let tls = match target.tls {
            false => None,
            true => Some(
                // Room for two tickets per connection of this worker (the server sends
                // two per handshake), so every reconnect can resume.
                c1m_bench::tls::client_config(
                    self.insecure,
                    self.ca_cert.as_deref(),
                    match self.no_tls_resume {
                        true => 0,
                        false => 2 * self.connections.div_ceil(count.max(1)),
                    },
                )
                .context("wss:// target")?,
            ),
        };
        let all_sources = match &self.source_ips {
            Some(spec) => parse_sources(spec).context("--source-ips")?,
            None => Vec::new(),
        };
        // Deal sources out round-robin; with fewer sources than workers, all share all.
        let sources = if all_sources.len() >= count {
            all_sources
                .iter()
                .skip(index)
                .step_by(count)
                .copied()
                .collect()
        } else {
            all_sources
        };
        let connections = self.connections / count + usize::from(index < self.connections % count);
        Ok(WorkerConfig {
            target,
            connections,
            rate: self.rate / count as f64,
            sources,
            duration: self.duration,
            messages: self.messages,
            connect_timeout: self.connect_timeout,
            // Often enough for a fine setup-ramp chart; with many worker processes
            // less often, so the parent does not spend a core on their reports.
            snapshot_interval: Duration::from_millis(250 * count.div_ceil(8).min(4) as u64),
            reconnect: self.reconnect,
            lifetime: self.lifetime,
            recover: self.recover,
            pusher: self.pusher_plan(),
            tls,
            rounds_elsewhere: None,
        })
    }
}

/// Warns when each source address would use more than 1/`PORT_SHARE` of its ephemeral
/// ports: the kernel's port search in connect() then takes most of the CPU, and the
/// setup rate measured is the kernel's, not the server's (see `tune::PORT_SHARE`).
fn warn_if_ports_run_short(args: &BenchArgs) {
    let Some(ports) = crate::tune::ephemeral_ports() else {
        return;
    };
    let sources = match &args.source_ips {
        Some(spec) => parse_sources(spec).map(|s| s.len()).unwrap_or(1),
        None => 1,
    }
    .max(1) as u64;
    let per_source = (args.connections as u64).div_ceil(sources);
    let share = crate::tune::PORT_SHARE;
    if per_source > ports / share {
        let wanted = crate::tune::roomy_sources(args.connections as u64, ports);
        tracing::warn!(
            "{per_source} connections per source address use more than 1/{share} of its {ports} \
             ephemeral ports: connect() will spend its time in the kernel's port search; use \
             --source-ips 127.0.0.2-{} ({wanted} addresses) or widen ip_local_port_range \
             (c1m tune)",
            crate::tune::last_source(wanted)
        );
    }
}

/// A stop flag set by SIGINT or SIGTERM.
pub fn stop_flag() -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop))?;
    }
    Ok(stop)
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(index) = args.worker_index {
        return run_child(&args, index);
    }
    args.validate()?;
    args.worker_config(0, 1)?; // report bad flags before starting anything
    let per_proc = args.connections.div_ceil(args.procs);
    let nofile = crate::tune::nofile().0;
    if per_proc as u64 + 64 > nofile {
        bail!(
            "{per_proc} connections per process exceed the open-file limit ({nofile}); \
             use --procs {} or more",
            args.connections
                .div_ceil(nofile.saturating_sub(64).max(1) as usize)
        );
    }
    warn_if_ports_run_short(&args);
    let stop = stop_flag()?;
    let start = Instant::now();
    let mut reporter = Reporter::new(&args, start);
    let result = if args.procs == 1 {
        let mut agg = Aggregator::new(1);
        let config = args.worker_config(0, 1)?;
        let last = worker::run(config, &stop, |snap| {
            agg.update(0, snap.clone(), start.elapsed());
            reporter.tick(&agg);
        })?;
        agg.update(0, last, start.elapsed());
        agg.result(args.config_json(), start.elapsed())
    } else {
        run_children(&args, &stop, &mut reporter, start)?
    };
    reporter.finish();
    print!("{}", console(&result, "c1m bench: final report"));
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&result)?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Prints periodic reports and the ramp-up progress line.
struct Reporter {
    interval: Duration,
    quiet: bool,
    progress: bool,
    target: usize,
    start: Instant,
    next: Instant,
}

impl Reporter {
    fn new(args: &BenchArgs, start: Instant) -> Reporter {
        Reporter {
            interval: args.report_interval,
            quiet: args.quiet,
            progress: !args.quiet && std::io::stderr().is_terminal(),
            target: args.connections,
            start,
            next: start + args.report_interval,
        }
    }

    /// Ends the progress line, if one is showing.
    fn finish(&mut self) {
        if self.progress {
            eprintln!();
            self.progress = false;
        }
    }

    fn tick(&mut self, agg: &Aggregator) {
        let now = Instant::now();
        let totals = agg.totals();
        if self.progress && (totals.established as usize) < self.target {
            let done = totals.established as usize * 40 / self.target.max(1);
            eprint!(
                "\rramping up [{}{}] {}/{} connections, {} errors ",
                "#".repeat(done),
                " ".repeat(40 - done),
                totals.established,
                self.target,
                totals.errors
            );
        }
        if now >= self.next {
            self.next += self.interval;
            if !self.quiet {
                let result = agg.result(serde_json::Value::Null, now - self.start);
                if self.progress {
                    eprintln!();
                }
                print!(
                    "{}",
                    console(
                        &result,
                        &format!("c1m bench: {:.0} s", (now - self.start).as_secs_f64())
                    )
                );
                let _ = std::io::stdout().flush();
            }
        }
    }
}

/// One line a child prints per snapshot.
#[derive(serde::Serialize, serde::Deserialize)]
struct ChildLine {
    done: bool,
    snapshot: Snapshot,
}

fn run_child(args: &BenchArgs, index: usize) -> anyhow::Result<()> {
    let mut config = args.worker_config(index, args.worker_count)?;
    // The parent sends the stamp of every round any worker saw, one per line.
    let elsewhere = Arc::new(std::sync::Mutex::new(Vec::new()));
    config.rounds_elsewhere = Some(Arc::clone(&elsewhere));
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if let Ok(stamp) = line.trim().parse::<u64>() {
                elsewhere
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(stamp);
            }
        }
    });
    let stop = stop_flag()?;
    let mut stdout = std::io::stdout().lock();
    let mut emit = |snapshot: &Snapshot, done: bool| -> std::io::Result<()> {
        let line = serde_json::to_string(&ChildLine {
            done,
            snapshot: snapshot.clone(),
        })?;
        writeln!(stdout, "{line}")?;
        stdout.flush()
    };
    let last = worker::run(config, &stop, |snap| {
        // If the parent is gone, stop: nobody reads us.
        if emit(snap, false).is_err() {
            stop.store(true, Ordering::Relaxed);
        }
    })?;
    emit(&last, true)?;
    Ok(())
}

fn run_children(
    args: &BenchArgs,
    stop: &AtomicBool,
    reporter: &mut Reporter,
    start: Instant,
) -> anyhow::Result<BenchResult> {
    let exe = std::env::current_exe().context("finding the c1m executable")?;
    let (tx, rx) = mpsc::channel::<(usize, Option<ChildLine>)>();
    let mut children = Vec::new();
    for index in 0..args.procs {
        let mut cmd = Command::new(&exe);
        cmd.arg("bench")
            .args(["--url", &args.url])
            .args(["--connections", &args.connections.to_string()])
            .args(["--rate", &args.rate.to_string()])
            .args([
                "--connect-timeout",
                &format!("{}ms", args.connect_timeout.as_millis()),
            ])
            .args(["--worker-index", &index.to_string()])
            .args(["--worker-count", &args.procs.to_string()])
            .stdout(Stdio::piped())
            .stdin(Stdio::piped());
        // The TLS settings (each worker checks the server's certificate itself).
        if args.insecure {
            cmd.arg("--insecure");
        }
        if let Some(ca) = &args.ca_cert {
            cmd.arg("--ca-cert").arg(ca);
        }
        if args.no_tls_resume {
            cmd.arg("--no-tls-resume");
        }
        if let Some(spec) = &args.source_ips {
            cmd.args(["--source-ips", spec]);
        }
        if let Some(d) = args.duration {
            cmd.args(["--duration", &format!("{}ms", d.as_millis())]);
        }
        if let Some(k) = args.messages {
            cmd.args(["--messages", &k.to_string()]);
        }
        if args.reconnect {
            cmd.arg("--reconnect");
        }
        if args.recover {
            cmd.arg("--recover");
        }
        if let Some(channel) = args.pusher_channel() {
            cmd.args(["--pusher-channel", &channel]);
            cmd.args(["--pusher-channels", &args.pusher_channels.to_string()]);
        }
        if let Some(secret) = &args.pusher_secret {
            // Through the environment, not the command line (`ps` shows that).
            cmd.env("C1M_PUSHER_SECRET", secret);
        }
        if let Some(lifetime) = args.lifetime {
            cmd.args(["--lifetime", &format!("{}ms", lifetime.as_millis())]);
        }
        let mut child = cmd.spawn().context("starting a bench worker")?;
        let stdout = child.stdout.take().expect("piped");
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                match serde_json::from_str::<ChildLine>(&line) {
                    Ok(parsed) => {
                        let _ = tx.send((index, Some(parsed)));
                    }
                    Err(error) => {
                        tracing::warn!(%error, "unreadable line from bench worker {index}")
                    }
                }
            }
            let _ = tx.send((index, None)); // the child's stdout closed
        });
        children.push(child);
    }
    drop(tx);
    // Every worker learns every round's stamp, so one whose connections received
    // none of a round still counts them as expected (and missed) for it.
    let mut stdins: Vec<_> = children.iter_mut().map(|c| c.stdin.take()).collect();
    let mut stamps_sent = std::collections::BTreeSet::new();
    let mut agg = Aggregator::new(args.procs);
    let mut finished = vec![false; args.procs];
    let mut forwarded = false;
    while finished.iter().any(|f| !f) {
        if stop.load(Ordering::Relaxed) && !forwarded {
            forwarded = true;
            for child in &children {
                // SAFETY: kill(2) on the PID of a child we started and have not reaped.
                unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            }
        }
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok((index, Some(line))) => {
                let new: Vec<u64> = line
                    .snapshot
                    .rounds
                    .keys()
                    .filter(|stamp| stamps_sent.insert(**stamp))
                    .copied()
                    .collect();
                if !new.is_empty() {
                    let text: String = new.iter().map(|s| format!("{s}\n")).collect();
                    for stdin in stdins.iter_mut() {
                        // A worker that has finished has closed its end: forget it.
                        if stdin
                            .as_mut()
                            .is_some_and(|s| s.write_all(text.as_bytes()).is_err())
                        {
                            *stdin = None;
                        }
                    }
                }
                agg.update(index, line.snapshot, start.elapsed());
                if line.done {
                    finished[index] = true;
                }
                reporter.tick(&agg);
            }
            Ok((index, None)) => {
                if !finished[index] {
                    tracing::warn!(worker = index, "bench worker ended without a final report");
                    finished[index] = true;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => reporter.tick(&agg),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    for mut child in children {
        let _ = child.wait();
    }
    Ok(agg.result(args.config_json(), start.elapsed()))
}
