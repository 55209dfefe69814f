//! Turns one Lever record into one BigQuery row (a JSON object ready for an NDJSON load), typed
//! as the catalog says. Pure: no I/O, no clock.
//!
//! A value whose JSON type cannot become the column's type is an error naming the table, record
//! id and column, never the value itself (values are personal data).

use crate::catalog::{Column, ColumnType, Source, TableDef, RUN_ID, SYNCED_AT};
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{table} record {id}: field for column `{column}` is {found}, expected {expected}")]
pub struct RowError {
    pub table: &'static str,
    pub id: String,
    pub column: &'static str,
    pub expected: &'static str,
    pub found: &'static str,
}

/// What every row of one window carries besides its Lever fields.
#[derive(Debug, Clone)]
pub struct RowMeta<'a> {
    pub run_id: &'a str,
    pub synced_at_ms: i64,
}

/// Epoch milliseconds as the RFC 3339 text both BigQuery and the emulator read the same way.
pub fn timestamp_text(ms: i64) -> Option<String> {
    DateTime::<Utc>::from_timestamp_millis(ms).map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Reads a dotted path; a missing step or a null on the way gives `Null`.
pub fn lookup<'v>(record: &'v Value, path: &str) -> &'v Value {
    static NULL: Value = Value::Null;
    let mut cur = record;
    for step in path.split('.') {
        match cur.get(step) {
            Some(v) => cur = v,
            None => return &NULL,
        }
    }
    cur
}

fn convert(ty: ColumnType, v: &Value) -> Result<Value, &'static str> {
    Ok(match (ty, v) {
        (ColumnType::StringArray, Value::Null) => Value::Array(Vec::new()),
        (_, Value::Null) => Value::Null,
        (ColumnType::Json, v) => v.clone(),
        (ColumnType::String, Value::String(_)) => v.clone(),
        (ColumnType::String, Value::Number(n)) => Value::String(n.to_string()),
        (ColumnType::String, Value::Bool(b)) => Value::String(b.to_string()),
        (ColumnType::Int64, Value::Number(n)) => match n.as_i64() {
            Some(i) => Value::from(i),
            None => match n.as_f64() {
                Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Value::from(f as i64),
                _ => return Err("a non-integer number"),
            },
        },
        (ColumnType::Float64, Value::Number(_)) => v.clone(),
        (ColumnType::Bool, Value::Bool(_)) => v.clone(),
        (ColumnType::Timestamp, Value::Number(n)) => {
            let ms = n.as_i64().ok_or("a non-integer number")?;
            Value::String(timestamp_text(ms).ok_or("a time out of range")?)
        }
        (ColumnType::StringArray, Value::Array(items)) => {
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                match item {
                    // A REPEATED field cannot hold NULL.
                    Value::Null => {}
                    Value::String(_) => out.push(item.clone()),
                    Value::Number(n) => out.push(Value::String(n.to_string())),
                    Value::Object(o) => match o.get("id") {
                        Some(Value::String(id)) => out.push(Value::String(id.clone())),
                        _ => return Err("an array holding an object without an id"),
                    },
                    other => return Err(kind(other)),
                }
            }
            Value::Array(out)
        }
        (_, other) => return Err(kind(other)),
    })
}

/// Converts `record` into a row of `columns` plus the metadata columns.
pub fn to_row(
    table: &TableDef,
    columns: &[&Column],
    record: &Value,
    parent_id: Option<&str>,
    meta: &RowMeta<'_>,
) -> Result<Map<String, Value>, RowError> {
    let id = record_id(record).unwrap_or("(no id)");
    let mut row = Map::with_capacity(columns.len() + 2);
    for c in columns {
        let value = match c.source {
            Source::Field(path) => convert(c.ty, lookup(record, path)).map_err(|found| RowError {
                table: table.name,
                id: id.to_owned(),
                column: c.name,
                expected: c.ty.sql_name(),
                found,
            })?,
            Source::ParentId => parent_id.map_or(Value::Null, |p| Value::String(p.to_owned())),
        };
        row.insert(c.name.to_owned(), value);
    }
    if row.get(table.key).is_none_or(Value::is_null) {
        return Err(RowError {
            table: table.name,
            id: id.to_owned(),
            column: table.key,
            expected: "a non-empty id",
            found: "missing",
        });
    }
    row.insert(
        SYNCED_AT.to_owned(),
        timestamp_text(meta.synced_at_ms).map_or(Value::Null, Value::String),
    );
    row.insert(RUN_ID.to_owned(), Value::String(meta.run_id.to_owned()));
    Ok(row)
}

pub fn record_id(record: &Value) -> Option<&str> {
    record.get("id").and_then(Value::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::table;
    use serde_json::json;

    fn all(t: &TableDef) -> Vec<&Column> {
        t.columns.iter().collect()
    }

    const META: RowMeta<'static> = RowMeta {
        run_id: "r1",
        synced_at_ms: 1_700_000_000_123,
    };

    #[test]
    fn epoch_ms_become_rfc3339_with_millis() {
        assert_eq!(
            timestamp_text(1_628_509_001_183).as_deref(),
            Some("2021-08-09T11:36:41.183Z")
        );
        assert_eq!(timestamp_text(0).as_deref(), Some("1970-01-01T00:00:00.000Z"));
    }

    #[test]
    fn opportunity_fields_are_typed() {
        let t = table("opportunities").unwrap();
        let rec = json!({
            "id": "o1", "name": "Zoë", "emails": ["a@example.com", null], "tags": [],
            "archived": {"reason": "r", "archivedAt": 1_628_513_942_512_i64},
            "applications": [{"id": "a1", "type": "user"}], "isAnonymized": false,
            "createdAt": 1_628_509_001_183_i64, "updatedAt": null, "phones": [{"type": "mobile", "value": "+1"}],
            "unknownField": "never copied"
        });
        let row = to_row(t, &all(t), &rec, None, &META).unwrap();
        assert_eq!(row["name"], json!("Zoë"));
        assert_eq!(row["emails"], json!(["a@example.com"]));
        assert_eq!(row["applications"], json!(["a1"]));
        assert_eq!(row["archived_at"], json!("2021-08-09T12:59:02.512Z"));
        assert_eq!(row["archive_reason"], json!("r"));
        assert_eq!(row["updated_at"], Value::Null);
        assert_eq!(row["links"], json!([]));
        assert_eq!(row["phones"], json!([{"type": "mobile", "value": "+1"}]));
        assert_eq!(row["is_anonymized"], json!(false));
        assert_eq!(row[RUN_ID], json!("r1"));
        assert!(!row.contains_key("unknownField") && !row.contains_key("unknown_field"));
    }

    #[test]
    fn child_rows_take_the_parent_from_the_path() {
        let t = table("notes").unwrap();
        let row = to_row(t, &all(t), &json!({"id": "n1", "secret": true}), Some("opp-9"), &META).unwrap();
        assert_eq!(row["opportunity_id"], json!("opp-9"));
    }

    #[test]
    fn a_wrong_type_names_the_column_but_not_the_value() {
        let t = table("interviews").unwrap();
        let err = to_row(
            t,
            &all(t),
            &json!({"id": "i1", "duration": "thirty minutes"}),
            Some("o"),
            &META,
        )
        .unwrap_err();
        assert_eq!(err.column, "duration");
        assert!(!err.to_string().contains("thirty"));
    }

    #[test]
    fn a_record_without_id_is_rejected() {
        let t = table("users").unwrap();
        assert!(to_row(t, &all(t), &json!({"name": "x"}), None, &META).is_err());
    }

    #[test]
    fn integral_floats_are_accepted_as_integers() {
        let t = table("interviews").unwrap();
        let row = to_row(t, &all(t), &json!({"id": "i1", "duration": 30.0}), Some("o"), &META).unwrap();
        assert_eq!(row["duration"], json!(30));
    }
}
