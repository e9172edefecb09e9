//! The audit log over HTTP: filtered pages as JSON, whole ranges streamed as NDJSON or CSV,
//! chain verification and signed checkpoints.

use axum::{
    Json,
    body::Body,
    extract::State as AxumState,
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use http::{Uri, header};
use serde::Deserialize;
use serde_json::{Value as JsonValue, json};

use super::{Staff, query};
use crate::{
    api::State,
    error::{Error, Result},
    service::audit::{
        checkpoint::Checkpoint,
        parse_token,
        query::{CSV_HEADER, Filter, MAX_LIMIT, csv_row},
    },
};

/// Default page size of the JSON listing.
const DEFAULT_LIMIT: usize = 100;
/// Records per chunk of a streamed export.
const EXPORT_CHUNK: usize = 1000;

// Query strings carry every value as text, which `serde(flatten)` cannot turn into numbers,
// so the filter's fields are spelled out here.
#[derive(Deserialize)]
struct AuditQuery {
    from_ts: Option<u64>,
    to_ts: Option<u64>,
    actor: Option<String>,
    action: Option<String>,
    target: Option<String>,
    room_id: Option<String>,
    from: Option<String>,
    limit: Option<usize>,
    format: Option<String>,
}

impl AuditQuery {
    fn filter(&self) -> Filter {
        Filter {
            from_ts: self.from_ts,
            to_ts: self.to_ts,
            actor: self.actor.clone(),
            action: self.action.clone(),
            target: self.target.clone(),
            room_id: self.room_id.clone(),
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Format {
    Json,
    Ndjson,
    Csv,
}

/// `GET /_plaza/admin/v1/audit`: `from_ts`, `to_ts`, `actor`, `action`, `target`, `room_id`
/// filters; `from` / `limit` pagination; `format=json|ndjson|csv`.
pub async fn list(AxumState(services): AxumState<State>, _: Staff, uri: Uri) -> Result<Response> {
    let params: AuditQuery = query(&uri)?;
    let filter = params.filter();
    if let (Some(from), Some(to)) = (filter.from_ts, filter.to_ts)
        && from > to
    {
        return Err(Error::invalid_param("from_ts is after to_ts"));
    }
    let format = match params.format.as_deref() {
        None | Some("json") => Format::Json,
        Some("ndjson") => Format::Ndjson,
        Some("csv") => Format::Csv,
        Some(_) => return Err(Error::invalid_param("format is json, ndjson or csv")),
    };
    let from = params.from.as_deref().map(parse_token).transpose()?;
    if format == Format::Json {
        let limit = params.limit.unwrap_or(DEFAULT_LIMIT);
        if limit == 0 || limit > MAX_LIMIT {
            return Err(Error::invalid_param(format!("limit is 1 to {MAX_LIMIT}")));
        }
        let page = tokio::task::spawn_blocking(move || services.audit.page(&filter, from, limit))
            .await
            .map_err(Error::internal)??;
        let mut body = json!({ "records": page.records });
        if let Some(next) = page.next {
            body["next_token"] = json!(next.to_string());
        }
        return Ok(Json(body).into_response());
    }
    Ok(export(services, filter, from, params.limit, format))
}

/// Streams every matching record, a chunk at a time, without holding the export in memory.
fn export(
    services: State,
    filter: Filter,
    from: Option<u64>,
    limit: Option<usize>,
    format: Format,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
    tokio::task::spawn_blocking(move || {
        if format == Format::Csv
            && tx.blocking_send(Ok(Bytes::from_static(CSV_HEADER.as_bytes()))).is_err()
        {
            return;
        }
        let mut from = from;
        let mut remaining = limit.unwrap_or(usize::MAX);
        while remaining > 0 {
            let page = match services.audit.page(&filter, from, EXPORT_CHUNK.min(remaining)) {
                Ok(page) => page,
                Err(err) => {
                    tracing::warn!(%err, "audit export failed");
                    let _ = tx.blocking_send(Err(std::io::Error::other(err.to_string())));
                    return;
                }
            };
            remaining = remaining.saturating_sub(page.records.len());
            let mut chunk = String::new();
            for record in &page.records {
                match format {
                    Format::Csv => chunk.push_str(&csv_row(record)),
                    _ => {
                        chunk.push_str(&serde_json::to_string(record).unwrap_or_default());
                        chunk.push('\n');
                    }
                }
            }
            if !chunk.is_empty() && tx.blocking_send(Ok(Bytes::from(chunk))).is_err() {
                return; // the client went away
            }
            match page.next {
                Some(next) => from = Some(next),
                None => return,
            }
        }
    });
    let stream =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|i| (i, rx)) });
    let content_type = match format {
        Format::Csv => "text/csv; charset=utf-8",
        _ => "application/x-ndjson",
    };
    ([(header::CONTENT_TYPE, content_type)], Body::from_stream(stream)).into_response()
}

/// `GET /_plaza/admin/v1/audit/verify`: recomputes the whole chain.
pub async fn verify(AxumState(services): AxumState<State>, _: Staff) -> Result<Json<JsonValue>> {
    let report = tokio::task::spawn_blocking(move || services.verify_audit())
        .await
        .map_err(Error::internal)??;
    Ok(Json(serde_json::to_value(report).map_err(Error::internal)?))
}

/// `GET /_plaza/admin/v1/audit/checkpoint`: a checkpoint of the log's head signed with the
/// server key, to keep outside the server and check with `plaza audit verify --against`.
pub async fn checkpoint(
    AxumState(services): AxumState<State>,
    _: Staff,
) -> Result<Json<Checkpoint>> {
    Ok(Json(services.audit_checkpoint().await?))
}
