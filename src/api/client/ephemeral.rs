//! Read receipts, read markers, typing notifications and room tags.

use ruma::{
    RoomId,
    api::client::{
        read_marker::set_read_marker::v3 as read_markers,
        receipt::create_receipt::v3::{self as receipt, ReceiptType},
        tag::{
            create_tag::v3 as create_tag, delete_tag::v3 as delete_tag, get_tags::v3 as get_tags,
        },
        typing::create_typing_event::v3::{self as typing, Typing},
    },
};
use serde_json::{Value as JsonValue, json};

use crate::{
    api::{Caller, Ruma, State},
    error::{Error, Result},
    service::{
        Services,
        ephemeral::{MAX_TYPING, Receipt},
        now_ms,
    },
};

/// Stores a receipt of `receipt_type` up to `event_id`, which the caller must be able to see.
fn store_receipt(
    services: &Services,
    caller: &Caller,
    room_id: &RoomId,
    receipt_type: &str,
    event_id: &ruma::EventId,
    thread_id: Option<String>,
) -> Result<()> {
    let event = services.rooms.stored(event_id)?.filter(|e| e.room_id == room_id);
    let event = event.ok_or_else(|| Error::not_found("Event not found"))?;
    if services.rooms.membership(room_id, &caller.user_id)?.as_deref() != Some("join")
        || !services.rooms.can_see(&caller.user_id, &event)?
    {
        return Err(Error::forbidden("You are not in this room"));
    }
    // A receipt in a thread must be for an event of that thread (its root included).
    if let Some(thread) = thread_id.as_deref().filter(|t| *t != "main") {
        let in_thread = event.event_id.as_str() == thread
            || crate::service::relations::thread_of(&event).as_deref() == Some(thread);
        if !in_thread {
            return Err(Error::invalid_param("The event is not in that thread"));
        }
    }
    let receipt = Receipt {
        user_id: caller.user_id.clone(),
        receipt_type: receipt_type.to_owned(),
        thread_id,
        event_id: event_id.to_owned(),
        ts: now_ms(),
    };
    services.ephemeral.set_receipt(services, room_id, receipt)
}

/// Records `m.fully_read` as room account data.
fn store_fully_read(
    services: &Services,
    caller: &Caller,
    room_id: &RoomId,
    event_id: &ruma::EventId,
) -> Result<()> {
    if services.rooms.stored(event_id)?.is_none_or(|e| e.room_id != room_id) {
        return Err(Error::not_found("Event not found"));
    }
    services.account_data.store(
        services,
        &caller.user_id,
        Some(room_id),
        "m.fully_read",
        json!({ "event_id": event_id }),
    )?;
    Ok(())
}

/// `POST /_matrix/client/v3/rooms/{roomId}/receipt/{receiptType}/{eventId}`
pub async fn set_receipt(
    services: State,
    req: Ruma<receipt::Request>,
) -> Result<receipt::Response> {
    let caller = req.caller()?.clone();
    let body = req.body;
    let thread = body.thread.as_str().map(str::to_owned);
    match body.receipt_type {
        ReceiptType::FullyRead => {
            store_fully_read(&services, &caller, &body.room_id, &body.event_id)?
        }
        ReceiptType::Read => {
            store_receipt(&services, &caller, &body.room_id, "m.read", &body.event_id, thread)?
        }
        ReceiptType::ReadPrivate => {
            store_receipt(
                &services,
                &caller,
                &body.room_id,
                "m.read.private",
                &body.event_id,
                thread,
            )?;
        }
        _ => return Err(Error::invalid_param("Unknown receipt type")),
    }
    Ok(receipt::Response::new())
}

/// `POST /_matrix/client/v3/rooms/{roomId}/read_markers`
pub async fn set_read_markers(
    services: State,
    req: Ruma<read_markers::Request>,
) -> Result<read_markers::Response> {
    let caller = req.caller()?.clone();
    let body = req.body;
    if let Some(event_id) = &body.fully_read {
        store_fully_read(&services, &caller, &body.room_id, event_id)?;
    }
    if let Some(event_id) = &body.read_receipt {
        store_receipt(&services, &caller, &body.room_id, "m.read", event_id, None)?;
    }
    if let Some(event_id) = &body.private_read_receipt {
        store_receipt(&services, &caller, &body.room_id, "m.read.private", event_id, None)?;
    }
    Ok(read_markers::Response::new())
}

/// `PUT /_matrix/client/v3/rooms/{roomId}/typing/{userId}`
pub async fn set_typing(services: State, req: Ruma<typing::Request>) -> Result<typing::Response> {
    let caller = req.caller()?.clone();
    let body = req.body;
    caller.must_be(&body.user_id)?;
    if services.rooms.membership(&body.room_id, &caller.user_id)?.as_deref() != Some("join") {
        return Err(Error::forbidden("You are not in this room"));
    }
    let timeout = match body.state {
        Typing::Yes(info) => Some(info.timeout.min(MAX_TYPING)),
        _ => None,
    };
    services.ephemeral.set_typing(&services, &body.room_id, &caller.user_id, timeout)?;
    if let Some(timeout) = timeout {
        // Tell the room when the notification lapses without a "stopped typing".
        // A weak handle, so a pending expiry never keeps a stopped server's database open.
        let (services, room_id) = (std::sync::Arc::downgrade(&services), body.room_id.clone());
        tokio::spawn(async move {
            tokio::time::sleep(timeout + std::time::Duration::from_millis(50)).await;
            let Some(services) = services.upgrade() else { return };
            if let Err(err) = services.ephemeral.expire_typing(&services, &room_id) {
                tracing::warn!(%err, "could not expire typing notifications");
            }
        });
    }
    Ok(typing::Response::new())
}

fn tags_of(services: &Services, caller: &Caller, room_id: &RoomId) -> Result<JsonValue> {
    let tags = services.account_data.get(&caller.user_id, Some(room_id), "m.tag")?;
    let tags = tags.and_then(|t| t.get("tags").cloned()).filter(JsonValue::is_object);
    Ok(tags.unwrap_or_else(|| json!({})))
}

/// `GET /_matrix/client/v3/user/{userId}/rooms/{roomId}/tags`
pub async fn get(services: State, req: Ruma<get_tags::Request>) -> Result<get_tags::Response> {
    let caller = req.caller()?.clone();
    caller.must_be(&req.body.user_id)?;
    let tags = tags_of(&services, &caller, &req.body.room_id)?;
    Ok(get_tags::Response::new(serde_json::from_value(tags).map_err(Error::internal)?))
}

/// Changes a room's tags with `change`, serialised per user so concurrent edits are kept.
fn edit_tags(
    services: &State,
    caller: &Caller,
    room_id: &RoomId,
    change: impl FnOnce(&mut serde_json::Map<String, JsonValue>) -> Result<()>,
) -> Result<()> {
    let _guard = services.sessions.lock_user(&caller.user_id);
    let mut tags = tags_of(services, caller, room_id)?;
    if let Some(map) = tags.as_object_mut() {
        change(map)?;
    }
    let content = json!({ "tags": tags });
    services.account_data.set(services, &caller.user_id, Some(room_id), "m.tag", content)?;
    Ok(())
}

/// `PUT /_matrix/client/v3/user/{userId}/rooms/{roomId}/tags/{tag}`: favourites, low priority
/// and custom `u.*` labels.
pub async fn put(services: State, req: Ruma<create_tag::Request>) -> Result<create_tag::Response> {
    let caller = req.caller()?.clone();
    let body = req.body;
    caller.must_be(&body.user_id)?;
    if body.tag.is_empty() || body.tag.len() > 255 {
        return Err(Error::invalid_param("Tags are 1 to 255 bytes"));
    }
    let info = serde_json::to_value(&body.tag_info).map_err(Error::internal)?;
    edit_tags(&services, &caller, &body.room_id, |tags| {
        tags.insert(body.tag.clone(), info);
        if tags.len() > 100 {
            return Err(Error::invalid_param("At most 100 tags per room"));
        }
        Ok(())
    })?;
    Ok(create_tag::Response::new())
}

/// `DELETE /_matrix/client/v3/user/{userId}/rooms/{roomId}/tags/{tag}`
pub async fn delete(
    services: State,
    req: Ruma<delete_tag::Request>,
) -> Result<delete_tag::Response> {
    let caller = req.caller()?.clone();
    let body = req.body;
    caller.must_be(&body.user_id)?;
    edit_tags(&services, &caller, &body.room_id, |tags| {
        tags.remove(&body.tag);
        Ok(())
    })?;
    Ok(delete_tag::Response::new())
}
