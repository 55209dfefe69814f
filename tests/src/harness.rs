//! End-to-end helpers: a config pointing at the simulator and the BigQuery emulator, reading a
//! table back, and comparing it with the simulator's truth.
//!
//! The comparison converts Lever values on its own (epoch ms → microseconds, lists, JSON) rather
//! than calling the sync's conversion, so a bug there cannot hide itself; it shares only the
//! catalog, which is the specification of the columns.

use crate::server::Simulator;
use lever_sync::catalog::{self, Column, ColumnType, Source, TableDef};
use lever_sync::config::{Config, RawConfig};
use lever_sync::lever::LeverClient;
use lever_sync::sync::{system_clock, Syncer};
use lever_sync::warehouse::Warehouse;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

/// Start date used by the end-to-end tests: after the out-of-scope generated records, before
/// every in-scope one.
pub const START_DATE: &str = "2020-01-01";
pub const START_MS: i64 = 1_577_836_800_000;

/// The emulator's root URL, from `BIGQUERY_EMULATOR_URL` (the Makefile starts it).
pub fn emulator_url() -> String {
    std::env::var("BIGQUERY_EMULATOR_URL").unwrap_or_else(|_| {
        panic!("BIGQUERY_EMULATOR_URL is not set: run the tests with `make test`, which starts the BigQuery emulator")
    })
}

/// A dataset name no other test (or earlier run) uses.
pub fn unique_dataset(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    format!("{prefix}_{}_{t}_{n}", std::process::id())
}

pub struct Setup {
    pub sim: Simulator,
    pub dataset: String,
    pub raw: RawConfig,
}

impl Setup {
    /// Settings for a sync from `sim` into a fresh dataset of the emulator. The client rate is
    /// high because these tests run the simulator without Lever's limit unless they say so.
    pub fn new(sim: &Simulator, prefix: &str) -> Setup {
        let dataset = unique_dataset(prefix);
        let api_key = sim.shared.config.lock().map(|c| c.api_key.clone()).unwrap_or_default();
        let raw = RawConfig::from_toml(&format!(
            r#"
            [lever]
            api_key = "{api_key}"
            api_url = "{lever}"
            start_date = "{START_DATE}"
            rate_per_sec = 2000
            burst = 50
            timeout_secs = 5
            [bigquery]
            project = "test-project"
            dataset = "{dataset}"
            api_url = "{bq}"
            emulator = true
            [sync]
            pages_per_window = 2
            child_concurrency = 8
            lease_secs = 600
            "#,
            lever = sim.base_url(),
            bq = emulator_url(),
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        Setup {
            sim: sim.clone(),
            dataset,
            raw,
        }
    }

    pub fn config(&self) -> Config {
        self.raw
            .clone()
            .validate(chrono::Utc::now().timestamp_millis())
            .unwrap_or_else(|e| panic!("{e}"))
    }

    pub async fn syncer(&self) -> Syncer {
        self.syncer_as("test-owner").await
    }

    pub async fn syncer_as(&self, owner: &str) -> Syncer {
        syncer_for(self.config(), owner).await.unwrap_or_else(|e| panic!("{e}"))
    }
}

pub async fn syncer_for(cfg: Config, owner: &str) -> Result<Syncer, String> {
    let wh = Warehouse::connect(&cfg.warehouse).await.map_err(|e| e.to_string())?;
    let lever = LeverClient::new(
        cfg.lever.api_key.clone(),
        lever_sync::lever::ClientConfig {
            base_url: cfg.lever.api_url.clone(),
            environment: cfg.lever.environment,
            rate_per_sec: cfg.lever.rate_per_sec,
            burst: cfg.lever.burst,
            timeout: cfg.lever.timeout,
            retry: lever_sync::lever::retry::RetryPolicy {
                base_delay: std::time::Duration::from_millis(20),
                ..Default::default()
            },
        },
    )
    .map_err(|e| e.to_string())?;
    Ok(Syncer::new(Arc::new(cfg), lever, wh, owner.to_owned(), system_clock()))
}

/// Runs every stream of `syncer` to the end of a run.
pub async fn sync_all(syncer: &Syncer) -> Result<(), String> {
    syncer.setup().await.map_err(|e| e.to_string())?;
    for stream in syncer.config().streams() {
        syncer.sync_stream(stream).await.map_err(|e| format!("{stream}: {e}"))?;
    }
    Ok(())
}

/// Every row of a table, each as column → REST cell value.
pub async fn read_table(wh: &Warehouse, table: &str) -> Vec<Map<String, Value>> {
    read_table_where(wh, table, "TRUE").await
}

/// The rows of a table that satisfy a SQL condition.
pub async fn read_table_where(wh: &Warehouse, table: &str, condition: &str) -> Vec<Map<String, Value>> {
    let rows = wh
        .query(&format!("SELECT * FROM {} WHERE {condition}", wh.table_ref(table)), &[])
        .await
        .unwrap_or_else(|e| panic!("reading {table}: {e}"));
    rows.rows
        .iter()
        .map(|r| {
            rows.columns
                .iter()
                .cloned()
                .zip(r.iter().cloned())
                .collect::<Map<String, Value>>()
        })
        .collect()
}

fn lookup<'v>(record: &'v Value, path: &str) -> &'v Value {
    static NULL: Value = Value::Null;
    path.split('.')
        .try_fold(record, |cur, step| cur.get(step))
        .unwrap_or(&NULL)
}

/// BigQuery's REST answer for a TIMESTAMP: integer microseconds (emulator) or float seconds
/// in scientific notation (BigQuery). Returns epoch ms.
fn cell_ms(cell: &Value) -> Option<i64> {
    let s = cell.as_str()?;
    if s.contains(['E', 'e', '.']) {
        s.parse::<f64>().ok().map(|secs| (secs * 1000.0).round() as i64)
    } else {
        s.parse::<i64>().ok().map(|us| us / 1000)
    }
}

/// Compares one cell with the Lever value it must hold; `Err` says how they differ.
fn cell_matches(ty: ColumnType, raw: &Value, cell: &Value) -> Result<(), String> {
    let differ = || Err(format!("Lever {raw} vs BigQuery {cell}"));
    match (ty, raw) {
        (ColumnType::StringArray, raw) => {
            let want: Vec<String> = raw
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| match v {
                    Value::String(s) => Some(s.clone()),
                    Value::Object(o) => o.get("id").and_then(Value::as_str).map(str::to_owned),
                    Value::Number(n) => Some(n.to_string()),
                    _ => None,
                })
                .collect();
            let got: Vec<String> = cell
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c.get("v").and_then(Value::as_str).map(str::to_owned))
                .collect();
            if want == got {
                Ok(())
            } else {
                differ()
            }
        }
        (_, Value::Null) => {
            if cell.is_null() {
                Ok(())
            } else {
                differ()
            }
        }
        (ColumnType::String, Value::String(s)) => {
            if cell.as_str() == Some(s) {
                Ok(())
            } else {
                differ()
            }
        }
        (ColumnType::String, other) => {
            if cell.as_str() == Some(other.to_string().as_str()) {
                Ok(())
            } else {
                differ()
            }
        }
        (ColumnType::Int64, Value::Number(n)) => {
            if cell.as_str().and_then(|s| s.parse::<i64>().ok()) == n.as_i64().or_else(|| n.as_f64().map(|f| f as i64))
            {
                Ok(())
            } else {
                differ()
            }
        }
        (ColumnType::Float64, Value::Number(n)) => {
            if cell.as_str().and_then(|s| s.parse::<f64>().ok()) == n.as_f64() {
                Ok(())
            } else {
                differ()
            }
        }
        (ColumnType::Bool, Value::Bool(b)) => {
            if cell.as_str() == Some(if *b { "true" } else { "false" }) {
                Ok(())
            } else {
                differ()
            }
        }
        (ColumnType::Timestamp, Value::Number(n)) => {
            if cell_ms(cell) == n.as_i64() {
                Ok(())
            } else {
                differ()
            }
        }
        (ColumnType::Json, raw) => {
            let got: Option<Value> = cell.as_str().and_then(|s| serde_json::from_str(s).ok());
            if got.as_ref() == Some(raw) {
                Ok(())
            } else {
                differ()
            }
        }
        _ => differ(),
    }
}

/// Asserts that `rows` (read back from BigQuery) hold exactly `truth`: the same ids, no id twice,
/// and every catalog column equal to the Lever value, typed.
pub fn assert_matches_truth(table: &TableDef, rows: &[Map<String, Value>], truth: &[(Value, Option<String>)]) {
    let all: Vec<&Column> = table.columns.iter().collect();
    assert_columns_match_truth(table, &all, rows, truth);
}

/// Like `assert_matches_truth`, for the given columns only.
pub fn assert_columns_match_truth(
    table: &TableDef,
    columns: &[&Column],
    rows: &[Map<String, Value>],
    truth: &[(Value, Option<String>)],
) {
    let mut by_id: HashMap<String, &Map<String, Value>> = HashMap::new();
    for r in rows {
        let id = r
            .get(table.key)
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("{}: a row without id", table.name))
            .to_owned();
        assert!(
            by_id.insert(id.clone(), r).is_none(),
            "{}: id {id} appears twice",
            table.name
        );
    }
    let want_ids: BTreeMap<String, &(Value, Option<String>)> = truth
        .iter()
        .map(|t| (t.0.get("id").and_then(Value::as_str).unwrap_or_default().to_owned(), t))
        .collect();
    let missing: Vec<&String> = want_ids.keys().filter(|id| !by_id.contains_key(*id)).collect();
    let extra: Vec<&String> = by_id.keys().filter(|id| !want_ids.contains_key(*id)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{}: {} missing {:?}, {} extra {:?}",
        table.name,
        missing.len(),
        missing.iter().take(5).collect::<Vec<_>>(),
        extra.len(),
        extra.iter().take(5).collect::<Vec<_>>()
    );
    assert_eq!(rows.len(), truth.len(), "{}: row count", table.name);
    for (id, (record, parent)) in &want_ids {
        let row = by_id[id];
        for c in columns {
            let cell = row
                .get(c.name)
                .unwrap_or_else(|| panic!("{}: no column {}", table.name, c.name));
            let raw = match c.source {
                Source::Field(path) => lookup(record, path).clone(),
                Source::ParentId => parent.clone().map_or(Value::Null, Value::String),
            };
            if let Err(diff) = cell_matches(c.ty, &raw, cell) {
                panic!("{}.{} of {id}: {diff}", table.name, c.name);
            }
        }
        assert!(
            row.get(catalog::SYNCED_AT).is_some_and(|v| !v.is_null()),
            "{}: {id} lacks {}",
            table.name,
            catalog::SYNCED_AT
        );
        assert!(
            row.get(catalog::RUN_ID).is_some_and(|v| !v.is_null()),
            "{}: {id} lacks {}",
            table.name,
            catalog::RUN_ID
        );
    }
}

/// Reads every synced table and asserts it equals the simulator's truth.
pub async fn assert_dataset_matches(syncer: &Syncer, sim: &Simulator, tables: &[&str]) {
    for name in tables {
        let t = catalog::table(name).unwrap_or_else(|| panic!("unknown table {name}"));
        let rows = read_table(syncer.warehouse(), name).await;
        let truth = sim.world().truth(name, START_MS);
        assert_matches_truth(t, &rows, &truth);
    }
}

pub const ALL_TABLES: [&str; 7] = [
    "opportunities",
    "applications",
    "interviews",
    "notes",
    "offers",
    "referrals",
    "users",
];

/// A simulator without Lever's rate limit (tests that are about the limit turn it on).
pub async fn fast_sim(world: crate::world::World) -> Simulator {
    let cfg = crate::server::SimConfig {
        rate: None,
        ..Default::default()
    };
    Simulator::start(world, cfg)
        .await
        .unwrap_or_else(|e| panic!("simulator: {e}"))
}

/// Rows of a table whose id occurs more than once (must be empty).
pub async fn duplicate_ids(wh: &Warehouse, table: &str) -> Vec<String> {
    let rows = wh
        .query(
            &format!("SELECT id FROM {} GROUP BY id HAVING COUNT(*) > 1", wh.table_ref(table)),
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    rows.rows.iter().filter_map(|r| rows.str(r, "id")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cells_are_compared_by_type() {
        assert!(cell_matches(
            ColumnType::Timestamp,
            &json!(1_628_509_001_183_i64),
            &json!("1628509001183000")
        )
        .is_ok());
        assert!(cell_matches(
            ColumnType::Timestamp,
            &json!(1_628_509_001_183_i64),
            &json!("1.628509001183E9")
        )
        .is_ok());
        assert!(cell_matches(
            ColumnType::Timestamp,
            &json!(1_628_509_001_183_i64),
            &json!("1628509001184000")
        )
        .is_err());
        assert!(cell_matches(
            ColumnType::StringArray,
            &json!(["a", {"id": "b"}]),
            &json!([{"v": "a"}, {"v": "b"}])
        )
        .is_ok());
        assert!(cell_matches(ColumnType::StringArray, &Value::Null, &json!([])).is_ok());
        assert!(cell_matches(
            ColumnType::Json,
            &json!({"x": [1, "é", null]}),
            &json!("{\"x\":[1,\"é\",null]}")
        )
        .is_ok());
        assert!(cell_matches(ColumnType::Json, &json!({"x": 1}), &json!("{\"x\":2}")).is_err());
        assert!(cell_matches(ColumnType::Bool, &json!(false), &json!("false")).is_ok());
        assert!(cell_matches(ColumnType::String, &Value::Null, &json!("")).is_err());
        assert!(cell_matches(ColumnType::Int64, &json!(30), &json!("30")).is_ok());
    }
}
