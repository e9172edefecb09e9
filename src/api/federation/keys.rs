//! `/_matrix/key/v2/server` (this server's keys), the notary `/_matrix/key/v2/query`, and
//! `/_matrix/federation/v1/version`.

use ruma::{
    MilliSecondsSinceUnixEpoch,
    api::federation::discovery::{
        get_remote_server_keys, get_remote_server_keys_batch, get_server_keys, get_server_version,
    },
};

use crate::{
    api::{Ruma, State},
    error::{Error, Result},
};

/// `GET /_matrix/key/v2/server`: this server's keys, signed.
pub async fn server_keys(
    services: State,
    _req: Ruma<get_server_keys::v2::Request>,
) -> Result<get_server_keys::v2::Response> {
    Ok(get_server_keys::v2::Response::new(services.federation.own_keys()?))
}

/// `GET /_matrix/key/v2/query/{serverName}`: a server's keys, from the cache or fetched,
/// signed by this server too.
pub async fn query(
    services: State,
    req: Ruma<get_remote_server_keys::v2::Request>,
) -> Result<get_remote_server_keys::v2::Response> {
    let minimum = millis(req.body.minimum_valid_until_ts);
    let server = &req.body.server_name;
    let document = services.federation.notary_document(server, minimum).await?;
    Ok(get_remote_server_keys::v2::Response::new(document.into_iter().collect()))
}

/// `POST /_matrix/key/v2/query`: the keys of several servers at once.
pub async fn query_batch(
    services: State,
    req: Ruma<get_remote_server_keys_batch::v2::Request>,
) -> Result<get_remote_server_keys_batch::v2::Response> {
    let documents = services.federation.notary_batch(&req.body.server_keys).await?;
    Ok(get_remote_server_keys_batch::v2::Response::new(documents))
}

/// `GET /_matrix/federation/v1/version`.
pub async fn version(
    services: State,
    _req: Ruma<get_server_version::v1::Request>,
) -> Result<get_server_version::v1::Response> {
    if !services.federation.enabled() {
        return Err(Error::not_found("Federation is disabled"));
    }
    let mut server = get_server_version::v1::Server::new();
    server.name = Some("Plaza".to_owned());
    server.version = Some(env!("CARGO_PKG_VERSION").to_owned());
    let mut response = get_server_version::v1::Response::new();
    response.server = Some(server);
    Ok(response)
}

fn millis(ts: MilliSecondsSinceUnixEpoch) -> u64 {
    ts.get().into()
}
