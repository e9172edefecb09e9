//! Profiles: the whole profile and single fields (`displayname`, `avatar_url`, custom ones).

use ruma::{
    UserId,
    api::client::profile::{
        delete_profile_field::v3 as delete_field, get_profile::v3 as get_profile,
        get_profile_field::v3 as get_field, set_profile_field::v3 as set_field,
    },
    profile::ProfileFieldValue,
};

use crate::{
    api::{Ruma, State},
    error::{Error, Result},
    service::{rooms::membership, users::Profile},
};

/// A local user's profile, or a remote one's from their server (cached briefly).
async fn profile_of(services: &State, user_id: &UserId) -> Result<Profile> {
    if user_id.server_name() != services.server_name() {
        return services.remote.profile(services, user_id).await;
    }
    match services.users.get(user_id)? {
        Some(_) => services.users.profile(user_id),
        None => Err(Error::not_found("Profile not found")),
    }
}

/// Gives the application service owning a local user id that does not exist yet the chance
/// to create it.
async fn query_appservices(services: &State, user_id: &ruma::UserId) -> Result<()> {
    if user_id.server_name() == services.server_name() {
        services.appservices.query_user(services, user_id).await?;
    }
    Ok(())
}

/// `GET /_matrix/client/v3/profile/{userId}`
pub async fn get_profile(
    services: State,
    req: Ruma<get_profile::Request>,
) -> Result<get_profile::Response> {
    query_appservices(&services, &req.body.user_id).await?;
    Ok(profile_of(&services, &req.body.user_id).await?.into_iter().collect())
}

/// `GET /_matrix/client/v3/profile/{userId}/{field}`
pub async fn get_field(
    services: State,
    req: Ruma<get_field::Request>,
) -> Result<get_field::Response> {
    query_appservices(&services, &req.body.user_id).await?;
    let mut profile = profile_of(&services, &req.body.user_id).await?;
    let field = req.body.field.as_str();
    let value = profile.remove(field).ok_or_else(|| Error::not_found("Profile field not set"))?;
    let value = ProfileFieldValue::new(field, value).map_err(Error::internal)?;
    Ok(get_field::Response::new(value))
}

/// `PUT /_matrix/client/v3/profile/{userId}/{field}`
pub async fn set_field(
    services: State,
    req: Ruma<set_field::Request>,
) -> Result<set_field::Response> {
    let caller = req.caller()?.clone();
    caller.must_be(&req.body.user_id)?;
    let value = &req.body.value;
    let name = value.field_name();
    {
        let _guard = services.sessions.lock_user(&caller.user_id);
        let mut batch = services.db.batch();
        let field_value = Some(value.value().into_owned());
        services.users.set_profile_field(
            &mut batch,
            &caller.user_id,
            name.as_str(),
            field_value,
        )?;
        services.db.write(batch)?;
    }
    propagate(&services, &caller.user_id, name.as_str()).await;
    Ok(set_field::Response::new())
}

/// `DELETE /_matrix/client/v3/profile/{userId}/{field}`
pub async fn delete_field(
    services: State,
    req: Ruma<delete_field::Request>,
) -> Result<delete_field::Response> {
    let caller = req.caller()?.clone();
    caller.must_be(&req.body.user_id)?;
    let guard = services.sessions.lock_user(&caller.user_id);
    let mut batch = services.db.batch();
    services.users.set_profile_field(&mut batch, &caller.user_id, req.body.field.as_str(), None)?;
    services.db.write(batch)?;
    drop(guard);
    propagate(&services, &caller.user_id, req.body.field.as_str()).await;
    Ok(delete_field::Response::new())
}

/// After a display name or avatar change, refreshes the user's member event in every joined
/// room so other members see the new name (failures are logged, the profile change stands).
pub async fn propagate(services: &State, user_id: &UserId, field: &str) {
    if !matches!(field, "displayname" | "avatar_url") {
        return;
    }
    let rooms = match services.rooms.rooms_of(user_id, "join") {
        Ok(rooms) => rooms,
        Err(err) => return tracing::warn!(%err, "cannot list rooms for a profile update"),
    };
    for room_id in rooms {
        if let Err(err) = membership::join(services, &room_id, user_id, None, None).await {
            tracing::warn!(%err, %room_id, "cannot update member event after a profile change");
        }
    }
}
