//! The `plaza` command: serve, create users, set roles, verify the audit log.

use std::{io::BufRead, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use plaza::{
    Config,
    server::{self, Server},
    service::{
        audit::{Audit, Entry},
        keys::ServerKeys,
        users::{self, Role, Users},
    },
    storage::Db,
};

/// A Matrix homeserver for companies' group chat.
#[derive(Parser)]
#[command(name = "plaza", version, about)]
struct Cli {
    /// Configuration file (TOML); defaults to $PLAZA_CONFIG, then built-in defaults.
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
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Recompute the hash chain and report the first broken link (exit status 1 if any).
    Verify {
        /// The database directory; defaults to `database.path` of the configuration.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("plaza: {err}");
            return ExitCode::from(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::new(&config.log.filter);
    tracing_subscriber::fmt().with_env_filter(filter).init();

    let runtime = match plaza::server::runtime() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("plaza: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command.unwrap_or(Command::Serve) {
            Command::Serve => serve(config).await,
            Command::CreateUser { name, admin, password_file } => {
                create_user(config, &name, admin, password_file).await
            }
            Command::SetRole { user, role } => set_role(config, &user, &role),
            Command::Audit { command: AuditCommand::Verify { data_dir } } => {
                verify_audit(config, data_dir)
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("plaza: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> Result<(), String> {
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

fn verify_audit(mut config: Config, data_dir: Option<PathBuf>) -> Result<(), String> {
    if let Some(dir) = data_dir {
        config.database.path = dir;
    }
    if !config.database.path.is_dir() {
        return Err(format!("no database at {}", config.database.path.display()));
    }
    let db = Db::open(&config.database.path, 8).map_err(|e| e.to_string())?;
    let keys = ServerKeys::load_or_create(&db).map_err(|e| e.to_string())?;
    let audit = Audit::new(&db).map_err(|e| e.to_string())?;
    let report = audit.verify(&keys.key_pair().public_key()).map_err(|e| e.to_string())?;
    println!("{}", serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?);
    match report.first_broken {
        None => Ok(()),
        Some(broken) => {
            Err(format!("audit log broken at record {}: {}", broken.seq, broken.reason))
        }
    }
}
