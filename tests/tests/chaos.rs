//! Fault injection over the whole serverless chain: end-to-end syncs driven through the Lambda
//! handlers (`dispatch` and `sync-table`, on a local invoke endpoint) against the Lever
//! simulator and the BigQuery emulator, with one fault per scenario. After each scenario every
//! table equals the simulator's truth, no id appears twice, the state table is at rest, the next
//! ordinary run is exact, and no log line holds the API key or a record's personal fields.
//!
//! Scenarios are data: a matrix of fault families × kind × table/position. Every choice a
//! scenario makes (the hop it kills, the request that gets the fault, the delays) comes from a
//! seed. A plain run takes one scenario per family, picked by a seed it prints; `CHAOS_SEED=<n>`
//! replays that run, `CHAOS_FULL=1` runs the whole matrix (`make chaos`), and
//! `CHAOS_ONLY=<text>` keeps the scenarios whose name contains the text.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use lever_sim::bqproxy::{BqFault, BqProxy};
use lever_sim::chaos::{capture_logs, LogCapture, Rng};
use lever_sim::harness::{
    assert_matches_truth, duplicate_ids, emulator_url, read_table, read_table_where, syncer_for, Setup, START_MS,
};
use lever_sim::lambda::{Delivery, LocalLambda};
use lever_sim::server::{FaultKind, SimConfig, Simulator};
use lever_sim::world::{Volume, World};
use lever_sync::aws::{local_sdk_config, LambdaInvoker};
use lever_sync::catalog;
use lever_sync::chain::{self, ChainApp, ChainEvent, ChainLimits, StepOutcome};
use lever_sync::sync::plan::Phase;
use lever_sync::sync::{Checkpoint, KillSwitch};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Streams (walks of Lever) and the tables each one writes.
const STREAMS: [(&str, &[&str]); 6] = [
    ("opportunities", &["opportunities", "applications"]),
    ("interviews", &["interviews"]),
    ("notes", &["notes"]),
    ("offers", &["offers"]),
    ("referrals", &["referrals"]),
    ("users", &["users"]),
];
const ALL_TABLES: [&str; 7] = [
    "opportunities",
    "applications",
    "interviews",
    "notes",
    "offers",
    "referrals",
    "users",
];
const CHILD_LABELS: [&str; 4] = ["interviews", "notes", "offers", "referrals"];
/// A dead chain's table is free again after this (short, so recovery by tick is quick).
const LEASE_SECS: u64 = 2;
const SETTLE: Duration = Duration::from_secs(300);

fn tables_of(stream: &str) -> Vec<&'static str> {
    STREAMS
        .iter()
        .find(|(s, _)| *s == stream)
        .map(|(_, t)| t.to_vec())
        .unwrap_or_default()
}

#[derive(Debug, Clone, Copy)]
enum LeverFault {
    /// A burst of 429s, with `Retry-After: 1` or without.
    Throttle { retry_after: bool },
    /// A few 500, 502 or 503 answers (which one: seeded).
    ServerError,
    /// A page whose JSON is cut short.
    Truncated,
    /// Lever refuses a paging token mid-walk.
    InvalidOffset,
    /// An answer slower than the client's timeout.
    Slow,
    /// A parent opportunity deleted between the page that listed it and its child request (404).
    ChildVanished,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum BqOp {
    Load,
    Merge,
}

#[derive(Debug, Clone)]
enum Fault {
    /// The invocation dies at a checkpoint of one stream (at a seeded hop for window
    /// checkpoints); Lambda's retries and `dispatch` must resume it.
    Kill {
        stream: &'static str,
        at: Checkpoint,
    },
    /// Every event delivered twice.
    Duplicate,
    /// Every event twice, each copy after a seeded delay: copies run after the events that
    /// follow them, chains interleave.
    OutOfOrder,
    /// One seeded event is never delivered; the next scheduled tick recovers the chain.
    Dropped,
    /// Events of a previous run arrive during and after the next run.
    LateStale,
    Lever {
        label: &'static str,
        kind: LeverFault,
    },
    /// A BigQuery load job or MERGE fails once (transient) or for good.
    BigQuery {
        stream: &'static str,
        op: BqOp,
        permanent: bool,
    },
    /// Two scheduled ticks at the same moment.
    TwoTicks,
    /// An operator's "sync now" while the scheduled chains run.
    SyncNowDuringChain,
    /// A full refresh of a table requested while its chain runs.
    FullRefreshMidRun {
        table: &'static str,
    },
}

#[derive(Debug, Clone)]
struct Scenario {
    name: String,
    fault: Fault,
}

fn scenario(name: String, fault: Fault) -> Scenario {
    Scenario { name, fault }
}

fn kill_matrix() -> Vec<Scenario> {
    let mut out = Vec::new();
    for (stream, _) in STREAMS {
        for at in Checkpoint::ALL {
            out.push(scenario(
                format!("kill/{stream}/{}", at.name()),
                Fault::Kill { stream, at },
            ));
        }
    }
    out
}

fn delivery_matrix() -> Vec<Scenario> {
    vec![
        scenario("delivery/duplicate".into(), Fault::Duplicate),
        scenario("delivery/out-of-order".into(), Fault::OutOfOrder),
        scenario("delivery/dropped".into(), Fault::Dropped),
        scenario("delivery/late-stale".into(), Fault::LateStale),
    ]
}

fn lever_matrix() -> Vec<Scenario> {
    let mut out = Vec::new();
    let common = [
        ("429-retry-after", LeverFault::Throttle { retry_after: true }),
        ("429", LeverFault::Throttle { retry_after: false }),
        ("5xx", LeverFault::ServerError),
        ("truncated", LeverFault::Truncated),
        ("slow", LeverFault::Slow),
    ];
    // List walks page with tokens; child lists of this account fit one page.
    for label in ["opportunities+applications", "opportunities", "users"] {
        for (name, kind) in common.iter().chain(&[("invalid-offset", LeverFault::InvalidOffset)]) {
            out.push(scenario(
                format!("lever/{label}/{name}"),
                Fault::Lever { label, kind: *kind },
            ));
        }
    }
    for label in CHILD_LABELS {
        for (name, kind) in common
            .iter()
            .chain(&[("404-vanished-parent", LeverFault::ChildVanished)])
        {
            out.push(scenario(
                format!("lever/{label}/{name}"),
                Fault::Lever { label, kind: *kind },
            ));
        }
    }
    out
}

fn bigquery_matrix() -> Vec<Scenario> {
    let mut out = Vec::new();
    for (stream, _) in STREAMS {
        for op in [BqOp::Load, BqOp::Merge] {
            for permanent in [false, true] {
                let how = if permanent { "permanent" } else { "transient" };
                out.push(scenario(
                    format!("bigquery/{stream}/{op:?}/{how}").to_lowercase(),
                    Fault::BigQuery { stream, op, permanent },
                ));
            }
        }
    }
    out
}

fn concurrency_matrix() -> Vec<Scenario> {
    let mut out = vec![
        scenario("concurrency/two-ticks".into(), Fault::TwoTicks),
        scenario("concurrency/sync-now-during-chain".into(), Fault::SyncNowDuringChain),
    ];
    for table in ALL_TABLES {
        out.push(scenario(
            format!("concurrency/full-refresh-mid-run/{table}"),
            Fault::FullRefreshMidRun { table },
        ));
    }
    out
}

/// The run's seed: `CHAOS_SEED`, or a fresh one (printed, so a failure can be replayed).
fn run_seed() -> u64 {
    match std::env::var("CHAOS_SEED") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("CHAOS_SEED must be a number, not {s:?}")),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64 % 1_000_000_000),
    }
}

/// Runs a family: the whole matrix with `CHAOS_FULL=1`, else one scenario picked by the seed.
async fn run_family(family: &str, matrix: Vec<Scenario>) {
    let seed = run_seed();
    let full = std::env::var("CHAOS_FULL").is_ok_and(|v| v == "1");
    let only = std::env::var("CHAOS_ONLY").ok();
    let mut rng = Rng::new(
        seed ^ family
            .bytes()
            .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64)),
    );
    let total = matrix.len();
    let chosen: Vec<(usize, Scenario)> = if full || only.is_some() {
        matrix.into_iter().enumerate().collect()
    } else {
        let i = rng.below(total as u64) as usize;
        vec![(i, matrix[i].clone())]
    };
    let chosen: Vec<(usize, Scenario)> = chosen
        .into_iter()
        .filter(|(_, s)| only.as_deref().is_none_or(|o| s.name.contains(o)))
        .collect();
    println!(
        "chaos {family}: seed {seed} (replay with CHAOS_SEED={seed}), {} of {total} scenarios",
        chosen.len()
    );
    let mut failed = Vec::new();
    for (i, s) in chosen {
        // Each scenario's choices depend on the seed and its place in the matrix only.
        let scenario_seed = Rng::new(seed.wrapping_add(i as u64 * 7919)).next_u64();
        let started = Instant::now();
        println!("chaos {}: start (scenario seed {scenario_seed})", s.name);
        // A failed scenario is reported and the family goes on, so one run shows every failure.
        let name = s.name.clone();
        let outcome = tokio::spawn(async move { run_scenario(&s, scenario_seed).await }).await;
        let secs = started.elapsed().as_secs_f64();
        match outcome {
            Ok(()) => println!("chaos {name}: ok in {secs:.1}s"),
            Err(_) => {
                println!("chaos {name}: FAILED after {secs:.1}s");
                failed.push(name);
            }
        }
    }
    assert!(
        failed.is_empty(),
        "chaos {family}: failed scenarios {failed:?}; replay with CHAOS_SEED={seed} CHAOS_ONLY=<name>"
    );
}

struct Env {
    sim: Simulator,
    lambda: LocalLambda,
    app: ChainApp,
    proxy: BqProxy,
    setup: Setup,
    logs: LogCapture,
    tables: Vec<&'static str>,
    api_key: String,
    /// A run killed after its state advanced leaves its staging tables to expire on their own.
    leftover_staging_ok: bool,
}

async fn make_env(seed: u64, tables: &[&'static str], kill: Option<KillSwitch>) -> Env {
    let logs = capture_logs();
    let api_key = format!("chaos-key-{seed:016x}");
    let world = World::generated(&Volume {
        extra_users: 8,
        ..Volume::new(24, seed)
    });
    let sim = Simulator::start(
        world,
        SimConfig {
            api_key: api_key.clone(),
            rate: None,
            page_cap: Some(6),
            order_seed: seed,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let proxy = BqProxy::start(&emulator_url()).await.unwrap();
    let mut setup = Setup::new(&sim, "chaos");
    setup.raw.bigquery.api_url = Some(proxy.url.clone());
    setup.raw.sync.pages_per_window = Some(1);
    setup.raw.sync.lease_secs = Some(LEASE_SECS);
    setup.raw.lever.timeout_secs = Some(1);
    setup.raw.lever.tables = Some(tables.iter().map(|t| (*t).to_owned()).collect());
    let lambda = LocalLambda::start().await.unwrap();
    let mut syncer = syncer_for(setup.config(), "dispatch").await.unwrap();
    if let Some(k) = kill {
        syncer = syncer.with_kill_switch(k);
    }
    let app = ChainApp {
        syncer,
        invoker: Arc::new(LambdaInvoker::new(&local_sdk_config(&lambda.url))),
        function: "sync-table".into(),
        limits: ChainLimits::default(),
    };
    lambda.serve(app.clone());
    Env {
        sim,
        lambda,
        app,
        proxy,
        setup,
        logs,
        tables: tables.to_vec(),
        api_key,
        leftover_staging_ok: false,
    }
}

impl Env {
    async fn dispatch(&self, event: Value) -> Value {
        chain::handle_dispatch(&self.app, &event)
            .await
            .unwrap_or_else(|e| panic!("dispatch {event}: {e}"))
    }

    async fn tick(&self) -> Value {
        self.dispatch(json!({"action": "tick"})).await
    }

    fn streams(&self) -> Vec<&'static str> {
        self.app.syncer.config().streams()
    }

    /// Lets the chains run out, then (as the schedule would) ticks after dead chains' leases
    /// lapse, until every stream is at rest.
    async fn run_to_rest(&self) {
        for _ in 0..8 {
            self.lambda.settle(SETTLE).await;
            let states = self.app.syncer.store().load_all().await.unwrap();
            if states.iter().all(|s| s.phase == Phase::Idle) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(LEASE_SECS * 1000 + 300)).await;
            self.tick().await;
        }
        panic!("the streams did not come to rest after repeated ticks");
    }

    /// The dataset equals the simulator's truth, with no id twice.
    async fn assert_exact(&self, what: &str) {
        let world = self.sim.world().clone();
        self.assert_equals(&world, what).await;
    }

    async fn assert_equals(&self, world: &World, what: &str) {
        for name in &self.tables {
            self.assert_table_equals_one_of(name, &[world], what).await;
        }
    }

    /// `name` equals the truth of one of `worlds`, with no id twice.
    async fn assert_table_equals_one_of(&self, name: &str, worlds: &[&World], what: &str) {
        let wh = self.app.syncer.warehouse();
        let t = catalog::table(name).unwrap();
        // Rows of opportunities Lever deleted stay, marked; the truth lists live ones.
        let rows = if t.mode == catalog::SyncMode::Incremental {
            read_table_where(wh, name, "_deleted_at IS NULL").await
        } else {
            read_table(wh, name).await
        };
        let mut mismatches = Vec::new();
        for world in worlds {
            let truth = world.truth(name, START_MS);
            let outcome =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| assert_matches_truth(t, &rows, &truth)));
            match outcome {
                Ok(()) => {
                    mismatches.clear();
                    break;
                }
                Err(e) => mismatches.push(
                    e.downcast_ref::<String>()
                        .cloned()
                        .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                        .unwrap_or_default(),
                ),
            }
        }
        assert!(mismatches.is_empty(), "{what}: {}", mismatches.join(" / "));
        assert!(
            duplicate_ids(wh, name).await.is_empty(),
            "{what}: {name} has an id twice"
        );
    }

    /// Every stream at rest: idle, no lease, no run, a cursor for incremental streams, no
    /// staging left behind, and each table's latest run succeeded exactly once.
    async fn assert_at_rest(&self, what: &str) {
        let store = self.app.syncer.store();
        for s in store.load_all().await.unwrap() {
            if !self.streams().contains(&s.stream.as_str()) {
                continue;
            }
            assert_eq!(s.phase, Phase::Idle, "{what}: {} is not at rest", s.stream);
            assert!(
                s.lease_owner.is_none() && s.lease_until_ms.is_none(),
                "{what}: {} still holds a lease",
                s.stream
            );
            assert!(s.run_id.is_none(), "{what}: {} still names a run", s.stream);
            let incremental = catalog::table(&s.stream).unwrap().mode == catalog::SyncMode::Incremental;
            assert!(
                !incremental || s.cursor_ms.is_some(),
                "{what}: {} has no cursor after a successful run",
                s.stream
            );
        }
        if !self.leftover_staging_ok {
            let staging: Vec<String> = self
                .app
                .syncer
                .warehouse()
                .list_tables()
                .await
                .unwrap()
                .into_iter()
                .filter(|t| t.starts_with("_stg_"))
                .collect();
            assert!(staging.is_empty(), "{what}: staging left behind: {staging:?}");
        }
        let runs = store.recent_runs(1000).await.unwrap();
        let mut succeeded: HashMap<(String, String), usize> = HashMap::new();
        for r in &runs.rows {
            if runs.str(r, "outcome").as_deref() == Some("succeeded") {
                let key = (
                    runs.str(r, "table_name").unwrap_or_default(),
                    runs.str(r, "run_id").unwrap_or_default(),
                );
                *succeeded.entry(key).or_default() += 1;
            }
        }
        for t in &self.tables {
            assert!(
                succeeded.keys().any(|(table, _)| table == t),
                "{what}: {t} has no succeeded run"
            );
        }
        let twice: Vec<_> = succeeded.iter().filter(|(_, n)| **n > 1).collect();
        assert!(twice.is_empty(), "{what}: a run recorded twice: {twice:?}");
    }

    /// No chain did one window twice: per table, chain and hop at most one step went on.
    fn assert_no_fork(&self, what: &str) {
        let mut done: HashMap<(String, String, i64), usize> = HashMap::new();
        for (e, r) in self.lambda.outcomes() {
            if let Ok(StepOutcome::Continued { .. } | StepOutcome::Finished { .. }) = r {
                *done.entry((e.table, e.chain, e.hop)).or_default() += 1;
            }
        }
        let forks: Vec<_> = done.iter().filter(|(_, n)| **n > 1).collect();
        assert!(forks.is_empty(), "{what}: a window ran twice: {forks:?}");
    }

    /// Lever changes between runs: a new opportunity, an edited one, a new note.
    fn mutate(&self, rng: &mut Rng) {
        let mut w = self.sim.world();
        w.add_opportunity();
        let ids: Vec<String> = w.opportunities.keys().cloned().collect();
        let edited = rng.pick(&ids).clone();
        w.update_opportunity(&edited, |o| o["stage"] = json!("offer"));
        let parent = rng.pick(&ids).clone();
        let note = w.new_note("added between runs");
        w.add_child("notes", &parent, note);
    }

    /// The next ordinary run, fault-free, ends exact and at rest.
    async fn next_run_is_exact(&self, rng: &mut Rng, what: &str) {
        self.sim.clear_faults();
        self.proxy.clear();
        self.mutate(rng);
        self.tick().await;
        self.run_to_rest().await;
        self.assert_exact(&format!("{what}, next run")).await;
        self.assert_at_rest(&format!("{what}, next run")).await;
    }

    /// No log line holds the API key (or its Basic-auth form) or a personal field of a record.
    fn assert_logs_clean(&self, what: &str) {
        let text = self.logs.text();
        assert!(
            text.lines().any(|l| l.contains("\"step\"")),
            "{what}: the handlers' log lines were captured"
        );
        use base64::Engine;
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("{}:", self.api_key));
        let mut secrets = vec![self.api_key.clone(), basic];
        let w = self.sim.world();
        let mut personal: Vec<String> = Vec::new();
        let mut take = |v: &Value| {
            if let Some(s) = v.as_str().filter(|s| s.chars().count() >= 5) {
                personal.push(s.to_owned());
            }
        };
        for o in w.opportunities.values() {
            take(&o["name"]);
            o["emails"].as_array().into_iter().flatten().for_each(&mut take);
            for p in o["phones"].as_array().into_iter().flatten() {
                take(&p["value"]);
            }
        }
        for a in w.applications.values() {
            take(&a["name"]);
            take(&a["email"]);
            take(&a["phone"]["value"]);
        }
        for u in &w.users {
            take(&u["name"]);
            take(&u["email"]);
        }
        for i in w
            .children
            .get("interviews")
            .into_iter()
            .flat_map(|m| m.values())
            .flatten()
        {
            for p in i["interviewers"].as_array().into_iter().flatten() {
                take(&p["name"]);
                take(&p["email"]);
            }
        }
        secrets.extend(personal);
        for line in text.lines() {
            for s in &secrets {
                assert!(
                    !line.contains(s.as_str()),
                    "{what}: a log line holds a secret or a personal field ({} chars)",
                    s.len()
                );
            }
        }
    }
}

/// Kills the first invocation that reaches `at` of `stream` at `hop` (any hop if `None`).
fn kill_once(stream: &'static str, at: Checkpoint, hop: Option<i64>) -> (KillSwitch, Arc<AtomicBool>) {
    let fired = Arc::new(AtomicBool::new(false));
    let f = fired.clone();
    let k: KillSwitch = Arc::new(move |s: &str, c: Checkpoint, h: i64| {
        s == stream && c == at && hop.is_none_or(|x| x == h) && !f.swap(true, Ordering::SeqCst)
    });
    (k, fired)
}

/// Waits until `stream`'s run has done at least `hops` windows (or finished).
async fn wait_for_hop(env: &Env, stream: &str, hops: i64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let st = env.app.syncer.store().load(stream).await.unwrap();
        if st.phase != Phase::Idle && st.hop >= hops {
            return;
        }
        if st.phase == Phase::Idle && st.cursor_ms.is_some() && hops > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    panic!("{stream} did not reach window {hops}");
}

async fn run_scenario(s: &Scenario, seed: u64) {
    let mut rng = Rng::new(seed);
    let what = s.name.as_str();
    match s.fault.clone() {
        Fault::Kill { stream, at } => {
            // Window checkpoints at an early seeded hop (every stream has a few windows);
            // finalize checkpoints whenever the run finalizes.
            let hop = (!at.in_finalize()).then(|| rng.below(3) as i64);
            let (kill, fired) = kill_once(stream, at, hop);
            let mut env = make_env(seed, &tables_of(stream), Some(kill)).await;
            env.leftover_staging_ok = at == Checkpoint::AfterFinalizeState;
            env.tick().await;
            env.run_to_rest().await;
            assert!(fired.load(Ordering::SeqCst), "{what}: the kill point was reached");
            env.assert_exact(what).await;
            env.assert_at_rest(what).await;
            env.assert_no_fork(what);
            env.next_run_is_exact(&mut rng, what).await;
            env.assert_logs_clean(what);
        }
        Fault::Duplicate | Fault::OutOfOrder | Fault::Dropped => {
            let env = make_env(seed, &ALL_TABLES, None).await;
            let delivery = match s.fault {
                Fault::Duplicate => Delivery {
                    duplicate: true,
                    seed,
                    ..Default::default()
                },
                Fault::OutOfOrder => Delivery {
                    duplicate: true,
                    max_delay: Duration::from_millis(400),
                    seed,
                    ..Default::default()
                },
                _ => Delivery {
                    drop: vec![rng.between(1, 20) as usize],
                    seed,
                    ..Default::default()
                },
            };
            env.lambda.misdeliver(delivery);
            env.tick().await;
            env.run_to_rest().await;
            if matches!(s.fault, Fault::Dropped) {
                assert_eq!(env.lambda.dropped().len(), 1, "{what}: an event was dropped");
            }
            env.assert_exact(what).await;
            env.assert_at_rest(what).await;
            env.assert_no_fork(what);
            env.next_run_is_exact(&mut rng, what).await;
            env.assert_no_fork(what);
            env.assert_logs_clean(what);
        }
        Fault::LateStale => {
            let env = make_env(seed, &ALL_TABLES, None).await;
            env.tick().await;
            env.run_to_rest().await;
            let first_run: Vec<ChainEvent> = env.lambda.events();
            // Some of the first run's events (its first ones among them) come back late: while
            // the next run goes, and after it.
            let mut stale: Vec<ChainEvent> = first_run.iter().filter(|e| e.hop == 0).cloned().collect();
            for _ in 0..4 {
                stale.push(rng.pick(&first_run).clone());
            }
            let before = env.lambda.outcomes().len();
            env.mutate(&mut rng);
            env.tick().await;
            wait_for_hop(&env, "opportunities", 1).await;
            for e in &stale {
                env.lambda.deliver(e.clone());
            }
            env.run_to_rest().await;
            for e in &stale {
                env.lambda.deliver(e.clone());
            }
            env.run_to_rest().await;
            // Every late copy exits without work: its window is done, or another chain holds
            // the table; none starts a run or a window.
            let stale_chains: Vec<&String> = first_run.iter().map(|e| &e.chain).collect();
            let late_work: Vec<_> = env.lambda.outcomes()[before..]
                .iter()
                .filter(|(e, r)| {
                    stale_chains.contains(&&e.chain) && !matches!(r, Ok(StepOutcome::Stale | StepOutcome::Busy))
                })
                .cloned()
                .collect();
            assert!(late_work.is_empty(), "{what}: late events did work: {late_work:?}");
            env.assert_exact(what).await;
            env.assert_at_rest(what).await;
            env.assert_no_fork(what);
            env.next_run_is_exact(&mut rng, what).await;
            env.assert_logs_clean(what);
        }
        Fault::Lever { label, kind } => {
            let tables: Vec<&'static str> = match label {
                "opportunities+applications" => tables_of("opportunities"),
                // Every child stream walks the opportunities first: one of them, seeded.
                "opportunities" => vec![*rng.pick(&CHILD_LABELS)],
                other => tables_of(other),
            };
            let env = make_env(seed, &tables, None).await;
            // A list walk here has at least three pages (users: 16 at 6 a page), so at least
            // two requests carry an offset token: skipping one of them still serves the fault.
            let skip = match kind {
                LeverFault::InvalidOffset => rng.below(2),
                _ => rng.below(3),
            } as u32;
            let (fault, times) = match kind {
                LeverFault::Throttle { retry_after } => (
                    FaultKind::Throttle {
                        retry_after_secs: retry_after.then_some(1),
                    },
                    rng.between(2, 4) as u32,
                ),
                LeverFault::ServerError => (FaultKind::Status(*rng.pick(&[500, 502, 503])), rng.between(1, 3) as u32),
                LeverFault::Truncated => (FaultKind::Truncated, 1),
                LeverFault::InvalidOffset => (FaultKind::InvalidOffset, 1),
                LeverFault::Slow => (FaultKind::Delay(Duration::from_millis(1400)), 1),
                LeverFault::ChildVanished => (FaultKind::VanishParent, 1),
            };
            env.sim.inject_after(Some(label), fault, skip, times);
            env.tick().await;
            env.run_to_rest().await;
            assert_eq!(env.sim.pending_faults(), 0, "{what}: the fault was served");
            if matches!(kind, LeverFault::ChildVanished) {
                // Lever changed during the run (an opportunity went): the run holds what it
                // saw; the next run catches up with the deletion.
                env.assert_at_rest(what).await;
            } else {
                env.assert_exact(what).await;
                env.assert_at_rest(what).await;
            }
            env.assert_no_fork(what);
            env.next_run_is_exact(&mut rng, what).await;
            env.assert_logs_clean(what);
        }
        Fault::BigQuery { stream, op, permanent } => {
            let tables = tables_of(stream);
            let env = make_env(seed, &tables, None).await;
            let target = *rng.pick(&tables);
            let status = *rng.pick(&[500u16, 503]);
            let fault = |times: u32| BqFault {
                path_contains: match op {
                    BqOp::Load => "/upload/".into(),
                    BqOp::Merge => "/queries".into(),
                },
                body_contains: Some(match op {
                    BqOp::Load => format!("_stg_{target}_"),
                    BqOp::Merge => format!("MERGE `test-project`.`{}`.`{target}` T", env.setup.dataset),
                }),
                status,
                times,
                lose_answer: false,
            };
            if !permanent {
                env.proxy.fail(fault(1));
                env.tick().await;
                env.run_to_rest().await;
                assert_eq!(env.proxy.hits(), 1, "{what}: the fault was served");
                env.assert_exact(what).await;
                env.assert_at_rest(what).await;
            } else {
                // A good run first: the permanent failure must leave its result standing.
                env.tick().await;
                env.run_to_rest().await;
                env.assert_exact(&format!("{what}, first run")).await;
                let before = env.app.syncer.store().load(stream).await.unwrap();
                let good = env.sim.world().clone();
                env.mutate(&mut rng);
                env.proxy.fail(fault(100_000));
                env.tick().await;
                env.lambda.settle(SETTLE).await;
                assert!(env.proxy.hits() > 0, "{what}: the fault was served");
                // Each table takes one DML per run: a load failure leaves every table as it
                // was; a merge failure leaves its own table as it was, while a table of the
                // stream merged before it already holds the new truth (the resumed run merges
                // it again, idempotently).
                let changed = env.sim.world().clone();
                for name in &tables {
                    let allowed: &[&World] = if op == BqOp::Merge && *name != target {
                        &[&good, &changed]
                    } else {
                        &[&good]
                    };
                    env.assert_table_equals_one_of(name, allowed, &format!("{what}: the failed run changed {name}"))
                        .await;
                }
                let st = env.app.syncer.store().load(stream).await.unwrap();
                assert_ne!(st.phase, Phase::Idle, "{what}: the failed run stays resumable");
                assert_eq!(st.cursor_ms, before.cursor_ms, "{what}: the cursor did not move");
                assert!(st.lease_owner.is_none(), "{what}: the failed run freed its lease");
                assert!(
                    st.last_error.as_deref().is_some_and(|e| e.starts_with("bigquery_")),
                    "{what}: the state says why: {:?}",
                    st.last_error
                );
                let runs = env.app.syncer.store().recent_runs(100).await.unwrap();
                assert!(
                    runs.rows
                        .iter()
                        .any(|r| runs.str(r, "outcome").as_deref() == Some("failed")
                            && runs.str(r, "error_code").is_some_and(|c| c.starts_with("bigquery_"))),
                    "{what}: the history records the failure and why"
                );
                // The failure goes away: the next tick resumes the run, which ends exact.
                env.proxy.clear();
                env.tick().await;
                env.run_to_rest().await;
                env.assert_exact(&format!("{what}, resumed")).await;
                env.assert_at_rest(&format!("{what}, resumed")).await;
            }
            env.assert_no_fork(what);
            env.next_run_is_exact(&mut rng, what).await;
            env.assert_logs_clean(what);
        }
        Fault::TwoTicks => {
            let env = make_env(seed, &ALL_TABLES, None).await;
            // Both set up the dataset and start chains at the same moment.
            let (a, b) = tokio::join!(env.tick(), env.tick());
            for stream in env.streams() {
                let started = [&a, &b]
                    .iter()
                    .filter(|x| x["chains"][stream] == json!("started"))
                    .count();
                assert!(started >= 1, "{what}: {stream} was started: {a} {b}");
            }
            env.run_to_rest().await;
            env.assert_exact(what).await;
            env.assert_at_rest(what).await;
            env.assert_no_fork(what);
            env.next_run_is_exact(&mut rng, what).await;
            env.assert_logs_clean(what);
        }
        Fault::SyncNowDuringChain => {
            let env = make_env(seed, &ALL_TABLES, None).await;
            env.tick().await;
            let stream = *rng.pick(&env.streams());
            wait_for_hop(&env, stream, rng.between(1, 2) as i64).await;
            let answer = env.dispatch(json!({"action": "sync"})).await;
            let st = env.app.syncer.store().load(stream).await.unwrap();
            if st.phase != Phase::Idle {
                assert_eq!(answer["chains"][stream], json!("running"), "{what}: {answer}");
            }
            env.run_to_rest().await;
            env.assert_exact(what).await;
            env.assert_at_rest(what).await;
            env.assert_no_fork(what);
            env.next_run_is_exact(&mut rng, what).await;
            env.assert_logs_clean(what);
        }
        Fault::FullRefreshMidRun { table } => {
            let env = make_env(seed, &ALL_TABLES, None).await;
            env.tick().await;
            let stream = catalog::table(table).unwrap().stream();
            wait_for_hop(&env, stream, rng.between(1, 2) as i64).await;
            let answer = env.dispatch(json!({"action": "full_refresh", "table": table})).await;
            assert_eq!(answer["reset"], json!(stream), "{what}: {answer}");
            env.run_to_rest().await;
            env.assert_exact(what).await;
            env.assert_at_rest(what).await;
            env.assert_no_fork(what);
            env.next_run_is_exact(&mut rng, what).await;
            env.assert_logs_clean(what);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_kill_points() {
    run_family("kill", kill_matrix()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_delivery_faults() {
    run_family("delivery", delivery_matrix()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_lever_faults() {
    run_family("lever", lever_matrix()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_bigquery_faults() {
    run_family("bigquery", bigquery_matrix()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_concurrency() {
    run_family("concurrency", concurrency_matrix()).await;
}
