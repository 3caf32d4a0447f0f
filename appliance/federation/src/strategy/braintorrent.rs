//! BrainTorrent as published (Roy et al., 2019): serverless, pull-based, one initiator per step.
//!
//! Every site keeps its own model, its version `v` (local training rounds done) and a version
//! vector `V` (the version of each peer's model it merged last). Step `t` of `rounds`:
//!
//! 1. every site trains one round (`steps_per_round` steps; 0 in the site configuration means one
//!    local epoch) on its own cases, `v = t + 1`, and keeps the model ready for a pull
//!    ([`Action::Offer`]); nothing is pushed;
//! 2. one site, the step's **initiator**, is chosen by a seeded draw that every member computes
//!    from the roster and `t` alone ([`initiator`]): no coordinator, no token, no message;
//! 3. the initiator "pings" its peers (their presence announces their versions), waits until
//!    every live peer has trained step `t` (or the update timeout passes), pulls from every peer
//!    `j` whose version is newer than `V[j]`, and replaces its model by the sample-weighted average
//!    of its own and the pulled models (summed in site-id order); `V[j]` becomes the pulled
//!    version. **Only the initiator's model changes**; every other site goes on training its own.
//!
//! After its last step a site stays (answering pulls) until every peer has finished its own
//! steps, or the update timeout passes, then finishes with its own model: each site ends with
//! the model its own training and its own merges made (there is no final consensus average;
//! [`GossipAvg`](super::GossipAvg) is the push-style gossip that ends on one). Departures from
//! the paper: the paper's clients train "a few iterations" between steps, ours a round; the
//! initiator waits for each peer's step-`t` model, which the paper's synchronous simulation
//! assumes; a pulled model answers on the broker, so every peer receives (and ignores) it too.

use super::*;

/// The initiator of step `step`: a deterministic draw from the roster and the step number
/// (splitmix64 of an FNV-1a hash of the sorted site ids, mixed with the step), the same at every
/// site. `sites` must be sorted and non-empty.
pub fn initiator(sites: &[String], step: u64) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for s in sites {
        for b in s.bytes().chain(std::iter::once(0)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    let mut z = h ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z % sites.len().max(1) as u64) as usize
}

/// BrainTorrent with the paper's protocol.
pub struct BrainTorrent {
    pub(super) ctx: Context,
    pub(super) s: BrainTorrentState,
    /// This site's current model (shared with the session's, not copied).
    pub(super) own: Arc<Vec<f32>>,
    /// Each peer's newest model pulled, as it arrived (encoded): (version, samples, weights).
    pub(super) latest: BTreeMap<String, (u64, u64, EncodedWeights)>,
    /// Each peer's presence: (status, version, steps done).
    pub(super) peers: BTreeMap<String, (PeerStatus, u64, u64)>,
}

/// Where a site is in its current step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) enum Phase {
    /// Training the step's round.
    #[default]
    Training,
    /// Initiator: waiting for the peers' step models since this time (ms).
    Gathering { since_ms: u64 },
    /// All steps done: waiting for the peers to finish theirs since this time (ms).
    Finishing { since_ms: u64 },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct BrainTorrentState {
    /// Steps completed (trained, and merged when this site initiated them).
    pub(super) step: u64,
    /// This site's model version: local training rounds done.
    pub(super) version: u64,
    /// The version vector: the version of each peer's model merged last.
    pub(super) seen: BTreeMap<String, u64>,
    pub(super) phase: Phase,
    /// Versions asked for from each peer (initiator, this step).
    pub(super) pulled: BTreeMap<String, u64>,
    pub(super) done: bool,
}

impl BrainTorrent {
    fn is_initiator(&self, step: u64) -> bool {
        self.ctx.sites.get(initiator(&self.ctx.sites, step)) == Some(&self.ctx.me)
    }

    fn peer_gone(&self, p: &str) -> bool {
        self.peers
            .get(p)
            .is_some_and(|(status, _, _)| *status == PeerStatus::Leaving)
    }

    /// A peer's newest version as known from its presence or its models.
    fn peer_version(&self, p: &str) -> u64 {
        let announced = self.peers.get(p).map_or(0, |(_, v, _)| *v);
        let held = self.latest.get(p).map_or(0, |(v, _, _)| *v);
        announced.max(held)
    }

    /// Ends the step: the round is logged, then the next step trains (or the site finishes).
    fn end_step(&mut self, contributors: Vec<String>, now_ms: u64) -> Vec<Action> {
        let round = self.s.step;
        self.s.step += 1;
        let mut out = vec![Action::EndOfRound {
            round,
            contributors,
        }];
        if self.s.step >= self.ctx.rounds {
            self.s.phase = Phase::Finishing { since_ms: now_ms };
            out.extend(self.progress(now_ms));
        } else {
            self.s.phase = Phase::Training;
            out.push(Action::Train {
                steps: self.ctx.steps_per_round,
            });
        }
        out
    }

    /// Initiator: pulls what is missing, merges once every live peer's step model is in (or at
    /// the timeout).
    fn gather(&mut self, since_ms: u64, now_ms: u64) -> Vec<Action> {
        let want = self.s.version;
        let timeout = now_ms >= since_ms + self.ctx.update_timeout_ms;
        let mut out = Vec::new();
        let mut waiting = Vec::new();
        let peers: Vec<String> = self.ctx.peers().cloned().collect();
        for p in &peers {
            if self.peer_gone(p) {
                continue;
            }
            let version = self.peer_version(p);
            let held = self.latest.get(p).map_or(0, |(v, _, _)| *v);
            let merged = self.s.seen.get(p).copied().unwrap_or(0);
            if version < want {
                // The peer has not trained this step yet: ping again when its presence comes.
                waiting.push(p.clone());
            } else if held < version && version > merged {
                waiting.push(p.clone());
                if self.s.pulled.get(p).copied().unwrap_or(0) < version {
                    self.s.pulled.insert(p.clone(), version);
                    out.push(Action::Pull {
                        from: p.clone(),
                        have_version: held.max(merged),
                    });
                }
            }
        }
        if !waiting.is_empty() && !timeout {
            return out;
        }
        if !waiting.is_empty() {
            out.push(Action::Note(format!(
                "step {}: gave up waiting for {}",
                self.s.step + 1,
                waiting.join(", ")
            )));
        }
        out.extend(self.merge(now_ms));
        out
    }

    /// The initiator's merge: own + every peer model newer than the version vector.
    fn merge(&mut self, now_ms: u64) -> Vec<Action> {
        let mut models = Vec::new();
        let mut merged = Vec::new();
        for site in &self.ctx.sites {
            if *site == self.ctx.me {
                models.push((self.ctx.samples, Part::Own(self.own.clone())));
            } else if let Some((v, n, w)) = self.latest.get(site) {
                if *v > self.s.seen.get(site).copied().unwrap_or(0) {
                    models.push((*n, Part::Peer(w.clone())));
                    merged.push((site.clone(), *v));
                }
            }
        }
        let mut out = Vec::new();
        let mut contributors = vec![self.ctx.me.clone()];
        if !merged.is_empty() && !self.own.is_empty() {
            if let Some(avg) = average(models) {
                let names: Vec<String> = merged.iter().map(|(s, v)| format!("{s} v{v}")).collect();
                out.push(Action::Note(format!(
                    "step {} initiator: merged v{} with {}",
                    self.s.step + 1,
                    self.s.version,
                    names.join(", ")
                )));
                for (s, v) in merged {
                    self.s.seen.insert(s.clone(), v);
                    contributors.push(s);
                }
                let avg = Arc::new(avg);
                self.own = avg.clone();
                out.push(Action::SetModel(avg));
            }
        }
        self.s.pulled.clear();
        out.extend(self.end_step(contributors, now_ms));
        out
    }

    /// Moves on where waiting can end: the initiator's merge, or the end of the run.
    fn progress(&mut self, now_ms: u64) -> Vec<Action> {
        match self.s.phase {
            Phase::Training => Vec::new(),
            Phase::Gathering { since_ms } => self.gather(since_ms, now_ms),
            Phase::Finishing { since_ms } => {
                let rounds = self.ctx.rounds;
                let waiting: Vec<String> = self
                    .ctx
                    .peers()
                    .filter(|p| {
                        !self.peer_gone(p)
                            && self.peers.get(*p).is_none_or(|(_, _, step)| *step < rounds)
                    })
                    .cloned()
                    .collect();
                let timeout = now_ms >= since_ms + self.ctx.update_timeout_ms;
                if !waiting.is_empty() && !timeout {
                    return Vec::new();
                }
                let mut out = Vec::new();
                if !waiting.is_empty() {
                    out.push(Action::Note(format!(
                        "gave up waiting for {} to finish",
                        waiting.join(", ")
                    )));
                }
                self.s.done = true;
                out.push(Action::Finished);
                out
            }
        }
    }
}

impl Strategy for BrainTorrent {
    fn handle(&mut self, input: Input, now_ms: u64) -> Vec<Action> {
        if self.s.done {
            return if matches!(input, Input::Start { .. }) {
                vec![Action::Finished]
            } else {
                Vec::new()
            };
        }
        match input {
            Input::Start { weights } => {
                self.own = weights.values.clone();
                let mut out = Vec::new();
                if self.s.version > 0 {
                    out.push(Action::Offer {
                        model_version: self.s.version,
                        weights,
                    });
                }
                match self.s.phase {
                    Phase::Finishing { .. } => {
                        self.s.phase = Phase::Finishing { since_ms: now_ms };
                        out.extend(self.progress(now_ms));
                    }
                    // A step in progress (its model was not checkpointed) trains again.
                    Phase::Training | Phase::Gathering { .. } => {
                        self.s.phase = Phase::Training;
                        self.s.version = self.s.step;
                        out.push(Action::Train {
                            steps: self.ctx.steps_per_round,
                        });
                    }
                }
                out
            }
            Input::Members { sites, quorum } => {
                // A changed roster. The initiator draw reads the member list, so sites agree on
                // the initiator again once all have switched (a step in between may have two
                // initiators or none; each merges what it pulls, so nothing is lost). What a removed
                // member sent and was merged stays merged; its unmerged model and its entry in
                // the version vector are dropped and it is no longer waited for.
                let (removed, note) = self.ctx.set_members(sites, quorum);
                for site in &removed {
                    self.latest.remove(site);
                    self.peers.remove(site);
                    self.s.pulled.remove(site);
                    self.s.seen.remove(site);
                }
                let mut out = vec![note];
                if self.s.phase != Phase::Training {
                    out.extend(self.progress(now_ms));
                }
                out
            }
            Input::Trained { weights, .. } => {
                if self.s.phase != Phase::Training {
                    return Vec::new();
                }
                self.s.version = self.s.step + 1;
                self.own = weights.values.clone();
                let mut out = vec![Action::Offer {
                    model_version: self.s.version,
                    weights,
                }];
                if self.is_initiator(self.s.step) {
                    self.s.phase = Phase::Gathering { since_ms: now_ms };
                    self.s.pulled.clear();
                    out.push(Action::Note(format!(
                        "step {}: this site initiates",
                        self.s.step + 1
                    )));
                    out.extend(self.progress(now_ms));
                } else {
                    out.extend(self.end_step(vec![self.ctx.me.clone()], now_ms));
                }
                out
            }
            Input::Model(m) => {
                if m.purpose != Purpose::Gossip || !self.ctx.is_peer(&m.origin) {
                    return vec![Action::Note(format!(
                        "ignored a {:?} model from {}",
                        m.purpose, m.origin
                    ))];
                }
                // Kept only while this site gathers: a pull answered for another initiator
                // reaches every site, and only an initiator's model may change.
                if !matches!(self.s.phase, Phase::Gathering { .. }) {
                    return Vec::new();
                }
                let have = self.latest.get(&m.origin).map_or(0, |(v, _, _)| *v);
                if m.model_version > have {
                    self.latest
                        .insert(m.origin, (m.model_version, m.samples, m.weights));
                }
                self.progress(now_ms)
            }
            Input::Presence {
                site,
                status,
                model_version,
                round,
            } => {
                if !self.ctx.is_peer(&site) {
                    return Vec::new();
                }
                self.peers.insert(site, (status, model_version, round));
                self.progress(now_ms)
            }
            Input::Announced { .. } => Vec::new(),
            Input::Tick => self.progress(now_ms),
        }
    }
    fn snapshot(&self) -> serde_json::Value {
        snapshot_of(&self.s)
    }
    fn round(&self) -> u64 {
        self.s.step
    }
    fn model_version(&self) -> u64 {
        self.s.version
    }
    fn versions_seen(&self) -> BTreeMap<String, u64> {
        let mut v = self.s.seen.clone();
        v.insert(self.ctx.me.clone(), self.s.version);
        v
    }
    fn finished(&self) -> bool {
        self.s.done
    }
}
