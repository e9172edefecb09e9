//! Operational metrics in the Prometheus text format, served on their own listener: requests
//! by route and status, latency histograms, events persisted, syncs waiting, push queue,
//! database sizes and bytes written, and process memory. Counting is a few atomic adds and one short lock per
//! request; the text is only built when scraped.

use std::{
    collections::HashMap,
    fmt::Write as _,
    sync::{
        Mutex,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::http::Method;

use super::Services;

/// Upper bounds of the latency histogram buckets, in seconds.
const BUCKETS: [f64; 13] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 30.0];
/// The route label of requests no route matched.
pub const UNMATCHED: &str = "unmatched";

/// What one route and method has seen.
#[derive(Default)]
struct RouteStats {
    statuses: Vec<(u16, u64)>,
    /// Per bucket (and a last one for slower), the requests that fell in it.
    buckets: [u64; BUCKETS.len() + 1],
    seconds: f64,
    count: u64,
}

/// Route template -> what each method of it has seen.
type Routes = HashMap<Box<str>, Vec<(Method, RouteStats)>>;

/// The server's counters.
#[derive(Default)]
pub struct Metrics {
    routes: Mutex<Routes>,
    events: AtomicU64,
    syncs: AtomicI64,
}

/// Holds one waiting `/sync` in the gauge until dropped (answered or abandoned).
pub struct SyncGuard<'a>(&'a Metrics);

impl Drop for SyncGuard<'_> {
    fn drop(&mut self) {
        self.0.syncs.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    /// Counts one answered request to `route` (a route template, or [`UNMATCHED`]). Methods
    /// outside the standard ones count as `OTHER`, so clients cannot add labels at will.
    pub fn request(&self, method: &Method, route: &str, status: u16, took: Duration) {
        let standard = [
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::DELETE,
            Method::HEAD,
            Method::OPTIONS,
            Method::PATCH,
        ];
        let other;
        let method = if standard.contains(method) {
            method
        } else {
            other = Method::from_bytes(b"OTHER").expect("a valid method name");
            &other
        };
        let seconds = took.as_secs_f64();
        let bucket = BUCKETS.iter().position(|b| seconds <= *b).unwrap_or(BUCKETS.len());
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        let methods = match routes.get_mut(route) {
            Some(methods) => methods,
            None => routes.entry(route.into()).or_default(),
        };
        let stats = match methods.iter().position(|(m, _)| m == method) {
            Some(i) => &mut methods[i].1,
            None => {
                methods.push((method.clone(), RouteStats::default()));
                &mut methods.last_mut().expect("just pushed").1
            }
        };
        match stats.statuses.iter_mut().find(|(s, _)| *s == status) {
            Some((_, count)) => *count += 1,
            None => stats.statuses.push((status, 1)),
        }
        stats.buckets[bucket] += 1;
        stats.seconds += seconds;
        stats.count += 1;
    }

    /// Counts one persisted event.
    pub fn event_persisted(&self) {
        self.events.fetch_add(1, Ordering::Relaxed);
    }

    /// Marks a `/sync` as waiting until the guard drops.
    pub fn sync_started(&self) -> SyncGuard<'_> {
        self.syncs.fetch_add(1, Ordering::Relaxed);
        SyncGuard(self)
    }

    /// Every metric, in the Prometheus text exposition format.
    pub fn render(&self, services: &Services) -> String {
        let mut out = String::with_capacity(64 * 1024);
        self.render_requests(&mut out);
        family(&mut out, "plaza_events_persisted_total", "counter", "Events persisted.");
        let _ =
            writeln!(out, "plaza_events_persisted_total {}", self.events.load(Ordering::Relaxed));
        family(&mut out, "plaza_syncs_waiting", "gauge", "Requests to /sync in progress.");
        let _ = writeln!(out, "plaza_syncs_waiting {}", self.syncs.load(Ordering::Relaxed).max(0));
        family(&mut out, "plaza_push_queue_length", "gauge", "Pushes waiting for their gateway.");
        let _ = writeln!(out, "plaza_push_queue_length {}", services.gateway.queued());
        render_storage(&mut out, services);
        render_process(&mut out);
        services.federation.render_metrics(&mut out);
        services.federation_sender.render_metrics(&mut out);
        out
    }

    fn render_requests(&self, out: &mut String) {
        let routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        let mut sorted: Vec<_> = routes.iter().collect();
        sorted.sort_unstable_by(|a, b| a.0.cmp(b.0));
        family(out, "plaza_http_requests_total", "counter", "HTTP requests answered.");
        for (route, methods) in &sorted {
            for (method, stats) in methods.iter() {
                let mut statuses = stats.statuses.clone();
                statuses.sort_unstable();
                for (status, count) in statuses {
                    let _ = writeln!(
                        out,
                        "plaza_http_requests_total{{method=\"{method}\",route=\"{}\",status=\"{status}\"}} {count}",
                        escape(route)
                    );
                }
            }
        }
        let name = "plaza_http_request_duration_seconds";
        family(out, name, "histogram", "Time to answer HTTP requests.");
        for (route, methods) in &sorted {
            let route = escape(route);
            for (method, stats) in methods.iter() {
                let labels = format!("method=\"{method}\",route=\"{route}\"");
                let mut cumulative = 0;
                for (bound, count) in BUCKETS.iter().zip(&stats.buckets) {
                    cumulative += count;
                    let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
                }
                let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", stats.count);
                let _ = writeln!(out, "{name}_sum{{{labels}}} {}", stats.seconds);
                let _ = writeln!(out, "{name}_count{{{labels}}} {}", stats.count);
            }
        }
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A label value as the text format wants it.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn render_storage(out: &mut String, services: &Services) {
    let sizes = services.db.table_sizes();
    family(out, "plaza_db_table_disk_bytes", "gauge", "Bytes of a table's files on disk.");
    for (table, disk, _) in &sizes {
        let _ = writeln!(out, "plaza_db_table_disk_bytes{{table=\"{table}\"}} {disk}");
    }
    family(out, "plaza_db_table_memory_bytes", "gauge", "Bytes of a table's write buffers.");
    for (table, _, memory) in &sizes {
        let _ = writeln!(out, "plaza_db_table_memory_bytes{{table=\"{table}\"}} {memory}");
    }
    let name = "plaza_db_bytes_written_total";
    family(out, name, "counter", "Bytes of write batches handed to the database.");
    let _ = writeln!(out, "{name} {}", services.db.bytes_written());
    let memory = services.db.memory();
    let name = "plaza_db_memory_bytes";
    family(out, name, "gauge", "Bytes the storage engine holds in memory, by kind.");
    for (kind, bytes) in [
        ("write_buffers", memory.write_buffers),
        ("block_cache", memory.block_cache),
        ("table_readers", memory.table_readers),
    ] {
        let _ = writeln!(out, "{name}{{kind=\"{kind}\"}} {bytes}");
    }
}

fn render_process(out: &mut String) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |field: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(field))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
            .map(|n| n * 1024)
    };
    if let Some(rss) = kib("VmRSS:") {
        family(out, "process_resident_memory_bytes", "gauge", "Resident memory size in bytes.");
        let _ = writeln!(out, "process_resident_memory_bytes {rss}");
    }
    if let Some(virt) = kib("VmSize:") {
        family(out, "process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.");
        let _ = writeln!(out, "process_virtual_memory_bytes {virt}");
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        family(out, "process_open_fds", "gauge", "Open file descriptors.");
        let _ = writeln!(out, "process_open_fds {}", fds.count());
    }
}
