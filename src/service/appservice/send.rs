//! Sending queued events to application services as transactions
//! (`PUT /_matrix/app/v1/transactions/{txnId}`), one in flight per service.

use std::sync::Arc;

use serde_json::{Value as JsonValue, json};
use tokio::sync::watch;

use super::Queued;
use crate::service::{
    Services,
    outbox::{Deliver, Failure, Item},
};

/// Delivers the application service outbox.
pub struct Transactions {
    services: Arc<Services>,
}

impl Deliver<Queued> for Transactions {
    async fn deliver(
        &self,
        target: &str,
        txn_id: &str,
        items: &mut Vec<Item<Queued>>,
    ) -> Result<(), Failure> {
        let services = &self.services;
        let registered = services
            .appservices
            .by_id(target)
            .ok_or_else(|| format!("no application service `{target}` is registered"))?;
        // A service removed from the configuration, or without a URL, takes nothing.
        let Some(url) = registered.registration.url.as_deref() else { return Ok(()) };
        let body = transaction(services, items, registered.receive_ephemeral)?;
        let url = format!(
            "{}/_matrix/app/v1/transactions/{}",
            url.trim_end_matches('/'),
            super::encode(txn_id)
        );
        let request = services
            .outbound
            .request_trusted(reqwest::Method::PUT, &url)
            .map_err(|e| e.to_string())?;
        let response = request
            .bearer_auth(&registered.registration.hs_token)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(Failure::Retry(format!("the service answered {status}")))
        }
    }
}

/// The body of a transaction of `items`.
fn transaction(
    services: &Services,
    items: &[Item<Queued>],
    ephemeral_wanted: bool,
) -> Result<Vec<u8>, String> {
    let mut events = Vec::with_capacity(items.len());
    let mut ephemeral = Vec::new();
    for item in items {
        match &item.value {
            Queued::Pdu(short) => {
                match services.rooms.stored_by_short_public(*short) {
                    Ok(Some(stored)) => events.push(stored),
                    // Purged meanwhile: nothing to send.
                    Ok(None) => {}
                    Err(err) => return Err(format!("event {short} unreadable: {err}")),
                }
            }
            Queued::Ephemeral(edu) if ephemeral_wanted => ephemeral.push(edu),
            Queued::Ephemeral(_) => {}
        }
    }
    let events = services.rooms.client_events(&events).map_err(|err| err.to_string())?;
    let mut body = json!({ "events": events });
    if ephemeral_wanted {
        let ephemeral = JsonValue::from(ephemeral.into_iter().cloned().collect::<Vec<_>>());
        body["de.sorunome.msc2409.ephemeral"] = ephemeral.clone();
        body["ephemeral"] = ephemeral;
    }
    serde_json::to_vec(&body).map_err(|e| e.to_string())
}

/// Sends every service's queue until the server stops.
pub async fn run(services: Arc<Services>, stopped: watch::Receiver<bool>) {
    let outbox = services.appservices.outbox().clone();
    let deliver = Arc::new(Transactions { services });
    outbox.run(deliver, stopped).await;
}
