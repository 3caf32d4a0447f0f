//! The pseudonym → original mapping store (`pseudonyms.jsonl`, 0600), for the write-back path.

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
            inner: Mutex::new(MappingInner { file, map }),
        })
    }

    /// Where the mapping lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records pairs not yet known and fsyncs the file.
    pub(super) fn record(&self, pairs: &[(String, String)]) -> Result<(), DeidError> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut buf = Vec::new();
        let mut added = Vec::new();
        for (p, o) in pairs {
            if inner.map.contains_key(p) || added.iter().any(|(ap, _): &(String, String)| ap == p) {
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
        }
        if added.is_empty() {
            return Ok(());
        }
        let write_err = |source| DeidError::WriteMapping {
            path: self.path.clone(),
            source,
        };
        inner.file.write_all(&buf).map_err(write_err)?;
        inner.file.sync_data().map_err(write_err)?;
        inner.map.extend(added);
        Ok(())
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
