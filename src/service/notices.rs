//! Server notices: messages from the server to one user, sent by the notices account (made on
//! first use, `[server_notices]`) into a room of the user's own, tagged `m.server_notice` for
//! them as the spec's server notices module describes. The room is made once and reused; a
//! user who left is invited back.

use ruma::{DeviceId, OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, UserId};
use serde_json::{Map, Value as JsonValue, json};

use super::{
    Services,
    audit::Entry,
    rooms::{
        NewEvent, Txn, TxnEndpoint,
        create::{CreateRoom, Preset, create_room},
        membership,
    },
};
use crate::{
    error::{Error, ErrorKind, Result},
    storage::{Db, Table, tables},
};

/// Power level of the user in their notices room: below `events_default`, so they read only.
const USER_POWER_LEVEL: i64 = -10;

/// Where each user's notices room is.
pub struct Notices {
    rooms: Table<OwnedRoomId>,
    /// Held while a user's notices room is found or made, so one user never gets two.
    lock: tokio::sync::Mutex<()>,
}

impl Notices {
    pub(super) fn new(db: &Db) -> Self {
        Self { rooms: db.table(tables::SERVER_NOTICE_ROOMS), lock: tokio::sync::Mutex::new(()) }
    }
}

impl Services {
    /// The account server notices come from.
    pub fn notices_user(&self) -> Result<OwnedUserId> {
        let localpart = &self.config.server_notices.localpart;
        UserId::parse(format!("@{localpart}:{}", self.server_name())).map_err(Error::internal)
    }

    /// Sends a server notice of type `kind` with `content` to the local user `user_id`;
    /// `audit` (an admin's request) is written in the notice's batch. `txn` (the requesting
    /// account, the device of its token and its transaction id) makes a repeated request
    /// answer the first notice; the id is kept with that device and goes when it is deleted.
    /// Returns the event id.
    pub async fn send_server_notice(
        &self,
        user_id: &UserId,
        kind: &str,
        content: JsonValue,
        audit: Option<Entry>,
        txn: Option<(&UserId, &DeviceId, &str)>,
    ) -> Result<OwnedEventId> {
        if !self.config.server_notices.enabled {
            return Err(Error::new(ErrorKind::Unknown, "Server notices are not enabled"));
        }
        if user_id.server_name() != self.server_name() {
            return Err(Error::invalid_param("Server notices go to local users only"));
        }
        if !self.users.get(user_id)?.is_some_and(|u| !u.deactivated && !u.guest) {
            return Err(Error::not_found("No such user"));
        }
        if !content.is_object() {
            return Err(Error::bad_json("content must be a JSON object"));
        }
        if kind.is_empty() || kind.len() > 255 || kind == "m.room.redaction" {
            return Err(Error::invalid_param("Invalid event type"));
        }
        let sender = self.notices_user()?;
        if &*sender == user_id {
            return Err(Error::invalid_param("The notices account does not notify itself"));
        }
        let room_id = {
            let _guard = self.notices.lock.lock().await;
            self.notices_room(&sender, user_id).await?
        };
        let mut event = NewEvent::message(kind, content);
        event.audit.extend(audit.map(|entry| entry.room(&room_id)));
        let txn = txn.map(|(user, device, id)| Txn {
            user,
            device: device.as_str(),
            id,
            endpoint: TxnEndpoint::Notice,
        });
        self.rooms.append(self, &room_id, &sender, event, txn).await
    }

    /// The notices room of `user_id`, made (or the user brought back in) when needed.
    async fn notices_room(&self, sender: &UserId, user_id: &UserId) -> Result<OwnedRoomId> {
        self.ensure_notices_account(sender)?;
        if let Some(room_id) = self.notices.rooms.get(user_id.as_str())? {
            match self.rejoin_notices_room(&room_id, sender, user_id).await {
                Ok(()) => return Ok(room_id),
                Err(err) => tracing::warn!(%room_id, %user_id, %err, "making a new notices room"),
            }
        }
        let mut power = Map::new();
        power.insert("users_default".into(), json!(USER_POWER_LEVEL));
        let request = CreateRoom {
            preset: Some(Preset::PrivateChat),
            name: Some(self.config.server_notices.room_name.clone()),
            invite: vec![user_id.to_owned()],
            power_level_override: Some(power),
            ..CreateRoom::default()
        };
        let room_id = create_room(self, sender, request).await?;
        membership::join(self, &room_id, user_id, None, None).await?;
        let mut batch = self.db.batch();
        self.notices.rooms.put(&mut batch, user_id.as_str(), &room_id);
        self.db.write(batch)?;
        let tags = json!({ "tags": { "m.server_notice": { "order": 0.5 } } });
        self.account_data.store(self, user_id, Some(&room_id), "m.tag", tags)?;
        Ok(room_id)
    }

    /// Brings `user_id` back into their existing notices room.
    async fn rejoin_notices_room(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        user_id: &UserId,
    ) -> Result<()> {
        if self.rooms.membership(room_id, sender)?.as_deref() != Some("join") {
            return Err(Error::forbidden("The notices account left the room"));
        }
        match self.rooms.membership(room_id, user_id)?.as_deref() {
            Some("join") => return Ok(()),
            Some("invite") => {}
            Some("ban") => return Err(Error::forbidden("The user is banned from the room")),
            _ => {
                membership::invite(self, room_id, sender, user_id, None, false).await?;
            }
        }
        membership::join(self, room_id, user_id, None, None).await?;
        Ok(())
    }

    /// Whether `localpart` is the notices account's, which no one may create or register.
    pub fn is_notices_localpart(&self, localpart: &str) -> bool {
        localpart == self.config.server_notices.localpart
    }

    /// Creates the notices account (no password: nobody logs in as it) if it does not exist.
    /// An account of that name that someone can log in to is never used for notices.
    fn ensure_notices_account(&self, sender: &UserId) -> Result<()> {
        if let Some(existing) = self.users.get(sender)? {
            if existing.password_hash.is_some() {
                return Err(Error::forbidden(
                    "The server notices localpart belongs to an account with a password",
                ));
            }
            return Ok(());
        }
        let config = &self.config.server_notices;
        let mut batch = self.db.batch();
        self.users.create(&mut batch, sender, None, false, false, Some(&config.display_name));
        if let Some(avatar_url) = &config.avatar_url {
            let mut profile = super::users::Profile::new();
            profile.insert("displayname".into(), json!(config.display_name));
            profile.insert("avatar_url".into(), json!(avatar_url));
            self.users.put_profile(&mut batch, sender, &profile);
        }
        let entry = Entry::new("admin.user.create", None)
            .target(sender)
            .details(json!({ "via": "server_notices" }));
        self.audit.commit(batch, [entry])?;
        tracing::info!(%sender, "created the server notices account");
        Ok(())
    }
}
