//! Application services over raw HTTP: registrations checked at start, the service acting as
//! its users, exclusive namespaces, ping, and the transaction queue surviving a service that
//! is down and a restart of the server. A small receiver on loopback stands in for the service.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{
    Json, Router,
    extract::{Path as UrlPath, State},
    http::{HeaderMap, StatusCode as AxumStatus},
    routing::{get, post, put},
};
use plaza::{Config, Server};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::{TestServer, assert_error, enc, test_config};

/// What the stand-in service saw.
#[derive(Default)]
struct Receiver {
    /// Whether it answers (a 503 otherwise).
    up: AtomicBool,
    /// Accepted transactions: id, body, authorization header.
    txns: Mutex<Vec<(String, Value, String)>>,
    /// Pings received.
    pings: Mutex<Vec<Value>>,
    /// Transaction attempts refused while down.
    refused: Mutex<u32>,
}

impl Receiver {
    /// The events of every accepted transaction, each transaction counted once.
    fn events(&self) -> Vec<Value> {
        let txns = self.txns.lock().unwrap();
        let mut seen = std::collections::HashSet::new();
        txns.iter()
            .filter(|(id, ..)| seen.insert(id.clone()))
            .flat_map(|(_, body, _)| body["events"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    /// The bodies of the `m.room.message` events received, in order.
    fn messages(&self) -> Vec<String> {
        self.events()
            .iter()
            .filter(|e| e["type"] == "m.room.message")
            .map(|e| e["content"]["body"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    fn ephemeral(&self) -> Vec<Value> {
        let txns = self.txns.lock().unwrap();
        txns.iter()
            .flat_map(|(_, body, _)| body["ephemeral"].as_array().cloned().unwrap_or_default())
            .collect()
    }
}

async fn transaction(
    State(receiver): State<Arc<Receiver>>,
    UrlPath(txn): UrlPath<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> (AxumStatus, Json<Value>) {
    if !receiver.up.load(Ordering::SeqCst) {
        *receiver.refused.lock().unwrap() += 1;
        return (AxumStatus::SERVICE_UNAVAILABLE, Json(json!({})));
    }
    let auth =
        headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    receiver.txns.lock().unwrap().push((txn, body, auth));
    (AxumStatus::OK, Json(json!({})))
}

async fn ping(
    State(receiver): State<Arc<Receiver>>,
    Json(body): Json<Value>,
) -> (AxumStatus, Json<Value>) {
    if !receiver.up.load(Ordering::SeqCst) {
        return (AxumStatus::INTERNAL_SERVER_ERROR, Json(json!({ "errcode": "M_UNKNOWN" })));
    }
    receiver.pings.lock().unwrap().push(body);
    (AxumStatus::OK, Json(json!({})))
}

/// Starts the stand-in service; returns its URL.
async fn start_receiver() -> (String, Arc<Receiver>) {
    let receiver = Arc::new(Receiver::default());
    receiver.up.store(true, Ordering::SeqCst);
    let app = Router::new()
        .route("/_matrix/app/v1/transactions/{txn}", put(transaction))
        .route("/_matrix/app/v1/ping", post(ping))
        .route(
            "/_matrix/app/v1/thirdparty/protocol/{protocol}",
            get(|UrlPath(protocol): UrlPath<String>| async move {
                if protocol != "irc" {
                    return (AxumStatus::NOT_FOUND, Json(json!({ "errcode": "M_NOT_FOUND" })));
                }
                (
                    AxumStatus::OK,
                    Json(json!({
                        "user_fields": ["network", "nickname"],
                        "location_fields": ["network", "channel"],
                        "icon": "mxc://example.org/irc",
                        "field_types": {},
                        "instances": [],
                    })),
                )
            }),
        )
        .route(
            "/_matrix/app/v1/thirdparty/user/{protocol}",
            get(|uri: axum::http::Uri| async move {
                let query = uri.query().unwrap_or_default().to_owned();
                Json(json!([{
                    "userid": "@brg_nick:localhost",
                    "protocol": "irc",
                    "fields": { "query": query },
                }]))
            }),
        )
        .route(
            "/_matrix/app/v1/users/{user}",
            get(|| async { (AxumStatus::NOT_FOUND, Json(json!({ "errcode": "M_NOT_FOUND" }))) }),
        )
        .with_state(receiver.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, receiver)
}

/// Writes a registration `name` with users `@{name}_*` and aliases `#{name}_*` exclusively.
fn registration(dir: &Path, name: &str, url: &str, extra: &str) -> PathBuf {
    let file = dir.join(format!("{name}.yaml"));
    let text = format!(
        "id: {name}\nurl: {url}\nas_token: as_{name}\nhs_token: hs_{name}\n\
         sender_localpart: {name}bot\nnamespaces:\n  users:\n    - exclusive: true\n      \
         regex: '@{name}_.*'\n  aliases:\n    - exclusive: true\n      regex: '#{name}_.*'\n\
         {extra}"
    );
    std::fs::write(&file, text).unwrap();
    file
}

/// Waits until `done` holds, for at most ten seconds.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..500 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

fn with_files(files: Vec<PathBuf>) -> impl FnOnce(&mut Config) {
    move |config: &mut Config| config.appservices.registration_files = files
}

#[tokio::test]
async fn registrations_are_checked_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let good = registration(dir.path(), "irc", "http://127.0.0.1:9", "");
    let cases: Vec<(Vec<PathBuf>, &str)> = vec![
        (
            vec![{
                let file = dir.path().join("no_token.yaml");
                let text =
                    std::fs::read_to_string(&good).unwrap().replace("as_token: as_irc\n", "");
                std::fs::write(&file, text).unwrap();
                file
            }],
            "field `as_token`: missing",
        ),
        (
            vec![{
                let file = dir.path().join("bad_regex.yaml");
                let text =
                    std::fs::read_to_string(&good).unwrap().replace("'@irc_.*'", "'@irc_(('");
                std::fs::write(&file, text).unwrap();
                file
            }],
            "field `namespaces.users`: invalid regex",
        ),
        (
            vec![{
                let file = dir.path().join("bad_url.yaml");
                let text = std::fs::read_to_string(&good)
                    .unwrap()
                    .replace("url: http://127.0.0.1:9", "url: [1]");
                std::fs::write(&file, text).unwrap();
                file
            }],
            "field `url`",
        ),
        (vec![dir.path().join("missing.yaml")], "cannot read"),
        (
            vec![good.clone(), {
                let file = dir.path().join("same_id.yaml");
                let text = std::fs::read_to_string(&good)
                    .unwrap()
                    .replace("as_irc", "as_other")
                    .replace("hs_irc", "hs_other")
                    .replace("'@irc_.*'", "'@other_.*'")
                    .replace("'#irc_.*'", "'#other_.*'")
                    .replace("ircbot", "otherbot");
                std::fs::write(&file, text).unwrap();
                file
            }],
            "field `id`: `irc` is also the id",
        ),
        (
            vec![good.clone(), {
                let file = dir.path().join("same_token.yaml");
                let text = std::fs::read_to_string(&good).unwrap().replace("id: irc", "id: two");
                std::fs::write(&file, text).unwrap();
                file
            }],
            "field `as_token`: also used",
        ),
        (
            vec![good.clone(), {
                let file = dir.path().join("overlap.yaml");
                let text = std::fs::read_to_string(&good)
                    .unwrap()
                    .replace("id: irc", "id: three")
                    .replace("as_irc", "as_three")
                    .replace("hs_irc", "hs_three")
                    .replace("ircbot", "threebot")
                    .replace("'#irc_.*'", "'#three_.*'");
                std::fs::write(&file, text).unwrap();
                file
            }],
            "field `namespaces.users`: exclusive regex `@irc_.*` is also exclusive",
        ),
    ];
    for (files, expected) in cases {
        let named = files.last().unwrap().display().to_string();
        let data = tempfile::tempdir().unwrap();
        let mut config = test_config(data.path());
        config.appservices.registration_files = files;
        let Err(err) = Server::start(config).await else {
            panic!("{named} should be refused");
        };
        let message = err.to_string();
        assert!(message.contains(&named), "{message} should name {named}");
        assert!(message.contains(expected), "{message} should say {expected}");
    }
}

#[tokio::test]
async fn services_act_as_their_users_and_keep_their_namespaces() {
    let (url, _receiver) = start_receiver().await;
    let files = tempfile::tempdir().unwrap();
    let file = registration(files.path(), "brg", &url, "rate_limited: false\n");
    let server = TestServer::start_with(with_files(vec![file])).await;
    let (alice, alice_token, _) = server.register("alice", "password-alice").await;
    let register = |name: &str| json!({ "type": "m.login.application_service", "username": name });

    // Its users: registered without user-interactive auth, only in its namespace.
    let (status, body) =
        server.post("/_matrix/client/v3/register", Some("as_brg"), register("brg_carol")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["user_id"], "@brg_carol:localhost");
    assert!(body["access_token"].is_string());
    let outside =
        server.post("/_matrix/client/v3/register", Some("as_brg"), register("dave")).await;
    assert_error(&outside, StatusCode::BAD_REQUEST, "M_EXCLUSIVE");
    let again =
        server.post("/_matrix/client/v3/register", Some("as_brg"), register("brg_carol")).await;
    assert_error(&again, StatusCode::BAD_REQUEST, "M_USER_IN_USE");
    let no_token = server.post("/_matrix/client/v3/register", None, register("brg_x")).await;
    assert_error(&no_token, StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN");

    // Nobody else may take its users or aliases.
    let taken = server
        .post(
            "/_matrix/client/v3/register",
            None,
            json!({ "username": "brg_eve", "password": "password-eve", "auth": { "type": "m.login.dummy" } }),
        )
        .await;
    assert_error(&taken, StatusCode::BAD_REQUEST, "M_EXCLUSIVE");
    let available =
        server.get("/_matrix/client/v3/register/available?username=brg_eve", None).await;
    assert_error(&available, StatusCode::BAD_REQUEST, "M_EXCLUSIVE");
    let room_id = server.create_room(&alice_token, json!({ "preset": "public_chat" })).await;
    let alias = server
        .put(
            &format!("/_matrix/client/v3/directory/room/{}", enc("#brg_room:localhost")),
            Some(&alice_token),
            json!({ "room_id": room_id }),
        )
        .await;
    assert_error(&alias, StatusCode::BAD_REQUEST, "M_EXCLUSIVE");

    // Acting as its own user, as a namespaced user, and never as anyone else.
    let whoami = |user: Option<&str>| {
        let query = user.map(|u| format!("?user_id={}", enc(u))).unwrap_or_default();
        format!("/_matrix/client/v3/account/whoami{query}")
    };
    let (status, body) = server.get(&whoami(None), Some("as_brg")).await;
    assert_eq!((status, body["user_id"].as_str()), (StatusCode::OK, Some("@brgbot:localhost")));
    let (status, body) = server.get(&whoami(Some("@brg_carol:localhost")), Some("as_brg")).await;
    assert_eq!((status, body["user_id"].as_str()), (StatusCode::OK, Some("@brg_carol:localhost")));
    let foreign = server.get(&whoami(Some(&alice)), Some("as_brg")).await;
    assert_error(&foreign, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let unknown = server.get(&whoami(Some("@brg_nobody:localhost")), Some("as_brg")).await;
    assert_error(&unknown, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let bad_device = server
        .get(
            &format!("{}&org.matrix.msc3202.device_id=NOPE", whoami(Some("@brg_carol:localhost"))),
            Some("as_brg"),
        )
        .await;
    assert_error(&bad_device, StatusCode::FORBIDDEN, "M_FORBIDDEN");

    // The service creates its alias and joins as its user, masquerading.
    let (status, body) = server
        .put(
            &format!(
                "/_matrix/client/v3/directory/room/{}?user_id={}",
                enc("#brg_room:localhost"),
                enc("@brgbot:localhost")
            ),
            Some("as_brg"),
            json!({ "room_id": room_id }),
        )
        .await;
    // Its own user must be in the room to name it.
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let joined = server
        .post(
            &format!(
                "/_matrix/client/v3/join/{}?user_id={}",
                enc(&room_id),
                enc("@brg_carol:localhost")
            ),
            Some("as_brg"),
            json!({}),
        )
        .await;
    assert_eq!(joined.0, StatusCode::OK, "{}", joined.1);
    let member = server
        .membership(&alice_token, &room_id, "invite", json!({ "user_id": "@brgbot:localhost" }))
        .await;
    assert_eq!(member.0, StatusCode::OK, "{}", member.1);
    let join_own = server
        .post(&format!("/_matrix/client/v3/join/{}", enc(&room_id)), Some("as_brg"), json!({}))
        .await;
    assert_eq!(join_own.0, StatusCode::OK, "{}", join_own.1);
    let (status, body) = server
        .put(
            &format!("/_matrix/client/v3/directory/room/{}", enc("#brg_room:localhost")),
            Some("as_brg"),
            json!({ "room_id": room_id }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Its users log in with the service's token, without a password.
    let (status, body) = server
        .post(
            "/_matrix/client/v3/login",
            Some("as_brg"),
            json!({ "type": "m.login.application_service", "identifier": { "type": "m.id.user", "user": "brg_carol" } }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["user_id"], "@brg_carol:localhost");
    let refused = server
        .post(
            "/_matrix/client/v3/login",
            Some("as_brg"),
            json!({ "type": "m.login.application_service", "identifier": { "type": "m.id.user", "user": "alice" } }),
        )
        .await;
    assert_error(&refused, StatusCode::FORBIDDEN, "M_FORBIDDEN");

    // The admin sees the service.
    server.set_role(&alice, "admin");
    let (status, body) = server.get("/_plaza/admin/v1/appservices", Some(&alice_token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["appservices"][0]["id"], "brg");
    assert_eq!(body["appservices"][0]["rate_limited"], false);
    let audit =
        server.get("/_plaza/admin/v1/audit?action=appservice.register", Some(&alice_token)).await;
    assert_eq!(audit.0, StatusCode::OK, "{}", audit.1);
    assert!(audit.1.to_string().contains("appservice.register"), "{}", audit.1);
}

#[tokio::test]
async fn ping_reports_the_round_trip_and_its_failures() {
    let (url, receiver) = start_receiver().await;
    let files = tempfile::tempdir().unwrap();
    let up = registration(files.path(), "png", &url, "");
    let down = registration(files.path(), "gone", "http://127.0.0.1:9", "");
    let none = registration(files.path(), "nourl", "~", "");
    let server = TestServer::start_with(with_files(vec![up, down, none])).await;
    let (_, alice_token, _) = server.register("alice", "password-alice").await;
    let path = |id: &str| format!("/_matrix/client/v1/appservice/{id}/ping");

    let (status, body) =
        server.post(&path("png"), Some("as_png"), json!({ "transaction_id": "t1" })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["duration_ms"].is_u64(), "{body}");
    assert_eq!(receiver.pings.lock().unwrap().clone(), vec![json!({ "transaction_id": "t1" })]);

    let other = server.post(&path("gone"), Some("as_png"), json!({})).await;
    assert_error(&other, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let user = server.post(&path("png"), Some(&alice_token), json!({})).await;
    assert_error(&user, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let unreachable = server.post(&path("gone"), Some("as_gone"), json!({})).await;
    assert_error(&unreachable, StatusCode::BAD_GATEWAY, "M_CONNECTION_FAILED");
    let no_url = server.post(&path("nourl"), Some("as_nourl"), json!({})).await;
    assert_error(&no_url, StatusCode::BAD_REQUEST, "M_URL_NOT_SET");
    receiver.up.store(false, Ordering::SeqCst);
    let failing = server.post(&path("png"), Some("as_png"), json!({})).await;
    assert_error(&failing, StatusCode::BAD_GATEWAY, "M_BAD_STATUS");
    assert_eq!(failing.1["status"], 500);
}

#[tokio::test]
async fn transactions_wait_for_a_service_that_is_down_and_survive_a_restart() {
    let (url, receiver) = start_receiver().await;
    let files = tempfile::tempdir().unwrap();
    let file = registration(files.path(), "que", &url, "receive_ephemeral: true\n");
    let server = TestServer::start_with(with_files(vec![file.clone()])).await;
    let (_, alice_token, _) = server.register("alice", "password-alice").await;
    let (_, bob_token, _) = server.register("bob", "password-bob").await;
    let room_id = server.create_room(&alice_token, json!({ "preset": "public_chat" })).await;
    // A room the service has no business in: nobody of its namespace is there.
    let private = server.create_room(&bob_token, json!({})).await;
    server.send_text(&bob_token, &private, "p1", "not for the service").await;

    let (status, _) = server
        .post(
            "/_matrix/client/v3/register",
            Some("as_que"),
            json!({ "type": "m.login.application_service", "username": "que_puppet" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let join = server
        .post(
            &format!(
                "/_matrix/client/v3/join/{}?user_id={}",
                enc(&room_id),
                enc("@que_puppet:localhost")
            ),
            Some("as_que"),
            json!({}),
        )
        .await;
    assert_eq!(join.0, StatusCode::OK, "{}", join.1);
    for n in 0..5 {
        let sent =
            server.send_text(&alice_token, &room_id, &format!("a{n}"), &format!("m{n}")).await;
        assert_eq!(sent.0, StatusCode::OK);
    }
    eventually("the first messages", || receiver.messages().len() == 5).await;
    assert_eq!(receiver.messages(), ["m0", "m1", "m2", "m3", "m4"]);
    assert!(receiver.txns.lock().unwrap().iter().all(|(_, _, auth)| auth == "Bearer hs_que"));
    let joined = receiver
        .events()
        .iter()
        .any(|e| e["type"] == "m.room.member" && e["state_key"] == "@que_puppet:localhost");
    assert!(joined, "the puppet's own join is pushed");

    // Typing of a room the service is in reaches it as an ephemeral event.
    let typing = server
        .put(
            &format!(
                "/_matrix/client/v3/rooms/{}/typing/{}",
                enc(&room_id),
                enc("@alice:localhost")
            ),
            Some(&alice_token),
            json!({ "typing": true, "timeout": 10000 }),
        )
        .await;
    assert_eq!(typing.0, StatusCode::OK, "{}", typing.1);
    eventually("typing", || {
        receiver.ephemeral().iter().any(|e| {
            e["type"] == "m.typing"
                && e["room_id"] == room_id.as_str()
                && e["content"]["user_ids"] == json!(["@alice:localhost"])
        })
    })
    .await;

    // Down: nothing is lost, through a restart of the server too.
    receiver.up.store(false, Ordering::SeqCst);
    for n in 5..10 {
        server.send_text(&alice_token, &room_id, &format!("a{n}"), &format!("m{n}")).await;
    }
    eventually("a refused attempt", || *receiver.refused.lock().unwrap() > 0).await;
    let server = server.restart_with(with_files(vec![file.clone()])).await;
    for n in 10..15 {
        let sent =
            server.send_text(&alice_token, &room_id, &format!("a{n}"), &format!("m{n}")).await;
        assert_eq!(sent.0, StatusCode::OK);
    }
    let (_, admin_token, _) = server.register("root", "password-root").await;
    server.set_role("@root:localhost", "admin");
    let (_, body) = server.get("/_plaza/admin/v1/appservices", Some(&admin_token)).await;
    assert!(body["appservices"][0]["queued"].as_u64().unwrap() >= 10, "{body}");
    receiver.up.store(true, Ordering::SeqCst);
    eventually("the missed messages", || receiver.messages().len() == 15).await;
    let expected: Vec<String> = (0..15).map(|n| format!("m{n}")).collect();
    assert_eq!(receiver.messages(), expected, "every message once, in order");
    assert!(!receiver.messages().iter().any(|m| m == "not for the service"));
    let (_, body) = server.get("/_plaza/admin/v1/appservices", Some(&admin_token)).await;
    let status = &body["appservices"][0];
    assert_eq!(status["queued"], 0, "{body}");
    assert!(status["last_success_ts"].is_u64(), "{body}");
}

#[tokio::test]
async fn third_party_lookups_reach_the_services_declaring_the_protocol() {
    let (url, _receiver) = start_receiver().await;
    let files = tempfile::tempdir().unwrap();
    let file = registration(files.path(), "brg", &url, "protocols: [irc]\n");
    let server = TestServer::start_with(with_files(vec![file])).await;
    let (_, token, _) = server.register("alice", "password-alice").await;

    let (status, body) = server.get("/_matrix/client/v3/thirdparty/protocols", Some(&token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["irc"]["icon"], "mxc://example.org/irc", "{body}");
    assert_eq!(body.as_object().unwrap().len(), 1);
    let (status, body) =
        server.get("/_matrix/client/v3/thirdparty/protocol/irc", Some(&token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["user_fields"], json!(["network", "nickname"]));
    let unknown = server.get("/_matrix/client/v3/thirdparty/protocol/xmpp", Some(&token)).await;
    assert_error(&unknown, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    let (status, body) = server
        .get("/_matrix/client/v3/thirdparty/user/irc?nickname=bob&network=libera", Some(&token))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body[0]["userid"], "@brg_nick:localhost", "{body}");
    assert_eq!(body[0]["fields"]["query"], "network=libera&nickname=bob", "{body}");
    let unknown = server.get("/_matrix/client/v3/thirdparty/user/xmpp", Some(&token)).await;
    assert_error(&unknown, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    let anonymous = server.get("/_matrix/client/v3/thirdparty/protocols", None).await;
    assert_error(&anonymous, StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN");
}
