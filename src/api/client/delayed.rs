//! Delayed events (MSC4140, unstable prefix): scheduling through the send and state
//! endpoints with `org.matrix.msc4140.delay`, management by delay id, and the user's list.

use axum::{
    Json,
    extract::{Path, State as AxumState},
};
use http::Uri;
use ruma::api::client::{
    delayed_events::{
        delayed_message_event::unstable as delayed_message,
        delayed_state_event::unstable as delayed_state, update_delayed_event::unstable as update,
    },
    message::send_message_event::v3 as send_message,
    state::send_state_event::v3 as send_state,
};
use serde::Deserialize;
use serde_json::{Value as JsonValue, json};

use crate::{
    api::{Ruma, SignedIn, State, admin::query, client::events::content_object},
    error::{Error, Result},
    service::delayed::{Action, Schedule, StatusFilter},
};

/// The query parameter that turns a send into a delayed send.
pub const DELAY_PARAM: &str = "org.matrix.msc4140.delay";

/// The delay a send's query asks for, in milliseconds, if it asks for one.
pub fn delay_param(uri: &Uri) -> Option<Result<u64>> {
    let query = uri.query()?;
    let (_, value) =
        form_urlencoded::parse(query.as_bytes()).find(|(key, _)| key == DELAY_PARAM)?;
    Some(value.parse().map_err(|_| {
        Error::invalid_param(format!("{DELAY_PARAM} must be a number of milliseconds"))
    }))
}

/// `PUT /_matrix/client/v3/rooms/{roomId}/send/{eventType}/{txnId}?org.matrix.msc4140.delay=`
pub async fn send(
    services: State,
    req: Ruma<send_message::Request>,
    delay: u64,
) -> Result<delayed_message::Response> {
    let caller = req.caller()?.clone();
    // Scheduling counts against the sender's message rate, as sending does.
    services.abuse.message(&caller.user_id, caller.rate_limited())?;
    let body = req.body;
    let schedule = Schedule {
        user_id: &caller.user_id,
        device_id: caller.device_id.as_str(),
        txn_id: Some(body.txn_id.as_str()),
        room_id: &body.room_id,
        kind: body.event_type.to_string(),
        state_key: None,
        content: content_object(body.body.json().get())?,
        delay,
    };
    let delay_id = services.delayed.schedule(&services, schedule).await?;
    Ok(delayed_message::Response::new(delay_id))
}

/// `PUT /_matrix/client/v3/rooms/{roomId}/state/{eventType}/{stateKey}?org.matrix.msc4140.delay=`
pub async fn send_state(
    services: State,
    req: Ruma<send_state::Request>,
    delay: u64,
) -> Result<delayed_state::Response> {
    let caller = req.caller()?.clone();
    // Scheduling counts against the sender's message rate, as sending does.
    services.abuse.message(&caller.user_id, caller.rate_limited())?;
    let body = req.body;
    let schedule = Schedule {
        user_id: &caller.user_id,
        device_id: caller.device_id.as_str(),
        // State sends carry no transaction id: each request schedules a new event.
        txn_id: None,
        room_id: &body.room_id,
        kind: body.event_type.to_string(),
        state_key: Some(body.state_key),
        content: content_object(body.body.json().get())?,
        delay,
    };
    let delay_id = services.delayed.schedule(&services, schedule).await?;
    Ok(delayed_state::Response::new(delay_id))
}

/// `POST /_matrix/client/unstable/org.matrix.msc4140/delayed_events/{delay_id}` with
/// `{"action": ...}`: the caller's own delayed events only.
pub async fn update(services: State, req: Ruma<update::Request>) -> Result<update::Response> {
    let caller = req.caller()?.clone();
    let action = Action::parse(req.body.action.as_str())?;
    let owner = Some(caller.user_id.as_ref());
    services.delayed.update(&services, &req.body.delay_id, action, owner).await?;
    Ok(update::Response::new())
}

/// `POST /_matrix/client/unstable/org.matrix.msc4140/delayed_events/{delay_id}/{action}`:
/// no access token, the delay id is the credential (so a call server can hold it).
pub async fn act(
    AxumState(services): AxumState<State>,
    Path((delay_id, action)): Path<(String, String)>,
) -> Result<Json<JsonValue>> {
    let action =
        Action::parse(&action).map_err(|_| Error::not_found("Unknown delayed event action"))?;
    if delay_id.len() > 255 {
        return Err(Error::not_found("No delayed event with this id"));
    }
    services.rate_limiter.check(&format!("delayed_events/{delay_id}"))?;
    services.delayed.update(&services, &delay_id, action, None).await?;
    Ok(Json(json!({})))
}

/// `GET /_matrix/client/unstable/org.matrix.msc4140/delayed_events/{delay_id}`: one of the
/// caller's delayed events.
pub async fn get(
    AxumState(services): AxumState<State>,
    SignedIn(caller): SignedIn,
    Path(delay_id): Path<String>,
) -> Result<Json<JsonValue>> {
    let found = services.delayed.list(&caller.user_id, StatusFilter::All, &[delay_id])?;
    let record = found.first().ok_or_else(|| Error::not_found("No delayed event with this id"))?;
    Ok(Json(record.to_json()))
}

#[derive(Deserialize)]
struct ListQuery {
    status: Option<String>,
    delay_id: Option<String>,
}

/// `GET /_matrix/client/unstable/org.matrix.msc4140/delayed_events`: the caller's scheduled
/// and finalised delayed events, by when they are due (`status` and `delay_id` filter).
pub async fn list(
    AxumState(services): AxumState<State>,
    SignedIn(caller): SignedIn,
    uri: Uri,
) -> Result<Json<JsonValue>> {
    let params: ListQuery = query(&uri)?;
    let status = match params.status.as_deref() {
        None => StatusFilter::All,
        Some("scheduled") => StatusFilter::Scheduled,
        Some("finalised") => StatusFilter::Finalised,
        Some(_) => return Err(Error::invalid_param("status must be scheduled or finalised")),
    };
    let ids: Vec<String> = params.delay_id.into_iter().collect();
    let records = services.delayed.list(&caller.user_id, status, &ids)?;
    let events: Vec<JsonValue> = records.iter().map(|r| r.to_json()).collect();
    Ok(Json(json!({ "delayed_events": events })))
}
