//! A small load generator for the bench script: the same closed-loop
//! workload over HTTP, WebSocket and gRPC (so the three are compared with
//! equal client cost), and a mode that holds many idle WebSocket connections.
//!
//!   cargo run --release -p forwarder --example loadgen -- \
//!       load --protocol ws --target 127.0.0.1:8080 --concurrency 64 --duration 10s
//!   cargo run --release -p forwarder --example loadgen -- \
//!       idle-ws --target 127.0.0.1:8080 --connections 10000 --hold 10s
//!
//! Traffic goes only where --target points; runs are bounded by --duration.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use forwarder::frontends::grpc::pb::forwarder_client::ForwarderClient;
use forwarder::frontends::grpc::pb::ForwardRequest;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Closed loop: each worker sends a request, waits for the answer, repeats.
    Load {
        #[arg(long, value_enum)]
        protocol: Proto,
        /// host:port of the HTTP listener (or the gRPC one for --protocol grpc).
        #[arg(long)]
        target: String,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        #[arg(long, default_value = "mock")]
        model: String,
    },
    /// Opens N WebSocket connections, holds them idle, then closes them.
    IdleWs {
        #[arg(long)]
        target: String,
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        hold: Duration,
        /// Print a line when every connection is open (the bench script
        /// samples the forwarder's RSS then).
        #[arg(long)]
        ready_file: Option<std::path::PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum, Debug)]
enum Proto {
    Http,
    Ws,
    Grpc,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    forwarder::install_crypto_provider();
    match Cli::parse().cmd {
        Cmd::Load {
            protocol,
            target,
            concurrency,
            duration,
            model,
        } => load(protocol, &target, concurrency, duration, &model).await,
        Cmd::IdleWs {
            target,
            connections,
            hold,
            ready_file,
        } => idle_ws(&target, connections, hold, ready_file).await,
    }
}

struct Totals {
    ok: AtomicU64,
    errors: AtomicU64,
}

async fn load(
    protocol: Proto,
    target: &str,
    concurrency: usize,
    duration: Duration,
    model: &str,
) -> anyhow::Result<()> {
    if !target.starts_with("127.0.0.1:") && !target.starts_with("localhost:") {
        bail!("loadgen only targets loopback addresses");
    }
    let totals = Arc::new(Totals {
        ok: AtomicU64::new(0),
        errors: AtomicU64::new(0),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..concurrency {
        let (target, model, totals, stop) = (
            target.to_string(),
            model.to_string(),
            totals.clone(),
            stop.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3).expect("histogram");
            let result = worker(protocol, &target, &model, w, &stop, &totals, &mut hist).await;
            if let Err(e) = result {
                eprintln!("worker {w}: {e:#}");
            }
            hist
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Histogram::<u64>::new(3)?;
    for w in workers {
        all.add(w.await?)?;
    }
    let secs = started.elapsed().as_secs_f64();
    let ok = totals.ok.load(Ordering::Relaxed);
    let errors = totals.errors.load(Ordering::Relaxed);
    println!(
        "protocol={protocol:?} concurrency={concurrency} requests={ok} errors={errors} rps={:.0} p50_ms={:.3} p99_ms={:.3} max_ms={:.3}",
        ok as f64 / secs,
        all.value_at_quantile(0.5) as f64 / 1000.0,
        all.value_at_quantile(0.99) as f64 / 1000.0,
        all.max() as f64 / 1000.0,
    );
    Ok(())
}

/// Records one answer's latency in microseconds.
fn record(hist: &mut Histogram<u64>, totals: &Totals, started: Instant, ok: bool) {
    if ok {
        let _ = hist.record(started.elapsed().as_micros() as u64);
        totals.ok.fetch_add(1, Ordering::Relaxed);
    } else {
        totals.errors.fetch_add(1, Ordering::Relaxed);
    }
}

async fn worker(
    protocol: Proto,
    target: &str,
    model: &str,
    w: usize,
    stop: &AtomicBool,
    totals: &Totals,
    hist: &mut Histogram<u64>,
) -> anyhow::Result<()> {
    let body = json!({"model": model, "messages": [{"role": "user", "content": "hello"}]});
    match protocol {
        Proto::Http => {
            let client = reqwest::Client::new();
            let url = format!("http://{target}/v1/chat/completions");
            let bytes = serde_json::to_vec(&body)?;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let r = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(bytes.clone())
                    .send()
                    .await;
                let ok = match r {
                    Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
                    _ => false,
                };
                record(hist, totals, t, ok);
            }
        }
        Proto::Ws => {
            let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{target}/api/v1/ws"))
                .await
                .context("websocket connect")?;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let id = format!("{w}-{n}");
                let frame = json!({"type": "request", "id": id, "model": model, "prompt": "hello"});
                let t = Instant::now();
                ws.send(Message::Text(frame.to_string().into())).await?;
                let ok = loop {
                    match ws.next().await {
                        Some(Ok(Message::Text(text))) => {
                            let v: Value = serde_json::from_str(&text)?;
                            if v["id"] == id.as_str() {
                                break v["type"] == "done";
                            }
                        }
                        Some(Ok(_)) => continue,
                        _ => bail!("websocket closed"),
                    }
                };
                record(hist, totals, t, ok);
            }
        }
        Proto::Grpc => {
            let mut client = ForwarderClient::connect(format!("http://{target}")).await?;
            while !stop.load(Ordering::Relaxed) {
                let req = ForwardRequest {
                    model_id: model.into(),
                    prompt: "hello".into(),
                    ..Default::default()
                };
                let t = Instant::now();
                let ok = client.forward(req).await.is_ok();
                record(hist, totals, t, ok);
            }
        }
    }
    Ok(())
}

async fn idle_ws(
    target: &str,
    connections: usize,
    hold: Duration,
    ready_file: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    if !target.starts_with("127.0.0.1:") {
        bail!("loadgen only targets loopback addresses");
    }
    let started = Instant::now();
    let mut open = Vec::with_capacity(connections);
    // Connect in batches so the listen backlog is never overrun.
    for chunk in (0..connections).collect::<Vec<_>>().chunks(500) {
        let batch = chunk
            .iter()
            .map(|_| tokio_tungstenite::connect_async(format!("ws://{target}/api/v1/ws")));
        for r in futures::future::join_all(batch).await {
            open.push(r.context("websocket connect")?.0);
        }
    }
    println!(
        "idle_ws connections={} connect_secs={:.2}",
        open.len(),
        started.elapsed().as_secs_f64()
    );
    if let Some(f) = ready_file {
        std::fs::write(f, "ready\n")?;
    }
    // Hold them, answering the server's pings (tungstenite does on read).
    let deadline = tokio::time::Instant::now() + hold;
    let readers: Vec<_> = open
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                while let Ok(Some(Ok(_))) = tokio::time::timeout_at(deadline, ws.next()).await {}
                let _ = ws.close(None).await;
            })
        })
        .collect();
    for r in readers {
        let _ = r.await;
    }
    Ok(())
}
