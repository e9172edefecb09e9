//! Room aliases and the public room directory over HTTP.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::common::{TestServer, assert_error, enc};

#[tokio::test]
async fn aliases_resolve_join_and_delete_with_permissions() {
    let s = TestServer::start().await;
    let (_, alice, _) = s.register("alice", "correct horse").await;
    let (_, bob, _) = s.register("bob", "correct horse").await;
    let room =
        s.create_room(&alice, json!({ "preset": "public_chat", "room_alias_name": "eng" })).await;
    let alias_path = |alias: &str| format!("/_matrix/client/v3/directory/room/{}", enc(alias));

    let (status, resolved) = s.get(&alias_path("#eng:localhost"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(resolved, json!({ "room_id": room, "servers": ["localhost"] }));
    let canonical = s
        .get(
            &format!("/_matrix/client/v3/rooms/{room}/state/m.room.canonical_alias/"),
            Some(&alice),
        )
        .await;
    assert_eq!(canonical.1["alias"], "#eng:localhost");
    let taken = s
        .post("/_matrix/client/v3/createRoom", Some(&alice), json!({ "room_alias_name": "eng" }))
        .await;
    assert_error(&taken, StatusCode::BAD_REQUEST, "M_ROOM_IN_USE");

    // Join by alias; a second alias; conflicts and foreign servers refused.
    let (status, joined) = s
        .post(&format!("/_matrix/client/v3/join/{}", enc("#eng:localhost")), Some(&bob), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{joined}");
    assert_eq!(joined["room_id"], room.as_str());
    assert_eq!(
        s.put(&alias_path("#eng-team:localhost"), Some(&bob), json!({ "room_id": room })).await.0,
        StatusCode::OK
    );
    assert_error(
        &s.put(&alias_path("#eng-team:localhost"), Some(&alice), json!({ "room_id": room })).await,
        StatusCode::CONFLICT,
        "M_UNKNOWN",
    );
    assert_error(
        &s.put(&alias_path("#x:elsewhere.org"), Some(&alice), json!({ "room_id": room })).await,
        StatusCode::BAD_REQUEST,
        "M_INVALID_PARAM",
    );
    let (_, listed) = s.get(&format!("/_matrix/client/v3/rooms/{room}/aliases"), Some(&bob)).await;
    let mut aliases: Vec<&str> =
        listed["aliases"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    aliases.sort();
    assert_eq!(aliases, ["#eng-team:localhost", "#eng:localhost"]);

    // The canonical alias must point here.
    let canonical_path = format!("/_matrix/client/v3/rooms/{room}/state/m.room.canonical_alias/");
    let bad = s.put(&canonical_path, Some(&alice), json!({ "alias": "#missing:localhost" })).await;
    assert_error(&bad, StatusCode::BAD_REQUEST, "M_BAD_ALIAS");
    let good = s
        .put(
            &canonical_path,
            Some(&alice),
            json!({ "alias": "#eng:localhost", "alt_aliases": ["#eng-team:localhost"] }),
        )
        .await;
    assert_eq!(good.0, StatusCode::OK, "{}", good.1);

    // Bob (power 0) may delete the alias he made, not alice's; alice may delete any.
    let (_, carol, _) = s.register("carol", "correct horse").await;
    assert_error(
        &s.call(Method::DELETE, &alias_path("#eng:localhost"), Some(&carol), None).await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );
    assert_error(
        &s.call(Method::DELETE, &alias_path("#eng:localhost"), Some(&bob), None).await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );
    assert_eq!(
        s.call(Method::DELETE, &alias_path("#eng-team:localhost"), Some(&bob), None).await.0,
        StatusCode::OK
    );
    assert_eq!(
        s.call(Method::DELETE, &alias_path("#eng:localhost"), Some(&alice), None).await.0,
        StatusCode::OK
    );
    assert_error(
        &s.get(&alias_path("#eng:localhost"), None).await,
        StatusCode::NOT_FOUND,
        "M_NOT_FOUND",
    );
}

#[tokio::test]
async fn public_room_directory_lists_filters_and_pages() {
    let s = TestServer::start().await;
    let (_, alice, _) = s.register("alice", "correct horse").await;
    let (_, bob, _) = s.register("bob", "correct horse").await;
    let general = s
        .create_room(&alice, json!({ "visibility": "public", "name": "General", "topic": "Everyone", "room_alias_name": "general" }))
        .await;
    let design =
        s.create_room(&alice, json!({ "visibility": "public", "name": "Design crit" })).await;
    let private = s.create_room(&alice, json!({ "name": "Secret plans" })).await;
    s.membership(&bob, &general, "join", json!({})).await;

    let (status, list) = s.get("/_matrix/client/v3/publicRooms", None).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let chunk = list["chunk"].as_array().unwrap();
    assert_eq!(chunk.len(), 2);
    assert_eq!(chunk[0]["room_id"], general.as_str(), "most members first");
    assert_eq!(chunk[0]["num_joined_members"], 2);
    assert_eq!(chunk[0]["name"], "General");
    assert_eq!(chunk[0]["topic"], "Everyone");
    assert_eq!(chunk[0]["canonical_alias"], "#general:localhost");
    // `join_rule` defaults to public when absent.
    assert!(chunk[0].get("join_rule").is_none_or(|r| r == "public"), "{}", chunk[0]);
    assert_eq!(list["total_room_count_estimate"], 2);
    assert!(!chunk.iter().any(|r| r["room_id"] == private.as_str()));

    let (_, first) = s.get("/_matrix/client/v3/publicRooms?limit=1", None).await;
    assert_eq!(first["chunk"].as_array().unwrap().len(), 1);
    let next = first["next_batch"].as_str().unwrap();
    let (_, second) =
        s.get(&format!("/_matrix/client/v3/publicRooms?limit=1&since={next}"), None).await;
    assert_eq!(second["chunk"][0]["room_id"], design.as_str());
    assert!(second.get("next_batch").is_none());

    let (_, filtered) = s
        .post(
            "/_matrix/client/v3/publicRooms",
            Some(&bob),
            json!({ "filter": { "generic_search_term": "crit" } }),
        )
        .await;
    assert_eq!(filtered["chunk"].as_array().unwrap().len(), 1);
    assert_eq!(filtered["chunk"][0]["room_id"], design.as_str());

    // Visibility: bob may not unlist; alice may.
    let list_path = format!("/_matrix/client/v3/directory/list/room/{design}");
    assert_eq!(s.get(&list_path, None).await.1["visibility"], "public");
    assert_error(
        &s.put(&list_path, Some(&bob), json!({ "visibility": "private" })).await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );
    assert_eq!(
        s.put(&list_path, Some(&alice), json!({ "visibility": "private" })).await.0,
        StatusCode::OK
    );
    assert_eq!(s.get(&list_path, None).await.1["visibility"], "private");
    let (_, list) = s.get("/_matrix/client/v3/publicRooms", None).await;
    assert_eq!(list["chunk"].as_array().unwrap().len(), 1);
}
