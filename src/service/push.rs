//! Push rules: each user's ruleset, starting from the server defaults (mentions, keywords,
//! direct chats, encrypted rooms, ...) and changed through the `/pushrules` API. The ruleset is
//! kept as the `m.push_rules` account data that clients also read from sync.

use ruma::{UserId, push::Ruleset};
use serde_json::{Value as JsonValue, json};

use super::Services;
use crate::error::{Error, Result};

/// The account data type the ruleset is stored as.
pub const PUSH_RULES: &str = "m.push_rules";

/// The push rules of `user_id`.
pub fn ruleset(services: &Services, user_id: &UserId) -> Result<Ruleset> {
    match services.account_data.get(user_id, None, PUSH_RULES)? {
        Some(content) => {
            let mut stored: Ruleset =
                serde_json::from_value(content["global"].clone()).map_err(Error::internal)?;
            // Server-default rules added since the user last changed theirs appear too.
            stored.update_with_server_default(Ruleset::server_default(user_id));
            Ok(stored)
        }
        None => Ok(Ruleset::server_default(user_id)),
    }
}

/// The `m.push_rules` account data content for `user_id` (the defaults until changed).
pub fn account_data(services: &Services, user_id: &UserId) -> Result<JsonValue> {
    Ok(json!({ "global": ruleset(services, user_id)? }))
}

/// Changes `user_id`'s ruleset with `change`, serialised per user and stored durably.
pub fn update<T>(
    services: &Services,
    user_id: &UserId,
    change: impl FnOnce(&mut Ruleset) -> Result<T>,
) -> Result<T> {
    let _guard = services.sessions.lock_user(user_id);
    let mut rules = ruleset(services, user_id)?;
    let result = change(&mut rules)?;
    let content = json!({ "global": rules });
    services.account_data.store(services, user_id, None, PUSH_RULES, content)?;
    Ok(result)
}
