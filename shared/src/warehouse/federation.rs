//! Google workload identity federation from AWS: the function's own AWS role is exchanged for a
//! short-lived Google access token, so a deployment keeps no long-lived Google key.
//!
//! The configuration is the `external_account` JSON that
//! `gcloud iam workload-identity-pools create-cred-config --aws` writes. The exchange follows
//! Google's AWS credential source:
//! 1. a SigV4-signed AWS STS `GetCallerIdentity` request (not sent to AWS) becomes the subject
//!    token: URL-encoded JSON `{"url", "method", "headers": [{"key", "value"}, ...]}`;
//! 2. Google STS (`token_url`) exchanges it for a federated access token (RFC 8693);
//! 3. optionally, the IAM Credentials API (`service_account_impersonation_url`) turns that into a
//!    service account's access token.
//!
//! AWS credentials come from the default provider chain (on Lambda: the role's environment
//! variables), the region from `AWS_REGION` / `AWS_DEFAULT_REGION`. The metadata-server URLs of the
//! configuration are not used: the AWS SDK finds instance credentials by itself.
//!
//! Errors name the step, the HTTP status and Google's error code, never a key, token or signature.

use async_trait::async_trait;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use gcp_bigquery_client::auth::Authenticator;
use gcp_bigquery_client::error::BQError;
use gcp_bigquery_client::yup_oauth2::error::{AuthError, AuthErrorCode};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::Deserialize;
use serde_json::{json, Value};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::Mutex;

pub const EXTERNAL_ACCOUNT: &str = "external_account";
pub const AWS_SUBJECT_TOKEN_TYPE: &str = "urn:ietf:params:aws:token-type:aws4_request";
const TOKEN_EXCHANGE_GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
const BIGQUERY_SCOPE: &str = "https://www.googleapis.com/auth/bigquery";
/// The IAM Credentials API needs a caller token with this scope; the service account's own
/// token is then narrowed to BigQuery.
const CLOUD_PLATFORM_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";
const TARGET_RESOURCE_HEADER: &str = "x-goog-cloud-target-resource";
/// Refresh this long before expiry, so a token never expires in the middle of a request.
const REFRESH_MARGIN: Duration = Duration::from_secs(300);
const DEFAULT_LIFETIME_SECS: u64 = 3600;
/// RFC 3986 unreserved characters stay as they are; everything else is percent-encoded (spaces
/// as `%20`, since Google decodes the subject token as a URL component, not as a form).
const SUBJECT_TOKEN_ESCAPE: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

/// A failed step of the exchange. The text is safe to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FederationError {
    pub step: &'static str,
    /// The HTTP status of Google's answer, when there was one.
    pub status: Option<u16>,
    pub detail: String,
}

impl fmt::Display for FederationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "workload identity federation: {} failed", self.step)?;
        if let Some(s) = self.status {
            write!(f, " (HTTP {s})")?;
        }
        write!(f, ": {}", self.detail)
    }
}

impl std::error::Error for FederationError {}

fn fail(step: &'static str, detail: impl Into<String>) -> FederationError {
    FederationError {
        step,
        status: None,
        detail: detail.into(),
    }
}

const STEP_CONFIG: &str = "reading the external_account configuration";
const STEP_AWS: &str = "getting AWS credentials";
const STEP_SIGN: &str = "signing the AWS GetCallerIdentity request";
const STEP_STS: &str = "token exchange with Google STS";
const STEP_IMPERSONATE: &str = "service account impersonation";

/// The `external_account` credential configuration (fields this exchange uses; others, such as
/// `universe_domain` or `token_info_url`, are accepted and ignored).
#[derive(Clone, Deserialize)]
pub struct ExternalAccount {
    #[serde(rename = "type")]
    pub kind: String,
    /// The workload identity pool provider, e.g.
    /// `//iam.googleapis.com/projects/N/locations/global/workloadIdentityPools/P/providers/AWS`.
    pub audience: String,
    pub subject_token_type: String,
    pub token_url: String,
    #[serde(default)]
    pub service_account_impersonation_url: Option<String>,
    #[serde(default)]
    pub service_account_impersonation: Option<ImpersonationOptions>,
    pub credential_source: CredentialSource,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ImpersonationOptions {
    #[serde(default)]
    pub token_lifetime_seconds: Option<u64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct CredentialSource {
    #[serde(default)]
    pub environment_id: Option<String>,
    /// `https://sts.{region}.amazonaws.com?Action=GetCallerIdentity&Version=2011-06-15`
    #[serde(default)]
    pub regional_cred_verification_url: Option<String>,
    // Metadata-server URLs: read so that the configuration parses, unused (see the module docs).
    #[serde(default)]
    pub region_url: Option<String>,
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub imdsv2_session_token_url: Option<String>,
}

impl fmt::Debug for ExternalAccount {
    // Nothing here is a secret, but it stays short and stable in logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExternalAccount")
            .field("audience", &self.audience)
            .field("token_url", &self.token_url)
            .field("impersonation", &self.service_account_impersonation_url.is_some())
            .finish()
    }
}

impl ExternalAccount {
    /// Parses and checks a configuration; the error names the field, never echoes the text.
    pub fn from_json(text: &str) -> Result<Self, FederationError> {
        let acc: ExternalAccount = serde_json::from_str(text).map_err(|e| {
            // A missing field is named; other messages could quote a value, so only the place is.
            let what = e.to_string();
            let what = match what.split(" at line").next() {
                Some(m) if m.starts_with("missing field") => m.to_owned(),
                _ if e.is_data() => "a field has the wrong type".to_owned(),
                _ => "malformed JSON".to_owned(),
            };
            fail(
                STEP_CONFIG,
                format!(
                    "not a valid external_account configuration (line {}, column {}): {what}",
                    e.line(),
                    e.column()
                ),
            )
        })?;
        acc.validate()?;
        Ok(acc)
    }

    fn validate(&self) -> Result<(), FederationError> {
        if self.kind != EXTERNAL_ACCOUNT {
            return Err(fail(
                STEP_CONFIG,
                format!("type is `{}`, not `{EXTERNAL_ACCOUNT}`", self.kind),
            ));
        }
        if self.subject_token_type != AWS_SUBJECT_TOKEN_TYPE
            || self.credential_source.environment_id.as_deref() != Some("aws1")
        {
            return Err(fail(
                STEP_CONFIG,
                format!(
                    "only the AWS credential source is supported (subject_token_type `{AWS_SUBJECT_TOKEN_TYPE}`, \
                     environment_id `aws1`); create the configuration with `gcloud iam workload-identity-pools create-cred-config --aws`"
                ),
            ));
        }
        if self.audience.trim().is_empty() {
            return Err(fail(STEP_CONFIG, "audience is empty"));
        }
        let verify = self
            .credential_source
            .regional_cred_verification_url
            .as_deref()
            .ok_or_else(|| {
                fail(
                    STEP_CONFIG,
                    "credential_source.regional_cred_verification_url is missing",
                )
            })?;
        // The signed request is only replayed by Google against AWS, so it must name an https host.
        let url = reqwest::Url::parse(&verify.replace("{region}", "us-east-1")).map_err(|_| {
            fail(
                STEP_CONFIG,
                "credential_source.regional_cred_verification_url is not a URL",
            )
        })?;
        if url.scheme() != "https" || url.host_str().is_none() {
            return Err(fail(
                STEP_CONFIG,
                "credential_source.regional_cred_verification_url must be an https URL",
            ));
        }
        check_endpoint("token_url", &self.token_url)?;
        if let Some(u) = &self.service_account_impersonation_url {
            check_endpoint("service_account_impersonation_url", u)?;
        }
        Ok(())
    }

    fn lifetime_secs(&self) -> u64 {
        self.service_account_impersonation
            .as_ref()
            .and_then(|o| o.token_lifetime_seconds)
            .unwrap_or(DEFAULT_LIFETIME_SECS)
    }
}

/// The subject token is a replayable AWS signature: it goes only to https endpoints (plain http
/// only on loopback, for tests).
fn check_endpoint(field: &str, u: &str) -> Result<(), FederationError> {
    let url = reqwest::Url::parse(u).map_err(|_| fail(STEP_CONFIG, format!("{field} is not a URL")))?;
    let loopback = matches!(url.host_str(), Some("127.0.0.1" | "localhost" | "[::1]"));
    match url.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        _ => Err(fail(STEP_CONFIG, format!("{field} must be an https URL"))),
    }
}

/// Where the AWS identity comes from: a credentials provider and the region to sign for.
#[derive(Clone)]
pub struct AwsIdentity {
    pub credentials: SharedCredentialsProvider,
    pub region: String,
}

impl fmt::Debug for AwsIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsIdentity")
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl AwsIdentity {
    /// The running role: the AWS SDK's default credentials chain, the region from the environment.
    pub async fn from_environment() -> Result<Self, FederationError> {
        let region = ["AWS_REGION", "AWS_DEFAULT_REGION"]
            .iter()
            .find_map(|k| std::env::var(k).ok().filter(|v| !v.trim().is_empty()))
            .ok_or_else(|| fail(STEP_AWS, "the AWS region is unknown: set AWS_REGION"))?;
        let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(region.clone()))
            .load()
            .await;
        let credentials = sdk
            .credentials_provider()
            .ok_or_else(|| fail(STEP_AWS, "no AWS credentials provider is configured"))?;
        Ok(AwsIdentity { credentials, region })
    }
}

/// A Google access token obtained through workload identity federation, cached until shortly
/// before it expires. Clones share the cache.
#[derive(Clone)]
pub struct WorkloadIdentity {
    inner: Arc<Inner>,
}

struct Inner {
    account: ExternalAccount,
    aws: AwsIdentity,
    http: reqwest::Client,
    // Held across a refresh, so concurrent callers wait for one exchange instead of each starting one.
    cache: Mutex<Option<Cached>>,
}

struct Cached {
    token: String,
    refresh_at: Instant,
}

impl fmt::Debug for WorkloadIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadIdentity")
            .field("account", &self.inner.account)
            .field("aws", &self.inner.aws)
            .finish_non_exhaustive()
    }
}

impl WorkloadIdentity {
    pub fn new(account: ExternalAccount, aws: AwsIdentity, http: reqwest::Client) -> Result<Self, FederationError> {
        account.validate()?;
        Ok(WorkloadIdentity {
            inner: Arc::new(Inner {
                account,
                aws,
                http,
                cache: Mutex::new(None),
            }),
        })
    }

    /// A valid access token: the cached one, or a new one from the exchange.
    pub async fn token(&self) -> Result<String, FederationError> {
        let mut cache = self.inner.cache.lock().await;
        if let Some(c) = cache.as_ref().filter(|c| Instant::now() < c.refresh_at) {
            return Ok(c.token.clone());
        }
        let (token, lifetime) = self.inner.exchange().await?;
        // Refresh a few minutes early, or halfway through a short lifetime.
        let early = REFRESH_MARGIN.min(lifetime / 2);
        *cache = Some(Cached {
            token: token.clone(),
            refresh_at: Instant::now() + lifetime.saturating_sub(early),
        });
        Ok(token)
    }
}

#[async_trait]
impl Authenticator for WorkloadIdentity {
    async fn access_token(&self) -> Result<String, BQError> {
        // The client's error type has no free-text variant; an OAuth error with the whole message
        // as its code displays as "Authentication error (error: <message>)".
        self.token().await.map_err(|e| {
            BQError::AuthError(AuthError {
                error: AuthErrorCode::Other(e.to_string()),
                error_description: None,
                error_uri: None,
            })
        })
    }
}

#[derive(Deserialize)]
struct StsResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GenerateAccessTokenResponse {
    access_token: String,
    expire_time: String,
}

impl Inner {
    /// Runs the exchange; returns the token and how long it lives.
    async fn exchange(&self) -> Result<(String, Duration), FederationError> {
        let creds = self
            .aws
            .credentials
            .provide_credentials()
            .await
            .map_err(|e| fail(STEP_AWS, e.to_string()))?;
        let subject = subject_token(&self.account, &creds, &self.aws.region, SystemTime::now())?;
        // Masked in error text should a server echo them; the token carries the session token
        // percent-encoded, so that form is masked too.
        let mut secrets = vec![creds.secret_access_key().to_owned(), subject.clone()];
        if let Some(t) = creds.session_token() {
            secrets.push(t.to_owned());
            secrets.push(utf8_percent_encode(t, SUBJECT_TOKEN_ESCAPE).to_string());
        }

        let impersonate = self.account.service_account_impersonation_url.as_deref();
        let scope = if impersonate.is_some() {
            CLOUD_PLATFORM_SCOPE
        } else {
            BIGQUERY_SCOPE
        };
        let form = [
            ("grant_type", TOKEN_EXCHANGE_GRANT),
            ("audience", self.account.audience.as_str()),
            ("scope", scope),
            ("requested_token_type", ACCESS_TOKEN_TYPE),
            ("subject_token_type", self.account.subject_token_type.as_str()),
            ("subject_token", subject.as_str()),
        ];
        let resp = self
            .http
            .post(&self.account.token_url)
            .form(&form)
            .send()
            .await
            .map_err(|e| fail(STEP_STS, transport(&e)))?;
        let sts: StsResponse = read_json(resp, STEP_STS, &secrets).await?;
        let federated_lifetime = Duration::from_secs(sts.expires_in.unwrap_or(DEFAULT_LIFETIME_SECS));

        let Some(url) = impersonate else {
            return Ok((sts.access_token, federated_lifetime));
        };
        secrets.push(sts.access_token.clone());
        let body = json!({
            "scope": [BIGQUERY_SCOPE],
            "lifetime": format!("{}s", self.account.lifetime_secs()),
        });
        let resp = self
            .http
            .post(url)
            .bearer_auth(&sts.access_token)
            .json(&body)
            .send()
            .await
            .map_err(|e| fail(STEP_IMPERSONATE, transport(&e)))?;
        let sa: GenerateAccessTokenResponse = read_json(resp, STEP_IMPERSONATE, &secrets).await?;
        let expires = chrono::DateTime::parse_from_rfc3339(&sa.expire_time)
            .map_err(|_| fail(STEP_IMPERSONATE, "the response's expireTime is not an RFC 3339 time"))?;
        let lifetime = (expires.with_timezone(&chrono::Utc) - chrono::Utc::now())
            .to_std()
            .unwrap_or(Duration::ZERO);
        Ok((sa.access_token, lifetime))
    }
}

fn transport(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "could not connect".into()
    } else {
        "transport error".into()
    }
}

/// Reads a success body, or turns an error response into a message with Google's error code and
/// description (with any of `secrets` masked, should a server echo one).
async fn read_json<T: serde::de::DeserializeOwned>(
    resp: reqwest::Response,
    step: &'static str,
    secrets: &[String],
) -> Result<T, FederationError> {
    let status = resp.status();
    let text = resp.text().await.map_err(|e| fail(step, transport(&e)))?;
    if !status.is_success() {
        return Err(FederationError {
            step,
            status: Some(status.as_u16()),
            detail: redact(&google_error(&text), secrets),
        });
    }
    serde_json::from_str(&text).map_err(|_| FederationError {
        step,
        status: Some(status.as_u16()),
        detail: "the response is not the expected JSON".into(),
    })
}

/// Google STS answers errors in OAuth form (`{"error": "invalid_grant", "error_description"}`),
/// the IAM Credentials API in Google API form (`{"error": {"code", "message", "status"}}`).
fn google_error(text: &str) -> String {
    let v: Value = serde_json::from_str(text).unwrap_or(Value::Null);
    let short = |s: &str| s.chars().take(500).collect::<String>();
    match &v["error"] {
        Value::String(code) => match v["error_description"].as_str() {
            Some(d) => format!("{code}: {}", short(d)),
            None => code.clone(),
        },
        Value::Object(e) => {
            let status = e.get("status").and_then(Value::as_str).unwrap_or("error");
            match e.get("message").and_then(Value::as_str) {
                Some(m) => format!("{status}: {}", short(m)),
                None => status.to_owned(),
            }
        }
        _ => "no error details in the response".into(),
    }
}

fn redact(text: &str, secrets: &[String]) -> String {
    let mut longest_first: Vec<&String> = secrets.iter().filter(|s| s.len() >= 8).collect();
    longest_first.sort_by_key(|s| std::cmp::Reverse(s.len()));
    longest_first
        .into_iter()
        .fold(text.to_owned(), |t, s| t.replace(s.as_str(), "***"))
}

/// The subject token: a SigV4-signed `POST` to AWS STS `GetCallerIdentity` at the regional
/// verification URL, serialised as Google's AWS credential source specifies. The target-resource
/// header (the audience) is signed too, binding the signature to this provider.
pub fn subject_token(
    account: &ExternalAccount,
    creds: &aws_credential_types::Credentials,
    region: &str,
    now: SystemTime,
) -> Result<String, FederationError> {
    use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};

    let template = account
        .credential_source
        .regional_cred_verification_url
        .as_deref()
        .ok_or_else(|| {
            fail(
                STEP_CONFIG,
                "credential_source.regional_cred_verification_url is missing",
            )
        })?;
    let url = template.replace("{region}", region);
    let host = reqwest::Url::parse(&url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
        .ok_or_else(|| fail(STEP_SIGN, "the verification URL has no host"))?;

    let identity = creds.clone().into();
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name("sts")
        .time(now)
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| fail(STEP_SIGN, e.to_string()))?
        .into();
    let unsigned = [
        ("host", host.as_str()),
        (TARGET_RESOURCE_HEADER, account.audience.as_str()),
    ];
    let request = SignableRequest::new("POST", url.as_str(), unsigned.into_iter(), SignableBody::Bytes(&[]))
        .map_err(|_| fail(STEP_SIGN, "the verification URL cannot be signed"))?;
    let (instructions, _signature) = sign(request, &params)
        .map_err(|_| fail(STEP_SIGN, "the request could not be signed"))?
        .into_parts();

    // The signer returns what it adds (authorization, x-amz-date, x-amz-security-token); the
    // token lists those with the headers that were signed alongside them.
    let mut headers: Vec<(String, String)> = unsigned
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    headers.extend(instructions.headers().map(|(k, v)| (k.to_owned(), v.to_owned())));
    headers.sort();
    let token = json!({
        "url": url,
        "method": "POST",
        "headers": headers.iter().map(|(k, v)| json!({"key": k, "value": v})).collect::<Vec<_>>(),
    });
    Ok(utf8_percent_encode(&token.to_string(), SUBJECT_TOKEN_ESCAPE).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `gcloud iam workload-identity-pools create-cred-config --aws --service-account=...`
    /// writes.
    const GCLOUD_AWS: &str = r#"{
      "universe_domain": "googleapis.com",
      "type": "external_account",
      "audience": "//iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/lever-sync/providers/aws",
      "subject_token_type": "urn:ietf:params:aws:token-type:aws4_request",
      "token_url": "https://sts.googleapis.com/v1/token",
      "credential_source": {
        "environment_id": "aws1",
        "region_url": "http://169.254.169.254/latest/meta-data/placement/availability-zone",
        "url": "http://169.254.169.254/latest/meta-data/iam/security-credentials",
        "regional_cred_verification_url": "https://sts.{region}.amazonaws.com?Action=GetCallerIdentity&Version=2011-06-15"
      },
      "service_account_impersonation_url": "https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/lever-sync@p.iam.gserviceaccount.com:generateAccessToken",
      "token_info_url": "https://sts.googleapis.com/v1/introspect"
    }"#;

    fn decode(token: &str) -> Value {
        let json = percent_encoding::percent_decode_str(token)
            .decode_utf8()
            .expect("utf-8");
        serde_json::from_str(&json).expect("json")
    }

    fn header<'a>(token: &'a Value, key: &str) -> Option<&'a str> {
        token["headers"]
            .as_array()
            .expect("headers")
            .iter()
            .find(|h| h["key"] == key)
            .and_then(|h| h["value"].as_str())
    }

    #[test]
    fn parses_the_gcloud_aws_configuration() {
        let acc = ExternalAccount::from_json(GCLOUD_AWS).expect("valid");
        assert!(acc.service_account_impersonation_url.is_some());
        assert_eq!(acc.lifetime_secs(), 3600);
    }

    #[test]
    fn refuses_other_credential_sources_and_plain_http() {
        let oidc = GCLOUD_AWS
            .replace(AWS_SUBJECT_TOKEN_TYPE, "urn:ietf:params:oauth:token-type:jwt")
            .replace("aws1", "");
        let e = ExternalAccount::from_json(&oidc).expect_err("not aws");
        assert!(e.to_string().contains("only the AWS credential source"), "{e}");

        let http = GCLOUD_AWS.replace("https://sts.googleapis.com/v1/token", "http://sts.example.com/v1/token");
        let e = ExternalAccount::from_json(&http).expect_err("plain http");
        assert!(e.to_string().contains("token_url must be an https URL"), "{e}");

        let local = GCLOUD_AWS.replace("https://sts.googleapis.com/v1/token", "http://127.0.0.1:9/v1/token");
        assert!(ExternalAccount::from_json(&local).is_ok());

        let e = ExternalAccount::from_json(r#"{"type": "external_account"}"#).expect_err("fields missing");
        assert!(e.to_string().contains("missing field `audience`"), "{e}");
    }

    #[test]
    fn subject_token_is_a_signed_get_caller_identity_request() {
        let acc = ExternalAccount::from_json(GCLOUD_AWS).expect("valid");
        let creds =
            aws_credential_types::Credentials::new("AKIDEXAMPLE", "secret-key", Some("session".into()), None, "t");
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000); // 2023-11-14T22:13:20Z
        let raw = subject_token(&acc, &creds, "eu-west-1", now).expect("token");
        assert!(!raw.contains(' ') && !raw.contains('{'), "percent-encoded: {raw}");
        let t = decode(&raw);
        assert_eq!(
            t["url"],
            "https://sts.eu-west-1.amazonaws.com?Action=GetCallerIdentity&Version=2011-06-15"
        );
        assert_eq!(t["method"], "POST");
        assert_eq!(header(&t, "host"), Some("sts.eu-west-1.amazonaws.com"));
        assert_eq!(header(&t, "x-amz-date"), Some("20231114T221320Z"));
        assert_eq!(header(&t, "x-amz-security-token"), Some("session"));
        assert_eq!(header(&t, TARGET_RESOURCE_HEADER), Some(acc.audience.as_str()));
        let auth = header(&t, "authorization").expect("authorization");
        assert!(
            auth.starts_with(
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20231114/eu-west-1/sts/aws4_request, \
                 SignedHeaders=host;x-amz-date;x-amz-security-token;x-goog-cloud-target-resource, Signature="
            ),
            "{auth}"
        );
        assert!(!raw.contains("secret-key"));
    }

    #[test]
    fn google_errors_are_summarised_and_secrets_masked() {
        assert_eq!(
            google_error(r#"{"error":"invalid_grant","error_description":"bad token sekrit-123"}"#),
            "invalid_grant: bad token sekrit-123"
        );
        assert_eq!(
            google_error(r#"{"error":{"code":403,"message":"Permission denied","status":"PERMISSION_DENIED"}}"#),
            "PERMISSION_DENIED: Permission denied"
        );
        assert_eq!(google_error("<html>"), "no error details in the response");
        assert_eq!(redact("bad token sekrit-123", &["sekrit-123".into()]), "bad token ***");
        let session = "abc/def+ghi=";
        let encoded = utf8_percent_encode(session, SUBJECT_TOKEN_ESCAPE).to_string();
        let echo = format!("token {session} or {encoded} or a subject x{encoded}x");
        let subject = format!("x{encoded}x");
        assert_eq!(
            redact(&echo, &[session.into(), encoded.clone(), subject]),
            "token *** or *** or a subject ***"
        );
        let e = FederationError {
            step: STEP_STS,
            status: Some(400),
            detail: "invalid_grant: x".into(),
        };
        assert_eq!(
            e.to_string(),
            "workload identity federation: token exchange with Google STS failed (HTTP 400): invalid_grant: x"
        );
    }
}
