//! Application service registrations: read from the YAML files the configuration names,
//! checked field by field at start (an error names the file and the field), and compiled into
//! the namespace matchers the rest of the server asks.

use std::path::{Path, PathBuf};

use regex::RegexSet;
use ruma::{OwnedUserId, ServerName, UserId, api::appservice::Registration};
use serde_json::Value as JsonValue;
use sha2::{Digest, Sha256};

/// The unstable (MSC2409) name of `receive_ephemeral`.
const UNSTABLE_EPHEMERAL: &str = "de.sorunome.msc2409.push_ephemeral";
/// Largest registration file read.
const MAX_FILE_BYTES: u64 = 1024 * 1024;
/// Most regexes in one namespace list.
const MAX_NAMESPACES: usize = 1000;

/// One namespace list (users, aliases or rooms), compiled.
#[derive(Debug)]
pub struct Namespace {
    all: RegexSet,
    exclusive: RegexSet,
    /// The regexes as written, with their exclusive flag (for overlap checks).
    pub written: Vec<(String, bool)>,
}

impl Namespace {
    fn compile(list: &[ruma::api::appservice::Namespace], field: &str) -> Result<Self, String> {
        if list.len() > MAX_NAMESPACES {
            return Err(format!("field `{field}`: more than {MAX_NAMESPACES} entries"));
        }
        // Anchored at the start like the registrations bridges ship expect; a regex that must
        // match the whole id ends with `$`.
        let anchored = |n: &ruma::api::appservice::Namespace| format!("^(?:{})", n.regex);
        let all = RegexSet::new(list.iter().map(anchored));
        let all = all.map_err(|e| format!("field `{field}`: invalid regex: {e}"))?;
        let exclusive = RegexSet::new(list.iter().filter(|n| n.exclusive).map(anchored))
            .map_err(|e| format!("field `{field}`: invalid regex: {e}"))?;
        let written = list.iter().map(|n| (n.regex.clone(), n.exclusive)).collect();
        Ok(Self { all, exclusive, written })
    }

    /// Whether `value` is in the namespace.
    pub fn matches(&self, value: &str) -> bool {
        self.all.is_match(value)
    }

    /// Whether `value` is in an exclusive part of the namespace.
    pub fn exclusive(&self, value: &str) -> bool {
        self.exclusive.is_match(value)
    }
}

/// A loaded, checked registration.
#[derive(Debug)]
pub struct Registered {
    /// The registration as the spec describes it.
    pub registration: Registration,
    /// The file it came from.
    pub file: PathBuf,
    /// The SHA-256 of the file's content, to notice changes between starts.
    pub digest: String,
    /// The service's own user (`sender_localpart`).
    pub sender: OwnedUserId,
    /// User ids the service manages.
    pub users: Namespace,
    /// Room aliases the service manages.
    pub aliases: Namespace,
    /// Room ids the service is interested in.
    pub rooms: Namespace,
    /// Whether typing, receipts and presence are pushed (`receive_ephemeral` or its
    /// unstable name).
    pub receive_ephemeral: bool,
}

impl Registered {
    /// The service's id.
    pub fn id(&self) -> &str {
        &self.registration.id
    }

    /// Whether the service may act as `user_id`: its own user or one of its namespace.
    pub fn owns_user(&self, user_id: &UserId) -> bool {
        user_id == self.sender || self.users.matches(user_id.as_str())
    }

    /// Whether the service's requests are rate-limited (the default).
    pub fn rate_limited(&self) -> bool {
        self.registration.rate_limited.unwrap_or(true)
    }
}

/// Reads and checks every file of `files`, then the set as a whole (ids, tokens, exclusive
/// namespaces unique). The error names the file and the field.
pub fn load_all(files: &[PathBuf], server_name: &ServerName) -> Result<Vec<Registered>, String> {
    let mut loaded: Vec<Registered> = Vec::with_capacity(files.len());
    for file in files {
        let registered = load(file, server_name)?;
        let name = file.display();
        for other in &loaded {
            let theirs = other.file.display();
            let (mine, theirs_reg) = (&registered.registration, &other.registration);
            if mine.id == theirs_reg.id {
                return Err(format!(
                    "{name}: field `id`: `{}` is also the id in {theirs}",
                    mine.id
                ));
            }
            if mine.as_token == theirs_reg.as_token || mine.as_token == theirs_reg.hs_token {
                return Err(format!("{name}: field `as_token`: also used in {theirs}"));
            }
            if mine.hs_token == theirs_reg.hs_token || mine.hs_token == theirs_reg.as_token {
                return Err(format!("{name}: field `hs_token`: also used in {theirs}"));
            }
            for (kind, a, b) in [
                ("users", &registered.users, &other.users),
                ("aliases", &registered.aliases, &other.aliases),
                ("rooms", &registered.rooms, &other.rooms),
            ] {
                let overlap =
                    a.written.iter().filter(|(_, ex)| *ex).find(|(regex, _)| {
                        b.written.iter().any(|(theirs, ex)| *ex && theirs == regex)
                    });
                if let Some((regex, _)) = overlap {
                    return Err(format!(
                        "{name}: field `namespaces.{kind}`: exclusive regex `{regex}` is also \
                         exclusive in {theirs}"
                    ));
                }
            }
            if other.users.exclusive(registered.sender.as_str()) {
                return Err(format!(
                    "{name}: field `sender_localpart`: {} is in an exclusive namespace of {theirs}",
                    registered.sender
                ));
            }
            if registered.users.exclusive(other.sender.as_str()) {
                return Err(format!(
                    "{name}: field `namespaces.users`: an exclusive regex claims {}, the sender \
                     of {theirs}",
                    other.sender
                ));
            }
        }
        loaded.push(registered);
    }
    Ok(loaded)
}

/// Reads and checks one registration file.
pub fn load(file: &Path, server_name: &ServerName) -> Result<Registered, String> {
    let name = file.display();
    let size = std::fs::metadata(file).map_err(|e| format!("{name}: cannot read: {e}"))?.len();
    if size > MAX_FILE_BYTES {
        return Err(format!("{name}: larger than {MAX_FILE_BYTES} bytes"));
    }
    let text = std::fs::read_to_string(file).map_err(|e| format!("{name}: cannot read: {e}"))?;
    parse(&text, file, server_name).map_err(|e| format!("{name}: {e}"))
}

/// Parses and checks the text of a registration (errors name the field, not the file).
pub fn parse(text: &str, file: &Path, server_name: &ServerName) -> Result<Registered, String> {
    let value: JsonValue =
        serde_yaml_ng::from_str(text).map_err(|e| format!("not valid YAML: {e}"))?;
    let JsonValue::Object(fields) = &value else {
        return Err("the registration must be a mapping of fields".into());
    };
    let string = |field: &str| -> Result<&str, String> {
        match fields.get(field) {
            Some(JsonValue::String(s)) if !s.trim().is_empty() => Ok(s),
            Some(JsonValue::String(_)) => Err(format!("field `{field}`: must not be empty")),
            Some(_) => Err(format!("field `{field}`: must be a string")),
            None => Err(format!("field `{field}`: missing")),
        }
    };
    let boolean = |field: &str| -> Result<Option<bool>, String> {
        match fields.get(field) {
            None | Some(JsonValue::Null) => Ok(None),
            Some(JsonValue::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(format!("field `{field}`: must be true or false")),
        }
    };
    let id = string("id")?;
    if id.len() > 255 {
        return Err("field `id`: longer than 255 bytes".into());
    }
    match fields.get("url") {
        None => return Err("field `url`: missing (write `url: null` for no pushing)".into()),
        Some(JsonValue::Null) => {}
        Some(JsonValue::String(url)) => {
            let parsed =
                url::Url::parse(url).map_err(|e| format!("field `url`: not a valid URL: {e}"))?;
            if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
                return Err("field `url`: must be an http:// or https:// URL".into());
            }
        }
        Some(_) => return Err("field `url`: must be a URL or null".into()),
    }
    let as_token = string("as_token")?;
    let hs_token = string("hs_token")?;
    if as_token == hs_token {
        return Err("field `hs_token`: must differ from `as_token`".into());
    }
    let localpart = string("sender_localpart")?;
    let sender = UserId::parse(format!("@{localpart}:{server_name}"))
        .ok()
        .filter(|u| u.validate_strict().is_ok() && u.as_str().len() <= 255)
        .ok_or_else(|| {
            format!("field `sender_localpart`: `{localpart}` is not a valid localpart")
        })?;
    match fields.get("namespaces") {
        Some(JsonValue::Object(namespaces)) => {
            for (kind, list) in namespaces {
                if !matches!(kind.as_str(), "users" | "aliases" | "rooms") {
                    continue;
                }
                let JsonValue::Array(list) = list else {
                    return Err(format!("field `namespaces.{kind}`: must be a list"));
                };
                for (i, entry) in list.iter().enumerate() {
                    let at = format!("namespaces.{kind}[{i}]");
                    match entry.get("regex") {
                        Some(JsonValue::String(_)) => {}
                        Some(_) => return Err(format!("field `{at}.regex`: must be a string")),
                        None => return Err(format!("field `{at}.regex`: missing")),
                    }
                    match entry.get("exclusive") {
                        Some(JsonValue::Bool(_)) => {}
                        Some(_) => {
                            return Err(format!("field `{at}.exclusive`: must be true or false"));
                        }
                        None => return Err(format!("field `{at}.exclusive`: missing")),
                    }
                }
            }
        }
        Some(_) => return Err("field `namespaces`: must be a mapping".into()),
        None => return Err("field `namespaces`: missing".into()),
    }
    boolean("rate_limited")?;
    let ephemeral = boolean("receive_ephemeral")?.unwrap_or(false)
        || boolean(UNSTABLE_EPHEMERAL)?.unwrap_or(false);
    match fields.get("protocols") {
        None | Some(JsonValue::Null) => {}
        Some(JsonValue::Array(list)) if list.iter().all(JsonValue::is_string) => {}
        Some(_) => return Err("field `protocols`: must be a list of strings".into()),
    }
    let registration: Registration = serde_json::from_value(value.clone())
        .map_err(|e| format!("not a valid registration: {e}"))?;
    let namespaces = &registration.namespaces;
    let users = Namespace::compile(&namespaces.users, "namespaces.users")?;
    let aliases = Namespace::compile(&namespaces.aliases, "namespaces.aliases")?;
    let rooms = Namespace::compile(&namespaces.rooms, "namespaces.rooms")?;
    let digest = hex::encode(Sha256::digest(text.as_bytes()));
    Ok(Registered {
        registration,
        file: file.to_owned(),
        digest,
        sender,
        users,
        aliases,
        rooms,
        receive_ephemeral: ephemeral,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "id: irc\nurl: http://127.0.0.1:9000\nas_token: a\nhs_token: h\n\
        sender_localpart: _irc_bot\nnamespaces:\n  users:\n    - exclusive: true\n      \
        regex: '@_irc_.*'\n  aliases: []\nde.sorunome.msc2409.push_ephemeral: true\n";

    fn parse_text(text: &str) -> Result<Registered, String> {
        parse(text, Path::new("irc.yaml"), "example.org".try_into().unwrap())
    }

    #[test]
    fn a_good_registration_loads_with_its_unstable_ephemeral_flag() {
        let reg = parse_text(GOOD).unwrap();
        assert_eq!(reg.id(), "irc");
        assert!(reg.receive_ephemeral);
        assert!(reg.rate_limited());
        assert_eq!(reg.sender.as_str(), "@_irc_bot:example.org");
        assert!(reg.owns_user(<&UserId>::try_from("@_irc_x:example.org").unwrap()));
        assert!(!reg.owns_user(<&UserId>::try_from("@x_irc_:example.org").unwrap()));
        assert!(reg.users.exclusive("@_irc_x:example.org"));
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (GOOD.replace("id: irc\n", ""), "field `id`: missing"),
            (GOOD.replace("url: http://127.0.0.1:9000", "url: 5"), "field `url`"),
            (GOOD.replace("url: http://127.0.0.1:9000", "url: ftp://x"), "field `url`"),
            (GOOD.replace("hs_token: h", "hs_token: a"), "field `hs_token`"),
            (GOOD.replace("regex: '@_irc_.*'", "regex: '(('"), "namespaces.users"),
            (GOOD.replace("exclusive: true", "exclusive: yes please"), "users[0].exclusive"),
            (GOOD.replace("_irc_bot", "Bad Name"), "field `sender_localpart`"),
            ("- a\n- b\n".to_owned(), "mapping"),
        ];
        for (text, expected) in cases {
            let err = parse_text(&text).unwrap_err();
            assert!(err.contains(expected), "{err} should mention {expected}");
        }
    }
}
