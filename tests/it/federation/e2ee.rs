//! End-to-end encryption between two Plaza servers: a user's device and cross-signing changes
//! reach the other server's clients (`/sync` `device_lists.changed` and fresh `/keys/query`
//! answers, not a stale cache), the device-list stream ids `/user/devices` reports survive a
//! restart, presence goes across only when `[federation] presence` allows it, and matrix-sdk
//! clients of each server exchange encrypted messages both ways.

use std::time::Duration;

use ed25519_dalek::SigningKey;
use matrix_sdk::{
    Client,
    config::SyncSettings,
    deserialized_responses::TimelineEventKind,
    ruma::{
        OwnedServerName, RoomOrAliasId,
        api::client::room::create_room,
        events::{
            InitialStateEvent,
            room::{encryption::RoomEncryptionEventContent, message::RoomMessageEventContent},
        },
    },
};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use super::harness::*;
use crate::{
    common::{TestServer, enc},
    e2ee::{b64, device_keys, sign},
    sdk::sdk_client,
};

const PASSWORD: &str = "secret-pass-1";

/// Waits (up to 15 s) for `check` to hold on what `fetch` returns; returns that.
async fn eventually<F: std::future::Future<Output = Value>>(
    what: &str,
    mut fetch: impl FnMut() -> F,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let mut last = Value::Null;
    for _ in 0..150 {
        last = fetch().await;
        if check(&last) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("never happened: {what}; last answer {last}");
}

/// `user`'s devices and cross-signing keys as `token`'s server answers `/keys/query`.
async fn query_keys(server: &TestServer, token: &str, user: &str) -> Value {
    let body = json!({ "device_keys": { user: [] } });
    let (status, keys) = server.post("/_matrix/client/v3/keys/query", Some(token), body).await;
    assert_eq!(status, StatusCode::OK, "{keys}");
    keys
}

/// A sync of `token` since `since` (everything after it, however often asked).
async fn sync_since(server: &TestServer, token: &str, since: &str) -> Value {
    let path = format!("/_matrix/client/v3/sync?timeout=0&since={}", enc(since));
    let (status, body) = server.get(&path, Some(token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

/// The `next_batch` of a full sync of `token`.
async fn sync_token(server: &TestServer, token: &str) -> String {
    let (status, body) = server.get("/_matrix/client/v3/sync?timeout=0", Some(token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["next_batch"].as_str().unwrap().to_owned()
}

fn changed_includes(sync: &Value, user: &str) -> bool {
    sync["device_lists"]["changed"].as_array().is_some_and(|c| c.iter().any(|u| u == user))
}

/// Runs `method path body` as `user` on `server`, passing the password challenge.
async fn with_password(
    server: &TestServer,
    token: &str,
    user: &str,
    method: Method,
    path: &str,
    body: Value,
) {
    let (status, challenge) =
        server.call(method.clone(), path, Some(token), Some(body.clone())).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{challenge}");
    let mut authed = body;
    authed["auth"] = json!({ "type": "m.login.password", "password": PASSWORD,
        "session": challenge["session"], "identifier": { "type": "m.id.user", "user": user } });
    let (status, answer) = server.call(method, path, Some(token), Some(authed)).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
}

/// A public room of `a`'s user that `b`'s user joins through `a`.
async fn shared_room(a: &FedServer, a_token: &str, b: &FedServer, b_token: &str) -> String {
    let room_id = a.server.create_room(a_token, json!({ "preset": "public_chat" })).await;
    let path = format!("/_matrix/client/v3/join/{}?via={}", enc(&room_id), a.name);
    let (status, body) = b.server.post(&path, Some(b_token), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    room_id
}

/// `GET /_matrix/federation/v1/user/devices/{user}` of `to`, asked by `from`.
async fn user_devices(from: &FedServer, to: &FedServer, user: &str) -> Value {
    let path = format!("/_matrix/federation/v1/user/devices/{}", enc(user));
    let (status, body) = to
        .signed(
            Method::GET,
            &path,
            from.name.as_str(),
            None,
            from.key(),
            &from.key_id(),
            None,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

#[tokio::test]
async fn device_and_cross_signing_changes_reach_the_other_server() {
    let (_pki, a, b) = pair().await;
    let (alice, alice_token, laptop) = a.server.register("alice", PASSWORD).await;
    let (_bob, bob_token, _) = b.server.register("bob", PASSWORD).await;
    // Before they share a room Bob's server asks for Alice's keys (none yet) and keeps the
    // answer; her server has no reason to tell it of her new keys then.
    let keys = query_keys(&b.server, &bob_token, &alice).await;
    assert_eq!(keys["device_keys"][&alice], json!({}), "{keys}");
    let laptop_key = SigningKey::from_bytes(&[11; 32]);
    let upload = json!({ "device_keys": device_keys(&alice, &laptop, &laptop_key) });
    let (status, body) =
        a.server.post("/_matrix/client/v3/keys/upload", Some(&alice_token), upload).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    shared_room(&a, &alice_token, &b, &bob_token).await;

    // Sharing a room now, Bob's server asks again instead of answering from what it kept.
    let keys = eventually(
        "Alice's laptop in Bob's key query",
        || query_keys(&b.server, &bob_token, &alice),
        |keys| keys["device_keys"][&alice].get(&laptop).is_some(),
    )
    .await;
    let devices = keys["device_keys"][&alice].as_object().unwrap();
    assert_eq!(devices.keys().collect::<Vec<_>>(), [&laptop], "{keys}");
    let since = sync_token(&b.server, &bob_token).await;

    // A new device: Alice logs in on a phone, which publishes its keys.
    let (status, login) = a.server.login("alice", PASSWORD).await;
    assert_eq!(status, StatusCode::OK, "{login}");
    let phone = login["device_id"].as_str().unwrap().to_owned();
    let phone_token = login["access_token"].as_str().unwrap().to_owned();
    let phone_key = SigningKey::from_bytes(&[12; 32]);
    let upload = json!({ "device_keys": device_keys(&alice, &phone, &phone_key) });
    let (status, body) =
        a.server.post("/_matrix/client/v3/keys/upload", Some(&phone_token), upload).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let synced = eventually(
        "Alice in Bob's device_lists.changed",
        || sync_since(&b.server, &bob_token, &since),
        |sync| changed_includes(sync, &alice),
    )
    .await;
    assert_eq!(synced["device_lists"]["left"], json!([]), "{synced}");
    // Cached answers are dropped when Alice's server says her devices changed (they would be
    // kept ten minutes otherwise).
    let keys = eventually(
        "the phone's keys in Bob's key query",
        || query_keys(&b.server, &bob_token, &alice),
        |keys| keys["device_keys"][&alice][&phone]["keys"].is_object(),
    )
    .await;
    let phone_keys = &keys["device_keys"][&alice][&phone];
    assert_eq!(
        phone_keys["keys"][format!("ed25519:{phone}")],
        b64(phone_key.verifying_key().as_bytes())
    );
    assert_eq!(keys["device_keys"][&alice].as_object().unwrap().len(), 2, "{keys}");

    // Renamed: the new name shows.
    let path = format!("/_matrix/client/v3/devices/{}", enc(&phone));
    let (status, body) =
        a.server.put(&path, Some(&alice_token), json!({ "display_name": "Alice's phone" })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    eventually(
        "the phone's new name",
        || query_keys(&b.server, &bob_token, &alice),
        |keys| {
            keys["device_keys"][&alice][&phone]["unsigned"]["device_display_name"]
                == "Alice's phone"
        },
    )
    .await;

    // Deleted: gone from Bob's view.
    with_password(&a.server, &alice_token, &alice, Method::DELETE, &path, json!({})).await;
    let keys = eventually(
        "the phone gone",
        || query_keys(&b.server, &bob_token, &alice),
        |keys| keys["device_keys"][&alice].get(&phone).is_none(),
    )
    .await;
    assert!(keys["device_keys"][&alice][&laptop].is_object(), "{keys}");

    // Cross-signing keys: Bob's server learns them without asking again on its own.
    let master = SigningKey::from_bytes(&[13; 32]);
    let self_signing = SigningKey::from_bytes(&[14; 32]);
    let master_public = b64(master.verifying_key().as_bytes());
    let cross = |key: &SigningKey, usage: &str| {
        let public = b64(key.verifying_key().as_bytes());
        json!({ "user_id": alice, "usage": [usage], "keys": { format!("ed25519:{public}"): public } })
    };
    let mut self_key = cross(&self_signing, "self_signing");
    sign(&mut self_key, &master, &alice, &format!("ed25519:{master_public}"));
    let body = json!({ "master_key": cross(&master, "master"), "self_signing_key": self_key });
    let upload = "/_matrix/client/v3/keys/device_signing/upload";
    with_password(&a.server, &alice_token, &alice, Method::POST, upload, body).await;
    let keys = eventually(
        "Alice's master key at Bob's",
        || query_keys(&b.server, &bob_token, &alice),
        |keys| keys["master_keys"][&alice]["keys"].is_object(),
    )
    .await;
    assert_eq!(
        keys["master_keys"][&alice]["keys"][format!("ed25519:{master_public}")],
        master_public
    );
    assert_eq!(keys["self_signing_keys"][&alice]["usage"], json!(["self_signing"]), "{keys}");

    // A signature on her laptop by her self-signing key is a change of that device.
    let mut signed = device_keys(&alice, &laptop, &laptop_key);
    let self_public = b64(self_signing.verifying_key().as_bytes());
    sign(&mut signed, &self_signing, &alice, &format!("ed25519:{self_public}"));
    let body = json!({ alice.as_str(): { laptop.as_str(): signed } });
    let path = "/_matrix/client/v3/keys/signatures/upload";
    let (status, result) = a.server.post(path, Some(&alice_token), body).await;
    assert_eq!(status, StatusCode::OK, "{result}");
    assert_eq!(result["failures"], json!({}));
    let self_key_id = format!("ed25519:{self_public}");
    eventually(
        "the laptop's new signature at Bob's",
        || query_keys(&b.server, &bob_token, &alice),
        |keys| keys["device_keys"][&alice][&laptop]["signatures"][&alice][&self_key_id].is_string(),
    )
    .await;

    // Each device change took the next stream id: registration, the laptop's keys, the
    // phone's login, its keys, its name, its deletion, the laptop's signature.
    let alice_ref: &ruma::UserId = alice.as_str().try_into().unwrap();
    assert_eq!(a.services().e2ee.device_list_stream_id(alice_ref).unwrap(), 7);
    let listed = user_devices(&b, &a, &alice).await;
    assert_eq!(listed["stream_id"], 7, "{listed}");
    let ids: Vec<&str> = listed["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [laptop.as_str()], "{listed}");
    assert_eq!(listed["master_key"]["keys"][format!("ed25519:{master_public}")], master_public);

    // They survive a restart and go on from there.
    let a = a.restart(|_| {}, |_| {}).await;
    assert_eq!(user_devices(&b, &a, &alice).await["stream_id"], 7);
    let path = format!("/_matrix/client/v3/devices/{}", enc(&laptop));
    let (status, body) =
        a.server.put(&path, Some(&alice_token), json!({ "display_name": "Laptop" })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let listed = user_devices(&b, &a, &alice).await;
    assert_eq!(listed["stream_id"], 8, "{listed}");
    assert_eq!(listed["devices"][0]["device_display_name"], "Laptop");
    eventually(
        "the laptop's new name after the restart",
        || query_keys(&b.server, &bob_token, &alice),
        |keys| keys["device_keys"][&alice][&laptop]["unsigned"]["device_display_name"] == "Laptop",
    )
    .await;
}

/// Alice of `a` sets her presence; `bob_sees` says whether Bob of `b` sees it (after a
/// message sent behind it on the same queue has arrived).
async fn presence_across(a: &FedServer, b: &FedServer) -> bool {
    let (alice, alice_token, _) = a.server.register("alice", PASSWORD).await;
    let (_bob, bob_token, _) = b.server.register("bob", PASSWORD).await;
    let room_id = shared_room(a, &alice_token, b, &bob_token).await;
    let since = sync_token(&b.server, &bob_token).await;
    let path = format!("/_matrix/client/v3/presence/{}/status", enc(&alice));
    let status_msg = json!({ "presence": "online", "status_msg": "at my desk" });
    let (status, body) = a.server.put(&path, Some(&alice_token), status_msg).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Longer than presence is gathered for: anything sent is queued before the message.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (status, body) = a.server.send_text(&alice_token, &room_id, "p1", "after presence").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let synced = eventually(
        "Alice's message at Bob's",
        || sync_since(&b.server, &bob_token, &since),
        |sync| {
            sync["rooms"]["join"][&room_id]["timeline"]["events"].as_array().is_some_and(|events| {
                events.iter().any(|e| e["content"]["body"] == "after presence")
            })
        },
    )
    .await;
    let events = synced["presence"]["events"].as_array().cloned().unwrap_or_default();
    let seen = events.iter().find(|e| e["sender"] == alice.as_str());
    if let Some(seen) = seen {
        assert_eq!(seen["content"]["presence"], "online", "{seen}");
        assert_eq!(seen["content"]["status_msg"], "at my desk", "{seen}");
    }
    seen.is_some()
}

#[tokio::test]
async fn presence_goes_to_other_servers_only_when_enabled() {
    let (_pki, a, b) = pair().await;
    assert!(presence_across(&a, &b).await, "presence never reached the other server");

    // Presence set before any other server shared a room reaches a server once its user joins.
    let (carol, carol_token, _) = a.server.register("carol", PASSWORD).await;
    let (_dave, dave_token, _) = b.server.register("dave", PASSWORD).await;
    let path = format!("/_matrix/client/v3/presence/{}/status", enc(&carol));
    let away = json!({ "presence": "unavailable", "status_msg": "in a meeting" });
    let (status, body) = a.server.put(&path, Some(&carol_token), away).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let since = sync_token(&b.server, &dave_token).await;
    let room_id = a.server.create_room(&carol_token, json!({ "preset": "public_chat" })).await;
    // Her own join's presence goes out to nobody: B has no user in the room yet.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let path = format!("/_matrix/client/v3/join/{}?via={}", enc(&room_id), a.name);
    let (status, body) = b.server.post(&path, Some(&dave_token), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Longer than presence is gathered for: the introduction is queued before the message.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (status, body) = a.server.send_text(&carol_token, &room_id, "c1", "hello dave").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let synced = eventually(
        "Carol's message at Dave's",
        || sync_since(&b.server, &dave_token, &since),
        |sync| {
            sync["rooms"]["join"][&room_id]["timeline"]["events"]
                .as_array()
                .is_some_and(|events| events.iter().any(|e| e["content"]["body"] == "hello dave"))
        },
    )
    .await;
    let events = synced["presence"]["events"].as_array().cloned().unwrap_or_default();
    let seen = events.iter().find(|e| e["sender"] == carol.as_str());
    let seen = seen.unwrap_or_else(|| panic!("Carol's presence never reached B: {synced}"));
    assert_eq!(seen["content"]["presence"], "unavailable", "{seen}");
    assert_eq!(seen["content"]["status_msg"], "in a meeting", "{seen}");

    let pki = Pki::new();
    let quiet = FedServer::start(&pki, 1, |c| c.federation.presence = false).await;
    let b = FedServer::start(&pki, 2, |_| {}).await;
    assert!(!presence_across(&quiet, &b).await, "presence went out while switched off");
    // Switched off on the receiving side, presence sent to it is not taken.
    let sender = FedServer::start(&pki, 3, |_| {}).await;
    let deaf = FedServer::start(&pki, 4, |c| c.federation.presence = false).await;
    assert!(!presence_across(&sender, &deaf).await, "presence taken while switched off");
}

/// Syncs `client` until the event `event_id` of `room_id` decrypts; returns its body.
async fn decrypted_body(
    client: &Client,
    room_id: &matrix_sdk::ruma::RoomId,
    event_id: &matrix_sdk::ruma::EventId,
) -> String {
    let settings = || SyncSettings::default().timeout(Duration::from_millis(200));
    let mut last = String::new();
    for _ in 0..100 {
        client.sync_once(settings()).await.unwrap();
        if let Some(room) = client.get_room(room_id)
            && let Ok(event) = room.event(event_id, None).await
        {
            if matches!(event.kind, TimelineEventKind::Decrypted(_)) {
                let content: Value = event.raw().get_field("content").unwrap().unwrap();
                return content["body"].as_str().unwrap().to_owned();
            }
            last = event.raw().json().get().to_owned();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{} never decrypted {event_id}: {last}", client.user_id().unwrap());
}

/// Alice creates an encrypted public room on her server (`alice_server`); Bob joins it through
/// that server; each sends an encrypted message the other decrypts.
pub(crate) async fn encrypted_messages_both_ways(
    alice: &Client,
    bob: &Client,
    alice_server: OwnedServerName,
) {
    let settings = || SyncSettings::default().timeout(Duration::from_millis(0));
    // Both devices publish their keys on their first sync.
    alice.sync_once(settings()).await.unwrap();
    bob.sync_once(settings()).await.unwrap();
    let mut request = create_room::v3::Request::new();
    request.preset = Some(create_room::v3::RoomPreset::PublicChat);
    let encryption = RoomEncryptionEventContent::with_recommended_defaults();
    request.initial_state = vec![InitialStateEvent::with_empty_state_key(encryption).to_raw_any()];
    let room = alice.create_room(request).await.unwrap();
    let room_or_alias = <&RoomOrAliasId>::from(room.room_id());
    let bob_room = bob.join_room_by_id_or_alias(room_or_alias, &[alice_server]).await.unwrap();

    // Alice learns of Bob's join (and device) before she sends.
    let bob_id = bob.user_id().unwrap().to_owned();
    for _ in 0..100 {
        alice.sync_once(settings()).await.unwrap();
        if room.get_member_no_sync(&bob_id).await.unwrap().is_some_and(|m| {
            *m.membership() == matrix_sdk::ruma::events::room::member::MembershipState::Join
        }) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sent = room.send(RoomMessageEventContent::text_plain("from alice, sealed")).await.unwrap();
    assert_eq!(
        decrypted_body(bob, room.room_id(), &sent.response.event_id).await,
        "from alice, sealed"
    );

    let sent =
        bob_room.send(RoomMessageEventContent::text_plain("from bob, sealed")).await.unwrap();
    assert_eq!(
        decrypted_body(alice, room.room_id(), &sent.response.event_id).await,
        "from bob, sealed"
    );
}

#[tokio::test]
async fn matrix_sdk_clients_of_two_servers_exchange_encrypted_messages() {
    let (_pki, a, b) = pair().await;
    let alice = sdk_client(&a.server.base, "alice").await;
    let bob = sdk_client(&b.server.base, "bob").await;
    encrypted_messages_both_ways(&alice, &bob, a.name.clone()).await;
}
