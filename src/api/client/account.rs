//! The account itself: `whoami`, password changes, deactivation and the third-party
//! identifier endpoints (this server keeps no e-mail addresses or phone numbers).

use ruma::api::{
    IncomingRequest,
    client::account::{
        ThirdPartyIdRemovalStatus, change_password::v3 as change_password,
        deactivate::v3 as deactivate, delete_3pid::v3 as delete_3pid, get_3pids::v3 as get_3pids,
        unbind_3pid::v3 as unbind_3pid, whoami::v3 as whoami,
    },
};

use serde_json::json;

use crate::{
    api::{Ruma, State},
    error::{Error, ErrorKind, Result},
    service::{
        audit::Entry,
        offboarding::Deactivation,
        uiaa::{self, PASSWORD},
        users,
    },
};

/// `GET /_matrix/client/v3/account/whoami`
pub async fn whoami(services: State, req: Ruma<whoami::Request>) -> Result<whoami::Response> {
    let caller = req.caller()?.clone();
    let guest = services.users.get(&caller.user_id)?.is_some_and(|u| u.guest);
    let mut response = whoami::Response::new(caller.user_id.clone(), guest);
    response.device_id = Some(caller.device_id.clone());
    Ok(response)
}

/// `POST /_matrix/client/v3/account/password`
pub async fn change_password(
    services: State,
    req: Ruma<change_password::Request>,
) -> Result<change_password::Response> {
    let caller = req.caller()?.clone();
    users::check_password_strength(
        &req.body.new_password,
        services.config.registration.min_password_length,
    )?;
    uiaa::authorize(&services, req.body.auth.as_ref(), &[&[PASSWORD]], Some(&caller.user_id))
        .await?;
    let hash = users::hash_password(req.body.new_password).await?;
    // Re-read under the lock so a concurrent deactivation is never undone.
    let user_lock = services.sessions.lock_user(&caller.user_id);
    let mut record =
        services.users.get(&caller.user_id)?.ok_or_else(|| Error::not_found("No such user"))?;
    if record.deactivated {
        return Err(Error::new(ErrorKind::UserDeactivated, "This account has been deactivated"));
    }
    record.password_hash = Some(hash);
    let mut batch = services.db.batch();
    services.users.put(&mut batch, &caller.user_id, &record);
    if req.body.logout_devices {
        services.sessions.delete_all_devices(
            &services,
            &mut batch,
            &caller.user_id,
            Some(&caller.device_id),
        )?;
    }
    let entry = Entry::new("user.password_change", Some(&caller.user_id))
        .target(&caller.user_id)
        .details(json!({ "logout_devices": req.body.logout_devices }));
    services.audit.commit(batch, [entry])?;
    drop(user_lock);
    services.e2ee.forget_deleted_devices(&services, &caller.user_id)?;
    tracing::info!(user_id = %caller.user_id, "password changed");
    Ok(change_password::Response::new())
}

/// `POST /_matrix/client/v3/account/deactivate`: the account can never log in again; its
/// sessions, keys, pushers and profile go at once, and a background job takes it out of every
/// room. Nothing is bound to an identity server, so unbinding always succeeds.
pub async fn deactivate(
    services: State,
    req: Ruma<deactivate::Request>,
) -> Result<deactivate::Response> {
    let caller = req.caller()?.clone();
    uiaa::authorize(&services, req.body.auth.as_ref(), &[&[PASSWORD]], Some(&caller.user_id))
        .await?;
    let request = Deactivation {
        actor: caller.user_id.clone(),
        erase: req.body.erase,
        successor: None,
        action: "user.deactivate",
    };
    services.deactivate_account(&caller.user_id, request)?;
    Ok(deactivate::Response::new(ThirdPartyIdRemovalStatus::Success))
}

/// `GET /_matrix/client/v3/account/3pid`: always empty.
pub async fn get_3pids(_: State, req: Ruma<get_3pids::Request>) -> Result<get_3pids::Response> {
    req.caller()?;
    Ok(get_3pids::Response::new(Vec::new()))
}

/// `POST /_matrix/client/v3/account/3pid/delete`: nothing is bound, so nothing to do.
pub async fn delete_3pid(
    _: State,
    req: Ruma<delete_3pid::Request>,
) -> Result<delete_3pid::Response> {
    req.caller()?;
    Ok(delete_3pid::Response::new(ThirdPartyIdRemovalStatus::NoSupport))
}

/// `POST /_matrix/client/v3/account/3pid/unbind`: nothing is bound, so nothing to do.
pub async fn unbind_3pid(
    _: State,
    req: Ruma<unbind_3pid::Request>,
) -> Result<unbind_3pid::Response> {
    req.caller()?;
    Ok(unbind_3pid::Response::new(ThirdPartyIdRemovalStatus::NoSupport))
}

/// Adding identifiers and e-mail/SMS validation: refused, this server does not handle them.
pub async fn threepid_denied<T: IncomingRequest>(
    _: State,
    _: Ruma<T>,
) -> Result<T::OutgoingResponse> {
    Err(Error::new(
        ErrorKind::ThreepidDenied,
        "Third-party identifiers are not supported on this server",
    ))
}
