//! Interoperability with a real Synapse (the pinned release from PyPI) over TLS on loopback:
//! each side fetches the other's keys, directly and through a notary, signed requests pass
//! both ways and each client API answers for the other's users; users of each share rooms
//! created on either side (messages, edits and threads both ways, invites both ways, aliases,
//! leaving and rejoining on either side), fetch each other's media and exchange end-to-end
//! encrypted messages. Synapse takes seconds to start, so there are few tests and each covers
//! much.

pub mod harness;

use reqwest::{Method, StatusCode};
use ruma::{
    ServerName, UserId,
    api::federation::{discovery::get_server_version, query::get_profile_information},
};
use serde_json::{Value, json};

use self::harness::Synapse;
use crate::{
    common::enc,
    federation::{
        e2ee::encrypted_messages_both_ways,
        harness::{FedServer, Pki},
    },
};

/// The keys a key server document lists for `server`: key id to unpadded base64.
fn verify_keys(document: &Value) -> Vec<(String, String)> {
    document["verify_keys"]
        .as_object()
        .map(|keys| {
            keys.iter().map(|(id, key)| (id.clone(), key["key"].as_str().unwrap().to_owned()))
        })
        .into_iter()
        .flatten()
        .collect()
}

/// Checks that `document` carries a valid signature of `server` made with one of `keys`.
fn assert_signed(document: &Value, server: &ServerName, keys: &[(String, String)]) {
    let object: ruma::CanonicalJsonObject = serde_json::from_value(document.clone()).unwrap();
    let keys = keys
        .iter()
        .map(|(id, key)| (id.clone(), ruma::serde::Base64::parse(key).unwrap()))
        .collect();
    plaza::service::federation::keys::verify_signed_by(&object, server, &keys)
        .unwrap_or_else(|e| panic!("{e}: {document}"));
}

#[tokio::test]
async fn synapse_and_plaza_exchange_keys_and_signed_requests() {
    let pki = Pki::new();
    let (plaza, synapse) = tokio::join!(FedServer::start(&pki, 1, |_| {}), Synapse::start(&pki, 3));
    let alice = synapse.register("alice").await;
    let (status, body) = synapse
        .call(
            Method::PUT,
            &format!("/_matrix/client/v3/profile/{}/displayname", enc(&alice.user_id)),
            Some(&alice.token),
            Some(json!({ "displayname": "Alice on Synapse" })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Synapse's own key document, read over TLS, is signed with the key it lists.
    let (status, synapse_keys) = synapse.federation_get("/_matrix/key/v2/server").await;
    assert_eq!(status, StatusCode::OK, "{synapse_keys}");
    assert_eq!(synapse_keys["server_name"], synapse.name.as_str());
    let synapse_verify_keys = verify_keys(&synapse_keys);
    assert_eq!(synapse_verify_keys.len(), 1, "{synapse_keys}");
    assert_signed(&synapse_keys, &synapse.name, &synapse_verify_keys);

    // Plaza to Synapse: an unsigned request, then a signed one, which Synapse checks with
    // Plaza's keys, fetched from Plaza.
    let federation = &plaza.services().federation;
    let version = federation.send(&synapse.name, get_server_version::v1::Request::new()).await;
    let version = version.unwrap_or_else(|e| panic!("{e}\n{}", synapse.log()));
    assert_eq!(version.server.unwrap().name.as_deref(), Some("Synapse"));
    let user_id = UserId::parse(&alice.user_id).unwrap();
    let profile = federation
        .send(&synapse.name, get_profile_information::v1::Request::new(user_id))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", synapse.log()));
    assert_eq!(profile.get("displayname"), Some(&json!("Alice on Synapse")));

    // Synapse as a notary for Plaza: it fetched Plaza's keys and serves them with both
    // signatures.
    let path = format!("/_matrix/key/v2/query/{}", plaza.name);
    let (status, answer) = synapse.federation_get(&path).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let documents = answer["server_keys"].as_array().unwrap();
    assert_eq!(documents.len(), 1, "{answer}");
    let plaza_key = (plaza.key_id(), {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(plaza.key().public_key())
    });
    assert_eq!(verify_keys(&documents[0]), vec![plaza_key.clone()], "{answer}");
    assert_signed(&documents[0], &plaza.name, std::slice::from_ref(&plaza_key));
    assert_signed(&documents[0], &synapse.name, &synapse_verify_keys);

    // Plaza as a notary for Synapse: fetched from Synapse, signed by both.
    let (status, answer) = plaza.get(&format!("/_matrix/key/v2/query/{}", synapse.name)).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let documents = answer["server_keys"].as_array().unwrap();
    assert_eq!(documents.len(), 1, "{answer}");
    assert_eq!(verify_keys(&documents[0]), synapse_verify_keys, "{answer}");
    assert_signed(&documents[0], &synapse.name, &synapse_verify_keys);
    assert_signed(&documents[0], &plaza.name, std::slice::from_ref(&plaza_key));

    // Synapse to Plaza: a Synapse user browses Plaza's room directory; Plaza checks
    // Synapse's signature with Synapse's keys.
    let (bob_id, token, _) = plaza.server.register("bob", "password-bob").await;
    let room_id = plaza
        .server
        .create_room(&token, json!({ "visibility": "public", "name": "Plaza lobby" }))
        .await;
    let path = format!("/_matrix/client/v3/publicRooms?server={}", enc(plaza.name.as_str()));
    let (status, rooms) = synapse.call(Method::GET, &path, Some(&alice.token), None).await;
    assert_eq!(status, StatusCode::OK, "{rooms}\n{}", synapse.log());
    let chunk = rooms["chunk"].as_array().unwrap();
    assert_eq!(chunk.len(), 1, "{rooms}");
    assert_eq!(chunk[0]["room_id"], room_id.as_str());
    assert_eq!(chunk[0]["name"], "Plaza lobby");
    // Profiles across: each server's client API answers for the other's user by asking it.
    let path = format!("/_matrix/client/v3/profile/{}", enc(&bob_id));
    let (status, body) = plaza
        .server
        .put(&format!("{path}/displayname"), Some(&token), json!({ "displayname": "Bob on Plaza" }))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, profile) = synapse.call(Method::GET, &path, Some(&alice.token), None).await;
    assert_eq!(status, StatusCode::OK, "{profile}\n{}", synapse.log());
    assert_eq!(profile["displayname"], "Bob on Plaza");
    let path = format!("/_matrix/client/v3/profile/{}", enc(&alice.user_id));
    let (status, profile) = plaza.server.get(&path, Some(&token)).await;
    assert_eq!(status, StatusCode::OK, "{profile}");
    assert_eq!(profile["displayname"], "Alice on Synapse");

    let cached = federation.cached_keys(&synapse.name).unwrap().expect("Plaza cached the keys");
    let cached: Vec<_> =
        cached.verify_keys.iter().map(|(id, key)| (id.to_string(), key.0.clone())).collect();
    assert_eq!(cached, synapse_verify_keys);
}

/// A side of the room tests: sends client-API requests to one server as one user.
#[derive(Clone, Copy)]
enum Side<'a> {
    Plaza(&'a FedServer, &'a str),
    Synapse(&'a Synapse, &'a str),
}

impl Side<'_> {
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        match *self {
            Side::Plaza(server, token) => server.server.call(method, path, Some(token), body).await,
            Side::Synapse(server, token) => server.call(method, path, Some(token), body).await,
        }
    }

    /// Sends `content` as `event_type` in `room_id`; returns the event ID.
    async fn send(&self, room_id: &str, event_type: &str, content: Value) -> String {
        let txn = format!("t{}", rand::random::<u64>());
        let path = format!("/_matrix/client/v3/rooms/{}/send/{event_type}/{txn}", enc(room_id));
        let (status, body) = self.call(Method::PUT, &path, Some(content)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["event_id"].as_str().unwrap().to_owned()
    }

    /// Joins `room` (an ID or alias), through `via` when given; returns the room ID.
    async fn join(&self, room: &str, via: Option<&ServerName>) -> String {
        let query = via.map(|via| format!("?server_name={}", enc(via.as_str())));
        let path = format!("/_matrix/client/v3/join/{}{}", enc(room), query.unwrap_or_default());
        let (status, body) = self.call(Method::POST, &path, Some(json!({}))).await;
        assert_eq!(status, StatusCode::OK, "joining {room}: {body}");
        body["room_id"].as_str().unwrap().to_owned()
    }

    /// Waits up to 30 s for an event of `room_id`'s recent timeline to satisfy `wanted`.
    async fn sees(&self, room_id: &str, what: &str, wanted: impl Fn(&Value) -> bool) -> Value {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let path = format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=50", enc(room_id));
        loop {
            let (status, body) = self.call(Method::GET, &path, None).await;
            if status == StatusCode::OK
                && let Some(found) =
                    body["chunk"].as_array().and_then(|c| c.iter().find(|e| wanted(e)))
            {
                return found.clone();
            }
            assert!(std::time::Instant::now() < deadline, "never saw {what}: {status} {body}");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// Waits until `user_id`'s membership in `room_id`, as this side sees it, is `membership`.
    async fn sees_membership(&self, room_id: &str, user_id: &str, membership: &str) {
        let what = format!("{user_id} {membership}");
        self.sees(room_id, &what, |event| {
            event["type"] == "m.room.member"
                && event["state_key"] == user_id
                && event["content"]["membership"] == membership
        })
        .await;
    }
}

/// Waits up to 30 s for the relations at `path` to list `event_id`; returns them.
async fn eventually_relations(side: Side<'_>, path: &str, event_id: &str, what: &str) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (status, relations) = side.call(Method::GET, path, None).await;
        assert_eq!(status, StatusCode::OK, "{relations}");
        if relations["chunk"]
            .as_array()
            .is_some_and(|c| c.iter().any(|e| e["event_id"] == event_id))
        {
            return relations;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: {relations}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

fn text(body: &str) -> Value {
    json!({ "msgtype": "m.text", "body": body })
}

fn has_body(event: &Value, body: &str) -> bool {
    event["type"] == "m.room.message" && event["content"]["body"] == body
}

#[tokio::test]
async fn synapse_and_plaza_users_share_rooms() {
    let pki = Pki::new();
    let (plaza, synapse) = tokio::join!(FedServer::start(&pki, 1, |_| {}), Synapse::start(&pki, 3));
    let alice_account = synapse.register("alice").await;
    let (bob_id, bob_token, _) = plaza.server.register("bob", "password-bob").await;
    let alice = Side::Synapse(&synapse, &alice_account.token);
    let bob = Side::Plaza(&plaza, &bob_token);
    let alice_id = alice_account.user_id.as_str();

    // A room created on Synapse; Bob joins it through Synapse.
    let (status, created) = alice
        .call(
            Method::POST,
            "/_matrix/client/v3/createRoom",
            Some(json!({ "preset": "public_chat", "name": "Synapse room" })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{created}");
    let synapse_room = created["room_id"].as_str().unwrap().to_owned();
    assert_eq!(bob.join(&synapse_room, Some(&synapse.name)).await, synapse_room);
    alice.sees_membership(&synapse_room, &bob_id, "join").await;

    // Messages both ways.
    let hello = alice.send(&synapse_room, "m.room.message", text("hello from Synapse")).await;
    let seen =
        bob.sees(&synapse_room, "Alice's message", |e| has_body(e, "hello from Synapse")).await;
    assert_eq!(seen["event_id"], hello.as_str());
    assert_eq!(seen["sender"], alice_id);
    bob.send(&synapse_room, "m.room.message", text("hello from Plaza")).await;
    alice.sees(&synapse_room, "Bob's message", |e| has_body(e, "hello from Plaza")).await;

    // An edit from Synapse and a thread reply from Plaza.
    let edit = json!({
        "msgtype": "m.text", "body": "* hello again",
        "m.new_content": { "msgtype": "m.text", "body": "hello again" },
        "m.relates_to": { "rel_type": "m.replace", "event_id": hello },
    });
    let edit_id = alice.send(&synapse_room, "m.room.message", edit).await;
    let seen = bob.sees(&synapse_room, "the edit", |e| e["event_id"] == edit_id.as_str()).await;
    assert_eq!(seen["content"]["m.new_content"]["body"], "hello again");
    let reply = json!({
        "msgtype": "m.text", "body": "in a thread",
        "m.relates_to": { "rel_type": "m.thread", "event_id": hello },
    });
    let reply_id = bob.send(&synapse_room, "m.room.message", reply).await;
    let path = format!(
        "/_matrix/client/v1/rooms/{}/relations/{}/m.thread",
        enc(&synapse_room),
        enc(&hello)
    );
    eventually_relations(alice, &path, &reply_id, "Synapse never threaded the reply").await;

    // Leave and rejoin.
    let path = format!("/_matrix/client/v3/rooms/{}/leave", enc(&synapse_room));
    let (status, body) = bob.call(Method::POST, &path, Some(json!({}))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    alice.sees_membership(&synapse_room, &bob_id, "leave").await;
    assert_eq!(bob.join(&synapse_room, Some(&synapse.name)).await, synapse_room);
    alice
        .sees(&synapse_room, "Bob back", |e| {
            e["type"] == "m.room.member"
                && e["state_key"] == bob_id.as_str()
                && e["content"]["membership"] == "join"
                && e["unsigned"]["prev_content"]["membership"] == "leave"
        })
        .await;

    // A public room on Plaza: Alice joins by its alias, resolved over federation.
    let public_room = plaza
        .server
        .create_room(&bob_token, json!({ "preset": "public_chat", "room_alias_name": "lobby" }))
        .await;
    let alias = format!("#lobby:{}", plaza.name);
    assert_eq!(alice.join(&alias, None).await, public_room);
    bob.sees_membership(&public_room, alice_id, "join").await;
    bob.send(&public_room, "m.room.message", text("welcome")).await;
    alice.sees(&public_room, "Bob's welcome", |e| has_body(e, "welcome")).await;
    let welcome = bob.send(&public_room, "m.room.message", text("welcome, Synapse")).await;
    alice.sees(&public_room, "Bob's second welcome", |e| has_body(e, "welcome, Synapse")).await;

    // An edit from Plaza: Synapse relates it to the original.
    let edit = json!({
        "msgtype": "m.text", "body": "* welcome, everyone",
        "m.new_content": { "msgtype": "m.text", "body": "welcome, everyone" },
        "m.relates_to": { "rel_type": "m.replace", "event_id": welcome },
    });
    let edit_id = bob.send(&public_room, "m.room.message", edit).await;
    let path = format!(
        "/_matrix/client/v1/rooms/{}/relations/{}/m.replace",
        enc(&public_room),
        enc(&welcome)
    );
    let edits =
        eventually_relations(alice, &path, &edit_id, "Synapse never related the edit").await;
    assert_eq!(edits["chunk"][0]["content"]["m.new_content"]["body"], "welcome, everyone");
    let path = format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&public_room), enc(&welcome));
    let (status, original) = alice.call(Method::GET, &path, None).await;
    assert_eq!(status, StatusCode::OK, "{original}");
    assert_eq!(
        original["unsigned"]["m.relations"]["m.replace"]["event_id"],
        edit_id.as_str(),
        "{original}"
    );

    // A thread reply from Synapse on Plaza's message: Plaza lists and summarises the thread.
    let reply = json!({
        "msgtype": "m.text", "body": "threaded from Synapse",
        "m.relates_to": { "rel_type": "m.thread", "event_id": welcome },
    });
    let reply_id = alice.send(&public_room, "m.room.message", reply).await;
    bob.sees(&public_room, "Alice's thread reply", |e| e["event_id"] == reply_id.as_str()).await;
    let path = format!("/_matrix/client/v1/rooms/{}/threads", enc(&public_room));
    let (status, threads) = bob.call(Method::GET, &path, None).await;
    assert_eq!(status, StatusCode::OK, "{threads}");
    let chunk = threads["chunk"].as_array().unwrap();
    assert_eq!(chunk.len(), 1, "{threads}");
    assert_eq!(chunk[0]["event_id"], welcome.as_str(), "{threads}");
    let summary = &chunk[0]["unsigned"]["m.relations"]["m.thread"];
    assert_eq!(summary["count"], 1, "{threads}");
    assert_eq!(summary["latest_event"]["event_id"], reply_id.as_str(), "{threads}");
    assert_eq!(summary["latest_event"]["sender"], alice_id, "{threads}");
    let path = format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&public_room), enc(&welcome));
    let (status, root) = bob.call(Method::GET, &path, None).await;
    assert_eq!(status, StatusCode::OK, "{root}");
    assert_eq!(root["unsigned"]["m.relations"]["m.thread"]["count"], 1, "{root}");

    // The Synapse user leaves the Plaza room (make_leave/send_leave served by Plaza) and
    // rejoins (a second make_join/send_join); messages flow after.
    let first_join = bob
        .sees(&public_room, "Alice's join", |e| {
            e["type"] == "m.room.member" && e["state_key"] == alice_id
        })
        .await;
    let path = format!("/_matrix/client/v3/rooms/{}/leave", enc(&public_room));
    let (status, body) = alice.call(Method::POST, &path, Some(json!({}))).await;
    assert_eq!(status, StatusCode::OK, "{body}\n{}", synapse.log());
    bob.sees_membership(&public_room, alice_id, "leave").await;
    bob.send(&public_room, "m.room.message", text("while away")).await;
    assert_eq!(alice.join(&public_room, Some(&plaza.name)).await, public_room);
    let rejoined = bob
        .sees(&public_room, "Alice back", |e| {
            e["type"] == "m.room.member"
                && e["state_key"] == alice_id
                && e["content"]["membership"] == "join"
        })
        .await;
    assert_ne!(rejoined["event_id"], first_join["event_id"], "{rejoined}");
    let path = format!("/_matrix/client/v3/rooms/{}/joined_members", enc(&public_room));
    let (status, members) = bob.call(Method::GET, &path, None).await;
    assert_eq!(status, StatusCode::OK, "{members}");
    assert!(members["joined"][alice_id].is_object(), "{members}");
    bob.send(&public_room, "m.room.message", text("welcome back")).await;
    alice.sees(&public_room, "Bob after the rejoin", |e| has_body(e, "welcome back")).await;
    alice.send(&public_room, "m.room.message", text("glad to be back")).await;
    bob.sees(&public_room, "Alice after the rejoin", |e| has_body(e, "glad to be back")).await;

    // Media both ways: a file uploaded on one side is downloaded through the other.
    let from_plaza =
        upload(&plaza.server.http, &plaza.server.base, &bob_token, b"plaza bytes").await;
    let from_synapse =
        upload(&synapse.http, &synapse.client_base, &alice_account.token, b"synapse bytes").await;
    assert_eq!(
        download(&synapse.http, &synapse.client_base, &alice_account.token, &from_plaza).await,
        b"plaza bytes"
    );
    assert_eq!(
        download(&plaza.server.http, &plaza.server.base, &bob_token, &from_synapse).await,
        b"synapse bytes"
    );

    // A thumbnail of a Synapse image, asked of Synapse's federation thumbnail endpoint.
    let image = crate::federation::media::noisy_png(200, 100);
    let response = synapse
        .http
        .post(format!("{}/_matrix/media/v3/upload?filename=noise.png", synapse.client_base))
        .bearer_auth(&alice_account.token)
        .header("content-type", "image/png")
        .body(image)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let uploaded: Value = response.json().await.unwrap();
    let path = uploaded["content_uri"].as_str().unwrap().trim_start_matches("mxc://").to_owned();
    let response = plaza
        .server
        .http
        .get(format!(
            "{}/_matrix/client/v1/media/thumbnail/{path}?width=32&height=32&method=crop",
            plaza.server.base
        ))
        .bearer_auth(&bob_token)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let bytes = response.bytes().await.unwrap();
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&bytes));
    let thumbnail = image::load_from_memory(&bytes).unwrap();
    assert_eq!((thumbnail.width(), thumbnail.height()), (32, 32));
    let origin = ServerName::parse(path.split('/').next().unwrap()).unwrap();
    let media_id = path.split('/').nth(1).unwrap();
    let fetched = plaza.services().media.cached_remote(&origin, media_id).unwrap();
    assert!(fetched.is_none(), "the original was fetched for a thumbnail");

    // End-to-end encryption with matrix-sdk clients: a Plaza user's encrypted room joined by a
    // Synapse user; keys are queried and claimed, and room keys sent, across the servers.
    let plaza_client = crate::sdk::sdk_client(&plaza.server.base, "erin").await;
    synapse.register("frank").await;
    let synapse_client =
        matrix_sdk::Client::builder().homeserver_url(&synapse.client_base).build().await.unwrap();
    synapse_client.matrix_auth().login_username("frank", "interop-password").send().await.unwrap();
    encrypted_messages_both_ways(&plaza_client, &synapse_client, plaza.name.clone()).await;
    // And in a Synapse user's room joined from Plaza.
    encrypted_messages_both_ways(&synapse_client, &plaza_client, synapse.name.clone()).await;

    // A new Plaza device reaches Synapse's cache of Erin's devices (Synapse answers from it
    // while they share rooms) through a device list update.
    let erin = plaza_client.user_id().unwrap().to_string();
    let (status, login) = plaza.server.login("erin", "sdk password 1").await;
    assert_eq!(status, StatusCode::OK, "{login}");
    let (device, token) = (login["device_id"].as_str().unwrap(), login["access_token"].as_str());
    let key = ed25519_dalek::SigningKey::from_bytes(&[21; 32]);
    let upload = json!({ "device_keys": crate::e2ee::device_keys(&erin, device, &key) });
    let (status, body) = plaza.server.post("/_matrix/client/v3/keys/upload", token, upload).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let frank_token = synapse_client.access_token().unwrap();
    let query = json!({ "device_keys": { erin.as_str(): [] } });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let path = "/_matrix/client/v3/keys/query";
        let (status, keys) =
            synapse.call(Method::POST, path, Some(&frank_token), Some(query.clone())).await;
        assert_eq!(status, StatusCode::OK, "{keys}");
        if keys["device_keys"][&erin][device]["keys"].is_object() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "Synapse never saw the device: {keys}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    // And the other way: Frank's new Synapse device shows in Erin's sync and key query.
    let frank = synapse_client.user_id().unwrap().to_string();
    let erin_token = plaza_client.access_token().unwrap();
    let (status, synced) =
        plaza.server.get("/_matrix/client/v3/sync?timeout=0", Some(&erin_token)).await;
    assert_eq!(status, StatusCode::OK, "{synced}");
    let since = synced["next_batch"].as_str().unwrap().to_owned();
    let login = json!({ "type": "m.login.password", "password": "interop-password",
        "identifier": { "type": "m.id.user", "user": "frank" } });
    let (status, login) =
        synapse.call(Method::POST, "/_matrix/client/v3/login", None, Some(login)).await;
    assert_eq!(status, StatusCode::OK, "{login}");
    let (device, token) = (login["device_id"].as_str().unwrap(), login["access_token"].as_str());
    let key = ed25519_dalek::SigningKey::from_bytes(&[22; 32]);
    let upload = json!({ "device_keys": crate::e2ee::device_keys(&frank, device, &key) });
    let path = "/_matrix/client/v3/keys/upload";
    let (status, body) = synapse.call(Method::POST, path, token, Some(upload)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let query = json!({ "device_keys": { frank.as_str(): [] } });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let path = format!("/_matrix/client/v3/sync?timeout=0&since={}", enc(&since));
        let (_, synced) = plaza.server.get(&path, Some(&erin_token)).await;
        let changed = synced["device_lists"]["changed"].as_array().cloned().unwrap_or_default();
        let (status, keys) = plaza
            .server
            .post("/_matrix/client/v3/keys/query", Some(&erin_token), query.clone())
            .await;
        assert_eq!(status, StatusCode::OK, "{keys}");
        if changed.iter().any(|u| u == frank.as_str())
            && keys["device_keys"][&frank][device]["keys"].is_object()
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "Plaza never saw the device: {keys}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// A Synapse user invited into a private Plaza room joins and talks.
#[tokio::test]
async fn a_synapse_user_joins_a_plaza_room_by_invite() {
    let pki = Pki::new();
    let (plaza, synapse) = tokio::join!(FedServer::start(&pki, 1, |_| {}), Synapse::start(&pki, 3));
    let alice_account = synapse.register("alice").await;
    let (_, bob_token, _) = plaza.server.register("bob", "password-bob").await;
    let alice = Side::Synapse(&synapse, &alice_account.token);
    let bob = Side::Plaza(&plaza, &bob_token);
    let alice_id = alice_account.user_id.as_str();

    // A private room on Plaza: Alice joins by invite.
    let invited_room =
        plaza.server.create_room(&bob_token, json!({ "preset": "private_chat" })).await;
    let path = format!("/_matrix/client/v3/rooms/{}/invite", enc(&invited_room));
    let (status, body) = bob.call(Method::POST, &path, Some(json!({ "user_id": alice_id }))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(alice.join(&invited_room, None).await, invited_room);
    bob.sees_membership(&invited_room, alice_id, "join").await;
    alice.send(&invited_room, "m.room.message", text("thanks for the invite")).await;
    bob.sees(&invited_room, "Alice in the private room", |e| has_body(e, "thanks for the invite"))
        .await;

    // A private room on Synapse: Bob is invited, sees the invite with the room's name, accepts.
    let (status, body) = alice
        .call(
            Method::POST,
            "/_matrix/client/v3/createRoom",
            Some(json!({ "preset": "private_chat", "name": "Synapse side" })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}\n{}", synapse.log());
    let synapse_room = body["room_id"].as_str().unwrap().to_owned();
    let bob_id = format!("@bob:{}", plaza.name);
    let path = format!("/_matrix/client/v3/rooms/{}/invite", enc(&synapse_room));
    let (status, body) = alice.call(Method::POST, &path, Some(json!({ "user_id": bob_id }))).await;
    assert_eq!(status, StatusCode::OK, "{body}\n{}", synapse.log());
    let (status, sync) =
        plaza.server.get("/_matrix/client/v3/sync?timeout=0", Some(&bob_token)).await;
    assert_eq!(status, StatusCode::OK, "{sync}");
    let invite_state = sync["rooms"]["invite"][&synapse_room]["invite_state"]["events"]
        .as_array()
        .unwrap_or_else(|| panic!("no invite: {sync}"))
        .clone();
    let name = invite_state.iter().find(|e| e["type"] == "m.room.name");
    assert_eq!(name.map(|e| &e["content"]["name"]), Some(&json!("Synapse side")), "{sync}");
    assert_eq!(bob.join(&synapse_room, None).await, synapse_room);
    alice.sees_membership(&synapse_room, &bob_id, "join").await;
    alice.send(&synapse_room, "m.room.message", text("welcome over")).await;
    bob.sees(&synapse_room, "Alice's welcome", |e| has_body(e, "welcome over")).await;
    bob.send(&synapse_room, "m.room.message", text("glad to be here")).await;
    alice.sees(&synapse_room, "Bob's answer", |e| has_body(e, "glad to be here")).await;

    // Invites turned down, each way: Synapse leaves through Plaza's make_leave and
    // send_leave, Plaza through Synapse's.
    let declined = plaza.server.create_room(&bob_token, json!({ "preset": "private_chat" })).await;
    let path = format!("/_matrix/client/v3/rooms/{}/invite", enc(&declined));
    let (status, body) = bob.call(Method::POST, &path, Some(json!({ "user_id": alice_id }))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let path = format!("/_matrix/client/v3/rooms/{}/leave", enc(&declined));
    let (status, body) = alice.call(Method::POST, &path, Some(json!({}))).await;
    assert_eq!(status, StatusCode::OK, "{body}\n{}", synapse.log());
    bob.sees_membership(&declined, alice_id, "leave").await;

    let (status, body) = alice
        .call(
            Method::POST,
            "/_matrix/client/v3/createRoom",
            Some(json!({ "preset": "private_chat" })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}\n{}", synapse.log());
    let turned_down = body["room_id"].as_str().unwrap().to_owned();
    let path = format!("/_matrix/client/v3/rooms/{}/invite", enc(&turned_down));
    let (status, body) = alice.call(Method::POST, &path, Some(json!({ "user_id": bob_id }))).await;
    assert_eq!(status, StatusCode::OK, "{body}\n{}", synapse.log());
    let path = format!("/_matrix/client/v3/rooms/{}/leave", enc(&turned_down));
    for _ in 0..100 {
        // The invite arrives over federation: until then there is nothing to turn down.
        let (status, _) = bob.call(Method::POST, &path, Some(json!({}))).await;
        if status == StatusCode::OK {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    alice.sees_membership(&turned_down, &bob_id, "leave").await;
    let (status, sync) =
        plaza.server.get("/_matrix/client/v3/sync?timeout=0", Some(&bob_token)).await;
    assert_eq!(status, StatusCode::OK, "{sync}");
    assert!(sync["rooms"]["invite"].get(&turned_down).is_none(), "{sync}");
}

/// Uploads `bytes` to the server at `base`; returns the `mxc://` URI.
async fn upload(http: &reqwest::Client, base: &str, token: &str, bytes: &'static [u8]) -> String {
    let response = http
        .post(format!("{base}/_matrix/media/v3/upload?filename=file.txt"))
        .bearer_auth(token)
        .header("content-type", "text/plain")
        .body(bytes)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    body["content_uri"].as_str().unwrap().to_owned()
}

/// Downloads `mxc` through the server at `base`'s authenticated media API.
async fn download(http: &reqwest::Client, base: &str, token: &str, mxc: &str) -> Vec<u8> {
    let path = mxc.strip_prefix("mxc://").unwrap();
    let response = http
        .get(format!("{base}/_matrix/client/v1/media/download/{path}"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let bytes = response.bytes().await.unwrap();
    assert_eq!(status, StatusCode::OK, "{mxc}: {}", String::from_utf8_lossy(&bytes));
    bytes.to_vec()
}
