//! Where the BigQuery access token comes from: Google credentials JSON (file or text) holding
//! either a service-account key or an `external_account` configuration for workload identity
//! federation from AWS (see `federation`), or a fixed placeholder token for the local emulator.

use super::federation::{AwsIdentity, ExternalAccount, WorkloadIdentity, EXTERNAL_ACCOUNT};
use super::WarehouseError;
use async_trait::async_trait;
use gcp_bigquery_client::auth::Authenticator;
use gcp_bigquery_client::error::BQError;
use gcp_bigquery_client::yup_oauth2;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

const SCOPE: &str = "https://www.googleapis.com/auth/bigquery";

#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// A Google credentials file on disk: a service-account key or an `external_account`
    /// (workload identity federation) configuration.
    ServiceAccountFile(String),
    /// The same as JSON text (e.g. read from a secret store).
    ServiceAccountJson(String),
    /// The local emulator accepts any bearer token.
    Emulator,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::ServiceAccountFile(p) => write!(f, "ServiceAccountFile({p})"),
            Credentials::ServiceAccountJson(_) => f.write_str("ServiceAccountJson(***)"),
            Credentials::Emulator => f.write_str("Emulator"),
        }
    }
}

/// The emulator's token: any non-empty bearer works there.
#[derive(Clone)]
struct EmulatorToken;

#[async_trait]
impl Authenticator for EmulatorToken {
    async fn access_token(&self) -> Result<String, BQError> {
        Ok("local-emulator".to_owned())
    }
}

pub async fn authenticator(c: &Credentials) -> Result<Arc<dyn Authenticator>, WarehouseError> {
    Ok(match c {
        Credentials::Emulator => Arc::new(EmulatorToken),
        Credentials::ServiceAccountFile(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| WarehouseError::Credentials(format!("cannot read the key file {path}: {e}")))?;
            from_json(&text).await?
        }
        Credentials::ServiceAccountJson(text) => from_json(text).await?,
    })
}

/// A service-account key exchanged for short-lived tokens (cached and refreshed by yup-oauth2).
#[derive(Clone)]
struct ServiceAccount(yup_oauth2::authenticator::DefaultAuthenticator);

#[async_trait]
impl Authenticator for ServiceAccount {
    async fn access_token(&self) -> Result<String, BQError> {
        let tok = self.0.token(&[SCOPE]).await?;
        tok.token().map(str::to_owned).ok_or(BQError::NoToken)
    }
}

/// Chooses the flow by the JSON's `type`, as Google's client libraries do.
async fn from_json(text: &str) -> Result<Arc<dyn Authenticator>, WarehouseError> {
    #[derive(serde::Deserialize)]
    struct Kind {
        #[serde(rename = "type", default)]
        kind: Option<String>,
    }
    // Only the type is read here; the text itself never goes into an error.
    let kind = serde_json::from_str::<Kind>(text).ok().and_then(|k| k.kind);
    match kind.as_deref() {
        Some(EXTERNAL_ACCOUNT) => federated(text).await,
        None | Some("service_account") => service_account(text).await,
        Some(other) => Err(WarehouseError::Credentials(format!(
            "unsupported Google credentials type `{other}`: use a service-account key or an external_account configuration"
        ))),
    }
}

async fn federated(text: &str) -> Result<Arc<dyn Authenticator>, WarehouseError> {
    let account = ExternalAccount::from_json(text).map_err(|e| WarehouseError::Credentials(e.to_string()))?;
    let aws = AwsIdentity::from_environment()
        .await
        .map_err(|e| WarehouseError::Credentials(e.to_string()))?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| WarehouseError::Unexpected(e.to_string()))?;
    let auth = WorkloadIdentity::new(account, aws, http).map_err(|e| WarehouseError::Credentials(e.to_string()))?;
    Ok(Arc::new(auth))
}

async fn service_account(text: &str) -> Result<Arc<dyn Authenticator>, WarehouseError> {
    // A parse error names the position, never the key material.
    let key = serde_json::from_str::<yup_oauth2::ServiceAccountKey>(text).map_err(|e| {
        WarehouseError::Credentials(format!(
            "the service-account key is not a valid key file (line {}, column {})",
            e.line(),
            e.column()
        ))
    })?;
    let auth = yup_oauth2::ServiceAccountAuthenticator::builder(key)
        .build()
        .await
        .map_err(|e| WarehouseError::Credentials(format!("the service-account key was refused: {e}")))?;
    Ok(Arc::new(ServiceAccount(auth)))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn error_of(text: &str) -> String {
        match from_json(text).await {
            Ok(_) => panic!("accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[tokio::test]
    async fn the_json_type_chooses_the_flow() {
        let e = error_of(r#"{"type": "authorized_user", "refresh_token": "rt-secret-1"}"#).await;
        assert!(
            e.contains("unsupported Google credentials type `authorized_user`"),
            "{e}"
        );
        assert!(!e.contains("rt-secret-1"));

        // An external_account is read as a federation configuration, not as a key.
        let e = error_of(r#"{"type": "external_account", "audience": "//iam.googleapis.com/x"}"#).await;
        assert!(
            e.contains("external_account configuration") && e.contains("missing field"),
            "{e}"
        );

        let e = error_of(r#"{"type": "service_account", "private_key": "pk-secret-2"}"#).await;
        assert!(e.contains("service-account key") && !e.contains("pk-secret-2"), "{e}");
    }
}
