//! OpenID: a signed-in user asks for a token to prove who they are to a widget or an
//! integration manager, which checks it with `/openid/userinfo`. That check is a federation
//! endpoint, served on the client listener too, where integration managers look for it.

use ruma::{
    api::{
        client::account::request_openid_token::v3 as request_token,
        federation::openid::get_openid_userinfo::v1 as userinfo,
    },
    authentication::TokenType,
};

use crate::{
    api::{Ruma, State},
    error::Result,
};

/// `POST /_matrix/client/v3/user/{userId}/openid/request_token`: for one's own account only.
pub async fn request_token(
    services: State,
    req: Ruma<request_token::Request>,
) -> Result<request_token::Response> {
    let caller = req.caller()?;
    caller.must_be(&req.body.user_id)?;
    let token = services.openid.issue(&caller.user_id)?;
    Ok(request_token::Response::new(
        token,
        TokenType::Bearer,
        services.server_name().to_owned(),
        std::time::Duration::from_secs(services.openid.ttl_secs()),
    ))
}

/// `GET /_matrix/federation/v1/openid/userinfo?access_token=`: `{"sub": user_id}`, or 401
/// `M_UNKNOWN_TOKEN` for a token that is unknown or expired.
pub async fn userinfo(services: State, req: Ruma<userinfo::Request>) -> Result<userinfo::Response> {
    let user_id = services.openid.verify(&services, &req.body.access_token)?;
    Ok(userinfo::Response::new(user_id))
}
