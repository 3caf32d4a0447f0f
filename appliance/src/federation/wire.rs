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
    /// A BrainTorrent model pushed to, or pulled by, a peer.
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

// ---------------------------------------------------------------------------------------------
// Encoding

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn f64(&mut self, v: f64) -> Result<(), WireError> {
        if !v.is_finite() {
            return Err(WireError::Encode(format!("non-finite number {v}")));
        }
        self.0.extend_from_slice(&v.to_le_bytes());
        Ok(())
    }
    fn opt_f64(&mut self, v: Option<f64>) -> Result<(), WireError> {
        match v {
            None => self.u8(0),
            Some(x) => {
                self.u8(1);
                self.f64(x)?;
            }
        }
        Ok(())
    }
    fn text(&mut self, s: &str, max: usize) -> Result<(), WireError> {
        if s.len() > max {
            return Err(WireError::Encode(format!(
                "string of {} bytes exceeds {max}",
                s.len()
            )));
        }
        self.u8(s.len() as u8);
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
    fn id(&mut self, s: &str) -> Result<(), WireError> {
        validate_id(s).map_err(|e| WireError::Encode(e.to_string()))?;
        self.text(s, MAX_ID)
    }
    fn count(&mut self, n: usize, what: &str) -> Result<(), WireError> {
        let n = u16::try_from(n)
            .map_err(|_| WireError::Encode(format!("{n} {what} exceed {}", u16::MAX)))?;
        self.u16(n);
        Ok(())
    }
    fn data(&mut self, d: &[u8]) -> Result<(), WireError> {
        let n = u32::try_from(d.len())
            .map_err(|_| WireError::Encode(format!("{} data bytes exceed 4 GiB", d.len())))?;
        self.u32(n);
        self.0.extend_from_slice(d);
        Ok(())
    }
}

fn encode_header(w: &mut Writer, h: &UpdateHeader) -> Result<(), WireError> {
    w.u64(h.update_id);
    w.id(&h.origin)?;
    w.u64(h.model_version);
    w.u64(h.round);
    w.u64(h.samples);
    w.u8(h.purpose as u8);
    w.u8(h.format.code());
    w.0.extend_from_slice(&h.layout_digest);
    w.u64(h.total_len);
    w.u32(h.chunk_count);
    w.0.extend_from_slice(&h.payload_sha256);
    Ok(())
}

fn encode_body(w: &mut Writer, body: &Body) -> Result<(), WireError> {
    match body {
        Body::Presence(p) => {
            w.u8(p.status as u8);
            w.u64(p.model_version);
            w.count(p.versions_seen.len(), "version-vector entries")?;
            for (site, v) in &p.versions_seen {
                w.id(site)?;
                w.u64(*v);
            }
            w.u64(p.samples);
            w.u64(p.round);
            w.text(&p.strategy, MAX_TEXT)?;
            w.0.extend_from_slice(&p.public_key);
        }
        Body::UpdateChunk(c) => {
            encode_header(w, &c.update)?;
            w.u32(c.index);
            w.data(&c.data)?;
        }
        Body::Control(c) => match c {
            Control::Token {
                cycle,
                position,
                next,
                update_id,
            } => {
                w.u8(1);
                w.u32(*cycle);
                w.u32(*position);
                w.id(next)?;
                w.u64(*update_id);
            }
            Control::RoundOpen {
                round,
                deadline_unix_ms,
            } => {
                w.u8(2);
                w.u64(*round);
                w.u64(*deadline_unix_ms);
            }
            Control::Pull { from, have_version } => {
                w.u8(3);
                w.id(from)?;
                w.u64(*have_version);
            }
            Control::Leave => w.u8(4),
        },
        Body::Metrics(m) => {
            w.u64(m.round);
            w.u64(m.model_version);
            w.count(m.dice.len(), "dice values")?;
            for d in &m.dice {
                w.opt_f64(*d)?;
            }
            w.opt_f64(m.loss)?;
            w.u32(m.cases);
        }
        Body::ModelAnnouncement(h) => encode_header(w, h)?,
    }
    Ok(())
}

/// The signed part of a message (everything but the signature).
fn encode_unsigned(env: &Envelope) -> Result<Vec<u8>, WireError> {
    let mut w = Writer(Vec::with_capacity(128 + body_size_hint(&env.body)));
    w.0.extend_from_slice(&MAGIC);
    w.u8(env.version);
    w.u8(env.kind() as u8);
    w.id(&env.sender)?;
    w.u64(env.seq);
    w.u64(env.sent_unix_ms);
    let len_at = w.0.len();
    w.u32(0);
    encode_body(&mut w, &env.body)?;
    let body_len = u32::try_from(w.0.len() - len_at - 4)
        .map_err(|_| WireError::Encode("body exceeds 4 GiB".into()))?;
    w.0[len_at..len_at + 4].copy_from_slice(&body_len.to_le_bytes());
    Ok(w.0)
}

fn body_size_hint(b: &Body) -> usize {
    match b {
        Body::UpdateChunk(c) => 160 + c.data.len(),
        _ => 256,
    }
}

/// Encodes `env` and signs it with `keys`. Fails if `env.sender` is not `keys`' site, on an
/// invalid id, a string too long, or a non-finite metric.
pub fn seal(env: &Envelope, keys: &SiteKeys) -> Result<Vec<u8>, WireError> {
    if env.version != VERSION {
        return Err(WireError::Encode(format!(
            "this build writes version {VERSION}, not {}",
            env.version
        )));
    }
    if env.sender != keys.site() {
        return Err(WireError::Encode(format!(
            "envelope sender {:?} is not the signing key's site {:?}",
            env.sender,
            keys.site()
        )));
    }
    let mut bytes = encode_unsigned(env)?;
    let sig = keys.sign(&bytes);
    bytes.extend_from_slice(&sig);
    Ok(bytes)
}

// ---------------------------------------------------------------------------------------------
// Decoding

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        // `n` is bounded by what remains before anything is allocated.
        if self.buf.len() - self.pos < n {
            return Err(WireError::Truncated(what));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.arr(what)?))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }
    fn f64(&mut self, what: &'static str) -> Result<f64, WireError> {
        let v = f64::from_le_bytes(self.arr(what)?);
        if !v.is_finite() {
            return Err(WireError::Malformed(format!("{what} is not finite")));
        }
        Ok(v)
    }
    fn opt_f64(&mut self, what: &'static str) -> Result<Option<f64>, WireError> {
        match self.u8(what)? {
            0 => Ok(None),
            1 => Ok(Some(self.f64(what)?)),
            tag => Err(WireError::UnknownTag { what, tag }),
        }
    }
    fn text(&mut self, what: &'static str) -> Result<String, WireError> {
        let n = self.u8(what)? as usize;
        let b = self.take(n, what)?;
        std::str::from_utf8(b)
            .map(str::to_string)
            .map_err(|_| WireError::Malformed(format!("{what} is not UTF-8")))
    }
    fn id(&mut self, what: &'static str) -> Result<String, WireError> {
        let s = self.text(what)?;
        validate_id(&s).map_err(|e| WireError::Malformed(format!("{what}: {e}")))?;
        Ok(s)
    }
    fn data(&mut self, what: &'static str) -> Result<Vec<u8>, WireError> {
        let n = self.u32(what)? as usize;
        Ok(self.take(n, what)?.to_vec())
    }
    fn done(&self, what: &'static str) -> Result<(), WireError> {
        if self.pos != self.buf.len() {
            return Err(WireError::Malformed(format!(
                "{} trailing bytes after {what}",
                self.buf.len() - self.pos
            )));
        }
        Ok(())
    }
}

fn decode_header(r: &mut Reader) -> Result<UpdateHeader, WireError> {
    let update_id = r.u64("update id")?;
    let origin = r.id("origin")?;
    let model_version = r.u64("model version")?;
    let round = r.u64("round")?;
    let samples = r.u64("samples")?;
    let purpose = match r.u8("purpose")? {
        0 => UpdatePurpose::BrainTorrent,
        1 => UpdatePurpose::FedAvgRound,
        2 => UpdatePurpose::Token,
        3 => UpdatePurpose::Announce,
        tag => {
            return Err(WireError::UnknownTag {
                what: "purpose",
                tag,
            })
        }
    };
    let fcode = r.u8("format")?;
    let format = WeightFormat::from_code(fcode).ok_or(WireError::UnknownTag {
        what: "weight format",
        tag: fcode,
    })?;
    Ok(UpdateHeader {
        update_id,
        origin,
        model_version,
        round,
        samples,
        purpose,
        format,
        layout_digest: r.arr("layout digest")?,
        total_len: r.u64("total length")?,
        chunk_count: r.u32("chunk count")?,
        payload_sha256: r.arr("payload sha256")?,
    })
}

fn decode_body(kind: Kind, r: &mut Reader) -> Result<Body, WireError> {
    Ok(match kind {
        Kind::Presence => {
            let status = match r.u8("status")? {
                0 => SiteStatus::Joining,
                1 => SiteStatus::Training,
                2 => SiteStatus::Idle,
                3 => SiteStatus::Leaving,
                tag => {
                    return Err(WireError::UnknownTag {
                        what: "status",
                        tag,
                    })
                }
            };
            let model_version = r.u64("model version")?;
            let n = r.u16("version vector")?;
            let mut versions_seen = BTreeMap::new();
            for _ in 0..n {
                let site = r.id("version vector site")?;
                let v = r.u64("version vector entry")?;
                if versions_seen.insert(site, v).is_some() {
                    return Err(WireError::Malformed("duplicate version-vector site".into()));
                }
            }
            Body::Presence(Presence {
                status,
                model_version,
                versions_seen,
                samples: r.u64("samples")?,
                round: r.u64("round")?,
                strategy: r.text("strategy")?,
                public_key: r.arr("public key")?,
            })
        }
        Kind::UpdateChunk => Body::UpdateChunk(UpdateChunk {
            update: decode_header(r)?,
            index: r.u32("chunk index")?,
            data: r.data("chunk data")?,
        }),
        Kind::Control => Body::Control(match r.u8("control")? {
            1 => Control::Token {
                cycle: r.u32("cycle")?,
                position: r.u32("position")?,
                next: r.id("next")?,
                update_id: r.u64("update id")?,
            },
            2 => Control::RoundOpen {
                round: r.u64("round")?,
                deadline_unix_ms: r.u64("deadline")?,
            },
            3 => Control::Pull {
                from: r.id("pull from")?,
                have_version: r.u64("have version")?,
            },
            4 => Control::Leave,
            tag => {
                return Err(WireError::UnknownTag {
                    what: "control",
                    tag,
                })
            }
        }),
        Kind::Metrics => {
            let round = r.u64("round")?;
            let model_version = r.u64("model version")?;
            let n = r.u16("dice count")?;
            let mut dice = Vec::new();
            for _ in 0..n {
                dice.push(r.opt_f64("dice")?);
            }
            Body::Metrics(Metrics {
                round,
                model_version,
                dice,
                loss: r.opt_f64("loss")?,
                cases: r.u32("cases")?,
            })
        }
        Kind::ModelAnnouncement => Body::ModelAnnouncement(decode_header(r)?),
    })
}

/// The framing of a message, parsed before its signature is checked.
struct Frame<'a> {
    sender: String,
    kind: Kind,
    seq: u64,
    sent_unix_ms: u64,
    body: &'a [u8],
    signed: &'a [u8],
    signature: [u8; SIGNATURE_LEN],
}

fn parse_frame(bytes: &[u8]) -> Result<Frame<'_>, WireError> {
    if bytes.len() < SIGNATURE_LEN {
        return Err(WireError::Truncated("signature"));
    }
    let (signed, sig) = bytes.split_at(bytes.len() - SIGNATURE_LEN);
    let mut r = Reader {
        buf: signed,
        pos: 0,
    };
    if r.take(4, "magic")? != MAGIC {
        return Err(WireError::BadMagic);
    }
    let version = r.u8("version")?;
    if version != VERSION {
        return Err(WireError::UnknownVersion(version));
    }
    let kind = Kind::from_u8(r.u8("kind")?)?;
    let sender = r.id("sender")?;
    let seq = r.u64("seq")?;
    let sent_unix_ms = r.u64("send time")?;
    let body_len = r.u32("body length")? as usize;
    let body = r.take(body_len, "body")?;
    r.done("body")?;
    let mut signature = [0u8; SIGNATURE_LEN];
    signature.copy_from_slice(sig);
    Ok(Frame {
        sender,
        kind,
        seq,
        sent_unix_ms,
        body,
        signed,
        signature,
    })
}

/// Checks and decodes a message: magic and version, sender on the roster, signature (strict
/// Ed25519 with the roster's key for the sender), then the body. A presence message must
/// advertise the roster's key. Does not check replay: see [`ReplayGuard`].
pub fn open(bytes: &[u8], roster: &Roster) -> Result<Envelope, WireError> {
    let frame = parse_frame(bytes)?;
    let key = roster
        .verifying_key(&frame.sender)
        .ok_or_else(|| WireError::NotMember(frame.sender.clone()))?;
    key.verify_strict(frame.signed, &Signature::from_bytes(&frame.signature))
        .map_err(|_| WireError::BadSignature(frame.sender.clone()))?;
    let mut r = Reader {
        buf: frame.body,
        pos: 0,
    };
    let body = decode_body(frame.kind, &mut r)?;
    r.done(frame.kind.name())?;
    if let Body::Presence(p) = &body {
        if &p.public_key != key.as_bytes() {
            return Err(WireError::KeyMismatch(frame.sender));
        }
    }
    Ok(Envelope {
        version: VERSION,
        sender: frame.sender,
        seq: frame.seq,
        sent_unix_ms: frame.sent_unix_ms,
        body,
    })
}

// ---------------------------------------------------------------------------------------------
// Replay protection

/// Refuses messages already seen or outside a time window.
///
/// Keeps, per sender and message kind, the highest sequence number accepted. Kinds travel on
/// different MQTT topics and MQTT orders messages only within a topic, so sequence numbers are
/// compared per (sender, kind): the sender's single counter still increases along each topic.
/// Messages whose send time is more than `window_ms` away from the receiver's clock (either way)
/// are refused as stale, except retained model announcements, whose freshness is their model
/// version. Serialisable so the daemon can persist it across restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayGuard {
    /// Accepted distance between send time and the receiver's clock.
    pub window_ms: u64,
    /// Highest accepted seq per `"{sender}/{kind}"`.
    last: BTreeMap<String, u64>,
    /// SHA-256 of the message last accepted per `"{sender}/{kind}"` (tells an exact
    /// redelivery from a replay; absent in checkpoints written before it existed).
    #[serde(default)]
    digests: BTreeMap<String, [u8; 32]>,
}

/// What [`ReplayGuard::admit`] decided about a message it did not refuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// A message not seen before; its seq is recorded.
    Fresh,
    /// The very message accepted last from this sender on this channel (same seq, same bytes)
    /// delivered again, as an MQTT QoS 1 redelivery after a reconnect or a broker restart: not a
    /// replay, but nothing new either.
    Duplicate,
}

impl ReplayGuard {
    /// A guard with an empty history.
    pub fn new(window: Duration) -> Self {
        ReplayGuard {
            window_ms: window.as_millis() as u64,
            last: BTreeMap::new(),
            digests: BTreeMap::new(),
        }
    }

    fn key(sender: &str, kind: Kind) -> String {
        format!("{sender}/{}", kind.name())
    }

    /// The highest accepted seq from `sender` for `kind`.
    pub fn last_seq(&self, sender: &str, kind: Kind) -> Option<u64> {
        self.last.get(&Self::key(sender, kind)).copied()
    }

    /// Checks `env` without recording it.
    pub fn check(&self, env: &Envelope, now_unix_ms: u64) -> Result<(), WireError> {
        if let Some(&last) = self.last.get(&Self::key(&env.sender, env.kind())) {
            if env.seq <= last {
                return Err(WireError::Replayed {
                    sender: env.sender.clone(),
                    seq: env.seq,
                    last,
                });
            }
        }
        if env.kind() != Kind::ModelAnnouncement
            && env.sent_unix_ms.abs_diff(now_unix_ms) > self.window_ms
        {
            return Err(WireError::Stale {
                sender: env.sender.clone(),
                sent_unix_ms: env.sent_unix_ms,
                now_unix_ms,
                window_ms: self.window_ms,
            });
        }
        Ok(())
    }

    /// Checks `env` and, if accepted, records its seq.
    pub fn accept(&mut self, env: &Envelope, now_unix_ms: u64) -> Result<(), WireError> {
        self.check(env, now_unix_ms)?;
        self.last
            .insert(Self::key(&env.sender, env.kind()), env.seq);
        Ok(())
    }

    /// Like [`accept`](Self::accept), but tells an exact redelivery of the message accepted last
    /// on its channel (same sender, kind and seq, and the same sealed `bytes`) apart as
    /// [`Admission::Duplicate`] instead of refusing it. A lower seq, or the same seq with other
    /// bytes, is still refused as [`WireError::Replayed`].
    pub fn admit(
        &mut self,
        env: &Envelope,
        bytes: &[u8],
        now_unix_ms: u64,
    ) -> Result<Admission, WireError> {
        let key = Self::key(&env.sender, env.kind());
        let digest: [u8; 32] = Sha256::digest(bytes).into();
        if self.last.get(&key) == Some(&env.seq) && self.digests.get(&key) == Some(&digest) {
            return Ok(Admission::Duplicate);
        }
        self.check(env, now_unix_ms)?;
        self.last.insert(key.clone(), env.seq);
        self.digests.insert(key, digest);
        Ok(Admission::Fresh)
    }
}

// ---------------------------------------------------------------------------------------------
// Chunking

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

// ---------------------------------------------------------------------------------------------
// Reassembly

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
struct Partial {
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
const DONE_MEMORY: usize = 256;

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

// ---------------------------------------------------------------------------------------------
// Topics

/// MQTT topic names, all under `cosilo/{federation}/`. Ids are validated elsewhere
/// (`[a-z0-9_-]`), so they never contain `/`, `+` or `#`.
pub mod topics {
    /// `cosilo/{fed}/presence/{site}`: heartbeats (QoS 1, retained: the last state of each site).
    pub fn presence(fed: &str, site: &str) -> String {
        format!("cosilo/{fed}/presence/{site}")
    }
    /// `cosilo/{fed}/updates/{site}`: the site's update chunks (QoS 1, not retained).
    pub fn updates(fed: &str, site: &str) -> String {
        format!("cosilo/{fed}/updates/{site}")
    }
    /// `cosilo/{fed}/model/{site}`: the site's latest model announcement (QoS 1, retained).
    pub fn model(fed: &str, site: &str) -> String {
        format!("cosilo/{fed}/model/{site}")
    }
    /// `cosilo/{fed}/control`: tokens, round openings, pulls, leaves (QoS 1, not retained).
    pub fn control(fed: &str) -> String {
        format!("cosilo/{fed}/control")
    }
    /// `cosilo/{fed}/metrics/{site}`: evaluation numbers (QoS 1, not retained).
    pub fn metrics(fed: &str, site: &str) -> String {
        format!("cosilo/{fed}/metrics/{site}")
    }
    /// Filter for every site's presence.
    pub fn presence_all(fed: &str) -> String {
        format!("cosilo/{fed}/presence/+")
    }
    /// Filter for every site's updates.
    pub fn updates_all(fed: &str) -> String {
        format!("cosilo/{fed}/updates/+")
    }
    /// Filter for every site's model announcement.
    pub fn model_all(fed: &str) -> String {
        format!("cosilo/{fed}/model/+")
    }
    /// Filter for every site's metrics.
    pub fn metrics_all(fed: &str) -> String {
        format!("cosilo/{fed}/metrics/+")
    }
    /// Filter for everything in the federation.
    pub fn all(fed: &str) -> String {
        format!("cosilo/{fed}/#")
    }

    /// The filters a member subscribes to: presence, updates, models, control and metrics.
    pub fn member_filters(fed: &str) -> Vec<String> {
        vec![
            presence_all(fed),
            updates_all(fed),
            model_all(fed),
            control(fed),
            metrics_all(fed),
        ]
    }

    /// For a topic of federation `fed`, the channel (`presence`, `updates`, `model`, `control`,
    /// `metrics`) and the site it names (None for control). None for anything else.
    pub fn parse<'a>(fed: &str, topic: &'a str) -> Option<(&'a str, Option<&'a str>)> {
        let rest = topic
            .strip_prefix("cosilo/")?
            .strip_prefix(fed)?
            .strip_prefix('/')?;
        match rest.split_once('/') {
            None if rest == "control" => Some((rest, None)),
            Some((ch @ ("presence" | "updates" | "model" | "metrics"), site))
                if !site.is_empty() && !site.contains('/') =>
            {
                Some((ch, Some(site)))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn keys(site: &str, n: u8) -> SiteKeys {
        SiteKeys::from_seed(site, [n; 32]).unwrap()
    }

    fn roster(ks: &[&SiteKeys]) -> Roster {
        let mut s = "[federation]\nname = \"demo\"\n".to_string();
        for k in ks {
            s.push_str(&k.roster_entry());
        }
        Roster::parse(&s, "test").unwrap()
    }

    fn header(total_len: u64, chunk_count: u32) -> UpdateHeader {
        UpdateHeader {
            update_id: 77,
            origin: "h1".into(),
            model_version: 5,
            round: 3,
            samples: 40,
            purpose: UpdatePurpose::FedAvgRound,
            format: WeightFormat::F16Zstd,
            layout_digest: [9; 32],
            total_len,
            chunk_count,
            payload_sha256: [7; 32],
        }
    }

    fn all_bodies(k: &SiteKeys) -> Vec<Body> {
        let mut seen = BTreeMap::new();
        seen.insert("h2".to_string(), 4);
        seen.insert("h3".to_string(), 0);
        vec![
            Body::Presence(Presence {
                status: SiteStatus::Training,
                model_version: 12,
                versions_seen: seen,
                samples: 40,
                round: 2,
                strategy: "braintorrent".into(),
                public_key: k.public_bytes(),
            }),
            Body::UpdateChunk(UpdateChunk {
                update: header(10, 2),
                index: 1,
                data: vec![1, 2, 3, 4, 5],
            }),
            Body::Control(Control::Token {
                cycle: 2,
                position: 1,
                next: "h3".into(),
                update_id: 9,
            }),
            Body::Control(Control::RoundOpen {
                round: 4,
                deadline_unix_ms: 1_800_000_000_000,
            }),
            Body::Control(Control::Pull {
                from: "h2".into(),
                have_version: 3,
            }),
            Body::Control(Control::Leave),
            Body::Metrics(Metrics {
                round: 4,
                model_version: 12,
                dice: vec![Some(0.91), None, Some(0.5)],
                loss: Some(0.25),
                cases: 4,
            }),
            Body::Metrics(Metrics {
                round: 0,
                model_version: 0,
                dice: vec![],
                loss: None,
                cases: 0,
            }),
            Body::ModelAnnouncement(header(1_000_000, 100)),
        ]
    }

    #[test]
    fn every_message_kind_round_trips() {
        let k = keys("h1", 1);
        let r = roster(&[&k, &keys("h2", 2)]);
        for (i, body) in all_bodies(&k).into_iter().enumerate() {
            let env = Envelope::new("h1", 100 + i as u64, 1_700_000_000_000, body);
            let bytes = seal(&env, &k).unwrap();
            assert_eq!(&bytes[..4], b"CSLO");
            assert_eq!(bytes[4], VERSION);
            assert_eq!(bytes[5], env.kind() as u8);
            assert_eq!(open(&bytes, &r).unwrap(), env);
        }
    }

    #[test]
    fn non_members_and_wrong_keys_are_refused() {
        let h1 = keys("h1", 1);
        let h2 = keys("h2", 2);
        let r = roster(&[&h1, &h2]);
        let env = Envelope::new("h9", 1, 0, Body::Control(Control::Leave));
        let outsider = keys("h9", 9);
        let e = open(&seal(&env, &outsider).unwrap(), &r).unwrap_err();
        assert_eq!(e, WireError::NotMember("h9".into()));
        // h2's name signed with another key.
        let impostor = keys("h2", 3);
        let env = Envelope::new("h2", 1, 0, Body::Control(Control::Leave));
        let e = open(&seal(&env, &impostor).unwrap(), &r).unwrap_err();
        assert_eq!(e, WireError::BadSignature("h2".into()));
        // Sealing in someone else's name, or in another version, is refused at the source.
        assert!(matches!(seal(&env, &h1), Err(WireError::Encode(_))));
        let mut v2 = Envelope::new("h1", 1, 0, Body::Control(Control::Leave));
        v2.version = 2;
        assert!(matches!(seal(&v2, &h1), Err(WireError::Encode(_))));
        // A presence advertising another key than the roster's.
        let mut bodies = all_bodies(&h1);
        let Body::Presence(mut p) = bodies.remove(0) else {
            unreachable!()
        };
        p.public_key = h2.public_bytes();
        let env = Envelope::new("h1", 1, 0, Body::Presence(p));
        let e = open(&seal(&env, &h1).unwrap(), &r).unwrap_err();
        assert_eq!(e, WireError::KeyMismatch("h1".into()));
    }

    #[test]
    fn a_flipped_bit_anywhere_is_refused() {
        let k = keys("h1", 1);
        let r = roster(&[&k, &keys("h2", 2)]);
        for body in all_bodies(&k) {
            let bytes = seal(&Envelope::new("h1", 5, 6, body), &k).unwrap();
            for pos in 0..bytes.len() {
                for mask in [0x01u8, 0x80, 0xff] {
                    let mut m = bytes.clone();
                    m[pos] ^= mask;
                    assert!(open(&m, &r).is_err(), "flip {mask:#x} at {pos} accepted");
                }
            }
        }
    }

    #[test]
    fn every_truncation_and_extension_is_refused() {
        let k = keys("h1", 1);
        let r = roster(&[&k]);
        for body in all_bodies(&k) {
            let bytes = seal(&Envelope::new("h1", 5, 6, body), &k).unwrap();
            for len in 0..bytes.len() {
                assert!(open(&bytes[..len], &r).is_err(), "truncated to {len}");
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(open(&longer, &r).is_err());
        }
        assert_eq!(open(&[], &r), Err(WireError::Truncated("signature")));
    }

    /// The body parser itself must be total: mutate bodies and re-sign them validly, so the
    /// mutations get past the signature check.
    #[test]
    fn body_parser_is_total_on_signed_garbage() {
        let k = keys("h1", 1);
        let r = roster(&[&k, &keys("h2", 2), &keys("h3", 3)]);
        let mut rng = Rng::new(42);
        let mut outcomes = [0usize; 2];
        for body in all_bodies(&k) {
            let unsigned = encode_unsigned(&Envelope::new("h1", 1, 2, body)).unwrap();
            let body_at = 4 + 1 + 1 + 1 + 2 + 8 + 8 + 4;
            for _ in 0..400 {
                let mut m = unsigned.clone();
                let flips = 1 + rng.below(4);
                for _ in 0..flips {
                    let pos = body_at + rng.below(m.len() - body_at);
                    m[pos] = rng.next_u64() as u8;
                }
                if rng.below(3) == 0 {
                    // Random truncation of the body with a consistent length prefix.
                    let cut = body_at + rng.below(m.len() - body_at + 1);
                    m.truncate(cut);
                    let bl = (cut - body_at) as u32;
                    m[body_at - 4..body_at].copy_from_slice(&bl.to_le_bytes());
                }
                let sig = k.sign(&m);
                m.extend_from_slice(&sig);
                outcomes[open(&m, &r).is_ok() as usize] += 1;
            }
        }
        // Both outcomes occur: the loop exercised real parsing, not only early refusals.
        assert!(outcomes[0] > 0 && outcomes[1] > 0, "{outcomes:?}");
    }

    #[test]
    fn random_bytes_never_panic() {
        let k = keys("h1", 1);
        let r = roster(&[&k]);
        let mut rng = Rng::new(7);
        for _ in 0..2000 {
            let n = rng.below(300);
            let mut b: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
            if n > 6 && rng.below(2) == 0 {
                b[..4].copy_from_slice(&MAGIC);
                b[4] = VERSION;
                b[5] = 1 + rng.below(5) as u8;
            }
            assert!(open(&b, &r).is_err());
        }
        // A forged huge data length does not allocate: it is refused as truncated.
        let mut w = Writer(Vec::new());
        w.0.extend_from_slice(&MAGIC);
        w.u8(VERSION);
        w.u8(Kind::UpdateChunk as u8);
        w.id("h1").unwrap();
        w.u64(1);
        w.u64(1);
        w.u32(u32::MAX);
        let mut m = w.0;
        m.extend_from_slice(&[0; 64]);
        assert_eq!(open(&m, &r), Err(WireError::Truncated("body")));
    }

    #[test]
    fn unknown_version_and_kind_are_named() {
        let k = keys("h1", 1);
        let r = roster(&[&k]);
        let bytes = seal(
            &Envelope::new("h1", 1, 1, Body::Control(Control::Leave)),
            &k,
        )
        .unwrap();
        let mut v2 = bytes.clone();
        v2[4] = 2;
        assert_eq!(open(&v2, &r), Err(WireError::UnknownVersion(2)));
        let mut k9 = bytes.clone();
        k9[5] = 9;
        assert_eq!(open(&k9, &r), Err(WireError::UnknownKind(9)));
        let mut bad = bytes;
        bad[0] = b'X';
        assert_eq!(open(&bad, &r), Err(WireError::BadMagic));
    }

    #[test]
    fn encode_refuses_what_it_cannot_represent() {
        let k = keys("h1", 1);
        let mut bodies = all_bodies(&k);
        let Body::Presence(mut p) = bodies.remove(0) else {
            unreachable!()
        };
        p.strategy = "x".repeat(256);
        let e = seal(&Envelope::new("h1", 1, 1, Body::Presence(p)), &k);
        assert!(matches!(e, Err(WireError::Encode(_))));
        let m = Metrics {
            round: 0,
            model_version: 0,
            dice: vec![Some(f64::NAN)],
            loss: None,
            cases: 1,
        };
        assert!(seal(&Envelope::new("h1", 1, 1, Body::Metrics(m)), &k).is_err());
        let c = Control::Pull {
            from: "H/2".into(),
            have_version: 0,
        };
        assert!(seal(&Envelope::new("h1", 1, 1, Body::Control(c)), &k).is_err());
    }

    #[test]
    fn replay_guard_refuses_repeats_and_stale_messages() {
        let mut g = ReplayGuard::new(Duration::from_secs(60));
        let now = 1_700_000_000_000u64;
        let msg = |sender: &str, seq, at, body| Envelope::new(sender, seq, at, body);
        let leave = || Body::Control(Control::Leave);
        g.accept(&msg("h1", 5, now, leave()), now).unwrap();
        let e = g.accept(&msg("h1", 5, now, leave()), now).unwrap_err();
        assert!(matches!(
            e,
            WireError::Replayed {
                seq: 5,
                last: 5,
                ..
            }
        ));
        assert!(g.accept(&msg("h1", 4, now, leave()), now).is_err());
        g.accept(&msg("h1", 6, now, leave()), now).unwrap();
        // Another sender, and another kind of the same sender, have their own counters.
        g.accept(&msg("h2", 1, now, leave()), now).unwrap();
        let ann = Body::ModelAnnouncement(header(1, 1));
        g.accept(&msg("h1", 2, now, ann.clone()), now).unwrap();
        assert_eq!(g.last_seq("h1", Kind::Control), Some(6));
        assert_eq!(g.last_seq("h1", Kind::ModelAnnouncement), Some(2));
        // Outside the window, either way; a refused message is not recorded.
        let e = g
            .accept(&msg("h1", 7, now - 60_001, leave()), now)
            .unwrap_err();
        assert!(matches!(e, WireError::Stale { .. }));
        assert!(g.accept(&msg("h1", 8, now + 60_001, leave()), now).is_err());
        assert_eq!(g.last_seq("h1", Kind::Control), Some(6));
        g.accept(&msg("h1", 9, now - 60_000, leave()), now).unwrap();
        // Retained model announcements are judged by version, not age.
        g.accept(&msg("h1", 3, now - 86_400_000, ann), now).unwrap();
        // Persisted and restored, it still refuses.
        let json = serde_json::to_string(&g).unwrap();
        let back: ReplayGuard = serde_json::from_str(&json).unwrap();
        assert_eq!(back, g);
        assert!(back.check(&msg("h1", 9, now, leave()), now).is_err());
        assert!(back.check(&msg("h1", 10, now, leave()), now).is_ok());
    }

    #[test]
    fn replay_guard_tells_a_redelivery_from_a_replay() {
        // Regression: QoS 1 redeliveries after a broker restart were refused as replays.
        let k = keys("h1", 1);
        let mut g = ReplayGuard::new(Duration::from_secs(60));
        let now = 1_700_000_000_000u64;
        let sealed = |seq, body| {
            let env = Envelope::new("h1", seq, now, body);
            let bytes = seal(&env, &k).unwrap();
            (env, bytes)
        };
        let (e5, b5) = sealed(5, Body::Control(Control::Leave));
        assert_eq!(g.admit(&e5, &b5, now), Ok(Admission::Fresh));
        assert_eq!(g.admit(&e5, &b5, now), Ok(Admission::Duplicate));
        // The same seq with other bytes is a replay, and so is a lower seq.
        let (e5b, b5b) = sealed(
            5,
            Body::Control(Control::Pull {
                from: "h2".into(),
                have_version: 1,
            }),
        );
        assert!(matches!(
            g.admit(&e5b, &b5b, now),
            Err(WireError::Replayed {
                seq: 5,
                last: 5,
                ..
            })
        ));
        let (e4, b4) = sealed(4, Body::Control(Control::Leave));
        assert!(g.admit(&e4, &b4, now).is_err());
        let (e6, b6) = sealed(6, Body::Control(Control::Leave));
        assert_eq!(g.admit(&e6, &b6, now), Ok(Admission::Fresh));
        // Once a newer message is accepted, the older one is a replay again.
        assert!(g.admit(&e5, &b5, now).is_err());
        assert_eq!(g.admit(&e6, &b6, now), Ok(Admission::Duplicate));
        // The digest survives a checkpoint.
        let mut back: ReplayGuard =
            serde_json::from_str(&serde_json::to_string(&g).unwrap()).unwrap();
        assert_eq!(back.admit(&e6, &b6, now), Ok(Admission::Duplicate));
    }

    fn meta(id: u64) -> UpdateMeta {
        UpdateMeta {
            update_id: id,
            origin: "h1".into(),
            model_version: 3,
            round: 1,
            samples: 40,
            purpose: UpdatePurpose::BrainTorrent,
            format: WeightFormat::F16,
            layout_digest: [1; 32],
        }
    }

    fn payload(n: usize, seed: u64) -> Vec<u8> {
        let mut rng = Rng::new(seed);
        (0..n).map(|_| rng.next_u64() as u8).collect()
    }

    #[test]
    fn chunks_reassemble_in_any_order_with_duplicates() {
        let data = payload(10_000, 1);
        let chunks = split_update(&meta(1), &data, 999);
        assert_eq!(chunks.len(), 11);
        assert_eq!(chunks[10].data.len(), 10_000 - 999 * 10);
        let mut rng = Rng::new(3);
        for _ in 0..5 {
            let mut order: Vec<UpdateChunk> = chunks.clone();
            order.extend(chunks.iter().take(4).cloned()); // duplicates
            rng.shuffle(&mut order);
            let mut r = Reassembler::new(ReassemblyLimits::default());
            let t = Instant::now();
            let mut done = None;
            for c in order {
                if let Some(u) = r.offer(c, t).unwrap() {
                    assert!(done.is_none(), "completed twice");
                    done = Some(u);
                }
            }
            let u = done.expect("complete");
            assert_eq!(u.payload, data);
            assert_eq!(u.header.chunk_count, 11);
            assert_eq!(r.pending(), 0);
            assert_eq!(r.buffered_bytes(), 0);
        }
        // One chunk for a tiny payload, one empty chunk for an empty one.
        let mut r = Reassembler::new(ReassemblyLimits::default());
        let t = Instant::now();
        for (i, p) in [payload(5, 2), Vec::new()].into_iter().enumerate() {
            let cs = split_update(&meta(10 + i as u64), &p, 100);
            assert_eq!(cs.len(), 1);
            let u = r.offer(cs[0].clone(), t).unwrap().unwrap();
            assert_eq!(u.payload, p);
        }
    }

    #[test]
    fn chunks_survive_sealing() {
        let k = keys("h1", 1);
        let ro = roster(&[&k]);
        let data = payload(5000, 4);
        let budget = chunk_payload_budget(2048);
        let mut r = Reassembler::new(ReassemblyLimits::default());
        let mut out = None;
        for (i, c) in split_update(&meta(1), &data, budget)
            .into_iter()
            .enumerate()
        {
            let bytes = seal(&Envelope::new("h1", i as u64, 0, Body::UpdateChunk(c)), &k).unwrap();
            let Body::UpdateChunk(c) = open(&bytes, &ro).unwrap().body else {
                unreachable!()
            };
            out = r.offer(c, Instant::now()).unwrap().or(out);
        }
        assert_eq!(out.unwrap().payload, data);
    }

    #[test]
    fn a_missing_chunk_expires() {
        let limits = ReassemblyLimits {
            timeout: Duration::from_secs(10),
            ..Default::default()
        };
        let mut r = Reassembler::new(limits);
        let t0 = Instant::now();
        let chunks = split_update(&meta(5), &payload(3000, 5), 1000);
        r.offer(chunks[0].clone(), t0).unwrap();
        r.offer(chunks[2].clone(), t0).unwrap();
        assert_eq!(r.pending(), 1);
        assert_eq!(r.buffered_bytes(), 2000);
        assert!(r.expire(t0 + Duration::from_secs(10)).is_empty());
        assert_eq!(
            r.expire(t0 + Duration::from_secs(11)),
            vec![("h1".to_string(), 5)]
        );
        assert_eq!(r.pending(), 0);
        assert_eq!(r.buffered_bytes(), 0);
    }

    #[test]
    fn inconsistent_chunks_are_refused() {
        let t = Instant::now();
        let a = split_update(&meta(1), &payload(3000, 1), 1000);
        // Same origin and id, different payload (hence different sha256 header).
        let b = split_update(&meta(1), &payload(3000, 2), 1000);
        let mut r = Reassembler::new(ReassemblyLimits::default());
        r.offer(a[0].clone(), t).unwrap();
        let e = r.offer(b[1].clone(), t).unwrap_err();
        assert!(matches!(e, WireError::ChunkMismatch { .. }), "{e}");
        assert_eq!(r.pending(), 0, "a conflicting partial update is dropped");

        // Same header, tampered data: caught by the SHA-256.
        let mut r = Reassembler::new(ReassemblyLimits::default());
        let mut bad = a.clone();
        bad[1].data[0] ^= 1;
        r.offer(bad[0].clone(), t).unwrap();
        r.offer(bad[1].clone(), t).unwrap();
        let e = r.offer(bad[2].clone(), t).unwrap_err();
        assert!(matches!(e, WireError::Integrity { .. }), "{e}");

        // A duplicate index with different data.
        let mut r = Reassembler::new(ReassemblyLimits::default());
        r.offer(a[0].clone(), t).unwrap();
        let mut d = a[0].clone();
        d.data[5] ^= 1;
        assert!(matches!(
            r.offer(d, t),
            Err(WireError::ChunkMismatch { .. })
        ));

        // Sizes that cannot add up, indices out of range, forged counts.
        let mut r = Reassembler::new(ReassemblyLimits::default());
        let mut c = a[0].clone();
        c.data.truncate(900);
        assert!(r.offer(c, t).is_err());
        let mut c = a[2].clone();
        c.index = 3;
        assert!(r.offer(c, t).is_err());
        let mut c = a[0].clone();
        c.update.chunk_count = u32::MAX;
        assert!(r.offer(c, t).is_err());
        let mut c = a[2].clone();
        c.data.push(0);
        r.offer(a[0].clone(), t).unwrap();
        assert!(r.offer(c, t).is_err());
    }

    #[test]
    fn reassembly_is_bounded() {
        let t = Instant::now();
        let limits = ReassemblyLimits {
            max_update_bytes: 10_000,
            max_partial: 3,
            max_partial_per_origin: 2,
            max_buffered_bytes: 2400,
            timeout: Duration::from_secs(60),
        };
        let mut r = Reassembler::new(limits);
        let big = split_update(&meta(1), &payload(10_001, 1), 5000);
        assert!(matches!(
            r.offer(big[0].clone(), t),
            Err(WireError::TooLarge { .. })
        ));
        // Per origin: a third update from h1 evicts h1's oldest.
        for id in 1..=3u64 {
            let cs = split_update(&meta(id), &payload(2000, id), 500);
            r.offer(cs[0].clone(), t + Duration::from_millis(id))
                .unwrap();
        }
        assert_eq!(r.pending(), 2);
        assert_eq!(r.buffered_bytes(), 1000);
        // Over all origins.
        let other = |origin: &str, id| UpdateMeta {
            origin: origin.into(),
            ..meta(id)
        };
        r.offer(
            split_update(&other("h2", 1), &payload(2000, 9), 500)[0].clone(),
            t,
        )
        .unwrap();
        let e = r
            .offer(
                split_update(&other("h3", 1), &payload(2000, 9), 500)[0].clone(),
                t,
            )
            .unwrap_err();
        assert!(matches!(e, WireError::Capacity(_)), "{e}");
        // Bytes: 1500 held; 500 more fit, 500 after that would pass 2400.
        let cs = split_update(&other("h2", 1), &payload(2000, 9), 500);
        r.offer(cs[1].clone(), t).unwrap();
        let e = r.offer(cs[2].clone(), t).unwrap_err();
        assert!(matches!(e, WireError::Capacity(_)), "{e}");
        assert_eq!(r.buffered_bytes(), 2000);
        assert_eq!(r.pending(), 3);
        // A new update refused for bytes leaves no empty partial behind.
        let mut r = Reassembler::new(ReassemblyLimits {
            max_buffered_bytes: 400,
            ..limits
        });
        let e = r
            .offer(split_update(&meta(9), &payload(2000, 9), 500)[0].clone(), t)
            .unwrap_err();
        assert!(matches!(e, WireError::Capacity(_)), "{e}");
        assert_eq!(r.pending(), 0);
    }

    #[test]
    fn budgeted_chunks_fit_the_packet_limit() {
        // The longest ids, topic and header fields: the sealed chunk plus MQTT framing fits.
        let long = "a".repeat(MAX_ID);
        let k = SiteKeys::from_seed(&long, [1; 32]).unwrap();
        for max_packet in [1024usize, 10 * 1024, 1 << 20] {
            let budget = chunk_payload_budget(max_packet);
            assert!(budget > 0);
            let m = UpdateMeta {
                origin: long.clone(),
                update_id: u64::MAX,
                ..meta(1)
            };
            let chunks = split_update(&m, &payload(budget * 2 + 1, 3), budget);
            let sealed = seal(
                &Envelope::new(
                    &long,
                    u64::MAX,
                    u64::MAX,
                    Body::UpdateChunk(chunks[0].clone()),
                ),
                &k,
            )
            .unwrap();
            let topic = topics::updates(&long, &long);
            let remaining = 2 + topic.len() + 2 + sealed.len();
            let fixed = 1 + if remaining < 128 {
                1
            } else if remaining < 16384 {
                2
            } else {
                3
            };
            assert!(
                fixed + remaining <= max_packet,
                "{max_packet}: {}",
                fixed + remaining
            );
        }
        assert_eq!(chunk_payload_budget(100), 0);
    }

    #[test]
    fn topics_are_structured() {
        assert_eq!(topics::presence("demo", "h1"), "cosilo/demo/presence/h1");
        assert_eq!(topics::updates("demo", "h1"), "cosilo/demo/updates/h1");
        assert_eq!(topics::model("demo", "h1"), "cosilo/demo/model/h1");
        assert_eq!(topics::control("demo"), "cosilo/demo/control");
        assert_eq!(topics::metrics("demo", "h2"), "cosilo/demo/metrics/h2");
        assert_eq!(topics::all("demo"), "cosilo/demo/#");
        assert_eq!(topics::member_filters("demo").len(), 5);
        for t in [
            topics::presence("demo", "h1"),
            topics::updates("demo", "h1"),
            topics::model("demo", "h1"),
            topics::metrics("demo", "h1"),
        ] {
            let (ch, site) = topics::parse("demo", &t).unwrap();
            assert_eq!(site, Some("h1"));
            assert!(t.contains(ch));
        }
        assert_eq!(
            topics::parse("demo", "cosilo/demo/control"),
            Some(("control", None))
        );
        assert_eq!(topics::parse("demo", "cosilo/other/control"), None);
        assert_eq!(topics::parse("demo", "cosilo/demo/updates/h1/x"), None);
        assert_eq!(topics::parse("demo", "cosilo/demo/bogus/h1"), None);
        assert_eq!(topics::parse("demo", "cosilo/demo/updates/"), None);
    }
}
