//! A local stand-in for the Lambda invoke API on 127.0.0.1: the SDK's async invokes land here
//! and each one runs the `sync-table` handler in-process, as Lambda would run the function. It
//! retries a failed invocation twice (Lambda's default for async invokes), records every event
//! it saw, and can misdeliver as AWS may: every event twice, copies late and out of order (a
//! seeded delay before each runs), chosen events never, and any event again later.

use crate::chaos::Rng;
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
use std::time::{Duration, Instant};

/// Async-invoke retries after a function error (Lambda's default).
const RETRIES: u32 = 2;

/// How events are misdelivered; every choice comes from `seed`.
#[derive(Debug, Clone, Default)]
pub struct Delivery {
    /// Every event is delivered twice.
    pub duplicate: bool,
    /// Each copy waits a seeded time up to this before it runs, so a copy can run after the
    /// event that follows it, and chains of different tables interleave differently.
    pub max_delay: Duration,
    /// Received events (numbered from 0 in arrival order) that are accepted and never run.
    pub drop: Vec<usize>,
    pub seed: u64,
}

#[derive(Default)]
pub struct Recorder {
    /// Every event received, in order.
    pub events: Mutex<Vec<ChainEvent>>,
    /// Every step's outcome.
    pub outcomes: Mutex<Vec<(ChainEvent, Result<StepOutcome, String>)>>,
    in_flight: AtomicUsize,
    pub duplicate: AtomicBool,
    delivery: Mutex<Option<(Delivery, Rng)>>,
    received: AtomicUsize,
    /// Events accepted and never run.
    pub dropped: Mutex<Vec<ChainEvent>>,
}

#[derive(Clone)]
pub struct LocalLambda {
    pub url: String,
    pub recorder: Arc<Recorder>,
    app: Arc<Mutex<Option<ChainApp>>>,
    containers: Containers,
}

/// Per table, the function instance (container) that runs its events, when tables must not
/// share one process — as on Lambda, where each chain's container has its own rate limiter.
type Containers = Arc<Mutex<std::collections::HashMap<String, ChainApp>>>;

#[derive(Clone)]
struct Ctx {
    recorder: Arc<Recorder>,
    app: Arc<Mutex<Option<ChainApp>>>,
    containers: Containers,
}

impl LocalLambda {
    pub async fn start() -> std::io::Result<LocalLambda> {
        let recorder = Arc::new(Recorder::default());
        let app: Arc<Mutex<Option<ChainApp>>> = Arc::new(Mutex::new(None));
        let containers = Containers::default();
        let ctx = Ctx {
            recorder: recorder.clone(),
            app: app.clone(),
            containers: containers.clone(),
        };
        let router = Router::new()
            .route("/2015-03-31/functions/{name}/invocations", post(invoke))
            .with_state(ctx);
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let url = format!("http://{}", listener.local_addr()?);
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Ok(LocalLambda {
            url,
            recorder,
            app,
            containers,
        })
    }

    /// Runs `table`'s events in `app` instead of the shared one.
    pub fn serve_table(&self, table: &str, app: ChainApp) {
        self.containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(table.to_owned(), app);
    }

    /// Runs each of the app's tables in a container of its own: its own syncer, Lever client
    /// and pace, as on Lambda, where every chain runs in a separate function instance.
    pub async fn serve_each_table_apart(&self, app: &ChainApp) -> Result<(), String> {
        let cfg = app.syncer.config();
        for stream in cfg.streams() {
            let syncer = crate::harness::syncer_for(cfg.clone(), "dispatch").await?;
            self.serve_table(stream, ChainApp { syncer, ..app.clone() });
        }
        Ok(())
    }

    /// The function that events run (set once the app, which needs this endpoint, is built).
    pub fn serve(&self, app: ChainApp) {
        *self.app.lock().unwrap_or_else(|p| p.into_inner()) = Some(app);
    }

    /// Waits until no invocation is queued or running (every chain has ended), and says since
    /// when none has been.
    pub async fn settle(&self, limit: Duration) -> Instant {
        let start = Instant::now();
        let mut quiet_since: Option<Instant> = None;
        while start.elapsed() < limit {
            if self.recorder.in_flight.load(Ordering::SeqCst) == 0 {
                let since = *quiet_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= Duration::from_millis(400) {
                    return since;
                }
            } else {
                quiet_since = None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the chains did not settle within {limit:?}");
    }

    /// Misdeliver from now on as `d` says.
    pub fn misdeliver(&self, d: Delivery) {
        let rng = Rng::new(d.seed);
        *self.recorder.delivery.lock().unwrap_or_else(|p| p.into_inner()) = Some((d, rng));
    }

    /// Delivers `event` now, as a late copy from AWS would arrive (retries included).
    pub fn deliver(&self, event: ChainEvent) {
        if let Some(app) = app_for(&self.containers, &self.app, &event.table) {
            run(app, event, self.recorder.clone(), Duration::ZERO);
        }
    }

    pub fn dropped(&self) -> Vec<ChainEvent> {
        self.recorder.dropped.lock().unwrap_or_else(|p| p.into_inner()).clone()
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
    let Some(app) = app_for(&ctx.containers, &ctx.app, &event.table) else {
        return (StatusCode::SERVICE_UNAVAILABLE, "no function").into_response();
    };
    let n = ctx.recorder.received.fetch_add(1, Ordering::SeqCst);
    let (delays, dropped) = {
        let mut guard = ctx.recorder.delivery.lock().unwrap_or_else(|p| p.into_inner());
        match guard.as_mut() {
            Some((d, rng)) => {
                let copies = if d.duplicate { 2 } else { 1 };
                let max = d.max_delay.as_millis() as u64;
                let delays: Vec<Duration> = (0..copies)
                    .map(|_| Duration::from_millis(if max == 0 { 0 } else { rng.below(max + 1) }))
                    .collect();
                (delays, d.drop.contains(&n))
            }
            None => {
                let copies = if ctx.recorder.duplicate.load(Ordering::SeqCst) {
                    2
                } else {
                    1
                };
                (vec![Duration::ZERO; copies], false)
            }
        }
    };
    if dropped {
        ctx.recorder
            .dropped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(event);
    } else {
        for delay in delays {
            run(app.clone(), event.clone(), ctx.recorder.clone(), delay);
        }
    }
    // Async invokes answer 202 Accepted with an empty body.
    (
        StatusCode::ACCEPTED,
        [("content-type", "application/json")],
        Value::Null.to_string(),
    )
        .into_response()
}

/// Runs one delivered copy of an event after `delay`, with Lambda's retries on failure.
fn run(app: ChainApp, event: ChainEvent, recorder: Arc<Recorder>, delay: Duration) {
    recorder
        .events
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(event.clone());
    recorder.in_flight.fetch_add(1, Ordering::SeqCst);
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let mut attempt = 0;
        loop {
            let deadline = chrono::Utc::now().timestamp_millis() + 900_000;
            let result = chain::handle_step(&app, &event, Some(deadline))
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

/// The function instance that runs `table`'s events: its own container if it has one.
fn app_for(containers: &Containers, shared: &Mutex<Option<ChainApp>>, table: &str) -> Option<ChainApp> {
    let own = containers.lock().unwrap_or_else(|p| p.into_inner()).get(table).cloned();
    own.or_else(|| shared.lock().unwrap_or_else(|p| p.into_inner()).clone())
}
