//! The journal's on-disk format: a segment header, then 4 KiB-aligned records
//! (magic, generation, path and data lengths, CRC-32, path, data), read back up to the first
//! invalid one (a torn tail, or stale data of an older generation).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path};

use super::{
    JournalError, RECORD_ALIGN, RECORD_HEADER_BYTES, RECORD_MAGIC, SEGMENT_HEADER_BYTES,
    SEGMENT_MAGIC,
};

/// The valid contents of one segment file (see [`scan_segment`]).
#[derive(Debug, Clone)]
pub struct SegmentScan {
    /// The header's generation; `None` if the header is not valid.
    pub generation: Option<u64>,
    /// Valid records of that generation in order: (offset, relative path, data length).
    pub records: Vec<(u64, String, u64)>,
    /// Offset just past the last valid record (where the next one would go).
    pub tail: u64,
}

/// The bytes of one record as written at a 4 KiB-aligned offset (unpadded).
pub fn encode_record(generation: u64, rel_path: &str, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(RECORD_HEADER_BYTES + rel_path.len() + data.len());
    out.extend_from_slice(&RECORD_MAGIC.to_le_bytes());
    out.extend_from_slice(&generation.to_le_bytes());
    out.extend_from_slice(&(rel_path.len() as u32).to_le_bytes());
    out.extend_from_slice(&(data.len() as u64).to_le_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(&out[4..24]);
    h.update(rel_path.as_bytes());
    h.update(data);
    out.extend_from_slice(&h.finalize().to_le_bytes());
    out.extend_from_slice(rel_path.as_bytes());
    out.extend_from_slice(data);
    out
}

pub(super) fn align(n: u64) -> u64 {
    n.div_ceil(RECORD_ALIGN) * RECORD_ALIGN
}

pub(super) fn header_bytes(generation: u64) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[..8].copy_from_slice(SEGMENT_MAGIC);
    h[8..16].copy_from_slice(&generation.to_le_bytes());
    let crc = crc32fast::hash(&h[..16]);
    h[16..].copy_from_slice(&crc.to_le_bytes());
    h
}

/// A decoded record: offset, path, data.
pub(super) type Record = (u64, String, Vec<u8>);

/// Reads the header and every valid record of the current generation, stopping at the first
/// invalid one (the torn tail or stale data of an older generation).
pub(super) fn read_records(
    file: &File,
    path: &Path,
    want_data: bool,
) -> Result<(Option<u64>, Vec<Record>, u64), JournalError> {
    let read_err = |source| JournalError::Read {
        path: path.to_path_buf(),
        source,
    };
    let size = file.metadata().map_err(read_err)?.len();
    let mut head = [0u8; 20];
    if size < SEGMENT_HEADER_BYTES || file.read_exact_at(&mut head, 0).is_err() {
        return Ok((None, Vec::new(), SEGMENT_HEADER_BYTES));
    }
    let generation = u64::from_le_bytes(head[8..16].try_into().unwrap_or_default());
    if &head[..8] != SEGMENT_MAGIC || head != header_bytes(generation) {
        return Ok((None, Vec::new(), SEGMENT_HEADER_BYTES));
    }
    let mut records = Vec::new();
    let mut off = SEGMENT_HEADER_BYTES;
    while off + RECORD_HEADER_BYTES as u64 <= size {
        let mut rh = [0u8; RECORD_HEADER_BYTES];
        file.read_exact_at(&mut rh, off).map_err(read_err)?;
        let magic = u32::from_le_bytes([rh[0], rh[1], rh[2], rh[3]]);
        let gen = u64::from_le_bytes(rh[4..12].try_into().unwrap_or_default());
        let plen = u32::from_le_bytes([rh[12], rh[13], rh[14], rh[15]]) as u64;
        let dlen = u64::from_le_bytes(rh[16..24].try_into().unwrap_or_default());
        let crc = u32::from_le_bytes([rh[24], rh[25], rh[26], rh[27]]);
        let end = off
            .saturating_add(RECORD_HEADER_BYTES as u64)
            .saturating_add(plen)
            .saturating_add(dlen);
        if magic != RECORD_MAGIC || gen != generation || plen > 4096 || end > size {
            break;
        }
        let mut body = vec![0u8; (plen + dlen) as usize];
        file.read_exact_at(&mut body, off + RECORD_HEADER_BYTES as u64)
            .map_err(read_err)?;
        let mut h = crc32fast::Hasher::new();
        h.update(&rh[4..24]);
        h.update(&body);
        if h.finalize() != crc {
            break;
        }
        let data = body.split_off(plen as usize);
        let Ok(rel) = String::from_utf8(body) else {
            break;
        };
        records.push((off, rel, if want_data { data } else { Vec::new() }));
        off = align(end);
    }
    Ok((Some(generation), records, off))
}

/// Reads a segment file without changing it (for tests and inspection).
pub fn scan_segment(path: &Path) -> Result<SegmentScan, JournalError> {
    let file = File::open(path).map_err(|source| JournalError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let (generation, recs, tail) = read_records(&file, path, false)?;
    let mut records = Vec::new();
    for (off, rel, _) in recs {
        let dlen = {
            let mut b = [0u8; 8];
            file.read_exact_at(&mut b, off + 16)
                .map_err(|source| JournalError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
            u64::from_le_bytes(b)
        };
        records.push((off, rel, dlen));
    }
    Ok(SegmentScan {
        generation,
        records,
        tail,
    })
}

/// A relative path made only of normal components.
pub(super) fn checked_rel(rel: &str) -> Result<&Path, JournalError> {
    let p = Path::new(rel);
    if rel.is_empty() || !p.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(JournalError::BadPath(rel.to_string()));
    }
    Ok(p)
}
