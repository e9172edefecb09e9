//! Roles: the Synapse-compatible admin flag and Plaza's role (admin, auditor, user).

use axum::{
    Json,
    body::Body,
    extract::{Path, State as AxumState},
};
use serde::Deserialize;
use serde_json::{Value as JsonValue, json};

use super::{Admin, Staff, json_body, user_id};
use crate::{
    api::State,
    error::{Error, Result},
    service::users::Role,
};

fn role_of(services: &State, raw: &str) -> Result<(ruma::OwnedUserId, Role)> {
    let user_id = user_id(raw)?;
    let record = services.users.get(&user_id)?.ok_or_else(|| Error::not_found("No such user"))?;
    Ok((user_id, record.role()))
}

/// `GET /_synapse/admin/v1/users/{userId}/admin`
pub async fn get_admin(
    AxumState(services): AxumState<State>,
    _: Staff,
    Path(user): Path<String>,
) -> Result<Json<JsonValue>> {
    let (_, role) = role_of(&services, &user)?;
    Ok(Json(json!({ "admin": role == Role::Admin })))
}

#[derive(Deserialize)]
struct AdminBody {
    admin: bool,
}

/// `PUT /_synapse/admin/v1/users/{userId}/admin`: `{"admin": true}` makes an admin,
/// `{"admin": false}` an ordinary user (an auditor stays an auditor).
pub async fn set_admin(
    AxumState(services): AxumState<State>,
    Admin(caller): Admin,
    Path(user): Path<String>,
    body: Body,
) -> Result<Json<JsonValue>> {
    let body: AdminBody = json_body(&services, body).await?;
    let (user_id, current) = role_of(&services, &user)?;
    let role = match (body.admin, current) {
        (true, _) => Role::Admin,
        (false, Role::Admin) => Role::User,
        (false, other) => other,
    };
    services.set_role(Some(&caller.user_id), &user_id, role)?;
    Ok(Json(json!({})))
}

/// `GET /_plaza/admin/v1/users/{userId}/role`
pub async fn get_role(
    AxumState(services): AxumState<State>,
    _: Staff,
    Path(user): Path<String>,
) -> Result<Json<JsonValue>> {
    let (user_id, role) = role_of(&services, &user)?;
    Ok(Json(json!({ "user_id": user_id, "role": role.as_str() })))
}

#[derive(Deserialize)]
struct RoleBody {
    role: String,
}

/// `PUT /_plaza/admin/v1/users/{userId}/role` with `{"role": "admin" | "auditor" | "user"}`.
pub async fn set_role(
    AxumState(services): AxumState<State>,
    Admin(caller): Admin,
    Path(user): Path<String>,
    body: Body,
) -> Result<Json<JsonValue>> {
    let body: RoleBody = json_body(&services, body).await?;
    let role: Role = body.role.parse()?;
    let user_id = user_id(&user)?;
    let previous = services.set_role(Some(&caller.user_id), &user_id, role)?;
    Ok(Json(json!({ "user_id": user_id, "role": role.as_str(), "previous": previous.as_str() })))
}
