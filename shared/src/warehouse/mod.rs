//! BigQuery through `gcp-bigquery-client`: the dataset, typed tables, NDJSON load jobs sent as
//! multipart uploads, and SQL (parameterised queries and DML).
//!
//! It knows SQL and the REST API, not Lever: callers hand it schemas, rows and statements.
//! Both BigQuery and the local emulator are served by the same code; the emulator differs only
//! in its endpoint and token (see `auth`).

pub mod auth;
pub mod federation;
pub mod schema;

use gcp_bigquery_client::error::BQError;
use gcp_bigquery_client::model::dataset::Dataset;
use gcp_bigquery_client::model::get_query_results_parameters::GetQueryResultsParameters;
use gcp_bigquery_client::model::query_parameter::QueryParameter;
use gcp_bigquery_client::model::query_parameter_type::QueryParameterType;
use gcp_bigquery_client::model::query_parameter_value::QueryParameterValue;
use gcp_bigquery_client::model::query_request::QueryRequest;
use gcp_bigquery_client::model::table::Table;
use gcp_bigquery_client::model::table_row::TableRow;
use gcp_bigquery_client::Client;
use schema::Field;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub use auth::Credentials;

/// BigQuery's public endpoints; both are configuration so tests point them at 127.0.0.1.
pub const BIGQUERY_API_URL: &str = "https://bigquery.googleapis.com";

#[derive(Debug, thiserror::Error)]
pub enum WarehouseError {
    #[error("BigQuery {op} failed: {message}")]
    Api {
        op: &'static str,
        message: String,
        transient: bool,
    },
    #[error("BigQuery {op}: {message}")]
    Job {
        op: &'static str,
        message: String,
        transient: bool,
    },
    #[error("BigQuery credentials: {0}")]
    Credentials(String),
    #[error("unexpected BigQuery result: {0}")]
    Unexpected(String),
}

impl WarehouseError {
    pub fn code(&self) -> &'static str {
        match self {
            WarehouseError::Api { .. } => "bigquery_api",
            WarehouseError::Job { .. } => "bigquery_job",
            WarehouseError::Credentials(_) => "bigquery_credentials",
            WarehouseError::Unexpected(_) => "bigquery_unexpected",
        }
    }

    pub fn is_retryable(&self) -> bool {
        match self {
            WarehouseError::Api { transient, .. } | WarehouseError::Job { transient, .. } => *transient,
            _ => false,
        }
    }
}

/// Error reasons BigQuery documents as worth retrying.
/// A failed load job. BigQuery's conversion messages can quote a value (personal data): only
/// the job id and the reason are kept; the job itself shows the details to whoever may see them.
fn load_failure(job_id: &str, err: &Value) -> WarehouseError {
    let reason = err.get("reason").and_then(Value::as_str).unwrap_or("unknown");
    WarehouseError::Job {
        op: "load",
        message: format!("job {job_id} failed [{reason}]"),
        transient: transient_reason(reason),
    }
}

/// Concurrent DML on one table can fail to serialize; a retry usually passes.
fn transient_message(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("could not serialize access") || m.contains("concurrent update")
}

fn transient_reason(reason: &str) -> bool {
    matches!(
        reason,
        "backendError" | "rateLimitExceeded" | "internalError" | "jobBackendError" | "jobRateLimitExceeded"
    )
}

fn api_error(op: &'static str, e: BQError) -> WarehouseError {
    let (message, transient) = match &e {
        BQError::ResponseError { error } => {
            let code = error.error.code;
            let reason_transient = error
                .error
                .errors
                .iter()
                .any(|m| m.get("reason").is_some_and(|r| transient_reason(r)));
            (
                format!("{} ({})", error.error.message, code),
                code == 429 || code >= 500 || reason_transient || transient_message(&error.error.message),
            )
        }
        BQError::RequestError(r) => (
            format!(
                "request failed: {}",
                if r.is_timeout() {
                    "timed out"
                } else if r.is_connect() {
                    "could not connect"
                } else {
                    "transport error"
                }
            ),
            true,
        ),
        other => (other.to_string(), false),
    };
    WarehouseError::Api { op, message, transient }
}

fn job_errors(op: &'static str, errors: &[gcp_bigquery_client::model::error_proto::ErrorProto]) -> WarehouseError {
    let transient = errors.iter().any(|e| {
        e.reason.as_deref().is_some_and(transient_reason) || e.message.as_deref().is_some_and(transient_message)
    });
    let message = errors
        .iter()
        .map(|e| {
            format!(
                "{}{}",
                e.message.as_deref().unwrap_or("error"),
                e.reason.as_deref().map(|r| format!(" [{r}]")).unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    WarehouseError::Job { op, message, transient }
}

/// Attempts of one BigQuery call when it fails transiently (5xx, 429, backend errors).
const ATTEMPTS: u32 = 4;

async fn retry_transient<T, F, Fut>(mut call: F) -> Result<T, WarehouseError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, WarehouseError>>,
{
    let mut delay = Duration::from_millis(300);
    let mut attempt = 1;
    loop {
        match call().await {
            Err(e) if e.is_retryable() && attempt < ATTEMPTS => {
                tracing::debug!(attempt, error_code = e.code(), "retrying a BigQuery call");
                tokio::time::sleep(delay).await;
                delay *= 3;
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// A query parameter.
#[derive(Debug, Clone)]
pub enum Param {
    Str(Option<String>),
    Int(Option<i64>),
}

impl Param {
    pub fn str(s: impl Into<String>) -> Param {
        Param::Str(Some(s.into()))
    }
    fn to_bq(&self, name: &str) -> QueryParameter {
        let (ty, value) = match self {
            Param::Str(v) => ("STRING", v.clone()),
            Param::Int(v) => ("INT64", v.map(|i| i.to_string())),
        };
        QueryParameter {
            name: Some(name.to_owned()),
            parameter_type: Some(QueryParameterType {
                r#type: ty.to_owned(),
                array_type: None,
                struct_types: None,
            }),
            parameter_value: Some(QueryParameterValue {
                value,
                array_values: None,
                struct_values: None,
            }),
        }
    }
}

/// A query's result, every cell as BigQuery's REST API sends it (`"v"`).
#[derive(Debug, Clone, Default)]
pub struct Rows {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Value>>,
}

impl Rows {
    pub fn index(&self, column: &str) -> Option<usize> {
        self.columns.iter().position(|c| c == column)
    }

    pub fn get<'a>(&self, row: &'a [Value], column: &str) -> &'a Value {
        static NULL: Value = Value::Null;
        self.index(column).and_then(|i| row.get(i)).unwrap_or(&NULL)
    }

    pub fn str(&self, row: &[Value], column: &str) -> Option<String> {
        self.get(row, column).as_str().map(str::to_owned)
    }

    /// INT64 cells come back as decimal strings.
    pub fn int(&self, row: &[Value], column: &str) -> Option<i64> {
        match self.get(row, column) {
            Value::String(s) => s.parse().ok(),
            Value::Number(n) => n.as_i64(),
            _ => None,
        }
    }

    fn extend(&mut self, rows: Option<Vec<TableRow>>) {
        for r in rows.unwrap_or_default() {
            self.rows.push(
                r.columns
                    .unwrap_or_default()
                    .into_iter()
                    .map(|c| c.value.unwrap_or(Value::Null))
                    .collect(),
            );
        }
    }
}

#[derive(Debug, Clone)]
pub struct WarehouseConfig {
    pub project: String,
    pub dataset: String,
    pub location: Option<String>,
    /// Root of the REST API (`https://bigquery.googleapis.com`); `/bigquery/v2` and
    /// `/upload/bigquery/v2` are appended.
    pub api_url: String,
    pub credentials: Credentials,
}

#[derive(Clone)]
pub struct Warehouse {
    bq: Client,
    http: reqwest::Client,
    auth: Arc<dyn gcp_bigquery_client::auth::Authenticator>,
    pub project: String,
    pub dataset: String,
    location: Option<String>,
    api_url: String,
}

/// How long to wait for a job before giving up on it in this invocation.
const JOB_WAIT: Duration = Duration::from_secs(300);
/// Result page size when reading query results.
const RESULT_PAGE: i32 = 10_000;

impl Warehouse {
    pub async fn connect(cfg: &WarehouseConfig) -> Result<Self, WarehouseError> {
        let auth = auth::authenticator(&cfg.credentials).await?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .map_err(|e| WarehouseError::Unexpected(e.to_string()))?;
        let api_url = cfg.api_url.trim_end_matches('/').to_owned();
        let bq = gcp_bigquery_client::client_builder::ClientBuilder::new()
            .with_v2_base_url(format!("{api_url}/bigquery/v2"))
            .with_client(http.clone())
            .build_from_authenticator(auth.clone())
            .await
            .map_err(|e| api_error("client setup", e))?;
        Ok(Warehouse {
            bq,
            http,
            auth,
            project: cfg.project.clone(),
            dataset: cfg.dataset.clone(),
            location: cfg.location.clone(),
            api_url,
        })
    }

    /// A fully qualified, quoted table name for SQL.
    pub fn table_ref(&self, table: &str) -> String {
        format!("`{}`.`{}`.`{}`", self.project, self.dataset, table)
    }

    // Metadata calls retry transient failures like queries and loads do: a 5xx or a dropped
    // connection on a lookup or a create is as likely as on a job, and must not fail a run.

    pub async fn dataset_exists(&self) -> Result<bool, WarehouseError> {
        retry_transient(|| async {
            match self.bq.dataset().get(&self.project, &self.dataset).await {
                Ok(_) => Ok(true),
                Err(BQError::ResponseError { error }) if error.error.code == 404 => Ok(false),
                Err(e) => Err(api_error("dataset lookup", e)),
            }
        })
        .await
    }

    pub async fn ensure_dataset(&self) -> Result<(), WarehouseError> {
        if self.dataset_exists().await? {
            return Ok(());
        }
        retry_transient(|| async {
            let mut ds = Dataset::new(&self.project, &self.dataset);
            if let Some(loc) = &self.location {
                ds = ds.location(loc);
            }
            // 409 also answers a retry whose first attempt created it but lost the answer.
            match self.bq.dataset().create(ds).await {
                Ok(_) => Ok(()),
                Err(BQError::ResponseError { error }) if error.error.code == 409 => Ok(()),
                Err(e) => Err(api_error("dataset create", e)),
            }
        })
        .await
    }

    /// The column names of a table, or `None` when it does not exist. Read from a `LIMIT 0`
    /// query rather than the table resource: the emulator's resource does not follow `ALTER`.
    pub async fn table_columns(&self, table: &str) -> Result<Option<Vec<String>>, WarehouseError> {
        let exists = retry_transient(|| async {
            match self.bq.table().get(&self.project, &self.dataset, table, None).await {
                Ok(_) => Ok(true),
                Err(BQError::ResponseError { error }) if error.error.code == 404 => Ok(false),
                Err(e) => Err(api_error("table lookup", e)),
            }
        })
        .await?;
        if !exists {
            return Ok(None);
        }
        let rows = self
            .query(&format!("SELECT * FROM {} LIMIT 0", self.table_ref(table)), &[])
            .await?;
        Ok(Some(rows.columns))
    }

    /// Creates a table; one that already exists is left as it is.
    pub async fn create_table(
        &self,
        table: &str,
        fields: &[Field],
        expires_in: Option<Duration>,
    ) -> Result<(), WarehouseError> {
        retry_transient(|| async {
            let mut t = Table::new(&self.project, &self.dataset, table, schema::to_bq(fields));
            if let Some(ttl) = expires_in {
                t = t.expiration_time(SystemTime::now() + ttl);
            }
            // 409 also answers a retry whose first attempt created it but lost the answer.
            match self.bq.table().create(t).await {
                Ok(_) => Ok(()),
                Err(BQError::ResponseError { error }) if error.error.code == 409 => Ok(()),
                Err(e) => Err(api_error("table create", e)),
            }
        })
        .await
    }

    /// Adds the fields a table lacks (`ALTER TABLE ADD COLUMN`, which both BigQuery and the
    /// emulator honour; the emulator ignores columns added by `tables.patch`). Returns every
    /// column the table has afterwards.
    pub async fn add_missing_columns(&self, table: &str, fields: &[Field]) -> Result<Vec<String>, WarehouseError> {
        let mut existing = self.table_columns(table).await?.unwrap_or_default();
        let mut added = Vec::new();
        for f in fields.iter().filter(|f| !existing.iter().any(|e| e == f.name)) {
            self.execute(
                &format!(
                    "ALTER TABLE {} ADD COLUMN IF NOT EXISTS `{}` {}",
                    self.table_ref(table),
                    f.name,
                    f.ty.sql_name()
                ),
                &[],
            )
            .await?;
            added.push(f.name.to_owned());
        }
        existing.extend(added);
        Ok(existing)
    }

    pub async fn drop_table(&self, table: &str) -> Result<(), WarehouseError> {
        self.execute(&format!("DROP TABLE IF EXISTS {}", self.table_ref(table)), &[])
            .await
            .map(|_| ())
    }

    pub async fn list_tables(&self) -> Result<Vec<String>, WarehouseError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = retry_transient(|| async {
                let mut opts = gcp_bigquery_client::table::ListOptions::default();
                if let Some(tok) = &token {
                    opts = opts.page_token(tok.clone());
                }
                self.bq
                    .table()
                    .list(&self.project, &self.dataset, opts)
                    .await
                    .map_err(|e| api_error("table list", e))
            })
            .await?;
            out.extend(
                page.tables
                    .unwrap_or_default()
                    .into_iter()
                    .map(|t| t.table_reference.table_id),
            );
            match page.next_page_token {
                Some(tok) if !tok.is_empty() => token = Some(tok),
                _ => return Ok(out),
            }
        }
    }

    fn request(&self, sql: &str, params: &[(&str, Param)]) -> QueryRequest {
        let mut req = QueryRequest::new(sql);
        req.use_legacy_sql = false;
        req.location = self.location.clone();
        req.max_results = Some(RESULT_PAGE);
        req.timeout_ms = Some(60_000);
        if !params.is_empty() {
            req.parameter_mode = Some("NAMED".to_owned());
            req.query_parameters = Some(params.iter().map(|(n, p)| p.to_bq(n)).collect());
        }
        req
    }

    /// Runs a statement and reads every result row. Errors that come back inside an HTTP 200
    /// body (the emulator does this) count as errors too.
    pub async fn query(&self, sql: &str, params: &[(&str, Param)]) -> Result<Rows, WarehouseError> {
        Ok(self.run(sql, params).await?.0)
    }

    /// Runs DML or DDL and returns the number of affected rows (0 for DDL).
    pub async fn execute(&self, sql: &str, params: &[(&str, Param)]) -> Result<u64, WarehouseError> {
        Ok(self.run(sql, params).await?.1)
    }

    /// Runs a statement, retrying transient failures a few times. Every statement we send is
    /// safe to repeat: MERGEs converge, state writes are compare-and-set, DDL is idempotent.
    async fn run(&self, sql: &str, params: &[(&str, Param)]) -> Result<(Rows, u64), WarehouseError> {
        retry_transient(|| self.run_once(sql, params)).await
    }

    async fn run_once(&self, sql: &str, params: &[(&str, Param)]) -> Result<(Rows, u64), WarehouseError> {
        let resp = self
            .bq
            .job()
            .query(&self.project, self.request(sql, params))
            .await
            .map_err(|e| api_error("query", e))?;
        if let Some(errs) = resp.errors.as_deref().filter(|e| !e.is_empty()) {
            return Err(job_errors("query", errs));
        }
        let mut rows = Rows {
            columns: resp
                .schema
                .as_ref()
                .and_then(|s| s.fields.as_ref())
                .map(|f| f.iter().map(|f| f.name.clone()).collect())
                .unwrap_or_default(),
            rows: Vec::new(),
        };
        let mut affected = resp
            .num_dml_affected_rows
            .as_deref()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let job_id = resp.job_reference.as_ref().and_then(|j| j.job_id.clone());
        let mut complete = resp.job_complete.unwrap_or(true);
        let mut page_token = resp.page_token.clone();
        if complete {
            rows.extend(resp.rows);
        }
        let deadline = tokio::time::Instant::now() + JOB_WAIT;
        while !complete || page_token.is_some() {
            let Some(job_id) = job_id.as_deref() else {
                return Err(WarehouseError::Unexpected("a query without a job reference".into()));
            };
            if tokio::time::Instant::now() > deadline {
                return Err(WarehouseError::Job {
                    op: "query",
                    message: "did not finish in time".into(),
                    transient: true,
                });
            }
            let params = GetQueryResultsParameters {
                format_options: None,
                location: self.location.clone(),
                max_results: Some(RESULT_PAGE),
                page_token: page_token.clone(),
                start_index: None,
                timeout_ms: Some(30_000),
            };
            let r = self
                .bq
                .job()
                .get_query_results(&self.project, job_id, params)
                .await
                .map_err(|e| api_error("query results", e))?;
            if let Some(errs) = r.errors.as_deref().filter(|e| !e.is_empty()) {
                return Err(job_errors("query", errs));
            }
            if !r.job_complete.unwrap_or(true) {
                continue;
            }
            if !complete {
                complete = true;
                if rows.columns.is_empty() {
                    rows.columns = r
                        .schema
                        .as_ref()
                        .and_then(|s| s.fields.as_ref())
                        .map(|f| f.iter().map(|f| f.name.clone()).collect())
                        .unwrap_or_default();
                }
                affected = r
                    .num_dml_affected_rows
                    .as_deref()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(affected);
            }
            rows.extend(r.rows);
            page_token = r.page_token.filter(|t| !t.is_empty());
        }
        Ok((rows, affected))
    }

    /// Appends NDJSON rows to `table` with a load job sent as one multipart upload. `job_id` is
    /// deterministic per window so that BigQuery refuses a second run of the same load (409);
    /// finalize deduplicates anyway, since the emulator does not honour job ids.
    pub async fn load_ndjson(&self, table: &str, job_id: &str, ndjson: Vec<u8>) -> Result<(), WarehouseError> {
        if ndjson.is_empty() {
            return Ok(());
        }
        retry_transient(|| self.load_once(table, job_id, &ndjson)).await
    }

    async fn load_once(&self, table: &str, job_id: &str, ndjson: &[u8]) -> Result<(), WarehouseError> {
        let token = self
            .auth
            .access_token()
            .await
            .map_err(|e| WarehouseError::Credentials(e.to_string()))?;
        let mut job_ref = json!({"projectId": self.project, "jobId": job_id});
        if let Some(loc) = &self.location {
            job_ref["location"] = json!(loc);
        }
        let meta = json!({
            "jobReference": job_ref,
            "configuration": {"load": {
                "destinationTable": {"projectId": self.project, "datasetId": self.dataset, "tableId": table},
                "sourceFormat": "NEWLINE_DELIMITED_JSON",
                "writeDisposition": "WRITE_APPEND",
                "createDisposition": "CREATE_NEVER",
                // Unknown fields are a bug of ours, not data to drop silently.
                "ignoreUnknownValues": false,
            }}
        });
        let boundary = format!("lever_sync_{}", uuid::Uuid::new_v4().simple());
        let mut body = Vec::with_capacity(ndjson.len() + 1024);
        body.extend_from_slice(format!("--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n{meta}\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes());
        body.extend_from_slice(ndjson);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let url = format!(
            "{}/upload/bigquery/v2/projects/{}/jobs?uploadType=multipart",
            self.api_url, self.project
        );
        let resp = self
            .http
            .post(&url)
            .bearer_auth(token)
            .header("content-type", format!("multipart/related; boundary={boundary}"))
            .body(body)
            .send()
            .await
            .map_err(|e| WarehouseError::Api {
                op: "load upload",
                message: if e.is_timeout() {
                    "timed out".into()
                } else {
                    "transport error".into()
                },
                transient: true,
            })?;
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let job: Value = if status == 409 {
            // The same window's load already ran: look at how it ended.
            json!({"jobReference": {"jobId": job_id}})
        } else if (200..300).contains(&status) {
            serde_json::from_str(&text).map_err(|e| WarehouseError::Unexpected(format!("load job response: {e}")))?
        } else {
            let message = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v.pointer("/error/message").and_then(Value::as_str).map(str::to_owned))
                .unwrap_or_else(|| format!("HTTP {status}"));
            return Err(WarehouseError::Api {
                op: "load upload",
                message,
                transient: status == 429 || status >= 500,
            });
        };
        let id = job
            .pointer("/jobReference/jobId")
            .and_then(Value::as_str)
            .unwrap_or(job_id)
            .to_owned();
        self.wait_for_job(&id, job).await
    }

    async fn wait_for_job(&self, job_id: &str, mut job: Value) -> Result<(), WarehouseError> {
        let deadline = tokio::time::Instant::now() + JOB_WAIT;
        let mut delay = Duration::from_millis(200);
        loop {
            if job.pointer("/status/state").and_then(Value::as_str) == Some("DONE") {
                if let Some(err) = job.pointer("/status/errorResult") {
                    return Err(load_failure(job_id, err));
                }
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(WarehouseError::Job {
                    op: "load",
                    message: "did not finish in time".into(),
                    transient: true,
                });
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
            let j = self
                .bq
                .job()
                .get_job(&self.project, job_id, self.location.as_deref())
                .await
                .map_err(|e| api_error("job status", e))?;
            job = serde_json::to_value(&j).map_err(|e| WarehouseError::Unexpected(e.to_string()))?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_load_never_quotes_a_value() {
        let err = json!({"reason": "invalid", "message": "Error while reading data, error message: Could not parse 'Zoë Ångström' as INT64 for field duration"});
        let e = load_failure("job-1", &err);
        let text = e.to_string();
        assert!(
            !text.contains("Zoë") && text.contains("invalid") && text.contains("job-1"),
            "{text}"
        );
        assert!(!e.is_retryable());
        assert!(load_failure("j", &json!({"reason": "backendError"})).is_retryable());
    }

    #[test]
    fn concurrent_update_failures_are_retried() {
        assert!(transient_message(
            "Could not serialize access to table p:d.t due to concurrent update"
        ));
        assert!(!transient_message("Syntax error: Unexpected keyword ROWS"));
    }
}
