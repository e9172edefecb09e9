//! Transactions that must get through between servers: full-size transactions of large
//! events, a destination refusing a transaction (dropped after a few tries so what follows
//! flows), and a destination's backoff ended by its contacting us.

use ruma::RoomId;

use super::sending::{eventually, join_remote, send, shared_room, text, until_bodies};

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
    let handle = tokio::runtime::Handle::current();
    let b_name = b.name.clone();
    let b = b
        .restart(
            |_| {
                tokio::task::block_in_place(|| {
                    handle.block_on(async {
                        for n in 1..=40 {
                            send(&a, &alice, &room, &format!("l{n}"), text(&large(n))).await;
                        }
                        eventually("A sees B failing", || {
                            a.services()
                                .federation_sender
                                .destination(b_name.as_str())
                                .is_some_and(|s| s.failures >= 1)
                        })
                        .await;
                    })
                });
            },
            |_| {},
        )
        .await;
    assert_eq!(a.services().federation_sender.depth(b.name.as_str()), 40);
    a.services().federation_sender.reset(b.name.as_str());
    let mut expected = vec!["m0".to_owned()];
    expected.extend((1..=40).map(large));
    let expected: Vec<&str> = expected.iter().map(String::as_str).collect();
    until_bodies(&b, &bob, &room, &expected).await;
    let status = a.services().federation_sender.destination(b.name.as_str()).unwrap();
    assert_eq!((status.queued, status.failures), (0, 0), "{status:?}");
}
