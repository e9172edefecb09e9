//! The admin API: roles (admin, auditor, user) set over HTTP and the CLI, every route with an
//! admin, an auditor and an ordinary user, and the Synapse shapes admin tooling reads.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::common::{TestServer, assert_error, binary};

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

/// Read routes: admins and auditors get 200, ordinary users `M_FORBIDDEN`.
#[tokio::test]
async fn read_routes_answer_admins_and_auditors_only() {
    let s = TestServer::start().await;
    let c = cast(&s).await;
    let user = &c.user.0;
    let room = s.create_room(&c.user.1, json!({})).await;
    let routes = [
        format!("/_synapse/admin/v1/users/{user}/admin"),
        format!("/_plaza/admin/v1/users/{user}/role"),
        "/_synapse/admin/v2/users".to_owned(),
        format!("/_synapse/admin/v2/users/{user}"),
        format!("/_synapse/admin/v2/users/{user}/devices"),
        format!("/_synapse/admin/v1/users/{user}/joined_rooms"),
        format!("/_synapse/admin/v1/whois/{user}"),
        "/_plaza/admin/v1/audit".to_owned(),
        "/_plaza/admin/v1/audit/verify".to_owned(),
        "/_synapse/admin/v1/rooms".to_owned(),
        format!("/_synapse/admin/v1/rooms/{room}"),
        format!("/_synapse/admin/v1/rooms/{room}/members"),
        format!("/_synapse/admin/v1/rooms/{room}/block"),
    ];
    for route in &routes {
        for token in [&c.admin.1, &c.auditor.1] {
            let (status, body) = s.get(route, Some(token)).await;
            assert_eq!(status, StatusCode::OK, "{route}: {body}");
        }
        assert_error(&s.get(route, Some(&c.user.1)).await, StatusCode::FORBIDDEN, "M_FORBIDDEN");
        assert_error(&s.get(route, None).await, StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN");
    }
}

/// Mutating routes: auditors and ordinary users get `M_FORBIDDEN` and nothing changes.
#[tokio::test]
async fn mutating_routes_refuse_auditors_and_users() {
    let s = TestServer::start().await;
    let c = cast(&s).await;
    let user = &c.user.0;
    let room = s.create_room(&c.user.1, json!({})).await;
    let routes = [
        (Method::PUT, format!("/_synapse/admin/v1/users/{user}/admin"), json!({ "admin": true })),
        (Method::PUT, format!("/_plaza/admin/v1/users/{user}/role"), json!({ "role": "admin" })),
        (Method::POST, format!("/_synapse/admin/v1/deactivate/{user}"), json!({})),
        (
            Method::POST,
            format!("/_synapse/admin/v1/reset_password/{user}"),
            json!({ "new_password": "another-password" }),
        ),
        (Method::PUT, format!("/_synapse/admin/v1/rooms/{room}/block"), json!({ "block": true })),
        (Method::DELETE, format!("/_synapse/admin/v2/rooms/{room}"), json!({ "block": true })),
    ];
    for (method, route, body) in &routes {
        for token in [&c.auditor.1, &c.user.1] {
            let result = s.call(method.clone(), route, Some(token), Some(body.clone())).await;
            assert_error(&result, StatusCode::FORBIDDEN, "M_FORBIDDEN");
        }
    }
    let (_, account) = s.get(&format!("/_synapse/admin/v2/users/{user}"), Some(&c.admin.1)).await;
    assert_eq!(
        (account["admin"].clone(), account["deactivated"].clone()),
        (json!(false), json!(false))
    );
    assert_eq!(s.login("ursula", "password-u").await.0, StatusCode::OK);
    let (_, details) = s.get(&format!("/_synapse/admin/v1/rooms/{room}"), Some(&c.admin.1)).await;
    assert_eq!(
        (details["blocked"].clone(), details["joined_members"].clone()),
        (json!(false), json!(1))
    );
}

#[tokio::test]
async fn roles_change_over_the_api_and_are_audited() {
    let s = TestServer::start().await;
    let c = cast(&s).await;
    let (admin, token) = (&c.admin.0, &c.admin.1);
    let user = &c.user.0;
    let role_path = format!("/_plaza/admin/v1/users/{user}/role");

    let (status, body) = s.put(&role_path, Some(token), json!({ "role": "auditor" })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["previous"], "user");
    assert_eq!(s.get(&role_path, Some(token)).await.1["role"], "auditor");
    // The new auditor reads at once, and still cannot change anything.
    assert_eq!(s.get("/_plaza/admin/v1/audit", Some(&c.user.1)).await.0, StatusCode::OK);

    let admin_path = format!("/_synapse/admin/v1/users/{user}/admin");
    assert_eq!(s.get(&admin_path, Some(token)).await.1, json!({ "admin": false }));
    assert_eq!(s.put(&admin_path, Some(token), json!({ "admin": true })).await.0, StatusCode::OK);
    assert_eq!(s.get(&admin_path, Some(token)).await.1, json!({ "admin": true }));
    assert_eq!(s.get(&role_path, Some(token)).await.1["role"], "admin");
    assert_eq!(s.put(&admin_path, Some(token), json!({ "admin": false })).await.0, StatusCode::OK);
    assert_eq!(s.get(&role_path, Some(token)).await.1["role"], "user");

    // Bad input.
    let bad_role = s.put(&role_path, Some(token), json!({ "role": "owner" })).await;
    assert_error(&bad_role, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    let own_path = format!("/_plaza/admin/v1/users/{admin}/role");
    let own = s.put(&own_path, Some(token), json!({ "role": "user" })).await;
    assert_error(&own, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let missing = s.get("/_plaza/admin/v1/users/@nobody:localhost/role", Some(token)).await;
    assert_error(&missing, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    let invalid = s.get("/_plaza/admin/v1/users/not-a-user/role", Some(token)).await;
    assert_error(&invalid, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    let not_json = s.call(Method::PUT, &role_path, Some(token), None).await;
    assert_eq!(not_json.0, StatusCode::BAD_REQUEST);

    let (_, audit) = s
        .get(
            &format!("/_plaza/admin/v1/audit?action=admin.user.set_role&target={user}"),
            Some(token),
        )
        .await;
    let changes: Vec<(Value, Value, Value)> = audit["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["actor"]["user_id"].clone(),
                r["details"]["from"].clone(),
                r["details"]["to"].clone(),
            )
        })
        .collect();
    let expected = [("user", "auditor"), ("auditor", "admin"), ("admin", "user")]
        .map(|(from, to)| (json!(admin), json!(from), json!(to)));
    assert_eq!(changes, expected);
}

#[tokio::test]
async fn the_cli_sets_roles_and_records_them() {
    let s = TestServer::start().await;
    let (carol, token, _) = s.register("carol", "password-c").await;
    let s = s
        .restart_after(|dir| {
            let output = std::process::Command::new(binary())
                .args(["set-role", "carol", "auditor"])
                .env_remove("PLAZA_CONFIG")
                .env("PLAZA_DATABASE__PATH", dir)
                .output()
                .unwrap();
            assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
            let stdout = String::from_utf8_lossy(&output.stdout);
            assert!(stdout.contains("user -> auditor"), "{stdout}");
        })
        .await;
    let (status, body) =
        s.get("/_plaza/admin/v1/audit?action=admin.user.set_role", Some(&token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let record = &body["records"][0];
    assert_eq!(record["target"], carol);
    assert_eq!(record["details"]["via"], "cli");
    assert!(record["actor"]["user_id"].is_null());
    let carol_path = format!("/_plaza/admin/v1/users/{carol}/role");
    let change = s.put(&carol_path, Some(&token), json!({ "role": "admin" })).await;
    assert_error(&change, StatusCode::FORBIDDEN, "M_FORBIDDEN");
}

#[tokio::test]
async fn users_are_listed_and_managed_in_synapse_shapes() {
    let s = TestServer::start().await;
    let c = cast(&s).await;
    let token = &c.admin.1;
    let user = &c.user.0;

    let (status, list) = s.get("/_synapse/admin/v2/users?limit=2", Some(token)).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(list["total"], 3);
    assert_eq!(list["users"].as_array().unwrap().len(), 2);
    assert_eq!(list["next_token"], "2");
    let first = &list["users"][0];
    for key in [
        "name",
        "is_guest",
        "admin",
        "deactivated",
        "displayname",
        "avatar_url",
        "creation_ts",
        "locked",
        "user_type",
        "shadow_banned",
    ] {
        assert!(first.get(key).is_some(), "{key} missing from {first}");
    }
    let (_, admins) = s.get("/_synapse/admin/v2/users?admins=true", Some(token)).await;
    assert_eq!(admins["users"].as_array().unwrap().len(), 1);
    assert_eq!(admins["users"][0]["name"], c.admin.0);
    let (_, found) = s.get("/_synapse/admin/v2/users?name=ursu", Some(token)).await;
    assert_eq!(found["users"][0]["name"], *user);
    let bad = s.get("/_synapse/admin/v2/users?order_by=shoe_size", Some(token)).await;
    assert_error(&bad, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    let bad = s.get("/_synapse/admin/v2/users?limit=many", Some(token)).await;
    assert_error(&bad, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");

    let (_, whois) = s.get(&format!("/_synapse/admin/v1/whois/{user}"), Some(token)).await;
    assert_eq!(whois["user_id"], *user);
    assert_eq!(whois["devices"][""]["sessions"].as_array().unwrap().len(), 1);
    let (_, devices) =
        s.get(&format!("/_synapse/admin/v2/users/{user}/devices"), Some(token)).await;
    assert_eq!(devices["total"], 1);

    let reset = format!("/_synapse/admin/v1/reset_password/{user}");
    assert_eq!(
        s.post(&reset, Some(token), json!({ "new_password": "brand-new-pw" })).await.0,
        StatusCode::OK
    );
    assert_eq!(s.login("ursula", "password-u").await.0, StatusCode::FORBIDDEN);
    assert_eq!(s.login("ursula", "brand-new-pw").await.0, StatusCode::OK);
    let weak = s.post(&reset, Some(token), json!({ "new_password": "x" })).await;
    assert_error(&weak, StatusCode::BAD_REQUEST, "M_WEAK_PASSWORD");

    let deactivate = format!("/_synapse/admin/v1/deactivate/{user}");
    for _ in 0..2 {
        let (status, body) = s.post(&deactivate, Some(token), json!({ "erase": true })).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let (_, account) = s.get(&format!("/_synapse/admin/v2/users/{user}"), Some(token)).await;
    assert_eq!(account["deactivated"], true);
    assert_eq!(s.login("ursula", "brand-new-pw").await.0, StatusCode::FORBIDDEN);
    let (_, hidden) = s.get("/_synapse/admin/v2/users", Some(token)).await;
    assert_eq!(hidden["total"], 2);
    let (_, shown) = s.get("/_synapse/admin/v2/users?deactivated=true", Some(token)).await;
    assert_eq!(shown["total"], 3);

    let (_, audit) = s
        .get(&format!("/_plaza/admin/v1/audit?action=admin.user.*&target={user}"), Some(token))
        .await;
    let actions: Vec<&str> = audit["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["admin.user.reset_password", "admin.user.deactivate"]);
    let missing = s.get("/_synapse/admin/v2/users/@ghost:localhost", Some(token)).await;
    assert_error(&missing, StatusCode::NOT_FOUND, "M_NOT_FOUND");
}

#[tokio::test]
async fn rooms_are_listed_blocked_and_deleted() {
    let s = TestServer::start().await;
    let c = cast(&s).await;
    let token = &c.admin.1;
    let (user, user_token) = (&c.user.0, &c.user.1);
    let room = s.create_room(user_token, json!({ "name": "Sales", "preset": "public_chat" })).await;
    let other = s.create_room(user_token, json!({ "name": "Engineering" })).await;
    assert_eq!(s.membership(&c.auditor.1, &room, "join", json!({})).await.0, StatusCode::OK);

    let (status, list) = s.get("/_synapse/admin/v1/rooms?order_by=name", Some(token)).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(list["total_rooms"], 2);
    assert_eq!(list["offset"], 0);
    let names: Vec<&str> =
        list["rooms"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["Engineering", "Sales"]);
    let (_, found) = s.get("/_synapse/admin/v1/rooms?search_term=sal", Some(token)).await;
    assert_eq!(found["rooms"][0]["room_id"], room);
    let (_, paged) = s.get("/_synapse/admin/v1/rooms?limit=1", Some(token)).await;
    assert_eq!(
        (paged["rooms"].as_array().unwrap().len(), paged["next_batch"].clone()),
        (1, json!(1))
    );
    let bad = s.get("/_synapse/admin/v1/rooms?order_by=colour", Some(token)).await;
    assert_error(&bad, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");

    let (_, details) = s.get(&format!("/_synapse/admin/v1/rooms/{room}"), Some(token)).await;
    assert_eq!(details["name"], "Sales");
    assert_eq!(details["joined_members"], 2);
    assert_eq!(details["creator"], *user);
    assert_eq!(details["join_rules"], "public");
    let (_, members) =
        s.get(&format!("/_synapse/admin/v1/rooms/{room}/members"), Some(token)).await;
    assert_eq!(members["total"], 2);
    let missing = s.get("/_synapse/admin/v1/rooms/!nope:localhost", Some(token)).await;
    assert_error(&missing, StatusCode::NOT_FOUND, "M_NOT_FOUND");

    // Block and unblock a room.
    let block = format!("/_synapse/admin/v1/rooms/{other}/block");
    assert_eq!(s.put(&block, Some(token), json!({ "block": true })).await.0, StatusCode::OK);
    assert_eq!(s.get(&block, Some(token)).await.1["block"], true);
    let refused = s.membership(&c.auditor.1, &other, "join", json!({})).await;
    assert_error(&refused, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    assert_eq!(s.put(&block, Some(token), json!({ "block": false })).await.0, StatusCode::OK);
    assert_eq!(s.get(&block, Some(token)).await.1, json!({ "block": false }));

    // Deleting removes every local member and blocks the room; deleting again is harmless.
    let delete = format!("/_synapse/admin/v2/rooms/{room}");
    for _ in 0..2 {
        let (status, body) =
            s.call(Method::DELETE, &delete, Some(token), Some(json!({ "block": true }))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(body["delete_id"].is_string());
    }
    let (_, status) =
        s.get(&format!("/_synapse/admin/v2/rooms/{room}/delete_status"), Some(token)).await;
    let results = status["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    assert_eq!(results[0]["status"], "complete");
    assert_eq!(results[0]["shutdown_room"]["kicked_users"].as_array().unwrap().len(), 2);
    assert_eq!(results[1]["shutdown_room"]["kicked_users"], json!([]));
    let (_, details) = s.get(&format!("/_synapse/admin/v1/rooms/{room}"), Some(token)).await;
    assert_eq!(
        (details["joined_members"].clone(), details["blocked"].clone()),
        (json!(0), json!(true))
    );
    let rejoin = s.membership(user_token, &room, "join", json!({})).await;
    assert_error(&rejoin, StatusCode::FORBIDDEN, "M_FORBIDDEN");

    let (_, audit) = s
        .get(&format!("/_plaza/admin/v1/audit?action=admin.room.*&room_id={room}"), Some(token))
        .await;
    let records = audit["records"].as_array().unwrap();
    assert_eq!(records.len(), 2, "{audit}");
    assert_eq!(records[0]["action"], "admin.room.delete");
    assert_eq!(records[0]["actor"]["user_id"], c.admin.0);
    assert_eq!(records[0]["actor"]["ip"], "127.0.0.1");
    assert_eq!(records[0]["details"]["block"], true);
    let (_, blocks) = s
        .get(&format!("/_plaza/admin/v1/audit?action=admin.room.*&room_id={other}"), Some(token))
        .await;
    let actions: Vec<&str> = blocks["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["admin.room.block", "admin.room.unblock"]);
}
