//! The Lambda chain end to end, on loopback: `dispatch` starts chains through the real AWS SDK
//! pointed at a local invoke endpoint, which runs each `sync-table` step in-process.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use lever_sim::harness::{assert_dataset_matches, duplicate_ids, sync_all, syncer_for, Setup, ALL_TABLES};
use lever_sim::lambda::LocalLambda;
use lever_sim::server::{SimConfig, Simulator};
use lever_sim::world::{Volume, World};
use lever_sync::aws::{local_sdk_config, LambdaInvoker, Secrets};
use lever_sync::chain::{self, ChainApp, ChainLimits, StepOutcome};
use lever_sync::sync::{Checkpoint, KillSwitch};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const SETTLE: Duration = Duration::from_secs(600);

/// A simulator serving 10 records a page, so each table's chain takes many windows.
async fn paged_sim(opportunities: usize) -> Simulator {
    let cfg = SimConfig {
        rate: None,
        page_cap: Some(10),
        ..Default::default()
    };
    Simulator::start(World::generated(&Volume::new(opportunities, 71)), cfg)
        .await
        .unwrap()
}

async fn chain_app(setup: &Setup, lambda: &LocalLambda, kill: Option<KillSwitch>, limits: ChainLimits) -> ChainApp {
    let mut syncer = syncer_for(setup.config(), "dispatch").await.unwrap();
    if let Some(k) = kill {
        syncer = syncer.with_kill_switch(k);
    }
    let app = ChainApp {
        syncer,
        invoker: Arc::new(LambdaInvoker::new(&local_sdk_config(&lambda.url))),
        function: "sync-table".into(),
        limits,
    };
    lambda.serve(app.clone());
    app
}

fn chains_per_table(lambda: &LocalLambda) -> BTreeMap<String, BTreeSet<String>> {
    let mut m: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for e in lambda.events() {
        m.entry(e.table).or_default().insert(e.chain);
    }
    m
}

async fn assert_exact(app: &ChainApp, sim: &Simulator) {
    assert_dataset_matches(&app.syncer, sim, &ALL_TABLES).await;
    for t in ALL_TABLES {
        assert!(
            duplicate_ids(app.syncer.warehouse(), t).await.is_empty(),
            "{t} has duplicate ids"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_tick_syncs_all_tables_through_self_invoking_chains() {
    let sim = paged_sim(100).await;
    let mut setup = Setup::new(&sim, "chain");
    setup.raw.sync.pages_per_window = Some(1);
    let lambda = LocalLambda::start().await.unwrap();
    let app = chain_app(&setup, &lambda, None, ChainLimits::default()).await;
    let answer = chain::dispatch(&app, &json!({"action": "tick"})).await.unwrap();
    assert_eq!(answer["chains"]["opportunities"], json!("started"));
    lambda.settle(SETTLE).await;
    assert_exact(&app, &sim).await;

    let events = lambda.events();
    let max_hop = events
        .iter()
        .filter(|e| e.table == "opportunities")
        .map(|e| e.hop)
        .max()
        .unwrap_or(0);
    assert!(
        max_hop > 16,
        "the opportunities chain ran {max_hop} hops, past Lambda's recursion stop"
    );
    assert!(
        chains_per_table(&lambda).values().all(|c| c.len() == 1),
        "one chain per table"
    );
    let failures: Vec<_> = lambda.outcomes().into_iter().filter(|(_, r)| r.is_err()).collect();
    assert!(failures.is_empty(), "{failures:?}");
    println!("invocations: {}, longest chain: {} hops", events.len(), max_hop + 1);

    // A later tick runs incremental chains again; still exact.
    sim.world().add_opportunity();
    chain::dispatch(&app, &json!({"action": "sync", "tables": ["opportunities", "notes"]}))
        .await
        .unwrap();
    lambda.settle(SETTLE).await;
    assert_dataset_matches(&app.syncer, &sim, &["opportunities", "applications", "notes"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_delivered_twice_still_ends_exact_with_one_chain_per_table() {
    let sim = paged_sim(50).await;
    let mut setup = Setup::new(&sim, "chain_dup");
    setup.raw.sync.pages_per_window = Some(1);
    let lambda = LocalLambda::start().await.unwrap();
    lambda.recorder.duplicate.store(true, Ordering::SeqCst);
    let app = chain_app(&setup, &lambda, None, ChainLimits::default()).await;
    chain::dispatch(&app, &json!({"action": "tick"})).await.unwrap();
    lambda.settle(SETTLE).await;
    assert_exact(&app, &sim).await;
    assert!(
        chains_per_table(&lambda).values().all(|c| c.len() == 1),
        "no second chain"
    );
    // Each window ran once: per table and hop, at most one step continued the chain.
    let mut continued: HashMap<(String, i64), usize> = HashMap::new();
    for (e, r) in lambda.outcomes() {
        if let Ok(StepOutcome::Continued { .. } | StepOutcome::Finished { .. }) = r {
            *continued.entry((e.table, e.hop)).or_default() += 1;
        }
    }
    assert!(
        continued.values().all(|n| *n == 1),
        "a duplicate event forked a chain: {continued:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_killed_between_load_and_reinvoke_is_resumed_by_dispatch() {
    let sim = paged_sim(50).await;
    let mut setup = Setup::new(&sim, "chain_kill");
    setup.raw.sync.pages_per_window = Some(1);
    setup.raw.sync.lease_secs = Some(2);
    let lambda = LocalLambda::start().await.unwrap();
    let fired = Arc::new(AtomicBool::new(false));
    let f = fired.clone();
    // The opportunities chain dies after saving window 3, before starting window 4.
    let kill: KillSwitch = Arc::new(move |s: &str, c: Checkpoint, hop: i64| {
        s == "opportunities" && c == Checkpoint::AfterSave && hop == 3 && !f.swap(true, Ordering::SeqCst)
    });
    let app = chain_app(&setup, &lambda, Some(kill), ChainLimits::default()).await;
    chain::dispatch(&app, &json!({"action": "tick"})).await.unwrap();
    lambda.settle(SETTLE).await;
    assert!(fired.load(Ordering::SeqCst));
    // Lambda retried the failed event; the window was already done, so the retries did nothing.
    let opp_state = app.syncer.store().load("opportunities").await.unwrap();
    assert_eq!(opp_state.hop, 4, "the chain stopped after window 3");
    // Once its lease runs out, the next tick resumes it from its saved position.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let answer = chain::dispatch(&app, &json!({"action": "tick"})).await.unwrap();
    assert_eq!(answer["chains"]["opportunities"], json!("resumed"));
    lambda.settle(SETTLE).await;
    assert_exact(&app, &sim).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tick_during_a_running_chain_does_not_start_another() {
    let sim = paged_sim(60).await;
    let mut setup = Setup::new(&sim, "chain_tick");
    setup.raw.sync.pages_per_window = Some(1);
    let lambda = LocalLambda::start().await.unwrap();
    let app = chain_app(&setup, &lambda, None, ChainLimits::default()).await;
    chain::dispatch(&app, &json!({"action": "tick"})).await.unwrap();
    // Wait until the opportunities chain is a few windows in.
    for _ in 0..600 {
        if app.syncer.store().load("opportunities").await.unwrap().hop >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let second = chain::dispatch(&app, &json!({"action": "tick"})).await.unwrap();
    assert_eq!(second["chains"]["opportunities"], json!("running"));
    lambda.settle(SETTLE).await;
    assert_exact(&app, &sim).await;
    // A table whose chain was running got none from the second tick; one whose run had already
    // finished got a new run, after the first.
    for (table, chains) in chains_per_table(&lambda) {
        let want = if second["chains"][&table] == json!("running") {
            1
        } else {
            2
        };
        assert_eq!(chains.len(), want, "{table}: {second}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runaway_chain_is_ended_with_a_recorded_error() {
    let sim = paged_sim(60).await;
    let mut setup = Setup::new(&sim, "chain_runaway");
    setup.raw.sync.pages_per_window = Some(1);
    setup.raw.lever.tables = Some(vec!["opportunities".into()]);
    let lambda = LocalLambda::start().await.unwrap();
    let limits = ChainLimits {
        max_hops: 3,
        ..Default::default()
    };
    let app = chain_app(&setup, &lambda, None, limits).await;
    chain::dispatch(&app, &json!({"action": "tick"})).await.unwrap();
    lambda.settle(SETTLE).await;
    assert!(lambda
        .outcomes()
        .iter()
        .any(|(_, r)| matches!(r, Ok(StepOutcome::Ended { code }) if code == "chain_hop_limit")));
    let st = app.syncer.store().load("opportunities").await.unwrap();
    assert_eq!(st.phase, lever_sync::sync::plan::Phase::Idle);
    assert!(st.last_error.unwrap_or_default().contains("chain_hop_limit"));
    let runs = app.syncer.store().recent_runs(10).await.unwrap();
    assert!(runs
        .rows
        .iter()
        .any(|r| runs.str(r, "error_code").as_deref() == Some("chain_hop_limit")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_events_answer_clearly_and_bad_ones_start_nothing() {
    let sim = paged_sim(20).await;
    let setup = Setup::new(&sim, "console");
    let lambda = LocalLambda::start().await.unwrap();
    let app = chain_app(&setup, &lambda, None, ChainLimits::default()).await;
    for bad in [
        json!({"action": "explode"}),
        json!({}),
        json!({"action": "sync", "tables": ["candidates"]}),
        json!({"action": "delete_connection", "confirm": "wrong"}),
    ] {
        let err = chain::dispatch(&app, &bad).await.unwrap_err().to_string();
        assert!(!err.is_empty());
    }
    assert!(lambda.events().is_empty(), "a bad event starts nothing");
    sync_all(&app.syncer).await.unwrap();
    let status = chain::dispatch(&app, &json!({"action": "status"})).await.unwrap();
    assert_eq!(status["tables"].as_array().map(Vec::len), Some(6));
    assert!(status["recent_runs"].as_array().is_some_and(|r| !r.is_empty()));
    let full = chain::dispatch(&app, &json!({"action": "full_refresh", "table": "notes"}))
        .await
        .unwrap();
    assert_eq!(full["chains"]["notes"], json!("started"));
    lambda.settle(SETTLE).await;
    assert_exact(&app, &sim).await;
}

/// Secrets Manager through the real SDK against a moto server (`MOTO_URL`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_functions_read_their_secrets_from_secrets_manager() {
    let moto = std::env::var("MOTO_URL").expect("MOTO_URL is not set: run the tests with `make test`");
    let sim = paged_sim(5).await;
    let setup = Setup::new(&sim, "secrets");
    let sdk = local_sdk_config(&moto);
    let sm = aws_sdk_secretsmanager::Client::new(&sdk);
    let key_id = format!("lever-key-{}", setup.dataset);
    let key = setup.raw.lever.api_key.clone().unwrap();
    sm.create_secret()
        .name(&key_id)
        .secret_string(json!({"api_key": key}).to_string())
        .send()
        .await
        .unwrap();
    let mut env: HashMap<String, String> = [
        ("LEVER_API_KEY_SECRET_ID", key_id.as_str()),
        ("LEVER_API_URL", sim.base_url().as_str()),
        ("LEVER_START_DATE", "2020-01-01"),
        ("BIGQUERY_PROJECT", "test-project"),
        ("BIGQUERY_DATASET", setup.dataset.as_str()),
        ("BIGQUERY_API_URL", setup.raw.bigquery.api_url.as_deref().unwrap()),
        ("BIGQUERY_EMULATOR", "true"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let secrets = Secrets::new(&sdk);
    let now = chrono::Utc::now().timestamp_millis();
    let cfg = chain::lambda_config(&env, &secrets, now).await.unwrap();
    assert_eq!(cfg.lever.api_key.expose(), key);
    // The key read from the secret works against Lever.
    let syncer = syncer_for(cfg, "secrets").await.unwrap();
    sync_all(&syncer).await.unwrap();

    // A key in the environment itself is refused; a missing secret is named, its value never.
    env.insert("LEVER_API_KEY".into(), "plain-text-key".into());
    let err = chain::lambda_config(&env, &secrets, now).await.unwrap_err().to_string();
    assert!(
        err.contains("Secrets Manager") && !err.contains("plain-text-key"),
        "{err}"
    );
    env.remove("LEVER_API_KEY");
    env.insert("LEVER_API_KEY_SECRET_ID".into(), "no-such-secret".into());
    let err = chain::lambda_config(&env, &secrets, now).await.unwrap_err().to_string();
    assert!(err.contains("no-such-secret") && !err.contains(&key), "{err}");
}

/// Lambda may deliver an event again hours later. A late copy of the first event of a chain
/// whose run has long finished, after another chain's run, must not start a run of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_first_event_of_an_earlier_run_starts_no_run() {
    let sim = paged_sim(10).await;
    let mut setup = Setup::new(&sim, "chain_late");
    setup.raw.lever.tables = Some(vec!["users".into()]);
    let lambda = LocalLambda::start().await.unwrap();
    let app = chain_app(&setup, &lambda, None, ChainLimits::default()).await;
    let first_event = |from: usize| lambda.events()[from..].iter().find(|e| e.hop == 0).cloned().unwrap();
    chain::dispatch(&app, &json!({"action": "tick"})).await.unwrap();
    lambda.settle(SETTLE).await;
    let first = first_event(0);
    // A second run by a second chain, then the first run's first event again.
    let n = lambda.events().len();
    chain::dispatch(&app, &json!({"action": "tick"})).await.unwrap();
    lambda.settle(SETTLE).await;
    let second = first_event(n);
    assert_ne!(first.chain, second.chain);
    // Likewise after a full refresh: chains made before it are earlier chains.
    chain::dispatch(&app, &json!({"action": "full_refresh", "table": "users"}))
        .await
        .unwrap();
    lambda.settle(SETTLE).await;
    let before = lambda.outcomes().len();
    for late in [first, second] {
        lambda.deliver(late);
        lambda.settle(SETTLE).await;
    }
    let late = &lambda.outcomes()[before..];
    assert_eq!(late.len(), 2);
    assert!(
        late.iter().all(|(_, r)| matches!(r, Ok(StepOutcome::Stale))),
        "a late first event did work: {late:?}"
    );
    let runs = app.syncer.store().recent_runs(100).await.unwrap();
    assert_eq!(runs.rows.len(), 3, "three runs were asked for, and no more ran");
    assert_dataset_matches(&app.syncer, &sim, &["users"]).await;
}

/// Every table's chain in a container of its own, each with its own rate limiter, against a
/// simulator that enforces Lever's 10 requests/second: the chains split the account's budget
/// between the ones running, so together they stay under Lever's limit (almost no 429s) and
/// the dataset ends exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chains_in_separate_containers_share_the_accounts_rate_budget() {
    let sim = Simulator::start(World::generated(&Volume::new(40, 73)), SimConfig::default())
        .await
        .unwrap();
    let mut setup = Setup::new(&sim, "budget");
    // The account's budget is Lever's whole limit; every container is told the same.
    setup.raw.lever.rate_per_sec = Some(10.0);
    setup.raw.lever.burst = Some(2.0);
    let lambda = LocalLambda::start().await.unwrap();
    let app = chain_app(&setup, &lambda, None, ChainLimits::default()).await;
    let streams = setup.config().streams();
    lambda.serve_each_table_apart(&app).await.unwrap();
    app.syncer.setup().await.unwrap();
    sim.reset_stats();
    let started = std::time::Instant::now();
    chain::dispatch(&app, &json!({"action": "tick"})).await.unwrap();
    let secs = lambda
        .settle(SETTLE)
        .await
        .duration_since(started)
        .as_secs_f64()
        .max(0.1);
    assert_exact(&app, &sim).await;
    let (requests, throttled) = sim
        .stats()
        .values()
        .fold((0, 0), |(r, t), s| (r + s.requests, t + s.throttled));
    // A number to read, not to assert: the wall time includes every BigQuery step.
    println!(
        "{streams:?} chains at once: {requests} requests, {throttled} answered 429, {secs:.1} s: \
         {:.1} requests/second of Lever's 10",
        requests as f64 / secs
    );
    assert!(
        throttled * 100 < requests,
        "{throttled} of {requests} requests answered 429: the chains overran the shared budget"
    );
}

/// Each window writes one JSON log line with the table, run, hop, pages, rows, requests, retries
/// and duration; its counts add up to what the simulator served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_window_logs_one_json_line_with_its_counts() {
    let logs = lever_sim::chaos::capture_logs();
    let sim = paged_sim(20).await;
    let mut setup = Setup::new(&sim, "chain_logs");
    setup.raw.sync.pages_per_window = Some(1);
    let lambda = LocalLambda::start().await.unwrap();
    let app = chain_app(&setup, &lambda, None, ChainLimits::default()).await;
    chain::dispatch(&app, &json!({"action": "sync", "tables": ["users"]}))
        .await
        .unwrap();
    lambda.settle(SETTLE).await;
    let runs = app.syncer.store().recent_runs(1).await.unwrap();
    let run_id = runs.str(&runs.rows[0], "run_id").unwrap();

    // Other tests in this process log too: keep this run's lines.
    let windows: Vec<serde_json::Value> = logs
        .text()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "window done" && v["run_id"] == run_id.as_str())
        .collect();
    const FIELDS: [&str; 8] = [
        "table",
        "run_id",
        "hop",
        "pages",
        "rows",
        "requests",
        "retries",
        "duration_ms",
    ];
    for w in &windows {
        for field in FIELDS {
            assert!(!w[field].is_null(), "window line without {field}: {w}");
        }
        assert_eq!(w["table"], "users");
    }
    let sum = |f: &str| windows.iter().map(|w| w[f].as_u64().unwrap()).sum::<u64>();
    let users = sim.world().users.len() as u64;
    // Ten records a page, one page a window.
    assert_eq!(windows.len() as u64, users.div_ceil(10), "one line per window");
    assert_eq!(sum("pages"), users.div_ceil(10));
    assert_eq!(sum("rows"), users);
    assert_eq!(sum("requests"), sim.stats()["users"].requests);
}
