//! Telling other servers what changed about this server's users outside room timelines: their
//! devices (`m.device_list_update`, one per device, with per-user stream ids so a server that
//! missed one asks for the whole list), their cross-signing keys (`m.signing_key_update`) and
//! their presence (`m.presence`, gathered briefly and sent in bounded batches when
//! `[federation] presence` is on). Each goes to the servers sharing a joined room with the
//! user. The E2EE and presence services call in here once a change is written.
//!
//! The other way round, a remote user's server tells us of their changes only while they share
//! a room with our users: [`RemoteMembers`] forgets the cached keys of remote users whose
//! membership changes (and of a room's remote members when one of ours joins it), so the next
//! key query asks their server afresh.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use ruma::{
    OwnedRoomId, OwnedServerName, OwnedUserId, RoomId, ServerName, UserId,
    api::federation::transactions::edu::{Edu, PresenceContent, PresenceUpdate},
    canonical_json::CanonicalJsonValue,
};
use tokio::sync::{Notify, watch};

use super::{
    edu::{self, servers_sharing},
    sender::{EdusQueued, queue_edu, queue_edu_in},
};
use crate::{
    error::Result,
    service::{
        Services,
        e2ee::DeviceUpdate,
        rooms::{listeners::Listener, pdu::StoredPdu},
    },
    storage::Batch,
};

/// Most users whose presence waits to be sent; changes past it are dropped (and logged).
const MAX_PENDING_PRESENCE: usize = 100_000;
/// Most presence updates in one EDU.
const MAX_PRESENCE_PER_EDU: usize = 100;
/// How long presence changes are gathered before they are sent together.
const PRESENCE_GATHER: Duration = Duration::from_millis(250);

/// Tells the servers sharing a room with local user `user_id` of each device change in
/// `updates`, as the device stands now (its keys and name, or deleted), in one synced write so
/// the updates are durable before the change is acknowledged. A failure is logged: the change
/// is made already, and the next one names this one so they ask again.
pub fn announce_devices(services: &Services, user_id: &UserId, updates: &[DeviceUpdate]) {
    let mut batch = services.db.batch();
    let queued = queue_devices(services, &mut batch, user_id, updates)
        .and_then(|queued| Ok(services.db.write(batch).map(|()| queued)?));
    match queued {
        Ok(queued) => queued.written(services),
        Err(err) => {
            tracing::warn!(%err, %user_id, "could not queue device list updates for other servers");
        }
    }
}

fn queue_devices(
    services: &Services,
    batch: &mut Batch,
    user_id: &UserId,
    updates: &[DeviceUpdate],
) -> Result<EdusQueued> {
    let mut queued = EdusQueued::default();
    if !services.federation.enabled() || updates.is_empty() {
        return Ok(queued);
    }
    let servers = servers_sharing(services, user_id)?;
    if servers.is_empty() {
        return Ok(queued);
    }
    for update in updates {
        let device = match services.sessions.device(user_id, &update.device_id)? {
            Some(record) => {
                let keys = services.e2ee.device_keys(user_id, &update.device_id)?;
                Some(edu::DeviceState { keys, display_name: record.display_name })
            }
            None => None,
        };
        let ids = (update.stream_id, update.prev_id);
        let edu = edu::device_list_update(user_id, &update.device_id, ids, device)?;
        queue_edu_in(services, batch, &servers, &edu, &mut queued)?;
    }
    Ok(queued)
}

/// Tells the servers sharing a room with local user `user_id` of its master and
/// self-signing keys as they stand now (user-signing keys stay private), durable before the
/// change is acknowledged.
pub fn announce_cross_signing(services: &Services, user_id: &UserId) {
    let queued = (|| -> Result<EdusQueued> {
        let mut queued = EdusQueued::default();
        if !services.federation.enabled() {
            return Ok(queued);
        }
        let servers = servers_sharing(services, user_id)?;
        if servers.is_empty() {
            return Ok(queued);
        }
        let master = services.e2ee.cross_signing(user_id, "master")?;
        let self_signing = services.e2ee.cross_signing(user_id, "self_signing")?;
        let edu = edu::signing_key_update(user_id, master.as_ref(), self_signing.as_ref())?;
        let mut batch = services.db.batch();
        queue_edu_in(services, &mut batch, &servers, &edu, &mut queued)?;
        services.db.write(batch)?;
        Ok(queued)
    })();
    match queued {
        Ok(queued) => queued.written(services),
        Err(err) => {
            tracing::warn!(%err, %user_id, "could not queue a signing key update for other servers");
        }
    }
}

/// Local users whose presence changed and is still to be sent.
#[derive(Default)]
pub struct PresenceOutbox {
    pending: Mutex<BTreeSet<OwnedUserId>>,
    /// Servers a user of which joined a room: they are told our members' presence there.
    introductions: Mutex<BTreeSet<(OwnedServerName, OwnedRoomId)>>,
    wake: Notify,
}

impl PresenceOutbox {
    /// Local user `user_id`'s presence changed: it goes to the servers sharing a room with
    /// them shortly, with the other changes of that moment.
    pub fn changed(&self, services: &Services, user_id: &UserId) {
        if !services.config.federation.presence
            || !services.federation.enabled()
            || user_id.server_name() != services.server_name()
        {
            return;
        }
        {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            if pending.len() >= MAX_PENDING_PRESENCE && !pending.contains(user_id) {
                tracing::warn!(%user_id, "too many presence changes waiting; this one is not sent");
                return;
            }
            pending.insert(user_id.to_owned());
        }
        self.wake.notify_one();
    }

    /// A user of `server` joined `room_id`: the server is told our joined members' current
    /// presence there, since it heard none of their earlier changes.
    pub fn introduce(&self, services: &Services, server: &ServerName, room_id: &RoomId) {
        if !services.config.federation.presence || !services.federation.enabled() {
            return;
        }
        {
            let mut introductions = self.introductions.lock().unwrap_or_else(|e| e.into_inner());
            if introductions.len() >= MAX_PENDING_PRESENCE {
                tracing::warn!(%server, %room_id, "too many presence introductions waiting");
                return;
            }
            introductions.insert((server.to_owned(), room_id.to_owned()));
        }
        self.wake.notify_one();
    }

    /// Queues `m.presence` EDUs for the users waiting: per server, the users sharing a room
    /// with it, at most [`MAX_PRESENCE_PER_EDU`] to an EDU; then the introductions.
    fn flush(&self, services: &Services) -> Result<()> {
        let users = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        let queued = self.queue(services, &users);
        if queued.is_err() {
            // Tried again with the next change: presence is current state, sending it late is
            // better than never.
            self.pending.lock().unwrap_or_else(|e| e.into_inner()).extend(users);
        }
        queued?;
        let introductions =
            std::mem::take(&mut *self.introductions.lock().unwrap_or_else(|e| e.into_inner()));
        for (server, room_id) in introductions {
            let members = services.rooms.members(&room_id)?;
            let ours = services.server_name();
            let updates: Vec<PresenceUpdate> = members
                .iter()
                .filter(|(user, membership)| membership == "join" && user.server_name() == ours)
                .filter_map(|(user, _)| services.presence.get(user).map(|p| (user, p)))
                .filter_map(|(user, presence)| match edu::presence(user, &presence) {
                    Edu::Presence(content) => Some(content.push),
                    _ => None,
                })
                .flatten()
                .collect();
            queue_presence(services, server, updates)?;
        }
        Ok(())
    }

    /// Queues the presence of `users` for the servers sharing a room with each.
    fn queue(&self, services: &Services, users: &BTreeSet<OwnedUserId>) -> Result<()> {
        let mut by_server: BTreeMap<OwnedServerName, Vec<PresenceUpdate>> = BTreeMap::new();
        for user_id in users {
            let Some(presence) = services.presence.get(user_id) else { continue };
            let Edu::Presence(content) = edu::presence(user_id, &presence) else { continue };
            for server in servers_sharing(services, user_id)? {
                by_server.entry(server).or_default().extend(content.push.iter().cloned());
            }
        }
        for (server, updates) in by_server {
            queue_presence(services, server, updates)?;
        }
        Ok(())
    }
}

/// Queues `updates` for `server`, at most [`MAX_PRESENCE_PER_EDU`] to an EDU.
fn queue_presence(
    services: &Services,
    server: OwnedServerName,
    updates: Vec<PresenceUpdate>,
) -> Result<()> {
    let destination = [server];
    for chunk in updates.chunks(MAX_PRESENCE_PER_EDU) {
        let edu = Edu::Presence(PresenceContent::new(chunk.to_vec()));
        queue_edu(services, &destination, edu)?;
    }
    Ok(())
}

/// Sends local users' presence changes to other servers until the server stops.
pub async fn run_presence(services: Arc<Services>, mut stopped: watch::Receiver<bool>) {
    let outbox = &services.federation_presence;
    loop {
        tokio::select! {
            () = outbox.wake.notified() => {}
            _ = stopped.wait_for(|stop| *stop) => return,
        }
        // Changes arriving together (a burst of logins, many clients syncing) go together.
        tokio::select! {
            () = tokio::time::sleep(PRESENCE_GATHER) => {}
            _ = stopped.wait_for(|stop| *stop) => return,
        }
        if let Err(err) = outbox.flush(&services) {
            tracing::warn!(%err, "could not queue presence for other servers");
        }
    }
}

/// Forgets cached keys of remote users as their memberships change: a remote user who newly
/// shares a room with our users may have changed devices while their server had no reason to
/// tell us.
pub struct RemoteMembers;

impl Listener for RemoteMembers {
    fn persisted(&self, services: &Services, _short: u64, event: &Arc<StoredPdu>) {
        if event.kind() != "m.room.member" || !services.federation.enabled() {
            return;
        }
        let Some(target) = event.state_key().and_then(|key| <&UserId>::try_from(key).ok()) else {
            return;
        };
        let joined = match event.wire.get("content") {
            Some(CanonicalJsonValue::Object(content)) => matches!(
                content.get("membership"),
                Some(CanonicalJsonValue::String(membership)) if membership == "join"
            ),
            _ => false,
        };
        if target.server_name() != services.server_name() {
            services.remote.mark_stale(target);
            if joined {
                let presence = &services.federation_presence;
                presence.introduce(services, target.server_name(), &event.room_id);
            }
            return;
        }
        if !joined {
            return;
        }
        // Servers already in the room learn of our user's presence.
        services.federation_presence.changed(services, target);
        // One of ours joined: the room's remote members may be new to us.
        match services.rooms.members(&event.room_id) {
            Ok(members) => {
                let ours = services.server_name();
                services.remote.mark_all_stale(members.iter().filter_map(|(user, membership)| {
                    (membership == "join" && user.server_name() != ours).then_some(&**user)
                }));
            }
            Err(err) => tracing::warn!(%err, room_id = %event.room_id, "members unreadable"),
        }
    }
}
