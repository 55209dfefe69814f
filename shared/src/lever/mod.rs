//! The Lever Data API v1 client: authentication, paging, pacing and retries.
//!
//! It knows HTTP and Lever's envelope, not tables: callers pass a path and query parameters and
//! get pages of raw JSON records. It never logs the API key or record contents.

pub mod rate;
pub mod retry;

use rate::RateLimiter;
use retry::{classify_status, parse_retry_after, RetryPolicy, Verdict};
use serde_json::Value;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Lever's largest page.
pub const PAGE_LIMIT: u32 = 100;

/// Which Lever API host to talk to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Environment {
    Production,
    Sandbox,
    Eu,
}

impl Environment {
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "production" | "prod" => Some(Environment::Production),
            "sandbox" => Some(Environment::Sandbox),
            "eu" => Some(Environment::Eu),
            _ => None,
        }
    }

    pub fn base_url(self) -> &'static str {
        match self {
            Environment::Production => "https://api.lever.co/v1",
            Environment::Sandbox => "https://api.sandbox.lever.co/v1",
            Environment::Eu => "https://api.eu.lever.co/v1",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Environment::Production => "production",
            Environment::Sandbox => "sandbox",
            Environment::Eu => "eu",
        }
    }
}

/// The API key. Its `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(key: impl Into<String>) -> Self {
        ApiKey(key.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(***)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeverError {
    #[error("Lever rejected the API key (401) on the {environment} host: check the key and that it was made in that environment")]
    Unauthorized { environment: &'static str },
    #[error(
        "the API key may not read {path} (403: {message}): allow that endpoint for the key in Lever's API settings"
    )]
    Forbidden { path: String, message: String },
    #[error("{path} was not found (404)")]
    NotFound { path: String },
    #[error("Lever refused the paging token for {path} (400 Invalid offset token)")]
    InvalidOffset { path: String },
    #[error("Lever answered {status} for {path}: {message}")]
    Rejected { path: String, status: u16, message: String },
    #[error("{path} still failed after {attempts} attempts: {last}")]
    GaveUp { path: String, attempts: u32, last: String },
    #[error("{path} answered hasNext=true without a next token: refusing to stop early")]
    MissingNextToken { path: String },
    #[error("{path} answered with a body that is not a Lever list: {detail}")]
    Malformed { path: String, detail: String },
}

impl LeverError {
    pub fn code(&self) -> &'static str {
        match self {
            LeverError::Unauthorized { .. } => "lever_unauthorized",
            LeverError::Forbidden { .. } => "lever_forbidden",
            LeverError::NotFound { .. } => "lever_not_found",
            LeverError::InvalidOffset { .. } => "lever_invalid_offset",
            LeverError::Rejected { .. } => "lever_rejected",
            LeverError::GaveUp { .. } => "lever_unavailable",
            LeverError::MissingNextToken { .. } => "lever_missing_next",
            LeverError::Malformed { .. } => "lever_malformed",
        }
    }

    /// Worth a later invocation trying again (the state is saved; nothing is lost).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            LeverError::GaveUp { .. } | LeverError::Malformed { .. } | LeverError::InvalidOffset { .. }
        )
    }
}

/// One page of a list endpoint.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub data: Vec<Value>,
    /// The token for the next page; `None` on the last page.
    pub next: Option<String>,
}

/// Request counters of one client (one process), read for logs, history and benchmarks.
#[derive(Debug, Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub retries: AtomicU64,
    pub throttled: AtomicU64,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            requests: self.requests.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            throttled: self.throttled.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub requests: u64,
    pub retries: u64,
    pub throttled: u64,
}

impl StatsSnapshot {
    pub fn since(self, earlier: StatsSnapshot) -> StatsSnapshot {
        StatsSnapshot {
            requests: self.requests.saturating_sub(earlier.requests),
            retries: self.retries.saturating_sub(earlier.retries),
            throttled: self.throttled.saturating_sub(earlier.throttled),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub base_url: String,
    pub environment: Environment,
    pub rate_per_sec: f64,
    pub burst: f64,
    pub timeout: Duration,
    pub retry: RetryPolicy,
}

#[derive(Clone)]
pub struct LeverClient {
    http: reqwest::Client,
    key: ApiKey,
    cfg: Arc<ClientConfig>,
    limiter: Arc<RateLimiter>,
    stats: Arc<Stats>,
    /// The process-wide counters every scoped client adds to as well.
    totals: Arc<Stats>,
}

/// Lever's error envelope, `{"code": "...", "message": "..."}`.
fn error_message(body: &str) -> String {
    let msg = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_default();
    // Error text only; never echo a long body that could hold record data.
    msg.chars().take(200).collect()
}

impl LeverClient {
    pub fn new(key: ApiKey, cfg: ClientConfig) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("lever-bigquery-sync/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let limiter = Arc::new(RateLimiter::new(cfg.rate_per_sec, cfg.burst));
        let stats = Arc::new(Stats::default());
        Ok(LeverClient {
            http,
            key,
            cfg: Arc::new(cfg),
            limiter,
            totals: stats.clone(),
            stats,
        })
    }

    /// The same connection and rate budget, with counters of its own (one per window).
    pub fn scoped(&self) -> LeverClient {
        LeverClient {
            stats: Arc::new(Stats::default()),
            ..self.clone()
        }
    }

    /// This client's counters (a scoped client's own).
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// The counters of every client sharing this one's connection.
    pub fn totals(&self) -> &Arc<Stats> {
        &self.totals
    }

    fn count(&self, f: impl Fn(&Stats)) {
        f(&self.stats);
        if !Arc::ptr_eq(&self.stats, &self.totals) {
            f(&self.totals);
        }
    }

    pub fn limiter(&self) -> &Arc<RateLimiter> {
        &self.limiter
    }

    /// Fetches one page of a list endpoint. `offset` is the previous page's `next` token.
    pub async fn list_page(
        &self,
        path: &str,
        params: &[(&str, String)],
        offset: Option<&str>,
    ) -> Result<Page, LeverError> {
        let url = format!("{}{}", self.cfg.base_url.trim_end_matches('/'), path);
        let mut query: Vec<(&str, &str)> = params.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let limit = PAGE_LIMIT.to_string();
        query.push(("limit", &limit));
        if let Some(o) = offset {
            query.push(("offset", o));
        }
        let mut attempt = 0u32;
        let mut waited = Duration::ZERO;
        loop {
            attempt += 1;
            self.limiter.acquire().await;
            self.count(|s| {
                s.requests.fetch_add(1, Ordering::Relaxed);
            });
            let sent = self
                .http
                .get(&url)
                .basic_auth(self.key.expose(), Some(""))
                .query(&query)
                .send()
                .await;
            let (failure, retry_after) = match sent {
                Err(e) => (format!("transport error: {}", without_url(&e)), None),
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let retry_after = resp
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(parse_retry_after);
                    let body = resp.text().await;
                    match (classify_status(status), body) {
                        (_, Err(e)) => (format!("reading the body failed: {}", without_url(&e)), None),
                        (Verdict::Success, Ok(body)) => {
                            self.limiter.on_success();
                            match parse_page(&body) {
                                Ok(Some(page)) => return Ok(page),
                                Ok(None) => return Err(LeverError::MissingNextToken { path: path.to_owned() }),
                                // A body cut short is usually a dropped connection: send again.
                                Err(detail) => (format!("malformed body: {detail}"), None),
                            }
                        }
                        (Verdict::Retry, Ok(body)) => {
                            if status == 429 {
                                self.count(|s| {
                                    s.throttled.fetch_add(1, Ordering::Relaxed);
                                });
                                self.limiter.on_throttled();
                            }
                            (format!("HTTP {status} {}", error_message(&body)), retry_after)
                        }
                        (Verdict::Fail, Ok(body)) => return Err(self.permanent(path, status, &body)),
                    }
                }
            };
            match self.cfg.retry.next_wait(attempt, waited, retry_after) {
                Some(wait) => {
                    self.count(|s| {
                        s.retries.fetch_add(1, Ordering::Relaxed);
                    });
                    tracing::debug!(path, attempt, wait_ms = wait.as_millis() as u64, reason = %failure, "retrying Lever request");
                    tokio::time::sleep(wait).await;
                    waited += wait;
                }
                None => {
                    return Err(if failure.starts_with("malformed body") {
                        LeverError::Malformed {
                            path: path.to_owned(),
                            detail: failure,
                        }
                    } else {
                        LeverError::GaveUp {
                            path: path.to_owned(),
                            attempts: attempt,
                            last: failure,
                        }
                    })
                }
            }
        }
    }

    fn permanent(&self, path: &str, status: u16, body: &str) -> LeverError {
        let message = error_message(body);
        match status {
            401 => LeverError::Unauthorized {
                environment: self.cfg.environment.name(),
            },
            403 => LeverError::Forbidden {
                path: path.to_owned(),
                message,
            },
            404 => LeverError::NotFound { path: path.to_owned() },
            400 if message.contains("Invalid offset token") => LeverError::InvalidOffset { path: path.to_owned() },
            _ => LeverError::Rejected {
                path: path.to_owned(),
                status,
                message,
            },
        }
    }
}

/// reqwest's messages name the URL; ours never carry secrets, but keep errors short and stable.
fn without_url(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else if e.is_body() || e.is_decode() {
        "body interrupted"
    } else {
        "request failed"
    };
    kind.to_owned()
}

/// Parses Lever's list envelope. `Ok(None)` = `hasNext` without a `next` token.
/// A bare JSON array is accepted as a single last page (some child endpoints may not page).
pub fn parse_page(body: &str) -> Result<Option<Page>, String> {
    let v: Value =
        serde_json::from_str(body).map_err(|e| format!("invalid JSON at line {} column {}", e.line(), e.column()))?;
    match v {
        Value::Array(data) => Ok(Some(Page { data, next: None })),
        Value::Object(mut obj) => {
            let data = match obj.remove("data") {
                Some(Value::Array(d)) => d,
                Some(_) => return Err("`data` is not an array".into()),
                None => return Err("no `data` field".into()),
            };
            let has_next = obj.get("hasNext").and_then(Value::as_bool).unwrap_or(false);
            let next = obj
                .get("next")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_owned);
            match (has_next, next) {
                (true, None) => Ok(None),
                (true, Some(n)) => Ok(Some(Page { data, next: Some(n) })),
                (false, _) => Ok(Some(Page { data, next: None })),
            }
        }
        _ => Err("not an object".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_envelope_is_parsed() {
        let p = parse_page(r#"{"data":[{"id":"a"}],"hasNext":true,"next":"tok"}"#)
            .unwrap()
            .unwrap();
        assert_eq!(p.data.len(), 1);
        assert_eq!(p.next.as_deref(), Some("tok"));
        let last = parse_page(r#"{"data":[],"hasNext":false,"next":"ignored"}"#)
            .unwrap()
            .unwrap();
        assert_eq!(last.next, None);
        let bare = parse_page(r#"[{"id":"a"}]"#).unwrap().unwrap();
        assert_eq!(bare.data.len(), 1);
    }

    #[test]
    fn has_next_without_next_is_refused() {
        assert!(parse_page(r#"{"data":[],"hasNext":true}"#).unwrap().is_none());
        assert!(parse_page(r#"{"data":[],"hasNext":true,"next":""}"#).unwrap().is_none());
    }

    #[test]
    fn a_body_cut_short_is_malformed() {
        assert!(parse_page(r#"{"data":[{"id":"a"},{"id"#).is_err());
        assert!(parse_page(r#"{"hasNext":false}"#).is_err());
    }

    #[test]
    fn the_key_never_prints() {
        let k = ApiKey::new("super-secret-key");
        assert!(!format!("{k:?}").contains("super-secret"));
    }

    #[test]
    fn environments_map_to_hosts() {
        assert_eq!(
            Environment::parse("Production").map(Environment::base_url),
            Some("https://api.lever.co/v1")
        );
        assert_eq!(
            Environment::parse("sandbox").map(Environment::base_url),
            Some("https://api.sandbox.lever.co/v1")
        );
        assert_eq!(
            Environment::parse("eu").map(Environment::base_url),
            Some("https://api.eu.lever.co/v1")
        );
        assert_eq!(Environment::parse("staging"), None);
    }
}
