//! Endpoints only application services call: `POST /_matrix/client/v1/appservice/{id}/ping`.

use ruma::api::client::appservice::request_ping::v1 as ping;

use crate::{
    api::{Ruma, State},
    error::{Error, Result},
};

/// `POST /_matrix/client/v1/appservice/{appserviceId}/ping`: asks the service to answer its
/// own `/_matrix/app/v1/ping` and reports how long that took.
pub async fn ping(services: State, req: Ruma<ping::Request>) -> Result<ping::Response> {
    let registered = req
        .caller()?
        .appservice
        .clone()
        .ok_or_else(|| Error::forbidden("Only application services may ping"))?;
    if registered.id() != req.body.appservice_id {
        return Err(Error::forbidden("The token does not belong to this application service"));
    }
    let txn = req.body.transaction_id.as_ref().map(|t| t.as_str());
    let duration = services.appservices.ping(&services, &registered, txn).await?;
    Ok(ping::Response::new(duration))
}
