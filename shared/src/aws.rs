//! AWS adapters: starting the next invocation of a chain (Lambda async invoke) and reading the
//! secrets (Secrets Manager). Every endpoint is configuration so tests point them at 127.0.0.1.
//!
//! Secret values are returned to the caller and never logged or put into errors.

use async_trait::async_trait;
use aws_sdk_lambda::primitives::Blob;
use aws_sdk_lambda::types::InvocationType;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum AwsError {
    #[error("starting the next invocation of {function} failed: {message}")]
    Invoke { function: String, message: String },
    #[error("reading secret {secret} failed: {message}")]
    Secret { secret: String, message: String },
}

impl AwsError {
    pub fn code(&self) -> &'static str {
        match self {
            AwsError::Invoke { .. } => "aws_invoke",
            AwsError::Secret { .. } => "aws_secret",
        }
    }
}

/// Starts a function asynchronously with a small JSON event.
#[async_trait]
pub trait Invoker: Send + Sync {
    async fn invoke_async(&self, function: &str, event: &Value) -> Result<(), AwsError>;
}

/// The SDK config for this process: region and credentials from the environment, and an
/// optional endpoint (`AWS_ENDPOINT_URL` is honoured by the SDK itself too).
pub async fn sdk_config(endpoint: Option<&str>) -> aws_config::SdkConfig {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(url) = endpoint {
        loader = loader.endpoint_url(url);
    }
    loader.load().await
}

pub struct LambdaInvoker {
    client: aws_sdk_lambda::Client,
}

impl LambdaInvoker {
    pub fn new(cfg: &aws_config::SdkConfig) -> Self {
        LambdaInvoker {
            client: aws_sdk_lambda::Client::new(cfg),
        }
    }
}

#[async_trait]
impl Invoker for LambdaInvoker {
    async fn invoke_async(&self, function: &str, event: &Value) -> Result<(), AwsError> {
        let payload = serde_json::to_vec(event).map_err(|e| AwsError::Invoke {
            function: function.to_owned(),
            message: e.to_string(),
        })?;
        self.client
            .invoke()
            .function_name(function)
            .invocation_type(InvocationType::Event)
            .payload(Blob::new(payload))
            .send()
            .await
            .map_err(|e| AwsError::Invoke {
                function: function.to_owned(),
                message: aws_sdk_lambda::error::DisplayErrorContext(&e).to_string(),
            })?;
        Ok(())
    }
}

/// Reads secrets; each is fetched once per process by the caller and kept in memory.
pub struct Secrets {
    client: aws_sdk_secretsmanager::Client,
}

impl Secrets {
    pub fn new(cfg: &aws_config::SdkConfig) -> Self {
        Secrets {
            client: aws_sdk_secretsmanager::Client::new(cfg),
        }
    }

    /// The secret's text. A JSON object with one string field (e.g. `{"api_key": "…"}`) is
    /// accepted as the value of `field` when given.
    pub async fn get(&self, secret_id: &str, field: Option<&str>) -> Result<String, AwsError> {
        let err = |message: String| AwsError::Secret {
            secret: secret_id.to_owned(),
            message,
        };
        let out = self
            .client
            .get_secret_value()
            .secret_id(secret_id)
            .send()
            .await
            .map_err(|e| err(aws_sdk_secretsmanager::error::DisplayErrorContext(&e).to_string()))?;
        let text = out
            .secret_string()
            .ok_or_else(|| err("the secret has no text value".into()))?;
        if let (Some(field), Ok(Value::Object(obj))) = (field, serde_json::from_str::<Value>(text)) {
            if let Some(Value::String(v)) = obj.get(field) {
                return Ok(v.clone());
            }
            if obj.contains_key("type") && obj.contains_key("private_key") {
                // A service-account key is itself JSON: it is the value.
                return Ok(text.to_owned());
            }
            return Err(err(format!("the secret is JSON without a `{field}` text field")));
        }
        Ok(text.to_owned())
    }
}

/// An SDK config for a local stand-in of an AWS API (tests, a moto server): a fixed region,
/// placeholder credentials and the given endpoint.
pub fn local_sdk_config(endpoint: &str) -> aws_config::SdkConfig {
    use aws_sdk_lambda::config::{Credentials, Region, SharedCredentialsProvider};
    aws_config::SdkConfig::builder()
        .behavior_version(aws_config::BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(SharedCredentialsProvider::new(Credentials::new(
            "local", "local", None, None, "local",
        )))
        .endpoint_url(endpoint)
        .build()
}
