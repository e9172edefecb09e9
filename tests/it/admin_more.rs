//! The rest of the admin API: creating and changing accounts, room state and history,
//! force-joins, room admin, event reports, registration tokens, server notices, room media
//! quarantine and onboarding, each route with an admin, an auditor and an ordinary user.

use reqwest::{Method, StatusCode, header};
use serde_json::{Value, json};

use crate::common::{TestServer, assert_error, enc};

struct Cast {
    admin: (String, String),
    auditor: (String, String),
    user: (String, String),
}

async fn cast(s: &TestServer) -> Cast {
    let (admin, admin_token, _) = s.register("root", "password-r").await;
    let (auditor, auditor_token, _) = s.register("audrey", "password-a").await;
    let (user, user_token, _) = s.register("ursula", "password-u").await;
    s.set_role(&admin, "admin");
    s.set_role(&auditor, "auditor");
    Cast {
        admin: (admin, admin_token),
        auditor: (auditor, auditor_token),
        user: (user, user_token),
    }
}

/// The audit records of `action`.
async fn audited(s: &TestServer, token: &str, action: &str) -> Vec<Value> {
    let (status, body) =
        s.get(&format!("/_plaza/admin/v1/audit?action={action}"), Some(token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["records"].as_array().unwrap().clone()
}

/// Sends a text message; returns its event id.
async fn say(s: &TestServer, token: &str, room: &str, txn: &str, text: &str) -> String {
    let (status, body) = s.send_text(token, room, txn, text).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["event_id"].as_str().unwrap().to_owned()
}

/// Reports `event_id`; returns the report's id as the admin listing shows it.
async fn report(s: &TestServer, c: &Cast, room: &str, event_id: &str) -> u64 {
    let path = format!("/_matrix/client/v3/rooms/{room}/report/{}", enc(event_id));
    let (status, body) = s.post(&path, Some(&c.user.1), json!({ "reason": "spam" })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, list) = s.get("/_synapse/admin/v1/event_reports", Some(&c.admin.1)).await;
    list["event_reports"][0]["id"].as_u64().unwrap()
}

#[tokio::test]
async fn new_routes_answer_by_role() {
    let s = TestServer::start().await;
    let c = cast(&s).await;
    let room = s.create_room(&c.user.1, json!({})).await;
    let event_id = say(&s, &c.user.1, &room, "t1", "hello").await;
    let report_id = report(&s, &c, &room, &event_id).await;
    let (status, token) =
        s.post("/_synapse/admin/v1/registration_tokens/new", Some(&c.admin.1), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{token}");
    let token = token["token"].as_str().unwrap().to_owned();

    // Listings and metadata: admins and auditors.
    let reads = [
        format!("/_synapse/admin/v1/rooms/{room}/state"),
        "/_synapse/admin/v1/event_reports".to_owned(),
        "/_synapse/admin/v1/registration_tokens".to_owned(),
        format!("/_synapse/admin/v1/registration_tokens/{token}"),
        format!("/_synapse/admin/v1/room/{room}/media"),
    ];
    for route in &reads {
        for who in [&c.admin.1, &c.auditor.1] {
            let (status, body) = s.get(route, Some(who)).await;
            assert_eq!(status, StatusCode::OK, "{route}: {body}");
        }
        assert_error(&s.get(route, Some(&c.user.1)).await, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    }
    // Message content: admins only.
    let content = [
        format!("/_synapse/admin/v1/rooms/{room}/messages"),
        format!("/_synapse/admin/v1/event_reports/{report_id}"),
    ];
    for route in &content {
        let (status, body) = s.get(route, Some(&c.admin.1)).await;
        assert_eq!(status, StatusCode::OK, "{route}: {body}");
        for who in [&c.auditor.1, &c.user.1] {
            assert_error(&s.get(route, Some(who)).await, StatusCode::FORBIDDEN, "M_FORBIDDEN");
        }
    }
    // Changes: admins only; nobody else changes anything.
    let user = &c.user.0;
    let writes = [
        (Method::PUT, "/_synapse/admin/v2/users/@newcomer:localhost".to_owned(), json!({})),
        (
            Method::POST,
            format!("/_synapse/admin/v1/join/{room}"),
            json!({ "user_id": c.auditor.0 }),
        ),
        (Method::POST, format!("/_synapse/admin/v1/rooms/{room}/make_room_admin"), json!({})),
        (Method::DELETE, format!("/_synapse/admin/v1/event_reports/{report_id}"), json!({})),
        (Method::POST, "/_synapse/admin/v1/registration_tokens/new".to_owned(), json!({})),
        (
            Method::PUT,
            format!("/_synapse/admin/v1/registration_tokens/{token}"),
            json!({ "uses_allowed": 1 }),
        ),
        (Method::DELETE, format!("/_synapse/admin/v1/registration_tokens/{token}"), json!({})),
        (
            Method::POST,
            "/_synapse/admin/v1/send_server_notice".to_owned(),
            json!({ "user_id": user, "content": { "msgtype": "m.text", "body": "hi" } }),
        ),
        (
            Method::PUT,
            "/_synapse/admin/v1/send_server_notice/t1".to_owned(),
            json!({ "user_id": user, "content": { "msgtype": "m.text", "body": "hi" } }),
        ),
        (Method::POST, format!("/_synapse/admin/v1/room/{room}/media/quarantine"), json!({})),
    ];
    for (method, route, body) in &writes {
        for who in [&c.auditor.1, &c.user.1] {
            let result = s.call(method.clone(), route, Some(who), Some(body.clone())).await;
            assert_error(&result, StatusCode::FORBIDDEN, "M_FORBIDDEN");
        }
        assert_error(
            &s.call(method.clone(), route, None, Some(body.clone())).await,
            StatusCode::UNAUTHORIZED,
            "M_MISSING_TOKEN",
        );
    }
    let services = s.server().services();
    assert!(services.users.get(&crate::common::user_id("@newcomer:localhost")).unwrap().is_none());
    let (_, tokens) = s.get("/_synapse/admin/v1/registration_tokens", Some(&c.admin.1)).await;
    assert_eq!(tokens["registration_tokens"].as_array().unwrap().len(), 1);
    let (_, reports) = s.get("/_synapse/admin/v1/event_reports", Some(&c.admin.1)).await;
    assert_eq!(reports["total"], 1);
    let (_, members) =
        s.get(&format!("/_synapse/admin/v1/rooms/{room}/members"), Some(&c.admin.1)).await;
    assert_eq!(members["total"], 1);
    // And every change works for an admin.
    for (method, route, body) in &writes {
        let (status, answer) =
            s.call(method.clone(), route, Some(&c.admin.1), Some(body.clone())).await;
        assert!(status.is_success(), "{method} {route}: {status} {answer}");
    }
}

#[tokio::test]
async fn accounts_are_created_and_changed_like_synapse() {
    let s = TestServer::start().await;
    let c = cast(&s).await;
    let admin = &c.admin.1;
    let path = "/_synapse/admin/v2/users/@carol:localhost";
    let (status, body) = s
        .put(
            path,
            Some(admin),
            json!({ "password": "carol-password", "displayname": "Carol", "user_type": "bot",
                    "threepids": [{ "medium": "email", "address": "carol@example.com" }] }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["name"], "@carol:localhost");
    assert_eq!(body["displayname"], "Carol");
    assert_eq!(body["user_type"], "bot");
    assert_eq!(body["admin"], false);
    let (status, login) = s.login("carol", "carol-password").await;
    assert_eq!(status, StatusCode::OK, "{login}");
    let carol_token = login["access_token"].as_str().unwrap().to_owned();

    // Modifying answers 200; a new password ends the sessions unless asked not to.
    let (status, body) = s
        .put(
            path,
            Some(admin),
            json!({ "displayname": "Carol C", "admin": true, "password": "carol-password-2",
                    "user_type": null }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (body["displayname"].clone(), body["admin"].clone()),
        (json!("Carol C"), json!(true))
    );
    assert_eq!(body["user_type"], Value::Null);
    let whoami = s.get("/_matrix/client/v3/account/whoami", Some(&carol_token)).await;
    assert_error(&whoami, StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN");
    assert_eq!(s.login("carol", "carol-password-2").await.0, StatusCode::OK);

    // Locking, deactivating, and reactivating (which needs a password).
    assert_eq!(s.put(path, Some(admin), json!({ "locked": true })).await.1["locked"], true);
    assert_eq!(s.put(path, Some(admin), json!({ "locked": false })).await.1["locked"], false);
    let (status, body) = s.put(path, Some(admin), json!({ "deactivated": true })).await;
    assert_eq!((status, body["deactivated"].clone()), (StatusCode::OK, json!(true)), "{body}");
    assert_eq!(body["admin"], false);
    assert_ne!(s.login("carol", "carol-password-2").await.0, StatusCode::OK);
    // Deactivating twice is harmless.
    assert_eq!(s.put(path, Some(admin), json!({ "deactivated": true })).await.0, StatusCode::OK);
    assert_error(
        &s.put(path, Some(admin), json!({ "deactivated": false })).await,
        StatusCode::BAD_REQUEST,
        "M_MISSING_PARAM",
    );
    let (status, body) = s
        .put(path, Some(admin), json!({ "deactivated": false, "password": "carol-password-3" }))
        .await;
    assert_eq!((status, body["deactivated"].clone()), (StatusCode::OK, json!(false)), "{body}");
    assert_eq!(s.login("carol", "carol-password-3").await.0, StatusCode::OK);

    // Bad input changes nothing.
    let bad = [
        json!({ "user_type": "wizard" }),
        json!({ "admin": "yes" }),
        json!({ "password": "short" }),
    ];
    for body in bad {
        assert_eq!(s.put(path, Some(admin), body).await.0, StatusCode::BAD_REQUEST);
    }
    let remote =
        s.put("/_synapse/admin/v2/users/@eve:elsewhere.example", Some(admin), json!({})).await;
    assert_error(&remote, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    // An admin cannot take away their own admin flag.
    let own = format!("/_synapse/admin/v2/users/{}", c.admin.0);
    assert_error(
        &s.put(&own, Some(admin), json!({ "admin": false })).await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );

    let actions = [
        "admin.user.create",
        "admin.user.modify",
        "admin.user.set_role",
        "admin.user.reset_password",
        "admin.user.lock",
        "admin.user.unlock",
        "admin.user.deactivate",
        "admin.user.reactivate",
    ];
    for action in actions {
        let records = audited(&s, admin, action).await;
        assert!(
            records
                .iter()
                .any(|r| r["target"] == "@carol:localhost" && r["actor"]["user_id"] == c.admin.0),
            "{action}: {records:?}"
        );
    }
}

#[tokio::test]
async fn room_state_and_messages_for_admins() {
    let s = TestServer::start().await;
    let c = cast(&s).await;
    let room = s.create_room(&c.user.1, json!({ "name": "Secret plans" })).await;
    for i in 0..5 {
        say(&s, &c.user.1, &room, &format!("m{i}"), &format!("message {i}")).await;
    }
    let (status, state) =
        s.get(&format!("/_synapse/admin/v1/rooms/{room}/state"), Some(&c.admin.1)).await;
    assert_eq!(status, StatusCode::OK, "{state}");
    let types: Vec<&str> =
        state["state"].as_array().unwrap().iter().filter_map(|e| e["type"].as_str()).collect();
    assert!(types.contains(&"m.room.create") && types.contains(&"m.room.name"), "{types:?}");

    // The admin is not in the room and still reads it, a page at a time, newest first.
    let base = format!("/_synapse/admin/v1/rooms/{room}/messages");
    let filter = enc(r#"{"types":["m.room.message"]}"#);
    let (status, page) =
        s.get(&format!("{base}?dir=b&limit=3&filter={filter}"), Some(&c.admin.1)).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let bodies = |page: &Value| -> Vec<String> {
        page["chunk"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["content"]["body"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    assert_eq!(bodies(&page), ["message 4", "message 3", "message 2"]);
    let end = page["end"].as_str().unwrap();
    let (_, next) =
        s.get(&format!("{base}?dir=b&limit=3&filter={filter}&from={end}"), Some(&c.admin.1)).await;
    assert_eq!(bodies(&next), ["message 1", "message 0"]);
    let (_, forward) = s.get(&format!("{base}?dir=f&limit=100"), Some(&c.admin.1)).await;
    assert_eq!(forward["chunk"][0]["type"], "m.room.create");
    assert!(forward.get("end").is_none(), "{forward}");
    assert_error(
        &s.get(&format!("{base}?dir=x"), Some(&c.admin.1)).await,
        StatusCode::BAD_REQUEST,
        "M_INVALID_PARAM",
    );
    assert_error(
        &s.get("/_synapse/admin/v1/rooms/!nope:localhost/messages", Some(&c.admin.1)).await,
        StatusCode::NOT_FOUND,
        "M_NOT_FOUND",
    );
}

#[tokio::test]
async fn force_join_and_make_room_admin() {
    let s = TestServer::start().await;
    let c = cast(&s).await;
    let (bob, bob_token, _) = s.register("bob", "password-b").await;
    let admin = &c.admin.1;
    let public = s
        .create_room(&c.user.1, json!({ "preset": "public_chat", "room_alias_name": "lobby" }))
        .await;
    let private = s.create_room(&c.user.1, json!({})).await;

    // A public room, by alias; joining twice is harmless.
    for _ in 0..2 {
        let (status, body) = s
            .post(
                &format!("/_synapse/admin/v1/join/{}", enc("#lobby:localhost")),
                Some(admin),
                json!({ "user_id": bob }),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["room_id"], public);
    }
    // A private room: its creator (a local member who may invite) brings bob in.
    let (status, body) = s
        .post(&format!("/_synapse/admin/v1/join/{private}"), Some(admin), json!({ "user_id": bob }))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, joined) = s.get("/_matrix/client/v3/joined_rooms", Some(&bob_token)).await;
    let joined = joined["joined_rooms"].as_array().unwrap();
    assert!(joined.contains(&json!(public)) && joined.contains(&json!(private)), "{joined:?}");
    assert!(!audited(&s, admin, "admin.room.join").await.is_empty());
    assert!(!audited(&s, admin, "admin.room.invite").await.is_empty());
    assert_error(
        &s.post("/_synapse/admin/v1/join/!nope:localhost", Some(admin), json!({ "user_id": bob }))
            .await,
        StatusCode::NOT_FOUND,
        "M_NOT_FOUND",
    );

    // Room admin for the caller: granted through the creator, and invited to the private room.
    let (status, body) = s
        .post(
            &format!("/_synapse/admin/v1/rooms/{private}/make_room_admin"),
            Some(admin),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, power) = s
        .get(
            &format!("/_matrix/client/v3/rooms/{private}/state/m.room.power_levels/"),
            Some(&bob_token),
        )
        .await;
    assert_eq!(power["users"][&c.admin.0], 100, "{power}");
    let (_, sync) = s.get("/_matrix/client/v3/sync", Some(admin)).await;
    assert!(sync["rooms"]["invite"].get(&private).is_some(), "{sync}");
    // For someone else, by body; a second time changes nothing.
    for _ in 0..2 {
        let path = format!("/_synapse/admin/v1/rooms/{private}/make_room_admin");
        assert_eq!(s.post(&path, Some(admin), json!({ "user_id": bob })).await.0, StatusCode::OK);
    }
    let records = audited(&s, admin, "admin.room.make_room_admin").await;
    assert_eq!(records.len(), 2, "{records:?}");

    // Nobody is joined to a blocked room, not even by an admin.
    let blocked = s.create_room(&c.user.1, json!({ "preset": "public_chat" })).await;
    let block = format!("/_synapse/admin/v1/rooms/{blocked}/block");
    assert_eq!(s.put(&block, Some(admin), json!({ "block": true })).await.0, StatusCode::OK);
    assert_error(
        &s.post(
            &format!("/_synapse/admin/v1/join/{blocked}"),
            Some(admin),
            json!({ "user_id": bob }),
        )
        .await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );
}

#[tokio::test]
async fn event_reports_list_read_and_delete() {
    let s = TestServer::start().await;
    let c = cast(&s).await;
    let room = s.create_room(&c.user.1, json!({ "name": "Reported" })).await;
    let first = say(&s, &c.user.1, &room, "a", "first").await;
    let second = say(&s, &c.user.1, &room, "b", "second").await;
    report(&s, &c, &room, &first).await;
    let id = report(&s, &c, &room, &second).await;

    let (status, list) = s.get("/_synapse/admin/v1/event_reports", Some(&c.auditor.1)).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(list["total"], 2);
    let newest = &list["event_reports"][0];
    assert_eq!(newest["event_id"], second);
    assert_eq!(
        (newest["user_id"].clone(), newest["sender"].clone()),
        (json!(c.user.0), json!(c.user.0))
    );
    assert_eq!(
        (newest["name"].clone(), newest["reason"].clone()),
        (json!("Reported"), json!("spam"))
    );
    let (_, page) = s.get("/_synapse/admin/v1/event_reports?limit=1&dir=f", Some(&c.admin.1)).await;
    assert_eq!(
        (page["event_reports"][0]["event_id"].clone(), page["next_token"].clone()),
        (json!(first), json!(1))
    );
    let (_, none) =
        s.get("/_synapse/admin/v1/event_reports?user_id=@nobody", Some(&c.admin.1)).await;
    assert_eq!(none["total"], 0);

    let path = format!("/_synapse/admin/v1/event_reports/{id}");
    let (status, detail) = s.get(&path, Some(&c.admin.1)).await;
    assert_eq!(status, StatusCode::OK, "{detail}");
    assert_eq!(detail["event_json"]["content"]["body"], "second");
    for _ in 0..2 {
        assert_eq!(s.call(Method::DELETE, &path, Some(&c.admin.1), None).await.0, StatusCode::OK);
    }
    assert_error(&s.get(&path, Some(&c.admin.1)).await, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    assert_eq!(audited(&s, &c.admin.1, "admin.report.delete").await.len(), 1);
}

#[tokio::test]
async fn registration_tokens_from_the_admin_api_register_accounts() {
    let s = TestServer::start_with(|c| {
        c.registration.mode = plaza::config::RegistrationMode::Token;
        c.registration.tokens = vec!["bootstrap".into()];
    })
    .await;
    let register = |name: &'static str, token: String| {
        let s = &s;
        async move {
            let body = json!({ "username": name, "password": "long enough pw" });
            let (status, challenge) = s.post("/_matrix/client/v3/register", None, body).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{challenge}");
            let session = challenge["session"].as_str().unwrap();
            s.post(
                "/_matrix/client/v3/register",
                None,
                json!({ "username": name, "password": "long enough pw",
                        "auth": { "type": "m.login.registration_token", "token": token, "session": session } }),
            )
            .await
        }
    };
    let (status, root) = register("root", "bootstrap".into()).await;
    assert_eq!(status, StatusCode::OK, "{root}");
    s.set_role("@root:localhost", "admin");
    let admin_token = root["access_token"].as_str().unwrap().to_owned();
    let admin = Some(admin_token.as_str());

    let (status, made) = s
        .post(
            "/_synapse/admin/v1/registration_tokens/new",
            admin,
            json!({ "uses_allowed": 1, "length": 20 }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{made}");
    let token = made["token"].as_str().unwrap().to_owned();
    assert_eq!(token.len(), 20);
    assert_eq!((made["uses_allowed"].clone(), made["completed"].clone()), (json!(1), json!(0)));
    let validity =
        format!("/_matrix/client/v1/register/m.login.registration_token/validity?token={token}");
    assert_eq!(s.get(&validity, None).await.1["valid"], true);

    let (status, body) = register("dora", token.clone()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(s.get(&validity, None).await.1["valid"], false);
    let (status, used_up) = register("eve", token.clone()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{used_up}");
    let path = format!("/_synapse/admin/v1/registration_tokens/{token}");
    assert_eq!(s.get(&path, admin).await.1["completed"], 1);
    let (_, invalid) = s.get("/_synapse/admin/v1/registration_tokens?valid=false", admin).await;
    assert_eq!(invalid["registration_tokens"][0]["token"], token);
    let (_, valid) = s.get("/_synapse/admin/v1/registration_tokens?valid=true", admin).await;
    assert_eq!(valid["registration_tokens"], json!([]));

    // Lifting the limit makes it work again.
    let (status, changed) = s.put(&path, admin, json!({ "uses_allowed": null })).await;
    assert_eq!(
        (status, changed["uses_allowed"].clone()),
        (StatusCode::OK, Value::Null),
        "{changed}"
    );
    assert_eq!(register("eve", token.clone()).await.0, StatusCode::OK);

    // Named tokens, duplicates and bad values.
    let new = "/_synapse/admin/v1/registration_tokens/new";
    assert_eq!(s.post(new, admin, json!({ "token": "team-2026" })).await.0, StatusCode::OK);
    let bad = [
        json!({ "token": "team-2026" }),
        json!({ "token": "has space" }),
        json!({ "length": 0 }),
        json!({ "uses_allowed": -1 }),
        json!({ "expiry_time": 1 }),
    ];
    for body in bad {
        assert_error(&s.post(new, admin, body).await, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    }
    let past = s
        .put("/_synapse/admin/v1/registration_tokens/team-2026", admin, json!({ "expiry_time": 5 }))
        .await;
    assert_error(&past, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    for _ in 0..2 {
        assert_eq!(s.call(Method::DELETE, &path, admin, None).await.0, StatusCode::OK);
    }
    assert_error(&s.get(&path, admin).await, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    assert_error(
        &s.put(&path, admin, json!({ "uses_allowed": 3 })).await,
        StatusCode::NOT_FOUND,
        "M_NOT_FOUND",
    );
    // Created twice, changed once, deleted once (the second deletion changed nothing).
    assert_eq!(audited(&s, &admin_token, "admin.registration_token.*").await.len(), 4);
}

/// The joined room in `sync` whose timeline has an event with `body`, with its id.
fn room_with_message<'a>(sync: &'a Value, body: &str) -> Option<(&'a String, &'a Value)> {
    sync["rooms"]["join"].as_object()?.iter().find(|(_, room)| {
        room["timeline"]["events"]
            .as_array()
            .is_some_and(|events| events.iter().any(|e| e["content"]["body"] == body))
    })
}

fn tagged_server_notice(room: &Value) -> bool {
    room["account_data"]["events"].as_array().is_some_and(|events| {
        events
            .iter()
            .any(|e| e["type"] == "m.tag" && e["content"]["tags"].get("m.server_notice").is_some())
    })
}

#[tokio::test]
async fn new_accounts_join_default_rooms_and_get_the_welcome_notice() {
    let s = TestServer::start_with(|c| {
        c.onboarding.auto_join_rooms = vec![
            "#general:localhost".into(),
            "#staff:localhost".into(),
            "#missing:localhost".into(),
        ];
        c.onboarding.welcome_notice = Some("Welcome aboard!".into());
        c.onboarding.welcome_notice_html = Some("<b>Welcome aboard!</b>".into());
        c.server_notices.display_name = "Plaza notices".into();
    })
    .await;
    let c = cast(&s).await;
    let general = s
        .create_room(&c.admin.1, json!({ "preset": "public_chat", "room_alias_name": "general" }))
        .await;
    let staff = s.create_room(&c.admin.1, json!({ "room_alias_name": "staff" })).await;

    let (_, token, _) = s.register("newbie", "password-n").await;
    let (status, sync) = s.get("/_matrix/client/v3/sync", Some(&token)).await;
    assert_eq!(status, StatusCode::OK, "{sync}");
    let joined = sync["rooms"]["join"].as_object().unwrap();
    assert!(joined.contains_key(&general) && joined.contains_key(&staff), "{sync}");
    let (notices_room, room) = room_with_message(&sync, "Welcome aboard!").expect("welcome notice");
    assert!(tagged_server_notice(room), "{room}");
    let notice = room["timeline"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["content"]["body"] == "Welcome aboard!")
        .unwrap();
    assert_eq!(notice["sender"], "@notices:localhost");
    assert_eq!(notice["content"]["formatted_body"], "<b>Welcome aboard!</b>");
    let (_, profile) = s.get("/_matrix/client/v3/profile/@notices:localhost", Some(&token)).await;
    assert_eq!(profile["displayname"], "Plaza notices");
    // The user reads but cannot write there.
    assert_error(
        &s.send_text(&token, notices_room, "t1", "hello?").await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );

    // Later notices reuse the room, even after the user left it.
    let (status, left) = s.membership(&token, notices_room, "leave", json!({})).await;
    assert_eq!(status, StatusCode::OK, "{left}");
    let (status, sent) = s
        .post(
            "/_synapse/admin/v1/send_server_notice",
            Some(&c.admin.1),
            json!({ "user_id": "@newbie:localhost", "content": { "msgtype": "m.text", "body": "Maintenance at noon" } }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{sent}");
    let event_id = sent["event_id"].as_str().unwrap();
    let (_, event) = s
        .get(
            &format!("/_matrix/client/v3/rooms/{notices_room}/event/{}", enc(event_id)),
            Some(&token),
        )
        .await;
    assert_eq!(event["content"]["body"], "Maintenance at noon", "{event}");
    // With a transaction id, a repeated request answers the first notice.
    let notice = json!({ "user_id": "@newbie:localhost", "content": { "msgtype": "m.text", "body": "Once" } });
    let mut ids = Vec::new();
    for _ in 0..2 {
        let path = "/_synapse/admin/v1/send_server_notice/txn1";
        let (status, sent) = s.put(path, Some(&c.admin.1), notice.clone()).await;
        assert_eq!(status, StatusCode::OK, "{sent}");
        ids.push(sent["event_id"].clone());
    }
    assert_eq!(ids[0], ids[1]);
    let records = audited(&s, &c.admin.1, "admin.server_notice").await;
    assert_eq!(records.len(), 2);
    assert!(!records[0].to_string().contains("Maintenance"), "no content in the audit log");

    // Nobody may register as the notices account, and it gets no notices itself.
    let taken = s
        .post(
            "/_matrix/client/v3/register",
            None,
            json!({ "username": "notices", "password": "password-x", "auth": { "type": "m.login.dummy" } }),
        )
        .await;
    assert_error(&taken, StatusCode::BAD_REQUEST, "M_USER_IN_USE");
    let unknown = s
        .post(
            "/_synapse/admin/v1/send_server_notice",
            Some(&c.admin.1),
            json!({ "user_id": "@ghost:localhost", "content": { "body": "boo" } }),
        )
        .await;
    assert_error(&unknown, StatusCode::NOT_FOUND, "M_NOT_FOUND");

    // Accounts made through the admin API are onboarded too.
    let (status, _) = s
        .put(
            "/_synapse/admin/v2/users/@hired:localhost",
            Some(&c.admin.1),
            json!({ "password": "password-h" }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (_, rooms) =
        s.get("/_synapse/admin/v1/users/@hired:localhost/joined_rooms", Some(&c.admin.1)).await;
    assert_eq!(rooms["total"], 3, "{rooms}");
}

#[tokio::test]
async fn shared_secret_accounts_are_onboarded() {
    use hmac::Mac;
    let s = TestServer::start_with(|c| {
        c.registration.shared_secret = Some("s3cret".into());
        c.onboarding.welcome_notice = Some("Hello from the server".into());
    })
    .await;
    let path = "/_synapse/admin/v1/register";
    let nonce = s.get(path, None).await.1["nonce"].as_str().unwrap().to_owned();
    let mut mac = hmac::Hmac::<sha1::Sha1>::new_from_slice(b"s3cret").unwrap();
    mac.update(format!("{nonce}\0robot\0pw12345678\0notadmin").as_bytes());
    let mac = hex::encode(mac.finalize().into_bytes());
    let body = json!({ "nonce": nonce, "username": "robot", "password": "pw12345678", "mac": mac });
    let (status, created) = s.post(path, None, body).await;
    assert_eq!(status, StatusCode::OK, "{created}");
    let token = created["access_token"].as_str().unwrap();
    let (_, sync) = s.get("/_matrix/client/v3/sync", Some(token)).await;
    let (_, room) = room_with_message(&sync, "Hello from the server").expect("welcome notice");
    assert!(tagged_server_notice(room));
}

#[tokio::test]
async fn a_rooms_media_is_listed_and_quarantined() {
    let s = TestServer::start().await;
    let c = cast(&s).await;
    let room = s.create_room(&c.user.1, json!({})).await;
    let response = s
        .http
        .post(format!("{}/_matrix/media/v3/upload", s.base))
        .bearer_auth(&c.user.1)
        .header(header::CONTENT_TYPE, "text/plain")
        .body("evidence")
        .send()
        .await
        .unwrap();
    let uri = response.json::<Value>().await.unwrap()["content_uri"].as_str().unwrap().to_owned();
    let path = format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/img");
    let content = json!({ "msgtype": "m.file", "body": "file.txt", "url": uri,
                          "info": { "thumbnail_url": "mxc://elsewhere.example/remote1" } });
    assert_eq!(s.put(&path, Some(&c.user.1), content).await.0, StatusCode::OK);

    let (status, media) =
        s.get(&format!("/_synapse/admin/v1/room/{room}/media"), Some(&c.auditor.1)).await;
    assert_eq!(status, StatusCode::OK, "{media}");
    assert_eq!(media, json!({ "local": [uri], "remote": ["mxc://elsewhere.example/remote1"] }));

    let media_id = uri.strip_prefix("mxc://localhost/").unwrap();
    let download = format!("/_matrix/client/v1/media/download/localhost/{media_id}");
    let fetch = |s: &TestServer| {
        s.http.get(format!("{}{download}", s.base)).bearer_auth(c.user.1.clone()).send()
    };
    assert_eq!(fetch(&s).await.unwrap().status(), StatusCode::OK);
    let quarantine = format!("/_synapse/admin/v1/room/{room}/media/quarantine");
    let (status, body) = s.post(&quarantine, Some(&c.admin.1), json!({})).await;
    assert_eq!((status, body), (StatusCode::OK, json!({ "num_quarantined": 1 })));
    assert_eq!(fetch(&s).await.unwrap().status(), StatusCode::NOT_FOUND);
    assert_eq!(audited(&s, &c.admin.1, "media.quarantine").await.len(), 1);
}

/// The notices account's name cannot be taken through any way of making accounts, and accounts
/// an admin creates count among the day's new users.
#[tokio::test]
async fn notices_name_is_reserved_and_admin_made_accounts_are_counted() {
    let s = TestServer::start().await;
    let c = cast(&s).await;
    let admin = &c.admin.1;
    let taken = s.get("/_matrix/client/v3/register/available?username=notices", None).await;
    assert_error(&taken, StatusCode::BAD_REQUEST, "M_USER_IN_USE");
    let made = s.put("/_synapse/admin/v2/users/@notices:localhost", Some(admin), json!({})).await;
    assert_error(&made, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");

    let analytics = "/_plaza/admin/v1/analytics/new_users";
    let before = s.get(analytics, Some(admin)).await.1["total"].as_u64().unwrap();
    let (status, _) =
        s.put("/_synapse/admin/v2/users/@hire:localhost", Some(admin), json!({})).await;
    assert_eq!(status, StatusCode::CREATED);
    let after = s.get(analytics, Some(admin)).await.1["total"].as_u64().unwrap();
    assert_eq!(after, before + 1);
}
