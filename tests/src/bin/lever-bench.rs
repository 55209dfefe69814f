//! `lever-bench`: how close a sync comes to what Lever's rate limit allows.
//!
//! Serves a generated account from the simulator (its rate limit scaled up so a large account
//! takes minutes, with a per-request latency), runs `lever-sync sync` into the BigQuery emulator
//! as a separate process, then changes a share of the opportunities and runs it again. For each
//! run it prints the requests per endpoint against the fewest the API allows for the same data,
//! the rate achieved against the rate allowed, 429s, wall and CPU time, peak memory and rows
//! written, checks every table against the simulator's truth, and writes the numbers as JSON.
//! It never passes or fails on time: the numbers are for reading.
//!
//! With `--lambda` each run goes through the Lambda chains instead: `dispatch` starts one chain
//! per table through a local invoke endpoint, and each table's steps run in a container of their
//! own (its own client and pace), as on AWS; the rate figure is then the tables' combined one.

use anyhow::{bail, Context};
use clap::Parser;
use lever_sim::harness::{assert_dataset_matches, duplicate_ids, syncer_for, unique_dataset, ALL_TABLES, START_MS};
use lever_sim::lambda::LocalLambda;
use lever_sim::server::{EndpointStats, SimConfig, Simulator};
use lever_sim::world::{Volume, World};
use lever_sync::aws::{local_sdk_config, LambdaInvoker};
use lever_sync::chain::{self, ChainApp, ChainLimits};
use lever_sync::config::{Config, RawConfig};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

const CHILD_ENDPOINTS: [&str; 4] = ["interviews", "notes", "offers", "referrals"];

#[derive(Parser, Debug)]
#[command(
    name = "lever-bench",
    about = "Benchmark a Lever → BigQuery sync against the simulator"
)]
struct Args {
    /// Generated opportunities (each with an application and child records).
    #[arg(long, default_value_t = 5000)]
    opportunities: usize,
    /// The simulator's rate limit in requests/second (Lever's is 10; scaled up so the bench
    /// takes minutes). The client is told the same ceiling.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Milliseconds every simulated response takes.
    #[arg(long, default_value_t = 150)]
    latency_ms: u64,
    /// Percent of opportunities changed before the incremental run.
    #[arg(long, default_value_t = 1.0)]
    changed_percent: f64,
    /// How child tables are kept: `full` (exact full refresh each run) or `sweep`.
    #[arg(long, default_value = "full")]
    children: String,
    /// The `lever-sync` program to run.
    #[arg(long, default_value = "target/release/lever-sync")]
    sync_bin: String,
    /// Where the JSON goes.
    #[arg(long, default_value = "bench-results.json")]
    out: String,
    #[arg(long, default_value_t = 11)]
    seed: u64,
    /// Run each sync as the Lambda chains (one container per table) rather than `lever-sync`.
    /// CPU time and peak memory are then not measured: the chains share this process.
    #[arg(long)]
    lambda: bool,
}

/// What one run of `lever-sync` cost.
struct Measured {
    name: &'static str,
    served: BTreeMap<String, EndpointStats>,
    minimal: BTreeMap<String, u64>,
    report: Value,
    wall: f64,
    rows: i64,
}

impl Measured {
    fn requests(&self) -> u64 {
        self.served.values().map(|s| s.requests).sum()
    }
    fn throttled(&self) -> u64 {
        self.served.values().map(|s| s.throttled).sum()
    }
    fn minimal_total(&self) -> u64 {
        self.minimal.values().sum()
    }
}

fn pages(records: usize) -> u64 {
    (records as u64).div_ceil(100).max(1)
}

/// The fewest requests that read the same data: one page per 100 opportunities read (with their
/// applications), one request per opportunity whose children are read for each child endpoint,
/// the user pages, and for a later run the page of deletions.
fn minimal_requests(world: &World, reread: usize, children_of: usize, later: bool) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    m.insert("opportunities+applications".to_owned(), pages(reread));
    if later {
        m.insert("deleted".to_owned(), 1);
    }
    for c in CHILD_ENDPOINTS {
        m.insert(c.to_owned(), children_of as u64);
    }
    m.insert("users".to_owned(), pages(world.users.len()));
    m
}

async fn run_sync(
    args: &Args,
    sim: &Simulator,
    env: &[(String, String)],
    name: &'static str,
) -> anyhow::Result<Measured> {
    sim.reset_stats();
    let report_path = std::env::temp_dir().join(format!("lever-bench-{}-{name}.json", std::process::id()));
    let started = Instant::now();
    let out = Command::new(&args.sync_bin)
        .arg("sync")
        .arg("--report")
        .arg(&report_path)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("RUST_LOG", "warn")
        .output()
        .with_context(|| format!("cannot run {}", args.sync_bin))?;
    let wall = started.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "lever-sync sync failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let report: Value = serde_json::from_slice(&std::fs::read(&report_path).context("the sync's report")?)?;
    let _ = std::fs::remove_file(&report_path);
    let rows = report["tables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["rows"].as_i64())
        .sum();
    Ok(Measured {
        name,
        served: sim.stats(),
        minimal: BTreeMap::new(),
        report,
        wall,
        rows,
    })
}

/// One sync through the Lambda chains: a scheduled tick to `dispatch`, then every chain's
/// self-invocations through a local invoke endpoint until none is left.
async fn run_chains(cfg: &Config, sim: &Simulator, name: &'static str) -> anyhow::Result<Measured> {
    let lambda = LocalLambda::start().await?;
    let app = ChainApp {
        syncer: syncer_for(cfg.clone(), "dispatch").await.map_err(anyhow::Error::msg)?,
        invoker: Arc::new(LambdaInvoker::new(&local_sdk_config(&lambda.url))),
        function: "sync-table".into(),
        limits: ChainLimits::default(),
    };
    lambda.serve(app.clone());
    lambda.serve_each_table_apart(&app).await.map_err(anyhow::Error::msg)?;
    app.syncer.setup().await?;
    sim.reset_stats();
    let started = Instant::now();
    chain::dispatch(&app, &json!({"action": "tick"})).await?;
    let wall = lambda
        .settle(Duration::from_secs(24 * 3600))
        .await
        .duration_since(started)
        .as_secs_f64();
    let failed: Vec<String> = lambda
        .outcomes()
        .into_iter()
        .filter_map(|(e, r)| r.err().map(|err| format!("{} hop {}: {err}", e.table, e.hop)))
        .collect();
    if !failed.is_empty() {
        bail!("chain steps failed:\n{}", failed.join("\n"));
    }
    // Each table's newest run is this one (the history has a row per table, not per chain).
    let runs = app.syncer.store().recent_runs(ALL_TABLES.len() as u32).await?;
    let sum = |column: &str| runs.rows.iter().filter_map(|r| runs.int(r, column)).sum::<i64>();
    Ok(Measured {
        name,
        served: sim.stats(),
        minimal: BTreeMap::new(),
        report: json!({"wall_seconds": wall, "retries": sum("retries"), "invocations": lambda.events().len()}),
        wall,
        rows: sum("row_count"),
    })
}

fn print(m: &Measured, rate: f64) -> Value {
    let requests = m.requests();
    let minimal = m.minimal_total();
    let throttled = m.throttled();
    let ratio = requests as f64 / minimal.max(1) as f64;
    let sync_wall = m.report["wall_seconds"].as_f64().unwrap_or(m.wall);
    let achieved = requests as f64 / sync_wall;
    let bound = minimal as f64 / rate;
    let cpu = m.report["cpu_seconds"].as_f64();
    let peak_mb = m.report["peak_memory_bytes"].as_f64().map(|b| b / 1_048_576.0);
    let retries = m.report["retries"].as_u64().unwrap_or(0);
    let invocations = m.report["invocations"].as_u64();
    println!("\n== {} run", m.name);
    println!("{:<30} {:>9} {:>9} {:>6}", "endpoint", "requests", "minimal", "429s");
    let mut names: Vec<&String> = m.served.keys().chain(m.minimal.keys()).collect();
    names.sort();
    names.dedup();
    for n in names {
        let s = m.served.get(n).cloned().unwrap_or_default();
        println!(
            "{:<30} {:>9} {:>9} {:>6}",
            n,
            s.requests,
            m.minimal.get(n).copied().unwrap_or(0),
            s.throttled
        );
    }
    println!("{:<30} {:>9} {:>9} {:>6}", "all", requests, minimal, throttled);
    println!("requests / minimal        {ratio:.3}   (target ≤ 1.05)");
    println!(
        "rate                      {achieved:.1} req/s of {rate:.0} allowed = {:.1} % utilisation (target ≥ 90 %)",
        100.0 * achieved / rate
    );
    println!("wall time                 {sync_wall:.1} s   (bound: minimal / rate = {bound:.1} s)");
    println!(
        "429s and retries          {throttled} answered 429 ({:.2} % of requests, target < 1 %), {retries} retries",
        100.0 * throttled as f64 / requests.max(1) as f64
    );
    if let Some(n) = invocations {
        println!("invocations               {n} (one chain per table, each in a container of its own)");
    }
    println!(
        "CPU time                  {}",
        cpu.map_or("n/a".into(), |c| format!("{c:.1} s"))
    );
    println!(
        "peak memory               {}   (target ≤ 128 MB)",
        peak_mb.map_or("n/a".into(), |p| format!("{p:.1} MB"))
    );
    println!(
        "rows written              {} ({:.0} rows/s)",
        m.rows,
        m.rows as f64 / sync_wall
    );
    json!({
        "run": m.name,
        "requests": requests,
        "minimal_requests": minimal,
        "requests_over_minimal": ratio,
        "requests_per_endpoint": m.served.iter().map(|(k, v)| (k.clone(), json!({"requests": v.requests, "throttled": v.throttled, "minimal": m.minimal.get(k)}))).collect::<serde_json::Map<_, _>>(),
        "allowed_rate": rate,
        "achieved_rate": achieved,
        "utilisation": achieved / rate,
        "wall_seconds": sync_wall,
        "bound_seconds": bound,
        "throttled": throttled,
        "throttled_share": throttled as f64 / requests.max(1) as f64,
        "retries": retries,
        "invocations": invocations,
        "cpu_seconds": cpu,
        "peak_memory_bytes": m.report["peak_memory_bytes"],
        "rows_written": m.rows,
        "rows_per_second": m.rows as f64 / sync_wall,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bq =
        std::env::var("BIGQUERY_EMULATOR_URL").context("BIGQUERY_EMULATOR_URL is not set (make bench starts it)")?;
    let world = World::generated(&Volume::new(args.opportunities, args.seed));
    let in_scope = world.scoped_opportunities(START_MS).len();
    let sim = Simulator::start(
        world,
        SimConfig {
            rate: Some((args.rate, 2.0 * args.rate)),
            latency: Duration::from_millis(args.latency_ms),
            ..SimConfig::default()
        },
    )
    .await?;
    let dataset = unique_dataset("bench");
    let start_date = chrono::DateTime::from_timestamp_millis(START_MS)
        .context("start date")?
        .format("%Y-%m-%d")
        .to_string();
    let env: Vec<(String, String)> = [
        ("LEVER_API_KEY", "sim-api-key".to_owned()),
        ("LEVER_API_URL", sim.base_url()),
        ("LEVER_START_DATE", start_date.clone()),
        ("LEVER_RATE_PER_SEC", args.rate.to_string()),
        ("LEVER_CHILD_SYNC", args.children.clone()),
        ("BIGQUERY_PROJECT", "bench".to_owned()),
        ("BIGQUERY_DATASET", dataset.clone()),
        ("BIGQUERY_API_URL", bq.clone()),
        ("BIGQUERY_EMULATOR", "true".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    println!(
        "account: {in_scope} opportunities in scope, {} users; simulator: {} req/s (burst {}), {} ms per response; children: {}; {}",
        sim.world().users.len(),
        args.rate,
        2.0 * args.rate,
        args.latency_ms,
        args.children,
        if args.lambda {
            "Lambda chains, one container per table"
        } else {
            "lever-sync sync"
        }
    );

    // A syncer of our own only to read the dataset back for the exactness check.
    let mut raw = RawConfig::default();
    raw.apply_env(&env.iter().cloned().collect())?;
    let cfg = raw.validate(chrono::Utc::now().timestamp_millis())?;
    let reader = syncer_for(cfg.clone(), "bench-reader")
        .await
        .map_err(anyhow::Error::msg)?;
    let run = |name: &'static str| {
        let (args, sim, env, cfg) = (&args, &sim, &env, &cfg);
        async move {
            if args.lambda {
                run_chains(cfg, sim, name).await
            } else {
                run_sync(args, sim, env, name).await
            }
        }
    };

    let mut full = run("full").await?;
    full.minimal = minimal_requests(&sim.world(), in_scope, in_scope, false);
    check_exact(&reader, &sim).await?;

    // Lever-side changes: a share of opportunities edited (bumping updatedAt).
    let changed = ((in_scope as f64 * args.changed_percent / 100.0).round() as usize).max(1);
    {
        let mut w = sim.world();
        let ids: Vec<String> = w
            .scoped_opportunities(START_MS)
            .iter()
            .filter_map(|o| o["id"].as_str().map(str::to_owned))
            .step_by((in_scope / changed).max(1))
            .take(changed)
            .collect();
        for id in &ids {
            w.update_opportunity(id, |o| o["tags"] = json!(["bench-changed"]));
        }
    }
    let mut later = run("incremental").await?;
    // `full` re-reads every opportunity's children each run; a sweep, the changed ones and the
    // slice whose turn came since the last run (a share of minutes in a 7-day period: none here).
    let children_of = if args.children == "sweep" { changed } else { in_scope };
    later.minimal = minimal_requests(&sim.world(), changed, children_of, true);
    check_exact(&reader, &sim).await?;

    let full_json = print(&full, args.rate);
    let later_json = print(&later, args.rate);
    let share = later.requests() as f64 / full.requests().max(1) as f64;
    println!(
        "\nincremental after {changed} changed ({:.1} %): {:.2} % of the full run's requests (target in sweep mode ≤ 5 %)",
        args.changed_percent,
        100.0 * share
    );
    let doc = json!({
        "opportunities_in_scope": in_scope,
        "users": sim.world().users.len(),
        "rate": args.rate,
        "latency_ms": args.latency_ms,
        "children": args.children,
        "lambda": args.lambda,
        "changed": changed,
        "runs": [full_json, later_json],
        "incremental_over_full_requests": share,
    });
    std::fs::write(&args.out, serde_json::to_vec_pretty(&doc)?)?;
    println!("numbers written to {}", args.out);
    Ok(())
}

/// Every table equal to the simulator's truth (all columns), and no id twice.
async fn check_exact(reader: &lever_sync::sync::Syncer, sim: &Simulator) -> anyhow::Result<()> {
    assert_dataset_matches(reader, sim, &ALL_TABLES).await;
    for t in ALL_TABLES {
        let d = duplicate_ids(reader.warehouse(), t).await;
        if !d.is_empty() {
            bail!("{t} holds {} ids twice", d.len());
        }
    }
    println!("every table equals the simulator's truth, no id twice");
    Ok(())
}
