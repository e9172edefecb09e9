//! Off-boarding and onboarding as persisted jobs: deactivation by the user and by an admin,
//! successors for rooms that would be orphaned, erasure, and jobs that survive a crash.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::{
    Reaped, TestServer, assert_error, binary, enc, free_port, start_binary, write_config,
};

/// Polls `check` until it holds, for at most `secs` seconds.
async fn eventually<F, Fut>(secs: u64, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The membership of `user` in `room` as `token`'s owner reads it from the room state.
async fn membership_of(s: &TestServer, token: &str, room: &str, user: &str) -> Option<String> {
    let path = format!("/_matrix/client/v3/rooms/{room}/state/m.room.member/{user}");
    let (status, content) = s.get(&path, Some(token)).await;
    (status == StatusCode::OK).then(|| content["membership"].as_str().unwrap_or("").to_owned())
}

/// Audit records of `action` about `target`, oldest first.
async fn audited(s: &TestServer, admin: &str, action: &str, target: &str) -> Vec<Value> {
    let path = format!("/_plaza/admin/v1/audit?action={action}&target={}", enc(target));
    let (status, body) = s.get(&path, Some(admin)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["records"].as_array().unwrap().clone()
}

fn password_auth(user: &str, password: &str) -> Value {
    json!({ "type": "m.login.password", "password": password, "identifier": { "type": "m.id.user", "user": user } })
}

#[tokio::test]
async fn deactivation_leaves_rooms_rejects_invites_withdraws_knocks_and_removes_everything() {
    let s = TestServer::start().await;
    let (alice_id, alice, alice_device) = s.register("alice", "alice password").await;
    let (_, bob, _) = s.register("bob", "bob password").await;
    let (admin_id, admin, _) = s.register("root", "root password").await;
    s.set_role(&admin_id, "admin");

    let joined = s.create_room(&bob, json!({ "invite": [alice_id] })).await;
    assert_eq!(s.membership(&alice, &joined, "join", json!({})).await.0, StatusCode::OK);
    let invited = s.create_room(&bob, json!({ "invite": [alice_id] })).await;
    let knocked = s
        .create_room(
            &bob,
            json!({ "initial_state": [{ "type": "m.room.join_rules", "state_key": "", "content": { "join_rule": "knock" } }] }),
        )
        .await;
    let (status, body) =
        s.post(&format!("/_matrix/client/v3/knock/{knocked}"), Some(&alice), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // A pusher, one-time keys and a queued to-device message, all to go.
    let pusher = json!({
        "kind": "http", "app_id": "com.example.chat", "pushkey": "alice-phone",
        "app_display_name": "Chat", "device_display_name": "Phone", "lang": "en",
        "data": { "url": "http://127.0.0.1:9/_matrix/push/v1/notify" },
    });
    assert_eq!(
        s.post("/_matrix/client/v3/pushers/set", Some(&alice), pusher).await.0,
        StatusCode::OK
    );
    let keys = json!({ "one_time_keys": { "signed_curve25519:K1": { "key": "otk1" } } });
    assert_eq!(
        s.post("/_matrix/client/v3/keys/upload", Some(&alice), keys).await.0,
        StatusCode::OK
    );
    let message =
        json!({ "messages": { alice_id.as_str(): { alice_device.as_str(): { "hello": 1 } } } });
    let path = "/_matrix/client/v3/sendToDevice/m.test/t1";
    assert_eq!(s.put(path, Some(&bob), message).await.0, StatusCode::OK);
    let search = json!({ "search_term": "alice", "limit": 10 });
    let (_, found) =
        s.post("/_matrix/client/v3/user_directory/search", Some(&bob), search.clone()).await;
    assert_eq!(found["results"].as_array().unwrap().len(), 1, "{found}");

    // Bad auth changes nothing.
    let wrong = json!({ "auth": password_auth("alice", "not the password") });
    let refused = s.post("/_matrix/client/v3/account/deactivate", Some(&alice), wrong).await;
    assert_eq!(refused.0, StatusCode::UNAUTHORIZED, "{}", refused.1);

    let body = json!({ "auth": password_auth("alice", "alice password") });
    let (status, body) = s.post("/_matrix/client/v3/account/deactivate", Some(&alice), body).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["id_server_unbind_result"], "success");

    // At once: no session, no login, not in the directory, no keys to claim.
    let whoami = s.get("/_matrix/client/v3/account/whoami", Some(&alice)).await;
    assert_error(&whoami, StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN");
    assert_eq!(s.login("alice", "alice password").await.0, StatusCode::FORBIDDEN);
    let (_, found) = s.post("/_matrix/client/v3/user_directory/search", Some(&bob), search).await;
    assert_eq!(found["results"], json!([]), "{found}");
    let claim = json!({ "one_time_keys": { alice_id.as_str(): { alice_device.as_str(): "signed_curve25519" } } });
    let (_, claimed) = s.post("/_matrix/client/v3/keys/claim", Some(&bob), claim).await;
    assert!(
        claimed["one_time_keys"][&alice_id].is_null()
            || claimed["one_time_keys"][&alice_id][&alice_device]
                .as_object()
                .is_none_or(|k| k.is_empty()),
        "{claimed}"
    );

    // In the background: every room left, the invite rejected, the knock withdrawn.
    for room in [&joined, &invited, &knocked] {
        eventually(10, "alice leaving", || async {
            membership_of(&s, &bob, room, &alice_id).await.as_deref() == Some("leave")
        })
        .await;
    }
    eventually(10, "the job to finish", || async {
        !audited(&s, &admin, "offboarding.complete", &alice_id).await.is_empty()
    })
    .await;

    let records = audited(&s, &admin, "user.deactivate", &alice_id).await;
    assert_eq!(records.len(), 1, "{records:?}");
    let details = &records[0]["details"];
    assert_eq!(
        (
            &details["devices"],
            &details["pushers"],
            &details["one_time_keys"],
            &details["to_device_messages"]
        ),
        (&json!(1), &json!(1), &json!(1), &json!(1)),
        "{details}"
    );
    assert_eq!(
        (&details["rooms"], &details["invites"], &details["knocks"]),
        (&json!(1), &json!(1), &json!(1))
    );
    let leaves = audited(&s, &admin, "offboarding.leave", &alice_id).await;
    let mut previous: Vec<&str> =
        leaves.iter().map(|r| r["details"]["previous"].as_str().unwrap()).collect();
    previous.sort_unstable();
    assert_eq!(previous, ["invite", "join", "knock"]);
    let done = audited(&s, &admin, "offboarding.complete", &alice_id).await;
    let details = &done[0]["details"];
    assert_eq!(
        (&details["rooms_left"], &details["invites_rejected"], &details["knocks_withdrawn"]),
        (&json!(1), &json!(1), &json!(1)),
        "{details}"
    );
}

#[tokio::test]
async fn deactivation_removes_cross_signing_keys_backups_and_account_data() {
    let s = TestServer::start().await;
    let (admin_id, admin, _) = s.register("root", "root password").await;
    s.set_role(&admin_id, "admin");
    let (kim_id, kim, _) = s.register("kim", "kim password").await;
    let (_, bob, _) = s.register("bob", "bob password").await;

    let master =
        json!({ "user_id": kim_id, "usage": ["master"], "keys": { "ed25519:kimkey": "kimkey" } });
    let upload = "/_matrix/client/v3/keys/device_signing/upload";
    let (status, challenge) = s.post(upload, Some(&kim), json!({ "master_key": master })).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{challenge}");
    let mut auth = password_auth("kim", "kim password");
    auth["session"] = challenge["session"].clone();
    let body = json!({ "master_key": master, "auth": auth });
    let (status, body) = s.post(upload, Some(&kim), body).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let query = json!({ "device_keys": { kim_id.as_str(): [] } });
    let (_, keys) = s.post("/_matrix/client/v3/keys/query", Some(&bob), query.clone()).await;
    assert!(keys["master_keys"][&kim_id].is_object(), "{keys}");

    let algorithm = json!({ "algorithm": "m.megolm_backup.v1.curve25519-aes-sha2", "auth_data": { "public_key": "abc" } });
    let (status, created) =
        s.post("/_matrix/client/v3/room_keys/version", Some(&kim), algorithm).await;
    assert_eq!(status, StatusCode::OK, "{created}");
    let version = created["version"].as_str().unwrap().to_owned();
    let key = json!({ "first_message_index": 0, "forwarded_count": 0, "is_verified": true,
                      "session_data": { "ciphertext": "c", "ephemeral": "e", "mac": "m" } });
    let session = format!("/_matrix/client/v3/room_keys/keys/!r:localhost/s1?version={version}");
    assert_eq!(s.put(&session, Some(&kim), key).await.0, StatusCode::OK);
    let data = format!("/_matrix/client/v3/user/{kim_id}/account_data/org.example.notes");
    assert_eq!(s.put(&data, Some(&kim), json!({ "note": "kept" })).await.0, StatusCode::OK);
    let path = format!("/_synapse/admin/v1/deactivate/{kim_id}");
    let (status, body) = s.post(&path, Some(&admin), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, keys) = s.post("/_matrix/client/v3/keys/query", Some(&bob), query).await;
    assert!(keys["master_keys"][&kim_id].is_null(), "{keys}");
    let records = audited(&s, &admin, "admin.user.deactivate", &kim_id).await;
    let details = &records.last().unwrap()["details"];
    assert_eq!((&details["backup_versions"], &details["backup_keys"]), (&json!(1), &json!(1)));
    assert!(details["account_data"].as_u64().unwrap() >= 1, "{details}");

    // Reactivated, the account starts with none of it.
    let reactivate = json!({ "deactivated": false, "password": "new kim password" });
    let account = format!("/_synapse/admin/v2/users/{kim_id}");
    let (status, body) = s.put(&account, Some(&admin), reactivate).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, login) = s.login("kim", "new kim password").await;
    assert_eq!(status, StatusCode::OK, "{login}");
    let kim = login["access_token"].as_str().unwrap().to_owned();
    let backup = s.get("/_matrix/client/v3/room_keys/version", Some(&kim)).await;
    assert_error(&backup, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    let (status, body) = s.get(&data, Some(&kim)).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
}

#[tokio::test]
async fn admin_deactivation_hands_orphaned_rooms_to_a_successor() {
    let s = TestServer::start_with(|c| {
        c.offboarding.default_successor = Some("@erin:localhost".try_into().unwrap());
    })
    .await;
    let (admin_id, admin, _) = s.register("root", "root password").await;
    s.set_role(&admin_id, "admin");
    let (carol_id, carol, _) = s.register("carol", "carol password").await;
    let (dave_id, dave, _) = s.register("dave", "dave password").await;
    let (erin_id, erin, _) = s.register("erin", "erin password").await;
    let (gina_id, gina, _) = s.register("gina", "gina password").await;

    // Carol alone can change power levels here (she created it; dave has the default 0).
    let orphaned =
        s.create_room(&carol, json!({ "preset": "private_chat", "invite": [dave_id] })).await;
    assert_eq!(s.membership(&dave, &orphaned, "join", json!({})).await.0, StatusCode::OK);
    // Here dave can too: nothing to hand over.
    let shared = s
        .create_room(
            &carol,
            json!({ "preset": "private_chat", "invite": [dave_id], "power_level_content_override": { "users": { dave_id.as_str(): 100 } } }),
        )
        .await;
    assert_eq!(s.membership(&dave, &shared, "join", json!({})).await.0, StatusCode::OK);
    // Gina's room, where the successor she is given (dave) is already a member.
    let gina_room =
        s.create_room(&gina, json!({ "preset": "private_chat", "invite": [dave_id] })).await;
    assert_eq!(s.membership(&dave, &gina_room, "join", json!({})).await.0, StatusCode::OK);

    // Bad requests change nothing.
    let path = |user: &str| format!("/_synapse/admin/v1/deactivate/{user}");
    assert_error(
        &s.post(&path(&gina_id), Some(&admin), json!({ "successor": "not a user" })).await,
        StatusCode::BAD_REQUEST,
        "M_INVALID_PARAM",
    );
    assert_error(
        &s.post(&path(&gina_id), Some(&admin), json!({ "successor": "@ghost:localhost" })).await,
        StatusCode::BAD_REQUEST,
        "M_INVALID_PARAM",
    );
    assert_error(
        &s.post(&path(&gina_id), Some(&admin), json!({ "successor": gina_id })).await,
        StatusCode::BAD_REQUEST,
        "M_INVALID_PARAM",
    );
    assert_error(
        &s.post(&path("@nobody:localhost"), Some(&admin), json!({})).await,
        StatusCode::NOT_FOUND,
        "M_NOT_FOUND",
    );
    assert_error(
        &s.post(&path(&gina_id), Some(&dave), json!({})).await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );
    assert_eq!(s.get("/_matrix/client/v3/account/whoami", Some(&gina)).await.0, StatusCode::OK);

    // Carol: no successor named, so the configured default (erin) inherits.
    let (status, body) = s.post(&path(&carol_id), Some(&admin), json!({})).await;
    assert_eq!(
        (status, &body["id_server_unbind_result"]),
        (StatusCode::OK, &json!("success")),
        "{body}"
    );
    for room in [&orphaned, &shared] {
        eventually(10, "carol leaving", || async {
            membership_of(&s, &dave, room, &carol_id).await.as_deref() == Some("leave")
        })
        .await;
    }
    let levels_path =
        |room: &str| format!("/_matrix/client/v3/rooms/{room}/state/m.room.power_levels/");
    let (_, levels) = s.get(&levels_path(&orphaned), Some(&dave)).await;
    assert_eq!(levels["users"][&erin_id], 100, "{levels}");
    assert_eq!(membership_of(&s, &dave, &orphaned, &erin_id).await.as_deref(), Some("invite"));
    let (_, levels) = s.get(&levels_path(&shared), Some(&dave)).await;
    assert!(levels["users"][&erin_id].is_null(), "{levels}");
    assert_eq!(membership_of(&s, &dave, &shared, &erin_id).await, None);
    // Erin takes over: she joins and can change power levels.
    assert_eq!(s.membership(&erin, &orphaned, "join", json!({})).await.0, StatusCode::OK);
    let (_, mut levels) = s.get(&levels_path(&orphaned), Some(&erin)).await;
    levels["users"][&dave_id] = json!(50);
    assert_eq!(s.put(&levels_path(&orphaned), Some(&erin), levels).await.0, StatusCode::OK);
    let grants = audited(&s, &admin, "offboarding.successor", &erin_id).await;
    assert_eq!(grants.len(), 1, "{grants:?}");
    assert_eq!(grants[0]["room_id"], json!(orphaned));
    assert_eq!(grants[0]["details"]["from"], json!(carol_id));

    // Gina, with dave named as her successor: he is given power where he already is.
    let (status, body) = s
        .post(&path(&gina_id), Some(&admin), json!({ "successor": dave_id, "erase": false }))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    eventually(10, "gina leaving", || async {
        membership_of(&s, &dave, &gina_room, &gina_id).await.as_deref() == Some("leave")
    })
    .await;
    let (_, levels) = s.get(&levels_path(&gina_room), Some(&dave)).await;
    assert_eq!(levels["users"][&dave_id], 100, "{levels}");
    // Deactivating again changes nothing and still answers as Synapse does.
    let (status, body) = s.post(&path(&gina_id), Some(&admin), json!({})).await;
    assert_eq!((status, &body["id_server_unbind_result"]), (StatusCode::OK, &json!("success")));
    assert_eq!(audited(&s, &admin, "admin.user.deactivate", &gina_id).await.len(), 1);
}

#[tokio::test]
async fn erased_accounts_events_are_redacted_for_those_who_were_not_there() {
    let s = TestServer::start().await;
    let (admin_id, admin, _) = s.register("root", "root password").await;
    s.set_role(&admin_id, "admin");
    let (hank_id, hank, _) = s.register("hank", "hank password").await;
    let (_, bob, _) = s.register("bob", "bob password").await;
    let (_, ivy, _) = s.register("ivy", "ivy password").await;
    let room = s.create_room(&bob, json!({ "preset": "public_chat" })).await;
    assert_eq!(s.membership(&hank, &room, "join", json!({})).await.0, StatusCode::OK);
    let (_, sent) = s.send_text(&hank, &room, "t1", "quarterly figures attached").await;
    let event_id = sent["event_id"].as_str().unwrap().to_owned();
    let (_, own) = s.send_text(&bob, &room, "t2", "thanks for the figures").await;
    let bob_event = own["event_id"].as_str().unwrap().to_owned();
    // Hank edits his message and replies in a thread on bob's.
    let edit = json!({
        "msgtype": "m.text",
        "body": "* revised numbers",
        "m.new_content": { "msgtype": "m.text", "body": "revised numbers" },
        "m.relates_to": { "rel_type": "m.replace", "event_id": event_id },
    });
    let send = |txn: &str| format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/{txn}");
    assert_eq!(s.put(&send("t3"), Some(&hank), edit).await.0, StatusCode::OK);
    let reply = json!({
        "msgtype": "m.text",
        "body": "confidential margin",
        "m.relates_to": { "rel_type": "m.thread", "event_id": bob_event },
    });
    assert_eq!(s.put(&send("t4"), Some(&hank), reply).await.0, StatusCode::OK);

    let path = format!("/_synapse/admin/v1/deactivate/{hank_id}");
    let (status, body) = s.post(&path, Some(&admin), json!({ "erase": true })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, account) = s.get(&format!("/_synapse/admin/v2/users/{hank_id}"), Some(&admin)).await;
    assert_eq!((&account["deactivated"], &account["erased"]), (&json!(true), &json!(true)));
    eventually(10, "hank leaving", || async {
        membership_of(&s, &bob, &room, &hank_id).await.as_deref() == Some("leave")
    })
    .await;

    // Ivy joins after the fact: hank's message reaches her without its content.
    assert_eq!(s.membership(&ivy, &room, "join", json!({})).await.0, StatusCode::OK);
    let event_path = format!("/_matrix/client/v3/rooms/{room}/event/{}", enc(&event_id));
    let (_, seen) = s.get(&event_path, Some(&ivy)).await;
    assert_eq!((&seen["sender"], &seen["content"]), (&json!(hank_id), &json!({})), "{seen}");
    let (_, seen) = s.get(&event_path, Some(&bob)).await;
    assert_eq!(seen["content"]["body"], "quarterly figures attached", "{seen}");
    let messages = format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=20");
    let body_of = |page: &Value, id: &str| {
        page["chunk"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["event_id"] == id)
            .map(|e| e["content"].clone())
    };
    let (_, page) = s.get(&messages, Some(&ivy)).await;
    assert_eq!(body_of(&page, &event_id), Some(json!({})), "{page}");
    assert_eq!(body_of(&page, &bob_event).unwrap()["body"], "thanks for the figures");
    let (_, page) = s.get(&messages, Some(&bob)).await;
    assert_eq!(body_of(&page, &event_id).unwrap()["body"], "quarterly figures attached");
    let filter = enc(&json!({ "room": { "timeline": { "limit": 50 } } }).to_string());
    let (_, synced) = s.get(&format!("/_matrix/client/v3/sync?filter={filter}"), Some(&ivy)).await;
    let timeline = &synced["rooms"]["join"][&room]["timeline"];
    assert_eq!(
        body_of(&json!({ "chunk": timeline["events"] }), &event_id),
        Some(json!({})),
        "{timeline}"
    );

    // Search finds it for bob, who saw it, not for ivy.
    let search = json!({ "search_categories": { "room_events": { "search_term": "quarterly" } } });
    let (_, found) = s.post("/_matrix/client/v3/search", Some(&bob), search.clone()).await;
    assert_eq!(
        found["search_categories"]["room_events"]["results"].as_array().unwrap().len(),
        1,
        "{found}"
    );
    let (_, found) = s.post("/_matrix/client/v3/search", Some(&ivy), search).await;
    assert_eq!(found["search_categories"]["room_events"]["results"], json!([]), "{found}");

    // Nor do his edit, his thread reply or his profile reach ivy through bundles or context.
    let hidden = |served: &Value| {
        let text = served.to_string();
        ["quarterly", "revised", "confidential"].iter().all(|word| !text.contains(word))
    };
    let (_, seen) = s.get(&event_path, Some(&ivy)).await;
    assert!(hidden(&seen), "{seen}");
    let (_, seen) = s.get(&event_path, Some(&bob)).await;
    assert_eq!(
        seen["unsigned"]["m.relations"]["m.replace"]["content"]["body"],
        "* revised numbers"
    );
    let root_path = format!("/_matrix/client/v3/rooms/{room}/event/{}", enc(&bob_event));
    let (_, root) = s.get(&root_path, Some(&ivy)).await;
    let latest = &root["unsigned"]["m.relations"]["m.thread"]["latest_event"];
    assert_eq!((&latest["sender"], &latest["content"]), (&json!(hank_id), &json!({})), "{root}");
    let (_, root) = s.get(&root_path, Some(&bob)).await;
    let latest = &root["unsigned"]["m.relations"]["m.thread"]["latest_event"];
    assert_eq!(latest["content"]["body"], "confidential margin", "{root}");
    let search = json!({ "search_categories": { "room_events": {
        "search_term": "thanks",
        "event_context": { "before_limit": 5, "after_limit": 5, "include_profile": true },
    } } });
    let (_, found) = s.post("/_matrix/client/v3/search", Some(&ivy), search.clone()).await;
    let results = &found["search_categories"]["room_events"]["results"];
    assert_eq!(results.as_array().unwrap().len(), 1, "{found}");
    assert!(hidden(&found), "{found}");
    let profile = &results[0]["context"]["profile_info"][&hank_id];
    assert_eq!(profile["displayname"], Value::Null, "{found}");
    let (_, found) = s.post("/_matrix/client/v3/search", Some(&bob), search).await;
    let context = &found["search_categories"]["room_events"]["results"][0]["context"];
    assert!(context.to_string().contains("quarterly figures attached"), "{found}");
}

#[tokio::test]
async fn matrix_sdk_client_sees_the_departed_member_leave() {
    use matrix_sdk::{RoomMemberships, config::SyncSettings, ruma::api::client::room::create_room};
    let s = TestServer::start().await;
    let alice = crate::sdk::sdk_client(&s.base, "sdkalice").await;
    let bob = crate::sdk::sdk_client(&s.base, "sdkbob").await;
    let settings = || SyncSettings::default().timeout(Duration::from_millis(0));
    let mut request = create_room::v3::Request::new();
    request.invite = vec![bob.user_id().unwrap().to_owned()];
    let room = alice.create_room(request).await.unwrap();
    bob.sync_once(settings()).await.unwrap();
    bob.join_room_by_id(room.room_id()).await.unwrap();
    bob.sync_once(settings()).await.unwrap();
    let bobs_room = bob.get_room(room.room_id()).unwrap();
    let joined = bobs_room.members(RoomMemberships::JOIN).await.unwrap();
    assert_eq!(joined.len(), 2);

    let token = alice.access_token().unwrap();
    let body = json!({ "auth": password_auth("sdkalice", "sdk password 1"), "erase": false });
    let (status, body) = s.post("/_matrix/client/v3/account/deactivate", Some(&token), body).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let alice_id = alice.user_id().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        bob.sync_once(SyncSettings::default().timeout(Duration::from_millis(500))).await.unwrap();
        let member = bobs_room.get_member_no_sync(&alice_id).await.unwrap();
        if member.is_some_and(|m| {
            *m.membership() == matrix_sdk::ruma::events::room::member::MembershipState::Leave
        }) {
            break;
        }
        assert!(Instant::now() < deadline, "bob's client never saw alice leave");
    }
    let joined = bobs_room.members(RoomMemberships::JOIN).await.unwrap();
    assert_eq!(joined.len(), 1);
    assert_eq!(joined[0].user_id(), bob.user_id().unwrap());
}

/// A `plaza` process on its own data directory, killed when dropped.
struct Process {
    child: Reaped,
    base: String,
}

async fn spawn(config: &std::path::Path, port: u16) -> Process {
    let (child, base) = start_binary(config, port, &[]).await;
    Process { child, base }
}

impl Process {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = reqwest::Client::new().request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        (response.status(), response.json().await.unwrap_or(Value::Null))
    }

    async fn register(&self, name: &str) -> (String, String) {
        let body = json!({ "username": name, "password": "durable password", "auth": { "type": "m.login.dummy" } });
        let (status, body) =
            self.call(reqwest::Method::POST, "/_matrix/client/v3/register", None, Some(body)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        (
            body["user_id"].as_str().unwrap().to_owned(),
            body["access_token"].as_str().unwrap().to_owned(),
        )
    }

    async fn login(&self, name: &str) -> String {
        let body = json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": name }, "password": "durable password" });
        let (status, body) =
            self.call(reqwest::Method::POST, "/_matrix/client/v3/login", None, Some(body)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["access_token"].as_str().unwrap().to_owned()
    }

    async fn joined_rooms(&self, token: &str) -> Vec<String> {
        let (status, body) = self
            .call(reqwest::Method::GET, "/_matrix/client/v3/joined_rooms", Some(token), None)
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["joined_rooms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap().to_owned())
            .collect()
    }

    fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

/// How many rooms the leaver is still joined to, as the admin API counts them.
async fn leaver_rooms(p: &Process, admin: &str) -> usize {
    let path = "/_synapse/admin/v1/users/@leaver:example.test/joined_rooms";
    let (status, body) = p.call(reqwest::Method::GET, path, Some(admin), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["total"].as_u64().unwrap() as usize
}

#[tokio::test]
async fn offboarding_of_500_rooms_completes_after_a_crash_midway() {
    const ROOMS: usize = 500;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // A pause between rooms stretches the job so the kill lands in its middle.
    let config = write_config(dir.path(), port, "[jobs]\npause_between_steps_ms = 10");
    let password_file = dir.path().join("pw");
    std::fs::write(&password_file, "durable password\n").unwrap();
    let created = Command::new(binary())
        .arg("--config")
        .arg(&config)
        .args(["create-user", "root", "--admin", "--password-file"])
        .arg(&password_file)
        .output()
        .unwrap();
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));

    let p = spawn(&config, port).await;
    let admin = p.login("root").await;
    let (_, leaver) = p.register("leaver").await;
    let (_, witness) = p.register("witness").await;
    let witness_id = "@witness:example.test";
    // The leaver creates the rooms; the witness is in every tenth, to see the leaves.
    let mut rooms = Vec::new();
    for chunk in 0..ROOMS / 25 {
        let mut creating = Vec::new();
        for i in 0..25 {
            let watched = (chunk * 25 + i) % 10 == 0;
            let body = if watched { json!({ "invite": [witness_id] }) } else { json!({}) };
            let request = p.call(
                reqwest::Method::POST,
                "/_matrix/client/v3/createRoom",
                Some(&leaver),
                Some(body),
            );
            creating.push(async move {
                let (status, body) = request.await;
                assert_eq!(status, StatusCode::OK, "{body}");
                (body["room_id"].as_str().unwrap().to_owned(), watched)
            });
        }
        rooms.extend(futures_util::future::join_all(creating).await);
    }
    let watched: Vec<String> = rooms.iter().filter(|(_, w)| *w).map(|(r, _)| r.clone()).collect();
    for room in &watched {
        let path = format!("/_matrix/client/v3/rooms/{room}/join");
        let joined = p.call(reqwest::Method::POST, &path, Some(&witness), Some(json!({}))).await;
        assert_eq!(joined.0, StatusCode::OK);
    }
    assert_eq!(leaver_rooms(&p, &admin).await, ROOMS);

    let body = json!({ "auth": password_auth("leaver", "durable password") });
    let path = "/_matrix/client/v3/account/deactivate";
    let (status, body) = p.call(reqwest::Method::POST, path, Some(&leaver), Some(body)).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Kill the server once some, but far from all, rooms are left.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let remaining = leaver_rooms(&p, &admin).await;
        if remaining <= ROOMS - 20 {
            assert!(remaining > 0, "the job finished before the kill");
            break;
        }
        assert!(Instant::now() < deadline, "the off-boarding did not start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    p.kill9();

    // After the restart the job resumes by itself and leaves every room.
    let p = spawn(&config, port).await;
    let admin = p.login("root").await;
    let deadline = Instant::now() + Duration::from_secs(120);
    while leaver_rooms(&p, &admin).await > 0 {
        assert!(Instant::now() < deadline, "the off-boarding did not finish after the restart");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The witness saw the leaver leave each of its rooms, once.
    for room in &watched {
        let path =
            format!("/_matrix/client/v3/rooms/{room}/state/m.room.member/@leaver:example.test");
        let (_, member) = p.call(reqwest::Method::GET, &path, Some(&witness), None).await;
        assert_eq!(member["membership"], "leave", "{room}");
    }
    let audit = "/_plaza/admin/v1/audit?action=offboarding.complete";
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, records) = p.call(reqwest::Method::GET, audit, Some(&admin), None).await;
        let records = records["records"].as_array().cloned().unwrap_or_default();
        if records.len() == 1 {
            assert_eq!(records[0]["details"]["failed"], 0, "{records:?}");
            break;
        }
        assert!(records.is_empty(), "{records:?}");
        assert!(Instant::now() < deadline, "no record of the completed off-boarding");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let leaves = "/_plaza/admin/v1/audit?action=offboarding.leave&limit=1000";
    let (_, records) = p.call(reqwest::Method::GET, leaves, Some(&admin), None).await;
    let rooms_left: std::collections::BTreeSet<&str> = records["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["room_id"].as_str().unwrap())
        .collect();
    assert_eq!(rooms_left.len(), ROOMS, "one audited leave per room");
}

#[tokio::test]
async fn onboarding_resumes_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let extra = "[jobs]\npause_between_steps_ms = 700\n[onboarding]\nauto_join_rooms = [\"#one:example.test\", \"#two:example.test\", \"#three:example.test\"]\nwelcome_notice = \"Welcome aboard\"";
    let config = write_config(dir.path(), port, extra);
    let p = spawn(&config, port).await;
    let (_, founder) = p.register("founder").await;
    let mut rooms = Vec::new();
    for alias in ["one", "two", "three"] {
        let body = json!({ "preset": "public_chat", "room_alias_name": alias });
        let (status, body) = p
            .call(
                reqwest::Method::POST,
                "/_matrix/client/v3/createRoom",
                Some(&founder),
                Some(body),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        rooms.push(body["room_id"].as_str().unwrap().to_owned());
    }

    // The registration waits for its onboarding; the kill comes after the first room.
    let body = json!({ "username": "newbie", "password": "durable password", "auth": { "type": "m.login.dummy" } });
    let registering = reqwest::Client::new()
        .post(format!("{}/_matrix/client/v3/register", p.base))
        .json(&body)
        .send();
    let registering = tokio::spawn(registering);
    let members = format!("/_matrix/client/v3/rooms/{}/joined_members", rooms[0]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, joined) = p.call(reqwest::Method::GET, &members, Some(&founder), None).await;
        if joined["joined"].get("@newbie:example.test").is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "the onboarding did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    p.kill9();
    let _ = registering.await;

    let p = spawn(&config, port).await;
    let token = p.login("newbie").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let joined = p.joined_rooms(&token).await;
        // The three rooms and the notices room with the welcome notice.
        if rooms.iter().all(|r| joined.contains(r)) && joined.len() == 4 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the onboarding did not finish after the restart: {joined:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn onboarding_resumed_after_its_notice_sends_it_once() {
    let s = TestServer::start_with(|c| {
        c.onboarding.welcome_notice = Some("Welcome once".into());
    })
    .await;
    let (newbie_id, newbie, _) = s.register("newbie", "newbie password").await;
    let welcomes = |sync: &Value| {
        let rooms = sync["rooms"]["join"].as_object().cloned().unwrap_or_default();
        rooms
            .values()
            .flat_map(|room| room["timeline"]["events"].as_array().cloned().unwrap_or_default())
            .filter(|e| e["content"]["body"] == "Welcome once")
            .count()
    };
    let (_, sync) = s.get("/_matrix/client/v3/sync", Some(&newbie)).await;
    assert_eq!(welcomes(&sync), 1, "{sync}");

    // As after a crash between the notice and the job's removal: the job is still stored.
    let services = s.server().services().clone();
    let user = crate::common::user_id(&newbie_id);
    let mut batch = services.db.batch();
    services.jobs.put(&mut batch, &user, &plaza::service::jobs::Job::onboard());
    services.db.write(batch).unwrap();
    services.await_onboarding(&user).await;
    let kind = plaza::service::jobs::JobKind::Onboard;
    assert!(services.jobs.get(&user, kind).unwrap().is_none());
    let (_, sync) = s.get("/_matrix/client/v3/sync", Some(&newbie)).await;
    assert_eq!(welcomes(&sync), 1, "{sync}");
}

#[tokio::test]
async fn a_deactivation_during_a_running_offboarding_is_not_lost() {
    let s = TestServer::start_with(|c| c.jobs.pause_between_steps_ms = 2000).await;
    let (admin_id, admin, _) = s.register("root", "root password").await;
    s.set_role(&admin_id, "admin");
    let (lee_id, lee, _) = s.register("lee", "lee password").await;
    let (_, bob, _) = s.register("bob", "bob password").await;
    for _ in 0..3 {
        let room = s.create_room(&bob, json!({ "preset": "public_chat" })).await;
        assert_eq!(s.membership(&lee, &room, "join", json!({})).await.0, StatusCode::OK);
    }
    let late = s.create_room(&bob, json!({ "preset": "public_chat" })).await;

    let deactivate = format!("/_synapse/admin/v1/deactivate/{lee_id}");
    assert_eq!(s.post(&deactivate, Some(&admin), json!({})).await.0, StatusCode::OK);
    // While the first off-boarding waits on its first room: reactivated, a room joined, and
    // deactivated again.
    let account = format!("/_synapse/admin/v2/users/{lee_id}");
    let reactivate = json!({ "deactivated": false, "password": "lee again" });
    let (status, body) = s.put(&account, Some(&admin), reactivate).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, login) = s.login("lee", "lee again").await;
    assert_eq!(status, StatusCode::OK, "{login}");
    let lee = login["access_token"].as_str().unwrap().to_owned();
    assert_eq!(s.membership(&lee, &late, "join", json!({})).await.0, StatusCode::OK);
    assert_eq!(s.post(&deactivate, Some(&admin), json!({})).await.0, StatusCode::OK);

    eventually(20, "lee leaving the room joined in between", || async {
        membership_of(&s, &bob, &late, &lee_id).await.as_deref() == Some("leave")
    })
    .await;
    eventually(20, "both off-boardings complete", || async {
        audited(&s, &admin, "offboarding.complete", &lee_id).await.len() == 2
    })
    .await;
}

#[tokio::test]
async fn admin_put_deactivates_with_its_other_changes_in_one_write() {
    let s = TestServer::start().await;
    let (admin_id, admin, _) = s.register("root", "root password").await;
    s.set_role(&admin_id, "admin");
    let (max_id, max, _) = s.register("max", "max password").await;
    let (_, bob, _) = s.register("bob", "bob password").await;
    let room = s.create_room(&bob, json!({ "preset": "public_chat" })).await;
    assert_eq!(s.membership(&max, &room, "join", json!({})).await.0, StatusCode::OK);

    let account = format!("/_synapse/admin/v2/users/{max_id}");
    let body = json!({ "deactivated": true, "displayname": "Max Renamed", "locked": true });
    let (status, body) = s.put(&account, Some(&admin), body).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["deactivated"], true, "{body}");
    // The profile set in the same request does not outlive the deactivation.
    let (_, profile) = s.get(&format!("/_matrix/client/v3/profile/{max_id}"), Some(&bob)).await;
    assert!(profile.get("displayname").is_none_or(Value::is_null), "{profile}");
    let modified = audited(&s, &admin, "admin.user.modify", &max_id).await;
    let locked = audited(&s, &admin, "admin.user.lock", &max_id).await;
    let deactivated = audited(&s, &admin, "admin.user.deactivate", &max_id).await;
    assert_eq!((modified.len(), locked.len(), deactivated.len()), (1, 1, 1));
    let seq = |records: &[Value]| records[0]["seq"].as_u64().unwrap();
    assert_eq!(seq(&modified), seq(&locked) + 1);
    assert_eq!(seq(&deactivated), seq(&modified) + 1);
    assert_eq!(deactivated[0]["details"]["rooms"], 1, "{deactivated:?}");
    eventually(10, "max leaving", || async {
        membership_of(&s, &bob, &room, &max_id).await.as_deref() == Some("leave")
    })
    .await;
}

#[tokio::test]
async fn a_successor_already_able_to_change_power_levels_is_not_granted_again() {
    let s = TestServer::start().await;
    let (admin_id, admin, _) = s.register("root", "root password").await;
    s.set_role(&admin_id, "admin");
    let (nell_id, nell, _) = s.register("nell", "nell password").await;
    let (_, dave, _) = s.register("dave", "dave password").await;
    let (erin_id, _, _) = s.register("erin", "erin password").await;
    // As after a run that granted erin power and stopped before nell left: erin holds the
    // level but is not joined, and nell is the only joined member who can change it.
    let body = json!({
        "preset": "public_chat",
        "power_level_content_override": { "users": { nell_id.as_str(): 100, erin_id.as_str(): 100 } },
    });
    let room = s.create_room(&nell, body).await;
    assert_eq!(s.membership(&dave, &room, "join", json!({})).await.0, StatusCode::OK);
    let power_path = format!("/_matrix/client/v3/rooms/{room}/state/m.room.power_levels/");
    let (_, power_before) = s.get(&power_path, Some(&dave)).await;

    let path = format!("/_synapse/admin/v1/deactivate/{nell_id}");
    let body = json!({ "successor": erin_id });
    assert_eq!(s.post(&path, Some(&admin), body).await.0, StatusCode::OK);
    eventually(10, "nell leaving", || async {
        membership_of(&s, &dave, &room, &nell_id).await.as_deref() == Some("leave")
    })
    .await;
    assert_eq!(membership_of(&s, &dave, &room, &erin_id).await.as_deref(), Some("invite"));
    assert!(audited(&s, &admin, "offboarding.successor", &erin_id).await.is_empty());
    let (_, power_after) = s.get(&power_path, Some(&dave)).await;
    assert_eq!(power_after, power_before);
    let done = audited(&s, &admin, "offboarding.complete", &nell_id).await;
    assert_eq!(done[0]["details"]["successor_grants"], 1, "{done:?}");
}
