//! [`SeriesAssembler`]: the state of every series in the spool and the decisions the module doc
//! describes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cosilo_hardware::error_text::error_chain;
use cosilo_sdk::dicom::seg::read_seg;
use cosilo_sdk::dicom::series::{read_series, SeriesVolume};
use cosilo_sdk::volume::Volume;

use super::files::{
    classify, dcm_files, declared_count, mark_released, merge_into, move_dir, released, sub_dirs,
    write_synced, Kind,
};
use super::{
    case_id, AssembleError, AssembledSeries, Clock, PollReport, Replacement, SeriesSink,
    SinkOutcome, DONE_DIR, REFUSED_DIR,
};

/// `(study, series)`: pseudonymous UIDs, the spool's folder names.
type Key = (String, String);

/// What was last said at INFO about a waiting series, so that it is said once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Told {
    Nothing,
    Interrupted,
    ShortOfDeclared,
}

#[derive(Debug)]
struct Pending {
    last_seen: Duration,
    /// Associations delivering instances of it right now.
    open: usize,
    /// An association that delivered it ended without an A-RELEASE (or the bridge restarted
    /// before one did).
    interrupted: bool,
    /// When the sink first refused it (bounded by the incomplete wait).
    deferred_since: Option<Duration>,
    told: Told,
}

impl Pending {
    fn new(now: Duration, interrupted: bool) -> Pending {
        Pending {
            last_seen: now,
            open: 0,
            interrupted,
            deferred_since: None,
            told: Told::Nothing,
        }
    }
}

/// Groups spooled instances by study and series and hands complete series to a sink.
pub struct SeriesAssembler {
    spool: PathBuf,
    quiet: Duration,
    incomplete_wait: Duration,
    clock: Arc<dyn Clock>,
    pending: Mutex<BTreeMap<Key, Pending>>,
}

impl std::fmt::Debug for SeriesAssembler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeriesAssembler")
            .field("spool", &self.spool)
            .field("quiet", &self.quiet)
            .field("incomplete_wait", &self.incomplete_wait)
            .finish_non_exhaustive()
    }
}

/// `reason` with the folders the files were in removed: only file names remain (the folders
/// move to `refused/` or `done/`, so a path would soon be wrong).
fn without_dirs(reason: &str, dirs: &[&Path]) -> String {
    let mut out = reason.to_string();
    for d in dirs {
        out = out.replace(&format!("{}/", d.display()), "");
    }
    out
}

impl SeriesAssembler {
    /// The default bound on how long an incomplete series waits for its missing instances.
    pub const DEFAULT_INCOMPLETE_WAIT: Duration = Duration::from_secs(3600);

    /// An assembler over `spool`, declaring a series complete after `quiet` without new
    /// instances (and the other evidence in the module doc). Series already in the spool (from
    /// before a restart) are indexed as if their last instance arrived now; those without a
    /// clean-release marker covering all their instances are interrupted.
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
        let mut interrupted = 0;
        for study in sub_dirs(spool)? {
            for series in sub_dirs(&spool.join(&study))? {
                let dir = spool.join(&study).join(&series);
                let n = dcm_files(&dir)?.len();
                let clean = released(&dir, n);
                interrupted += usize::from(!clean);
                pending.insert((study.clone(), series), Pending::new(now, !clean));
            }
        }
        if !pending.is_empty() {
            tracing::info!(
                series = pending.len(),
                interrupted,
                "resuming series left in the spool {}",
                spool.display()
            );
        }
        Ok(SeriesAssembler {
            spool: spool.to_path_buf(),
            quiet,
            incomplete_wait: Self::DEFAULT_INCOMPLETE_WAIT,
            clock,
            pending: Mutex::new(pending),
        })
    }

    /// How long an incomplete series (interrupted, short of its declared count, or not taken by
    /// the sink) waits before it is refused.
    pub fn with_incomplete_wait(mut self, wait: Duration) -> Self {
        self.incomplete_wait = wait;
        self
    }

    /// The spool directory.
    pub fn spool(&self) -> &Path {
        &self.spool
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Key, Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that an instance of `series` (in `study`) has just been spooled.
    pub fn notify(&self, study_uid: &str, series_uid: &str) {
        let now = self.clock.now();
        self.lock()
            .entry((study_uid.to_string(), series_uid.to_string()))
            .or_insert_with(|| Pending::new(now, false))
            .last_seen = now;
    }

    /// An association starts delivering `series`: it is not complete before that association
    /// ends ([`SeriesAssembler::delivery_ended`]).
    pub fn delivery_started(&self, study_uid: &str, series_uid: &str) {
        let now = self.clock.now();
        let mut pending = self.lock();
        let p = pending
            .entry((study_uid.to_string(), series_uid.to_string()))
            .or_insert_with(|| Pending::new(now, false));
        p.open += 1;
        p.last_seen = now;
    }

    /// The association that delivered instances of `series` ended: with an A-RELEASE
    /// (`released`), or aborted / cut / timed out. A clean end is recorded in the series' folder.
    pub fn delivery_ended(&self, study_uid: &str, series_uid: &str, released: bool) {
        let now = self.clock.now();
        let key = (study_uid.to_string(), series_uid.to_string());
        let dir = self.spool.join(&key.0).join(&key.1);
        let mut pending = self.lock();
        let p = pending
            .entry(key)
            .or_insert_with(|| Pending::new(now, false));
        p.open = p.open.saturating_sub(1);
        p.last_seen = now;
        p.interrupted = !released;
        if released {
            mark_released(&dir, dcm_files(&dir).map(|f| f.len()).unwrap_or(0));
        }
    }

    /// Number of series not yet handed over.
    pub fn pending(&self) -> usize {
        self.lock().len()
    }

    fn forget(&self, key: &Key) {
        self.lock().remove(key);
    }

    /// Hands every complete series to `sink`: image series first, then SEGs whose image series
    /// has been handed over.
    pub fn poll(&self, sink: &dyn SeriesSink) -> Result<PollReport, AssembleError> {
        let now = self.clock.now();
        let quiet: Vec<(Key, bool, Duration)> = self
            .lock()
            .iter()
            .filter(|(_, p)| p.open == 0 && now.saturating_sub(p.last_seen) >= self.quiet)
            .map(|(k, p)| (k.clone(), p.interrupted, now.saturating_sub(p.last_seen)))
            .collect();
        let mut report = PollReport::default();
        let mut segs = Vec::new();
        for (key, interrupted, idle) in quiet {
            let dir = self.spool.join(&key.0).join(&key.1);
            self.resume_refused(&key, &dir)?;
            let files = dcm_files(&dir)?;
            if files.is_empty() {
                self.forget(&key);
                continue;
            }
            if interrupted {
                let why = "an association delivering it was aborted or cut (or the bridge \
                           stopped) before it ended with a release";
                self.incomplete(&key, Told::Interrupted, why, idle, &mut report)?;
                continue;
            }
            match classify(&files[0]) {
                Ok(Kind::Image { declared }) => {
                    self.image(&key, &files, declared, idle, sink, &mut report)?
                }
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

    /// Instances of `key` refused earlier join the new ones (a late slice fills a gap).
    fn resume_refused(&self, key: &Key, dir: &Path) -> Result<(), AssembleError> {
        let refused = self.spool.join(REFUSED_DIR).join(&key.0).join(&key.1);
        let earlier = dcm_files(&refused)?;
        if earlier.is_empty() {
            return Ok(());
        }
        let new = dcm_files(dir)?.len();
        // New instances win over refused copies of the same instance.
        for f in &earlier {
            if let Some(name) = f.file_name() {
                if dir.join(name).exists() {
                    let _ = std::fs::remove_file(f);
                }
            }
        }
        merge_into(&refused, dir)?;
        tracing::info!(series = %key.1, earlier = earlier.len(), new,
            "series refused earlier resumed with newly received instances");
        Ok(())
    }

    /// A series that is not complete yet: it waits (said once at INFO), and is refused when it
    /// has waited `incomplete_wait` since its last instance.
    fn incomplete(
        &self,
        key: &Key,
        state: Told,
        why: &str,
        idle: Duration,
        report: &mut PollReport,
    ) -> Result<(), AssembleError> {
        if idle >= self.incomplete_wait {
            let reason = format!(
                "incomplete: {why}; the rest did not arrive within {} s",
                self.incomplete_wait.as_secs()
            );
            return self.refuse(key, &reason, report);
        }
        let mut pending = self.lock();
        if let Some(p) = pending.get_mut(key) {
            if p.told != state {
                p.told = state;
                report.incomplete.push(key.clone());
                tracing::info!(series = %key.1, wait_s = self.incomplete_wait.as_secs(),
                    "series incomplete, waiting for the rest: {why}");
            }
        }
        Ok(())
    }

    fn refuse(
        &self,
        key: &Key,
        reason: &str,
        report: &mut PollReport,
    ) -> Result<(), AssembleError> {
        tracing::warn!(study = %key.0, series = %key.1, "series refused: {reason}");
        let to = self.spool.join(REFUSED_DIR).join(&key.0).join(&key.1);
        move_dir(&self.spool.join(&key.0).join(&key.1), &to)?;
        write_synced(&to.join("reason.txt"), format!("{reason}\n").as_bytes())?;
        self.forget(key);
        report.refused.push((key.1.clone(), reason.to_string()));
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn image(
        &self,
        key: &Key,
        files: &[PathBuf],
        declared: Option<usize>,
        idle: Duration,
        sink: &dyn SeriesSink,
        report: &mut PollReport,
    ) -> Result<(), AssembleError> {
        let dir = self.spool.join(&key.0).join(&key.1);
        let done_dir = self.spool.join(DONE_DIR).join(&key.0).join(&key.1);
        let done = dcm_files(&done_dir)?;
        let same_in_done = |f: &PathBuf| {
            f.file_name().is_some_and(|n| {
                let old = done_dir.join(n);
                old.is_file() && std::fs::read(&old).ok() == std::fs::read(f).ok()
            })
        };
        // A resend of what was imported changes nothing, unless the case was removed from the
        // store meanwhile: the sink decides (it answers Unchanged when it has the case).
        let unchanged = !done.is_empty() && files.iter().all(same_in_done);
        // The series as a whole: what was imported before, overlaid by what arrived now.
        let mut all: Vec<PathBuf> = done
            .iter()
            .filter(|d| d.file_name().is_none_or(|n| !dir.join(n).exists()))
            .cloned()
            .collect();
        all.extend_from_slice(files);
        if let Some(n) = declared.and_then(|d| declared_count(&all, d)) {
            if all.len() < n {
                let why = format!("it holds {} of the {n} instances it declares", all.len());
                return self.incomplete(key, Told::ShortOfDeclared, &why, idle, report);
            }
        }
        let series = match read_series(&all) {
            Ok(s) => s,
            Err(e) => {
                let reason = without_dirs(&error_chain(&e), &[&dir, &done_dir]);
                return self.refuse(key, &reason, report);
            }
        };
        let replaces = (!done.is_empty() && !unchanged).then(|| Replacement {
            previous_instances: done.len(),
            reason: format!(
                "series resent: {} instances where the case had {}",
                all.len(),
                done.len()
            ),
        });
        // An image imported before keeps the labels of a SEG already received for it.
        let (labels, seg_series_uid) = if done.is_empty() {
            (None, None)
        } else {
            self.labels_in_done(&key.0, &key.1, &series)
        };
        let pseudonym = series.study.patient_id.clone();
        let assembled = AssembledSeries {
            case_id: case_id(&pseudonym, &series.series_uid),
            patient_pseudonym: pseudonym,
            study_uid: series.study_uid.clone(),
            series_uid: series.series_uid.clone(),
            modality: series.modality.clone(),
            instances: all.len(),
            image: series.volume,
            labels,
            seg_series_uid,
            replaces,
        };
        self.hand_over(key, assembled, idle, sink, report)
    }

    /// Labels from a SEG series in `done/<study>/` that references `series_uid`, read onto
    /// `source`'s grid.
    fn labels_in_done(
        &self,
        study: &str,
        series_uid: &str,
        source: &SeriesVolume,
    ) -> (Option<Volume<u8>>, Option<String>) {
        let study_dir = self.spool.join(DONE_DIR).join(study);
        for seg in sub_dirs(&study_dir).unwrap_or_default() {
            let files = dcm_files(&study_dir.join(&seg)).unwrap_or_default();
            let refs = files.first().map(|f| classify(f));
            if let Some(Ok(Kind::Seg { referenced_series })) = refs {
                if referenced_series == series_uid {
                    if let Ok(l) = read_labels(&files, source) {
                        return (Some(l), Some(seg));
                    }
                }
            }
        }
        (None, None)
    }

    fn seg(
        &self,
        key: &Key,
        files: &[PathBuf],
        referenced: &str,
        sink: &dyn SeriesSink,
        report: &mut PollReport,
    ) -> Result<(), AssembleError> {
        let image_dir = self.spool.join(DONE_DIR).join(&key.0).join(referenced);
        if !image_dir.is_dir() {
            let still_coming = self
                .lock()
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
                let reason = without_dirs(&error_chain(&e), &[&image_dir]);
                return self.refuse(key, &format!("its image series: {reason}"), report);
            }
        };
        let labels = match read_labels(files, &source) {
            Ok(l) => l,
            Err(reason) => {
                let dir = self.spool.join(&key.0).join(&key.1);
                return self.refuse(key, &without_dirs(&reason, &[&dir]), report);
            }
        };
        let pseudonym = source.study.patient_id.clone();
        let assembled = AssembledSeries {
            case_id: case_id(&pseudonym, &source.series_uid),
            patient_pseudonym: pseudonym,
            study_uid: source.study_uid.clone(),
            series_uid: source.series_uid.clone(),
            modality: source.modality.clone(),
            instances: image_files.len(),
            image: source.volume,
            labels: Some(labels),
            seg_series_uid: Some(key.1.clone()),
            replaces: None,
        };
        self.hand_over(key, assembled, Duration::ZERO, sink, report)
    }

    fn hand_over(
        &self,
        key: &Key,
        assembled: AssembledSeries,
        idle: Duration,
        sink: &dyn SeriesSink,
        report: &mut PollReport,
    ) -> Result<(), AssembleError> {
        let id = assembled.case_id.clone();
        let replaced = assembled.replaces.clone();
        let instances = assembled.instances;
        match sink.import(assembled) {
            Ok(outcome) => {
                let from = self.spool.join(&key.0).join(&key.1);
                let to = self.spool.join(DONE_DIR).join(&key.0).join(&key.1);
                if to.is_dir() {
                    merge_into(&from, &to)?;
                } else {
                    move_dir(&from, &to)?;
                }
                self.forget(key);
                match (outcome, replaced) {
                    (SinkOutcome::Unchanged, _) => {
                        tracing::debug!(case = %id, "series handed over again; the store had it");
                        report.unchanged.push(id);
                    }
                    (SinkOutcome::Stored, Some(r)) => {
                        tracing::info!(case = %id, instances, previous = r.previous_instances,
                            "case replaced by a more complete series");
                        report.replaced.push(id.clone());
                        report.imported.push(id);
                    }
                    (SinkOutcome::Stored, None) => {
                        tracing::info!(case = %id, instances, "series imported");
                        report.imported.push(id);
                    }
                }
            }
            Err(e) => {
                let reason = error_chain(&e);
                let now = self.clock.now();
                let since = {
                    let mut pending = self.lock();
                    let p = pending
                        .entry(key.clone())
                        .or_insert_with(|| Pending::new(now, false));
                    p.last_seen = now; // retry after another quiet period
                    *p.deferred_since.get_or_insert(now.saturating_sub(idle))
                };
                if now.saturating_sub(since) >= self.incomplete_wait {
                    let why = format!(
                        "the store refused it for {} s: {reason}",
                        now.saturating_sub(since).as_secs()
                    );
                    return self.refuse(key, &why, report);
                }
                tracing::warn!(case = %id, "the store did not take the series (will retry): {reason}");
                report.deferred.push((key.1.clone(), reason));
            }
        }
        Ok(())
    }
}

/// The labels of a SEG series' instances on `source`'s grid (later non-zero labels win).
fn read_labels(files: &[PathBuf], source: &SeriesVolume) -> Result<Volume<u8>, String> {
    let mut labels: Option<Volume<u8>> = None;
    for f in files {
        let l = read_seg(f, source).map_err(|e| error_chain(&e))?;
        labels = Some(match labels {
            Some(mut acc) => {
                for (a, b) in acc.data.iter_mut().zip(&l.data) {
                    if *b != 0 {
                        *a = *b;
                    }
                }
                acc
            }
            None => l,
        });
    }
    labels.ok_or_else(|| "the SEG series has no instance".to_string())
}
