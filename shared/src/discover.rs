//! What Lever sends that the catalog does not declare: field names, an inferred BigQuery type and
//! how many sampled records carry the field. Never the values (they may be personal data).
//!
//! Pure: callers fetch the sample records.

use crate::catalog::{self, ColumnType, Origin, Source, TableDef};
use crate::lever::{LeverClient, LeverError};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownField {
    /// The Lever field name, as sent.
    pub field: String,
    /// The column it would become.
    pub column: String,
    pub inferred: ColumnType,
    /// Sampled records where the field is present and not null.
    pub records: usize,
}

/// `candidateScore` → `candidate_score`.
pub fn snake_case(field: &str) -> String {
    let mut out = String::with_capacity(field.len() + 4);
    let mut prev_lower = false;
    for ch in field.chars() {
        if ch.is_ascii_uppercase() {
            if prev_lower {
                out.push('_');
            }
            out.push(ch.to_ascii_lowercase());
            prev_lower = false;
        } else if ch.is_ascii_alphanumeric() {
            out.push(ch);
            prev_lower = ch.is_ascii_lowercase() || ch.is_ascii_digit();
        } else {
            out.push('_');
            prev_lower = false;
        }
    }
    out
}

/// The BigQuery type a JSON value suggests. Integers in fields named `…At` are epoch ms.
pub fn infer(field: &str, v: &Value) -> Option<ColumnType> {
    Some(match v {
        Value::Null => return None,
        Value::Bool(_) => ColumnType::Bool,
        Value::Number(n) if n.is_i64() || n.is_u64() => {
            if field.ends_with("At") || field.ends_with("Until") {
                ColumnType::Timestamp
            } else {
                ColumnType::Int64
            }
        }
        Value::Number(_) => ColumnType::Float64,
        Value::String(_) => ColumnType::String,
        Value::Array(items) if items.iter().all(|i| i.is_string() || i.is_null()) => ColumnType::StringArray,
        Value::Array(_) | Value::Object(_) => ColumnType::Json,
    })
}

/// Top-level Lever fields a table's catalog reads (the first step of each column's path).
pub fn known_fields(t: &TableDef) -> Vec<&'static str> {
    t.columns
        .iter()
        .filter_map(|c| match c.source {
            Source::Field(path) => path.split('.').next(),
            Source::ParentId => None,
        })
        .collect()
}

/// The fields of `records` the catalog does not know, most common first.
pub fn unknown_fields<'a>(t: &TableDef, records: impl IntoIterator<Item = &'a Value>) -> Vec<UnknownField> {
    let known = known_fields(t);
    let mut seen: BTreeMap<String, (Option<ColumnType>, usize)> = BTreeMap::new();
    for r in records {
        let Some(obj) = r.as_object() else { continue };
        for (k, v) in obj {
            if known.contains(&k.as_str()) {
                continue;
            }
            let e = seen.entry(k.clone()).or_insert((None, 0));
            if let Some(ty) = infer(k, v) {
                // Mixed types across records fall back to JSON, which holds any of them.
                e.0 = Some(match e.0 {
                    None => ty,
                    Some(prev) if prev == ty => ty,
                    Some(_) => ColumnType::Json,
                });
                e.1 += 1;
            }
        }
    }
    let mut out: Vec<UnknownField> = seen
        .into_iter()
        .map(|(field, (ty, records))| UnknownField {
            column: snake_case(&field),
            field,
            inferred: ty.unwrap_or(ColumnType::Json),
            records,
        })
        .collect();
    out.sort_by(|a, b| b.records.cmp(&a.records).then(a.field.cmp(&b.field)));
    out
}

/// Recent records of every table, read from Lever: the first page of opportunities (with their
/// applications), the first page of users, and the children of the first `parents`
/// opportunities. Each child list costs one request.
pub async fn sample(lever: &LeverClient, parents: usize) -> Result<HashMap<&'static str, Vec<Value>>, LeverError> {
    let mut out: HashMap<&'static str, Vec<Value>> = HashMap::new();
    let params = |t: &TableDef| {
        t.fixed_params
            .iter()
            .map(|(k, v)| (*k, (*v).to_owned()))
            .collect::<Vec<_>>()
    };
    for t in catalog::TABLES {
        if let Origin::List { path } = t.origin {
            let page = lever.list_page(path, &params(t), None).await?;
            for inline in catalog::TABLES
                .iter()
                .filter(|c| matches!(c.origin, Origin::Inline { parent, .. } if parent == t.name))
            {
                if let Origin::Inline { field, .. } = inline.origin {
                    let children: Vec<Value> = page
                        .data
                        .iter()
                        .filter_map(|r| r.get(field))
                        .filter_map(Value::as_array)
                        .flatten()
                        .filter(|v| v.is_object())
                        .cloned()
                        .collect();
                    out.entry(inline.name).or_default().extend(children);
                }
            }
            out.entry(t.name).or_default().extend(page.data);
        }
    }
    let ids: Vec<String> = out
        .get("opportunities")
        .into_iter()
        .flatten()
        .filter_map(|o| o.get("id").and_then(Value::as_str).map(str::to_owned))
        .take(parents)
        .collect();
    for t in catalog::TABLES {
        if let Origin::PerParent { path, .. } = t.origin {
            let records = out.entry(t.name).or_default();
            for id in &ids {
                match lever
                    .list_page(&format!("/opportunities/{id}/{path}"), &params(t), None)
                    .await
                {
                    Ok(page) => records.extend(page.data),
                    Err(LeverError::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::table;
    use serde_json::json;

    #[test]
    fn names_become_snake_case() {
        assert_eq!(snake_case("candidateScore"), "candidate_score");
        assert_eq!(snake_case("lastInteractionAt"), "last_interaction_at");
        assert_eq!(snake_case("id"), "id");
        assert_eq!(snake_case("x-y z"), "x_y_z");
    }

    #[test]
    fn only_undeclared_fields_are_reported_with_counts_not_values() {
        let t = table("users").unwrap();
        let recs = [
            json!({"id": "a", "name": "n", "pronouns": "she/her", "hiredAt": 1_700_000_000_000_i64}),
            json!({"id": "b", "pronouns": null, "hiredAt": 1_700_000_000_001_i64, "teams": ["x"]}),
        ];
        let u = unknown_fields(t, &recs);
        let names: Vec<&str> = u.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(names, vec!["hiredAt", "pronouns", "teams"]);
        assert_eq!(u[0].inferred, ColumnType::Timestamp);
        assert_eq!(u[0].records, 2);
        assert_eq!(u[1].records, 1);
        assert_eq!(u[2].inferred, ColumnType::StringArray);
        assert_eq!(u[0].column, "hired_at");
    }

    #[test]
    fn mixed_types_fall_back_to_json() {
        let t = table("users").unwrap();
        let recs = [json!({"id": "a", "score": 1}), json!({"id": "b", "score": "high"})];
        assert_eq!(unknown_fields(t, &recs)[0].inferred, ColumnType::Json);
    }
}
