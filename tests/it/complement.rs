//! The entry point of the image Complement runs Plaza from (`complement/entrypoint.sh`), run
//! outside a container: it must issue a certificate from the mounted CA, write a configuration
//! Plaza accepts, and start a server that registers users and federates over TLS.

use std::{net::Ipv4Addr, process::Stdio};

use serde_json::{Value, json};

use crate::{
    common::{Reaped, binary, wait_until_serving},
    federation::harness::free_port_on,
};

#[tokio::test]
async fn the_image_entry_point_starts_a_server_complement_can_use() {
    let dir = tempfile::tempdir().unwrap();
    // The CA and its key, laid out as Complement mounts them.
    let ca_dir = dir.path().join("ca");
    std::fs::create_dir_all(&ca_dir).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.distinguished_name.push(rcgen::DnType::CommonName, "Complement CA");
    let ca = params.self_signed(&key).unwrap();
    std::fs::write(ca_dir.join("ca.crt"), ca.pem()).unwrap();
    std::fs::write(ca_dir.join("ca.key"), key.serialize_pem()).unwrap();

    let client_port = free_port_on(Ipv4Addr::LOCALHOST);
    let federation_port = free_port_on(Ipv4Addr::LOCALHOST);
    let server_name = format!("localhost:{federation_port}");
    let log = dir.path().join("log");
    let script = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), std::path::PathBuf::from)
        .join("complement/entrypoint.sh");
    let child = std::process::Command::new("sh")
        .arg(script)
        .env("SERVER_NAME", &server_name)
        .env("COMPLEMENT_CA_DIR", &ca_dir)
        .env("DATA_DIR", dir.path().join("data"))
        .env("SERVER_BINARY", binary())
        .env("CLIENT_LISTEN", format!("127.0.0.1:{client_port}"))
        .env("FEDERATION_LISTEN", format!("127.0.0.1:{federation_port}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let _child = Reaped(child);
    let base = format!("http://127.0.0.1:{client_port}");
    wait_until_serving(&base, || std::fs::read_to_string(&log).unwrap_or_default()).await;

    // Registration is open, as Complement's tests expect.
    let http = reqwest::Client::new();
    let registered = answer(
        http.post(format!("{base}/_matrix/client/v3/register"))
            .json(&json!({ "username": "alice", "password": "a long password", "auth": { "type": "m.login.dummy" } })),
    )
    .await;
    assert_eq!(registered["user_id"], format!("@alice:{server_name}"), "{registered}");

    // Federation answers over TLS with a certificate for the server name from Complement's CA.
    let tls = reqwest::Client::builder()
        .tls_certs_merge([reqwest::Certificate::from_pem(ca.pem().as_bytes()).unwrap()])
        .resolve("localhost", (Ipv4Addr::LOCALHOST, federation_port).into())
        .build()
        .unwrap();
    let keys = answer(tls.get(format!("https://{server_name}/_matrix/key/v2/server"))).await;
    assert_eq!(keys["server_name"], server_name.as_str(), "{keys}");
    assert_eq!(keys["verify_keys"].as_object().map(|keys| keys.len()), Some(1), "{keys}");
}

async fn answer(request: reqwest::RequestBuilder) -> Value {
    request.send().await.unwrap().json().await.unwrap()
}
