//! Table schemas: the synced tables (from the catalog), their staging tables, and the two
//! metadata tables (sync state and run history).

use crate::catalog::{Column, ColumnType, SyncMode, TableDef, DELETED_AT, RUN_ID, SYNCED_AT};
use gcp_bigquery_client::model::field_type::FieldType;
use gcp_bigquery_client::model::table_field_schema::TableFieldSchema;
use gcp_bigquery_client::model::table_schema::TableSchema;

/// The sync state, one row per stream (a walk of Lever that feeds one or more tables).
pub const STATE_TABLE: &str = "_lever_sync_state";
/// One row per table per finished (or failed) run.
pub const HISTORY_TABLE: &str = "_lever_sync_runs";
/// Opportunities erased on request: their rows are never written again.
pub const ERASED_TABLE: &str = "_lever_sync_erased";
/// In staging only: which window wrote the row, so that the latest copy of an id wins.
pub const WINDOW: &str = "_window";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    pub name: &'static str,
    pub ty: ColumnType,
    pub required: bool,
}

const fn f(name: &'static str, ty: ColumnType) -> Field {
    Field {
        name,
        ty,
        required: false,
    }
}

impl Field {
    pub fn of(c: &Column, key: &str) -> Field {
        Field {
            name: c.name,
            ty: c.ty,
            required: c.name == key,
        }
    }
}

pub fn to_bq(fields: &[Field]) -> TableSchema {
    let fields = fields
        .iter()
        .map(|fd| {
            let ty = match fd.ty {
                ColumnType::String | ColumnType::StringArray => FieldType::String,
                ColumnType::Int64 => FieldType::Int64,
                ColumnType::Float64 => FieldType::Float64,
                ColumnType::Bool => FieldType::Bool,
                ColumnType::Timestamp => FieldType::Timestamp,
                ColumnType::Json => FieldType::Json,
            };
            let mut s = TableFieldSchema::new(fd.name, ty);
            s.mode = Some(
                match (fd.ty, fd.required) {
                    (ColumnType::StringArray, _) => "REPEATED",
                    (_, true) => "REQUIRED",
                    _ => "NULLABLE",
                }
                .to_owned(),
            );
            s
        })
        .collect();
    TableSchema::new(fields)
}

const META: [Field; 2] = [f(SYNCED_AT, ColumnType::Timestamp), f(RUN_ID, ColumnType::String)];

/// The target table: the selected catalog columns, then the metadata columns; incremental
/// tables also mark rows Lever deleted.
pub fn target_fields(t: &TableDef, columns: &[&Column]) -> Vec<Field> {
    let mut v: Vec<Field> = columns.iter().map(|c| Field::of(c, t.key)).chain(META).collect();
    if t.mode == SyncMode::Incremental {
        v.push(f(DELETED_AT, ColumnType::Timestamp));
    }
    v
}

/// A run's staging table: the selected columns, the metadata columns and the window number.
pub fn staging_fields(t: &TableDef, columns: &[&Column]) -> Vec<Field> {
    let mut v: Vec<Field> = columns.iter().map(|c| Field::of(c, t.key)).chain(META).collect();
    v.push(f(WINDOW, ColumnType::Int64));
    v
}

pub fn staging_table_name(table: &str, run_id: &str) -> String {
    format!("_stg_{table}_{}", run_id.replace('-', "_"))
}

pub const STATE_FIELDS: &[Field] = &[
    Field {
        name: "stream",
        ty: ColumnType::String,
        required: true,
    },
    f("run_id", ColumnType::String),
    f("phase", ColumnType::String),
    f("queries", ColumnType::String),
    f("query_index", ColumnType::Int64),
    f("position", ColumnType::String),
    f("cursor", ColumnType::Timestamp),
    f("run_started_at", ColumnType::Timestamp),
    f("hop", ColumnType::Int64),
    f("staged_rows", ColumnType::Int64),
    f("requests", ColumnType::Int64),
    f("retries", ColumnType::Int64),
    f("lease_owner", ColumnType::String),
    f("lease_until", ColumnType::Timestamp),
    f("version", ColumnType::Int64),
    f("updated_at", ColumnType::Timestamp),
    f("last_error", ColumnType::String),
    f("flags", ColumnType::String),
];

/// `kind` is `opportunity` (every row of it) or `application` (a referral application that
/// named the person on someone else's opportunity).
pub const ERASED_FIELDS: &[Field] = &[
    Field {
        name: "id",
        ty: ColumnType::String,
        required: true,
    },
    f("kind", ColumnType::String),
    f("erased_at", ColumnType::Timestamp),
];

pub const HISTORY_FIELDS: &[Field] = &[
    Field {
        name: "table_name",
        ty: ColumnType::String,
        required: true,
    },
    f("stream", ColumnType::String),
    f("run_id", ColumnType::String),
    f("started_at", ColumnType::Timestamp),
    f("finished_at", ColumnType::Timestamp),
    f("row_count", ColumnType::Int64),
    f("windows", ColumnType::Int64),
    f("requests", ColumnType::Int64),
    f("retries", ColumnType::Int64),
    f("outcome", ColumnType::String),
    f("error_code", ColumnType::String),
    f("error", ColumnType::String),
];

/// BigQuery's reserved keywords: none may name a column, quoted or not, so that hand-written
/// SQL by users (and ours) never trips on one.
pub const RESERVED: &[&str] = &[
    "all",
    "and",
    "any",
    "array",
    "as",
    "asc",
    "assert_rows_modified",
    "at",
    "between",
    "by",
    "case",
    "cast",
    "collate",
    "contains",
    "create",
    "cross",
    "cube",
    "current",
    "default",
    "define",
    "desc",
    "distinct",
    "else",
    "end",
    "enum",
    "escape",
    "except",
    "exclude",
    "exists",
    "extract",
    "false",
    "fetch",
    "following",
    "for",
    "from",
    "full",
    "group",
    "grouping",
    "groups",
    "hash",
    "having",
    "if",
    "ignore",
    "in",
    "inner",
    "intersect",
    "interval",
    "into",
    "is",
    "join",
    "lateral",
    "left",
    "like",
    "limit",
    "lookup",
    "merge",
    "natural",
    "new",
    "no",
    "not",
    "null",
    "nulls",
    "of",
    "on",
    "or",
    "order",
    "outer",
    "over",
    "partition",
    "preceding",
    "proto",
    "qualify",
    "range",
    "recursive",
    "respect",
    "right",
    "rollup",
    "rows",
    "select",
    "set",
    "some",
    "struct",
    "tablesample",
    "then",
    "to",
    "treat",
    "true",
    "unbounded",
    "union",
    "unnest",
    "using",
    "when",
    "where",
    "window",
    "with",
    "within",
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{DELETIONS, TABLES};

    #[test]
    fn no_column_is_named_after_a_reserved_keyword() {
        let catalog = TABLES
            .iter()
            .chain([&DELETIONS])
            .flat_map(|t| t.columns.iter().map(|c| c.name));
        let meta = STATE_FIELDS
            .iter()
            .chain(HISTORY_FIELDS)
            .chain(ERASED_FIELDS)
            .chain(&META)
            .map(|f| f.name);
        for name in catalog.chain(meta).chain([WINDOW, DELETED_AT]) {
            assert!(!RESERVED.contains(&name), "`{name}` is a reserved keyword in BigQuery");
        }
    }
}
