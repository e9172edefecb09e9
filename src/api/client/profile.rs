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
    service::users::Profile,
};

fn profile_of(services: &State, user_id: &UserId) -> Result<Profile> {
    match services.users.get(user_id)? {
        Some(_) => services.users.profile(user_id),
        None => Err(Error::not_found("Profile not found")),
    }
}

/// `GET /_matrix/client/v3/profile/{userId}`
pub async fn get_profile(
    services: State,
    req: Ruma<get_profile::Request>,
) -> Result<get_profile::Response> {
    Ok(profile_of(&services, &req.body.user_id)?.into_iter().collect())
}

/// `GET /_matrix/client/v3/profile/{userId}/{field}`
pub async fn get_field(
    services: State,
    req: Ruma<get_field::Request>,
) -> Result<get_field::Response> {
    let mut profile = profile_of(&services, &req.body.user_id)?;
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
    let caller = req.caller()?;
    caller.must_be(&req.body.user_id)?;
    let value = &req.body.value;
    let mut batch = services.db.batch();
    let name = value.field_name();
    services.users.set_profile_field(
        &mut batch,
        &caller.user_id,
        name.as_str(),
        Some(value.value().into_owned()),
    )?;
    services.db.write(batch)?;
    Ok(set_field::Response::new())
}

/// `DELETE /_matrix/client/v3/profile/{userId}/{field}`
pub async fn delete_field(
    services: State,
    req: Ruma<delete_field::Request>,
) -> Result<delete_field::Response> {
    let caller = req.caller()?;
    caller.must_be(&req.body.user_id)?;
    let mut batch = services.db.batch();
    services.users.set_profile_field(&mut batch, &caller.user_id, req.body.field.as_str(), None)?;
    services.db.write(batch)?;
    Ok(delete_field::Response::new())
}
