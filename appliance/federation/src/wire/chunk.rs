//! Splitting a weight payload into chunks that fit the broker's packet limit.

use super::*;

/// The header fields of an update that the sender chooses; [`split_update`] adds the sizes and
/// the checksum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateMeta {
    /// Unique among the origin's updates.
    pub update_id: u64,
    /// The site whose weights these are.
    pub origin: String,
    /// The model's version.
    pub model_version: u64,
    /// The round (0 outside rounds).
    pub round: u64,
    /// Aggregation weight.
    pub samples: u64,
    /// Why it is sent.
    pub purpose: UpdatePurpose,
    /// Payload encoding.
    pub format: WeightFormat,
    /// The model architecture's digest.
    pub layout_digest: [u8; 32],
}

impl UpdateMeta {
    /// The full header for `payload` cut into `chunk_bytes` pieces.
    pub fn header(&self, payload: &[u8], chunk_bytes: usize) -> UpdateHeader {
        let c = chunk_bytes.max(1);
        let chunk_count = payload.len().div_ceil(c).max(1);
        UpdateHeader {
            update_id: self.update_id,
            origin: self.origin.clone(),
            model_version: self.model_version,
            round: self.round,
            samples: self.samples,
            purpose: self.purpose,
            format: self.format,
            layout_digest: self.layout_digest,
            total_len: payload.len() as u64,
            chunk_count: u32::try_from(chunk_count).unwrap_or(u32::MAX),
            payload_sha256: Sha256::digest(payload).into(),
        }
    }
}

/// Cuts `payload` into chunks of `chunk_bytes` (the last one shorter; at least one chunk, and
/// `chunk_bytes` of 0 counts as 1). Use [`chunk_payload_budget`] for `chunk_bytes`.
pub fn split_update(meta: &UpdateMeta, payload: &[u8], chunk_bytes: usize) -> Vec<UpdateChunk> {
    let c = chunk_bytes.max(1);
    let header = meta.header(payload, c);
    if payload.is_empty() {
        return vec![UpdateChunk {
            update: header,
            index: 0,
            data: Vec::new(),
        }];
    }
    payload
        .chunks(c)
        .enumerate()
        .map(|(i, d)| UpdateChunk {
            update: header.clone(),
            index: i as u32,
            data: d.to_vec(),
        })
        .collect()
}

/// Bytes around a chunk's data in the largest possible MQTT PUBLISH of it:
///
/// - MQTT fixed header: 1 byte + remaining length ≤ 4 bytes = 5;
/// - variable header: topic length 2 + topic ≤ `cosilo/` (7) + federation (32) + `/updates/`
///   (9) + site (32) = 80, packet id 2, MQTT 5 property length and properties ≤ 64 (none are sent
///   by Cosilo; margin) → 148;
/// - envelope: magic 4, version 1, kind 1, sender 1 + 32, seq 8, time 8, body length 4,
///   signature 64 → 123;
/// - chunk body: update id 8, origin 1 + 32, version 8, round 8, samples 8, purpose 1,
///   format 1, digest 32, total length 8, chunk count 4, sha256 32, index 4, data length 4
///   → 159.
///
/// 5 + 148 + 123 + 159 = 435, rounded up to 512 for safety.
pub const CHUNK_OVERHEAD: usize = 512;

/// Data bytes per chunk so a sealed chunk, with its topic and MQTT headers, fits in a packet of
/// `max_packet_bytes`: `max_packet_bytes − CHUNK_OVERHEAD` (see [`CHUNK_OVERHEAD`]). Returns 0
/// when the limit is too small to carry any data.
pub fn chunk_payload_budget(max_packet_bytes: usize) -> usize {
    max_packet_bytes.saturating_sub(CHUNK_OVERHEAD)
}
