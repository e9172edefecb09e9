//! `/_matrix/federation/v1/publicRooms`: this server's room directory, for other servers'
//! users.

use ruma::{
    UInt,
    api::federation::directory::{get_public_rooms, get_public_rooms_filtered},
};

use super::Federated;
use crate::{
    api::{State, client::directory::page},
    error::Result,
};

/// `GET /_matrix/federation/v1/publicRooms`.
pub async fn public_rooms(
    services: State,
    req: Federated<get_public_rooms::v1::Request>,
) -> Result<get_public_rooms::v1::Response> {
    let body = req.body;
    let page = page(&services, body.limit, body.since.as_deref(), None, &[])?;
    let mut response = get_public_rooms::v1::Response::new();
    response.chunk = page.chunk;
    response.next_batch = page.next_batch;
    response.prev_batch = page.prev_batch;
    response.total_room_count_estimate = UInt::try_from(page.total).ok();
    Ok(response)
}

/// `POST /_matrix/federation/v1/publicRooms`.
pub async fn public_rooms_filtered(
    services: State,
    req: Federated<get_public_rooms_filtered::v1::Request>,
) -> Result<get_public_rooms_filtered::v1::Response> {
    let body = req.body;
    let filter = &body.filter;
    let page = page(
        &services,
        body.limit,
        body.since.as_deref(),
        filter.generic_search_term.as_deref(),
        &filter.room_types,
    )?;
    let mut response = get_public_rooms_filtered::v1::Response::new();
    response.chunk = page.chunk;
    response.next_batch = page.next_batch;
    response.prev_batch = page.prev_batch;
    response.total_room_count_estimate = UInt::try_from(page.total).ok();
    Ok(response)
}
