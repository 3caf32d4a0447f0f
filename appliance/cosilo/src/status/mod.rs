//! What a running appliance shows about itself: Prometheus/OpenMetrics metrics, a read-only
//! status page and its JSON, on a local address (`[status] listen` in the site configuration).
//!
//! - [`Board`]: the one place the daemon reports to (its rounds, Dice, bytes, refusals, members'
//!   presence) and that others set (the inference queue and its latency); hardware readings
//!   (temperatures, disk, memory) and the outbox depth are read when someone looks.
//! - [`metrics`]: the metric families (documented one by one in `docs/METRICS.md`).
//! - [`page`]: the HTML status page with its inline SVG chart of Dice over rounds.
//! - [`server`]: the tiny read-only HTTP server (`GET /`, `/status.json`, `/metrics`).
//! - [`client`]: `cosilo status`: fetches `/status.json` and prints it at the terminal.

pub mod client;
pub mod metrics;
pub mod page;
pub mod server;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use cosilo_hardware::SysRoot;
use metrics::Metrics;

/// A federation member as this site last heard of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    pub id: String,
    /// This site itself.
    pub me: bool,
    /// The last presence status ("joining", "training", "idle", "leaving"); None: not heard yet.
    pub status: Option<String>,
    pub round: Option<u64>,
    pub model_version: Option<u64>,
    /// Seconds since the last presence message (None: never heard from).
    pub last_seen_s: Option<f64>,
}

/// One point of the Dice-over-rounds chart.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DicePoint {
    pub round: u64,
    /// Mean held-out Dice of the scored classes.
    pub score: f64,
}

/// A thermal zone reading.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Temperature {
    pub zone: String,
    pub celsius: f64,
}

/// Free space where the store lives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskSpace {
    pub path: String,
    pub free_bytes: u64,
    pub total_bytes: u64,
}

/// What the daemon reports about its federation run (the board keeps the latest).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FederationView {
    pub site: String,
    pub federation: String,
    pub strategy: String,
    pub rounds_planned: u64,
    /// Rounds completed (logged) so far.
    pub round: u64,
    pub model_version: u64,
    pub last_loss: Option<f64>,
    /// The score over rounds (rounds without an evaluation are left out).
    pub dice: Vec<DicePoint>,
    /// The latest evaluation's mean Dice per class (foreground classes, by name).
    pub dice_by_class: BTreeMap<String, f64>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Refused messages by reason.
    pub refused: BTreeMap<String, u64>,
    pub members: Vec<Member>,
    pub finished: bool,
}

/// Everything `/status.json` holds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub version: String,
    pub uptime_s: u64,
    /// Unix time of this report.
    pub time_s: u64,
    pub federation: FederationView,
    pub inference_queue: u64,
    /// Write-back items waiting in the bridge's outbox (None: no outbox configured or readable).
    pub outbox_pending: Option<u64>,
    pub outbox_dead: Option<u64>,
    pub temperatures: Vec<Temperature>,
    pub disk: Option<DiskSpace>,
    pub memory_available_bytes: Option<u64>,
}

/// Where the board reads the machine from.
#[derive(Debug, Clone)]
pub struct BoardSources {
    /// `/proc` and `/sys` (a fake tree in tests).
    pub sysroot: SysRoot,
    /// The folder whose filesystem's free space is reported (the store).
    pub disk_path: PathBuf,
    /// The bridge's write-back outbox (its `pending/` and `dead/` records are counted).
    pub outbox_dir: Option<PathBuf>,
}

/// The status board: the daemon and others write, the server reads.
pub struct Board {
    metrics: Metrics,
    sources: BoardSources,
    federation: Mutex<FederationView>,
    inference_queue: Mutex<u64>,
    started: Instant,
}

impl Board {
    /// An empty board reading the machine from `sources`.
    pub fn new(sources: BoardSources) -> Board {
        Board {
            metrics: Metrics::new(),
            sources,
            federation: Mutex::new(FederationView::default()),
            inference_queue: Mutex::new(0),
            started: Instant::now(),
        }
    }

    /// The daemon's latest view of its run; counters advance by what changed since the last.
    pub fn update_federation(&self, view: FederationView) {
        let mut cur = lock(&self.federation);
        self.metrics.federation(&cur, &view);
        *cur = view;
    }

    /// The clinical inference queue's depth (set by whoever runs inference).
    pub fn set_inference_queue(&self, depth: u64) {
        *lock(&self.inference_queue) = depth;
        self.metrics.inference_queue.set(depth as i64);
    }

    /// One inference job's latency, from the last instance received to the result queued.
    pub fn observe_inference_latency(&self, seconds: f64) {
        self.metrics.inference_latency.observe(seconds);
    }

    /// The report as of now: the daemon's view plus fresh hardware and outbox readings (which
    /// also update the hardware gauges).
    pub fn report(&self) -> StatusReport {
        let temperatures: Vec<Temperature> = cosilo_hardware::thermal_zones(&self.sources.sysroot)
            .map(|zones| {
                zones
                    .into_iter()
                    .map(|z| Temperature {
                        zone: z.name,
                        celsius: z.celsius,
                    })
                    .collect()
            })
            .unwrap_or_default();
        // The store may not exist yet: its nearest existing ancestor is on the same filesystem.
        let existing = self
            .sources
            .disk_path
            .ancestors()
            .find(|p| p.exists())
            .unwrap_or(&self.sources.disk_path);
        let disk = cosilo_hardware::disk(existing).ok().map(|d| DiskSpace {
            path: self.sources.disk_path.display().to_string(),
            free_bytes: d.available_bytes,
            total_bytes: d.total_bytes,
        });
        let memory = cosilo_hardware::memory(&self.sources.sysroot).ok();
        let (pending, dead) = match &self.sources.outbox_dir {
            Some(dir) => (
                count_records(&dir.join("pending")),
                count_records(&dir.join("dead")),
            ),
            None => (None, None),
        };
        let report = StatusReport {
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_s: self.started.elapsed().as_secs(),
            time_s: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            federation: lock(&self.federation).clone(),
            inference_queue: *lock(&self.inference_queue),
            outbox_pending: pending,
            outbox_dead: dead,
            temperatures,
            disk,
            memory_available_bytes: memory.map(|m| m.available_bytes),
        };
        self.metrics.machine(&report);
        report
    }

    /// The metrics in the OpenMetrics text format, hardware readings fresh.
    pub fn metrics_text(&self) -> String {
        self.report();
        self.metrics.encode()
    }
}

/// The number of `*.json` records in `dir` (None when it cannot be read).
fn count_records(dir: &std::path::Path) -> Option<u64> {
    let entries = std::fs::read_dir(dir).ok()?;
    Some(
        entries
            .filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .count() as u64,
    )
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake /proc + /sys with one thermal zone.
    pub(crate) fn fake_sysroot() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let z = dir.path().join("sys/class/thermal/thermal_zone0");
        std::fs::create_dir_all(&z).unwrap();
        std::fs::write(z.join("type"), "cpu-thermal\n").unwrap();
        std::fs::write(z.join("temp"), "61500\n").unwrap();
        std::fs::create_dir_all(dir.path().join("proc")).unwrap();
        std::fs::write(
            dir.path().join("proc/meminfo"),
            "MemTotal:       16000000 kB\nMemFree:         1000000 kB\nMemAvailable:    8000000 kB\n",
        )
        .unwrap();
        dir
    }

    pub(crate) fn board(root: &std::path::Path, outbox: Option<PathBuf>) -> Board {
        Board::new(BoardSources {
            sysroot: SysRoot(root.to_path_buf()),
            disk_path: root.to_path_buf(),
            outbox_dir: outbox,
        })
    }

    #[test]
    fn the_report_reads_the_machine_and_the_outbox() {
        let root = fake_sysroot();
        let outbox = root.path().join("outbox");
        std::fs::create_dir_all(outbox.join("pending")).unwrap();
        std::fs::create_dir_all(outbox.join("dead")).unwrap();
        std::fs::write(outbox.join("pending/1.json"), "{}").unwrap();
        std::fs::write(outbox.join("pending/1.dcm"), "").unwrap();
        std::fs::write(outbox.join("pending/2.json"), "{}").unwrap();
        let b = board(root.path(), Some(outbox));
        b.set_inference_queue(3);
        let r = b.report();
        assert_eq!(
            r.temperatures,
            vec![Temperature {
                zone: "cpu-thermal".into(),
                celsius: 61.5
            }]
        );
        assert_eq!(r.memory_available_bytes, Some(8_000_000 * 1024));
        assert!(r.disk.as_ref().is_some_and(|d| d.total_bytes > 0));
        assert_eq!((r.outbox_pending, r.outbox_dead), (Some(2), Some(0)));
        assert_eq!(r.inference_queue, 3);
    }
}
