//! Shared-secret registration, computed the way existing admin tooling computes it.

use hmac::Mac;
use reqwest::StatusCode;
use serde_json::json;

use crate::common::{self, TestServer, assert_error};

fn mac(secret: &str, parts: &[&str]) -> String {
    let mut mac = hmac::Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(parts.join("\0").as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

#[tokio::test]
async fn nonce_and_hmac_registration() {
    let s = TestServer::start_with(|c| {
        c.registration.mode = plaza::config::RegistrationMode::Disabled;
        c.registration.shared_secret = Some("s3cret".into());
    })
    .await;
    let path = "/_synapse/admin/v1/register";
    let nonce = s.get(path, None).await.1["nonce"].as_str().unwrap().to_owned();
    let body = json!({ "nonce": nonce, "username": "root", "password": "pw12345678", "admin": true,
                       "mac": mac("s3cret", &[&nonce, "root", "pw12345678", "admin"]) });
    let (status, created) = s.post(path, None, body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{created}");
    assert_eq!(created["user_id"], "@root:localhost");
    assert_eq!(created["home_server"], "localhost");
    let token = created["access_token"].as_str().unwrap();
    assert_eq!(
        s.get("/_matrix/client/v3/account/whoami", Some(token)).await.1["user_id"],
        "@root:localhost"
    );
    assert!(
        s.server()
            .services()
            .users
            .get(&common::user_id("@root:localhost"))
            .unwrap()
            .unwrap()
            .admin
    );

    // A nonce works once.
    assert_error(&s.post(path, None, body).await, StatusCode::BAD_REQUEST, "M_UNKNOWN");
    // A wrong MAC is refused.
    let nonce = s.get(path, None).await.1["nonce"].as_str().unwrap().to_owned();
    let forged = json!({ "nonce": nonce, "username": "mallory", "password": "pw12345678", "admin": true,
                         "mac": mac("s3cret", &[&nonce, "mallory", "pw12345678", "notadmin"]) });
    assert_error(&s.post(path, None, forged).await, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    // user_type is part of the MAC when present.
    let nonce = s.get(path, None).await.1["nonce"].as_str().unwrap().to_owned();
    let bot = json!({ "nonce": nonce, "username": "bot", "password": "pw12345678", "user_type": "bot",
                      "mac": mac("s3cret", &[&nonce, "bot", "pw12345678", "notadmin", "bot"]) });
    assert_eq!(s.post(path, None, bot).await.0, StatusCode::OK);
}

#[tokio::test]
async fn disabled_without_secret() {
    let s = TestServer::start().await;
    assert_error(
        &s.get("/_synapse/admin/v1/register", None).await,
        StatusCode::BAD_REQUEST,
        "M_UNKNOWN",
    );
}

/// Shared-secret registration cannot take the server notices account's name.
#[tokio::test]
async fn notices_name_is_refused() {
    let s = TestServer::start_with(|c| c.registration.shared_secret = Some("s3cret".into())).await;
    let path = "/_synapse/admin/v1/register";
    let nonce = s.get(path, None).await.1["nonce"].as_str().unwrap().to_owned();
    let body = json!({ "nonce": nonce, "username": "notices", "password": "pw12345678",
                       "mac": mac("s3cret", &[&nonce, "notices", "pw12345678", "notadmin"]) });
    let refused = s.post(path, None, body).await;
    assert_error(&refused, StatusCode::BAD_REQUEST, "M_USER_IN_USE");
}
