//! Client-server API handlers, one file per area of the spec.

pub mod account;
pub mod account_data;
pub mod backup;
pub mod dehydrated;
pub mod devices;
pub mod directory;
pub mod discovery;
pub mod ephemeral;
pub mod events;
pub mod keys;
pub mod openid;
pub mod presence;
pub mod profile;
pub mod push;
pub mod register;
pub mod relations;
pub mod rooms;
pub mod search;
pub mod session;
pub mod sliding;
pub mod space;
pub mod sync;
pub mod thirdparty;
pub mod user_directory;
pub mod voip;
