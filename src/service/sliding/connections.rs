//! Sliding-sync connections: what each connection (user, device, `conn_id`) was last sent,
//! named by the `pos` tokens handed out. A request names the answer it builds on by its `pos`;
//! the few newest answers of a connection are remembered so a retried request works, older or
//! unknown ones (and every one after a restart) fail with `M_UNKNOWN_POS` and the client
//! starts the connection afresh.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use ruma::{OwnedDeviceId, OwnedRoomId, OwnedUserId};

use crate::error::{Error, ErrorKind, Result};

/// Answers of one connection a request may still build on.
const KEPT_ANSWERS: usize = 3;
/// Connections one device may hold.
const MAX_PER_DEVICE: usize = 16;
/// Connections kept in all; past it the least recently used are dropped.
const MAX_CONNECTIONS: usize = 50_000;
/// Past this many connections, each new one first sweeps out the idle ones.
const SWEEP_ABOVE: usize = 1_000;
/// A connection unused this long is forgotten.
const IDLE: Duration = Duration::from_secs(30 * 60);
/// Rooms remembered as sent per connection; past it the oldest are forgotten (and sent in
/// full again should they come back).
const MAX_SENT_ROOMS: usize = 2_000;

/// What a connection was sent of one room, as of an answer.
#[derive(Clone, Copy, Debug)]
pub struct SentRoom {
    /// The stream position the room was sent up to.
    pub position: u64,
    /// The timeline limit it was sent with.
    pub timeline_limit: usize,
    /// A digest of the required state it was sent with.
    pub required_state: u64,
}

/// The connection's view after one answer.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The stream position the answer covered.
    pub upto: u64,
    /// The typing serial at that answer.
    pub typing: u64,
    /// Rooms sent so far, by room.
    pub rooms: HashMap<OwnedRoomId, SentRoom>,
    /// Each list's room count in that answer.
    pub lists: HashMap<String, u64>,
}

impl Snapshot {
    /// Drops the rooms sent longest ago past [`MAX_SENT_ROOMS`].
    pub fn trim(&mut self) {
        if self.rooms.len() <= MAX_SENT_ROOMS {
            return;
        }
        let mut positions: Vec<u64> = self.rooms.values().map(|r| r.position).collect();
        positions.sort_unstable();
        let cut = positions[self.rooms.len() - MAX_SENT_ROOMS];
        self.rooms.retain(|_, sent| sent.position >= cut);
    }
}

/// A connection's remembered answers, oldest first.
struct Connection {
    answers: Vec<(u64, Arc<Snapshot>)>,
    used: Instant,
}

/// Which connection: user, device and the client's `conn_id`.
type Key = (OwnedUserId, OwnedDeviceId, String);

/// Every live connection.
pub struct Connections {
    /// Differs per process start, so a `pos` from before a restart is never mistaken.
    boot: String,
    next: AtomicU64,
    map: Mutex<HashMap<Key, Connection>>,
}

impl Default for Connections {
    fn default() -> Self {
        Self {
            boot: crate::service::random_string(6),
            next: AtomicU64::new(1),
            map: Mutex::default(),
        }
    }
}

fn unknown_pos() -> Error {
    Error::new(ErrorKind::UnknownPos, "Unknown or expired position; start the connection again")
}

impl Connections {
    /// The snapshot named by `pos` on the connection (a fresh one without `pos`, which also
    /// ends whatever the connection held).
    pub fn resume(
        &self,
        user_id: &ruma::UserId,
        device_id: &ruma::DeviceId,
        conn_id: &str,
        pos: Option<&str>,
    ) -> Result<Arc<Snapshot>> {
        let key = (user_id.to_owned(), device_id.to_owned(), conn_id.to_owned());
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let Some(pos) = pos else {
            map.remove(&key);
            return Ok(Arc::default());
        };
        let seq = pos
            .strip_prefix(self.boot.as_str())
            .and_then(|rest| rest.strip_prefix('_'))
            .and_then(|n| n.parse::<u64>().ok())
            .ok_or_else(unknown_pos)?;
        let now = Instant::now();
        let connection = map.get_mut(&key).ok_or_else(unknown_pos)?;
        if now.duration_since(connection.used) >= IDLE {
            map.remove(&key);
            return Err(unknown_pos());
        }
        connection.used = now;
        let found = connection.answers.iter().find(|(s, _)| *s == seq);
        found.map(|(_, snapshot)| snapshot.clone()).ok_or_else(unknown_pos)
    }

    /// Remembers `snapshot` as the connection's newest answer and names it.
    pub fn store(
        &self,
        user_id: &ruma::UserId,
        device_id: &ruma::DeviceId,
        conn_id: &str,
        snapshot: Snapshot,
    ) -> String {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        let key = (user_id.to_owned(), device_id.to_owned(), conn_id.to_owned());
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if !map.contains_key(&key) {
            self.make_room(&mut map, &key, now);
        }
        let connection =
            map.entry(key).or_insert_with(|| Connection { answers: Vec::new(), used: now });
        connection.used = now;
        connection.answers.push((seq, Arc::new(snapshot)));
        if connection.answers.len() > KEPT_ANSWERS {
            connection.answers.remove(0);
        }
        format!("{}_{seq}", self.boot)
    }

    /// Before a new connection: drops idle ones, and the device's or everyone's least recently
    /// used past their caps.
    fn make_room(&self, map: &mut HashMap<Key, Connection>, key: &Key, now: Instant) {
        let same_device = |k: &Key| k.0 == key.0 && k.1 == key.1;
        let mut device: Vec<(Instant, Key)> =
            map.iter().filter(|(k, _)| same_device(k)).map(|(k, c)| (c.used, k.clone())).collect();
        if device.len() >= MAX_PER_DEVICE {
            device.sort();
            for (_, old) in device.iter().take(device.len() + 1 - MAX_PER_DEVICE) {
                map.remove(old);
            }
        }
        if map.len() >= SWEEP_ABOVE {
            map.retain(|_, c| now.duration_since(c.used) < IDLE);
        }
        if map.len() >= MAX_CONNECTIONS {
            let mut all: Vec<(Instant, Key)> =
                map.iter().map(|(k, c)| (c.used, k.clone())).collect();
            all.sort();
            for (_, old) in all.iter().take(map.len() / 10) {
                map.remove(old);
            }
        }
    }

    /// How many connections are held.
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use ruma::{device_id, user_id};

    use super::*;

    #[test]
    fn positions_name_the_newest_answers_of_their_own_connection_only() {
        let connections = Connections::default();
        let (alice, phone) = (user_id!("@alice:x"), device_id!("PHONE"));
        let fresh = connections.resume(alice, phone, "main", None).unwrap();
        assert_eq!(fresh.upto, 0);
        let mut positions = Vec::new();
        for upto in 1..=5 {
            let snapshot = Snapshot { upto, ..Snapshot::default() };
            positions.push(connections.store(alice, phone, "main", snapshot));
        }
        assert_eq!(connections.resume(alice, phone, "main", Some(&positions[4])).unwrap().upto, 5);
        assert_eq!(connections.resume(alice, phone, "main", Some(&positions[2])).unwrap().upto, 3);
        let unknown = |pos: &str, conn: &str| {
            let error = connections.resume(alice, phone, conn, Some(pos)).unwrap_err();
            matches!(error.kind(), Some(ErrorKind::UnknownPos))
        };
        assert!(unknown(&positions[1], "main"), "only the newest answers are kept");
        assert!(unknown(&positions[4], "other"), "another connection's position");
        assert!(unknown("1_1", "main") && unknown("junk", "main"));
        // Starting over without a position forgets the connection.
        connections.resume(alice, phone, "main", None).unwrap();
        assert!(unknown(&positions[4], "main"));
    }

    #[test]
    fn a_device_holds_a_bounded_number_of_connections() {
        let connections = Connections::default();
        let (alice, phone) = (user_id!("@alice:x"), device_id!("PHONE"));
        for i in 0..MAX_PER_DEVICE + 5 {
            connections.store(alice, phone, &format!("c{i}"), Snapshot::default());
        }
        assert_eq!(connections.len(), MAX_PER_DEVICE);
    }
}
