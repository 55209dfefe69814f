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
