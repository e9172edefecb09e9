//! The admin's view of federation destinations (Synapse's shapes): each server we send to,
//! whether it is failing and since when, and a reset that retries it now.

use axum::{
    Json,
    extract::{Path, State as AxumState},
};
use http::Uri;
use serde::Deserialize;
use serde_json::{Value as JsonValue, json};

use super::{Admin, Staff, page_params, query};
use crate::{
    api::State,
    error::{Error, Result},
    service::outbox::TargetStatus,
};

#[derive(Deserialize)]
struct ListQuery {
    from: Option<usize>,
    limit: Option<usize>,
}

fn destination_json(status: &TargetStatus) -> JsonValue {
    let failing = status.failures > 0;
    json!({
        "destination": status.target,
        "retry_last_ts": if failing { status.last_error_ms.unwrap_or(0) } else { 0 },
        "retry_interval": status.retry_interval_ms,
        "failure_ts": if failing { status.failing_since_ms } else { None },
        "last_successful_stream_ordering": null,
        "last_success_ts": status.last_success_ms,
        "last_error": status.last_error,
        "queued": status.queued,
        "dropped": status.dropped,
    })
}

/// `GET /_synapse/admin/v1/federation/destinations`: by name, paged by `from` and `limit`.
pub async fn list(
    AxumState(services): AxumState<State>,
    _: Staff,
    uri: Uri,
) -> Result<Json<JsonValue>> {
    let q: ListQuery = query(&uri)?;
    let (limit, _) = page_params(q.limit, None)?;
    let all = services.federation_sender.destinations();
    let total = all.len();
    let from = q.from.unwrap_or(0);
    let page: Vec<JsonValue> = all.iter().skip(from).take(limit).map(destination_json).collect();
    let mut body = json!({ "destinations": page, "total": total });
    if from + page.len() < total {
        body["next_token"] = json!((from + page.len()).to_string());
    }
    Ok(Json(body))
}

fn known(services: &State, destination: &str) -> Result<TargetStatus> {
    services
        .federation_sender
        .destination(destination)
        .ok_or_else(|| Error::not_found("Unknown destination"))
}

/// `GET /_synapse/admin/v1/federation/destinations/{destination}`
pub async fn get(
    AxumState(services): AxumState<State>,
    _: Staff,
    Path(destination): Path<String>,
) -> Result<Json<JsonValue>> {
    Ok(Json(destination_json(&known(&services, &destination)?)))
}

/// `POST /_synapse/admin/v1/federation/destinations/{destination}/reset_connection`: ends
/// the destination's backoff so its queue is retried now.
pub async fn reset_connection(
    AxumState(services): AxumState<State>,
    _: Admin,
    Path(destination): Path<String>,
) -> Result<Json<JsonValue>> {
    known(&services, &destination)?;
    services.federation_sender.reset(&destination);
    Ok(Json(json!({})))
}
