//! The pseudonym → original mapping store (`pseudonyms.jsonl`, 0600), for the write-back path.
//!
//! Two kinds of lines, one file. A pseudonym that only this table can map back (the patient's,
//! and the study, series, frame of reference and other UIDs of an instance) is fdatasynced
//! before [`MappingStore::record`] returns, so it is on the disk before the instance is
//! acknowledged. The pseudonym of the instance's own SOPInstanceUID is *deferred*: appended in
//! the same write but synced by the next durable record or [`MappingStore::sync`] (the bridge calls
//! it every poll interval), so a series costs one mapping sync, not one per instance. A deferred
//! line lost to a power cut is not lost information: the pseudonym is a keyed hash of the
//! original, and write-back recomputes it from the PACS's own instance list
//! ([`crate::writeback::recover_instance_uids`]) and records it again ([`MappingStore::recover`]).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{refuse_loose_mode, DeidError};

/// The reverse mapping from pseudonyms to originals, kept inside the hospital for the write-back
/// path: an append-only file of JSON lines (`{"p": pseudonym, "o": original}`, pseudonyms
/// prefixed `patient:` or `uid:`), fsynced before [`MappingStore::record`] returns.
pub struct MappingStore {
    path: PathBuf,
    inner: Mutex<MappingInner>,
}

struct MappingInner {
    file: File,
    map: HashMap<String, String>,
    /// Deferred lines written but not yet synced.
    dirty: bool,
    /// fdatasyncs issued since opening (for tests and the receive benchmark).
    syncs: u64,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct MappingLine {
    p: String,
    o: String,
}

impl MappingStore {
    /// The file name of the mapping inside the bridge's state directory.
    pub const FILE_NAME: &'static str = "pseudonyms.jsonl";

    /// Opens (or creates, mode 0600) the mapping in `dir`, reading what it holds. A mapping
    /// readable by group or others is refused ([`DeidError::Permissions`]). A torn last line (a crash
    /// mid-append) is ignored; any other damaged line is an error.
    pub fn open(dir: &Path) -> Result<MappingStore, DeidError> {
        let path = dir.join(Self::FILE_NAME);
        let open_err = |source| DeidError::OpenMapping {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(open_err)?;
        let mut options = OpenOptions::new();
        options.create(true).read(true).append(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = options.open(&path).map_err(open_err)?;
        refuse_loose_mode(&path, open_err)?;
        let mut map = HashMap::new();
        let lines: Vec<String> = BufReader::new(&file)
            .split(b'\n')
            .map(|l| l.map(|b| String::from_utf8_lossy(&b).into_owned()))
            .collect::<Result<_, _>>()
            .map_err(open_err)?;
        let n = lines.len();
        for (i, line) in lines.iter().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<MappingLine>(line) {
                Ok(l) => {
                    map.insert(l.p, l.o);
                }
                Err(_) if i + 1 == n => {} // torn final append
                Err(e) => {
                    return Err(DeidError::CorruptMapping {
                        path: path.clone(),
                        line: i + 1,
                        reason: e.to_string(),
                    })
                }
            }
        }
        Ok(MappingStore {
            path,
            inner: Mutex::new(MappingInner {
                file,
                map,
                dirty: false,
                syncs: 0,
            }),
        })
    }

    /// Where the mapping lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records the pairs not yet known. When one of `durable` is new, the file (with any deferred
    /// lines before it) is fdatasynced before this returns; new pairs of `deferred` alone are
    /// written but synced later ([`MappingStore::sync`]).
    pub(super) fn record(
        &self,
        durable: &[(String, String)],
        deferred: &[(String, String)],
    ) -> Result<(), DeidError> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut buf = Vec::new();
        let mut added: Vec<(String, String)> = Vec::new();
        let mut must_sync = false;
        for (pairs, sync) in [(durable, true), (deferred, false)] {
            for (p, o) in pairs {
                if inner.map.contains_key(p) || added.iter().any(|(ap, _)| ap == p) {
                    continue;
                }
                let line = serde_json::to_string(&MappingLine {
                    p: p.clone(),
                    o: o.clone(),
                })
                .unwrap_or_default();
                buf.extend_from_slice(line.as_bytes());
                buf.push(b'\n');
                added.push((p.clone(), o.clone()));
                must_sync |= sync;
            }
        }
        if added.is_empty() {
            return Ok(());
        }
        let write_err = |source| DeidError::WriteMapping {
            path: self.path.clone(),
            source,
        };
        inner.file.write_all(&buf).map_err(write_err)?;
        if must_sync {
            inner.file.sync_data().map_err(write_err)?;
            inner.syncs += 1;
            inner.dirty = false;
        } else {
            inner.dirty = true;
        }
        inner.map.extend(added);
        Ok(())
    }

    /// Makes the deferred lines durable (nothing to do when there are none).
    pub fn sync(&self) -> Result<(), DeidError> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.dirty {
            inner
                .file
                .sync_data()
                .map_err(|source| DeidError::WriteMapping {
                    path: self.path.clone(),
                    source,
                })?;
            inner.syncs += 1;
            inner.dirty = false;
        }
        Ok(())
    }

    /// Records pairs recomputed after a loss (write-back's recovery of deferred lines), durably.
    pub fn recover(&self, pairs: &[(String, String)]) -> Result<(), DeidError> {
        self.record(pairs, &[])
    }

    /// fdatasyncs of the file since it was opened.
    pub fn syncs(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).syncs
    }

    /// The original PatientID behind a patient pseudonym.
    pub fn original_patient(&self, pseudonym: &str) -> Option<String> {
        self.lookup(&format!("patient:{pseudonym}"))
    }

    /// The original UID behind a pseudonymous UID.
    pub fn original_uid(&self, uid: &str) -> Option<String> {
        self.lookup(&format!("uid:{uid}"))
    }

    fn lookup(&self, key: &str) -> Option<String> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.map.get(key).cloned()
    }

    /// How many pseudonyms are recorded.
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map
            .len()
    }

    /// True when nothing is recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Debug for MappingStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappingStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(p: &str, o: &str) -> (String, String) {
        (p.to_string(), o.to_string())
    }

    #[test]
    fn deferred_lines_ride_on_the_next_sync_and_survive_a_reopen() {
        let d = tempfile::tempdir().unwrap();
        let m = MappingStore::open(d.path()).unwrap();
        let series = [pair("patient:P1", "MRN-1"), pair("uid:2.25.1", "1.2.3")];
        // The first instance of a series: its series-level pairs are new, so one sync.
        m.record(&series, &[pair("uid:2.25.10", "1.2.3.10")])
            .unwrap();
        assert_eq!(m.syncs(), 1);
        // Later instances add only their own UID: written, not synced.
        for k in 11..20 {
            m.record(
                &series,
                &[pair(&format!("uid:2.25.{k}"), &format!("1.2.3.{k}"))],
            )
            .unwrap();
        }
        assert_eq!(m.syncs(), 1, "no sync per instance");
        m.sync().unwrap();
        m.sync().unwrap();
        assert_eq!(
            m.syncs(),
            2,
            "one sync for the deferred lines, none when clean"
        );
        // A deferred line, then a durable pair: its sync carries the deferred line too.
        m.record(&[], &[pair("uid:2.25.20", "1.2.3.20")]).unwrap();
        m.recover(&[pair("uid:2.25.21", "1.2.3.21")]).unwrap();
        assert_eq!(m.syncs(), 3);
        drop(m);
        let back = MappingStore::open(d.path()).unwrap();
        assert_eq!(back.len(), 14, "2 series pairs, instances 10..=21");
        assert_eq!(back.original_uid("2.25.15").as_deref(), Some("1.2.3.15"));
        assert_eq!(back.original_patient("P1").as_deref(), Some("MRN-1"));
    }
}
