//! Writes the ModelForwarder CRD generated from the Rust types.
//!
//! `crdgen` prints it; `crdgen --write` updates `crds/modelforwarder.yaml`;
//! `crdgen --check` fails when that file is stale.

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
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(operator::crdgen::COMMITTED_PATH);
    match std::env::args().nth(1).as_deref() {
        None => {
            print!("{yaml}");
            ExitCode::SUCCESS
        }
        Some("--write") => match std::fs::write(&path, yaml) {
            Ok(()) => {
                eprintln!("wrote {}", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("crdgen: {}: {e}", path.display());
                ExitCode::FAILURE
            }
        },
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
