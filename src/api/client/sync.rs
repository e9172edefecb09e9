//! `/sync`, stored filters, `/messages` and `/context`: how devices catch up and page back
//! through history.

use std::time::Duration;

use ruma::api::{
    Direction,
    client::{
        context::get_context::v3 as get_context,
        filter::{
            FilterDefinition, create_filter::v3 as create_filter, get_filter::v3 as get_filter,
        },
        message::get_message_events::v3 as messages,
        sync::sync_events::v3::{self as sync_events, Filter},
    },
};
use serde_json::{Value as JsonValue, json};

use crate::{
    api::{Caller, JsonResponse, RawJsonResponse, Ruma, State},
    error::{Error, ErrorKind, Result},
    service::{
        history, relations,
        rooms::pdu::StoredPdu,
        sync::{SyncRequest, sync as build_sync},
    },
};

/// Longest a sync may wait for something to happen.
const MAX_SYNC_TIMEOUT: Duration = Duration::from_secs(60);

/// A parsed sync token.
pub struct SyncToken {
    /// The stream position.
    pub position: u64,
    /// The ephemeral (typing, presence) serial.
    pub typing: Option<u64>,
    /// How far to-device messages were delivered.
    pub to_device: Option<u64>,
}

/// Parses a stream token (`s<position>`, or from sync `s<position>_<ephemeral>_<to-device>`),
/// refusing tokens from the future.
pub fn parse_sync_token(services: &State, token: &str) -> Result<SyncToken> {
    let unknown = || Error::new(ErrorKind::UnknownPos, "Unknown pagination token");
    let mut parts = token.strip_prefix('s').ok_or_else(unknown)?.split('_');
    let number = |part: Option<&str>| -> Result<Option<u64>> {
        part.map(|p| p.parse::<u64>().map_err(|_| unknown())).transpose()
    };
    let position = number(parts.next())?.ok_or_else(unknown)?;
    let typing = number(parts.next())?;
    let to_device = number(parts.next())?;
    if parts.next().is_some() {
        return Err(unknown());
    }
    if position > services.stream.current() || to_device.is_some_and(|t| t > position) {
        return Err(Error::new(ErrorKind::UnknownPos, "Token is from the future"));
    }
    Ok(SyncToken { position, typing, to_device })
}

/// The stream position of a token.
pub fn parse_token(services: &State, token: &str) -> Result<u64> {
    Ok(parse_sync_token(services, token)?.position)
}

/// `GET /_matrix/client/v3/sync`: answers at once when there is news (or on an initial or
/// full-state sync), otherwise waits up to `timeout` for the user's next change.
pub async fn sync(services: State, req: Ruma<sync_events::Request>) -> Result<RawJsonResponse> {
    let _waiting = services.metrics.sync_started();
    let caller = req.caller()?.clone();
    let body = req.body;
    let filter = match body.filter {
        None => FilterDefinition::default(),
        Some(Filter::FilterDefinition(definition)) => definition,
        // Ruma reads an inline filter it cannot parse as a filter id; ids never start with `{`.
        Some(Filter::FilterId(id)) if id.trim_start().starts_with('{') => {
            let problem = serde_json::from_str::<FilterDefinition>(&id).err();
            let problem = problem.map_or_else(String::new, |e| format!(": {e}"));
            return Err(Error::invalid_param(format!("Invalid inline filter{problem}")));
        }
        Some(Filter::FilterId(id)) => services.filters.get(&caller.user_id, &id)?,
        Some(_) => return Err(Error::bad_json("Unsupported filter")),
    };
    let since = body.since.as_deref().map(|s| parse_sync_token(&services, s)).transpose()?;
    // Syncing is activity; `set_presence` says how to show it (online by default, `offline`
    // leaves presence alone).
    let shown = body.set_presence.as_str();
    if shown != "offline" {
        services.presence.set(&services, &caller.user_id, shown, None, shown == "online")?;
    }
    let request = SyncRequest {
        user_id: &caller.user_id,
        device_id: &caller.device_id,
        since: since.as_ref().map(|s| s.position),
        since_typing: since.as_ref().and_then(|s| s.typing),
        since_to_device: since.as_ref().and_then(|s| s.to_device),
        full_state: body.full_state,
        filter: &filter,
    };
    let request_limit =
        Duration::from_secs(services.config.limits.request_timeout_secs.saturating_sub(5).max(1));
    let timeout = body.timeout.unwrap_or_default().min(MAX_SYNC_TIMEOUT).min(request_limit);
    let deadline = tokio::time::Instant::now() + timeout;
    let waiter = services.stream.waiter(&caller.user_id);
    loop {
        let notified = waiter.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let upto = services.stream.current();
        // Nothing at all has happened since the token: wait without building an empty answer.
        let caught_up = since.as_ref().is_some_and(|s| {
            s.position == upto
                && s.typing == Some(services.ephemeral.typing_serial())
                && s.to_device.is_none_or(|d| d == upto)
        });
        if caught_up && !body.full_state && tokio::time::Instant::now() < deadline {
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep_until(deadline) => {}
            }
            continue;
        }
        let response = build_sync(&services, &request, upto).await?;
        let done = since.is_none() || body.full_state || response.has_changes;
        if done || tokio::time::Instant::now() >= deadline {
            return Ok(RawJsonResponse(response.body));
        }
        tokio::select! {
            () = &mut notified => {}
            () = tokio::time::sleep_until(deadline) => {}
        }
    }
}

/// `POST /_matrix/client/v3/user/{userId}/filter`
pub async fn create(
    services: State,
    req: Ruma<create_filter::Request>,
) -> Result<create_filter::Response> {
    let caller = req.caller()?.clone();
    caller.must_be(&req.body.user_id)?;
    let id = services.filters.create(&caller.user_id, &req.body.filter)?;
    Ok(create_filter::Response::new(id))
}

/// `GET /_matrix/client/v3/user/{userId}/filter/{filterId}`
pub async fn get(services: State, req: Ruma<get_filter::Request>) -> Result<get_filter::Response> {
    let caller = req.caller()?.clone();
    caller.must_be(&req.body.user_id)?;
    Ok(get_filter::Response::new(services.filters.get(&caller.user_id, &req.body.filter_id)?))
}

/// `events` in the client format for the caller, with bundled aggregations.
fn served(services: &State, caller: &Caller, events: &[StoredPdu]) -> Result<Vec<JsonValue>> {
    let device = Some(caller.device_id.as_str());
    relations::serve_all(services, &caller.user_id, device, events)
}

/// `GET /_matrix/client/v3/rooms/{roomId}/messages`: a page of history in either direction,
/// only what history visibility lets the caller see.
pub async fn messages(services: State, req: Ruma<messages::Request>) -> Result<JsonResponse> {
    let caller = req.caller()?.clone();
    let body = req.body;
    let forward = body.dir == Direction::Forward;
    let from = match body.from.as_deref() {
        Some(token) => parse_token(&services, token)?,
        None if forward => 0,
        None => services.stream.current(),
    };
    let to = body.to.as_deref().map(|t| parse_token(&services, t)).transpose()?;
    let range = if forward {
        (from, to.unwrap_or_else(|| services.stream.current()))
    } else {
        (to.unwrap_or(0), from)
    };
    let limit = u64::from(body.limit) as usize;
    let page = history::page(
        &services,
        &caller.user_id,
        &body.room_id,
        range,
        forward,
        limit,
        &body.filter,
    )?;
    let mut response = json!({
        "start": format!("s{from}"),
        "chunk": served(&services, &caller, &page.chunk)?,
        "state": services.rooms.client_events(&page.members)?,
    });
    if let Some(end) = page.end {
        response["end"] = json!(format!("s{end}"));
    }
    Ok(JsonResponse(response))
}

/// `GET /_matrix/client/v3/rooms/{roomId}/context/{eventId}`: an event with the events around
/// it and the state at the last of them.
pub async fn context(services: State, req: Ruma<get_context::Request>) -> Result<JsonResponse> {
    let caller = req.caller()?.clone();
    let body = req.body;
    let limit = u64::from(body.limit) as usize;
    let ctx = history::context(
        &services,
        &caller.user_id,
        &body.room_id,
        &body.event_id,
        limit,
        &body.filter,
    )?;
    Ok(JsonResponse(json!({
        "start": format!("s{}", ctx.start),
        "end": format!("s{}", ctx.end),
        "event": served(&services, &caller, std::slice::from_ref(&ctx.event))?.pop(),
        "events_before": served(&services, &caller, &ctx.before)?,
        "events_after": served(&services, &caller, &ctx.after)?,
        "state": services.rooms.client_events(&ctx.state)?,
    })))
}
