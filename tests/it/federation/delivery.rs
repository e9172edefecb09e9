//! Transactions that must get through between servers: full-size transactions of large
//! events, a destination refusing a transaction (dropped after a few tries so what follows
//! flows), and a destination's backoff ended by its contacting us.

use std::time::{Duration, Instant};

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
};

use plaza::service::federation::sender::queue_edu;
use reqwest::StatusCode;
use ruma::{
    OwnedRoomId, OwnedServerName, OwnedUserId, RoomId,
    api::federation::transactions::edu::{Edu, TypingContent},
};
use serde_json::{Value, json};

use super::{
    harness::{FedServer, Pki, serve_tls_on},
    sending::{
        bodies, eventually, join_remote, numbered, send, sent_while_down, shared_room,
        shared_room_with, text, until_bodies,
    },
};

#[tokio::test(flavor = "multi_thread")]
async fn a_full_transaction_of_large_events_is_accepted() {
    let (_pki, a, b, alice, bob, bob_id, room) = shared_room("shared").await;
    let room_id = RoomId::parse(&room).unwrap();
    join_remote(&a, &b, &room_id, &bob_id).await;
    send(&a, &alice, &room, "m0", text("m0")).await;
    until_bodies(&b, &bob, &room, &["m0"]).await;

    // While B is down, A's users send 40 events of about 60 KiB: about 2.4 MiB that leave
    // in one transaction once B is back.
    let large = |n: usize| format!("{n:02}{}", "x".repeat(60 * 1024));
    let messages: Vec<(String, String)> = (1..=40).map(|n| (format!("l{n}"), large(n))).collect();
    let b = sent_while_down(&a, b, &alice, &room, &messages, 1).await;
    assert_eq!(a.services().federation_sender.depth(b.name.as_str()), 40);
    a.services().federation_sender.reset(b.name.as_str());
    let mut expected = vec!["m0".to_owned()];
    expected.extend((1..=40).map(large));
    let expected: Vec<&str> = expected.iter().map(String::as_str).collect();
    until_bodies(&b, &bob, &room, &expected).await;
    eventually("A's queue to B is empty and healthy", || {
        let status = a.services().federation_sender.destination(b.name.as_str()).unwrap();
        (status.queued, status.failures) == (0, 0)
    })
    .await;
}

/// A typing EDU of alice of `server` in `!{room}:{server}`.
fn typing_in(server: &OwnedServerName, room: &str) -> Edu {
    let room_id = OwnedRoomId::try_from(format!("!{room}:{server}")).unwrap();
    let user_id = OwnedUserId::try_from(format!("@alice:{server}")).unwrap();
    Edu::Typing(TypingContent::new(room_id, user_id, true))
}

/// The rooms of the typing EDUs of a transaction body.
fn typing_rooms(body: &Value) -> Vec<String> {
    let edus = body["edus"].as_array().into_iter().flatten();
    edus.filter_map(|edu| edu["content"]["room_id"].as_str()).map(str::to_owned).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_transaction_is_dropped_after_a_few_tries_and_what_follows_arrives() {
    let pki = Pki::new();
    let a = FedServer::start(&pki, 1, |_| {}).await;
    // Another server that answers 400 M_BAD_JSON to every transaction holding an EDU of the
    // room `!refused:…`, and takes the others.
    let refused: Arc<Mutex<Vec<Value>>> = Arc::default();
    let accepted: Arc<Mutex<Vec<Value>>> = Arc::default();
    let app = {
        let (refused, accepted) = (refused.clone(), accepted.clone());
        axum::Router::new().route(
            "/_matrix/federation/v1/send/{txn}",
            axum::routing::put(move |axum::Json(body): axum::Json<Value>| {
                let (refused, accepted) = (refused.clone(), accepted.clone());
                async move {
                    if typing_rooms(&body).iter().any(|room| room.starts_with("!refused:")) {
                        refused.lock().unwrap().push(body);
                        let error = json!({ "errcode": "M_BAD_JSON", "error": "no" });
                        return (StatusCode::BAD_REQUEST, axum::Json(error));
                    }
                    accepted.lock().unwrap().push(body);
                    (StatusCode::OK, axum::Json(json!({ "pdus": {} })))
                }
            }),
        )
    };
    let addr = serve_tls_on(&pki, SocketAddr::from((Ipv4Addr::new(127, 0, 0, 3), 0)), app).await;
    let other = OwnedServerName::try_from(addr.to_string()).unwrap();
    let sender = &a.services().federation_sender;

    queue_edu(a.services(), std::slice::from_ref(&other), typing_in(&a.name, "refused")).unwrap();
    eventually("the first refusal", || !refused.lock().unwrap().is_empty()).await;
    queue_edu(a.services(), std::slice::from_ref(&other), typing_in(&a.name, "after")).unwrap();
    eventually("what follows is delivered", || !accepted.lock().unwrap().is_empty()).await;

    // Three tries of the same transaction, then it was dropped and the next one went.
    let refused = refused.lock().unwrap().clone();
    assert_eq!(refused.len(), 3, "{refused:?}");
    assert!(refused.iter().all(|body| typing_rooms(body) == [format!("!refused:{}", a.name)]));
    let accepted = accepted.lock().unwrap().clone();
    assert_eq!(accepted.len(), 1, "{accepted:?}");
    assert_eq!(typing_rooms(&accepted[0]), [format!("!after:{}", a.name)]);
    let status = sender.destination(other.as_str()).unwrap();
    assert_eq!((status.queued, status.dropped, status.failures), (0, 1, 0), "{status:?}");
    assert!(status.last_error.as_deref().unwrap().contains("M_BAD_JSON"), "{status:?}");
    let metrics = a.services().metrics.render(a.services());
    let dropped = format!("plaza_federation_dropped_items{{destination=\"{other}\"}} 1");
    assert!(metrics.contains(&dropped), "{metrics}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_backoff_ends_as_soon_as_the_destination_contacts_us() {
    // A waits a minute after B first fails: only B's contact can end the wait in time.
    let (_pki, a, b, alice, bob, bob_id, room) =
        shared_room_with("shared", |config| config.federation.destination_retry_first_ms = 60_000)
            .await;
    let room_id = RoomId::parse(&room).unwrap();
    join_remote(&a, &b, &room_id, &bob_id).await;
    send(&a, &alice, &room, "m0", text("m0")).await;
    until_bodies(&b, &bob, &room, &["m0"]).await;

    let b = sent_while_down(&a, b, &alice, &room, &numbered(1, 3), 1).await;
    let status = a.services().federation_sender.destination(b.name.as_str()).unwrap();
    assert_eq!((status.queued, status.retry_interval_ms), (3, 60_000), "{status:?}");
    assert_eq!(bodies(&b, &bob, &room).await, ["m0"]);

    // Bob's message reaches A in a transaction of B's: A's wait for B ends there.
    let contacted = Instant::now();
    send(&b, &bob, &room, "b1", text("b1")).await;
    let mut seen = Vec::new();
    while contacted.elapsed() < Duration::from_secs(5) {
        seen = bodies(&b, &bob, &room).await;
        if seen == ["m0", "b1", "m1", "m2", "m3"] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(seen, ["m0", "b1", "m1", "m2", "m3"], "after {:?}", contacted.elapsed());
    eventually("A's queue to B is empty and healthy", || {
        let status = a.services().federation_sender.destination(b.name.as_str()).unwrap();
        (status.queued, status.failures, status.retry_interval_ms) == (0, 0, 0)
    })
    .await;
}
