//! `lever-sync`: the local runner and operator tool. It runs the very same window step as the
//! Lambda functions, in a loop in-process.

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use lever_sync::config::{Config, RawConfig, ENV_VARS};
use lever_sync::lever::{LeverClient, LeverError};
use lever_sync::ops::{self, Person};
use lever_sync::sync::{system_clock, RunSummary, Syncer};
use lever_sync::warehouse::Warehouse;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(name = "lever-sync", version, about = "Sync Lever into BigQuery")]
struct Cli {
    /// A TOML settings file; environment variables (LEVER_API_KEY, BIGQUERY_DATASET, …) override it.
    #[arg(long, short, env = "LEVER_SYNC_CONFIG", global = true)]
    config: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Prove the Lever key, the environment and the BigQuery access. Writes nothing.
    Check,
    /// Sync the selected tables until each run is done.
    Sync {
        /// Only these tables (repeatable); default: the configured tables.
        #[arg(long = "table", short = 't')]
        tables: Vec<String>,
        /// Columns to sync for a table, as TABLE=col1,col2 (repeatable).
        #[arg(long = "columns")]
        columns: Vec<String>,
        /// Also write what the sync did as JSON to this file: per table rows, requests,
        /// windows; in all requests, retries, 429s, wall time, CPU time and peak memory.
        #[arg(long)]
        report: Option<String>,
    },
    /// Show each stream's state and the latest runs.
    Status,
    /// List each table's columns with their selection, and fields Lever sends that the
    /// catalog does not know yet (names, inferred types and counts; never values).
    Discover {
        /// Opportunities whose child records are sampled.
        #[arg(long, default_value_t = 20)]
        sample: usize,
        #[arg(long = "columns")]
        columns: Vec<String>,
    },
    /// Remove one person from every table, by contact id, opportunity id or email.
    Erase {
        #[arg(long, group = "who")]
        contact: Option<String>,
        #[arg(long, group = "who")]
        opportunity: Option<String>,
        #[arg(long, group = "who")]
        email: Option<String>,
    },
    /// Force a full refresh of a table on its next run.
    Reset {
        #[arg(long = "table", short = 't')]
        table: String,
    },
    /// Drop every table this connector made in the dataset (synced tables, state, history).
    DeleteConnection {
        /// Skip the confirmation prompt.
        #[arg(long)]
        yes: bool,
    },
}

fn load_config(path: Option<&str>, tables: &[String]) -> anyhow::Result<Config> {
    load_config_with(path, tables, &[])
}

fn load_config_with(path: Option<&str>, tables: &[String], columns: &[String]) -> anyhow::Result<Config> {
    let mut raw = match path {
        Some(p) => RawConfig::from_toml(
            &std::fs::read_to_string(p).with_context(|| format!("cannot read the config file {p}"))?,
        )?,
        None => RawConfig::default(),
    };
    let env: HashMap<String, String> = ENV_VARS
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
        .collect();
    raw.apply_env(&env)?;
    if !tables.is_empty() {
        raw.lever.tables = Some(tables.to_vec());
    }
    for c in columns {
        raw.apply_columns_arg(c)?;
    }
    Ok(raw.validate(chrono_now())?)
}

fn chrono_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn lever_client(cfg: &Config) -> anyhow::Result<LeverClient> {
    Ok(cfg.lever.client()?)
}

#[tokio::main]
async fn main() {
    let json = std::env::var("LOG_FORMAT").is_ok_and(|v| v == "json");
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    if json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    } else {
        tracing_subscriber::fmt()
            .compact()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_target(false)
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Check => check(cli.config.as_deref()).await,
        Command::Sync {
            tables,
            columns,
            report,
        } => sync(cli.config.as_deref(), tables, columns, report.as_deref()).await,
        Command::Status => status(cli.config.as_deref()).await,
        Command::Discover { sample, columns } => discover(cli.config.as_deref(), *sample, columns).await,
        Command::Erase {
            contact,
            opportunity,
            email,
        } => {
            let who = match (contact, opportunity, email) {
                (Some(c), _, _) => Person::Contact(c.clone()),
                (_, Some(o), _) => Person::Opportunity(o.clone()),
                (_, _, Some(e)) => Person::Email(e.clone()),
                _ => {
                    eprintln!("error: say who to erase: --contact ID, --opportunity ID or --email ADDRESS");
                    std::process::exit(2);
                }
            };
            erase(cli.config.as_deref(), who).await
        }
        Command::Reset { table } => reset(cli.config.as_deref(), table).await,
        Command::DeleteConnection { yes } => delete_connection(cli.config.as_deref(), *yes).await,
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn check(path: Option<&str>) -> anyhow::Result<()> {
    let cfg = load_config(path, &[])?;
    println!(
        "settings: ok ({} tables, Lever {} at {})",
        cfg.tables.len(),
        cfg.lever.environment.name(),
        cfg.lever.api_url
    );
    let lever = lever_client(&cfg)?;
    let mut failures = Vec::new();
    let sample = match ops::can_read_confidential(&lever).await {
        Ok(true) => {
            println!("lever: ok (the key reads opportunities, confidential ones included)");
            first_opportunity(&lever).await
        }
        Ok(false) => {
            println!(
                "lever: ok, but this key may NOT read confidential opportunities: they will be missing from the \
                 dataset (make a key with confidential access in Lever to include them)"
            );
            first_opportunity(&lever).await
        }
        Err(e) => {
            println!("lever: FAILED: {e}");
            failures.push("lever");
            None
        }
    };
    if failures.is_empty() {
        for t in &cfg.tables {
            let path = match (t.origin, &sample) {
                (lever_sync::catalog::Origin::List { path }, _) if path != "/opportunities" => path.to_owned(),
                (lever_sync::catalog::Origin::PerParent { path, .. }, Some(id)) => {
                    format!("/opportunities/{id}/{path}")
                }
                _ => continue,
            };
            match lever.list_page(&path, &[], None).await {
                Ok(_) | Err(LeverError::NotFound { .. }) => println!("lever {}: ok", t.name),
                Err(e) => {
                    println!("lever {}: FAILED: {e}", t.name);
                    failures.push(t.name);
                }
            }
        }
    }
    match Warehouse::connect(&cfg.warehouse).await {
        Ok(wh) => match wh.dataset_exists().await {
            Ok(true) => println!(
                "bigquery: ok (dataset {}.{} exists)",
                cfg.warehouse.project, cfg.warehouse.dataset
            ),
            Ok(false) => println!(
                "bigquery: ok (project {} reachable; dataset {} will be created by the first sync)",
                cfg.warehouse.project, cfg.warehouse.dataset
            ),
            Err(e) => {
                println!("bigquery: FAILED: {e}");
                failures.push("bigquery");
            }
        },
        Err(e) => {
            println!("bigquery: FAILED: {e}");
            failures.push("bigquery");
        }
    }
    if !failures.is_empty() {
        bail!("check failed for: {}", failures.join(", "));
    }
    println!("all checks passed");
    Ok(())
}

async fn syncer(cfg: Config) -> anyhow::Result<Syncer> {
    let lever = lever_client(&cfg)?;
    let wh = Warehouse::connect(&cfg.warehouse).await?;
    let owner = format!("cli-{}", std::process::id());
    Ok(Syncer::new(Arc::new(cfg), lever, wh, owner, system_clock()))
}

async fn sync(path: Option<&str>, tables: &[String], columns: &[String], report: Option<&str>) -> anyhow::Result<()> {
    let cfg = load_config_with(path, tables, columns)?;
    let streams = cfg.streams();
    let s = syncer(cfg).await?;
    let started = Instant::now();
    s.setup().await?;
    // All streams at once: they share one client and so one rate budget.
    let runs = futures::future::join_all(streams.iter().map(|st| {
        let s = s.clone();
        let st = *st;
        async move { (st, s.sync_stream(st).await) }
    }))
    .await;
    let mut failed = Vec::new();
    let mut per_table = Vec::new();
    println!(
        "{:<15} {:>8} {:>9} {:>8} {:>8}",
        "table", "rows", "requests", "windows", "retries"
    );
    for (stream, r) in &runs {
        match r {
            Ok(RunSummary {
                tables,
                requests,
                windows,
                retries,
                ..
            }) => {
                for t in tables {
                    per_table.push(serde_json::json!({
                        "table": t.table, "rows": t.rows, "stream": stream,
                        "stream_requests": requests, "windows": windows, "retries": retries,
                    }));
                    println!(
                        "{:<15} {:>8} {:>9} {:>8} {:>8}",
                        t.table, t.rows, requests, windows, retries
                    );
                }
            }
            Err(e) => {
                per_table.push(serde_json::json!({"stream": stream, "error_code": e.code()}));
                println!("{stream:<15} FAILED [{}] {e}", e.code());
                failed.push(*stream);
            }
        }
    }
    let stats = s.lever().totals().snapshot();
    let wall = started.elapsed().as_secs_f64();
    println!(
        "done in {wall:.1}s: {} Lever requests, {} retries, {} throttled",
        stats.requests, stats.retries, stats.throttled
    );
    if let Some(path) = report {
        let (cpu, peak) = resources();
        let doc = serde_json::json!({
            "wall_seconds": wall,
            "requests": stats.requests,
            "retries": stats.retries,
            "throttled": stats.throttled,
            "cpu_seconds": cpu,
            "peak_memory_bytes": peak,
            "tables": per_table,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?).with_context(|| format!("cannot write {path}"))?;
    }
    if !failed.is_empty() {
        bail!("{} failed; the next sync resumes where it stopped", failed.join(", "));
    }
    Ok(())
}

async fn status(path: Option<&str>) -> anyhow::Result<()> {
    let cfg = load_config(path, &[])?;
    let s = syncer(cfg).await?;
    if !s.warehouse().dataset_exists().await? {
        println!("nothing synced yet (the dataset does not exist)");
        return Ok(());
    }
    s.store().ensure(&[]).await?;
    println!(
        "{:<15} {:<11} {:<24} {:>5} {:>8} {:<24} last error",
        "stream", "phase", "run", "hop", "rows", "cursor"
    );
    for st in s.store().load_all().await? {
        println!(
            "{:<15} {:<11} {:<24} {:>5} {:>8} {:<24} {}",
            st.stream,
            st.phase.as_str(),
            st.run_id.as_deref().unwrap_or("-"),
            st.hop,
            st.rows,
            st.cursor_ms
                .and_then(lever_sync::rows::timestamp_text)
                .unwrap_or_else(|| "-".into()),
            st.last_error.as_deref().unwrap_or("")
        );
    }
    let runs = s.store().recent_runs(20).await?;
    println!("\nlatest runs:");
    println!(
        "{:<15} {:<24} {:<10} {:>8} {:>9} {:<24} error",
        "table", "run", "outcome", "rows", "requests", "finished"
    );
    for r in &runs.rows {
        println!(
            "{:<15} {:<24} {:<10} {:>8} {:>9} {:<24} {}",
            runs.str(r, "table_name").unwrap_or_default(),
            runs.str(r, "run_id").unwrap_or_default(),
            runs.str(r, "outcome").unwrap_or_default(),
            runs.int(r, "row_count").unwrap_or(0),
            runs.int(r, "requests").unwrap_or(0),
            runs.int(r, "finished_at")
                .and_then(lever_sync::rows::timestamp_text)
                .unwrap_or_default(),
            runs.str(r, "error").unwrap_or_default()
        );
    }
    Ok(())
}

async fn discover(path: Option<&str>, sample: usize, columns: &[String]) -> anyhow::Result<()> {
    let cfg = load_config_with(path, &[], columns)?;
    let lever = lever_client(&cfg)?;
    let sampled = lever_sync::discover::sample(&lever, sample).await?;
    for t in &cfg.tables {
        let selected = cfg.columns_of(t);
        println!(
            "{} ({} sampled records)",
            t.name,
            sampled.get(t.name).map_or(0, Vec::len)
        );
        for c in t.columns {
            let on = selected.iter().any(|s| s.name == c.name);
            println!("  [{}] {:<28} {}", if on { "x" } else { " " }, c.name, c.ty.sql_name());
        }
        for c in selected.iter().filter(|c| t.column(c.name).is_none()) {
            println!("  [x] {:<28} {} (extra field)", c.name, c.ty.sql_name());
        }
        let records = sampled.get(t.name).map(Vec::as_slice).unwrap_or_default();
        let extra: Vec<&str> = selected
            .iter()
            .filter(|c| t.column(c.name).is_none())
            .map(|c| c.name)
            .collect();
        for f in lever_sync::discover::unknown_fields(t, records)
            .into_iter()
            .filter(|f| !extra.contains(&f.column.as_str()))
        {
            println!("  new field {:<22} {:<14} in {} of the sampled records (not synced; add it under [tables.{}] extra_fields)", f.field, f.inferred.sql_name(), f.records, t.name);
        }
    }
    Ok(())
}

async fn erase(path: Option<&str>, who: Person) -> anyhow::Result<()> {
    let cfg = load_config(path, &[])?;
    let s = syncer(cfg).await?;
    let report = ops::erase(&s, &who).await?;
    if report.opportunities == 0 {
        println!("no synced opportunity matches that {}", who.kind());
        return Ok(());
    }
    println!("erased {} opportunities of that person:", report.opportunities);
    for (table, rows) in &report.rows {
        println!("  {table:<40} {rows} rows");
    }
    println!("they stay out of later syncs; erase or anonymise the person in Lever as well");
    Ok(())
}

async fn reset(path: Option<&str>, table: &str) -> anyhow::Result<()> {
    let cfg = load_config(path, &[])?;
    let s = syncer(cfg).await?;
    s.setup().await?;
    ops::reset(&s, table).await?;
    println!("{table}: the next sync re-reads everything from the start date and replaces the table");
    Ok(())
}

async fn delete_connection(path: Option<&str>, yes: bool) -> anyhow::Result<()> {
    let cfg = load_config(path, &[])?;
    let dataset = format!("{}.{}", cfg.warehouse.project, cfg.warehouse.dataset);
    if !yes {
        eprint!("This drops every synced table, the sync state and the history in {dataset}. Type the dataset name to confirm: ");
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if answer.trim() != cfg.warehouse.dataset {
            bail!("not confirmed; nothing was dropped");
        }
    }
    let wh = Warehouse::connect(&cfg.warehouse).await?;
    let dropped = ops::delete_connection(&wh).await?;
    println!("dropped {} tables from {dataset}", dropped.len());
    Ok(())
}

async fn first_opportunity(lever: &LeverClient) -> Option<String> {
    let page = lever.list_page("/opportunities", &[], None).await.ok()?;
    page.data
        .first()
        .and_then(|o| o.get("id"))
        .and_then(|v| v.as_str())
        .map(str::to_owned)
}

/// This process's CPU seconds (user + system) and peak resident memory in bytes, from /proc
/// (Linux; `None` elsewhere).
fn resources() -> (Option<f64>, Option<u64>) {
    // Field 14 and 15 of /proc/self/stat, after the command name in parentheses, in clock
    // ticks; Linux fixes the tick for user space at 100 per second.
    let cpu = std::fs::read_to_string("/proc/self/stat").ok().and_then(|s| {
        let rest = s.rsplit_once(')')?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
        Some(ticks / 100.0)
    });
    let peak = std::fs::read_to_string("/proc/self/status").ok().and_then(|s| {
        let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kb = line.split_whitespace().nth(1)?.parse::<u64>().ok()?;
        Some(kb * 1024)
    });
    (cpu, peak)
}
