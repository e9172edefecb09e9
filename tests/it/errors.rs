//! Every Matrix error the foundation promises, produced by a real request.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::common::{TestServer, assert_error};

#[tokio::test]
async fn unknown_endpoints_and_methods() {
    let s = TestServer::start().await;
    assert_error(
        &s.get("/_matrix/client/v3/nonexistent", None).await,
        StatusCode::NOT_FOUND,
        "M_UNRECOGNIZED",
    );
    assert_error(&s.get("/nothing/here", None).await, StatusCode::NOT_FOUND, "M_UNRECOGNIZED");
    // Without `public_baseurl` / `federation_endpoint` there is nothing to advertise.
    assert_error(
        &s.get("/.well-known/matrix/client", None).await,
        StatusCode::NOT_FOUND,
        "M_NOT_FOUND",
    );
    assert_error(
        &s.get("/.well-known/matrix/server", None).await,
        StatusCode::NOT_FOUND,
        "M_NOT_FOUND",
    );
    assert_error(
        &s.get("/.well-known/matrix/support", None).await,
        StatusCode::NOT_FOUND,
        "M_NOT_FOUND",
    );
    let wrong_method = s.call(Method::DELETE, "/_matrix/client/v3/login", None, None).await;
    assert_error(&wrong_method, StatusCode::METHOD_NOT_ALLOWED, "M_UNRECOGNIZED");
}

#[tokio::test]
async fn bad_bodies() {
    let s = TestServer::start().await;
    let not_json = s
        .http
        .post(format!("{}/_matrix/client/v3/login", s.base))
        .body("this is not json")
        .send()
        .await
        .unwrap();
    assert_eq!(not_json.status(), StatusCode::BAD_REQUEST);
    let body: serde_json::Value = not_json.json().await.unwrap();
    assert_eq!(body["errcode"], "M_NOT_JSON");

    let bad = s.post("/_matrix/client/v3/login", None, json!({ "type": 5 })).await;
    assert_error(&bad, StatusCode::BAD_REQUEST, "M_BAD_JSON");
    let bad_path = s.get("/_matrix/client/v3/profile/not-a-user-id", None).await;
    assert_error(&bad_path, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
}

#[tokio::test]
async fn too_large() {
    let s = TestServer::start_with(|c| c.limits.max_request_bytes = 2048).await;
    let big = json!({ "type": "m.login.password", "password": "x".repeat(10_000) });
    assert_error(
        &s.post("/_matrix/client/v3/login", None, big).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "M_TOO_LARGE",
    );
}

#[tokio::test]
async fn token_errors() {
    let s = TestServer::start_with(|c| c.registration.access_token_ttl_secs = 1).await;
    assert_error(
        &s.get("/_matrix/client/v3/account/whoami", None).await,
        StatusCode::UNAUTHORIZED,
        "M_MISSING_TOKEN",
    );
    let unknown = s.get("/_matrix/client/v3/account/whoami", Some("nope")).await;
    assert_error(&unknown, StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN");
    assert_eq!(unknown.1["soft_logout"], false);

    // A refreshable session's token expires: soft logout, then refresh brings it back.
    let (status, body) = s
        .post(
            "/_matrix/client/v3/register",
            None,
            json!({ "username": "rita", "password": "long enough pw", "refresh_token": true, "auth": { "type": "m.login.dummy" } }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["expires_in_ms"], 1000);
    let token = body["access_token"].as_str().unwrap().to_owned();
    let refresh = body["refresh_token"].as_str().unwrap().to_owned();
    assert_eq!(s.get("/_matrix/client/v3/account/whoami", Some(&token)).await.0, StatusCode::OK);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let expired = s.get("/_matrix/client/v3/account/whoami", Some(&token)).await;
    assert_error(&expired, StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN");
    assert_eq!(expired.1["soft_logout"], true);

    let refresh_with = |token: String| {
        let s = &s;
        async move {
            s.post("/_matrix/client/v3/refresh", None, json!({ "refresh_token": token })).await
        }
    };
    let (status, lost) = refresh_with(refresh.clone()).await;
    assert_eq!(status, StatusCode::OK, "{lost}");
    // The response was "lost": retrying with the old refresh token still works once more.
    let (status, refreshed) = refresh_with(refresh.clone()).await;
    assert_eq!(status, StatusCode::OK, "{refreshed}");
    let discarded = lost["access_token"].as_str().unwrap();
    assert_eq!(
        s.get("/_matrix/client/v3/account/whoami", Some(discarded)).await.0,
        StatusCode::UNAUTHORIZED
    );
    let new_token = refreshed["access_token"].as_str().unwrap();
    assert_eq!(s.get("/_matrix/client/v3/account/whoami", Some(new_token)).await.0, StatusCode::OK);
    // The old refresh token is spent.
    let reused =
        s.post("/_matrix/client/v3/refresh", None, json!({ "refresh_token": refresh })).await;
    assert_error(&reused, StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN");

    // The token also works as a query parameter.
    let by_query =
        s.get(&format!("/_matrix/client/v3/account/whoami?access_token={new_token}"), None).await;
    assert_eq!(by_query.0, StatusCode::OK, "{}", by_query.1);
}

#[tokio::test]
async fn account_errors() {
    let s = TestServer::start().await;
    s.register("alice", "correct horse").await;
    let login = s.login("alice", "wrong password").await;
    assert_error(&login, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let unknown_user = s.login("nobody", "whatever pw").await;
    assert_error(&unknown_user, StatusCode::FORBIDDEN, "M_FORBIDDEN");

    let register = |name: &str, password: &str| json!({ "username": name, "password": password, "auth": { "type": "m.login.dummy" } });
    let taken =
        s.post("/_matrix/client/v3/register", None, register("alice", "long enough pw")).await;
    assert_error(&taken, StatusCode::BAD_REQUEST, "M_USER_IN_USE");
    let invalid =
        s.post("/_matrix/client/v3/register", None, register("bad name!", "long enough pw")).await;
    assert_error(&invalid, StatusCode::BAD_REQUEST, "M_INVALID_USERNAME");
    let weak = s.post("/_matrix/client/v3/register", None, register("bob", "short")).await;
    assert_error(&weak, StatusCode::BAD_REQUEST, "M_WEAK_PASSWORD");
    let available = s.get("/_matrix/client/v3/register/available?username=alice", None).await;
    assert_error(&available, StatusCode::BAD_REQUEST, "M_USER_IN_USE");
    let guest = s.post("/_matrix/client/v3/register?kind=guest", None, json!({})).await;
    assert_error(&guest, StatusCode::FORBIDDEN, "M_GUEST_ACCESS_FORBIDDEN");
}

#[tokio::test]
async fn registration_disabled_by_default() {
    let s =
        TestServer::start_with(|c| c.registration.mode = plaza::config::RegistrationMode::Disabled)
            .await;
    // Once the first admin exists, registration is closed.
    let token = s.server().services().registration.first_admin_token().unwrap().unwrap();
    let (status, body) = s
        .post(
            "/_matrix/client/v3/register",
            None,
            json!({ "username": "boss", "password": "long enough pw", "auth": { "type": "m.login.registration_token", "token": token } }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let closed = s
        .post(
            "/_matrix/client/v3/register",
            None,
            json!({ "username": "eve", "password": "long enough pw" }),
        )
        .await;
    assert_error(&closed, StatusCode::FORBIDDEN, "M_FORBIDDEN");
}

#[tokio::test]
async fn rate_limited() {
    let s = TestServer::start_with(|c| {
        c.limits.rate_per_second = 1;
        c.limits.rate_burst = 2;
    })
    .await;
    let mut last = None;
    for _ in 0..4 {
        last = Some(s.login("nobody", "whatever pw").await);
    }
    let last = last.unwrap();
    assert_error(&last, StatusCode::TOO_MANY_REQUESTS, "M_LIMIT_EXCEEDED");
    assert!(last.1["retry_after_ms"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn cors_preflight_and_headers() {
    let s = TestServer::start().await;
    let response = s
        .http
        .request(Method::OPTIONS, format!("{}/_matrix/client/v3/login", s.base))
        .header("Origin", "https://app.element.io")
        .header("Access-Control-Request-Method", "POST")
        .header("Access-Control-Request-Headers", "authorization,content-type")
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success());
    let headers = response.headers();
    assert_eq!(headers["access-control-allow-origin"], "*");
    let methods = headers["access-control-allow-methods"].to_str().unwrap();
    for method in ["GET", "POST", "PUT", "DELETE", "OPTIONS"] {
        assert!(methods.contains(method), "{methods}");
    }
    let allowed = headers["access-control-allow-headers"].to_str().unwrap().to_lowercase();
    assert!(allowed.contains("authorization") && allowed.contains("content-type"), "{allowed}");

    let get = s
        .http
        .get(format!("{}/_matrix/client/versions", s.base))
        .header("Origin", "https://x")
        .send()
        .await
        .unwrap();
    assert_eq!(get.headers()["access-control-allow-origin"], "*");
}
