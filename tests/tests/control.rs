//! What lands and how a user controls it: deletions, column selection, new fields, schema
//! changes, erase, reset, delete-connection, anonymisation and confidential access.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use lever_sim::harness::{
    assert_columns_match_truth, assert_dataset_matches, assert_matches_truth, fast_sim, read_table, read_table_where,
    sync_all, Setup, ALL_TABLES, START_MS,
};
use lever_sim::server::{SimConfig, Simulator};
use lever_sim::world::{Volume, World};
use lever_sync::catalog::{self, ColumnType};
use lever_sync::ops::{self, Person};
use lever_sync::sync::{Checkpoint, KillSwitch, NO_CONFIDENTIAL};
use lever_sync::warehouse::schema;
use serde_json::{json, Value};
use std::sync::Arc;

fn world() -> World {
    World::generated(&Volume::new(90, 61))
}

fn id_of(v: &Value) -> String {
    v["id"].as_str().unwrap_or_default().to_owned()
}

/// In-scope opportunities that have an application and at least one note.
fn rich_opportunities(w: &World) -> Vec<String> {
    w.scoped_opportunities(START_MS)
        .into_iter()
        .filter(|o| !o["applications"].as_array().is_none_or(Vec::is_empty))
        .filter(|o| {
            w.children
                .get("notes")
                .is_some_and(|n| n.get(&id_of(o)).is_some_and(|v| !v.is_empty()))
        })
        .map(id_of)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_opportunities_are_marked_and_their_children_dropped() {
    let sim = fast_sim(world()).await;
    let setup = Setup::new(&sim, "deletes");
    sync_all(&setup.syncer().await).await.unwrap();
    let gone: Vec<String> = rich_opportunities(&sim.world()).into_iter().take(2).collect();
    let (apps, deleted_at): (Vec<String>, Vec<i64>) = {
        let mut w = sim.world();
        let apps = gone
            .iter()
            .flat_map(|o| {
                w.applications_of(&w.opportunities[o])
                    .into_iter()
                    .map(id_of)
                    .collect::<Vec<_>>()
            })
            .collect();
        for o in &gone {
            w.delete_opportunity(o);
        }
        (
            apps,
            w.deleted
                .iter()
                .map(|d| d["deletedAt"].as_i64().unwrap_or_default())
                .collect(),
        )
    };
    let syncer = setup.syncer().await;
    sync_all(&syncer).await.unwrap();
    let wh = syncer.warehouse();
    // Live rows equal Lever; the deleted ones are kept and marked with Lever's deletedAt.
    for name in ["opportunities", "applications"] {
        let t = catalog::table(name).unwrap();
        let live = read_table_where(wh, name, "_deleted_at IS NULL").await;
        assert_matches_truth(t, &live, &sim.world().truth(name, START_MS));
    }
    let marked = read_table_where(wh, "opportunities", "_deleted_at IS NOT NULL").await;
    let mut marked_ids: Vec<String> = marked
        .iter()
        .map(|r| r["id"].as_str().unwrap_or_default().to_owned())
        .collect();
    marked_ids.sort();
    let mut want = gone.clone();
    want.sort();
    assert_eq!(marked_ids, want);
    for r in &marked {
        let micros: i64 = r["_deleted_at"].as_str().unwrap().parse().unwrap();
        assert!(deleted_at.contains(&(micros / 1000)), "the mark is Lever's deletedAt");
    }
    let marked_apps = read_table_where(wh, "applications", "_deleted_at IS NOT NULL").await;
    assert_eq!(marked_apps.len(), apps.len());
    // Full-refresh child tables no longer hold the deleted opportunities' children.
    assert_dataset_matches(&syncer, &sim, &["interviews", "notes", "offers", "referrals", "users"]).await;
    for name in ["interviews", "notes", "offers", "referrals"] {
        for r in read_table(wh, name).await {
            assert!(
                !gone.iter().any(|g| r["opportunity_id"] == json!(g)),
                "{name} still holds a deleted opportunity's child"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deselected_columns_are_never_written_not_even_in_staging() {
    let sim = fast_sim(world()).await;
    let mut setup = Setup::new(&sim, "columns");
    setup
        .raw
        .apply_columns_arg("opportunities=name,stage,created_at,updated_at,tags")
        .unwrap();
    setup.raw.apply_columns_arg("notes=created_at,user").unwrap();
    // Stop the first run after its first load to look at staging.
    let kill: KillSwitch = Arc::new(|s: &str, c: Checkpoint, _| s == "notes" && c == Checkpoint::AfterLoad);
    let first = setup.syncer().await.with_kill_switch(kill);
    first.setup().await.unwrap();
    first.sync_stream("opportunities").await.unwrap();
    assert!(first.sync_stream("notes").await.is_err());
    let wh = first.warehouse();
    let staging: Vec<String> = wh
        .list_tables()
        .await
        .unwrap()
        .into_iter()
        .filter(|t| t.starts_with("_stg_notes_"))
        .collect();
    assert_eq!(staging.len(), 1);
    let staged_cols = wh.table_columns(&staging[0]).await.unwrap().unwrap();
    assert!(
        !staged_cols
            .iter()
            .any(|c| c == "text" || c == "fields" || c == "secret"),
        "{staged_cols:?}"
    );
    sync_all(&setup.syncer().await).await.unwrap();

    let cfg = setup.config();
    for name in ["opportunities", "notes"] {
        let t = catalog::table(name).unwrap();
        let cols = wh.table_columns(name).await.unwrap().unwrap();
        let selected = cfg.columns_of(t);
        for c in t.columns {
            assert_eq!(
                cols.iter().any(|x| x == c.name),
                selected.iter().any(|s| s.name == c.name),
                "{name}.{}",
                c.name
            );
        }
        assert_columns_match_truth(
            t,
            &selected,
            &read_table(wh, name).await,
            &sim.world().truth(name, START_MS),
        );
    }
    assert!(
        cfg.columns_of(catalog::table("notes").unwrap())
            .iter()
            .any(|c| c.name == "opportunity_id"),
        "the parent id is always kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_lever_field_is_listed_by_discover_and_added_only_when_selected() {
    let sim = fast_sim(world()).await;
    let mut setup = Setup::new(&sim, "newfield");
    sync_all(&setup.syncer().await).await.unwrap();
    // Lever starts sending a field the catalog does not know.
    let scored: Vec<String> = {
        let mut w = sim.world();
        for o in w.opportunities.values_mut() {
            o["candidateScore"] = json!(7);
        }
        rich_opportunities(&w).into_iter().take(3).collect()
    };
    let syncer = setup.syncer().await;
    let sample = lever_sync::discover::sample(syncer.lever(), 5).await.unwrap();
    let opps = catalog::table("opportunities").unwrap();
    let unknown = lever_sync::discover::unknown_fields(opps, &sample["opportunities"]);
    let f = unknown
        .iter()
        .find(|f| f.field == "candidateScore")
        .expect("discover lists the new field");
    assert_eq!((f.column.as_str(), f.inferred), ("candidate_score", ColumnType::Int64));
    assert_eq!(f.records, sample["opportunities"].len());
    // Not selected: a sync never adds it.
    sync_all(&syncer).await.unwrap();
    assert!(!syncer
        .warehouse()
        .table_columns("opportunities")
        .await
        .unwrap()
        .unwrap()
        .contains(&"candidate_score".to_owned()));

    // Selected: the column appears, filled for records that change, null for the others.
    setup
        .raw
        .tables
        .entry("opportunities".into())
        .or_default()
        .extra_fields
        .insert("candidateScore".into(), "INT64".into());
    {
        let mut w = sim.world();
        for id in &scored {
            w.update_opportunity(id, |o| o["candidateScore"] = json!(42));
        }
    }
    let syncer = setup.syncer().await;
    sync_all(&syncer).await.unwrap();
    let rows = read_table(syncer.warehouse(), "opportunities").await;
    for r in &rows {
        let id = r["id"].as_str().unwrap().to_owned();
        let want = if scored.contains(&id) { json!("42") } else { Value::Null };
        assert_eq!(r["candidate_score"], want, "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_refresh_tables_follow_lever_and_incremental_tables_keep_their_columns() {
    let sim = fast_sim(world()).await;
    let mut setup = Setup::new(&sim, "schema");
    sync_all(&setup.syncer().await).await.unwrap();
    // Deselect one column of each kind of table; Lever stops sending one field of each.
    setup
        .raw
        .apply_columns_arg(&format!(
            "notes={}",
            catalog::table("notes")
                .unwrap()
                .columns
                .iter()
                .map(|c| c.name)
                .filter(|c| *c != "secret")
                .collect::<Vec<_>>()
                .join(",")
        ))
        .unwrap();
    setup
        .raw
        .apply_columns_arg(&format!(
            "opportunities={}",
            catalog::table("opportunities")
                .unwrap()
                .columns
                .iter()
                .map(|c| c.name)
                .filter(|c| *c != "headline")
                .collect::<Vec<_>>()
                .join(",")
        ))
        .unwrap();
    let (changed, added) = {
        let mut w = sim.world();
        for recs in w.children.get_mut("interviews").unwrap().values_mut() {
            for r in recs {
                r.as_object_mut().unwrap().remove("gcalEventUrl");
            }
        }
        let ids: Vec<String> = w
            .scoped_opportunities(START_MS)
            .into_iter()
            .map(id_of)
            .take(2)
            .collect();
        for id in &ids {
            w.update_opportunity(id, |o| {
                o.as_object_mut().unwrap().remove("snoozedUntil");
                o["headline"] = json!("changed headline");
            });
        }
        (ids, w.add_opportunity())
    };
    let syncer = setup.syncer().await;
    sync_all(&syncer).await.unwrap();
    let wh = syncer.warehouse();
    let cols = |t: &'static str| async move { wh.table_columns(t).await.unwrap().unwrap() };
    // Full refresh: a deselected column and a vanished field are gone at the replace.
    assert!(!cols("notes").await.contains(&"secret".to_owned()));
    assert!(!cols("interviews").await.contains(&"gcal_event_url".to_owned()));
    // Incremental: both columns stay with their history; changed and new rows do not fill them.
    let opp_cols = cols("opportunities").await;
    assert!(opp_cols.contains(&"headline".to_owned()) && opp_cols.contains(&"snoozed_until".to_owned()));
    let rows = read_table(wh, "opportunities").await;
    let row = |id: &str| rows.iter().find(|r| r["id"] == json!(id)).unwrap().clone();
    assert_eq!(
        row(&added)["headline"],
        Value::Null,
        "a deselected column is not filled"
    );
    assert_ne!(
        row(&changed[0])["headline"],
        json!("changed headline"),
        "a deselected column is no longer written"
    );
    assert_eq!(
        row(&changed[0])["snoozed_until"],
        Value::Null,
        "a vanished field is no longer filled"
    );
    let untouched = rows.iter().filter(|r| !r["headline"].is_null()).count();
    assert!(untouched > 0, "existing rows keep their history");
    // Everything still selected equals Lever.
    let cfg = setup.config();
    for name in ["interviews", "notes"] {
        let t = catalog::table(name).unwrap();
        let live: Vec<_> = cfg
            .columns_of(t)
            .into_iter()
            .filter(|c| c.name != "gcal_event_url")
            .collect();
        assert_columns_match_truth(
            t,
            &live,
            &read_table(wh, name).await,
            &sim.world().truth(name, START_MS),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erase_removes_a_person_everywhere_by_each_identifier_and_keeps_them_out() {
    let sim = fast_sim(world()).await;
    let setup = Setup::new(&sim, "erase");
    let syncer = setup.syncer().await;
    sync_all(&syncer).await.unwrap();
    let wh = syncer.warehouse();
    let counts = |rows: &[(String, u64)]| rows.iter().map(|(_, n)| *n).sum::<u64>();
    // The recorded account has two people with two opportunities each (same contact).
    let w = World::recorded();
    let jordan: Vec<String> = w
        .opportunities
        .values()
        .filter(|o| o["name"] == "Jordan Reyes")
        .map(id_of)
        .collect();
    let priya: Vec<String> = w
        .opportunities
        .values()
        .filter(|o| o["name"] == "Priya Natarajan")
        .map(id_of)
        .collect();
    let lukas_contact = w.opportunities.values().find(|o| o["name"] == "Lukas Bauer").unwrap()["contact"]
        .as_str()
        .unwrap()
        .to_owned();
    // Another opportunity's application names Priya as its candidate (by email): it is hers.
    let (other_opp, other_app) = {
        let mut w = sim.world();
        let other = rich_opportunities(&w).into_iter().next().unwrap();
        let app = w.opportunities[&other]["applications"][0].as_str().unwrap().to_owned();
        w.update_application(&app, |a| {
            a["type"] = json!("referral");
            a["email"] = json!("priya.n@example.org");
        });
        (other, app)
    };
    sync_all(&syncer).await.unwrap();
    let before: Vec<usize> = row_counts(wh).await;
    let cases = [
        (Person::Opportunity(jordan[0].clone()), jordan.clone()),
        (
            Person::Email("PRIYA.N@example.org".into()),
            priya.iter().cloned().chain([other_opp.clone()]).collect(),
        ),
        (
            Person::Contact(lukas_contact),
            vec!["9ea413b6-432a-4806-a6cb-683e55dda4c2".to_owned()],
        ),
    ];
    let mut erased: Vec<String> = Vec::new();
    for (who, opps) in &cases {
        let report = ops::erase(&syncer, who).await.unwrap();
        assert_eq!(report.opportunities, opps.len(), "{who:?}");
        assert!(counts(&report.rows) > 0);
        erased.extend(opps.iter().cloned());
    }
    let people_rows = |rows: &[serde_json::Map<String, Value>], col: &str| {
        rows.iter()
            .filter(|r| erased.iter().any(|e| r[col] == json!(e)) || r["id"] == json!(other_app))
            .count()
    };
    let after = row_counts(wh).await;
    for (i, t) in ALL_TABLES.iter().enumerate() {
        let rows = read_table(wh, t).await;
        let col = catalog::table(t).unwrap().opportunity_column();
        if let Some(col) = col {
            assert_eq!(people_rows(&rows, col), 0, "{t} still holds an erased person");
        }
        // Nothing else changed: what is gone is exactly the erased people's rows.
        let truth_theirs = sim
            .world()
            .truth(t, START_MS)
            .iter()
            .filter(|(r, p)| match col {
                Some("id") => erased.contains(&id_of(r)),
                Some(_) => {
                    p.as_ref().is_some_and(|p| erased.contains(p))
                        || r.get("opportunityId")
                            .and_then(Value::as_str)
                            .is_some_and(|o| erased.iter().any(|e| e == o))
                }
                None => false,
            })
            .count();
        assert_eq!(before[i] - after[i], truth_theirs, "{t}");
    }
    let history = syncer.store().recent_runs(100).await.unwrap();
    for r in &history.rows {
        let text = format!("{:?}", r);
        assert!(
            !text.contains("priya") && !text.contains("PRIYA"),
            "the history holds no personal data"
        );
    }
    // A later sync does not bring them back, and nobody else is affected.
    sync_all(&setup.syncer().await).await.unwrap();
    for t in ALL_TABLES {
        if let Some(col) = catalog::table(t).unwrap().opportunity_column() {
            assert_eq!(
                people_rows(&read_table(wh, t).await, col),
                0,
                "{t} brought an erased person back"
            );
        }
    }
    assert_eq!(row_counts(wh).await, after);
}

async fn row_counts(wh: &lever_sync::warehouse::Warehouse) -> Vec<usize> {
    let mut out = Vec::new();
    for t in ALL_TABLES {
        out.push(read_table(wh, t).await.len());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_gives_an_exact_full_refresh_and_delete_connection_leaves_nothing() {
    let sim = fast_sim(world()).await;
    let setup = Setup::new(&sim, "reset");
    let syncer = setup.syncer().await;
    sync_all(&syncer).await.unwrap();
    let wh = syncer.warehouse();
    // Someone edited the warehouse by hand: a stray row and a wrong value.
    wh.execute(
        &format!(
            "INSERT INTO {} (id, name) VALUES ('stray', 'not in Lever')",
            wh.table_ref("opportunities")
        ),
        &[],
    )
    .await
    .unwrap();
    wh.execute(
        &format!(
            "UPDATE {} SET stage = 'edited' WHERE TRUE",
            wh.table_ref("opportunities")
        ),
        &[],
    )
    .await
    .unwrap();
    ops::reset(&syncer, "opportunities").await.unwrap();
    assert!(syncer.store().load("opportunities").await.unwrap().cursor_ms.is_none());
    sim.reset_stats();
    sync_all(&syncer).await.unwrap();
    assert_dataset_matches(&syncer, &sim, &ALL_TABLES).await;
    assert!(
        sim.stats()["opportunities+applications"].records as usize >= sim.world().scoped_opportunities(START_MS).len(),
        "everything was read again"
    );

    let dropped = ops::delete_connection(wh).await.unwrap();
    assert!(dropped.contains(&schema::STATE_TABLE.to_owned()) && dropped.contains(&"opportunities".to_owned()));
    assert!(
        wh.list_tables().await.unwrap().is_empty(),
        "nothing of the connector is left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anonymised_opportunity_loses_its_old_personal_fields() {
    let sim = fast_sim(World::recorded()).await;
    let setup = Setup::new(&sim, "anon");
    let syncer = setup.syncer().await;
    sync_all(&syncer).await.unwrap();
    let id = "9ea413b6-432a-4806-a6cb-683e55dda4c2";
    let old = sim.world().opportunities[id].clone();
    sim.world().anonymise(id);
    sync_all(&syncer).await.unwrap();
    let rows = read_table(syncer.warehouse(), "opportunities").await;
    let row = rows.iter().find(|r| r["id"] == json!(id)).unwrap();
    let text = serde_json::to_string(row).unwrap();
    for personal in [
        old["name"].as_str().unwrap(),
        old["emails"][0].as_str().unwrap(),
        old["phones"][0]["value"].as_str().unwrap(),
    ] {
        assert!(!text.contains(personal), "{personal} is still stored");
    }
    assert_eq!(row["is_anonymized"], json!("true"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_without_confidential_access_is_reported_and_syncs_the_rest() {
    let sim = Simulator::start(
        world(),
        SimConfig {
            rate: None,
            confidential_access: false,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let setup = Setup::new(&sim, "noconf");
    let syncer = setup.syncer().await;
    assert!(
        !ops::can_read_confidential(syncer.lever()).await.unwrap(),
        "check says so plainly"
    );
    sync_all(&syncer).await.unwrap();
    let t = catalog::table("opportunities").unwrap();
    let visible: Vec<_> = sim
        .world()
        .truth("opportunities", START_MS)
        .into_iter()
        .filter(|(o, _)| o["confidentiality"] != "confidential")
        .collect();
    assert!(visible.len() < sim.world().truth("opportunities", START_MS).len());
    assert_matches_truth(t, &read_table(syncer.warehouse(), "opportunities").await, &visible);
    let runs = syncer.store().recent_runs(50).await.unwrap();
    assert!(runs
        .rows
        .iter()
        .any(|r| runs.str(r, "table_name").as_deref() == Some("opportunities")
            && runs.str(r, "error_code").as_deref() == Some(NO_CONFIDENTIAL)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_without_an_opportunity_id_survive_an_erase() {
    let sim = fast_sim(world()).await;
    let setup = Setup::new(&sim, "nullopp");
    let syncer = setup.syncer().await;
    let orphan = {
        let mut w = sim.world();
        let opp = rich_opportunities(&w).into_iter().nth(1).unwrap();
        let app = w.opportunities[&opp]["applications"][0].as_str().unwrap().to_owned();
        w.update_application(&app, |a| a["opportunityId"] = Value::Null);
        app
    };
    sync_all(&syncer).await.unwrap();
    ops::erase(&syncer, &Person::Contact("3b324296-1112-42b3-8524-fd434452a839".into()))
        .await
        .unwrap();
    sync_all(&syncer).await.unwrap();
    let apps = read_table(syncer.warehouse(), "applications").await;
    assert!(
        apps.iter().any(|r| r["id"] == json!(orphan)),
        "an application without opportunityId vanished"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ending_a_runaway_run_keeps_a_requested_full_refresh() {
    let sim = fast_sim(World::recorded()).await;
    let setup = Setup::new(&sim, "abandon");
    let syncer = setup.syncer().await;
    sync_all(&syncer).await.unwrap();
    ops::reset(&syncer, "opportunities").await.unwrap();
    syncer.run_window("opportunities", None).await.unwrap();
    syncer
        .abandon_run("opportunities", "chain_hop_limit", "test")
        .await
        .unwrap();
    let st = syncer.store().load("opportunities").await.unwrap();
    assert!(st.flags.replace, "the reset is still pending");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn columns_selected_during_a_run_do_not_break_it() {
    let sim = fast_sim(world()).await;
    let mut narrow = Setup::new(&sim, "midcols");
    narrow.raw.sync.pages_per_window = Some(1);
    narrow.raw.apply_columns_arg("opportunities=name,stage").unwrap();
    let kill: KillSwitch =
        Arc::new(|s: &str, c: Checkpoint, h| s == "opportunities" && c == Checkpoint::AfterSave && h == 0);
    let first = narrow.syncer().await.with_kill_switch(kill);
    first.setup().await.unwrap();
    assert!(first.sync_stream("opportunities").await.is_err());
    // The settings change: every column is selected now; the run in progress carries on.
    let mut wide = Setup {
        sim: sim.clone(),
        dataset: narrow.dataset.clone(),
        raw: narrow.raw.clone(),
    };
    wide.raw.tables.clear();
    let syncer = wide.syncer().await;
    sync_all(&syncer).await.unwrap();
    let t = catalog::table("opportunities").unwrap();
    let kept: Vec<_> = t
        .columns
        .iter()
        .filter(|c| ["id", "name", "stage"].contains(&c.name))
        .collect();
    assert_columns_match_truth(
        t,
        &kept,
        &read_table(syncer.warehouse(), "opportunities").await,
        &sim.world().truth("opportunities", START_MS),
    );
    // A full refresh fills the new columns.
    ops::reset(&syncer, "opportunities").await.unwrap();
    sync_all(&syncer).await.unwrap();
    assert_dataset_matches(&syncer, &sim, &["opportunities"]).await;
}
