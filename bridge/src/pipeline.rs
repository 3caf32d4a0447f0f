//! The bridge's pipeline: SCP → de-identification → durable spool → series assembly → a
//! [`SeriesSink`] (the appliance's store).
//!
//! [`DeidSink`] is the [`InstanceSink`] the SCP calls: it de-identifies each instance in memory
//! (refusing burned-in or unmarked pixel data), writes it durably with a [`SpoolSink`] and tells
//! the [`SeriesAssembler`]; only then does the SCP answer success. [`Bridge::run`] serves until
//! `shutdown` is set, polling the assembler and, when a PACS is configured (`[network.pacs]`),
//! running the write-back [`Outbox`] on its own thread so a PACS outage (each attempt can wait for
//! the peer's timeout) never holds up assembly. [`BridgeConfig`] is its TOML configuration, with
//! the defaults checked in at `bridge/config/bridge.toml` ([`DEFAULT_CONFIG`]).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::assemble::retention::{self, Retention};
use crate::assemble::{AssembleError, PollReport, SeriesAssembler, SeriesSink, SystemClock};
use crate::config::{ConfigError, NetworkConfig};
use crate::deid::{BirthDatePolicy, DatePolicy, DeidError, Deidentifier, MappingStore};
use crate::outbox::{self, Outbox, OutboxError};
use crate::scp::{self, Accepted, InstanceSink, ReceivedInstance, ScpError, SinkError, SpoolSink};

/// The default configuration, as checked in.
pub const DEFAULT_CONFIG: &str = include_str!("../config/bridge.toml");

/// De-identification settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeidSettings {
    /// The file holding the per-site secret (at least 16 bytes).
    pub secret_file: PathBuf,
    pub date_policy: DatePolicy,
    /// Accept instances that may carry burned-in text when BurnedInAnnotation is absent.
    #[serde(default)]
    pub accept_unmarked_pixels: bool,
    /// PatientBirthDate: emptied (PS3.15, the default) or treated like the other dates.
    #[serde(default)]
    pub birth_date: BirthDatePolicy,
}

/// Series assembly settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssemblySettings {
    /// A series is complete after this many seconds without a new instance.
    pub quiet_period_s: u64,
    /// How often the assembler looks for complete series.
    pub poll_interval_ms: u64,
    /// How long an incomplete series (interrupted association, fewer instances than declared,
    /// refused by the store) waits for the rest before it is refused.
    #[serde(default = "default_incomplete_wait_s")]
    pub incomplete_wait_s: u64,
    /// `done/` retention ([`crate::assemble::retention`]): series older than this many days go
    /// (never one a labelled case needs). Absent from a file: 90.
    #[serde(default = "default_done_max_age_days")]
    pub done_max_age_days: u64,
    /// `done/` retention: beyond this many bytes the oldest removable series go. Absent: 50 GiB.
    #[serde(default = "default_done_max_bytes")]
    pub done_max_bytes: u64,
}

fn default_done_max_age_days() -> u64 {
    90
}

fn default_done_max_bytes() -> u64 {
    50 << 30
}

/// How often the running bridge applies the `done/` retention.
const RETENTION_EVERY: Duration = Duration::from_secs(600);

fn default_incomplete_wait_s() -> u64 {
    SeriesAssembler::DEFAULT_INCOMPLETE_WAIT.as_secs()
}

/// The whole bridge configuration (`cosilo bridge --config bridge.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeConfig {
    /// The bridge's own state (the pseudonym mapping).
    pub state_dir: PathBuf,
    pub network: NetworkConfig,
    pub deid: DeidSettings,
    pub assembly: AssemblySettings,
}

/// Errors of the pipeline.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("cannot read the bridge configuration {path}")]
    ReadConfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the bridge configuration {path} is not valid TOML for the bridge")]
    ParseConfig {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error(transparent)]
    Invalid(#[from] ConfigError),
    #[error("cannot set up de-identification")]
    Deid(#[source] DeidError),
    #[error("cannot set up the spool")]
    Spool(#[source] SinkError),
    #[error("cannot start the series assembler")]
    Assembler(#[source] AssembleError),
    #[error("series assembly failed")]
    Poll(#[source] AssembleError),
    #[error("cannot start the DICOM service")]
    Scp(#[source] ScpError),
    #[error("cannot open the write-back outbox")]
    Outbox(#[source] OutboxError),
}

impl BridgeConfig {
    /// The checked-in defaults.
    pub fn default_config() -> Result<BridgeConfig, PipelineError> {
        Self::parse(DEFAULT_CONFIG, Path::new("bridge/config/bridge.toml"))
    }

    /// Parses `text` (named `path` in errors).
    pub fn parse(text: &str, path: &Path) -> Result<BridgeConfig, PipelineError> {
        toml::from_str(text).map_err(|source| PipelineError::ParseConfig {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Reads and validates `path`.
    pub fn from_file(path: &Path) -> Result<BridgeConfig, PipelineError> {
        let text = std::fs::read_to_string(path).map_err(|source| PipelineError::ReadConfig {
            path: path.to_path_buf(),
            source,
        })?;
        let cfg = Self::parse(&text, path)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the values before anything starts.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.network.validate()?;
        let bad = |field: &'static str, reason: &str| ConfigError {
            field,
            reason: reason.to_string(),
        };
        if self.state_dir.as_os_str().is_empty() {
            return Err(bad("state_dir", "must not be empty"));
        }
        if self.state_dir == self.network.spool_dir {
            return Err(bad("state_dir", "must differ from network.spool_dir"));
        }
        if self.deid.secret_file.as_os_str().is_empty() {
            return Err(bad("deid.secret_file", "must not be empty"));
        }
        if let DatePolicy::ShiftPerPatient { max_days } = self.deid.date_policy {
            if !(1..=36_500).contains(&max_days) {
                return Err(bad("deid.date_policy.max_days", "must be 1..=36500"));
            }
        }
        if self.assembly.quiet_period_s == 0 || self.assembly.quiet_period_s > 86_400 {
            return Err(bad("assembly.quiet_period_s", "must be 1..=86400"));
        }
        if self.assembly.incomplete_wait_s == 0 || self.assembly.incomplete_wait_s > 30 * 86_400 {
            return Err(bad("assembly.incomplete_wait_s", "must be 1..=2592000"));
        }
        if !(10..=60_000).contains(&self.assembly.poll_interval_ms) {
            return Err(bad("assembly.poll_interval_ms", "must be 10..=60000"));
        }
        if !(1..=36_500).contains(&self.assembly.done_max_age_days) {
            return Err(bad("assembly.done_max_age_days", "must be 1..=36500"));
        }
        Ok(())
    }

    /// The de-identifier this configuration describes, recording into the mapping store in
    /// `state_dir`.
    /// The key is read (and its mode checked) before the state directory is created, so a missing
    /// key leaves nothing behind.
    pub fn deidentifier(&self) -> Result<Deidentifier, PipelineError> {
        let deid = Deidentifier::from_key_file(&self.deid.secret_file, self.deid.date_policy)
            .map_err(PipelineError::Deid)?;
        let mapping = MappingStore::open(&self.state_dir).map_err(PipelineError::Deid)?;
        Ok(deid
            .with_unmarked_pixels_accepted(self.deid.accept_unmarked_pixels)
            .with_birth_date(self.deid.birth_date)
            .with_mapping(mapping))
    }

    /// Checks that the de-identification key can be used (readable, 0600, long enough) without
    /// creating anything: `cosilo bridge` calls it before it opens the store.
    pub fn check_key(&self) -> Result<(), PipelineError> {
        Deidentifier::from_key_file(&self.deid.secret_file, self.deid.date_policy)
            .map(|_| ())
            .map_err(PipelineError::Deid)
    }
}

/// The SCP's sink: de-identify → spool (durably) → notify the assembler.
#[derive(Debug)]
pub struct DeidSink {
    deid: Deidentifier,
    spool: SpoolSink,
    assembler: Arc<SeriesAssembler>,
    /// The series each running association (one thread each) is delivering.
    deliveries: Mutex<HashMap<ThreadId, BTreeSet<(String, String)>>>,
}

impl DeidSink {
    /// A sink de-identifying with `deid` into `spool`, telling `assembler`.
    pub fn new(deid: Deidentifier, spool: SpoolSink, assembler: Arc<SeriesAssembler>) -> Self {
        DeidSink {
            deid,
            spool,
            assembler,
            deliveries: Mutex::new(HashMap::new()),
        }
    }
}

impl DeidSink {
    /// Makes the mapping store's deferred lines (instances' own UIDs) durable; the bridge calls
    /// it every poll interval and on shutdown ([`MappingStore::sync`]).
    pub fn sync_mapping(&self) -> Result<(), DeidError> {
        self.deid.mapping().map_or(Ok(()), MappingStore::sync)
    }

    /// The de-identifier (its keyed hash and pseudonym table).
    pub fn deidentifier(&self) -> &Deidentifier {
        &self.deid
    }

    fn sync_mapping_or_log(&self) {
        if let Err(e) = self.sync_mapping() {
            tracing::error!(error = %cosilo_hardware::error_text::error_chain(&e),
                "cannot sync the pseudonym mapping (write-back recovers instance UIDs from the PACS)");
        }
    }
}

impl InstanceSink for DeidSink {
    fn accept(&self, inst: ReceivedInstance) -> Result<Accepted, SinkError> {
        let out = self.deid.deidentify(&inst.dataset).map_err(|e| match e {
            DeidError::BurnedIn { .. } => {
                tracing::warn!(calling_ae = %inst.calling_ae, "{e}");
                SinkError::Refused(e.to_string())
            }
            DeidError::WriteMapping { path, source } => SinkError::Io { path, source },
            other => SinkError::OutOfResources(cosilo_hardware::error_text::error_chain(&other)),
        })?;
        if out.study_uid.is_empty() || out.series_uid.is_empty() || out.sop_instance_uid.is_empty()
        {
            return Err(SinkError::Refused(
                "StudyInstanceUID, SeriesInstanceUID or SOPInstanceUID missing".to_string(),
            ));
        }
        let (study, series) = (out.study_uid.clone(), out.series_uid.clone());
        let accepted = self.spool.accept(ReceivedInstance {
            calling_ae: inst.calling_ae,
            sop_class_uid: inst.sop_class_uid,
            sop_instance_uid: out.sop_instance_uid,
            transfer_syntax: inst.transfer_syntax,
            dataset: out.object,
        })?;
        let key = (study, series);
        let first = self
            .deliveries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(std::thread::current().id())
            .or_default()
            .insert(key.clone());
        if first {
            self.assembler.delivery_started(&key.0, &key.1);
        } else {
            self.assembler.notify(&key.0, &key.1);
        }
        Ok(accepted)
    }

    fn association_ended(&self, released: bool) {
        let series = self
            .deliveries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&std::thread::current().id())
            .unwrap_or_default();
        for (study, series) in series {
            self.assembler.delivery_ended(&study, &series, released);
        }
    }
}

/// The running bridge.
#[derive(Debug)]
pub struct Bridge;

/// What a [`Bridge::run`] did, summed over its polls.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RunReport {
    /// Case ids handed to the series sink.
    pub imported: Vec<String>,
    /// `(series, reason)` of series the sink or the assembler refused.
    pub refused: Vec<(String, String)>,
    /// Instances of incomplete series C-MOVEd from the PACS ([`crate::fetch`]), as the PACS
    /// counted them completed.
    pub fetched: u64,
    /// Write-back: the outbox's passes summed (`waiting` is that of the last pass). All zero when
    /// no PACS is configured.
    pub outbox: outbox::RunReport,
}

/// Runs outbox passes every `interval` until `stop` or `shutdown` is set, summing what they did.
/// A failing pass (the outbox's own files, not a failed send) is logged and tried again later.
fn outbox_loop(
    outbox: &Outbox,
    interval: Duration,
    shutdown: &AtomicBool,
    stop: &AtomicBool,
) -> outbox::RunReport {
    let stopping = || shutdown.load(Ordering::SeqCst) || stop.load(Ordering::SeqCst);
    let mut total = outbox::RunReport::default();
    while !stopping() {
        match outbox.run_once() {
            Ok(r) => {
                total.sent += r.sent;
                total.retried += r.retried;
                total.dead += r.dead;
                total.waiting = r.waiting;
            }
            Err(e) => {
                tracing::error!(error = %cosilo_hardware::error_text::error_chain(&e), "write-back outbox pass failed")
            }
        }
        // Sleep in short steps so shutdown is not delayed by a long interval.
        let until = std::time::Instant::now() + interval;
        while !stopping() && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20).min(interval));
        }
    }
    total
}

/// Asks `pacs` for the missing instances of the incomplete series `(study, series)`
/// ([`crate::fetch::fetch_missing`]), moving them to our own AE title; returns how many the PACS
/// moved. A failure is logged and the series keeps waiting (bounded by the incomplete wait) for a
/// sender to complete it.
fn fetch_or_log(
    cfg: &BridgeConfig,
    pacs: &crate::scu::PeerAe,
    sink: &DeidSink,
    study: &str,
    series: &str,
) -> u64 {
    let fetched = crate::fetch::fetch_missing(
        pacs,
        &cfg.network.ae_title,
        sink.deidentifier(),
        &cfg.network.spool_dir,
        study,
        series,
    );
    match fetched {
        Ok(f) => {
            tracing::info!(series, at_pacs = f.at_pacs, held = f.held, requested = f.requested,
                moved = f.moved, failed = f.failed, pacs = %pacs.ae_title,
                "asked the PACS for the missing instances of an incomplete series");
            u64::from(f.moved)
        }
        Err(e) => {
            tracing::warn!(series, error = %cosilo_hardware::error_text::error_chain(&e),
                "cannot fetch the missing instances from the PACS; the series waits for a sender");
            0
        }
    }
}

impl Bridge {
    /// Serves DICOM until `shutdown` is set: the SCP feeds a [`DeidSink`], and complete series go
    /// to `series_sink`. When `network.pacs` is configured, the outbox in `network.outbox_dir`
    /// is run every `assembly.poll_interval_ms` on its own thread: queued write-back (DICOM SEG,
    /// [`crate::writeback::queue_seg`]) is C-STOREd to each item's destination, failures retried
    /// with the configured backoff. On shutdown the SCP stops (running associations get the grace
    /// period), the outbox finishes its current pass, and the assembler is polled a last time;
    /// series not yet complete and items not yet sent stay on disk for the next start.
    /// `on_listening` is called with the SCP's address once it accepts associations.
    pub fn run(
        cfg: &BridgeConfig,
        series_sink: Arc<dyn SeriesSink>,
        shutdown: &AtomicBool,
        on_listening: impl FnOnce(std::net::SocketAddr),
    ) -> Result<RunReport, PipelineError> {
        cfg.validate()?;
        let deid = cfg.deidentifier()?;
        let spool = SpoolSink::new(&cfg.network.spool_dir, cfg.network.reserve_bytes)
            .map_err(PipelineError::Spool)?;
        let assembler = Arc::new(
            SeriesAssembler::open(
                &cfg.network.spool_dir,
                Duration::from_secs(cfg.assembly.quiet_period_s),
                Arc::new(SystemClock::default()),
            )
            .map_err(PipelineError::Assembler)?
            .with_incomplete_wait(Duration::from_secs(cfg.assembly.incomplete_wait_s)),
        );
        let outbox = match &cfg.network.pacs {
            Some(pacs) => {
                let ob = Outbox::open(&cfg.network.outbox_dir, cfg.network.retry_policy())
                    .map_err(PipelineError::Outbox)?;
                tracing::info!(pacs = %pacs.ae_title, address = %pacs.address,
                    outbox = %cfg.network.outbox_dir.display(), "write-back enabled");
                Some(ob)
            }
            None => None,
        };
        let sink = Arc::new(DeidSink::new(deid, spool, assembler.clone()));
        let handle = scp::serve(cfg.network.scp(), sink.clone()).map_err(PipelineError::Scp)?;
        tracing::info!(addr = %handle.local_addr(), ae = %cfg.network.ae_title, "bridge listening");
        on_listening(handle.local_addr());
        let interval = Duration::from_millis(cfg.assembly.poll_interval_ms);
        let stop_outbox = AtomicBool::new(false);
        std::thread::scope(|scope| {
            let outbox_thread = outbox
                .as_ref()
                .map(|ob| scope.spawn(|| outbox_loop(ob, interval, shutdown, &stop_outbox)));
            let mut report = RunReport::default();
            let mut add = |r: PollReport| {
                report.imported.extend(r.imported);
                report.refused.extend(r.refused);
            };
            let mut result = Ok(());
            let retention = Retention {
                max_age: Duration::from_secs(cfg.assembly.done_max_age_days * 86_400),
                max_bytes: cfg.assembly.done_max_bytes,
            };
            let mut retained_at: Option<std::time::Instant> = None;
            let mut fetched = 0u64;
            while !shutdown.load(Ordering::SeqCst) {
                std::thread::sleep(interval);
                if retained_at.is_none_or(|t| t.elapsed() >= RETENTION_EVERY) {
                    retained_at = Some(std::time::Instant::now());
                    // A failed pass keeps everything: logged, never fatal.
                    if let Err(e) =
                        retention::apply(&cfg.network.spool_dir, &retention, SystemTime::now())
                    {
                        tracing::warn!(error = %e, "done/ retention failed; nothing removed by it");
                    }
                }
                sink.sync_mapping_or_log();
                match assembler.poll(series_sink.as_ref()) {
                    Ok(r) => {
                        if let Some(pacs) = &cfg.network.pacs {
                            for (study, series) in &r.incomplete {
                                fetched += fetch_or_log(cfg, pacs, &sink, study, series);
                            }
                        }
                        add(r)
                    }
                    Err(e) => {
                        result = Err(PipelineError::Poll(e));
                        break;
                    }
                }
            }
            handle.stop();
            sink.sync_mapping_or_log();
            stop_outbox.store(true, Ordering::SeqCst);
            if result.is_ok() {
                result = assembler
                    .poll(series_sink.as_ref())
                    .map(&mut add)
                    .map_err(PipelineError::Poll);
            }
            if let Some(t) = outbox_thread {
                // The loop never panics on its own; a panic here is a bug worth propagating.
                report.outbox = t.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
            }
            report.fetched = fetched;
            result.map(|()| report)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::assemble::{AssembledSeries, SeriesSinkError, SinkOutcome};
    use crate::scu::PeerAe;
    use cosilo_sdk::dicom::{write_series, Modality, SeriesMeta};
    use cosilo_sdk::volume::{Geometry, Volume};
    use std::time::Instant;

    /// Counts what it is given; the outbox test needs a series sink but no series.
    #[derive(Default)]
    struct CountingSink(std::sync::Mutex<usize>);

    impl SeriesSink for CountingSink {
        fn import(&self, _: AssembledSeries) -> Result<SinkOutcome, SeriesSinkError> {
            *self.0.lock().unwrap() += 1;
            Ok(SinkOutcome::Stored)
        }
    }

    /// A de-identification key file, 0600 as the bridge requires.
    fn write_key(path: &Path) {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .unwrap();
        std::io::Write::write_all(&mut f, b"pipeline outbox test secret 32 bytes").unwrap();
    }

    /// A loopback port nothing listens on (yet).
    fn free_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }

    fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + limit;
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    #[test]
    fn bridge_runs_the_outbox_pacs_down_then_retried_then_delivered() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        // One real DICOM instance to write back.
        let geometry = Geometry {
            dims: [4, 4, 2],
            affine: [
                [-1.0, 0.0, 0.0, 0.0],
                [0.0, -1.0, 0.0, 0.0],
                [0.0, 0.0, 2.0, 0.0],
                [0.0, 0.0, 0.0, 1.0],
            ],
        };
        let volume = Volume {
            data: (0..geometry.len()).map(|i| i as f32).collect(),
            geometry,
        };
        let files = write_series(
            &volume,
            &SeriesMeta::new(Modality::Mr, "outbox-in-bridge"),
            root.join("src"),
        )
        .unwrap();

        let pacs_port = free_port();
        let pacs = PeerAe::new("PACS", &format!("127.0.0.1:{pacs_port}"), "COSILO");
        write_key(&root.join("deid.key"));
        let mut cfg = BridgeConfig::default_config().unwrap();
        cfg.state_dir = root.join("state");
        cfg.network.bind = "127.0.0.1:0".parse().unwrap();
        cfg.network.spool_dir = root.join("spool");
        cfg.network.outbox_dir = root.join("outbox");
        cfg.network.reserve_bytes = 1 << 20;
        cfg.network.pacs = Some(pacs.clone());
        cfg.network.outbox_max_attempts = 1000;
        cfg.network.outbox_base_delay_s = 0;
        cfg.network.outbox_max_delay_s = 0;
        cfg.deid.secret_file = root.join("deid.key");
        cfg.assembly.poll_interval_ms = 50;
        cfg.validate().unwrap();

        // Queued before the bridge starts, as `cosilo writeback` does while it is stopped.
        let queued = Outbox::open(&cfg.network.outbox_dir, cfg.network.retry_policy())
            .unwrap()
            .enqueue(&files[0], &pacs)
            .unwrap();

        let shutdown = AtomicBool::new(false);
        let sink = Arc::new(CountingSink::default());
        let report = std::thread::scope(|s| {
            let bridge = s.spawn(|| Bridge::run(&cfg, sink.clone(), &shutdown, |_| {}));
            let ob = Outbox::open(&cfg.network.outbox_dir, cfg.network.retry_policy()).unwrap();
            // The PACS is down: the bridge tries, fails, keeps the item with the reason.
            wait_until("a failed attempt", Duration::from_secs(20), || {
                ob.pending()
                    .unwrap()
                    .first()
                    .is_some_and(|i| i.attempts >= 2 && i.last_error.is_some())
            });
            assert!(ob.dead().unwrap().is_empty());
            // The PACS comes up (a real SCP spooling what it receives): the bridge delivers.
            let pacs_spool = root.join("pacs");
            let pacs_sink = Arc::new(scp::SpoolSink::new(&pacs_spool, 0).unwrap());
            let mut scp_cfg = cfg.network.scp();
            scp_cfg.ae_title = "PACS".into();
            scp_cfg.bind = format!("127.0.0.1:{pacs_port}").parse().unwrap();
            let pacs_scp = scp::serve(scp_cfg, pacs_sink.clone()).unwrap();
            wait_until("delivery", Duration::from_secs(20), || {
                ob.pending().unwrap().is_empty()
            });
            let sop = dicom::object::open_file(&files[0])
                .unwrap()
                .meta()
                .media_storage_sop_instance_uid()
                .trim_end_matches('\0')
                .to_string();
            let stored: Vec<PathBuf> = walk(&pacs_spool)
                .into_iter()
                .filter(|p| p.file_stem().is_some_and(|n| n.to_string_lossy() == sop))
                .collect();
            assert_eq!(stored.len(), 1, "the PACS holds the instance {sop}");
            assert!(
                std::fs::read(&stored[0]).unwrap().len() > 128,
                "a real file"
            );
            shutdown.store(true, Ordering::SeqCst);
            let report = bridge.join().unwrap().unwrap();
            pacs_scp.stop();
            report
        });
        assert_eq!(report.outbox.sent, 1, "{report:?}");
        assert!(report.outbox.retried >= 2, "{report:?}");
        assert_eq!(report.outbox.dead, 0);
        assert!(report.imported.is_empty());
        assert!(!root
            .join("outbox/pending")
            .join(format!("{}.dcm", queued.id))
            .exists());
    }

    #[test]
    fn without_a_pacs_the_outbox_is_left_alone() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        write_key(&root.join("deid.key"));
        std::fs::write(root.join("x.dcm"), b"queued while a PACS was configured").unwrap();
        let mut cfg = BridgeConfig::default_config().unwrap();
        cfg.state_dir = root.join("state");
        cfg.network.bind = "127.0.0.1:0".parse().unwrap();
        cfg.network.spool_dir = root.join("spool");
        cfg.network.outbox_dir = root.join("outbox");
        cfg.network.reserve_bytes = 1 << 20;
        cfg.network.outbox_base_delay_s = 0;
        cfg.deid.secret_file = root.join("deid.key");
        cfg.assembly.poll_interval_ms = 20;
        assert!(cfg.network.pacs.is_none());
        let ob = Outbox::open(&cfg.network.outbox_dir, cfg.network.retry_policy()).unwrap();
        ob.enqueue(
            &root.join("x.dcm"),
            &PeerAe::new("PACS", "127.0.0.1:1", "COSILO"),
        )
        .unwrap();
        let shutdown = AtomicBool::new(false);
        let report = std::thread::scope(|s| {
            let bridge =
                s.spawn(|| Bridge::run(&cfg, Arc::new(CountingSink::default()), &shutdown, |_| {}));
            std::thread::sleep(Duration::from_millis(300));
            shutdown.store(true, Ordering::SeqCst);
            bridge.join().unwrap().unwrap()
        });
        assert_eq!(report.outbox, outbox::RunReport::default());
        assert_eq!(ob.pending().unwrap()[0].attempts, 0, "nothing was tried");
    }

    #[test]
    fn the_running_bridge_applies_the_done_retention() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        write_key(&root.join("deid.key"));
        let mut cfg = BridgeConfig::default_config().unwrap();
        assert_eq!(
            (cfg.assembly.done_max_age_days, cfg.assembly.done_max_bytes),
            (90, 50 << 30)
        );
        cfg.state_dir = root.join("state");
        cfg.network.bind = "127.0.0.1:0".parse().unwrap();
        cfg.network.spool_dir = root.join("spool");
        cfg.network.outbox_dir = root.join("outbox");
        cfg.network.reserve_bytes = 1 << 20;
        cfg.deid.secret_file = root.join("deid.key");
        cfg.assembly.poll_interval_ms = 20;
        cfg.assembly.done_max_age_days = 30;
        cfg.validate().unwrap();
        let mut bad = cfg.clone();
        bad.assembly.done_max_age_days = 0;
        assert!(bad.validate().is_err());
        // An image series handed over 100 days ago, and one from today.
        let geometry = Geometry::axis_aligned([8, 8, 3], [1.0; 3], [0.0; 3]);
        let volume = Volume {
            data: (0..geometry.len()).map(|i| i as f32).collect(),
            geometry,
        };
        let done = cfg
            .network
            .spool_dir
            .join(crate::assemble::DONE_DIR)
            .join("2.25.1");
        let old = done.join("2.25.10");
        let young = done.join("2.25.11");
        for (dir, days) in [(&old, 100u64), (&young, 0)] {
            let files =
                write_series(&volume, &SeriesMeta::new(Modality::Mr, "r"), dir.as_path()).unwrap();
            for f in files {
                let t = SystemTime::now() - Duration::from_secs(days * 86_400);
                std::fs::File::options()
                    .write(true)
                    .open(f)
                    .unwrap()
                    .set_modified(t)
                    .unwrap();
            }
        }
        let shutdown = AtomicBool::new(false);
        std::thread::scope(|s| {
            let bridge =
                s.spawn(|| Bridge::run(&cfg, Arc::new(CountingSink::default()), &shutdown, |_| {}));
            wait_until("the old series removed", Duration::from_secs(20), || {
                !old.exists()
            });
            shutdown.store(true, Ordering::SeqCst);
            bridge.join().unwrap().unwrap();
        });
        assert!(young.is_dir(), "a series younger than the limit stays");
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push(p);
                }
            }
        }
        out
    }
}
