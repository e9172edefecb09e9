//! Compatibility with the real `matrix-sdk` (the SDK behind Element X).

use matrix_sdk::{
    Client,
    ruma::api::client::{account::register, uiaa},
};

use crate::common::TestServer;

#[tokio::test]
async fn matrix_sdk_registers_logs_in_and_manages_profile() {
    let s = TestServer::start().await;

    let client = Client::builder().homeserver_url(&s.base).build().await.unwrap();
    let mut request = register::v3::Request::new();
    request.username = Some("sdkuser".to_owned());
    request.password = Some("sdk password 1".to_owned());
    request.initial_device_display_name = Some("sdk device".to_owned());
    request.auth = Some(uiaa::AuthData::Dummy(uiaa::Dummy::new()));
    let registered = client.matrix_auth().register(request).await.unwrap();
    assert_eq!(registered.user_id, "@sdkuser:localhost");

    // A second client logs in with the password, as Element X would on a new phone.
    let phone = Client::builder().homeserver_url(&s.base).build().await.unwrap();
    let login = phone
        .matrix_auth()
        .login_username("sdkuser", "sdk password 1")
        .initial_device_display_name("phone")
        .send()
        .await
        .unwrap();
    assert_eq!(login.user_id, "@sdkuser:localhost");
    assert_eq!(phone.whoami().await.unwrap().user_id, "@sdkuser:localhost");

    phone.account().set_display_name(Some("SDK User")).await.unwrap();
    assert_eq!(phone.account().get_display_name().await.unwrap().as_deref(), Some("SDK User"));
    assert_eq!(client.account().get_display_name().await.unwrap().as_deref(), Some("SDK User"));

    let devices = phone.devices().await.unwrap().devices;
    assert_eq!(devices.len(), 2);
    let names: Vec<_> = devices.iter().filter_map(|d| d.display_name.as_deref()).collect();
    assert!(names.contains(&"phone") && names.contains(&"sdk device"), "{names:?}");

    phone.logout().await.unwrap();
    assert_eq!(client.devices().await.unwrap().devices.len(), 1);
}
