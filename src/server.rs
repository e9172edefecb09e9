//! Starting and stopping the server: open storage, build services, bind listeners, serve until
//! asked to stop, then drain in-flight requests.

use std::{net::SocketAddr, sync::Arc};

use tokio::{net::TcpListener, sync::watch, task::JoinSet};

use crate::{
    api::router,
    config::Config,
    connections::{self, Gate},
    service::Services,
    storage::{Db, StorageError, Table, tables},
};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The database could not be opened (locked, damaged, unreadable).
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The data directory could not be created.
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Start-up work failed.
    #[error("start-up failed: {0}")]
    Init(String),
}

/// A running server.
pub struct Server {
    addrs: Vec<SocketAddr>,
    federation_addrs: Vec<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    services: Arc<Services>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

/// Opens the database in `config` and builds the services over it.
pub fn open_services(config: Config) -> Result<Services, StartError> {
    let path = &config.database.path;
    std::fs::create_dir_all(path)
        .map_err(|source| StartError::DataDir { path: path.display().to_string(), source })?;
    let db = Db::open(path, config.database.cache_mb)?;
    check_server_name(&db, &config)?;
    Ok(Services::new(config, db)?)
}

/// User ids embed the server name, so a database belongs to one name for life: the first
/// start records it and later starts under another name are refused.
fn check_server_name(db: &Db, config: &Config) -> Result<(), StartError> {
    let global: Table<String> = db.table(tables::GLOBAL);
    match global.get("server_name")? {
        Some(name) if name == config.server_name.as_str() => Ok(()),
        Some(name) => Err(StartError::Init(format!(
            "this database belongs to server_name `{name}`, but the configuration says `{}`",
            config.server_name
        ))),
        None => {
            let mut batch = db.batch();
            global.put(&mut batch, "server_name", &config.server_name.to_string());
            Ok(db.write(batch)?)
        }
    }
}

/// Threads kept for blocking work (file I/O, thumbnails, password hashing): enough to keep the
/// disk busy, few enough that each thread's allocator pages stay few. WAL syncs do not wait
/// for these: they have a thread of their own.
const BLOCKING_THREADS: usize = 8;

/// Bytes a connection reads from its socket at a time at most. Small enough that a burst of
/// uploads keeps small buffers that the allocator reuses, large enough for few reads.
const READ_BUFFER: usize = 64 * 1024;

/// Serves `app` on `listener` (HTTP/1.1 and HTTP/2, over TLS when `tls` is given) until
/// `shutdown` resolves, then waits for open connections to finish their requests. Each
/// request carries its peer's address; every connection is admitted and watched by `gate`
/// (deadlines, the connection cap).
async fn serve(
    listener: TcpListener,
    app: axum::Router,
    gate: Arc<Gate>,
    http2_max_streams: u32,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) {
    use hyper_util::{
        rt::{TokioExecutor, TokioIo, TokioTimer},
        server::{conn::auto, graceful::GracefulShutdown},
    };
    use tower::ServiceExt;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .max_buf_size(READ_BUFFER)
        .header_read_timeout(gate.keep_alive());
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(http2_max_streams)
        .max_header_list_size(READ_BUFFER as u32)
        .keep_alive_interval(HTTP2_PING_INTERVAL)
        .keep_alive_timeout(HTTP2_PING_TIMEOUT);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors: idle connections make room; wait a little
                    // instead of spinning.
                    gate.on_accept_error(&err);
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Some(admitted) = gate.admit(stream) else { continue };
        let app = app.clone();
        let requests = admitted.guard.requests();
        let service = hyper::service::service_fn(move |mut req: http::Request<_>| {
            let in_flight = requests.start();
            req.extensions_mut().insert(axum::extract::ConnectInfo(peer));
            let response = app.clone().oneshot(req.map(axum::body::Body::new));
            async move {
                let response = response.await?;
                // The request stays in progress until its body is sent or dropped; each
                // piece the connection takes counts as progress.
                let sending = in_flight.sending();
                Ok::<_, std::convert::Infallible>(
                    response.map(|body| crate::connections::SentBody::new(body, sending)),
                )
            }
        });
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        let guard = admitted.guard;
        let stream = admitted.stream;
        tokio::spawn(async move {
            let connection = async move {
                match tls {
                    None => {
                        let connection =
                            builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                        watcher.watch(connection.into_owned()).await
                    }
                    Some(acceptor) => {
                        let handshake = acceptor.accept(stream);
                        let stream = match tokio::time::timeout(TLS_HANDSHAKE, handshake).await {
                            Ok(Ok(stream)) => stream,
                            Ok(Err(err)) => return Err(err.into()),
                            Err(_) => return Err("TLS handshake timed out".into()),
                        };
                        let connection =
                            builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                        watcher.watch(connection.into_owned()).await
                    }
                }
            };
            tokio::select! {
                // A failed connection is the client's doing (reset, malformed request).
                result = connection => if let Err(err) = result {
                    tracing::debug!(%err, "connection ended with an error");
                },
                // Past its deadline, or evicted to make room: dropping it closes the socket.
                () = guard.expired() => {}
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// How long a TLS handshake may take.
const TLS_HANDSHAKE: std::time::Duration = std::time::Duration::from_secs(10);

/// The TLS configuration of the federation listener, from its PEM certificate chain and key.
fn federation_tls(config: &Config) -> Result<tokio_rustls::TlsAcceptor, StartError> {
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let federation = &config.federation;
    let (Some(cert), Some(key)) = (&federation.tls_cert, &federation.tls_key) else {
        return Err(StartError::Init("federation.tls_cert and tls_key are needed".to_owned()));
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|e| StartError::Init(format!("federation.tls_cert {}: {e}", cert.display())))?;
    if chain.is_empty() {
        return Err(StartError::Init(format!(
            "federation.tls_cert {}: no certificate",
            cert.display()
        )));
    }
    let private_key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| StartError::Init(format!("federation.tls_key {}: {e}", key.display())))?;
    let mut server = tokio_rustls::rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, private_key)
        .map_err(|e| StartError::Init(format!("federation TLS: {e}")))?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(server)))
}

/// Connections the metrics listener keeps open at most.
const METRICS_MAX_CONNECTIONS: usize = 32;

/// How often an HTTP/2 client is pinged to find out whether it is still there.
const HTTP2_PING_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);
/// How long an HTTP/2 ping may go unanswered before the connection is closed.
const HTTP2_PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// The async runtime the server runs on.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(BLOCKING_THREADS)
        .build()
}

impl Server {
    /// Starts serving on every configured address.
    pub async fn start(config: Config) -> Result<Self, StartError> {
        crate::service::settle_memory();
        let services = Arc::new(open_services(config)?);
        services.search.start(&services);
        let no_users = services.users.is_empty().map_err(|e| StartError::Init(e.to_string()))?;
        let first_token = services
            .registration
            .ensure_first_admin_token(&services.config, no_users)
            .map_err(|e| StartError::Init(e.to_string()))?;
        if let Some(token) = first_token {
            tracing::warn!(
                "No accounts exist yet and registration is disabled. Register the first admin \
                 account from any Matrix client with this one-time registration token: {token}"
            );
        }

        let app = router::build(services.clone());
        let connections = &services.config.limits.connections;
        let gate = Arc::new(Gate::new(connections, open_file_limit()));
        let http2_max_streams = connections.http2_max_streams;
        let (stop, stopped) = watch::channel(false);
        let mut tasks = JoinSet::new();
        tasks.spawn(crate::service::push::notifier::run(services.clone(), stopped.clone()));
        tasks.spawn(crate::service::push::gateway::run(services.clone(), stopped.clone()));
        tasks.spawn(crate::service::push::notifications::prune_daily(
            services.clone(),
            stopped.clone(),
        ));
        tasks.spawn(crate::service::jobs::run(services.clone(), stopped.clone()));
        tasks.spawn(crate::service::appservice::send::run(services.clone(), stopped.clone()));
        tasks.spawn(crate::service::federation::sender::run(services.clone(), stopped.clone()));
        tasks.spawn(crate::service::federation::updates::run_presence(
            services.clone(),
            stopped.clone(),
        ));
        tasks.spawn(flush_login_failures(services.clone(), stopped.clone()));
        tasks.spawn(crate::service::delayed::run(services.clone(), stopped.clone()));
        tasks.spawn(crate::service::auto_reply::run(services.clone(), stopped.clone()));
        if services.config.audit.retention_days > 0 {
            tasks.spawn(prune_audit_hourly(services.clone(), stopped.clone()));
        }
        if services.config.audit.checkpoint_interval_secs > 0 {
            let interval =
                std::time::Duration::from_secs(services.config.audit.checkpoint_interval_secs);
            let checkpoints = crate::service::audit::checkpoint::run;
            tasks.spawn(checkpoints(services.clone(), interval, stopped.clone()));
        }
        let mut addrs = Vec::new();
        for addr in &services.config.listen {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { addr: *addr, source })?;
            let local =
                listener.local_addr().map_err(|source| StartError::Bind { addr: *addr, source })?;
            addrs.push(local);
            let mut stopped = stopped.clone();
            let app = app.clone();
            let gate = gate.clone();
            tasks.spawn(async move {
                let shutdown = async move {
                    let _ = stopped.wait_for(|stop| *stop).await;
                };
                serve(listener, app, gate, http2_max_streams, None, shutdown).await;
            });
            tracing::info!(address = %local, server_name = %services.config.server_name, "listening");
        }
        let mut federation_addrs = Vec::new();
        let federation = &services.config.federation;
        if federation.enabled && !federation.listen.is_empty() {
            let tls = federation_tls(&services.config)?;
            let app = router::build_federation(services.clone());
            for addr in &federation.listen {
                let listener = TcpListener::bind(addr)
                    .await
                    .map_err(|source| StartError::Bind { addr: *addr, source })?;
                let local = listener
                    .local_addr()
                    .map_err(|source| StartError::Bind { addr: *addr, source })?;
                federation_addrs.push(local);
                let mut stopped = stopped.clone();
                let (app, gate, tls) = (app.clone(), gate.clone(), tls.clone());
                tasks.spawn(async move {
                    let shutdown = async move {
                        let _ = stopped.wait_for(|stop| *stop).await;
                    };
                    serve(listener, app, gate, http2_max_streams, Some(tls), shutdown).await;
                });
                tracing::info!(address = %local, "serving federation over TLS");
            }
        }
        let metrics_addr = if services.config.metrics.enabled {
            let addr = services.config.metrics.listen;
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { addr, source })?;
            let local =
                listener.local_addr().map_err(|source| StartError::Bind { addr, source })?;
            let app = router::metrics_app(services.clone());
            let mut stopped = stopped.clone();
            // A gate of its own: scrapers never take client connections' places, nor
            // clients theirs.
            let metrics_limits =
                crate::config::ConnectionsConfig { max: METRICS_MAX_CONNECTIONS, ..*connections };
            let gate = Arc::new(Gate::new(&metrics_limits, None));
            tasks.spawn(async move {
                let shutdown = async move {
                    let _ = stopped.wait_for(|stop| *stop).await;
                };
                serve(listener, app, gate, http2_max_streams, None, shutdown).await;
            });
            tracing::info!(address = %local, "serving metrics");
            Some(local)
        } else {
            None
        };
        Ok(Self { addrs, federation_addrs, metrics_addr, services, stop, tasks })
    }

    /// The bound addresses (with real ports when the config asked for port 0).
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// The federation listener's bound addresses (empty without one).
    pub fn federation_addrs(&self) -> &[SocketAddr] {
        &self.federation_addrs
    }

    /// The metrics listener's address, when enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The services, for in-process tests and tooling.
    pub fn services(&self) -> &Arc<Services> {
        &self.services
    }

    /// Stops accepting requests, finishes those in flight, and closes the database.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
        // Background threads (the search indexer) may hold the services a moment longer; the
        // database is closed once they let go, and a restart must find it closed.
        let services = Arc::downgrade(&self.services);
        drop(self);
        for _ in 0..500 {
            if services.strong_count() == 0 {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        tracing::warn!("the database was still in use five seconds after stopping");
    }

    /// Serves until SIGINT or SIGTERM, then stops gracefully.
    pub async fn run_until_signal(self) {
        shutdown_signal().await;
        tracing::info!("shutting down");
        self.stop().await;
    }
}

/// The open-file limit, raised to the hard limit on the first call (once per process).
fn open_file_limit() -> Option<u64> {
    static LIMIT: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(connections::raise_open_file_limit)
}

/// Writes the audit summaries of repeated failed logins as their windows close, until the
/// server stops (and once more then).
async fn flush_login_failures(services: Arc<Services>, mut stopped: watch::Receiver<bool>) {
    loop {
        let stop = tokio::select! {
            _ = stopped.wait_for(|stop| *stop) => true,
            () = tokio::time::sleep(services.abuse.audit_window()) => false,
        };
        if let Err(err) = services.abuse.flush_login_failures(&services.audit, stop) {
            tracing::warn!(%err, "cannot write the failed-login summaries");
        }
        if stop {
            return;
        }
    }
}

/// Applies audit log retention at start and then every hour until the server stops.
async fn prune_audit_hourly(services: Arc<Services>, mut stopped: watch::Receiver<bool>) {
    loop {
        let pass = services.clone();
        match tokio::task::spawn_blocking(move || pass.prune_audit()).await {
            Ok(Ok(0)) => {}
            Ok(Ok(removed)) => tracing::info!(removed, "pruned audit records past retention"),
            Ok(Err(err)) => tracing::warn!(%err, "audit retention failed"),
            Err(err) => tracing::warn!(%err, "audit retention task failed"),
        }
        tokio::select! {
            _ = stopped.wait_for(|stop| *stop) => return,
            () = tokio::time::sleep(std::time::Duration::from_secs(3600)) => {}
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
