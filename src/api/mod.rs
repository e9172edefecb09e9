//! The HTTP edge: turns requests into ruma request types with an authenticated caller, hands
//! them to services, and turns results back into responses. No Matrix logic lives here.

pub mod admin;
pub mod client;
pub mod federation;
pub mod landing;
pub mod media;
pub mod router;
pub mod well_known;

use std::{net::SocketAddr, sync::Arc};

use axum::{
    body::Body,
    extract::{ConnectInfo, FromRequest, FromRequestParts, RawPathParams, Request},
    response::{IntoResponse, Response},
};
use bytes::{Bytes, BytesMut};
use http::{Method, StatusCode, header};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use ruma::{
    OwnedDeviceId, OwnedUserId,
    api::{
        IncomingRequest, OutgoingResponse,
        auth_scheme::{
            AccessToken, AccessTokenOptional, AppserviceToken, AppserviceTokenOptional,
            NoAccessToken, NoAuthentication,
        },
        error::{DeserializationError, FromHttpRequestError},
    },
};

use crate::{
    error::{Error, ErrorKind, Result},
    service::{
        Services, appservice::registration::Registered, sessions::TokenRecord, users::UserRecord,
    },
};

/// The state every handler receives.
pub type State = Arc<Services>;

/// How an endpoint authenticates its caller, derived from ruma's metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// No authentication.
    None,
    /// An access token is required.
    Required,
    /// An access token is used when present.
    Optional,
    /// An access token is required, but it may have expired and its account may be locked:
    /// logging out must always work.
    EndSession,
    /// An application service's token is used when present (registration of its users);
    /// other tokens are ignored.
    AppserviceOptional,
}

/// The mode the extractor uses for the ruma request `T`: ruma's, except that the logout
/// endpoints take expired tokens and locked accounts too, and the public room list reads a
/// token when one is given (a query of another server's list needs one).
fn auth_mode<T: IncomingRequest + 'static>() -> AuthMode
where
    T::Authentication: AuthKind,
{
    use std::any::TypeId;

    use ruma::api::client::{
        directory::get_public_rooms,
        session::{logout, logout_all},
    };
    let id = TypeId::of::<T>();
    if id == TypeId::of::<logout::v3::Request>() || id == TypeId::of::<logout_all::v3::Request>() {
        return AuthMode::EndSession;
    }
    if id == TypeId::of::<get_public_rooms::v3::Request>() {
        return AuthMode::Optional;
    }
    <T::Authentication as AuthKind>::MODE
}

/// Maps a ruma authentication scheme to what the extractor must do.
pub trait AuthKind {
    /// The mode for endpoints declaring this scheme.
    const MODE: AuthMode;
}

impl AuthKind for NoAuthentication {
    const MODE: AuthMode = AuthMode::None;
}
impl AuthKind for NoAccessToken {
    const MODE: AuthMode = AuthMode::None;
}
impl AuthKind for AccessToken {
    const MODE: AuthMode = AuthMode::Required;
}
impl AuthKind for AccessTokenOptional {
    const MODE: AuthMode = AuthMode::Optional;
}
impl AuthKind for AppserviceToken {
    const MODE: AuthMode = AuthMode::Required;
}
impl AuthKind for AppserviceTokenOptional {
    const MODE: AuthMode = AuthMode::AppserviceOptional;
}

/// The authenticated account and device making a request.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The account.
    pub user_id: OwnedUserId,
    /// The device whose token was presented.
    pub device_id: OwnedDeviceId,
    /// Whether the account is a server admin.
    pub admin: bool,
    /// Whether the account is an auditor (read-only access to the admin API).
    pub auditor: bool,
    /// Whether the account is a guest (may only join rooms open to guests, and not create any).
    pub guest: bool,
    /// The application service acting, when its `as_token` was presented.
    pub appservice: Option<Arc<Registered>>,
}

impl Caller {
    /// The caller behind an accepted token, named as the actor of any audit record written
    /// while the request runs.
    fn signed_in(record: TokenRecord, user: &UserRecord) -> Self {
        crate::service::audit::context::set_caller(
            record.user_id.as_str(),
            record.device_id.as_str(),
        );
        Self {
            user_id: record.user_id,
            device_id: record.device_id,
            admin: user.admin,
            auditor: user.auditor,
            guest: user.guest,
            appservice: None,
        }
    }

    /// Whether the per-user abuse limits (`[limits.messages]`) and rate limits apply: not to
    /// admins, nor to application services registered with `rate_limited: false`.
    pub fn rate_limited(&self) -> bool {
        !self.admin && self.appservice.as_ref().is_none_or(|a| a.rate_limited())
    }
}

impl Caller {
    /// `M_FORBIDDEN` unless the caller is `user_id`: for endpoints that act on one's own data.
    pub fn must_be(&self, user_id: &ruma::UserId) -> Result<()> {
        if self.user_id != user_id {
            return Err(Error::forbidden("Cannot act on another user's data"));
        }
        Ok(())
    }
}

/// A parsed ruma request with who sent it and from where.
pub struct Ruma<T> {
    /// The request itself.
    pub body: T,
    /// The caller, when a valid access token was presented.
    pub caller: Option<Caller>,
    /// The client's address.
    pub ip: Option<SocketAddr>,
    /// The client's user agent.
    pub user_agent: Option<String>,
}

impl<T> Ruma<T> {
    /// The caller of an endpoint that requires authentication.
    pub fn caller(&self) -> Result<&Caller> {
        self.caller
            .as_ref()
            .ok_or_else(|| Error::new(ErrorKind::MissingToken, "Missing access token"))
    }
}

/// The access token of a request: `Authorization: Bearer` first, then `?access_token=`.
pub fn access_token(parts: &http::request::Parts) -> Result<Option<String>> {
    if let Some(value) = parts.headers.get(header::AUTHORIZATION) {
        let token =
            value.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")).ok_or_else(|| {
                Error::new(ErrorKind::MissingToken, "Malformed Authorization header")
            })?;
        return Ok(Some(token.trim().to_owned()));
    }
    let query = parts.uri.query().unwrap_or_default();
    Ok(form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == "access_token")
        .map(|(_, value)| value.into_owned()))
}

/// The caller of a request (as `mode` demands), its address and user agent.
pub fn caller_from_parts(
    services: &Services,
    parts: &http::request::Parts,
    mode: AuthMode,
) -> Result<(Option<Caller>, Option<SocketAddr>, Option<String>)> {
    let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
    let ip = client_address(&services.config.limits.trusted_proxies, peer, &parts.headers);
    let user_agent = parts
        .headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(|ua| ua.chars().take(512).collect::<String>());
    // Endpoints without authentication ignore the header: other servers sign even their key
    // requests with an `X-Matrix` authorization, which is no malformed access token.
    let token = if mode == AuthMode::None { None } else { access_token(parts)? };
    if mode != AuthMode::None
        && let Some(token) = &token
        && let Some(registered) = services.appservices.by_as_token(token)
    {
        let caller = appservice_caller(services, registered, parts, mode)?;
        return Ok((Some(caller), ip, user_agent));
    }
    let caller = match (mode, token) {
        (AuthMode::None | AuthMode::AppserviceOptional, _) | (AuthMode::Optional, None) => None,
        (AuthMode::Required | AuthMode::EndSession, None) => {
            return Err(Error::new(ErrorKind::MissingToken, "Missing access token"));
        }
        (AuthMode::EndSession, Some(token)) => Some(authenticate_to_end_session(services, &token)?),
        (_, Some(token)) => Some(authenticate(services, &token, ip, user_agent.as_deref())?),
    };
    Ok((caller, ip, user_agent))
}

/// The query parameters naming the device an application service acts through.
const DEVICE_PARAMS: &[&str] = &["device_id", "org.matrix.msc3202.device_id"];

/// The caller behind an application service's `as_token`: the user it names with
/// `?user_id=` (within its namespace, and existing) or its own user, on the device it names
/// with `?device_id=` (or its unstable name) or no device of the user's.
fn appservice_caller(
    services: &Services,
    registered: &Arc<Registered>,
    parts: &http::request::Parts,
    mode: AuthMode,
) -> Result<Caller> {
    let query = parts.uri.query().unwrap_or_default();
    let mut user_id = None;
    let mut device_id = None;
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        if key == "user_id" {
            user_id = Some(value.into_owned());
        } else if DEVICE_PARAMS.contains(&key.as_ref()) {
            device_id = Some(value.into_owned());
        }
    }
    let user_id = match user_id {
        Some(raw) => OwnedUserId::try_from(raw)
            .map_err(|_| Error::invalid_param("user_id is not a valid user id"))?,
        None => registered.sender.clone(),
    };
    if !registered.owns_user(&user_id) {
        return Err(Error::forbidden(
            "The application service cannot act as a user outside its namespace",
        ));
    }
    let fallback = || OwnedDeviceId::from("APPSERVICE");
    let mut caller = Caller {
        user_id,
        device_id: fallback(),
        admin: false,
        auditor: false,
        guest: false,
        appservice: Some(registered.clone()),
    };
    // Registering creates the user: it need not exist yet.
    if mode == AuthMode::AppserviceOptional {
        return Ok(caller);
    }
    let user = services.users.get(&caller.user_id)?.filter(|user| !user.deactivated);
    let Some(user) = user else {
        return Err(Error::forbidden("The application service has not registered this user"));
    };
    if let Some(device) = device_id {
        let device = OwnedDeviceId::from(device);
        if services.sessions.device(&caller.user_id, &device)?.is_none() {
            return Err(Error::forbidden("The user has no such device"));
        }
        caller.device_id = device;
    }
    caller.admin = user.admin;
    caller.guest = user.guest;
    crate::service::audit::context::set_caller(caller.user_id.as_str(), caller.device_id.as_str());
    services.analytics.touch(&caller.user_id);
    Ok(caller)
}

/// The client's address: the peer, or behind a trusted reverse proxy the last address that
/// proxy saw in `X-Forwarded-For`.
pub fn client_address(
    trusted: &[ipnet::IpNet],
    peer: Option<SocketAddr>,
    headers: &http::HeaderMap,
) -> Option<SocketAddr> {
    let peer = peer?;
    if !trusted.iter().any(|net| net.contains(&peer.ip())) {
        return Some(peer);
    }
    let forwarded = headers.get("x-forwarded-for").and_then(|v| v.to_str().ok());
    let client =
        forwarded.and_then(|list| list.rsplit(',').next()).and_then(|ip| ip.trim().parse().ok());
    Some(client.map_or(peer, |ip| SocketAddr::new(ip, 0)))
}

/// Authenticates `token`, refusing locked and deactivated accounts.
pub fn authenticate(
    services: &Services,
    token: &str,
    ip: Option<SocketAddr>,
    user_agent: Option<&str>,
) -> Result<Caller> {
    let record = services.sessions.authenticate(token)?;
    let user = services.users.get(&record.user_id)?.ok_or_else(|| {
        Error::new(ErrorKind::UnknownToken { soft_logout: false }, "Unknown access token")
    })?;
    if user.deactivated {
        return Err(Error::new(
            ErrorKind::UnknownToken { soft_logout: false },
            "Account deactivated",
        ));
    }
    if user.locked {
        return Err(Error::new(ErrorKind::UserLocked, "This account has been locked"));
    }
    services.sessions.touch(&record, ip.map(|a| a.ip().to_string()), user_agent.map(str::to_owned));
    services.analytics.touch(&record.user_id);
    Ok(Caller::signed_in(record, &user))
}

/// Authenticates `token` for logging out: an expired token (of a refreshable session) and a
/// locked account still may; an unknown, replaced or deleted token and a deactivated account
/// may not.
fn authenticate_to_end_session(services: &Services, token: &str) -> Result<Caller> {
    let record = services.sessions.authenticate_allowing_expired(token)?;
    let user = services.users.get(&record.user_id)?.filter(|user| !user.deactivated);
    let user = user.ok_or_else(|| {
        Error::new(ErrorKind::UnknownToken { soft_logout: false }, "Unknown access token")
    })?;
    Ok(Caller::signed_in(record, &user))
}

/// The client's user agent, cut to a bounded length.
pub fn user_agent(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(|ua| ua.chars().take(512).collect::<String>())
}

/// Reads a request body up to the configured limit, answering `M_TOO_LARGE` past it.
pub async fn read_body(body: Body, limit: usize) -> Result<Bytes> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.is::<LengthLimitError>() => {
            Err(Error::new(ErrorKind::TooLarge, "Request body is too large"))
        }
        Err(err) => {
            Err(Error::new(ErrorKind::Unknown, format!("Could not read request body: {err}")))
        }
    }
}

/// Parses a JSON body for endpoints ruma does not describe: `M_NOT_JSON` if it is not JSON at
/// all, `M_BAD_JSON` if it does not have the expected shape.
pub fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|_| Error::new(ErrorKind::NotJson, "Request body is not valid JSON"))?;
    serde_json::from_value(value).map_err(|e| Error::bad_json(format!("Invalid request body: {e}")))
}

pub(crate) fn map_parse_error(err: FromHttpRequestError) -> Error {
    match err {
        FromHttpRequestError::Deserialization(DeserializationError::Json(e)) => {
            Error::bad_json(format!("Invalid request body: {e}"))
        }
        FromHttpRequestError::Deserialization(DeserializationError::Ident(e)) => {
            Error::invalid_param(format!("Invalid identifier: {e}"))
        }
        FromHttpRequestError::Deserialization(e) => {
            Error::invalid_param(format!("Invalid request: {e}"))
        }
        FromHttpRequestError::MethodMismatch { .. } => Error::new(
            ErrorKind::Unrecognized(StatusCode::METHOD_NOT_ALLOWED),
            "Method not allowed",
        ),
        _ => Error::invalid_param("Invalid request"),
    }
}

impl<T> FromRequest<State> for Ruma<T>
where
    T: IncomingRequest + Send + 'static,
    T::Authentication: AuthKind,
{
    type Rejection = Error;

    async fn from_request(req: Request, services: &State) -> Result<Self> {
        let (mut parts, body) = req.into_parts();
        let raw_params = RawPathParams::from_request_parts(&mut parts, services)
            .await
            .map_err(|_| Error::invalid_param("Invalid path parameter encoding"))?;
        check_id_lengths(&raw_params)?;
        let path_args: Vec<String> = raw_params.iter().map(|(_, value)| value.to_owned()).collect();
        let (caller, ip, user_agent) = caller_from_parts(services, &parts, auth_mode::<T>())?;

        let exempt = caller.as_ref().and_then(|c| c.appservice.as_ref());
        if T::RATE_LIMITED && exempt.is_none_or(|a| a.rate_limited()) {
            let key = match &caller {
                Some(caller) => caller.user_id.to_string(),
                None => ip
                    .map(|a| crate::service::ratelimit::address_key(a.ip()).to_string())
                    .unwrap_or_default(),
            };
            services.rate_limiter.check(&key)?;
        }

        let mut bytes = read_body(body, services.config.limits.max_request_bytes).await?;
        if parts.method != Method::GET && parts.method != Method::HEAD {
            if bytes.iter().all(u8::is_ascii_whitespace) {
                bytes = Bytes::from_static(b"{}");
            } else if serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).is_err() {
                return Err(Error::new(ErrorKind::NotJson, "Request body is not valid JSON"));
            }
        }
        let request = http::Request::from_parts(parts, bytes);
        let body = T::try_from_http_request(request, &path_args).map_err(map_parse_error)?;
        Ok(Self { body, caller, ip, user_agent })
    }
}

/// Longest room, user or event id or room alias, in bytes (the spec's limit).
pub const MAX_ID_BYTES: usize = 255;

/// Path parameters (as ruma names them) that hold room, user or event ids or room aliases.
const ID_PARAMS: &[&str] =
    &["room_id", "user_id", "event_id", "room_id_or_alias", "room_alias", "thread_root"];

/// Refuses room, user and event ids and aliases in the path longer than the spec's 255 bytes
/// (ruma's own check may be compiled out), with `M_INVALID_PARAM`.
pub(crate) fn check_id_lengths(params: &RawPathParams) -> Result<()> {
    match params.iter().find(|(name, value)| value.len() > MAX_ID_BYTES && ID_PARAMS.contains(name))
    {
        Some((name, _)) => Err(Error::invalid_param(format!("{name} is longer than 255 bytes"))),
        None => Ok(()),
    }
}

/// A JSON body for endpoints whose response is assembled directly (sync), sent as a ruma
/// response so it routes like every other endpoint.
pub struct JsonResponse(pub serde_json::Value);

/// A response body that is already JSON text.
pub struct RawJsonResponse(pub Box<serde_json::value::RawValue>);

impl OutgoingResponse for RawJsonResponse {
    fn try_into_http_response<T: Default + bytes::BufMut>(
        self,
    ) -> Result<http::Response<T>, ruma::api::error::IntoHttpError> {
        let mut body = T::default();
        body.put_slice(self.0.get().as_bytes());
        http::Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(body)
            .map_err(ruma::api::error::IntoHttpError::from)
    }
}

impl OutgoingResponse for JsonResponse {
    fn try_into_http_response<T: Default + bytes::BufMut>(
        self,
    ) -> Result<http::Response<T>, ruma::api::error::IntoHttpError> {
        let mut body = T::default();
        serde_json::to_writer(bytes::BufMut::writer(&mut body), &self.0)?;
        http::Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(body)
            .map_err(ruma::api::error::IntoHttpError::from)
    }
}

/// A ruma response on its way out.
pub struct RumaResponse<T>(pub T);

impl<T: OutgoingResponse> IntoResponse for RumaResponse<T> {
    fn into_response(self) -> Response {
        match self.0.try_into_http_response::<BytesMut>() {
            Ok(response) => response.map(|body| Body::from(body.freeze())),
            Err(err) => {
                Error::internal(format!("could not serialize response: {err}")).into_response()
            }
        }
    }
}

/// The caller of a hand-routed endpoint that needs an access token.
pub struct SignedIn(pub Caller);

impl FromRequestParts<State> for SignedIn {
    type Rejection = Error;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        services: &State,
    ) -> Result<Self> {
        let (caller, ..) = caller_from_parts(services, parts, AuthMode::Required)?;
        caller.map(Self).ok_or_else(|| Error::new(ErrorKind::MissingToken, "Missing access token"))
    }
}
