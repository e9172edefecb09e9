//! Membership event templates for users of other servers: the unsigned `m.room.member` event
//! a `make_join`, `make_leave` or `make_knock` answer carries, with prev events, auth events
//! and depth from this server's view of the room, for the user's server to complete, sign and
//! send back.

use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, RoomId, RoomVersionId, UserId,
    events::TimelineEventType, state_res,
};
use serde_json::{Value as JsonValue, value::to_raw_value};

use super::Rooms;
use crate::{
    error::{Error, ErrorKind, Result},
    service::now_ms,
};

/// Most prev events a template names (the spec's limit).
const MAX_PREV_EVENTS: usize = 20;

impl Rooms {
    /// The unsigned `m.room.member` event of `user_id` about itself with `content` in
    /// `room_id`, built on the current state and forward extremities, and the room's version.
    pub fn member_template(
        &self,
        room_id: &RoomId,
        user_id: &UserId,
        content: JsonValue,
    ) -> Result<(RoomVersionId, CanonicalJsonObject)> {
        let record = self.room(room_id)?.ok_or_else(|| Error::not_found("Unknown room"))?;
        let rules = record.version.rules().ok_or_else(|| {
            Error::new(ErrorKind::UnsupportedRoomVersion, "Unsupported room version")
        })?;
        let raw = to_raw_value(&content).map_err(|e| Error::bad_json(e.to_string()))?;
        let kind = TimelineEventType::RoomMember;
        let auth_types = state_res::auth_types_for_event(
            &kind,
            user_id,
            Some(user_id.as_str()),
            &raw,
            &rules.authorization,
        )
        .map_err(Error::bad_json)?;
        let mut auth_events = Vec::with_capacity(auth_types.len());
        for (auth_kind, auth_key) in &auth_types {
            if let Some(short) =
                self.states.get(record.current_state, &auth_kind.to_string(), auth_key)?
            {
                auth_events.push(self.state_pdu(short)?.event_id.clone());
            }
        }
        let prev_events: Vec<_> =
            record.extremities.iter().take(MAX_PREV_EVENTS).cloned().collect();
        let mut depth = 0;
        for prev in &prev_events {
            if let Some(short) = self.event_ids.get(prev.as_str())? {
                depth = depth.max(self.depth_of(short)?);
            }
        }
        let canonical = |value: JsonValue| -> Result<CanonicalJsonValue> {
            CanonicalJsonValue::try_from(value)
                .map_err(|e| Error::bad_json(format!("Invalid JSON for an event: {e}")))
        };
        let string = |value: &str| CanonicalJsonValue::String(value.to_owned());
        let mut wire = CanonicalJsonObject::new();
        wire.insert("auth_events".into(), canonical(self.event_refs(&auth_events, &rules)?)?);
        wire.insert("prev_events".into(), canonical(self.event_refs(&prev_events, &rules)?)?);
        wire.insert("content".into(), canonical(content)?);
        let depth = ruma::Int::new_saturating((depth + 1) as i64);
        wire.insert("depth".into(), CanonicalJsonValue::Integer(depth));
        wire.insert("origin".into(), string(user_id.server_name().as_str()));
        let ts = ruma::Int::new_saturating(now_ms() as i64);
        wire.insert("origin_server_ts".into(), CanonicalJsonValue::Integer(ts));
        wire.insert("room_id".into(), string(room_id.as_str()));
        wire.insert("sender".into(), string(user_id.as_str()));
        wire.insert("state_key".into(), string(user_id.as_str()));
        wire.insert("type".into(), string("m.room.member"));
        Ok((record.version, wire))
    }
}
