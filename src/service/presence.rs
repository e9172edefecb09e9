//! Presence: online, unavailable (idle) or offline, with a status message. Kept in memory under
//! the ephemeral serial that typing uses, so sync tokens carry both.

use std::{collections::HashMap, sync::Mutex};

use ruma::{OwnedUserId, UserId};
use serde_json::{Value as JsonValue, json};

use super::{Services, now_ms};
use crate::error::{Error, Result};

/// After this long without activity an online user shows as unavailable.
const IDLE_AFTER_MS: u64 = 5 * 60 * 1000;
/// Longest status message kept.
const MAX_STATUS: usize = 512;
/// Most users tracked at once.
const MAX_TRACKED: usize = 1_000_000;

/// One user's presence.
#[derive(Debug, Clone)]
pub struct Presence {
    /// `online`, `unavailable` or `offline` as set.
    pub state: String,
    /// Free text.
    pub status_msg: Option<String>,
    /// Last activity (ms since the epoch).
    pub last_active_ms: u64,
    /// The ephemeral serial of the last visible change.
    pub serial: u64,
}

impl Presence {
    /// The presence event content as others see it now.
    pub fn content(&self) -> JsonValue {
        let ago = now_ms().saturating_sub(self.last_active_ms);
        let state = if self.state == "online" && ago > IDLE_AFTER_MS {
            "unavailable"
        } else {
            self.state.as_str()
        };
        let mut content = json!({ "presence": state, "last_active_ago": ago, "currently_active": state == "online" });
        if let Some(status) = &self.status_msg {
            content["status_msg"] = json!(status);
        }
        content
    }
}

/// Everyone's presence.
#[derive(Default)]
pub struct Presences {
    users: Mutex<HashMap<OwnedUserId, Presence>>,
}

impl Presences {
    /// Sets `user_id`'s presence (and, when given, status message); wakes room-mates on a
    /// visible change. `activity` marks the user as active now.
    pub fn set(
        &self,
        services: &Services,
        user_id: &UserId,
        state: &str,
        status_msg: Option<Option<String>>,
        activity: bool,
    ) -> Result<()> {
        if !services.config.presence.enabled {
            return Ok(());
        }
        if !matches!(state, "online" | "unavailable" | "offline") {
            return Err(Error::invalid_param("Unknown presence state"));
        }
        if status_msg.as_ref().and_then(|s| s.as_ref()).is_some_and(|s| s.len() > MAX_STATUS) {
            return Err(Error::invalid_param("Status message is too long"));
        }
        let changed = {
            let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
            if users.len() >= MAX_TRACKED && !users.contains_key(user_id) {
                return Ok(());
            }
            let entry = users.entry(user_id.to_owned()).or_insert_with(|| Presence {
                state: "offline".to_owned(),
                status_msg: None,
                last_active_ms: 0,
                serial: 0,
            });
            let was_idle = now_ms().saturating_sub(entry.last_active_ms) > IDLE_AFTER_MS;
            let mut changed = entry.state != state || (activity && was_idle);
            if let Some(status) = status_msg {
                changed |= entry.status_msg != status;
                entry.status_msg = status;
            }
            entry.state = state.to_owned();
            if activity {
                entry.last_active_ms = now_ms();
            }
            if changed {
                entry.serial = services.ephemeral.bump_serial();
            }
            changed
        };
        if changed {
            let mates = services.rooms.room_mates(user_id)?;
            services.stream.wake(mates.iter().map(|u| &**u));
            services.federation_presence.changed(services, user_id);
            if services.appservices.wants_ephemeral()
                && let Some(presence) = self.get(user_id)
            {
                services.appservices.presence(user_id, &mates, presence.content());
            }
        }
        Ok(())
    }

    /// The presence of `user_id`, if known.
    pub fn get(&self, user_id: &UserId) -> Option<Presence> {
        self.users.lock().unwrap_or_else(|e| e.into_inner()).get(user_id).cloned()
    }

    /// `m.presence` events for users sharing a room with `viewer` (or the viewer) whose
    /// presence changed after serial `after` (everyone known, when None).
    pub fn events_for(
        &self,
        services: &Services,
        viewer: &UserId,
        after: Option<u64>,
    ) -> Result<Vec<JsonValue>> {
        if after.is_some_and(|after| after >= services.ephemeral.typing_serial()) {
            return Ok(Vec::new());
        }
        let changed: Vec<(OwnedUserId, JsonValue)> = {
            let users = self.users.lock().unwrap_or_else(|e| e.into_inner());
            users
                .iter()
                .filter(|(_, p)| after.is_none_or(|after| p.serial > after))
                .map(|(u, p)| (u.clone(), p.content()))
                .collect()
        };
        if changed.is_empty() {
            return Ok(Vec::new());
        }
        let visible =
            services.rooms.sharing_with(viewer, changed.iter().map(|(user, _)| &**user))?;
        Ok(changed
            .iter()
            .filter(|(user, _)| visible.contains(&&**user))
            .map(|(user, content)| json!({ "type": "m.presence", "sender": user, "content": content }))
            .collect())
    }
}
