//! Workload identity federation from AWS against a fake Google STS, IAM Credentials API and
//! BigQuery endpoint on loopback. The fake checks what Google checks that can be checked offline,
//! including the SigV4 signature of the subject token, recomputed here from the known secret.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use aws_credential_types::provider::SharedCredentialsProvider;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use gcp_bigquery_client::auth::Authenticator;
use lever_sync::warehouse::federation::{AwsIdentity, ExternalAccount, WorkloadIdentity};
use lever_sync::warehouse::{Credentials, Warehouse, WarehouseConfig};
use ring::{digest, hmac};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const AKID: &str = "AKIDFAKEFEDERATION";
const SECRET: &str = "fake/secret+access+key+0123456789abcdef";
const SESSION: &str = "FAKE-session-token-FwoGZXIvYXdzEJr";
const REGION: &str = "eu-west-1";
const AUDIENCE: &str =
    "//iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/lever-sync/providers/aws";
const SA_PATH: &str = "/v1/projects/-/serviceAccounts/lever-sync@p.iam.gserviceaccount.com:generateAccessToken";
const BIGQUERY: &str = "https://www.googleapis.com/auth/bigquery";
const CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";

#[derive(Default)]
struct FakeState {
    impersonation: bool,
    expires_in: u64,
    /// Answer STS with this status and body instead of a token.
    sts_error: Option<(u16, Value)>,
    iam_error: Option<(u16, Value)>,
    sts_calls: u32,
    iam_calls: u32,
    last_sts_token: Option<String>,
    iam_bearers: Vec<String>,
    bigquery_auth: Vec<String>,
}

#[derive(Clone)]
struct Fake {
    url: String,
    state: Arc<Mutex<FakeState>>,
}

impl Fake {
    async fn start(impersonation: bool, expires_in: u64) -> Fake {
        let state = Arc::new(Mutex::new(FakeState {
            impersonation,
            expires_in,
            ..Default::default()
        }));
        let app = Router::new().fallback(route).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Fake { url, state }
    }

    /// The configuration `gcloud ... create-cred-config --aws` writes, pointed at this fake.
    fn config(&self) -> String {
        let mut c = json!({
            "universe_domain": "googleapis.com",
            "type": "external_account",
            "audience": AUDIENCE,
            "subject_token_type": "urn:ietf:params:aws:token-type:aws4_request",
            "token_url": format!("{}/v1/token", self.url),
            "credential_source": {
                "environment_id": "aws1",
                "region_url": "http://169.254.169.254/latest/meta-data/placement/availability-zone",
                "url": "http://169.254.169.254/latest/meta-data/iam/security-credentials",
                "regional_cred_verification_url": "https://sts.{region}.amazonaws.com?Action=GetCallerIdentity&Version=2011-06-15"
            },
            "token_info_url": format!("{}/v1/introspect", self.url),
        });
        if self.state.lock().unwrap().impersonation {
            c["service_account_impersonation_url"] = json!(format!("{}{SA_PATH}", self.url));
        }
        c.to_string()
    }

    fn auth(&self) -> WorkloadIdentity {
        let creds = aws_credential_types::Credentials::new(AKID, SECRET, Some(SESSION.into()), None, "test");
        let aws = AwsIdentity {
            credentials: SharedCredentialsProvider::new(creds),
            region: REGION.into(),
        };
        let account = ExternalAccount::from_json(&self.config()).unwrap();
        WorkloadIdentity::new(account, aws, reqwest::Client::new()).unwrap()
    }

    fn with<T>(&self, f: impl FnOnce(&mut FakeState) -> T) -> T {
        f(&mut self.state.lock().unwrap())
    }
}

type Shared = Arc<Mutex<FakeState>>;

async fn route(State(s): State<Shared>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let path = uri.path();
    match (method, path) {
        (Method::POST, "/v1/token") => sts(&s, &headers, &body),
        (Method::POST, SA_PATH) => iam(&s, &headers, &body),
        (Method::GET, p) if p.starts_with("/bigquery/v2/") => {
            let auth = header(&headers, "authorization").unwrap_or_default();
            s.lock().unwrap().bigquery_auth.push(auth);
            let e = json!({"error": {"code": 404, "message": "Not found: Dataset p:d", "errors": [], "status": "NOT_FOUND"}});
            (StatusCode::NOT_FOUND, Json(e)).into_response()
        }
        _ => (StatusCode::NOT_FOUND, "no such route").into_response(),
    }
}

fn header(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

/// An OAuth error naming what the fake found wrong, so the test's failure says it.
fn refuse(what: String) -> Response {
    let e = json!({"error": "invalid_request", "error_description": format!("fake STS: {what}")});
    (StatusCode::BAD_REQUEST, Json(e)).into_response()
}

fn sts(s: &Shared, headers: &HeaderMap, body: &[u8]) -> Response {
    let form: HashMap<String, String> = form_urlencoded::parse(body).into_owned().collect();
    let (impersonation, expires_in, error) = {
        let mut st = s.lock().unwrap();
        st.sts_calls += 1;
        (st.impersonation, st.expires_in, st.sts_error.clone())
    };
    if let Err(what) = check_sts_request(headers, &form, impersonation) {
        return refuse(what);
    }
    if let Some((status, body)) = error {
        return (StatusCode::from_u16(status).unwrap(), Json(body)).into_response();
    }
    let token = format!("sts-token-{}", s.lock().unwrap().sts_calls);
    s.lock().unwrap().last_sts_token = Some(token.clone());
    Json(json!({
        "access_token": token,
        "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
        "token_type": "Bearer",
        "expires_in": expires_in,
    }))
    .into_response()
}

fn check_sts_request(headers: &HeaderMap, form: &HashMap<String, String>, impersonation: bool) -> Result<(), String> {
    let field = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
    let expect = |k: &str, v: &str| {
        if field(k) == v {
            Ok(())
        } else {
            Err(format!("{k} is `{}`, expected `{v}`", field(k)))
        }
    };
    if !header(headers, "content-type").is_some_and(|c| c.starts_with("application/x-www-form-urlencoded")) {
        return Err("the body is not form-encoded".into());
    }
    // Google's STS documentation: do not send an Authorization header to this method.
    if headers.contains_key("authorization") {
        return Err("an Authorization header was sent".into());
    }
    expect("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange")?;
    expect("requested_token_type", "urn:ietf:params:oauth:token-type:access_token")?;
    expect("subject_token_type", "urn:ietf:params:aws:token-type:aws4_request")?;
    expect("audience", AUDIENCE)?;
    expect("scope", if impersonation { CLOUD_PLATFORM } else { BIGQUERY })?;
    check_subject_token(field("subject_token"))
}

/// The subject token decodes to a signed GetCallerIdentity request whose signature is right.
fn check_subject_token(raw: &str) -> Result<(), String> {
    let text = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| "the subject token is not percent-encoded UTF-8")?;
    let token: Value = serde_json::from_str(&text).map_err(|_| "the subject token is not JSON")?;
    let url = format!("https://sts.{REGION}.amazonaws.com?Action=GetCallerIdentity&Version=2011-06-15");
    if token["url"] != json!(url) || token["method"] != json!("POST") {
        return Err(format!(
            "subject token url/method: {} {}",
            token["method"], token["url"]
        ));
    }
    let mut headers = HashMap::new();
    for h in token["headers"].as_array().ok_or("subject token has no headers list")? {
        let (Some(k), Some(v)) = (h["key"].as_str(), h["value"].as_str()) else {
            return Err(format!("a header is not {{key, value}}: {h}"));
        };
        headers.insert(k.to_ascii_lowercase(), v.to_owned());
    }
    let get = |k: &str| headers.get(k).cloned().ok_or(format!("subject token lacks {k}"));
    if get("x-goog-cloud-target-resource")? != AUDIENCE {
        return Err("x-goog-cloud-target-resource is not the audience".into());
    }
    if get("host")? != format!("sts.{REGION}.amazonaws.com") {
        return Err("host is not the regional STS host".into());
    }
    if get("x-amz-security-token")? != SESSION {
        return Err("x-amz-security-token is not the session token".into());
    }
    let amz_date = get("x-amz-date")?;
    let signed_at = chrono::NaiveDateTime::parse_from_str(&amz_date, "%Y%m%dT%H%M%SZ")
        .map_err(|_| format!("x-amz-date `{amz_date}` is not yyyymmddThhmmssZ"))?
        .and_utc();
    if (chrono::Utc::now() - signed_at).num_seconds().abs() > 300 {
        return Err("x-amz-date is not now".into());
    }
    let date = &amz_date[..8];

    // AWS4-HMAC-SHA256 Credential=AKID/<date>/<region>/sts/aws4_request, SignedHeaders=..., Signature=...
    let auth = get("authorization")?;
    let prefix = format!("AWS4-HMAC-SHA256 Credential={AKID}/{date}/{REGION}/sts/aws4_request, SignedHeaders=");
    let rest = auth
        .strip_prefix(&prefix)
        .ok_or(format!("authorization header: {auth}"))?;
    let (signed, signature) = rest
        .split_once(", Signature=")
        .ok_or("authorization header has no signature")?;
    let signed_list: Vec<&str> = signed.split(';').collect();
    for required in [
        "host",
        "x-amz-date",
        "x-amz-security-token",
        "x-goog-cloud-target-resource",
    ] {
        if !signed_list.contains(&required) {
            return Err(format!("{required} is not signed (SignedHeaders={signed})"));
        }
    }

    // SigV4, recomputed: canonical request, string to sign, derived key, HMAC.
    let mut canonical_headers = String::new();
    for h in &signed_list {
        canonical_headers.push_str(&format!("{h}:{}\n", get(h)?.trim()));
    }
    let canonical = format!(
        "POST\n/\nAction=GetCallerIdentity&Version=2011-06-15\n{canonical_headers}\n{signed}\n{}",
        hex(digest::digest(&digest::SHA256, b"").as_ref())
    );
    let scope = format!("{date}/{REGION}/sts/aws4_request");
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex(digest::digest(&digest::SHA256, canonical.as_bytes()).as_ref())
    );
    let mut key = format!("AWS4{SECRET}").into_bytes();
    for part in [date, REGION, "sts", "aws4_request"] {
        key = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &key), part.as_bytes())
            .as_ref()
            .to_vec();
    }
    let expected = hex(hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &key), to_sign.as_bytes()).as_ref());
    if signature != expected {
        return Err("the SigV4 signature does not verify".into());
    }
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn iam(s: &Shared, headers: &HeaderMap, body: &[u8]) -> Response {
    let (expires_in, error, sts_token) = {
        let mut st = s.lock().unwrap();
        st.iam_calls += 1;
        st.iam_bearers
            .push(header(headers, "authorization").unwrap_or_default());
        (st.expires_in, st.iam_error.clone(), st.last_sts_token.clone())
    };
    let google = |code: u16, message: String, status: &str| {
        let e = json!({"error": {"code": code, "message": message, "status": status}});
        (StatusCode::from_u16(code).unwrap(), Json(e)).into_response()
    };
    if header(headers, "authorization") != sts_token.map(|t| format!("Bearer {t}")) {
        return google(401, "fake IAM: not the STS token as bearer".into(), "UNAUTHENTICATED");
    }
    let req: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    if req != json!({"scope": [BIGQUERY], "lifetime": "3600s"}) {
        return google(400, format!("fake IAM: unexpected request {req}"), "INVALID_ARGUMENT");
    }
    if let Some((status, body)) = error {
        return (StatusCode::from_u16(status).unwrap(), Json(body)).into_response();
    }
    let n = s.lock().unwrap().iam_calls;
    let expire = chrono::Utc::now() + chrono::Duration::seconds(expires_in as i64);
    Json(json!({
        "accessToken": format!("sa-token-{n}"),
        "expireTime": expire.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    }))
    .into_response()
}

#[tokio::test]
async fn without_impersonation_the_sts_token_is_the_access_token() {
    let fake = Fake::start(false, 3600).await;
    let token = fake.auth().token().await.unwrap();
    assert_eq!(token, "sts-token-1");
    assert_eq!(fake.with(|s| (s.sts_calls, s.iam_calls)), (1, 0));
}

#[tokio::test]
async fn with_impersonation_the_sts_token_buys_a_service_account_token() {
    let fake = Fake::start(true, 3600).await;
    let token = fake.auth().token().await.unwrap();
    assert_eq!(token, "sa-token-1");
    assert_eq!(fake.with(|s| (s.sts_calls, s.iam_calls)), (1, 1));
    assert_eq!(
        fake.with(|s| s.iam_bearers.clone()),
        vec!["Bearer sts-token-1".to_owned()]
    );
}

#[tokio::test]
async fn the_token_is_cached_and_concurrent_callers_share_one_exchange() {
    let fake = Fake::start(true, 3600).await;
    let auth = fake.auth();
    let tokens = futures::future::join_all((0..5).map(|_| {
        let a = auth.clone();
        async move { a.token().await.unwrap() }
    }))
    .await;
    assert!(tokens.iter().all(|t| t == "sa-token-1"), "{tokens:?}");
    assert_eq!(auth.access_token().await.unwrap(), "sa-token-1");
    assert_eq!(fake.with(|s| (s.sts_calls, s.iam_calls)), (1, 1));
}

#[tokio::test]
async fn the_token_is_refreshed_before_it_expires() {
    for impersonation in [false, true] {
        // A 2-second token is refreshed after half its life.
        let fake = Fake::start(impersonation, 2).await;
        let auth = fake.auth();
        let first = auth.token().await.unwrap();
        assert_eq!(auth.token().await.unwrap(), first, "still fresh");
        assert_eq!(fake.with(|s| s.sts_calls), 1);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let second = auth.token().await.unwrap();
        assert_ne!(second, first);
        assert_eq!(fake.with(|s| s.sts_calls), 2);
        if impersonation {
            assert_eq!(
                fake.with(|s| s.iam_bearers.last().cloned()).unwrap(),
                "Bearer sts-token-2"
            );
        }
    }
}

#[tokio::test]
async fn a_refused_exchange_is_a_clear_error_without_secrets() {
    let fake = Fake::start(true, 3600).await;
    // A server that echoes the session token back must not get it into the error.
    fake.with(|s| {
        s.sts_error = Some((
            400,
            json!({"error": "invalid_grant", "error_description": format!("The session token {SESSION} is invalid.")}),
        ))
    });
    let auth = fake.auth();
    let err = auth.token().await.unwrap_err().to_string();
    assert!(
        err.contains("token exchange with Google STS") && err.contains("HTTP 400") && err.contains("invalid_grant"),
        "{err}"
    );
    let through_client = auth.access_token().await.unwrap_err().to_string();
    assert!(through_client.contains("invalid_grant"), "{through_client}");
    for text in [&err, &through_client, &format!("{auth:?}")] {
        for secret in [SECRET, SESSION, "Signature=", "AWS4-HMAC-SHA256"] {
            assert!(!text.contains(secret), "`{secret}` leaked into: {text}");
        }
    }
    assert_eq!(fake.with(|s| s.iam_calls), 0);

    // A refusal at the impersonation step names that step and Google's status.
    fake.with(|s| {
        s.sts_error = None;
        s.iam_error = Some((
            403,
            json!({"error": {"code": 403, "message": "Permission 'iam.serviceAccounts.getAccessToken' denied", "status": "PERMISSION_DENIED"}}),
        ));
    });
    let err = auth.token().await.unwrap_err().to_string();
    assert!(
        err.contains("service account impersonation failed (HTTP 403): PERMISSION_DENIED"),
        "{err}"
    );
    assert!(!err.contains("sts-token"), "{err}");
}

#[tokio::test]
async fn bigquery_requests_carry_the_federated_token() {
    let fake = Fake::start(true, 3600).await;
    // The default AWS chain reads the role's credentials from these, as on Lambda.
    for (k, v) in [
        ("AWS_ACCESS_KEY_ID", AKID),
        ("AWS_SECRET_ACCESS_KEY", SECRET),
        ("AWS_SESSION_TOKEN", SESSION),
        ("AWS_REGION", REGION),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ] {
        std::env::set_var(k, v);
    }
    let cfg = WarehouseConfig {
        project: "p".into(),
        dataset: "d".into(),
        location: None,
        api_url: fake.url.clone(),
        credentials: Credentials::ServiceAccountJson(fake.config()),
    };
    let wh = Warehouse::connect(&cfg).await.unwrap();
    assert!(!wh.dataset_exists().await.unwrap());
    assert!(!wh.dataset_exists().await.unwrap());
    assert_eq!(
        fake.with(|s| s.bigquery_auth.clone()),
        vec!["Bearer sa-token-1".to_owned(), "Bearer sa-token-1".to_owned()]
    );
    assert_eq!(fake.with(|s| (s.sts_calls, s.iam_calls)), (1, 1));
}
