//! `POST /_synapse/admin/v1/send_server_notice`: a message from the server to one local user,
//! in their server notices room.

use axum::{Json, body::Body, extract::State as AxumState};
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
    Admin(caller): Admin,
    body: Body,
) -> Result<Json<JsonValue>> {
    let body: NoticeBody = json_body(&services, body).await?;
    let user_id = user_id(&body.user_id)?;
    let kind = body.kind.unwrap_or_else(|| "m.room.message".to_owned());
    let entry = Entry::new("admin.server_notice", Some(&caller.user_id))
        .target(&user_id)
        .details(json!({ "type": kind }));
    let event_id = services.send_server_notice(&user_id, &kind, body.content, Some(entry)).await?;
    Ok(Json(json!({ "event_id": event_id })))
}
