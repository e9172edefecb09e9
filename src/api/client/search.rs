//! `POST /_matrix/client/v3/search`: full-text search over the caller's rooms.

use ruma::api::client::search::search_events::v3 as search_events;
use serde_json::json;

use crate::{
    api::{JsonResponse, Ruma, State},
    error::Result,
    service::search::results,
};

/// `POST /_matrix/client/v3/search`
pub async fn search(services: State, req: Ruma<search_events::Request>) -> Result<JsonResponse> {
    let caller = req.caller()?.clone();
    let body = req.body;
    let Some(criteria) = &body.search_categories.room_events else {
        return Ok(JsonResponse(json!({ "search_categories": {} })));
    };
    let found =
        results::room_events(&services, &caller.user_id, criteria, body.next_batch.as_deref())
            .await?;
    Ok(JsonResponse(found))
}
