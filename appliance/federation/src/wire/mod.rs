//! The federation's wire format: signed, versioned messages as bytes, with no MQTT types.
//!
//! Every message is an [`Envelope`] (magic `CSLO`, format version, kind, sender, a per-sender
//! sequence number, the send time and a length-prefixed body) followed by an Ed25519 signature
//! over every preceding byte. [`seal`] encodes and signs; [`open`] checks the version, that the
//! sender is on the [`Roster`], the signature (strict verification) and only then decodes the
//! body. Decoding is total: any byte string gives a message or a typed [`WireError`], never a
//! panic, and no length read from the wire allocates more than the bytes actually present.
//! [`ReplayGuard`] refuses repeated or out-of-window messages; [`split_update`] and
//! [`Reassembler`] carry a weight payload as chunks that fit the broker's packet limit
//! ([`chunk_payload_budget`]); [`topics`] names the MQTT topics. The byte layout, per-topic QoS
//! and how each strategy uses the messages are specified in `docs/PROTOCOL.md`.
//!
//! Integers are little-endian; a string is a `u8` length and UTF-8 bytes; byte data is a `u32`
//! length and the bytes; lists are a `u16` count and the items.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use ed25519_dalek::Signature;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::keys::{validate_id, Roster, SiteKeys};
use super::weights::WeightFormat;

/// The first four bytes of every message.
pub const MAGIC: [u8; 4] = *b"CSLO";
/// The format version this code writes and reads.
pub const VERSION: u8 = 1;
/// Bytes of the Ed25519 signature that ends every message.
pub const SIGNATURE_LEN: usize = 64;
/// Longest id (site, federation) in bytes.
pub const MAX_ID: usize = 32;
/// Longest free-text string (e.g. a strategy name) in bytes.
pub const MAX_TEXT: usize = 255;

/// A message refused, or one that could not be encoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WireError {
    /// The bytes end before the field does.
    #[error("message truncated in {0}")]
    Truncated(&'static str),
    /// Not a Cosilo message.
    #[error("not a Cosilo message (bad magic)")]
    BadMagic,
    /// A format version this build does not read.
    #[error("unknown wire version {0} (this build reads {VERSION})")]
    UnknownVersion(u8),
    /// A message kind this build does not know.
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    /// An enum tag inside a body that this build does not know.
    #[error("unknown {what} tag {tag}")]
    UnknownTag {
        /// The field.
        what: &'static str,
        /// The tag found.
        tag: u8,
    },
    /// A well-framed message with an invalid field (bad id, bad UTF-8, trailing bytes, ...).
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The sender is not on the roster.
    #[error("sender {0:?} is not a member of the federation")]
    NotMember(String),
    /// The signature does not verify with the sender's roster key.
    #[error("bad signature on a message from {0}")]
    BadSignature(String),
    /// A presence message advertises a key other than the roster's for its sender.
    #[error("{0} advertises a public key that differs from the roster's")]
    KeyMismatch(String),
    /// A sequence number not above the last one accepted from this sender on this channel.
    #[error("replayed message from {sender}: seq {seq} <= last accepted {last}")]
    Replayed {
        /// The sender.
        sender: String,
        /// The message's sequence number.
        seq: u64,
        /// The highest accepted so far.
        last: u64,
    },
    /// A send time outside the accepted window around now.
    #[error("stale message from {sender}: sent at {sent_unix_ms} ms, now {now_unix_ms} ms, window {window_ms} ms")]
    Stale {
        /// The sender.
        sender: String,
        /// Its send time.
        sent_unix_ms: u64,
        /// The receiver's clock.
        now_unix_ms: u64,
        /// The accepted distance.
        window_ms: u64,
    },
    /// A chunk inconsistent with the others of its update.
    #[error("chunk of update {origin}/{update_id} refused: {reason}")]
    ChunkMismatch {
        /// The update's origin.
        origin: String,
        /// Its id.
        update_id: u64,
        /// What does not match.
        reason: String,
    },
    /// A reassembled payload whose SHA-256 differs from its header's.
    #[error("update {origin}/{update_id}: payload SHA-256 does not match its header")]
    Integrity {
        /// The update's origin.
        origin: String,
        /// Its id.
        update_id: u64,
    },
    /// A size beyond a configured limit.
    #[error("{what} of {size} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// What is too large.
        what: &'static str,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The reassembler holds as many partial updates or bytes as it may.
    #[error("reassembly capacity reached: {0}")]
    Capacity(String),
    /// A message that cannot be encoded (field too long, invalid id, sender ≠ key's site).
    #[error("cannot encode message: {0}")]
    Encode(String),
}

/// The kind byte of an envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Kind {
    /// [`Presence`].
    Presence = 1,
    /// [`UpdateChunk`].
    UpdateChunk = 2,
    /// [`Control`].
    Control = 3,
    /// [`Metrics`].
    Metrics = 4,
    /// A model announcement (an [`UpdateHeader`] without data; retained).
    ModelAnnouncement = 5,
}

impl Kind {
    fn from_u8(b: u8) -> Result<Self, WireError> {
        Ok(match b {
            1 => Kind::Presence,
            2 => Kind::UpdateChunk,
            3 => Kind::Control,
            4 => Kind::Metrics,
            5 => Kind::ModelAnnouncement,
            other => return Err(WireError::UnknownKind(other)),
        })
    }

    /// A short name (used in replay-guard keys and logs).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Presence => "presence",
            Kind::UpdateChunk => "update",
            Kind::Control => "control",
            Kind::Metrics => "metrics",
            Kind::ModelAnnouncement => "model",
        }
    }
}

/// A site's state, as it tells its peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SiteStatus {
    /// Connected, not yet part of a round.
    Joining = 0,
    /// Training locally.
    Training = 1,
    /// Waiting (between rounds, or done).
    Idle = 2,
    /// Leaving the federation (also the MQTT will message).
    Leaving = 3,
}

/// Why an update is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpdatePurpose {
    /// A BrainTorrent model pulled by a peer, or a gossip-avg model pushed to peers.
    BrainTorrent = 0,
    /// A FedAvg round's local update.
    FedAvgRound = 1,
    /// The model handed along the CIIL/IIL token ring.
    Token = 2,
    /// The site's current model, sent in answer to a `Pull` or to a newcomer.
    Announce = 3,
}

/// A site's periodic heartbeat (also sent on join and on leave).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    /// What the site is doing.
    pub status: SiteStatus,
    /// The version of the site's current model (increments with each local training or merge).
    pub model_version: u64,
    /// BrainTorrent's version vector: the version of each peer's model last merged.
    pub versions_seen: BTreeMap<String, u64>,
    /// Training samples (cases) the site holds: the aggregation weight.
    pub samples: u64,
    /// The current (or last) round.
    pub round: u64,
    /// The strategy the site runs (`braintorrent`, `fedavg`, `ciil`, `iil`, `local`).
    pub strategy: String,
    /// The site's public key; must equal the roster's.
    pub public_key: [u8; 32],
}

/// What every chunk of one update repeats, so any chunk can start its reassembly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateHeader {
    /// Unique among the origin's updates.
    pub update_id: u64,
    /// The site whose weights these are.
    pub origin: String,
    /// The version of that model.
    pub model_version: u64,
    /// The round it belongs to (0 outside rounds).
    pub round: u64,
    /// Training samples behind it: the aggregation weight.
    pub samples: u64,
    /// Why it is sent.
    pub purpose: UpdatePurpose,
    /// How the payload encodes the weights.
    pub format: WeightFormat,
    /// [`super::weights::Layout::digest`] of the model's architecture.
    pub layout_digest: [u8; 32],
    /// Payload bytes.
    pub total_len: u64,
    /// Number of chunks.
    pub chunk_count: u32,
    /// SHA-256 of the whole payload.
    pub payload_sha256: [u8; 32],
}

/// One piece of an update's payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateChunk {
    /// The update it belongs to.
    pub update: UpdateHeader,
    /// Its position, `0..chunk_count`.
    pub index: u32,
    /// Its bytes: payload `[index·c, min((index+1)·c, total_len))` for the sender's chunk size `c`.
    pub data: Vec<u8>,
}

/// Coordination messages (on the federation's control topic).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// CIIL/IIL: the token passes to `next`, who continues from update `update_id`.
    Token {
        /// The cycle through the ring.
        cycle: u32,
        /// Position of the sender in the ring.
        position: u32,
        /// The site that holds the token next.
        next: String,
        /// The update (sent on the sender's updates topic) that carries the model.
        update_id: u64,
    },
    /// FedAvg: a round opens; updates for it are accepted until the deadline.
    RoundOpen {
        /// The round.
        round: u64,
        /// When it closes.
        deadline_unix_ms: u64,
    },
    /// BrainTorrent: asks `from` for its model if newer than `have_version`.
    Pull {
        /// The peer asked.
        from: String,
        /// The version the asker has of that peer's model.
        have_version: u64,
    },
    /// The sender leaves the federation.
    Leave,
}

/// Aggregate evaluation numbers a site shares (never anything about a patient).
#[derive(Debug, Clone, PartialEq)]
pub struct Metrics {
    /// The round.
    pub round: u64,
    /// The model version scored.
    pub model_version: u64,
    /// Mean Dice per foreground class over the site's held-out cases (None: class absent).
    pub dice: Vec<Option<f64>>,
    /// Mean training loss, if known.
    pub loss: Option<f64>,
    /// Number of held-out cases scored.
    pub cases: u32,
}

/// The body of an envelope.
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    /// Heartbeat.
    Presence(Presence),
    /// Part of a weight update.
    UpdateChunk(UpdateChunk),
    /// Coordination.
    Control(Control),
    /// Evaluation numbers.
    Metrics(Metrics),
    /// The sender's latest model (header only; fetch it with `Pull`). Published retained.
    ModelAnnouncement(UpdateHeader),
}

impl Body {
    /// The body's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Body::Presence(_) => Kind::Presence,
            Body::UpdateChunk(_) => Kind::UpdateChunk,
            Body::Control(_) => Kind::Control,
            Body::Metrics(_) => Kind::Metrics,
            Body::ModelAnnouncement(_) => Kind::ModelAnnouncement,
        }
    }
}

/// One message: who sent it, when, its sequence number and its body.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// The wire format version ([`VERSION`]).
    pub version: u8,
    /// The sending site's id (must match the signing key's site).
    pub sender: String,
    /// Per-sender, strictly increasing across all the sender's messages (persisted by the daemon).
    pub seq: u64,
    /// The sender's clock when sending, milliseconds since the Unix epoch.
    pub sent_unix_ms: u64,
    /// What the message says.
    pub body: Body,
}

impl Envelope {
    /// An envelope of the current version.
    pub fn new(sender: &str, seq: u64, sent_unix_ms: u64, body: Body) -> Self {
        Envelope {
            version: VERSION,
            sender: sender.to_string(),
            seq,
            sent_unix_ms,
            body,
        }
    }

    /// The body's kind.
    pub fn kind(&self) -> Kind {
        self.body.kind()
    }
}

/// Milliseconds since the Unix epoch now (0 if the clock is before 1970).
pub fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

mod chunk;
mod codec;
mod reassembly;
mod replay;
#[cfg(test)]
mod tests;
pub mod topics;

pub use chunk::*;
pub use codec::*;
pub use reassembly::*;
pub use replay::*;
