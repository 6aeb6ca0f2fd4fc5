//! `c1m report`: work with saved `--json` results.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use c1m_bench::html::{render, Labelled, ServerCost};
use c1m_bench::report::{console, BenchResult};
use c1m_bench::summary::Summary;
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
    /// Print the headline numbers of each result as one JSON object per line:
    /// established, errors, setup rate, latency p50/p99/p99.9/max, fan-out p50/max,
    /// missed (times in ms). For scripts (bench/compare reads it).
    Summary {
        /// `--json` files written by `c1m bench`.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Draw one or more results as a self-contained HTML page (inline SVG, no script,
    /// no network): latency by percentile, setup ramp, message rate, fan-out per round,
    /// and comparison bars when given several.
    ///
    /// Each result is labelled with its file name without `.json`, or with LABEL when
    /// given as LABEL=FILE (e.g. `c1m report html c1m=a.json node-ws=b.json -o r.html`).
    Html {
        /// `--json` files written by `c1m bench` (or `c1m report merge`), as FILE or
        /// LABEL=FILE.
        #[arg(required = true, value_name = "[LABEL=]FILE")]
        files: Vec<String>,
        /// Where to write the page.
        #[arg(short, long, value_name = "FILE")]
        output: PathBuf,
        /// The page's title.
        #[arg(long, default_value = "c1m bench report")]
        title: String,
        /// Also chart what each server cost: a JSON object from label to
        /// `{"memory_per_connection_bytes": B, "cpu_seconds": S}` (bench/compare writes it).
        #[arg(long, value_name = "FILE")]
        server_costs: Option<PathBuf>,
    },
}

/// Reads a `c1m bench --json` result.
fn read_result(file: &Path) -> anyhow::Result<BenchResult> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not a c1m bench result", file.display()))
}

pub fn run(args: ReportArgs) -> anyhow::Result<()> {
    match args.command {
        ReportCommand::Merge { files, json } => {
            let results = files
                .iter()
                .map(|f| read_result(f))
                .collect::<anyhow::Result<Vec<_>>>()?;
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
        ReportCommand::Summary { files } => {
            for file in &files {
                let summary = Summary::of(&read_result(file)?);
                let mut line = serde_json::to_value(&summary)?;
                line["file"] = file.display().to_string().into();
                println!("{line}");
            }
            Ok(())
        }
        ReportCommand::Html {
            files,
            output,
            title,
            server_costs,
        } => {
            let mut costs: BTreeMap<String, ServerCost> = match &server_costs {
                None => BTreeMap::new(),
                Some(path) => {
                    let text = std::fs::read_to_string(path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    serde_json::from_str(&text).with_context(|| {
                        format!(
                            "{}: expected {{\"LABEL\": {{\"memory_per_connection_bytes\": B, \"cpu_seconds\": S}}}}",
                            path.display()
                        )
                    })?
                }
            };
            let mut results = Vec::new();
            for arg in &files {
                let (label, file) = match arg.split_once('=') {
                    Some((label, file)) if !label.is_empty() => (label.to_string(), file),
                    _ => {
                        let stem = Path::new(arg).file_stem().unwrap_or_default();
                        (stem.to_string_lossy().into_owned(), arg.as_str())
                    }
                };
                results.push((label, read_result(Path::new(file))?));
            }
            let labelled: Vec<Labelled> = results
                .iter()
                .map(|(label, result)| Labelled {
                    label: label.clone(),
                    result,
                    server: costs.remove(label),
                })
                .collect();
            if let Some(label) = costs.keys().next() {
                bail!("--server-costs names {label:?}, which is not the label of any result");
            }
            std::fs::write(&output, render(&labelled, &title))
                .with_context(|| format!("writing {}", output.display()))?;
            eprintln!("wrote {}", output.display());
            Ok(())
        }
    }
}
