//! A pass-through proxy in front of the BigQuery emulator that can fail chosen requests, so
//! tests can make a load job or a MERGE fail once or for good.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::json;
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone)]
pub struct BqFault {
    /// Matches requests whose path contains this (`/upload/` = load jobs, `/queries` = SQL).
    pub path_contains: String,
    /// And whose body contains this (e.g. `MERGE`), if set.
    pub body_contains: Option<String>,
    pub status: u16,
    pub times: u32,
    /// Forward the request first, then answer with the failure: the work is done, the answer
    /// lost (as on a dropped connection).
    pub lose_answer: bool,
}

#[derive(Clone)]
struct Inner {
    upstream: String,
    http: reqwest::Client,
    faults: Arc<Mutex<Vec<BqFault>>>,
    hits: Arc<Mutex<u32>>,
}

#[derive(Clone)]
pub struct BqProxy {
    pub url: String,
    inner: Inner,
}

impl BqProxy {
    pub async fn start(upstream: &str) -> std::io::Result<BqProxy> {
        let inner = Inner {
            upstream: upstream.trim_end_matches('/').to_owned(),
            http: reqwest::Client::new(),
            faults: Arc::new(Mutex::new(Vec::new())),
            hits: Arc::new(Mutex::new(0)),
        };
        let app = Router::new().fallback(forward).with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let url = format!("http://{}", listener.local_addr()?);
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(BqProxy { url, inner })
    }

    pub fn fail(&self, fault: BqFault) {
        self.inner.faults.lock().unwrap_or_else(|p| p.into_inner()).push(fault);
    }

    pub fn clear(&self) {
        self.inner.faults.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// How many requests a fault answered.
    pub fn hits(&self) -> u32 {
        *self.inner.hits.lock().unwrap_or_else(|p| p.into_inner())
    }
}

async fn forward(State(p): State<Inner>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let path = uri.path().to_owned();
    let injected = {
        let mut faults = p.faults.lock().unwrap_or_else(|e| e.into_inner());
        let text = String::from_utf8_lossy(&body);
        let hit = faults.iter().position(|f| {
            path.contains(&f.path_contains) && f.body_contains.as_deref().is_none_or(|b| text.contains(b))
        });
        hit.map(|i| {
            let status = (faults[i].status, faults[i].lose_answer);
            faults[i].times -= 1;
            if faults[i].times == 0 {
                faults.remove(i);
            }
            status
        })
    };
    if let Some((status, lose_answer)) = injected {
        *p.hits.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        if lose_answer {
            let _ = send(&p, &method, &uri, &headers, &body).await;
        }
        let reason = if status >= 500 { "backendError" } else { "invalid" };
        let body = json!({"error": {"code": status, "message": "injected failure", "errors": [{"reason": reason, "message": "injected failure"}], "status": "UNAVAILABLE"}});
        return (
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            [("content-type", "application/json")],
            body.to_string(),
        )
            .into_response();
    }
    match send(&p, &method, &uri, &headers, &body).await {
        Ok(resp) => {
            let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let ct = resp
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("application/json")
                .to_owned();
            let bytes = resp.bytes().await.unwrap_or_default();
            (status, [("content-type", ct)], bytes.to_vec()).into_response()
        }
        Err(_) => (StatusCode::BAD_GATEWAY, "upstream unreachable").into_response(),
    }
}

async fn send(
    p: &Inner,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
) -> reqwest::Result<reqwest::Response> {
    let url = format!("{}{}", p.upstream, uri.path_and_query().map_or("", |q| q.as_str()));
    let m = reqwest::Method::from_bytes(method.as_str().as_bytes()).unwrap_or(reqwest::Method::GET);
    let mut req = p.http.request(m, url).body(body.to_vec());
    for name in ["content-type", "authorization"] {
        if let Some(v) = headers.get(name).and_then(|v| v.to_str().ok()) {
            req = req.header(name, v);
        }
    }
    req.send().await
}
