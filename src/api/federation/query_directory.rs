//! `GET /_matrix/federation/v1/query/directory`: the room one of this server's aliases names,
//! and the servers in it, for other servers' users joining by alias.

use std::collections::BTreeSet;

use ruma::api::federation::query::get_room_information;

use super::Federated;
use crate::{
    api::State,
    error::{Error, Result},
};

/// Most servers named in an answer.
const MAX_SERVERS: usize = 20;

/// `GET /_matrix/federation/v1/query/directory?room_alias=`.
pub async fn room_information(
    services: State,
    req: Federated<get_room_information::v1::Request>,
) -> Result<get_room_information::v1::Response> {
    let alias = &req.body.room_alias;
    if alias.server_name() != services.server_name() {
        return Err(Error::not_found("The alias is not of this server"));
    }
    let record = services
        .directory
        .resolve(alias)?
        .ok_or_else(|| Error::not_found("Room alias not found"))?;
    // This server first: it holds the alias and, most often, the room.
    let mut servers = vec![services.server_name().to_owned()];
    let mut seen = BTreeSet::from([services.server_name().to_owned()]);
    for (member, membership) in services.rooms.members(&record.room_id)?.iter() {
        if servers.len() >= MAX_SERVERS {
            break;
        }
        if membership == "join" && seen.insert(member.server_name().to_owned()) {
            servers.push(member.server_name().to_owned());
        }
    }
    Ok(get_room_information::v1::Response::new(record.room_id, servers))
}
