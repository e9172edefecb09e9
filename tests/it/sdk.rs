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

/// A matrix-sdk client registered as `user`.
pub(crate) async fn sdk_client(base: &str, user: &str) -> Client {
    let client = Client::builder().homeserver_url(base).build().await.unwrap();
    let mut request = register::v3::Request::new();
    request.username = Some(user.to_owned());
    request.password = Some("sdk password 1".to_owned());
    request.auth = Some(uiaa::AuthData::Dummy(uiaa::Dummy::new()));
    client.matrix_auth().register(request).await.unwrap();
    client
}

/// An encrypted room alice creates and bob joins, with both clients synced.
async fn encrypted_room(alice: &Client, bob: &Client) -> matrix_sdk::Room {
    use matrix_sdk::{
        config::SyncSettings,
        ruma::{
            api::client::room::create_room,
            events::{InitialStateEvent, room::encryption::RoomEncryptionEventContent},
        },
    };
    let settings = || SyncSettings::default().timeout(std::time::Duration::from_millis(0));
    let mut request = create_room::v3::Request::new();
    request.invite = vec![bob.user_id().unwrap().to_owned()];
    let encryption = RoomEncryptionEventContent::with_recommended_defaults();
    request.initial_state = vec![InitialStateEvent::with_empty_state_key(encryption).to_raw_any()];
    let room = alice.create_room(request).await.unwrap();
    bob.sync_once(settings()).await.unwrap();
    bob.join_room_by_id(room.room_id()).await.unwrap();
    alice.sync_once(settings()).await.unwrap();
    room
}

async fn member_ids(room: &matrix_sdk::Room) -> Vec<String> {
    let mut ids: Vec<String> = room
        .members(matrix_sdk::RoomMemberships::JOIN)
        .await
        .unwrap()
        .iter()
        .map(|m| m.user_id().to_string())
        .collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn matrix_sdk_rooms_membership_state_and_sync() {
    use matrix_sdk::{
        config::SyncSettings,
        ruma::{api::client::room::create_room, events::room::message::RoomMessageEventContent},
    };

    let s = TestServer::start().await;
    let alice = sdk_client(&s.base, "alice").await;
    let bob = sdk_client(&s.base, "bob").await;
    let bob_id = bob.user_id().unwrap().to_owned();
    let settings = || SyncSettings::default().timeout(std::time::Duration::from_millis(0));

    let mut request = create_room::v3::Request::new();
    request.name = Some("Launch".to_owned());
    let room = alice.create_room(request).await.unwrap();
    room.invite_user_by_id(&bob_id).await.unwrap();

    bob.sync_once(settings()).await.unwrap();
    let invited = bob.get_room(room.room_id()).expect("bob sees the invite");
    assert_eq!(invited.state(), matrix_sdk::RoomState::Invited);
    bob.join_room_by_id(room.room_id()).await.unwrap();

    room.send(RoomMessageEventContent::text_plain("hello from alice")).await.unwrap();
    let bob_room = bob.get_room(room.room_id()).unwrap();
    bob_room.send(RoomMessageEventContent::text_plain("hello from bob")).await.unwrap();
    room.set_name("Launch v2".to_owned()).await.unwrap();
    bob_room.set_room_topic("bob may not").await.expect_err("power 0 cannot set the topic");
    room.set_room_topic("Shipping Friday").await.unwrap();

    alice.sync_once(settings()).await.unwrap();
    bob.sync_once(settings()).await.unwrap();
    for client_room in [&room, &bob_room] {
        assert_eq!(client_room.name().as_deref(), Some("Launch v2"));
        assert_eq!(client_room.topic().as_deref(), Some("Shipping Friday"));
        assert_eq!(client_room.state(), matrix_sdk::RoomState::Joined);
    }
    assert_eq!(member_ids(&room).await, member_ids(&bob_room).await);
    assert_eq!(member_ids(&room).await.len(), 2);

    room.kick_user(&bob_id, Some("timeout")).await.unwrap();
    bob.sync_once(settings()).await.unwrap();
    assert_eq!(bob.get_room(room.room_id()).unwrap().state(), matrix_sdk::RoomState::Left);
    room.ban_user(&bob_id, Some("for real")).await.unwrap();
    room.unban_user(&bob_id, None).await.unwrap();
    room.invite_user_by_id(&bob_id).await.unwrap();
    bob.sync_once(settings()).await.unwrap();
    bob.join_room_by_id(room.room_id()).await.unwrap();
    alice.sync_once(settings()).await.unwrap();
    bob.sync_once(settings()).await.unwrap();
    let bob_room = bob.get_room(room.room_id()).unwrap();
    assert_eq!(member_ids(&room).await, member_ids(&bob_room).await);

    // Bob's sync loop receives alice's message, her typing and her read receipt.
    let sent = room.send(RoomMessageEventContent::text_plain("are you there?")).await.unwrap();
    room.typing_notice(true).await.unwrap();
    room.send_single_receipt(
        matrix_sdk::ruma::api::client::receipt::create_receipt::v3::ReceiptType::Read,
        matrix_sdk::ruma::events::receipt::ReceiptThread::Unthreaded,
        sent.response.event_id.clone(),
    )
    .await
    .unwrap();
    let update = bob.sync_once(settings()).await.unwrap();
    let joined = &update.rooms.joined[room.room_id()];
    let bodies: Vec<String> = joined
        .timeline
        .events
        .iter()
        .filter_map(|e| e.raw().get_field::<serde_json::Value>("content").ok().flatten())
        .filter_map(|c| c["body"].as_str().map(str::to_owned))
        .collect();
    assert!(bodies.contains(&"are you there?".to_owned()), "{bodies:?}");
    let kinds: Vec<String> = joined
        .ephemeral
        .iter()
        .filter_map(|e| e.get_field::<String>("type").ok().flatten())
        .collect();
    assert!(
        kinds.contains(&"m.typing".to_owned()) && kinds.contains(&"m.receipt".to_owned()),
        "{kinds:?}"
    );
}

#[tokio::test]
async fn matrix_sdk_encrypted_room_bob_decrypts_alices_message() {
    use matrix_sdk::{
        config::SyncSettings, deserialized_responses::TimelineEventKind,
        ruma::events::room::message::RoomMessageEventContent,
    };

    let s = TestServer::start().await;
    let alice = sdk_client(&s.base, "alice").await;
    let bob = sdk_client(&s.base, "bob").await;
    let settings = || SyncSettings::default().timeout(std::time::Duration::from_millis(0));
    // Both devices publish their keys on the first sync.
    alice.sync_once(settings()).await.unwrap();
    bob.sync_once(settings()).await.unwrap();

    let room = encrypted_room(&alice, &bob).await;
    assert!(room.latest_encryption_state().await.unwrap().is_encrypted());

    room.send(RoomMessageEventContent::text_plain("for bob's eyes only")).await.unwrap();
    let update = bob.sync_once(settings()).await.unwrap();
    let events = &update.rooms.joined[room.room_id()].timeline.events;
    let decrypted: Vec<String> = events
        .iter()
        .filter(|e| matches!(e.kind, TimelineEventKind::Decrypted(_)))
        .filter_map(|e| e.raw().get_field::<serde_json::Value>("content").ok().flatten())
        .filter_map(|c| c["body"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(
        decrypted,
        vec!["for bob's eyes only".to_owned()],
        "{:?}",
        events.iter().map(|e| e.raw().json().get()).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn matrix_sdk_second_device_reads_history_from_key_backup() {
    use matrix_sdk::{
        config::SyncSettings,
        deserialized_responses::TimelineEventKind,
        ruma::{
            api::client::uiaa::{MatrixUserIdentifier, Password, UserIdentifier},
            events::room::message::RoomMessageEventContent,
        },
    };

    let s = TestServer::start().await;
    let alice = sdk_client(&s.base, "alice").await;
    let bob = sdk_client(&s.base, "bob").await;
    let settings = || SyncSettings::default().timeout(std::time::Duration::from_millis(0));
    alice.sync_once(settings()).await.unwrap();
    bob.sync_once(settings()).await.unwrap();

    // Bob sets up cross-signing (password confirmed) and recovery, which enables key backup.
    let challenge = bob.encryption().bootstrap_cross_signing(None).await.unwrap_err();
    let session = challenge.as_uiaa_response().and_then(|info| info.session.clone());
    let mut password = Password::new(
        UserIdentifier::Matrix(MatrixUserIdentifier::new("bob".to_owned())),
        "sdk password 1".to_owned(),
    );
    password.session = session;
    bob.encryption()
        .bootstrap_cross_signing(Some(uiaa::AuthData::Password(password)))
        .await
        .unwrap();
    let recovery_key = bob.encryption().recovery().enable().await.unwrap();

    let room = encrypted_room(&alice, &bob).await;
    let sent =
        room.send(RoomMessageEventContent::text_plain("before your new phone")).await.unwrap();
    bob.sync_once(settings()).await.unwrap();
    bob.encryption().backups().wait_for_steady_state().await.unwrap();

    // Bob's new device restores from recovery and reads the old message from the backup.
    let phone = Client::builder().homeserver_url(&s.base).build().await.unwrap();
    phone.matrix_auth().login_username("bob", "sdk password 1").send().await.unwrap();
    phone.sync_once(settings()).await.unwrap();
    phone.encryption().recovery().recover(&recovery_key).await.unwrap();
    phone.encryption().backups().download_room_keys_for_room(room.room_id()).await.unwrap();
    let phone_room = phone.get_room(room.room_id()).unwrap();
    let event = phone_room.event(&sent.response.event_id, None).await.unwrap();
    assert!(matches!(event.kind, TimelineEventKind::Decrypted(_)), "{:?}", event.kind);
    let content = event.raw().get_field::<serde_json::Value>("content").unwrap().unwrap();
    assert_eq!(content["body"], "before your new phone");
}

#[tokio::test]
async fn matrix_sdk_shares_an_image_and_a_pdf() {
    use matrix_sdk::{
        attachment::AttachmentConfig,
        config::SyncSettings,
        media::{MediaFormat, MediaRequestParameters, MediaThumbnailSettings},
        ruma::{
            UInt,
            api::client::room::create_room,
            events::room::{MediaSource, message::MessageType},
        },
    };

    let s = TestServer::start().await;
    let alice = sdk_client(&s.base, "alice").await;
    let bob = sdk_client(&s.base, "bob").await;
    let settings = || SyncSettings::default().timeout(std::time::Duration::from_millis(0));
    let mut request = create_room::v3::Request::new();
    request.invite = vec![bob.user_id().unwrap().to_owned()];
    let room = alice.create_room(request).await.unwrap();
    bob.sync_once(settings()).await.unwrap();
    bob.join_room_by_id(room.room_id()).await.unwrap();

    let picture = {
        let image = image::RgbImage::from_fn(400, 300, |x, y| image::Rgb([x as u8, y as u8, 9]));
        let mut out = Vec::new();
        image::DynamicImage::ImageRgb8(image)
            .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    };
    let pdf = b"%PDF-1.4\n% quarterly budget\n".repeat(2000);
    room.send_attachment("chart.png", &mime::IMAGE_PNG, picture.clone(), AttachmentConfig::new())
        .await
        .unwrap();
    room.send_attachment(
        "budget.pdf",
        &mime::APPLICATION_PDF,
        pdf.clone(),
        AttachmentConfig::new(),
    )
    .await
    .unwrap();

    let update = bob.sync_once(settings()).await.unwrap();
    let mut sources: Vec<(String, MediaSource)> = Vec::new();
    for event in &update.rooms.joined[room.room_id()].timeline.events {
        let Ok(Some(content)) = event
            .raw()
            .get_field::<matrix_sdk::ruma::events::room::message::RoomMessageEventContent>(
            "content",
        ) else {
            continue;
        };
        match content.msgtype {
            MessageType::Image(image) => sources.push(("image".into(), image.source)),
            MessageType::File(file) => sources.push(("file".into(), file.source)),
            _ => {}
        }
    }
    assert_eq!(sources.len(), 2, "bob sees both attachments");
    for (kind, source) in sources {
        let request = MediaRequestParameters { source: source.clone(), format: MediaFormat::File };
        let bytes = bob.media().get_media_content(&request, false).await.unwrap();
        let expected = if kind == "image" { &picture } else { &pdf };
        assert_eq!(&bytes, expected, "{kind} bytes are identical");
        if kind == "image" {
            let settings = MediaThumbnailSettings::new(UInt::from(200u32), UInt::from(200u32));
            let request =
                MediaRequestParameters { source, format: MediaFormat::Thumbnail(settings) };
            let thumbnail = bob.media().get_media_content(&request, false).await.unwrap();
            let thumbnail = image::load_from_memory(&thumbnail).unwrap();
            // Served from the 320x240 size, which a 400x300 picture fills exactly.
            assert_eq!((thumbnail.width(), thumbnail.height()), (320, 240));
        }
    }
}
