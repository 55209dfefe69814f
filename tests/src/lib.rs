//! The Lever API simulator (`world`: the data and its truth; `server`: the HTTP API) and the
//! end-to-end harness (`harness`: the BigQuery emulator, configs, reading tables back).

pub mod bqproxy;
pub mod chaos;
pub mod harness;
pub mod lambda;
pub mod server;
pub mod world;
