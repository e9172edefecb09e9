//! The request and response bodies of simplified sliding sync (MSC4186). Ruma's types lack
//! the `spaces` list filter and the `expanded_timeline` room field, so the bodies are
//! described here; ruma's own pieces are used where they fit.

use std::collections::BTreeMap;

use ruma::{OwnedMxcUri, OwnedRoomId, OwnedUserId};
use serde::{Deserialize, Serialize};
use serde_json::Value as JsonValue;

use crate::error::{Error, Result};

/// Most lists in one request.
pub const MAX_LISTS: usize = 64;
/// Most ranges in one list.
pub const MAX_RANGES: usize = 16;
/// Most rooms one list's ranges may cover in all.
pub const MAX_WINDOW: u64 = 1_000;
/// Most room subscriptions in one request.
pub const MAX_SUBSCRIPTIONS: usize = 500;
/// Most `required_state` entries of a list or subscription.
pub const MAX_REQUIRED_STATE: usize = 100;
/// Most timeline events per room; larger limits are cut to it.
pub const MAX_TIMELINE_LIMIT: usize = 100;
/// Most spaces a list filter may name.
pub const MAX_SPACES: usize = 50;
/// Longest `conn_id` and list name, in bytes.
pub const MAX_NAME_BYTES: usize = 128;

/// The request body.
#[derive(Debug, Default, Deserialize)]
pub struct Body {
    /// The client's name for this connection (several may run side by side).
    #[serde(default)]
    pub conn_id: Option<String>,
    /// Echoed in the response.
    #[serde(default)]
    pub txn_id: Option<String>,
    /// Sliding windows over the user's rooms.
    #[serde(default)]
    pub lists: BTreeMap<String, List>,
    /// Rooms wanted whatever the lists hold.
    #[serde(default)]
    pub room_subscriptions: BTreeMap<OwnedRoomId, RoomDetails>,
    /// Extensions; unknown ones are ignored.
    #[serde(default)]
    pub extensions: Extensions,
}

/// A list: which rooms, and what of each.
#[derive(Debug, Default, Deserialize)]
pub struct List {
    /// Inclusive index ranges into the sorted, filtered rooms.
    #[serde(default)]
    pub ranges: Vec<(u64, u64)>,
    /// What to send of each room in range.
    #[serde(flatten)]
    pub details: RoomDetails,
    /// Which rooms the list holds.
    #[serde(default)]
    pub filters: Option<Filters>,
}

/// What to send of a room.
#[derive(Debug, Default, Deserialize, Clone)]
pub struct RoomDetails {
    /// `[type, state_key]` pairs, with `*`, `$ME` and `$LAZY`.
    #[serde(default)]
    pub required_state: Vec<(String, String)>,
    /// How many of the newest timeline events to send.
    #[serde(default)]
    pub timeline_limit: u64,
}

/// A list's filters; all given must hold.
#[derive(Debug, Default, Deserialize)]
pub struct Filters {
    /// Only rooms in (or not in) the user's `m.direct`.
    #[serde(default)]
    pub is_dm: Option<bool>,
    /// Only encrypted (or unencrypted) rooms.
    #[serde(default)]
    pub is_encrypted: Option<bool>,
    /// Only invites (or no invites).
    #[serde(default)]
    pub is_invite: Option<bool>,
    /// Only rooms of these types (`null` for rooms without a type).
    #[serde(default)]
    pub room_types: Vec<Option<String>>,
    /// No rooms of these types.
    #[serde(default)]
    pub not_room_types: Vec<Option<String>>,
    /// Only children of these spaces.
    #[serde(default)]
    pub spaces: Vec<OwnedRoomId>,
}

/// The extensions a request asks for.
#[derive(Debug, Default, Deserialize)]
pub struct Extensions {
    /// To-device messages.
    #[serde(default)]
    pub to_device: ToDevice,
    /// Device lists and key counts.
    #[serde(default)]
    pub e2ee: Toggle,
    /// Global and room account data.
    #[serde(default)]
    pub account_data: Scoped,
    /// Read receipts.
    #[serde(default)]
    pub receipts: Scoped,
    /// Typing notifications.
    #[serde(default)]
    pub typing: Scoped,
}

/// The to-device extension's settings.
#[derive(Debug, Default, Deserialize)]
pub struct ToDevice {
    /// On or off.
    #[serde(default)]
    pub enabled: Option<bool>,
    /// Most messages per answer.
    #[serde(default)]
    pub limit: Option<u64>,
    /// The `next_batch` of the last answer received.
    #[serde(default)]
    pub since: Option<String>,
}

/// An extension that is only switched on or off.
#[derive(Debug, Default, Deserialize)]
pub struct Toggle {
    /// On or off.
    #[serde(default)]
    pub enabled: Option<bool>,
}

/// An extension about rooms, scoped to some lists and subscriptions.
#[derive(Debug, Default, Deserialize)]
pub struct Scoped {
    /// On or off.
    #[serde(default)]
    pub enabled: Option<bool>,
    /// The lists whose rooms it covers (all when absent).
    #[serde(default)]
    pub lists: Option<Vec<String>>,
    /// The subscribed rooms it covers, `*` for all (all when absent).
    #[serde(default)]
    pub rooms: Option<Vec<String>>,
}

impl Body {
    /// Refuses malformed or oversized requests with `M_INVALID_PARAM`.
    pub fn check(&self) -> Result<()> {
        if self.conn_id.as_ref().is_some_and(|c| c.len() > MAX_NAME_BYTES) {
            return Err(Error::invalid_param("conn_id is too long"));
        }
        if self.lists.len() > MAX_LISTS {
            return Err(Error::invalid_param(format!("At most {MAX_LISTS} lists")));
        }
        if self.room_subscriptions.len() > MAX_SUBSCRIPTIONS {
            return Err(Error::invalid_param(format!(
                "At most {MAX_SUBSCRIPTIONS} room subscriptions"
            )));
        }
        for (name, list) in &self.lists {
            if name.len() > MAX_NAME_BYTES {
                return Err(Error::invalid_param("List name is too long"));
            }
            if list.ranges.len() > MAX_RANGES {
                return Err(Error::invalid_param(format!("At most {MAX_RANGES} ranges per list")));
            }
            if let Some((start, end)) = list.ranges.iter().find(|(start, end)| start > end) {
                return Err(Error::invalid_param(format!(
                    "Range [{start}, {end}] of list {name} ends before it starts"
                )));
            }
            list.details.check()?;
            if list.filters.as_ref().is_some_and(|f| f.spaces.len() > MAX_SPACES) {
                return Err(Error::invalid_param(format!("At most {MAX_SPACES} spaces")));
            }
        }
        self.room_subscriptions.values().try_for_each(RoomDetails::check)
    }
}

impl RoomDetails {
    fn check(&self) -> Result<()> {
        if self.required_state.len() > MAX_REQUIRED_STATE {
            return Err(Error::invalid_param(format!(
                "At most {MAX_REQUIRED_STATE} required_state entries"
            )));
        }
        Ok(())
    }

    /// The timeline limit, cut to [`MAX_TIMELINE_LIMIT`].
    pub fn limit(&self) -> usize {
        (self.timeline_limit.min(MAX_TIMELINE_LIMIT as u64)) as usize
    }
}

/// The response body.
#[derive(Debug, Serialize)]
pub struct Response {
    /// The position to send next.
    pub pos: String,
    /// The request's `txn_id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub txn_id: Option<String>,
    /// Each list's room count.
    pub lists: BTreeMap<String, ListCount>,
    /// Rooms with something new.
    pub rooms: BTreeMap<OwnedRoomId, Room>,
    /// Extension answers.
    pub extensions: BTreeMap<&'static str, JsonValue>,
}

/// A list's answer.
#[derive(Debug, Serialize)]
pub struct ListCount {
    /// How many rooms pass the list's filters.
    pub count: u64,
}

/// A room's answer.
#[derive(Debug, Default, Serialize)]
pub struct Room {
    /// The room's name, when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The room's avatar; `null` when it was removed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub avatar: Option<Option<OwnedMxcUri>>,
    /// Members to name the room after, when it has no name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heroes: Option<Vec<Hero>>,
    /// Whether this is the room's first appearance on the connection (replace, not merge).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initial: Option<bool>,
    /// Whether the room is a direct chat.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub is_dm: Option<bool>,
    /// The room as an invitee sees it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub invite_state: Option<Vec<JsonValue>>,
    /// The newest timeline events.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub timeline: Vec<JsonValue>,
    /// Whether earlier events were left out.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub limited: bool,
    /// Whether the timeline was sent longer than before (a larger `timeline_limit`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub expanded_timeline: bool,
    /// The `/messages` token before the timeline.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prev_batch: Option<String>,
    /// How many timeline events are new since the last answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_live: Option<u64>,
    /// The required state.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub required_state: Vec<JsonValue>,
    /// Joined members.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub joined_count: Option<u64>,
    /// Invited members.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub invited_count: Option<u64>,
    /// Unread notifications.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notification_count: Option<u64>,
    /// Unread highlights.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub highlight_count: Option<u64>,
    /// Where the room sorts by recency.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bump_stamp: Option<u64>,
}

/// A member a nameless room is named after.
#[derive(Debug, Serialize)]
pub struct Hero {
    /// The member.
    pub user_id: OwnedUserId,
    /// Their display name in the room.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub displayname: Option<String>,
    /// Their avatar in the room.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub avatar_url: Option<String>,
}
