//! What a client connection may hold: a deadline for its first request (protocol detection
//! included), an idle deadline once it has been served, and a cap on open connections below
//! the open-file limit. At the cap, the oldest connection that has not yet sent a request makes
//! room for the new one, so idle sockets can never lock legitimate clients out, and a server
//! whose descriptors run out frees some the same way and keeps serving.

use std::{
    collections::BTreeMap,
    io,
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::Notify,
};

use crate::config::ConnectionsConfig;

/// Descriptors never handed to client connections when the cap is derived from the limit:
/// a quarter of the limit, and at least this many, for the database, files and new clients.
const MIN_RESERVE: u64 = 64;

/// Connections evicted at once when accepting fails for want of descriptors.
const EVICT_ON_EXHAUSTION: usize = 16;

/// Raises the soft open-file limit to the hard limit (many systems start services with a
/// soft limit of 1,024 whatever the hard limit allows) and returns the limit in force.
pub fn raise_open_file_limit() -> Option<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we pass and touches nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        tracing::warn!(err = %io::Error::last_os_error(), "cannot read the open-file limit");
        return None;
    }
    let before = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
        // SAFETY: setrlimit reads the struct we pass and touches nothing else.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit.rlim_cur = limit.rlim_max;
            tracing::info!(from = before, to = limit.rlim_cur, "raised the open-file limit");
        } else {
            let err = io::Error::last_os_error();
            tracing::warn!(%err, limit = before, "cannot raise the open-file limit");
        }
    } else {
        tracing::info!(limit = before, "open-file limit");
    }
    Some(limit.rlim_cur)
}

/// The connection cap for an open-file limit: the limit less a reserve.
pub fn derived_max(open_file_limit: u64) -> usize {
    let reserve = (open_file_limit / 4).max(MIN_RESERVE);
    usize::try_from(open_file_limit.saturating_sub(reserve).max(16)).unwrap_or(usize::MAX)
}

/// The connections of every listener: how many are open, and which still await their first
/// request (oldest first), to be evicted when room is needed.
pub struct Gate {
    max: usize,
    header_timeout: Duration,
    keep_alive: Duration,
    open: AtomicUsize,
    next_id: AtomicU64,
    waiting: Mutex<BTreeMap<u64, Arc<Notify>>>,
    /// When a refusal or exhaustion was last logged, in seconds since `epoch`.
    last_warning: AtomicU64,
    epoch: Instant,
}

impl Gate {
    /// The limits of `config`; `open_file_limit` sizes the cap when it is not configured.
    pub fn new(config: &ConnectionsConfig, open_file_limit: Option<u64>) -> Self {
        let max = match (config.max, open_file_limit) {
            (0, Some(limit)) => derived_max(limit),
            (0, None) => derived_max(1024),
            (max, _) => max,
        };
        tracing::info!(max, "connection cap");
        Self {
            max,
            header_timeout: Duration::from_secs(config.header_timeout_secs),
            keep_alive: Duration::from_secs(config.keep_alive_secs),
            open: AtomicUsize::new(0),
            next_id: AtomicU64::new(0),
            waiting: Mutex::new(BTreeMap::new()),
            last_warning: AtomicU64::new(u64::MAX),
            epoch: Instant::now(),
        }
    }

    /// How long a connection may be idle; on HTTP/1.1 also the deadline for each request
    /// head after the first, counted from the previous response.
    pub fn keep_alive(&self) -> Duration {
        self.keep_alive
    }

    /// Admits a new connection, evicting the oldest one still waiting for its first request
    /// when at the cap; `None` (and the socket is closed) when there is none to evict.
    pub fn admit(self: &Arc<Self>, stream: TcpStream) -> Option<Admitted> {
        if self.open.load(Ordering::Relaxed) >= self.max && self.evict(1) == 0 {
            self.warn("connection cap reached; refusing a connection");
            return None;
        }
        self.open.fetch_add(1, Ordering::Relaxed);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let evicted = Arc::new(Notify::new());
        self.lock_waiting().insert(id, evicted.clone());
        let activity = Arc::new(Activity {
            started: Instant::now(),
            last_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            served: AtomicBool::new(false),
        });
        let stream = Tracked { inner: stream, activity: activity.clone() };
        let guard = Watch { gate: self.clone(), id, activity, evicted };
        Some(Admitted { stream, guard })
    }

    /// Called when accepting fails: for want of descriptors, frees some by evicting
    /// connections that never sent a request.
    pub fn on_accept_error(&self, err: &io::Error) {
        let exhausted = matches!(err.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
        if exhausted {
            let evicted = self.evict(EVICT_ON_EXHAUSTION);
            self.warn(&format!("out of file descriptors; closed {evicted} idle connections"));
        } else {
            tracing::debug!(%err, "cannot accept a connection");
        }
    }

    fn lock_waiting(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<Notify>>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Evicts up to `count` of the oldest connections waiting for their first request.
    fn evict(&self, count: usize) -> usize {
        let mut waiting = self.lock_waiting();
        let mut evicted = 0;
        while evicted < count {
            let Some((_, notify)) = waiting.pop_first() else { break };
            notify.notify_one();
            evicted += 1;
        }
        evicted
    }

    /// Logs `message` at most once a second.
    fn warn(&self, message: &str) {
        let now = self.epoch.elapsed().as_secs();
        if self.last_warning.swap(now, Ordering::Relaxed) != now {
            tracing::warn!(open = self.open.load(Ordering::Relaxed), max = self.max, "{message}");
        }
    }
}

/// What is known of one connection's use.
struct Activity {
    started: Instant,
    /// When bytes last moved, in milliseconds since `started`.
    last_ms: AtomicU64,
    /// Requests whose response has not been produced yet.
    in_flight: AtomicUsize,
    /// Whether a request has arrived.
    served: AtomicBool,
}

impl Activity {
    fn touch(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.started + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// An admitted connection: its socket and the guard that watches it.
pub struct Admitted {
    /// The socket, noting when bytes move.
    pub stream: Tracked,
    /// Watches the connection's deadlines.
    pub guard: Watch,
}

/// Watches one connection: counts requests, and tells when it must close. Dropping it gives
/// the connection's place back.
pub struct Watch {
    gate: Arc<Gate>,
    id: u64,
    activity: Arc<Activity>,
    evicted: Arc<Notify>,
}

/// Marks one request in flight until dropped.
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Notes requests as they arrive on a connection; held by its service.
#[derive(Clone)]
pub struct Requests {
    gate: Arc<Gate>,
    id: u64,
    activity: Arc<Activity>,
}

impl Requests {
    /// A request arrived: the connection is no longer evictable, and is busy until the
    /// returned guard drops.
    pub fn start(&self) -> InFlight {
        if !self.activity.served.load(Ordering::Relaxed)
            && !self.activity.served.swap(true, Ordering::Relaxed)
        {
            self.gate.lock_waiting().remove(&self.id);
        }
        self.activity.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.activity.clone())
    }
}

impl Watch {
    /// The handle the connection's service notes requests with.
    pub fn requests(&self) -> Requests {
        Requests { gate: self.gate.clone(), id: self.id, activity: self.activity.clone() }
    }

    /// Resolves when the connection must close: evicted, no request before the header
    /// deadline, or idle (nothing in flight, no bytes moving) for the keep-alive time.
    pub async fn expired(&self) {
        let gate = &self.gate;
        let mut deadline = self.activity.started + gate.header_timeout;
        loop {
            tokio::select! {
                () = self.evicted.notified() => {
                    if !self.activity.served.load(Ordering::Relaxed) {
                        return;
                    }
                }
                () = tokio::time::sleep_until(deadline.into()) => {
                    if !self.activity.served.load(Ordering::Relaxed) {
                        return;
                    }
                    let now = Instant::now();
                    if self.activity.in_flight.load(Ordering::Relaxed) > 0 {
                        deadline = now + gate.keep_alive;
                        continue;
                    }
                    let idle_until = self.activity.last() + gate.keep_alive;
                    if idle_until <= now {
                        return;
                    }
                    deadline = idle_until;
                }
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if !self.activity.served.load(Ordering::Relaxed) {
            self.gate.lock_waiting().remove(&self.id);
        }
        self.gate.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A client socket that notes when bytes move, for the idle deadline.
pub struct Tracked {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_cap_keeps_a_reserve() {
        assert_eq!(derived_max(1024), 768);
        assert_eq!(derived_max(100), 36);
        assert_eq!(derived_max(10), 16);
    }
}
