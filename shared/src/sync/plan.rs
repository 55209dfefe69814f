//! The pure part of a run: which Lever queries a run makes, and how a window moves the position.
//! No clock, no I/O: callers pass `now` and the pages they fetched.

use crate::catalog::{Origin, SyncMode, TableDef};
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Idle,
    Fetching,
    Finalizing,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Fetching => "fetching",
            Phase::Finalizing => "finalizing",
        }
    }
    pub fn parse(s: &str) -> Option<Phase> {
        match s {
            "idle" => Some(Phase::Idle),
            "fetching" => Some(Phase::Fetching),
            "finalizing" => Some(Phase::Finalizing),
            _ => None,
        }
    }
}

/// One filtered list query of a run. Lever binds paging tokens to the query, so a run's queries
/// are fixed when it starts and saved with its state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Query {
    pub params: Vec<(String, String)>,
    /// Keep only records whose `updatedAt` is null (legacy records no `updated_at` filter finds).
    #[serde(default)]
    pub legacy_only: bool,
    /// Reads `/opportunities/deleted` instead of the stream's own list.
    #[serde(default)]
    pub deletions: bool,
}

/// Lever's list of deleted opportunities (`id`, `deletedAt`, `deletedBy`).
pub const DELETED_PATH: &str = "/opportunities/deleted";

/// The list endpoint a stream walks page by page: its own, or its parent's for per-parent tables.
pub fn walked_path(t: &TableDef) -> &'static str {
    match t.origin {
        Origin::List { path } => path,
        // Parents of per-parent tables are opportunities; inline tables have no walk of their own.
        Origin::PerParent { .. } | Origin::Inline { .. } => "/opportunities",
    }
}

/// Whether a stream's walk runs over opportunities (and so obeys the start-date scope rules).
fn walks_opportunities(t: &TableDef) -> bool {
    walked_path(t) == "/opportunities"
}

/// The queries of a new run of `stream` started at `now_ms`.
///
/// Opportunity walks cover every opportunity whose last change is on or after the start date:
/// those with `updatedAt` in range, plus legacy ones whose `updatedAt` is null and whose
/// `createdAt` is in range (an `updated_at` filter never returns them). An incremental run after
/// a successful one reads what changed since the last run's start, less the overlap.
pub fn plan_queries(
    stream: &TableDef,
    start_ms: i64,
    cursor_ms: Option<i64>,
    now_ms: i64,
    overlap_ms: i64,
) -> Vec<Query> {
    let query = |params: Vec<(&str, String)>, legacy_only: bool, deletions: bool| Query {
        params: params.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        legacy_only,
        deletions,
    };
    if !walks_opportunities(stream) {
        return vec![query(Vec::new(), false, false)];
    }
    let end = now_ms.to_string();
    match (stream.mode, cursor_ms) {
        (SyncMode::Incremental, Some(cursor)) => {
            let from = (cursor - overlap_ms).max(start_ms).to_string();
            vec![
                query(
                    vec![("updated_at_start", from.clone()), ("updated_at_end", end.clone())],
                    false,
                    false,
                ),
                // Rows already synced that Lever deleted since: they are marked, not dropped.
                query(vec![("deleted_at_start", from), ("deleted_at_end", end)], false, true),
            ]
        }
        _ => vec![
            query(
                vec![
                    ("updated_at_start", start_ms.to_string()),
                    ("updated_at_end", end.clone()),
                ],
                false,
                false,
            ),
            query(
                vec![("created_at_start", start_ms.to_string()), ("created_at_end", end)],
                true,
                false,
            ),
        ],
    }
}

/// Whether a record returned by `q` belongs to the run.
pub fn keep(q: &Query, record: &Value) -> bool {
    !q.legacy_only || record.get("updatedAt").is_none_or(Value::is_null)
}

/// Whether a sweep run re-reads the children of `parent` (an opportunity from the walk): it
/// changed since the last run began (`from_ms`, less the overlap), or its turn in the rotation
/// came between then and now.
pub fn sweep_rereads(parent: &Value, from_ms: i64, now_ms: i64, overlap_ms: i64, period_ms: i64) -> bool {
    let changed = parent
        .get("updatedAt")
        .and_then(Value::as_i64)
        .is_some_and(|u| u >= from_ms - overlap_ms);
    changed
        || parent
            .get("id")
            .and_then(Value::as_str)
            .is_some_and(|id| sweep_due(id, from_ms, now_ms, period_ms))
}

/// Each id has a fixed time of the period (a hash of the id); it is due in a run whose span
/// since the last run holds that time. Spans of successive runs leave no gap, so every id comes
/// round once per period however often runs happen, and the work spreads evenly over runs.
pub fn sweep_due(id: &str, from_ms: i64, now_ms: i64, period_ms: i64) -> bool {
    if period_ms <= 0 || now_ms - from_ms >= period_ms {
        return true;
    }
    // FNV-1a: stable across builds and platforms, unlike the standard library's hasher.
    let hash = id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let slot = (hash % period_ms as u64) as i64;
    (slot - from_ms).rem_euclid(period_ms) < now_ms - from_ms
}

/// Where the walk stands after a page: the same query's next page, the next query, or the end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub query_index: usize,
    pub token: Option<String>,
    pub done: bool,
}

pub fn advance(query_index: usize, queries: usize, next: Option<String>) -> Position {
    match next {
        Some(token) => Position {
            query_index,
            token: Some(token),
            done: false,
        },
        None if query_index + 1 < queries => Position {
            query_index: query_index + 1,
            token: None,
            done: false,
        },
        None => Position {
            query_index: queries,
            token: None,
            done: true,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::table;
    use serde_json::json;

    const START: i64 = 1_600_000_000_000;
    const NOW: i64 = 1_700_000_000_000;

    fn param<'a>(q: &'a Query, k: &str) -> Option<&'a str> {
        q.params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
    }

    #[test]
    fn a_first_run_also_reads_legacy_records_without_updated_at() {
        let q = plan_queries(table("opportunities").unwrap(), START, None, NOW, 300_000);
        assert_eq!(q.len(), 2);
        assert_eq!(param(&q[0], "updated_at_start"), Some("1600000000000"));
        assert_eq!(param(&q[0], "updated_at_end"), Some("1700000000000"));
        assert_eq!(param(&q[1], "created_at_start"), Some("1600000000000"));
        assert!(q[1].legacy_only && !q[0].legacy_only);
    }

    #[test]
    fn a_later_run_reads_from_the_cursor_less_the_overlap() {
        let cursor = NOW - 3_600_000;
        let q = plan_queries(table("opportunities").unwrap(), START, Some(cursor), NOW, 300_000);
        assert_eq!(q.len(), 2);
        assert_eq!(
            param(&q[0], "updated_at_start"),
            Some((cursor - 300_000).to_string().as_str())
        );
        assert!(q[1].deletions, "a later run also reads the deletions since the cursor");
        assert_eq!(
            param(&q[1], "deleted_at_start"),
            Some((cursor - 300_000).to_string().as_str())
        );
    }

    #[test]
    fn full_refresh_children_walk_every_in_scope_parent_each_run() {
        let q = plan_queries(table("notes").unwrap(), START, Some(NOW - 1000), NOW, 0);
        assert_eq!(q.len(), 2, "a cursor must not narrow a full refresh");
        let users = plan_queries(table("users").unwrap(), START, None, NOW, 0);
        assert_eq!(
            users,
            vec![Query {
                params: vec![],
                legacy_only: false,
                deletions: false
            }]
        );
    }

    #[test]
    fn the_legacy_query_keeps_only_null_updated_at() {
        let q = Query {
            params: vec![],
            legacy_only: true,
            deletions: false,
        };
        assert!(keep(&q, &json!({"id": "a", "updatedAt": null})));
        assert!(keep(&q, &json!({"id": "a"})));
        assert!(!keep(&q, &json!({"id": "a", "updatedAt": 5})));
    }

    #[test]
    fn a_sweep_reaches_every_id_once_per_period_whatever_the_run_times() {
        let period = 7 * 86_400_000;
        let ids: Vec<String> = (0..2000).map(|i| format!("opp-{i}")).collect();
        // Irregular runs: every 40 to 100 minutes, for two periods.
        let mut t = START;
        let mut last_seen = std::collections::HashMap::new();
        let mut per_run = Vec::new();
        let mut step = 0;
        while t < START + 2 * period {
            step += 1;
            let next = t + (40 + (step * 37) % 61) * 60_000;
            let due: Vec<&String> = ids.iter().filter(|id| sweep_due(id, t, next, period)).collect();
            per_run.push(due.len());
            for id in due {
                if let Some(prev) = last_seen.insert(id.clone(), next) {
                    assert!(next - prev <= period + 100 * 60_000, "{id} waited more than a period");
                }
            }
            t = next;
        }
        assert_eq!(last_seen.len(), ids.len(), "every id came round");
        let avg = per_run.iter().sum::<usize>() as f64 / per_run.len() as f64;
        assert!(
            avg < 2000.0 * 0.02,
            "a run re-reads a small slice, not everything: {avg}"
        );
        assert!(
            sweep_due("x", START, START + period, period),
            "a period without runs re-reads all"
        );
    }

    #[test]
    fn a_sweep_rereads_what_changed_since_the_last_run() {
        let (from, now, period) = (NOW - 3_600_000, NOW, 7 * 86_400_000);
        let changed = json!({"id": "a", "updatedAt": from - 1000});
        assert!(
            sweep_rereads(&changed, from, now, 300_000, period),
            "within the overlap"
        );
        let old = json!({"id": "a", "updatedAt": from - 400_000});
        assert_eq!(
            sweep_rereads(&old, from, now, 300_000, period),
            sweep_due("a", from, now, period)
        );
    }

    #[test]
    fn positions_move_through_queries_to_the_end() {
        assert_eq!(
            advance(0, 2, Some("t".into())),
            Position {
                query_index: 0,
                token: Some("t".into()),
                done: false
            }
        );
        assert_eq!(
            advance(0, 2, None),
            Position {
                query_index: 1,
                token: None,
                done: false
            }
        );
        assert!(advance(1, 2, None).done);
    }
}
