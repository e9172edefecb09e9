//! `/pushrules`, `/pushers` and `/notifications`: a user's push rules, where their
//! notifications are pushed, and the notifications themselves.

use ruma::{
    api::client::push::{
        delete_pushrule::v3 as delete_rule,
        get_notifications::v3 as get_notifications,
        get_pushers::v3 as get_pushers,
        get_pushrule::v3 as get_rule,
        get_pushrule_actions::v3 as get_actions,
        get_pushrule_enabled::v3 as get_enabled,
        get_pushrules_all::v3 as get_all,
        get_pushrules_global_scope::v3 as get_global,
        set_pusher::v3::{self as set_pusher, PusherAction},
        set_pushrule::v3 as set_rule,
        set_pushrule_actions::v3 as set_actions,
        set_pushrule_enabled::v3 as set_enabled,
    },
    push::{AnyPushRule, RuleKind},
};

use crate::{
    api::{Ruma, State},
    error::{Error, Result},
    service::push,
};

fn not_found() -> Error {
    Error::not_found("No such push rule")
}

fn rule(
    services: &State,
    user_id: &ruma::UserId,
    kind: RuleKind,
    rule_id: &str,
) -> Result<AnyPushRule> {
    let rules = push::ruleset(services, user_id)?;
    rules.get(kind, rule_id).map(|r| r.to_owned()).ok_or_else(not_found)
}

/// `GET /_matrix/client/v3/pushrules/`
pub async fn all(services: State, req: Ruma<get_all::Request>) -> Result<get_all::Response> {
    let caller = req.caller()?;
    Ok(get_all::Response::new(push::ruleset(&services, &caller.user_id)?))
}

/// `GET /_matrix/client/v3/pushrules/global/`
pub async fn global(
    services: State,
    req: Ruma<get_global::Request>,
) -> Result<get_global::Response> {
    let caller = req.caller()?;
    Ok(get_global::Response::new(push::ruleset(&services, &caller.user_id)?))
}

/// `GET /_matrix/client/v3/pushrules/global/{kind}/{ruleId}`
pub async fn get(services: State, req: Ruma<get_rule::Request>) -> Result<get_rule::Response> {
    let caller = req.caller()?;
    let rule = rule(&services, &caller.user_id, req.body.kind.clone(), &req.body.rule_id)?;
    Ok(get_rule::Response::new(rule.into()))
}

/// `PUT /_matrix/client/v3/pushrules/global/{kind}/{ruleId}` (with `before` / `after`)
pub async fn set(services: State, req: Ruma<set_rule::Request>) -> Result<set_rule::Response> {
    let caller = req.caller()?.clone();
    let body = req.body;
    push::update(&services, &caller.user_id, |rules| {
        rules
            .insert(body.rule, body.after.as_deref(), body.before.as_deref())
            .map_err(|e| Error::bad_json(e.to_string()))
    })?;
    Ok(set_rule::Response::new())
}

/// `DELETE /_matrix/client/v3/pushrules/global/{kind}/{ruleId}` (server-default rules stay)
pub async fn delete(
    services: State,
    req: Ruma<delete_rule::Request>,
) -> Result<delete_rule::Response> {
    let caller = req.caller()?.clone();
    let body = req.body;
    push::update(&services, &caller.user_id, |rules| {
        rules.remove(body.kind.clone(), &body.rule_id).map_err(|e| match e {
            ruma::push::RemovePushRuleError::NotFound => not_found(),
            other => Error::bad_json(other.to_string()),
        })
    })?;
    Ok(delete_rule::Response::new())
}

/// `GET /_matrix/client/v3/pushrules/global/{kind}/{ruleId}/enabled`
pub async fn enabled(
    services: State,
    req: Ruma<get_enabled::Request>,
) -> Result<get_enabled::Response> {
    let caller = req.caller()?;
    let rule = rule(&services, &caller.user_id, req.body.kind.clone(), &req.body.rule_id)?;
    Ok(get_enabled::Response::new(rule.enabled()))
}

/// `PUT /_matrix/client/v3/pushrules/global/{kind}/{ruleId}/enabled`
pub async fn set_enabled_flag(
    services: State,
    req: Ruma<set_enabled::Request>,
) -> Result<set_enabled::Response> {
    let caller = req.caller()?.clone();
    let body = req.body;
    push::update(&services, &caller.user_id, |rules| {
        rules.set_enabled(body.kind.clone(), &body.rule_id, body.enabled).map_err(|_| not_found())
    })?;
    Ok(set_enabled::Response::new())
}

/// `GET /_matrix/client/v3/pushrules/global/{kind}/{ruleId}/actions`
pub async fn actions(
    services: State,
    req: Ruma<get_actions::Request>,
) -> Result<get_actions::Response> {
    let caller = req.caller()?;
    let rule = rule(&services, &caller.user_id, req.body.kind.clone(), &req.body.rule_id)?;
    Ok(get_actions::Response::new(rule.actions().to_vec()))
}

/// `PUT /_matrix/client/v3/pushrules/global/{kind}/{ruleId}/actions`
pub async fn set_rule_actions(
    services: State,
    req: Ruma<set_actions::Request>,
) -> Result<set_actions::Response> {
    let caller = req.caller()?.clone();
    let body = req.body;
    push::update(&services, &caller.user_id, |rules| {
        rules
            .set_actions(body.kind.clone(), &body.rule_id, body.actions.clone())
            .map_err(|_| not_found())
    })?;
    Ok(set_actions::Response::new())
}

/// `GET /_matrix/client/v3/pushers`
pub async fn pushers(
    services: State,
    req: Ruma<get_pushers::Request>,
) -> Result<get_pushers::Response> {
    let caller = req.caller()?;
    let list = services.pushers.of(&caller.user_id).iter().map(|p| p.pusher.clone()).collect();
    Ok(get_pushers::Response::new(list))
}

/// `POST /_matrix/client/v3/pushers/set`: adds, replaces (`append` false) or removes
/// (`kind: null`) a pusher.
pub async fn set_pusher(
    services: State,
    req: Ruma<set_pusher::Request>,
) -> Result<set_pusher::Response> {
    let caller = req.caller()?.clone();
    match req.body.action {
        PusherAction::Post(post) => services.pushers.set(
            &services,
            &caller.user_id,
            Some(caller.device_id.as_str()),
            post.pusher,
            post.append,
        )?,
        PusherAction::Delete(ids) => {
            services.pushers.remove(&services, &caller.user_id, &ids.app_id, &ids.pushkey)?
        }
        _ => return Err(Error::invalid_param("Unsupported pusher action")),
    }
    Ok(set_pusher::Response::new())
}

/// `GET /_matrix/client/v3/notifications`
pub async fn notifications(
    services: State,
    req: Ruma<get_notifications::Request>,
) -> Result<get_notifications::Response> {
    use ruma::{MilliSecondsSinceUnixEpoch, UInt, serde::Raw};
    let caller = req.caller()?;
    let body = &req.body;
    let only_highlight = match body.only.as_deref() {
        None => false,
        Some("highlight") => true,
        Some(_) => return Err(Error::invalid_param("`only` may only be `highlight`")),
    };
    let limit = body.limit.map_or(20, |l| usize::try_from(l).unwrap_or(usize::MAX));
    let (page, next) = push::notifications::list(
        &services,
        &caller.user_id,
        body.from.as_deref(),
        limit,
        only_highlight,
    )?;
    let notifications = page
        .into_iter()
        .map(|listed| {
            let raw = serde_json::value::to_raw_value(&listed.event).map_err(Error::internal)?;
            Ok(get_notifications::Notification::new(
                listed.record.actions,
                Raw::from_json(raw),
                listed.read,
                listed.record.room_id,
                MilliSecondsSinceUnixEpoch(UInt::try_from(listed.record.ts).unwrap_or_default()),
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut response = get_notifications::Response::new(notifications);
    response.next_token = next;
    Ok(response)
}
