//! Joins and leaves across two Plaza servers over TLS: a user of B joins A's rooms by id and by
//! a remote alias (through `/query/directory`), a restricted join authorised and signed by A,
//! `make_leave`/`send_leave`, the refusals of `make_join` and `send_join`, and a `send_join`
//! naming one of A's members for a user the join rules do not allow. With a third server C:
//! the joins and leaves A takes through `send_*` reach B from A.

use reqwest::{Method, StatusCode};
use ruma::{CanonicalJsonObject, CanonicalJsonValue, RoomVersionId};
use serde_json::{Value, json};

use crate::{
    common::{TestServer, assert_error, enc},
    federation::harness::*,
};

/// The rooms of `token`'s first sync.
async fn sync_rooms(server: &TestServer, token: &str) -> Value {
    let (status, body) = server.get("/_matrix/client/v3/sync?timeout=0", Some(token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["rooms"].clone()
}

/// The state event `kind` of a joined room's sync entry (state or timeline).
fn synced_state<'a>(room: &'a Value, kind: &str) -> Option<&'a Value> {
    ["state", "timeline"]
        .into_iter()
        .filter_map(|part| room[part]["events"].as_array())
        .flatten()
        .find(|event| event["type"] == kind && event.get("state_key").is_some())
}

/// Completes a `make_*` template as `server` would: origin, hashes, signature; returns the
/// event id and the event.
fn complete(server: &FedServer, template: &Value, version: &str) -> (String, Value) {
    let mut wire: CanonicalJsonObject = serde_json::from_value(template.clone()).unwrap();
    wire.insert("origin".into(), CanonicalJsonValue::String(server.name.to_string()));
    let version = RoomVersionId::try_from(version).unwrap();
    let rules = version.rules().unwrap();
    ruma::signatures::hash_and_sign_event(
        server.name.as_str(),
        server.key(),
        &mut wire,
        &rules.redaction,
    )
    .unwrap();
    let id = format!("${}", ruma::signatures::reference_hash(&wire, &rules).unwrap());
    (id, serde_json::to_value(&wire).unwrap())
}

/// A signed request of `from` to `to`'s federation listener.
async fn fed(
    to: &FedServer,
    from: &FedServer,
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> (StatusCode, Value) {
    to.signed(method, path, from.name.as_str(), None, from.key(), &from.key_id(), body, body).await
}

#[tokio::test]
async fn a_remote_user_joins_by_id_and_by_alias_and_sees_the_state() {
    let (_pki, a, b) = pair().await;
    let (_alice, alice_token, _) = a.server.register("alice", "secret-pass-1").await;
    let room_id = a
        .server
        .create_room(
            &alice_token,
            json!({ "preset": "public_chat", "name": "Lobby", "room_alias_name": "lobby" }),
        )
        .await;
    let (status, body) = a.server.send_text(&alice_token, &room_id, "t1", "before").await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // By id, through the server named in `via`.
    let (bob, bob_token, _) = b.server.register("bob", "secret-pass-1").await;
    let path = format!("/_matrix/client/v3/join/{}?via={}", enc(&room_id), a.name);
    let (status, body) = b.server.post(&path, Some(&bob_token), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["room_id"], room_id);
    let room_ref: &ruma::RoomId = room_id.as_str().try_into().unwrap();
    let bob_ref: &ruma::UserId = bob.as_str().try_into().unwrap();
    assert_eq!(a.services().rooms.membership(room_ref, bob_ref).unwrap().as_deref(), Some("join"));
    assert_eq!(b.services().rooms.membership(room_ref, bob_ref).unwrap().as_deref(), Some("join"));
    let rooms = sync_rooms(&b.server, &bob_token).await;
    let room = &rooms["join"][&room_id];
    let name = synced_state(room, "m.room.name").unwrap_or_else(|| panic!("{rooms}"));
    assert_eq!(name["content"]["name"], "Lobby", "{room}");
    let rule = synced_state(room, "m.room.join_rules").unwrap_or_else(|| panic!("{rooms}"));
    assert_eq!(rule["content"]["join_rule"], "public");
    let own_join = room["timeline"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["type"] == "m.room.member" && e["state_key"] == bob.as_str());
    assert!(own_join, "{room}");
    // B's copy of the room has A's creator joined and its own user.
    let members = b.services().rooms.members(room_ref).unwrap();
    let joined: Vec<&str> =
        members.iter().filter(|(_, m)| m == "join").map(|(u, _)| u.as_str()).collect();
    assert_eq!(joined.len(), 2, "{joined:?}");

    // By A's alias, which B asks A for through `/query/directory`.
    let (carol, carol_token, _) = b.server.register("carol", "secret-pass-1").await;
    let alias = format!("#lobby:{}", a.name);
    let path = format!("/_matrix/client/v3/join/{}", enc(&alias));
    let (status, body) = b.server.post(&path, Some(&carol_token), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["room_id"], room_id);
    let carol_ref: &ruma::UserId = carol.as_str().try_into().unwrap();
    // B is in the room now: carol's join is B's own event (it reaches A through the sender).
    assert_eq!(
        b.services().rooms.membership(room_ref, carol_ref).unwrap().as_deref(),
        Some("join")
    );

    // The alias query itself.
    let (status, body) = fed(
        &a,
        &b,
        Method::GET,
        &format!("/_matrix/federation/v1/query/directory?room_alias={}", enc(&alias)),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["room_id"], room_id);
    assert_eq!(body["servers"][0], a.name.as_str());
    assert!(body["servers"].as_array().unwrap().iter().any(|s| s == b.name.as_str()), "{body}");

    // A room nobody can reach: a clear error, not a hang.
    let path = "/_matrix/client/v3/join/!nowhere:127.0.0.9";
    let (status, _) = b.server.post(path, Some(&carol_token), json!({})).await;
    assert!(status.is_client_error() || status.is_server_error(), "{status}");
}

/// A public space of `token`'s user on `a` and a restricted room (version 10) its members
/// may join.
async fn restricted_room(a: &FedServer, token: &str) -> (String, String) {
    let space = a.server.create_room(token, json!({ "preset": "public_chat" })).await;
    let restricted = a
        .server
        .create_room(
            token,
            json!({
                "room_version": "10",
                "initial_state": [{
                    "type": "m.room.join_rules", "state_key": "",
                    "content": { "join_rule": "restricted",
                                 "allow": [{ "type": "m.room_membership", "room_id": space }] }
                }]
            }),
        )
        .await;
    (space, restricted)
}

#[tokio::test]
async fn a_restricted_join_is_authorised_and_signed_by_the_resident_server() {
    let (_pki, a, b) = pair().await;
    let (_alice, alice_token, _) = a.server.register("alice", "secret-pass-1").await;
    let (space, restricted) = restricted_room(&a, &alice_token).await;
    let (bob, bob_token, _) = b.server.register("bob", "secret-pass-1").await;
    // Not yet in the space: refused.
    let path = format!("/_matrix/client/v3/join/{}?via={}", enc(&restricted), a.name);
    let (status, body) = b.server.post(&path, Some(&bob_token), json!({})).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let path_space = format!("/_matrix/client/v3/join/{}?via={}", enc(&space), a.name);
    let (status, body) = b.server.post(&path_space, Some(&bob_token), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = b.server.post(&path, Some(&bob_token), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let room_ref: &ruma::RoomId = restricted.as_str().try_into().unwrap();
    let state = a.services().rooms.current_state(room_ref).unwrap();
    let join = a.services().rooms.state_event(&state, "m.room.member", &bob).unwrap().unwrap();
    let content = join.wire.get("content").unwrap();
    let CanonicalJsonValue::Object(content) = content else { panic!("{content:?}") };
    let via = content.get("join_authorised_via_users_server").unwrap();
    assert_eq!(via, &CanonicalJsonValue::String(format!("@alice:{}", a.name)));
    let CanonicalJsonValue::Object(signatures) = join.wire.get("signatures").unwrap() else {
        panic!()
    };
    assert!(signatures.contains_key(a.name.as_str()) && signatures.contains_key(b.name.as_str()));
    // B placed the same, A-signed copy.
    let b_state = b.services().rooms.current_state(room_ref).unwrap();
    let b_join = b.services().rooms.state_event(&b_state, "m.room.member", &bob).unwrap().unwrap();
    assert_eq!(b_join.event_id, join.event_id);
}

#[tokio::test]
async fn a_send_join_naming_our_member_is_checked_against_the_allow_rules() {
    let (_pki, a, b) = pair().await;
    let (_alice, alice_token, _) = a.server.register("alice", "secret-pass-1").await;
    let (_dave, _, _) = a.server.register("dave", "secret-pass-1").await;
    let (space, restricted) = restricted_room(&a, &alice_token).await;
    // Carol of B is in the space, bob of B is not.
    let (carol, carol_token, _) = b.server.register("carol", "secret-pass-1").await;
    let bob = format!("@bob:{}", b.name);
    let path_space = format!("/_matrix/client/v3/join/{}?via={}", enc(&space), a.name);
    let (status, body) = b.server.post(&path_space, Some(&carol_token), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let make =
        format!("/_matrix/federation/v1/make_join/{}/{}?ver=10", enc(&restricted), enc(&carol));
    let (status, body) = fed(&a, &b, Method::GET, &make, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let template = body["event"].clone();
    let alice = format!("@alice:{}", a.name);
    assert_eq!(template["content"]["join_authorised_via_users_server"], alice.as_str());
    let send =
        |id: &str| format!("/_matrix/federation/v2/send_join/{}/{}", enc(&restricted), enc(id));
    let room_ref: &ruma::RoomId = restricted.as_str().try_into().unwrap();

    // Bob's join built by hand from carol's template, never asked of make_join: refused.
    let mut forged = template.clone();
    forged["sender"] = json!(bob);
    forged["state_key"] = json!(bob);
    let (id, forged) = complete(&b, &forged, "10");
    let (status, body) = fed(&a, &b, Method::PUT, &send(&id), Some(&forged)).await;
    assert_error(&(status, body), StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let bob_ref: &ruma::UserId = bob.as_str().try_into().unwrap();
    assert_eq!(a.services().rooms.membership(room_ref, bob_ref).unwrap(), None);

    // Carol's join naming a member of A who is not in the room: refused.
    let mut wrong_via = template.clone();
    wrong_via["content"]["join_authorised_via_users_server"] = json!(format!("@dave:{}", a.name));
    let (id, wrong_via) = complete(&b, &wrong_via, "10");
    let (status, body) = fed(&a, &b, Method::PUT, &send(&id), Some(&wrong_via)).await;
    assert_error(&(status, body), StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let carol_ref: &ruma::UserId = carol.as_str().try_into().unwrap();
    assert_eq!(a.services().rooms.membership(room_ref, carol_ref).unwrap(), None);

    // The honest join: signed by A and accepted.
    let (id, event) = complete(&b, &template, "10");
    let (status, body) = fed(&a, &b, Method::PUT, &send(&id), Some(&event)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["event"]["signatures"][a.name.as_str()].is_object(), "{body}");
    assert_eq!(
        a.services().rooms.membership(room_ref, carol_ref).unwrap().as_deref(),
        Some("join")
    );

    // Bob, invited meanwhile, needs nobody to vouch for him; a join of his that still names
    // alice is signed all the same, since it cannot be accepted without A's signature.
    b.server.register("bob", "secret-pass-1").await;
    let invite = format!("/_matrix/client/v3/rooms/{}/invite", enc(&restricted));
    let (status, body) =
        a.server.post(&invite, Some(&alice_token), json!({ "user_id": bob })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let make =
        format!("/_matrix/federation/v1/make_join/{}/{}?ver=10", enc(&restricted), enc(&bob));
    let (status, body) = fed(&a, &b, Method::GET, &make, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let mut naming = body["event"].clone();
    naming["content"]["join_authorised_via_users_server"] = json!(alice);
    let (id, naming) = complete(&b, &naming, "10");
    let (status, body) = fed(&a, &b, Method::PUT, &send(&id), Some(&naming)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["event"]["signatures"][a.name.as_str()].is_object(), "{body}");
    assert_eq!(a.services().rooms.membership(room_ref, bob_ref).unwrap().as_deref(), Some("join"));
}

/// Waits (up to 10 s) until `user` has `membership` in `room` on `server`.
async fn until_membership(server: &FedServer, room: &str, user: &str, membership: &str) {
    let room_ref: &ruma::RoomId = room.try_into().unwrap();
    let user_ref: &ruma::UserId = user.try_into().unwrap();
    for _ in 0..200 {
        let now = server.services().rooms.membership(room_ref, user_ref).unwrap();
        if now.as_deref() == Some(membership) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("{user} never had membership {membership} on {}", server.name);
}

#[tokio::test(flavor = "multi_thread")]
async fn joins_leaves_and_knocks_a_resident_server_takes_are_passed_on_to_the_other_servers() {
    let pki = Pki::new();
    let a = FedServer::start(&pki, 1, |_| {}).await;
    let b = FedServer::start(&pki, 2, |_| {}).await;
    let c = FedServer::start(&pki, 3, |_| {}).await;
    let (_alice, alice_token, _) = a.server.register("alice", "secret-pass-1").await;
    let room = a
        .server
        .create_room(&alice_token, json!({ "preset": "public_chat", "room_version": "10" }))
        .await;
    let join = format!("/_matrix/client/v3/join/{}?via={}", enc(&room), a.name);
    let (_bob, bob_token, _) = b.server.register("bob", "secret-pass-1").await;
    let (status, body) = b.server.post(&join, Some(&bob_token), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Carol of C joins through A's make_join and send_join, built as C would (C's server
    // itself never hears of it, so cannot tell B), and nothing else happens in the room: B
    // can only learn of the join from A passing it on.
    let carol = format!("@carol:{}", c.name);
    let path = format!("/_matrix/federation/v1/make_join/{}/{}?ver=10", enc(&room), enc(&carol));
    let (status, body) = fed(&a, &c, Method::GET, &path, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (join_id, event) = complete(&c, &body["event"], "10");
    let path = format!("/_matrix/federation/v2/send_join/{}/{}", enc(&room), enc(&join_id));
    let (status, body) = fed(&a, &c, Method::PUT, &path, Some(&event)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    until_membership(&b, &room, &carol, "join").await;
    let room_ref: &ruma::RoomId = room.as_str().try_into().unwrap();
    let b_state = b.services().rooms.current_state(room_ref).unwrap();
    let b_join = b.services().rooms.state_event(&b_state, "m.room.member", &carol).unwrap();
    assert_eq!(b_join.unwrap().event_id.as_str(), join_id);
    // Bob's client sees it (once durable: sync shows no more than that).
    let mut rooms = Value::Null;
    for _ in 0..100 {
        rooms = sync_rooms(&b.server, &bob_token).await;
        let timeline = rooms["join"][&room]["timeline"]["events"].as_array();
        if timeline.into_iter().flatten().any(|e| e["event_id"] == join_id.as_str()) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let timeline = rooms["join"][&room]["timeline"]["events"].as_array().unwrap();
    assert!(timeline.iter().any(|e| e["event_id"] == join_id.as_str()), "{rooms}");

    // Carol leaves through make_leave and send_leave on A: B hears of it from A too.
    let path = format!("/_matrix/federation/v1/make_leave/{}/{}", enc(&room), enc(&carol));
    let (status, body) = fed(&a, &c, Method::GET, &path, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (id, event) = complete(&c, &body["event"], "10");
    let path = format!("/_matrix/federation/v2/send_leave/{}/{}", enc(&room), enc(&id));
    let (status, body) = fed(&a, &c, Method::PUT, &path, Some(&event)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    until_membership(&b, &room, &carol, "leave").await;
    let b_state = b.services().rooms.current_state(room_ref).unwrap();
    let b_leave = b.services().rooms.state_event(&b_state, "m.room.member", &carol).unwrap();
    assert_eq!(b_leave.unwrap().event_id.as_str(), id);

    // The room now asks to knock; carol knocks through make_knock and send_knock on A, and B
    // hears of the knock from A as well.
    let rules = format!("/_matrix/client/v3/rooms/{}/state/m.room.join_rules/", enc(&room));
    let (status, body) =
        a.server.put(&rules, Some(&alice_token), json!({ "join_rule": "knock" })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let path = format!("/_matrix/federation/v1/make_knock/{}/{}?ver=10", enc(&room), enc(&carol));
    let (status, body) = fed(&a, &c, Method::GET, &path, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (id, event) = complete(&c, &body["event"], "10");
    let path = format!("/_matrix/federation/v1/send_knock/{}/{}", enc(&room), enc(&id));
    let (status, body) = fed(&a, &c, Method::PUT, &path, Some(&event)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    until_membership(&b, &room, &carol, "knock").await;
    let b_state = b.services().rooms.current_state(room_ref).unwrap();
    let b_knock = b.services().rooms.state_event(&b_state, "m.room.member", &carol).unwrap();
    assert_eq!(b_knock.unwrap().event_id.as_str(), id);
}

#[tokio::test]
async fn make_join_and_send_join_refuse_what_they_must() {
    let (_pki, a, b) = pair().await;
    let (_alice, alice_token, _) = a.server.register("alice", "secret-pass-1").await;
    let public = a
        .server
        .create_room(&alice_token, json!({ "preset": "public_chat", "room_version": "10" }))
        .await;
    let private = a.server.create_room(&alice_token, json!({ "preset": "private_chat" })).await;
    let bob = format!("@bob:{}", b.name);
    let make = |room: &str, user: &str, ver: &str| {
        format!("/_matrix/federation/v1/make_join/{}/{}?ver={ver}", enc(room), enc(user))
    };

    // Unsupported by the joining server: the room's version is named.
    let (status, body) = fed(&a, &b, Method::GET, &make(&public, &bob, "9"), None).await;
    assert_error(&(status, body.clone()), StatusCode::BAD_REQUEST, "M_INCOMPATIBLE_ROOM_VERSION");
    assert_eq!(body["room_version"], "10");
    // Invite-only.
    let (status, body) =
        fed(&a, &b, Method::GET, &make(&private, &bob, "10&ver=11&ver=12"), None).await;
    assert_error(&(status, body), StatusCode::FORBIDDEN, "M_FORBIDDEN");
    // Unknown room.
    let unknown = format!("!unknown:{}", a.name);
    let (status, body) = fed(&a, &b, Method::GET, &make(&unknown, &bob, "10"), None).await;
    assert_error(&(status, body), StatusCode::NOT_FOUND, "M_NOT_FOUND");
    // A user of another server than the one asking.
    let other = "@eve:other.example";
    let (status, body) = fed(&a, &b, Method::GET, &make(&public, other, "10"), None).await;
    assert_error(&(status, body), StatusCode::FORBIDDEN, "M_FORBIDDEN");

    // The template names the user, the room and A's graph.
    let (status, body) = fed(&a, &b, Method::GET, &make(&public, &bob, "10"), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["room_version"], "10");
    let template = &body["event"];
    assert_eq!(template["type"], "m.room.member");
    assert_eq!(template["state_key"], bob.as_str());
    assert_eq!(template["content"]["membership"], "join");
    assert!(template["depth"].as_u64().unwrap() > 1);
    assert!(!template["prev_events"].as_array().unwrap().is_empty());
    assert!(template["auth_events"].as_array().unwrap().len() >= 3);

    // send_join of another server's user: refused before anything is stored.
    let mut forged = template.clone();
    forged["sender"] = json!(other);
    forged["state_key"] = json!(other);
    let (id, forged) = complete(&b, &forged, "10");
    let send = |room: &str, id: &str| {
        format!("/_matrix/federation/v2/send_join/{}/{}", enc(room), enc(id))
    };
    let (status, body) = fed(&a, &b, Method::PUT, &send(&public, &id), Some(&forged)).await;
    assert_error(&(status, body), StatusCode::FORBIDDEN, "M_FORBIDDEN");
    // An event id that is not the event's.
    let (_, event) = complete(&b, template, "10");
    let (status, body) = fed(&a, &b, Method::PUT, &send(&public, &id), Some(&event)).await;
    assert_error(&(status, body), StatusCode::BAD_REQUEST, "M_BAD_JSON");
    // A leave sent as a join.
    let mut leave = template.clone();
    leave["content"]["membership"] = json!("leave");
    let (leave_id, leave) = complete(&b, &leave, "10");
    let (status, body) = fed(&a, &b, Method::PUT, &send(&public, &leave_id), Some(&leave)).await;
    assert_error(&(status, body), StatusCode::BAD_REQUEST, "M_BAD_JSON");

    // The real one: the state before it, its auth chain, the event, the servers.
    let (id, event) = complete(&b, template, "10");
    let (status, body) = fed(&a, &b, Method::PUT, &send(&public, &id), Some(&event)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let kinds: Vec<&str> =
        body["state"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    for kind in ["m.room.create", "m.room.power_levels", "m.room.join_rules", "m.room.member"] {
        assert!(kinds.contains(&kind), "{kinds:?}");
    }
    assert!(!body["auth_chain"].as_array().unwrap().is_empty());
    assert_eq!(body["event"]["sender"], bob.as_str());
    assert_eq!(body["servers_in_room"], json!([a.name.as_str(), b.name.as_str()]));
    assert_eq!(body.get("members_omitted").unwrap_or(&json!(false)), &json!(false));

    // Then a leave through make_leave/send_leave.
    let path = format!("/_matrix/federation/v1/make_leave/{}/{}", enc(&public), enc(&bob));
    let (status, body) = fed(&a, &b, Method::GET, &path, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["event"]["content"]["membership"], "leave");
    let (id, event) = complete(&b, &body["event"], "10");
    let path = format!("/_matrix/federation/v2/send_leave/{}/{}", enc(&public), enc(&id));
    let (status, body) = fed(&a, &b, Method::PUT, &path, Some(&event)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({}));
    let room_ref: &ruma::RoomId = public.as_str().try_into().unwrap();
    let bob_ref: &ruma::UserId = bob.as_str().try_into().unwrap();
    assert_eq!(a.services().rooms.membership(room_ref, bob_ref).unwrap().as_deref(), Some("leave"));
    // No leave for someone not in the room.
    let path = format!("/_matrix/federation/v1/make_leave/{}/{}", enc(&public), enc(&bob));
    let (status, body) = fed(&a, &b, Method::GET, &path, None).await;
    assert_error(&(status, body), StatusCode::FORBIDDEN, "M_FORBIDDEN");
}

/// Not a speed assertion (those live in the benchmark): prints how long a remote join of a
/// room of 1,000 members takes, state and auth chain over `send_join` included.
#[tokio::test]
async fn a_join_to_a_thousand_member_room_carries_its_whole_state() {
    let (_pki, a, b) = pair().await;
    let (_alice, alice_token, _) = a.server.register("alice", "secret-pass-1").await;
    let room_id = a.server.create_room(&alice_token, json!({ "preset": "public_chat" })).await;
    let room_ref: &ruma::RoomId = room_id.as_str().try_into().unwrap();
    for i in 0..1_000 {
        let member = ruma::UserId::parse(format!("@m{i}:{}", a.name)).unwrap();
        plaza::service::rooms::membership::join(a.services(), room_ref, &member, None, None)
            .await
            .unwrap();
    }
    let (_bob, bob_token, _) = b.server.register("bob", "secret-pass-1").await;
    let path = format!("/_matrix/client/v3/join/{}?via={}", enc(&room_id), a.name);
    let started = std::time::Instant::now();
    let (status, body) = b.server.post(&path, Some(&bob_token), json!({})).await;
    let elapsed = started.elapsed();
    assert_eq!(status, StatusCode::OK, "{body}");
    let members = b.services().rooms.members(room_ref).unwrap();
    assert_eq!(members.iter().filter(|(_, m)| m == "join").count(), 1_002);
    println!("remote join of a 1,002-member room: {elapsed:?}");
}
