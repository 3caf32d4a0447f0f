//! Model checkpoints: per training run, a numbered sequence of (metadata, weights) pairs.
//!
//! Keys are the run name, a zero byte, then the sequence number big-endian, so a run's checkpoints
//! sort by sequence. The last number handed out per run is kept separately, so numbers are never
//! reused after pruning. Metadata, weights and that counter are written in one transaction.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
use sled::IVec;

use super::{backend, sha256_hex, validate_name, Store, StoreError};

/// What is stored beside a checkpoint's weights.
#[derive(Debug, Serialize, Deserialize)]
struct CheckpointRecord {
    meta: serde_json::Value,
    weights_sha256: String,
    weights_len: u64,
    saved_at_unix: u64,
}

fn run_prefix(run: &str) -> Vec<u8> {
    let mut p = run.as_bytes().to_vec();
    p.push(0);
    p
}

pub(super) fn checkpoint_key(run: &str, seq: u64) -> Vec<u8> {
    let mut k = run_prefix(run);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn seq_of_key(run: &str, key: &[u8]) -> Option<u64> {
    let tail = key.get(run.len() + 1..)?;
    Some(u64::from_be_bytes(tail.try_into().ok()?))
}

fn tx_error(what: String, e: TransactionError<()>) -> StoreError {
    StoreError::Write {
        what,
        source: match e {
            TransactionError::Storage(e) => backend(e),
            TransactionError::Abort(()) => "transaction aborted".into(),
        },
    }
}

impl Store {
    /// Stores a checkpoint of training run `run` and returns its sequence number (1, 2, ...).
    /// The checkpoint is flushed to disk before this returns.
    pub fn put_checkpoint(
        &self,
        run: &str,
        meta: &serde_json::Value,
        weights: &[u8],
    ) -> Result<u64, StoreError> {
        validate_name("run name", run)?;
        let record = CheckpointRecord {
            meta: meta.clone(),
            weights_sha256: sha256_hex(weights),
            weights_len: weights.len() as u64,
            saved_at_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        let record = serde_json::to_vec(&record).map_err(|source| StoreError::Encode {
            what: format!("checkpoint metadata of run {run}"),
            source,
        })?;
        self.check_reserve(
            format!("checkpoint of run {run}"),
            (record.len() + weights.len()) as u64,
        )?;
        let record = IVec::from(record);
        let weights = IVec::from(weights);
        let seq = (
            &self.checkpoint_seq,
            &self.checkpoints,
            &self.checkpoint_weights,
        )
            .transaction(|(seqs, records, blobs)| {
                let last = match seqs.get(run.as_bytes())? {
                    Some(v) => <[u8; 8]>::try_from(v.as_ref()).map_or(0, u64::from_be_bytes),
                    None => 0,
                };
                let seq = last + 1;
                let key = checkpoint_key(run, seq);
                seqs.insert(run.as_bytes(), &seq.to_be_bytes())?;
                records.insert(key.as_slice(), record.clone())?;
                blobs.insert(key, weights.clone())?;
                Ok::<_, ConflictableTransactionError<()>>(seq)
            })
            .map_err(|e| tx_error(format!("checkpoint of run {run}"), e))?;
        self.flush()?;
        Ok(seq)
    }

    /// The newest checkpoint of `run`: (sequence, metadata, weights), with the weights checked
    /// against the SHA-256 recorded when they were stored.
    pub fn latest_checkpoint(
        &self,
        run: &str,
    ) -> Result<Option<(u64, serde_json::Value, Vec<u8>)>, StoreError> {
        let read_err = |e: sled::Error| StoreError::Read {
            what: format!("checkpoints of run {run}"),
            source: backend(e),
        };
        // A concurrent prune may remove the newest key between the scan and the read; retry then.
        for _ in 0..8 {
            let Some(item) = self.checkpoints.scan_prefix(run_prefix(run)).next_back() else {
                return Ok(None);
            };
            let (key, record) = item.map_err(read_err)?;
            let seq = seq_of_key(run, &key).ok_or_else(|| StoreError::CheckpointCorrupt {
                run: run.to_string(),
                seq: 0,
                reason: "malformed key".to_string(),
            })?;
            let corrupt = |reason: String| StoreError::CheckpointCorrupt {
                run: run.to_string(),
                seq,
                reason,
            };
            let Some(weights) = self.checkpoint_weights.get(&key).map_err(read_err)? else {
                if self.checkpoints.get(&key).map_err(read_err)?.is_none() {
                    continue;
                }
                return Err(corrupt("its weights are missing".to_string()));
            };
            let record: CheckpointRecord =
                serde_json::from_slice(&record).map_err(|source| StoreError::Decode {
                    what: format!("metadata of checkpoint {seq} of run {run}"),
                    source,
                })?;
            if weights.len() as u64 != record.weights_len {
                return Err(corrupt(format!(
                    "weights hold {} bytes, {} were stored",
                    weights.len(),
                    record.weights_len
                )));
            }
            if sha256_hex(&weights) != record.weights_sha256 {
                return Err(corrupt(
                    "weights do not match their recorded SHA-256".to_string(),
                ));
            }
            return Ok(Some((seq, record.meta, weights.to_vec())));
        }
        Err(StoreError::Read {
            what: format!("checkpoints of run {run}"),
            source: "the newest checkpoint kept disappearing while being read".into(),
        })
    }

    /// The sequence numbers of the stored checkpoints of `run`, oldest first.
    pub fn checkpoint_seqs(&self, run: &str) -> Result<Vec<u64>, StoreError> {
        let mut seqs = Vec::new();
        for key in self.checkpoints.scan_prefix(run_prefix(run)).keys() {
            let key = key.map_err(|e| StoreError::Read {
                what: format!("checkpoints of run {run}"),
                source: backend(e),
            })?;
            if let Some(seq) = seq_of_key(run, &key) {
                seqs.push(seq);
            }
        }
        Ok(seqs)
    }

    /// Removes all but the newest `keep_last` checkpoints of `run` (in one transaction) and
    /// flushes. Sequence numbers are not reused afterwards.
    pub fn prune_checkpoints(&self, run: &str, keep_last: usize) -> Result<(), StoreError> {
        let seqs = self.checkpoint_seqs(run)?;
        if seqs.len() <= keep_last {
            return Ok(());
        }
        let doomed: Vec<Vec<u8>> = seqs[..seqs.len() - keep_last]
            .iter()
            .map(|&s| checkpoint_key(run, s))
            .collect();
        (&self.checkpoints, &self.checkpoint_weights)
            .transaction(|(records, blobs)| {
                for key in &doomed {
                    records.remove(key.as_slice())?;
                    blobs.remove(key.as_slice())?;
                }
                Ok::<_, ConflictableTransactionError<()>>(())
            })
            .map_err(|e| tx_error(format!("pruning checkpoints of run {run}"), e))?;
        self.flush()
    }
}
