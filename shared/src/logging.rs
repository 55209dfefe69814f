//! Log setup. Fixed field names (`table` — the walk of Lever, named after its main table —
//! `run_id`, `hop`, `pages`, `rows`, `requests`, `retries`, `duration_ms`, `error_code`) carry
//! counts and codes, never record contents or keys.

/// One JSON object per line on stderr (Lambda sends it to CloudWatch Logs).
pub fn init_json() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_target(false)
        .without_time()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
