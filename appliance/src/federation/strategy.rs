//! Federation strategies as state machines, separate from I/O: the daemon feeds each one
//! [`Input`]s (its own training finished, a peer's model arrived, a peer's presence, a clock
//! tick) and carries out the [`Action`]s it returns (train, install a model, publish, pass the
//! token, pull). Tests drive them with no broker and no trainer.
//!
//! - [`LocalOnly`]: trains `rounds` rounds on the site's own cases; sends nothing.
//! - [`FedAvg`]: federated averaging without a server. In round `r` every site trains from the
//!   shared model, publishes its round-`r` update and averages the round-`r` updates it holds
//!   (its own included, weighted by samples, summed in site-id order) as soon as every live site
//!   delivered, or at the deadline when a quorum is in, or alone after the update timeout. When
//!   all deliver, all sites compute the same sum in the same order and hold identical weights. A
//!   dead site does not stall the rest; a late round-`r` update is ignored.
//! - [`BrainTorrent`]: every site trains, increments its model version, announces the model, and
//!   merges (own + every peer model newer than the version vector's entry, sample-weighted)
//!   without waiting for anyone (Roy et al., 2019). Presence announcing a version it has not
//!   received yields a Pull. After its last round a site waits (up to the update timeout) for
//!   the peers' final models, then averages every site's final model at once (its own as
//!   trained, sample-weighted, summed in site-id order): with every final model in, all sites
//!   hold the same shared model. (Merging each final model as it arrived made the result depend
//!   on arrival order and left a small site's model mostly whichever peer came last.)
//! - [`Cyclic`] (CIIL): a token passes round the roster in site-id order; the holder trains
//!   `steps_per_round` steps and passes model and token on; `rounds` cycles.
//! - [`Incremental`] (IIL): each site once, in order, trains until its own held-out Dice has not
//!   improved for `patience` rounds (at most `rounds`) and passes its best model on.
//!
//! Every average goes through [`WeightedAverage`], the one kernel. Each machine's control state
//! serialises to JSON ([`Strategy::snapshot`]) and is saved with the session checkpoint; models
//! received from peers are not (after a restart they come back as retained announcements or
//! from the broker's persistent session).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::aggregate::WeightedAverage;
use crate::config::StrategyKind;

/// What a model message is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Purpose {
    /// BrainTorrent's announced latest model.
    Gossip,
    /// FedAvg's round update.
    Round,
    /// CIIL/IIL: the model that goes with the token.
    Token,
}

/// A peer's state as its presence says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerStatus {
    Joining,
    Training,
    Idle,
    Leaving,
}

/// A model received from a peer, already verified and decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerModel {
    pub origin: String,
    pub purpose: Purpose,
    pub model_version: u64,
    pub round: u64,
    pub samples: u64,
    pub weights: Vec<f32>,
}

/// What happens to a strategy.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// The daemon is ready; `weights` is the session's model (restored or initial).
    Start { weights: Vec<f32> },
    /// The trainer finished the asked steps. `score`: held-out tissue Dice when there are
    /// held-out cases; `loss`: the steps' mean loss.
    Trained {
        weights: Vec<f32>,
        score: Option<f64>,
        loss: f64,
    },
    /// A peer's model.
    Model(PeerModel),
    /// A peer's presence.
    Presence {
        site: String,
        status: PeerStatus,
        model_version: u64,
        round: u64,
    },
    /// A peer announced (retained) that its newest model has this version; `site` is this site
    /// when the broker hands back its own announcement from before a restart.
    Announced { site: String, model_version: u64 },
    /// Time passes (milliseconds since the Unix epoch are given with every input).
    Tick,
}

/// What the daemon must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Train `steps` more steps, then feed [`Input::Trained`].
    Train { steps: usize },
    /// Install this model in the session.
    SetModel(Vec<f32>),
    /// Publish a model (retained when `retain`).
    Publish {
        purpose: Purpose,
        round: u64,
        model_version: u64,
        weights: Vec<f32>,
        retain: bool,
    },
    /// Send the token to `next` (after the Publish that carries the model).
    PassToken {
        next: String,
        cycle: u32,
        position: u32,
    },
    /// Ask `from` for its latest model.
    Pull { from: String, have_version: u64 },
    /// Round `round` is over with the installed model: evaluate, log, checkpoint, publish metrics.
    EndOfRound {
        round: u64,
        contributors: Vec<String>,
    },
    /// Something to log (a decision, an ignored message).
    Note(String),
    /// The strategy has finished: checkpoint and leave.
    Finished,
}

/// What every strategy knows about the federation.
#[derive(Debug, Clone, PartialEq)]
pub struct Context {
    /// This site.
    pub me: String,
    /// Every site of the roster, this one included, sorted.
    pub sites: Vec<String>,
    pub rounds: u64,
    pub steps_per_round: usize,
    /// FedAvg: updates (own included) that suffice at the deadline.
    pub quorum: usize,
    pub round_deadline_ms: u64,
    pub update_timeout_ms: u64,
    pub patience: u64,
    /// This site's training cases (its weight in averages).
    pub samples: u64,
}

impl Context {
    fn peers(&self) -> impl Iterator<Item = &String> {
        self.sites.iter().filter(move |s| **s != self.me)
    }

    fn is_peer(&self, s: &str) -> bool {
        s != self.me && self.sites.iter().any(|x| x == s)
    }

    fn index(&self, s: &str) -> Option<usize> {
        self.sites.iter().position(|x| x == s)
    }
}

/// Errors of a strategy.
#[derive(Debug, thiserror::Error)]
pub enum StrategyError {
    #[error("saved strategy state is unreadable: {0}")]
    State(String),
    #[error("site {0:?} is not in the roster")]
    NotInRoster(String),
}

/// A federation strategy.
pub trait Strategy: Send {
    /// Handles one input at time `now_ms` (ms since the Unix epoch).
    fn handle(&mut self, input: Input, now_ms: u64) -> Vec<Action>;
    /// The control state to save with the checkpoint.
    fn snapshot(&self) -> serde_json::Value;
    /// The round in progress (or rounds done, when finished).
    fn round(&self) -> u64;
    /// The model version (BrainTorrent; others count rounds).
    fn model_version(&self) -> u64 {
        self.round()
    }
    /// The version vector (BrainTorrent; empty for the others).
    fn versions_seen(&self) -> BTreeMap<String, u64> {
        BTreeMap::new()
    }
    /// True once [`Action::Finished`] was returned.
    fn finished(&self) -> bool;
}

/// Builds the strategy `kind`, restoring its saved state when given.
pub fn build(
    kind: StrategyKind,
    ctx: Context,
    saved: Option<&serde_json::Value>,
) -> Result<Box<dyn Strategy>, StrategyError> {
    if ctx.index(&ctx.me).is_none() {
        return Err(StrategyError::NotInRoster(ctx.me.clone()));
    }
    fn state<T: for<'de> Deserialize<'de> + Default>(
        saved: Option<&serde_json::Value>,
    ) -> Result<T, StrategyError> {
        match saved {
            None | Some(serde_json::Value::Null) => Ok(T::default()),
            Some(v) => {
                serde_json::from_value(v.clone()).map_err(|e| StrategyError::State(e.to_string()))
            }
        }
    }
    Ok(match kind {
        StrategyKind::Local => Box::new(LocalOnly {
            ctx,
            s: state(saved)?,
        }),
        StrategyKind::FedAvg => Box::new(FedAvg {
            ctx,
            s: state(saved)?,
            received: BTreeMap::new(),
            left: BTreeSet::new(),
        }),
        StrategyKind::BrainTorrent => Box::new(BrainTorrent {
            ctx,
            s: state(saved)?,
            own: Vec::new(),
            trained: Vec::new(),
            latest: BTreeMap::new(),
            peers: BTreeMap::new(),
            pulled: BTreeMap::new(),
        }),
        StrategyKind::Ciil => Box::new(Cyclic {
            ctx,
            s: state(saved)?,
        }),
        StrategyKind::Iil => Box::new(Incremental {
            ctx,
            s: state(saved)?,
            best_weights: Vec::new(),
        }),
    })
}

fn snapshot_of<T: Serialize>(s: &T) -> serde_json::Value {
    serde_json::to_value(s).unwrap_or(serde_json::Value::Null)
}

/// The sample-weighted average of `models` (weight, values), summed in the given order. A model
/// of another length than the first is left out (the daemon checks layouts before this).
fn average<'a>(models: impl IntoIterator<Item = (u64, &'a [f32])>) -> Option<Vec<f32>> {
    let mut acc: Option<WeightedAverage> = None;
    for (samples, w) in models {
        let a = acc.get_or_insert_with(|| WeightedAverage::new(w.len()));
        if a.add(w, samples.max(1) as f64).is_err() {
            tracing::warn!(
                len = w.len(),
                "left a model of another size out of an average"
            );
        }
    }
    acc.and_then(|a| a.finish().ok())
}

// ---------------------------------------------------------------------------------------------

/// Local training only.
pub struct LocalOnly {
    ctx: Context,
    s: LocalState,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct LocalState {
    round: u64,
    done: bool,
}

impl LocalOnly {
    fn next(&mut self) -> Vec<Action> {
        if self.s.round >= self.ctx.rounds {
            self.s.done = true;
            vec![Action::Finished]
        } else {
            vec![Action::Train {
                steps: self.ctx.steps_per_round,
            }]
        }
    }
}

impl Strategy for LocalOnly {
    fn handle(&mut self, input: Input, _now_ms: u64) -> Vec<Action> {
        match input {
            Input::Start { .. } => self.next(),
            Input::Trained { .. } => {
                self.s.round += 1;
                let mut out = vec![Action::EndOfRound {
                    round: self.s.round - 1,
                    contributors: vec![self.ctx.me.clone()],
                }];
                out.extend(self.next());
                out
            }
            _ => Vec::new(),
        }
    }
    fn snapshot(&self) -> serde_json::Value {
        snapshot_of(&self.s)
    }
    fn round(&self) -> u64 {
        self.s.round
    }
    fn finished(&self) -> bool {
        self.s.done
    }
}

// ---------------------------------------------------------------------------------------------

/// Federated averaging without a server.
pub struct FedAvg {
    ctx: Context,
    s: FedAvgState,
    /// round → site → (samples, weights); own entry included; rounds ≥ the current one only.
    received: BTreeMap<u64, BTreeMap<String, (u64, Vec<f32>)>>,
    /// Sites that said they are leaving.
    left: BTreeSet<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct FedAvgState {
    round: u64,
    /// Collecting round `round`'s updates since this time (own update published).
    collecting_since_ms: Option<u64>,
    done: bool,
}

impl FedAvg {
    fn check(&mut self, now_ms: u64) -> Vec<Action> {
        let Some(since) = self.s.collecting_since_ms else {
            return Vec::new();
        };
        let r = self.s.round;
        let have = self.received.get(&r).map_or(0, |m| m.len());
        let expected = self
            .ctx
            .sites
            .iter()
            .filter(|s| !self.left.contains(*s) || **s == self.ctx.me)
            .count();
        let all_in = have >= expected;
        let deadline = now_ms >= since + self.ctx.round_deadline_ms;
        let timeout = now_ms >= since + self.ctx.update_timeout_ms;
        if !(all_in || (deadline && have >= self.ctx.quorum) || timeout) {
            return Vec::new();
        }
        let mut out = Vec::new();
        if !all_in {
            out.push(Action::Note(format!(
                "round {r}: averaging {have} of {expected} updates ({})",
                if have >= self.ctx.quorum {
                    "deadline passed, quorum in"
                } else {
                    "update timeout passed, below quorum"
                }
            )));
        }
        let updates = self.received.remove(&r).unwrap_or_default();
        let contributors: Vec<String> = updates.keys().cloned().collect();
        if let Some(avg) = average(updates.values().map(|(n, w)| (*n, w.as_slice()))) {
            out.push(Action::SetModel(avg));
        }
        out.push(Action::EndOfRound {
            round: r,
            contributors,
        });
        self.s.round += 1;
        self.s.collecting_since_ms = None;
        self.received.retain(|&k, _| k >= self.s.round);
        if self.s.round >= self.ctx.rounds {
            self.s.done = true;
            out.push(Action::Finished);
        } else {
            out.push(Action::Train {
                steps: self.ctx.steps_per_round,
            });
        }
        out
    }
}

impl Strategy for FedAvg {
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
                if self.s.collecting_since_ms.is_some() {
                    // Restarted after publishing: publish again (peers keep one per site and
                    // round) and keep collecting.
                    let r = self.s.round;
                    self.received
                        .entry(r)
                        .or_default()
                        .insert(self.ctx.me.clone(), (self.ctx.samples, weights.clone()));
                    let mut out = vec![Action::Publish {
                        purpose: Purpose::Round,
                        round: r,
                        model_version: r + 1,
                        weights,
                        retain: false,
                    }];
                    out.extend(self.check(now_ms));
                    out
                } else {
                    vec![Action::Train {
                        steps: self.ctx.steps_per_round,
                    }]
                }
            }
            Input::Trained { weights, .. } => {
                let r = self.s.round;
                self.received
                    .entry(r)
                    .or_default()
                    .insert(self.ctx.me.clone(), (self.ctx.samples, weights.clone()));
                self.s.collecting_since_ms = Some(now_ms);
                let mut out = vec![Action::Publish {
                    purpose: Purpose::Round,
                    round: r,
                    model_version: r + 1,
                    weights,
                    retain: false,
                }];
                out.extend(self.check(now_ms));
                out
            }
            Input::Model(m) => {
                if m.purpose != Purpose::Round || !self.ctx.is_peer(&m.origin) {
                    return vec![Action::Note(format!(
                        "ignored a {:?} model from {}",
                        m.purpose, m.origin
                    ))];
                }
                if m.round < self.s.round {
                    return vec![Action::Note(format!(
                        "ignored {}'s late update for round {} (now in round {})",
                        m.origin, m.round, self.s.round
                    ))];
                }
                if m.round > self.s.round + 1 {
                    return vec![Action::Note(format!(
                        "ignored {}'s update for round {}, too far ahead of round {}",
                        m.origin, m.round, self.s.round
                    ))];
                }
                self.received
                    .entry(m.round)
                    .or_default()
                    .insert(m.origin, (m.samples, m.weights));
                self.check(now_ms)
            }
            Input::Presence { site, status, .. } => {
                // A peer that is (re)joining may have had no session with the broker when this
                // site published its round update (round updates are not retained): send it
                // again. Peers keep one update per site and round, so a copy is harmless.
                let mut out = Vec::new();
                if status == PeerStatus::Joining && self.ctx.is_peer(&site) {
                    let r = self.s.round;
                    if let Some((_, w)) = self.received.get(&r).and_then(|m| m.get(&self.ctx.me)) {
                        out.push(Action::Publish {
                            purpose: Purpose::Round,
                            round: r,
                            model_version: r + 1,
                            weights: w.clone(),
                            retain: false,
                        });
                    }
                }
                if status == PeerStatus::Leaving && self.ctx.is_peer(&site) {
                    self.left.insert(site);
                } else {
                    self.left.remove(&site);
                }
                out.extend(self.check(now_ms));
                out
            }
            Input::Tick | Input::Announced { .. } => self.check(now_ms),
        }
    }
    fn snapshot(&self) -> serde_json::Value {
        snapshot_of(&self.s)
    }
    fn round(&self) -> u64 {
        self.s.round
    }
    fn finished(&self) -> bool {
        self.s.done
    }
}

// ---------------------------------------------------------------------------------------------

/// Decentralised gossip of versioned models.
pub struct BrainTorrent {
    ctx: Context,
    s: BrainTorrentState,
    /// The current model (after training and merges).
    own: Vec<f32>,
    /// This site's model as its last training left it (before merges): its part of the final
    /// average.
    trained: Vec<f32>,
    /// Each peer's newest model received: (version, samples, weights).
    latest: BTreeMap<String, (u64, u64, Vec<f32>)>,
    /// Each peer's presence: (status, version, round).
    peers: BTreeMap<String, (PeerStatus, u64, u64)>,
    /// The version last asked for from each peer.
    pulled: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct BrainTorrentState {
    /// This site's model version (training rounds done).
    version: u64,
    /// The version vector: the version of each peer's model merged last.
    seen: BTreeMap<String, u64>,
    /// Waiting for the peers' final models since this time.
    finishing_since_ms: Option<u64>,
    done: bool,
}

impl BrainTorrent {
    /// Merges own + every peer model newer than the version vector's entry.
    fn merge(&mut self) -> Vec<Action> {
        let newer: Vec<String> = self
            .latest
            .iter()
            .filter(|(site, (v, _, _))| *v > self.s.seen.get(*site).copied().unwrap_or(0))
            .map(|(site, _)| site.clone())
            .collect();
        if newer.is_empty() || self.own.is_empty() {
            return Vec::new();
        }
        let own = (self.ctx.samples, self.own.as_slice());
        let peers = newer
            .iter()
            .filter_map(|s| self.latest.get(s).map(|(_, n, w)| (*n, w.as_slice())));
        let Some(avg) = average(std::iter::once(own).chain(peers)) else {
            return Vec::new();
        };
        let mut note = Vec::new();
        for s in &newer {
            if let Some((v, _, _)) = self.latest.get(s) {
                note.push(format!("{s} v{v}"));
                self.s.seen.insert(s.clone(), *v);
            }
        }
        self.own = avg.clone();
        vec![
            Action::Note(format!(
                "merged v{} with {}",
                self.s.version,
                note.join(", ")
            )),
            Action::SetModel(avg),
        ]
    }

    /// Peers still expected to send a newer (final) model.
    fn waiting_for(&self) -> Vec<String> {
        self.ctx
            .peers()
            .filter(|p| {
                let (status, version, round) =
                    self.peers
                        .get(*p)
                        .copied()
                        .unwrap_or((PeerStatus::Joining, 0, 0));
                let merged = self.s.seen.get(*p).copied().unwrap_or(0);
                let have = self.latest.get(*p).map_or(0, |(v, _, _)| *v);
                let peer_done = round >= self.ctx.rounds || status == PeerStatus::Leaving;
                !(peer_done && merged.max(have) >= version)
            })
            .cloned()
            .collect()
    }

    /// The final average: every site's newest model (this site's as last trained), weighted by
    /// samples and summed in site-id order, so that sites holding the same final models compute
    /// the very same numbers.
    fn final_merge(&mut self) -> Vec<Action> {
        let own = if self.trained.is_empty() {
            &self.own
        } else {
            &self.trained
        };
        if own.is_empty() {
            return Vec::new();
        }
        let mut models = Vec::new();
        let mut note = Vec::new();
        for site in &self.ctx.sites {
            if *site == self.ctx.me {
                models.push((self.ctx.samples, own.as_slice()));
            } else if let Some((v, n, w)) = self.latest.get(site) {
                models.push((*n, w.as_slice()));
                note.push(format!("{site} v{v}"));
            }
        }
        if note.is_empty() {
            // No peer model at all: the site's own model stands.
            return Vec::new();
        }
        let Some(avg) = average(models) else {
            return Vec::new();
        };
        for (site, (v, _, _)) in &self.latest {
            self.s.seen.insert(site.clone(), *v);
        }
        self.own = avg.clone();
        vec![
            Action::Note(format!(
                "final average of v{} with {}",
                self.s.version,
                note.join(", ")
            )),
            Action::SetModel(avg),
        ]
    }

    fn check_finish(&mut self, now_ms: u64) -> Vec<Action> {
        let Some(since) = self.s.finishing_since_ms else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let waiting = self.waiting_for();
        let timeout = now_ms >= since + self.ctx.update_timeout_ms;
        if waiting.is_empty() || timeout {
            if timeout && !waiting.is_empty() {
                out.push(Action::Note(format!(
                    "gave up waiting for the final models of {}",
                    waiting.join(", ")
                )));
            }
            out.extend(self.final_merge());
            self.s.done = true;
            self.s.finishing_since_ms = None;
            out.push(Action::Finished);
        }
        out
    }

    fn maybe_pull(&mut self, site: &str, version: u64) -> Vec<Action> {
        let merged = self.s.seen.get(site).copied().unwrap_or(0);
        let have = self.latest.get(site).map_or(0, |(v, _, _)| *v);
        let asked = self.pulled.get(site).copied().unwrap_or(0);
        if version > merged && version > have && version > asked {
            self.pulled.insert(site.to_string(), version);
            vec![Action::Pull {
                from: site.to_string(),
                have_version: have,
            }]
        } else {
            Vec::new()
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
                self.own = weights;
                if self.s.version >= self.ctx.rounds {
                    self.s.finishing_since_ms.get_or_insert(now_ms);
                    self.check_finish(now_ms)
                } else {
                    vec![Action::Train {
                        steps: self.ctx.steps_per_round,
                    }]
                }
            }
            Input::Trained { weights, .. } => {
                self.s.version += 1;
                self.own = weights.clone();
                self.trained = weights.clone();
                let mut out = vec![Action::Publish {
                    purpose: Purpose::Gossip,
                    round: self.s.version - 1,
                    model_version: self.s.version,
                    weights,
                    retain: true,
                }];
                let merged = self.merge();
                let mut contributors = vec![self.ctx.me.clone()];
                if !merged.is_empty() {
                    contributors.extend(self.s.seen.keys().cloned());
                }
                out.extend(merged);
                out.push(Action::EndOfRound {
                    round: self.s.version - 1,
                    contributors,
                });
                if self.s.version >= self.ctx.rounds {
                    self.s.finishing_since_ms = Some(now_ms);
                    out.extend(self.check_finish(now_ms));
                } else {
                    out.push(Action::Train {
                        steps: self.ctx.steps_per_round,
                    });
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
                let have = self.latest.get(&m.origin).map_or(0, |(v, _, _)| *v);
                if m.model_version <= have {
                    return Vec::new();
                }
                self.latest
                    .insert(m.origin, (m.model_version, m.samples, m.weights));
                // Merges happen between training rounds (the trainer is busy otherwise) and
                // while waiting for the final models.
                self.check_finish(now_ms)
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
                self.peers
                    .insert(site.clone(), (status, model_version, round));
                let mut out = self.maybe_pull(&site, model_version);
                out.extend(self.check_finish(now_ms));
                out
            }
            Input::Announced {
                site,
                model_version,
            } => {
                if site == self.ctx.me {
                    // This site's own retained announcement, from before a restart: versions
                    // up to it were published already (perhaps after the last checkpoint), and
                    // peers ignore a version they hold, so never reuse one.
                    if model_version > self.s.version {
                        let skipped = self.s.version;
                        self.s.version = model_version;
                        return vec![Action::Note(format!(
                            "resuming after v{model_version}, announced before a restart \
                             (checkpoint at v{skipped})"
                        ))];
                    }
                    return Vec::new();
                }
                if !self.ctx.is_peer(&site) {
                    return Vec::new();
                }
                self.maybe_pull(&site, model_version)
            }
            Input::Tick => self.check_finish(now_ms),
        }
    }
    fn snapshot(&self) -> serde_json::Value {
        snapshot_of(&self.s)
    }
    fn round(&self) -> u64 {
        self.s.version
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

// ---------------------------------------------------------------------------------------------

/// Cyclic institutional incremental learning (CIIL): a token round the ring.
pub struct Cyclic {
    ctx: Context,
    s: CyclicState,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct CyclicState {
    /// The position this site is training (holding the token), if any.
    holding: Option<u64>,
    /// The newest position whose model was seen or made.
    last_position: Option<u64>,
    done: bool,
}

impl Cyclic {
    fn total(&self) -> u64 {
        self.ctx.rounds * self.ctx.sites.len() as u64
    }
    fn holder(&self, position: u64) -> &str {
        &self.ctx.sites[(position % self.ctx.sites.len() as u64) as usize]
    }
    fn hold(&mut self, position: u64) -> Vec<Action> {
        self.s.holding = Some(position);
        vec![Action::Train {
            steps: self.ctx.steps_per_round,
        }]
    }
}

impl Strategy for Cyclic {
    fn handle(&mut self, input: Input, _now_ms: u64) -> Vec<Action> {
        if self.s.done {
            return if matches!(input, Input::Start { .. }) {
                vec![Action::Finished]
            } else {
                Vec::new()
            };
        }
        match input {
            Input::Start { .. } => {
                if let Some(p) = self.s.holding {
                    self.hold(p)
                } else if self.s.last_position.is_none() && self.holder(0) == self.ctx.me {
                    self.hold(0)
                } else {
                    vec![Action::Note("waiting for the token".into())]
                }
            }
            Input::Trained { weights, .. } => {
                let Some(p) = self.s.holding.take() else {
                    return Vec::new();
                };
                self.s.last_position = Some(p);
                let n = self.ctx.sites.len() as u64;
                let next = self.holder(p + 1).to_string();
                let mut out = vec![
                    Action::Publish {
                        purpose: Purpose::Token,
                        round: p,
                        model_version: p + 1,
                        weights,
                        retain: true,
                    },
                    Action::EndOfRound {
                        round: p / n,
                        contributors: vec![self.ctx.me.clone()],
                    },
                ];
                if p + 1 >= self.total() {
                    self.s.done = true;
                    out.push(Action::Finished);
                } else {
                    out.push(Action::PassToken {
                        next,
                        cycle: ((p + 1) / n) as u32,
                        position: ((p + 1) % n) as u32,
                    });
                }
                out
            }
            Input::Model(m) => {
                if m.purpose != Purpose::Token
                    || !self.ctx.is_peer(&m.origin)
                    || self.holder(m.round) != m.origin
                    || self.s.last_position.is_some_and(|l| m.round <= l)
                    || m.round >= self.total()
                {
                    return vec![Action::Note(format!(
                        "ignored {}'s {:?} model for position {}",
                        m.origin, m.purpose, m.round
                    ))];
                }
                self.s.last_position = Some(m.round);
                let mut out = vec![Action::SetModel(m.weights)];
                if m.round + 1 >= self.total() {
                    self.s.done = true;
                    out.push(Action::Finished);
                } else if self.holder(m.round + 1) == self.ctx.me && self.s.holding.is_none() {
                    out.extend(self.hold(m.round + 1));
                }
                out
            }
            Input::Presence { .. } | Input::Announced { .. } | Input::Tick => Vec::new(),
        }
    }
    fn snapshot(&self) -> serde_json::Value {
        snapshot_of(&self.s)
    }
    fn round(&self) -> u64 {
        self.s
            .last_position
            .map_or(0, |p| (p + 1) / self.ctx.sites.len() as u64)
    }
    fn finished(&self) -> bool {
        self.s.done
    }
}

// ---------------------------------------------------------------------------------------------

/// Institutional incremental learning (IIL): each site once, until its validation stalls.
pub struct Incremental {
    ctx: Context,
    s: IncrementalState,
    best_weights: Vec<f32>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct IncrementalState {
    /// Training (this site's turn has come).
    training: bool,
    /// This site passed its model on.
    passed: bool,
    rounds_here: u64,
    best_score: Option<f64>,
    since_best: u64,
    done: bool,
}

impl Incremental {
    fn my_index(&self) -> usize {
        self.ctx.index(&self.ctx.me).unwrap_or(0)
    }
    fn start_turn(&mut self) -> Vec<Action> {
        self.s.training = true;
        vec![Action::Train {
            steps: self.ctx.steps_per_round,
        }]
    }
}

impl Strategy for Incremental {
    fn handle(&mut self, input: Input, _now_ms: u64) -> Vec<Action> {
        if self.s.done {
            return if matches!(input, Input::Start { .. }) {
                vec![Action::Finished]
            } else {
                Vec::new()
            };
        }
        let last = self.ctx.sites.len() - 1;
        match input {
            Input::Start { weights } => {
                if self.best_weights.is_empty() {
                    self.best_weights = weights;
                }
                if self.s.training || (!self.s.passed && self.my_index() == 0) {
                    self.start_turn()
                } else {
                    vec![Action::Note("waiting for the previous site's model".into())]
                }
            }
            Input::Trained {
                weights,
                score,
                loss,
            } => {
                if !self.s.training {
                    return Vec::new();
                }
                self.s.rounds_here += 1;
                // Without held-out cases, a lower training loss counts as better.
                let value = score.unwrap_or(-loss);
                if self.s.best_score.is_none_or(|b| value > b) {
                    self.s.best_score = Some(value);
                    self.s.since_best = 0;
                    self.best_weights = weights;
                } else {
                    self.s.since_best += 1;
                }
                let mut out = vec![Action::EndOfRound {
                    round: self.s.rounds_here - 1,
                    contributors: vec![self.ctx.me.clone()],
                }];
                if self.s.since_best >= self.ctx.patience || self.s.rounds_here >= self.ctx.rounds {
                    self.s.training = false;
                    self.s.passed = true;
                    let i = self.my_index();
                    out.push(Action::SetModel(self.best_weights.clone()));
                    out.push(Action::Publish {
                        purpose: Purpose::Token,
                        round: i as u64,
                        model_version: i as u64 + 1,
                        weights: self.best_weights.clone(),
                        retain: true,
                    });
                    if i == last {
                        self.s.done = true;
                        out.push(Action::Finished);
                    } else {
                        out.push(Action::PassToken {
                            next: self.ctx.sites[i + 1].clone(),
                            cycle: 0,
                            position: i as u32 + 1,
                        });
                    }
                } else {
                    out.extend(self.start_turn());
                }
                out
            }
            Input::Model(m) => {
                let from = self.ctx.index(&m.origin);
                if m.purpose != Purpose::Token
                    || !self.ctx.is_peer(&m.origin)
                    || from != Some(m.round as usize)
                {
                    return vec![Action::Note(format!(
                        "ignored {}'s {:?} model",
                        m.origin, m.purpose
                    ))];
                }
                let j = m.round as usize;
                if j == last && self.s.passed {
                    self.s.done = true;
                    return vec![Action::SetModel(m.weights), Action::Finished];
                }
                if j + 1 == self.my_index() && !self.s.training && !self.s.passed {
                    self.best_weights = m.weights.clone();
                    let mut out = vec![Action::SetModel(m.weights)];
                    out.extend(self.start_turn());
                    return out;
                }
                Vec::new()
            }
            Input::Presence { .. } | Input::Announced { .. } | Input::Tick => Vec::new(),
        }
    }
    fn snapshot(&self) -> serde_json::Value {
        snapshot_of(&self.s)
    }
    fn round(&self) -> u64 {
        self.s.rounds_here
    }
    fn finished(&self) -> bool {
        self.s.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(me: &str, rounds: u64) -> Context {
        Context {
            me: me.into(),
            sites: vec!["h1".into(), "h2".into(), "h3".into()],
            rounds,
            steps_per_round: 5,
            quorum: 2,
            round_deadline_ms: 1_000,
            update_timeout_ms: 10_000,
            patience: 2,
            samples: 10,
        }
    }

    fn trained(v: f32) -> Input {
        Input::Trained {
            weights: vec![v; 4],
            score: None,
            loss: 1.0,
        }
    }

    fn model(
        origin: &str,
        purpose: Purpose,
        round: u64,
        version: u64,
        samples: u64,
        v: f32,
    ) -> Input {
        Input::Model(PeerModel {
            origin: origin.into(),
            purpose,
            model_version: version,
            round,
            samples,
            weights: vec![v; 4],
        })
    }

    fn set_model(actions: &[Action]) -> Option<Vec<f32>> {
        actions.iter().rev().find_map(|a| match a {
            Action::SetModel(w) => Some(w.clone()),
            _ => None,
        })
    }

    fn trains(actions: &[Action]) -> bool {
        actions.iter().any(|a| matches!(a, Action::Train { .. }))
    }

    #[test]
    fn local_trains_each_round_then_finishes() {
        let mut s = build(StrategyKind::Local, ctx("h1", 2), None).unwrap();
        assert!(trains(&s.handle(Input::Start { weights: vec![] }, 0)));
        assert!(trains(&s.handle(trained(1.0), 1)));
        let a = s.handle(trained(2.0), 2);
        assert_eq!(a.last(), Some(&Action::Finished));
        assert!(s.finished());
        assert!(!a.iter().any(|a| matches!(a, Action::Publish { .. })));
    }

    #[test]
    fn fedavg_sites_reach_the_same_average_in_any_arrival_order() {
        // Three sites with samples 10 (own ctx), each sees the other two in a different order.
        let values = [("h1", 1.0f32), ("h2", 2.0), ("h3", 6.0)];
        let mut results = Vec::new();
        for (me, own) in values {
            let mut c = ctx(me, 2);
            c.samples = 10;
            let mut s = build(StrategyKind::FedAvg, c, None).unwrap();
            assert!(trains(&s.handle(
                Input::Start {
                    weights: vec![0.0; 4]
                },
                0
            )));
            let a = s.handle(trained(own), 10);
            assert!(matches!(
                a[0],
                Action::Publish {
                    purpose: Purpose::Round,
                    round: 0,
                    ..
                }
            ));
            assert!(
                set_model(&a).is_none(),
                "averaged before the others arrived"
            );
            let mut got = None;
            for (other, v) in values.iter().rev() {
                if *other != me {
                    let a = s.handle(model(other, Purpose::Round, 0, 1, 10, *v), 20);
                    if let Some(w) = set_model(&a) {
                        got = Some(w);
                        assert!(trains(&a), "round 1 must start");
                    }
                }
            }
            let w = got.expect("averaged once all three were in");
            results.push(w);
            assert_eq!(s.round(), 1);
        }
        assert!((results[0][0] - 3.0).abs() < 1e-6, "{:?}", results[0]);
        assert_eq!(results[0], results[1]);
        assert_eq!(results[1], results[2]);
    }

    #[test]
    fn fedavg_dead_site_deadline_quorum_and_late_updates() {
        let mut s = build(StrategyKind::FedAvg, ctx("h1", 3), None).unwrap();
        s.handle(Input::Start { weights: vec![] }, 0);
        s.handle(trained(1.0), 100);
        // h2 delivers, h3 is dead: nothing before the deadline, the average after it.
        assert!(set_model(&s.handle(model("h2", Purpose::Round, 0, 1, 30, 5.0), 200)).is_none());
        assert!(s.handle(Input::Tick, 900).is_empty());
        let a = s.handle(Input::Tick, 1_100);
        let w = set_model(&a).unwrap();
        assert!((w[0] - 4.0).abs() < 1e-6, "{w:?}"); // (10·1 + 30·5) / 40
        assert!(a.iter().any(|a| matches!(a, Action::Note(_))));
        assert_eq!(s.round(), 1);
        // h3's late round-0 update is ignored.
        let a = s.handle(model("h3", Purpose::Round, 0, 1, 10, 100.0), 1_200);
        assert!(set_model(&a).is_none());
        assert!(matches!(&a[0], Action::Note(n) if n.contains("late")));
        // Round 1: below quorum at the deadline → wait until the update timeout.
        s.handle(trained(2.0), 2_000);
        assert!(set_model(&s.handle(Input::Tick, 3_500)).is_none());
        let a = s.handle(Input::Tick, 12_001);
        assert_eq!(set_model(&a).unwrap(), vec![2.0; 4]);
        // Round 2: h3 says it is leaving, h2's early update was buffered: average at once.
        s.handle(model("h2", Purpose::Round, 2, 3, 10, 4.0), 12_100);
        s.handle(
            Input::Presence {
                site: "h3".into(),
                status: PeerStatus::Leaving,
                model_version: 0,
                round: 0,
            },
            12_200,
        );
        let a = s.handle(trained(2.0), 13_000);
        assert_eq!(set_model(&a).unwrap(), vec![3.0; 4]);
        assert_eq!(a.last(), Some(&Action::Finished));
        assert!(s.finished());
        // Strangers and other purposes never reach a model.
        let mut t = build(StrategyKind::FedAvg, ctx("h1", 1), None).unwrap();
        t.handle(Input::Start { weights: vec![] }, 0);
        t.handle(trained(1.0), 0);
        assert!(set_model(&t.handle(model("zz", Purpose::Round, 0, 1, 10, 9.0), 1)).is_none());
        assert!(set_model(&t.handle(model("h2", Purpose::Gossip, 0, 1, 10, 9.0), 1)).is_none());
    }

    #[test]
    fn fedavg_restores_mid_collection_and_republishes() {
        let mut s = build(StrategyKind::FedAvg, ctx("h1", 2), None).unwrap();
        s.handle(Input::Start { weights: vec![] }, 0);
        s.handle(trained(1.0), 10);
        let saved = s.snapshot();
        let mut r = build(StrategyKind::FedAvg, ctx("h1", 2), Some(&saved)).unwrap();
        let a = r.handle(
            Input::Start {
                weights: vec![1.0; 4],
            },
            20,
        );
        assert!(matches!(a[0], Action::Publish { round: 0, .. }));
        r.handle(model("h2", Purpose::Round, 0, 1, 10, 3.0), 30);
        let a = r.handle(model("h3", Purpose::Round, 0, 1, 10, 5.0), 40);
        let w = set_model(&a).unwrap();
        assert!(w.iter().all(|x| (x - 3.0).abs() < 1e-6), "{w:?}");
    }

    fn published(actions: &[Action]) -> Vec<(u64, u64, Vec<f32>)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Publish {
                    round,
                    model_version,
                    weights,
                    ..
                } => Some((*round, *model_version, weights.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn fedavg_resends_its_round_update_to_a_joining_peer() {
        // Regression (issue 3, bug 5): a round update published before a peer first connected
        // never reached it (round updates are not retained), so it waited out the deadline.
        let mut s = build(StrategyKind::FedAvg, ctx("h1", 2), None).unwrap();
        s.handle(Input::Start { weights: vec![] }, 0);
        // Before its own update exists there is nothing to resend.
        let joining = |site: &str| Input::Presence {
            site: site.into(),
            status: PeerStatus::Joining,
            model_version: 0,
            round: 0,
        };
        assert!(published(&s.handle(joining("h3"), 5)).is_empty());
        s.handle(trained(2.0), 10);
        let a = s.handle(joining("h3"), 20);
        assert_eq!(published(&a), vec![(0, 1, vec![2.0; 4])]);
        // A peer that is already training gets nothing again; nor does an unknown site.
        let training = Input::Presence {
            site: "h2".into(),
            status: PeerStatus::Training,
            model_version: 0,
            round: 0,
        };
        assert!(published(&s.handle(training, 30)).is_empty());
        assert!(published(&s.handle(joining("x9"), 35)).is_empty());
        // The round still ends as usual, and a late round-0 update is still ignored.
        s.handle(model("h2", Purpose::Round, 0, 1, 10, 4.0), 40);
        let a = s.handle(model("h3", Purpose::Round, 0, 1, 10, 6.0), 50);
        let w = set_model(&a).unwrap();
        assert!(w.iter().all(|x| (x - 4.0).abs() < 1e-6), "{w:?}");
        let a = s.handle(model("h3", Purpose::Round, 0, 1, 10, 9.0), 60);
        assert!(set_model(&a).is_none());
        // In round 1, before training, it holds no round-1 update to resend.
        assert!(published(&s.handle(joining("h2"), 70)).is_empty());
    }

    #[test]
    fn braintorrent_never_reuses_a_version_announced_before_a_restart() {
        // Regression (issue 3, bug 3): h1 published v1 and v2, was killed with its checkpoint
        // at v1, and republished another v2 that peers ignored (they hold a v2 of h1).
        let mut s = build(StrategyKind::BrainTorrent, ctx("h1", 4), None).unwrap();
        s.handle(
            Input::Start {
                weights: vec![0.0; 4],
            },
            0,
        );
        s.handle(trained(1.0), 10);
        let checkpoint = s.snapshot();
        let a = s.handle(trained(2.0), 20);
        assert_eq!(published(&a)[0].1, 2);
        // Restart from the v1 checkpoint; the broker hands back the retained v2 announcement.
        let mut r = build(StrategyKind::BrainTorrent, ctx("h1", 4), Some(&checkpoint)).unwrap();
        assert_eq!(r.model_version(), 1);
        assert!(trains(&r.handle(
            Input::Start {
                weights: vec![1.0; 4]
            },
            30
        )));
        r.handle(
            Input::Announced {
                site: "h1".into(),
                model_version: 2,
            },
            35,
        );
        assert_eq!(r.model_version(), 2);
        assert_eq!(r.versions_seen().get("h1"), Some(&2));
        let a = r.handle(trained(3.0), 40);
        assert_eq!(published(&a), vec![(2, 3, vec![3.0; 4])]);
        // An older own announcement (or this run's own, echoed) changes nothing.
        r.handle(
            Input::Announced {
                site: "h1".into(),
                model_version: 1,
            },
            45,
        );
        assert_eq!(r.model_version(), 3);
        // A peer that held h1's v2 takes the new v3.
        let mut peer = build(StrategyKind::BrainTorrent, ctx("h2", 4), None).unwrap();
        peer.handle(
            Input::Start {
                weights: vec![0.0; 4],
            },
            0,
        );
        peer.handle(model("h1", Purpose::Gossip, 1, 2, 10, 2.0), 50);
        peer.handle(model("h1", Purpose::Gossip, 2, 3, 10, 3.0), 60);
        let a = peer.handle(trained(5.0), 70);
        let w = set_model(&a).unwrap();
        assert!(w.iter().all(|x| (x - 4.0).abs() < 1e-6), "{w:?}");
    }

    #[test]
    fn braintorrent_merges_newer_peers_without_waiting() {
        let mut s = build(StrategyKind::BrainTorrent, ctx("h1", 2), None).unwrap();
        assert!(trains(&s.handle(
            Input::Start {
                weights: vec![0.0; 4]
            },
            0
        )));
        // h2's model arrives while h1 trains; h3 is silent.
        s.handle(model("h2", Purpose::Gossip, 0, 1, 30, 5.0), 5);
        let a = s.handle(trained(1.0), 10);
        assert!(matches!(
            a[0],
            Action::Publish {
                purpose: Purpose::Gossip,
                model_version: 1,
                retain: true,
                ..
            }
        ));
        let w = set_model(&a).expect("merged with h2");
        assert!((w[0] - 4.0).abs() < 1e-6, "{w:?}");
        assert!(trains(&a), "did not wait for h3");
        assert_eq!(s.versions_seen().get("h2"), Some(&1));
        assert_eq!(s.versions_seen().get("h1"), Some(&1));
        // The same version again is not merged twice; an older one is ignored.
        s.handle(model("h2", Purpose::Gossip, 0, 1, 30, 5.0), 11);
        // Presence announcing a version we lack → Pull once.
        let p = Input::Presence {
            site: "h3".into(),
            status: PeerStatus::Training,
            model_version: 2,
            round: 2,
        };
        let a = s.handle(p.clone(), 12);
        assert_eq!(
            a,
            vec![Action::Pull {
                from: "h3".into(),
                have_version: 0
            }]
        );
        assert!(s.handle(p, 13).is_empty());
        // Last round: merges h3, then waits for h2's final model.
        s.handle(model("h3", Purpose::Gossip, 1, 2, 10, 7.0), 14);
        let a = s.handle(trained(1.0), 20);
        let w = set_model(&a).unwrap();
        assert!((w[0] - 4.0).abs() < 1e-6, "{w:?}"); // (10·1 + 10·7) / 20
        assert!(!s.finished());
        s.handle(
            Input::Presence {
                site: "h2".into(),
                status: PeerStatus::Idle,
                model_version: 2,
                round: 2,
            },
            21,
        );
        let a = s.handle(model("h2", Purpose::Gossip, 1, 2, 30, 8.0), 22);
        assert!(set_model(&a).is_some());
        assert_eq!(a.last(), Some(&Action::Finished));
        // A restart restores the version vector.
        let saved = s.snapshot();
        let r = build(StrategyKind::BrainTorrent, ctx("h1", 2), Some(&saved)).unwrap();
        assert_eq!(r.versions_seen(), s.versions_seen());
        assert!(r.finished());
    }

    #[test]
    fn braintorrent_final_average_is_one_shared_model_in_any_arrival_order() {
        // Regression: merging each final model as it arrived left h3 (5 cases) with 3/4 of
        // whichever peer came last, and every site with another model.
        let (samples, value) = ([40u64, 15, 5], [1.0f32, 2.0, 7.0]);
        let sites = ["h1", "h2", "h3"];
        let want = (40.0 * 1.0 + 15.0 * 2.0 + 5.0 * 7.0) / 60.0;
        // Per site: the peers whose final model arrives while it trains, then the rest in order.
        let orders: [(&[usize], &[usize]); 3] = [(&[], &[2, 1]), (&[2], &[0]), (&[], &[1, 0])];
        let mut finals = Vec::new();
        for (i, (before, after)) in orders.iter().enumerate() {
            let mut c = ctx(sites[i], 1);
            c.samples = samples[i];
            let mut s = build(StrategyKind::BrainTorrent, c, None).unwrap();
            s.handle(
                Input::Start {
                    weights: vec![0.0; 4],
                },
                0,
            );
            let peer = |j: usize| model(sites[j], Purpose::Gossip, 0, 1, samples[j], value[j]);
            for &j in before.iter() {
                assert!(s.handle(peer(j), 1).is_empty());
            }
            for j in (0..3).filter(|&j| j != i) {
                s.handle(
                    Input::Presence {
                        site: sites[j].into(),
                        status: PeerStatus::Idle,
                        model_version: 1,
                        round: 1,
                    },
                    2,
                );
            }
            let mut last = s.handle(trained(value[i]), 3);
            for &j in after.iter() {
                assert!(
                    !s.finished(),
                    "{} finished before {}'s model",
                    sites[i],
                    sites[j]
                );
                last = s.handle(peer(j), 4);
            }
            assert!(s.finished());
            assert_eq!(last.last(), Some(&Action::Finished));
            let w = set_model(&last).expect("a final average");
            assert!(
                (w[0] - want).abs() < 1e-6,
                "{}: {w:?}, want {want}",
                sites[i]
            );
            let seen = s.versions_seen();
            assert!(sites.iter().all(|h| seen.get(*h) == Some(&1)), "{seen:?}");
            finals.push(w);
        }
        assert_eq!(finals[0], finals[1]);
        assert_eq!(finals[0], finals[2]);
    }

    #[test]
    fn braintorrent_gives_up_on_a_dead_peer() {
        let mut s = build(StrategyKind::BrainTorrent, ctx("h1", 1), None).unwrap();
        s.handle(
            Input::Start {
                weights: vec![0.0; 4],
            },
            0,
        );
        s.handle(trained(1.0), 100);
        assert!(!s.finished());
        assert!(s.handle(Input::Tick, 5_000).is_empty());
        let a = s.handle(Input::Tick, 10_100);
        assert_eq!(a.last(), Some(&Action::Finished));
    }

    #[test]
    fn ciil_token_goes_round_the_ring() {
        let rounds = 2;
        let mut sites: Vec<Box<dyn Strategy>> = ["h1", "h2", "h3"]
            .iter()
            .map(|s| build(StrategyKind::Ciil, ctx(s, rounds), None).unwrap())
            .collect();
        let starts: Vec<bool> = sites
            .iter_mut()
            .map(|s| trains(&s.handle(Input::Start { weights: vec![] }, 0)))
            .collect();
        assert_eq!(starts, vec![true, false, false]);
        // Simulate: the holder trains (adds 1 to the model), publishes, everyone receives.
        let mut holder = 0usize;
        let mut value = 0.0f32;
        for position in 0..(rounds * 3) {
            value += 1.0;
            let a = sites[holder].handle(trained(value), position);
            let (round, w) = a
                .iter()
                .find_map(|a| match a {
                    Action::Publish {
                        purpose: Purpose::Token,
                        round,
                        weights,
                        ..
                    } => Some((*round, weights.clone())),
                    _ => None,
                })
                .unwrap();
            assert_eq!(round, position);
            let origin = ["h1", "h2", "h3"][holder];
            let mut next = None;
            for (i, s) in sites.iter_mut().enumerate() {
                if i == holder {
                    continue;
                }
                let a = s.handle(
                    model(origin, Purpose::Token, round, round + 1, 10, w[0]),
                    position,
                );
                if trains(&a) {
                    assert!(next.is_none());
                    next = Some(i);
                }
                if position + 1 < rounds * 3 {
                    assert_eq!(set_model(&a), Some(w.clone()));
                }
            }
            if position + 1 < rounds * 3 {
                assert_eq!(next, Some((holder + 1) % 3));
                holder = (holder + 1) % 3;
            } else {
                assert!(next.is_none());
            }
        }
        assert!(sites.iter().all(|s| s.finished()));
        // A token from the wrong holder is ignored.
        let mut s = build(StrategyKind::Ciil, ctx("h2", 2), None).unwrap();
        s.handle(Input::Start { weights: vec![] }, 0);
        assert!(!trains(
            &s.handle(model("h3", Purpose::Token, 0, 1, 10, 1.0), 0)
        ));
    }

    #[test]
    fn iil_passes_its_best_after_patience() {
        let mut h1 = build(StrategyKind::Iil, ctx("h1", 10), None).unwrap();
        let mut h2 = build(StrategyKind::Iil, ctx("h2", 10), None).unwrap();
        assert!(trains(&h1.handle(
            Input::Start {
                weights: vec![0.0; 4]
            },
            0
        )));
        assert!(!trains(&h2.handle(
            Input::Start {
                weights: vec![0.0; 4]
            },
            0
        )));
        let scored = |v: f32, d: f64| Input::Trained {
            weights: vec![v; 4],
            score: Some(d),
            loss: 0.5,
        };
        assert!(trains(&h1.handle(scored(1.0, 0.5), 1)));
        assert!(trains(&h1.handle(scored(2.0, 0.7), 2)));
        assert!(trains(&h1.handle(scored(3.0, 0.6), 3)));
        let a = h1.handle(scored(4.0, 0.65), 4);
        assert!(!trains(&a));
        let passed = a
            .iter()
            .find_map(|a| match a {
                Action::Publish {
                    weights, round: 0, ..
                } => Some(weights.clone()),
                _ => None,
            })
            .unwrap();
        assert_eq!(passed, vec![2.0; 4], "passes the best, not the last");
        assert!(a.contains(&Action::PassToken {
            next: "h2".into(),
            cycle: 0,
            position: 1
        }));
        let a = h2.handle(model("h1", Purpose::Token, 0, 1, 10, 2.0), 5);
        assert_eq!(set_model(&a), Some(vec![2.0; 4]));
        assert!(trains(&a));
        // h1 adopts the last site's model and finishes.
        let a = h1.handle(model("h3", Purpose::Token, 2, 3, 10, 9.0), 6);
        assert_eq!(a, vec![Action::SetModel(vec![9.0; 4]), Action::Finished]);
    }
}
