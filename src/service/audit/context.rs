//! Who is making the current request and from where, so records written deep inside a service
//! (a kick appended to a room) still name the device, address and user agent behind them.
//!
//! The HTTP edge runs each request inside [`scope`]; authentication fills in the caller. Work
//! outside a request (CLI, start-up) simply has no context.

use std::{future::Future, sync::OnceLock};

/// What is known about the request being served.
#[derive(Debug, Default)]
pub struct RequestContext {
    /// The client's address.
    pub ip: Option<String>,
    /// The client's user agent.
    pub user_agent: Option<String>,
    /// `(user id, device id)` once the access token was checked.
    pub caller: OnceLock<(String, String)>,
}

tokio::task_local! {
    static CONTEXT: std::sync::Arc<RequestContext>;
}

/// Runs `future` with `context` as the current request.
pub async fn scope<F: Future>(context: RequestContext, future: F) -> F::Output {
    CONTEXT.scope(std::sync::Arc::new(context), future).await
}

/// The current request, if any.
pub fn current() -> Option<std::sync::Arc<RequestContext>> {
    CONTEXT.try_with(Clone::clone).ok()
}

/// Notes the authenticated caller of the current request (ignored outside one).
pub fn set_caller(user_id: &str, device_id: &str) {
    let _ = CONTEXT.try_with(|c| c.caller.set((user_id.to_owned(), device_id.to_owned())));
}

/// Runs `future` with `context` as the current request, which the caller keeps a handle on
/// to read what the request learnt (its authenticated caller) once it is answered.
pub async fn scope_shared<F: Future>(
    context: std::sync::Arc<RequestContext>,
    future: F,
) -> F::Output {
    CONTEXT.scope(context, future).await
}
