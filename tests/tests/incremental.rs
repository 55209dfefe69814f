//! Later runs: incremental tables fetch only what changed; full-refresh tables match again.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use lever_sim::harness::{assert_dataset_matches, duplicate_ids, fast_sim, read_table, sync_all, Setup, ALL_TABLES};
use lever_sim::world::{Volume, World};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sync_fetches_only_changed_opportunities_and_ends_equal_to_the_truth() {
    let sim = fast_sim(World::generated(&Volume::new(150, 21))).await;
    let setup = Setup::new(&sim, "incr");
    let syncer = setup.syncer().await;
    sync_all(&syncer).await.unwrap();
    assert_dataset_matches(&syncer, &sim, &ALL_TABLES).await;

    let (changed, anonymised) = {
        let mut w = sim.world();
        let scoped: Vec<String> = w
            .scoped_opportunities(lever_sim::harness::START_MS)
            .iter()
            .filter(|o| !o["applications"].as_array().is_none_or(Vec::is_empty))
            .map(|o| o["id"].as_str().unwrap().to_owned())
            .collect();
        let mut changed = Vec::new();
        for id in &scoped[0..3] {
            w.update_opportunity(id, |o| {
                o["stage"] = json!("offer");
                o["tags"] = json!(["moved", "ünïcödé"]);
            });
            changed.push(id.clone());
        }
        let anonymised = scoped[3].clone();
        w.anonymise(&anonymised);
        changed.push(anonymised.clone());
        let app_owner = scoped[4].clone();
        let app_id = w.opportunities[&app_owner]["applications"][0]
            .as_str()
            .unwrap()
            .to_owned();
        w.update_application(&app_id, |a| a["comments"] = json!("updated comment"));
        changed.push(app_owner);
        for _ in 0..2 {
            changed.push(w.add_opportunity());
        }
        // Children change without touching the opportunity's updatedAt.
        let quiet = scoped[10].clone();
        let note = w.new_note("added later, no updatedAt bump");
        w.add_child("notes", &quiet, note);
        let interview = w.children["interviews"].values().flatten().next().unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        w.remove_child("interviews", &interview);
        (changed, anonymised)
    };
    sim.reset_stats();
    sync_all(&syncer).await.unwrap();
    assert_dataset_matches(&syncer, &sim, &ALL_TABLES).await;

    let stats = sim.stats();
    let walked = stats.get("opportunities+applications").cloned().unwrap_or_default();
    assert_eq!(
        walked.records,
        changed.len() as u64,
        "only the changed opportunities are fetched again"
    );
    assert_eq!(walked.requests, 1, "one page holds them all");

    let opps = read_table(syncer.warehouse(), "opportunities").await;
    let row = opps
        .iter()
        .find(|r| r["id"] == Value::String(anonymised.clone()))
        .unwrap();
    assert_eq!(row["is_anonymized"], json!("true"));
    assert_eq!(row["emails"], json!([]), "the anonymised person's emails are gone");
    for t in ALL_TABLES {
        assert!(
            duplicate_ids(syncer.warehouse(), t).await.is_empty(),
            "{t} has duplicate ids"
        );
    }
}

/// Sweep mode for the child tables: a later run re-reads the children of exactly the
/// opportunities that changed or whose turn came, replaces their children (deletions included),
/// drops the children of opportunities Lever deleted, and after a period without runs re-reads
/// everything, which ends exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_mode_rereads_changed_and_due_opportunities_and_is_exact_within_the_period() {
    use lever_sim::harness::{assert_matches_truth, START_MS};
    use lever_sync::sync::plan::{sweep_due, sweep_rereads};
    const CHILDREN: [&str; 4] = ["interviews", "notes", "offers", "referrals"];
    const PERIOD_MS: i64 = 7 * 86_400_000;

    let sim = fast_sim(World::generated(&Volume::new(250, 33))).await;
    let mut setup = Setup::new(&sim, "sweep");
    setup.raw.sync.children = Some("sweep".into());
    setup.raw.sync.sweep_days = Some(7);
    let syncer = setup.syncer().await;
    sync_all(&syncer).await.unwrap();
    assert_dataset_matches(&syncer, &sim, &ALL_TABLES).await;
    let full_child_requests: u64 = CHILDREN.iter().map(|c| sim.stats()[*c].requests).sum();

    let from = syncer.store().load("notes").await.unwrap().cursor_ms.unwrap();
    let (quiet_note, deleted_notes) = {
        let mut w = sim.world();
        let scoped: Vec<Value> = w.scoped_opportunities(START_MS).into_iter().cloned().collect();
        let id_of = |o: &Value| o["id"].as_str().unwrap().to_owned();
        let has = |w: &World, kind: &str, o: &str| {
            w.children
                .get(kind)
                .and_then(|m| m.get(o))
                .is_some_and(|v| !v.is_empty())
        };
        // Changed: a bump, a note added, an interview removed.
        let changed = scoped.iter().map(id_of).find(|o| has(&w, "interviews", o)).unwrap();
        w.update_opportunity(&changed, |o| o["stage"] = json!("offer"));
        let note = w.new_note("added with a bump");
        w.add_child("notes", &changed, note);
        let gone = w.children["interviews"][&changed][0]["id"].as_str().unwrap().to_owned();
        w.remove_child("interviews", &gone);
        // Deleted in Lever: its children must leave the child tables.
        let deleted = scoped
            .iter()
            .map(id_of)
            .find(|o| o != &changed && has(&w, "notes", o))
            .unwrap();
        let deleted_notes: Vec<String> = w.children["notes"][&deleted]
            .iter()
            .map(|n| n["id"].as_str().unwrap().to_owned())
            .collect();
        w.delete_opportunity(&deleted);
        // Quiet: a note added without an updatedAt bump, on an opportunity not due for an hour.
        let quiet = scoped
            .iter()
            .map(id_of)
            .find(|o| o != &changed && o != &deleted && !sweep_due(o, from, from + 3_600_000, PERIOD_MS))
            .unwrap();
        let note = w.new_note("added quietly");
        let quiet_note = note["id"].as_str().unwrap().to_owned();
        w.add_child("notes", &quiet, note);
        (quiet_note, deleted_notes)
    };

    sim.reset_stats();
    sync_all(&syncer).await.unwrap();
    let now = syncer.store().load("notes").await.unwrap().cursor_ms.unwrap();
    let expected_rereads = sim
        .world()
        .scoped_opportunities(START_MS)
        .iter()
        .filter(|o| sweep_rereads(o, from, now, 300_000, PERIOD_MS))
        .count() as u64;
    let stats = sim.stats();
    for c in CHILDREN {
        assert_eq!(
            stats[c].requests, expected_rereads,
            "{c}: one request per opportunity that changed or came round"
        );
    }
    let sweep_child_requests: u64 = CHILDREN.iter().map(|c| stats[*c].requests).sum();
    assert!(
        sweep_child_requests * 20 < full_child_requests,
        "a sweep costs a fraction of a full read"
    );
    // Everything but the quiet note is exact already; the deleted opportunity's notes are gone.
    assert_dataset_matches(&syncer, &sim, &["interviews", "offers", "referrals", "users"]).await;
    assert_live_rows_match(&syncer, &sim).await;
    let notes = read_table(syncer.warehouse(), "notes").await;
    let truth: Vec<(Value, Option<String>)> = sim
        .world()
        .truth("notes", START_MS)
        .into_iter()
        .filter(|(n, _)| n["id"] != json!(quiet_note))
        .collect();
    assert_matches_truth(lever_sync::catalog::table("notes").unwrap(), &notes, &truth);
    assert!(notes
        .iter()
        .all(|n| !deleted_notes.contains(&n["id"].as_str().unwrap_or_default().to_owned())));

    // A period later every opportunity has come round: exact, the quiet note included.
    let later = lever_sync::sync::Syncer::new(
        std::sync::Arc::new(setup.config()),
        syncer.lever().clone(),
        syncer.warehouse().clone(),
        "a-week-later".into(),
        std::sync::Arc::new(|| chrono::Utc::now().timestamp_millis() + 8 * 86_400_000),
    );
    sync_all(&later).await.unwrap();
    assert_dataset_matches(&later, &sim, &CHILDREN).await;
    assert_dataset_matches(&later, &sim, &["users"]).await;
    assert_live_rows_match(&later, &sim).await;
    for t in ALL_TABLES {
        assert!(
            duplicate_ids(later.warehouse(), t).await.is_empty(),
            "{t} has duplicate ids"
        );
    }
}

/// Opportunities and applications keep Lever's deleted ones, marked: the rest equals the truth.
async fn assert_live_rows_match(syncer: &lever_sync::sync::Syncer, sim: &lever_sim::server::Simulator) {
    use lever_sim::harness::{assert_matches_truth, read_table_where, START_MS};
    for t in ["opportunities", "applications"] {
        let rows = read_table_where(syncer.warehouse(), t, "_deleted_at IS NULL").await;
        assert_matches_truth(
            lever_sync::catalog::table(t).unwrap(),
            &rows,
            &sim.world().truth(t, START_MS),
        );
    }
}
