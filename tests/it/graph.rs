//! The event graph fed by fake remote servers: forks and merges, state resolution, events
//! arriving out of order or never, rejection and soft-failure, any delivery order giving one
//! result, every room version, restarts, and what local members see of it all.

mod clients;
mod harness;
mod orders;
mod vouched;

use plaza::service::rooms::{Status, ingest::Outcome};
use ruma::{OwnedEventId, RoomVersionId};
use serde_json::json;

use self::harness::*;
use crate::common::TestServer;

/// Two branches off one event, merged by an event naming both.
#[tokio::test]
async fn concurrent_branches_merge_into_one_state() {
    let s = TestServer::start().await;
    let (r1, r2, keys) = two_servers();
    let (alice, bob) = (r1.user("alice"), r2.user("bob"));
    let mut dag = Dag::new(RoomVersionId::V11);
    let setup = dag.public_room(&r1, &alice, &[(&bob, 50)]);
    let bob_join = dag.member(&r2, &bob, &bob, "join", &[&setup[3]]);
    // Branch A: alice sets the topic and talks; branch B: bob names the room and talks.
    let topic =
        dag.state_event(&r1, &alice, "m.room.topic", "", json!({ "topic": "A" }), &[&bob_join]);
    let a_msg = dag.message(&r1, &alice, "on branch A", &[&topic]);
    let name = dag.state_event(&r2, &bob, "m.room.name", "", json!({ "name": "B" }), &[&bob_join]);
    let b_msg = dag.message(&r2, &bob, "on branch B", &[&name]);
    let merge = dag.message(&r1, &alice, "merged", &[&a_msg, &b_msg]);
    let room = dag.room_id();

    let mut first: Vec<&OwnedEventId> = setup.iter().collect();
    first.extend([&bob_join, &topic, &a_msg, &name, &b_msg]);
    ingest_accepted(&s, &dag, &keys, &first).await;
    assert_eq!(extremities(&s, &room), [a_msg.clone(), b_msg.clone()].into(), "two branches");
    // Even before the merge, the current state is both branches' state resolved.
    assert_eq!(state_at(&s, &room, "m.room.topic", ""), Some(topic.clone()));
    assert_eq!(state_at(&s, &room, "m.room.name", ""), Some(name.clone()));

    ingest_accepted(&s, &dag, &keys, &[&merge]).await;
    assert_eq!(extremities(&s, &room), [merge.clone()].into(), "the merge is the only tip");
    let state = current_state(&s, &room);
    let expected: StateIds = dag.state(&merge).clone();
    assert_eq!(state, expected, "the state holds both branches' events");
    assert_eq!(state[&("m.room.topic".to_owned(), String::new())], topic);
    assert_eq!(state[&("m.room.name".to_owned(), String::new())], name);
    assert_eq!(state[&("m.room.member".to_owned(), bob.clone())], bob_join);
    // The state before the merge (what `/state_ids` serves) is the same resolved state.
    let (before, chain) = services(&s).rooms.state_ids_before(&merge).unwrap().unwrap();
    let before: std::collections::BTreeSet<_> = before.into_iter().collect();
    assert_eq!(before, expected.values().cloned().collect());
    assert!(chain.contains(&setup[0]) && !chain.contains(&a_msg));

    // A local event follows the merge alone.
    let (_, dan, _) = s.register("dan", "correct horse").await;
    let dan_join = join(&s, &dan, &room).await;
    assert_eq!(prev_events_of(&s, &dan_join), [merge.to_string()].into());
    let synced = sync(&s, &dan, LONG_TIMELINE).await;
    let ids = timeline_ids(&synced, &room);
    assert_eq!(ids.len(), 11, "{ids:?}");
    assert_eq!(ids[9..], [merge.to_string(), dan_join]);
    for id in [&setup[0], &bob_join, &topic, &a_msg, &name, &b_msg] {
        assert!(ids[..9].contains(&id.to_string()), "{id}");
    }
}

/// The spec's state resolution (v2) where a ban on one branch meets a power-level change on
/// the other, in room versions 11 and 12.
#[tokio::test]
async fn power_changes_and_bans_on_two_branches_resolve_as_the_spec_says() {
    let s = TestServer::start().await;
    for version in [RoomVersionId::V11, RoomVersionId::V12] {
        demotion_beats_ban(&s, version.clone()).await;
        ban_by_unaffected_moderator_stands(&s, version.clone()).await;
        equal_moderators_ban_and_kick_resolve_by_time(&s, version).await;
    }
}

/// A room where alice (creator), bob and dave (moderators at 50) and carol are joined;
/// returns the servers, keys, graph and the last event (where branches fork).
fn moderated_room(version: RoomVersionId) -> (FakeServer, FakeServer, Keys, Dag, OwnedEventId) {
    let (r1, r2, keys) = two_servers();
    let (alice, bob, carol, dave) =
        (r1.user("alice"), r2.user("bob"), r2.user("carol"), r1.user("dave"));
    let mut dag = Dag::new(version);
    let setup = dag.public_room(&r1, &alice, &[(&bob, 50), (&dave, 50)]);
    let mut last = setup[3].clone();
    for (server, user) in [(&r2, &bob), (&r2, &carol), (&r1, &dave)] {
        last = dag.member(server, user, user, "join", &[&last]);
    }
    (r1, r2, keys, dag, last)
}

/// Ingests the whole graph built so far, in depth order; every event is accepted.
async fn ingest_setup(s: &TestServer, dag: &Dag, keys: &Keys) {
    let mut ids: Vec<&OwnedEventId> = dag.nodes.keys().collect();
    ids.sort_by_key(|id| dag.nodes[*id].depth);
    ingest_accepted(s, dag, keys, &ids).await;
}

async fn demotion_beats_ban(s: &TestServer, version: RoomVersionId) {
    let (r1, r2, keys, mut dag, fork) = moderated_room(version);
    let (alice, bob, carol, dave) =
        (r1.user("alice"), r2.user("bob"), r2.user("carol"), r1.user("dave"));
    ingest_setup(s, &dag, &keys).await;
    let room = dag.room_id();
    let carol_join = state_at(s, &room, "m.room.member", &carol).unwrap();
    // Branch 1: alice demotes bob to 0. Branch 2: bob bans carol.
    let levels = dag.power_levels(&[(&alice, 100), (&bob, 0), (&dave, 50)]);
    let demote = dag.state_event(&r1, &alice, "m.room.power_levels", "", levels, &[&fork]);
    let ban = dag.member(&r2, &bob, &carol, "ban", &[&fork]);

    // The ban arrives first: the current state then allows it, so it is accepted.
    assert_eq!(ingest(s, &dag, &keys, &[&ban]).await, [Outcome::Placed(Status::Accepted)]);
    assert_eq!(state_at(s, &room, "m.room.member", &carol), Some(ban.clone()));
    assert_eq!(membership(s, &room, &carol).as_deref(), Some("ban"));
    // Then the demotion (alice may demote bob whatever carol's membership): accepted too.
    assert_eq!(ingest(s, &dag, &keys, &[&demote]).await, [Outcome::Placed(Status::Accepted)]);
    let merge = dag.message(&r1, &alice, "merge", &[&demote, &ban]);
    ingest_accepted(s, &dag, &keys, &[&merge]).await;

    // Resolution v2: the conflicted entries are the power levels (old or demotion) and carol's
    // membership (join or ban). The power events (both power levels events and bob's ban of
    // another user) are ordered by the reverse topological power ordering: on the auth graph
    // the old power levels come first; the demotion and the ban are unordered there, so the
    // sender's power level decides, highest first: alice's demotion (100) before bob's ban
    // (50). Applied in turn with the auth rules against the partly resolved state, the
    // demotion passes, and then the ban is checked with bob at level 0 < ban level 50: it
    // fails and is left out. Carol's join is then the only candidate for her membership.
    // So carol is NOT banned, and bob is demoted.
    assert_eq!(extremities(s, &room), [merge.clone()].into());
    assert_eq!(state_at(s, &room, "m.room.power_levels", ""), Some(demote.clone()));
    assert_eq!(state_at(s, &room, "m.room.member", &carol), Some(carol_join.clone()));
    let membership = membership(s, &room, &carol);
    assert_eq!(membership.as_deref(), Some("join"), "the membership index follows the state");
    // The current state already resolved so before the merge; the merge's state agrees.
    let (before, _) = services(s).rooms.state_ids_before(&merge).unwrap().unwrap();
    assert!(before.contains(&carol_join) && before.contains(&demote) && !before.contains(&ban));
}

async fn ban_by_unaffected_moderator_stands(s: &TestServer, version: RoomVersionId) {
    let (r1, r2, keys, mut dag, fork) = moderated_room(version);
    let (alice, bob, carol, dave) =
        (r1.user("alice"), r2.user("bob"), r2.user("carol"), r1.user("dave"));
    ingest_setup(s, &dag, &keys).await;
    let room = dag.room_id();
    // Branch 1: alice demotes dave (not bob). Branch 2: bob bans carol.
    let levels = dag.power_levels(&[(&alice, 100), (&bob, 50), (&dave, 0)]);
    let demote = dag.state_event(&r1, &alice, "m.room.power_levels", "", levels, &[&fork]);
    let ban = dag.member(&r2, &bob, &carol, "ban", &[&fork]);
    let merge = dag.message(&r1, &alice, "merge", &[&demote, &ban]);
    // The demotion arrives first this time; bob's power is untouched, so the ban is accepted.
    let outcomes = ingest(s, &dag, &keys, &[&demote, &ban, &merge]).await;
    assert_eq!(outcomes, vec![Outcome::Placed(Status::Accepted); 3]);

    // Same ordering as above: alice's power levels (sender at 100) before bob's ban (50). The
    // new power levels pass; the ban is checked against them, where bob still has 50 >= ban
    // level 50 and carol is joined: it passes and stays. Carol IS banned, dave demoted.
    assert_eq!(state_at(s, &room, "m.room.power_levels", ""), Some(demote));
    assert_eq!(state_at(s, &room, "m.room.member", &carol), Some(ban));
    let membership = membership(s, &room, &carol);
    assert_eq!(membership.as_deref(), Some("ban"));
}

async fn equal_moderators_ban_and_kick_resolve_by_time(s: &TestServer, version: RoomVersionId) {
    for kick_first in [false, true] {
        let (r1, r2, keys, mut dag, fork) = moderated_room(version.clone());
        let (alice, bob, carol, dave) =
            (r1.user("alice"), r2.user("bob"), r2.user("carol"), r1.user("dave"));
        ingest_setup(s, &dag, &keys).await;
        let room = dag.room_id();
        // Two moderators at 50 act on carol on two branches: bob bans her, then (by
        // origin_server_ts: timestamps grow as the graph is built) dave kicks her.
        let ban = dag.member(&r2, &bob, &carol, "ban", &[&fork]);
        let kick = dag.member(&r1, &dave, &carol, "leave", &[&fork]);
        let merge = dag.message(&r1, &alice, "merge", &[&ban, &kick]);
        // Whichever arrives second is still allowed by the current state (a moderator at
        // the ban level may kick a banned user, and ban one who left).
        let arrivals = if kick_first { [&kick, &ban] } else { [&ban, &kick] };
        for id in arrivals {
            assert_eq!(ingest(s, &dag, &keys, &[id]).await, [Outcome::Placed(Status::Accepted)]);
        }
        ingest_accepted(s, &dag, &keys, &[&merge]).await;

        // Both are power events (a ban or kick of another user) of senders at level 50 with
        // no order between them on the auth graph: the earlier origin_server_ts goes first.
        // Bob's ban passes (carol joined, 0 < 50); dave's kick is then checked with carol
        // banned: a sender at the ban level may kick a banned user, so it passes too and,
        // applied last, stays. Carol has left and is not banned, whichever arrived first.
        assert_eq!(extremities(s, &room), [merge.clone()].into());
        assert_eq!(
            state_at(s, &room, "m.room.member", &carol),
            Some(kick),
            "kick first: {kick_first}"
        );
        assert_eq!(membership(s, &room, &carol).as_deref(), Some("leave"));
    }
}

/// Children before their parents: in one call, and across calls through a recorded gap.
#[tokio::test]
async fn children_arriving_first_wait_for_their_parents() {
    let s = TestServer::start().await;
    let (r1, r2, keys) = two_servers();
    let (alice, erin) = (r1.user("alice"), r2.user("erin"));
    let (mut dag, _setup, room, dan, dan_join) = local_member_room(&s, &keys, &r1, &alice).await;
    let token = sync(&s, &dan, "").await["next_batch"].as_str().unwrap().to_owned();

    // One call, child first.
    let parent = dag.message(&r1, &alice, "parent", &[&dan_join]);
    let child = dag.message(&r1, &alice, "child", &[&parent]);
    let outcomes = ingest(&s, &dag, &keys, &[&child, &parent]).await;
    assert_eq!(outcomes, vec![Outcome::Placed(Status::Accepted); 2]);
    let synced = sync(&s, &dan, &format!("since={token}")).await;
    assert_eq!(timeline_ids(&synced, &room), [parent.to_string(), child.to_string()]);
    let token = synced["next_batch"].as_str().unwrap().to_owned();

    // Across calls: the child alone waits as an outlier, its missing parent a gap.
    let parent = dag.message(&r1, &alice, "late parent", &[&child]);
    let child = dag.message(&r1, &alice, "early child", &[&parent]);
    assert_eq!(ingest(&s, &dag, &keys, &[&child]).await, [Outcome::Placed(Status::Outlier)]);
    assert_eq!(gaps(&s, &room), std::slice::from_ref(&parent));
    assert!(!extremities(&s, &room).contains(&child));
    let quiet = sync(&s, &dan, &format!("since={token}&timeout=0")).await;
    assert!(timeline_ids(&quiet, &room).is_empty(), "{quiet}");
    assert_eq!(ingest(&s, &dag, &keys, &[&parent]).await, [Outcome::Placed(Status::Accepted)]);
    assert_eq!(status(&s, &child), Some(Status::Accepted));
    assert!(gaps(&s, &room).is_empty());
    assert_eq!(extremities(&s, &room), [child.clone()].into());
    let synced = sync(&s, &dan, &format!("since={token}")).await;
    assert_eq!(timeline_ids(&synced, &room), [parent.to_string(), child.to_string()]);
    let token = synced["next_batch"].as_str().unwrap().to_owned();

    // Across calls, where the missing parent is also an auth event of the child (erin's
    // join authorises her message): the child cannot be judged yet, so it waits too.
    let erin_join = dag.member(&r2, &erin, &erin, "join", &[&child]);
    let erin_says = dag.message(&r2, &erin, "hello", &[&erin_join]);
    assert_eq!(ingest(&s, &dag, &keys, &[&erin_says]).await, [Outcome::Placed(Status::Outlier)]);
    assert_eq!(gaps(&s, &room), std::slice::from_ref(&erin_join));
    assert_eq!(ingest(&s, &dag, &keys, &[&erin_join]).await, [Outcome::Placed(Status::Accepted)]);
    assert_eq!(status(&s, &erin_says), Some(Status::Accepted));
    assert!(gaps(&s, &room).is_empty());
    let synced = sync(&s, &dan, &format!("since={token}")).await;
    assert_eq!(timeline_ids(&synced, &room), [erin_join.to_string(), erin_says.to_string()]);
}

/// An event whose prev event never comes stays an outlier behind its gap, unseen.
#[tokio::test]
async fn a_missing_ancestor_stays_a_gap_and_hides_its_child() {
    let s = TestServer::start().await;
    let r1 = FakeServer::new("remote1.test");
    let keys = Keys::of(&[&r1]);
    let alice = r1.user("alice");
    let (mut dag, _setup, room, dan, dan_join) = local_member_room(&s, &keys, &r1, &alice).await;
    let token = sync(&s, &dan, "").await["next_batch"].as_str().unwrap().to_owned();

    let never = dag.message(&r1, &alice, "never delivered", &[&dan_join]);
    let orphan = dag.message(&r1, &alice, "orphan", &[&never]);
    let topic =
        dag.state_event(&r1, &alice, "m.room.topic", "", json!({ "topic": "t" }), &[&never]);
    let outcomes = ingest(&s, &dag, &keys, &[&orphan, &topic]).await;
    assert_eq!(outcomes, vec![Outcome::Placed(Status::Outlier); 2]);
    // Delivered again: known, still an outlier.
    assert_eq!(ingest(&s, &dag, &keys, &[&orphan]).await, [Outcome::Known(Status::Outlier)]);
    assert_eq!(gaps(&s, &room), std::slice::from_ref(&never));
    assert_eq!(state_at(&s, &room, "m.room.topic", ""), None, "an outlier is in no state");
    assert!(services(&s).rooms.state_ids_before(&orphan).unwrap().is_none());

    // Later events on the known part of the graph go on without them.
    let next = dag.message(&r1, &alice, "next", &[&dan_join]);
    ingest_accepted(&s, &dag, &keys, &[&next]).await;
    assert_eq!(extremities(&s, &room), [next.clone()].into());
    assert_eq!(status(&s, &orphan), Some(Status::Outlier));
    assert_eq!(gaps(&s, &room), std::slice::from_ref(&never));

    let synced = sync(&s, &dan, &format!("since={token}")).await;
    assert_eq!(timeline_ids(&synced, &room), [next.to_string()]);
    let initial = sync(&s, &dan, "").await;
    assert!(!timeline_ids(&initial, &room).contains(&orphan.to_string()));
    let history = messages_back(&s, &dan, &room, synced["next_batch"].as_str().unwrap()).await;
    assert!(history.contains(&next.to_string()) && history.contains(&dan_join.to_string()));
    assert!(!history.contains(&orphan.to_string()) && !history.contains(&topic.to_string()));
    assert_hidden(&s, &dan, &room, &[], &[&orphan, &topic, &never]).await;
}

/// Events failing auth are rejected without stopping the rest of their batch, and leave no
/// trace in state, in the graph local events build on, or in what clients see.
#[tokio::test]
async fn rejected_events_stay_out_of_state_graph_and_views() {
    let s = TestServer::start().await;
    let (r1, r2, keys) = two_servers();
    let (alice, carol, eve) = (r1.user("alice"), r2.user("carol"), r2.user("eve"));
    let (mut dag, _setup, _carol_join, room, dan, dan_join) =
        carol_and_dan_room(&s, &keys, (&r1, &alice), (&r2, &carol)).await;
    let token = sync(&s, &dan, "").await["next_batch"].as_str().unwrap().to_owned();

    // One batch: eve (never joined) talks; alice talks; carol (level 0) names the room, which
    // needs 50; alice sets the topic; alice talks after carol's refused name.
    let eve_says = dag.message(&r2, &eve, "let me in", &[&dan_join]);
    let hello = dag.message(&r1, &alice, "hello", &[&dan_join]);
    let carol_names =
        dag.state_event(&r2, &carol, "m.room.name", "", json!({ "name": "mine" }), &[&dan_join]);
    let topic =
        dag.state_event(&r1, &alice, "m.room.topic", "", json!({ "topic": "ok" }), &[&hello]);
    let after_refused = dag.message(&r1, &alice, "after", &[&carol_names]);
    let outcomes =
        ingest(&s, &dag, &keys, &[&eve_says, &hello, &carol_names, &topic, &after_refused]).await;
    let (accepted, rejected) =
        (Outcome::Placed(Status::Accepted), Outcome::Placed(Status::Rejected));
    assert_eq!(
        outcomes,
        [rejected.clone(), accepted.clone(), rejected.clone(), accepted.clone(), accepted.clone()]
    );
    assert_eq!(status(&s, &eve_says), Some(Status::Rejected));
    assert_eq!(state_at(&s, &room, "m.room.name", ""), None, "a rejected event is in no state");
    assert_eq!(state_at(&s, &room, "m.room.topic", ""), Some(topic.clone()));
    let (before, _) = services(&s).rooms.state_ids_before(&after_refused).unwrap().unwrap();
    assert!(!before.contains(&carol_names), "its child sees the state before it");
    assert_eq!(extremities(&s, &room), [topic.clone(), after_refused.clone()].into());

    // Across calls: a child of a rejected event comes first and waits; the rejected parent
    // then arrives and the child is placed on the state before it.
    let eve_again = dag.message(&r2, &eve, "again", &[&topic]);
    let answer = dag.message(&r1, &alice, "no", &[&eve_again, &after_refused, &topic]);
    assert_eq!(ingest(&s, &dag, &keys, &[&answer]).await, [Outcome::Placed(Status::Outlier)]);
    assert_eq!(ingest(&s, &dag, &keys, &[&eve_again]).await, std::slice::from_ref(&rejected));
    assert_eq!(status(&s, &answer), Some(Status::Accepted), "a rejected parent does not block");
    assert!(gaps(&s, &room).is_empty());
    assert_eq!(extremities(&s, &room), [answer.clone()].into());

    // A local event builds on accepted events only.
    let dan_says = send(&s, &dan, &room, "t1", "from dan").await;
    assert_eq!(prev_events_of(&s, &dan_says), [answer.to_string()].into());
    let synced = sync(&s, &dan, &format!("since={token}")).await;
    let ids = timeline_ids(&synced, &room);
    // The first three are placed in one batch, parents first, same-depth ones by id.
    assert_eq!(ids.len(), 5, "{ids:?}");
    let first: std::collections::BTreeSet<_> = ids[..3].iter().cloned().collect();
    assert_eq!(first, [&hello, &topic, &after_refused].map(|id| id.to_string()).into());
    assert_eq!(ids[3..], [answer.to_string(), dan_says]);
    assert!(
        ids.iter().position(|id| id.as_str() == hello.as_str())
            < ids.iter().position(|id| id.as_str() == topic.as_str())
    );
    let history = messages_back(&s, &dan, &room, synced["next_batch"].as_str().unwrap()).await;
    assert_hidden(&s, &dan, &room, &history, &[&eve_says, &carol_names, &eve_again]).await;
}

/// An event allowed by the state before it but not by the room's current state.
#[tokio::test]
async fn soft_failed_events_are_kept_but_never_shown_or_built_on() {
    let s = TestServer::start().await;
    let (r1, r2, keys) = two_servers();
    let (alice, carol) = (r1.user("alice"), r2.user("carol"));
    let (mut dag, _setup, _carol_join, room, dan, dan_join) =
        carol_and_dan_room(&s, &keys, (&r1, &alice), (&r2, &carol)).await;
    let token = sync(&s, &dan, "").await["next_batch"].as_str().unwrap().to_owned();

    let ban = dag.member(&r1, &alice, &carol, "ban", &[&dan_join]);
    // Carol, not having seen the ban, talks and changes her display name.
    let carol_says = dag.message(&r2, &carol, "still here", &[&dan_join]);
    let rename = dag.state_event(
        &r2,
        &carol,
        "m.room.member",
        &carol,
        json!({ "membership": "join", "displayname": "Carol" }),
        &[&dan_join],
    );
    ingest_accepted(&s, &dag, &keys, &[&ban]).await;
    let outcomes = ingest(&s, &dag, &keys, &[&carol_says, &rename]).await;
    assert_eq!(outcomes, vec![Outcome::Placed(Status::SoftFailed); 2]);
    assert_eq!(ingest(&s, &dag, &keys, &[&carol_says]).await, [Outcome::Known(Status::SoftFailed)]);
    assert_eq!(extremities(&s, &room), [ban.clone()].into());
    assert_eq!(state_at(&s, &room, "m.room.member", &carol), Some(ban.clone()));
    let membership = membership(&s, &room, &carol);
    assert_eq!(membership.as_deref(), Some("ban"));

    let synced = sync(&s, &dan, &format!("since={token}")).await;
    assert_eq!(timeline_ids(&synced, &room), [ban.to_string()]);
    let dan_says = send(&s, &dan, &room, "t1", "after the ban").await;
    assert_eq!(prev_events_of(&s, &dan_says), [ban.to_string()].into());
    let history =
        messages_back(&s, &dan, &room, &format!("s{}", services(&s).stream.current())).await;
    assert_hidden(&s, &dan, &room, &history, &[&carol_says, &rename]).await;
    assert_eq!(state_at(&s, &room, "m.room.member", &carol), Some(ban));
}

/// A create event its own rules refuse makes no room: it is kept as rejected, the room id
/// stays unknown, and nothing can be appended to it.
#[tokio::test]
async fn a_refused_create_event_makes_no_room() {
    let s = TestServer::start().await;
    let (r1, _, keys) = two_servers();
    let alice = r1.user("alice");
    let mut dag = Dag::new(RoomVersionId::V10);
    // Before room version 11 a create event must name its creator.
    let content = json!({ "room_version": "10" });
    let ev =
        Ev { sender: &alice, kind: "m.room.create", state_key: Some(""), content, prev: vec![] };
    let create = dag.add(&r1, ev);
    assert_eq!(ingest(&s, &dag, &keys, &[&create]).await, [Outcome::Placed(Status::Rejected)]);
    let room = dag.room_id();
    assert!(services(&s).rooms.room(&room).unwrap().is_none());
    let ev = Ev {
        sender: &alice,
        kind: "m.room.message",
        state_key: None,
        content: json!({ "body": "hello" }),
        prev: vec![create.clone()],
    };
    let message = dag.add(&r1, ev);
    let outcome = ingest(&s, &dag, &keys, &[&message]).await;
    assert!(matches!(&outcome[..], [Outcome::Dropped(_)]), "{outcome:?}");
}

/// Room version 12's conflicted state subgraph holds the events on auth paths between
/// conflicted events (both ends included), and nothing off those paths.
#[tokio::test]
async fn the_conflicted_subgraph_follows_auth_paths_between_conflicted_events() {
    let s = TestServer::start().await;
    let (r1, _, keys) = two_servers();
    let alice = r1.user("alice");
    let mut dag = Dag::new(RoomVersionId::V12);
    let setup = dag.public_room(&r1, &alice, &[]);
    let (join, first_levels, join_rules) = (&setup[1], &setup[2], &setup[3]);
    let levels = dag.power_levels(&[(&alice, 100)]);
    let second_levels =
        dag.state_event(&r1, &alice, "m.room.power_levels", "", levels.clone(), &[join_rules]);
    let third_levels =
        dag.state_event(&r1, &alice, "m.room.power_levels", "", levels, &[&second_levels]);
    let mut all: Vec<&OwnedEventId> = setup.iter().collect();
    all.extend([&second_levels, &third_levels]);
    ingest_accepted(&s, &dag, &keys, &all).await;
    let conflicted = std::collections::HashMap::from([(
        (ruma::events::StateEventType::RoomPowerLevels, String::new()),
        vec![first_levels.clone(), third_levels.clone()],
    )]);
    let subgraph = services(&s).rooms.conflicted_subgraph(&conflicted).unwrap();
    let mut found: Vec<&OwnedEventId> = subgraph.iter().collect();
    found.sort();
    let mut expected = vec![first_levels, &second_levels, &third_levels];
    expected.sort();
    assert_eq!(found, expected, "not the creator's join {join} nor the join rules");
}

/// The auth-chain index answers `/event_auth`-style chains and the auth difference of two
/// states, and an auth event fetched on its own waits as an outlier until placed.
#[tokio::test]
async fn auth_chains_differences_and_fetched_auth_events() {
    let s = TestServer::start().await;
    let (r1, _, keys) = two_servers();
    let alice = r1.user("alice");
    let mut dag = Dag::new(RoomVersionId::V11);
    let setup = dag.public_room(&r1, &alice, &[]);
    let (create, join, levels, join_rules) = (&setup[0], &setup[1], &setup[2], &setup[3]);
    ingest_accepted(&s, &dag, &keys, &setup.iter().collect::<Vec<_>>()).await;
    let room = dag.room_id();
    let topic = |text: &str| json!({ "topic": text });
    let first = dag.state_event(&r1, &alice, "m.room.topic", "", topic("a"), &[join_rules]);
    let content = dag.power_levels(&[(&alice, 100)]);
    let second_levels =
        dag.state_event(&r1, &alice, "m.room.power_levels", "", content, &[join_rules]);
    let second = dag.state_event(&r1, &alice, "m.room.topic", "", topic("b"), &[&second_levels]);

    // Fetched on its own, the new power levels wait, unseen, until placed in the graph.
    let rooms = &services(&s).rooms;
    let fetched = rooms.ingest_outliers(&room, vec![dag.pdu(&second_levels)], &keys).await;
    assert_eq!(fetched.unwrap(), [(Some(second_levels.clone()), Outcome::Placed(Status::Outlier))]);
    assert_eq!(status(&s, &second_levels), Some(Status::Outlier));
    assert!(!current_state(&s, &room).values().any(|id| id == &second_levels));
    ingest_accepted(&s, &dag, &keys, &[&first, &second_levels, &second]).await;
    assert_eq!(status(&s, &second_levels), Some(Status::Accepted));

    let mut chain = rooms.auth_chain(std::slice::from_ref(&second)).unwrap();
    chain.sort();
    let mut expected = vec![create.clone(), join.clone(), levels.clone(), second_levels.clone()];
    expected.sort();
    assert_eq!(chain, expected);
    let base = [create.clone(), join.clone(), levels.clone(), join_rules.clone()];
    let with = |event: &OwnedEventId| base.iter().cloned().chain([event.clone()]).collect();
    let difference = rooms.auth_chain_difference(&[with(&first), with(&second)]).unwrap();
    assert_eq!(difference, std::slice::from_ref(&second_levels));
}
