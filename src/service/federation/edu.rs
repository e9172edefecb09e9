//! EDUs received from other servers (typing, receipts, presence, device lists, to-device).

use std::sync::Arc;

use ruma::{ServerName, api::federation::transactions::edu::Edu};

use crate::service::Services;

/// Takes one EDU `origin` sent in a transaction; failures are logged, never returned, so one
/// bad EDU does not fail the transaction.
pub async fn receive(services: &Arc<Services>, origin: &ServerName, edu: Edu) {
    let _ = services;
    tracing::debug!(%origin, ?edu, "EDU received");
}
