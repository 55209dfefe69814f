//! The tables as data: where each one comes from in Lever, how it is synced, and every column
//! with its BigQuery type and the Lever field it is read from.
//!
//! This module owns no I/O and no behaviour beyond lookups: the sync engine is generic and reads
//! everything table-specific from here. Adding a table means adding one entry below.

/// BigQuery type of a column, and with it the conversion applied to the Lever value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    String,
    Int64,
    Float64,
    Bool,
    /// Lever sends epoch milliseconds; stored as `TIMESTAMP`.
    Timestamp,
    /// A list of ids or strings; stored as `ARRAY<STRING>` (a `REPEATED STRING` field). Objects
    /// in the list contribute their `id` (Lever inlines objects where it usually sends ids when
    /// `expand` is used).
    StringArray,
    /// Nested objects and arrays of objects, kept whole.
    Json,
}

impl ColumnType {
    /// The type name in `CREATE`/`ALTER` DDL and in a table resource's schema.
    pub fn sql_name(self) -> &'static str {
        match self {
            ColumnType::String => "STRING",
            ColumnType::Int64 => "INT64",
            ColumnType::Float64 => "FLOAT64",
            ColumnType::Bool => "BOOL",
            ColumnType::Timestamp => "TIMESTAMP",
            ColumnType::StringArray => "ARRAY<STRING>",
            ColumnType::Json => "JSON",
        }
    }
}

/// Where a column's value comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A field of the Lever record; a dotted path reaches into nested objects
    /// (`archived.archivedAt`).
    Field(&'static str),
    /// The id of the parent opportunity, taken from the request path
    /// (`/opportunities/:id/notes`): child payloads do not carry it.
    ParentId,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Column {
    pub name: &'static str,
    pub ty: ColumnType,
    pub source: Source,
}

const fn col(name: &'static str, ty: ColumnType, field: &'static str) -> Column {
    Column {
        name,
        ty,
        source: Source::Field(field),
    }
}

const fn parent_col() -> Column {
    Column {
        name: "opportunity_id",
        ty: ColumnType::String,
        source: Source::ParentId,
    }
}

/// How a table is kept current.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// Fetch what changed since the cursor and `MERGE` it in (latest version of an id wins).
    Incremental,
    /// Read everything in scope each run and replace the table atomically at the end.
    FullRefresh,
}

/// How a table's records are reached in the Lever API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A paged list endpoint of its own.
    List { path: &'static str },
    /// Inlined in each parent record under `field` when the parent's list asks to `expand` it.
    Inline { parent: &'static str, field: &'static str },
    /// A paged list under each parent record: `/{parent path}/{id}/{path}`.
    PerParent { parent: &'static str, path: &'static str },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableDef {
    pub name: &'static str,
    pub origin: Origin,
    /// Primary key column (Lever `id`).
    pub key: &'static str,
    pub mode: SyncMode,
    /// Lever field the incremental filter runs on (`updated_at_start`/`_end`).
    pub cursor: Option<&'static str>,
    /// Query parameters sent on every list request of this table.
    pub fixed_params: &'static [(&'static str, &'static str)],
    pub columns: &'static [Column],
}

impl TableDef {
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }

    pub fn parent(&self) -> Option<&'static str> {
        match self.origin {
            Origin::List { .. } => None,
            Origin::Inline { parent, .. } | Origin::PerParent { parent, .. } => Some(parent),
        }
    }

    /// The table whose walk produces this table's rows: itself, or the parent it is inlined in.
    pub fn stream(&self) -> &'static str {
        match self.origin {
            Origin::Inline { parent, .. } => parent,
            _ => self.name,
        }
    }
}

/// Metadata columns added to every synced table, after the catalog's columns.
pub const SYNCED_AT: &str = "_synced_at";
pub const RUN_ID: &str = "_run_id";
/// On incremental tables: when Lever deleted the record (the row is kept, marked).
pub const DELETED_AT: &str = "_deleted_at";

/// The entries of `/opportunities/deleted`, staged during a run and applied at its end.
pub const DELETIONS: TableDef = TableDef {
    name: "deleted_opportunities",
    origin: Origin::List {
        path: "/opportunities/deleted",
    },
    key: "id",
    mode: SyncMode::Incremental,
    cursor: None,
    fixed_params: &[],
    columns: &[
        col("id", ColumnType::String, "id"),
        col("deleted_at", ColumnType::Timestamp, "deletedAt"),
        col("deleted_by", ColumnType::String, "deletedBy"),
    ],
};

/// In a sweep run of a child table, every in-scope opportunity the walk saw, and whether its
/// children were re-read: at the end, a re-read opportunity's children replace its old ones and
/// the children of opportunities no longer in scope go.
pub const SWEPT: TableDef = TableDef {
    name: "swept_opportunities",
    origin: Origin::List { path: "/opportunities" },
    key: "id",
    mode: SyncMode::FullRefresh,
    cursor: None,
    fixed_params: &[],
    columns: &[
        col("id", ColumnType::String, "id"),
        col("reread", ColumnType::Bool, "reread"),
    ],
};

impl TableDef {
    /// The column holding the opportunity a row belongs to, if any.
    pub fn opportunity_column(&self) -> Option<&'static str> {
        match (self.name, self.parent()) {
            ("opportunities", _) => Some("id"),
            (_, Some("opportunities")) => Some("opportunity_id"),
            _ => None,
        }
    }
}

use ColumnType::{Bool, Int64, Json, String as Str, StringArray, Timestamp};

const OPPORTUNITY_COLUMNS: &[Column] = &[
    col("id", Str, "id"),
    col("name", Str, "name"),
    col("headline", Str, "headline"),
    col("contact", Str, "contact"),
    col("stage", Str, "stage"),
    col("confidentiality", Str, "confidentiality"),
    col("location", Str, "location"),
    col("phones", Json, "phones"),
    col("emails", StringArray, "emails"),
    col("links", StringArray, "links"),
    col("archived", Json, "archived"),
    col("archived_at", Timestamp, "archived.archivedAt"),
    col("archive_reason", Str, "archived.reason"),
    col("tags", StringArray, "tags"),
    col("sources", StringArray, "sources"),
    col("stage_changes", Json, "stageChanges"),
    col("origin", Str, "origin"),
    col("sourced_by", Str, "sourcedBy"),
    col("owner", Str, "owner"),
    col("followers", StringArray, "followers"),
    col("applications", StringArray, "applications"),
    col("created_at", Timestamp, "createdAt"),
    col("updated_at", Timestamp, "updatedAt"),
    col("last_interaction_at", Timestamp, "lastInteractionAt"),
    col("last_advanced_at", Timestamp, "lastAdvancedAt"),
    col("snoozed_until", Timestamp, "snoozedUntil"),
    col("urls", Json, "urls"),
    col("data_protection", Json, "dataProtection"),
    col("is_anonymized", Bool, "isAnonymized"),
    col("opportunity_location", Str, "opportunityLocation"),
];

const APPLICATION_COLUMNS: &[Column] = &[
    col("id", Str, "id"),
    col("opportunity_id", Str, "opportunityId"),
    col("candidate_id", Str, "candidateId"),
    col("type", Str, "type"),
    col("posting", Str, "posting"),
    col("posting_owner", Str, "postingOwner"),
    col("posting_hiring_manager", Str, "postingHiringManager"),
    col("user", Str, "user"),
    col("name", Str, "name"),
    col("email", Str, "email"),
    col("company", Str, "company"),
    col("comments", Str, "comments"),
    col("phone", Json, "phone"),
    col("links", StringArray, "links"),
    col("custom_questions", Json, "customQuestions"),
    col("archived", Json, "archived"),
    col("archived_at", Timestamp, "archived.archivedAt"),
    col("archive_reason", Str, "archived.reason"),
    col("requisition_for_hire", Json, "requisitionForHire"),
    col("created_at", Timestamp, "createdAt"),
];

const INTERVIEW_COLUMNS: &[Column] = &[
    col("id", Str, "id"),
    parent_col(),
    col("panel", Str, "panel"),
    col("subject", Str, "subject"),
    col("note", Str, "note"),
    col("interviewers", Json, "interviewers"),
    col("timezone", Str, "timezone"),
    col("created_at", Timestamp, "createdAt"),
    col("date", Timestamp, "date"),
    col("duration", Int64, "duration"),
    col("location", Str, "location"),
    col("feedback_template", Str, "feedbackTemplate"),
    col("feedback_forms", StringArray, "feedbackForms"),
    col("feedback_reminder", Str, "feedbackReminder"),
    col("user", Str, "user"),
    col("stage", Str, "stage"),
    col("canceled_at", Timestamp, "canceledAt"),
    col("postings", StringArray, "postings"),
    col("gcal_event_url", Str, "gcalEventUrl"),
];

const NOTE_COLUMNS: &[Column] = &[
    col("id", Str, "id"),
    parent_col(),
    col("text", Str, "text"),
    col("fields", Json, "fields"),
    col("user", Str, "user"),
    col("secret", Bool, "secret"),
    col("completed_at", Timestamp, "completedAt"),
    col("created_at", Timestamp, "createdAt"),
    col("deleted_at", Timestamp, "deletedAt"),
];

const OFFER_COLUMNS: &[Column] = &[
    col("id", Str, "id"),
    parent_col(),
    col("posting", Str, "posting"),
    col("created_at", Timestamp, "createdAt"),
    col("status", Str, "status"),
    col("creator", Str, "creator"),
    // `fields[].value` mixes strings, numbers and nulls: only JSON keeps each as sent.
    col("fields", Json, "fields"),
    col("signatures", Json, "signatures"),
    col("approved", Bool, "approved"),
    col("approved_at", Timestamp, "approvedAt"),
    col("sent_at", Timestamp, "sentAt"),
    col("sent_document", Json, "sentDocument"),
    col("signed_document", Json, "signedDocument"),
];

const REFERRAL_COLUMNS: &[Column] = &[
    col("id", Str, "id"),
    parent_col(),
    col("type", Str, "type"),
    col("text", Str, "text"),
    col("instructions", Str, "instructions"),
    col("fields", Json, "fields"),
    col("base_template_id", Str, "baseTemplateId"),
    col("user", Str, "user"),
    col("referrer", Str, "referrer"),
    col("stage", Str, "stage"),
    col("created_at", Timestamp, "createdAt"),
    col("completed_at", Timestamp, "completedAt"),
];

const USER_COLUMNS: &[Column] = &[
    col("id", Str, "id"),
    col("name", Str, "name"),
    col("username", Str, "username"),
    col("email", Str, "email"),
    col("access_role", Str, "accessRole"),
    col("photo", Str, "photo"),
    col("created_at", Timestamp, "createdAt"),
    col("deactivated_at", Timestamp, "deactivatedAt"),
    col("external_directory_id", Str, "externalDirectoryId"),
    col("linked_contact_ids", StringArray, "linkedContactIds"),
    col("job_title", Str, "jobTitle"),
    col("manager_id", Str, "managerId"),
];

const fn per_opportunity(name: &'static str, path: &'static str, columns: &'static [Column]) -> TableDef {
    TableDef {
        name,
        origin: Origin::PerParent {
            parent: "opportunities",
            path,
        },
        key: "id",
        mode: SyncMode::FullRefresh,
        cursor: None,
        fixed_params: &[],
        columns,
    }
}

/// Every table the connector can sync, parents before their children.
pub const TABLES: &[TableDef] = &[
    TableDef {
        name: "opportunities",
        origin: Origin::List { path: "/opportunities" },
        key: "id",
        mode: SyncMode::Incremental,
        cursor: Some("updatedAt"),
        // Without `confidentiality=all` Lever silently leaves out confidential opportunities;
        // `expand=applications` brings each opportunity's application in the same page.
        fixed_params: &[("confidentiality", "all"), ("expand", "applications")],
        columns: OPPORTUNITY_COLUMNS,
    },
    TableDef {
        name: "applications",
        origin: Origin::Inline {
            parent: "opportunities",
            field: "applications",
        },
        key: "id",
        mode: SyncMode::Incremental,
        cursor: Some("updatedAt"),
        fixed_params: &[],
        columns: APPLICATION_COLUMNS,
    },
    per_opportunity("interviews", "interviews", INTERVIEW_COLUMNS),
    per_opportunity("notes", "notes", NOTE_COLUMNS),
    per_opportunity("offers", "offers", OFFER_COLUMNS),
    per_opportunity("referrals", "referrals", REFERRAL_COLUMNS),
    TableDef {
        name: "users",
        origin: Origin::List { path: "/users" },
        key: "id",
        mode: SyncMode::FullRefresh,
        cursor: None,
        // Lever lists only active users by default; deactivated ones still own interviews.
        fixed_params: &[("includeDeactivated", "true")],
        columns: USER_COLUMNS,
    },
];

pub fn table(name: &str) -> Option<&'static TableDef> {
    TABLES.iter().find(|t| t.name == name)
}

pub fn table_names() -> impl Iterator<Item = &'static str> {
    TABLES.iter().map(|t| t.name)
}

/// The tables written by the walk of `stream` (the stream's own table and those inlined in it).
pub fn tables_of_stream(stream: &str) -> impl Iterator<Item = &'static TableDef> + '_ {
    TABLES.iter().filter(move |t| t.stream() == stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn table_names_are_unique() {
        let names: HashSet<_> = table_names().collect();
        assert_eq!(names.len(), TABLES.len());
    }

    #[test]
    fn parents_exist_and_come_first() {
        for (i, t) in TABLES.iter().enumerate() {
            if let Some(parent) = t.parent() {
                let p = TABLES.iter().position(|x| x.name == parent);
                assert!(
                    matches!(p, Some(p) if p < i),
                    "{}: parent {parent} must be declared before it",
                    t.name
                );
            }
        }
    }

    #[test]
    fn keys_and_columns_are_sound() {
        for t in TABLES {
            let key = t
                .column(t.key)
                .unwrap_or_else(|| panic!("{}: key is not a column", t.name));
            assert_eq!(key.ty, ColumnType::String);
            let names: HashSet<_> = t.columns.iter().map(|c| c.name).collect();
            assert_eq!(names.len(), t.columns.len(), "{}: duplicate column", t.name);
            for c in t.columns {
                assert!(
                    !c.name.starts_with('_'),
                    "{}: {} is reserved for metadata",
                    t.name,
                    c.name
                );
                assert!(
                    c.name
                        .chars()
                        .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_'),
                    "{}: {} is not snake_case",
                    t.name,
                    c.name
                );
            }
            if let Some(cursor) = t.cursor {
                assert_eq!(t.mode, SyncMode::Incremental);
                let cursor_col = t.columns.iter().find(|c| c.source == Source::Field(cursor));
                // Inline tables advance with their parent's cursor.
                assert!(
                    cursor_col.is_some() || t.parent().is_some(),
                    "{}: cursor is not a column",
                    t.name
                );
            }
        }
    }

    #[test]
    fn child_tables_carry_their_parent_id() {
        for t in TABLES {
            if t.parent().is_some() {
                assert!(t.column("opportunity_id").is_some(), "{} lacks opportunity_id", t.name);
            }
        }
    }

    #[test]
    fn opportunities_ask_for_confidential_records_and_applications() {
        let t = table("opportunities").unwrap();
        assert!(t.fixed_params.contains(&("confidentiality", "all")));
        assert!(t.fixed_params.contains(&("expand", "applications")));
        let u = table("users").unwrap();
        assert!(u.fixed_params.contains(&("includeDeactivated", "true")));
    }
}
