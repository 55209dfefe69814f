//! Where the BigQuery access token comes from: a service-account key (file or JSON text), the
//! application-default credentials, or a fixed placeholder token for the local emulator.

use super::WarehouseError;
use async_trait::async_trait;
use gcp_bigquery_client::auth::Authenticator;
use gcp_bigquery_client::error::BQError;
use gcp_bigquery_client::yup_oauth2;
use std::fmt;
use std::sync::Arc;

const SCOPE: &str = "https://www.googleapis.com/auth/bigquery";

#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// A service-account key file on disk.
    ServiceAccountFile(String),
    /// A service-account key as JSON text (e.g. read from a secret store).
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

async fn from_json(text: &str) -> Result<Arc<dyn Authenticator>, WarehouseError> {
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
