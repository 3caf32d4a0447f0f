//! The appliance's metrics, with `prometheus-client` (the Prometheus project's Rust client),
//! encoded in the OpenMetrics text format that Prometheus scrapes. Every family is documented in
//! `docs/METRICS.md`; a test checks that the two name the same metrics.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::{FederationView, StatusReport};

type Labels = Vec<(String, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;

/// The registry and a handle on every metric in it.
pub struct Metrics {
    registry: Registry,
    info: Family<Labels, Gauge>,
    round: Gauge,
    rounds_planned: Gauge,
    rounds: Counter,
    model_version: Gauge,
    loss: FloatGauge,
    dice_score: FloatGauge,
    dice: Family<Labels, FloatGauge>,
    bytes_sent: Counter,
    bytes_received: Counter,
    refused: Family<Labels, Counter>,
    members: Gauge,
    member_last_seen: Family<Labels, FloatGauge>,
    pub(super) inference_queue: Gauge,
    pub(super) inference_latency: Histogram,
    outbox_pending: Gauge,
    outbox_dead: Gauge,
    temperature: Family<Labels, FloatGauge>,
    disk_free: Family<Labels, Gauge>,
    disk_total: Family<Labels, Gauge>,
    memory_available: Gauge,
    uptime: Gauge,
}

fn label(k: &str, v: &str) -> Labels {
    vec![(k.to_string(), v.to_string())]
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric registered under the `cosilo_` prefix.
    pub fn new() -> Metrics {
        let mut r = Registry::with_prefix("cosilo");
        let m = Metrics {
            info: Family::default(),
            round: Gauge::default(),
            rounds_planned: Gauge::default(),
            rounds: Counter::default(),
            model_version: Gauge::default(),
            loss: FloatGauge::default(),
            dice_score: FloatGauge::default(),
            dice: Family::default(),
            bytes_sent: Counter::default(),
            bytes_received: Counter::default(),
            refused: Family::default(),
            members: Gauge::default(),
            member_last_seen: Family::default(),
            inference_queue: Gauge::default(),
            // 50 ms .. ~7 min: a study's segmentation on a CPU box takes seconds to minutes.
            inference_latency: Histogram::new(exponential_buckets(0.05, 2.0, 14)),
            outbox_pending: Gauge::default(),
            outbox_dead: Gauge::default(),
            temperature: Family::default(),
            disk_free: Family::default(),
            disk_total: Family::default(),
            memory_available: Gauge::default(),
            uptime: Gauge::default(),
            registry: Registry::default(),
        };
        r.register(
            "site_info",
            "This appliance: site, federation, strategy and version as labels (value 1)",
            m.info.clone(),
        );
        r.register(
            "round",
            "Federation rounds completed by this site in the current run",
            m.round.clone(),
        );
        r.register(
            "rounds_planned",
            "Federation rounds the site configuration asks for",
            m.rounds_planned.clone(),
        );
        r.register(
            "rounds_completed",
            "Rounds completed since this process started",
            m.rounds.clone(),
        );
        r.register(
            "model_version",
            "Version of this site's current model (the strategy's counter)",
            m.model_version.clone(),
        );
        r.register(
            "training_loss",
            "Training loss of the last completed round",
            m.loss.clone(),
        );
        r.register(
            "dice_score",
            "Mean held-out Dice of the scored classes at the last evaluation",
            m.dice_score.clone(),
        );
        r.register(
            "dice",
            "Mean held-out Dice per class at the last evaluation",
            m.dice.clone(),
        );
        r.register(
            "federation_sent_bytes",
            "Bytes of signed federation messages published",
            m.bytes_sent.clone(),
        );
        r.register(
            "federation_received_bytes",
            "Bytes of federation messages received (refused ones included)",
            m.bytes_received.clone(),
        );
        r.register(
            "federation_refused_messages",
            "Federation messages refused, by reason",
            m.refused.clone(),
        );
        r.register(
            "federation_members",
            "Sites in the federation's roster (this one included)",
            m.members.clone(),
        );
        r.register(
            "federation_member_last_seen_seconds",
            "Seconds since each peer's last presence message",
            m.member_last_seen.clone(),
        );
        r.register(
            "inference_queue_depth",
            "Clinical inference jobs queued or running",
            m.inference_queue.clone(),
        );
        r.register(
            "inference_latency_seconds",
            "Clinical inference time per study, last instance received to result queued",
            m.inference_latency.clone(),
        );
        r.register(
            "outbox_pending",
            "Write-back results waiting in the bridge's outbox",
            m.outbox_pending.clone(),
        );
        r.register(
            "outbox_dead",
            "Write-back results given up after their last attempt",
            m.outbox_dead.clone(),
        );
        r.register(
            "temperature_celsius",
            "Thermal zone temperatures",
            m.temperature.clone(),
        );
        r.register(
            "disk_free_bytes",
            "Free bytes (for the service user) on the store's filesystem",
            m.disk_free.clone(),
        );
        r.register(
            "disk_total_bytes",
            "Size of the store's filesystem",
            m.disk_total.clone(),
        );
        r.register(
            "memory_available_bytes",
            "Memory available to new work (MemAvailable)",
            m.memory_available.clone(),
        );
        r.register(
            "uptime_seconds",
            "Seconds since this process started",
            m.uptime.clone(),
        );
        Metrics { registry: r, ..m }
    }

    /// Advances the counters by what changed from `old` to `new` and sets the gauges.
    pub(super) fn federation(&self, old: &FederationView, new: &FederationView) {
        self.info.clear();
        self.info
            .get_or_create(&vec![
                ("site".to_string(), new.site.clone()),
                ("federation".to_string(), new.federation.clone()),
                ("strategy".to_string(), new.strategy.clone()),
                ("version".to_string(), env!("CARGO_PKG_VERSION").to_string()),
            ])
            .set(1);
        self.round.set(new.round as i64);
        self.rounds_planned.set(new.rounds_planned as i64);
        self.model_version.set(new.model_version as i64);
        if old.site == new.site {
            self.rounds.inc_by(new.round.saturating_sub(old.round));
            self.bytes_sent
                .inc_by(new.bytes_sent.saturating_sub(old.bytes_sent));
            self.bytes_received
                .inc_by(new.bytes_received.saturating_sub(old.bytes_received));
            for (reason, n) in &new.refused {
                let before = old.refused.get(reason).copied().unwrap_or(0);
                self.refused
                    .get_or_create(&label("reason", reason))
                    .inc_by(n.saturating_sub(before));
            }
        } else {
            // The first view: totals since this process started (a resumed run starts at 0).
            self.bytes_sent.inc_by(new.bytes_sent);
            self.bytes_received.inc_by(new.bytes_received);
            for (reason, n) in &new.refused {
                self.refused
                    .get_or_create(&label("reason", reason))
                    .inc_by(*n);
            }
        }
        if let Some(l) = new.last_loss {
            self.loss.set(l);
        }
        if let Some(p) = new.dice.last() {
            self.dice_score.set(p.score);
        }
        for (class, d) in &new.dice_by_class {
            self.dice.get_or_create(&label("class", class)).set(*d);
        }
        self.members.set(new.members.len() as i64);
        for m in new.members.iter().filter(|m| !m.me) {
            if let Some(s) = m.last_seen_s {
                self.member_last_seen
                    .get_or_create(&label("member", &m.id))
                    .set(s);
            }
        }
    }

    /// The machine's gauges from a fresh report.
    pub(super) fn machine(&self, r: &StatusReport) {
        self.uptime.set(r.uptime_s as i64);
        for t in &r.temperatures {
            self.temperature
                .get_or_create(&label("zone", &t.zone))
                .set(t.celsius);
        }
        if let Some(d) = &r.disk {
            self.disk_free
                .get_or_create(&label("path", &d.path))
                .set(d.free_bytes as i64);
            self.disk_total
                .get_or_create(&label("path", &d.path))
                .set(d.total_bytes as i64);
        }
        if let Some(m) = r.memory_available_bytes {
            self.memory_available.set(m as i64);
        }
        if let Some(p) = r.outbox_pending {
            self.outbox_pending.set(p as i64);
        }
        if let Some(d) = r.outbox_dead {
            self.outbox_dead.set(d as i64);
        }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{board, fake_sysroot};
    use super::super::{DicePoint, FederationView, Member};
    use std::collections::BTreeMap;

    fn view(round: u64, sent: u64, refused: u64) -> FederationView {
        FederationView {
            site: "h1".into(),
            federation: "fed".into(),
            strategy: "fedavg".into(),
            rounds_planned: 5,
            round,
            model_version: round,
            last_loss: Some(0.25),
            dice: vec![DicePoint { round, score: 0.5 }],
            dice_by_class: BTreeMap::from([("csf".to_string(), 0.4)]),
            bytes_sent: sent,
            bytes_received: 10,
            refused: BTreeMap::from([("replay".to_string(), refused)]),
            members: vec![Member {
                id: "h2".into(),
                me: false,
                status: Some("training".into()),
                round: Some(1),
                model_version: Some(1),
                last_seen_s: Some(2.5),
            }],
            finished: false,
        }
    }

    fn value(text: &str, name: &str) -> f64 {
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} not in\n{text}"))
    }

    #[test]
    fn counters_advance_by_differences_and_everything_encodes() {
        let root = fake_sysroot();
        let b = board(root.path(), None);
        b.update_federation(view(1, 100, 1));
        b.update_federation(view(3, 250, 4));
        b.set_inference_queue(2);
        b.observe_inference_latency(1.5);
        let text = b.metrics_text();
        assert_eq!(value(&text, "cosilo_round"), 3.0);
        // The first view's rounds may be a resumed run's: only rounds after it count.
        assert_eq!(value(&text, "cosilo_rounds_completed_total"), 2.0);
        assert_eq!(value(&text, "cosilo_federation_sent_bytes_total"), 250.0);
        assert_eq!(
            value(
                &text,
                "cosilo_federation_refused_messages_total{reason=\"replay\"}"
            ),
            4.0
        );
        assert_eq!(value(&text, "cosilo_dice{class=\"csf\"}"), 0.4);
        assert_eq!(value(&text, "cosilo_dice_score"), 0.5);
        assert_eq!(
            value(
                &text,
                "cosilo_federation_member_last_seen_seconds{member=\"h2\"}"
            ),
            2.5
        );
        assert_eq!(value(&text, "cosilo_inference_queue_depth"), 2.0);
        assert_eq!(value(&text, "cosilo_inference_latency_seconds_count"), 1.0);
        assert_eq!(
            value(&text, "cosilo_temperature_celsius{zone=\"cpu-thermal\"}"),
            61.5
        );
        assert!(text.trim_end().ends_with("# EOF"), "{text}");
    }

    #[test]
    fn every_metric_is_documented() {
        let root = fake_sysroot();
        let b = board(root.path(), None);
        b.update_federation(view(1, 1, 1));
        b.observe_inference_latency(0.1);
        let text = b.metrics_text();
        let doc = include_str!("../../../../docs/METRICS.md");
        let mut names: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        names.sort();
        assert!(names.len() >= 20, "{names:?}");
        for n in names {
            assert!(
                doc.contains(&format!("`{n}")),
                "{n} is not documented in docs/METRICS.md"
            );
        }
    }
}
