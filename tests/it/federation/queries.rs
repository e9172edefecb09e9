//! Lookups across two servers over TLS: profiles, aliases, public rooms, device lists and
//! end-to-end keys (query and claim) asked by one server's clients of the other, the OpenID
//! check on the federation listener, and inbound EDUs (to-device) with
//! those that speak for another server's users dropped.

use std::sync::Arc;

use plaza::service::federation::edu;
use reqwest::StatusCode;
use ruma::{
    OwnedUserId,
    api::federation::{device::get_devices, transactions::edu::Edu},
    serde::Raw,
    to_device::DeviceIdOrAllDevices,
};
use serde_json::{Value, json};

use super::harness::pair;
use crate::common::{TestServer, assert_error, enc};

async fn sync(s: &TestServer, token: &str, since: Option<&str>) -> Value {
    let path = match since {
        Some(since) => format!("/_matrix/client/v3/sync?timeout=0&since={since}"),
        None => "/_matrix/client/v3/sync?timeout=0".to_owned(),
    };
    let (status, body) = s.get(&path, Some(token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

fn user(id: &str) -> OwnedUserId {
    id.try_into().unwrap()
}

#[tokio::test]
async fn profiles_aliases_and_public_rooms_of_the_other_server() {
    let (_pki, a, b) = pair().await;
    let (alice_id, alice, _) = a.server.register("alice", "correct horse").await;
    let (_, bob, _) = b.server.register("bob", "correct horse").await;
    let path = format!("/_matrix/client/v3/profile/{}/displayname", enc(&alice_id));
    let (status, _) = a.server.put(&path, Some(&alice), json!({ "displayname": "Alice A" })).await;
    assert_eq!(status, StatusCode::OK);

    // B's client asks B, which asks A.
    let (status, profile) =
        b.server.get(&format!("/_matrix/client/v3/profile/{}", enc(&alice_id)), Some(&bob)).await;
    assert_eq!(status, StatusCode::OK, "{profile}");
    assert_eq!(profile["displayname"], "Alice A");
    let (status, field) = b.server.get(&path, Some(&bob)).await;
    assert_eq!((status, &field["displayname"]), (StatusCode::OK, &json!("Alice A")));
    let nobody = format!("/_matrix/client/v3/profile/{}", enc(&format!("@nobody:{}", a.name)));
    assert_error(&b.server.get(&nobody, Some(&bob)).await, StatusCode::NOT_FOUND, "M_NOT_FOUND");

    // Aliases of A resolve on B.
    let room_id = a
        .server
        .create_room(&alice, json!({ "room_alias_name": "team", "visibility": "public" }))
        .await;
    let alias = format!("#team:{}", a.name);
    let (status, answer) =
        b.server.get(&format!("/_matrix/client/v3/directory/room/{}", enc(&alias)), None).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["room_id"], room_id);
    assert_eq!(answer["servers"], json!([a.name.as_str()]));
    let missing = format!("/_matrix/client/v3/directory/room/{}", enc(&format!("#no:{}", a.name)));
    assert_error(&b.server.get(&missing, None).await, StatusCode::NOT_FOUND, "M_NOT_FOUND");

    // A's public rooms listed for B's client, both forms.
    let (status, rooms) = b
        .server
        .get(&format!("/_matrix/client/v3/publicRooms?server={}", a.name), Some(&bob))
        .await;
    assert_eq!(status, StatusCode::OK, "{rooms}");
    assert_eq!(rooms["chunk"][0]["room_id"], room_id);
    let (status, rooms) = b
        .server
        .post(
            &format!("/_matrix/client/v3/publicRooms?server={}", a.name),
            Some(&bob),
            json!({ "filter": { "generic_search_term": "nothing matches this" } }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{rooms}");
    assert_eq!(rooms["chunk"], json!([]));

    // Without a token nobody makes B ask another server; B's own directory stays open.
    let requests_to_a = || {
        let mut metrics = String::new();
        b.services().federation.render_metrics(&mut metrics);
        let name = format!("plaza_federation_requests_total{{destination=\"{}\"}} ", a.name);
        metrics.lines().find_map(|l| l.strip_prefix(name.as_str())).unwrap_or("0").to_owned()
    };
    let before = requests_to_a();
    let remote = format!("/_matrix/client/v3/publicRooms?server={}", a.name);
    let anonymous = b.server.get(&remote, None).await;
    assert_error(&anonymous, StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN");
    let anonymous = b.server.post(&remote, None, json!({})).await;
    assert_error(&anonymous, StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN");
    assert_eq!(requests_to_a(), before);
    for local in [
        "/_matrix/client/v3/publicRooms".to_owned(),
        format!("/_matrix/client/v3/publicRooms?server={}", b.name),
    ] {
        let (status, rooms) = b.server.get(&local, None).await;
        assert_eq!((status, &rooms["chunk"]), (StatusCode::OK, &json!([])), "{rooms}");
    }
}

#[tokio::test]
async fn keys_are_queried_and_claimed_across_servers() {
    let (_pki, a, b) = pair().await;
    let (alice_id, alice, alice_device) = a.server.register("alice", "correct horse").await;
    let (_, bob, _) = b.server.register("bob", "correct horse").await;
    let device_keys = json!({
        "user_id": alice_id, "device_id": alice_device,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2"],
        "keys": { format!("curve25519:{alice_device}"): "curve", format!("ed25519:{alice_device}"): "edkey" },
        "signatures": {},
    });
    let body = json!({
        "device_keys": device_keys,
        "one_time_keys": { "signed_curve25519:K1": { "key": "otk1" } },
    });
    let (status, answer) =
        a.server.post("/_matrix/client/v3/keys/upload", Some(&alice), body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");

    let unreachable = "127.0.0.9:1";
    let query =
        json!({ "device_keys": { alice_id.as_str(): [], format!("@x:{unreachable}"): [] } });
    let (status, answer) = b.server.post("/_matrix/client/v3/keys/query", Some(&bob), query).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let keys = &answer["device_keys"][&alice_id][&alice_device];
    assert_eq!(keys["keys"][format!("curve25519:{alice_device}")], "curve", "{answer}");
    assert_eq!(answer["failures"][unreachable]["status"], 503, "{answer}");
    assert!(answer["failures"].get(a.name.as_str()).is_none());

    // The one-time key goes to one claimer only.
    let claim = json!({ "one_time_keys": { alice_id.as_str(): { alice_device.as_str(): "signed_curve25519" } } });
    let (status, answer) =
        b.server.post("/_matrix/client/v3/keys/claim", Some(&bob), claim.clone()).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(
        answer["one_time_keys"][&alice_id][&alice_device],
        json!({ "signed_curve25519:K1": { "key": "otk1" } })
    );
    let (_, again) = b.server.post("/_matrix/client/v3/keys/claim", Some(&bob), claim).await;
    assert_eq!(again["one_time_keys"][&alice_id][&alice_device], Value::Null, "{again}");

    // The device list endpoint, asked directly by B's federation client.
    let devices = b
        .services()
        .federation
        .send(&a.name, get_devices::v1::Request::new(user(&alice_id)))
        .await
        .unwrap();
    assert_eq!(devices.devices.len(), 1);
    assert_eq!(devices.devices[0].device_id.as_str(), alice_device);
    // Another server's users are not answered for.
    let err = b
        .services()
        .federation
        .send(&a.name, get_devices::v1::Request::new(user(&format!("@bob:{}", b.name))))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("404"), "{err}");
}

/// Uploads device keys for `device` of `user_id`, named by `curve`.
async fn upload_keys(s: &TestServer, token: &str, user_id: &str, device: &str, curve: &str) {
    let device_keys = json!({
        "user_id": user_id, "device_id": device,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2"],
        "keys": { format!("curve25519:{device}"): curve, format!("ed25519:{device}"): "ed" },
        "signatures": {},
    });
    let body = json!({ "device_keys": device_keys });
    let (status, answer) = s.post("/_matrix/client/v3/keys/upload", Some(token), body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
}

#[tokio::test]
async fn remote_device_lists_and_their_stale_marks_survive_a_restart() {
    let (_pki, a, b) = pair().await;
    let (alice_id, alice, first) = a.server.register("alice", "correct horse").await;
    upload_keys(&a.server, &alice, &alice_id, &first, "curve1").await;
    let (_, bob, _) = b.server.register("bob", "correct horse").await;
    let query = json!({ "device_keys": { alice_id.as_str(): [] } });
    let devices_of = |answer: &Value| {
        let mut ids: Vec<String> =
            answer["device_keys"][&alice_id].as_object().unwrap().keys().cloned().collect();
        ids.sort();
        ids
    };
    let path = "/_matrix/client/v3/keys/query";
    let (status, answer) = b.server.post(path, Some(&bob), query.clone()).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(devices_of(&answer), vec![first.clone()]);

    // A second device appears on A, but nothing tells B: B keeps its list across a restart.
    let (status, login) = a.server.login("alice", "correct horse").await;
    assert_eq!(status, StatusCode::OK, "{login}");
    let second = login["device_id"].as_str().unwrap().to_owned();
    let second_token = login["access_token"].as_str().unwrap().to_owned();
    upload_keys(&a.server, &second_token, &alice_id, &second, "curve2").await;
    let b = b.restart(|_| {}, |_| {}).await;
    let (_, answer) = b.server.post(path, Some(&bob), query.clone()).await;
    assert_eq!(devices_of(&answer), vec![first.clone()], "the stored list is used: {answer}");

    // A says the list changed; the mark outlives another restart and the list is fetched anew.
    let changed = edu::DeviceState { keys: None, display_name: None };
    let update = edu::device_list_update(
        &user(&alice_id),
        second.as_str().into(),
        (2, Some(1)),
        Some(changed),
    )
    .unwrap();
    edu::receive(b.services(), &a.name, update).await;
    let b = b.restart(|_| {}, |_| {}).await;
    let (_, answer) = b.server.post(path, Some(&bob), query).await;
    let mut both = vec![first, second.clone()];
    both.sort();
    assert_eq!(devices_of(&answer), both, "{answer}");
    let keys = &answer["device_keys"][&alice_id][&second]["keys"];
    assert_eq!(keys[format!("curve25519:{second}")], "curve2", "{answer}");
}

#[tokio::test]
async fn openid_tokens_are_checked_on_the_federation_listener() {
    let (_pki, a, _b) = pair().await;
    let (alice_id, alice, _) = a.server.register("alice", "correct horse").await;
    let path = format!("/_matrix/client/v3/user/{}/openid/request_token", enc(&alice_id));
    let (status, token) = a.server.post(&path, Some(&alice), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{token}");
    let token = token["access_token"].as_str().unwrap();
    let (status, info) =
        a.get(&format!("/_matrix/federation/v1/openid/userinfo?access_token={token}")).await;
    assert_eq!((status, &info["sub"]), (StatusCode::OK, &json!(alice_id)));
    let (status, info) = a.get("/_matrix/federation/v1/openid/userinfo?access_token=bogus").await;
    assert_eq!((status, &info["errcode"]), (StatusCode::UNAUTHORIZED, &json!("M_UNKNOWN_TOKEN")));
}

fn to_device(sender: &str, message_id: &str, to: &str, body: &str) -> Edu {
    let content: Raw<_> =
        Raw::from_json(serde_json::value::to_raw_value(&json!({ "body": body })).unwrap());
    let messages = [(user(to), [(DeviceIdOrAllDevices::AllDevices, content)].into())].into();
    edu::direct_to_device(&user(sender), "org.example.ping", message_id.into(), messages)
}

#[tokio::test]
async fn to_device_edus_are_delivered_once_and_only_for_the_origins_users() {
    let (_pki, a, b) = pair().await;
    let (bob_id, bob, _) = b.server.register("bob", "correct horse").await;
    let first = sync(&b.server, &bob, None).await;
    let since = first["next_batch"].as_str().unwrap().to_owned();
    let services: &Arc<_> = b.services();
    let alice = format!("@alice:{}", a.name);
    edu::receive(services, &a.name, to_device(&alice, "m1", &bob_id, "one")).await;
    // The same message again, and one claiming to come from a user of a third server.
    edu::receive(services, &a.name, to_device(&alice, "m1", &bob_id, "one")).await;
    edu::receive(services, &a.name, to_device("@mallory:evil.example", "m2", &bob_id, "x")).await;
    let later = sync(&b.server, &bob, Some(&since)).await;
    let events = later["to_device"]["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{later}");
    assert_eq!(events[0]["sender"], alice);
    assert_eq!(events[0]["type"], "org.example.ping");
    assert_eq!(events[0]["content"]["body"], "one");
}

#[tokio::test]
async fn to_device_messages_reach_the_other_servers_devices() {
    let (_pki, a, b) = pair().await;
    let (alice_id, alice, alice_device) = a.server.register("alice", "correct horse").await;
    let (bob_id, bob, _) = b.server.register("bob", "correct horse").await;
    let first = sync(&a.server, &alice, None).await;
    let since = first["next_batch"].as_str().unwrap().to_owned();
    let body = json!({ "messages": { alice_id.as_str(): { alice_device.as_str(): { "n": 1 } } } });
    let path = "/_matrix/client/v3/sendToDevice/org.example.ping/t1";
    let (status, answer) = b.server.put(path, Some(&bob), body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    // The same request again is delivered once.
    b.server.put(path, Some(&bob), body).await;
    // Long-polls until the message arrives.
    let wait = format!("/_matrix/client/v3/sync?timeout=10000&since={since}");
    let (status, later) = a.server.get(&wait, Some(&alice)).await;
    assert_eq!(status, StatusCode::OK, "{later}");
    let events = later["to_device"]["events"].as_array().cloned().unwrap_or_default();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["sender"], bob_id);
    assert_eq!(events[0]["content"]["n"], 1);
    let next = later["next_batch"].as_str().unwrap();
    let wait = format!("/_matrix/client/v3/sync?timeout=2000&since={next}");
    let (_, after) = a.server.get(&wait, Some(&alice)).await;
    assert_eq!(after["to_device"]["events"].as_array().map_or(0, Vec::len), 0, "{after}");
}
