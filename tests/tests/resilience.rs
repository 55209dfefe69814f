//! Interruptions, duplicate deliveries, Lever's rate limit and bad answers, BigQuery failures:
//! each ends with a clear error or a recovery, and the next run ends equal to the truth.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use lever_sim::bqproxy::{BqFault, BqProxy};
use lever_sim::harness::{
    assert_dataset_matches, duplicate_ids, emulator_url, fast_sim, read_table, sync_all, syncer_for, Setup, ALL_TABLES,
};
use lever_sim::server::{FaultKind, SimConfig, Simulator};
use lever_sim::world::{Volume, World};
use lever_sync::error::SyncError;
use lever_sync::sync::{Checkpoint, KillSwitch, WindowOutcome};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

fn small_world() -> World {
    World::generated(&Volume::new(120, 31))
}

/// Kills the first invocation that reaches `checkpoint` of `stream` at `hop` (any hop if None).
fn kill_once(stream: &'static str, checkpoint: Checkpoint, hop: Option<i64>) -> (KillSwitch, Arc<AtomicBool>) {
    let fired = Arc::new(AtomicBool::new(false));
    let f = fired.clone();
    let k: KillSwitch = Arc::new(move |s: &str, c: Checkpoint, h: i64| {
        s == stream && c == checkpoint && hop.is_none_or(|x| x == h) && !f.swap(true, Ordering::SeqCst)
    });
    (k, fired)
}

async fn assert_exact(setup: &Setup, sim: &Simulator) {
    let syncer = setup.syncer().await;
    assert_dataset_matches(&syncer, sim, &ALL_TABLES).await;
    for t in ALL_TABLES {
        assert!(
            duplicate_ids(syncer.warehouse(), t).await.is_empty(),
            "{t} has duplicate ids"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_killed_at_any_boundary_resumes_to_the_truth() {
    let sim = fast_sim(small_world()).await;
    let points: [(&str, Checkpoint, Option<i64>); 8] = [
        ("opportunities", Checkpoint::AfterFetch, Some(0)),
        ("opportunities", Checkpoint::AfterLoad, Some(1)),
        ("opportunities", Checkpoint::AfterSave, Some(2)),
        ("opportunities", Checkpoint::AfterMerge, None),
        ("notes", Checkpoint::AfterLoad, Some(0)),
        ("interviews", Checkpoint::AfterSave, Some(1)),
        ("offers", Checkpoint::AfterFinalizeState, None),
        ("users", Checkpoint::AfterLoad, Some(0)),
    ];
    for (stream, checkpoint, hop) in points {
        let mut setup = Setup::new(&sim, "kill");
        setup.raw.sync.pages_per_window = Some(1);
        let (kill, fired) = kill_once(stream, checkpoint, hop);
        let first = setup.syncer().await.with_kill_switch(kill);
        let err = sync_all(&first).await.expect_err("the kill stops the sync");
        assert!(
            fired.load(Ordering::SeqCst),
            "{stream} {checkpoint:?} {hop:?} was reached"
        );
        assert!(err.contains("stopped at"), "{err}");
        // The same chain resumes (a retried invocation holds the same lease).
        sync_all(&setup.syncer().await)
            .await
            .unwrap_or_else(|e| panic!("resume after {stream} {checkpoint:?}: {e}"));
        assert_exact(&setup, &sim).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_runner_takes_over_a_dead_runs_table_once_its_lease_expires() {
    let sim = fast_sim(small_world()).await;
    let mut setup = Setup::new(&sim, "lease");
    setup.raw.sync.pages_per_window = Some(1);
    setup.raw.sync.lease_secs = Some(1);
    let (kill, _) = kill_once("opportunities", Checkpoint::AfterSave, Some(1));
    let dead = setup.syncer_as("runner-a").await.with_kill_switch(kill);
    assert!(sync_all(&dead).await.is_err());
    let other = setup.syncer_as("runner-b").await;
    assert_eq!(
        other.run_window("opportunities", None).await.unwrap(),
        WindowOutcome::Busy,
        "the lease is still held"
    );
    tokio::time::sleep(std::time::Duration::from_millis(1300)).await;
    sync_all(&other).await.unwrap();
    assert_exact(&setup, &sim).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_delivered_twice_changes_nothing() {
    let sim = fast_sim(small_world()).await;
    let mut setup = Setup::new(&sim, "twice");
    setup.raw.sync.pages_per_window = Some(1);
    let syncer = setup.syncer().await;
    syncer.setup().await.unwrap();
    for stream in syncer.config().streams() {
        let mut hop = 0;
        loop {
            let outcome = syncer.run_window(stream, Some(hop)).await.unwrap();
            // The same event again: already done, so nothing happens and no second chain starts.
            let again = syncer.run_window(stream, Some(hop)).await.unwrap();
            match outcome {
                WindowOutcome::Continue { hop: next, .. } => {
                    assert_eq!(again, WindowOutcome::Stale, "{stream} hop {hop} delivered twice");
                    hop = next;
                }
                WindowOutcome::Finished(_) => {
                    assert_eq!(again, WindowOutcome::Stale, "{stream} finalize delivered twice");
                    // A late copy of the chain's first event must not start another run.
                    let late_first = syncer.run_window(stream, Some(0)).await.unwrap();
                    assert_eq!(
                        late_first,
                        WindowOutcome::Stale,
                        "{stream}: a late first event started a run"
                    );
                    break;
                }
                other => panic!("{stream}: {other:?}"),
            }
        }
    }
    assert_exact(&setup, &sim).await;
    let runs = syncer.store().recent_runs(100).await.unwrap();
    assert_eq!(runs.rows.len(), ALL_TABLES.len(), "one recorded run per table");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lever_rate_limit_is_retried_and_the_sync_ends_exact() {
    let sim = Simulator::start(World::generated(&Volume::new(25, 41)), SimConfig::default())
        .await
        .unwrap();
    let mut setup = Setup::new(&sim, "rate");
    // Faster than Lever allows, to provoke 429s.
    setup.raw.lever.rate_per_sec = Some(40.0);
    setup.raw.lever.burst = Some(40.0);
    let syncer = setup.syncer().await;
    sync_all(&syncer).await.unwrap();
    assert_exact(&setup, &sim).await;
    let throttled: u64 = sim.stats().values().map(|s| s.throttled).sum();
    assert!(throttled > 0, "the simulator answered 429");
    assert!(
        syncer.lever().totals().snapshot().retries >= throttled,
        "every 429 was retried"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_is_a_clear_error_and_the_next_run_with_the_right_key_is_exact() {
    let sim = fast_sim(World::recorded()).await;
    let mut setup = Setup::new(&sim, "badkey");
    let good = setup.raw.lever.api_key.clone();
    setup.raw.lever.api_key = Some("not-the-key".into());
    let err = sync_all(&setup.syncer().await).await.unwrap_err();
    assert!(err.contains("401") && err.contains("production"), "{err}");
    assert!(!err.contains("not-the-key"), "the key never appears in errors");
    let syncer = setup.syncer().await;
    assert!(
        read_table(syncer.warehouse(), "opportunities").await.is_empty(),
        "nothing was written"
    );
    setup.raw.lever.api_key = good;
    sync_all(&setup.syncer().await).await.unwrap();
    assert_exact(&setup, &sim).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_the_key_may_not_read_names_the_endpoint() {
    let sim = fast_sim(World::recorded()).await;
    sim.configure(|c| {
        c.forbidden.insert("offers".into());
    });
    let setup = Setup::new(&sim, "forbidden");
    let syncer = setup.syncer().await;
    syncer.setup().await.unwrap();
    let err = syncer.sync_stream("offers").await.unwrap_err();
    assert_eq!(err.code(), "lever_forbidden");
    assert!(
        err.to_string().contains("/offers") && err.to_string().contains("403"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_pages_are_retried_then_reported_and_the_next_run_is_exact() {
    let sim = fast_sim(small_world()).await;
    let setup = Setup::new(&sim, "malformed");
    // Once: a retry fetches the page whole.
    sim.inject(Some("opportunities+applications"), FaultKind::Truncated, 1);
    sim.inject(Some("notes"), FaultKind::Status(502), 2);
    sync_all(&setup.syncer().await).await.unwrap();
    assert_exact(&setup, &sim).await;
    // Every time: the run stops with a clear error and keeps its place.
    sim.inject(Some("users"), FaultKind::Truncated, 100);
    let syncer = setup.syncer().await;
    let err = syncer.sync_stream("users").await.unwrap_err();
    assert_eq!(err.code(), "lever_malformed", "{err}");
    let state = syncer.store().load("users").await.unwrap();
    assert!(state
        .last_error
        .as_deref()
        .is_some_and(|e| e.contains("lever_malformed")));
    sim.clear_faults();
    sync_all(&setup.syncer().await).await.unwrap();
    assert_exact(&setup, &sim).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn has_next_without_a_token_stops_loudly_instead_of_ending_early() {
    let sim = fast_sim(small_world()).await;
    let setup = Setup::new(&sim, "hasnext");
    sim.inject(Some("opportunities+applications"), FaultKind::HasNextWithoutNext, 1);
    let syncer = setup.syncer().await;
    syncer.setup().await.unwrap();
    let err = syncer.sync_stream("opportunities").await.unwrap_err();
    assert_eq!(err.code(), "lever_missing_next");
    assert!(
        read_table(syncer.warehouse(), "opportunities").await.is_empty(),
        "a partial walk is never finalized"
    );
    sync_all(&setup.syncer().await).await.unwrap();
    assert_exact(&setup, &sim).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_paging_token_restarts_the_query_and_the_result_is_exact() {
    let sim = fast_sim(World::generated(&Volume::new(260, 51))).await;
    let mut setup = Setup::new(&sim, "offset");
    setup.raw.sync.pages_per_window = Some(1);
    sim.inject(Some("opportunities+applications"), FaultKind::InvalidOffset, 1);
    sim.inject(Some("opportunities"), FaultKind::InvalidOffset, 1);
    sync_all(&setup.syncer().await).await.unwrap();
    assert_exact(&setup, &sim).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_404_means_no_rows_for_that_parent() {
    let sim = fast_sim(small_world()).await;
    let setup = Setup::new(&sim, "child404");
    sync_all(&setup.syncer().await).await.unwrap();
    let not_found: u64 = sim.stats().values().map(|s| s.not_found).sum();
    assert!(not_found > 0, "the simulator answered 404 for some empty child lists");
    assert_exact(&setup, &sim).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bigquery_failures_mid_run_are_retried_or_reported_and_the_next_run_is_exact() {
    let sim = fast_sim(small_world()).await;
    let proxy = BqProxy::start(&emulator_url()).await.unwrap();
    let mut setup = Setup::new(&sim, "bqfault");
    setup.raw.bigquery.api_url = Some(proxy.url.clone());
    // Transient: one failed load and one failed MERGE are retried within the run.
    proxy.fail(BqFault {
        path_contains: "/upload/".into(),
        body_contains: None,
        status: 503,
        times: 1,
        lose_answer: false,
    });
    proxy.fail(BqFault {
        path_contains: "/queries".into(),
        body_contains: Some("MERGE".into()),
        status: 500,
        times: 1,
        lose_answer: false,
    });
    sync_all(&setup.syncer().await).await.unwrap();
    assert_eq!(proxy.hits(), 2);
    assert_exact(&setup, &sim).await;

    // For good: every MERGE into notes fails; the run is recorded as failed and keeps its state.
    sim.world().add_child(
        "notes",
        "784ff8e2-4536-4d65-8b29-e2dbeb0e8bef",
        serde_json::json!({"id": "late-note", "text": "x"}),
    );
    proxy.fail(BqFault {
        path_contains: "/queries".into(),
        body_contains: Some("_stg_notes_".into()),
        status: 500,
        times: 1000,
        lose_answer: false,
    });
    let syncer = setup.syncer().await;
    let err = syncer.sync_stream("notes").await.unwrap_err();
    assert!(matches!(err, SyncError::Warehouse(_)), "{err}");
    proxy.clear();
    let runs = syncer.store().recent_runs(50).await.unwrap();
    assert!(runs
        .rows
        .iter()
        .any(|r| runs.str(r, "table_name").as_deref() == Some("notes")
            && runs.str(r, "outcome").as_deref() == Some("failed")));
    sync_all(&setup.syncer().await).await.unwrap();
    assert_exact(&setup, &sim).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_failure_of_a_table_lookup_or_create_is_retried() {
    let sim = fast_sim(small_world()).await;
    let proxy = BqProxy::start(&emulator_url()).await.unwrap();
    let mut setup = Setup::new(&sim, "bqmeta");
    setup.raw.bigquery.api_url = Some(proxy.url.clone());
    // A table create that succeeds but whose answer is lost: the retry meets "already exists".
    proxy.fail(BqFault {
        path_contains: "/tables".into(),
        body_contains: Some("\"schema\"".into()),
        status: 500,
        times: 1,
        lose_answer: true,
    });
    // Two table lookups (`tables.get`) fail before reaching BigQuery.
    proxy.fail(BqFault {
        path_contains: "/tables/".into(),
        body_contains: None,
        status: 503,
        times: 2,
        lose_answer: false,
    });
    sync_all(&setup.syncer().await).await.unwrap();
    assert_eq!(proxy.hits(), 3, "every injected failure was served");
    assert_exact(&setup, &sim).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_settings_fail_before_anything_is_written() {
    let sim = fast_sim(World::recorded()).await;
    let mut setup = Setup::new(&sim, "badcfg");
    setup.raw.lever.tables = Some(vec!["candidates".into()]);
    let err = setup.raw.clone().validate(4_000_000_000_000).unwrap_err().to_string();
    assert!(err.contains("candidates"), "{err}");
    setup.raw.lever.tables = None;
    setup.raw.bigquery.api_url = Some("http://127.0.0.1:1".into());
    let syncer = syncer_for(setup.config(), "x").await.unwrap();
    let err = sync_all(&syncer).await.unwrap_err();
    assert!(err.contains("could not connect") || err.contains("BigQuery"), "{err}");
    assert_eq!(
        sim.total_requests(),
        0,
        "no Lever request before the warehouse is ready"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_that_fails_after_some_pages_resumes_from_where_it_started() {
    let sim = fast_sim(World::generated(&Volume::new(260, 33))).await;
    let mut setup = Setup::new(&sim, "midwindow");
    setup.raw.sync.pages_per_window = Some(3);
    // The window's first page comes back; the second fails until the retries give up.
    sim.inject_after(Some("opportunities+applications"), FaultKind::Status(500), 1, 40);
    let syncer = setup.syncer().await;
    syncer.setup().await.unwrap();
    assert!(syncer.sync_stream("opportunities").await.is_err());
    let st = syncer.store().load("opportunities").await.unwrap();
    assert_eq!(
        (st.query_index, st.position.as_deref()),
        (0, None),
        "the saved position is the window's start"
    );
    sim.clear_faults();
    sync_all(&setup.syncer().await).await.unwrap();
    assert_exact(&setup, &sim).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_write_whose_answer_was_lost_is_recognised_as_done() {
    let sim = fast_sim(World::recorded()).await;
    let proxy = BqProxy::start(&emulator_url()).await.unwrap();
    let mut setup = Setup::new(&sim, "cas");
    setup.raw.bigquery.api_url = Some(proxy.url.clone());
    let syncer = setup.syncer().await;
    syncer.setup().await.unwrap();
    let store = syncer.store();
    let st = store.load("users").await.unwrap();
    let mut next = st.clone();
    next.lease_owner = Some("me".into());
    // The UPDATE is applied but its answer is lost; the retry finds the row already moved on.
    proxy.fail(BqFault {
        path_contains: "/queries".into(),
        body_contains: Some("UPDATE".into()),
        status: 503,
        times: 1,
        lose_answer: true,
    });
    assert!(
        store.save(&next, st.version).await.unwrap(),
        "our own write is recognised"
    );
    assert_eq!(proxy.hits(), 1);
    assert_eq!(store.load("users").await.unwrap().version, st.version + 1);
    // An identical write by another attempt from the same version is refused: no fork.
    assert!(!store.save(&next, st.version).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_staging_is_gone_fails_clearly_instead_of_emptying_the_table() {
    let sim = fast_sim(small_world()).await;
    let setup = Setup::new(&sim, "stgone");
    let syncer = setup.syncer().await;
    sync_all(&syncer).await.unwrap();
    // A second run of notes reaches finalize; its staging disappears (expired, dropped by hand).
    loop {
        let st = syncer.store().load("notes").await.unwrap();
        if st.phase == lever_sync::sync::plan::Phase::Finalizing {
            break;
        }
        syncer.run_window("notes", None).await.unwrap();
    }
    let run = syncer.store().load("notes").await.unwrap().run_id.unwrap();
    syncer
        .warehouse()
        .drop_table(&lever_sync::warehouse::schema::staging_table_name("notes", &run))
        .await
        .unwrap();
    let err = syncer.run_window("notes", None).await.unwrap_err().to_string();
    assert!(err.contains("is gone"), "{err}");
    assert_dataset_matches(&syncer, &sim, &["notes"]).await;
    // Starting over gives the exact table again.
    lever_sync::ops::reset(&syncer, "notes").await.unwrap();
    sync_all(&syncer).await.unwrap();
    assert_dataset_matches(&syncer, &sim, &["notes"]).await;
}
