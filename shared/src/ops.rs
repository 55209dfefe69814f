//! Operator actions on a synced dataset: erase one person everywhere, reset a table to a full
//! refresh, remove the connection's tables. Each leaves the state consistent for the next sync,
//! and none writes personal data to logs or the run history.

use crate::catalog::{self, TableDef};
use crate::error::SyncError;
use crate::lever::{LeverClient, LeverError};
use crate::sync::plan::Phase;
use crate::sync::state::{RunRecord, SyncState};
use crate::sync::Syncer;
use crate::warehouse::schema::{ERASED_TABLE, HISTORY_TABLE, STATE_TABLE};
use crate::warehouse::{Param, Warehouse};

/// Who to erase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Person {
    /// One of the person's opportunities; all opportunities of the same contact go with it.
    Opportunity(String),
    /// Lever's contact id (one person, possibly several opportunities).
    Contact(String),
    /// Any of the person's email addresses (case-insensitive).
    Email(String),
}

impl Person {
    /// What the history may say about the request: the kind of identifier, never its value.
    pub fn kind(&self) -> &'static str {
        match self {
            Person::Opportunity(_) => "opportunity id",
            Person::Contact(_) => "contact id",
            Person::Email(_) => "email",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EraseReport {
    pub opportunities: usize,
    /// Rows removed per table (staging tables of runs in progress included).
    pub rows: Vec<(String, u64)>,
}

async fn synced_tables(wh: &Warehouse) -> Result<Vec<String>, SyncError> {
    Ok(wh.list_tables().await?)
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The opportunity ids that belong to `who`, from the synced opportunities and applications.
async fn opportunities_of(wh: &Warehouse, tables: &[String], who: &Person) -> Result<Vec<String>, SyncError> {
    let has = |t: &str| tables.iter().any(|x| x == t);
    let mut ids: Vec<String> = Vec::new();
    let mut collect = |rows: crate::warehouse::Rows| {
        for r in &rows.rows {
            if let Some(id) = rows.str(r, "id") {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
    };
    let opps = wh.table_ref("opportunities");
    match who {
        Person::Opportunity(id) => {
            collect(crate::warehouse::Rows {
                columns: vec!["id".into()],
                rows: vec![vec![serde_json::Value::String(id.clone())]],
            });
            if has("opportunities") {
                collect(
                    wh.query(
                        &format!("SELECT id FROM {opps} WHERE contact IN (SELECT contact FROM {opps} WHERE id = @v AND contact IS NOT NULL)"),
                        &[("v", Param::str(id))],
                    )
                    .await?,
                );
            }
        }
        Person::Contact(c) => {
            if has("opportunities") {
                collect(
                    wh.query(
                        &format!("SELECT id FROM {opps} WHERE contact = @v"),
                        &[("v", Param::str(c))],
                    )
                    .await?,
                );
            }
        }
        Person::Email(e) => {
            let e = e.trim().to_lowercase();
            if has("opportunities") {
                collect(
                    wh.query(
                        &format!(
                            "SELECT id FROM {opps} WHERE contact IN (SELECT contact FROM {opps} WHERE EXISTS \
                             (SELECT 1 FROM UNNEST(emails) AS m WHERE LOWER(m) = @v) AND contact IS NOT NULL) \
                             OR EXISTS (SELECT 1 FROM UNNEST(emails) AS m WHERE LOWER(m) = @v)"
                        ),
                        &[("v", Param::str(&e))],
                    )
                    .await?,
                );
            }
            if has("applications") {
                collect(
                    wh.query(
                        &format!(
                            "SELECT DISTINCT opportunity_id AS id FROM {} WHERE LOWER(email) = @v",
                            wh.table_ref("applications")
                        ),
                        &[("v", Param::str(&e))],
                    )
                    .await?,
                );
            }
        }
    }
    Ok(ids)
}

/// Removes every row of one person from every synced table (and from the staging of runs in
/// progress), and remembers their opportunities so that no later sync writes them again.
pub async fn erase(s: &Syncer, who: &Person) -> Result<EraseReport, SyncError> {
    let wh = s.warehouse();
    s.store().ensure(&[]).await?;
    let tables = synced_tables(wh).await?;
    let ids = opportunities_of(wh, &tables, who).await?;
    let mut report = EraseReport {
        opportunities: ids.len(),
        rows: Vec::new(),
    };
    if ids.is_empty() {
        return Ok(report);
    }
    let id_params: Vec<String> = (0..ids.len()).map(|i| format!("o{i}")).collect();
    let params: Vec<(&str, Param)> = id_params
        .iter()
        .zip(&ids)
        .map(|(n, v)| (n.as_str(), Param::str(v)))
        .collect();
    let list = id_params.iter().map(|n| format!("@{n}")).collect::<Vec<_>>().join(", ");
    // First the suppression list, so that a sync finalizing meanwhile cannot bring them back.
    suppress(wh, "opportunity", &ids).await?;
    // A referral application can name the person (by email) on someone else's opportunity.
    if let (Person::Email(e), true) = (who, tables.iter().any(|t| t == "applications")) {
        let rows = wh
            .query(
                &format!(
                    "SELECT id FROM {} WHERE LOWER(email) = @v",
                    wh.table_ref("applications")
                ),
                &[("v", Param::str(e.trim().to_lowercase()))],
            )
            .await?;
        let apps: Vec<String> = rows.rows.iter().filter_map(|r| rows.str(r, "id")).collect();
        suppress(wh, "application", &apps).await?;
    }
    for name in &tables {
        let Some(t) = table_of(name) else { continue };
        let Some(col) = t.opportunity_column() else { continue };
        let n = wh
            .execute(
                &format!("DELETE FROM {} WHERE `{col}` IN ({list})", wh.table_ref(name)),
                &params,
            )
            .await?;
        // Applications can name the person by email on another's opportunity (a referral).
        let by_email = match (who, t.name) {
            (Person::Email(e), "applications") => {
                wh.execute(
                    &format!("DELETE FROM {} WHERE LOWER(email) = @v", wh.table_ref(name)),
                    &[("v", Param::str(e.trim().to_lowercase()))],
                )
                .await?
            }
            _ => 0,
        };
        report.rows.push((name.clone(), n + by_email));
    }
    let finished = now_ms();
    for (table, rows) in report.rows.iter().filter(|(t, _)| !t.starts_with('_')) {
        s.store()
            .record_run(&RunRecord {
                table: table.clone(),
                stream: "erase".into(),
                run_id: format!("erase_{finished}"),
                started_ms: Some(finished),
                finished_ms: finished,
                rows: *rows as i64,
                windows: 0,
                requests: 0,
                retries: 0,
                outcome: "erased",
                error_code: None,
                error: Some(format!("erased by {}", who.kind())),
            })
            .await?;
    }
    tracing::info!(opportunities = ids.len(), by = who.kind(), "erased a person");
    Ok(report)
}

/// Adds ids to the erase list (kept forever: the MERGE of every later run skips them).
async fn suppress(wh: &Warehouse, kind: &str, ids: &[String]) -> Result<(), SyncError> {
    if ids.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = (0..ids.len()).map(|i| format!("i{i}")).collect();
    let mut params: Vec<(&str, Param)> = names
        .iter()
        .zip(ids)
        .map(|(n, v)| (n.as_str(), Param::str(v)))
        .collect();
    params.push(("kind", Param::str(kind)));
    let values = names
        .iter()
        .map(|n| format!("SELECT @{n} AS id"))
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    wh.execute(
        &format!(
            "MERGE {} T USING ({values}) S ON T.id = S.id AND T.kind = @kind \
             WHEN NOT MATCHED THEN INSERT (id, kind, erased_at) VALUES (S.id, @kind, CURRENT_TIMESTAMP())",
            wh.table_ref(ERASED_TABLE)
        ),
        &params,
    )
    .await?;
    Ok(())
}

/// The catalog table a dataset table holds: a target, or a run's staging table.
fn table_of(name: &str) -> Option<&'static TableDef> {
    catalog::table(name).or_else(|| {
        let rest = name.strip_prefix("_stg_")?;
        catalog::TABLES
            .iter()
            .find(|t| rest.starts_with(&format!("{}_", t.name)))
    })
}

/// Forces a full refresh of `table` (and of the tables synced with it) on its next run: the
/// cursor is forgotten, a run in progress is abandoned (its staging dropped), and the next run
/// replaces the targets, so they match Lever exactly.
pub async fn reset(s: &Syncer, table: &str) -> Result<(), SyncError> {
    let t = catalog::table(table).ok_or_else(|| SyncError::Invariant(format!("unknown table {table}")))?;
    let stream = t.stream();
    s.store().ensure(&[stream]).await?;
    let st = s.store().load(stream).await?;
    let mut next = SyncState::new(stream);
    next.flags.replace = true;
    // Chains made before the reset are stale: only one started after it may begin the new run.
    next.flags.stale_before_ms = Some(now_ms());
    if !s.store().save(&next, st.version).await? {
        return Err(SyncError::Invariant(format!(
            "{stream} changed while resetting; run reset again"
        )));
    }
    if let (Some(run), true) = (&st.run_id, st.phase != Phase::Idle) {
        for name in s.warehouse().list_tables().await? {
            if name.starts_with("_stg_") && name.ends_with(&run.replace('-', "_")) {
                s.warehouse().drop_table(&name).await?;
            }
        }
    }
    tracing::info!(table = stream, "reset: the next run is a full refresh");
    Ok(())
}

/// Drops every table the connector made in the dataset: the synced tables, staging, state,
/// history and the erase list. Other tables in the dataset are left alone.
pub async fn delete_connection(wh: &Warehouse) -> Result<Vec<String>, SyncError> {
    let mut dropped = Vec::new();
    if !wh.dataset_exists().await? {
        return Ok(dropped);
    }
    for name in wh.list_tables().await? {
        let ours = catalog::table(&name).is_some()
            || name.starts_with("_stg_")
            || [STATE_TABLE, HISTORY_TABLE, ERASED_TABLE].contains(&name.as_str());
        if ours {
            wh.drop_table(&name).await?;
            dropped.push(name);
        }
    }
    Ok(dropped)
}

/// Whether the API key may read confidential opportunities (fixed when the key was made).
/// Without it a sync still runs, with the non-confidential ones only.
pub async fn can_read_confidential(lever: &LeverClient) -> Result<bool, LeverError> {
    match lever
        .list_page("/opportunities", &[("confidentiality", "all".to_owned())], None)
        .await
    {
        Ok(_) => Ok(true),
        Err(LeverError::Forbidden { message, .. }) if message.to_ascii_lowercase().contains("confidential") => {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}
