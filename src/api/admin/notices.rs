//! `POST /_synapse/admin/v1/send_server_notice` (and `PUT .../{txnId}`, idempotent): a
//! message from the server to one local user, in their server notices room.

use axum::{
    Json,
    body::Body,
    extract::{Path, State as AxumState},
};
use serde::Deserialize;
use serde_json::{Value as JsonValue, json};

use super::{Admin, json_body, user_id};
use crate::{api::State, error::Result, service::audit::Entry};

#[derive(Deserialize)]
struct NoticeBody {
    user_id: String,
    content: JsonValue,
    #[serde(rename = "type")]
    kind: Option<String>,
}

/// `POST /_synapse/admin/v1/send_server_notice` with `{"user_id", "content", "type"?}`:
/// answers `{"event_id"}`. Audited as `admin.server_notice` (without the content).
pub async fn send(
    AxumState(services): AxumState<State>,
    admin: Admin,
    body: Body,
) -> Result<Json<JsonValue>> {
    send_notice(&services, admin, body, None).await
}

/// `PUT /_synapse/admin/v1/send_server_notice/{txnId}`: the same; repeating a transaction id
/// answers the first notice instead of sending another.
pub async fn send_txn(
    AxumState(services): AxumState<State>,
    admin: Admin,
    Path(txn_id): Path<String>,
    body: Body,
) -> Result<Json<JsonValue>> {
    if txn_id.is_empty() || txn_id.len() > 255 {
        return Err(crate::error::Error::invalid_param("Transaction ids are 1 to 255 bytes"));
    }
    send_notice(&services, admin, body, Some(&txn_id)).await
}

async fn send_notice(
    services: &State,
    Admin(caller): Admin,
    body: Body,
    txn_id: Option<&str>,
) -> Result<Json<JsonValue>> {
    let body: NoticeBody = json_body(services, body).await?;
    let user_id = user_id(&body.user_id)?;
    let kind = body.kind.unwrap_or_else(|| "m.room.message".to_owned());
    let entry = Entry::new("admin.server_notice", Some(&caller.user_id))
        .target(&user_id)
        .details(json!({ "type": kind }));
    // Transactions are kept per requesting admin's device, and go with it.
    let txn = txn_id.map(|txn_id| (&*caller.user_id, &*caller.device_id, txn_id));
    let event_id =
        services.send_server_notice(&user_id, &kind, body.content, Some(entry), txn).await?;
    Ok(Json(json!({ "event_id": event_id })))
}
