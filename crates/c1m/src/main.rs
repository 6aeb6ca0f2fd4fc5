//! `c1m`: a WebSocket push server and load generator built to hold a million
//! connections on one machine. This binary is thin glue: it parses the command line,
//! sets up logging, and hands a typed config to the library crates.

mod bench;
mod cli;
mod config_file;
mod demo;
mod report;
mod serve;
mod tune;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "c1m",
    version,
    about = "A WebSocket push server and load generator built to hold a million connections",
    long_about = "c1m is a WebSocket push server (`c1m serve`) and the instrument that measures it \
(`c1m bench`). The server pushes its clock to every connection at a fixed interval, as in the \
classic C1000K experiment, from one lean event loop per worker."
)]
struct Cli {
    /// Log format on stderr: `text` for people, `json` (one object per line) for log
    /// collectors. `RUST_LOG` picks the level (info by default).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "C1M_LOG_FORMAT"
    )]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run a server and a bench together locally and report (the quick start).
    Demo(demo::DemoArgs),
    /// Run the push server.
    Serve(Box<serve::ServeArgs>),
    /// Open many WebSocket connections, measure every message, report.
    Bench(bench::BenchArgs),
    /// Work with saved bench results (merge results from several machines).
    Report(report::ReportArgs),
    /// Check (and with --apply, fix) the OS limits for a number of connections.
    Tune(tune::TuneArgs),
}

fn main() -> std::process::ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let loaded = match config_file::load_for(&args) {
        Ok(loaded) => loaded,
        Err(error) => {
            eprintln!("c1m: error: {error:#}");
            return std::process::ExitCode::from(2);
        }
    };
    let cli = match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(error) => {
            let explained = loaded
                .as_ref()
                .and_then(|l| config_file::explain(l, &error.render().to_string()));
            match explained {
                Some(message) => {
                    eprintln!("c1m: error: {message}");
                    return std::process::ExitCode::from(2);
                }
                None => error.exit(),
            }
        }
    };
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Serve(args) => serve::run(*args),
        Command::Bench(args) => bench::run(args),
        Command::Report(args) => report::run(args),
        Command::Tune(args) => tune::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("c1m: error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr; `RUST_LOG` (e.g. `RUST_LOG=debug`) picks the level, `info` by default.
fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder.json().init(),
    }
}
