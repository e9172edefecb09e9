//! The admin's view of application services: each registration with its queue depth, last
//! success and last error.

use axum::{Json, extract::State as AxumState};
use serde_json::{Value as JsonValue, json};

use super::Staff;
use crate::api::State;

/// `GET /_plaza/admin/v1/appservices`
pub async fn list(AxumState(services): AxumState<State>, _staff: Staff) -> Json<JsonValue> {
    let list: Vec<JsonValue> = services
        .appservices
        .statuses()
        .into_iter()
        .map(|(registered, status)| {
            let reg = &registered.registration;
            json!({
                "id": reg.id,
                "url": reg.url,
                "sender": registered.sender,
                "file": registered.file.display().to_string(),
                "rate_limited": registered.rate_limited(),
                "receive_ephemeral": registered.receive_ephemeral,
                "protocols": reg.protocols.clone().unwrap_or_default(),
                "queued": status.queued,
                "failures": status.failures,
                "last_success_ts": status.last_success_ms,
                "last_error": status.last_error,
                "last_error_ts": status.last_error_ms,
            })
        })
        .collect();
    Json(json!({ "appservices": list, "total": list.len() }))
}
