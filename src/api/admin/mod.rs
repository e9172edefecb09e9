//! Admin API: Synapse-compatible shapes so existing admin tooling works unchanged.

pub mod register;

use axum::Json;
use serde_json::{Value as JsonValue, json};

/// `GET /_synapse/admin/v1/server_version`
pub async fn server_version() -> Json<JsonValue> {
    Json(json!({ "server_version": concat!("Plaza ", env!("CARGO_PKG_VERSION")) }))
}
