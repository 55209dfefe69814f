//! The simulated Lever account: the recorded sandbox records plus generated volume, mutations
//! that move time forward, and the truth a correct sync must end with.
//!
//! Records are kept exactly in Lever's JSON shape; nothing here knows about BigQuery.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};

/// The per-opportunity child resources, as named in the API path.
pub const CHILD_KINDS: [&str; 4] = ["interviews", "notes", "offers", "referrals"];

const RECORDED: &[(&str, &str)] = &[
    (
        "opportunities",
        include_str!("../fixtures/lever-recorded/opportunities.json"),
    ),
    (
        "applications",
        include_str!("../fixtures/lever-recorded/applications.json"),
    ),
    ("interviews", include_str!("../fixtures/lever-recorded/interviews.json")),
    ("notes", include_str!("../fixtures/lever-recorded/notes.json")),
    ("offers", include_str!("../fixtures/lever-recorded/offers.json")),
    ("referrals", include_str!("../fixtures/lever-recorded/referrals.json")),
    ("users", include_str!("../fixtures/lever-recorded/users.json")),
];
const RECORDED_PARENTS: &str = include_str!("../fixtures/lever-recorded/parents.json");

pub fn recorded(name: &str) -> Vec<Value> {
    RECORDED
        .iter()
        .find(|(n, _)| *n == name)
        .and_then(|(_, text)| serde_json::from_str::<Vec<Value>>(text).ok())
        .unwrap_or_default()
}

#[derive(Debug, Clone, Default)]
pub struct World {
    /// Opportunities as Lever stores them: `applications` holds application ids.
    pub opportunities: BTreeMap<String, Value>,
    /// Applications by id; each carries its `opportunityId`.
    pub applications: BTreeMap<String, Value>,
    /// kind → opportunity id → records.
    pub children: HashMap<&'static str, BTreeMap<String, Vec<Value>>>,
    pub users: Vec<Value>,
    /// `/opportunities/deleted` entries.
    pub deleted: Vec<Value>,
    /// The last time a mutation stamped (strictly increasing).
    last_stamp: i64,
    rng_state: u64,
}

fn id(v: &Value) -> String {
    v.get("id").and_then(Value::as_str).unwrap_or_default().to_owned()
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn uuid(rng: &mut StdRng) -> String {
    let b: [u8; 16] = rng.random();
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
        u16::from_be_bytes([b[4], b[5]]),
        u16::from_be_bytes([b[6], b[7]]) & 0x0fff,
        (u16::from_be_bytes([b[8], b[9]]) & 0x3fff) | 0x8000,
        u64::from_be_bytes([0, 0, b[10], b[11], b[12], b[13], b[14], b[15]])
    )
}

const FIRST: &[&str] = &[
    "Zoë",
    "José",
    "Łukasz",
    "Siobhán",
    "Ngozi",
    "Mei",
    "Ana",
    "Olúwadámilọ́lá",
    "Björn",
    "Priya",
    "Noah",
    "Aiyana",
    "Đức",
    "Fatima",
    "李",
    "Юлия",
];
const LAST: &[&str] = &[
    "Ångström",
    "Núñez",
    "Kowalski",
    "O'Brien",
    "Okafor",
    "Chen",
    "Silva",
    "Adébáyọ̀",
    "Håkansson",
    "Iyer",
    "Smith",
    "Redcloud",
    "Nguyễn",
    "Haddad",
    "小龍",
    "Иванова",
];
const STAGES: &[&str] = &[
    "lead-new",
    "lead-reached-out",
    "applicant-new",
    "offer",
    "f1a0cadd-9eff-4ecc-9edc-ff24d04fe393",
    "b0072803-e9e5-403f-b028-085646c1e7a6",
];
const ORIGINS: &[&str] = &["sourced", "applied", "referred", "agency", "internal"];
const TAGS: &[&str] = &[
    "Senior Account Manager",
    "Northwind Labs",
    "Remote",
    "Intern",
    "Part-time",
    "🚀 priority",
    "Ingénieur",
];
const POSTINGS: &[&str] = &[
    "2200dd68-757d-4ed2-a9b7-e1856196b513",
    "f45efa75-63f3-466c-93c2-643d3147968d",
];

/// What generated volume looks like.
#[derive(Debug, Clone)]
pub struct Volume {
    pub opportunities: usize,
    pub extra_users: usize,
    pub seed: u64,
    /// Generated opportunities are created on or after this time (epoch ms) ...
    pub from_ms: i64,
    /// ... and last changed before this one.
    pub to_ms: i64,
}

impl Volume {
    pub fn new(opportunities: usize, seed: u64) -> Self {
        Volume {
            opportunities,
            extra_users: 20,
            seed,
            from_ms: 1_590_000_000_000,
            to_ms: now_ms() - 86_400_000,
        }
    }
}

impl World {
    /// Only the recorded sandbox records, with children under their recorded parents.
    pub fn recorded() -> World {
        let mut w = World {
            rng_state: 1,
            ..World::default()
        };
        for o in recorded("opportunities") {
            w.opportunities.insert(id(&o), o);
        }
        for a in recorded("applications") {
            w.applications.insert(id(&a), a);
        }
        let parents: Value = serde_json::from_str(RECORDED_PARENTS).unwrap_or(Value::Null);
        for kind in CHILD_KINDS {
            let map = w.children.entry(kind).or_default();
            for rec in recorded(kind) {
                let parent = parents
                    .pointer(&format!("/{kind}/{}", id(&rec)))
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                map.entry(parent).or_default().push(rec);
            }
        }
        w.users = recorded("users");
        w
    }

    /// The recorded records plus generated volume.
    pub fn generated(v: &Volume) -> World {
        let mut w = World::recorded();
        let mut rng = StdRng::seed_from_u64(v.seed);
        w.rng_state = v.seed ^ 0x9e37_79b9;
        for i in 0..v.extra_users {
            let created = rng.random_range(v.from_ms..v.to_ms);
            w.users.push(json!({
                "id": uuid(&mut rng),
                "name": format!("{} {}", FIRST[i % FIRST.len()], LAST[(i * 7) % LAST.len()]),
                "username": format!("user{i}"),
                "email": format!("user{i}@example.com"),
                "accessRole": if i % 5 == 0 { "super admin" } else { "interviewer" },
                "photo": null,
                "createdAt": created,
                "deactivatedAt": if i % 4 == 0 { json!(rng.random_range(created..v.to_ms)) } else { Value::Null },
                "externalDirectoryId": if i % 3 == 0 { json!(format!("ext-{i}")) } else { Value::Null },
                "linkedContactIds": if i % 6 == 0 { json!([uuid(&mut rng)]) } else { Value::Null },
                "jobTitle": if i % 2 == 0 { json!("Recruiter") } else { Value::Null },
                "managerId": null
            }));
        }
        let user_ids: Vec<String> = w.users.iter().map(id).collect();
        for i in 0..v.opportunities {
            let o = w.generate_opportunity(&mut rng, &user_ids, v, i);
            let oid = id(&o);
            w.opportunities.insert(oid, o);
        }
        w
    }

    fn generate_opportunity(&mut self, rng: &mut StdRng, users: &[String], v: &Volume, i: usize) -> Value {
        let oid = uuid(rng);
        let user = users[rng.random_range(0..users.len())].clone();
        let roll = rng.random_range(0..100);
        // 4 % legacy records (never edited since updatedAt existed), 4 % changed before any
        // reasonable start date, the rest spread over the volume's period.
        let (created, updated) = if roll < 4 {
            (rng.random_range(v.from_ms..v.from_ms + 30 * 86_400_000), None)
        } else if roll < 8 {
            let c = rng.random_range(1_400_000_000_000..1_450_000_000_000);
            (c, Some(c + 1000))
        } else {
            let c = rng.random_range(v.from_ms..v.to_ms);
            (c, Some(rng.random_range(c..=v.to_ms)))
        };
        let name = format!(
            "{} {}",
            FIRST[rng.random_range(0..FIRST.len())],
            LAST[rng.random_range(0..LAST.len())]
        );
        let stage = STAGES[rng.random_range(0..STAGES.len())];
        let archived = if rng.random_bool(0.3) {
            json!({"reason": uuid(rng), "archivedAt": updated.unwrap_or(created)})
        } else {
            Value::Null
        };
        let mut apps = Vec::new();
        if rng.random_bool(0.9) {
            let aid = uuid(rng);
            let referral = rng.random_bool(0.2);
            let app = json!({
                "id": aid, "type": if referral { "referral" } else if rng.random_bool(0.5) { "posting" } else { "user" },
                "candidateId": oid, "opportunityId": oid, "posting": POSTINGS[i % 2],
                "postingHiringManager": user, "postingOwner": user,
                "name": if referral { json!(name) } else { Value::Null }, "company": null,
                "phone": if referral { json!({"type": null, "value": "+1555010000"}) } else { Value::Null },
                "email": if referral { json!(format!("cand{i}@example.org")) } else { Value::Null },
                "links": [], "comments": if i % 11 == 0 { json!("Commentaire — très bien") } else { Value::Null },
                "user": user,
                "customQuestions": if referral { json!([{"id": uuid(rng), "type": "referral", "text": "Referral", "instructions": "", "fields": [{"description": "", "required": false, "text": "Relationship", "type": "dropdown", "id": uuid(rng), "prompt": "Select one", "options": [{"text": "Friend"}], "value": "Friend"}], "baseTemplateId": uuid(rng), "user": user, "referrer": user, "stage": null, "createdAt": created, "completedAt": null}]) } else { json!([]) },
                "createdAt": created, "archived": archived,
                "requisitionForHire": if i % 13 == 0 { json!({"id": uuid(rng), "requisitionCode": format!("REQ-{i}"), "hiringManagerOnHire": user}) } else { Value::Null }
            });
            apps.push(aid.clone());
            self.applications.insert(aid, app);
        }
        let opp = json!({
            "id": oid, "name": name, "contact": uuid(rng), "headline": "Northwind Labs", "stage": stage,
            "confidentiality": if rng.random_bool(0.06) { "confidential" } else { "non-confidential" },
            "location": "Lisboa, Portugal",
            "phones": [{"type": "mobile", "value": format!("+1555{:07}", i)}],
            "emails": [format!("cand{i}@example.net")],
            "links": if i % 3 == 0 { json!([format!("https://example.com/in/cand{i}")]) } else { json!([]) },
            "archived": archived,
            "tags": (0..rng.random_range(0..4)).map(|k| TAGS[(i + k) % TAGS.len()]).collect::<Vec<_>>(),
            "sources": ["Added manually"],
            "stageChanges": [{"toStageId": "lead-new", "toStageIndex": 0, "updatedAt": created, "userId": user}, {"toStageId": stage, "toStageIndex": 3, "updatedAt": updated.unwrap_or(created), "userId": user}],
            "origin": ORIGINS[rng.random_range(0..ORIGINS.len())], "sourcedBy": if i % 2 == 0 { json!(user) } else { Value::Null },
            "owner": user, "followers": [user], "applications": apps,
            "createdAt": created, "updatedAt": updated, "lastInteractionAt": updated, "lastAdvancedAt": updated,
            "snoozedUntil": if i % 17 == 0 { json!(v.to_ms + 86_400_000) } else { Value::Null },
            "urls": {"list": "https://hire.sandbox.lever.co/candidates", "show": format!("https://hire.sandbox.lever.co/candidates/{oid}")},
            "isAnonymized": false,
            "dataProtection": if i % 9 == 0 { json!({"store": {"allowed": true, "expiresAt": v.to_ms + 1000}, "contact": {"allowed": false, "expiresAt": null}}) } else { Value::Null },
            "opportunityLocation": "Lisbon, Portugal"
        });
        let children = self.generate_children(rng, users, created, i);
        for (kind, recs) in children {
            if !recs.is_empty() {
                self.children.entry(kind).or_default().insert(oid.clone(), recs);
            }
        }
        opp
    }

    fn generate_children(
        &mut self,
        rng: &mut StdRng,
        users: &[String],
        created: i64,
        i: usize,
    ) -> Vec<(&'static str, Vec<Value>)> {
        let user = users[rng.random_range(0..users.len())].clone();
        let interviews = (0..rng.random_range(0..4))
            .map(|k| {
                json!({
                    "id": uuid(rng), "panel": uuid(rng), "subject": format!("On-site interview {k} – 面接"), "note": "",
                    "interviewers": [{"id": user, "name": "Morgan Ellis", "email": "morgan.ellis@example.com", "feedbackTemplate": uuid(rng)}],
                    "timezone": "Europe/Lisbon", "createdAt": created + 1000 * k, "date": created + 86_400_000, "duration": 30 + 15 * k,
                    "location": if k == 1 { json!("Room 4") } else { Value::Null }, "feedbackTemplate": uuid(rng),
                    "feedbackForms": [uuid(rng)], "feedbackReminder": "none", "user": user, "stage": STAGES[k as usize % STAGES.len()],
                    "canceledAt": if k == 2 { json!(created + 5000) } else { Value::Null }, "postings": [POSTINGS[i % 2]], "gcalEventUrl": null
                })
            })
            .collect();
        let notes = (0..rng.random_range(0..5))
            .map(|k| {
                // Some notes are large: long free text is where connectors truncate.
                let text = if (i + k) % 23 == 0 { "Long note ✍️ ".repeat(2500) } else { format!("Note {k}: 👍 good call") };
                json!({
                    "id": uuid(rng), "text": "Note",
                    "fields": [{"createdAt": created + k as i64, "score": if k % 2 == 0 { json!(3) } else { Value::Null }, "stage": "lead-new", "text": "Comment", "type": "note", "user": user, "value": text}],
                    "user": user, "secret": k % 3 == 0, "completedAt": created + k as i64, "deletedAt": null, "createdAt": created + k as i64
                })
            })
            .collect();
        let offers = (0..rng.random_range(0..2))
            .map(|_| {
                json!({
                    "id": uuid(rng), "posting": POSTINGS[i % 2], "createdAt": created + 7_200_000, "status": if i % 2 == 0 { "draft" } else { "approved" },
                    "creator": user,
                    "fields": [
                        {"text": "Job title", "identifier": "job_title", "value": "Ingénieure logicielle"},
                        {"text": "Offered compensation amount", "identifier": "salary_amount", "value": 5000 + i},
                        {"text": "Bonus", "identifier": "bonus", "value": 12.5},
                        {"text": "Today's date", "identifier": "today_date", "value": created},
                        {"text": "Direct manager", "identifier": "direct_manager", "value": null}
                    ],
                    "signatures": {"candidate": {"role": "candidate", "name": null, "email": null}},
                    "approved": if i % 2 == 0 { Value::Null } else { json!(true) },
                    "approvedAt": if i % 2 == 0 { Value::Null } else { json!(created + 9_000_000) },
                    "sentAt": null, "sentDocument": null,
                    "signedDocument": if i % 4 == 1 { json!({"fileName": "offer.pdf", "uploadedAt": created + 10_000_000, "downloadUrl": "https://example.com/offer.pdf"}) } else { Value::Null }
                })
            })
            .collect();
        let referrals = (0..rng.random_range(0..2))
            .map(|_| {
                json!({
                    "id": uuid(rng), "type": "referral", "text": "Referral", "instructions": "",
                    "fields": [{"description": "", "required": false, "text": "Name of referrer", "type": "text", "id": uuid(rng), "value": "Morgan Ellis"}],
                    "baseTemplateId": uuid(rng), "user": user, "referrer": user, "stage": null, "createdAt": created + 10, "completedAt": created + 10
                })
            })
            .collect();
        vec![
            ("interviews", interviews),
            ("notes", notes),
            ("offers", offers),
            ("referrals", referrals),
        ]
    }

    /// A time after every earlier stamp and not before the wall clock.
    pub fn stamp(&mut self) -> i64 {
        self.last_stamp = now_ms().max(self.last_stamp + 1);
        self.last_stamp
    }

    fn rng(&mut self) -> StdRng {
        self.rng_state = self.rng_state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        StdRng::seed_from_u64(self.rng_state)
    }

    // ---- mutations -----------------------------------------------------------------------

    /// Changes an opportunity's own fields; Lever bumps its `updatedAt`.
    pub fn update_opportunity(&mut self, id: &str, change: impl FnOnce(&mut Value)) -> bool {
        let t = self.stamp();
        match self.opportunities.get_mut(id) {
            Some(o) => {
                change(o);
                o["updatedAt"] = json!(t);
                true
            }
            None => false,
        }
    }

    /// Changes an application; Lever bumps its opportunity's `updatedAt`.
    pub fn update_application(&mut self, app_id: &str, change: impl FnOnce(&mut Value)) -> bool {
        let Some(app) = self.applications.get_mut(app_id) else {
            return false;
        };
        change(app);
        let parent = app
            .get("opportunityId")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        self.update_opportunity(&parent, |_| {})
    }

    /// Anonymises an opportunity as Lever does: personal fields blanked, flag set, bumped.
    pub fn anonymise(&mut self, id: &str) -> bool {
        self.update_opportunity(id, |o| {
            o["name"] = json!("Anonymized Candidate");
            o["headline"] = json!("");
            o["emails"] = json!([]);
            o["phones"] = json!([]);
            o["links"] = json!([]);
            o["location"] = Value::Null;
            o["isAnonymized"] = json!(true);
        })
    }

    /// A new opportunity (with an application and children), created now.
    pub fn add_opportunity(&mut self) -> String {
        let mut rng = self.rng();
        let users: Vec<String> = self.users.iter().map(id).collect();
        let now = self.stamp();
        let v = Volume {
            opportunities: 0,
            extra_users: 0,
            seed: 0,
            from_ms: now - 1,
            to_ms: now,
        };
        let n = self.opportunities.len();
        let mut o = self.generate_opportunity(&mut rng, &users, &v, n);
        o["createdAt"] = json!(now);
        o["updatedAt"] = json!(now);
        o["confidentiality"] = json!("non-confidential");
        let oid = id(&o);
        self.opportunities.insert(oid.clone(), o);
        oid
    }

    /// A child record added without touching the opportunity's `updatedAt` (as Lever does for
    /// notes, interviews, offers and referrals).
    pub fn add_child(&mut self, kind: &'static str, opp_id: &str, record: Value) {
        self.children
            .entry(kind)
            .or_default()
            .entry(opp_id.to_owned())
            .or_default()
            .push(record);
    }

    pub fn remove_child(&mut self, kind: &'static str, child_id: &str) -> bool {
        let Some(map) = self.children.get_mut(kind) else {
            return false;
        };
        for recs in map.values_mut() {
            if let Some(p) = recs.iter().position(|r| id(r) == child_id) {
                recs.remove(p);
                return true;
            }
        }
        false
    }

    pub fn new_note(&mut self, text: &str) -> Value {
        let mut rng = self.rng();
        let t = self.stamp();
        json!({"id": uuid(&mut rng), "text": "Note", "fields": [{"createdAt": t, "score": null, "stage": "lead-new", "text": "Comment", "type": "note", "user": null, "value": text}], "user": null, "secret": false, "completedAt": t, "deletedAt": null, "createdAt": t})
    }

    pub fn delete_opportunity(&mut self, id: &str) -> bool {
        let Some(o) = self.opportunities.remove(id) else {
            return false;
        };
        for a in o.get("applications").and_then(Value::as_array).into_iter().flatten() {
            if let Some(aid) = a.as_str() {
                self.applications.remove(aid);
            }
        }
        for kind in CHILD_KINDS {
            if let Some(m) = self.children.get_mut(kind) {
                m.remove(id);
            }
        }
        let t = self.stamp();
        self.deleted.push(json!({"id": id, "deletedAt": t, "deletedBy": null}));
        true
    }

    // ---- truth ---------------------------------------------------------------------------

    /// An opportunity is in scope when its last change (`updatedAt`, or `createdAt` when that is
    /// null) is on or after the start date.
    pub fn in_scope(o: &Value, start_ms: i64) -> bool {
        let last = o
            .get("updatedAt")
            .and_then(Value::as_i64)
            .or_else(|| o.get("createdAt").and_then(Value::as_i64));
        last.is_some_and(|t| t >= start_ms)
    }

    pub fn scoped_opportunities(&self, start_ms: i64) -> Vec<&Value> {
        self.opportunities
            .values()
            .filter(|o| World::in_scope(o, start_ms))
            .collect()
    }

    /// The records a correct sync holds for `table`, each with its parent opportunity id for
    /// child tables.
    pub fn truth(&self, table: &str, start_ms: i64) -> Vec<(Value, Option<String>)> {
        let scoped = self.scoped_opportunities(start_ms);
        match table {
            "opportunities" => scoped.into_iter().map(|o| (self.expanded(o), None)).collect(),
            "applications" => scoped
                .into_iter()
                .flat_map(|o| self.applications_of(o))
                .map(|a| (a.clone(), None))
                .collect(),
            "users" => self.users.iter().map(|u| (u.clone(), None)).collect(),
            kind => {
                let Some(map) = self.children.get(kind) else {
                    return Vec::new();
                };
                scoped
                    .into_iter()
                    .flat_map(|o| {
                        let oid = id(o);
                        map.get(&oid)
                            .into_iter()
                            .flatten()
                            .map(move |r| (r.clone(), Some(oid.clone())))
                    })
                    .collect()
            }
        }
    }

    pub fn applications_of<'a>(&'a self, o: &Value) -> Vec<&'a Value> {
        o.get("applications")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str().and_then(|aid| self.applications.get(aid)))
            .collect()
    }

    /// The opportunity as `expand=applications` returns it.
    pub fn expanded(&self, o: &Value) -> Value {
        let mut e = o.clone();
        e["applications"] = Value::Array(self.applications_of(o).into_iter().cloned().collect());
        e
    }

    pub fn truth_counts(&self, start_ms: i64) -> BTreeMap<String, usize> {
        [
            "opportunities",
            "applications",
            "interviews",
            "notes",
            "offers",
            "referrals",
            "users",
        ]
        .iter()
        .map(|t| (t.to_string(), self.truth(t, start_ms).len()))
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_children_sit_under_their_recorded_parents() {
        let w = World::recorded();
        assert_eq!(w.opportunities.len(), 5);
        let notes = &w.children["notes"];
        assert_eq!(notes["784ff8e2-4536-4d65-8b29-e2dbeb0e8bef"].len(), 1);
        assert_eq!(w.truth("referrals", 0).len(), 2);
        assert_eq!(w.truth("applications", 0).len(), 5);
    }

    #[test]
    fn generation_is_deterministic_and_varied() {
        let a = World::generated(&Volume {
            to_ms: 1_700_000_000_000,
            ..Volume::new(300, 7)
        });
        let b = World::generated(&Volume {
            to_ms: 1_700_000_000_000,
            ..Volume::new(300, 7)
        });
        assert_eq!(a.opportunities, b.opportunities);
        assert!(
            a.opportunities.values().any(|o| o["updatedAt"].is_null()),
            "legacy rows"
        );
        assert!(a.opportunities.values().any(|o| o["confidentiality"] == "confidential"));
        assert!(
            a.scoped_opportunities(1_500_000_000_000).len() < a.opportunities.len(),
            "some out of scope"
        );
        assert!(a.users.iter().any(|u| !u["deactivatedAt"].is_null()));
    }
}
