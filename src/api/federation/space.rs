//! Spaces for other servers: `/hierarchy` describes a space held here and its direct children.

use ruma::api::federation::space::get_hierarchy::v1 as get_hierarchy;

use super::Federated;
use crate::{api::State, error::Result, service::federation::hierarchy};

/// `GET /_matrix/federation/v1/hierarchy/{roomId}`
pub async fn hierarchy(
    services: State,
    req: Federated<get_hierarchy::Request>,
) -> Result<get_hierarchy::Response> {
    let body = req.body;
    hierarchy::answer(&services, &req.origin, &body.room_id, body.suggested_only)
}
