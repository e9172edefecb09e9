//! Onboarding: what every new account gets, whichever way it was made (client registration,
//! shared-secret registration, the admin API): the `[onboarding] auto_join_rooms` joined, and
//! the welcome notice sent as a server notice. Nothing here fails the registration; a room
//! that cannot be joined is skipped with a warning.

use ruma::{OwnedRoomId, RoomAliasId, RoomId, UserId};
use serde_json::json;

use super::{Services, rooms::membership};
use crate::error::{Error, Result};

impl Services {
    /// Joins the new account `user_id` to the configured rooms and sends the welcome notice.
    pub async fn onboard(&self, user_id: &UserId) {
        let onboarding = &self.config.onboarding;
        for room in &onboarding.auto_join_rooms {
            if let Err(err) = self.auto_join(user_id, room).await {
                tracing::warn!(%user_id, room, %err, "could not join a new account to a room");
            }
        }
        if let Some(body) = &onboarding.welcome_notice {
            let mut content = json!({ "msgtype": "m.text", "body": body });
            if let Some(html) = &onboarding.welcome_notice_html {
                content["format"] = json!("org.matrix.custom.html");
                content["formatted_body"] = json!(html);
            }
            let sent =
                self.send_server_notice(user_id, "m.room.message", content, None, None).await;
            if let Err(err) = sent {
                tracing::warn!(%user_id, %err, "could not send the welcome notice");
            }
        }
    }

    /// The room a configured room id or alias names, if it is known here.
    pub fn resolve_room(&self, room: &str) -> Result<Option<OwnedRoomId>> {
        if let Ok(alias) = RoomAliasId::parse(room) {
            return Ok(self.directory.resolve(&alias)?.map(|record| record.room_id));
        }
        let room_id = RoomId::parse(room).map_err(|_| Error::invalid_param("Invalid room"))?;
        Ok(self.rooms.room(&room_id)?.map(|_| room_id))
    }

    async fn auto_join(&self, user_id: &UserId, room: &str) -> Result<()> {
        let room_id =
            self.resolve_room(room)?.ok_or_else(|| Error::not_found("No such room here"))?;
        if self.rooms.membership(&room_id, user_id)?.as_deref() == Some("join") {
            return Ok(());
        }
        if self.admin_rooms.blocked(&room_id)?.is_some() {
            return Err(Error::forbidden("The room is blocked"));
        }
        if membership::join(self, &room_id, user_id, None, None).await.is_ok() {
            return Ok(());
        }
        // Not joinable as it stands: a local member who may invite brings the user in.
        let inviter = self
            .local_inviter(&room_id, None)?
            .ok_or_else(|| Error::forbidden("The room needs an invite nobody here can send"))?;
        membership::invite(self, &room_id, &inviter, user_id, None, false).await?;
        membership::join(self, &room_id, user_id, None, None).await?;
        Ok(())
    }
}
