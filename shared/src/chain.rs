//! The serverless side: each table sync is a chain of invocations of one function, one window
//! per invocation, each starting the next; a scheduled `dispatch` starts chains, resumes dead
//! ones and leaves live ones alone; operators send console events to `dispatch`.
//!
//! Both Lambda `main`s are thin shells over `step` and `dispatch` here, so tests drive the very
//! same code with a local invoke endpoint.

use crate::aws::{AwsError, Invoker, Secrets};
use crate::catalog;
use crate::config::{Config, RawConfig, ENV_VARS};
use crate::error::SyncError;
use crate::ops::{self, Person};
use crate::sync::plan::Phase;
use crate::sync::state::SyncState;
use crate::sync::{Syncer, WindowOutcome};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// The event of one chain step: tiny, the state lives in BigQuery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainEvent {
    /// The stream (walk of Lever) this chain syncs, e.g. `opportunities` or `notes`.
    pub table: String,
    /// The chain's identity: its lease owner. A retried or duplicated event carries the same.
    pub chain: String,
    /// The window this event asks for.
    pub hop: i64,
    /// On an event from `dispatch`: how many chains it left running at once, this one
    /// included. A chain's first window cannot see the others' leases yet (they start at the
    /// same moment), so it takes its share of the rate budget from this; later windows count
    /// the live leases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peers: Option<u32>,
}

/// Guards that end a runaway chain with a recorded error, instead of AWS's recursion stop.
#[derive(Debug, Clone)]
pub struct ChainLimits {
    pub max_hops: i64,
    pub max_run: Duration,
    /// Time kept free before the Lambda deadline for the load, the state save and the invoke.
    pub margin: Duration,
}

impl Default for ChainLimits {
    fn default() -> Self {
        ChainLimits {
            max_hops: 20_000,
            max_run: Duration::from_secs(48 * 3600),
            margin: Duration::from_secs(120),
        }
    }
}

#[derive(Clone)]
pub struct ChainApp {
    pub syncer: Syncer,
    pub invoker: Arc<dyn Invoker>,
    /// The sync-table function (the chain re-invokes it; dispatch starts it).
    pub function: String,
    pub limits: ChainLimits,
}

/// What one step did, for the log line and the tests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum StepOutcome {
    /// A window was done and the next invocation started.
    Continued {
        next_hop: i64,
    },
    Finished {
        run_id: String,
    },
    /// Another chain holds the table.
    Busy,
    /// The window was already done (a duplicate or late event): nothing done, nothing started.
    Stale,
    /// A guard ended the run; the history says why.
    Ended {
        code: String,
    },
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl ChainApp {
    /// The function's clients, built once per container: settings from the environment, secrets
    /// from Secrets Manager, the Lambda client for the next invocations.
    pub async fn from_environment() -> Result<ChainApp, SyncError> {
        let env = settings_env();
        let sdk = crate::aws::sdk_config(None).await;
        let secrets = Secrets::new(&sdk);
        // The client starts with the account's whole budget; each step takes its share of it
        // (see `step`).
        let cfg = lambda_config(&env, &secrets, now_ms()).await?;
        let lever = cfg
            .lever
            .client()
            .map_err(|e| SyncError::Invariant(format!("HTTP client: {e}")))?;
        let wh = crate::warehouse::Warehouse::connect(&cfg.warehouse).await?;
        let function = std::env::var("SYNC_TABLE_FUNCTION")
            .or_else(|_| std::env::var("AWS_LAMBDA_FUNCTION_NAME"))
            .map_err(|_| SyncError::Invariant("SYNC_TABLE_FUNCTION is not set".into()))?;
        let num = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
        let d = ChainLimits::default();
        let limits = ChainLimits {
            max_hops: num("CHAIN_MAX_HOPS").map_or(d.max_hops, |v| v as i64),
            max_run: num("CHAIN_MAX_RUN_HOURS").map_or(d.max_run, |h| Duration::from_secs(h * 3600)),
            margin: d.margin,
        };
        Ok(ChainApp {
            syncer: Syncer::new(Arc::new(cfg), lever, wh, "dispatch".into(), crate::sync::system_clock()),
            invoker: Arc::new(crate::aws::LambdaInvoker::new(&sdk)),
            function,
            limits,
        })
    }
}

/// One chain step: one window of the event's table, then the next invocation or the end.
/// `deadline_ms` is the invocation's deadline; pages stop early enough to finish in time.
pub async fn step(app: &ChainApp, event: &ChainEvent, deadline_ms: Option<i64>) -> Result<StepOutcome, SyncError> {
    let stream = catalog::table(&event.table)
        .map(|t| t.stream())
        .ok_or_else(|| SyncError::Invariant(format!("unknown table `{}`", event.table)))?;
    if event.chain.trim().is_empty() {
        return Err(SyncError::Invariant("the event has no chain id".into()));
    }
    // One read of every table's state: this one's, and how many other chains hold a live lease.
    // Each chain runs in its own container with its own pace, so the account's budget is split
    // evenly between the chains running now, recomputed every window as chains start and end.
    let now = now_ms();
    let states = app.syncer.store().load_all().await?;
    let st = states
        .iter()
        .find(|s| s.stream == stream)
        .cloned()
        .ok_or_else(|| SyncError::Invariant(format!("no state row for {stream}: run setup first")))?;
    let others = states
        .iter()
        .filter(|s| s.stream != stream && s.phase != Phase::Idle && s.lease_until_ms.is_some_and(|u| u > now))
        .count();
    let peers = event.peers.map_or(0, |p| p as usize);
    app.syncer.lever().limiter().set_share((1 + others).max(peers));
    let runaway = if event.hop >= app.limits.max_hops {
        Some(("chain_hop_limit", format!("the chain reached {} windows", event.hop)))
    } else if st.phase != Phase::Idle
        && st
            .run_started_ms
            .is_some_and(|s| now_ms() - s > app.limits.max_run.as_millis() as i64)
    {
        Some((
            "chain_run_deadline",
            format!(
                "the run has lasted more than {} hours",
                app.limits.max_run.as_secs() / 3600
            ),
        ))
    } else {
        None
    };
    if let Some((code, message)) = runaway {
        if st.phase != Phase::Idle && st.hop == event.hop {
            app.syncer.abandon_run(stream, code, &message).await?;
            tracing::error!(
                table = stream,
                hop = event.hop,
                error_code = code,
                "{message}; the run is ended"
            );
            return Ok(StepOutcome::Ended { code: code.to_owned() });
        }
        return Ok(StepOutcome::Stale);
    }
    let syncer = app
        .syncer
        .with_owner(&event.chain)
        .with_deadline(deadline_ms.map(|d| d - app.limits.margin.as_millis() as i64));
    match syncer.run_window(stream, Some(event.hop)).await? {
        WindowOutcome::Continue { hop, .. } => {
            let next = ChainEvent {
                table: stream.to_owned(),
                chain: event.chain.clone(),
                hop,
                peers: None,
            };
            let payload = serde_json::to_value(&next).map_err(|e| SyncError::Invariant(e.to_string()))?;
            app.invoker
                .invoke_async(&app.function, &payload)
                .await
                .map_err(|e| SyncError::Invariant(e.to_string()))?;
            Ok(StepOutcome::Continued { next_hop: hop })
        }
        WindowOutcome::Finished(s) => Ok(StepOutcome::Finished { run_id: s.run_id }),
        WindowOutcome::Busy => Ok(StepOutcome::Busy),
        WindowOutcome::Stale => Ok(StepOutcome::Stale),
    }
}

/// The `sync-table` handler: one step and its one log line (table, hop, outcome or error code;
/// never record contents). The Lambda and the tests' local invoke endpoint both run this.
pub async fn handle_step(
    app: &ChainApp,
    event: &ChainEvent,
    deadline_ms: Option<i64>,
) -> Result<StepOutcome, SyncError> {
    let started = std::time::Instant::now();
    let result = step(app, event, deadline_ms).await;
    match &result {
        Ok(outcome) => tracing::info!(
            table = %event.table,
            chain = %event.chain,
            hop = event.hop,
            duration_ms = started.elapsed().as_millis() as u64,
            outcome = ?outcome,
            "step"
        ),
        Err(e) => tracing::error!(table = %event.table, hop = event.hop, error_code = e.code(), "{e}"),
    }
    result
}

/// The `dispatch` handler: `dispatch`, with a log line when it fails.
pub async fn handle_dispatch(app: &ChainApp, event: &Value) -> Result<Value, SyncError> {
    let result = dispatch(app, event).await;
    if let Err(e) = &result {
        tracing::error!(error_code = e.code(), "{e}");
    }
    result
}

/// What an operator (or the schedule) asks of `dispatch`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
pub enum ConsoleEvent {
    /// The schedule: start or resume a chain for every selected table.
    Tick {},
    /// Sync now: like a tick, for some tables or (no list) all selected ones.
    Sync { tables: Option<Vec<String>> },
    /// Forget a table's cursor and start a run that replaces it.
    FullRefresh { table: String },
    /// State and latest runs of every table.
    Status {},
    /// Remove one person from every table.
    Erase {
        contact: Option<String>,
        opportunity: Option<String>,
        email: Option<String>,
    },
    /// Drop every table of the connector; `confirm` must be the dataset name.
    DeleteConnection { confirm: String },
}

impl ConsoleEvent {
    /// Parses an event, with a message that says what a valid one looks like.
    pub fn parse(v: &Value) -> Result<ConsoleEvent, SyncError> {
        serde_json::from_value(v.clone()).map_err(|e| {
            SyncError::Invariant(format!(
                "not a valid event ({e}): send {{\"action\": \"sync\"}}, {{\"action\": \"sync\", \"tables\": [\"notes\"]}}, \
                 {{\"action\": \"full_refresh\", \"table\": \"notes\"}}, {{\"action\": \"status\"}}, \
                 {{\"action\": \"erase\", \"email\": \"…\"}}, {{\"action\": \"delete_connection\", \"confirm\": \"<dataset>\"}} \
                 or {{\"action\": \"tick\"}}"
            ))
        })
    }
}

/// A new chain's id. It carries the time it was made, so that a late first event of an earlier
/// chain is recognised as such (`sync::chain_made_ms`) and starts no run.
fn new_chain_id() -> String {
    format!("chain-{}-{}", now_ms(), uuid::Uuid::new_v4().simple())
}

/// Starts a chain for each stream that has none running, and resumes those whose chain died
/// (its lease ran out). A live chain is left alone.
async fn start_chains(app: &ChainApp, streams: &[&'static str]) -> Result<Value, SyncError> {
    let mut report = serde_json::Map::new();
    let now = now_ms();
    let states = app.syncer.store().load_all().await?;
    let live = |st: &SyncState| st.lease_until_ms.is_some_and(|u| u > now) && st.lease_owner.is_some();
    let mut plan = Vec::with_capacity(streams.len());
    for stream in streams {
        let st = match states.iter().find(|s| s.stream == *stream) {
            Some(st) => st.clone(),
            None => app.syncer.store().load(stream).await?,
        };
        let action = match (st.phase, live(&st)) {
            (_, true) => "running",
            (Phase::Idle, false) => "started",
            (_, false) => "resumed",
        };
        plan.push((*stream, st, action));
    }
    // Every chain running once these start: the ones started here and the live ones.
    let running = states
        .iter()
        .filter(|s| s.phase != Phase::Idle && live(s) && !streams.contains(&s.stream.as_str()))
        .count();
    let peers = (running + plan.len()) as u32;
    for (stream, st, action) in plan {
        if action != "running" {
            let hop = if st.phase == Phase::Idle { 0 } else { st.hop };
            let event = ChainEvent {
                table: stream.to_owned(),
                chain: new_chain_id(),
                hop,
                peers: Some(peers),
            };
            let payload = serde_json::to_value(&event).map_err(|e| SyncError::Invariant(e.to_string()))?;
            app.invoker
                .invoke_async(&app.function, &payload)
                .await
                .map_err(|e| SyncError::Invariant(e.to_string()))?;
        }
        tracing::info!(table = stream, action, hop = st.hop, "dispatch");
        report.insert(stream.to_owned(), json!(action));
    }
    Ok(Value::Object(report))
}

/// Handles one `dispatch` event and returns the answer shown in the console.
pub async fn dispatch(app: &ChainApp, event: &Value) -> Result<Value, SyncError> {
    let cfg = app.syncer.config();
    match ConsoleEvent::parse(event)? {
        ConsoleEvent::Tick {} => {
            app.syncer.setup().await?;
            Ok(json!({"chains": start_chains(app, &cfg.streams()).await?}))
        }
        ConsoleEvent::Sync { tables } => {
            let streams = match tables {
                None => cfg.streams(),
                Some(names) => {
                    let mut out: Vec<&'static str> = Vec::new();
                    for n in &names {
                        let t = cfg.tables.iter().find(|t| t.name == n).ok_or_else(|| {
                            SyncError::Invariant(format!("table `{n}` is not among the synced tables"))
                        })?;
                        if !out.contains(&t.stream()) {
                            out.push(t.stream());
                        }
                    }
                    out
                }
            };
            app.syncer.setup().await?;
            Ok(json!({"chains": start_chains(app, &streams).await?}))
        }
        ConsoleEvent::FullRefresh { table } => {
            let t = cfg
                .tables
                .iter()
                .find(|t| t.name == table)
                .ok_or_else(|| SyncError::Invariant(format!("table `{table}` is not among the synced tables")))?;
            app.syncer.setup().await?;
            ops::reset(&app.syncer, t.name).await?;
            Ok(json!({"reset": t.stream(), "chains": start_chains(app, &[t.stream()]).await?}))
        }
        ConsoleEvent::Status {} => status(app).await,
        ConsoleEvent::Erase {
            contact,
            opportunity,
            email,
        } => {
            let who = match (contact, opportunity, email) {
                (Some(c), None, None) => Person::Contact(c),
                (None, Some(o), None) => Person::Opportunity(o),
                (None, None, Some(e)) => Person::Email(e),
                _ => {
                    return Err(SyncError::Invariant(
                        "erase takes exactly one of contact, opportunity or email".into(),
                    ))
                }
            };
            let r = ops::erase(&app.syncer, &who).await?;
            let rows: serde_json::Map<String, Value> = r.rows.into_iter().map(|(t, n)| (t, json!(n))).collect();
            Ok(json!({"erased_opportunities": r.opportunities, "rows": rows}))
        }
        ConsoleEvent::DeleteConnection { confirm } => {
            if confirm != cfg.warehouse.dataset {
                return Err(SyncError::Invariant(
                    "delete_connection needs \"confirm\" set to the dataset name".into(),
                ));
            }
            let dropped = ops::delete_connection(app.syncer.warehouse()).await?;
            Ok(json!({"dropped": dropped}))
        }
    }
}

async fn status(app: &ChainApp) -> Result<Value, SyncError> {
    app.syncer.store().ensure(&[]).await?;
    let states: Vec<Value> = app
        .syncer
        .store()
        .load_all()
        .await?
        .into_iter()
        .map(|s| {
            json!({
                "table": s.stream, "phase": s.phase.as_str(), "run_id": s.run_id, "hop": s.hop,
                "rows_staged": s.rows, "requests": s.requests,
                "cursor": s.cursor_ms.and_then(crate::rows::timestamp_text),
                "lease_until": s.lease_until_ms.and_then(crate::rows::timestamp_text), "last_error": s.last_error,
            })
        })
        .collect();
    let runs = app.syncer.store().recent_runs(20).await?;
    let recent: Vec<Value> = runs
        .rows
        .iter()
        .map(|r| {
            json!({
                "table": runs.str(r, "table_name"), "run_id": runs.str(r, "run_id"), "outcome": runs.str(r, "outcome"),
                "rows": runs.int(r, "row_count"), "requests": runs.int(r, "requests"),
                "finished_at": runs.int(r, "finished_at").and_then(crate::rows::timestamp_text),
                "error_code": runs.str(r, "error_code"),
            })
        })
        .collect();
    Ok(json!({"tables": states, "recent_runs": recent}))
}

/// Environment variables of the functions that name secrets rather than hold them.
pub const LEVER_KEY_SECRET_VAR: &str = "LEVER_API_KEY_SECRET_ID";
pub const GOOGLE_SECRET_VAR: &str = "GOOGLE_CREDENTIALS_SECRET_ID";

/// The configuration of a function: settings from its environment, the Lever key and the
/// Google credentials from Secrets Manager. A key in the environment itself is refused.
pub async fn lambda_config(env: &HashMap<String, String>, secrets: &Secrets, now_ms: i64) -> Result<Config, SyncError> {
    if env.contains_key("LEVER_API_KEY") {
        return Err(crate::config::ConfigError(format!(
            "LEVER_API_KEY must not be set on a function: store the key in Secrets Manager and set {LEVER_KEY_SECRET_VAR}"
        ))
        .into());
    }
    let mut raw = RawConfig::default();
    raw.apply_env(env)?;
    let secret_of = |var: &str| env.get(var).filter(|v| !v.trim().is_empty()).cloned();
    let key_id = secret_of(LEVER_KEY_SECRET_VAR)
        .ok_or_else(|| crate::config::ConfigError(format!("{LEVER_KEY_SECRET_VAR} is not set")))?;
    raw.lever.api_key = Some(secrets.get(&key_id, Some("api_key")).await.map_err(aws_error)?);
    if let Some(id) = secret_of(GOOGLE_SECRET_VAR) {
        raw.bigquery.credentials_json = Some(secrets.get(&id, None).await.map_err(aws_error)?);
    }
    Ok(raw.validate(now_ms)?)
}

fn aws_error(e: AwsError) -> SyncError {
    SyncError::Invariant(format!("{} ({})", e, e.code()))
}

/// The process environment, restricted to the settings the functions read.
pub fn settings_env() -> HashMap<String, String> {
    ENV_VARS
        .iter()
        .chain(&[LEVER_KEY_SECRET_VAR, GOOGLE_SECRET_VAR, "LEVER_API_KEY"])
        .filter_map(|k| std::env::var(k).ok().map(|v| ((*k).to_owned(), v)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_events_parse_and_bad_ones_are_explained() {
        assert_eq!(
            ConsoleEvent::parse(&json!({"action": "tick"})).unwrap(),
            ConsoleEvent::Tick {}
        );
        assert_eq!(
            ConsoleEvent::parse(&json!({"action": "sync", "tables": ["notes"]})).unwrap(),
            ConsoleEvent::Sync {
                tables: Some(vec!["notes".into()])
            }
        );
        assert_eq!(
            ConsoleEvent::parse(&json!({"action": "sync"})).unwrap(),
            ConsoleEvent::Sync { tables: None }
        );
        for bad in [
            json!({}),
            json!({"action": "explode"}),
            json!({"action": "full_refresh"}),
            json!("sync"),
            json!({"action": "status", "x": 1}),
        ] {
            let err = ConsoleEvent::parse(&bad).unwrap_err().to_string();
            assert!(err.contains("\"action\": \"sync\""), "{err}");
        }
    }

    #[test]
    fn the_sample_console_events_in_the_repository_are_valid() {
        for (name, text) in [
            ("sync-now", include_str!("../../infra/events/sync-now.json")),
            (
                "sync-now-tables",
                include_str!("../../infra/events/sync-now-tables.json"),
            ),
            ("full-refresh", include_str!("../../infra/events/full-refresh.json")),
            ("status", include_str!("../../infra/events/status.json")),
            ("erase", include_str!("../../infra/events/erase.json")),
            (
                "delete-connection",
                include_str!("../../infra/events/delete-connection.json"),
            ),
            ("scheduled-tick", include_str!("../../infra/events/scheduled-tick.json")),
        ] {
            let v: Value = serde_json::from_str(text).unwrap();
            assert!(ConsoleEvent::parse(&v).is_ok(), "{name}");
        }
    }

    #[test]
    fn chain_events_are_strict() {
        let e: ChainEvent = serde_json::from_value(json!({"table": "notes", "chain": "c", "hop": 3})).unwrap();
        assert_eq!(e.hop, 3);
        assert!(serde_json::from_value::<ChainEvent>(json!({"table": "notes", "hop": 3})).is_err());
        assert!(serde_json::from_value::<ChainEvent>(json!({"table": "notes", "chain": "c", "hop": "3"})).is_err());
    }
}
