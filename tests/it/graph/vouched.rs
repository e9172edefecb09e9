//! Events placed on a state another server vouches for (a join's `send_join` answer, a gap
//! that fetching could not close).

use plaza::service::rooms::{Status, from_state::VouchedState, ingest::Outcome};
use ruma::{CanonicalJsonObject, OwnedEventId, RoomVersionId};
use serde_json::json;

use super::harness::*;
use crate::common::TestServer;

/// The state before `id` as the remote server would send it, plus `extra` events.
fn state_pdus(dag: &Dag, id: &OwnedEventId, extra: &[&OwnedEventId]) -> Vec<CanonicalJsonObject> {
    let mut ids: Vec<&OwnedEventId> = dag.state(id).values().collect();
    ids.sort();
    ids.extend_from_slice(extra);
    ids.into_iter().map(|id| dag.pdu(id)).collect()
}

async fn place(
    s: &TestServer,
    dag: &Dag,
    keys: &Keys,
    event: &OwnedEventId,
    state: Vec<CanonicalJsonObject>,
) -> Outcome {
    let services = services(s);
    let (id, outcome) = services
        .rooms
        .ingest_with_state(
            &services,
            &dag.room_id(),
            &dag.version,
            dag.pdu(event),
            VouchedState { state, auth_chain: Vec::new() },
            keys,
        )
        .await
        .unwrap();
    assert_eq!(id.as_ref(), Some(event));
    outcome
}

/// A join completed with the room's state makes the room here with that state; a state event
/// its own auth events refuse is left out, and later events build on the join.
#[tokio::test]
async fn a_join_placed_on_the_state_it_came_with_makes_the_room() {
    let s = TestServer::start().await;
    let (r1, r2, keys) = two_servers();
    let (alice, bob, erin) = (r1.user("alice"), r1.user("bob"), r2.user("erin"));
    let mut dag = Dag::new(RoomVersionId::V11);
    let setup = dag.public_room(&r1, &alice, &[]);
    let bob_join = dag.member(&r1, &bob, &bob, "join", &[&setup[3]]);
    let topic = json!({ "topic": "Quarterly plans" });
    let topic = dag.state_event(&r1, &alice, "m.room.topic", "", topic, &[&bob_join]);
    let said = dag.message(&r1, &bob, "before erin", &[&topic]);
    // Erin is no member yet: her topic change fails its own auth events.
    let forged = json!({ "topic": "forged" });
    let forged = dag.state_event(&r2, &erin, "m.room.topic", "", forged, &[&said]);
    let erin_join = dag.member(&r2, &erin, &erin, "join", &[&said]);

    let state = state_pdus(&dag, &said, &[&forged]);
    let outcome = place(&s, &dag, &keys, &erin_join, state).await;
    assert_eq!(outcome, Outcome::Placed(Status::Accepted));
    let room = dag.room_id();
    assert_eq!(status(&s, &forged), Some(Status::Rejected));
    assert_eq!(current_state(&s, &room), *dag.state(&erin_join));
    assert_eq!(extremities(&s, &room), [erin_join.clone()].into());
    // The events before the join stay outliers: known, but not in the timeline.
    assert_eq!(status(&s, &said), None, "messages are not part of the state");
    assert_eq!(status(&s, &topic), Some(Status::Outlier));

    // Placed again, it is known.
    let again = place(&s, &dag, &keys, &erin_join, state_pdus(&dag, &said, &[])).await;
    assert_eq!(again, Outcome::Known(Status::Accepted));

    // Later events follow the join, and a local user joins and reads them.
    let next = dag.message(&r1, &alice, "welcome erin", &[&erin_join]);
    ingest_accepted(&s, &dag, &keys, &[&next]).await;
    let (_, dan, _) = s.register("dan", "correct horse").await;
    join(&s, &dan, &room).await;
    let s = restart(s).await;
    assert_eq!(current_state(&s, &room).get(&("m.room.topic".into(), String::new())), Some(&topic));
    let end = format!("s{}", services(&s).stream.current());
    let history = messages_back(&s, &dan, &room, &end).await;
    assert!(history.contains(&next.to_string()), "{history:?}");
    assert!(!history.contains(&said.to_string()), "{history:?}");
}

/// A join the state refuses (an invite-only room) is rejected, and makes no room.
#[tokio::test]
async fn a_join_the_vouched_state_refuses_makes_no_room() {
    let s = TestServer::start().await;
    let (r1, r2, keys) = two_servers();
    let (alice, erin) = (r1.user("alice"), r2.user("erin"));
    let mut dag = Dag::new(RoomVersionId::V10);
    let setup = dag.public_room(&r1, &alice, &[]);
    let rules = json!({ "join_rule": "invite" });
    let closed = dag.state_event(&r1, &alice, "m.room.join_rules", "", rules, &[&setup[3]]);
    let erin_join = dag.member(&r2, &erin, &erin, "join", &[&closed]);

    let outcome = place(&s, &dag, &keys, &erin_join, state_pdus(&dag, &closed, &[])).await;
    assert_eq!(outcome, Outcome::Placed(Status::Rejected));
    assert!(services(&s).rooms.room(&dag.room_id()).unwrap().is_none());
}
