//! The `plaza` command: serve, create users, set roles, verify the audit log.

use std::{io::BufRead, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use plaza::{
    Config,
    server::{self, Server},
    service::{
        audit::{
            Audit, Entry,
            checkpoint::{Checkpoint, Containment, MAX_CHECKPOINT_BYTES},
        },
        keys::ServerKeys,
        users::{self, Role, Users},
    },
    storage::{Db, Table, tables},
};
use ruma::OwnedServerName;

/// A Matrix homeserver for companies' group chat.
#[derive(Parser)]
#[command(name = "plaza", version, about)]
struct Cli {
    /// Configuration file (TOML); defaults to $PLAZA_CONFIG, then `conf/plaza.toml` in the
    /// working directory if it exists, then built-in defaults.
    #[arg(long, global = true, env = plaza::config::CONFIG_ENV)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (the default).
    Serve,
    /// Create an account; works while the server is stopped.
    CreateUser {
        /// The user name (localpart), e.g. `alice`.
        name: String,
        /// Make the account a server admin.
        #[arg(long)]
        admin: bool,
        /// Read the password from this file (first line); otherwise from standard input.
        #[arg(long)]
        password_file: Option<PathBuf>,
    },
    /// Give an account a role (`admin`, `auditor` or `user`); works while the server is stopped.
    SetRole {
        /// The user name (localpart) or full user id.
        user: String,
        /// `admin`, `auditor` or `user`.
        role: String,
    },
    /// The audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// The server's signing keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Replace the signing key with a new one while the server is stopped; the old key stays
    /// published as an old key (with the time it stopped being used), so other servers can
    /// still check what it signed.
    Rotate,
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Recompute the hash chain and report the first broken link. Exit status: 0 intact,
    /// 1 chain broken, 2 bad configuration or arguments, 3 database cannot be opened (locked
    /// by a running server, missing, without a signing key, or unreadable), 4 the log no
    /// longer holds the checkpoint given with `--against`, 5 that checkpoint is unreadable,
    /// another server's or forged, or the database's signing key is not the `--public-key`
    /// given.
    Verify {
        /// The database directory; defaults to `database.path` of the configuration.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// A signed checkpoint (a file, or the JSON itself) the log must still contain.
        #[arg(long, value_name = "CHECKPOINT")]
        against: Option<String>,
        /// The server's public key (unpadded base64) to check the checkpoint with, instead of
        /// the key stored in the database.
        #[arg(long, requires = "against")]
        public_key: Option<String>,
    },
}

/// Why a command failed, and the exit status that says so.
struct Failure {
    status: u8,
    message: String,
}

/// Exit status: the audit chain is broken.
const EXIT_BROKEN: u8 = 1;
/// Exit status: bad configuration or arguments.
const EXIT_CONFIG: u8 = 2;
/// Exit status: the database cannot be opened (locked by a running server, missing, damaged).
const EXIT_DATABASE: u8 = 3;
/// Exit status: the audit log no longer holds the checkpoint it was checked against.
const EXIT_CHECKPOINT_MISSING: u8 = 4;
/// Exit status: the checkpoint is unreadable, another server's, or its signature fails.
const EXIT_CHECKPOINT_INVALID: u8 = 5;

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Self { status: 1, message }
    }
}

fn fail(status: u8, message: impl Into<String>) -> Failure {
    Failure { status, message: message.into() }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config_file = plaza::config::config_file(cli.config.as_deref());
    let config = match Config::load(config_file.as_deref()) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("plaza: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // Log lines go to standard output through a queue and a writer thread: a slow or stalled
    // reader of the output drops lines rather than holding up request handling. The guard
    // flushes the queue when `main` returns.
    let (log_writer, _log_guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .finish(std::io::stdout());
    tracing_subscriber::fmt()
        .with_env_filter(config.log.env_filter())
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_writer(log_writer)
        .init();

    let runtime = match plaza::server::runtime() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("plaza: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command.unwrap_or(Command::Serve) {
            Command::Serve => serve(config, config_file).await.map_err(Failure::from),
            Command::CreateUser { name, admin, password_file } => {
                create_user(config, &name, admin, password_file).await.map_err(Failure::from)
            }
            Command::SetRole { user, role } => {
                set_role(config, &user, &role).map_err(Failure::from)
            }
            Command::Audit { command: AuditCommand::Verify { data_dir, against, public_key } } => {
                verify_audit(config, data_dir, against, public_key)
            }
            Command::Keys { command: KeysCommand::Rotate } => {
                rotate_key(config).map_err(Failure::from)
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("plaza: {}", failure.message);
            ExitCode::from(failure.status)
        }
    }
}

/// Says where the configuration came from: the file read (if any) and the names (never the
/// values, which may be secrets) of the `PLAZA_*` variables laid over it.
fn log_config_sources(file: Option<&std::path::Path>) {
    let overrides: Vec<String> = std::env::vars_os()
        .filter_map(|(name, _)| name.into_string().ok())
        .filter(|name| name.starts_with("PLAZA_") && name != plaza::config::CONFIG_ENV)
        .collect();
    let overrides = overrides.join(" ");
    match file {
        Some(file) => {
            let path = std::fs::canonicalize(file).unwrap_or_else(|_| file.to_owned());
            tracing::info!(file = %path.display(), env = %overrides, "configuration read");
        }
        None => tracing::info!(
            env = %overrides,
            "no configuration file (no --config, no PLAZA_CONFIG, no {} here): built-in defaults",
            plaza::config::DEFAULT_CONFIG_FILE
        ),
    }
}

async fn serve(config: Config, config_file: Option<PathBuf>) -> Result<(), String> {
    log_config_sources(config_file.as_deref());
    let server = Server::start(config).await.map_err(|e| e.to_string())?;
    server.run_until_signal().await;
    Ok(())
}

async fn create_user(
    config: Config,
    name: &str,
    admin: bool,
    password_file: Option<PathBuf>,
) -> Result<(), String> {
    let password = match password_file {
        Some(path) => std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned(),
        None => {
            let mut line = String::new();
            std::io::stdin().lock().read_line(&mut line).map_err(|e| e.to_string())?;
            line.trim_end_matches(['\r', '\n']).to_owned()
        }
    };
    let services = server::open_services(config).map_err(|e| e.to_string())?;
    let user_id = Users::new_user_id(&name.to_lowercase(), services.server_name())
        .map_err(|e| e.to_string())?;
    users::check_password_strength(&password, services.config.registration.min_password_length)
        .map_err(|e| e.to_string())?;
    if services.users.get(&user_id).map_err(|e| e.to_string())?.is_some() {
        return Err(format!("{user_id} already exists"));
    }
    if services.is_notices_localpart(user_id.localpart()) {
        return Err(format!("{user_id} is the server notices account"));
    }
    let hash = users::hash_password(password).await.map_err(|e| e.to_string())?;
    let mut batch = services.db.batch();
    services.registration.retire_first_admin_token(&mut batch);
    services.users.create(&mut batch, &user_id, Some(hash), admin, false, None);
    services.queue_onboarding(&mut batch, &user_id);
    let entry = Entry::new("admin.user.create", None)
        .target(&user_id)
        .details(serde_json::json!({ "admin": admin, "via": "cli" }));
    services.audit.commit(batch, [entry]).map_err(|e| e.to_string())?;
    // No server runs here: the onboarding runs now (and resumes at the next start if cut).
    let (_keep, running) = tokio::sync::watch::channel(false);
    plaza::service::jobs::run_user(std::sync::Arc::new(services), user_id.clone(), running).await;
    println!("created {user_id}{}", if admin { " (admin)" } else { "" });
    Ok(())
}

fn set_role(config: Config, user: &str, role: &str) -> Result<(), String> {
    let role: Role = role.parse().map_err(|e: plaza::Error| e.to_string())?;
    let services = server::open_services(config).map_err(|e| e.to_string())?;
    let user_id =
        Users::parse_local_user(user, services.server_name()).map_err(|e| e.to_string())?;
    let previous = services.set_role(None, &user_id, role).map_err(|e| e.to_string())?;
    println!("{user_id}: {} -> {}", previous.as_str(), role.as_str());
    Ok(())
}

fn rotate_key(config: Config) -> Result<(), String> {
    let services = server::open_services(config).map_err(|e| e.to_string())?;
    let (old, new) =
        ServerKeys::rotate(&services.db, &services.audit).map_err(|e| e.to_string())?;
    println!("signing key rotated: {old} -> {new} (takes effect at the next start)");
    Ok(())
}

fn verify_audit(
    mut config: Config,
    data_dir: Option<PathBuf>,
    against: Option<String>,
    public_key: Option<String>,
) -> Result<(), Failure> {
    use base64::Engine as _;
    let public_key = public_key
        .map(|key| {
            let engine = base64::engine::general_purpose::STANDARD_NO_PAD;
            engine
                .decode(key.trim().trim_end_matches('='))
                .ok()
                .and_then(|key| <[u8; 32]>::try_from(key).ok())
                .ok_or_else(|| fail(EXIT_CONFIG, "--public-key is 32 bytes in unpadded base64"))
        })
        .transpose()?;
    let checkpoint = against.as_deref().map(read_checkpoint).transpose()?;
    if let Some(dir) = data_dir {
        config.database.path = dir;
    }
    let path = &config.database.path;
    // Only an existing database is opened: checking never creates one, nor a signing key.
    if !path.join("CURRENT").is_file() {
        return Err(fail(EXIT_DATABASE, format!("no database at {}", path.display())));
    }
    let db = Db::open(path, 8).map_err(|e| fail(EXIT_DATABASE, e.to_string()))?;
    let keys = ServerKeys::load(&db)
        .map_err(|e| fail(EXIT_DATABASE, e.to_string()))?
        .ok_or_else(|| fail(EXIT_DATABASE, format!("no signing key in {}", path.display())))?;
    let audit = Audit::new(&db).map_err(|e| fail(EXIT_DATABASE, e.to_string()))?;
    let stored = keys.key_pair().public_key();
    let stored: [u8; 32] = stored.as_slice().try_into().map_err(|_| {
        fail(EXIT_DATABASE, "the stored signing key is not an ed25519 key".to_owned())
    })?;
    // The key given is the one trusted: it checks the checkpoint and the retention anchor.
    let key = public_key.unwrap_or(stored);
    if let Some(checkpoint) = &checkpoint {
        // The database's own server name: `--data-dir` may point at another server's data.
        let global: Table<String> = db.table(tables::GLOBAL);
        let server_name = match global.get("server_name") {
            Ok(Some(name)) => OwnedServerName::try_from(name)
                .map_err(|e| fail(EXIT_DATABASE, format!("stored server name: {e}")))?,
            Ok(None) => config.server_name.clone(),
            Err(err) => return Err(fail(EXIT_DATABASE, err.to_string())),
        };
        checkpoint.verify(&server_name, &key).map_err(|e| {
            if public_key.is_some() {
                fail(EXIT_CHECKPOINT_INVALID, e)
            } else {
                fail(
                    EXIT_CHECKPOINT_INVALID,
                    format!(
                        "{e} (checked with the database's own key, which may have been \
                         replaced: give the key logged with the checkpoint as --public-key)"
                    ),
                )
            }
        })?;
    }
    let report = audit.verify(&key).map_err(|e| fail(EXIT_DATABASE, e.to_string()))?;
    let json = serde_json::to_string_pretty(&report)
        .map_err(|e| fail(EXIT_DATABASE, format!("cannot write the report: {e}")))?;
    println!("{json}");
    if public_key.is_some_and(|given| given != stored) {
        let engine = base64::engine::general_purpose::STANDARD_NO_PAD;
        return Err(fail(
            EXIT_CHECKPOINT_INVALID,
            format!(
                "key mismatch: the database's signing key {} is not the given public key {}: \
                 the key was replaced, or the given key is another server's",
                engine.encode(stored),
                engine.encode(key)
            ),
        ));
    }
    if let Some(broken) = report.first_broken {
        return Err(fail(
            EXIT_BROKEN,
            format!("audit log broken at record {}: {}", broken.seq, broken.reason),
        ));
    }
    let Some(checkpoint) = checkpoint else { return Ok(()) };
    let missing = |why: String| {
        fail(
            EXIT_CHECKPOINT_MISSING,
            format!(
                "audit log does not contain the checkpoint at record {} (hash {}): {why}",
                checkpoint.seq, checkpoint.head_hash
            ),
        )
    };
    match audit.contains(&checkpoint).map_err(|e| fail(EXIT_DATABASE, e.to_string()))? {
        Containment::Contained => {
            // Standard output stays the JSON report alone.
            eprintln!("plaza: the audit log contains the checkpoint at record {}", checkpoint.seq);
            Ok(())
        }
        Containment::Differs { found } => {
            Err(missing(format!("the log holds hash {found} there (rewritten)")))
        }
        Containment::Truncated { head_seq } => {
            Err(missing(format!("the log ends at record {head_seq} (records removed)")))
        }
        Containment::Pruned { anchor_seq } => Err(missing(format!(
            "records up to {anchor_seq} were pruned by retention, so it cannot be checked"
        ))),
    }
}

/// Reads a checkpoint given as JSON text or as the path of a file holding it.
fn read_checkpoint(arg: &str) -> Result<Checkpoint, Failure> {
    let invalid = |message: String| fail(EXIT_CHECKPOINT_INVALID, message);
    let text = if arg.trim_start().starts_with('{') {
        arg.to_owned()
    } else {
        use std::io::Read as _;
        let file =
            std::fs::File::open(arg).map_err(|e| invalid(format!("cannot read {arg}: {e}")))?;
        let mut text = String::new();
        file.take(MAX_CHECKPOINT_BYTES as u64 + 1)
            .read_to_string(&mut text)
            .map_err(|e| invalid(format!("cannot read {arg}: {e}")))?;
        text
    };
    Checkpoint::parse(&text).map_err(invalid)
}
