//! The bridge's pipeline: SCP → de-identification → durable spool → series assembly → a
//! [`SeriesSink`] (the appliance's store).
//!
//! [`DeidSink`] is the [`InstanceSink`] the SCP calls: it de-identifies each instance in memory
//! (refusing burned-in or unmarked pixel data), writes it durably with a [`SpoolSink`] and tells
//! the [`SeriesAssembler`]; only then does the SCP answer success. [`Bridge::run`] serves until
//! `shutdown` is set, polling the assembler. [`PipelineConfig`] is its TOML configuration, with the
//! defaults checked in at `bridge/config/bridge.toml` ([`DEFAULT_CONFIG`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::assemble::{AssembleError, PollReport, SeriesAssembler, SeriesSink, SystemClock};
use crate::config::{BridgeConfig, ConfigError};
use crate::deid::{DatePolicy, DeidError, Deidentifier, MappingStore};
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
}

/// Series assembly settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssemblySettings {
    /// A series is complete after this many seconds without a new instance.
    pub quiet_period_s: u64,
    /// How often the assembler looks for complete series.
    pub poll_interval_ms: u64,
}

/// The whole bridge configuration (`cosilo bridge --config bridge.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// The bridge's own state (the pseudonym mapping).
    pub state_dir: PathBuf,
    pub network: BridgeConfig,
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
}

impl PipelineConfig {
    /// The checked-in defaults.
    pub fn default_config() -> Result<PipelineConfig, PipelineError> {
        Self::parse(DEFAULT_CONFIG, Path::new("bridge/config/bridge.toml"))
    }

    /// Parses `text` (named `path` in errors).
    pub fn parse(text: &str, path: &Path) -> Result<PipelineConfig, PipelineError> {
        toml::from_str(text).map_err(|source| PipelineError::ParseConfig {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Reads and validates `path`.
    pub fn from_file(path: &Path) -> Result<PipelineConfig, PipelineError> {
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
        if !(10..=60_000).contains(&self.assembly.poll_interval_ms) {
            return Err(bad("assembly.poll_interval_ms", "must be 10..=60000"));
        }
        Ok(())
    }

    /// The de-identifier this configuration describes, recording into the mapping store in
    /// `state_dir`.
    pub fn deidentifier(&self) -> Result<Deidentifier, PipelineError> {
        let mapping = MappingStore::open(&self.state_dir).map_err(PipelineError::Deid)?;
        Ok(
            Deidentifier::from_key_file(&self.deid.secret_file, self.deid.date_policy)
                .map_err(PipelineError::Deid)?
                .with_unmarked_pixels_accepted(self.deid.accept_unmarked_pixels)
                .with_mapping(mapping),
        )
    }
}

/// The SCP's sink: de-identify → spool (durably) → notify the assembler.
#[derive(Debug)]
pub struct DeidSink {
    deid: Deidentifier,
    spool: SpoolSink,
    assembler: Arc<SeriesAssembler>,
}

impl DeidSink {
    /// A sink de-identifying with `deid` into `spool`, telling `assembler`.
    pub fn new(deid: Deidentifier, spool: SpoolSink, assembler: Arc<SeriesAssembler>) -> Self {
        DeidSink {
            deid,
            spool,
            assembler,
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
            other => SinkError::OutOfResources(crate::assemble::error_chain(&other)),
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
        self.assembler.notify(&study, &series);
        Ok(accepted)
    }
}

/// The running bridge.
#[derive(Debug)]
pub struct Bridge;

/// What a [`Bridge::run`] did, summed over its polls.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RunReport {
    pub imported: Vec<String>,
    pub refused: Vec<(String, String)>,
}

impl Bridge {
    /// Serves DICOM until `shutdown` is set: the SCP feeds a [`DeidSink`], and complete series go
    /// to `series_sink`. On shutdown the SCP stops (running associations get the grace period)
    /// and the assembler is polled a last time; series not yet complete stay in the spool for the
    /// next start. `on_listening` is called with the SCP's address once it accepts associations.
    pub fn run(
        cfg: &PipelineConfig,
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
            .map_err(PipelineError::Assembler)?,
        );
        let sink = Arc::new(DeidSink::new(deid, spool, assembler.clone()));
        let handle = scp::serve(cfg.network.scp(), sink).map_err(PipelineError::Scp)?;
        tracing::info!(addr = %handle.local_addr(), ae = %cfg.network.ae_title, "bridge listening");
        on_listening(handle.local_addr());
        let mut report = RunReport::default();
        let interval = Duration::from_millis(cfg.assembly.poll_interval_ms);
        let mut add = |r: PollReport| {
            report.imported.extend(r.imported);
            report.refused.extend(r.refused);
        };
        while !shutdown.load(Ordering::SeqCst) {
            std::thread::sleep(interval);
            match assembler.poll(series_sink.as_ref()) {
                Ok(r) => add(r),
                Err(e) => {
                    handle.stop();
                    return Err(PipelineError::Poll(e));
                }
            }
        }
        handle.stop();
        add(assembler
            .poll(series_sink.as_ref())
            .map_err(PipelineError::Poll)?);
        Ok(report)
    }
}
