//! Event and room reports in the Synapse admin API shapes: the listing (admins and auditors),
//! one report with the reported event (admins only: message content) and deletion.

use axum::{
    Json,
    extract::{Path, State as AxumState},
};
use http::Uri;
use serde::Deserialize;
use serde_json::{Value as JsonValue, json};

use super::{Admin, Staff, page_params, query, read_reason};
use crate::{
    api::State,
    error::{Error, Result},
    service::{
        admin::AdminRead,
        rooms::{pdu::client_event, reports::Report},
    },
};

/// The report as the listing shows it: who reported what, with the room's name and alias.
fn report_json(services: &State, id: u64, report: &Report) -> Result<JsonValue> {
    let state = services.rooms.current_state(&report.room_id).ok();
    let field = |kind: &str, key: &str| -> Result<JsonValue> {
        let Some(state) = &state else { return Ok(JsonValue::Null) };
        Ok(services
            .rooms
            .state_content(state, kind, "")?
            .and_then(|c| c.get(key).cloned())
            .unwrap_or(JsonValue::Null))
    };
    let sender = match &report.event_id {
        Some(event_id) => services.rooms.stored(event_id)?.map(|event| event.sender().to_owned()),
        None => None,
    };
    Ok(json!({
        "id": id,
        "received_ts": report.received_ms,
        "room_id": report.room_id,
        "name": field("m.room.name", "name")?,
        "canonical_alias": field("m.room.canonical_alias", "alias")?,
        "event_id": report.event_id,
        "user_id": report.reporter,
        "sender": sender,
        "reason": report.reason,
        "score": null,
    }))
}

#[derive(Deserialize)]
struct ListQuery {
    from: Option<usize>,
    limit: Option<usize>,
    dir: Option<String>,
    room_id: Option<String>,
    user_id: Option<String>,
}

/// `GET /_synapse/admin/v1/event_reports`: newest first (`dir=f`: oldest first), filtered by
/// `room_id` and reporter `user_id` (substrings, as Synapse does), paged by `from` and `limit`.
pub async fn list(
    AxumState(services): AxumState<State>,
    _: Staff,
    uri: Uri,
) -> Result<Json<JsonValue>> {
    let q: ListQuery = query(&uri)?;
    let (limit, _) = page_params(q.limit, None)?;
    let oldest_first = match q.dir.as_deref() {
        None | Some("b") => false,
        Some("f") => true,
        Some(_) => return Err(Error::invalid_param("dir is f or b")),
    };
    let mut reports = services.reports.list(0, crate::service::rooms::reports::MAX_LISTED)?;
    reports.retain(|(_, report)| {
        q.room_id.as_deref().is_none_or(|room| report.room_id.as_str().contains(room))
            && q.user_id.as_deref().is_none_or(|user| report.reporter.as_str().contains(user))
    });
    if !oldest_first {
        reports.reverse();
    }
    let total = reports.len();
    let from = q.from.unwrap_or(0);
    let page = reports
        .iter()
        .skip(from)
        .take(limit)
        .map(|(id, report)| report_json(&services, *id, report))
        .collect::<Result<Vec<_>>>()?;
    let mut body = json!({ "event_reports": page, "total": total });
    if from + page.len() < total {
        body["next_token"] = json!(from + page.len());
    }
    Ok(Json(body))
}

fn report_id(raw: &str) -> Result<u64> {
    raw.parse().map_err(|_| Error::invalid_param("Report ids are numbers"))
}

/// `GET /_synapse/admin/v1/event_reports/{reportId}`: the report with the reported event
/// (`event_json`). Admins only: this is message content, and each read is audited as
/// `admin.read.report` with the optional `reason`.
pub async fn get(
    AxumState(services): AxumState<State>,
    Admin(caller): Admin,
    Path(id): Path<String>,
    uri: Uri,
) -> Result<Json<JsonValue>> {
    let id = report_id(&id)?;
    let reason = read_reason(&uri)?;
    let report = services.reports.get(id)?.ok_or_else(|| Error::not_found("No such report"))?;
    let mut body = report_json(&services, id, &report)?;
    let event = match &report.event_id {
        Some(event_id) => services.rooms.stored(event_id)?,
        None => None,
    };
    services.record_admin_read(
        &caller.user_id,
        AdminRead {
            what: "report",
            target: &id.to_string(),
            room_id: Some(&report.room_id),
            reason: reason.as_deref(),
            details: json!({ "event_id": report.event_id }),
        },
    )?;
    body["event_json"] = event.map_or(JsonValue::Null, |event| client_event(&event, None));
    Ok(Json(body))
}

/// `DELETE /_synapse/admin/v1/event_reports/{reportId}`; deleting again changes nothing.
pub async fn delete(
    AxumState(services): AxumState<State>,
    Admin(caller): Admin,
    Path(id): Path<String>,
) -> Result<Json<JsonValue>> {
    let id = report_id(&id)?;
    services.reports.delete(&services.audit, &caller.user_id, id)?;
    Ok(Json(json!({})))
}
