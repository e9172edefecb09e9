//! Invites and knocks between two Plaza servers: an invite of A's user to B's user seen in
//! B's `/sync` and sliding sync with the room's stripped state, accepted (messages both ways)
//! or rejected (left on both sides); a knock from B's user on A's room let in; `createRoom`
//! inviting B's user; a pending invite kept across a restart; and the invites A refuses.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use ruma::{CanonicalJsonObject, CanonicalJsonValue, RoomId, RoomVersionId, UserId};
use serde_json::{Value, json};

use super::{
    harness::*,
    sending::{eventually, until_bodies},
};
use crate::common::{TestServer, assert_error, enc};

const SLIDING: &str = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync";

/// One `/sync` of `token` (`since` a previous `next_batch`); returns the body.
async fn sync(server: &TestServer, token: &str, since: Option<&str>) -> Value {
    let path = match since {
        Some(since) => format!("/_matrix/client/v3/sync?timeout=0&since={since}"),
        None => "/_matrix/client/v3/sync?timeout=0".to_owned(),
    };
    let (status, body) = server.get(&path, Some(token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

/// The stripped event `kind` (state key `key`) of a sync's invite or knock entry.
fn stripped<'a>(events: &'a Value, kind: &str, key: &str) -> Option<&'a Value> {
    events["events"].as_array()?.iter().find(|e| e["type"] == kind && e["state_key"] == key)
}

fn membership_on(s: &FedServer, room: &str, user: &str) -> Option<String> {
    let room: &RoomId = room.try_into().unwrap();
    let user: &UserId = user.try_into().unwrap();
    s.services().rooms.membership(room, user).unwrap()
}

fn outside_on(s: &FedServer, room: &str, user: &str) -> Option<String> {
    let room: &RoomId = room.try_into().unwrap();
    let user: &UserId = user.try_into().unwrap();
    s.services().rooms.outside(user, room).unwrap().map(|record| record.membership)
}

async fn invite(s: &FedServer, token: &str, room: &str, user: &str) -> (StatusCode, Value) {
    s.server.membership(token, room, "invite", json!({ "user_id": user })).await
}

#[tokio::test]
async fn an_invite_from_another_server_is_seen_accepted_and_messages_flow_both_ways() {
    let (_pki, a, b) = pair().await;
    let (_alice, alice_token, _) = a.server.register("alice", "secret-pass-1").await;
    let (bob, bob_token, _) = b.server.register("bob", "secret-pass-1").await;
    let room = a
        .server
        .create_room(&alice_token, json!({ "preset": "private_chat", "name": "Plans" }))
        .await;
    let since = sync(&b.server, &bob_token, None).await["next_batch"].as_str().unwrap().to_owned();

    // Bob's waiting sync wakes for the invite.
    let waiting = {
        let server = b.server.base.clone();
        let token = bob_token.clone();
        let since = since.clone();
        tokio::spawn(async move {
            let url = format!("{server}/_matrix/client/v3/sync?timeout=20000&since={since}");
            let started = std::time::Instant::now();
            let response = reqwest::Client::new().get(url).bearer_auth(token).send().await.unwrap();
            (started.elapsed(), response.json::<Value>().await.unwrap())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body) = invite(&a, &alice_token, &room, &bob).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(membership_on(&a, &room, &bob).as_deref(), Some("invite"));
    let (waited, woken) = waiting.await.unwrap();
    assert!(waited < Duration::from_secs(10), "the sync was not woken: {waited:?}");
    let invited = &woken["rooms"]["invite"][&room]["invite_state"];
    assert_eq!(stripped(invited, "m.room.name", "").unwrap()["content"]["name"], "Plans");
    let own = stripped(invited, "m.room.member", &bob).unwrap_or_else(|| panic!("{woken}"));
    assert_eq!(own["content"]["membership"], "invite");
    assert!(own["sender"].as_str().unwrap().starts_with("@alice:"));
    assert!(stripped(invited, "m.room.create", "").is_some(), "{invited}");

    // Sliding sync lists it as an invite with the same stripped state.
    let request = json!({ "lists": { "invites": {
        "ranges": [[0, 10]], "timeline_limit": 1, "filters": { "is_invite": true },
    } } });
    let (status, slid) = b.server.post(SLIDING, Some(&bob_token), request).await;
    assert_eq!(status, StatusCode::OK, "{slid}");
    assert_eq!(slid["lists"]["invites"]["count"], 1, "{slid}");
    let listed = &slid["rooms"][&room];
    assert_eq!(listed["name"], "Plans", "{slid}");
    let state = listed["invite_state"].as_array().unwrap();
    assert!(state.iter().any(|e| e["type"] == "m.room.member" && e["state_key"] == bob.as_str()));

    // Accepted: the join goes through A; the invite leaves B's store with the join.
    let (status, body) = b
        .server
        .post(&format!("/_matrix/client/v3/join/{}", enc(&room)), Some(&bob_token), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(membership_on(&b, &room, &bob).as_deref(), Some("join"));
    assert_eq!(outside_on(&b, &room, &bob), None);
    eventually("A sees bob joined", || membership_on(&a, &room, &bob).as_deref() == Some("join"))
        .await;
    let after = sync(&b.server, &bob_token, Some(&since)).await;
    assert!(after["rooms"]["join"].get(&room).is_some(), "{after}");
    assert!(after["rooms"]["invite"].get(&room).is_none(), "{after}");

    let (status, _) = a.server.send_text(&alice_token, &room, "m1", "from A").await;
    assert_eq!(status, StatusCode::OK);
    until_bodies(&b, &bob_token, &room, &["from A"]).await;
    let (status, _) = b.server.send_text(&bob_token, &room, "m2", "from B").await;
    assert_eq!(status, StatusCode::OK);
    until_bodies(&a, &alice_token, &room, &["from A", "from B"]).await;
}

#[tokio::test]
async fn a_rejected_invite_is_left_on_both_sides_and_a_pending_one_survives_a_restart() {
    let (pki, a, b) = pair().await;
    let (_alice, alice_token, _) = a.server.register("alice", "secret-pass-1").await;
    let (bob, bob_token, _) = b.server.register("bob", "secret-pass-1").await;
    let room = a.server.create_room(&alice_token, json!({ "name": "No thanks" })).await;
    let since = sync(&b.server, &bob_token, None).await["next_batch"].as_str().unwrap().to_owned();
    let (status, body) = invite(&a, &alice_token, &room, &bob).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let invited = sync(&b.server, &bob_token, Some(&since)).await;
    assert!(invited["rooms"]["invite"].get(&room).is_some(), "{invited}");
    let since = invited["next_batch"].as_str().unwrap().to_owned();

    // A room held elsewhere cannot be forgotten while invited.
    let forget = format!("/_matrix/client/v3/rooms/{}/forget", enc(&room));
    let (status, _) = b.server.post(&forget, Some(&bob_token), json!({})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let (status, body) = b.server.membership(&bob_token, &room, "leave", json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(membership_on(&a, &room, &bob).as_deref(), Some("leave"));
    assert_eq!(outside_on(&b, &room, &bob).as_deref(), Some("leave"));
    // Left once in /sync, then gone.
    let left = sync(&b.server, &bob_token, Some(&since)).await;
    assert!(left["rooms"]["invite"].get(&room).is_none(), "{left}");
    let entry = &left["rooms"]["leave"][&room];
    let leave = &entry["timeline"]["events"][0];
    assert_eq!(leave["content"]["membership"], "leave", "{left}");
    assert_eq!(leave["state_key"], bob.as_str());
    let next = left["next_batch"].as_str().unwrap();
    let quiet = sync(&b.server, &bob_token, Some(next)).await;
    assert!(quiet["rooms"]["leave"].get(&room).is_none(), "{quiet}");
    let fresh = sync(&b.server, &bob_token, None).await;
    assert!(fresh["rooms"]["invite"].get(&room).is_none(), "{fresh}");
    // Rejecting twice: nothing left to reject.
    let (status, _) = b.server.membership(&bob_token, &room, "leave", json!({})).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) = b.server.post(&forget, Some(&bob_token), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(outside_on(&b, &room, &bob), None);

    // An invite A withdraws (a kick of the invitee) ends on B as left.
    let withdrawn = a.server.create_room(&alice_token, json!({ "name": "Withdrawn" })).await;
    let (status, body) = invite(&a, &alice_token, &withdrawn, &bob).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let before = sync(&b.server, &bob_token, None).await;
    assert!(before["rooms"]["invite"].get(&withdrawn).is_some(), "{before}");
    let since = before["next_batch"].as_str().unwrap().to_owned();
    let (status, body) =
        a.server.membership(&alice_token, &withdrawn, "kick", json!({ "user_id": bob })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    eventually("B hears the invite withdrawn", || {
        outside_on(&b, &withdrawn, &bob).as_deref() == Some("leave")
    })
    .await;
    let after = sync(&b.server, &bob_token, Some(&since)).await;
    assert!(after["rooms"]["invite"].get(&withdrawn).is_none(), "{after}");
    let kick = &after["rooms"]["leave"][&withdrawn]["timeline"]["events"][0];
    assert_eq!(kick["content"]["membership"], "leave", "{after}");
    assert!(kick["sender"].as_str().unwrap().starts_with("@alice:"), "{after}");

    // A pending invite is kept across B's restart.
    let second = a.server.create_room(&alice_token, json!({ "name": "Later" })).await;
    let (status, body) = invite(&a, &alice_token, &second, &bob).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let b = b.restart(|_| {}, |_| {}).await;
    let (status, body) = b.server.login("bob", "secret-pass-1").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let bob_token = body["access_token"].as_str().unwrap();
    let initial = sync(&b.server, bob_token, None).await;
    let invited = &initial["rooms"]["invite"][&second]["invite_state"];
    assert_eq!(stripped(invited, "m.room.name", "").unwrap()["content"]["name"], "Later");

    // A server the invite did not come from cannot withdraw it, however well it signs.
    let c = FedServer::start(&pki, 3, |_| {}).await;
    let mut leave = invite_event(&c, &second, &format!("@mallory:{}", c.name), &bob);
    leave.insert(
        "content".into(),
        CanonicalJsonValue::Object(
            serde_json::from_value(json!({ "membership": "leave" })).unwrap(),
        ),
    );
    leave.remove("signatures");
    leave.remove("hashes");
    let bob_id: &UserId = bob.as_str().try_into().unwrap();
    let room_id: &RoomId = second.as_str().try_into().unwrap();
    let version = b.services().rooms.outside(bob_id, room_id).unwrap().unwrap().version;
    let rules = version.rules().unwrap();
    c.sign_pdu(&mut leave, &rules);
    let txn = json!({
        "origin": c.name.as_str(),
        "origin_server_ts": 1_700_000_000_000u64,
        "pdus": [leave],
    });
    let path = "/_matrix/federation/v1/send/forged-withdrawal";
    let (status, body) = b
        .signed(
            Method::PUT,
            path,
            c.name.as_str(),
            None,
            c.key(),
            &c.key_id(),
            Some(&txn),
            Some(&txn),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let results = body["pdus"].as_object().unwrap();
    assert_eq!(results.len(), 1, "{body}");
    assert!(results.values().all(|result| result["error"].is_string()), "{body}");
    assert_eq!(outside_on(&b, &second, &bob).as_deref(), Some("invite"));
}

#[tokio::test]
async fn a_knock_from_another_server_is_seen_and_let_in() {
    let (_pki, a, b) = pair().await;
    let (_alice, alice_token, _) = a.server.register("alice", "secret-pass-1").await;
    let (bob, bob_token, _) = b.server.register("bob", "secret-pass-1").await;
    let room = a
        .server
        .create_room(
            &alice_token,
            json!({
                "name": "Knock first",
                "initial_state": [{
                    "type": "m.room.join_rules", "state_key": "",
                    "content": { "join_rule": "knock" },
                }],
            }),
        )
        .await;
    let since = sync(&b.server, &bob_token, None).await["next_batch"].as_str().unwrap().to_owned();
    let path = format!("/_matrix/client/v3/knock/{}?via={}", enc(&room), a.name);
    let (status, body) =
        b.server.post(&path, Some(&bob_token), json!({ "reason": "let me in" })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["room_id"], room);
    assert_eq!(membership_on(&a, &room, &bob).as_deref(), Some("knock"));
    let knocked = sync(&b.server, &bob_token, Some(&since)).await;
    let state = &knocked["rooms"]["knock"][&room]["knock_state"];
    assert_eq!(stripped(state, "m.room.name", "").unwrap()["content"]["name"], "Knock first");
    assert_eq!(stripped(state, "m.room.member", &bob).unwrap()["content"]["membership"], "knock");
    let since = knocked["next_batch"].as_str().unwrap().to_owned();

    // A lets bob in with an invite, which B's store takes over from the knock.
    let (status, body) = invite(&a, &alice_token, &room, &bob).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(outside_on(&b, &room, &bob).as_deref(), Some("invite"));
    let invited = sync(&b.server, &bob_token, Some(&since)).await;
    assert!(invited["rooms"]["invite"].get(&room).is_some(), "{invited}");
    let path = format!("/_matrix/client/v3/rooms/{}/join", enc(&room));
    let (status, body) = b.server.post(&path, Some(&bob_token), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    eventually("A sees bob joined", || membership_on(&a, &room, &bob).as_deref() == Some("join"))
        .await;
    let (status, _) = b.server.send_text(&bob_token, &room, "k1", "thanks").await;
    assert_eq!(status, StatusCode::OK);
    until_bodies(&a, &alice_token, &room, &["thanks"]).await;

    // A knock withdrawn is a leave through A.
    let other = a
        .server
        .create_room(
            &alice_token,
            json!({ "initial_state": [{
                "type": "m.room.join_rules", "state_key": "", "content": { "join_rule": "knock" },
            }] }),
        )
        .await;
    let path = format!("/_matrix/client/v3/knock/{}?via={}", enc(&other), a.name);
    let (status, body) = b.server.post(&path, Some(&bob_token), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = b.server.membership(&bob_token, &other, "leave", json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(membership_on(&a, &other, &bob).as_deref(), Some("leave"));
}

#[tokio::test]
async fn create_room_invites_a_user_of_another_server_and_an_unreachable_one_is_an_error() {
    let (_pki, a, b) = pair().await;
    let (_alice, alice_token, _) = a.server.register("alice", "secret-pass-1").await;
    let (bob, bob_token, _) = b.server.register("bob", "secret-pass-1").await;
    let room = a
        .server
        .create_room(&alice_token, json!({ "invite": [bob], "is_direct": true, "name": "DM" }))
        .await;
    assert_eq!(membership_on(&a, &room, &bob).as_deref(), Some("invite"));
    let body = sync(&b.server, &bob_token, None).await;
    let invited = &body["rooms"]["invite"][&room]["invite_state"];
    let own = stripped(invited, "m.room.member", &bob).unwrap_or_else(|| panic!("{body}"));
    assert_eq!(own["content"]["is_direct"], true);

    // A user of a server nobody answers for: a clear error, nothing stored.
    let ghost = format!("@ghost:127.0.0.9:{}", free_port_on(std::net::Ipv4Addr::new(127, 0, 0, 9)));
    let result = invite(&a, &alice_token, &room, &ghost).await;
    assert_error(&result, StatusCode::BAD_GATEWAY, "M_CONNECTION_FAILED");
    assert_eq!(membership_on(&a, &room, &ghost), None);
    // B refuses an invite of a user it does not have: A's client hears so.
    let nobody = format!("@nobody:{}", b.name);
    let result = invite(&a, &alice_token, &room, &nobody).await;
    assert_error(&result, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    assert_eq!(membership_on(&a, &room, &nobody), None);
}

/// An invite event of `sender` (signed by `by`, a server) for `invitee` in `room`.
fn invite_event(by: &FedServer, room: &str, sender: &str, invitee: &str) -> CanonicalJsonObject {
    let event = json!({
        "type": "m.room.member",
        "room_id": room,
        "sender": sender,
        "state_key": invitee,
        "content": { "membership": "invite" },
        "auth_events": [],
        "prev_events": [],
        "depth": 3,
        "origin": by.name.as_str(),
        "origin_server_ts": 1_700_000_000_000u64,
    });
    let mut wire: CanonicalJsonObject = serde_json::from_value(event).unwrap();
    let rules = RoomVersionId::V10.rules().unwrap();
    by.sign_pdu(&mut wire, &rules);
    wire
}

fn event_id(wire: &CanonicalJsonObject) -> String {
    let rules = RoomVersionId::V10.rules().unwrap();
    format!("${}", ruma::signatures::reference_hash(wire, &rules).unwrap())
}

/// `PUT /invite` from `from` to `to`.
async fn put_invite(
    to: &FedServer,
    from: &FedServer,
    (room, id): (&str, &str),
    body: &Value,
) -> (StatusCode, Value) {
    let path = format!("/_matrix/federation/v2/invite/{}/{}", enc(room), enc(id));
    to.signed(
        Method::PUT,
        &path,
        from.name.as_str(),
        None,
        from.key(),
        &from.key_id(),
        Some(body),
        Some(body),
    )
    .await
}

#[tokio::test]
async fn bad_invites_from_another_server_are_refused() {
    let (_pki, a, b) = pair().await;
    let (alice, alice_token, _) = a.server.register("alice", "secret-pass-1").await;
    let room = format!("!elsewhere:{}", b.name);
    let mallory = format!("@mallory:{}", b.name);
    let body = |wire: &CanonicalJsonObject, version: &str| json!({ "room_version": version, "event": wire, "invite_room_state": [] });

    // A good one first: signed back by A, kept for alice.
    let good = invite_event(&b, &room, &mallory, &alice);
    let id = event_id(&good);
    let (status, answer) = put_invite(&a, &b, (&room, &id), &body(&good, "10")).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert!(answer["event"]["signatures"][a.name.as_str()].is_object(), "{answer}");
    assert!(answer["event"]["signatures"][b.name.as_str()].is_object(), "{answer}");
    assert_eq!(outside_on(&a, &room, &alice).as_deref(), Some("invite"));

    // The sender is not of the requesting server.
    let other = format!("!other:{}", b.name);
    let wire = invite_event(&b, &other, "@mallory:elsewhere.example", &alice);
    let result = put_invite(&a, &b, (&other, &event_id(&wire)), &body(&wire, "10")).await;
    assert_error(&result, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    // Not a user of A.
    let wire = invite_event(&b, &other, &mallory, &format!("@nobody:{}", a.name));
    let result = put_invite(&a, &b, (&other, &event_id(&wire)), &body(&wire, "10")).await;
    assert_error(&result, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    // A signature that does not verify (a signed field changed after signing).
    let mut wire = invite_event(&b, &other, &mallory, &alice);
    wire.insert("depth".into(), CanonicalJsonValue::Integer(7u32.into()));
    let result = put_invite(&a, &b, (&other, &event_id(&wire)), &body(&wire, "10")).await;
    assert_error(&result, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    // A room version A does not support.
    let wire = invite_event(&b, &other, &mallory, &alice);
    let result = put_invite(&a, &b, (&other, &event_id(&wire)), &body(&wire, "999")).await;
    assert_error(&result, StatusCode::BAD_REQUEST, "M_INCOMPATIBLE_ROOM_VERSION");
    // The event id in the path is not the event's.
    let result = put_invite(&a, &b, (&other, &id), &body(&wire, "10")).await;
    assert_error(&result, StatusCode::BAD_REQUEST, "M_BAD_JSON");
    // Not an invite.
    let mut wire = invite_event(&b, &other, &mallory, &alice);
    wire.insert("type".into(), CanonicalJsonValue::String("m.room.message".into()));
    let result = put_invite(&a, &b, (&other, &event_id(&wire)), &body(&wire, "10")).await;
    assert_error(&result, StatusCode::BAD_REQUEST, "M_BAD_JSON");
    // A body that is not the endpoint's.
    let result = put_invite(&a, &b, (&other, &id), &json!({ "event": 5 })).await;
    assert!(result.0 == StatusCode::BAD_REQUEST, "{result:?}");

    // The first invite names a room B does not have: B refuses the leave, and alice is rid of
    // the invite all the same, shown left once.
    let since = sync(&a.server, &alice_token, None).await;
    assert!(since["rooms"]["invite"].get(&room).is_some(), "{since}");
    let since = since["next_batch"].as_str().unwrap();
    let (status, answer) = a.server.membership(&alice_token, &room, "leave", json!({})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(outside_on(&a, &room, &alice).as_deref(), Some("leave"));
    let left = sync(&a.server, &alice_token, Some(since)).await;
    assert!(left["rooms"]["invite"].get(&room).is_none(), "{left}");
    assert_eq!(left["rooms"]["leave"][&room]["timeline"]["events"], json!([]), "{left}");

    // The invitee ignores the sender.
    let path = format!("/_matrix/client/v3/user/{}/account_data/m.ignored_user_list", enc(&alice));
    let ignored = json!({ "ignored_users": { mallory.clone(): {} } });
    let (status, _) = a.server.put(&path, Some(&alice_token), ignored).await;
    assert_eq!(status, StatusCode::OK);
    let wire = invite_event(&b, &other, &mallory, &alice);
    let result = put_invite(&a, &b, (&other, &event_id(&wire)), &body(&wire, "10")).await;
    assert_error(&result, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    assert_eq!(outside_on(&a, &other, &alice), None);
}
