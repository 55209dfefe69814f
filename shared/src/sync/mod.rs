//! One window of one stream, and the loop that runs windows until a run is done.
//!
//! A window: read the stream's state → take its lease → fetch a bounded number of pages (or the
//! children of one page of parents) → load the rows into the run's staging tables → save the new
//! position. The last window finalizes: MERGE staging into the targets, record the run, advance
//! the cursor, drop staging. Every step can run twice with the same end result: staging may hold
//! a window twice and finalize keeps the latest copy of each id.
//!
//! The Lambda and the CLI differ only in how the next window is started.

pub mod plan;
pub mod state;

use crate::catalog::{self, Column, Origin, SyncMode, TableDef};
use crate::config::{ChildSync, Config};
use crate::error::SyncError;
use crate::lever::{LeverClient, LeverError, Page};
use crate::rows::{self, RowMeta};
use crate::warehouse::schema::{self, WINDOW};
use crate::warehouse::Warehouse;
use futures::stream::{self, StreamExt};
use plan::{Phase, Query};
use serde_json::Value;
use state::{RunRecord, StateStore, SyncState};
use std::collections::BTreeSet;
use std::sync::Arc;

/// Times a query restarts from its first page after Lever refuses a token, within one window.
const MAX_OFFSET_RESTARTS: u32 = 3;
/// Staging tables outlive a crashed run by this much before BigQuery drops them.
const STAGING_TTL: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The boundaries inside a window where an invocation can die (Lambda timeout, crash).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checkpoint {
    /// Lever pages fetched, nothing written.
    AfterFetch,
    /// Rows loaded into staging, position not saved.
    AfterLoad,
    /// Position saved (the caller would now start the next window).
    AfterSave,
    /// One target merged, the others of the stream not yet (finalize cut off half way).
    AfterTableMerge,
    /// Targets merged, state not yet advanced.
    AfterMerge,
    /// Run recorded as succeeded in the history, state not yet advanced.
    AfterRunRecorded,
    /// Run recorded and state advanced, staging not yet dropped.
    AfterFinalizeState,
}

impl Checkpoint {
    /// Every checkpoint, in the order a run passes them.
    pub const ALL: [Checkpoint; 7] = [
        Checkpoint::AfterFetch,
        Checkpoint::AfterLoad,
        Checkpoint::AfterSave,
        Checkpoint::AfterTableMerge,
        Checkpoint::AfterMerge,
        Checkpoint::AfterRunRecorded,
        Checkpoint::AfterFinalizeState,
    ];

    /// Whether the checkpoint lies in the last window, which finalizes the run.
    pub fn in_finalize(self) -> bool {
        matches!(
            self,
            Checkpoint::AfterTableMerge
                | Checkpoint::AfterMerge
                | Checkpoint::AfterRunRecorded
                | Checkpoint::AfterFinalizeState
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            Checkpoint::AfterFetch => "after-fetch",
            Checkpoint::AfterLoad => "after-load",
            Checkpoint::AfterSave => "after-save",
            Checkpoint::AfterTableMerge => "after-table-merge",
            Checkpoint::AfterMerge => "after-merge",
            Checkpoint::AfterRunRecorded => "after-run-recorded",
            Checkpoint::AfterFinalizeState => "after-finalize-state",
        }
    }
}

/// Called at every checkpoint with the stream and hop; returning `true` stops the invocation
/// there as a crash would. Tests use it to prove that no stop point loses or duplicates rows.
pub type KillSwitch = Arc<dyn Fn(&str, Checkpoint, i64) -> bool + Send + Sync>;

pub fn system_clock() -> Clock {
    Arc::new(|| chrono::Utc::now().timestamp_millis())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableCount {
    pub table: String,
    pub rows: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSummary {
    pub stream: String,
    pub run_id: String,
    pub tables: Vec<TableCount>,
    pub windows: i64,
    pub requests: i64,
    pub retries: i64,
    pub started_ms: i64,
    pub finished_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WindowOutcome {
    /// A window was done; another is needed.
    Continue { run_id: String, hop: i64, rows: usize },
    /// The run finished with this window.
    Finished(RunSummary),
    /// Another chain holds the stream's lease.
    Busy,
    /// The event names a window that is already done (a duplicate delivery): nothing to do,
    /// and the caller must not start another window.
    Stale,
}

/// Rows of one window for one table, as NDJSON.
struct Staged {
    table: &'static TableDef,
    columns: Vec<&'static Column>,
    ndjson: Vec<u8>,
    rows: usize,
    /// Columns whose Lever field was present (even as null) in at least one record.
    present: BTreeSet<&'static str>,
}

impl Staged {
    fn push(&mut self, record: &Value, parent: Option<&str>, meta: &RowMeta<'_>, window: i64) -> Result<(), SyncError> {
        let mut row = rows::to_row(self.table, &self.columns, record, parent, meta)?;
        for c in &self.columns {
            let here = match c.source {
                catalog::Source::Field(path) => path.split('.').next().is_some_and(|f| record.get(f).is_some()),
                catalog::Source::ParentId => true,
            };
            if here {
                self.present.insert(c.name);
            }
        }
        row.insert(WINDOW.to_owned(), Value::from(window));
        serde_json::to_writer(&mut self.ndjson, &row).map_err(|e| SyncError::Invariant(e.to_string()))?;
        self.ndjson.push(b'\n');
        self.rows += 1;
        Ok(())
    }
}

fn quote(name: &str) -> String {
    format!("`{name}`")
}

/// Percent-encodes one path segment (ids are UUIDs, but a path must never be bent by data).
fn segment(id: &str) -> String {
    id.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// When a chain was made, read from its id (`chain-<epoch ms>-<uuid>`, see `chain`); `None`
/// for other lease owners (the command line, tests) and for ids without a time.
pub fn chain_made_ms(owner: &str) -> Option<i64> {
    let (ms, _) = owner.strip_prefix("chain-")?.split_once('-')?;
    ms.parse().ok()
}

fn new_run_id(now_ms: i64) -> String {
    let t = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(now_ms).unwrap_or_default();
    format!(
        "{}_{}",
        t.format("%Y%m%dT%H%M%S"),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

#[derive(Clone)]
pub struct Syncer {
    cfg: Arc<Config>,
    lever: LeverClient,
    wh: Warehouse,
    store: StateStore,
    owner: String,
    clock: Clock,
    kill: Option<KillSwitch>,
    /// No new page is started after this time (epoch ms): the invocation's deadline less a margin.
    deadline_ms: Option<i64>,
}

impl Syncer {
    pub fn new(cfg: Arc<Config>, lever: LeverClient, wh: Warehouse, owner: String, clock: Clock) -> Self {
        let store = StateStore::new(wh.clone());
        Syncer {
            cfg,
            lever,
            wh,
            store,
            owner,
            clock,
            kill: None,
            deadline_ms: None,
        }
    }

    /// The same syncer acting for another lease owner (a chain).
    pub fn with_owner(&self, owner: &str) -> Self {
        Syncer {
            owner: owner.to_owned(),
            ..self.clone()
        }
    }

    pub fn with_deadline(mut self, deadline_ms: Option<i64>) -> Self {
        self.deadline_ms = deadline_ms;
        self
    }

    /// Ends the stream's current run without finalizing it (a runaway chain): the targets are
    /// untouched, the cursor stays, the history records why, and the next run starts afresh.
    pub async fn abandon_run(&self, stream: &str, code: &str, message: &str) -> Result<(), SyncError> {
        let st = self.store.load(stream).await?;
        let mut next = SyncState::new(stream);
        next.cursor_ms = st.cursor_ms;
        next.flags.replace = st.flags.replace;
        next.flags.chain = st.flags.chain.clone();
        next.flags.stale_before_ms = st.flags.stale_before_ms;
        next.last_error = Some(format!("{code}: {message}"));
        if !self.store.save(&next, st.version).await? {
            return Err(SyncError::Invariant(format!("{stream} changed while ending its run")));
        }
        let now = (self.clock)();
        for t in self.cfg.selected_of_stream(stream) {
            self.store
                .record_run(&RunRecord {
                    table: t.name.to_owned(),
                    stream: stream.to_owned(),
                    run_id: st.run_id.clone().unwrap_or_default(),
                    started_ms: st.run_started_ms,
                    finished_ms: now,
                    rows: 0,
                    windows: st.hop,
                    requests: st.requests,
                    retries: st.retries,
                    outcome: "failed",
                    error_code: Some(code.to_owned()),
                    error: Some(message.to_owned()),
                })
                .await?;
        }
        if let Some(run) = &st.run_id {
            for (_, name) in self.staging(stream, run, st.flags.sweep) {
                self.wh.drop_table(&name).await?;
            }
        }
        Ok(())
    }

    pub fn with_kill_switch(mut self, kill: KillSwitch) -> Self {
        self.kill = Some(kill);
        self
    }

    fn checkpoint(&self, stream: &str, c: Checkpoint, hop: i64) -> Result<(), SyncError> {
        match &self.kill {
            Some(k) if k(stream, c, hop) => Err(SyncError::Killed(c.name())),
            _ => Ok(()),
        }
    }

    pub fn store(&self) -> &StateStore {
        &self.store
    }

    pub fn warehouse(&self) -> &Warehouse {
        &self.wh
    }

    pub fn lever(&self) -> &LeverClient {
        &self.lever
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Creates what the selected tables need: the dataset, the metadata tables and their state
    /// rows, the target tables (adding selected columns an existing target lacks).
    pub async fn setup(&self) -> Result<(), SyncError> {
        self.wh.ensure_dataset().await?;
        self.store.ensure(&self.cfg.streams()).await?;
        for t in &self.cfg.tables {
            let fields = schema::target_fields(t, &self.cfg.columns_of(t));
            match self.wh.table_columns(t.name).await? {
                None => self.wh.create_table(t.name, &fields, None).await?,
                Some(_) => {
                    self.wh.add_missing_columns(t.name, &fields).await?;
                }
            }
        }
        Ok(())
    }

    /// Runs windows of `stream` until its run finishes.
    pub async fn sync_stream(&self, stream: &str) -> Result<RunSummary, SyncError> {
        loop {
            match self.run_window(stream, None).await? {
                WindowOutcome::Continue { .. } => continue,
                WindowOutcome::Finished(s) => return Ok(s),
                WindowOutcome::Busy => {
                    return Err(SyncError::Invariant(format!(
                        "{stream} is being synced by another run right now; try again later"
                    )))
                }
                WindowOutcome::Stale => return Err(SyncError::Invariant(format!("{stream}: window already done"))),
            }
        }
    }

    /// Runs one window of `stream`. With `expected_hop` (an event's hop), a window that is
    /// already done is recognised and skipped.
    pub async fn run_window(&self, stream: &str, expected_hop: Option<i64>) -> Result<WindowOutcome, SyncError> {
        let stream_def =
            catalog::table(stream).ok_or_else(|| SyncError::Invariant(format!("unknown stream {stream}")))?;
        let st = self.store.load(stream).await?;
        if let Some(h) = expected_hop {
            // A first event starts a run unless it is a late copy of the one that started the
            // last run, or of a chain made before that run started (a run before the last).
            let earlier_chain = chain_made_ms(&self.owner)
                .zip(st.flags.stale_before_ms)
                .is_some_and(|(made, stale_before)| made < stale_before);
            let fresh_start = st.phase == Phase::Idle
                && h == 0
                && st.flags.chain.as_deref() != Some(self.owner.as_str())
                && !earlier_chain;
            if !fresh_start && (st.phase == Phase::Idle || st.hop != h) {
                return Ok(WindowOutcome::Stale);
            }
        }
        let now = (self.clock)();
        if st.leased_to_other(&self.owner, now) {
            return Ok(WindowOutcome::Busy);
        }
        let mut cur = st.clone();
        cur.lease_owner = Some(self.owner.clone());
        cur.lease_until_ms = Some(now + self.cfg.sync.lease.as_millis() as i64);
        if cur.phase == Phase::Idle {
            cur.run_id = Some(new_run_id(now));
            cur.run_started_ms = Some(now);
            cur.queries = plan::plan_queries(
                stream_def,
                self.cfg.start_ms,
                st.cursor_ms,
                now,
                self.cfg.sync.overlap.as_millis() as i64,
            );
            cur.query_index = 0;
            cur.position = None;
            cur.phase = Phase::Fetching;
            cur.hop = 0;
            cur.rows = 0;
            cur.requests = 0;
            cur.retries = 0;
            cur.last_error = None;
            cur.flags.chain = Some(self.owner.clone());
            // A sweep needs the last run's start; the first run and a reset read everything.
            cur.flags.sweep = matches!(self.cfg.sync.children, ChildSync::Sweep { .. })
                && matches!(stream_def.origin, Origin::PerParent { .. })
                && st.cursor_ms.is_some()
                && !st.flags.replace;
            cur.flags.stale_before_ms = Some(now);
        }
        if !self.store.save(&cur, st.version).await? {
            return Ok(WindowOutcome::Busy);
        }
        cur.version = st.version + 1;
        // What a failure records: the position as the window found it, never one the window
        // reached without loading what it passed.
        let leased = cur.clone();
        let result = match cur.phase {
            Phase::Finalizing => self.finalize(stream, &mut cur).await,
            _ => self.fetch_window(stream_def, &mut cur).await,
        };
        match result {
            Ok(outcome) => Ok(outcome),
            // A killed invocation writes nothing more, as a real crash would not.
            Err(e @ SyncError::Killed(_)) => Err(e),
            Err(e) => {
                self.record_failure(stream, &leased, &e).await;
                Err(e)
            }
        }
    }

    /// Saves the error in the state (keeping the position, so the next run resumes), frees the
    /// lease and writes a failed run to the history. Best effort: the original error wins.
    async fn record_failure(&self, stream: &str, cur: &SyncState, e: &SyncError) {
        let mut failed = cur.clone();
        failed.last_error = Some(format!("{}: {e}", e.code()));
        failed.lease_owner = None;
        failed.lease_until_ms = None;
        if let Err(se) = self.store.save(&failed, cur.version).await {
            tracing::warn!(
                table = stream,
                error_code = se.code(),
                "could not save the failure in the state"
            );
        }
        let now = (self.clock)();
        for t in self.cfg.selected_of_stream(stream) {
            let rec = RunRecord {
                table: t.name.to_owned(),
                stream: stream.to_owned(),
                run_id: cur.run_id.clone().unwrap_or_default(),
                started_ms: cur.run_started_ms,
                finished_ms: now,
                rows: 0,
                windows: cur.hop,
                requests: cur.requests,
                retries: cur.retries,
                outcome: "failed",
                error_code: Some(e.code().to_owned()),
                error: Some(e.to_string()),
            };
            if let Err(he) = self.store.record_run(&rec).await {
                tracing::warn!(
                    table = stream,
                    error_code = he.code(),
                    "could not record the failed run"
                );
            }
        }
    }

    /// The run's staging tables: one per selected table of the stream, for a stream with
    /// incremental tables one for Lever's deletions, and for a sweep one for the parents seen.
    fn staging(&self, stream: &str, run_id: &str, sweep: bool) -> Vec<(&'static TableDef, String)> {
        let tables = self.cfg.selected_of_stream(stream);
        let marks_deletions = tables
            .iter()
            .any(|t| t.mode == SyncMode::Incremental && t.opportunity_column().is_some());
        tables
            .into_iter()
            .chain(marks_deletions.then_some(&catalog::DELETIONS))
            .chain(sweep.then_some(&catalog::SWEPT))
            .map(|t| (t, schema::staging_table_name(t.name, run_id)))
            .collect()
    }

    /// The columns written for `t` (the run's own lists keep all of theirs).
    fn columns(&self, t: &'static TableDef) -> Vec<&'static Column> {
        if is_deletions(t) || is_swept(t) {
            t.columns.iter().collect()
        } else {
            self.cfg.columns_of(t)
        }
    }

    async fn fetch_window(
        &self,
        stream_def: &'static TableDef,
        cur: &mut SyncState,
    ) -> Result<WindowOutcome, SyncError> {
        let started = std::time::Instant::now();
        let stream = stream_def.name;
        let run_id = cur
            .run_id
            .clone()
            .ok_or_else(|| SyncError::Invariant("fetching without a run".into()))?;
        let staging = self.staging(stream, &run_id, cur.flags.sweep);
        for (t, name) in &staging {
            let fields = schema::staging_fields(t, &self.columns(t));
            let names: Vec<String> = fields.iter().map(|f| f.name.to_owned()).collect();
            match cur.flags.staged_columns.get(name.as_str()) {
                Some(made) if names.iter().all(|n| made.contains(n)) => {}
                // First window, or the settings changed during the run: make what is missing.
                _ => {
                    self.wh.create_table(name, &fields, Some(STAGING_TTL)).await?;
                    if cur.hop > 0 {
                        self.wh.add_missing_columns(name, &fields).await?;
                    }
                    let made = cur.flags.staged_columns.entry(name.clone()).or_default();
                    for n in names {
                        if !made.contains(&n) {
                            made.push(n);
                        }
                    }
                }
            }
        }
        let hop = cur.hop;
        let client = self.lever.scoped();
        let now = (self.clock)();
        let meta = RowMeta {
            run_id: &run_id,
            synced_at_ms: now,
        };
        let mut batch: Vec<Staged> = staging
            .iter()
            .map(|(t, _)| Staged {
                table: t,
                columns: self.columns(t),
                ndjson: Vec::new(),
                rows: 0,
                present: BTreeSet::new(),
            })
            .collect();
        let sweep = match (cur.flags.sweep, self.cfg.sync.children, cur.cursor_ms) {
            (true, ChildSync::Sweep { period }, Some(from)) => Some(Sweep {
                from_ms: from,
                now_ms: cur.run_started_ms.unwrap_or(now),
                overlap_ms: self.cfg.sync.overlap.as_millis() as i64,
                period_ms: period.as_millis() as i64,
            }),
            _ => None,
        };
        // A child window fetches the children of about a page of parents: one page, or in a
        // sweep as many pages as it takes to find that many parents to re-read.
        let pages = match (stream_def.origin, &sweep) {
            (Origin::PerParent { .. }, None) => 1,
            _ => self.cfg.sync.pages_per_window,
        };
        let mut reread_in_window = 0usize;
        let mut pages_read = 0u32;
        for page_no in 0..pages {
            if page_no > 0 && self.deadline_ms.is_some_and(|d| (self.clock)() >= d) {
                // Leave the rest for the next invocation rather than be cut off mid-write.
                break;
            }
            let query = cur
                .queries
                .get(cur.query_index)
                .cloned()
                .ok_or_else(|| SyncError::Invariant("position past the last query".into()))?;
            let (page, token) = self.walk_page(&client, stream_def, &query, cur).await?;
            pages_read += 1;
            let kept: Vec<&Value> = page.data.iter().filter(|r| plan::keep(&query, r)).collect();
            if query.deletions {
                for s in batch.iter_mut().filter(|s| is_deletions(s.table)) {
                    for rec in &kept {
                        s.push(rec, None, &meta, hop)?;
                    }
                }
            } else if let Origin::PerParent { path, .. } = stream_def.origin {
                let mut ids: Vec<String> = Vec::new();
                for r in &kept {
                    let Some(id) = rows::record_id(r) else { continue };
                    let reread = sweep
                        .as_ref()
                        .is_none_or(|w| plan::sweep_rereads(r, w.from_ms, w.now_ms, w.overlap_ms, w.period_ms));
                    if sweep.is_some() {
                        let seen = serde_json::json!({ "id": id, "reread": reread });
                        for s in batch.iter_mut().filter(|s| is_swept(s.table)) {
                            s.push(&seen, None, &meta, hop)?;
                        }
                    }
                    if reread {
                        ids.push(id.to_owned());
                    }
                }
                reread_in_window += ids.len();
                let children = self.fetch_children(&client, path, stream_def, ids).await?;
                for (parent, records) in &children {
                    for rec in records {
                        for s in batch
                            .iter_mut()
                            .filter(|s| !is_deletions(s.table) && !is_swept(s.table))
                        {
                            s.push(rec, Some(parent), &meta, hop)?;
                        }
                    }
                }
            } else {
                for rec in &kept {
                    for s in batch.iter_mut().filter(|s| !is_deletions(s.table)) {
                        match s.table.origin {
                            Origin::Inline { field, .. } => {
                                for child in inline_records(rec, field, s.table.name)? {
                                    s.push(child, None, &meta, hop)?;
                                }
                            }
                            _ => s.push(rec, None, &meta, hop)?,
                        }
                    }
                }
            }
            let pos = plan::advance(cur.query_index, cur.queries.len(), token);
            cur.query_index = pos.query_index;
            cur.position = pos.token;
            if pos.done {
                cur.phase = Phase::Finalizing;
                break;
            }
            if reread_in_window >= crate::lever::PAGE_LIMIT as usize {
                break;
            }
        }
        self.checkpoint(stream, Checkpoint::AfterFetch, hop)?;
        for s in &batch {
            let seen = cur.flags.present.entry(s.table.name.to_owned()).or_default();
            for c in &s.present {
                if !seen.iter().any(|x| x == c) {
                    seen.push((*c).to_owned());
                }
            }
        }
        let mut staged_rows = 0usize;
        for (s, (_, name)) in batch.into_iter().zip(&staging) {
            staged_rows += s.rows;
            // Unique per attempt: BigQuery answers a reused job id with the first attempt's job.
            let job_id = load_job_id(name, hop, cur.version);
            self.wh.load_ndjson(name, &job_id, s.ndjson).await?;
        }
        self.checkpoint(stream, Checkpoint::AfterLoad, hop)?;
        let stats = client.stats().snapshot();
        cur.hop += 1;
        cur.rows += staged_rows as i64;
        cur.requests += stats.requests as i64;
        cur.retries += stats.retries as i64;
        cur.lease_until_ms = Some((self.clock)() + self.cfg.sync.lease.as_millis() as i64);
        if !self.store.save(cur, cur.version).await? {
            return Ok(WindowOutcome::Busy);
        }
        cur.version += 1;
        self.checkpoint(stream, Checkpoint::AfterSave, hop)?;
        tracing::info!(
            table = stream,
            run_id = %run_id,
            hop = cur.hop,
            pages = pages_read,
            rows = staged_rows,
            requests = stats.requests,
            retries = stats.retries,
            duration_ms = started.elapsed().as_millis() as u64,
            phase = cur.phase.as_str(),
            "window done"
        );
        Ok(WindowOutcome::Continue {
            run_id,
            hop: cur.hop,
            rows: staged_rows,
        })
    }

    /// One page of the stream's walk. A refused token restarts the query from its first page:
    /// the pages read again are deduplicated at finalize. A key that may not read confidential
    /// opportunities gets the others, and the run says so in its history.
    async fn walk_page(
        &self,
        client: &LeverClient,
        stream_def: &TableDef,
        q: &Query,
        cur: &mut SyncState,
    ) -> Result<(Page, Option<String>), SyncError> {
        let per_parent = matches!(stream_def.origin, Origin::PerParent { .. });
        let path = if q.deletions {
            plan::DELETED_PATH
        } else {
            plan::walked_path(stream_def)
        };
        let fixed: &[(&str, &str)] = match (q.deletions, stream_def.origin) {
            (true, _) => &[],
            (_, Origin::PerParent { parent, .. }) => catalog::table(parent).map_or(&[], |p| p.fixed_params),
            _ => stream_def.fixed_params,
        };
        let mut restarts = 0;
        loop {
            let no_confidential = cur.flags.no_confidential;
            let mut params: Vec<(&str, String)> = fixed
                .iter()
                // Child walks need only the parents' ids, not their applications.
                .filter(|(k, _)| !(per_parent && *k == "expand"))
                .filter(|(k, _)| !(no_confidential && *k == "confidentiality"))
                .map(|(k, v)| (*k, (*v).to_owned()))
                .collect();
            params.extend(q.params.iter().map(|(k, v)| (k.as_str(), v.clone())));
            let asked_confidential = params.iter().any(|(k, _)| *k == "confidentiality");
            match client.list_page(path, &params, cur.position.as_deref()).await {
                Ok(page) => {
                    let next = page.next.clone();
                    return Ok((page, next));
                }
                Err(LeverError::InvalidOffset { .. }) if cur.position.is_some() && restarts < MAX_OFFSET_RESTARTS => {
                    restarts += 1;
                    tracing::warn!(
                        table = stream_def.name,
                        "Lever refused the paging token; restarting the query"
                    );
                    cur.position = None;
                }
                Err(LeverError::Forbidden { ref message, .. })
                    if asked_confidential && message.to_ascii_lowercase().contains("confidential") =>
                {
                    tracing::warn!(
                        table = stream_def.name,
                        error_code = NO_CONFIDENTIAL,
                        "the API key may not read confidential opportunities; syncing the others"
                    );
                    cur.flags.no_confidential = true;
                    // Any token belonged to the query with the confidentiality filter.
                    cur.position = None;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Every child record of each parent, fetched concurrently within the shared rate budget.
    async fn fetch_children(
        &self,
        client: &LeverClient,
        path: &str,
        t: &TableDef,
        parents: Vec<String>,
    ) -> Result<Vec<(String, Vec<Value>)>, SyncError> {
        let results: Vec<Result<(String, Vec<Value>), SyncError>> = stream::iter(parents)
            .map(|parent| async move {
                let url = format!("/opportunities/{}/{path}", segment(&parent));
                let params: Vec<(&str, String)> = t.fixed_params.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
                let mut out = Vec::new();
                let mut token: Option<String> = None;
                let mut restarts = 0;
                loop {
                    match client.list_page(&url, &params, token.as_deref()).await {
                        Ok(page) => {
                            out.extend(page.data);
                            match page.next {
                                Some(n) => token = Some(n),
                                None => break,
                            }
                        }
                        // Lever has answered 404 for an opportunity with no records of a kind.
                        Err(LeverError::NotFound { .. }) => {
                            out.clear();
                            break;
                        }
                        Err(LeverError::InvalidOffset { .. }) if token.is_some() && restarts < MAX_OFFSET_RESTARTS => {
                            restarts += 1;
                            out.clear();
                            token = None;
                        }
                        Err(e) => return Err(SyncError::from(e)),
                    }
                }
                Ok((parent, out))
            })
            .buffer_unordered(self.cfg.sync.child_concurrency)
            .collect()
            .await;
        results.into_iter().collect()
    }

    async fn finalize(&self, stream: &str, cur: &mut SyncState) -> Result<WindowOutcome, SyncError> {
        let run_id = cur
            .run_id
            .clone()
            .ok_or_else(|| SyncError::Invariant("finalizing without a run".into()))?;
        let staging = self.staging(stream, &run_id, cur.flags.sweep);
        let now = (self.clock)();
        // Staging exists from the first window on; if it is gone (expired, dropped) its rows are
        // lost, and replacing a table from it would delete what it held.
        let mut staged_columns = std::collections::HashMap::new();
        for (_, name) in &staging {
            let cols = self.wh.table_columns(name).await?.ok_or_else(|| {
                SyncError::Invariant(format!(
                    "the staging table {name} of run {run_id} is gone (expired or dropped): reset the table to start over"
                ))
            })?;
            staged_columns.insert(name.clone(), cols);
        }
        let mut counts = Vec::new();
        let swept = staging.iter().find(|(t, _)| is_swept(t)).map(|(_, n)| n.clone());
        for (t, name) in staging.iter().filter(|(t, _)| !is_deletions(t) && !is_swept(t)) {
            let replace = (t.mode == SyncMode::FullRefresh && swept.is_none()) || cur.flags.replace;
            let columns = self.columns(t);
            let n = self
                .wh
                .query(
                    &format!(
                        "SELECT COUNT(DISTINCT {}) AS n FROM {}",
                        quote(t.key),
                        self.wh.table_ref(name)
                    ),
                    &[],
                )
                .await?;
            let rows = n.rows.first().and_then(|r| n.int(r, "n")).unwrap_or(0);
            // A field no record of a non-empty full refresh carried has vanished from Lever:
            // a replaced table matches Lever now, so its column goes. Incremental tables keep it.
            let present = cur.flags.present.get(t.name);
            let staged = staged_columns.get(name.as_str()).cloned().unwrap_or_default();
            let merged: Vec<&Column> = columns
                .iter()
                .copied()
                // A column selected after the run began was never staged: it fills next run.
                .filter(|c| staged.iter().any(|s| s == c.name))
                .filter(|c| {
                    !(replace && rows > 0)
                        || c.name == t.key
                        || c.source == catalog::Source::ParentId
                        || present.is_some_and(|p| p.iter().any(|x| x == c.name))
                })
                .collect();
            let target_fields = schema::target_fields(t, &merged);
            let target_columns = self.wh.add_missing_columns(t.name, &target_fields).await?;
            if replace {
                let keep: Vec<&str> = target_fields.iter().map(|f| f.name).collect();
                for extra in target_columns {
                    if !keep.contains(&extra.as_str()) {
                        self.wh
                            .execute(
                                &format!(
                                    "ALTER TABLE {} DROP COLUMN IF EXISTS {}",
                                    self.wh.table_ref(t.name),
                                    quote(&extra)
                                ),
                                &[],
                            )
                            .await?;
                    }
                }
            }
            let sql = match &swept {
                Some(parents) if !replace => sweep_merge_sql(&self.wh, t, &merged, name, parents),
                _ => merge_sql(&self.wh, t, &merged, name, replace),
            };
            self.wh.execute(&sql, &[]).await?;
            counts.push(TableCount {
                table: t.name.to_owned(),
                rows,
            });
            self.checkpoint(stream, Checkpoint::AfterTableMerge, cur.hop)?;
        }
        if let Some((_, deletions)) = staging.iter().find(|(t, _)| is_deletions(t)) {
            for t in self
                .cfg
                .selected_of_stream(stream)
                .into_iter()
                .filter(|t| t.mode == SyncMode::Incremental)
            {
                if let Some(col) = t.opportunity_column() {
                    self.wh
                        .execute(&mark_deleted_sql(&self.wh, t.name, col, deletions), &[])
                        .await?;
                }
            }
        }
        self.checkpoint(stream, Checkpoint::AfterMerge, cur.hop)?;
        let note = cur.flags.no_confidential.then(|| {
            "the API key may not read confidential opportunities: only non-confidential ones were synced".to_owned()
        });
        for c in &counts {
            self.store
                .record_run(&RunRecord {
                    table: c.table.clone(),
                    stream: stream.to_owned(),
                    run_id: run_id.clone(),
                    started_ms: cur.run_started_ms,
                    finished_ms: now,
                    rows: c.rows,
                    windows: cur.hop,
                    requests: cur.requests,
                    retries: cur.retries,
                    outcome: "succeeded",
                    error_code: note.as_ref().map(|_| NO_CONFIDENTIAL.to_owned()),
                    error: note.clone(),
                })
                .await?;
        }
        self.checkpoint(stream, Checkpoint::AfterRunRecorded, cur.hop)?;
        let summary = RunSummary {
            stream: stream.to_owned(),
            run_id: run_id.clone(),
            tables: counts,
            windows: cur.hop,
            requests: cur.requests,
            retries: cur.retries,
            started_ms: cur.run_started_ms.unwrap_or(now),
            finished_ms: now,
        };
        let stream_def =
            catalog::table(stream).ok_or_else(|| SyncError::Invariant(format!("unknown stream {stream}")))?;
        let mut done = SyncState::new(stream);
        done.flags.chain = cur.flags.chain.clone();
        done.flags.stale_before_ms = cur.flags.stale_before_ms;
        done.cursor_ms = match (stream_def.mode, stream_def.origin) {
            // A child table's cursor is where its next sweep starts looking for changes.
            (SyncMode::Incremental, _) | (_, Origin::PerParent { .. }) => cur.run_started_ms,
            (SyncMode::FullRefresh, _) => cur.cursor_ms,
        };
        if !self.store.save(&done, cur.version).await? {
            return Ok(WindowOutcome::Busy);
        }
        self.checkpoint(stream, Checkpoint::AfterFinalizeState, cur.hop)?;
        for (_, name) in &staging {
            if let Err(e) = self.wh.drop_table(name).await {
                // It expires on its own; the run is complete either way.
                tracing::warn!(table = stream, staging = %name, error_code = e.code(), "could not drop a staging table");
            }
        }
        tracing::info!(
            table = stream,
            run_id = %run_id,
            windows = summary.windows,
            requests = summary.requests,
            "run finished"
        );
        Ok(WindowOutcome::Finished(summary))
    }
}

/// The code a run records when the key could not read confidential opportunities.
pub const NO_CONFIDENTIAL: &str = "lever_no_confidential_access";

fn is_deletions(t: &TableDef) -> bool {
    std::ptr::eq(t, &catalog::DELETIONS) || t.name == catalog::DELETIONS.name
}

fn is_swept(t: &TableDef) -> bool {
    t.name == catalog::SWEPT.name
}

/// The span a sweep run covers (see `plan::sweep_rereads`).
struct Sweep {
    from_ms: i64,
    now_ms: i64,
    overlap_ms: i64,
    period_ms: i64,
}

/// The records inlined in `record` under `field` (expanded applications). Ids instead of
/// objects mean the expansion did not happen: refusing beats syncing an empty table.
fn inline_records<'a>(record: &'a Value, field: &str, table: &str) -> Result<Vec<&'a Value>, SyncError> {
    match record.get(field) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| {
                if i.is_object() {
                    Ok(i)
                } else {
                    Err(SyncError::Invariant(format!(
                        "{table}: Lever sent ids, not objects, under `{field}`: the expand parameter was ignored"
                    )))
                }
            })
            .collect(),
        Some(_) => Err(SyncError::Invariant(format!("{table}: `{field}` is not a list"))),
    }
}

/// A load job id unique to one attempt at one window (`version` is the state version the
/// attempt holds), so BigQuery never mistakes a retry for the first attempt.
pub fn load_job_id(staging: &str, hop: i64, version: i64) -> String {
    format!("lever_sync_{staging}_w{hop}_v{version}")
}

/// Latest copy of each id from staging into the target. A replace (full refresh, or a reset)
/// also deletes what the run did not see, which makes the MERGE an atomic replace that keeps
/// the table's schema. Erased people never come back.
pub fn merge_sql(wh: &Warehouse, t: &TableDef, columns: &[&Column], staging: &str, replace: bool) -> String {
    let names: Vec<String> = columns
        .iter()
        .map(|c| c.name)
        .chain([catalog::SYNCED_AT, catalog::RUN_ID])
        .map(quote)
        .collect();
    let key = quote(t.key);
    let set = names
        .iter()
        .filter(|n| **n != key)
        .map(|n| format!("{n} = S.{n}"))
        .collect::<Vec<_>>()
        .join(", ");
    let insert_values = names.iter().map(|n| format!("S.{n}")).collect::<Vec<_>>().join(", ");
    let delete = if replace {
        " WHEN NOT MATCHED BY SOURCE THEN DELETE"
    } else {
        ""
    };
    let erased = wh.table_ref(schema::ERASED_TABLE);
    // NOT EXISTS, not NOT IN: a NULL key must not make every row vanish.
    let mut keep = String::new();
    if let Some(col) = t.opportunity_column() {
        keep += &format!(
            " AND NOT EXISTS (SELECT 1 FROM {erased} E WHERE E.kind = 'opportunity' AND E.id = R.{})",
            quote(col)
        );
    }
    if t.name == "applications" {
        keep += &format!(" AND NOT EXISTS (SELECT 1 FROM {erased} E WHERE E.kind = 'application' AND E.id = R.{key})");
    }
    let cols = names.join(", ");
    let r_cols = names.iter().map(|n| format!("R.{n}")).collect::<Vec<_>>().join(", ");
    format!(
        "MERGE {target} T USING (SELECT {r_cols} FROM {stg} R WHERE TRUE{keep} \
         QUALIFY ROW_NUMBER() OVER (PARTITION BY R.{key} ORDER BY R.{window} DESC) = 1) S \
         ON T.{key} = S.{key} WHEN MATCHED THEN UPDATE SET {set} \
         WHEN NOT MATCHED THEN INSERT ({cols}) VALUES ({insert_values}){delete}",
        target = wh.table_ref(t.name),
        stg = wh.table_ref(staging),
        window = quote(WINDOW),
    )
}

/// The MERGE of a sweep run of a child table: the latest copy of each staged row goes in, and
/// the rows of re-read opportunities that were not staged again (deleted in Lever) and the rows
/// of opportunities the walk no longer saw (deleted or out of scope) go. The rows to delete ride
/// in the source as tombstones, so the whole change is one atomic statement.
pub fn sweep_merge_sql(wh: &Warehouse, t: &TableDef, columns: &[&Column], staging: &str, swept: &str) -> String {
    let Some(parent) = t.opportunity_column() else {
        // Only per-opportunity tables are swept; anything else keeps the plain merge.
        return merge_sql(wh, t, columns, staging, false);
    };
    let names: Vec<String> = columns
        .iter()
        .map(|c| c.name)
        .chain([catalog::SYNCED_AT, catalog::RUN_ID])
        .map(quote)
        .collect();
    let key = quote(t.key);
    let parent = quote(parent);
    let set = names
        .iter()
        .filter(|n| **n != key)
        .map(|n| format!("{n} = S.{n}"))
        .collect::<Vec<_>>()
        .join(", ");
    let cols = names.join(", ");
    let insert_values = names.iter().map(|n| format!("S.{n}")).collect::<Vec<_>>().join(", ");
    let r_cols = names.iter().map(|n| format!("R.{n}")).collect::<Vec<_>>().join(", ");
    let tomb_cols = names
        .iter()
        .map(|n| {
            if *n == key {
                format!("D.{n}")
            } else {
                format!("NULL AS {n}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ");
    let erased = wh.table_ref(schema::ERASED_TABLE);
    let (target, stg, swept) = (wh.table_ref(t.name), wh.table_ref(staging), wh.table_ref(swept));
    format!(
        "MERGE {target} T USING (         SELECT {r_cols}, FALSE AS _drop FROM {stg} R          WHERE NOT EXISTS (SELECT 1 FROM {erased} E WHERE E.kind = 'opportunity' AND E.id = R.{parent})          QUALIFY ROW_NUMBER() OVER (PARTITION BY R.{key} ORDER BY R.{window} DESC) = 1          UNION ALL SELECT {tomb_cols}, TRUE AS _drop FROM {target} D          WHERE NOT EXISTS (SELECT 1 FROM {stg} R2 WHERE R2.{key} = D.{key})          AND (NOT EXISTS (SELECT 1 FROM {swept} P WHERE P.id = D.{parent})          OR EXISTS (SELECT 1 FROM {swept} P WHERE P.id = D.{parent} AND P.reread))         ) S ON T.{key} = S.{key}          WHEN MATCHED AND S._drop THEN DELETE          WHEN MATCHED THEN UPDATE SET {set}          WHEN NOT MATCHED AND NOT S._drop THEN INSERT ({cols}) VALUES ({insert_values})",
        window = quote(WINDOW),
    )
}

/// Marks the rows of opportunities Lever deleted (the row stays; `_deleted_at` says when).
pub fn mark_deleted_sql(wh: &Warehouse, table: &str, opportunity_column: &str, deletions: &str) -> String {
    format!(
        "UPDATE {target} T SET {deleted_at} = D.deleted_at \
         FROM (SELECT id, MAX(deleted_at) AS deleted_at FROM {stg} GROUP BY id) D \
         WHERE T.{col} = D.id AND T.{deleted_at} IS NULL",
        target = wh.table_ref(table),
        deleted_at = quote(catalog::DELETED_AT),
        stg = wh.table_ref(deletions),
        col = quote(opportunity_column),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn load_job_ids_differ_between_attempts_at_one_window() {
        assert_ne!(load_job_id("_stg_notes_r1", 3, 7), load_job_id("_stg_notes_r1", 3, 8));
        assert_ne!(load_job_id("_stg_notes_r1", 3, 7), load_job_id("_stg_notes_r1", 4, 7));
    }

    #[test]
    fn path_segments_cannot_escape() {
        assert_eq!(
            segment("784ff8e2-4536-4d65-8b29-e2dbeb0e8bef"),
            "784ff8e2-4536-4d65-8b29-e2dbeb0e8bef"
        );
        assert_eq!(segment("../users?x=1"), "..%2Fusers%3Fx%3D1");
    }

    #[test]
    fn expanded_applications_are_inline_records() {
        let rec = json!({"id": "o", "applications": [{"id": "a"}]});
        assert_eq!(inline_records(&rec, "applications", "applications").unwrap().len(), 1);
        let ids = json!({"id": "o", "applications": ["a"]});
        assert!(inline_records(&ids, "applications", "applications").is_err());
    }

    #[test]
    fn chain_ids_tell_when_the_chain_was_made() {
        assert_eq!(chain_made_ms("chain-1700000000000-0123abcd"), Some(1_700_000_000_000));
        assert_eq!(chain_made_ms("chain-0123abcdef"), None);
        assert_eq!(chain_made_ms("dispatch"), None);
        assert_eq!(chain_made_ms("chain-x-y"), None);
    }

    #[test]
    fn run_ids_sort_by_time_and_are_unique() {
        let a = new_run_id(1_700_000_000_000);
        let b = new_run_id(1_700_000_000_000);
        assert!(a.starts_with("20231114T221320_"));
        assert_ne!(a, b);
    }
}
