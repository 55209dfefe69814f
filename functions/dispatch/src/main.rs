//! Lambda `dispatch`: the schedule's target and the operators' console. It starts a chain per
//! table, resumes dead ones, leaves live ones alone, and runs console events (sync now, full
//! refresh, status, erase, delete_connection). The work is `lever_sync::chain::dispatch`.

use lambda_runtime::{service_fn, Error, LambdaEvent};
use serde_json::Value;

#[tokio::main]
async fn main() -> Result<(), Error> {
    lever_sync::logging::init_json();
    let app = lever_sync::chain::ChainApp::from_environment().await?;
    lambda_runtime::run(service_fn(|event: LambdaEvent<Value>| {
        let app = app.clone();
        async move {
            lever_sync::chain::handle_dispatch(&app, &event.payload)
                .await
                .map_err(|e| Error::from(format!("{}: {e}", e.code())))
        }
    }))
    .await
}
