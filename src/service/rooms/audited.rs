//! Which room events the audit log records: room creation, kicks, bans and unbans,
//! power-level changes and redactions of other people's events. Decided before the event's
//! batch is written, so each record lands in the same batch as its event.

use ruma::{EventId, RoomId, UserId, events::TimelineEventType};
use serde_json::json;

use super::{NewEvent, Rooms};
use crate::{error::Result, service::audit::Entry};

impl Rooms {
    /// The audit entries `event` from `sender` in `room_id` calls for (usually none).
    pub(super) fn audit_entries(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        event: &NewEvent,
        redacts: Option<&EventId>,
    ) -> Result<Vec<Entry>> {
        let entry = |action: &str| Entry::new(action, Some(sender)).room(room_id);
        let reason = event.content.get("reason").cloned().unwrap_or_default();
        let entry = match (&event.kind, event.state_key.as_deref()) {
            (TimelineEventType::RoomCreate, Some("")) => Some(
                entry("room.create")
                    .target(room_id)
                    .details(json!({ "room_version": event.content.get("room_version") })),
            ),
            (TimelineEventType::RoomMember, Some(target)) if target != sender.as_str() => {
                let membership = event.content.get("membership").and_then(|m| m.as_str());
                let before = match UserId::parse(target) {
                    Ok(user) => self.membership(room_id, &user)?,
                    Err(_) => None,
                };
                let action = match (membership, before.as_deref()) {
                    (Some("ban"), _) => Some("room.ban"),
                    (Some("leave"), Some("ban")) => Some("room.unban"),
                    (Some("leave"), Some("join" | "invite" | "knock")) => Some("room.kick"),
                    _ => None,
                };
                action.map(|action| {
                    entry(action)
                        .target(target)
                        .details(json!({ "reason": reason, "previous": before }))
                })
            }
            (TimelineEventType::RoomPowerLevels, Some("")) => Some(
                entry("room.power_levels")
                    .target(room_id)
                    .details(json!({ "content": event.content })),
            ),
            (TimelineEventType::RoomRedaction, _) => match redacts {
                Some(target) => self.stored(target)?.and_then(|stored| {
                    let author = stored.wire.get("sender").and_then(|s| s.as_str())?.to_owned();
                    (author != sender.as_str()).then(|| {
                        entry("room.redact_other")
                            .target(target)
                            .details(json!({ "author": author, "reason": reason }))
                    })
                }),
                None => None,
            },
            _ => None,
        };
        Ok(entry.into_iter().collect())
    }
}
