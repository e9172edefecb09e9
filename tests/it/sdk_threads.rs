//! Threads, edits and thread receipts through the real `matrix-sdk`.

use std::time::Duration;

use matrix_sdk::{
    Client,
    config::SyncSettings,
    room::{IncludeRelations, ListThreadsOptions, RelationsOptions},
    ruma::{
        OwnedEventId,
        api::client::{
            filter::{FilterDefinition, RoomEventFilter},
            receipt::create_receipt::v3::ReceiptType,
            sync::sync_events::v3 as sync_events,
        },
        events::{receipt::ReceiptThread, relation::RelationType},
    },
};
use serde_json::{Value, json};

use crate::{common::TestServer, sdk::sdk_client};

/// `(main notifications, notifications per thread root)` from a sync asking for thread counts.
async fn counts(client: &Client, room: &matrix_sdk::Room) -> (u64, Vec<(OwnedEventId, u64)>) {
    let mut timeline = RoomEventFilter::default();
    timeline.unread_thread_notifications = true;
    let mut filter = FilterDefinition::default();
    filter.room.timeline = timeline;
    let mut request = sync_events::Request::new();
    request.filter = Some(sync_events::Filter::FilterDefinition(filter));
    let response = client.send(request).await.unwrap();
    let joined = &response.rooms.join[room.room_id()];
    let main = joined.unread_notifications.notification_count.map_or(0, u64::from);
    let threads = joined
        .unread_thread_notifications
        .iter()
        .map(|(root, c)| (root.clone(), c.notification_count.map_or(0, u64::from)))
        .filter(|(_, n)| *n > 0)
        .collect();
    (main, threads)
}

fn unsigned(event: &matrix_sdk::deserialized_responses::TimelineEvent) -> Value {
    event.raw().get_field::<Value>("unsigned").unwrap().unwrap_or_default()
}

#[tokio::test]
async fn matrix_sdk_threads_edits_and_thread_receipts() {
    let s = TestServer::start().await;
    let alice = sdk_client(&s.base, "sdkalice").await;
    let bob = sdk_client(&s.base, "sdkbob").await;
    let settings = || SyncSettings::default().timeout(Duration::from_millis(0));
    let mut request = matrix_sdk::ruma::api::client::room::create_room::v3::Request::new();
    request.invite = vec![bob.user_id().unwrap().to_owned()];
    let room = alice.create_room(request).await.unwrap();
    bob.sync_once(settings()).await.unwrap();
    let bob_room = bob.join_room_by_id(room.room_id()).await.unwrap();

    let root = room
        .send_raw("m.room.message", json!({ "msgtype": "m.text", "body": "Q3 budget" }))
        .await
        .unwrap()
        .response
        .event_id;
    let reply = bob_room
        .send_raw(
            "m.room.message",
            json!({
                "msgtype": "m.text",
                "body": "numbers attached",
                "m.relates_to": { "rel_type": "m.thread", "event_id": root, "is_falling_back": true, "m.in_reply_to": { "event_id": root } },
            }),
        )
        .await
        .unwrap()
        .response
        .event_id;

    // The thread is listed with its summary.
    let threads = room.list_threads(ListThreadsOptions::default()).await.unwrap();
    assert_eq!(threads.chunk.len(), 1);
    assert_eq!(threads.chunk[0].event_id().as_deref(), Some(&*root));
    let summary = &unsigned(&threads.chunk[0])["m.relations"]["m.thread"];
    assert_eq!(summary["count"], 1, "{summary}");
    assert_eq!(summary["latest_event"]["event_id"], reply.as_str());
    assert_eq!(summary["current_user_participated"], true);

    // Bob's reply is unread in the thread, not on the main timeline; a thread receipt clears
    // it while a new main-timeline message counts on its own.
    assert_eq!(counts(&alice, &room).await, (0, vec![(root.clone(), 1)]));
    let main = bob_room
        .send_raw("m.room.message", json!({ "msgtype": "m.text", "body": "lunch?" }))
        .await
        .unwrap()
        .response
        .event_id;
    assert_eq!(counts(&alice, &room).await, (1, vec![(root.clone(), 1)]));
    room.send_single_receipt(ReceiptType::Read, ReceiptThread::Thread(root.clone()), reply.clone())
        .await
        .unwrap();
    assert_eq!(counts(&alice, &room).await, (1, vec![]));
    room.send_single_receipt(ReceiptType::Read, ReceiptThread::Main, main).await.unwrap();
    assert_eq!(counts(&alice, &room).await, (0, vec![]));

    // An edit shows as the latest content while the original stays retrievable.
    let edit = room
        .send_raw(
            "m.room.message",
            json!({
                "msgtype": "m.text",
                "body": "* Q3 budget (final)",
                "m.new_content": { "msgtype": "m.text", "body": "Q3 budget (final)" },
                "m.relates_to": { "rel_type": "m.replace", "event_id": root },
            }),
        )
        .await
        .unwrap()
        .response
        .event_id;
    let original = bob_room.event(&root, None).await.unwrap();
    assert_eq!(original.raw().get_field::<Value>("content").unwrap().unwrap()["body"], "Q3 budget");
    let replace = &unsigned(&original)["m.relations"]["m.replace"];
    assert_eq!(replace["event_id"], edit.as_str(), "{replace}");
    assert_eq!(replace["content"]["m.new_content"]["body"], "Q3 budget (final)");
    let options = RelationsOptions {
        include_relations: IncludeRelations::RelationsOfType(RelationType::Replacement),
        ..Default::default()
    };
    let edits = bob_room.relations(root.clone(), options).await.unwrap();
    assert_eq!(edits.chunk.len(), 1);
    assert_eq!(edits.chunk[0].event_id().as_deref(), Some(&*edit));
    bob.sync_once(settings()).await.unwrap();
}
