//! A local stand-in for the Lambda invoke API on 127.0.0.1: the SDK's async invokes land here
//! and each one runs the `sync-table` step in-process, as Lambda would run the function. It can
//! deliver every event twice, retries a failed invocation twice (Lambda's default for async
//! invokes), and records every event it saw.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use lever_sync::chain::{self, ChainApp, ChainEvent, StepOutcome};
use serde_json::Value;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Async-invoke retries after a function error (Lambda's default).
const RETRIES: u32 = 2;

#[derive(Default)]
pub struct Recorder {
    /// Every event received, in order.
    pub events: Mutex<Vec<ChainEvent>>,
    /// Every step's outcome.
    pub outcomes: Mutex<Vec<(ChainEvent, Result<StepOutcome, String>)>>,
    in_flight: AtomicUsize,
    pub duplicate: AtomicBool,
}

#[derive(Clone)]
pub struct LocalLambda {
    pub url: String,
    pub recorder: Arc<Recorder>,
    app: Arc<Mutex<Option<ChainApp>>>,
}

#[derive(Clone)]
struct Ctx {
    recorder: Arc<Recorder>,
    app: Arc<Mutex<Option<ChainApp>>>,
}

impl LocalLambda {
    pub async fn start() -> std::io::Result<LocalLambda> {
        let recorder = Arc::new(Recorder::default());
        let app: Arc<Mutex<Option<ChainApp>>> = Arc::new(Mutex::new(None));
        let ctx = Ctx {
            recorder: recorder.clone(),
            app: app.clone(),
        };
        let router = Router::new()
            .route("/2015-03-31/functions/{name}/invocations", post(invoke))
            .with_state(ctx);
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let url = format!("http://{}", listener.local_addr()?);
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Ok(LocalLambda { url, recorder, app })
    }

    /// The function that events run (set once the app, which needs this endpoint, is built).
    pub fn serve(&self, app: ChainApp) {
        *self.app.lock().unwrap_or_else(|p| p.into_inner()) = Some(app);
    }

    /// Waits until no invocation is queued or running (every chain has ended).
    pub async fn settle(&self, limit: Duration) {
        let start = std::time::Instant::now();
        let mut quiet = 0;
        while start.elapsed() < limit {
            if self.recorder.in_flight.load(Ordering::SeqCst) == 0 {
                quiet += 1;
                if quiet >= 5 {
                    return;
                }
            } else {
                quiet = 0;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the chains did not settle within {limit:?}");
    }

    pub fn events(&self) -> Vec<ChainEvent> {
        self.recorder.events.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn outcomes(&self) -> Vec<(ChainEvent, Result<StepOutcome, String>)> {
        self.recorder.outcomes.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

async fn invoke(State(ctx): State<Ctx>, Path(_name): Path<String>, body: Bytes) -> Response {
    let event: ChainEvent = match serde_json::from_slice(&body) {
        Ok(e) => e,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("not a chain event: {e}")).into_response(),
    };
    let Some(app) = ctx.app.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "no function").into_response();
    };
    let copies = if ctx.recorder.duplicate.load(Ordering::SeqCst) {
        2
    } else {
        1
    };
    for _ in 0..copies {
        ctx.recorder
            .events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(event.clone());
        ctx.recorder.in_flight.fetch_add(1, Ordering::SeqCst);
        let (app, event, recorder) = (app.clone(), event.clone(), ctx.recorder.clone());
        tokio::spawn(async move {
            let mut attempt = 0;
            loop {
                let deadline = chrono::Utc::now().timestamp_millis() + 900_000;
                let result = chain::step(&app, &event, Some(deadline))
                    .await
                    .map_err(|e| format!("{}: {e}", e.code()));
                let failed = result.is_err();
                recorder
                    .outcomes
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((event.clone(), result));
                if !failed || attempt >= RETRIES {
                    break;
                }
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            recorder.in_flight.fetch_sub(1, Ordering::SeqCst);
        });
    }
    // Async invokes answer 202 Accepted with an empty body.
    (
        StatusCode::ACCEPTED,
        [("content-type", "application/json")],
        Value::Null.to_string(),
    )
        .into_response()
}
