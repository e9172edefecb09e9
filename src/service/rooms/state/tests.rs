use std::collections::HashMap;

use super::*;

fn open() -> (tempfile::TempDir, Db, States) {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), 8).unwrap();
    let states = States::new(&db).unwrap();
    (dir, db, states)
}

fn apply(db: &Db, states: &States, parent: u64, changes: &[Change]) -> u64 {
    let mut batch = db.batch();
    let id = states.apply(&mut batch, parent, changes).unwrap();
    db.write(batch).unwrap();
    id
}

/// A small deterministic generator, so the test explores many shapes reproducibly.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, bound: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % bound
    }
}

#[test]
fn states_read_back_as_written_through_many_changes_and_removals() {
    let (_dir, db, states) = open();
    let mut rng = Lcg(7);
    let mut expected: HashMap<u64, u64> = HashMap::new();
    let mut history = Vec::new();
    let mut root = 0;
    for step in 0..3_000u64 {
        let key = rng.next(600);
        let change = if rng.next(10) == 0 { None } else { Some(step + 1) };
        root = apply(&db, &states, root, &[(key, change)]);
        match change {
            Some(event) => expected.insert(key, event),
            None => expected.remove(&key),
        };
        if step % 500 == 0 {
            history.push((root, expected.clone()));
        }
    }
    history.push((root, expected.clone()));
    // A fresh reader has nothing in memory: every node comes from the database.
    let fresh = States::new(&db).unwrap();
    for (root, expected) in &history {
        assert_eq!(&fresh.load_short(*root).unwrap(), expected);
        for key in 0..600 {
            assert_eq!(fresh.get_short(*root, key).unwrap(), expected.get(&key).copied());
        }
    }
    // The diff of two states names exactly the entries that differ.
    let (a, b) = (&history[2], &history[5]);
    let mut diff = fresh.diff(a.0, b.0).unwrap();
    diff.sort();
    let mut keys: Vec<u64> = a.1.keys().chain(b.1.keys()).copied().collect();
    keys.sort();
    keys.dedup();
    let wanted: Vec<_> = keys
        .into_iter()
        .filter(|k| a.1.get(k) != b.1.get(k))
        .map(|k| (k, a.1.get(&k).copied(), b.1.get(&k).copied()))
        .collect();
    assert_eq!(diff, wanted);
}

#[test]
fn a_change_that_changes_nothing_keeps_the_state() {
    let (_dir, db, states) = open();
    let root = apply(&db, &states, 0, &[(1, Some(10)), (2, Some(20))]);
    assert_eq!(apply(&db, &states, root, &[]), root);
    assert_ne!(apply(&db, &states, root, &[(1, Some(11))]), root);
    // Removing the last entry leaves the empty state.
    let one = apply(&db, &states, 0, &[(5, Some(50))]);
    assert_eq!(apply(&db, &states, one, &[(5, None)]), 0);
}

#[test]
fn one_join_to_a_large_room_writes_a_few_small_nodes() {
    let (_dir, db, states) = open();
    let members: Vec<Change> = (0..50_000).map(|k| (k, Some(1_000_000 + k))).collect();
    let root = apply(&db, &states, 0, &members);
    let before = db.counter("state_snapshot").unwrap();
    let mut batch = db.batch();
    states.apply(&mut batch, root, &[(50_000, Some(2_000_000))]).unwrap();
    let nodes = states.next_node.current() - before;
    assert!(nodes <= 6, "a join wrote {nodes} nodes");
    // Every node stays small: at most sixteen entries or children.
    let size = batch_size(&batch);
    assert!(size < 2_048, "a join wrote {size} bytes of state");
}

fn batch_size(batch: &Batch) -> usize {
    batch.size_in_bytes()
}

#[test]
fn snapshots_of_the_older_format_migrate_under_their_ids() {
    let (_dir, db, states) = open();
    #[derive(serde::Serialize, serde::Deserialize)]
    struct OldSnapshot {
        parent: Option<u64>,
        chain: u32,
        changes: Vec<(String, String, u64)>,
    }
    let old = db.table::<OldSnapshot>(tables::STATE_SNAPSHOTS);
    let mut batch = db.batch();
    let member = "m.room.member".to_owned();
    let full = vec![("m.room.create".into(), String::new(), 1), (member.clone(), "@a:x".into(), 2)];
    old.put(&mut batch, &1u64, &OldSnapshot { parent: None, chain: 0, changes: full });
    let delta = vec![(member.clone(), "@a:x".into(), 3), (member, "@b:x".into(), 4)];
    old.put(&mut batch, &2u64, &OldSnapshot { parent: Some(1), chain: 1, changes: delta });
    batch.raise_counter(&db, "state_snapshot", 2);
    db.write(batch).unwrap();

    let states = {
        drop(states);
        States::new(&db).unwrap()
    };
    states.migrate_snapshots(&db).unwrap();
    assert_eq!(states.get(1, "m.room.member", "@a:x").unwrap(), Some(2));
    assert_eq!(states.get(2, "m.room.member", "@a:x").unwrap(), Some(3));
    assert_eq!(states.get(2, "m.room.member", "@b:x").unwrap(), Some(4));
    assert_eq!(states.get(2, "m.room.create", "").unwrap(), Some(1));
    assert_eq!(states.load(2).unwrap().len(), 3);
    // New states never take a migrated id, and a second run changes nothing.
    let mut batch = db.batch();
    let next =
        states.apply(&mut batch, 2, &[(states.intern("m.room.topic", "").unwrap(), Some(5))]);
    assert!(next.unwrap() > 2);
    states.migrate_snapshots(&db).unwrap();
}
