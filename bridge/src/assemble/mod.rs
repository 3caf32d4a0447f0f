//! Series assembly: de-identified instances wait in the spool (`<spool>/<study>/<series>/<sop>.dcm`,
//! written durably by [`crate::scp::SpoolSink`]) until their series has been quiet for a while,
//! then become a volume ([`cosilo_sdk::dicom::series::read_series`]) handed to a [`SeriesSink`].
//!
//! - A series is complete when no instance has arrived for the quiet period (measured with an
//!   injectable [`Clock`], so tests need not sleep).
//! - A series the SDK refuses (gaps, mixed orientations, ...) is moved to `<spool>/refused/` with a
//!   `reason.txt`, and logged.
//! - A Segmentation series is a label map: once the image series it references has been imported,
//!   it is read onto that series' grid ([`cosilo_sdk::dicom::seg::read_seg`]) and the image is
//!   handed over again with its labels.
//! - An image series is moved to `<spool>/done/` only after the sink acknowledged it (kept there,
//!   inside the hospital, so that a SEG arriving later finds its grid); a SEG series is moved to
//!   `done/` likewise. Until then it stays in the spool, and [`SeriesAssembler::open`] rebuilds the
//!   index from the spool after a restart.
//!
//! Nothing here handles patient identity: the instances were de-identified before the spool.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cosilo_sdk::dicom::seg::read_seg;
use cosilo_sdk::dicom::series::read_series;
use cosilo_sdk::volume::Volume;
use dicom::core::Tag;
use dicom::object::InMemDicomObject;

/// The SOP class of DICOM Segmentation Storage.
pub const SEG_SOP_CLASS: &str = "1.2.840.10008.5.1.4.1.1.66.4";
/// The spool's folder for refused series.
pub const REFUSED_DIR: &str = "refused";
/// The spool's folder for series handed over.
pub const DONE_DIR: &str = "done";

/// Errors of the assembler itself (not of one series: those are refusals).
#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    #[error("cannot scan the spool {path}")]
    Scan {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot move series {from} to {to}")]
    Move {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A complete series, de-identified, ready for the appliance's store.
#[derive(Debug, Clone)]
pub struct AssembledSeries {
    /// The case id: `<patient pseudonym>-<pseudonymous series UID>`.
    pub case_id: String,
    /// The patient pseudonym (already a keyed hash; no identifier).
    pub patient_pseudonym: String,
    /// Pseudonymous UIDs.
    pub study_uid: String,
    pub series_uid: String,
    pub modality: String,
    pub image: Volume<f32>,
    /// Labels from a SEG referencing this series, on the image's grid.
    pub labels: Option<Volume<u8>>,
    /// The SEG series the labels came from.
    pub seg_series_uid: Option<String>,
    /// Number of image instances.
    pub instances: usize,
}

/// Where complete series go (the appliance's store implements it).
pub trait SeriesSink: Send + Sync {
    /// Takes one series; `Ok` only once it is durable. An `Err` keeps the series in the spool,
    /// to be offered again at the next poll.
    fn import(&self, series: AssembledSeries) -> Result<(), String>;
}

/// A source of monotonic time.
pub trait Clock: Send + Sync {
    /// Time since some fixed start.
    fn now(&self) -> Duration;
}

/// The real clock.
#[derive(Debug)]
pub struct SystemClock(Instant);

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock(Instant::now())
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        self.0.elapsed()
    }
}

/// A clock that moves only when told to, for tests.
#[derive(Debug, Default)]
pub struct ManualClock(Mutex<Duration>);

impl ManualClock {
    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What one [`SeriesAssembler::poll`] did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PollReport {
    /// Case ids handed to the sink (image-only or with labels).
    pub imported: Vec<String>,
    /// Series refused, with the reason.
    pub refused: Vec<(String, String)>,
    /// Series the sink did not take this time (kept for the next poll), with its reason.
    pub deferred: Vec<(String, String)>,
    /// Series still receiving or waiting for their referenced series.
    pub waiting: usize,
}

#[derive(Debug)]
struct Pending {
    last_seen: Duration,
}

/// Groups spooled instances by study and series and hands complete series to a sink.
pub struct SeriesAssembler {
    spool: PathBuf,
    quiet: Duration,
    clock: Arc<dyn Clock>,
    pending: Mutex<BTreeMap<(String, String), Pending>>,
}

impl std::fmt::Debug for SeriesAssembler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeriesAssembler")
            .field("spool", &self.spool)
            .field("quiet", &self.quiet)
            .finish_non_exhaustive()
    }
}

fn is_uid(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_digit() || b == b'.')
}

fn sub_dirs(dir: &Path) -> Result<Vec<String>, AssembleError> {
    let scan = |source| AssembleError::Scan {
        path: dir.to_path_buf(),
        source,
    };
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(scan(e)),
    };
    for entry in entries {
        let entry = entry.map_err(scan)?;
        if entry.file_type().map_err(scan)?.is_dir() {
            if let Some(name) = entry.file_name().to_str().filter(|n| is_uid(n)) {
                out.push(name.to_string());
            }
        }
    }
    out.sort();
    Ok(out)
}

fn dcm_files(dir: &Path) -> Result<Vec<PathBuf>, AssembleError> {
    let scan = |source| AssembleError::Scan {
        path: dir.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(scan)? {
        let p = entry.map_err(scan)?.path();
        if p.extension().is_some_and(|e| e == "dcm") {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

fn text(obj: &InMemDicomObject, tag: Tag) -> String {
    obj.get(tag)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
        .unwrap_or_default()
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Renames `from` to `to` (creating `to`'s parent) and fsyncs both parents.
fn move_dir(from: &Path, to: &Path) -> Result<(), AssembleError> {
    let err = |source| AssembleError::Move {
        from: from.to_path_buf(),
        to: to.to_path_buf(),
        source,
    };
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent).map_err(err)?;
    }
    if to.exists() {
        // The same series handed over before: replace the old copy.
        std::fs::remove_dir_all(to).map_err(err)?;
    }
    std::fs::rename(from, to).map_err(err)?;
    for d in [from.parent(), to.parent()].into_iter().flatten() {
        sync_dir(d).map_err(err)?;
    }
    // An empty study folder left behind is removed (best effort).
    if let Some(study) = from.parent() {
        let _ = std::fs::remove_dir(study);
    }
    Ok(())
}

/// What a spooled series is.
enum Kind {
    Image,
    /// A SEG and the series it references.
    Seg {
        referenced_series: String,
    },
}

impl SeriesAssembler {
    /// An assembler over `spool`, declaring a series complete after `quiet` without new
    /// instances. Series already in the spool (from before a restart) are indexed as if their
    /// last instance arrived now.
    pub fn open(
        spool: &Path,
        quiet: Duration,
        clock: Arc<dyn Clock>,
    ) -> Result<SeriesAssembler, AssembleError> {
        std::fs::create_dir_all(spool).map_err(|source| AssembleError::Scan {
            path: spool.to_path_buf(),
            source,
        })?;
        let now = clock.now();
        let mut pending = BTreeMap::new();
        for study in sub_dirs(spool)? {
            for series in sub_dirs(&spool.join(&study))? {
                pending.insert((study.clone(), series), Pending { last_seen: now });
            }
        }
        if !pending.is_empty() {
            tracing::info!(
                series = pending.len(),
                "resuming series left in the spool {}",
                spool.display()
            );
        }
        Ok(SeriesAssembler {
            spool: spool.to_path_buf(),
            quiet,
            clock,
            pending: Mutex::new(pending),
        })
    }

    /// The spool directory.
    pub fn spool(&self) -> &Path {
        &self.spool
    }

    /// Records that an instance of `series` (in `study`) has just been spooled.
    pub fn notify(&self, study_uid: &str, series_uid: &str) {
        let now = self.clock.now();
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending.insert(
            (study_uid.to_string(), series_uid.to_string()),
            Pending { last_seen: now },
        );
    }

    /// Number of series not yet handed over.
    pub fn pending(&self) -> usize {
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Hands every complete series to `sink`: image series first, then SEGs whose image series
    /// has been handed over.
    pub fn poll(&self, sink: &dyn SeriesSink) -> Result<PollReport, AssembleError> {
        let now = self.clock.now();
        let complete: Vec<(String, String)> = {
            let pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            pending
                .iter()
                .filter(|(_, p)| now.saturating_sub(p.last_seen) >= self.quiet)
                .map(|(k, _)| k.clone())
                .collect()
        };
        let mut report = PollReport::default();
        let mut segs = Vec::new();
        for key in complete {
            let dir = self.spool.join(&key.0).join(&key.1);
            let files = match dcm_files(&dir) {
                Ok(f) if !f.is_empty() => f,
                Ok(_) => {
                    self.forget(&key);
                    continue;
                }
                Err(e) => return Err(e),
            };
            match classify(&files[0]) {
                Ok(Kind::Image) => self.image(&key, &files, sink, &mut report)?,
                Ok(Kind::Seg { referenced_series }) => segs.push((key, files, referenced_series)),
                Err(reason) => self.refuse(&key, &reason, &mut report)?,
            }
        }
        for (key, files, referenced) in segs {
            self.seg(&key, &files, &referenced, sink, &mut report)?;
        }
        report.waiting = self.pending();
        Ok(report)
    }

    fn forget(&self, key: &(String, String)) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    fn refuse(
        &self,
        key: &(String, String),
        reason: &str,
        report: &mut PollReport,
    ) -> Result<(), AssembleError> {
        tracing::warn!(study = %key.0, series = %key.1, "series refused: {reason}");
        let to = self.spool.join(REFUSED_DIR).join(&key.0).join(&key.1);
        move_dir(&self.spool.join(&key.0).join(&key.1), &to)?;
        let path = to.join("reason.txt");
        write_synced(&path, format!("{reason}\n").as_bytes())?;
        self.forget(key);
        report.refused.push((key.1.clone(), reason.to_string()));
        Ok(())
    }

    fn image(
        &self,
        key: &(String, String),
        files: &[PathBuf],
        sink: &dyn SeriesSink,
        report: &mut PollReport,
    ) -> Result<(), AssembleError> {
        let series = match read_series(files) {
            Ok(s) => s,
            Err(e) => return self.refuse(key, &error_chain(&e), report),
        };
        let pseudonym = series.study.patient_id.clone();
        let assembled = AssembledSeries {
            case_id: case_id(&pseudonym, &series.series_uid),
            patient_pseudonym: pseudonym,
            study_uid: series.study_uid.clone(),
            series_uid: series.series_uid.clone(),
            modality: series.modality.clone(),
            instances: files.len(),
            image: series.volume,
            labels: None,
            seg_series_uid: None,
        };
        self.hand_over(key, assembled, sink, report)
    }

    fn seg(
        &self,
        key: &(String, String),
        files: &[PathBuf],
        referenced: &str,
        sink: &dyn SeriesSink,
        report: &mut PollReport,
    ) -> Result<(), AssembleError> {
        let image_dir = self.spool.join(DONE_DIR).join(&key.0).join(referenced);
        if !image_dir.is_dir() {
            let still_coming = self
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(&(key.0.clone(), referenced.to_string()));
            if still_coming {
                return Ok(()); // wait for the image series
            }
            return self.refuse(
                key,
                &format!("the SEG references series {referenced}, which was not received"),
                report,
            );
        }
        let image_files = dcm_files(&image_dir)?;
        let source = match read_series(&image_files) {
            Ok(s) => s,
            Err(e) => {
                return self.refuse(
                    key,
                    &format!("its image series: {}", error_chain(&e)),
                    report,
                )
            }
        };
        let mut labels: Option<Volume<u8>> = None;
        for f in files {
            match read_seg(f, &source) {
                Ok(l) => {
                    labels = Some(match labels {
                        // Several SEG instances: later non-zero labels win.
                        Some(mut acc) => {
                            for (a, b) in acc.data.iter_mut().zip(&l.data) {
                                if *b != 0 {
                                    *a = *b;
                                }
                            }
                            acc
                        }
                        None => l,
                    })
                }
                Err(e) => return self.refuse(key, &error_chain(&e), report),
            }
        }
        let pseudonym = source.study.patient_id.clone();
        let assembled = AssembledSeries {
            case_id: case_id(&pseudonym, &source.series_uid),
            patient_pseudonym: pseudonym,
            study_uid: source.study_uid.clone(),
            series_uid: source.series_uid.clone(),
            modality: source.modality.clone(),
            instances: image_files.len(),
            image: source.volume,
            labels,
            seg_series_uid: Some(key.1.clone()),
        };
        self.hand_over(key, assembled, sink, report)
    }

    fn hand_over(
        &self,
        key: &(String, String),
        assembled: AssembledSeries,
        sink: &dyn SeriesSink,
        report: &mut PollReport,
    ) -> Result<(), AssembleError> {
        let id = assembled.case_id.clone();
        match sink.import(assembled) {
            Ok(()) => {
                let to = self.spool.join(DONE_DIR).join(&key.0).join(&key.1);
                move_dir(&self.spool.join(&key.0).join(&key.1), &to)?;
                self.forget(key);
                tracing::info!(case = %id, "series imported");
                report.imported.push(id);
            }
            Err(reason) => {
                tracing::warn!(case = %id, "the store did not take the series (will retry): {reason}");
                // Retry after another quiet period.
                self.notify(&key.0, &key.1);
                report.deferred.push((key.1.clone(), reason));
            }
        }
        Ok(())
    }
}

/// The store's case id for a series: `<patient pseudonym>-<series UID>`.
pub fn case_id(patient_pseudonym: &str, series_uid: &str) -> String {
    let p: String = patient_pseudonym
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    if p.is_empty() {
        series_uid.to_string()
    } else {
        format!("{p}-{series_uid}")
    }
}

fn classify(file: &Path) -> Result<Kind, String> {
    let obj = dicom::object::OpenFileOptions::new()
        .read_until(Tag(0x7FE0, 0x0010))
        .open_file(file)
        .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    if text(&obj, Tag(0x0008, 0x0016)) != SEG_SOP_CLASS {
        return Ok(Kind::Image);
    }
    let referenced = obj
        .get(Tag(0x0008, 0x1115))
        .and_then(|e| e.items())
        .and_then(|items| items.first())
        .map(|item| text(item, Tag(0x0020, 0x000E)))
        .filter(|s| !s.is_empty())
        .ok_or_else(|| "the SEG has no ReferencedSeriesSequence".to_string())?;
    Ok(Kind::Seg {
        referenced_series: referenced,
    })
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), AssembleError> {
    let err = |source| AssembleError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::create(path).map_err(err)?;
    std::io::Write::write_all(&mut f, bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    if let Some(dir) = path.parent() {
        sync_dir(dir).map_err(err)?;
    }
    Ok(())
}

/// An error and its sources joined with ": ".
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let t = cause.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        source = cause.source();
    }
    s
}
