//! `c1m report`: work with saved `--json` results.

use std::path::PathBuf;

use anyhow::{bail, Context};
use c1m_bench::report::{console, BenchResult};
use clap::{Args, Subcommand};

#[derive(Args, Debug)]
pub struct ReportArgs {
    #[command(subcommand)]
    command: ReportCommand,
}

#[derive(Subcommand, Debug)]
enum ReportCommand {
    /// Merge results of benches run side by side (e.g. on several client machines) into
    /// one report: counts and histograms add up exactly, rounds match by timestamp.
    Merge {
        /// `--json` files written by `c1m bench`.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Also write the merged result as JSON to FILE.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
    },
}

pub fn run(args: ReportArgs) -> anyhow::Result<()> {
    match args.command {
        ReportCommand::Merge { files, json } => {
            let mut results = Vec::new();
            for file in &files {
                let text = std::fs::read_to_string(file)
                    .with_context(|| format!("reading {}", file.display()))?;
                let result: BenchResult = serde_json::from_str(&text)
                    .with_context(|| format!("{} is not a c1m bench result", file.display()))?;
                results.push(result);
            }
            let Some(merged) = BenchResult::merge(&results) else {
                bail!("nothing to merge");
            };
            print!(
                "{}",
                console(
                    &merged,
                    &format!("c1m report: {} results merged", results.len())
                )
            );
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_string_pretty(&merged)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            Ok(())
        }
    }
}
