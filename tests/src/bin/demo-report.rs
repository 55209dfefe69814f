//! Prints what a demo sync landed: each table's rows in BigQuery next to the simulator's truth,
//! the Lever requests each table's run made, and an example analytic query. Exits non-zero when
//! a table differs from the truth. Reads the same environment variables as `lever-sync`.

use anyhow::{bail, Context};
use lever_sync::config::{RawConfig, ENV_VARS};
use lever_sync::warehouse::schema::HISTORY_TABLE;
use lever_sync::warehouse::Warehouse;
use serde_json::Value;
use std::collections::HashMap;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let env: HashMap<String, String> = ENV_VARS
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
        .collect();
    let mut raw = RawConfig::default();
    raw.apply_env(&env)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    let cfg = raw.validate(now)?;
    let sim_root = cfg.lever.api_url.trim_end_matches("/v1").to_owned();
    let http = reqwest::Client::new();
    let truth: HashMap<String, i64> = http
        .get(format!("{sim_root}/_sim/counts?start={}", cfg.start_ms))
        .send()
        .await?
        .json()
        .await
        .context("simulator counts")?;
    let served: HashMap<String, Value> = http
        .get(format!("{sim_root}/_sim/stats"))
        .send()
        .await?
        .json()
        .await
        .context("simulator stats")?;
    let wh = Warehouse::connect(&cfg.warehouse).await?;

    let history = wh
        .query(
            &format!(
                "SELECT table_name, requests, windows FROM {} WHERE outcome = 'succeeded' \
                 QUALIFY ROW_NUMBER() OVER (PARTITION BY table_name ORDER BY finished_at DESC) = 1",
                wh.table_ref(HISTORY_TABLE)
            ),
            &[],
        )
        .await?;
    let mut run_requests = HashMap::new();
    for r in &history.rows {
        run_requests.insert(
            history.str(r, "table_name").unwrap_or_default(),
            (
                history.int(r, "requests").unwrap_or(0),
                history.int(r, "windows").unwrap_or(0),
            ),
        );
    }

    println!(
        "{:<15} {:>10} {:>10} {:>6} {:>16} {:>8}",
        "table", "bigquery", "lever", "equal", "lever requests", "windows"
    );
    let mut mismatched = Vec::new();
    for t in &cfg.tables {
        let n = wh
            .query(&format!("SELECT COUNT(*) AS n FROM {}", wh.table_ref(t.name)), &[])
            .await?;
        let got = n.rows.first().and_then(|r| n.int(r, "n")).unwrap_or(-1);
        let want = truth.get(t.name).copied().unwrap_or(-1);
        let (req, win) = run_requests.get(t.name).copied().unwrap_or((0, 0));
        let note = if t.stream() != t.name {
            format!("{req} (with {})", t.stream())
        } else {
            req.to_string()
        };
        println!(
            "{:<15} {:>10} {:>10} {:>6} {:>16} {:>8}",
            t.name,
            got,
            want,
            if got == want { "yes" } else { "NO" },
            note,
            win
        );
        if got != want {
            mismatched.push(t.name);
        }
    }
    println!("\nrequests the simulator served, per endpoint:");
    let mut endpoints: Vec<_> = served.iter().collect();
    endpoints.sort_by(|a, b| a.0.cmp(b.0));
    for (k, v) in endpoints {
        println!(
            "  {:<28} {:>6} requests {:>6} answered 429",
            k, v["requests"], v["throttled"]
        );
    }

    println!("\nopportunities per stage (SELECT stage, COUNT(*) … GROUP BY stage):");
    let stages = wh
        .query(&format!("SELECT stage, COUNT(*) AS n FROM {} WHERE NOT COALESCE(is_anonymized, FALSE) GROUP BY stage ORDER BY n DESC, stage", wh.table_ref("opportunities")), &[])
        .await?;
    for r in &stages.rows {
        println!(
            "  {:<40} {:>5}",
            stages.str(r, "stage").unwrap_or_default(),
            stages.int(r, "n").unwrap_or(0)
        );
    }
    if !mismatched.is_empty() {
        bail!("these tables differ from the simulator: {}", mismatched.join(", "));
    }
    println!("\nall {} tables equal the simulator's truth", cfg.tables.len());
    Ok(())
}
