//! Inbound: what arrives from the broker. A message is opened (signature checked against the
//! roster), its sender's replay guard consulted, update chunks reassembled and decoded, and what
//! survives handed to the strategy. A refusal is counted and logged with its reason; it never
//! reaches a model.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use tracing::{debug, info, warn};

use super::outbound::now_ms;
use super::report::PeerSeen;
use super::{DaemonError, Site};
use cosilo_federation::keys::Roster;
use cosilo_federation::strategy::{Input, PeerModel, PeerStatus, Purpose};
use cosilo_federation::weights::EncodedWeights;
use cosilo_federation::wire::{
    self, Admission, Body, Control, Envelope, Reassembler, ReplayGuard, SiteStatus, UpdateChunk,
    UpdatePurpose, WireError,
};

fn from_purpose(p: UpdatePurpose) -> Option<Purpose> {
    match p {
        UpdatePurpose::BrainTorrent | UpdatePurpose::Announce => Some(Purpose::Gossip),
        UpdatePurpose::FedAvgRound => Some(Purpose::Round),
        UpdatePurpose::Token => Some(Purpose::Token),
    }
}

fn peer_status(s: SiteStatus) -> PeerStatus {
    match s {
        SiteStatus::Joining => PeerStatus::Joining,
        SiteStatus::Training => PeerStatus::Training,
        SiteStatus::Idle => PeerStatus::Idle,
        SiteStatus::Leaving => PeerStatus::Leaving,
    }
}

/// This site's receiving side.
pub(super) struct Inbound {
    pub roster: Roster,
    /// The highest seq per sender and kind.
    pub replay: ReplayGuard,
    pub reassembler: Reassembler,
    /// Own messages with a seq at most this are from an earlier run of this site (retained or
    /// still queued at the broker): the persisted seq, or the clock floor at start if higher.
    pub own_seq_floor: u64,
    /// Messages refused (bad signature, non-member, replay, malformed, wrong model).
    pub refused: u64,
    /// The same, by reason (the `reason` label of the refused-messages metric).
    pub refused_by: BTreeMap<&'static str, u64>,
    pub bytes_received: u64,
    /// Each peer's last presence message.
    pub seen: BTreeMap<String, PeerSeen>,
    /// Members removed by a roster change in this run: their messages are refused as `removed`.
    pub removed: BTreeSet<String>,
    /// Changed rosters refused (malformed, another federation, without this site's key).
    pub rosters_refused: u64,
}

impl Inbound {
    /// Counts a refusal for `reason`: "unopened" (signature, membership or format), "removed"
    /// (a member removed by a roster change while this site runs), "replay",
    /// "relayed" (a chunk of another site's update), "architecture" (another model's layout),
    /// "chunk" (reassembly), "weights" (the decoded update).
    fn refuse(&mut self, reason: &'static str) {
        self.refused += 1;
        *self.refused_by.entry(reason).or_default() += 1;
    }
}

impl Site {
    /// Hands `input` to the strategy and carries out what it asks for.
    pub(super) async fn handle(&mut self, input: Input) -> Result<(), DaemonError> {
        let actions = self.strategy.handle(input, now_ms());
        self.apply(actions).await
    }

    /// A message from the broker.
    pub(super) async fn message(
        &mut self,
        topic: String,
        payload: Vec<u8>,
        retained: bool,
    ) -> Result<(), DaemonError> {
        let Some(env) = self.admit(&topic, &payload, retained) else {
            return Ok(());
        };
        if env.sender == self.out.me {
            return self.own_message(&topic, env, retained).await;
        }
        match env.body {
            Body::Presence(p) => {
                self.inb.seen.insert(
                    env.sender.clone(),
                    PeerSeen {
                        status: p.status,
                        round: p.round,
                        model_version: p.model_version,
                        at: Instant::now(),
                    },
                );
                let input = Input::Presence {
                    site: env.sender,
                    status: peer_status(p.status),
                    model_version: p.model_version,
                    round: p.round,
                };
                self.handle(input).await?;
            }
            Body::UpdateChunk(chunk) => self.update_chunk(&env.sender, chunk).await?,
            Body::Control(Control::Pull { from, have_version }) => {
                if from == self.out.me {
                    if let Some(model) = self.out.last_gossip.clone() {
                        if model.model_version > have_version {
                            info!(peer = %env.sender, version = model.model_version, "answering a pull");
                            self.out.publish_model(model, false).await?;
                        }
                    }
                }
            }
            Body::Control(Control::Token { next, position, .. }) => {
                debug!(from = %env.sender, %next, position, "token passed");
            }
            Body::Control(Control::Leave) => {
                let input = Input::Presence {
                    site: env.sender,
                    status: PeerStatus::Leaving,
                    model_version: 0,
                    round: 0,
                };
                self.handle(input).await?;
            }
            Body::Control(_) => {}
            Body::ModelAnnouncement(h) => {
                if h.origin == env.sender {
                    let input = Input::Announced {
                        site: h.origin,
                        model_version: h.model_version,
                    };
                    self.handle(input).await?;
                }
            }
            Body::Metrics(m) => {
                debug!(from = %env.sender, round = m.round, "peer metrics");
            }
        }
        Ok(())
    }

    /// Opens a message and, unless it is this site's own, consults the replay guard: the
    /// envelope to act on, or None (refused, or a copy of the last message).
    fn admit(&mut self, topic: &str, payload: &[u8], retained: bool) -> Option<Envelope> {
        let inb = &mut self.inb;
        let env = match wire::open(payload, &inb.roster) {
            Ok(e) => e,
            Err(WireError::NotMember(sender)) if inb.removed.contains(&sender) => {
                inb.bytes_received += payload.len() as u64;
                inb.refuse("removed");
                warn!(%topic, %sender, reason = "removed from the roster", "refused a message from a removed member");
                return None;
            }
            Err(e) => {
                inb.bytes_received += payload.len() as u64;
                inb.refuse("unopened");
                warn!(%topic, reason = %e, "refused a message");
                return None;
            }
        };
        if env.sender == self.out.me {
            return Some(env);
        }
        inb.bytes_received += payload.len() as u64;
        match inb.replay.admit(&env, payload, now_ms()) {
            Ok(Admission::Fresh) => Some(env),
            Ok(Admission::Duplicate) => {
                // A QoS 1 redelivery (after a reconnect or a broker restart), not a replay.
                info!(%topic, sender = %env.sender, seq = env.seq, "dropped a copy of the last message (a redelivery or a replay)");
                None
            }
            Err(e) => {
                if !retained {
                    inb.refuse("replay");
                    warn!(%topic, sender = %env.sender, reason = %e, "refused a message");
                }
                None
            }
        }
    }

    /// A chunk of a peer's model: reassembled, checked once complete (length, finite values) and
    /// handed to the strategy still encoded: no decoded copy is made here.
    async fn update_chunk(&mut self, sender: &str, chunk: UpdateChunk) -> Result<(), DaemonError> {
        let inb = &mut self.inb;
        if chunk.update.origin != sender {
            inb.refuse("relayed");
            warn!(%sender, origin = %chunk.update.origin, "refused a chunk relayed for another site");
            return Ok(());
        }
        if chunk.update.layout_digest != self.out.layout.digest() {
            inb.refuse("architecture");
            warn!(%sender, "refused an update for another model architecture");
            return Ok(());
        }
        let complete = match inb.reassembler.offer(chunk, Instant::now()) {
            Ok(Some(c)) => c,
            Ok(None) => return Ok(()),
            Err(e) => {
                inb.refuse("chunk");
                warn!(%sender, reason = %e, "refused a chunk");
                return Ok(());
            }
        };
        let h = complete.header;
        let numel = self.out.layout.numel();
        let weights = match EncodedWeights::check(complete.payload, h.format, numel) {
            Ok(w) => w,
            Err(e) => {
                inb.refuse("weights");
                warn!(sender = %h.origin, reason = %e, "refused an update");
                return Ok(());
            }
        };
        let Some(purpose) = from_purpose(h.purpose) else {
            return Ok(());
        };
        debug!(origin = %h.origin, ?purpose, round = h.round, version = h.model_version, "model received");
        let input = Input::Model(PeerModel {
            origin: h.origin,
            purpose,
            model_version: h.model_version,
            round: h.round,
            samples: h.samples,
            weights,
        });
        self.handle(input).await
    }

    /// A message signed with this site's own key. This run's own messages come back through the
    /// federation-wide subscriptions and are dropped. One from an earlier run (its retained
    /// announcement or presence) is dropped too, but a retained announcement first tells the
    /// strategy the last version this site published (a restarted BrainTorrent site must not
    /// reuse it). Anything else was signed with this site's key by someone else.
    async fn own_message(
        &mut self,
        topic: &str,
        env: Envelope,
        retained: bool,
    ) -> Result<(), DaemonError> {
        if self.out.sent_seqs.contains(&env.seq) {
            return Ok(());
        }
        if env.seq > self.inb.own_seq_floor {
            warn!(
                %topic,
                seq = env.seq,
                kind = env.kind().name(),
                "a message signed with this site's key that this appliance did not send: key may be compromised"
            );
            return Ok(());
        }
        debug!(%topic, seq = env.seq, retained, "own message from before this run");
        if let Body::ModelAnnouncement(h) = env.body {
            if h.origin == self.out.me {
                let input = Input::Announced {
                    site: h.origin,
                    model_version: h.model_version,
                };
                self.handle(input).await?;
            }
        }
        Ok(())
    }
}
