//! What a client connection may hold: a deadline for its first request (protocol detection
//! included), an idle deadline once it has been served, and a cap on open connections below
//! the open-file limit. Idleness is measured from requests, not bytes (HTTP/2 pings move bytes
//! on an idle connection): a connection is busy while a request is handled or its response
//! body is sent, and a response body that stops moving for the keep-alive time ends it. At the
//! cap, the oldest connection that has not yet sent a request makes room for the new one, or
//! else the longest-idle served one, so idle sockets can never lock legitimate clients out,
//! and a server whose descriptors run out frees some the same way and keeps serving.

use std::{
    collections::{BTreeMap, HashMap},
    io,
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::{net::TcpStream, sync::Notify};

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
    /// Connections that have been served, evicted (longest idle first) only when none waits.
    served: Mutex<HashMap<u64, Served>>,
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
            (max, Some(limit)) => {
                if u64::try_from(max).unwrap_or(u64::MAX) > limit {
                    tracing::warn!(
                        max,
                        limit,
                        "limits.connections.max exceeds the open-file limit; connections past \
                         the limit cannot be accepted, and the database may run out of files"
                    );
                }
                max
            }
            (max, None) => max,
        };
        tracing::info!(max, "connection cap");
        Self {
            max,
            header_timeout: Duration::from_secs(config.header_timeout_secs),
            keep_alive: Duration::from_secs(config.keep_alive_secs),
            open: AtomicUsize::new(0),
            next_id: AtomicU64::new(0),
            waiting: Mutex::new(BTreeMap::new()),
            served: Mutex::new(HashMap::new()),
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
    /// (or else the longest-idle served one) when at the cap; `None` (and the socket is
    /// closed) when there is none to evict.
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
            sent_ms: AtomicU64::new(0),
            handling: AtomicUsize::new(0),
            sending: AtomicUsize::new(0),
            served: AtomicBool::new(false),
        });
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

    fn lock_served(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Served>> {
        self.served.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Evicts up to `count` connections: the oldest waiting for their first request, then
    /// the longest-idle served ones with nothing in progress.
    fn evict(&self, count: usize) -> usize {
        let mut evicted = 0;
        {
            let mut waiting = self.lock_waiting();
            while evicted < count {
                let Some((_, notify)) = waiting.pop_first() else { break };
                notify.notify_one();
                evicted += 1;
            }
        }
        if evicted < count {
            let mut served = self.lock_served();
            let mut idle: Vec<(Instant, u64)> = served
                .iter()
                .filter(|(_, (activity, _))| activity.is_idle())
                .map(|(id, (activity, _))| (activity.last(), *id))
                .collect();
            // Only the `need` longest idle matter: no full sort under the lock.
            let need = count - evicted;
            if idle.len() > need {
                idle.select_nth_unstable(need);
                idle.truncate(need);
            }
            for (_, id) in idle {
                if let Some((_, notify)) = served.remove(&id) {
                    notify.notify_one();
                    evicted += 1;
                }
            }
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

/// A served connection as the gate knows it: its use, and how to evict it.
type Served = (Arc<Activity>, Arc<Notify>);

/// What is known of one connection's use.
struct Activity {
    started: Instant,
    /// When a request last finished (or arrived), in milliseconds since `started`.
    last_ms: AtomicU64,
    /// When a response body last produced bytes, in milliseconds since `started`.
    sent_ms: AtomicU64,
    /// Requests whose response has not been produced yet.
    handling: AtomicUsize,
    /// Responses whose body is being sent.
    sending: AtomicUsize,
    /// Whether a request has arrived.
    served: AtomicBool,
}

impl Activity {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn touch(&self) {
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    fn sent(&self) {
        self.sent_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.started + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    fn last_sent(&self) -> Instant {
        self.started + Duration::from_millis(self.sent_ms.load(Ordering::Relaxed))
    }

    /// Nothing in progress: no request handled, no response body being sent.
    fn is_idle(&self) -> bool {
        // Acquire pairs with the release that ends handling: a response whose sending began
        // before its handling ended is seen as sending.
        self.handling.load(Ordering::Acquire) == 0 && self.sending.load(Ordering::Relaxed) == 0
    }
}

/// An admitted connection: its socket and the guard that watches it.
pub struct Admitted {
    /// The socket.
    pub stream: TcpStream,
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

/// Marks one request as being handled until its response is produced (see
/// [`InFlight::sending`]) or it is dropped.
pub struct InFlight(Arc<Activity>);

impl InFlight {
    /// The response is produced: the request stays in progress while its body is sent,
    /// until the returned guard drops (the body finished or was dropped).
    pub fn sending(self) -> Sending {
        let activity = self.0.clone();
        activity.sent();
        activity.sending.fetch_add(1, Ordering::Relaxed);
        drop(self);
        Sending(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.handling.fetch_sub(1, Ordering::Release);
    }
}

/// Marks one response body as being sent until dropped.
pub struct Sending(Arc<Activity>);

impl Sending {
    /// The body produced bytes.
    pub fn progressed(&self) {
        self.0.sent();
    }
}

impl Drop for Sending {
    fn drop(&mut self) {
        self.0.touch();
        self.0.sending.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Largest piece of a response body handed to the connection at once. The connection asks for
/// the next piece only as its write buffer drains, so progress follows the bytes that reach
/// the client, and a body built as one large frame is not taken as sent the moment it is made.
const SEND_PIECE: usize = 64 * 1024;

/// A response body whose sending keeps its connection busy: it is handed over in pieces of at
/// most [`SEND_PIECE`] bytes, each counted as progress, and the connection is busy until the
/// body ends or is dropped.
pub struct SentBody<B> {
    body: B,
    rest: Bytes,
    sending: Sending,
}

impl<B> SentBody<B> {
    /// `body`, sent under `sending`.
    pub fn new(body: B, sending: Sending) -> Self {
        Self { body, rest: Bytes::new(), sending }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for SentBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        if this.rest.is_empty() {
            match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => this.rest = data,
                    Err(trailers) => {
                        this.sending.progressed();
                        return Poll::Ready(Some(Ok(trailers)));
                    }
                },
                ended => return Poll::Ready(ended),
            }
        }
        let piece = this.rest.split_to(this.rest.len().min(SEND_PIECE));
        this.sending.progressed();
        Poll::Ready(Some(Ok(Frame::data(piece))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.body.size_hint();
        let rest = self.rest.len() as u64;
        let mut hint = SizeHint::new();
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + rest);
        }
        hint.set_lower(inner.lower() + rest);
        hint
    }
}

/// Notes requests as they arrive on a connection; held by its service.
#[derive(Clone)]
pub struct Requests {
    gate: Arc<Gate>,
    id: u64,
    activity: Arc<Activity>,
    evicted: Arc<Notify>,
}

impl Requests {
    /// A request arrived: the connection is no longer evictable, and is busy until the
    /// returned guard drops.
    pub fn start(&self) -> InFlight {
        self.activity.handling.fetch_add(1, Ordering::Relaxed);
        if !self.activity.served.load(Ordering::Relaxed)
            && !self.activity.served.swap(true, Ordering::Relaxed)
        {
            self.gate.lock_waiting().remove(&self.id);
            let entry = (self.activity.clone(), self.evicted.clone());
            self.gate.lock_served().insert(self.id, entry);
        }
        self.activity.touch();
        InFlight(self.activity.clone())
    }
}

impl Watch {
    /// The handle the connection's service notes requests with.
    pub fn requests(&self) -> Requests {
        Requests {
            gate: self.gate.clone(),
            id: self.id,
            activity: self.activity.clone(),
            evicted: self.evicted.clone(),
        }
    }

    /// Resolves when the connection must close: evicted while nothing is in progress, no
    /// request before the header deadline, a response body that sent nothing for the
    /// keep-alive time, or idle (no request handled, no body sent) for the keep-alive time.
    pub async fn expired(&self) {
        let gate = &self.gate;
        let activity = &self.activity;
        let mut deadline = activity.started + gate.header_timeout;
        loop {
            tokio::select! {
                () = self.evicted.notified() => {
                    if !activity.served.load(Ordering::Relaxed) || activity.is_idle() {
                        return;
                    }
                    // Busy again since it was picked: it may be evicted once idle.
                    let entry = (activity.clone(), self.evicted.clone());
                    gate.lock_served().insert(self.id, entry);
                }
                () = tokio::time::sleep_until(deadline.into()) => {
                    if !activity.served.load(Ordering::Relaxed) {
                        return;
                    }
                    let now = Instant::now();
                    let until = if activity.handling.load(Ordering::Relaxed) > 0 {
                        // A handler runs (a long poll ends on its own timeout).
                        now + gate.keep_alive
                    } else if activity.sending.load(Ordering::Relaxed) > 0 {
                        activity.last_sent() + gate.keep_alive
                    } else {
                        activity.last() + gate.keep_alive
                    };
                    if until <= now {
                        return;
                    }
                    deadline = until;
                }
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if self.activity.served.load(Ordering::Relaxed) {
            self.gate.lock_served().remove(&self.id);
        } else {
            self.gate.lock_waiting().remove(&self.id);
        }
        self.gate.open.fetch_sub(1, Ordering::Relaxed);
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

    /// A fresh loopback socket.
    async fn socket(listener: &tokio::net::TcpListener) -> TcpStream {
        TcpStream::connect(listener.local_addr().unwrap()).await.unwrap()
    }

    #[tokio::test]
    async fn a_body_made_as_one_frame_is_sent_in_pieces_and_busy_until_done() {
        use http_body_util::BodyExt;
        let gate = Arc::new(Gate::new(&ConnectionsConfig::default(), None));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admitted = gate.admit(socket(&listener).await).unwrap();
        let activity = admitted.guard.requests().activity;
        let whole = Bytes::from(vec![7u8; 5 * SEND_PIECE + 3]);
        let sending = admitted.guard.requests().start().sending();
        let mut body = SentBody::new(http_body_util::Full::new(whole.clone()), sending);
        assert_eq!(body.size_hint().exact(), Some(whole.len() as u64));

        let mut sent = Vec::new();
        while let Some(frame) = body.frame().await {
            let piece = frame.unwrap().into_data().unwrap();
            assert!(piece.len() <= SEND_PIECE);
            sent.extend_from_slice(&piece);
            // Until the body has been handed over whole, the connection is busy.
            assert!(!activity.is_idle());
        }
        assert_eq!(sent, whole);
        assert!(body.is_end_stream());
        drop(body);
        assert!(activity.is_idle());
    }

    #[tokio::test]
    async fn at_the_cap_the_longest_idle_served_connection_makes_room() {
        let config = ConnectionsConfig { max: 2, ..ConnectionsConfig::default() };
        let gate = Arc::new(Gate::new(&config, None));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let short = Duration::from_millis(100);

        // `idle` was served and is done; `busy` is handling a request.
        let idle = gate.admit(socket(&listener).await).unwrap();
        drop(idle.guard.requests().start());
        let busy = gate.admit(socket(&listener).await).unwrap();
        let handling = busy.guard.requests().start();

        let fresh = gate.admit(socket(&listener).await).expect("room is made");
        tokio::time::timeout(short, idle.guard.expired()).await.expect("the idle one is evicted");
        drop(idle);
        assert!(tokio::time::timeout(short, busy.guard.expired()).await.is_err());

        // Next, the one that never sent a request goes first.
        let newest = gate.admit(socket(&listener).await).expect("room is made");
        tokio::time::timeout(short, fresh.guard.expired()).await.expect("the unserved one goes");
        drop(fresh);

        // Only a busy connection and an unserved one are left: the unserved one makes room,
        // then nothing can.
        let last = gate.admit(socket(&listener).await).expect("room is made");
        tokio::time::timeout(short, newest.guard.expired()).await.expect("evicted");
        drop(newest);
        let _also_handling = last.guard.requests().start();
        let sending = handling.sending();
        assert!(gate.admit(socket(&listener).await).is_none(), "nothing idle to evict");
        drop(sending);
        assert!(gate.admit(socket(&listener).await).is_some(), "its response is sent");
    }
}
