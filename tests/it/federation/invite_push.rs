//! Pushes for invites from another server: A's user invites B's user, whose phone's push
//! gateway gets one notification naming the invite, the room and the inviter; with the
//! invitee's `.m.rule.invite_for_me` disabled, it gets none; a push queued while the gateway is
//! down survives a restart.

use reqwest::StatusCode;
use ruma::{RoomId, UserId};
use serde_json::{Value, json};

use super::harness::*;
use crate::{
    common::enc,
    pushers::{Gateway, pusher},
};

const INVITE_RULE: &str = "/_matrix/client/v3/pushrules/global/override/.m.rule.invite_for_me";

/// Alice on A (display name "Alice Liddell") and bob on B with a pusher to the gateway at
/// `url`; returns (alice's token, bob's id, bob's token).
async fn alice_and_bob(a: &FedServer, b: &FedServer, url: &str) -> (String, String, String) {
    let (alice, alice_token, _) = a.server.register("alice", "secret-pass-1").await;
    let (bob, bob_token, _) = b.server.register("bob", "secret-pass-1").await;
    let path = format!("/_matrix/client/v3/profile/{}/displayname", enc(&alice));
    let named = a.server.put(&path, Some(&alice_token), json!({ "displayname": "Alice Liddell" }));
    assert_eq!(named.await.0, StatusCode::OK);
    let set = pusher(url, "phone", None);
    let (status, body) =
        b.server.post("/_matrix/client/v3/pushers/set", Some(&bob_token), set).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    (alice_token, bob, bob_token)
}

/// Alice creates a room named `name` and invites bob to it; returns the room and the invite's
/// id as B keeps it.
async fn invite(
    a: &FedServer,
    b: &FedServer,
    alice: &str,
    bob: &str,
    name: &str,
) -> (String, String) {
    let room = a.server.create_room(alice, json!({ "preset": "private_chat", "name": name })).await;
    let (status, body) =
        a.server.membership(alice, &room, "invite", json!({ "user_id": bob })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let room_id: &RoomId = room.as_str().try_into().unwrap();
    let user_id: &UserId = bob.try_into().unwrap();
    let kept = b.services().rooms.outside(user_id, room_id).unwrap().expect("B keeps the invite");
    (room, kept.event_id.expect("the invite's id").to_string())
}

/// The notification of a push, once its room is checked.
fn notification<'a>(push: &'a Value, room: &str) -> &'a Value {
    let n = &push["notification"];
    assert_eq!(n["room_id"], room, "{push}");
    n
}

#[tokio::test]
async fn an_invite_from_another_server_reaches_the_invitees_push_gateway_once() {
    let (_pki, a, b) = pair().await;
    let mut gateway = Gateway::start(&[]).await;
    let (alice, bob, _) = alice_and_bob(&a, &b, &gateway.url()).await;

    let (room, event_id) = invite(&a, &b, &alice, &bob, "Plans").await;
    let push = gateway.next().await;
    let n = notification(&push, &room);
    assert_eq!(n["event_id"], event_id.as_str(), "{push}");
    assert_eq!(n["type"], "m.room.member");
    assert!(n["sender"].as_str().unwrap().starts_with("@alice:"), "{push}");
    assert_eq!(n["content"]["membership"], "invite");
    assert_eq!(n["user_is_target"], true);
    assert_eq!(n["room_name"], "Plans");
    assert_eq!(n["sender_display_name"], "Alice Liddell");
    assert!(n.get("prio").is_none_or(|p| p == "high"), "high (the default when omitted): {push}");
    let device = &n["devices"][0];
    assert_eq!(device["pushkey"], "phone");
    assert_eq!(device["tweaks"]["sound"], "default", "{push}");

    // Exactly one: the next push to the same device is that of a later invite.
    let (later, later_id) = invite(&a, &b, &alice, &bob, "Later").await;
    let push = gateway.next().await;
    assert_eq!(notification(&push, &later)["event_id"], later_id.as_str());
}

#[tokio::test]
async fn an_invitee_who_disabled_invite_for_me_gets_no_push() {
    let (_pki, a, b) = pair().await;
    let mut gateway = Gateway::start(&[]).await;
    let (alice, bob, bob_token) = alice_and_bob(&a, &b, &gateway.url()).await;
    let enabled = format!("{INVITE_RULE}/enabled");
    let off = b.server.put(&enabled, Some(&bob_token), json!({ "enabled": false })).await;
    assert_eq!(off.0, StatusCode::OK, "{}", off.1);

    let (silent, _) = invite(&a, &b, &alice, &bob, "Silent").await;

    // Turned back on, the next invite pushes; had the first pushed, it would have come first
    // (it was queued before its invite was answered, and one device's pushes keep their order).
    let on = b.server.put(&enabled, Some(&bob_token), json!({ "enabled": true })).await;
    assert_eq!(on.0, StatusCode::OK, "{}", on.1);
    let (heard, heard_id) = invite(&a, &b, &alice, &bob, "Heard").await;
    let push = gateway.next().await;
    assert_ne!(push["notification"]["room_id"], silent.as_str(), "{push}");
    assert_eq!(notification(&push, &heard)["event_id"], heard_id.as_str());
}

#[tokio::test]
async fn an_invite_push_queued_while_the_gateway_is_down_arrives_after_a_restart() {
    let (_pki, a, b) = pair().await;
    // Reserve a port, then leave it closed while the invite arrives.
    let reserved = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = reserved.local_addr().unwrap();
    drop(reserved);
    let url = format!("http://{addr}/_matrix/push/v1/notify");
    let (alice, bob, _) = alice_and_bob(&a, &b, &url).await;
    let (room, event_id) = invite(&a, &b, &alice, &bob, "Offline").await;

    let b = b.restart(|_| {}, |_| {}).await;
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let mut gateway = Gateway::start_on(listener, &[]);
    let push = gateway.next().await;
    let n = notification(&push, &room);
    assert_eq!(n["event_id"], event_id.as_str(), "{push}");
    assert_eq!(n["room_name"], "Offline");
    assert_eq!(n["sender_display_name"], "Alice Liddell");
    drop(b);
}
