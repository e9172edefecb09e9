//! End-to-end encryption support over HTTP: keys, claims, to-device, cross-signing.

use base64::Engine;
use ed25519_dalek::{Signer, SigningKey};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::{TestServer, assert_error};

pub(crate) fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes)
}

/// Signs `object` (without `signatures`/`unsigned`) as `user`'s key `key_id`.
pub(crate) fn sign(object: &mut Value, key: &SigningKey, user: &str, key_id: &str) {
    let mut unsigned = object.clone();
    unsigned.as_object_mut().unwrap().remove("signatures");
    unsigned.as_object_mut().unwrap().remove("unsigned");
    let signature = key.sign(serde_json::to_string(&unsigned).unwrap().as_bytes());
    object["signatures"][user][key_id] = json!(b64(&signature.to_bytes()));
}

pub(crate) fn device_keys(user: &str, device: &str, key: &SigningKey) -> Value {
    let public = b64(key.verifying_key().as_bytes());
    let mut keys = json!({
        "user_id": user, "device_id": device,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": { format!("curve25519:{device}"): "curvekeycurvekey", format!("ed25519:{device}"): public },
    });
    sign(&mut keys, key, user, &format!("ed25519:{device}"));
    keys
}

#[tokio::test]
async fn keys_upload_query_and_claim_once_each() {
    let s = std::sync::Arc::new(TestServer::start().await);
    let (alice_id, alice, alice_device) = s.register("alice", "correct horse").await;
    let (_, bob, _) = s.register("bob", "correct horse").await;
    let device_key = SigningKey::from_bytes(&[7; 32]);
    let one_time: serde_json::Map<String, Value> = (0..10)
        .map(|i| (format!("signed_curve25519:K{i}"), json!({ "key": format!("otk{i}") })))
        .collect();
    let body = json!({
        "device_keys": device_keys(&alice_id, &alice_device, &device_key),
        "one_time_keys": one_time,
        "fallback_keys": { "signed_curve25519:FB": { "key": "fallback", "fallback": true } },
    });
    let (status, counts) = s.post("/_matrix/client/v3/keys/upload", Some(&alice), body).await;
    assert_eq!(status, StatusCode::OK, "{counts}");
    assert_eq!(counts["one_time_key_counts"]["signed_curve25519"], 10);

    let (_, query) = s
        .post(
            "/_matrix/client/v3/keys/query",
            Some(&bob),
            json!({ "device_keys": { alice_id.as_str(): [] } }),
        )
        .await;
    let keys = &query["device_keys"][&alice_id][&alice_device];
    assert_eq!(
        keys["keys"][format!("ed25519:{alice_device}")],
        json!(b64(device_key.verifying_key().as_bytes()))
    );

    // 20 concurrent claims for 10 keys: each key once, the rest get the fallback key.
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (s, bob, alice_id, alice_device) =
            (s.clone(), bob.clone(), alice_id.clone(), alice_device.clone());
        tasks.push(tokio::spawn(async move {
            let body = json!({ "one_time_keys": { alice_id.as_str(): { alice_device.as_str(): "signed_curve25519" } } });
            let (status, claimed) = s.post("/_matrix/client/v3/keys/claim", Some(&bob), body).await;
            assert_eq!(status, StatusCode::OK, "{claimed}");
            claimed["one_time_keys"][&alice_id][&alice_device].as_object().unwrap().keys().next().unwrap().clone()
        }));
    }
    let mut ids = Vec::new();
    for task in tasks {
        ids.push(task.await.unwrap());
    }
    let fallback = ids.iter().filter(|id| *id == "signed_curve25519:FB").count();
    let mut unique: Vec<&String> = ids.iter().filter(|id| *id != "signed_curve25519:FB").collect();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 10, "each one-time key handed out once: {ids:?}");
    assert_eq!(fallback, 10);

    let (_, synced) = s.get("/_matrix/client/v3/sync", Some(&alice)).await;
    assert!(
        synced["device_one_time_keys_count"].get("signed_curve25519").is_none_or(|c| c == 0),
        "{}",
        synced["device_one_time_keys_count"]
    );
    assert_eq!(synced["device_unused_fallback_key_types"], json!([]), "the fallback key was used");

    let wrong = json!({ "device_keys": device_keys("@bob:localhost", &alice_device, &device_key) });
    assert_error(
        &s.post("/_matrix/client/v3/keys/upload", Some(&alice), wrong).await,
        StatusCode::BAD_REQUEST,
        "M_INVALID_PARAM",
    );
}

#[tokio::test]
async fn to_device_messages_wait_for_acknowledgement_across_restart() {
    let s = TestServer::start().await;
    let (alice_id, alice, alice_device) = s.register("alice", "correct horse").await;
    let (_, bob, _) = s.register("bob", "correct horse").await;
    let (_, first) = s.get("/_matrix/client/v3/sync", Some(&alice)).await;
    let t0 = first["next_batch"].as_str().unwrap().to_owned();
    let message = json!({ "messages": { alice_id.as_str(): { alice_device.as_str(): { "secret": "room key" } } } });
    for _ in 0..2 {
        let (status, _) = s
            .put(
                "/_matrix/client/v3/sendToDevice/m.room_key_request/txn1",
                Some(&bob),
                message.clone(),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
    }
    let (_, got) = s.get(&format!("/_matrix/client/v3/sync?since={t0}"), Some(&alice)).await;
    let events = got["to_device"]["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "the repeated transaction sent nothing more");
    assert_eq!(events[0]["content"]["secret"], "room key");
    assert_eq!(events[0]["sender"], "@bob:localhost");
    let t1 = got["next_batch"].as_str().unwrap().to_owned();

    // Not acknowledged yet (the client never synced from t1): a restart keeps the message.
    let s = s.restart().await;
    let again = s.get(&format!("/_matrix/client/v3/sync?since={t0}"), Some(&alice)).await.1;
    assert_eq!(again["to_device"]["events"].as_array().unwrap().len(), 1);
    let acked = s.get(&format!("/_matrix/client/v3/sync?since={t1}"), Some(&alice)).await.1;
    let remaining = acked["to_device"]["events"].as_array().unwrap().len();
    assert_eq!(remaining, 0, "acknowledged messages are gone");
}

#[tokio::test]
async fn cross_signing_and_device_list_changes() {
    let s = TestServer::start().await;
    let (alice_id, alice, alice_device) = s.register("alice", "correct horse").await;
    let (bob_id, bob, _) = s.register("bob", "correct horse").await;
    let room = s.create_room(&alice, json!({ "invite": [bob_id] })).await;
    s.membership(&bob, &room, "join", json!({})).await;
    let (_, bob_first) = s.get("/_matrix/client/v3/sync", Some(&bob)).await;
    let token = bob_first["next_batch"].as_str().unwrap().to_owned();

    let device_key = SigningKey::from_bytes(&[1; 32]);
    let upload = json!({ "device_keys": device_keys(&alice_id, &alice_device, &device_key) });
    assert_eq!(
        s.post("/_matrix/client/v3/keys/upload", Some(&alice), upload).await.0,
        StatusCode::OK
    );
    let (_, bob_next) = s.get(&format!("/_matrix/client/v3/sync?since={token}"), Some(&bob)).await;
    assert!(
        bob_next["device_lists"]["changed"]
            .as_array()
            .unwrap()
            .iter()
            .any(|u| u == alice_id.as_str()),
        "{}",
        bob_next["device_lists"]
    );
    let (_, changes) = s
        .get(
            &format!(
                "/_matrix/client/v3/keys/changes?from={token}&to={}",
                bob_next["next_batch"].as_str().unwrap()
            ),
            Some(&bob),
        )
        .await;
    assert_eq!(changes["changed"], json!([alice_id]));

    // Cross-signing keys need the password.
    let master = SigningKey::from_bytes(&[2; 32]);
    let self_signing = SigningKey::from_bytes(&[3; 32]);
    let user_signing = SigningKey::from_bytes(&[4; 32]);
    let cross = |key: &SigningKey, usage: &str| {
        let public = b64(key.verifying_key().as_bytes());
        json!({ "user_id": alice_id, "usage": [usage], "keys": { format!("ed25519:{public}"): public } })
    };
    let master_public = b64(master.verifying_key().as_bytes());
    let mut self_key = cross(&self_signing, "self_signing");
    sign(&mut self_key, &master, &alice_id, &format!("ed25519:{master_public}"));
    let mut user_key = cross(&user_signing, "user_signing");
    sign(&mut user_key, &master, &alice_id, &format!("ed25519:{master_public}"));
    let body = json!({ "master_key": cross(&master, "master"), "self_signing_key": self_key, "user_signing_key": user_key });
    let (status, challenge) =
        s.post("/_matrix/client/v3/keys/device_signing/upload", Some(&alice), body.clone()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{challenge}");
    let mut authed = body;
    authed["auth"] = json!({ "type": "m.login.password", "password": "correct horse", "session": challenge["session"],
                             "identifier": { "type": "m.id.user", "user": alice_id } });
    let (status, body) =
        s.post("/_matrix/client/v3/keys/device_signing/upload", Some(&alice), authed).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Alice signs her device with her self-signing key; a forged signature is refused per key.
    let self_public = b64(self_signing.verifying_key().as_bytes());
    let mut signed = device_keys(&alice_id, &alice_device, &device_key);
    signed["signatures"] = json!({});
    sign(&mut signed, &self_signing, &alice_id, &format!("ed25519:{self_public}"));
    let upload = json!({ alice_id.as_str(): { alice_device.as_str(): signed } });
    let (status, result) =
        s.post("/_matrix/client/v3/keys/signatures/upload", Some(&alice), upload).await;
    assert_eq!(status, StatusCode::OK, "{result}");
    assert_eq!(result["failures"], json!({}));
    let mut forged = device_keys(&alice_id, &alice_device, &device_key);
    forged["signatures"] = json!({});
    sign(
        &mut forged,
        &SigningKey::from_bytes(&[9; 32]),
        &alice_id,
        &format!("ed25519:{self_public}"),
    );
    let (_, result) = s
        .post(
            "/_matrix/client/v3/keys/signatures/upload",
            Some(&alice),
            json!({ alice_id.as_str(): { alice_device.as_str(): forged } }),
        )
        .await;
    assert_eq!(result["failures"][&alice_id][&alice_device]["errcode"], "M_INVALID_SIGNATURE");
    // A valid signature over a different object is refused too: it must sign the stored key.
    let mut altered = device_keys(&alice_id, &alice_device, &device_key);
    altered["algorithms"] = json!(["m.fake"]);
    altered["signatures"] = json!({});
    sign(&mut altered, &self_signing, &alice_id, &format!("ed25519:{self_public}"));
    let (_, result) = s
        .post(
            "/_matrix/client/v3/keys/signatures/upload",
            Some(&alice),
            json!({ alice_id.as_str(): { alice_device.as_str(): altered } }),
        )
        .await;
    assert_eq!(result["failures"][&alice_id][&alice_device]["errcode"], "M_INVALID_SIGNATURE");

    let (_, query) = s
        .post(
            "/_matrix/client/v3/keys/query",
            Some(&bob),
            json!({ "device_keys": { alice_id.as_str(): [] } }),
        )
        .await;
    assert_eq!(query["master_keys"][&alice_id]["usage"], json!(["master"]));
    assert_eq!(query["self_signing_keys"][&alice_id]["usage"], json!(["self_signing"]));
    assert!(query["user_signing_keys"].get(&alice_id).is_none(), "user-signing keys stay private");
    let sigs = &query["device_keys"][&alice_id][&alice_device]["signatures"][&alice_id];
    assert!(sigs.get(format!("ed25519:{self_public}")).is_some(), "{sigs}");
}

#[tokio::test]
async fn key_backup_versions_and_keys() {
    let s = TestServer::start().await;
    let (_, alice, _) = s.register("alice", "correct horse").await;
    let algorithm = json!({ "algorithm": "m.megolm_backup.v1.curve25519-aes-sha2", "auth_data": { "public_key": "abc" } });
    assert_error(
        &s.get("/_matrix/client/v3/room_keys/version", Some(&alice)).await,
        StatusCode::NOT_FOUND,
        "M_NOT_FOUND",
    );
    let (status, created) =
        s.post("/_matrix/client/v3/room_keys/version", Some(&alice), algorithm.clone()).await;
    assert_eq!(status, StatusCode::OK, "{created}");
    let v1 = created["version"].as_str().unwrap().to_owned();

    let key = |index: u64, verified: bool| {
        json!({ "first_message_index": index, "forwarded_count": 0, "is_verified": verified,
                                                    "session_data": { "ciphertext": format!("c{index}"), "ephemeral": "e", "mac": "m" } })
    };
    let room = "!room:localhost";
    let path = format!("/_matrix/client/v3/room_keys/keys?version={v1}");
    let body =
        json!({ "rooms": { room: { "sessions": { "s1": key(5, false), "s2": key(0, true) } } } });
    let (status, put) = s.put(&path, Some(&alice), body).await;
    assert_eq!(status, StatusCode::OK, "{put}");
    assert_eq!(put["count"], 2);
    let etag = put["etag"].as_str().unwrap().to_owned();

    // A worse copy of s1 is ignored, a better one replaces it.
    let session = format!("/_matrix/client/v3/room_keys/keys/{room}/s1?version={v1}");
    let (_, same) = s.put(&session, Some(&alice), key(9, false)).await;
    assert_eq!(same["etag"], etag.as_str(), "nothing changed");
    let (_, better) = s.put(&session, Some(&alice), key(1, false)).await;
    assert_ne!(better["etag"], etag.as_str());
    let (_, stored) = s.get(&session, Some(&alice)).await;
    assert_eq!(stored["first_message_index"], 1);
    let (_, all) = s.get(&path, Some(&alice)).await;
    assert_eq!(all["rooms"][room]["sessions"].as_object().unwrap().len(), 2);
    let (_, info) = s.get("/_matrix/client/v3/room_keys/version", Some(&alice)).await;
    assert_eq!(info["version"], v1.as_str());
    assert_eq!(info["count"], 2);
    assert_eq!(info["auth_data"]["public_key"], "abc");

    // A new version makes the old one stale for writes.
    let (_, created) =
        s.post("/_matrix/client/v3/room_keys/version", Some(&alice), algorithm).await;
    let v2 = created["version"].as_str().unwrap().to_owned();
    let stale = s.put(&session, Some(&alice), key(0, true)).await;
    assert_error(&stale, StatusCode::FORBIDDEN, "M_WRONG_ROOM_KEYS_VERSION");
    assert_eq!(stale.1["current_version"], v2.as_str());

    let delete = format!("/_matrix/client/v3/room_keys/keys/{room}?version={v2}");
    assert_eq!(
        s.call(reqwest::Method::DELETE, &delete, Some(&alice), None).await.0,
        StatusCode::OK
    );
    let version_path = format!("/_matrix/client/v3/room_keys/version/{v2}");
    assert_eq!(
        s.call(reqwest::Method::DELETE, &version_path, Some(&alice), None).await.0,
        StatusCode::OK
    );
    assert_error(&s.get(&version_path, Some(&alice)).await, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    let (_, info) = s.get("/_matrix/client/v3/room_keys/version", Some(&alice)).await;
    assert_eq!(info["version"], v1.as_str(), "the latest live version again");
}

#[tokio::test]
async fn encryption_policy_and_no_downgrade() {
    let s = TestServer::start_with(|c| c.encryption.encrypt_private_rooms_by_default = true).await;
    let (_, alice, _) = s.register("alice", "correct horse").await;
    let private = s.create_room(&alice, json!({})).await;
    let path = format!("/_matrix/client/v3/rooms/{private}/state/m.room.encryption/");
    let (status, encryption) = s.get(&path, Some(&alice)).await;
    assert_eq!(status, StatusCode::OK, "private rooms are encrypted by default");
    assert_eq!(encryption["algorithm"], "m.megolm.v1.aes-sha2");
    let public = s.create_room(&alice, json!({ "preset": "public_chat" })).await;
    let public_path = format!("/_matrix/client/v3/rooms/{public}/state/m.room.encryption/");
    assert_error(&s.get(&public_path, Some(&alice)).await, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    // Never downgraded: the algorithm cannot change or go away.
    assert_error(
        &s.put(&path, Some(&alice), json!({ "algorithm": "m.none" })).await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );
    assert_error(
        &s.put(&path, Some(&alice), json!({})).await,
        StatusCode::BAD_REQUEST,
        "M_BAD_JSON",
    );
    let rotate = json!({ "algorithm": "m.megolm.v1.aes-sha2", "rotation_period_ms": 604800000 });
    assert_eq!(s.put(&path, Some(&alice), rotate).await.0, StatusCode::OK);

    let readable = TestServer::start_with(|c| c.encryption.allowed = false).await;
    let (_, bob, _) = readable.register("bob", "correct horse").await;
    let asked = json!({ "initial_state": [{ "type": "m.room.encryption", "state_key": "", "content": { "algorithm": "m.megolm.v1.aes-sha2" } }] });
    assert_error(
        &readable.post("/_matrix/client/v3/createRoom", Some(&bob), asked).await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );
    let room = readable.create_room(&bob, json!({})).await;
    let enable = readable
        .put(
            &format!("/_matrix/client/v3/rooms/{room}/state/m.room.encryption/"),
            Some(&bob),
            json!({ "algorithm": "m.megolm.v1.aes-sha2" }),
        )
        .await;
    assert_error(&enable, StatusCode::FORBIDDEN, "M_FORBIDDEN");
}

#[tokio::test]
async fn to_device_messages_page_without_loss_and_backup_versions_with_any_number() {
    let s = TestServer::start_with(|c| {
        c.limits.rate_per_second = 100_000;
        c.limits.rate_burst = 100_000;
    })
    .await;
    let (alice_id, alice, alice_device) = s.register("alice", "correct horse").await;
    let (_, bob, _) = s.register("bob", "correct horse").await;
    let (_, first) = s.get("/_matrix/client/v3/sync", Some(&alice)).await;
    let mut token = first["next_batch"].as_str().unwrap().to_owned();
    for i in 0..150 {
        let body =
            json!({ "messages": { alice_id.as_str(): { alice_device.as_str(): { "n": i } } } });
        assert_eq!(
            s.put(&format!("/_matrix/client/v3/sendToDevice/m.test/t{i}"), Some(&bob), body)
                .await
                .0,
            StatusCode::OK
        );
    }
    let mut received = Vec::new();
    for _ in 0..3 {
        let (_, page) =
            s.get(&format!("/_matrix/client/v3/sync?since={token}&timeout=0"), Some(&alice)).await;
        received.extend(
            page["to_device"]["events"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["content"]["n"].as_u64().unwrap()),
        );
        token = page["next_batch"].as_str().unwrap().to_owned();
    }
    assert_eq!(
        received,
        (0..150).collect::<Vec<_>>(),
        "every message once, in order, across pages"
    );
    // Messages for devices that do not exist are not stored.
    let ghost = json!({ "messages": { alice_id.as_str(): { "NOSUCHDEVICE": { "n": 1 } } } });
    assert_eq!(
        s.put("/_matrix/client/v3/sendToDevice/m.test/ghost", Some(&bob), ghost).await.0,
        StatusCode::OK
    );

    // Backup version numbers are stored as raw bytes: 255 contains 0xFF and must still work.
    let algorithm =
        json!({ "algorithm": "m.megolm_backup.v1.curve25519-aes-sha2", "auth_data": {} });
    let mut version = String::new();
    while version != "255" {
        let (status, created) =
            s.post("/_matrix/client/v3/room_keys/version", Some(&alice), algorithm.clone()).await;
        assert_eq!(status, StatusCode::OK, "{created}");
        version = created["version"].as_str().unwrap().to_owned();
    }
    let (status, latest) = s.get("/_matrix/client/v3/room_keys/version", Some(&alice)).await;
    assert_eq!(status, StatusCode::OK, "{latest}");
    assert_eq!(latest["version"], "255");
    let key = json!({ "first_message_index": 0, "forwarded_count": 0, "is_verified": true, "session_data": { "c": 1 } });
    let path = "/_matrix/client/v3/room_keys/keys/!r:localhost/sess?version=255";
    assert_eq!(s.put(path, Some(&alice), key).await.0, StatusCode::OK);
    let (_, all) = s.get("/_matrix/client/v3/room_keys/keys?version=255", Some(&alice)).await;
    assert_eq!(all["rooms"]["!r:localhost"]["sessions"]["sess"]["is_verified"], true, "{all}");
}

#[tokio::test]
async fn dehydrated_device_collects_messages_while_offline() {
    let s = TestServer::start().await;
    let (alice_id, alice, _) = s.register("alice", "correct horse").await;
    let (_, bob, _) = s.register("bob", "correct horse").await;
    let base = "/_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device";
    assert_error(&s.get(base, Some(&alice)).await, StatusCode::NOT_FOUND, "M_NOT_FOUND");

    let key = SigningKey::from_bytes(&[5; 32]);
    let body = json!({
        "device_id": "DEHYDRATED",
        "initial_device_display_name": "Dehydrated device",
        "device_data": { "algorithm": "org.matrix.msc3814.v1.olm", "device_pickle": "pickle", "nonce": "n" },
        "device_keys": device_keys(&alice_id, "DEHYDRATED", &key),
        "one_time_keys": { "signed_curve25519:D1": { "key": "otk" } },
        "fallback_keys": {},
    });
    let (status, put) = s.put(base, Some(&alice), body).await;
    assert_eq!(status, StatusCode::OK, "{put}");
    assert_eq!(put["device_id"], "DEHYDRATED");
    let (_, got) = s.get(base, Some(&alice)).await;
    assert_eq!(got["device_data"]["device_pickle"], "pickle");
    let (_, query) = s
        .post(
            "/_matrix/client/v3/keys/query",
            Some(&bob),
            json!({ "device_keys": { alice_id.as_str(): [] } }),
        )
        .await;
    assert!(query["device_keys"][&alice_id].get("DEHYDRATED").is_some(), "{query}");

    // Bob sends to the offline device; a rehydrating client pages the messages out.
    let message =
        json!({ "messages": { alice_id.as_str(): { "DEHYDRATED": { "room_key": "k" } } } });
    assert_eq!(
        s.put("/_matrix/client/v3/sendToDevice/m.room.encrypted/d1", Some(&bob), message).await.0,
        StatusCode::OK
    );
    let events = format!("{base}/DEHYDRATED/events");
    let (status, page) = s.post(&events, Some(&alice), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["events"][0]["content"]["room_key"], "k");
    let (_, next) =
        s.post(&events, Some(&alice), json!({ "next_batch": page["next_batch"] })).await;
    assert_eq!(next["events"], json!([]));
    assert_error(
        &s.post(&format!("{base}/OTHER/events"), Some(&alice), json!({})).await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );

    let (status, deleted) = s.call(reqwest::Method::DELETE, base, Some(&alice), None).await;
    assert_eq!(status, StatusCode::OK, "{deleted}");
    assert_error(&s.get(base, Some(&alice)).await, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    let (_, query) = s
        .post(
            "/_matrix/client/v3/keys/query",
            Some(&bob),
            json!({ "device_keys": { alice_id.as_str(): [] } }),
        )
        .await;
    assert!(query["device_keys"][&alice_id].get("DEHYDRATED").is_none());
}

#[tokio::test]
async fn device_lists_track_who_shares_a_room() {
    let s = TestServer::start().await;
    let (_, alice, _) = s.register("alice", "correct horse").await;
    let (carol_id, carol, _) = s.register("carol", "correct horse").await;
    let room = s.create_room(&alice, json!({ "preset": "public_chat" })).await;
    let (_, first) = s.get("/_matrix/client/v3/sync", Some(&alice)).await;
    let token = first["next_batch"].as_str().unwrap().to_owned();
    s.membership(&carol, &room, "join", json!({})).await;
    let (_, joined) = s.get(&format!("/_matrix/client/v3/sync?since={token}"), Some(&alice)).await;
    assert_eq!(
        joined["device_lists"]["changed"],
        json!([carol_id]),
        "a new room-mate's devices are news"
    );
    let token = joined["next_batch"].as_str().unwrap().to_owned();
    s.membership(&carol, &room, "leave", json!({})).await;
    let (_, left) = s.get(&format!("/_matrix/client/v3/sync?since={token}"), Some(&alice)).await;
    assert_eq!(left["device_lists"]["left"], json!([carol_id]), "no shared room any more");
}
