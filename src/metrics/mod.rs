//! Prometheus metrics of either proxy: counters fed as things happen (tunnels by outcome,
//! throttled requests, failed logins, failovers, queue waits), and values read from the
//! proxies' own state when scraped (tunnels open, slots, queue length, bytes, per-user bytes,
//! each remote's health), rendered in Prometheus' text format by `prometheus-client`.
//!
//! One set per process ([`global`]): a process runs one proxy, and the counters are fed from
//! code far apart (net/, local/, remote/) that should not pass a handle around for them.
//! Live values come from [`Source`]s a proxy registers when it serves metrics; a source
//! holds only a weak reference, so a stopped proxy's values disappear with it.
//! Serving them over HTTP is `serve.rs`.

mod serve;

pub use serve::serve_beside;

use parking_lot::Mutex;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Labels of one series: `[("outcome", "ok")]`.
pub type Labels = Vec<(&'static str, String)>;

/// A value read at scrape time.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// The name without the `flowgate_` prefix (and, for counters, without `_total`).
    pub name: &'static str,
    /// What it means, for `# HELP`.
    pub help: &'static str,
    /// Counter (only goes up) or gauge.
    pub counter: bool,
    /// Its labels.
    pub labels: Labels,
    /// Its value.
    pub value: f64,
}

impl Sample {
    /// A counter value.
    pub fn counter(name: &'static str, help: &'static str, labels: Labels, value: f64) -> Sample {
        Sample {
            name,
            help,
            counter: true,
            labels,
            value,
        }
    }

    /// A gauge value.
    pub fn gauge(name: &'static str, help: &'static str, labels: Labels, value: f64) -> Sample {
        Sample {
            name,
            help,
            counter: false,
            labels,
            value,
        }
    }
}

/// What both proxies report about their server at each scrape: tunnels open, slots in use,
/// connections queued and parked (`load`, from [`crate::net::server::Load`]), and bytes
/// relayed (`bytes`: up, down).
pub fn server_samples(
    out: &mut Vec<Sample>,
    tunnels_open: usize,
    load: (usize, usize, usize),
    bytes: (u64, u64),
) {
    let gauge = |name, help, v: usize| Sample::gauge(name, help, vec![], v as f64);
    let (active, queued, parked) = load;
    out.push(gauge("tunnels_open", "Tunnels relaying now", tunnels_open));
    out.push(gauge(
        "slots_in_use",
        "Connection slots taken (handshakes and tunnels)",
        active,
    ));
    out.push(gauge(
        "queue_length",
        "Connections waiting for a slot",
        queued,
    ));
    out.push(gauge(
        "parked_connections",
        "Idle connections parked, holding no slot (warm ones among them)",
        parked,
    ));
    for (dir, v) in [("up", bytes.0), ("down", bytes.1)] {
        out.push(Sample::counter(
            "bytes",
            "Bytes relayed, app to target (up) and back (down)",
            vec![("direction", dir.to_string())],
            v as f64,
        ));
    }
}

/// Something that adds live values at each scrape; false when it is gone for good.
pub type Source = Box<dyn Fn(&mut Vec<Sample>) -> bool + Send + Sync>;

/// The counters and histograms fed as things happen.
#[derive(Debug)]
pub struct Metrics {
    /// Tunnel requests answered, by outcome ([`outcome`]).
    pub tunnels: Family<Labels, Counter>,
    /// How long accepted connections waited for a slot.
    pub queue_wait: Histogram,
    /// Requests refused by a throttle, by limit.
    pub throttled: Family<Labels, Counter>,
    /// Logins refused for a wrong password or unknown user.
    pub failed_logins: Counter,
    /// Tunnels local-proxy moved to another remote after the first failed.
    pub failovers: Counter,
    /// Tunnels opened, per remote (local-proxy).
    pub remote_tunnels: Family<Labels, Counter>,
    /// Health probe round trips, per remote (local-proxy).
    pub probe_seconds: Family<Labels, Histogram>,
    sources: Arc<Sources>,
    registry: Registry,
    // The series of `tunnels` and `throttled` by label value, looked up once: a tunnel
    // then costs a read lock and an atomic add, no allocation.
    outcome_series: parking_lot::RwLock<std::collections::HashMap<&'static str, Counter>>,
    throttle_series: parking_lot::RwLock<std::collections::HashMap<&'static str, Counter>>,
}

/// The registered sources.
struct Sources(Mutex<Vec<Source>>);

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} sources", self.0.lock().len())
    }
}

/// Reads the sources at scrape time.
#[derive(Debug)]
struct Live(Arc<Sources>);

impl Collector for Live {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut samples = Vec::new();
        self.0 .0.lock().retain(|source| source(&mut samples));
        // Each name once, with all its series under it, in a stable order.
        samples.sort_by(|a, b| a.name.cmp(b.name));
        for group in samples.chunk_by(|a, b| a.name == b.name) {
            let first = &group[0];
            let kind = if first.counter {
                MetricType::Counter
            } else {
                MetricType::Gauge
            };
            let mut metric = encoder.encode_descriptor(first.name, first.help, None, kind)?;
            for s in group {
                let series = metric.encode_family(&s.labels)?;
                if first.counter {
                    ConstCounter::new(s.value.max(0.0)).encode(series)?;
                } else {
                    ConstGauge::new(s.value).encode(series)?;
                }
            }
        }
        Ok(())
    }
}

fn queue_buckets() -> impl Iterator<Item = f64> {
    [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0].into_iter()
}

fn probe_buckets() -> impl Iterator<Item = f64> {
    [0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0].into_iter()
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("flowgate");
        let tunnels = Family::<Labels, Counter>::default();
        let queue_wait = Histogram::new(queue_buckets());
        let throttled = Family::<Labels, Counter>::default();
        let failed_logins = Counter::default();
        let failovers = Counter::default();
        let remote_tunnels = Family::<Labels, Counter>::default();
        let probe_seconds =
            Family::<Labels, Histogram>::new_with_constructor(|| Histogram::new(probe_buckets()));
        registry.register(
            "tunnels",
            "Tunnel requests answered, by outcome",
            tunnels.clone(),
        );
        registry.register(
            "queue_wait_seconds",
            "Time accepted connections waited for a slot",
            queue_wait.clone(),
        );
        registry.register(
            "throttled",
            "Requests refused by a throttle, by limit",
            throttled.clone(),
        );
        registry.register(
            "failed_logins",
            "Logins refused for a wrong password or an unknown user",
            failed_logins.clone(),
        );
        registry.register(
            "failovers",
            "Tunnels sent to another remote after the first choice failed",
            failovers.clone(),
        );
        registry.register(
            "remote_tunnels",
            "Tunnels opened through each remote",
            remote_tunnels.clone(),
        );
        registry.register(
            "remote_probe_seconds",
            "Health probe round-trip time, per remote",
            probe_seconds.clone(),
        );
        let sources = Arc::new(Sources(Mutex::new(Vec::new())));
        registry.register_collector(Box::new(Live(Arc::clone(&sources))));
        Metrics {
            tunnels,
            queue_wait,
            throttled,
            failed_logins,
            failovers,
            remote_tunnels,
            probe_seconds,
            sources,
            registry,
            outcome_series: Default::default(),
            throttle_series: Default::default(),
        }
    }

    /// Counts a tunnel request's outcome.
    pub fn tunnel(&self, outcome: &'static str) {
        series(&self.outcome_series, &self.tunnels, "outcome", outcome).inc();
    }

    /// Counts a request refused by the throttle `limit`.
    pub fn throttle(&self, limit: &'static str) {
        series(&self.throttle_series, &self.throttled, "limit", limit).inc();
    }

    /// Records how long a connection waited for its slot.
    pub fn queued(&self, waited: Duration) {
        self.queue_wait.observe(waited.as_secs_f64());
    }

    /// Adds a source of live values, read at every scrape until it returns false.
    pub fn add_source(&self, source: Source) {
        self.sources.0.lock().push(source);
    }

    /// Everything, in Prometheus' text format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail; a failed encode leaves what was written.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

/// The counter of `family` labelled `key=value`, from `cache` after the first time.
fn series(
    cache: &parking_lot::RwLock<std::collections::HashMap<&'static str, Counter>>,
    family: &Family<Labels, Counter>,
    key: &'static str,
    value: &'static str,
) -> Counter {
    if let Some(c) = cache.read().get(value) {
        return c.clone();
    }
    let c = family
        .get_or_create(&vec![(key, value.to_string())])
        .clone();
    cache.write().insert(value, c.clone());
    c
}

/// This process's metrics.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// The `outcome` label of a tunnel request answered with `status`.
pub fn outcome(status: crate::proto::tunnel::Status) -> &'static str {
    use crate::proto::tunnel::Status::*;
    match status {
        Ok => "ok",
        BadCredentials => "bad_credentials",
        NotAllowed => "not_allowed",
        RateLimited | TooManyFailedLogins => "throttled",
        ServerBusy | Draining => "busy",
        Unavailable => "db_unavailable",
        QuotaExceeded => "quota",
        TargetRefused | HostUnreachable | NetworkUnreachable | NameNotResolved | TimedOut => {
            "target_error"
        }
        Malformed | UnsupportedVersion | TlsRequired => "bad_request",
        SignupDisabled | UserExists | InviteRequired | GeneralFailure => "error",
    }
}

/// Per-user series for the `limit` most active users (by bytes), the rest summed as `other`:
/// user names as labels grow without bound, which Prometheus' own guidance warns about.
pub fn top_users(mut users: Vec<(String, u64, u64)>, limit: usize) -> Vec<(String, u64, u64)> {
    users.sort_by(|a, b| (b.1 + b.2).cmp(&(a.1 + a.2)).then(a.0.cmp(&b.0)));
    if users.len() <= limit {
        return users;
    }
    let rest = users.split_off(limit);
    let (up, down) = rest.iter().fold((0u64, 0u64), |(u, d), r| {
        (u.saturating_add(r.1), d.saturating_add(r.2))
    });
    users.push(("other".to_string(), up, down));
    users
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_values_and_counters_render_in_the_text_format() {
        let m = Metrics::new();
        m.tunnel("ok");
        m.tunnel("ok");
        m.tunnel("quota");
        m.queued(Duration::from_millis(3));
        m.add_source(Box::new(|out: &mut Vec<Sample>| {
            out.push(Sample::gauge(
                "tunnels_open",
                "Tunnels relaying now",
                vec![],
                3.0,
            ));
            out.push(Sample::counter(
                "bytes",
                "Bytes relayed",
                vec![("direction", "up".into())],
                10.0,
            ));
            out.push(Sample::counter(
                "bytes",
                "Bytes relayed",
                vec![("direction", "down".into())],
                20.0,
            ));
            true
        }));
        let text = m.render();
        assert!(
            text.contains("flowgate_tunnels_total{outcome=\"ok\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("flowgate_tunnels_total{outcome=\"quota\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE flowgate_tunnels_open gauge"),
            "{text}"
        );
        assert!(text.contains("flowgate_tunnels_open 3"), "{text}");
        assert!(
            text.contains("flowgate_bytes_total{direction=\"down\"} 20"),
            "{text}"
        );
        assert_eq!(
            text.matches("# TYPE flowgate_bytes_total counter").count(),
            1
        );
        assert!(
            text.contains("flowgate_queue_wait_seconds_bucket{le=\"0.005\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn a_gone_source_stops_reporting() {
        let m = Metrics::new();
        m.add_source(Box::new(|_: &mut Vec<Sample>| false));
        m.render();
        assert!(m.sources.0.lock().is_empty());
    }

    #[test]
    fn only_the_most_active_users_get_their_own_series() {
        let users = vec![
            ("a".to_string(), 1, 1),
            ("b".to_string(), 100, 0),
            ("c".to_string(), 0, 50),
            ("d".to_string(), 5, 5),
        ];
        let top = top_users(users, 2);
        assert_eq!(
            top,
            vec![
                ("b".to_string(), 100, 0),
                ("c".to_string(), 0, 50),
                ("other".to_string(), 6, 6)
            ]
        );
        assert_eq!(top_users(vec![("a".into(), 1, 1)], 2).len(), 1);
    }
}
