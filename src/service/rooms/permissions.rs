//! Permissions: who may do what in a room, read in one place from its state with ruma's types
//! under the room version's rules.
//!
//! Power levels (the spec's defaults when the room has none, power values written as strings
//! where room versions 1 to 9 allow them, creators ranked above every level from room version
//! 12), the join rule with its allow list, and history visibility. Every permission check,
//! client or federation, asks here rather than reading the events' JSON itself.

use std::sync::Arc;

use ruma::{
    Int, OwnedRoomId, OwnedUserId, RoomId, RoomVersionId, UserId,
    events::{
        StateEventType,
        room::{
            history_visibility::HistoryVisibility,
            join_rules::{AllowRule, JoinRule},
            power_levels::{
                RoomPowerLevels, RoomPowerLevelsEventContent, RoomPowerLevelsSource, UserPowerLevel,
            },
        },
    },
    room_version_rules::{AuthorizationRules, RoomVersionRules},
    serde::deserialize_v1_powerlevel,
};
use serde_json::{Map, Value as JsonValue};

use super::{Rooms, pdu::StoredPdu, state::StateMap};
use crate::error::{Error, ErrorKind, Result};

/// The keys of `m.room.power_levels` that hold one power value.
const LEVEL_FIELDS: [&str; 7] =
    ["ban", "events_default", "invite", "kick", "redact", "state_default", "users_default"];

/// The keys of `m.room.power_levels` that map names to power values.
const LEVEL_MAPS: [&str; 3] = ["events", "notifications", "users"];

/// The rules of room `version`, or `M_UNSUPPORTED_ROOM_VERSION` for one Plaza does not know.
pub fn version_rules(version: &RoomVersionId) -> Result<RoomVersionRules> {
    version.rules().ok_or_else(|| {
        Error::new(
            ErrorKind::UnsupportedRoomVersion,
            format!("Room version {version} is not supported"),
        )
    })
}

/// The effective power levels of a room whose `m.room.power_levels` content is `content`
/// (`None` when it has none) under its version's `rules`, created by `creators`.
///
/// Without an event the spec's defaults hold: creators at 100 (or above every level when the
/// version privileges them), everyone else at 0. A value the version does not accept (a string
/// from room version 10, anything but a number or a numeric string before) counts as absent,
/// as does a `users` key that is not a user id, so one bad entry never hides the rest.
pub fn power_levels_from(
    content: Option<&JsonValue>,
    rules: &AuthorizationRules,
    creators: Vec<OwnedUserId>,
) -> Result<RoomPowerLevels> {
    let source = match content {
        Some(content) => RoomPowerLevelsSource::Original(power_levels_content(content, rules)?),
        None => RoomPowerLevelsSource::None,
    };
    Ok(RoomPowerLevels::new(source, rules, creators))
}

/// `content` of an `m.room.power_levels` event read as ruma's type under `rules`, keeping only
/// the values the room version accepts.
fn power_levels_content(
    content: &JsonValue,
    rules: &AuthorizationRules,
) -> Result<RoomPowerLevelsEventContent> {
    let level = |value: &JsonValue| -> Option<JsonValue> {
        let level = if rules.integer_power_levels {
            value.as_i64().and_then(Int::new)
        } else {
            deserialize_v1_powerlevel(value).ok()
        };
        level.map(|level| JsonValue::from(i64::from(level)))
    };
    let mut accepted = Map::new();
    for field in LEVEL_FIELDS {
        if let Some(value) = content.get(field).and_then(level) {
            accepted.insert(field.to_owned(), value);
        }
    }
    for field in LEVEL_MAPS {
        let Some(entries) = content.get(field).and_then(JsonValue::as_object) else { continue };
        let entries: Map<String, JsonValue> = entries
            .iter()
            .filter(|(key, _)| field != "users" || UserId::parse(key.as_str()).is_ok())
            .filter_map(|(key, value)| Some((key.clone(), level(value)?)))
            .collect();
        accepted.insert(field.to_owned(), JsonValue::Object(entries));
    }
    serde_json::from_value(JsonValue::Object(accepted)).map_err(Error::internal)
}

/// `levels` written out as an `m.room.power_levels` content: integer values, which every room
/// version accepts, and no privileged creator listed, which no version accepts.
pub fn power_levels_event_content(mut levels: RoomPowerLevels) -> Result<JsonValue> {
    if let Some(creators) = &levels.rules.privileged_creators {
        levels.users.retain(|user_id, _| !creators.contains(user_id));
    }
    let content = RoomPowerLevelsEventContent::try_from(levels).map_err(Error::internal)?;
    serde_json::to_value(content).map_err(Error::internal)
}

/// A user's power level as a number; creators privileged by their room version rank above
/// every level, as `i64::MAX`.
pub fn level_number(level: UserPowerLevel) -> i64 {
    match level {
        UserPowerLevel::Int(level) => level.into(),
        _ => i64::MAX,
    }
}

/// The room's creators from its `m.room.create` event (sent by `sender` with `content`), under
/// the rules of the room version the content names: the `creator` field before room version 11,
/// the sender from it, and the valid `additional_creators` from room version 12.
pub fn creators_from(sender: &UserId, content: &JsonValue) -> Vec<OwnedUserId> {
    let user = |value: &JsonValue| value.as_str().and_then(|u| UserId::parse(u).ok());
    let version = content.get("room_version").and_then(JsonValue::as_str).unwrap_or("1");
    let rules = RoomVersionId::try_from(version).ok().and_then(|v| v.rules());
    let by_sender = rules.as_ref().is_none_or(|r| r.authorization.use_room_create_sender);
    let creator = match content.get("creator").and_then(user) {
        Some(creator) if !by_sender => creator,
        _ => sender.to_owned(),
    };
    let additional = rules.is_none_or(|r| r.authorization.additional_room_creators);
    let listed = content.get("additional_creators").and_then(JsonValue::as_array);
    let others = listed.into_iter().flatten().filter(|_| additional).filter_map(user);
    let mut creators = vec![creator];
    for other in others {
        if !creators.contains(&other) {
            creators.push(other);
        }
    }
    creators
}

/// The join rule in an `m.room.join_rules` content (`None` when the room has none): `invite`,
/// as the auth rules read it, when absent or unreadable.
pub fn join_rule_from(content: Option<&JsonValue>) -> JoinRule {
    content.and_then(|c| serde_json::from_value(c.clone()).ok()).unwrap_or(JoinRule::Invite)
}

/// The rooms whose members a `restricted` or `knock_restricted` join rule lets in (none for
/// other rules).
pub fn allowed_rooms(join_rule: &JoinRule) -> Vec<OwnedRoomId> {
    let (JoinRule::Restricted(restricted) | JoinRule::KnockRestricted(restricted)) = join_rule
    else {
        return Vec::new();
    };
    let room = |rule: &AllowRule| match rule {
        AllowRule::RoomMembership(membership) => Some(membership.room_id.clone()),
        _ => None,
    };
    restricted.allow.iter().filter_map(room).collect()
}

/// The history visibility in an `m.room.history_visibility` content (`None` when the room has
/// none): `shared`, the spec's default, when absent or unreadable.
pub fn history_visibility_from(content: Option<&JsonValue>) -> HistoryVisibility {
    content
        .and_then(|c| c.get("history_visibility"))
        .and_then(JsonValue::as_str)
        .map_or(HistoryVisibility::Shared, HistoryVisibility::from)
}

impl Rooms {
    /// The room's creators in `state` (see [`creators_from`]); none before its create event.
    pub fn creators(&self, state: &StateMap) -> Result<Vec<OwnedUserId>> {
        let Some(create) = self.state_pdu_of(state, "m.room.create", "")? else {
            return Ok(Vec::new());
        };
        let content = serde_json::from_str(create.content.get()).unwrap_or_default();
        Ok(creators_from(&create.sender, &content))
    }

    /// Whether `user_id` is a creator of the room (see [`creators_from`]).
    pub fn is_creator(&self, state: &StateMap, user_id: &UserId) -> Result<bool> {
        Ok(self.creators(state)?.iter().any(|creator| creator == user_id))
    }

    /// The effective power levels in `state` under the rules of room `version` (see
    /// [`power_levels_from`]).
    pub fn power_levels(
        &self,
        state: &StateMap,
        version: &RoomVersionId,
    ) -> Result<RoomPowerLevels> {
        let rules = version_rules(version)?;
        let content = self.state_content(state, "m.room.power_levels", "")?;
        power_levels_from(content.as_ref(), &rules.authorization, self.creators(state)?)
    }

    /// The power level of `user_id` in `state` as a number (see [`level_number`]).
    pub fn power_level(
        &self,
        state: &StateMap,
        version: &RoomVersionId,
        user_id: &UserId,
    ) -> Result<i64> {
        Ok(level_number(self.power_levels(state, version)?.for_user(user_id)))
    }

    /// The `m.room.power_levels` content a change to `state`'s power levels starts from: the
    /// current event's content as sent, or the room's default levels written out when it has
    /// none, so that creators keep the 100 the defaults give them.
    pub fn power_levels_to_change(
        &self,
        state: &StateMap,
        version: &RoomVersionId,
    ) -> Result<JsonValue> {
        match self.state_content(state, "m.room.power_levels", "")? {
            Some(content) => Ok(content),
            None => power_levels_event_content(self.power_levels(state, version)?),
        }
    }

    /// Whether `user_id`, joined to `room_id`, has the power to send the state event `kind`.
    pub fn may_send_state(&self, room_id: &RoomId, user_id: &UserId, kind: &str) -> Result<bool> {
        if self.membership(room_id, user_id)?.as_deref() != Some("join") {
            return Ok(false);
        }
        let Some(record) = self.room(room_id)? else { return Ok(false) };
        let state = self.states.load(record.current_state)?;
        let levels = self.power_levels(&state, &record.version)?;
        Ok(levels.user_can_send_state(user_id, StateEventType::from(kind)))
    }

    /// The join rule in `state` (see [`join_rule_from`]).
    pub fn join_rule(&self, state: &StateMap) -> Result<JoinRule> {
        Ok(join_rule_from(self.state_content(state, "m.room.join_rules", "")?.as_ref()))
    }

    /// The join rule of the state `root`, read without loading the rest of it.
    pub fn join_rule_at(&self, root: u64) -> Result<JoinRule> {
        let content = match self.states.get(root, "m.room.join_rules", "")? {
            Some(short) => serde_json::from_str(self.state_pdu(short)?.content.get()).ok(),
            None => None,
        };
        Ok(join_rule_from(content.as_ref()))
    }

    /// Whether `user_id` is joined to one of the rooms `join_rule` lets the members of in.
    pub fn in_allowed_room(&self, join_rule: &JoinRule, user_id: &UserId) -> Result<bool> {
        for room_id in allowed_rooms(join_rule) {
            if self.membership(&room_id, user_id)?.as_deref() == Some("join") {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The history visibility in `state` (see [`history_visibility_from`]).
    pub fn history_visibility(&self, state: &StateMap) -> Result<HistoryVisibility> {
        let content = self.state_content(state, "m.room.history_visibility", "")?;
        Ok(history_visibility_from(content.as_ref()))
    }

    /// The state `user_id` may read in `room_id`: the current state while joined (or when the
    /// room is world-readable), the state when they left after leaving.
    pub fn readable_state(&self, room_id: &RoomId, user_id: &UserId) -> Result<Arc<StateMap>> {
        let not_member = || Error::forbidden("You are not a member of this room");
        let record = self.room(room_id)?.ok_or_else(not_member)?;
        let current = self.states.load(record.current_state)?;
        match self.membership(room_id, user_id)?.as_deref() {
            Some("join") => Ok(current),
            Some("leave" | "ban") if !self.forgotten(room_id, user_id)? => {
                let event = self
                    .state_event(&current, "m.room.member", user_id.as_str())?
                    .ok_or_else(not_member)?;
                self.states.load(event.state_after)
            }
            _ if self.history_visibility(&current)? == HistoryVisibility::WorldReadable => {
                Ok(current)
            }
            _ => Err(not_member()),
        }
    }

    /// Whether `user_id` may see `event` under the room's history visibility.
    pub fn can_see(&self, user_id: &UserId, event: &StoredPdu) -> Result<bool> {
        // Outliers, rejected and soft-failed events are kept for the graph, never shown.
        if !event.status.is_accepted() {
            return Ok(false);
        }
        // Two entries of the state before it, read without loading the rest.
        let state = event.state_before;
        let visibility = match self.states.get(state, "m.room.history_visibility", "")? {
            Some(short) => {
                let pdu = self.state_pdu(short)?;
                let content = serde_json::from_str(pdu.content.get()).ok();
                history_visibility_from(content.as_ref())
            }
            None => history_visibility_from(None),
        };
        if visibility == HistoryVisibility::WorldReadable {
            return Ok(true);
        }
        // One's own membership changes are always visible to oneself.
        let own_member_event = event.wire.get("type").and_then(|t| t.as_str())
            == Some("m.room.member")
            && event.wire.get("state_key").and_then(|k| k.as_str()) == Some(user_id.as_str());
        if own_member_event {
            return Ok(true);
        }
        let then = match self.states.get(state, "m.room.member", user_id.as_str())? {
            Some(short) => self.state_pdu(short)?.membership().unwrap_or("leave").to_owned(),
            None => "leave".to_owned(),
        };
        let now = self.membership(&event.room_id, user_id)?;
        if now.is_none()
            || (now.as_deref() != Some("join") && self.forgotten(&event.room_id, user_id)?)
        {
            return Ok(false); // never a member, or left and forgot the room
        }
        Ok(match (visibility, then.as_str()) {
            (_, "join") => true,
            (HistoryVisibility::Invited, "invite") => true,
            (HistoryVisibility::Shared, _) => now.as_deref() == Some("join"),
            _ => false,
        })
    }
}

#[cfg(test)]
mod tests {
    use ruma::{
        events::{MessageLikeEventType, room::power_levels::PowerLevelAction},
        int, owned_room_id, owned_user_id, user_id,
    };
    use serde_json::json;

    use super::*;

    fn rules(version: &str) -> AuthorizationRules {
        RoomVersionId::try_from(version).unwrap().rules().unwrap().authorization
    }

    fn levels(version: &str, content: Option<JsonValue>) -> RoomPowerLevels {
        let creators = vec![owned_user_id!("@creator:plaza.test")];
        power_levels_from(content.as_ref(), &rules(version), creators).unwrap()
    }

    #[test]
    fn string_power_values_count_up_to_room_version_9_only() {
        let content = json!({
            "users": { "@mod:plaza.test": "60", "@admin:plaza.test": 100 },
            "users_default": "5",
            "ban": " 70 ",
            "events": { "m.room.name": "80" },
            "notifications": { "room": "20" },
        });
        let mod_ = user_id!("@mod:plaza.test");
        let admin = user_id!("@admin:plaza.test");
        for version in ["1", "6", "9"] {
            let levels = levels(version, Some(content.clone()));
            assert_eq!(levels.for_user(mod_), int!(60), "v{version}");
            assert_eq!(levels.for_user(admin), int!(100), "v{version}");
            assert_eq!(levels.users_default, int!(5), "v{version}");
            assert_eq!(levels.ban, int!(70), "v{version}");
            assert_eq!(levels.for_state(StateEventType::RoomName), int!(80), "v{version}");
            assert_eq!(levels.notifications.room, int!(20), "v{version}");
        }
        for version in ["10", "11", "12"] {
            let levels = levels(version, Some(content.clone()));
            assert_eq!(levels.for_user(mod_), int!(0), "v{version}: strings are not levels");
            assert_eq!(levels.for_user(admin), int!(100), "v{version}: integers still count");
            assert_eq!(levels.ban, int!(50), "v{version}");
            assert_eq!(levels.for_state(StateEventType::RoomName), int!(50), "v{version}");
            assert_eq!(levels.notifications.room, int!(50), "v{version}");
        }
    }

    #[test]
    fn one_bad_value_hides_nothing_else() {
        let content = json!({
            "users": { "not a user id": 100, "@a:plaza.test": "lots", "@b:plaza.test": 40 },
            "kick": { "nested": true },
            "redact": 30.5,
            "invite": 10,
        });
        let levels = levels("9", Some(content));
        assert_eq!(levels.for_user(user_id!("@a:plaza.test")), int!(0));
        assert_eq!(levels.for_user(user_id!("@b:plaza.test")), int!(40));
        assert_eq!((levels.kick, levels.redact, levels.invite), (int!(50), int!(50), int!(10)));
    }

    #[test]
    fn without_power_levels_the_spec_defaults_hold() {
        let creator = user_id!("@creator:plaza.test");
        let other = user_id!("@other:plaza.test");
        for version in ["1", "10", "11"] {
            let levels = levels(version, None);
            assert_eq!(levels.for_user(creator), int!(100), "v{version}");
            assert_eq!(levels.for_user(other), int!(0), "v{version}");
            assert_eq!((levels.ban, levels.kick, levels.redact), (int!(50), int!(50), int!(50)));
            assert_eq!((levels.invite, levels.events_default), (int!(0), int!(0)));
            assert_eq!(levels.state_default, int!(50));
            assert!(!levels.user_can_send_state(other, StateEventType::RoomTopic));
            assert!(levels.user_can_send_state(creator, StateEventType::RoomPowerLevels));
        }
        let levels = levels("12", None);
        assert_eq!(levels.for_user(creator), UserPowerLevel::Infinite);
        assert!(levels.users.is_empty(), "v12 never lists creators");
        assert_eq!(levels.for_user(other), int!(0));
    }

    #[test]
    fn room_version_12_creators_rank_above_every_level() {
        let content = json!({ "users": { "@creator:plaza.test": 10, "@top:plaza.test": 9000 } });
        let creator = user_id!("@creator:plaza.test");
        let v11 = levels("11", Some(content.clone()));
        assert_eq!(v11.for_user(creator), int!(10), "before v12 the event decides");
        let v12 = levels("12", Some(content));
        assert_eq!(v12.for_user(creator), UserPowerLevel::Infinite);
        assert!(v12.for_user(creator) > v12.for_user(user_id!("@top:plaza.test")));
        assert_eq!(level_number(v12.for_user(creator)), i64::MAX);
        assert_eq!(level_number(v12.for_user(user_id!("@top:plaza.test"))), 9000);
    }

    #[test]
    fn required_levels_follow_events_then_the_defaults() {
        let content = json!({
            "events": { "m.room.name": 70, "m.room.message": 20, "m.room.redaction": 5 },
            "events_default": 10,
            "state_default": 60,
            "redact": 40,
            "invite": 30,
            "notifications": { "room": 90 },
            "users": { "@mod:plaza.test": 40 },
        });
        let levels = levels("11", Some(content));
        assert_eq!(levels.for_state(StateEventType::RoomName), int!(70));
        assert_eq!(levels.for_state(StateEventType::RoomTopic), int!(60));
        assert_eq!(levels.for_message(MessageLikeEventType::RoomMessage), int!(20));
        assert_eq!(levels.for_message(MessageLikeEventType::Reaction), int!(10));
        assert_eq!(levels.for_action(PowerLevelAction::Invite), int!(30));
        assert_eq!(levels.for_action(PowerLevelAction::RedactOther), int!(40));
        assert_eq!(levels.notifications.room, int!(90));
        let moderator = user_id!("@mod:plaza.test");
        assert!(levels.user_can_redact_event_of_other(moderator));
        assert!(!levels.user_can_send_state(moderator, StateEventType::RoomTopic));
        assert!(!levels.user_can_trigger_room_notification(moderator));
    }

    #[test]
    fn written_out_levels_hold_integers() {
        let content = json!({ "users": { "@mod:plaza.test": "60" }, "kick": "75" });
        let written = power_levels_event_content(levels("9", Some(content))).unwrap();
        assert_eq!(written["users"]["@mod:plaza.test"], json!(60));
        assert_eq!(written["kick"], json!(75));
        let defaults = power_levels_event_content(levels("11", None)).unwrap();
        assert_eq!(defaults["users"]["@creator:plaza.test"], json!(100));
    }

    #[test]
    fn creators_follow_the_version_named_by_the_create_event() {
        let sender = user_id!("@sender:plaza.test");
        let old = json!({ "creator": "@named:plaza.test", "room_version": "10" });
        assert_eq!(creators_from(sender, &old), vec![owned_user_id!("@named:plaza.test")]);
        let v1 = json!({ "creator": "@named:plaza.test" });
        assert_eq!(creators_from(sender, &v1), vec![owned_user_id!("@named:plaza.test")]);
        let v11 = json!({ "room_version": "11", "additional_creators": ["@extra:plaza.test"] });
        assert_eq!(creators_from(sender, &v11), vec![sender.to_owned()]);
        let v12 = json!({
            "room_version": "12",
            "additional_creators": ["@extra:plaza.test", "not a user", "@sender:plaza.test"],
        });
        assert_eq!(
            creators_from(sender, &v12),
            vec![sender.to_owned(), owned_user_id!("@extra:plaza.test")]
        );
    }

    #[test]
    fn join_rules_default_to_invite_and_keep_their_allow_lists() {
        assert_eq!(join_rule_from(None), JoinRule::Invite);
        assert_eq!(join_rule_from(Some(&json!({ "join_rule": 7 }))), JoinRule::Invite);
        assert_eq!(join_rule_from(Some(&json!({ "join_rule": "public" }))), JoinRule::Public);
        let restricted = join_rule_from(Some(&json!({
            "join_rule": "knock_restricted",
            "allow": [
                { "type": "m.room_membership", "room_id": "!space:plaza.test" },
                { "type": "m.room_membership", "room_id": "not a room" },
                { "type": "org.example.other" },
            ],
        })));
        assert_eq!(restricted.as_str(), "knock_restricted");
        assert_eq!(allowed_rooms(&restricted), vec![owned_room_id!("!space:plaza.test")]);
        let public = json!({ "join_rule": "public", "allow": [
            { "type": "m.room_membership", "room_id": "!space:plaza.test" }] });
        assert!(allowed_rooms(&join_rule_from(Some(&public))).is_empty());
    }

    #[test]
    fn history_visibility_defaults_to_shared() {
        assert_eq!(history_visibility_from(None), HistoryVisibility::Shared);
        assert_eq!(history_visibility_from(Some(&json!({}))), HistoryVisibility::Shared);
        let malformed = json!({ "history_visibility": 3 });
        assert_eq!(history_visibility_from(Some(&malformed)), HistoryVisibility::Shared);
        let joined = json!({ "history_visibility": "joined" });
        assert_eq!(history_visibility_from(Some(&joined)), HistoryVisibility::Joined);
        let readable = json!({ "history_visibility": "world_readable" });
        assert_eq!(history_visibility_from(Some(&readable)), HistoryVisibility::WorldReadable);
    }
}
