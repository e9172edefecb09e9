//! Accounts, sessions, devices, profile and account data over HTTP.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::common::{self, TestServer, assert_error};

#[tokio::test]
async fn register_follows_user_interactive_auth() {
    let s = TestServer::start().await;
    let (status, challenge) = s
        .post(
            "/_matrix/client/v3/register",
            None,
            json!({ "username": "alice", "password": "correct horse" }),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(challenge["flows"], json!([{ "stages": ["m.login.dummy"] }]));
    let session = challenge["session"].as_str().unwrap();
    let (status, body) = s
        .post(
            "/_matrix/client/v3/register",
            None,
            json!({ "username": "Alice", "password": "correct horse", "initial_device_display_name": "laptop",
                    "auth": { "type": "m.login.dummy", "session": session } }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["user_id"], "@alice:localhost");
    let token = body["access_token"].as_str().unwrap();
    let (status, whoami) = s.get("/_matrix/client/v3/account/whoami", Some(token)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(whoami["user_id"], "@alice:localhost");
    assert_eq!(whoami["device_id"], body["device_id"]);
    assert_ne!(whoami["is_guest"], true);
    let (_, available) = s.get("/_matrix/client/v3/register/available?username=bob", None).await;
    assert_eq!(available["available"], true);
}

#[tokio::test]
async fn token_registration_and_first_admin() {
    let s = TestServer::start_with(|c| {
        c.registration.mode = plaza::config::RegistrationMode::Token;
        c.registration.tokens = vec!["company-token".into()];
    })
    .await;
    let validity = "/_matrix/client/v1/register/m.login.registration_token/validity?token=";
    assert_eq!(s.get(&format!("{validity}company-token"), None).await.1["valid"], true);
    assert_eq!(s.get(&format!("{validity}wrong"), None).await.1["valid"], false);
    let (status, challenge) = s
        .post(
            "/_matrix/client/v3/register",
            None,
            json!({ "username": "carol", "password": "long enough pw" }),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(challenge["flows"], json!([{ "stages": ["m.login.registration_token"] }]));
    let session = challenge["session"].as_str().unwrap();
    let wrong = s
        .post(
            "/_matrix/client/v3/register",
            None,
            json!({ "username": "carol", "password": "long enough pw",
                    "auth": { "type": "m.login.registration_token", "token": "wrong", "session": session } }),
        )
        .await;
    assert_eq!(wrong.0, StatusCode::UNAUTHORIZED);
    assert_eq!(wrong.1["errcode"], "M_UNAUTHORIZED");
    let (status, body) = s
        .post(
            "/_matrix/client/v3/register",
            None,
            json!({ "username": "carol", "password": "long enough pw",
                    "auth": { "type": "m.login.registration_token", "token": "company-token", "session": session } }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let user =
        s.server().services().users.get(&common::user_id("@carol:localhost")).unwrap().unwrap();
    assert!(!user.admin);
}

#[tokio::test]
async fn first_admin_token_is_logged_once_and_makes_an_admin() {
    let s =
        TestServer::start_with(|c| c.registration.mode = plaza::config::RegistrationMode::Disabled)
            .await;
    let services = s.server().services().clone();
    let token =
        services.registration.first_admin_token().unwrap().expect("token made on empty server");
    let (status, body) = s
        .post(
            "/_matrix/client/v3/register",
            None,
            json!({ "username": "boss", "password": "long enough pw", "auth": { "type": "m.login.registration_token", "token": token } }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(services.users.get(&common::user_id("@boss:localhost")).unwrap().unwrap().admin);
    assert_eq!(services.registration.first_admin_token().unwrap(), None);
    let again = s
        .post(
            "/_matrix/client/v3/register",
            None,
            json!({ "username": "boss2", "password": "long enough pw", "auth": { "type": "m.login.registration_token", "token": token } }),
        )
        .await;
    assert_error(&again, StatusCode::FORBIDDEN, "M_FORBIDDEN");
}

#[tokio::test]
async fn login_variants_and_logout() {
    let s = TestServer::start().await;
    s.register("dave", "correct horse").await;
    let (_, flows) = s.get("/_matrix/client/v3/login", None).await;
    assert_eq!(flows["flows"][0]["type"], "m.login.password");

    let (status, by_localpart) = s.login("dave", "correct horse").await;
    assert_eq!(status, StatusCode::OK, "{by_localpart}");
    assert_eq!(by_localpart["user_id"], "@dave:localhost");
    let (status, by_id) = s.login("@dave:localhost", "correct horse").await;
    assert_eq!(status, StatusCode::OK);
    let legacy = s
        .post(
            "/_matrix/client/v3/login",
            None,
            json!({ "type": "m.login.password", "user": "dave", "password": "correct horse" }),
        )
        .await;
    assert_eq!(legacy.0, StatusCode::OK, "{}", legacy.1);

    let token = by_id["access_token"].as_str().unwrap();
    assert_eq!(s.post("/_matrix/client/v3/logout", Some(token), json!({})).await.0, StatusCode::OK);
    assert_error(
        &s.get("/_matrix/client/v3/account/whoami", Some(token)).await,
        StatusCode::UNAUTHORIZED,
        "M_UNKNOWN_TOKEN",
    );

    let other = by_localpart["access_token"].as_str().unwrap();
    let legacy_token = legacy.1["access_token"].as_str().unwrap();
    assert_eq!(
        s.post("/_matrix/client/v3/logout/all", Some(other), json!({})).await.0,
        StatusCode::OK
    );
    for t in [other, legacy_token] {
        assert_eq!(
            s.get("/_matrix/client/v3/account/whoami", Some(t)).await.0,
            StatusCode::UNAUTHORIZED
        );
    }
    assert_eq!(
        s.server().services().sessions.devices(&common::user_id("@dave:localhost")).unwrap().len(),
        0
    );
}

#[tokio::test]
async fn devices_are_listed_renamed_and_deleted_with_auth() {
    let s = TestServer::start().await;
    let (user_id, token, device) = s.register("erin", "correct horse").await;
    let (_, second) = s.login("erin", "correct horse").await;
    let second_device = second["device_id"].as_str().unwrap();
    let second_token = second["access_token"].as_str().unwrap();

    let (_, list) = s.get("/_matrix/client/v3/devices", Some(&token)).await;
    assert_eq!(list["devices"].as_array().unwrap().len(), 2);
    let rename = s
        .put(
            &format!("/_matrix/client/v3/devices/{device}"),
            Some(&token),
            json!({ "display_name": "Work laptop" }),
        )
        .await;
    assert_eq!(rename.0, StatusCode::OK);
    let (_, one) = s.get(&format!("/_matrix/client/v3/devices/{device}"), Some(&token)).await;
    assert_eq!(one["display_name"], "Work laptop");
    assert!(one["last_seen_ts"].as_u64().is_some(), "{one}");
    assert_eq!(one["last_seen_ip"], "127.0.0.1");
    assert_error(
        &s.get("/_matrix/client/v3/devices/NOPE", Some(&token)).await,
        StatusCode::NOT_FOUND,
        "M_NOT_FOUND",
    );

    let path = format!("/_matrix/client/v3/devices/{second_device}");
    let (status, challenge) = s.call(Method::DELETE, &path, Some(&token), Some(json!({}))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(challenge["flows"][0]["stages"][0], "m.login.password");
    let session = challenge["session"].as_str().unwrap();
    let auth = |password: &str| {
        json!({ "auth": { "type": "m.login.password", "session": session, "password": password,
        "identifier": { "type": "m.id.user", "user": user_id } } })
    };
    let (status, failed) = s.call(Method::DELETE, &path, Some(&token), Some(auth("wrong"))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(failed["errcode"], "M_FORBIDDEN");
    let (status, body) =
        s.call(Method::DELETE, &path, Some(&token), Some(auth("correct horse"))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        s.get("/_matrix/client/v3/account/whoami", Some(second_token)).await.0,
        StatusCode::UNAUTHORIZED
    );

    let (_, third) = s.login("erin", "correct horse").await;
    let third_device = third["device_id"].as_str().unwrap();
    let many = json!({ "devices": [third_device], "auth": { "type": "m.login.password", "password": "correct horse",
        "identifier": { "type": "m.id.user", "user": "erin" } } });
    assert_eq!(
        s.post("/_matrix/client/v3/delete_devices", Some(&token), many).await.0,
        StatusCode::OK
    );
    let (_, list) = s.get("/_matrix/client/v3/devices", Some(&token)).await;
    assert_eq!(list["devices"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn password_change_and_deactivation() {
    let s = TestServer::start().await;
    let (_, token, _) = s.register("frank", "correct horse").await;
    let (_, other) = s.login("frank", "correct horse").await;
    let other_token = other["access_token"].as_str().unwrap();
    let auth = json!({ "type": "m.login.password", "password": "correct horse", "identifier": { "type": "m.id.user", "user": "frank" } });
    let (status, body) = s
        .post(
            "/_matrix/client/v3/account/password",
            Some(&token),
            json!({ "new_password": "battery staple", "logout_devices": true, "auth": auth }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(s.get("/_matrix/client/v3/account/whoami", Some(&token)).await.0, StatusCode::OK);
    assert_eq!(
        s.get("/_matrix/client/v3/account/whoami", Some(other_token)).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(s.login("frank", "correct horse").await.0, StatusCode::FORBIDDEN);
    assert_eq!(s.login("frank", "battery staple").await.0, StatusCode::OK);

    let auth = json!({ "type": "m.login.password", "password": "battery staple", "identifier": { "type": "m.id.user", "user": "frank" } });
    let (status, body) = s
        .post("/_matrix/client/v3/account/deactivate", Some(&token), json!({ "auth": auth }))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        s.get("/_matrix/client/v3/account/whoami", Some(&token)).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_error(&s.login("frank", "battery staple").await, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let again = s
        .post("/_matrix/client/v3/register", None, json!({ "username": "frank", "password": "long enough pw", "auth": { "type": "m.login.dummy" } }))
        .await;
    assert_error(&again, StatusCode::BAD_REQUEST, "M_USER_IN_USE");
}

#[tokio::test]
async fn profile_and_account_data() {
    let s = TestServer::start().await;
    let (user_id, token, _) = s.register("grace", "correct horse").await;
    let (_, other_token, _) = s.register("heidi", "correct horse").await;
    let (_, profile) = s.get(&format!("/_matrix/client/v3/profile/{user_id}"), None).await;
    assert_eq!(profile["displayname"], "grace");

    let path = format!("/_matrix/client/v3/profile/{user_id}/displayname");
    assert_eq!(
        s.put(&path, Some(&token), json!({ "displayname": "Grace H." })).await.0,
        StatusCode::OK
    );
    assert_eq!(s.get(&path, None).await.1["displayname"], "Grace H.");
    let avatar = format!("/_matrix/client/v3/profile/{user_id}/avatar_url");
    assert_eq!(
        s.put(&avatar, Some(&token), json!({ "avatar_url": "mxc://localhost/abc" })).await.0,
        StatusCode::OK
    );
    let (_, profile) = s.get(&format!("/_matrix/client/v3/profile/{user_id}"), None).await;
    assert_eq!(profile, json!({ "displayname": "Grace H.", "avatar_url": "mxc://localhost/abc" }));
    assert_error(
        &s.put(&path, Some(&other_token), json!({ "displayname": "x" })).await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );
    assert_error(
        &s.get("/_matrix/client/v3/profile/@nobody:localhost", None).await,
        StatusCode::NOT_FOUND,
        "M_NOT_FOUND",
    );

    let data = format!("/_matrix/client/v3/user/{user_id}/account_data/org.example.settings");
    assert_error(&s.get(&data, Some(&token)).await, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    assert_eq!(s.put(&data, Some(&token), json!({ "theme": "dark" })).await.0, StatusCode::OK);
    assert_eq!(s.get(&data, Some(&token)).await.1, json!({ "theme": "dark" }));
    assert_error(&s.get(&data, Some(&other_token)).await, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let room_data =
        format!("/_matrix/client/v3/user/{user_id}/rooms/!room:localhost/account_data/m.tag.note");
    assert_eq!(s.put(&room_data, Some(&token), json!({ "n": 1 })).await.0, StatusCode::OK);
    assert_eq!(s.get(&room_data, Some(&token)).await.1, json!({ "n": 1 }));
    let not_object = s.put(&data, Some(&token), json!([1, 2])).await;
    assert_eq!(not_object.0, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn discovery_and_misc_endpoints() {
    let s = TestServer::start_with(|c| {
        c.public_baseurl = Some("https://chat.example.com/".into());
        c.federation_endpoint = Some("chat.example.com:443".into());
        c.turn.uris = vec!["turn:turn.example.com:3478?transport=udp".into()];
        c.turn.shared_secret = Some("turn-secret".into());
        c.support.page = Some("https://intranet.example.com/chat-help".into());
        c.support.contacts = vec![plaza::config::SupportContact {
            role: "m.role.admin".into(),
            matrix_id: Some("@helpdesk:localhost".try_into().unwrap()),
            email_address: None,
        }];
    })
    .await;
    let (_, versions) = s.get("/_matrix/client/versions", None).await;
    let list: Vec<&str> =
        versions["versions"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    for v in ["v1.1", "v1.6", "v1.11", "v1.13"] {
        assert!(list.contains(&v), "{list:?}");
    }
    assert!(versions["unstable_features"].is_object());
    let (_, well_known) = s.get("/.well-known/matrix/client", None).await;
    assert_eq!(well_known["m.homeserver"]["base_url"], "https://chat.example.com");
    let (_, server) = s.get("/.well-known/matrix/server", None).await;
    assert_eq!(server["m.server"], "chat.example.com:443");
    let (_, support) = s.get("/.well-known/matrix/support", None).await;
    assert_eq!(support["support_page"], "https://intranet.example.com/chat-help");
    assert_eq!(
        support["contacts"],
        serde_json::json!([{ "role": "m.role.admin", "matrix_id": "@helpdesk:localhost" }])
    );

    let (_, token, _) = s.register("ivan", "correct horse").await;
    let (_, caps) = s.get("/_matrix/client/v3/capabilities", Some(&token)).await;
    assert_eq!(caps["capabilities"]["m.room_versions"]["default"], "12");
    // `m.change_password` defaults to enabled when absent.
    assert_ne!(caps["capabilities"]["m.change_password"]["enabled"], false);
    assert_eq!(caps["capabilities"]["m.room_versions"]["available"]["2"], "stable");
    // Room version 1 resolves state with an algorithm this server does not implement.
    assert!(caps["capabilities"]["m.room_versions"]["available"].get("1").is_none());
    let (status, body) =
        s.post("/_matrix/client/v3/createRoom", Some(&token), json!({ "room_version": "1" })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["errcode"], "M_UNSUPPORTED_ROOM_VERSION");

    let (status, threepids) = s.get("/_matrix/client/v3/account/3pid", Some(&token)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(threepids.get("threepids").is_none_or(|t| t == &json!([])), "{threepids}");
    let email = s
        .post(
            "/_matrix/client/v3/account/3pid/email/requestToken",
            None,
            json!({ "client_secret": "abc", "email": "a@b.c", "send_attempt": 1 }),
        )
        .await;
    assert_error(&email, StatusCode::FORBIDDEN, "M_THREEPID_DENIED");

    let (status, turn) = s.get("/_matrix/client/v3/voip/turnServer", Some(&token)).await;
    assert_eq!(status, StatusCode::OK, "{turn}");
    let username = turn["username"].as_str().unwrap();
    let (expiry, user) = username.split_once(':').unwrap();
    assert_eq!(user, "@ivan:localhost");
    assert!(expiry.parse::<u64>().unwrap() > 1_700_000_000);
    use base64::Engine;
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha1::Sha1>::new_from_slice(b"turn-secret").unwrap();
    mac.update(username.as_bytes());
    let expected = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    assert_eq!(turn["password"], expected);
    assert_eq!(turn["ttl"], 86400);
}

#[tokio::test]
async fn in_process_restart_keeps_everything() {
    let s = TestServer::start().await;
    let (user_id, token, device) = s.register("judy", "correct horse").await;
    let data = format!("/_matrix/client/v3/user/{user_id}/account_data/org.example.k");
    assert_eq!(s.put(&data, Some(&token), json!({ "v": 1 })).await.0, StatusCode::OK);
    let position = s.server().services().stream.current();
    let s = s.restart().await;
    assert_eq!(s.server().services().stream.current(), position, "stream position survives");
    assert_eq!(s.get(&data, Some(&token)).await.1, json!({ "v": 1 }));
    assert_eq!(
        s.get("/_matrix/client/v3/account/whoami", Some(&token)).await.1["device_id"],
        device
    );
}
