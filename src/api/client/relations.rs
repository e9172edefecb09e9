//! `/relations` and `/threads`: events relating to an event, and a room's threads.

use ruma::{
    api::{
        Direction,
        client::{
            relations::{
                get_relating_events::v1 as relating,
                get_relating_events_with_rel_type::v1 as relating_type,
                get_relating_events_with_rel_type_and_event_type::v1 as relating_type_event,
            },
            threads::get_threads::v1::{self as get_threads, IncludeThreads},
        },
    },
    serde::Raw,
};
use serde_json::value::to_raw_value;

use crate::{
    api::{Caller, Ruma, State},
    error::{Error, Result},
    service::relations::{
        listing::{self, Page, RECURSION_DEPTH, RelationsQuery},
        serve_all,
    },
};

/// The events of a page, each with its bundled aggregations.
fn events<T>(services: &State, caller: &Caller, page: &Page) -> Result<Vec<Raw<T>>> {
    serve_all(services, &caller.user_id, Some(caller.device_id.as_str()), &page.chunk)?
        .iter()
        .map(|json| Ok(Raw::from_json(to_raw_value(json).map_err(Error::internal)?)))
        .collect()
}

fn limit(limit: Option<ruma::UInt>) -> Option<usize> {
    limit.map(|l| usize::try_from(u64::from(l)).unwrap_or(usize::MAX))
}

/// The three `/relations` endpoints differ only in how much of the relation they pin down:
/// `|body| (rel_type, event_type)` says which.
macro_rules! relations_endpoint {
    ($(#[$doc:meta])* $name:ident, $module:ident, |$body:ident| ($rel_type:expr, $event_type:expr)) => {
        $(#[$doc])*
        pub async fn $name(
            services: State,
            req: Ruma<$module::Request>,
        ) -> Result<$module::Response> {
            let caller = req.caller()?.clone();
            let $body = req.body;
            let (rel_type, event_type): (Option<String>, Option<String>) = ($rel_type, $event_type);
            let query = RelationsQuery {
                rel_type: rel_type.as_deref(),
                event_type: event_type.as_deref(),
                from: $body.from.as_deref(),
                to: $body.to.as_deref(),
                forward: $body.dir == Direction::Forward,
                limit: limit($body.limit),
                recurse: $body.recurse,
            };
            let page = listing::relations(
                &services,
                &caller.user_id,
                &$body.room_id,
                &$body.event_id,
                &query,
            )?;
            let mut response = $module::Response::new(events(&services, &caller, &page)?);
            response.next_batch = page.next_batch;
            response.recursion_depth =
                $body.recurse.then(|| RECURSION_DEPTH.try_into().unwrap_or_default());
            Ok(response)
        }
    };
}

relations_endpoint!(
    /// `GET /_matrix/client/v1/rooms/{roomId}/relations/{eventId}`
    relations,
    relating,
    |body| (None, None)
);
relations_endpoint!(
    /// `GET /_matrix/client/v1/rooms/{roomId}/relations/{eventId}/{relType}`
    relations_of_type,
    relating_type,
    |body| (Some(body.rel_type.to_string()), None)
);
relations_endpoint!(
    /// `GET /_matrix/client/v1/rooms/{roomId}/relations/{eventId}/{relType}/{eventType}`
    relations_of_type_and_event_type,
    relating_type_event,
    |body| (Some(body.rel_type.to_string()), Some(body.event_type.to_string()))
);

/// `GET /_matrix/client/v1/rooms/{roomId}/threads`: thread roots, newest activity first.
pub async fn threads(
    services: State,
    req: Ruma<get_threads::Request>,
) -> Result<get_threads::Response> {
    let caller = req.caller()?.clone();
    let body = req.body;
    let participated = body.include == IncludeThreads::Participated;
    let page = listing::threads(
        &services,
        &caller.user_id,
        &body.room_id,
        participated,
        body.from.as_deref(),
        limit(body.limit),
    )?;
    let mut response = get_threads::Response::new(events(&services, &caller, &page)?);
    response.next_batch = page.next_batch;
    Ok(response)
}
