//! Writes the ModelForwarder CRD generated from the Rust types.
//!
//! `crdgen` prints it; `crdgen --write` updates `crds/modelforwarder.yaml`
//! and the chart's copy; `crdgen --check` fails when either is stale.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let yaml = match operator::crdgen::render() {
        Ok(yaml) => yaml,
        Err(e) => {
            eprintln!("crdgen: {e}");
            return ExitCode::FAILURE;
        }
    };
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let path = dir.join(operator::crdgen::COMMITTED_PATH);
    let chart = dir.join(operator::crdgen::CHART_PATH);
    match std::env::args().nth(1).as_deref() {
        None => {
            print!("{yaml}");
            ExitCode::SUCCESS
        }
        Some("--write") => {
            for p in [&path, &chart] {
                if let Err(e) = std::fs::write(p, &yaml) {
                    eprintln!("crdgen: {}: {e}", p.display());
                    return ExitCode::FAILURE;
                }
                eprintln!("wrote {}", p.display());
            }
            ExitCode::SUCCESS
        }
        Some("--check")
            if std::fs::read_to_string(&chart).ok().as_deref() != Some(yaml.as_str()) =>
        {
            eprintln!(
                "{} is stale: run `cargo run -p operator --bin crdgen -- --write`",
                chart.display()
            );
            ExitCode::FAILURE
        }
        Some("--check") => match std::fs::read_to_string(&path) {
            Ok(committed) if committed == yaml => ExitCode::SUCCESS,
            Ok(_) => {
                eprintln!(
                    "{} is stale: run `cargo run -p operator --bin crdgen -- --write`",
                    path.display()
                );
                ExitCode::FAILURE
            }
            Err(e) => {
                eprintln!("crdgen: {}: {e}", path.display());
                ExitCode::FAILURE
            }
        },
        Some(other) => {
            eprintln!("usage: crdgen [--write | --check] (got {other:?})");
            ExitCode::FAILURE
        }
    }
}
