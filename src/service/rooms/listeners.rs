//! How features take part in writing events without the event core knowing them. A feature
//! registers at start either a [`Contributor`], whose writes join the event's own batch (for
//! what must never disagree with the event: relation indexes, analytics counts), or a
//! [`Listener`], told once the event is durable (search, push, anything that can catch up).
//! The core calls them for events shown in the timeline; it never names a feature. A
//! [`Countersigner`] has another server sign an invite of one of its users before the core
//! stores it.

use std::{future::Future, pin::Pin, sync::Arc};

use ruma::{CanonicalJsonObject, RoomId, RoomVersionId};
use serde_json::Value as JsonValue;

use super::pdu::StoredPdu;
use crate::{error::Result, service::Services, storage::Batch};

/// An accepted event about to be written, as contributors see it.
pub struct Written<'a> {
    /// The room.
    pub room_id: &'a RoomId,
    /// The room's short id.
    pub room_short: u64,
    /// The room version.
    pub version: &'a RoomVersionId,
    /// The event, with its stream position.
    pub event: &'a StoredPdu,
    /// Its content.
    pub content: &'a JsonValue,
    /// The state before it.
    pub state_before: u64,
    /// The event it redacts, when it is a redaction that applies.
    pub redacted: Option<&'a StoredPdu>,
    /// Whether a local client sent it (a remote event is never refused by a contributor's
    /// checks, only by the room's rules).
    pub local: bool,
}

/// A feature's writes in an event's batch.
pub trait Contributor: Send + Sync {
    /// Adds this feature's writes for `event` to `batch`. An error refuses a local event
    /// (with that error); for a remote one only a storage error stops the write.
    fn contribute(&self, services: &Services, event: &Written<'_>, batch: &mut Batch)
    -> Result<()>;

    /// The batch of `event` was not written: drop anything kept in memory for it.
    fn abandoned(&self, _services: &Services, _event: &Written<'_>) {}
}

/// A feature told of each timeline event once it is durable.
pub trait Listener: Send + Sync {
    /// Called once per event, in the order events were written in each room.
    fn persisted(&self, services: &Services, short: u64, event: &Arc<StoredPdu>);
}

/// Has the server of an invited user of another server sign the invite, as the spec asks
/// before the invite is stored and sent to the room.
pub trait Countersigner: Send + Sync {
    /// Returns `event` (an invite in `room_id` of `version`, signed here) as the invitee's
    /// server signed it; its refusal as the error the client gets.
    fn countersign<'a>(
        &'a self,
        services: &'a Services,
        room_id: &'a RoomId,
        version: RoomVersionId,
        event: CanonicalJsonObject,
    ) -> Pin<Box<dyn Future<Output = Result<CanonicalJsonObject>> + Send + 'a>>;
}

/// The registered contributors and listeners, fixed at start.
#[derive(Default)]
pub struct Registry {
    contributors: Vec<Box<dyn Contributor>>,
    listeners: Vec<Box<dyn Listener>>,
    countersigner: Option<Box<dyn Countersigner>>,
}

impl Registry {
    /// Adds a contributor, called in registration order.
    pub fn contributor(mut self, contributor: impl Contributor + 'static) -> Self {
        self.contributors.push(Box::new(contributor));
        self
    }

    /// Adds a listener, called in registration order.
    pub fn listener(mut self, listener: impl Listener + 'static) -> Self {
        self.listeners.push(Box::new(listener));
        self
    }

    /// Sets who countersigns invites of other servers' users (none: such invites are refused).
    pub fn countersigner(mut self, countersigner: impl Countersigner + 'static) -> Self {
        self.countersigner = Some(Box::new(countersigner));
        self
    }

    /// Who countersigns invites of other servers' users, if anyone.
    pub(super) fn countersigning(&self) -> Option<&dyn Countersigner> {
        self.countersigner.as_deref()
    }

    /// Lets every contributor add its writes.
    pub(super) fn contribute(
        &self,
        services: &Services,
        event: &Written<'_>,
        batch: &mut Batch,
    ) -> Result<()> {
        for contributor in &self.contributors {
            if let Err(error) = contributor.contribute(services, event, batch) {
                if event.local || error.is_internal() {
                    self.abandoned(services, event);
                    return Err(error);
                }
                tracing::debug!(event_id = %event.event.event_id, %error, "contribution skipped");
            }
        }
        Ok(())
    }

    /// Tells every contributor the batch was not written.
    pub(super) fn abandoned(&self, services: &Services, event: &Written<'_>) {
        for contributor in &self.contributors {
            contributor.abandoned(services, event);
        }
    }

    /// Tells every listener of a durable event.
    pub(super) fn persisted(&self, services: &Services, short: u64, event: &Arc<StoredPdu>) {
        for listener in &self.listeners {
            listener.persisted(services, short, event);
        }
    }
}
