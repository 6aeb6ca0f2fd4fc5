//! `c1m serve`: command-line flags of the push server, turned into a `ServeConfig`.

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;

use crate::cli::{parse_duration, parse_positive_duration};
use c1m_server::master::WorkerFds;
use c1m_server::scoreboard::Scoreboard;
use c1m_server::{
    Faults, JwtConfig, JwtKey, Precision, ServeConfig, SlowConsumerPolicy, WorkerRole,
};
use clap::{Args, ValueEnum};

#[derive(Args, Debug)]
#[command(after_help = "Examples:
  c1m serve                                  # seed defaults: port 8088, push every minute
  c1m serve --interval 1s                    # push the clock every second
  c1m serve --delay 10m --total 1200000      # the seed's run: wait, then push once 1.2M are connected
  c1m serve --connect-only                   # hold connections, push nothing
  c1m serve --listen 127.0.0.1:0             # pick a free port (printed on stdout)
  c1m serve --api-key s3cret                 # enable POST /publish and /broadcast
  c1m serve --config c1m.toml                # settings from a TOML file (keys = flag names)

Topics: clients join `time` (the clock) by default, or name topics with
ws://HOST:PORT/?topic=a&topic=b or ws://HOST:PORT/topics/a, and send
{\"op\":\"subscribe\",\"topic\":\"b\"} or {\"op\":\"unsubscribe\",...} later.
Publish: curl -H 'Authorization: Bearer s3cret' -d '{\"topic\":\"a\",\"message\":\"hi\"}' \
  -H 'Content-Type: application/json' http://HOST:PORT/publish
Every flag can also be set by an environment variable (shown as [env: ...]) or a key of
the --config file; precedence: flag, then environment, then file, then default.")]
pub struct ServeArgs {
    /// Address and port to listen on (port 0: any free port, printed on stdout).
    #[arg(long, default_value = "0.0.0.0:8088", env = "C1M_LISTEN")]
    listen: SocketAddr,

    /// Wait this long after start-up before the first broadcast (e.g. 10m, 30s, 0).
    #[arg(long, default_value = "0s", value_parser = parse_duration, env = "C1M_DELAY")]
    delay: Duration,

    /// Time between broadcasts of the clock (e.g. 1m, 1s, 250ms).
    #[arg(long, default_value = "1m", value_parser = parse_positive_duration, env = "C1M_INTERVAL")]
    interval: Duration,

    /// Start broadcasting only once this many connections are open; once reached,
    /// broadcasting continues even if connections drop.
    #[arg(long, value_name = "N", env = "C1M_TOTAL")]
    total: Option<usize>,

    /// Hold connections but never broadcast.
    #[arg(long, env = "C1M_CONNECT_ONLY")]
    connect_only: bool,

    /// Unit of the broadcast timestamp: milliseconds (seed format) or microseconds since the epoch.
    #[arg(long, value_enum, default_value = "ms", env = "C1M_PRECISION")]
    precision: PrecisionArg,

    /// Largest message a client may send, in bytes; larger messages are closed with 1009.
    #[arg(long, default_value_t = 1 << 20, value_name = "BYTES", env = "C1M_MAX_MESSAGE_SIZE")]
    max_message_size: u64,

    /// Most output bytes queued for one connection that stopped reading; past this the
    /// connection is a slow consumer (see --slow-consumer), so it can never hold up the
    /// others or grow the server's memory.
    #[arg(long, default_value_t = 256 * 1024, value_name = "BYTES", env = "C1M_MAX_PENDING_BYTES")]
    max_pending_bytes: usize,

    /// Kernel send buffer per connection (SO_SNDBUF; the kernel doubles it). By default
    /// the kernel autotunes it, and a client that stops reading can then hold up to
    /// net.ipv4.tcp_wmem's maximum (4 MiB by default) before --max-pending-bytes applies.
    #[arg(long, value_name = "BYTES", env = "C1M_SEND_BUFFER")]
    send_buffer: Option<usize>,

    /// What to do with a slow consumer: `disconnect` closes it with 1008; `drop` skips
    /// the messages that do not fit and keeps it (counted in c1m_dropped_messages_total).
    #[arg(
        long,
        value_enum,
        default_value = "disconnect",
        env = "C1M_SLOW_CONSUMER"
    )]
    slow_consumer: SlowConsumerArg,

    /// Ping connections silent for this long (0: never). Clients answer with a pong,
    /// which keeps them alive under --idle-timeout.
    #[arg(long, default_value = "30s", value_parser = parse_duration, env = "C1M_PING_INTERVAL")]
    ping_interval: Duration,

    /// Close connections that sent nothing (not even a pong) for this long (0: never),
    /// which also reaps half-open TCP connections. Checked by one sweep per
    /// --ping-interval, so the actual limit is rounded up to a whole number of sweeps.
    #[arg(long, default_value = "90s", value_parser = parse_duration, env = "C1M_IDLE_TIMEOUT")]
    idle_timeout: Duration,

    /// Key of the publish API: POST /publish and /broadcast need
    /// `Authorization: Bearer KEY`. Without it the API answers 403.
    #[arg(long, value_name = "KEY", env = "C1M_API_KEY", hide_env_values = true)]
    api_key: Option<String>,

    /// Accept upgrades only from these Origins (comma-separated; `*` allows any, and
    /// a request without Origin is refused when this is set). Others get 403.
    #[arg(
        long,
        value_name = "ORIGINS",
        value_delimiter = ',',
        env = "C1M_ALLOWED_ORIGINS"
    )]
    allowed_origins: Option<Vec<String>>,

    /// Require a JWT signed with this HS256 secret, from `?token=` or an
    /// `Authorization: Bearer` header (401 without a valid, unexpired one). A connection
    /// is closed with 4001 when its token expires, unless it sent a fresh one:
    /// `{"op":"refresh","token":"..."}`.
    #[arg(
        long,
        value_name = "SECRET",
        env = "C1M_JWT_SECRET",
        hide_env_values = true,
        conflicts_with = "jwt_public_key"
    )]
    jwt_secret: Option<String>,

    /// Require a JWT signed with the private half of this PEM public key (RSA: RS256,
    /// EC P-256: ES256).
    #[arg(long, value_name = "FILE", env = "C1M_JWT_PUBLIC_KEY")]
    jwt_public_key: Option<std::path::PathBuf>,

    /// When set, a token's `aud` claim must contain this value.
    #[arg(long, value_name = "AUD", env = "C1M_JWT_AUDIENCE")]
    jwt_audience: Option<String>,

    /// The token claim listing the topics a client may join (a JSON array of names);
    /// a token without it may join any topic, one with it only those (else 403).
    #[arg(
        long,
        default_value = "topics",
        value_name = "CLAIM",
        env = "C1M_JWT_TOPICS_CLAIM"
    )]
    jwt_topics_claim: String,

    /// Most topics one connection may be in.
    #[arg(
        long,
        default_value_t = 64,
        value_name = "N",
        env = "C1M_MAX_TOPICS_PER_CONNECTION"
    )]
    max_topics_per_connection: usize,

    /// Serve wss:// (TLS) with this certificate chain (PEM). Needs --tls-key. Send
    /// SIGHUP to re-read both files (new connections use the new certificate).
    #[arg(long, value_name = "FILE", env = "C1M_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,

    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1) of --tls-cert.
    #[arg(long, value_name = "FILE", env = "C1M_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,

    /// TLS handshakes one process runs at once. Past it the process stops accepting
    /// until some finish: new clients wait in the kernel's accept queue (where
    /// --handshake-timeout does not run yet) instead of holding a half-done handshake's
    /// memory here; with workers, the others take them.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..), env = "C1M_MAX_TLS_HANDSHAKES")]
    max_tls_handshakes: u32,

    /// Join a cluster: a NATS (nats://HOST:PORT) or Redis (redis://HOST:PORT) server
    /// through which publishes reach every node's subscribers. One connection per node
    /// (the master holds it); while it is down, clients stay connected, publishes get
    /// 503 and /readyz says not ready, and it reconnects by itself.
    #[arg(long, value_name = "URL", env = "C1M_BROKER", value_parser = c1m_server::BrokerUrl::parse)]
    broker: Option<c1m_server::BrokerUrl>,

    /// Read settings from this TOML file: `key = value` per flag, named like the flag
    /// without dashes in front (e.g. `listen = "0.0.0.0:8088"`, `interval = "1s"`).
    #[arg(long, value_name = "FILE", env = "C1M_CONFIG")]
    config: Option<std::path::PathBuf>,

    /// A client must finish its upgrade request within this time.
    #[arg(long, default_value = "10s", value_parser = parse_positive_duration, env = "C1M_HANDSHAKE_TIMEOUT")]
    handshake_timeout: Duration,

    /// Time between stats lines on stderr.
    #[arg(long, default_value = "10s", value_parser = parse_positive_duration, env = "C1M_STATS_INTERVAL")]
    stats_interval: Duration,

    /// On shutdown, wait this long for clients to answer the close frame.
    #[arg(long, default_value = "3s", value_parser = parse_duration, env = "C1M_CLOSE_TIMEOUT")]
    close_timeout: Duration,

    /// Worker processes: `auto` (default) runs enough for --max-connections under this
    /// process's open-file limit, and at least one per core; 1 runs a single process
    /// with no master.
    #[arg(long, default_value = "auto", value_parser = parse_workers, env = "C1M_WORKERS")]
    workers: Workers,

    /// Most connections the server accepts (over all workers); further upgrades get
    /// HTTP 503 with Retry-After.
    #[arg(long, value_name = "N", env = "C1M_MAX_CONNECTIONS")]
    max_connections: Option<u64>,

    /// Most connections one client address may hold (over every worker process);
    /// upgrades past it get HTTP 429. Off by default: many clients may share an address behind NAT.
    #[arg(long, value_name = "N", env = "C1M_MAX_CONNECTIONS_PER_IP", value_parser = clap::value_parser!(u32).range(1..))]
    max_connections_per_ip: Option<u32>,

    /// Most upgrades the server admits per second, all workers together; past it an
    /// upgrade is answered at once with 503 and a Retry-After of 1 to 5 s (random, so
    /// refused clients come back spread out) instead of waiting in the backlog. For
    /// reconnect storms: after a restart, clients are let in at this pace. Off by default.
    #[arg(long, value_name = "N", env = "C1M_MAX_ACCEPT_RATE", value_parser = clap::value_parser!(u32).range(1..))]
    max_accept_rate: Option<u32>,

    /// Connections a broadcast is written to per turn of the event loop. Between two
    /// slices the process accepts, answers handshakes, pongs and closes, so a long
    /// broadcast never keeps newcomers waiting; every connection still gets messages
    /// in publication order. Smaller: newcomers wait less; larger: slightly less
    /// overhead per broadcast.
    #[arg(long, value_name = "N", default_value_t = 1024, env = "C1M_FANOUT_SLICE", value_parser = clap::value_parser!(u32).range(1..))]
    fanout_slice: u32,

    /// Publications each topic keeps for clients that come back (0, the default: none).
    /// A topic with history gives every publication an offset (1, 2, ...) in an epoch;
    /// `POST /publish` answers with both, `GET /history` lists what is kept, and a
    /// client that subscribes with its last position gets what it missed, or is told
    /// to reload (see docs/server.md, "History and recovery"). The clock's `time` topic
    /// keeps none unless a --history-for rule matches it. With --broker the broker keeps
    /// the history, so positions are the same on every node: a Redis stream per topic,
    /// or a NATS JetStream stream per topic (the server must run with JetStream: -js).
    #[arg(long, value_name = "N", default_value_t = 0, env = "C1M_HISTORY_SIZE")]
    history_size: usize,

    /// How long a publication stays in history; 0 (the default): until --history-size
    /// pushes it out.
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = parse_duration, env = "C1M_HISTORY_TTL")]
    history_ttl: Duration,

    /// History per topic-name pattern, PATTERN=SIZE[/TTL] (`*` matches any characters;
    /// the first matching rule wins over --history-size and --history-ttl), e.g.
    /// `prices.*=100/5m` or `chat.*=0`. Repeat the flag or separate rules with commas.
    #[arg(long, value_name = "PATTERN=SIZE[/TTL]", value_delimiter = ',', value_parser = parse_history_rule, env = "C1M_HISTORY_FOR")]
    history_for: Vec<c1m_server::history::Rule>,

    /// Serve a Pusher Channels app, ID:KEY:SECRET: pusher-js and Laravel Echo clients
    /// connect to ws://HOST/app/KEY, and the `pusher` server SDKs call
    /// /apps/ID/…, signed with SECRET. Repeat the flag (or separate apps with commas)
    /// for several apps: the first app's channels are topics shared with native
    /// clients, the others' are the app's own. Options per app after a `?`:
    /// `client_events=true`, `client_events_per_second=N` (default 10),
    /// `max_connections=N` (the app's quota over the cluster; past it error 4004) and
    /// `webhook=URL` (URL-encoded), e.g.
    /// `2:key2:secret2?client_events=true&webhook=https%3A%2F%2Fapp.example%2Fpusher`.
    /// See docs/server.md, "Pusher protocol".
    #[arg(long, value_name = "ID:KEY:SECRET[?OPTIONS]", value_delimiter = ',', value_parser = c1m_server::pusher::App::parse, env = "C1M_PUSHER_APP")]
    pusher_app: Vec<c1m_server::pusher::App>,

    /// Let Pusher clients of every app send client events (`client-*`, Laravel Echo's
    /// `whisper`) to the other subscribers of their private and presence channels, at
    /// most 10 per second per connection (Pusher's limit). Off by default, as on Pusher:
    /// anyone who may join a channel can then talk on it. (Per app: the app's
    /// `client_events` option.)
    #[arg(long, env = "C1M_PUSHER_CLIENT_EVENTS")]
    pusher_client_events: bool,

    /// Send the Pusher apps' webhooks to URL (http:// or https://), for every app
    /// without a `webhook` option of its own: channel_occupied, channel_vacated,
    /// member_added, member_removed and client_event, each once per cluster, batched
    /// (up to 100 events, 250 ms), signed with the app's secret (X-Pusher-Key,
    /// X-Pusher-Signature), retried with backoff; counted in /metrics.
    #[arg(long, value_name = "URL", value_parser = parse_webhook_url, env = "C1M_PUSHER_WEBHOOK")]
    pusher_webhook: Option<String>,

    /// The most memory topic history may hold, all topics together (payloads plus
    /// bookkeeping); past it the oldest publications of any topic go first, and a topic
    /// left with none starts a new epoch.
    #[arg(long, value_name = "BYTES", default_value_t = 64 << 20, env = "C1M_HISTORY_MAX_BYTES", value_parser = clap::value_parser!(u64).range(1024..))]
    history_max_bytes: u64,

    /// The most publications one recovery sends; a client further behind gets
    /// `"recovered": false` (reason `over_recovery_limit`) and reloads.
    #[arg(long, value_name = "N", default_value_t = 300, env = "C1M_RECOVERY_LIMIT", value_parser = clap::value_parser!(u32).range(1..))]
    recovery_limit: u32,

    #[arg(long, hide = true)]
    worker_index: Option<usize>,
    #[arg(long, hide = true, default_value_t = 1)]
    worker_count: usize,
    #[arg(long, hide = true)]
    listen_fd: Option<i32>,
    #[arg(long, hide = true)]
    control_fd: Option<i32>,
    #[arg(long, hide = true)]
    scoreboard_fd: Option<i32>,

    /// Echo every data message a client sends back to it (for conformance suites such as
    /// Autobahn). Off by default: a push server ignores what clients send.
    #[arg(long, env = "C1M_ECHO")]
    echo: bool,

    /// Accept permessage-deflate (RFC 7692) when a client offers it, always without
    /// context takeover: each message is compressed on its own, so a broadcast is
    /// compressed once for every such client and no connection keeps compressor state.
    /// A requested server window of 9 to 15 bits is honoured; 8 bits is declined.
    #[arg(long, env = "C1M_DEFLATE")]
    deflate: bool,

    /// Set SO_REUSEPORT so several `c1m serve` processes can share one port; the kernel
    /// spreads connections among them by hash. Each process broadcasts on its own clock.
    #[arg(long, env = "C1M_REUSE_PORT")]
    reuse_port: bool,

    /// Test fault: stamp broadcasts this far in the past (checks the bench's latency).
    #[arg(long, hide = true, default_value = "0s", value_parser = parse_duration)]
    fault_stamp_offset: Duration,

    /// Test fault: skip every Nth connection in each broadcast (checks miss detection).
    #[arg(long, hide = true)]
    fault_skip_every: Option<usize>,

    /// Test fault: skip every connection from this address in each broadcast (checks
    /// that a bench worker receiving nothing counts its misses).
    #[arg(long, hide = true)]
    fault_skip_source: Option<std::net::IpAddr>,

    /// Test fault: wait this long between two slices of a broadcast (makes a broadcast
    /// long enough for a test to act during it).
    #[arg(long, hide = true, value_parser = parse_duration)]
    fault_slice_pause: Option<Duration>,
}

#[derive(Clone, Copy, Debug)]
enum Workers {
    Auto,
    Count(usize),
}

fn parse_workers(text: &str) -> Result<Workers, String> {
    match text {
        "auto" => Ok(Workers::Auto),
        n => match n.parse::<usize>() {
            Ok(0) | Err(_) => Err("expected `auto` or a number of processes ≥ 1".into()),
            Ok(n) => Ok(Workers::Count(n)),
        },
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum SlowConsumerArg {
    /// Close the connection with 1008 (policy violation).
    Disconnect,
    /// Skip messages that do not fit; keep the connection.
    Drop,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum PrecisionArg {
    /// Milliseconds since the Unix epoch.
    Ms,
    /// Microseconds since the Unix epoch.
    Us,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let off_if_zero = |d: Duration| (!d.is_zero()).then_some(d);
    let ping_interval = off_if_zero(args.ping_interval);
    let idle_timeout = off_if_zero(args.idle_timeout);
    if let (Some(ping), Some(idle)) = (ping_interval, idle_timeout) {
        if idle <= ping {
            anyhow::bail!(
                "--idle-timeout ({}) must be longer than --ping-interval ({}), or clients are closed before they can answer a ping",
                humantime::format_duration(idle),
                humantime::format_duration(ping)
            );
        }
        if idle > ping * 250 {
            anyhow::bail!("--idle-timeout may be at most 250 × --ping-interval");
        }
    }
    if args.max_topics_per_connection == 0 {
        anyhow::bail!("--max-topics-per-connection must be at least 1");
    }
    if args.pusher_app.len() > c1m_server::connection::MAX_PUSHER_APPS {
        anyhow::bail!(
            "at most {} --pusher-app per server",
            c1m_server::connection::MAX_PUSHER_APPS
        );
    }
    for (i, app) in args.pusher_app.iter().enumerate() {
        let twin = |other: &c1m_server::pusher::App| other.id == app.id || other.key == app.key;
        if args.pusher_app[..i].iter().any(twin) {
            anyhow::bail!(
                "two --pusher-app share the id {:?} or the key {:?}",
                app.id,
                app.key
            );
        }
    }
    if args.pusher_webhook.is_some() && args.pusher_app.is_empty() {
        anyhow::bail!("--pusher-webhook needs a --pusher-app (whose secret signs the webhooks)");
    }
    if args.api_key.as_deref() == Some("") {
        anyhow::bail!(
            "--api-key is empty: give a key, or leave the flag out to turn the publish API off"
        );
    }
    let jwt = match (&args.jwt_secret, &args.jwt_public_key) {
        (Some(secret), _) => Some(JwtKey::Secret(secret.clone())),
        (None, Some(path)) => Some(JwtKey::PublicKeyFile(path.clone())),
        (None, None) => None,
    }
    .map(|key| JwtConfig {
        key,
        audience: args.jwt_audience.clone(),
        topics_claim: args.jwt_topics_claim.clone(),
    });
    let nofile = crate::tune::nofile().0;
    // Leave room under the open-file limit for the listener, logs and the like.
    let max_sockets = nofile.saturating_sub(200).max(100) as usize;
    let config = ServeConfig {
        listen: args.listen,
        delay: args.delay,
        interval: args.interval,
        total: args.total,
        connect_only: args.connect_only,
        precision: match args.precision {
            PrecisionArg::Ms => Precision::Millis,
            PrecisionArg::Us => Precision::Micros,
        },
        max_message_size: args.max_message_size,
        max_pending_bytes: args.max_pending_bytes,
        send_buffer: args.send_buffer,
        slow_consumer: match args.slow_consumer {
            SlowConsumerArg::Disconnect => SlowConsumerPolicy::Disconnect,
            SlowConsumerArg::Drop => SlowConsumerPolicy::Drop,
        },
        ping_interval,
        idle_timeout,
        api_key: args.api_key.clone(),
        allowed_origins: args.allowed_origins.clone(),
        jwt,
        max_topics_per_connection: args.max_topics_per_connection,
        broker: args.broker.clone(),
        tls: match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => Some(c1m_server::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => None,
        },
        handshake_timeout: args.handshake_timeout,
        max_tls_handshakes: args.max_tls_handshakes as usize,
        close_timeout: args.close_timeout,
        stats_interval: args.stats_interval,
        reuse_port: args.reuse_port,
        max_connections: args.max_connections,
        max_connections_per_ip: args.max_connections_per_ip,
        max_accept_rate: args.max_accept_rate,
        echo: args.echo,
        deflate: args.deflate,
        max_sockets,
        fanout_slice: args.fanout_slice as usize,
        history: c1m_server::history::Policy {
            default: c1m_server::history::Limits {
                size: args.history_size,
                ttl: off_if_zero(args.history_ttl),
            },
            rules: args.history_for.clone(),
            max_bytes: usize::try_from(args.history_max_bytes).unwrap_or(usize::MAX),
            recovery_limit: args.recovery_limit as usize,
        },
        pusher_apps: args
            .pusher_app
            .iter()
            .map(|app| c1m_server::pusher::App {
                client_events: app.client_events || args.pusher_client_events,
                webhook: app.webhook.clone().or_else(|| args.pusher_webhook.clone()),
                ..app.clone()
            })
            .collect(),
        faults: Faults {
            stamp_offset: args.fault_stamp_offset,
            skip_every: args.fault_skip_every.filter(|&n| n > 0),
            skip_source: args.fault_skip_source,
            slice_pause: args.fault_slice_pause,
        },
        ..ServeConfig::default()
    };
    if let Some(index) = args.worker_index {
        return run_worker(config, &args, index);
    }
    let workers = match args.workers {
        Workers::Count(n) => n,
        Workers::Auto => {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            let needed = args
                .max_connections
                .map_or(1, |max| max.div_ceil(max_sockets as u64) as usize);
            cores.max(needed)
        }
    };
    let print_address = |addr: SocketAddr| {
        // Machine-readable: scripts and tests read the port from this line.
        let mut stdout = std::io::stdout();
        let _ = writeln!(stdout, "listening on {addr}");
        let _ = stdout.flush();
    };
    if workers == 1 {
        return c1m_server::run(config, print_address).context("c1m serve");
    }
    c1m_server::master::run_master(config, workers, spawn_worker, print_address)
        .context("c1m serve")
}

/// Re-executes this binary as worker `fds.index`, with the same flags as the master plus
/// the hidden worker flags, inheriting the listener, control and scoreboard descriptors.
fn spawn_worker(fds: WorkerFds) -> std::io::Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe()?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(std::env::args_os().skip(1))
        .args(["--worker-index", &fds.index.to_string()])
        .args(["--worker-count", &fds.count.to_string()])
        .args(["--listen-fd", &fds.listen_fd.to_string()])
        .args(["--control-fd", &fds.control_fd.to_string()])
        .args(["--scoreboard-fd", &fds.scoreboard_fd.to_string()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    let inherited = [fds.listen_fd, fds.control_fd, fds.scoreboard_fd];
    // SAFETY: runs in the forked child before exec, calling only fcntl (async-signal-safe)
    // to clear close-on-exec on the three descriptors the worker must inherit.
    unsafe {
        cmd.pre_exec(move || {
            for fd in inherited {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// Moves the control channel to the highest descriptor this process may hold. When a
/// worker dies the kernel releases its files last-opened-slot first (each final release
/// is queued as task work, which runs last in, first out), so on the highest slot the
/// channel closes before the clients' sockets do, and the master stops counting the dead
/// worker's connections before those clients come back to the other workers (see
/// `master::workers::WorkerProcess::take_hang_up`). Where that fails it stays where it is.
fn to_highest_descriptor(
    control: std::os::unix::net::UnixStream,
) -> std::os::unix::net::UnixStream {
    use std::os::fd::{AsRawFd, FromRawFd};
    let highest = crate::tune::nofile()
        .0
        .saturating_sub(1)
        .min(i32::MAX as u64) as i32;
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) on a descriptor `control` owns; on success the new
    // descriptor is ours alone, and dropping `control` closes the old one.
    let fd = unsafe { libc::fcntl(control.as_raw_fd(), libc::F_DUPFD_CLOEXEC, highest) };
    if fd < 0 {
        return control;
    }
    // SAFETY: `fd` was just created by fcntl and nothing else owns it.
    unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) }
}

fn run_worker(config: ServeConfig, args: &ServeArgs, index: usize) -> anyhow::Result<()> {
    use std::os::fd::FromRawFd;
    let (Some(listen_fd), Some(control_fd), Some(scoreboard_fd)) =
        (args.listen_fd, args.control_fd, args.scoreboard_fd)
    else {
        anyhow::bail!(
            "--worker-index is internal: it needs --listen-fd, --control-fd and --scoreboard-fd"
        );
    };
    // SAFETY: the master passed these descriptors to this process for exactly these
    // roles (see spawn_worker), and nothing else here owns them.
    let (listener, control, scoreboard) = unsafe {
        (
            std::net::TcpListener::from_raw_fd(listen_fd),
            std::os::unix::net::UnixStream::from_raw_fd(control_fd),
            Scoreboard::from_fd(scoreboard_fd, args.worker_count)
                .context("mapping the scoreboard")?,
        )
    };
    let role = WorkerRole {
        index,
        scoreboard,
        control: to_highest_descriptor(control),
    };
    c1m_server::run_worker(config, listener, role)
        .with_context(|| format!("c1m serve worker {index}"))
}

/// `PATTERN=SIZE[/TTL]` of `--history-for`.
fn parse_history_rule(text: &str) -> Result<c1m_server::history::Rule, String> {
    let (pattern, limits) = text.split_once('=').ok_or_else(|| {
        format!("expected PATTERN=SIZE[/TTL], e.g. prices.*=100/5m, not {text:?}")
    })?;
    if pattern.is_empty() {
        return Err(format!(
            "{text:?}: the pattern is empty (use * for every topic)"
        ));
    }
    let (size, ttl) = match limits.split_once('/') {
        Some((size, ttl)) => (size, Some(parse_duration(ttl)?)),
        None => (limits, None),
    };
    let size = size.parse().map_err(|_| {
        format!("{text:?}: SIZE must be a whole number of publications, not {size:?}")
    })?;
    Ok(c1m_server::history::Rule {
        pattern: pattern.to_string(),
        limits: c1m_server::history::Limits {
            size,
            ttl: ttl.filter(|d| !d.is_zero()),
        },
    })
}

fn parse_webhook_url(url: &str) -> Result<String, String> {
    c1m_server::webhooks::check_url(url).map(|()| url.to_string())
}

#[cfg(test)]
mod history_rule_tests {
    use super::*;

    #[test]
    fn rules_parse_with_and_without_an_age() {
        let rule = parse_history_rule("prices.*=100/5m").unwrap();
        assert_eq!(rule.pattern, "prices.*");
        assert_eq!(rule.limits.size, 100);
        assert_eq!(rule.limits.ttl, Some(Duration::from_secs(300)));
        assert_eq!(parse_history_rule("chat=0").unwrap().limits.ttl, None);
        for bad in ["prices", "=5", "a=x", "a=5/forever", "a=-1"] {
            assert!(parse_history_rule(bad).is_err(), "{bad}");
        }
    }
}
