//! Spaces across two servers: the federation `/hierarchy` answer (children the asking server
//! may see, those it may not, refusals) and the client `/hierarchy` walk asking the other
//! server about child rooms it does not hold, from both sides.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use super::harness::{FedServer, pair};
use crate::common::{TestServer, assert_error, enc};

/// Links `child` into `space` with `via`.
async fn link(s: &TestServer, token: &str, space: &str, child: &str, via: &str) {
    let path =
        format!("/_matrix/client/v3/rooms/{}/state/m.space.child/{}", enc(space), enc(child));
    let (status, body) = s.put(&path, Some(token), json!({ "via": [via] })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// The room ids and names of `token`'s whole hierarchy of `space`, sorted.
async fn walk(s: &TestServer, token: &str, space: &str) -> Vec<(String, String)> {
    let path = format!("/_matrix/client/v1/rooms/{}/hierarchy", enc(space));
    let (status, body) = s.get(&path, Some(token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.get("next_batch").is_none(), "{body}");
    let mut rooms: Vec<(String, String)> = body["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["room_id"].as_str().unwrap().to_owned(),
                r["name"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    rooms.sort();
    rooms
}

/// `from` asks `to` for the federation hierarchy of `room`.
async fn fed_hierarchy(to: &FedServer, from: &FedServer, room: &str) -> (StatusCode, Value) {
    let path = format!("/_matrix/federation/v1/hierarchy/{}", enc(room));
    to.signed(Method::GET, &path, from.name.as_str(), None, from.key(), &from.key_id(), None, None)
        .await
}

fn ids(list: &Value, field: Option<&str>) -> Vec<String> {
    let mut ids: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| match field {
            Some(field) => v[field].as_str().unwrap().to_owned(),
            None => v.as_str().unwrap().to_owned(),
        })
        .collect();
    ids.sort();
    ids
}

fn sorted(mut ids: Vec<&String>) -> Vec<String> {
    ids.sort();
    ids.into_iter().cloned().collect()
}

#[tokio::test]
async fn a_space_spanning_two_servers_is_walked_from_both() {
    let (_pki, a, b) = pair().await;
    let (_, alice, _) = a.server.register("alice", "correct horse").await;
    let (_, bob, _) = b.server.register("bob", "correct horse").await;
    let space = a
        .server
        .create_room(
            &alice,
            json!({ "preset": "public_chat", "name": "Company",
                    "creation_content": { "type": "m.space" } }),
        )
        .await;
    let public =
        a.server.create_room(&alice, json!({ "preset": "public_chat", "name": "News" })).await;
    let private =
        a.server.create_room(&alice, json!({ "preset": "private_chat", "name": "Board" })).await;
    let restricted = a
        .server
        .create_room(
            &alice,
            json!({
                "name": "Staff",
                "initial_state": [{
                    "type": "m.room.join_rules", "state_key": "",
                    "content": { "join_rule": "restricted",
                                 "allow": [{ "type": "m.room_membership", "room_id": space }] }
                }]
            }),
        )
        .await;
    let on_b =
        b.server.create_room(&bob, json!({ "preset": "public_chat", "name": "B team" })).await;
    for child in [&public, &private, &restricted] {
        link(&a.server, &alice, &space, child, a.name.as_str()).await;
    }
    link(&a.server, &alice, &space, &on_b, b.name.as_str()).await;

    // B has nobody in the space yet: the space is public, its private and restricted children
    // are not for B, and the room A does not hold is left out.
    let (status, answer) = fed_hierarchy(&a, &b, &space).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["room"]["room_id"], space.as_str());
    assert_eq!(answer["room"]["room_type"], "m.space", "{answer}");
    assert_eq!(answer["room"]["children_state"].as_array().unwrap().len(), 4, "{answer}");
    assert_eq!(ids(&answer["children"], Some("room_id")), vec![public.clone()], "{answer}");
    assert_eq!(answer["children"][0]["name"], "News");
    assert_eq!(
        ids(&answer["inaccessible_children"], None),
        sorted(vec![&private, &restricted]),
        "{answer}"
    );
    let (status, answer) = fed_hierarchy(&a, &b, &private).await;
    assert_error(&(status, answer), StatusCode::NOT_FOUND, "M_NOT_FOUND");
    let unknown = format!("!nowhere:{}", a.name);
    let (status, answer) = fed_hierarchy(&a, &b, &unknown).await;
    assert_error(&(status, answer), StatusCode::NOT_FOUND, "M_NOT_FOUND");

    // Bob joins the space: B now holds it, and the restricted room is for B too.
    let join = format!("/_matrix/client/v3/join/{}?via={}", enc(&space), a.name);
    let (status, body) = b.server.post(&join, Some(&bob), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, answer) = fed_hierarchy(&a, &b, &space).await;
    assert_eq!(
        ids(&answer["children"], Some("room_id")),
        sorted(vec![&public, &restricted]),
        "{answer}"
    );
    assert_eq!(ids(&answer["inaccessible_children"], None), vec![private.clone()]);

    // Bob sees the whole tree he may see: the space (held by B now), A's public room and the
    // room restricted to the space (described by A), and B's own room.
    let mut expected = vec![
        (space.clone(), "Company".into()),
        (public.clone(), "News".into()),
        (restricted.clone(), "Staff".into()),
        (on_b.clone(), "B team".into()),
    ];
    expected.sort();
    assert_eq!(walk(&b.server, &bob, &space).await, expected);

    // Alice sees everything, B's room described by B.
    let bobs = expected.clone();
    expected.push((private.clone(), "Board".into()));
    expected.sort();
    assert_eq!(walk(&a.server, &alice, &space).await, expected);

    // A's answers are reused for a while: with A refusing B, Bob's walk is the same.
    let b_name = b.name.to_string();
    let _a = a.restart(|_| {}, |config| config.federation.deny = vec![b_name]).await;
    assert_eq!(walk(&b.server, &bob, &space).await, bobs);
}
