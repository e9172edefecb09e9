//! User-interactive authentication: sessions that remember which stages a client completed, so
//! sensitive actions (registration, deleting devices, changing passwords) can demand them.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use ruma::{
    OwnedUserId, UserId,
    api::client::uiaa::{AuthData, UserIdentifier},
};
use serde_json::{Value as JsonValue, json};

use super::{Services, random_string, users};
use crate::error::{Error, ErrorKind, Result};

/// The dummy stage.
pub const DUMMY: Stage = "m.login.dummy";
/// The password stage.
pub const PASSWORD: Stage = "m.login.password";
/// The registration token stage.
pub const REGISTRATION_TOKEN: Stage = "m.login.registration_token";

/// How long a client has to finish an authentication.
const SESSION_TTL: Duration = Duration::from_secs(15 * 60);
/// Failed stages after which a session is closed.
const MAX_FAILURES: u32 = 5;
/// Most sessions kept at once; the oldest are dropped past this.
const MAX_SESSIONS: usize = 10_000;

/// A stage type (`m.login.password`, ...).
pub type Stage = &'static str;

struct Session {
    user_id: Option<OwnedUserId>,
    completed: Vec<Stage>,
    registration_token: Option<String>,
    failures: u32,
    created: Instant,
}

/// What a finished authentication proved.
#[derive(Debug, Default)]
pub struct Authorized {
    /// The registration token the client presented, to be used up by the action.
    pub registration_token: Option<String>,
}

/// The open authentication sessions (kept in memory: a restart only asks clients to start over).
#[derive(Default)]
pub struct Uiaa {
    sessions: Mutex<HashMap<String, Session>>,
}

impl Uiaa {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens a session for `user_id` (None while registering).
    pub fn start(&self, user_id: Option<OwnedUserId>) -> String {
        let mut sessions = self.lock();
        if sessions.len() >= MAX_SESSIONS {
            sessions.retain(|_, s| s.created.elapsed() < SESSION_TTL);
            let oldest = sessions.iter().min_by_key(|(_, s)| s.created).map(|(k, _)| k.clone());
            if let Some(oldest) = oldest.filter(|_| sessions.len() >= MAX_SESSIONS) {
                sessions.remove(&oldest);
            }
        }
        let id = random_string(24);
        sessions.insert(
            id.clone(),
            Session {
                user_id,
                completed: Vec::new(),
                registration_token: None,
                failures: 0,
                created: Instant::now(),
            },
        );
        id
    }

    /// The stages done in `session`, if it exists, has not expired and belongs to `user_id`.
    pub fn completed(&self, session: &str, user_id: Option<&OwnedUserId>) -> Option<Vec<Stage>> {
        let sessions = self.lock();
        let s = sessions.get(session)?;
        (s.created.elapsed() < SESSION_TTL && s.user_id.as_ref() == user_id)
            .then(|| s.completed.clone())
    }

    /// Marks `stage` done in `session`.
    pub fn complete(&self, session: &str, stage: Stage) {
        if let Some(s) = self.lock().get_mut(session).filter(|s| !s.completed.contains(&stage)) {
            s.completed.push(stage);
        }
    }

    fn set_registration_token(&self, session: &str, token: String) {
        if let Some(s) = self.lock().get_mut(session) {
            s.registration_token = Some(token);
        }
    }

    /// Counts a failed stage in `session`; returns the failures so far.
    fn record_failure(&self, session: &str) -> u32 {
        let mut sessions = self.lock();
        sessions.get_mut(session).map_or(0, |s| {
            s.failures += 1;
            s.failures
        })
    }

    /// Ends `session` once the action it guarded went through.
    pub fn finish(&self, session: &str) {
        self.lock().remove(session);
    }

    /// The 401 answer asking for `flows`, with an optional failure of the last attempt.
    pub fn challenge(
        &self,
        flows: &[&[Stage]],
        session: &str,
        completed: &[Stage],
        params: JsonValue,
        failure: Option<Error>,
    ) -> Error {
        let flows: Vec<_> = flows.iter().map(|stages| json!({ "stages": stages })).collect();
        let mut body = json!({
            "flows": flows,
            "params": params,
            "session": session,
            "completed": completed,
        });
        if let Some(Error::Matrix(kind, message)) = failure {
            body["errcode"] = kind.errcode().into();
            body["error"] = message.into_owned().into();
        }
        Error::Uiaa(body)
    }
}

/// Drives user-interactive auth for one request: checks the stage in `auth` (if any) and
/// answers `Ok` once every stage of one of `flows` is done, or the 401 challenge otherwise.
/// `user_id` is the account acting (None while registering).
pub async fn authorize(
    services: &Services,
    auth: Option<&AuthData>,
    flows: &[&[Stage]],
    user_id: Option<&UserId>,
) -> Result<Authorized> {
    let uiaa = &services.uiaa;
    let owner = user_id.map(ToOwned::to_owned);
    let session = match auth.and_then(AuthData::session) {
        Some(session) => {
            if uiaa.completed(session, owner.as_ref()).is_none() {
                return Err(Error::new(ErrorKind::Unknown, "Unknown or expired auth session"));
            }
            session.to_owned()
        }
        None => uiaa.start(owner.clone()),
    };
    let params = json!({});
    let Some(auth) = auth else {
        return Err(uiaa.challenge(flows, &session, &[], params, None));
    };
    let failure = match check_stage(services, auth, user_id).await {
        Ok((stage, token)) => {
            uiaa.complete(&session, stage);
            if let Some(token) = token {
                uiaa.set_registration_token(&session, token);
            }
            None
        }
        Err(err) => {
            if uiaa.record_failure(&session) >= MAX_FAILURES {
                uiaa.finish(&session);
                return Err(Error::forbidden("Too many failed attempts; start again"));
            }
            Some(err)
        }
    };
    let completed = uiaa.completed(&session, owner.as_ref()).unwrap_or_default();
    if flows.iter().any(|flow| flow.iter().all(|stage| completed.contains(stage))) {
        let registration_token =
            uiaa.lock().get(&session).and_then(|s| s.registration_token.clone());
        uiaa.finish(&session);
        return Ok(Authorized { registration_token });
    }
    Err(uiaa.challenge(flows, &session, &completed, params, failure))
}

/// Checks one stage; returns its type and, for registration tokens, the token.
async fn check_stage(
    services: &Services,
    auth: &AuthData,
    user_id: Option<&UserId>,
) -> Result<(Stage, Option<String>)> {
    match auth {
        AuthData::Dummy(_) => Ok((DUMMY, None)),
        AuthData::Password(password) => {
            let UserIdentifier::Matrix(identifier) = &password.identifier else {
                return Err(Error::new(
                    ErrorKind::Unknown,
                    "Only user id identifiers are supported",
                ));
            };
            let claimed = users::Users::parse_local_user(&identifier.user, services.server_name())?;
            let forbidden = || Error::forbidden("Invalid username or password");
            if user_id.is_some_and(|user_id| user_id != claimed) {
                return Err(forbidden());
            }
            // Password guesses through user-interactive auth count as failed logins.
            let audit = &services.audit;
            services.abuse.check_login(audit, claimed.as_str(), &identifier.user)?;
            let record = services.users.get(&claimed)?.ok_or_else(forbidden)?;
            if !users::verify_password(password.password.clone(), record.password_hash).await {
                let name = &identifier.user;
                services.abuse.login_failed(audit, claimed.as_str(), name, "bad_credentials")?;
                return Err(forbidden());
            }
            Ok((PASSWORD, None))
        }
        AuthData::RegistrationToken(token) => {
            if !services.registration.token_is_valid(&services.config, &token.token)? {
                return Err(Error::new(ErrorKind::Unauthorized, "Invalid registration token"));
            }
            Ok((REGISTRATION_TOKEN, Some(token.token.clone())))
        }
        _ => Err(Error::new(ErrorKind::Unknown, "Unsupported authentication type")),
    }
}
