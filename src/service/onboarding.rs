//! Onboarding: what every new account gets, whichever way it was made (client registration,
//! shared-secret registration, the admin API, the command line): the `[onboarding]
//! auto_join_rooms` joined, and the welcome notice sent as a server notice. It runs as a
//! persisted job (see [`super::jobs`]) stored in the batch that creates the account, so a
//! crash midway resumes it at the next start. Nothing here fails the registration; a room
//! that cannot be joined is skipped with a warning.

use std::time::Duration;

use ruma::{DeviceId, OwnedRoomId, RoomAliasId, RoomId, UserId};
use serde_json::json;
use tokio::sync::watch;

use super::{
    Services,
    jobs::{Job, JobKind, Onboarding, Outcome, pause},
    rooms::membership,
};
use crate::{
    error::{Error, Result},
    storage::Batch,
};

/// How long account creation waits for its onboarding before answering; past it the job goes
/// on in the background.
const ONBOARDING_WAIT: Duration = Duration::from_secs(10);
/// The `(device, transaction id)` the welcome notice is sent under, kept with the new account
/// (and gone with its devices), so each account gets it once.
const WELCOME_TXN: (&str, &str) = ("onboarding", "welcome");

impl Services {
    /// Queues the onboarding of `user_id` in the batch that creates the account (when there
    /// is anything to do).
    pub fn queue_onboarding(&self, batch: &mut Batch, user_id: &UserId) {
        let onboarding = &self.config.onboarding;
        if !onboarding.auto_join_rooms.is_empty() || onboarding.welcome_notice.is_some() {
            self.jobs.put(batch, user_id, &Job::onboard());
        }
    }

    /// Once the account's batch is written: starts its onboarding and waits for it a while, so
    /// the first sync usually finds the rooms joined.
    pub async fn await_onboarding(&self, user_id: &UserId) {
        if matches!(self.jobs.get(user_id, JobKind::Onboard), Ok(None)) {
            return;
        }
        self.jobs.wake();
        match self.jobs.wait(user_id, JobKind::Onboard, ONBOARDING_WAIT).await {
            Ok(true) => {}
            Ok(false) => tracing::info!(%user_id, "onboarding goes on in the background"),
            Err(err) => tracing::warn!(%user_id, %err, "cannot follow the onboarding"),
        }
    }

    /// Runs (or resumes) the onboarding of `user_id`: joins the configured rooms (those already
    /// joined are skipped) and sends the welcome notice, then removes the job. Stops early when
    /// the account was deactivated meanwhile.
    pub(super) async fn onboard_job(
        &self,
        user_id: &UserId,
        job: Onboarding,
        stopped: &mut watch::Receiver<bool>,
    ) -> Result<Outcome> {
        let onboarding = &self.config.onboarding;
        let active = |services: &Self| -> Result<bool> {
            Ok(services.users.get(user_id)?.is_some_and(|u| !u.deactivated))
        };
        for room in &onboarding.auto_join_rooms {
            if !pause(self, stopped).await {
                return Ok(Outcome::Stopped);
            }
            if !active(self)? {
                break;
            }
            if let Err(err) = self.auto_join(user_id, room).await {
                tracing::warn!(%user_id, room, %err, "could not join a new account to a room");
            }
        }
        if let Some(body) = &onboarding.welcome_notice
            && active(self)?
        {
            let mut content = json!({ "msgtype": "m.text", "body": body });
            if let Some(html) = &onboarding.welcome_notice_html {
                content["format"] = json!("org.matrix.custom.html");
                content["formatted_body"] = json!(html);
            }
            // The notice's transaction id is stored in the notice's own batch: an onboarding
            // resumed after a crash between the send and the job's removal sends it once.
            let txn = Some((user_id, <&DeviceId>::from(WELCOME_TXN.0), WELCOME_TXN.1));
            let sent = self.send_server_notice(user_id, "m.room.message", content, None, txn).await;
            if let Err(err) = sent {
                tracing::warn!(%user_id, %err, "could not send the welcome notice");
            }
        }
        let mut batch = self.db.batch();
        self.jobs.delete(&mut batch, user_id, JobKind::Onboard);
        self.db.write(batch)?;
        tracing::debug!(%user_id, started_ms = job.started_ms, "onboarding complete");
        Ok(Outcome::Done)
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
