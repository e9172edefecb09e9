//! `make_join`/`send_join`, `make_leave`/`send_leave` and `make_knock`/`send_knock`: other
//! servers' users joining, leaving and knocking on rooms this server is in; and `invite`:
//! other servers inviting this server's users.

use ruma::api::federation::membership::{
    create_invite, create_join_event, create_knock_event, create_leave_event, prepare_join_event,
    prepare_knock_event, prepare_leave_event,
};
use serde_json::value::to_raw_value;

use super::Federated;
use crate::{
    api::State,
    error::{Error, Result},
    service::federation::{
        invite::{ReceivedInvite, receive_invite},
        membership::{Membership, join_answer, make_membership, send_membership, stripped_state},
    },
};

fn template(event: &ruma::CanonicalJsonObject) -> Result<Box<serde_json::value::RawValue>> {
    to_raw_value(event).map_err(Error::internal)
}

/// `GET /_matrix/federation/v1/make_join/{roomId}/{userId}`.
pub async fn make_join(
    services: State,
    req: Federated<prepare_join_event::v1::Request>,
) -> Result<prepare_join_event::v1::Response> {
    let body = req.body;
    let (version, event) = make_membership(
        &services,
        &req.origin,
        &body.room_id,
        &body.user_id,
        Membership::Join,
        Some(&body.ver),
    )?;
    let mut response = prepare_join_event::v1::Response::new(template(&event)?);
    response.room_version = Some(version);
    Ok(response)
}

/// `PUT /_matrix/federation/v2/send_join/{roomId}/{eventId}` (`omit_members` is not honoured:
/// the full state is sent).
pub async fn send_join(
    services: State,
    req: Federated<create_join_event::v2::Request>,
) -> Result<create_join_event::v2::Response> {
    let body = req.body;
    let event = send_membership(
        &services,
        &req.origin,
        &body.room_id,
        &body.event_id,
        &body.pdu,
        Membership::Join,
    )
    .await?;
    let state = join_answer(&services, &body.room_id, &body.event_id, &event)?;
    Ok(create_join_event::v2::Response::new(state))
}

/// `GET /_matrix/federation/v1/make_leave/{roomId}/{userId}`.
pub async fn make_leave(
    services: State,
    req: Federated<prepare_leave_event::v1::Request>,
) -> Result<prepare_leave_event::v1::Response> {
    let body = req.body;
    let (version, event) = make_membership(
        &services,
        &req.origin,
        &body.room_id,
        &body.user_id,
        Membership::Leave,
        None,
    )?;
    Ok(prepare_leave_event::v1::Response::new(Some(version), template(&event)?))
}

/// `PUT /_matrix/federation/v2/send_leave/{roomId}/{eventId}`.
pub async fn send_leave(
    services: State,
    req: Federated<create_leave_event::v2::Request>,
) -> Result<create_leave_event::v2::Response> {
    let body = req.body;
    send_membership(
        &services,
        &req.origin,
        &body.room_id,
        &body.event_id,
        &body.pdu,
        Membership::Leave,
    )
    .await?;
    Ok(create_leave_event::v2::Response::new())
}

/// `GET /_matrix/federation/v1/make_knock/{roomId}/{userId}`.
pub async fn make_knock(
    services: State,
    req: Federated<prepare_knock_event::v1::Request>,
) -> Result<prepare_knock_event::v1::Response> {
    let body = req.body;
    let (version, event) = make_membership(
        &services,
        &req.origin,
        &body.room_id,
        &body.user_id,
        Membership::Knock,
        Some(&body.ver),
    )?;
    Ok(prepare_knock_event::v1::Response::new(version, template(&event)?))
}

/// `PUT /_matrix/federation/v1/send_knock/{roomId}/{eventId}`.
pub async fn send_knock(
    services: State,
    req: Federated<create_knock_event::v1::Request>,
) -> Result<create_knock_event::v1::Response> {
    let body = req.body;
    send_membership(
        &services,
        &req.origin,
        &body.room_id,
        &body.event_id,
        &body.pdu,
        Membership::Knock,
    )
    .await?;
    Ok(create_knock_event::v1::Response::new(stripped_state(&services, &body.room_id)?))
}

/// `PUT /_matrix/federation/v2/invite/{roomId}/{eventId}`.
pub async fn invite(
    services: State,
    req: Federated<create_invite::v2::Request>,
) -> Result<create_invite::v2::Response> {
    let body = &req.body;
    let invite = ReceivedInvite {
        room_id: &body.room_id,
        event_id: &body.event_id,
        room_version: &body.room_version,
        event: &body.event,
        invite_room_state: &body.invite_room_state,
    };
    let versions = crate::api::client::discovery::ROOM_VERSIONS;
    let event = receive_invite(&services, &req.origin, invite, versions).await?;
    Ok(create_invite::v2::Response::new(template(&event)?))
}
