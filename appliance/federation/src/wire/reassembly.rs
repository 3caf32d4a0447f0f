//! Reassembling chunked updates, in any order, with limits and SHA-256 integrity.

use super::*;

/// Bounds on what a [`Reassembler`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReassemblyLimits {
    /// Largest payload accepted (bytes).
    pub max_update_bytes: u64,
    /// Partial updates held at once, over all origins.
    pub max_partial: usize,
    /// Partial updates held at once per origin; a newer one evicts that origin's oldest.
    pub max_partial_per_origin: usize,
    /// Chunk bytes buffered at once, over all partial updates.
    pub max_buffered_bytes: usize,
    /// A partial update not completed within this time is dropped by [`Reassembler::expire`].
    pub timeout: Duration,
}

impl Default for ReassemblyLimits {
    fn default() -> Self {
        ReassemblyLimits {
            max_update_bytes: 256 << 20,
            max_partial: 16,
            max_partial_per_origin: 2,
            max_buffered_bytes: 512 << 20,
            timeout: Duration::from_secs(120),
        }
    }
}

/// A reassembled, checksum-verified update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompleteUpdate {
    /// Its header.
    pub header: UpdateHeader,
    /// The payload (`header.total_len` bytes whose SHA-256 is `header.payload_sha256`).
    pub payload: Vec<u8>,
}

#[derive(Debug)]
pub(super) struct Partial {
    header: UpdateHeader,
    chunks: BTreeMap<u32, Vec<u8>>,
    bytes: usize,
    chunk_size: Option<usize>,
    started: Instant,
}

/// Collects chunks into whole updates: any order, duplicates ignored, headers checked for
/// consistency, sizes and SHA-256 verified, bounded in count and bytes, stale transfers expired.
#[derive(Debug)]
pub struct Reassembler {
    limits: ReassemblyLimits,
    partial: HashMap<(String, u64), Partial>,
    buffered: usize,
    /// Recently completed updates, so late duplicate chunks are ignored, not restarted.
    done: VecDeque<(String, u64)>,
}

/// How many completed update ids the reassembler remembers.
pub(super) const DONE_MEMORY: usize = 256;

impl Reassembler {
    /// An empty reassembler.
    pub fn new(limits: ReassemblyLimits) -> Self {
        Reassembler {
            limits,
            partial: HashMap::new(),
            buffered: 0,
            done: VecDeque::new(),
        }
    }

    /// Partial updates held.
    pub fn pending(&self) -> usize {
        self.partial.len()
    }

    /// Chunk bytes buffered.
    pub fn buffered_bytes(&self) -> usize {
        self.buffered
    }

    fn mismatch(h: &UpdateHeader, reason: impl Into<String>) -> WireError {
        WireError::ChunkMismatch {
            origin: h.origin.clone(),
            update_id: h.update_id,
            reason: reason.into(),
        }
    }

    /// Checks a chunk against its own header.
    fn check_alone(&self, c: &UpdateChunk) -> Result<(), WireError> {
        let h = &c.update;
        if h.total_len > self.limits.max_update_bytes {
            return Err(WireError::TooLarge {
                what: "update",
                size: h.total_len,
                limit: self.limits.max_update_bytes,
            });
        }
        if h.chunk_count == 0 || c.index >= h.chunk_count {
            return Err(Self::mismatch(
                h,
                format!("index {} of {} chunks", c.index, h.chunk_count),
            ));
        }
        if h.chunk_count as u64 > h.total_len.max(1) {
            return Err(Self::mismatch(
                h,
                format!("{} chunks for {} bytes", h.chunk_count, h.total_len),
            ));
        }
        if c.data.len() as u64 > h.total_len || (c.data.is_empty() && h.total_len > 0) {
            return Err(Self::mismatch(
                h,
                format!(
                    "{} data bytes in an update of {}",
                    c.data.len(),
                    h.total_len
                ),
            ));
        }
        Ok(())
    }

    /// Removes a partial update and releases its bytes.
    fn drop_partial(&mut self, key: &(String, u64)) {
        if let Some(p) = self.partial.remove(key) {
            self.buffered -= p.bytes;
        }
    }

    /// Takes one chunk. Returns the whole update when this chunk completes it, `None` while
    /// chunks are missing (or for a duplicate). A chunk inconsistent with the ones already held
    /// for the same (origin, update id) is refused and the partial update dropped.
    pub fn offer(
        &mut self,
        chunk: UpdateChunk,
        now: Instant,
    ) -> Result<Option<CompleteUpdate>, WireError> {
        self.check_alone(&chunk)?;
        let key = (chunk.update.origin.clone(), chunk.update.update_id);
        if self.done.contains(&key) {
            return Ok(None);
        }
        if !self.partial.contains_key(&key) {
            // Make room: a newer update from an origin evicts that origin's oldest.
            let mine: Vec<(Instant, (String, u64))> = self
                .partial
                .iter()
                .filter(|(k, _)| k.0 == key.0)
                .map(|(k, p)| (p.started, k.clone()))
                .collect();
            if mine.len() >= self.limits.max_partial_per_origin {
                if let Some((_, oldest)) = mine.into_iter().min() {
                    self.drop_partial(&oldest);
                }
            }
            if self.partial.len() >= self.limits.max_partial {
                return Err(WireError::Capacity(format!(
                    "{} partial updates held",
                    self.partial.len()
                )));
            }
            self.partial.insert(
                key.clone(),
                Partial {
                    header: chunk.update.clone(),
                    chunks: BTreeMap::new(),
                    bytes: 0,
                    chunk_size: None,
                    started: now,
                },
            );
        }
        match self.offer_to_partial(&key, chunk) {
            Ok(Some(())) => {}
            Ok(None) => return Ok(None),
            Err(e) => {
                // A capacity refusal keeps what the partial update already holds (unless it is
                // the empty one just made for this chunk); anything else discards it.
                let empty = self.partial.get(&key).is_some_and(|p| p.chunks.is_empty());
                if empty || !matches!(e, WireError::Capacity(_)) {
                    self.drop_partial(&key);
                }
                return Err(e);
            }
        }
        // Complete: concatenate and verify.
        let p = self
            .partial
            .remove(&key)
            .ok_or_else(|| WireError::Capacity("partial update vanished".into()))?;
        self.buffered -= p.bytes;
        self.done.push_back(key);
        if self.done.len() > DONE_MEMORY {
            self.done.pop_front();
        }
        let mut payload = Vec::with_capacity(p.bytes);
        for d in p.chunks.into_values() {
            payload.extend_from_slice(&d);
        }
        if payload.len() as u64 != p.header.total_len {
            return Err(Self::mismatch(
                &p.header,
                format!(
                    "{} bytes received, header says {}",
                    payload.len(),
                    p.header.total_len
                ),
            ));
        }
        let digest: [u8; 32] = Sha256::digest(&payload).into();
        if digest != p.header.payload_sha256 {
            return Err(WireError::Integrity {
                origin: p.header.origin,
                update_id: p.header.update_id,
            });
        }
        Ok(Some(CompleteUpdate {
            header: p.header,
            payload,
        }))
    }

    /// Adds a chunk to its partial update: `Some(())` when all chunks are in.
    fn offer_to_partial(
        &mut self,
        key: &(String, u64),
        chunk: UpdateChunk,
    ) -> Result<Option<()>, WireError> {
        let max_buffered = self.limits.max_buffered_bytes;
        let buffered = self.buffered;
        let p = self
            .partial
            .get_mut(key)
            .ok_or_else(|| WireError::Capacity("partial update vanished".into()))?;
        let h = &p.header;
        if chunk.update != *h {
            return Err(Self::mismatch(h, "header differs from earlier chunks"));
        }
        if let Some(d) = p.chunks.get(&chunk.index) {
            return if *d == chunk.data {
                Ok(None)
            } else {
                Err(Self::mismatch(
                    h,
                    format!("chunk {} arrived twice with different data", chunk.index),
                ))
            };
        }
        // Sizes: every chunk but the last has the same size c, and the last has the rest.
        let last = chunk.index + 1 == h.chunk_count;
        if !last {
            match p.chunk_size {
                Some(c) if c != chunk.data.len() => {
                    return Err(Self::mismatch(h, "chunks of different sizes"));
                }
                _ => {
                    let c = chunk.data.len() as u64;
                    if h.total_len.div_ceil(c) != h.chunk_count as u64 {
                        return Err(Self::mismatch(
                            h,
                            format!(
                                "{} chunks of {c} bytes cannot make {}",
                                h.chunk_count, h.total_len
                            ),
                        ));
                    }
                    p.chunk_size = Some(chunk.data.len());
                }
            }
        }
        if let Some(c) = p.chunk_size {
            let rest = h.total_len - c as u64 * (h.chunk_count as u64 - 1);
            let last_len = if last {
                Some(chunk.data.len())
            } else {
                p.chunks.get(&(h.chunk_count - 1)).map(Vec::len)
            };
            if last_len.is_some_and(|l| l as u64 != rest) {
                return Err(Self::mismatch(h, "last chunk has the wrong size"));
            }
        }
        if p.bytes as u64 + chunk.data.len() as u64 > h.total_len {
            return Err(Self::mismatch(h, "more bytes than the header's total"));
        }
        if buffered + chunk.data.len() > max_buffered {
            return Err(WireError::Capacity(format!(
                "{buffered} bytes buffered, limit {max_buffered}"
            )));
        }
        p.bytes += chunk.data.len();
        self.buffered += chunk.data.len();
        p.chunks.insert(chunk.index, chunk.data);
        Ok((p.chunks.len() as u64 == h.chunk_count as u64).then_some(()))
    }

    /// Drops partial updates started more than the timeout before `now`; returns their
    /// (origin, update id).
    pub fn expire(&mut self, now: Instant) -> Vec<(String, u64)> {
        let timeout = self.limits.timeout;
        let old: Vec<(String, u64)> = self
            .partial
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.started) > timeout)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &old {
            self.drop_partial(k);
        }
        old
    }
}
