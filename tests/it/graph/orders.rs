//! One graph delivered in many orders: the result must not depend on the order.

use std::collections::BTreeMap;

use plaza::service::rooms::{Status, ingest::Outcome};
use ruma::{OwnedEventId, RoomVersionId};
use serde_json::json;

use super::harness::*;
use crate::common::TestServer;

/// A room of ~30 events on three branches off one fork point, a partial merge of two of them
/// and a final merge of all: joins, leaves, power levels, topics, names, messages, and one
/// message of a non-member (rejected) with an accepted child. Returns the graph, its keys,
/// the events in build order and the final merge.
fn three_branches(version: RoomVersionId) -> (Dag, Keys, Vec<OwnedEventId>, OwnedEventId) {
    let (r1, r2, r3) = (
        FakeServer::new("remote1.test"),
        FakeServer::new("remote2.test"),
        FakeServer::new("remote3.test"),
    );
    let keys = Keys::of(&[&r1, &r2, &r3]);
    let (alice, dave) = (r1.user("alice"), r1.user("dave"));
    let (bob, erin, eve) = (r2.user("bob"), r2.user("erin"), r2.user("eve"));
    let frank = r3.user("frank");
    let mut dag = Dag::new(version);
    let mut all = dag.public_room(&r1, &alice, &[(&bob, 50)]);
    let shared = json!({ "history_visibility": "shared" });
    let visibility =
        dag.state_event(&r1, &alice, "m.room.history_visibility", "", shared, &[&all[3]]);
    let fork = dag.member(&r2, &bob, &bob, "join", &[&visibility]);
    all.extend([visibility, fork.clone()]);

    // Branch A: dave joins and gets a level; alice sets a topic and a name.
    let a1 = dag.member(&r1, &dave, &dave, "join", &[&fork]);
    let levels = dag.power_levels(&[(&alice, 100), (&bob, 50), (&dave, 20)]);
    let a2 = dag.state_event(&r1, &alice, "m.room.power_levels", "", levels, &[&a1]);
    let a3 = dag.state_event(&r1, &alice, "m.room.topic", "", json!({ "topic": "A" }), &[&a2]);
    let a4 = dag.message(&r1, &dave, "dave 1", &[&a3]);
    let a5 = dag.message(&r1, &alice, "alice A", &[&a4]);
    let a6 = dag.state_event(&r1, &alice, "m.room.name", "", json!({ "name": "Room A" }), &[&a5]);
    let a7 = dag.message(&r1, &dave, "dave 2", &[&a6]);
    let a8 = dag.member(&r1, &dave, &dave, "leave", &[&a7]);
    // Branch B: erin joins, bob sets a topic, eve (never joined) talks and is refused, bob
    // answers her, alice raises bob, bob names the room, erin renames herself.
    let b1 = dag.member(&r2, &erin, &erin, "join", &[&fork]);
    let b2 = dag.state_event(&r2, &bob, "m.room.topic", "", json!({ "topic": "B" }), &[&b1]);
    let b3 = dag.message(&r2, &erin, "erin 1", &[&b2]);
    let refused = dag.message(&r2, &eve, "eve", &[&b3]);
    let b4 = dag.message(&r2, &bob, "bob answers", &[&refused]);
    let levels = dag.power_levels(&[(&alice, 100), (&bob, 60)]);
    let b5 = dag.state_event(&r1, &alice, "m.room.power_levels", "", levels, &[&b4]);
    let b6 = dag.message(&r2, &erin, "erin 2", &[&b5]);
    let b7 = dag.state_event(&r2, &bob, "m.room.name", "", json!({ "name": "Room B" }), &[&b6]);
    let erin_name = json!({ "membership": "join", "displayname": "Erin" });
    let b8 = dag.state_event(&r2, &erin, "m.room.member", &erin, erin_name, &[&b7]);
    // Branch C: frank comes, talks and goes; alice talks after.
    let c1 = dag.member(&r3, &frank, &frank, "join", &[&fork]);
    let c2 = dag.message(&r3, &frank, "frank", &[&c1]);
    let c3 = dag.member(&r3, &frank, &frank, "leave", &[&c2]);
    let c4 = dag.message(&r1, &alice, "alice C", &[&c3]);
    // A partial merge of A and B, continued; then the final merge of everything.
    let m1 = dag.message(&r1, &alice, "partial merge", &[&a4, &b3]);
    let m2 = dag.message(&r2, &bob, "after partial merge", &[&m1]);
    let end = dag.message(&r1, &alice, "final merge", &[&a8, &b8, &c4, &m2]);
    all.extend([a1, a2, a3, a4, a5, a6, a7, a8]);
    all.extend([b1, b2, b3, refused, b4, b5, b6, b7, b8]);
    all.extend([c1, c2, c3, c4, m1, m2, end.clone()]);
    (dag, keys, all, end)
}

/// What a server made of the graph: every event's status and the room's current state.
#[derive(Debug, PartialEq, Eq)]
struct Result {
    statuses: BTreeMap<OwnedEventId, Option<Status>>,
    state: StateIds,
}

#[tokio::test]
async fn any_delivery_order_gives_the_same_state_and_statuses() {
    for version in [RoomVersionId::V11, RoomVersionId::V12] {
        let (dag, keys, all, end) = three_branches(version.clone());
        assert!(all.len() >= 30, "{}", all.len());
        let room = dag.room_id();
        let refused = all.iter().find(|id| dag.json(id)["sender"] == "@eve:remote2.test").unwrap();
        let id =
            |kind: &str, key: &str| dag.state(&end)[&(kind.to_owned(), key.to_owned())].clone();
        let mut reference: Option<Result> = None;
        let mut rng = Rng::new(0x5eed_0000 + version.as_str().len() as u64);
        for order in 0..12 {
            let s = TestServer::start().await;
            // The create event comes first (a server takes events only of rooms it knows);
            // the rest in a shuffled order, cut into one to four calls. The first order is
            // the build order in one call.
            let mut rest: Vec<&OwnedEventId> = all[1..].iter().collect();
            if order > 0 {
                rng.shuffle(&mut rest);
            }
            let calls = if order == 0 { 1 } else { 1 + rng.below(4) };
            let mut cuts: Vec<usize> = (1..calls).map(|_| rng.below(rest.len())).collect();
            cuts.sort_unstable();
            cuts.push(rest.len());
            let mut delivered = vec![&all[0]];
            let mut start = 0;
            for cut in cuts {
                delivered.extend(&rest[start..cut]);
                let outcomes = ingest(&s, &dag, &keys, &delivered).await;
                for (id, outcome) in delivered.iter().zip(outcomes) {
                    assert!(
                        !matches!(outcome, Outcome::Dropped(_)),
                        "order {order}: {id} {outcome:?}"
                    );
                }
                delivered.clear();
                start = cut;
            }

            let result = Result {
                statuses: all.iter().map(|id| (id.clone(), status(&s, id))).collect(),
                state: current_state(&s, &room),
            };
            assert!(gaps(&s, &room).is_empty(), "order {order}");
            assert_eq!(extremities(&s, &room), [end.clone()].into(), "order {order}");
            for (id, status) in &result.statuses {
                let expected = if id == refused { Status::Rejected } else { Status::Accepted };
                assert_eq!(*status, Some(expected), "order {order}, {version}: {id}");
            }
            // Resolution v2 at the final merge: the two power levels events (both alice's,
            // unordered on the auth graph, same sender level) are applied oldest first, so
            // branch B's (built later) is the one left. The topics and names are ordered by
            // their power levels' place on that mainline, then by time: branch A's name was
            // authorised by A's power levels (off the mainline, so at its fork point, the
            // first power levels) and branch B's name by B's (the mainline's newest): B's
            // name comes last and stays. Both topics sit at the first power levels; B's is
            // the newer and stays.
            let topic = result.state[&("m.room.topic".to_owned(), String::new())].clone();
            let name = result.state[&("m.room.name".to_owned(), String::new())].clone();
            let levels = result.state[&("m.room.power_levels".to_owned(), String::new())].clone();
            assert_eq!(dag.json(&topic)["content"]["topic"], "B", "order {order}, {version}");
            assert_eq!(dag.json(&name)["content"]["name"], "Room B", "order {order}, {version}");
            assert_eq!(dag.json(&levels)["content"]["users"]["@bob:remote2.test"], 60);
            for user in ["@dave:remote1.test", "@frank:remote3.test"] {
                let member = &result.state[&("m.room.member".to_owned(), user.to_owned())];
                assert_eq!(dag.json(member)["content"]["membership"], "leave", "{user}");
                assert_eq!(membership(&s, &room, user).as_deref(), Some("leave"));
            }
            assert_eq!(
                result.state[&("m.room.member".to_owned(), "@erin:remote2.test".to_owned())],
                id("m.room.member", "@erin:remote2.test")
            );
            assert_eq!(membership(&s, &room, "@erin:remote2.test").as_deref(), Some("join"));
            match &reference {
                None => reference = Some(result),
                Some(reference) => assert_eq!(&result, reference, "order {order}, {version}"),
            }
        }
    }
}
