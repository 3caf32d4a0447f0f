//! Encoding ([`seal`]) and total decoding ([`open`]) of signed envelopes.

use super::*;

pub(super) struct Writer(pub(super) Vec<u8>);

impl Writer {
    pub(super) fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub(super) fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(super) fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(super) fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(super) fn f64(&mut self, v: f64) -> Result<(), WireError> {
        if !v.is_finite() {
            return Err(WireError::Encode(format!("non-finite number {v}")));
        }
        self.0.extend_from_slice(&v.to_le_bytes());
        Ok(())
    }
    pub(super) fn opt_f64(&mut self, v: Option<f64>) -> Result<(), WireError> {
        match v {
            None => self.u8(0),
            Some(x) => {
                self.u8(1);
                self.f64(x)?;
            }
        }
        Ok(())
    }
    pub(super) fn text(&mut self, s: &str, max: usize) -> Result<(), WireError> {
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
    pub(super) fn id(&mut self, s: &str) -> Result<(), WireError> {
        validate_id(s).map_err(|e| WireError::Encode(e.to_string()))?;
        self.text(s, MAX_ID)
    }
    pub(super) fn count(&mut self, n: usize, what: &str) -> Result<(), WireError> {
        let n = u16::try_from(n)
            .map_err(|_| WireError::Encode(format!("{n} {what} exceed {}", u16::MAX)))?;
        self.u16(n);
        Ok(())
    }
    pub(super) fn data(&mut self, d: &[u8]) -> Result<(), WireError> {
        let n = u32::try_from(d.len())
            .map_err(|_| WireError::Encode(format!("{} data bytes exceed 4 GiB", d.len())))?;
        self.u32(n);
        self.0.extend_from_slice(d);
        Ok(())
    }
}

pub(super) fn encode_header(w: &mut Writer, h: &UpdateHeader) -> Result<(), WireError> {
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

pub(super) fn encode_body(w: &mut Writer, body: &Body) -> Result<(), WireError> {
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
pub(super) fn encode_unsigned(env: &Envelope) -> Result<Vec<u8>, WireError> {
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

pub(super) fn body_size_hint(b: &Body) -> usize {
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

pub(super) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(super) fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        // `n` is bounded by what remains before anything is allocated.
        if self.buf.len() - self.pos < n {
            return Err(WireError::Truncated(what));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    pub(super) fn arr<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }
    pub(super) fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.take(1, what)?[0])
    }
    pub(super) fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.arr(what)?))
    }
    pub(super) fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }
    pub(super) fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }
    pub(super) fn f64(&mut self, what: &'static str) -> Result<f64, WireError> {
        let v = f64::from_le_bytes(self.arr(what)?);
        if !v.is_finite() {
            return Err(WireError::Malformed(format!("{what} is not finite")));
        }
        Ok(v)
    }
    pub(super) fn opt_f64(&mut self, what: &'static str) -> Result<Option<f64>, WireError> {
        match self.u8(what)? {
            0 => Ok(None),
            1 => Ok(Some(self.f64(what)?)),
            tag => Err(WireError::UnknownTag { what, tag }),
        }
    }
    pub(super) fn text(&mut self, what: &'static str) -> Result<String, WireError> {
        let n = self.u8(what)? as usize;
        let b = self.take(n, what)?;
        std::str::from_utf8(b)
            .map(str::to_string)
            .map_err(|_| WireError::Malformed(format!("{what} is not UTF-8")))
    }
    pub(super) fn id(&mut self, what: &'static str) -> Result<String, WireError> {
        let s = self.text(what)?;
        validate_id(&s).map_err(|e| WireError::Malformed(format!("{what}: {e}")))?;
        Ok(s)
    }
    pub(super) fn data(&mut self, what: &'static str) -> Result<Vec<u8>, WireError> {
        let n = self.u32(what)? as usize;
        Ok(self.take(n, what)?.to_vec())
    }
    pub(super) fn done(&self, what: &'static str) -> Result<(), WireError> {
        if self.pos != self.buf.len() {
            return Err(WireError::Malformed(format!(
                "{} trailing bytes after {what}",
                self.buf.len() - self.pos
            )));
        }
        Ok(())
    }
}

pub(super) fn decode_header(r: &mut Reader) -> Result<UpdateHeader, WireError> {
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

pub(super) fn decode_body(kind: Kind, r: &mut Reader) -> Result<Body, WireError> {
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
pub(super) struct Frame<'a> {
    sender: String,
    kind: Kind,
    seq: u64,
    sent_unix_ms: u64,
    body: &'a [u8],
    signed: &'a [u8],
    signature: [u8; SIGNATURE_LEN],
}

pub(super) fn parse_frame(bytes: &[u8]) -> Result<Frame<'_>, WireError> {
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
