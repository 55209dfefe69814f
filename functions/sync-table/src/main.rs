//! Lambda `sync-table`: one window of one table per invocation, then it starts its own next
//! invocation (async) or finishes the run. The work is `lever_sync::chain::step`.

use lambda_runtime::{service_fn, Error, LambdaEvent};
use lever_sync::chain::{self, ChainEvent};
use serde_json::{json, Value};

#[tokio::main]
async fn main() -> Result<(), Error> {
    lever_sync::logging::init_json();
    // Clients and secrets once per container; every invocation reuses them.
    let app = lever_sync::chain::ChainApp::from_environment().await?;
    lambda_runtime::run(service_fn(|event: LambdaEvent<Value>| {
        let app = app.clone();
        async move {
            let deadline = event.context.deadline as i64;
            let chain_event: ChainEvent = serde_json::from_value(event.payload).map_err(|e| {
                tracing::error!(error_code = "event_invalid", "not a chain event: {e}");
                format!("not a chain event ({e}): expected {{\"table\": \"notes\", \"chain\": \"…\", \"hop\": 0}}")
            })?;
            chain::handle_step(&app, &chain_event, Some(deadline))
                .await
                .map(|outcome| json!(outcome))
                .map_err(|e| Error::from(format!("{}: {e}", e.code())))
        }
    }))
    .await
}
