//! Account registration: `register`, `register/available` and registration-token validity.

use ruma::api::client::account::{
    check_registration_token_validity::v1 as token_validity,
    get_username_availability::v3 as availability,
    register::{LoginType, RegistrationKind, v3 as register},
};

use crate::{
    api::{Ruma, State},
    config::RegistrationMode,
    error::{Error, ErrorKind, Result},
    service::{
        appservice::registration::Registered,
        audit::Entry,
        random_string,
        uiaa::{self, DUMMY, REGISTRATION_TOKEN, Stage},
        users::{self, Users},
    },
};

/// The UIA flows registration currently offers, or `M_FORBIDDEN` when it is closed.
fn flows(services: &State) -> Result<&'static [&'static [Stage]]> {
    match services.config.registration.mode {
        RegistrationMode::Open => Ok(&[&[DUMMY]]),
        RegistrationMode::Token => Ok(&[&[REGISTRATION_TOKEN]]),
        RegistrationMode::Disabled if services.registration.first_admin_token()?.is_some() => {
            Ok(&[&[REGISTRATION_TOKEN]])
        }
        RegistrationMode::Disabled => {
            Err(Error::forbidden("Registration is disabled on this server"))
        }
    }
}

/// `POST /_matrix/client/v3/register`
pub async fn register(services: State, req: Ruma<register::Request>) -> Result<register::Response> {
    let appservice = req.caller.as_ref().and_then(|c| c.appservice.clone());
    if req.body.login_type.as_ref() == Some(&LoginType::ApplicationService) {
        let appservice = appservice.ok_or_else(|| {
            Error::new(ErrorKind::MissingToken, "An application service token is required")
        })?;
        return register_appservice_user(&services, &appservice, req.body);
    }
    if appservice.is_some() {
        return Err(Error::new(
            ErrorKind::MissingParam,
            "Application services register users with type m.login.application_service",
        ));
    }
    let ip = req.ip.map(|addr| addr.ip());
    services.abuse.check_registration(ip)?;
    let mut body = req.body;
    let guest = body.kind == RegistrationKind::Guest;
    if guest && !services.config.registration.allow_guests {
        return Err(Error::new(ErrorKind::GuestAccessForbidden, "Guest access is disabled"));
    }
    let flows = if guest { None } else { Some(flows(&services)?) };

    let localpart = match (&body.username, guest) {
        (Some(name), false) => name.to_lowercase(),
        _ => random_string(12).to_lowercase(),
    };
    let user_id = Users::new_user_id(&localpart, services.server_name())?;
    if services.users.get(&user_id)?.is_some() || services.is_notices_localpart(&localpart) {
        return Err(Error::new(ErrorKind::UserInUse, "User id already taken"));
    }
    services.appservices.check_user_free(&user_id, None)?;
    let password = match (body.password.take(), guest) {
        (Some(password), false) => {
            users::check_password_strength(
                &password,
                services.config.registration.min_password_length,
            )?;
            Some(password)
        }
        (None, false) => return Err(Error::new(ErrorKind::MissingParam, "A password is required")),
        (_, true) => None,
    };

    let authorized = match flows {
        Some(flows) => uiaa::authorize(&services, body.auth.as_ref(), flows, None).await?,
        None => uiaa::Authorized::default(),
    };
    let password_hash = match password {
        Some(password) => Some(users::hash_password(password).await?),
        None => None,
    };

    let guard = services.registration.lock.lock().await;
    if services.users.get(&user_id)?.is_some() {
        return Err(Error::new(ErrorKind::UserInUse, "User id already taken"));
    }
    // Checked under the lock, spent only once the account exists: a registration that fails
    // costs nothing.
    services.abuse.check_registration(ip)?;
    let mut batch = services.db.batch();
    let mut admin = false;
    if let Some(token) = &authorized.registration_token {
        admin = services.registration.consume(&mut batch, &services.config, token)?.ok_or_else(
            || Error::new(ErrorKind::Unauthorized, "Registration token is no longer valid"),
        )?;
    }
    if !guest {
        services.registration.retire_first_admin_token(&mut batch);
    }
    services.users.create(&mut batch, &user_id, password_hash, admin, guest, None);
    if !guest {
        services.queue_onboarding(&mut batch, &user_id);
    }
    let issued = issue(&services, &mut batch, &user_id, body)?;
    let mut entries = vec![
        Entry::new("user.register", Some(&user_id))
            .target(&user_id)
            .details(serde_json::json!({ "admin": admin, "guest": guest })),
    ];
    if let Some(issued) = &issued {
        entries[0].device_id = Some(issued.device_id.to_string());
        entries.push(
            Entry::new("device.add", Some(&user_id))
                .target(&issued.device_id)
                .device(&issued.device_id),
        );
    }
    services.audit.commit(batch, entries)?;
    if let Some(issued) = &issued {
        services.e2ee.devices_changed(
            &services,
            &user_id,
            std::slice::from_ref(&issued.device_id),
        )?;
    }
    if let Err(err) = services.abuse.spend_registration(ip) {
        // Cannot happen: the check above ran under the same lock.
        tracing::debug!(%err, "registration limit spent beyond its check");
    }
    tracing::info!(%user_id, admin, guest, "registered account");
    drop(guard);
    if !guest {
        services.await_onboarding(&user_id).await;
    }

    Ok(response(user_id, issued))
}

/// A session for the new account, unless the client asked for none (`inhibit_login`).
fn issue(
    services: &State,
    batch: &mut crate::storage::Batch,
    user_id: &ruma::UserId,
    body: register::Request,
) -> Result<Option<crate::service::sessions::IssuedTokens>> {
    if body.inhibit_login {
        return Ok(None);
    }
    let issued = services.sessions.issue(
        batch,
        user_id,
        body.device_id.as_deref(),
        body.initial_device_display_name,
        body.refresh_token,
    )?;
    Ok(Some(issued))
}

/// The answer to a registration of `user_id`, with its session if one was issued.
fn response(
    user_id: ruma::OwnedUserId,
    issued: Option<crate::service::sessions::IssuedTokens>,
) -> register::Response {
    let mut response = register::Response::new(user_id);
    if let Some(issued) = issued {
        response.access_token = Some(issued.access_token);
        response.device_id = Some(issued.device_id);
        response.refresh_token = issued.refresh_token;
        response.expires_in = issued.expires_in;
    }
    response
}

/// Registers a user of `appservice`'s namespace: no password, no user-interactive auth, no
/// registration limits; the user id must be in the service's namespace (`M_EXCLUSIVE`).
fn register_appservice_user(
    services: &State,
    appservice: &Registered,
    body: register::Request,
) -> Result<register::Response> {
    let localpart = body
        .username
        .as_deref()
        .ok_or_else(|| Error::new(ErrorKind::MissingParam, "A username is required"))?
        .to_lowercase();
    let user_id = ruma::UserId::parse(format!("@{localpart}:{}", services.server_name()))
        .ok()
        .filter(|u| u.validate_strict().is_ok() && u.as_str().len() <= 255)
        .ok_or_else(|| Error::new(ErrorKind::InvalidUsername, "Invalid user name"))?;
    if !appservice.owns_user(&user_id) {
        return Err(Error::new(
            ErrorKind::Exclusive,
            "This user id is not in the application service's namespace",
        ));
    }
    let mut batch = services.db.batch();
    let guard = services.sessions.lock_user(&user_id);
    if services.users.get(&user_id)?.is_some() {
        return Err(Error::new(ErrorKind::UserInUse, "User id already taken"));
    }
    services.users.create(&mut batch, &user_id, None, false, false, None);
    let issued = issue(services, &mut batch, &user_id, body)?;
    let entry = Entry::new("user.register", Some(&user_id))
        .target(&user_id)
        .details(serde_json::json!({ "appservice": appservice.id() }));
    services.audit.commit(batch, [entry])?;
    drop(guard);
    tracing::info!(%user_id, appservice = appservice.id(), "registered application service user");
    Ok(response(user_id, issued))
}

/// `GET /_matrix/client/v3/register/available`
pub async fn username_available(
    services: State,
    req: Ruma<availability::Request>,
) -> Result<availability::Response> {
    let user_id = Users::new_user_id(&req.body.username.to_lowercase(), services.server_name())?;
    if services.users.get(&user_id)?.is_some() || services.is_notices_localpart(user_id.localpart())
    {
        return Err(Error::new(ErrorKind::UserInUse, "User id already taken"));
    }
    services.appservices.check_user_free(&user_id, None)?;
    Ok(availability::Response::new(true))
}

/// `GET /_matrix/client/v1/register/m.login.registration_token/validity`
pub async fn token_validity(
    services: State,
    req: Ruma<token_validity::Request>,
) -> Result<token_validity::Response> {
    if flows(&services).ok() != Some(&[&[REGISTRATION_TOKEN][..]][..]) {
        return Err(Error::forbidden("Registration tokens are not in use on this server"));
    }
    let valid = services.registration.token_is_valid(&services.config, &req.body.token)?;
    Ok(token_validity::Response::new(valid))
}
