//! Replay protection: refuses messages already seen or outside a time window.

use super::*;

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
