//! The Lever API simulator as a program, for the demo and for trying the connector by hand.
//!
//! Serves the recorded sandbox records plus generated volume on 127.0.0.1, with Lever's rate
//! limit on by default. `GET /_sim/counts?start=<ms>` gives the truth's row counts and
//! `GET /_sim/stats` the requests served per endpoint.

use clap::Parser;
use lever_sim::server::{SimConfig, Simulator, LEVER_BURST, LEVER_RATE};
use lever_sim::world::{Volume, World};
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(name = "lever-sim", about = "A local simulator of the Lever Data API v1")]
struct Args {
    /// Port on 127.0.0.1 (0 picks a free one; the address is printed).
    #[arg(long, default_value_t = 8089)]
    port: u16,
    /// The API key clients must send (HTTP Basic user name).
    #[arg(long, env = "LEVER_SIM_API_KEY", default_value = "sim-api-key")]
    api_key: String,
    /// Generated opportunities on top of the recorded ones.
    #[arg(long, default_value_t = 500)]
    opportunities: usize,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Requests per second allowed (Lever: 10). 0 turns the limit off.
    #[arg(long, default_value_t = LEVER_RATE)]
    rate: f64,
    #[arg(long, default_value_t = LEVER_BURST)]
    burst: f64,
    /// Milliseconds added to every response.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Send Retry-After with 429 answers.
    #[arg(long)]
    retry_after: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_writer(std::io::stderr).init();
    let a = Args::parse();
    let world = World::generated(&Volume::new(a.opportunities, a.seed));
    let cfg = SimConfig {
        api_key: a.api_key,
        rate: (a.rate > 0.0).then_some((a.rate, a.burst)),
        retry_after: a.retry_after,
        latency: Duration::from_millis(a.latency_ms),
        ..SimConfig::default()
    };
    let sim = Simulator::start_on(world, cfg, a.port).await?;
    println!("lever-sim listening on {}", sim.base_url());
    tokio::signal::ctrl_c().await?;
    Ok(())
}
