use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use weatherstream::{chart, config};

/// Draws month.svg: the average max temperature of the latest recorded
/// January, February and March, read from every partition-N.json in the
/// files folder. Missing partition files are fine; unreadable ones are
/// skipped with a warning.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    log: config::LogArgs,
    #[command(flatten)]
    generate: config::GenerateArgs,
    /// Folder of partition-N.json; month.svg is written there
    #[arg(long = "files", env = "FILES_DIR", default_value = "files")]
    files_dir: PathBuf,
}

fn main() -> ExitCode {
    let args: Args = config::parse();
    config::init_logging(args.log.log_format);
    let result = chart::render_files(&args.files_dir).map(|report| {
        for (path, reason) in &report.skipped {
            log::warn!("skipped {}: {reason}", path.display());
        }
        let bars: Vec<String> = report.bars.iter().map(|b| b.to_string()).collect();
        println!(
            "wrote {} from {} partition file(s): {}",
            report.path.display(),
            report.files_read,
            if bars.is_empty() {
                "no data yet".to_string()
            } else {
                bars.join(", ")
            }
        );
    });
    config::finish("plot", result)
}
