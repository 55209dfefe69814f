//! Settings: read raw from a TOML file and/or environment variables, then validated into a typed
//! `Config` before anything touches Lever or BigQuery. Every message says which setting is wrong
//! and how to fix it, and never repeats a secret.

use crate::catalog::{self, Column, ColumnType, Source, TableDef};
use crate::lever::rate::{DEFAULT_BURST, DEFAULT_RATE_PER_SEC};
use crate::lever::{ApiKey, Environment};
use crate::warehouse::{Credentials, WarehouseConfig, BIGQUERY_API_URL};
use chrono::{DateTime, NaiveDate, Utc};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(pub String);

fn bad(msg: impl Into<String>) -> ConfigError {
    ConfigError(msg.into())
}

/// The settings as written by a person; every field optional until validation.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub lever: RawLever,
    #[serde(default)]
    pub bigquery: RawBigQuery,
    #[serde(default)]
    pub sync: RawSync,
    /// Per table: which columns to sync and which extra Lever fields to add.
    #[serde(default)]
    pub tables: BTreeMap<String, RawTable>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTable {
    /// Catalog column names to sync (default: all). The key and `opportunity_id` are always kept.
    pub columns: Option<Vec<String>>,
    /// Lever fields the catalog does not declare, by field name, with their BigQuery type
    /// (`STRING`, `INT64`, `FLOAT64`, `BOOL`, `TIMESTAMP`, `ARRAY<STRING>`, `JSON`).
    #[serde(default)]
    pub extra_fields: BTreeMap<String, String>,
}

#[derive(Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLever {
    pub api_key: Option<String>,
    pub environment: Option<String>,
    /// Overrides the environment's host (tests, proxies).
    pub api_url: Option<String>,
    pub start_date: Option<String>,
    pub tables: Option<Vec<String>>,
    pub rate_per_sec: Option<f64>,
    pub burst: Option<f64>,
    pub timeout_secs: Option<u64>,
}

#[derive(Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBigQuery {
    pub project: Option<String>,
    pub dataset: Option<String>,
    pub location: Option<String>,
    pub api_url: Option<String>,
    /// Path of a Google credentials file: a service-account key, or an `external_account`
    /// configuration (workload identity federation from AWS).
    pub credentials_file: Option<String>,
    /// The same as JSON text (as kept in a secret store).
    pub credentials_json: Option<String>,
    /// Use the placeholder token of the local emulator (only with a loopback `api_url`).
    pub emulator: Option<bool>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSync {
    pub pages_per_window: Option<u32>,
    pub child_concurrency: Option<usize>,
    pub overlap_secs: Option<u64>,
    pub lease_secs: Option<u64>,
    /// How child tables are kept: "full" (re-read every run) or "sweep".
    pub children: Option<String>,
    /// In sweep mode, every opportunity's children are re-read at least this often.
    pub sweep_days: Option<u64>,
}

// Settings as typed may hold the API key and a service-account key: their Debug shows neither.
impl std::fmt::Debug for RawLever {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawLever")
            .field("api_key", &self.api_key.as_ref().map(|_| "***"))
            .field("environment", &self.environment)
            .field("api_url", &self.api_url)
            .field("start_date", &self.start_date)
            .field("tables", &self.tables)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for RawBigQuery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawBigQuery")
            .field("project", &self.project)
            .field("dataset", &self.dataset)
            .field("location", &self.location)
            .field("api_url", &self.api_url)
            .field("credentials_file", &self.credentials_file)
            .field("credentials_json", &self.credentials_json.as_ref().map(|_| "***"))
            .field("emulator", &self.emulator)
            .finish()
    }
}

/// Environment variables that override the file, by name.
pub const ENV_VARS: &[&str] = &[
    "LEVER_API_KEY",
    "LEVER_ENVIRONMENT",
    "LEVER_API_URL",
    "LEVER_START_DATE",
    "LEVER_TABLES",
    "LEVER_RATE_PER_SEC",
    "BIGQUERY_PROJECT",
    "BIGQUERY_DATASET",
    "BIGQUERY_LOCATION",
    "BIGQUERY_API_URL",
    "BIGQUERY_CREDENTIALS_FILE",
    "BIGQUERY_CREDENTIALS_JSON",
    "BIGQUERY_EMULATOR",
    "LEVER_COLUMNS",
    "LEVER_CHILD_SYNC",
    "LEVER_SWEEP_DAYS",
];

impl RawConfig {
    /// Column selection as JSON, `{"opportunities": ["id", "name"], …}` (environment variables
    /// and template parameters carry it this way).
    pub fn apply_columns_json(&mut self, text: &str) -> Result<(), ConfigError> {
        let map: BTreeMap<String, Vec<String>> = serde_json::from_str(text)
            .map_err(|_| bad("LEVER_COLUMNS must be JSON like {\"opportunities\": [\"id\", \"name\"]}"))?;
        for (table, cols) in map {
            self.tables.entry(table).or_default().columns = Some(cols);
        }
        Ok(())
    }

    /// Column selection as `table=col1,col2` (the command line).
    pub fn apply_columns_arg(&mut self, arg: &str) -> Result<(), ConfigError> {
        let (table, cols) = arg
            .split_once('=')
            .ok_or_else(|| bad(format!("--columns `{arg}`: write it as TABLE=col1,col2")))?;
        let cols: Vec<String> = cols
            .split(',')
            .map(|c| c.trim().to_owned())
            .filter(|c| !c.is_empty())
            .collect();
        self.tables.entry(table.trim().to_owned()).or_default().columns = Some(cols);
        Ok(())
    }

    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| bad(format!("the config file is not valid: {}", e.message())))
    }

    /// Applies environment variables (given as a map so tests need not touch the process).
    pub fn apply_env(&mut self, env: &HashMap<String, String>) -> Result<(), ConfigError> {
        let get = |k: &str| env.get(k).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
        if let Some(v) = get("LEVER_API_KEY") {
            self.lever.api_key = Some(v);
        }
        if let Some(v) = get("LEVER_ENVIRONMENT") {
            self.lever.environment = Some(v);
        }
        if let Some(v) = get("LEVER_API_URL") {
            self.lever.api_url = Some(v);
        }
        if let Some(v) = get("LEVER_START_DATE") {
            self.lever.start_date = Some(v);
        }
        if let Some(v) = get("LEVER_TABLES") {
            self.lever.tables = Some(
                v.split(',')
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
                    .collect(),
            );
        }
        if let Some(v) = get("LEVER_RATE_PER_SEC") {
            self.lever.rate_per_sec = Some(
                v.parse()
                    .map_err(|_| bad("LEVER_RATE_PER_SEC must be a number of requests per second"))?,
            );
        }
        if let Some(v) = get("BIGQUERY_PROJECT") {
            self.bigquery.project = Some(v);
        }
        if let Some(v) = get("BIGQUERY_DATASET") {
            self.bigquery.dataset = Some(v);
        }
        if let Some(v) = get("BIGQUERY_LOCATION") {
            self.bigquery.location = Some(v);
        }
        if let Some(v) = get("BIGQUERY_API_URL") {
            self.bigquery.api_url = Some(v);
        }
        if let Some(v) = get("BIGQUERY_CREDENTIALS_FILE") {
            self.bigquery.credentials_file = Some(v);
        }
        if let Some(v) = get("BIGQUERY_CREDENTIALS_JSON") {
            self.bigquery.credentials_json = Some(v);
        }
        if let Some(v) = get("LEVER_COLUMNS") {
            self.apply_columns_json(&v)?;
        }
        if let Some(v) = get("LEVER_CHILD_SYNC") {
            self.sync.children = Some(v);
        }
        if let Some(v) = get("LEVER_SWEEP_DAYS") {
            self.sync.sweep_days = Some(
                v.parse()
                    .map_err(|_| bad("LEVER_SWEEP_DAYS must be a whole number of days"))?,
            );
        }
        if let Some(v) = get("BIGQUERY_EMULATOR") {
            self.bigquery.emulator = Some(matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct LeverSettings {
    pub api_key: ApiKey,
    pub environment: Environment,
    pub api_url: String,
    pub rate_per_sec: f64,
    pub burst: f64,
    pub timeout: Duration,
}

impl LeverSettings {
    /// The Lever client these settings describe (one per process: it holds the rate budget).
    pub fn client(&self) -> Result<crate::lever::LeverClient, reqwest::Error> {
        crate::lever::LeverClient::new(
            self.api_key.clone(),
            crate::lever::ClientConfig {
                base_url: self.api_url.clone(),
                environment: self.environment,
                rate_per_sec: self.rate_per_sec,
                burst: self.burst,
                timeout: self.timeout,
                retry: Default::default(),
            },
        )
    }
}

#[derive(Debug, Clone)]
pub struct SyncSettings {
    /// Pages of a list endpoint fetched per window (parent pages for child tables: one).
    pub pages_per_window: u32,
    /// Parents whose children are fetched at once (the rate limiter still paces them).
    pub child_concurrency: usize,
    /// How far before the last run's start an incremental run looks again, for clock skew and
    /// Lever's indexing delay.
    pub overlap: Duration,
    /// How long a chain holds a table once it stops renewing (a crashed chain's table frees up
    /// after this).
    pub lease: Duration,
    pub children: ChildSync,
}

/// How the per-opportunity child tables (interviews, notes, offers, referrals) are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildSync {
    /// Every run re-reads the children of every in-scope opportunity and replaces the tables:
    /// exact at the end of every run, one request per opportunity per table.
    Full,
    /// A run re-reads the children of the opportunities that changed since the last run plus a
    /// rotating slice of the others, so that each is re-read at least once per `period`; the
    /// children of a re-read opportunity replace its previous ones. Exact within the period.
    Sweep { period: Duration },
}

pub const DEFAULT_SWEEP_DAYS: u64 = 7;

impl Default for SyncSettings {
    fn default() -> Self {
        SyncSettings {
            pages_per_window: 10,
            // Requests wait for the rate limiter, not for each other: enough parents in flight
            // to keep a fast budget busy while responses take their time.
            child_concurrency: 32,
            overlap: Duration::from_secs(300),
            lease: Duration::from_secs(900),
            children: ChildSync::Full,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub lever: LeverSettings,
    /// No record whose last change is before this is fetched (epoch ms).
    pub start_ms: i64,
    pub tables: Vec<&'static TableDef>,
    pub warehouse: WarehouseConfig,
    pub sync: SyncSettings,
    /// The columns written for each selected table, in catalog order, extra fields last.
    pub columns: HashMap<&'static str, Vec<&'static Column>>,
}

fn parse_type(s: &str) -> Option<ColumnType> {
    Some(match s.trim().to_ascii_uppercase().as_str() {
        "STRING" => ColumnType::String,
        "INT64" | "INTEGER" => ColumnType::Int64,
        "FLOAT64" | "FLOAT" => ColumnType::Float64,
        "BOOL" | "BOOLEAN" => ColumnType::Bool,
        "TIMESTAMP" => ColumnType::Timestamp,
        "ARRAY<STRING>" => ColumnType::StringArray,
        "JSON" => ColumnType::Json,
        _ => return None,
    })
}

/// The selected columns of `t`. Extra fields become columns that live as long as the process
/// (configuration is read once), hence the leaked names.
fn select_columns(t: &'static TableDef, raw: Option<&RawTable>) -> Result<Vec<&'static Column>, ConfigError> {
    let required = |c: &Column| c.name == t.key || (t.parent().is_some() && c.name == "opportunity_id");
    let mut out: Vec<&'static Column> = match raw.and_then(|r| r.columns.as_ref()) {
        None => t.columns.iter().collect(),
        Some(names) => {
            for n in names {
                if t.column(n).is_none()
                    && !raw.is_some_and(|r| r.extra_fields.keys().any(|f| crate::discover::snake_case(f) == *n))
                {
                    return Err(bad(format!(
                        "table {} has no column `{n}`: `lever-sync discover` lists the columns and new Lever fields",
                        t.name
                    )));
                }
            }
            t.columns
                .iter()
                .filter(|c| required(c) || names.iter().any(|n| n == c.name))
                .collect()
        }
    };
    for (field, ty) in raw.map(|r| &r.extra_fields).into_iter().flatten() {
        let ty = parse_type(ty).ok_or_else(|| {
            bad(format!("extra field {field} of {}: type `{ty}` is not one of STRING, INT64, FLOAT64, BOOL, TIMESTAMP, ARRAY<STRING>, JSON", t.name))
        })?;
        let name = crate::discover::snake_case(field);
        if t.column(&name).is_some() || name.starts_with('_') || name.is_empty() {
            return Err(bad(format!(
                "extra field {field} of {}: column `{name}` is already declared or reserved",
                t.name
            )));
        }
        let field: &'static str = Box::leak(field.clone().into_boxed_str());
        let name: &'static str = Box::leak(name.into_boxed_str());
        out.push(Box::leak(Box::new(Column {
            name,
            ty,
            source: Source::Field(field),
        })));
    }
    Ok(out)
}

fn parse_start(s: &str) -> Result<i64, ConfigError> {
    let s = s.trim();
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return d
            .and_hms_opt(0, 0, 0)
            .map(|t| t.and_utc().timestamp_millis())
            .ok_or_else(|| bad("start_date is not a valid date"));
    }
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc).timestamp_millis())
        .map_err(|_| {
            bad(format!(
                "start_date `{s}` is not a date: write it as YYYY-MM-DD (e.g. 2024-01-31)"
            ))
        })
}

fn is_loopback(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let host = rest.split(['/', ':']).next().unwrap_or("");
    matches!(host, "127.0.0.1" | "localhost" | "[") || host.starts_with("127.") || rest.starts_with("[::1]")
}

fn valid_url(url: &str) -> bool {
    (url.starts_with("http://") || url.starts_with("https://")) && url.len() > "https://".len()
}

impl RawConfig {
    /// Validates everything at once; `now_ms` bounds the start date.
    pub fn validate(self, now_ms: i64) -> Result<Config, ConfigError> {
        let l = self.lever;
        let api_key = l
            .api_key
            .filter(|k| !k.trim().is_empty())
            .ok_or_else(|| bad("no Lever API key: set LEVER_API_KEY or [lever] api_key"))?;
        if api_key.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad(
                "the Lever API key has spaces or control characters around or in it: paste it again",
            ));
        }
        let environment = match l.environment.as_deref() {
            None => Environment::Production,
            Some(e) => Environment::parse(e)
                .ok_or_else(|| bad(format!("environment `{e}` is unknown: use production, sandbox or eu")))?,
        };
        let api_url = l.api_url.unwrap_or_else(|| environment.base_url().to_owned());
        if !valid_url(&api_url) {
            return Err(bad(format!("Lever api_url `{api_url}` is not an http(s) URL")));
        }
        let start_ms = parse_start(
            l.start_date
                .as_deref()
                .ok_or_else(|| bad("no start date: set LEVER_START_DATE or [lever] start_date (YYYY-MM-DD)"))?,
        )?;
        if start_ms > now_ms {
            return Err(bad("start_date is in the future: nothing could be synced"));
        }
        let tables = match l.tables {
            None => catalog::TABLES.iter().collect(),
            Some(names) if names.is_empty() => return Err(bad("tables is empty: pick at least one table")),
            Some(names) => {
                let mut picked = Vec::new();
                for n in &names {
                    let t = catalog::table(n).ok_or_else(|| {
                        bad(format!(
                            "unknown table `{n}`: choose from {}",
                            catalog::table_names().collect::<Vec<_>>().join(", ")
                        ))
                    })?;
                    if !picked.iter().any(|p: &&TableDef| p.name == t.name) {
                        picked.push(t);
                    }
                }
                // Catalog order: parents before children.
                picked.sort_by_key(|t| catalog::TABLES.iter().position(|c| c.name == t.name));
                picked
            }
        };
        for name in self.tables.keys() {
            if catalog::table(name).is_none() {
                return Err(bad(format!("[tables.{name}]: there is no table `{name}`")));
            }
        }
        let mut columns = HashMap::new();
        for t in &tables {
            columns.insert(t.name, select_columns(t, self.tables.get(t.name))?);
        }
        let rate_per_sec = l.rate_per_sec.unwrap_or(DEFAULT_RATE_PER_SEC);
        if !(rate_per_sec.is_finite() && rate_per_sec > 0.0) {
            return Err(bad("rate_per_sec must be a positive number"));
        }
        let burst = l.burst.unwrap_or(DEFAULT_BURST);
        if !(burst.is_finite() && burst >= 1.0) {
            return Err(bad("burst must be at least 1"));
        }
        let lever = LeverSettings {
            api_key: ApiKey::new(api_key),
            environment,
            api_url,
            rate_per_sec,
            burst,
            timeout: Duration::from_secs(l.timeout_secs.unwrap_or(30).max(1)),
        };

        let b = self.bigquery;
        let project = b
            .project
            .ok_or_else(|| bad("no BigQuery project: set BIGQUERY_PROJECT or [bigquery] project"))?;
        if project.is_empty()
            || !project
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | ':' | '_'))
        {
            return Err(bad(format!("BigQuery project `{project}` is not a valid project id")));
        }
        let dataset = b
            .dataset
            .ok_or_else(|| bad("no BigQuery dataset: set BIGQUERY_DATASET or [bigquery] dataset"))?;
        if dataset.is_empty() || dataset.len() > 1024 || !dataset.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(bad(format!(
                "BigQuery dataset `{dataset}` may hold only letters, digits and underscores"
            )));
        }
        let api_url = b.api_url.unwrap_or_else(|| BIGQUERY_API_URL.to_owned());
        if !valid_url(&api_url) {
            return Err(bad(format!("BigQuery api_url `{api_url}` is not an http(s) URL")));
        }
        let credentials = match (b.emulator.unwrap_or(false), b.credentials_file) {
            (true, _) if !is_loopback(&api_url) => {
                return Err(bad(
                    "emulator credentials only work with a local BigQuery api_url (127.0.0.1)",
                ))
            }
            (true, _) => Credentials::Emulator,
            (false, Some(path)) => {
                if !std::path::Path::new(&path).is_file() {
                    return Err(bad(format!("the BigQuery credentials file `{path}` does not exist")));
                }
                Credentials::ServiceAccountFile(path)
            }
            (false, None) if b.credentials_json.as_deref().is_some_and(|j| !j.trim().is_empty()) => {
                Credentials::ServiceAccountJson(b.credentials_json.clone().unwrap_or_default())
            }
            (false, None) => return Err(bad(
                "no BigQuery credentials: set BIGQUERY_CREDENTIALS_FILE or BIGQUERY_CREDENTIALS_JSON (a service-account key or an external_account configuration) or use the emulator",
            )),
        };
        let warehouse = WarehouseConfig {
            project,
            dataset,
            location: b.location,
            api_url,
            credentials,
        };

        let s = self.sync;
        let d = SyncSettings::default();
        let sync = SyncSettings {
            pages_per_window: s.pages_per_window.unwrap_or(d.pages_per_window).max(1),
            child_concurrency: s.child_concurrency.unwrap_or(d.child_concurrency).clamp(1, 64),
            overlap: s.overlap_secs.map_or(d.overlap, Duration::from_secs),
            lease: s.lease_secs.map_or(d.lease, |v| Duration::from_secs(v.max(1))),
            children: match s.children.as_deref().map(|v| v.trim().to_ascii_lowercase()) {
                None => d.children,
                Some(v) if v == "full" => ChildSync::Full,
                Some(v) if v == "sweep" => {
                    let days = s.sweep_days.unwrap_or(DEFAULT_SWEEP_DAYS);
                    if days == 0 {
                        return Err(bad("sweep_days must be at least 1"));
                    }
                    ChildSync::Sweep {
                        period: Duration::from_secs(days * 86_400),
                    }
                }
                Some(_) => return Err(bad("children must be \"full\" or \"sweep\"")),
            },
        };
        Ok(Config {
            lever,
            start_ms,
            tables,
            warehouse,
            sync,
            columns,
        })
    }
}

impl Config {
    /// The streams (walks of Lever) that the selected tables need, in catalog order.
    pub fn streams(&self) -> Vec<&'static str> {
        let mut out: Vec<&'static str> = Vec::new();
        for t in &self.tables {
            if !out.contains(&t.stream()) {
                out.push(t.stream());
            }
        }
        out.sort_by_key(|s| catalog::TABLES.iter().position(|t| t.name == *s));
        out
    }

    /// The columns written for `t` (all catalog columns for a table that is not selected).
    pub fn columns_of(&self, t: &'static TableDef) -> Vec<&'static Column> {
        self.columns
            .get(t.name)
            .cloned()
            .unwrap_or_else(|| t.columns.iter().collect())
    }

    pub fn selected_of_stream(&self, stream: &str) -> Vec<&'static TableDef> {
        self.tables.iter().copied().filter(|t| t.stream() == stream).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;

    fn base() -> RawConfig {
        RawConfig::from_toml(
            r#"
            [lever]
            api_key = "k"
            start_date = "2021-01-01"
            [bigquery]
            project = "p"
            dataset = "d"
            api_url = "http://127.0.0.1:9050"
            emulator = true
            "#,
        )
        .unwrap()
    }

    #[test]
    fn a_minimal_config_gets_the_documented_defaults() {
        let c = base().validate(NOW).unwrap();
        assert_eq!(c.lever.environment, Environment::Production);
        assert_eq!(c.lever.api_url, "https://api.lever.co/v1");
        assert_eq!(c.tables.len(), catalog::TABLES.len());
        assert_eq!(c.start_ms, 1_609_459_200_000);
        assert_eq!(
            c.streams(),
            vec!["opportunities", "interviews", "notes", "offers", "referrals", "users"]
        );
    }

    #[test]
    fn environment_variables_override_the_file() {
        let mut r = base();
        let env: HashMap<String, String> = [("LEVER_TABLES", "users, notes"), ("LEVER_ENVIRONMENT", "sandbox")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        r.apply_env(&env).unwrap();
        let c = r.validate(NOW).unwrap();
        assert_eq!(
            c.tables.iter().map(|t| t.name).collect::<Vec<_>>(),
            vec!["notes", "users"]
        );
        assert_eq!(c.lever.api_url, "https://api.sandbox.lever.co/v1");
    }

    #[test]
    fn applications_alone_still_walks_opportunities() {
        let mut r = base();
        r.lever.tables = Some(vec!["applications".into()]);
        let c = r.validate(NOW).unwrap();
        assert_eq!(c.streams(), vec!["opportunities"]);
    }

    #[test]
    fn bad_settings_are_explained() {
        type Mutation = Box<dyn Fn(&mut RawConfig)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|r| r.lever.api_key = None), "LEVER_API_KEY"),
            (
                Box::new(|r| r.lever.environment = Some("staging".into())),
                "production, sandbox or eu",
            ),
            (
                Box::new(|r| r.lever.start_date = Some("31/01/2024".into())),
                "YYYY-MM-DD",
            ),
            (Box::new(|r| r.lever.start_date = Some("2099-01-01".into())), "future"),
            (
                Box::new(|r| r.lever.tables = Some(vec!["candidates".into()])),
                "unknown table `candidates`",
            ),
            (
                Box::new(|r| r.bigquery.dataset = Some("my-dataset".into())),
                "letters, digits and underscores",
            ),
            (
                Box::new(|r| r.bigquery.api_url = Some("https://bigquery.googleapis.com".into())),
                "emulator credentials",
            ),
            (Box::new(|r| r.bigquery.emulator = None), "no BigQuery credentials"),
            (Box::new(|r| r.lever.rate_per_sec = Some(0.0)), "positive"),
        ];
        for (mutate, expected) in cases {
            let mut r = base();
            mutate(&mut r);
            let err = r.validate(NOW).unwrap_err().to_string();
            assert!(err.contains(expected), "{err} should mention {expected}");
        }
    }

    #[test]
    fn the_key_is_not_repeated_in_errors() {
        let mut r = base();
        r.lever.api_key = Some("secret key".into());
        let err = r.validate(NOW).unwrap_err().to_string();
        assert!(!err.contains("secret"));
    }

    #[test]
    fn columns_can_be_narrowed_and_keys_are_always_kept() {
        let mut r = base();
        r.apply_columns_arg("notes=text,created_at").unwrap();
        let c = r.validate(NOW).unwrap();
        let notes = catalog::table("notes").unwrap();
        let names: Vec<&str> = c.columns_of(notes).iter().map(|c| c.name).collect();
        assert_eq!(names, vec!["id", "opportunity_id", "text", "created_at"]);
        assert_eq!(
            c.columns_of(catalog::table("users").unwrap()).len(),
            catalog::table("users").unwrap().columns.len()
        );
    }

    #[test]
    fn extra_fields_become_typed_columns() {
        let mut r = base();
        r.tables
            .entry("opportunities".into())
            .or_default()
            .extra_fields
            .insert("candidateScore".into(), "INT64".into());
        let c = r.validate(NOW).unwrap();
        let cols = c.columns_of(catalog::table("opportunities").unwrap());
        let extra = cols.last().unwrap();
        assert_eq!(
            (extra.name, extra.ty, extra.source),
            ("candidate_score", ColumnType::Int64, Source::Field("candidateScore"))
        );
    }

    #[test]
    fn bad_column_selections_are_explained() {
        let mut r = base();
        r.apply_columns_json(r#"{"notes": ["txt"]}"#).unwrap();
        assert!(r.validate(NOW).unwrap_err().to_string().contains("no column `txt`"));
        let mut r = base();
        r.tables
            .entry("users".into())
            .or_default()
            .extra_fields
            .insert("x".into(), "NUMBER".into());
        assert!(r.validate(NOW).unwrap_err().to_string().contains("not one of"));
        let mut r = base();
        r.tables.entry("candidates".into()).or_default();
        assert!(r.validate(NOW).is_err());
        assert!(base().apply_columns_json("[1]").is_err());
    }

    #[test]
    fn a_service_account_key_given_as_json_text_is_used() {
        let mut r = base();
        r.bigquery.emulator = None;
        r.bigquery.api_url = None;
        r.bigquery.credentials_json = Some(r#"{"type": "service_account", "private_key": "k"}"#.into());
        let c = r.validate(NOW).unwrap();
        assert!(matches!(c.warehouse.credentials, Credentials::ServiceAccountJson(_)));
    }

    #[test]
    fn raw_settings_never_print_secrets() {
        let mut r = base();
        r.lever.api_key = Some("secret-key-123".into());
        r.bigquery.credentials_json = Some("private-json-456".into());
        let shown = format!("{r:?}");
        assert!(
            !shown.contains("secret-key-123") && !shown.contains("private-json-456"),
            "{shown}"
        );
    }

    #[test]
    fn unknown_settings_are_refused() {
        assert!(RawConfig::from_toml("[lever]\napi_kye = \"x\"").is_err());
    }
}
