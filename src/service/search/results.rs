//! `/search` for `room_events`: turns the request's criteria into an index query over the rooms
//! the searcher is in, then assembles ranks, context, profiles, state and groupings.

use std::collections::{BTreeMap, HashSet};

use ruma::{
    OwnedRoomId, UserId,
    api::client::search::search_events::v3::{Criteria, GroupingKey, OrderBy},
};
use serde_json::{Map, Value as JsonValue, json};

use super::{SearchOrder, SearchQuery, tokenizer};
use crate::{
    error::{Error, Result},
    service::{
        Services, relations,
        rooms::pdu::{StoredPdu, client_event},
    },
};

/// Results per page unless the filter asks for fewer.
const DEFAULT_LIMIT: usize = 10;
/// Most results per page.
const MAX_LIMIT: usize = 100;
/// Most context events on either side of a result.
const MAX_CONTEXT: usize = 20;
/// Events looked at to find one side of a result's context.
const MAX_CONTEXT_SCAN: usize = 500;

/// The `room_events` category of a search by `user_id`.
pub async fn room_events(
    services: &Services,
    user_id: &UserId,
    criteria: &Criteria,
    next_batch: Option<&str>,
) -> Result<JsonValue> {
    let offset = match next_batch {
        None => 0,
        Some(token) => token
            .strip_prefix('o')
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| Error::invalid_param("Invalid next_batch token"))?,
    };
    let filter = &criteria.filter;
    let joined: HashSet<OwnedRoomId> =
        services.rooms.rooms_of(user_id, "join")?.into_iter().collect();
    let rooms: Vec<OwnedRoomId> = joined
        .iter()
        .filter(|room| filter.rooms.as_ref().is_none_or(|only| only.contains(*room)))
        .filter(|room| !filter.not_rooms.contains(*room))
        .cloned()
        .collect();
    let keys = match &criteria.keys {
        Some(keys) if !keys.is_empty() => keys.iter().map(|k| k.as_str().to_owned()).collect(),
        _ => vec!["content.body".into(), "content.name".into(), "content.topic".into()],
    };
    let limit = filter
        .limit
        .map_or(DEFAULT_LIMIT, |l| usize::try_from(u64::from(l)).unwrap_or(MAX_LIMIT))
        .clamp(1, MAX_LIMIT);
    let query = SearchQuery {
        term: &criteria.search_term,
        keys,
        rooms,
        senders: filter.senders.as_ref().map(|s| s.iter().map(|u| u.to_string()).collect()),
        not_senders: filter.not_senders.iter().map(|u| u.to_string()).collect(),
        order: match criteria.order_by {
            Some(OrderBy::Recent) => SearchOrder::Recent,
            _ => SearchOrder::Rank,
        },
        offset,
        limit,
    };

    services.search.flush().await;
    let rooms = &services.rooms;
    let page = services.search.search(&query, |event_id| {
        let Ok(event_id) = ruma::EventId::parse(event_id) else { return Ok(None) };
        let Some(event) = rooms.stored(&event_id)? else { return Ok(None) };
        if !joined.contains(&event.room_id) || !rooms.can_see(user_id, &event)? {
            return Ok(None);
        }
        // An erased sender's words are not found by those they are served redacted to.
        if services.erased_hides(user_id, &event)? {
            return Ok(None);
        }
        Ok(Some(event))
    })?;

    let context = &criteria.event_context;
    let before = usize::try_from(u64::from(context.before_limit)).unwrap_or(0).min(MAX_CONTEXT);
    let after = usize::try_from(u64::from(context.after_limit)).unwrap_or(0).min(MAX_CONTEXT);
    let mut results = Vec::with_capacity(page.hits.len());
    let mut by_room: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut by_sender: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let served = |events: &[StoredPdu]| -> Result<Vec<JsonValue>> {
        events.iter().map(|e| relations::viewed(services, user_id, e)).collect()
    };
    for (rank, event) in &page.hits {
        let (events_before, events_after) = around(services, user_id, event, before, after)?;
        let mut context = json!({
            "events_before": served(&events_before)?,
            "events_after": served(&events_after)?,
            "start": format!("s{}", events_before.last().unwrap_or(event).position.saturating_sub(1)),
            "end": format!("s{}", events_after.last().unwrap_or(event).position),
        });
        if criteria.event_context.include_profile {
            let senders: HashSet<&str> = events_before
                .iter()
                .chain(&events_after)
                .chain([event])
                .map(StoredPdu::sender)
                .collect();
            context["profile_info"] = profiles(services, user_id, event, senders)?;
        }
        by_room.entry(event.room_id.to_string()).or_default().push(event.event_id.to_string());
        by_sender.entry(event.sender().to_owned()).or_default().push(event.event_id.to_string());
        results.push(json!({
            "rank": rank,
            "result": relations::serve(services, user_id, None, event)?,
            "context": context,
        }));
    }

    let hits = page.hits.iter().map(|(_, event)| event);
    relations::add_replaced(
        services,
        user_id,
        results.iter_mut().map(|r| &mut r["result"]).zip(hits),
    )?;

    let mut room_events = json!({
        "count": page.count,
        "highlights": highlights(&criteria.search_term),
        "results": results,
    });
    if let Some(next) = page.next_offset {
        room_events["next_batch"] = json!(format!("o{next}"));
    }
    if criteria.include_state == Some(true) {
        let mut state = Map::new();
        for room_id in by_room.keys() {
            let Ok(room_id) = ruma::RoomId::parse(room_id) else { continue };
            let map = rooms.readable_state(&room_id, user_id)?;
            let events = rooms.state_events(&map)?;
            state.insert(
                room_id.to_string(),
                events.iter().map(|e| client_event(e, None)).collect::<Vec<_>>().into(),
            );
        }
        room_events["state"] = JsonValue::Object(state);
    }
    let mut groups = Map::new();
    for grouping in &criteria.groupings.group_by {
        let (name, members) = match grouping.key {
            Some(GroupingKey::RoomId) => ("room_id", &by_room),
            Some(GroupingKey::Sender) => ("sender", &by_sender),
            _ => continue,
        };
        let group: Map<String, JsonValue> = members
            .iter()
            .enumerate()
            .map(|(order, (key, ids))| (key.clone(), json!({ "results": ids, "order": order })))
            .collect();
        groups.insert(name.to_owned(), JsonValue::Object(group));
    }
    if !groups.is_empty() {
        room_events["groups"] = JsonValue::Object(groups);
    }
    Ok(json!({ "search_categories": { "room_events": room_events } }))
}

/// Up to `before` visible events before `event` (newest first) and `after` after it.
fn around(
    services: &Services,
    user_id: &UserId,
    event: &StoredPdu,
    before: usize,
    after: usize,
) -> Result<(Vec<StoredPdu>, Vec<StoredPdu>)> {
    if before == 0 && after == 0 {
        return Ok((Vec::new(), Vec::new()));
    }
    let rooms = &services.rooms;
    let Some(record) = rooms.room(&event.room_id)? else { return Ok((Vec::new(), Vec::new())) };
    let collect = |from: u64, upto: u64, forward: bool, wanted: usize| -> Result<Vec<StoredPdu>> {
        let mut found = Vec::new();
        for e in rooms.timeline_range(&record, from, upto, forward).take(MAX_CONTEXT_SCAN) {
            if found.len() == wanted {
                break;
            }
            let e = e?;
            if rooms.can_see(user_id, &e)? {
                found.push(e);
            }
        }
        Ok(found)
    };
    let earlier = collect(0, event.position.saturating_sub(1), false, before)?;
    let later = collect(event.position, services.stream.current(), true, after)?;
    Ok((earlier, later))
}

/// Display names and avatars of `senders` as of `event`, as `viewer` is served them: none for
/// an erased sender whose member event `viewer` was not there to see.
fn profiles(
    services: &Services,
    viewer: &UserId,
    event: &StoredPdu,
    senders: HashSet<&str>,
) -> Result<JsonValue> {
    let state = services.rooms.states.load(event.state_after_or_before())?;
    let mut out = Map::new();
    for sender in senders {
        let content = match services.rooms.state_event(&state, "m.room.member", sender)? {
            Some(member) if services.erased_hides(viewer, &member)? => None,
            Some(_) => services.rooms.state_content(&state, "m.room.member", sender)?,
            None => None,
        };
        let field = |name: &str| content.as_ref().and_then(|c| c.get(name)).cloned();
        out.insert(
            sender.to_owned(),
            json!({ "displayname": field("displayname"), "avatar_url": field("avatar_url") }),
        );
    }
    Ok(JsonValue::Object(out))
}

/// The words of the search term, as written, for clients to highlight.
fn highlights(term: &str) -> Vec<String> {
    let mut words: Vec<String> = tokenizer::segments(term)
        .into_iter()
        .map(|segment| term[segment.range.0..segment.range.1].to_owned())
        .collect();
    words.dedup();
    words
}
