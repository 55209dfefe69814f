//! The sync state of each stream, kept in the dataset's state table, and the run history.
//!
//! Every write of a state row is a compare-and-set on its `version`, checked through the number
//! of affected rows: two chains of one stream can never both advance it.

use super::plan::{Phase, Query};
use crate::warehouse::schema::{ERASED_FIELDS, ERASED_TABLE, HISTORY_FIELDS, HISTORY_TABLE, STATE_FIELDS, STATE_TABLE};
use crate::warehouse::{Param, Rows, Warehouse, WarehouseError};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// Facts about the current run (and requests for the next one) kept in the state row.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunFlags {
    /// Replace the targets at the end of this run even for incremental tables (after a reset).
    #[serde(default)]
    pub replace: bool,
    /// The key may not read confidential opportunities: this run lists the others only.
    #[serde(default)]
    pub no_confidential: bool,
    /// Per table, the columns whose Lever field was present in at least one record this run.
    #[serde(default)]
    pub present: BTreeMap<String, Vec<String>>,
    /// Per staging table, the columns it was made with (a settings change mid-run adds more).
    #[serde(default)]
    pub staged_columns: BTreeMap<String, Vec<String>>,
    /// The chain that started the current (or last) run: its late duplicate first event must
    /// not start another run.
    #[serde(default)]
    pub chain: Option<String>,
    /// This run of a child table is a sweep: it re-reads the children of changed opportunities
    /// and of a rotating slice of the others (see `ChildSync::Sweep`).
    #[serde(default)]
    pub sweep: bool,
    /// A chain made before this time (epoch ms) is an earlier one: its late first event must not
    /// start a run either. Set when a run starts and by a reset.
    #[serde(default)]
    pub stale_before_ms: Option<i64>,
    /// A token unique to one write of the row: after a lost answer, finding our own token is
    /// how a retried write knows it had succeeded (two writers never share one).
    #[serde(default)]
    pub write: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SyncState {
    pub stream: String,
    pub run_id: Option<String>,
    pub phase: Phase,
    pub queries: Vec<Query>,
    pub query_index: usize,
    /// The `next` token of the current query; `None` = its first page.
    pub position: Option<String>,
    /// Start of the last successful run (incremental streams read from here, less the overlap).
    pub cursor_ms: Option<i64>,
    pub run_started_ms: Option<i64>,
    /// Windows done in the current run.
    pub hop: i64,
    pub rows: i64,
    pub requests: i64,
    pub retries: i64,
    pub lease_owner: Option<String>,
    pub lease_until_ms: Option<i64>,
    pub version: i64,
    pub last_error: Option<String>,
    pub flags: RunFlags,
}

impl SyncState {
    pub fn new(stream: &str) -> Self {
        SyncState {
            stream: stream.to_owned(),
            run_id: None,
            phase: Phase::Idle,
            queries: Vec::new(),
            query_index: 0,
            position: None,
            cursor_ms: None,
            run_started_ms: None,
            hop: 0,
            rows: 0,
            requests: 0,
            retries: 0,
            lease_owner: None,
            lease_until_ms: None,
            version: 0,
            last_error: None,
            flags: RunFlags::default(),
        }
    }

    /// Held by someone else, and not yet expired.
    pub fn leased_to_other(&self, owner: &str, now_ms: i64) -> bool {
        match (&self.lease_owner, self.lease_until_ms) {
            (Some(o), Some(until)) => o != owner && until > now_ms,
            _ => false,
        }
    }
}

/// One row of the run history.
#[derive(Debug, Clone)]
pub struct RunRecord {
    pub table: String,
    pub stream: String,
    pub run_id: String,
    pub started_ms: Option<i64>,
    pub finished_ms: i64,
    pub rows: i64,
    pub windows: i64,
    pub requests: i64,
    pub retries: i64,
    pub outcome: &'static str,
    pub error_code: Option<String>,
    pub error: Option<String>,
}

#[derive(Clone)]
pub struct StateStore {
    wh: Warehouse,
}

const SELECT_STATE: &str = "stream, run_id, phase, queries, query_index, position, \
    UNIX_MILLIS(cursor) AS cursor, UNIX_MILLIS(run_started_at) AS run_started_at, hop, staged_rows, requests, retries, \
    lease_owner, UNIX_MILLIS(lease_until) AS lease_until, version, last_error, flags";

impl StateStore {
    pub fn new(wh: Warehouse) -> Self {
        StateStore { wh }
    }

    /// Creates the metadata tables and a state row for each stream that has none. The insert is
    /// one MERGE, so concurrent callers cannot create a stream's row twice.
    pub async fn ensure(&self, streams: &[&str]) -> Result<(), WarehouseError> {
        for (table, fields) in [
            (STATE_TABLE, STATE_FIELDS),
            (HISTORY_TABLE, HISTORY_FIELDS),
            (ERASED_TABLE, ERASED_FIELDS),
        ] {
            match self.wh.table_columns(table).await? {
                None => self.wh.create_table(table, fields, None).await?,
                // A dataset written by an older version gains the new metadata columns.
                Some(_) => {
                    self.wh.add_missing_columns(table, fields).await?;
                }
            }
        }
        if streams.is_empty() {
            return Ok(());
        }
        let source = streams
            .iter()
            .enumerate()
            .map(|(i, _)| format!("SELECT @s{i} AS stream"))
            .collect::<Vec<_>>()
            .join(" UNION ALL ");
        let names: Vec<String> = (0..streams.len()).map(|i| format!("s{i}")).collect();
        let params: Vec<(&str, Param)> = names
            .iter()
            .zip(streams)
            .map(|(n, s)| (n.as_str(), Param::str(*s)))
            .collect();
        let sql = format!(
            "MERGE {t} T USING ({source}) S ON T.stream = S.stream \
             WHEN NOT MATCHED THEN INSERT (stream, phase, query_index, hop, staged_rows, requests, retries, version) \
             VALUES (S.stream, 'idle', 0, 0, 0, 0, 0, 0)",
            t = self.wh.table_ref(STATE_TABLE)
        );
        self.wh.execute(&sql, &params).await.map(|_| ())
    }

    pub async fn load(&self, stream: &str) -> Result<SyncState, WarehouseError> {
        let rows = self
            .wh
            .query(
                &format!(
                    "SELECT {SELECT_STATE} FROM {} WHERE stream = @stream",
                    self.wh.table_ref(STATE_TABLE)
                ),
                &[("stream", Param::str(stream))],
            )
            .await?;
        match rows.rows.as_slice() {
            [] => Err(WarehouseError::Unexpected(format!(
                "no state row for {stream}: run setup first"
            ))),
            [row] => decode(&rows, row),
            _ => Err(WarehouseError::Unexpected(format!(
                "{} state rows for {stream}",
                rows.rows.len()
            ))),
        }
    }

    pub async fn load_all(&self) -> Result<Vec<SyncState>, WarehouseError> {
        let rows = self
            .wh
            .query(
                &format!(
                    "SELECT {SELECT_STATE} FROM {} ORDER BY stream",
                    self.wh.table_ref(STATE_TABLE)
                ),
                &[],
            )
            .await?;
        rows.rows.iter().map(|r| decode(&rows, r)).collect()
    }

    /// Writes `next` if the stored row still has `expected_version`; returns whether it did.
    /// On success the stored version is `expected_version + 1`. When the write reports no row
    /// (as after a lost response whose retry found its own write), the stored row decides.
    pub async fn save(&self, next: &SyncState, expected_version: i64) -> Result<bool, WarehouseError> {
        let mut next = next.clone();
        let token = uuid::Uuid::new_v4().simple().to_string();
        next.flags.write = Some(token.clone());
        if self.save_once(&next, expected_version).await? {
            return Ok(true);
        }
        let stored = self.load(&next.stream).await?;
        Ok(stored.version == expected_version + 1 && stored.flags.write.as_deref() == Some(token.as_str()))
    }

    async fn save_once(&self, next: &SyncState, expected_version: i64) -> Result<bool, WarehouseError> {
        let queries = serde_json::to_string(&next.queries).map_err(|e| WarehouseError::Unexpected(e.to_string()))?;
        let flags = serde_json::to_string(&next.flags).map_err(|e| WarehouseError::Unexpected(e.to_string()))?;
        let sql = format!(
            "UPDATE {} SET run_id = @run_id, phase = @phase, queries = @queries, query_index = @query_index, \
             position = @position, cursor = TIMESTAMP_MILLIS(@cursor), run_started_at = TIMESTAMP_MILLIS(@run_started), \
             hop = @hop, staged_rows = @rows, requests = @requests, retries = @retries, lease_owner = @lease_owner, \
             lease_until = TIMESTAMP_MILLIS(@lease_until), version = @version + 1, updated_at = CURRENT_TIMESTAMP(), \
             last_error = @last_error, flags = @flags WHERE stream = @stream AND version = @version",
            self.wh.table_ref(STATE_TABLE)
        );
        let params = [
            ("run_id", Param::Str(next.run_id.clone())),
            ("phase", Param::str(next.phase.as_str())),
            ("queries", Param::Str(Some(queries))),
            ("query_index", Param::Int(Some(next.query_index as i64))),
            ("position", Param::Str(next.position.clone())),
            ("cursor", Param::Int(next.cursor_ms)),
            ("run_started", Param::Int(next.run_started_ms)),
            ("hop", Param::Int(Some(next.hop))),
            ("rows", Param::Int(Some(next.rows))),
            ("requests", Param::Int(Some(next.requests))),
            ("retries", Param::Int(Some(next.retries))),
            ("lease_owner", Param::Str(next.lease_owner.clone())),
            ("lease_until", Param::Int(next.lease_until_ms)),
            ("last_error", Param::Str(next.last_error.clone())),
            ("flags", Param::Str(Some(flags))),
            ("stream", Param::str(&next.stream)),
            ("version", Param::Int(Some(expected_version))),
        ];
        Ok(self.wh.execute(&sql, &params).await? == 1)
    }

    /// Appends a run to the history. A succeeded run is written once however often its
    /// finalize is repeated.
    pub async fn record_run(&self, r: &RunRecord) -> Result<(), WarehouseError> {
        let guard = if r.outcome == "succeeded" {
            format!(
                " WHERE NOT EXISTS (SELECT 1 FROM {} WHERE run_id = @run_id AND table_name = @table AND outcome = 'succeeded')",
                self.wh.table_ref(HISTORY_TABLE)
            )
        } else {
            String::new()
        };
        let sql = format!(
            "INSERT INTO {} (table_name, stream, run_id, started_at, finished_at, row_count, windows, requests, retries, outcome, error_code, error) \
             SELECT @table, @stream, @run_id, TIMESTAMP_MILLIS(@started), TIMESTAMP_MILLIS(@finished), @rows, @windows, @requests, @retries, @outcome, @error_code, @error \
             FROM (SELECT 1 AS one) AS x{guard}",
            self.wh.table_ref(HISTORY_TABLE)
        );
        let params = [
            ("table", Param::str(&r.table)),
            ("stream", Param::str(&r.stream)),
            ("run_id", Param::str(&r.run_id)),
            ("started", Param::Int(r.started_ms)),
            ("finished", Param::Int(Some(r.finished_ms))),
            ("rows", Param::Int(Some(r.rows))),
            ("windows", Param::Int(Some(r.windows))),
            ("requests", Param::Int(Some(r.requests))),
            ("retries", Param::Int(Some(r.retries))),
            ("outcome", Param::str(r.outcome)),
            ("error_code", Param::Str(r.error_code.clone())),
            ("error", Param::Str(r.error.clone())),
        ];
        self.wh.execute(&sql, &params).await.map(|_| ())
    }

    /// The latest runs, newest first.
    pub async fn recent_runs(&self, limit: u32) -> Result<Rows, WarehouseError> {
        self.wh
            .query(
                &format!(
                    "SELECT table_name, run_id, outcome, row_count, requests, retries, windows, UNIX_MILLIS(started_at) AS started_at, \
                     UNIX_MILLIS(finished_at) AS finished_at, error_code, error FROM {} ORDER BY finished_at DESC LIMIT {limit}",
                    self.wh.table_ref(HISTORY_TABLE)
                ),
                &[],
            )
            .await
    }
}

fn decode(rows: &Rows, row: &[Value]) -> Result<SyncState, WarehouseError> {
    let unexpected = |what: &str| WarehouseError::Unexpected(format!("state row: {what}"));
    let stream = rows.str(row, "stream").ok_or_else(|| unexpected("no stream"))?;
    let phase = rows
        .str(row, "phase")
        .as_deref()
        .map_or(Some(Phase::Idle), Phase::parse)
        .ok_or_else(|| unexpected("unknown phase"))?;
    let queries = match rows.str(row, "queries") {
        None => Vec::new(),
        Some(s) if s == "null" => Vec::new(),
        Some(s) => serde_json::from_str(&s).map_err(|_| unexpected("queries are not readable"))?,
    };
    Ok(SyncState {
        stream,
        run_id: rows.str(row, "run_id"),
        phase,
        queries,
        query_index: rows.int(row, "query_index").unwrap_or(0).max(0) as usize,
        position: rows.str(row, "position"),
        cursor_ms: rows.int(row, "cursor"),
        run_started_ms: rows.int(row, "run_started_at"),
        hop: rows.int(row, "hop").unwrap_or(0),
        rows: rows.int(row, "staged_rows").unwrap_or(0),
        requests: rows.int(row, "requests").unwrap_or(0),
        retries: rows.int(row, "retries").unwrap_or(0),
        lease_owner: rows.str(row, "lease_owner"),
        lease_until_ms: rows.int(row, "lease_until"),
        version: rows.int(row, "version").unwrap_or(0),
        last_error: rows.str(row, "last_error"),
        flags: rows
            .str(row, "flags")
            .and_then(|f| serde_json::from_str(&f).ok())
            .unwrap_or_default(),
    })
}
