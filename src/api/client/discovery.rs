//! `/versions` and `/capabilities`: what this server speaks.

use ruma::{
    RoomVersionId,
    api::client::discovery::{
        get_capabilities::v3::{self as capabilities, Capabilities, RoomVersionStability},
        get_supported_versions,
    },
};

use crate::{
    api::{Ruma, State},
    error::Result,
};

/// Spec versions this server implements.
const VERSIONS: &[&str] = &[
    "r0.5.0", "r0.6.0", "r0.6.1", "v1.1", "v1.2", "v1.3", "v1.4", "v1.5", "v1.6", "v1.7", "v1.8",
    "v1.9", "v1.10", "v1.11", "v1.12", "v1.13",
];

/// Room versions this server can create and join: every stable version whose state it can
/// resolve (room version 1 resolves with an algorithm Plaza does not implement).
pub const ROOM_VERSIONS: &[RoomVersionId] = &[
    RoomVersionId::V2,
    RoomVersionId::V3,
    RoomVersionId::V4,
    RoomVersionId::V5,
    RoomVersionId::V6,
    RoomVersionId::V7,
    RoomVersionId::V8,
    RoomVersionId::V9,
    RoomVersionId::V10,
    RoomVersionId::V11,
    RoomVersionId::V12,
];

/// `GET /_matrix/client/versions`
pub async fn versions(
    _: State,
    _: Ruma<get_supported_versions::Request>,
) -> Result<get_supported_versions::Response> {
    let mut response =
        get_supported_versions::Response::new(VERSIONS.iter().map(|v| (*v).to_owned()).collect());
    response.unstable_features.extend([
        ("org.matrix.msc2432".to_owned(), true),
        ("org.matrix.msc3882".to_owned(), false),
        ("org.matrix.e2e_cross_signing".to_owned(), true),
        ("org.matrix.msc4140".to_owned(), true),
        ("org.matrix.simplified_msc3575".to_owned(), true),
    ]);
    Ok(response)
}

/// `GET /_matrix/client/v3/capabilities`
#[allow(deprecated)]
pub async fn capabilities(
    services: State,
    req: Ruma<capabilities::Request>,
) -> Result<capabilities::Response> {
    req.caller()?;
    let mut caps = Capabilities::default();
    caps.change_password.enabled = true;
    caps.room_versions.default = services.config.rooms.default_version.clone();
    caps.room_versions.available =
        ROOM_VERSIONS.iter().map(|v| (v.clone(), RoomVersionStability::Stable)).collect();
    caps.set_displayname.enabled = true;
    caps.set_avatar_url.enabled = true;
    caps.thirdparty_id_changes.enabled = false;
    Ok(capabilities::Response::new(caps))
}
