//! Federation's identity and transport between two (or three) real Plaza servers on loopback
//! over TLS: key publication, fetching (direct, through a notary), caching across restarts and
//! expiry, X-Matrix signing and its verification, the allow and deny lists both ways, key
//! rotation, the version endpoint, and serving behind a reverse proxy (rooms shared through a
//! TLS-terminating proxy included).

mod both_ways;
mod delivery;
pub mod e2ee;
pub mod harness;
mod invite_push;
mod invites;
pub mod media;
mod queries;
mod sending;
mod spaces;

use plaza::service::{federation::SendError, now_ms};
use reqwest::{Method, StatusCode};
use ruma::{
    CanonicalJsonObject, ServerName,
    api::federation::{directory::get_public_rooms_filtered, discovery::get_server_version},
    signatures::{Ed25519KeyPair, PublicKeyMap},
};
use serde_json::{Value, json};

use self::harness::*;
use crate::common::{TestServer, assert_error};

/// The unpadded base64 of a server's public key.
fn public_key_b64(key: &Ed25519KeyPair) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD_NO_PAD.encode(key.public_key())
}

/// Checks that `document` is signed by `server` with `key`.
fn assert_signed_by(document: &Value, server: &ServerName, key_id: &str, key: &Ed25519KeyPair) {
    let object: CanonicalJsonObject = serde_json::from_value(document.clone()).unwrap();
    let keys = [(key_id.to_owned(), ruma::serde::Base64::new(key.public_key().to_vec()))].into();
    plaza::service::federation::keys::verify_signed_by(&object, server, &keys)
        .unwrap_or_else(|e| panic!("{e}: {document}"));
}

#[tokio::test]
async fn version_and_keys_are_served_over_tls() {
    let (_pki, a, _b) = pair().await;
    let (status, body) = a.get("/_matrix/federation/v1/version").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["server"]["name"], "Plaza");
    assert_eq!(body["server"]["version"], env!("CARGO_PKG_VERSION"));

    let (status, keys) = a.get("/_matrix/key/v2/server").await;
    assert_eq!(status, StatusCode::OK, "{keys}");
    assert_eq!(keys["server_name"], a.name.as_str());
    assert_eq!(keys["verify_keys"][a.key_id()]["key"], public_key_b64(a.key()));
    let until = keys["valid_until_ts"].as_u64().unwrap();
    let week = 7 * 86_400_000;
    assert!(until > now_ms() + week - 60_000 && until <= now_ms() + week, "{until}");
    assert_eq!(keys["old_verify_keys"], json!({}));
    assert_signed_by(&keys, &a.name, &a.key_id(), a.key());

    // Only federation is served on the federation listener.
    let (status, body) = a.get("/_matrix/client/versions").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["errcode"], "M_UNRECOGNIZED");
}

#[tokio::test]
async fn typed_send_reaches_the_other_server() {
    let (_pki, a, b) = pair().await;
    let response = a
        .services()
        .federation
        .send(&b.name, get_server_version::v1::Request::new())
        .await
        .unwrap();
    assert_eq!(response.server.unwrap().name.as_deref(), Some("Plaza"));
    // A signed request: B checks A's signature with A's keys, fetched from A.
    let response = a
        .services()
        .federation
        .send(&b.name, get_public_rooms_filtered::v1::Request::new())
        .await
        .unwrap();
    assert!(response.chunk.is_empty());
    let unfiltered = ruma::api::federation::directory::get_public_rooms::v1::Request::new();
    let response = a.services().federation.send(&b.name, unfiltered).await.unwrap();
    assert!(response.chunk.is_empty());
    // An unreachable server is a failure, counted too.
    let nobody = ruma::OwnedServerName::try_from(format!(
        "127.0.0.1:{}",
        free_port_on([127, 0, 0, 1].into())
    ))
    .unwrap();
    let failed =
        a.services().federation.send(&nobody, get_server_version::v1::Request::new()).await;
    assert!(matches!(failed, Err(SendError::Unreachable { .. })), "{failed:?}");
    let cached = b.services().federation.cached_keys(&a.name).unwrap().expect("B cached A's keys");
    assert_eq!(cached.verify_keys[&a.key_id()].0, public_key_b64(a.key()));
    // Counted per destination.
    let mut metrics = String::new();
    a.services().federation.render_metrics(&mut metrics);
    let requests = format!("plaza_federation_requests_total{{destination=\"{}\"}} 3", b.name);
    let failures = format!("plaza_federation_failures_total{{destination=\"{}\"}} 0", b.name);
    assert!(metrics.contains(&requests) && metrics.contains(&failures), "{metrics}");
    let failures = format!("plaza_federation_failures_total{{destination=\"{nobody}\"}} 1");
    assert!(metrics.contains(&failures), "{metrics}");
}

#[tokio::test]
async fn keys_fetched_directly_are_cached_across_restarts() {
    let (_pki, a, b) = pair().await;
    let b_name = b.name.clone();
    let b_key_id = b.key_id();
    let b_key = public_key_b64(b.key());
    let keys =
        a.services().federation.server_keys(&b_name, &[b_key_id.as_str()], Some(now_ms())).await;
    let keys = keys.unwrap();
    assert_eq!(keys[&b_key_id].encode(), b_key);
    let fetched = a.services().federation.cached_keys(&b_name).unwrap().unwrap().fetched_ts;
    // B goes away; A restarts and still knows B's keys, without fetching them again.
    drop(b);
    let a = a.restart(|_| {}, |_| {}).await;
    let cached = a.services().federation.cached_keys(&b_name).unwrap().unwrap();
    assert_eq!(cached.fetched_ts, fetched);
    let keys =
        a.services().federation.server_keys(&b_name, &[b_key_id.as_str()], Some(now_ms())).await;
    assert_eq!(keys.unwrap()[&b_key_id].encode(), b_key);
}

#[tokio::test]
async fn expired_keys_are_fetched_again() {
    let pki = Pki::new();
    let a = FedServer::start(&pki, 1, |_| {}).await;
    let b = FedServer::start(&pki, 2, |c| c.federation.key_validity_secs = 1).await;
    let federation = &a.services().federation;
    let key_id = b.key_id();
    federation.server_keys(&b.name, &[key_id.as_str()], Some(now_ms())).await.unwrap();
    let first = federation.cached_keys(&b.name).unwrap().unwrap();
    assert!(first.valid_until_ts <= now_ms() + 1_000);
    // Still valid: answered from the cache.
    federation.server_keys(&b.name, &[key_id.as_str()], Some(now_ms())).await.unwrap();
    assert_eq!(federation.cached_keys(&b.name).unwrap().unwrap().fetched_ts, first.fetched_ts);
    tokio::time::sleep(std::time::Duration::from_millis(1_300)).await;
    let keys = federation.server_keys(&b.name, &[key_id.as_str()], Some(now_ms())).await.unwrap();
    assert!(keys.contains_key(&key_id));
    let second = federation.cached_keys(&b.name).unwrap().unwrap();
    assert!(second.fetched_ts > first.fetched_ts, "refetched once stale");
    assert!(second.valid_until_ts > first.valid_until_ts);
    // An event sent while the first document was valid is checked with the key as it was.
    let old = federation.server_keys(&b.name, &[], Some(first.fetched_ts)).await.unwrap();
    assert!(old.contains_key(&key_id));
}

#[tokio::test]
async fn notary_answers_and_is_used_when_a_server_is_unreachable() {
    let pki = Pki::new();
    let a = FedServer::start(&pki, 1, |_| {}).await;
    let b = FedServer::start(&pki, 2, |_| {}).await;
    // A as notary for B's keys: B's own signature and A's.
    let (status, body) = a.get(&format!("/_matrix/key/v2/query/{}", b.name)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let document = &body["server_keys"][0];
    assert_eq!(document["server_name"], b.name.as_str());
    assert_signed_by(document, &b.name, &b.key_id(), b.key());
    assert_signed_by(document, &a.name, &a.key_id(), a.key());
    // The batch form.
    let query = json!({ "server_keys": { b.name.as_str(): {} } });
    let response = pki
        .client()
        .post(format!("{}/_matrix/key/v2/query", a.base))
        .json(&query)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["server_keys"].as_array().unwrap().len(), 1, "{body}");
    assert_signed_by(&body["server_keys"][0], &a.name, &a.key_id(), a.key());

    // C trusts A as notary (with A's key configured) and cannot reach B.
    let (a_name, a_key_id, a_key) = (a.name.clone(), a.key_id(), public_key_b64(a.key()));
    let (b_name, b_key_id, b_key) = (b.name.clone(), b.key_id(), public_key_b64(b.key()));
    drop(b);
    let c = FedServer::start(&pki, 3, |config| {
        config.federation.trusted_key_servers = vec![plaza::config::TrustedKeyServer {
            server_name: a_name,
            verify_keys: [(a_key_id, a_key)].into(),
        }];
    })
    .await;
    let keys = c.services().federation.server_keys(&b_name, &[&b_key_id], Some(now_ms())).await;
    assert_eq!(keys.unwrap()[&b_key_id].encode(), b_key);

    // A notary configured with a key it does not sign with is not believed.
    let wrong =
        public_key_b64(&Ed25519KeyPair::from_der(&Ed25519KeyPair::generate(), "x".into()).unwrap());
    let (a_name, a_key_id) = (a.name.clone(), a.key_id());
    let d = FedServer::start(&pki, 4, |config| {
        config.federation.trusted_key_servers = vec![plaza::config::TrustedKeyServer {
            server_name: a_name.clone(),
            verify_keys: [(a_key_id, wrong)].into(),
        }];
    })
    .await;
    let keys = d.services().federation.server_keys(&b_name, &[&b_key_id], Some(now_ms())).await;
    assert!(keys.unwrap().is_empty());
    assert!(d.services().federation.cached_keys(&b_name).unwrap().is_none());
    // Without configured keys, the notary's own published keys check its answers.
    let e = FedServer::start(&pki, 5, |config| {
        config.federation.trusted_key_servers = vec![plaza::config::TrustedKeyServer {
            server_name: a_name,
            verify_keys: Default::default(),
        }];
    })
    .await;
    let keys = e.services().federation.server_keys(&b_name, &[&b_key_id], Some(now_ms())).await;
    assert_eq!(keys.unwrap()[&b_key_id].encode(), b_key);
}

/// The signed request of the X-Matrix tests: a filtered public rooms query from B to A.
const PUBLIC_ROOMS: &str = "/_matrix/federation/v1/publicRooms";

#[tokio::test]
async fn x_matrix_requests_are_verified() {
    let (_pki, a, b) = pair().await;
    let (origin, dest) = (b.name.as_str(), a.name.as_str());
    let content = json!({ "limit": 5 });
    let ok = a
        .signed(
            Method::POST,
            PUBLIC_ROOMS,
            origin,
            Some(dest),
            b.key(),
            &b.key_id(),
            Some(&content),
            Some(&content),
        )
        .await;
    assert_eq!(ok.0, StatusCode::OK, "{}", ok.1);
    assert_eq!(ok.1["chunk"], json!([]));
    // Without a destination (older servers) it is accepted too.
    let ok = a
        .signed(
            Method::POST,
            PUBLIC_ROOMS,
            origin,
            None,
            b.key(),
            &b.key_id(),
            Some(&content),
            Some(&content),
        )
        .await;
    assert_eq!(ok.0, StatusCode::OK, "{}", ok.1);

    // Signed by another key under B's key id.
    let doc = Ed25519KeyPair::generate();
    let forged = Ed25519KeyPair::from_der(&doc, b.key().version().to_owned()).unwrap();
    let bad_sig = a
        .signed(
            Method::POST,
            PUBLIC_ROOMS,
            origin,
            Some(dest),
            &forged,
            &b.key_id(),
            Some(&content),
            Some(&content),
        )
        .await;
    assert_error(&bad_sig, StatusCode::UNAUTHORIZED, "M_UNAUTHORIZED");
    // B's signature, claiming to come from A.
    let wrong_origin = a
        .signed(
            Method::POST,
            PUBLIC_ROOMS,
            dest,
            Some(dest),
            b.key(),
            &b.key_id(),
            Some(&content),
            Some(&content),
        )
        .await;
    assert_error(&wrong_origin, StatusCode::UNAUTHORIZED, "M_UNAUTHORIZED");
    // For another server.
    let wrong_dest = a
        .signed(
            Method::POST,
            PUBLIC_ROOMS,
            origin,
            Some("other.example"),
            b.key(),
            &b.key_id(),
            Some(&content),
            Some(&content),
        )
        .await;
    assert_error(&wrong_dest, StatusCode::UNAUTHORIZED, "M_UNAUTHORIZED");
    // A key B never published.
    let unknown = a
        .signed(
            Method::POST,
            PUBLIC_ROOMS,
            origin,
            Some(dest),
            b.key(),
            "ed25519:nope",
            Some(&content),
            Some(&content),
        )
        .await;
    assert_error(&unknown, StatusCode::UNAUTHORIZED, "M_UNAUTHORIZED");
    assert!(unknown.1["error"].as_str().unwrap().contains("Unknown key"), "{}", unknown.1);
    // The body is part of what is signed.
    let tampered = json!({ "limit": 6 });
    let changed = a
        .signed(
            Method::POST,
            PUBLIC_ROOMS,
            origin,
            Some(dest),
            b.key(),
            &b.key_id(),
            Some(&content),
            Some(&tampered),
        )
        .await;
    assert_error(&changed, StatusCode::UNAUTHORIZED, "M_UNAUTHORIZED");
    // No header at all.
    let response = _pki
        .client()
        .post(format!("{}{PUBLIC_ROOMS}", a.base))
        .json(&content)
        .send()
        .await
        .unwrap();
    let missing = (response.status(), response.json::<Value>().await.unwrap());
    assert_error(&missing, StatusCode::UNAUTHORIZED, "M_UNAUTHORIZED");
    // A header that is not X-Matrix.
    let response = _pki
        .client()
        .post(format!("{}{PUBLIC_ROOMS}", a.base))
        .header("authorization", "Bearer abc")
        .json(&content)
        .send()
        .await
        .unwrap();
    let other = (response.status(), response.json::<Value>().await.unwrap());
    assert_error(&other, StatusCode::UNAUTHORIZED, "M_UNAUTHORIZED");
}

#[tokio::test]
async fn allow_and_deny_lists_refuse_both_directions() {
    let pki = Pki::new();
    let b = FedServer::start(&pki, 2, |_| {}).await;
    let b_name = b.name.to_string();
    let a = FedServer::start(&pki, 1, |c| c.federation.deny = vec![b_name]).await;
    // Outbound: refused before any connection.
    let refused =
        a.services().federation.send(&b.name, get_server_version::v1::Request::new()).await;
    assert!(matches!(refused, Err(SendError::Forbidden(_))), "{refused:?}");
    // Inbound: 403 before the signature is even looked at.
    let content = json!({});
    let inbound = a
        .signed(
            Method::POST,
            PUBLIC_ROOMS,
            b.name.as_str(),
            Some(a.name.as_str()),
            b.key(),
            &b.key_id(),
            Some(&content),
            Some(&content),
        )
        .await;
    assert_error(&inbound, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    assert!(b.services().federation.cached_keys(&a.name).unwrap().is_none());
    assert!(a.services().federation.cached_keys(&b.name).unwrap().is_none(), "no work for B");

    // An allow list naming someone else refuses B too; B's own view is unaffected.
    let c =
        FedServer::start(&pki, 3, |c| c.federation.allow = vec!["*.partner.example".into()]).await;
    let refused =
        c.services().federation.send(&b.name, get_server_version::v1::Request::new()).await;
    assert!(matches!(refused, Err(SendError::Forbidden(_))), "{refused:?}");
    let inbound = c
        .signed(
            Method::POST,
            PUBLIC_ROOMS,
            b.name.as_str(),
            Some(c.name.as_str()),
            b.key(),
            &b.key_id(),
            Some(&content),
            Some(&content),
        )
        .await;
    assert_error(&inbound, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let allowed =
        b.services().federation.send(&c.name, get_server_version::v1::Request::new()).await;
    assert!(allowed.is_ok(), "{allowed:?}");
}

/// The audit records with `action`, oldest first.
fn audit_records(services: &plaza::service::Services, action: &str) -> Vec<Value> {
    let (first, last) = services.audit.bounds().unwrap();
    (first..=last)
        .filter_map(|seq| services.audit.get(seq).unwrap())
        .filter(|record| record.action == action)
        .map(|record| serde_json::to_value(record).unwrap())
        .collect()
}

#[tokio::test]
async fn key_rotation_keeps_the_old_key_listed() {
    let (_pki, a, b) = pair().await;
    let old_id = a.key_id();
    let old_key = public_key_b64(a.key());
    let before = now_ms();
    let a = a
        .restart(
            |db_path| {
                let db = plaza::storage::Db::open(db_path, 8).unwrap();
                let audit = plaza::service::audit::Audit::new(&db).unwrap();
                plaza::service::keys::ServerKeys::rotate(&db, &audit).unwrap();
            },
            |_| {},
        )
        .await;
    let new_id = a.key_id();
    assert_ne!(new_id, old_id);
    let (status, keys) = a.get("/_matrix/key/v2/server").await;
    assert_eq!(status, StatusCode::OK, "{keys}");
    assert_eq!(keys["verify_keys"].as_object().unwrap().len(), 1, "{keys}");
    assert_eq!(keys["verify_keys"][&new_id]["key"], public_key_b64(a.key()));
    assert_eq!(keys["old_verify_keys"][&old_id]["key"], old_key);
    let expired = keys["old_verify_keys"][&old_id]["expired_ts"].as_u64().unwrap();
    assert!(expired >= before && expired <= now_ms(), "{expired}");
    assert_signed_by(&keys, &a.name, &new_id, a.key());
    let rotations = audit_records(a.services(), "server.signing_key.rotate");
    assert_eq!(rotations.len(), 1);
    assert_eq!(rotations[0]["details"]["old_key_id"], old_id);
    // Another server sees both: the new key now, the old one for what it signed before.
    let federation = &b.services().federation;
    let now = federation.server_keys(&a.name, &[new_id.as_str()], Some(now_ms())).await.unwrap();
    assert!(now.contains_key(&new_id) && !now.contains_key(&old_id), "{now:?}");
    let then = federation.server_keys(&a.name, &[old_id.as_str()], Some(before)).await.unwrap();
    assert_eq!(then[&old_id].encode(), old_key);
}

#[tokio::test]
async fn policy_changes_are_audited_at_start() {
    let pki = Pki::new();
    let a = FedServer::start(&pki, 1, |c| c.federation.deny = vec!["bad.example".into()]).await;
    let changes = audit_records(a.services(), "federation.policy.change");
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0]["details"]["deny"], json!(["bad.example"]));
    // The same lists again: nothing new.
    let a = a.restart(|_| {}, |c| c.federation.deny = vec!["bad.example".into()]).await;
    assert_eq!(audit_records(a.services(), "federation.policy.change").len(), 1);
    // Changed lists: recorded with the previous ones.
    let a = a.restart(|_| {}, |c| c.federation.allow = vec!["*.partner.example".into()]).await;
    let changes = audit_records(a.services(), "federation.policy.change");
    assert_eq!(changes.len(), 2);
    assert_eq!(changes[1]["details"]["allow"], json!(["*.partner.example"]));
    assert_eq!(changes[1]["details"]["deny"], json!([]));
    assert_eq!(changes[1]["details"]["previous_deny"], json!(["bad.example"]));
}

#[tokio::test]
async fn behind_a_reverse_proxy_federation_is_on_the_main_listener() {
    let proxied = TestServer::start_with(|c| c.federation.enabled = true).await;
    let (status, body) = proxied.get("/_matrix/federation/v1/version", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["server"]["name"], "Plaza");
    let (status, keys) = proxied.get("/_matrix/key/v2/server", None).await;
    assert_eq!(status, StatusCode::OK, "{keys}");
    let off = TestServer::start().await;
    let answer = off.get("/_matrix/federation/v1/version", None).await;
    assert_error(&answer, StatusCode::NOT_FOUND, "M_UNRECOGNIZED");
    let refused = off
        .server()
        .services()
        .federation
        .send(
            <&ServerName>::try_from("127.0.0.1:1").unwrap(),
            get_server_version::v1::Request::new(),
        )
        .await;
    assert!(matches!(refused, Err(SendError::Disabled)), "{refused:?}");
}

/// An HTTP reverse proxy terminating TLS on `at` and passing every request on to `to` over
/// plain HTTP, as a company's proxy in front of Plaza would.
async fn reverse_proxy(pki: &Pki, at: std::net::SocketAddr, to: String) {
    let http = reqwest::Client::new();
    let app = axum::Router::new().fallback(move |request: axum::extract::Request| {
        let (http, to) = (http.clone(), to.clone());
        async move {
            let (parts, body) = request.into_parts();
            let body = axum::body::to_bytes(body, 64 << 20).await.unwrap();
            let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            let mut forwarded = http.request(parts.method, format!("{to}{path}")).body(body);
            for (name, value) in &parts.headers {
                if name != http::header::HOST {
                    forwarded = forwarded.header(name, value);
                }
            }
            let answer = forwarded.header("x-forwarded-proto", "https").send().await.unwrap();
            let mut response = axum::response::Response::builder().status(answer.status());
            for (name, value) in answer.headers() {
                response = response.header(name, value);
            }
            response.body(axum::body::Body::from(answer.bytes().await.unwrap())).unwrap()
        }
    });
    serve_tls_on(pki, at, app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn behind_a_tls_terminating_proxy_rooms_are_shared_both_ways() {
    let pki = Pki::new();
    // A serves federation on its client listener only; the proxy stands on its federation
    // address, which is what its server name points to.
    let a = FedServer::start(&pki, 1, |c| c.federation.listen = Vec::new()).await;
    assert!(a.server.server().federation_addrs().is_empty());
    reverse_proxy(&pki, a.addr, a.server.base.clone()).await;
    let b = FedServer::start(&pki, 2, |_| {}).await;

    let (_, alice, _) = a.server.register("alice", "password-alice").await;
    let (_, bob, _) = b.server.register("bob", "password-bob").await;
    let room = a.server.create_room(&alice, json!({ "preset": "public_chat" })).await;
    // B joins through the proxy (`make_join`, `send_join`, signed requests checked by A).
    let path = format!("/_matrix/client/v3/join/{}?via={}", crate::common::enc(&room), a.name);
    let (status, body) = b.server.post(&path, Some(&bob), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Messages both ways: B's transactions pass the proxy, A's go to B directly.
    sending::send(&b, &bob, &room, "b1", sending::text("from B")).await;
    sending::until_bodies(&a, &alice, &room, &["from B"]).await;
    sending::send(&a, &alice, &room, "a1", sending::text("from A")).await;
    sending::until_bodies(&b, &bob, &room, &["from B", "from A"]).await;
}

#[tokio::test]
async fn key_validity_follows_the_room_version_rules() {
    // Keys as the event ingestion asks for them: those valid when the event was sent.
    let (_pki, a, b) = pair().await;
    let servers = [b.name.clone()].into();
    use plaza::service::rooms::ingest::KeyLookup;
    let federation = &a.services().federation;
    let map: PublicKeyMap = federation.public_keys_at(&servers, Some(now_ms())).await.unwrap();
    assert!(map[b.name.as_str()].contains_key(&b.key_id()));
    // Long after the document's validity, no key: the event's signature cannot check out.
    let far = now_ms() + 30 * 86_400_000;
    let map = federation.public_keys_at(&servers, Some(far)).await.unwrap();
    assert!(!map.contains_key(b.name.as_str()), "{map:?}");
    // Room versions without the rule take every known key.
    let map = federation.public_keys(&servers).await.unwrap();
    assert!(map[b.name.as_str()].contains_key(&b.key_id()));
}

#[tokio::test]
async fn room_server_acl_is_read_from_the_current_state() {
    let s = TestServer::start().await;
    let (_, token, _) = s.register("alice", "password-alice").await;
    let room_id = s.create_room(&token, json!({})).await;
    let room = ruma::RoomId::parse(&room_id).unwrap();
    let services = s.server().services();
    let server = |name: &str| ruma::OwnedServerName::try_from(name).unwrap();
    assert!(services.server_allowed_in_room(&room, &server("any.example")).unwrap());
    let acl = json!({ "allow": ["*"], "deny": ["*.evil.example"], "allow_ip_literals": false });
    let path = format!("/_matrix/client/v3/rooms/{room_id}/state/m.room.server_acl/");
    let (status, body) = s.put(&path, Some(&token), acl).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(services.server_allowed_in_room(&room, &server("good.example")).unwrap());
    assert!(!services.server_allowed_in_room(&room, &server("a.evil.example")).unwrap());
    assert!(!services.server_allowed_in_room(&room, &server("127.0.0.1:8448")).unwrap());
    let unknown = ruma::RoomId::parse("!unknown:localhost").unwrap();
    assert!(services.server_allowed_in_room(&unknown, &server("a.evil.example")).unwrap());
}

#[tokio::test]
async fn a_federation_listener_without_a_usable_certificate_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = crate::common::test_config(dir.path());
    config.federation.enabled = true;
    config.federation.listen = vec!["127.0.0.1:0".parse().unwrap()];
    config.federation.tls_cert = Some(dir.path().join("missing.pem"));
    config.federation.tls_key = Some(dir.path().join("missing.key"));
    let error = plaza::Server::start(config).await.err().expect("refused");
    assert!(error.to_string().contains("federation.tls_cert"), "{error}");

    let mut config = crate::common::test_config(&dir.path().join("second"));
    config.federation.extra_ca_file = Some(dir.path().join("no-ca.pem"));
    let error = plaza::Server::start(config).await.err().expect("refused");
    assert!(error.to_string().contains("no-ca.pem"), "{error}");
}

#[tokio::test]
async fn concurrent_first_requests_from_a_server_all_pass() {
    // A knows nothing of B yet: the requests arriving together share one key fetch.
    let (_pki, a, b) = pair().await;
    let content = json!({ "limit": 1 });
    let key_id = b.key_id();
    let requests = (0..8).map(|_| {
        a.signed(
            Method::POST,
            PUBLIC_ROOMS,
            b.name.as_str(),
            Some(a.name.as_str()),
            b.key(),
            &key_id,
            Some(&content),
            Some(&content),
        )
    });
    for (status, body) in futures_util::future::join_all(requests).await {
        assert_eq!(status, StatusCode::OK, "{body}");
    }
}

#[tokio::test]
async fn outbound_federation_obeys_the_address_policy() {
    let pki = Pki::new();
    let b = FedServer::start(&pki, 2, |_| {}).await;
    let strict = FedServer::start(&pki, 1, |c| c.outbound.allow_private_addresses = false).await;
    let refused =
        strict.services().federation.send(&b.name, get_server_version::v1::Request::new()).await;
    match refused {
        Err(SendError::Unreachable { reason, .. }) => {
            assert!(reason.contains("not an allowed address"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    // The same server may reach B once its range is allowed.
    let open = strict
        .restart(
            |_| {},
            |c| {
                c.outbound.allow_private_addresses = false;
                c.outbound.allow = vec!["127.0.0.2/32".parse().unwrap()];
            },
        )
        .await;
    let answer =
        open.services().federation.send(&b.name, get_server_version::v1::Request::new()).await;
    assert!(answer.is_ok(), "{answer:?}");
}

#[tokio::test]
async fn unauthenticated_endpoints_accept_a_signed_request() {
    // Servers sign every request, key fetches included; the key server must not take the
    // `X-Matrix` header for a malformed access token.
    let (_pki, a, b) = pair().await;
    let (status, keys) = a
        .signed(
            Method::GET,
            "/_matrix/key/v2/server",
            b.name.as_str(),
            Some(a.name.as_str()),
            b.key(),
            &b.key_id(),
            None,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{keys}");
    assert_eq!(keys["server_name"], a.name.as_str());
    let (status, version) = a
        .signed(
            Method::GET,
            "/_matrix/federation/v1/version",
            b.name.as_str(),
            Some(a.name.as_str()),
            b.key(),
            &b.key_id(),
            None,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{version}");
    assert_eq!(version["server"]["name"], "Plaza");
}
