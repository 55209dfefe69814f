//! The Lever API simulator's HTTP side: Basic auth, Lever's list envelope with paging tokens
//! bound to the query, filters, the confidentiality default, `expand=applications`, child 404s,
//! a token-bucket 429, injectable faults, and request counters.

use crate::world::{World, CHILD_KINDS};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use base64::Engine;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Lever's documented limit: 10 requests/second per key, bursts to 20.
pub const LEVER_RATE: f64 = 10.0;
pub const LEVER_BURST: f64 = 20.0;

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub api_key: String,
    /// `None` turns the rate limit off.
    pub rate: Option<(f64, f64)>,
    /// Send `Retry-After` with 429s.
    pub retry_after: bool,
    /// Added to every response (models network and server time).
    pub latency: Duration,
    /// Answer 404 (as Lever has done) instead of an empty list for an opportunity without
    /// records of a kind, for every third such opportunity.
    pub child_404_when_empty: bool,
    /// Endpoint labels (`opportunities`, `notes`, …) the key may not read: 403.
    pub forbidden: HashSet<String>,
    /// Whether the key may read confidential opportunities (fixed when a key is made).
    pub confidential_access: bool,
    /// Serve at most this many records a page whatever `limit` asks (more pages, for tests
    /// that need long chains).
    pub page_cap: Option<usize>,
    pub order_seed: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            api_key: "sim-api-key".into(),
            rate: Some((LEVER_RATE, LEVER_BURST)),
            retry_after: false,
            latency: Duration::ZERO,
            child_404_when_empty: true,
            forbidden: HashSet::new(),
            confidential_access: true,
            page_cap: None,
            order_seed: 42,
        }
    }
}

/// A fault served instead of (or on top of) the normal answer.
#[derive(Debug, Clone, PartialEq)]
pub enum FaultKind {
    Status(u16),
    /// 429 with a `Retry-After` of this many seconds.
    Throttle {
        retry_after_secs: Option<u64>,
    },
    /// The page's JSON cut in half.
    Truncated,
    /// `hasNext: true` without a `next` token.
    HasNextWithoutNext,
    /// 400 Invalid offset token, for a request that carries a token.
    InvalidOffset,
    /// Wait this long before answering normally.
    Delay(Duration),
    /// On a child list: the opportunity is deleted just before the request arrives, so Lever
    /// answers 404 for it (a parent listed earlier in the walk that vanished since).
    VanishParent,
}

#[derive(Debug, Clone)]
pub struct Fault {
    /// The endpoint label it applies to (`opportunities`, `notes`, `users`, …); `None` = any.
    pub label: Option<String>,
    pub kind: FaultKind,
    /// How many matching requests it hits.
    pub times: u32,
    /// Matching requests let through before it starts hitting.
    pub skip: u32,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EndpointStats {
    pub requests: u64,
    pub throttled: u64,
    pub records: u64,
    pub not_found: u64,
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

pub struct Shared {
    pub world: Mutex<World>,
    pub config: Mutex<SimConfig>,
    faults: Mutex<VecDeque<Fault>>,
    stats: Mutex<BTreeMap<String, EndpointStats>>,
    bucket: Mutex<Bucket>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running simulator on 127.0.0.1.
#[derive(Clone)]
pub struct Simulator {
    pub shared: Arc<Shared>,
    pub addr: SocketAddr,
}

impl Simulator {
    pub async fn start(world: World, config: SimConfig) -> std::io::Result<Simulator> {
        Self::start_on(world, config, 0).await
    }

    pub async fn start_on(world: World, config: SimConfig, port: u16) -> std::io::Result<Simulator> {
        let burst = config.rate.map_or(0.0, |(_, b)| b);
        let shared = Arc::new(Shared {
            world: Mutex::new(world),
            config: Mutex::new(config),
            faults: Mutex::new(VecDeque::new()),
            stats: Mutex::new(BTreeMap::new()),
            bucket: Mutex::new(Bucket {
                tokens: burst,
                last: Instant::now(),
            }),
        });
        let app = Router::new()
            .route("/v1/opportunities", get(list_opportunities))
            .route("/v1/opportunities/deleted", get(list_deleted))
            .route("/v1/opportunities/{id}/{kind}", get(list_children))
            .route("/v1/users", get(list_users))
            .route("/_sim/counts", get(truth_counts))
            .route("/_sim/stats", get(stats_json))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Simulator { shared, addr })
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn world(&self) -> MutexGuard<'_, World> {
        lock(&self.shared.world)
    }

    pub fn configure(&self, change: impl FnOnce(&mut SimConfig)) {
        let mut c = lock(&self.shared.config);
        change(&mut c);
        if let Some((_, burst)) = c.rate {
            lock(&self.shared.bucket).tokens = burst;
        }
    }

    pub fn inject(&self, label: Option<&str>, kind: FaultKind, times: u32) {
        self.inject_after(label, kind, 0, times);
    }

    /// Like `inject`, after letting `skip` matching requests through.
    pub fn inject_after(&self, label: Option<&str>, kind: FaultKind, skip: u32, times: u32) {
        lock(&self.shared.faults).push_back(Fault {
            label: label.map(str::to_owned),
            kind,
            times,
            skip,
        });
    }

    /// Injected faults not yet served in full.
    pub fn pending_faults(&self) -> usize {
        lock(&self.shared.faults).len()
    }

    pub fn clear_faults(&self) {
        lock(&self.shared.faults).clear();
    }

    pub fn stats(&self) -> BTreeMap<String, EndpointStats> {
        lock(&self.shared.stats).clone()
    }

    pub fn reset_stats(&self) {
        lock(&self.shared.stats).clear();
    }

    pub fn total_requests(&self) -> u64 {
        self.stats().values().map(|s| s.requests).sum()
    }
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        [("content-type", "application/json")],
        json!({"code": code, "message": message}).to_string(),
    )
        .into_response()
}

fn parse_query(raw: Option<String>) -> Vec<(String, String)> {
    let raw = raw.unwrap_or_default();
    raw.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn param<'a>(q: &'a [(String, String)], name: &str) -> Option<&'a str> {
    q.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn params<'a>(q: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    q.iter()
        .filter(|(k, _)| k == name)
        .flat_map(|(_, v)| v.split(','))
        .collect()
}

/// A request's fingerprint: every parameter but the paging ones. Tokens carry it.
fn fingerprint(label: &str, q: &[(String, String)]) -> u64 {
    let mut kv: Vec<&(String, String)> = q.iter().filter(|(k, _)| k != "offset").collect();
    kv.sort();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    label.hash(&mut h);
    kv.hash(&mut h);
    h.finish()
}

fn token(fp: u64, offset: usize) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json!({"q": fp.to_string(), "o": offset}).to_string())
}

fn read_token(t: &str) -> Option<(u64, usize)> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(t).ok()?;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    Some((v.get("q")?.as_str()?.parse().ok()?, v.get("o")?.as_u64()? as usize))
}

enum Gate {
    Pass(Option<FaultKind>),
    Reply(Response),
}

/// Auth, 403, rate limit and fault selection, common to every endpoint.
async fn gate(s: &Shared, label: &str, headers: &HeaderMap, has_token: bool) -> Gate {
    let cfg = lock(&s.config).clone();
    if !cfg.latency.is_zero() {
        tokio::time::sleep(cfg.latency).await;
    }
    {
        let mut st = lock(&s.stats);
        st.entry(label.to_owned()).or_default().requests += 1;
    }
    let expected = base64::engine::general_purpose::STANDARD.encode(format!("{}:", cfg.api_key));
    let auth_ok = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .is_some_and(|v| v.trim() == expected);
    if !auth_ok {
        return Gate::Reply(error(StatusCode::UNAUTHORIZED, "Unauthorized", "Invalid API key"));
    }
    if cfg.forbidden.contains(label.split('+').next().unwrap_or(label)) {
        return Gate::Reply(error(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "This API key is not authorized for this endpoint",
        ));
    }
    if let Some((rate, burst)) = cfg.rate {
        let mut b = lock(&s.bucket);
        let now = Instant::now();
        b.tokens = (b.tokens + now.duration_since(b.last).as_secs_f64() * rate).min(burst);
        b.last = now;
        if b.tokens < 1.0 {
            drop(b);
            lock(&s.stats).entry(label.to_owned()).or_default().throttled += 1;
            let mut r = error(
                StatusCode::TOO_MANY_REQUESTS,
                "TooManyRequests",
                "Rate limit exceeded, please retry later",
            );
            if cfg.retry_after {
                r.headers_mut()
                    .insert("retry-after", axum::http::HeaderValue::from_static("1"));
            }
            return Gate::Reply(r);
        }
        b.tokens -= 1.0;
    }
    let fault = {
        let mut faults = lock(&s.faults);
        let pos = faults.iter().position(|f| {
            f.label.as_deref().is_none_or(|l| l == label) && (f.kind != FaultKind::InvalidOffset || has_token)
        });
        pos.and_then(|p| {
            if faults[p].skip > 0 {
                faults[p].skip -= 1;
                return None;
            }
            let kind = faults[p].kind.clone();
            faults[p].times -= 1;
            if faults[p].times == 0 {
                faults.remove(p);
            }
            Some(kind)
        })
    };
    match fault {
        Some(FaultKind::Status(code)) => {
            let st = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            Gate::Reply(error(st, "ServerError", "Injected failure"))
        }
        Some(FaultKind::Throttle { retry_after_secs }) => {
            lock(&s.stats).entry(label.to_owned()).or_default().throttled += 1;
            let mut r = error(
                StatusCode::TOO_MANY_REQUESTS,
                "TooManyRequests",
                "Rate limit exceeded, please retry later",
            );
            if let Some(secs) = retry_after_secs {
                if let Ok(v) = axum::http::HeaderValue::from_str(&secs.to_string()) {
                    r.headers_mut().insert("retry-after", v);
                }
            }
            Gate::Reply(r)
        }
        Some(FaultKind::InvalidOffset) => {
            Gate::Reply(error(StatusCode::BAD_REQUEST, "BadRequest", "Invalid offset token"))
        }
        Some(FaultKind::Delay(d)) => {
            tokio::time::sleep(d).await;
            Gate::Pass(None)
        }
        other => Gate::Pass(other),
    }
}

/// Serves `records` (already filtered) as Lever's paged envelope in the simulator's fixed,
/// unsorted order.
fn page(
    s: &Shared,
    label: &str,
    q: &[(String, String)],
    mut records: Vec<Value>,
    fault: Option<FaultKind>,
) -> Response {
    let (seed, cap) = {
        let c = lock(&s.config);
        (c.order_seed, c.page_cap.unwrap_or(100))
    };
    records.sort_by_cached_key(|r| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        seed.hash(&mut h);
        r.get("id").and_then(Value::as_str).unwrap_or_default().hash(&mut h);
        h.finish()
    });
    let limit = param(q, "limit")
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or(100)
        .clamp(1, 100)
        .min(cap.max(1));
    let fp = fingerprint(label, q);
    let offset = match param(q, "offset") {
        None => 0,
        Some(t) => match read_token(t) {
            Some((tfp, o)) if tfp == fp => o,
            _ => return error(StatusCode::BAD_REQUEST, "BadRequest", "Invalid offset token"),
        },
    };
    let end = (offset + limit).min(records.len());
    let data: Vec<Value> = records.get(offset..end).map(<[Value]>::to_vec).unwrap_or_default();
    lock(&s.stats).entry(label.to_owned()).or_default().records += data.len() as u64;
    let has_next = end < records.len();
    let mut body = json!({"data": data, "hasNext": has_next});
    if has_next {
        body["next"] = json!(token(fp, end));
    }
    match fault {
        Some(FaultKind::HasNextWithoutNext) => {
            body["hasNext"] = json!(true);
            if let Some(o) = body.as_object_mut() {
                o.remove("next");
            }
        }
        Some(FaultKind::Truncated) => {
            let text = body.to_string();
            let cut: String = text.chars().take(text.chars().count() / 2).collect();
            return (StatusCode::OK, [("content-type", "application/json")], cut).into_response();
        }
        _ => {}
    }
    (StatusCode::OK, [("content-type", "application/json")], body.to_string()).into_response()
}

fn in_range(v: Option<i64>, start: Option<&str>, end: Option<&str>) -> bool {
    let start = start.and_then(|s| s.parse::<i64>().ok());
    let end = end.and_then(|s| s.parse::<i64>().ok());
    if start.is_none() && end.is_none() {
        return true;
    }
    match v {
        None => false,
        Some(t) => start.is_none_or(|s| t >= s) && end.is_none_or(|e| t <= e),
    }
}

async fn list_opportunities(State(s): State<Arc<Shared>>, headers: HeaderMap, RawQuery(raw): RawQuery) -> Response {
    let q = parse_query(raw);
    let expand = params(&q, "expand").contains(&"applications");
    // The walk that carries applications is counted apart from plain opportunity walks.
    let label = if expand {
        "opportunities+applications"
    } else {
        "opportunities"
    };
    let fault = match gate(&s, label, &headers, param(&q, "offset").is_some()).await {
        Gate::Reply(r) => return r,
        Gate::Pass(f) => f,
    };
    let conf = param(&q, "confidentiality").unwrap_or("non-confidential");
    if conf != "non-confidential" && !lock(&s.config).confidential_access {
        return error(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "This API key is not authorized to access confidential data",
        );
    }
    let records: Vec<Value> = {
        let w = lock(&s.world);
        w.opportunities
            .values()
            .filter(|o| {
                let c = o
                    .get("confidentiality")
                    .and_then(Value::as_str)
                    .unwrap_or("non-confidential");
                conf == "all" || c == conf
            })
            .filter(|o| {
                in_range(
                    o.get("updatedAt").and_then(Value::as_i64),
                    param(&q, "updated_at_start"),
                    param(&q, "updated_at_end"),
                )
            })
            .filter(|o| {
                in_range(
                    o.get("createdAt").and_then(Value::as_i64),
                    param(&q, "created_at_start"),
                    param(&q, "created_at_end"),
                )
            })
            .map(|o| if expand { w.expanded(o) } else { o.clone() })
            .collect()
    };
    page(&s, label, &q, records, fault)
}

async fn list_deleted(State(s): State<Arc<Shared>>, headers: HeaderMap, RawQuery(raw): RawQuery) -> Response {
    let q = parse_query(raw);
    let fault = match gate(&s, "deleted", &headers, param(&q, "offset").is_some()).await {
        Gate::Reply(r) => return r,
        Gate::Pass(f) => f,
    };
    let records: Vec<Value> = lock(&s.world)
        .deleted
        .iter()
        .filter(|d| {
            in_range(
                d.get("deletedAt").and_then(Value::as_i64),
                param(&q, "deleted_at_start"),
                param(&q, "deleted_at_end"),
            )
        })
        .cloned()
        .collect();
    page(&s, "deleted", &q, records, fault)
}

async fn list_children(
    State(s): State<Arc<Shared>>,
    Path((id, kind)): Path<(String, String)>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    let q = parse_query(raw);
    let Some(kind) = CHILD_KINDS.iter().find(|k| **k == kind) else {
        return error(StatusCode::NOT_FOUND, "ResourceNotFound", "Not found");
    };
    let fault = match gate(&s, kind, &headers, param(&q, "offset").is_some()).await {
        Gate::Reply(r) => return r,
        Gate::Pass(f) => f,
    };
    if fault == Some(FaultKind::VanishParent) {
        lock(&s.world).delete_opportunity(&id);
    }
    let (exists, records) = {
        let w = lock(&s.world);
        (
            w.opportunities.contains_key(&id),
            w.children
                .get(kind)
                .and_then(|m| m.get(&id))
                .cloned()
                .unwrap_or_default(),
        )
    };
    if !exists {
        return error(StatusCode::NOT_FOUND, "ResourceNotFound", "Opportunity not found");
    }
    if records.is_empty() && lock(&s.config).child_404_when_empty {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (kind, &id).hash(&mut h);
        if h.finish() % 3 == 0 {
            lock(&s.stats).entry(kind.to_string()).or_default().not_found += 1;
            return error(StatusCode::NOT_FOUND, "ResourceNotFound", "No records found");
        }
    }
    page(&s, kind, &q, records, fault)
}

async fn list_users(State(s): State<Arc<Shared>>, headers: HeaderMap, RawQuery(raw): RawQuery) -> Response {
    let q = parse_query(raw);
    let fault = match gate(&s, "users", &headers, param(&q, "offset").is_some()).await {
        Gate::Reply(r) => return r,
        Gate::Pass(f) => f,
    };
    let all = param(&q, "includeDeactivated") == Some("true");
    let records: Vec<Value> = lock(&s.world)
        .users
        .iter()
        .filter(|u| all || u.get("deactivatedAt").is_none_or(Value::is_null))
        .cloned()
        .collect();
    page(&s, "users", &q, records, fault)
}

/// `GET /_sim/counts?start=<epoch ms>`: the truth's row count per table (for the demo).
async fn truth_counts(State(s): State<Arc<Shared>>, RawQuery(raw): RawQuery) -> Response {
    let q = parse_query(raw);
    let start = param(&q, "start").and_then(|v| v.parse().ok()).unwrap_or(0);
    let counts = lock(&s.world).truth_counts(start);
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        json!(counts).to_string(),
    )
        .into_response()
}

/// `GET /_sim/stats`: requests, 429s and records served per endpoint.
async fn stats_json(State(s): State<Arc<Shared>>) -> Response {
    let st = lock(&s.stats).clone();
    let v: serde_json::Map<String, Value> = st
        .into_iter()
        .map(|(k, e)| {
            (
                k,
                json!({"requests": e.requests, "throttled": e.throttled, "records": e.records}),
            )
        })
        .collect();
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        Value::Object(v).to_string(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_bound_to_their_query() {
        let q1 = vec![("updated_at_start".to_string(), "1".to_string())];
        let q2 = vec![("updated_at_start".to_string(), "2".to_string())];
        let t = token(fingerprint("opportunities", &q1), 100);
        let (fp, o) = read_token(&t).unwrap();
        assert_eq!(o, 100);
        assert_eq!(fp, fingerprint("opportunities", &q1));
        assert_ne!(fp, fingerprint("opportunities", &q2));
    }

    #[test]
    fn query_strings_are_decoded() {
        let q = parse_query(Some("expand=applications%2Cstage&a=b+c&offset=x%3D".into()));
        assert_eq!(params(&q, "expand"), vec!["applications", "stage"]);
        assert_eq!(param(&q, "a"), Some("b c"));
        assert_eq!(param(&q, "offset"), Some("x="));
    }
}
