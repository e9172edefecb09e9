//! Element X's way of syncing, with the real `matrix-sdk-ui` `SyncService` (its
//! `RoomListService` over simplified sliding sync plus the encryption sync): the room list in
//! recency order, an opened room's timeline with plain and encrypted messages, typing and
//! receipts, and a server restart under a running client.

use std::{
    future::Future,
    time::{Duration, Instant},
};

use matrix_sdk::{
    Client,
    ruma::{
        OwnedRoomId, RoomId,
        events::receipt::{ReceiptThread, ReceiptType},
    },
    sliding_sync::VersionBuilder,
};
use matrix_sdk_ui::{
    sync_service::{State, SyncService},
    timeline::{RoomExt, Timeline},
};
use serde_json::json;

use crate::{
    common::{TestServer, enc},
    sdk::sdk_client,
};

/// Alice's phone: logged in with her password, syncing the Element X way.
async fn phone(base: &str) -> (Client, SyncService) {
    let client = Client::builder()
        .homeserver_url(base)
        .sliding_sync_version_builder(VersionBuilder::DiscoverNative)
        .build()
        .await
        .unwrap();
    client.matrix_auth().login_username("alice", "password 1").send().await.unwrap();
    let sync = SyncService::builder(client.clone()).build().await.unwrap();
    sync.start().await;
    (client, sync)
}

/// Waits (up to 60 s) until `check` holds, restarting the sync service should it stop, as
/// Element X does.
async fn eventually<F, Fut>(sync: &SyncService, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        if matches!(sync.state().get(), State::Error(_) | State::Terminated | State::Idle) {
            sync.start().await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn bodies(timeline: &Timeline) -> Vec<String> {
    timeline
        .items()
        .await
        .iter()
        .filter_map(|item| item.as_event()?.content().as_message().map(|m| m.body().to_owned()))
        .collect()
}

#[tokio::test]
async fn element_x_style_client_lists_300_rooms_by_recency_and_follows_a_room() {
    let s = TestServer::start().await;
    let (_, alice, _) = s.register("alice", "password 1").await;
    let bob = sdk_client(&s.base, "bob").await;
    let bob_token = bob.access_token().unwrap();
    let bob_id = bob.user_id().unwrap().to_owned();
    let mut created: Vec<OwnedRoomId> = Vec::new();
    for i in 0..298 {
        let room = s.create_room(&alice, json!({ "name": format!("room {i}") })).await;
        created.push(RoomId::parse(room).unwrap());
    }
    let plain = s.create_room(&alice, json!({ "name": "plain", "invite": [bob_id] })).await;
    let secret = s
        .create_room(
            &alice,
            json!({ "name": "secret", "invite": [bob_id], "initial_state": [{
                "type": "m.room.encryption", "state_key": "",
                "content": { "algorithm": "m.megolm.v1.aes-sha2" } }] }),
        )
        .await;
    for room in [&plain, &secret] {
        assert_eq!(s.membership(&bob_token, room, "join", json!({})).await.0, 200);
        created.push(RoomId::parse(room.as_str()).unwrap());
    }
    // Room 5 gets the newest message: it must top the list.
    s.send_text(&alice, created[5].as_str(), "t5", "newest").await;
    let mut expected: Vec<OwnedRoomId> = created.iter().rev().cloned().collect();
    expected.retain(|r| r != &created[5]);
    expected.insert(0, created[5].clone());

    let (client, sync) = phone(&s.base).await;
    eventually(&sync, "300 rooms", || async { client.rooms().len() == 300 }).await;
    let mut listed: Vec<(u64, OwnedRoomId)> = client
        .rooms()
        .iter()
        .map(|r| (r.recency_stamp().map(u64::from).unwrap_or_default(), r.room_id().to_owned()))
        .collect();
    listed.sort_by(|a, b| b.cmp(a));
    let listed: Vec<OwnedRoomId> = listed.into_iter().map(|(_, r)| r).collect();
    assert_eq!(listed, expected);
    let named = client.get_room(&created[7]).unwrap();
    assert_eq!(named.name().as_deref(), Some("room 7"));

    // Open the encrypted room, as tapping it in the list does.
    let secret_id = RoomId::parse(secret.as_str()).unwrap();
    let plain_id = RoomId::parse(plain.as_str()).unwrap();
    let room_list = sync.room_list_service();
    room_list.subscribe_to_rooms(&[&secret_id, &plain_id]).await;
    let room = client.get_room(&secret_id).unwrap();
    let timeline = room.timeline().await.unwrap();
    let plain_timeline = client.get_room(&plain_id).unwrap().timeline().await.unwrap();
    let (_typing_guard, mut typing) = room.subscribe_to_typing_notifications();

    // Bob sends an encrypted message once alice's phone has published its keys.
    let phone_device = client.device_id().unwrap().to_owned();
    let query = json!({ "device_keys": { "@alice:localhost": [] } });
    eventually(&sync, "the phone's keys", || async {
        let (_, keys) = s.post("/_matrix/client/v3/keys/query", Some(&alice), query.clone()).await;
        keys["device_keys"]["@alice:localhost"].get(phone_device.as_str()).is_some()
    })
    .await;
    bob.sync_once(Default::default()).await.unwrap();
    let bob_room = bob.get_room(&secret_id).unwrap();
    let sent = bob_room
        .send(matrix_sdk::ruma::events::room::message::RoomMessageEventContent::text_plain(
            "encrypted hello",
        ))
        .await
        .unwrap();
    s.send_text(&bob_token, &plain, "b1", "plain hello").await;
    eventually(&sync, "the encrypted message", || async {
        bodies(&timeline).await.contains(&"encrypted hello".to_owned())
    })
    .await;
    eventually(&sync, "the plain message", || async {
        bodies(&plain_timeline).await.contains(&"plain hello".to_owned())
    })
    .await;

    // Bob types and reads: both reach the phone through the extensions.
    let typing_path = format!("/_matrix/client/v3/rooms/{secret}/typing/{}", enc(bob_id.as_str()));
    let body = json!({ "typing": true, "timeout": 30_000 });
    assert_eq!(s.put(&typing_path, Some(&bob_token), body).await.0, 200);
    let typers =
        tokio::time::timeout(Duration::from_secs(30), typing.recv()).await.unwrap().unwrap();
    assert_eq!(typers, vec![bob_id.clone()]);
    let receipt = format!(
        "/_matrix/client/v3/rooms/{secret}/receipt/m.read/{}",
        enc(sent.response.event_id.as_str())
    );
    assert_eq!(s.post(&receipt, Some(&bob_token), json!({})).await.0, 200);
    eventually(&sync, "bob's receipt", || async {
        let read = room.load_user_receipt(ReceiptType::Read, ReceiptThread::Unthreaded, &bob_id);
        read.await.unwrap().is_some_and(|(event, _)| event == sent.response.event_id)
    })
    .await;
    sync.stop().await;
}

#[tokio::test]
async fn a_client_syncing_through_a_restart_loses_no_message() {
    let s = TestServer::start().await;
    let (_, alice, _) = s.register("alice", "password 1").await;
    let room = s.create_room(&alice, json!({ "name": "through restart" })).await;
    s.send_text(&alice, &room, "t0", "before").await;
    let room_id = RoomId::parse(room.as_str()).unwrap();
    let (client, sync) = phone(&s.base).await;
    eventually(&sync, "the room", || async { client.get_room(&room_id).is_some() }).await;
    sync.room_list_service().subscribe_to_rooms(&[&room_id]).await;
    let timeline = client.get_room(&room_id).unwrap().timeline().await.unwrap();
    eventually(&sync, "the first message", || async {
        bodies(&timeline).await.contains(&"before".to_owned())
    })
    .await;

    // Messages while the phone is away, then the server restarts: its position is gone.
    sync.stop().await;
    s.send_text(&alice, &room, "t1", "while away").await;
    let s = s.restart().await;
    s.send_text(&alice, &room, "t2", "after restart").await;
    sync.start().await;
    eventually(&sync, "the message after the restart", || async {
        bodies(&timeline).await.contains(&"after restart".to_owned())
    })
    .await;
    // Whatever a gap hides is paged back in: nothing was lost.
    eventually(&sync, "the message sent while away", || async {
        if !bodies(&timeline).await.contains(&"while away".to_owned()) {
            let _ = timeline.paginate_backwards(20).await;
        }
        bodies(&timeline).await.contains(&"while away".to_owned())
    })
    .await;
    let seen = bodies(&timeline).await;
    let at = |body: &str| seen.iter().position(|b| b == body).unwrap();
    assert!(at("while away") < at("after restart"), "{seen:?}");
    sync.stop().await;
}
