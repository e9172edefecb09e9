//! Logging in and out, and refreshing tokens.

use ruma::api::client::{
    session::{
        get_login_types::v3::{self as login_types, LoginType, PasswordLoginType},
        login::v3::{self as login, LoginInfo},
        logout::v3 as logout,
        logout_all::v3 as logout_all,
        refresh_token::v3 as refresh,
    },
    uiaa::UserIdentifier,
};

use crate::{
    api::{Ruma, State},
    error::{Error, ErrorKind, Result},
    service::{
        audit::Entry,
        users::{self, Users},
    },
};

/// `GET /_matrix/client/v3/login`
pub async fn login_types(_: State, _: Ruma<login_types::Request>) -> Result<login_types::Response> {
    Ok(login_types::Response::new(vec![
        LoginType::Password(PasswordLoginType::default()),
        LoginType::ApplicationService(Default::default()),
    ]))
}

/// `POST /_matrix/client/v3/login`
pub async fn login(services: State, req: Ruma<login::Request>) -> Result<login::Response> {
    let body = req.body;
    let info = match body.login_info {
        LoginInfo::Password(info) => info,
        LoginInfo::ApplicationService(info) => {
            let appservice = req.caller.and_then(|c| c.appservice).ok_or_else(|| {
                Error::new(ErrorKind::MissingToken, "An application service token is required")
            })?;
            #[allow(deprecated)]
            let name = match (&info.identifier, &info.user) {
                (Some(UserIdentifier::Matrix(id)), _) => id.user.clone(),
                (None, Some(user)) => user.clone(),
                _ => return Err(Error::new(ErrorKind::MissingParam, "Missing identifier")),
            };
            let user_id = Users::parse_local_user(&name, services.server_name())?;
            if !appservice.owns_user(&user_id) {
                return Err(Error::forbidden(
                    "This user is not in the application service's namespace",
                ));
            }
            let record = services.users.get(&user_id)?.filter(|u| !u.deactivated);
            if record.is_none() {
                return Err(Error::forbidden(
                    "The application service has not registered this user",
                ));
            }
            return issue_login(
                &services,
                user_id,
                body.device_id,
                body.initial_device_display_name,
                body.refresh_token,
            );
        }
        _ => return Err(Error::new(ErrorKind::Unknown, "Unsupported login type")),
    };
    #[allow(deprecated)]
    let name = match (&info.identifier, &info.user) {
        (Some(UserIdentifier::Matrix(id)), _) => id.user.as_str(),
        (None, Some(user)) => user.as_str(),
        (Some(_), _) => {
            return Err(Error::new(ErrorKind::Unknown, "Only user id identifiers are supported"));
        }
        (None, None) => return Err(Error::new(ErrorKind::MissingParam, "Missing identifier")),
    };
    let forbidden = || Error::forbidden("Invalid username or password");
    let parsed = Users::parse_local_user(name, services.server_name());
    // Failures count per account whatever address they come from.
    let account = match &parsed {
        Ok(user_id) => user_id.as_str(),
        Err(_) => name,
    };
    services.abuse.check_login(&services.audit, account, name)?;
    let failed = |reason| services.abuse.login_failed(&services.audit, account, name, reason);
    let user_id = match &parsed {
        Ok(user_id) => user_id.clone(),
        Err(_) => {
            failed("invalid_user")?;
            return Err(forbidden());
        }
    };
    let record = services.users.get(&user_id)?;
    let hash = record.as_ref().and_then(|r| r.password_hash.clone());
    // Verify even for unknown users so timing does not reveal which accounts exist.
    let verified = users::verify_password(info.password, hash).await;
    let Some(record) = record.filter(|_| verified) else {
        tracing::info!(%user_id, ip = ?req.ip, "failed login");
        failed("bad_credentials")?;
        return Err(forbidden());
    };
    if record.deactivated {
        failed("deactivated")?;
        return Err(Error::new(ErrorKind::UserDeactivated, "This account has been deactivated"));
    }
    if record.locked {
        failed("locked")?;
        return Err(Error::new(ErrorKind::UserLocked, "This account has been locked"));
    }
    tracing::info!(%user_id, ip = ?req.ip, "logging in");
    issue_login(
        &services,
        user_id,
        body.device_id,
        body.initial_device_display_name,
        body.refresh_token,
    )
}

/// Issues a session (device and tokens) for `user_id`, recording the login.
fn issue_login(
    services: &State,
    user_id: ruma::OwnedUserId,
    device_id: Option<ruma::OwnedDeviceId>,
    display_name: Option<String>,
    refresh_token: bool,
) -> Result<login::Response> {
    let user_lock = services.sessions.lock_user(&user_id);
    let mut batch = services.db.batch();
    let issued = services.sessions.issue(
        &mut batch,
        &user_id,
        device_id.as_deref(),
        display_name,
        refresh_token,
    )?;
    let entry = Entry::new("user.login", Some(&user_id)).target(&user_id).device(&issued.device_id);
    services.audit.commit(batch, [entry])?;
    drop(user_lock);
    services.e2ee.devices_changed(services, &user_id, std::slice::from_ref(&issued.device_id))?;
    tracing::info!(%user_id, device_id = %issued.device_id, "logged in");

    let mut response = login::Response::new(user_id, issued.access_token, issued.device_id);
    response.refresh_token = issued.refresh_token;
    response.expires_in = issued.expires_in;
    Ok(response)
}

/// `POST /_matrix/client/v3/logout`: ends this session and deletes its device.
pub async fn logout(services: State, req: Ruma<logout::Request>) -> Result<logout::Response> {
    let caller = req.caller()?;
    let user_lock = services.sessions.lock_user(&caller.user_id);
    let mut batch = services.db.batch();
    services.sessions.delete_devices(
        &services,
        &mut batch,
        &caller.user_id,
        [&*caller.device_id],
    )?;
    let entry = Entry::new("user.logout", Some(&caller.user_id)).target(&caller.device_id);
    services.audit.commit(batch, [entry])?;
    drop(user_lock);
    services.e2ee.forget_deleted_devices(&services, &caller.user_id)?;
    Ok(logout::Response::new())
}

/// `POST /_matrix/client/v3/logout/all`: ends every session of the account.
pub async fn logout_all(
    services: State,
    req: Ruma<logout_all::Request>,
) -> Result<logout_all::Response> {
    let caller = req.caller()?;
    let user_lock = services.sessions.lock_user(&caller.user_id);
    let mut batch = services.db.batch();
    services.sessions.delete_all_devices(&services, &mut batch, &caller.user_id, None)?;
    let entry = Entry::new("user.logout_all", Some(&caller.user_id)).target(&caller.user_id);
    services.audit.commit(batch, [entry])?;
    drop(user_lock);
    services.e2ee.forget_deleted_devices(&services, &caller.user_id)?;
    Ok(logout_all::Response::new())
}

/// `POST /_matrix/client/v3/refresh`
pub async fn refresh(services: State, req: Ruma<refresh::Request>) -> Result<refresh::Response> {
    let issued = services.sessions.refresh(&req.body.refresh_token)?;
    let mut response = refresh::Response::new(issued.access_token);
    response.refresh_token = issued.refresh_token;
    response.expires_in_ms = issued.expires_in;
    Ok(response)
}
