//! Runs the autoscaling loop locally (real Prometheus, forwarder processes,
//! mock upstream, load steps), prints the timeline and writes a plot.
//!
//!   cargo run -p e2e --bin autoscale-demo -- [--stretch 2] [--out docs/autoscale-demo.svg]

use std::path::PathBuf;

use e2e::local::{plot, presets, scenario};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let stretch: u32 = arg("--stretch").map_or(Ok(1), |v| v.parse())?;
    let out = PathBuf::from(arg("--out").unwrap_or_else(|| "docs/autoscale-demo.svg".into()));
    let s = presets::standard(stretch);
    let slo = s.policy.p99_slo_ms;
    let samples = scenario::run(s, |s| println!("{}", scenario::format_sample(s))).await?;
    plot::svg(&samples, slo, &out)?;
    println!("plot written to {}", out.display());
    Ok(())
}
