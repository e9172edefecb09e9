//! Room aliases and the public room directory.

use ruma::{
    RoomId, UInt,
    api::client::{
        alias::{
            create_alias::v3 as create_alias, delete_alias::v3 as delete_alias,
            get_alias::v3 as get_alias,
        },
        directory::{
            get_public_rooms::v3 as public_rooms,
            get_public_rooms_filtered::v3 as public_rooms_filtered,
            get_room_visibility::v3 as get_visibility, set_room_visibility::v3 as set_visibility,
        },
        room::{Visibility, aliases::v3 as room_aliases},
    },
    directory::{PublicRoomsChunk, RoomTypeFilter},
    room::RoomType,
};

use crate::{
    api::{Ruma, State},
    error::{Error, ErrorKind, Result},
    service::Services,
};

/// Largest page of the public room directory.
const MAX_PAGE: usize = 500;

/// `PUT /_matrix/client/v3/directory/room/{roomAlias}`
pub async fn create(
    services: State,
    req: Ruma<create_alias::Request>,
) -> Result<create_alias::Response> {
    let caller = req.caller()?.clone();
    let body = req.body;
    let acting = caller.appservice.as_ref().map(|a| a.id());
    services.appservices.check_alias_free(&body.room_alias, acting)?;
    if services.rooms.membership(&body.room_id, &caller.user_id)?.as_deref() != Some("join")
        && !caller.admin
    {
        return Err(Error::forbidden("You must be in the room to give it an alias"));
    }
    let taken = || Error::new(ErrorKind::Conflict, "Room alias already exists");
    services.directory.create_alias(
        &services,
        &body.room_alias,
        &body.room_id,
        &caller.user_id,
        taken,
    )?;
    Ok(create_alias::Response::new())
}

/// `GET /_matrix/client/v3/directory/room/{roomAlias}`
pub async fn get(services: State, req: Ruma<get_alias::Request>) -> Result<get_alias::Response> {
    let alias = &req.body.room_alias;
    if alias.server_name() != services.server_name() {
        let (room_id, servers) = services
            .remote
            .room_alias(&services, alias)
            .await?
            .ok_or_else(|| Error::not_found("Room alias not found"))?;
        return Ok(get_alias::Response::new(room_id, servers));
    }
    services.appservices.query_alias(&services, alias).await?;
    let record = services
        .directory
        .resolve(alias)?
        .ok_or_else(|| Error::not_found("Room alias not found"))?;
    Ok(get_alias::Response::new(record.room_id, vec![services.server_name().to_owned()]))
}

/// `DELETE /_matrix/client/v3/directory/room/{roomAlias}`
pub async fn delete(
    services: State,
    req: Ruma<delete_alias::Request>,
) -> Result<delete_alias::Response> {
    let caller = req.caller()?.clone();
    services.directory.delete_alias(
        &services,
        &req.body.room_alias,
        &caller.user_id,
        caller.admin,
    )?;
    Ok(delete_alias::Response::new())
}

/// `GET /_matrix/client/v3/rooms/{roomId}/aliases`
pub async fn aliases(
    services: State,
    req: Ruma<room_aliases::Request>,
) -> Result<room_aliases::Response> {
    let caller = req.caller()?.clone();
    services.rooms.readable_state(&req.body.room_id, &caller.user_id)?;
    Ok(room_aliases::Response::new(services.directory.aliases_of(&req.body.room_id)?))
}

/// `GET /_matrix/client/v3/directory/list/room/{roomId}`
pub async fn visibility(
    services: State,
    req: Ruma<get_visibility::Request>,
) -> Result<get_visibility::Response> {
    if services.rooms.room(&req.body.room_id)?.is_none() {
        return Err(Error::not_found("Unknown room"));
    }
    let public = services.directory.is_published(&req.body.room_id)?;
    Ok(get_visibility::Response::new(if public { Visibility::Public } else { Visibility::Private }))
}

/// `PUT /_matrix/client/v3/directory/list/room/{roomId}`: room moderators (who may set the
/// canonical alias) and server admins.
pub async fn set_visibility(
    services: State,
    req: Ruma<set_visibility::Request>,
) -> Result<set_visibility::Response> {
    let caller = req.caller()?.clone();
    let room_id = &req.body.room_id;
    if services.rooms.room(room_id)?.is_none() {
        return Err(Error::not_found("Unknown room"));
    }
    if !caller.admin
        && !services.rooms.may_send_state(room_id, &caller.user_id, "m.room.canonical_alias")?
    {
        return Err(Error::forbidden("You may not change this room's directory listing"));
    }
    services.directory.set_published(room_id, req.body.visibility == Visibility::Public)?;
    Ok(set_visibility::Response::new())
}

/// A page of the directory: rooms sorted by joined members, filtered, from offset `since`.
pub(crate) struct Page {
    pub(crate) chunk: Vec<PublicRoomsChunk>,
    pub(crate) next_batch: Option<String>,
    pub(crate) prev_batch: Option<String>,
    pub(crate) total: usize,
}

fn chunk(services: &Services, room_id: &RoomId) -> Result<PublicRoomsChunk> {
    let summary = crate::service::rooms::summary::summary(services, room_id)?;
    serde_json::from_value(summary).map_err(Error::internal)
}

pub(crate) fn page(
    services: &Services,
    limit: Option<UInt>,
    since: Option<&str>,
    search: Option<&str>,
    room_types: &[RoomTypeFilter],
) -> Result<Page> {
    let offset: usize = match since {
        Some(token) => {
            token.parse().map_err(|_| Error::invalid_param("Invalid pagination token"))?
        }
        None => 0,
    };
    let limit = limit.map_or(100, |l| u64::from(l) as usize).clamp(1, MAX_PAGE);
    let search = search.map(str::to_lowercase);
    let mut rooms = Vec::new();
    for room_id in services.directory.published_rooms()? {
        let chunk = chunk(services, &room_id)?;
        let matches_search = search.as_ref().is_none_or(|term| {
            [
                chunk.name.as_deref(),
                chunk.topic.as_deref(),
                chunk.canonical_alias.as_ref().map(|a| a.as_str()),
            ]
            .into_iter()
            .flatten()
            .any(|text| text.to_lowercase().contains(term))
        });
        let matches_type = room_types.is_empty()
            || room_types.iter().any(|filter| match filter {
                RoomTypeFilter::Default => chunk.room_type.is_none(),
                RoomTypeFilter::Space => chunk.room_type == Some(RoomType::Space),
                other => {
                    chunk.room_type.as_ref().map(|t| t.as_str())
                        == Some(other.as_str().unwrap_or_default())
                }
            });
        if matches_search && matches_type {
            rooms.push(chunk);
        }
    }
    rooms.sort_by(|a, b| {
        b.num_joined_members.cmp(&a.num_joined_members).then(a.room_id.cmp(&b.room_id))
    });
    let total = rooms.len();
    let chunk: Vec<_> = rooms.into_iter().skip(offset).take(limit).collect();
    let end = offset + chunk.len();
    Ok(Page {
        chunk,
        next_batch: (end < total).then(|| end.to_string()),
        prev_batch: (offset > 0).then(|| offset.saturating_sub(limit).to_string()),
        total,
    })
}

/// `GET /_matrix/client/v3/publicRooms`: this server's directory for anyone; another
/// server's (`server=`) only for a signed-in user, so nobody can make us query servers.
pub async fn public(
    services: State,
    req: Ruma<public_rooms::Request>,
) -> Result<public_rooms::Response> {
    let body = &req.body;
    if let Some(server) = body.server.as_deref().filter(|s| *s != services.server_name()) {
        req.caller()?;
        let mut request = ruma::api::federation::directory::get_public_rooms::v1::Request::new();
        request.limit = body.limit;
        request.since = body.since.clone();
        let remote = services.federation.send(server, request).await?;
        let mut response = public_rooms::Response::new(remote.chunk);
        response.next_batch = remote.next_batch;
        response.prev_batch = remote.prev_batch;
        response.total_room_count_estimate = remote.total_room_count_estimate;
        return Ok(response);
    }
    let page = page(&services, body.limit, body.since.as_deref(), None, &[])?;
    let mut response = public_rooms::Response::new(page.chunk);
    response.next_batch = page.next_batch;
    response.prev_batch = page.prev_batch;
    response.total_room_count_estimate = UInt::try_from(page.total).ok();
    Ok(response)
}

/// `POST /_matrix/client/v3/publicRooms`
pub async fn public_filtered(
    services: State,
    req: Ruma<public_rooms_filtered::Request>,
) -> Result<public_rooms_filtered::Response> {
    req.caller()?;
    let body = req.body;
    if let Some(server) = body.server.as_deref().filter(|s| *s != services.server_name()) {
        use ruma::api::federation::directory::get_public_rooms_filtered::v1 as remote_filtered;
        let mut request = remote_filtered::Request::new();
        request.limit = body.limit;
        request.since = body.since.clone();
        request.filter = body.filter.clone();
        request.room_network = body.room_network.clone();
        let remote = services.federation.send(server, request).await?;
        let mut response = public_rooms_filtered::Response::new();
        response.chunk = remote.chunk;
        response.next_batch = remote.next_batch;
        response.prev_batch = remote.prev_batch;
        response.total_room_count_estimate = remote.total_room_count_estimate;
        return Ok(response);
    }
    let filter = &body.filter;
    let page = page(
        &services,
        body.limit,
        body.since.as_deref(),
        filter.generic_search_term.as_deref(),
        &filter.room_types,
    )?;
    let mut response = public_rooms_filtered::Response::new();
    response.chunk = page.chunk;
    response.next_batch = page.next_batch;
    response.prev_batch = page.prev_batch;
    response.total_room_count_estimate = UInt::try_from(page.total).ok();
    Ok(response)
}
