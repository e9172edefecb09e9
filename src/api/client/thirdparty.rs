//! Third-party networks (`/thirdparty/*`): the protocols bridges offer. No bridge provides any
//! yet, so the list is empty and every protocol is unknown.

use std::collections::BTreeMap;

use ruma::api::client::thirdparty::{get_protocol::v3 as protocol, get_protocols::v3 as protocols};

use crate::{
    api::{Ruma, State},
    error::{Error, Result},
};

/// `GET /_matrix/client/v3/thirdparty/protocols`: `{}` while no bridge provides protocols.
pub async fn protocols(
    _services: State,
    req: Ruma<protocols::Request>,
) -> Result<protocols::Response> {
    req.caller()?;
    Ok(protocols::Response::new(BTreeMap::new()))
}

/// `GET /_matrix/client/v3/thirdparty/protocol/{protocol}`: 404, no protocol is known.
pub async fn protocol(
    _services: State,
    req: Ruma<protocol::Request>,
) -> Result<protocol::Response> {
    req.caller()?;
    Err(Error::not_found("No bridge provides this protocol"))
}
