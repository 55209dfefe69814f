//! Lever → BigQuery sync: everything that is not a `main()`.
//!
//! `catalog` declares the tables, `lever` talks to Lever, `warehouse` to BigQuery, `rows`
//! converts records, `sync` runs one window of one table, `config` validates settings.

pub mod aws;
pub mod catalog;
pub mod chain;
pub mod config;
pub mod discover;
pub mod error;
pub mod lever;
pub mod logging;
pub mod ops;
pub mod rows;
pub mod sync;
pub mod warehouse;
