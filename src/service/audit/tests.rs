use ed25519_dalek::{Signer, SigningKey};

use super::*;

fn entry(action: &str) -> Entry {
    Entry::new(action, Some(ruma::user_id!("@a:x"))).target("@b:x")
}

fn key() -> SigningKey {
    SigningKey::from_bytes(&[7; 32])
}

#[test]
fn chain_verifies_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = Db::open(dir.path(), 8).unwrap();
        let audit = Audit::new(&db).unwrap();
        audit.record([entry("one"), entry("two")]).unwrap();
        audit.commit(db.batch(), []).unwrap();
    }
    let db = Db::open(dir.path(), 8).unwrap();
    let audit = Audit::new(&db).unwrap();
    audit.record([entry("three")]).unwrap();
    let third = audit.get(3).unwrap().unwrap();
    assert_eq!(third.prev_hash, audit.get(2).unwrap().unwrap().hash);
    assert_eq!(audit.get(1).unwrap().unwrap().prev_hash, GENESIS_HASH);
    let report = audit.verify(&key().verifying_key().to_bytes()).unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!((report.checked, report.head_seq), (3, 3));
}

#[test]
fn edits_deletions_and_insertions_are_found() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), 8).unwrap();
    let audit = Audit::new(&db).unwrap();
    audit.record((0..5).map(|i| entry(&format!("a{i}")))).unwrap();
    let public = key().verifying_key().to_bytes();
    let raw: Table<JsonValue> = db.table(tables::AUDIT_LOG);

    let original = raw.get(&3u64).unwrap().unwrap();
    let mut edited = original.clone();
    edited["action"] = json!("innocent");
    let mut batch = db.batch();
    raw.put(&mut batch, &3u64, &edited);
    db.write(batch).unwrap();
    let broken = audit.verify(&public).unwrap().first_broken.unwrap();
    assert_eq!(broken.seq, 3, "{broken:?}");

    // Re-hashing the edited record moves the break to the next link.
    let mut rehashed: AuditRecord = serde_json::from_value(edited).unwrap();
    rehashed.hash = rehashed.compute_hash();
    let mut batch = db.batch();
    raw.put(&mut batch, &3u64, &serde_json::to_value(&rehashed).unwrap());
    db.write(batch).unwrap();
    assert_eq!(audit.verify(&public).unwrap().first_broken.unwrap().seq, 4);

    let mut batch = db.batch();
    raw.put(&mut batch, &3u64, &original);
    raw.delete(&mut batch, &5u64);
    db.write(batch).unwrap();
    let broken = audit.verify(&public).unwrap().first_broken.unwrap();
    assert_eq!((broken.seq, broken.reason.as_str()), (5, "record is missing"));
}

#[test]
fn pruning_keeps_the_chain_verifiable_from_a_signed_anchor() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), 8).unwrap();
    let audit = Audit::new(&db).unwrap();
    audit.record((0..4).map(|i| entry(&format!("old{i}")))).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(5));
    let cutoff = now_ms();
    audit.record([entry("new")]).unwrap();
    let signer = key();
    let removed = audit.prune(cutoff, "ed25519:t", |m| signer.sign(m).to_bytes().to_vec()).unwrap();
    assert_eq!(removed, 4);
    assert!(audit.get(4).unwrap().is_none());
    let anchor = audit.anchor().unwrap().unwrap();
    assert_eq!(anchor.seq, 4);
    let report = audit.verify(&signer.verifying_key().to_bytes()).unwrap();
    assert!(report.ok && report.checked == 1 && report.anchor_seq == 4, "{report:?}");

    // A different key (a forged anchor) does not verify.
    let other = SigningKey::from_bytes(&[9; 32]).verifying_key().to_bytes();
    assert_eq!(audit.verify(&other).unwrap().first_broken.unwrap().seq, 4);

    // Reopening after pruning continues the chain from the kept head.
    drop(audit);
    let audit = Audit::new(&db).unwrap();
    audit.record([entry("later")]).unwrap();
    assert!(audit.verify(&signer.verifying_key().to_bytes()).unwrap().ok);
}

#[test]
fn pages_filter_and_continue() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), 8).unwrap();
    let audit = Audit::new(&db).unwrap();
    audit
        .record((0..10).map(|i| entry(if i % 2 == 0 { "room.kick" } else { "user.login" })))
        .unwrap();
    let filter = query::Filter { action: Some("room.*".into()), ..Default::default() };
    let page = audit.page(&filter, None, 3).unwrap();
    assert_eq!(page.records.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 3, 5]);
    let page = audit.page(&filter, page.next, 3).unwrap();
    assert_eq!(page.records.iter().map(|r| r.seq).collect::<Vec<_>>(), [7, 9]);
    assert_eq!(page.next, None);
    let future = query::Filter { from_ts: Some(now_ms() + 60_000), ..Default::default() };
    assert!(audit.page(&future, None, 10).unwrap().records.is_empty());
}
