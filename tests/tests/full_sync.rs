//! A whole first sync of all seven tables, checked column by column against the simulator.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use lever_sim::harness::{assert_dataset_matches, fast_sim, sync_all, Setup, ALL_TABLES, START_MS};
use lever_sim::world::{Volume, World};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_sync_of_recorded_and_generated_records_equals_the_truth() {
    let sim = fast_sim(World::generated(&Volume::new(520, 11))).await;
    let setup = Setup::new(&sim, "full");
    let syncer = setup.syncer().await;
    sync_all(&syncer).await.unwrap();
    assert_dataset_matches(&syncer, &sim, &ALL_TABLES).await;

    // The account has what the traps are about; the checks above saw them all land.
    let w = sim.world();
    let scoped = w.scoped_opportunities(START_MS);
    assert!(scoped.len() >= 500);
    assert!(
        scoped.iter().any(|o| o["confidentiality"] == "confidential"),
        "confidential opportunities are in scope"
    );
    assert!(
        scoped.iter().any(|o| o["updatedAt"].is_null()),
        "legacy opportunities without updatedAt are in scope"
    );
    assert!(
        w.opportunities.len() > scoped.len(),
        "some opportunities are before the start date"
    );
    assert!(
        w.users.iter().any(|u| !u["deactivatedAt"].is_null()),
        "deactivated users exist"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_table_alone_walks_opportunities_without_syncing_them() {
    let sim = fast_sim(World::recorded()).await;
    let mut setup = Setup::new(&sim, "notes_only");
    setup.raw.lever.tables = Some(vec!["notes".into()]);
    let syncer = setup.syncer().await;
    sync_all(&syncer).await.unwrap();
    assert_dataset_matches(&syncer, &sim, &["notes"]).await;
    assert_eq!(
        syncer.warehouse().table_columns("opportunities").await.unwrap(),
        None,
        "tables not picked are never created"
    );
}
