//! `POST /_matrix/client/unstable/org.matrix.simplified_msc3575/sync`: simplified sliding sync
//! (MSC4186). The body is read here rather than through ruma's request type, which lacks the
//! `spaces` filter; the path is ruma's.

use std::{collections::HashMap, time::Duration};

use axum::{
    Router,
    extract::{Request, State as AxumState},
    response::{IntoResponse, Response},
    routing::post,
};
use ruma::api::{Metadata, client::sync::sync_events::v5, path_builder::PathBuilder};

use crate::{
    api::{
        AuthMode, RawJsonResponse, RumaResponse, State, caller_from_parts, parse_json, read_body,
    },
    error::{Error, ErrorKind, Result},
    service::sliding::{self, request::Body},
};

/// Longest a request may wait for something to happen.
const MAX_TIMEOUT: Duration = Duration::from_secs(60);

/// The routes of sliding sync, at ruma's paths.
pub fn routes() -> Router<State> {
    let mut router = Router::new();
    for path in v5::Request::PATH_BUILDER.all_paths() {
        router = router.route(path, post(handle));
    }
    router
}

async fn handle(AxumState(services): AxumState<State>, req: Request) -> Response {
    match sync(services, req).await {
        Ok(body) => RumaResponse(body).into_response(),
        Err(error) => error.into_response(),
    }
}

/// Answers at once on a new connection or when there is news, otherwise waits up to
/// `timeout` for the user's next change.
async fn sync(services: State, req: Request) -> Result<RawJsonResponse> {
    let _waiting = services.metrics.sync_started();
    let (parts, body) = req.into_parts();
    let (caller, ..) = caller_from_parts(&services, &parts, AuthMode::Required)?;
    let caller =
        caller.ok_or_else(|| Error::new(ErrorKind::MissingToken, "Missing access token"))?;
    let query: HashMap<String, String> =
        form_urlencoded::parse(parts.uri.query().unwrap_or_default().as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
    let bytes = read_body(body, services.config.limits.max_request_bytes).await?;
    let body: Body = if bytes.iter().all(u8::is_ascii_whitespace) {
        Body::default()
    } else {
        parse_json(&bytes)?
    };
    body.check()?;
    let timeout = match query.get("timeout") {
        Some(ms) => Duration::from_millis(
            ms.parse::<u64>().map_err(|_| Error::invalid_param("Invalid timeout"))?,
        ),
        None => Duration::ZERO,
    };
    let shown = query.get("set_presence").map_or("online", String::as_str);
    if !matches!(shown, "online" | "offline" | "unavailable") {
        return Err(Error::invalid_param("Invalid set_presence"));
    }
    if shown != "offline" {
        services.presence.set(&services, &caller.user_id, shown, None, shown == "online")?;
    }
    let conn_id = body.conn_id.as_deref().unwrap_or_default();
    let pos = query.get("pos").map(String::as_str);
    let connections = &services.sliding.connections;
    let previous = connections.resume(&caller.user_id, &caller.device_id, conn_id, pos)?;
    let previous = pos.is_some().then_some(&*previous);

    let request_limit =
        Duration::from_secs(services.config.limits.request_timeout_secs.saturating_sub(5).max(1));
    let deadline = tokio::time::Instant::now() + timeout.min(MAX_TIMEOUT).min(request_limit);
    let waiter = services.stream.waiter(&caller.user_id);
    // To-device messages left behind by a full page are news even when the stream is still.
    let to_device_behind = body.extensions.to_device.enabled == Some(true)
        && previous.is_some_and(|p| {
            body.extensions.to_device.since.as_deref().and_then(|s| s.parse::<u64>().ok())
                != Some(p.upto)
        });
    loop {
        let notified = waiter.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let upto = services.stream.current();
        let caught_up = previous.is_some_and(|p| {
            p.upto == upto && p.typing == services.ephemeral.typing_serial() && !to_device_behind
        });
        if !caught_up || tokio::time::Instant::now() >= deadline {
            let who = (&*caller.user_id, &*caller.device_id);
            let mut answer = sliding::build(&services, who, &body, previous, upto).await?;
            let done = previous.is_none() || answer.has_changes;
            if done || tokio::time::Instant::now() >= deadline {
                answer.response.pos = match (pos, answer.has_changes || previous.is_none()) {
                    // Nothing new: the same position still names what the client has.
                    (Some(pos), false) => pos.to_owned(),
                    _ => connections.store(
                        &caller.user_id,
                        &caller.device_id,
                        conn_id,
                        answer.snapshot,
                    ),
                };
                let raw =
                    serde_json::value::to_raw_value(&answer.response).map_err(Error::internal)?;
                return Ok(RawJsonResponse(raw));
            }
        }
        tokio::select! {
            () = &mut notified => {}
            () = tokio::time::sleep_until(deadline) => {}
        }
    }
}
