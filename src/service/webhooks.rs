//! Incoming webhooks: a URL with a secret that tools which can only POST JSON (CI jobs,
//! ticketing systems, monitoring) use to post into a room as the hook's own bot user.
//!
//! A hook belongs to a room; members with the power to send state there create, list, rename
//! and revoke it, checked at every call, so a member who loses that power or leaves can no
//! longer manage hooks. Only the secret's SHA-256 is stored (a database leak does not leak
//! hooks), and it is compared in constant time. Every post is rate-limited per hook; creation
//! and revocation are audited in the batch that makes them.

use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::{Value as JsonValue, json};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{
    Services,
    audit::Entry,
    now_ms, random_string,
    ratelimit::UserLimiter,
    rooms::{NewEvent, membership},
    users::UserRecord,
};
use crate::{
    config::AutomationConfig,
    error::{Error, ErrorKind, Result},
    storage::{Db, Table, prefix, split_key, tables},
};

/// The state event type whose power level decides who manages a room's hooks. It is never
/// sent: rooms leave it to `state_default`, or list it to set the level for hooks alone.
pub const MANAGE_EVENT_TYPE: &str = "com.plaza.webhook";
/// Characters of a hook's secret (about 256 bits from `[A-Za-z0-9]`).
const SECRET_LEN: usize = 43;
/// Longest hook name, bot display name or avatar URL, in bytes.
const MAX_NAME_BYTES: usize = 256;
/// Longest message text or HTML a hook posts, in bytes.
const MAX_TEXT_BYTES: usize = 32 * 1024;
/// Marks messages posted through a hook with the hook's id, for clients and bots.
pub const CONTENT_KEY: &str = "com.plaza.webhook";

/// A stored webhook.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Webhook {
    /// The hook's id (lower-case, also the bot user's localpart suffix).
    pub hook_id: String,
    /// The room it posts into.
    pub room_id: OwnedRoomId,
    /// The bot user it posts as.
    pub user_id: OwnedUserId,
    /// A name people recognise it by; the bot's display name.
    pub name: String,
    /// Who created it.
    pub created_by: OwnedUserId,
    /// When (ms since the epoch).
    pub created_ts: u64,
    /// Hex SHA-256 of the secret in its URL.
    pub secret_hash: String,
}

impl Webhook {
    /// The hook as listings show it (never its secret).
    pub fn to_json(&self) -> JsonValue {
        json!({
            "hook_id": self.hook_id,
            "room_id": self.room_id,
            "user_id": self.user_id,
            "name": self.name,
            "created_by": self.created_by,
            "created_ts": self.created_ts,
        })
    }
}

/// A message a hook posts.
#[derive(Debug, Deserialize)]
pub struct HookMessage {
    /// Plain text (required).
    pub text: String,
    /// The same message as HTML.
    #[serde(default)]
    pub html: Option<String>,
    /// The bot's display name in the room from now on.
    #[serde(default)]
    pub username: Option<String>,
    /// The bot's avatar (`mxc://`) in the room from now on.
    #[serde(default)]
    pub avatar_url: Option<String>,
    /// `m.text` (default) or `m.notice`.
    #[serde(default)]
    pub msgtype: Option<String>,
}

/// The room's webhooks and the per-hook rate limit.
pub struct Webhooks {
    db: Db,
    hooks: Table<Webhook>,
    secrets: Table<String>,
    by_room: Table<u64>,
    limiter: UserLimiter,
}

fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

fn check_name(name: &str) -> Result<()> {
    if name.trim().is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(Error::bad_json("name must be 1 to 256 bytes"));
    }
    Ok(())
}

impl Webhooks {
    /// Opens the tables.
    pub fn new(db: &Db, config: &AutomationConfig) -> Self {
        Self {
            db: db.clone(),
            hooks: db.table(tables::WEBHOOKS),
            secrets: db.table(tables::WEBHOOK_SECRETS),
            by_room: db.table(tables::WEBHOOKS_BY_ROOM),
            limiter: UserLimiter::new(config.webhook_rate),
        }
    }

    /// `M_FORBIDDEN` unless `user_id` is joined to `room_id` with the power to send state.
    fn may_manage(services: &Services, room_id: &RoomId, user_id: &UserId) -> Result<()> {
        if !services.rooms.may_send_state(room_id, user_id, MANAGE_EVENT_TYPE)? {
            return Err(Error::forbidden(
                "Managing webhooks needs membership and the power to send state in the room",
            ));
        }
        Ok(())
    }

    /// Creates a hook in `room_id` named `name`; answers it with its secret, shown only now.
    /// Its bot user is created and joins the room (invited by `creator`).
    pub async fn create(
        &self,
        services: &Services,
        room_id: &RoomId,
        creator: &UserId,
        name: &str,
    ) -> Result<(Webhook, String)> {
        check_name(name)?;
        Self::may_manage(services, room_id, creator)?;
        if self.of_room(room_id)?.len() >= services.config.automation.max_webhooks_per_room {
            return Err(Error::new(
                ErrorKind::ResourceLimitExceeded,
                "This room has as many webhooks as it may have",
            ));
        }
        let hook_id = random_string(16).to_ascii_lowercase();
        let user_id = UserId::parse(format!("@_webhook_{hook_id}:{}", services.server_name()))
            .map_err(Error::internal)?;
        let secret = random_string(SECRET_LEN);
        let hook = Webhook {
            hook_id: hook_id.clone(),
            room_id: room_id.to_owned(),
            user_id: user_id.clone(),
            name: name.to_owned(),
            created_by: creator.to_owned(),
            created_ts: now_ms(),
            secret_hash: hash_secret(&secret),
        };
        let mut batch = self.db.batch();
        // An account without a password: nobody logs in as it; it only posts for the hook.
        let mut record = UserRecord::new(None, false, false);
        record.user_type = Some("bot".to_owned());
        services.users.put(&mut batch, &user_id, &record);
        services.users.index_creation(&mut batch, &user_id, record.created_ms);
        let profile = super::users::Profile::from([("displayname".to_owned(), json!(name))]);
        services.users.put_profile(&mut batch, &user_id, &profile);
        self.hooks.put(&mut batch, hook_id.as_str(), &hook);
        self.secrets.put(&mut batch, hook.secret_hash.as_str(), &hook_id);
        self.by_room.put(&mut batch, &(room_id.as_str(), hook_id.as_str()), &0);
        let entry = Entry::new("webhook.create", Some(creator))
            .room(room_id)
            .target(&user_id)
            .details(json!({ "hook_id": hook_id, "name": name }));
        services.audit.commit(batch, [entry])?;
        let joined = async {
            if services.rooms.membership(room_id, &user_id)?.as_deref() != Some("invite") {
                membership::invite(services, room_id, creator, &user_id, None, false).await?;
            }
            membership::join(services, room_id, &user_id, None, None).await
        };
        if let Err(error) = joined.await {
            // A hook whose bot is not in the room could never post: take it back.
            self.remove(services, &hook, creator, "webhook.create_failed")?;
            return Err(error);
        }
        Ok((hook, secret))
    }

    /// The hooks of `room_id`, for a member who may manage them.
    pub fn list(
        &self,
        services: &Services,
        room_id: &RoomId,
        caller: &UserId,
    ) -> Result<Vec<Webhook>> {
        Self::may_manage(services, room_id, caller)?;
        self.of_room(room_id)
    }

    /// Renames a hook (and its bot, in the room and its profile).
    pub async fn rename(
        &self,
        services: &Services,
        room_id: &RoomId,
        hook_id: &str,
        caller: &UserId,
        name: &str,
    ) -> Result<Webhook> {
        check_name(name)?;
        Self::may_manage(services, room_id, caller)?;
        let mut hook = self.in_room(room_id, hook_id)?;
        hook.name = name.to_owned();
        let mut batch = self.db.batch();
        self.hooks.put(&mut batch, hook_id, &hook);
        services.users.set_profile_field(
            &mut batch,
            &hook.user_id,
            "displayname",
            Some(json!(name)),
        )?;
        self.db.write(batch)?;
        self.set_member_profile(services, &hook, Some(name), None).await?;
        Ok(hook)
    }

    /// Revokes a hook: its URL stops working at once, its bot is deactivated and leaves the
    /// room.
    pub async fn revoke(
        &self,
        services: &Services,
        room_id: &RoomId,
        hook_id: &str,
        caller: &UserId,
    ) -> Result<()> {
        Self::may_manage(services, room_id, caller)?;
        let hook = self.in_room(room_id, hook_id)?;
        self.remove(services, &hook, caller, "webhook.revoke")?;
        if let Err(error) = membership::leave(services, room_id, &hook.user_id, None).await {
            tracing::debug!(hook_id, %error, "the revoked hook's bot could not leave");
        }
        Ok(())
    }

    /// The hook whose secret is `secret`, once its rate limit allows one more post.
    pub fn authorize(&self, secret: &str) -> Result<Webhook> {
        let hook = self.by_secret(secret)?;
        self.limiter.check(&hook.user_id)?;
        Ok(hook)
    }

    /// Posts `message` through `hook` as its bot.
    pub async fn post(
        &self,
        services: &Services,
        hook: &Webhook,
        message: HookMessage,
    ) -> Result<OwnedEventId> {
        let content = message_content(&message, &hook.hook_id)?;
        if message.username.is_some() || message.avatar_url.is_some() {
            let avatar = message.avatar_url.as_deref();
            self.set_member_profile(services, hook, message.username.as_deref(), avatar).await?;
        }
        let event = NewEvent::message("m.room.message", content);
        services.rooms.append(services, &hook.room_id, &hook.user_id, event, None).await
    }

    /// The hook whose secret is `secret`; `M_NOT_FOUND` for any other string.
    fn by_secret(&self, secret: &str) -> Result<Webhook> {
        let not_found = || Error::not_found("No such webhook");
        if secret.is_empty() || secret.len() > 2 * SECRET_LEN {
            return Err(not_found());
        }
        let hash = hash_secret(secret);
        let hook_id = self.secrets.get(hash.as_str())?.ok_or_else(not_found)?;
        let hook = self.hooks.get(hook_id.as_str())?.ok_or_else(not_found)?;
        if !bool::from(hook.secret_hash.as_bytes().ct_eq(hash.as_bytes())) {
            return Err(not_found());
        }
        Ok(hook)
    }

    fn in_room(&self, room_id: &RoomId, hook_id: &str) -> Result<Webhook> {
        self.hooks
            .get(hook_id)?
            .filter(|hook| hook.room_id == room_id)
            .ok_or_else(|| Error::not_found("No such webhook in this room"))
    }

    fn of_room(&self, room_id: &RoomId) -> Result<Vec<Webhook>> {
        let mut hooks = Vec::new();
        for item in self.by_room.scan_prefix(prefix(room_id.as_str())) {
            let (key, _) = item?;
            let Some(hook_id) = split_key(&key).nth(1) else { continue };
            if let Some(hook) = self.hooks.get(hook_id)? {
                hooks.push(hook);
            }
        }
        hooks.sort_by_key(|hook| hook.created_ts);
        Ok(hooks)
    }

    /// Deletes the hook and its secret and deactivates its bot, in one batch with the audit
    /// record of `action`.
    fn remove(
        &self,
        services: &Services,
        hook: &Webhook,
        actor: &UserId,
        action: &str,
    ) -> Result<()> {
        let mut batch = self.db.batch();
        self.hooks.delete(&mut batch, hook.hook_id.as_str());
        self.secrets.delete(&mut batch, hook.secret_hash.as_str());
        self.by_room.delete(&mut batch, &(hook.room_id.as_str(), hook.hook_id.as_str()));
        if let Some(mut bot) = services.users.get(&hook.user_id)? {
            bot.deactivated = true;
            services.users.put(&mut batch, &hook.user_id, &bot);
        }
        let entry = Entry::new(action, Some(actor))
            .room(&hook.room_id)
            .target(&hook.user_id)
            .details(json!({ "hook_id": hook.hook_id, "name": hook.name }));
        services.audit.commit(batch, [entry])
    }

    /// Sets the bot's display name and avatar in the hook's room (its member event), when
    /// they differ from what the room shows now.
    async fn set_member_profile(
        &self,
        services: &Services,
        hook: &Webhook,
        displayname: Option<&str>,
        avatar_url: Option<&str>,
    ) -> Result<()> {
        if let Some(name) = displayname {
            check_name(name)?;
        }
        if let Some(url) = avatar_url
            && (url.len() > MAX_NAME_BYTES || <&ruma::MxcUri>::from(url).validate().is_err())
        {
            return Err(Error::bad_json("avatar_url must be an mxc:// URI"));
        }
        let rooms = &services.rooms;
        let current = rooms.current_state(&hook.room_id)?;
        let member = rooms.state_content(&current, "m.room.member", hook.user_id.as_str())?;
        let Some(mut content) = member.filter(|c| c["membership"] == "join") else {
            return Err(Error::forbidden("The webhook's bot is no longer in the room"));
        };
        let before = content.clone();
        if let Some(name) = displayname {
            content["displayname"] = json!(name);
        }
        if let Some(url) = avatar_url {
            content["avatar_url"] = json!(url);
        }
        if content == before {
            return Ok(());
        }
        let event = NewEvent::state("m.room.member", hook.user_id.as_str(), content);
        rooms.append(services, &hook.room_id, &hook.user_id, event, None).await?;
        Ok(())
    }
}

/// The `m.room.message` content of a hook's post, marked with the hook's id.
fn message_content(message: &HookMessage, hook_id: &str) -> Result<JsonValue> {
    if message.text.trim().is_empty() {
        return Err(Error::bad_json("text must not be empty"));
    }
    let html_len = message.html.as_ref().map_or(0, String::len);
    if message.text.len() > MAX_TEXT_BYTES || html_len > MAX_TEXT_BYTES {
        return Err(Error::new(ErrorKind::TooLarge, "text and html are at most 32 KiB each"));
    }
    let msgtype = match message.msgtype.as_deref() {
        None | Some("m.text") => "m.text",
        Some("m.notice") => "m.notice",
        Some(_) => return Err(Error::bad_json("msgtype must be m.text or m.notice")),
    };
    let mut content = json!({ "msgtype": msgtype, "body": message.text, CONTENT_KEY: hook_id });
    if let Some(html) = &message.html {
        content["format"] = json!("org.matrix.custom.html");
        content["formatted_body"] = json!(html);
    }
    Ok(content)
}
