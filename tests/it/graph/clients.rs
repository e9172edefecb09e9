//! What local members see of a graph other servers build: every room version, restarts in the
//! middle of a fork, late events and merges in `/sync` and `/messages`, and the checks on
//! receipt (content hash, signatures, size).

use std::collections::BTreeSet;

use plaza::service::rooms::{Status, ingest::Outcome};
use ruma::{CanonicalJsonValue, OwnedEventId, RoomVersionId};
use serde_json::json;

use super::harness::*;
use crate::common::TestServer;

/// A remote creator's public room in each room version from 2 to 12, joined by a local user
/// over HTTP; remote and local messages interleave in order.
#[tokio::test]
async fn every_room_version_from_2_to_12_takes_remote_and_local_events() {
    let s = TestServer::start().await;
    let r1 = FakeServer::new("remote1.test");
    let keys = Keys::of(&[&r1]);
    let alice = r1.user("alice");
    let (_, dan, _) = s.register("dan", "correct horse").await;

    // Room version 1 resolves state with an algorithm Plaza does not have: dropped.
    let mut v1 = Dag::new(RoomVersionId::V1);
    let setup = v1.public_room(&r1, &alice, &[]);
    let outcomes = ingest(&s, &v1, &keys, &[&setup[0]]).await;
    assert!(matches!(&outcomes[0], Outcome::Dropped(reason) if reason.contains("not supported")));
    assert!(services(&s).rooms.room(&v1.room_id()).unwrap().is_none());

    for n in 2..=12 {
        let version = RoomVersionId::try_from(n.to_string()).unwrap();
        let mut dag = Dag::new(version.clone());
        let setup = dag.public_room(&r1, &alice, &[]);
        ingest_accepted(&s, &dag, &keys, &setup.iter().collect::<Vec<_>>()).await;
        let room = dag.room_id();
        assert_eq!(services(&s).rooms.room(&room).unwrap().unwrap().version, version);
        let dan_join = join(&s, &dan, &room).await;
        let dan_join = dag.learn(&services(&s), &dan_join);
        let remote_1 = dag.message(&r1, &alice, "remote 1", &[&dan_join]);
        ingest_accepted(&s, &dag, &keys, &[&remote_1]).await;
        let local = send(&s, &dan, &room, &format!("v{n}"), "local").await;
        assert_eq!(prev_events_of(&s, &local), [remote_1.to_string()].into(), "v{n}");
        let local = dag.learn(&services(&s), &local);
        let remote_2 = dag.message(&r1, &alice, "remote 2", &[&local]);
        ingest_accepted(&s, &dag, &keys, &[&remote_2]).await;
        assert_eq!(extremities(&s, &room), [remote_2.clone()].into(), "v{n}");

        let synced = sync(&s, &dan, LONG_TIMELINE).await;
        let expected: Vec<String> = setup
            .iter()
            .chain([&dan_join, &remote_1, &local, &remote_2])
            .map(|id| id.to_string())
            .collect();
        assert_eq!(timeline_ids(&synced, &room), expected, "v{n}");
        let events = &synced["rooms"]["join"][room.as_str()]["timeline"]["events"];
        assert_eq!(events[7]["content"]["body"], "remote 2", "v{n}");
        assert_eq!(events[6]["sender"], "@dan:localhost", "v{n}");
    }
}

/// The server restarts with one branch of a fork in and the other still to come.
#[tokio::test]
async fn a_restart_in_the_middle_of_a_fork_loses_nothing() {
    let s = TestServer::start().await;
    let (r1, r2, keys) = two_servers();
    let (alice, bob) = (r1.user("alice"), r2.user("bob"));
    let mut dag = Dag::new(RoomVersionId::V12);
    let setup = dag.public_room(&r1, &alice, &[(&bob, 50)]);
    ingest_accepted(&s, &dag, &keys, &setup.iter().collect::<Vec<_>>()).await;
    let room = dag.room_id();
    let (_, dan, _) = s.register("dan", "correct horse").await;
    let dan_join = join(&s, &dan, &room).await;
    let fork = dag.learn(&services(&s), &dan_join);

    let topic = dag.state_event(&r1, &alice, "m.room.topic", "", json!({ "topic": "A" }), &[&fork]);
    let a_msg = dag.message(&r1, &alice, "on A", &[&topic]);
    let bob_join = dag.member(&r2, &bob, &bob, "join", &[&fork]);
    let name = dag.state_event(&r2, &bob, "m.room.name", "", json!({ "name": "B" }), &[&bob_join]);
    let b_msg = dag.message(&r2, &bob, "on B", &[&name]);
    let merge = dag.message(&r1, &alice, "merged", &[&a_msg, &b_msg]);

    ingest_accepted(&s, &dag, &keys, &[&topic, &a_msg]).await;
    let synced = sync(&s, &dan, "").await;
    assert_eq!(timeline_ids(&synced, &room)[5..], [topic.to_string(), a_msg.to_string()]);
    let token = synced["next_batch"].as_str().unwrap().to_owned();

    let s = restart(s).await;
    assert_eq!(extremities(&s, &room), [a_msg.clone()].into());
    assert_eq!(state_at(&s, &room, "m.room.topic", ""), Some(topic.clone()));
    ingest_accepted(&s, &dag, &keys, &[&b_msg, &name, &bob_join]).await;
    assert_eq!(extremities(&s, &room), [a_msg.clone(), b_msg.clone()].into());
    ingest_accepted(&s, &dag, &keys, &[&merge]).await;

    let check = |s: &TestServer| {
        assert_eq!(extremities(s, &room), [merge.clone()].into());
        let state = current_state(s, &room);
        assert_eq!(state[&("m.room.topic".to_owned(), String::new())], topic);
        assert_eq!(state[&("m.room.name".to_owned(), String::new())], name);
        assert_eq!(state[&("m.room.member".to_owned(), bob.clone())], bob_join);
        assert_eq!(state.len(), 8, "{state:?}");
        for id in setup.iter().chain([&topic, &a_msg, &bob_join, &name, &b_msg, &merge]) {
            assert_eq!(status(s, id), Some(Status::Accepted), "{id}");
        }
    };
    check(&s);
    let synced = sync(&s, &dan, &format!("since={token}")).await;
    let expected = [&bob_join, &name, &b_msg, &merge].map(|id| id.to_string());
    assert_eq!(timeline_ids(&synced, &room), expected);

    // Once more across a restart: the state, the graph and the history are as they were.
    let s = restart(s).await;
    check(&s);
    let dan_says = send(&s, &dan, &room, "t1", "after restarts").await;
    assert_eq!(prev_events_of(&s, &dan_says), [merge.to_string()].into());
    let newest = sync(&s, &dan, LONG_TIMELINE).await;
    let history = messages_back(&s, &dan, &room, newest["next_batch"].as_str().unwrap()).await;
    let mut all: Vec<String> = setup.iter().map(|id| id.to_string()).collect();
    all.extend([fork.to_string(), topic.to_string(), a_msg.to_string()]);
    all.extend(expected);
    all.push(dan_says);
    all.reverse();
    assert_eq!(history, all, "every event once, newest first");
}

/// Late events and a merge as a local member's clients see them.
#[tokio::test]
async fn late_events_and_merges_reach_clients_once_and_in_order() {
    let s = TestServer::start().await;
    let (r1, r2, keys) = two_servers();
    let (alice, bob) = (r1.user("alice"), r2.user("bob"));
    let (mut dag, setup, room, dan, fork) = local_member_room(&s, &keys, &r1, &alice).await;

    let m1 = dag.message(&r1, &alice, "m1", &[&fork]);
    let m2 = dag.message(&r1, &alice, "m2", &[&m1]);
    ingest_accepted(&s, &dag, &keys, &[&m1, &m2]).await;
    let first = sync(&s, &dan, "").await;
    let ids = timeline_ids(&first, &room);
    assert_eq!(ids[ids.len() - 2..], [m1.to_string(), m2.to_string()]);
    assert_eq!(
        first["rooms"]["join"][room.as_str()]["unread_notifications"]["notification_count"],
        2
    );
    let token = first["next_batch"].as_str().unwrap().to_owned();

    let m3 = dag.message(&r1, &alice, "m3", &[&m2]);
    ingest_accepted(&s, &dag, &keys, &[&m3]).await;
    let second = sync(&s, &dan, &format!("since={token}")).await;
    assert_eq!(timeline_ids(&second, &room), [m3.to_string()]);
    let token = second["next_batch"].as_str().unwrap().to_owned();

    // A branch bob started from dan's join arrives late, newest first, then a merge.
    let bob_join = dag.member(&r2, &bob, &bob, "join", &[&fork]);
    let b1 = dag.message(&r2, &bob, "b1", &[&bob_join]);
    let b2 = dag.message(&r2, &bob, "b2", &[&b1]);
    let merge = dag.message(&r1, &alice, "m4", &[&m3, &b2]);
    ingest_accepted(&s, &dag, &keys, &[&b2, &b1, &bob_join]).await;
    ingest_accepted(&s, &dag, &keys, &[&merge]).await;

    let third = sync(&s, &dan, &format!("since={token}")).await;
    let joined = &third["rooms"]["join"][room.as_str()];
    let late = [&bob_join, &b1, &b2, &merge].map(|id| id.to_string());
    assert_eq!(timeline_ids(&third, &room), late, "after what was seen, in arrival order");
    assert_eq!(joined["timeline"]["limited"], false);
    // m1, m2, m3, b1, b2, m4: each message counted once (the join does not notify).
    assert_eq!(joined["unread_notifications"]["notification_count"], 6, "{joined}");
    let quiet =
        sync(&s, &dan, &format!("since={}&timeout=0", third["next_batch"].as_str().unwrap())).await;
    assert!(timeline_ids(&quiet, &room).is_empty(), "nothing comes twice");

    // Paging back from the sync's prev_batch gives what came before it, without overlap;
    // paging back from its end gives every event once.
    let prev_batch = joined["timeline"]["prev_batch"].as_str().unwrap();
    let before = messages_back(&s, &dan, &room, prev_batch).await;
    let mut older: Vec<String> = setup.iter().map(|id| id.to_string()).collect();
    older.extend([&fork, &m1, &m2, &m3].map(|id| id.to_string()));
    older.reverse();
    assert_eq!(before, older);
    let everything = messages_back(&s, &dan, &room, third["next_batch"].as_str().unwrap()).await;
    let unique: BTreeSet<&String> = everything.iter().collect();
    assert_eq!(unique.len(), everything.len(), "no duplicates");
    let mut all: Vec<String> = late.iter().rev().cloned().collect();
    all.extend(older);
    assert_eq!(everything, all);
    let counted = sync(&s, &dan, "").await;
    let counts = &counted["rooms"]["join"][room.as_str()]["unread_notifications"];
    assert_eq!(counts["notification_count"], 6, "an initial sync counts the same");
}

/// The checks on receipt: a content hash that does not match keeps the event redacted; a bad
/// signature, a server without known keys or an event over 65,536 bytes drops it.
#[tokio::test]
async fn received_events_are_checked_for_hash_signature_and_size() {
    let s = TestServer::start().await;
    let (r1, r3) = (FakeServer::new("remote1.test"), FakeServer::new("remote3.test"));
    let keys = Keys::of(&[&r1]);
    let alice = r1.user("alice");
    let (mut dag, _setup, room, dan, tip) = local_member_room(&s, &keys, &r1, &alice).await;

    // Content altered after signing: the signature covers the redacted form (and the id is
    // its reference hash), so both still hold; the content hash does not.
    let altered = dag.message(&r1, &alice, "as signed", &[&tip]);
    let mut pdu = dag.pdu(&altered);
    let Some(CanonicalJsonValue::Object(content)) = pdu.get_mut("content") else { panic!() };
    content.insert("body".into(), CanonicalJsonValue::String("altered".into()));
    let outcomes = ingest_pdus(&s, &dag, &keys, vec![pdu], &[&altered]).await;
    assert_eq!(outcomes, [Outcome::Placed(Status::Accepted)]);
    let stored = services(&s).rooms.stored(&altered).unwrap().unwrap();
    assert_eq!(stored.wire.get("content"), Some(&CanonicalJsonValue::Object(Default::default())));
    let synced = sync(&s, &dan, LONG_TIMELINE).await;
    let events = &synced["rooms"]["join"][room.as_str()]["timeline"]["events"];
    let last = events.as_array().unwrap().last().unwrap();
    assert_eq!((last["event_id"].as_str(), &last["content"]), (Some(altered.as_str()), &json!({})));

    // Signed with a key that is not remote1's.
    let impostor = FakeServer::new("remote1.test");
    let forged = dag.message(&impostor, &alice, "forged", &[&altered]);
    // A server whose keys are unknown.
    let stranger = dag.member(&r3, &r3.user("zed"), &r3.user("zed"), "join", &[&altered]);
    // A signature of the right key over other bytes.
    let honest = dag.message(&r1, &alice, "honest", &[&altered]);
    let mut tampered = dag.pdu(&honest);
    let signature = dag.pdu(&forged)["signatures"].clone();
    tampered.insert("signatures".into(), signature);
    let outcomes = ingest_pdus(
        &s,
        &dag,
        &keys,
        vec![dag.pdu(&forged), dag.pdu(&stranger), tampered],
        &[&forged, &stranger, &honest],
    )
    .await;
    for outcome in &outcomes {
        assert!(
            matches!(outcome, Outcome::Dropped(reason) if reason.contains("signature")),
            "{outcome:?}"
        );
    }
    for id in [&forged, &stranger, &honest] {
        assert_eq!(status(&s, id), None, "{id} is not stored");
    }

    // Size, measured on the signed event as encoded: 65,536 bytes pass, 65,537 do not.
    let sized = |dag: &mut Dag, size: usize| -> OwnedEventId {
        let probe = dag.message(&r1, &alice, &"x".repeat(60_000), &[&altered]);
        let probe_len = serde_json::to_string(&dag.pdu(&probe)).unwrap().len();
        dag.nodes.remove(&probe);
        let id = dag.message(&r1, &alice, &"x".repeat(60_000 + size - probe_len), &[&altered]);
        assert_eq!(serde_json::to_string(&dag.pdu(&id)).unwrap().len(), size);
        id
    };
    let largest = sized(&mut dag, 65_536);
    let too_large = sized(&mut dag, 65_537);
    let outcomes = ingest(&s, &dag, &keys, &[&too_large, &largest]).await;
    assert!(
        matches!(&outcomes[0], Outcome::Dropped(reason) if reason.contains("65536")),
        "{outcomes:?}"
    );
    assert_eq!(outcomes[1], Outcome::Placed(Status::Accepted));
    assert_eq!(status(&s, &too_large), None);
    assert_eq!(extremities(&s, &room), [largest].into());
}
