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
//! - [`BrainTorrent`]: the published protocol (Roy et al., 2019). Every site trains its own
//!   model; at each step one initiator, drawn from the roster and the step number by every site
//!   alike ([`braintorrent::initiator`]), pulls the peers' models newer than its version vector
//!   and averages them with its own; only the initiator's model changes. Each site ends with its
//!   own model.
//! - [`GossipAvg`] ("gossip-avg"): push-style asynchronous gossip. Every site trains, increments
//!   its model version, announces the model, and merges (own + every peer model newer than the
//!   version vector's entry, sample-weighted) without waiting for anyone. Presence announcing a
//!   version it has not received yields a Pull. After its last round a site waits (up to the
//!   update timeout) for the peers' final models, then averages every site's final model at once
//!   (its own as trained, sample-weighted, summed in site-id order): with every final model in,
//!   all sites hold the same shared model. (Merging each final model as it arrived made the
//!   result depend on arrival order and left a small site's model mostly whichever peer came
//!   last.) This was called BrainTorrent before; it is not the paper's protocol.
//! - [`Cyclic`] (CIIL): a token passes round the roster in site-id order; the holder trains
//!   `steps_per_round` steps and passes model and token on; `rounds` cycles.
//! - [`Incremental`] (IIL): each site once, in order, trains until its own validation Dice has
//!   not improved for `patience` rounds (at most `rounds`) and passes its best model on.
//!
//! As in Sheller et al. (2018), a round is one local epoch when the daemon is configured with
//! `steps_per_round = 0` (`steps_per_round` is then each site's own pass over its labelled
//! slices), so IIL's patience counts epochs.
//!
//! Weights move without copies: this site's model comes as an [`OwnModel`] (values as peers
//! decode them, plus their encoding, made once by the daemon and shared by reference count), and
//! a peer's model stays in its wire encoding ([`EncodedWeights`], checked on arrival) until an
//! average streams it. Memory beyond the session's own model, with P peers and M the size of
//! one `f32` model: FedAvg, one running sum (M) plus updates that arrive ahead of a missing
//! lower-id site, waiting encoded; BrainTorrent, the offered model (shared with the session's,
//! not copied), the newest model it pulled from each peer as initiator, encoded (at most P × the
//! wire size, about M/2 each for `f16+zstd`; models that reach a site not gathering are dropped),
//! and one accumulator while it averages (M); gossip-avg, this site's trained and merged models (≤ 2M) and one accumulator
//! while it averages (M), plus every peer's newest model encoded (P × the wire size): the final
//! average needs each peer's newest model and a newer version replaces an older one, so gossip
//! cannot fold them into a sum as they arrive; CIIL/IIL, the model being passed on.
//!
//! Every average goes through [`WeightedAverage`], the one kernel. Each machine's control state
//! serialises to JSON ([`Strategy::snapshot`]) and is saved with the session checkpoint; models
//! received from peers are not (after a restart they come back as retained announcements or
//! from the broker's persistent session).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::aggregate::WeightedAverage;
use super::weights::EncodedWeights;

/// The federation strategies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StrategyKind {
    /// BrainTorrent as published (Roy et al., 2019): one pulling initiator per step.
    BrainTorrent,
    /// Push-style asynchronous gossip with a final sample-weighted average.
    #[serde(rename = "gossip-avg")]
    GossipAvg,
    /// Federated averaging without a server: every site averages every round's updates.
    FedAvg,
    /// Cyclic institutional incremental learning: a token passes the model round the ring.
    Ciil,
    /// Institutional incremental learning: each site once, until its validation stops improving.
    Iil,
    /// No federation: train on the site's own cases only.
    Local,
}

impl StrategyKind {
    /// The name as written in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            StrategyKind::BrainTorrent => "braintorrent",
            StrategyKind::GossipAvg => "gossip-avg",
            StrategyKind::FedAvg => "fedavg",
            StrategyKind::Ciil => "ciil",
            StrategyKind::Iil => "iil",
            StrategyKind::Local => "local",
        }
    }
}

/// What a model message is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Purpose {
    /// BrainTorrent's and gossip-avg's latest model.
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

/// A model received from a peer, already verified; its values stay encoded as they arrived
/// (checked: length, finiteness) until an average streams them.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerModel {
    pub origin: String,
    pub purpose: Purpose,
    pub model_version: u64,
    pub round: u64,
    pub samples: u64,
    pub weights: EncodedWeights,
}

/// This site's own model as its peers receive it: the values after the wire format's rounding
/// (what every site averages) and their encoding (what is published), both made once by the
/// daemon and shared, not copied, by whoever holds the model. `encoded` is None for a site that
/// sends nothing (no broker).
#[derive(Debug, Clone, PartialEq)]
pub struct OwnModel {
    pub values: Arc<Vec<f32>>,
    pub encoded: Option<EncodedWeights>,
}

impl OwnModel {
    /// A model that is never sent: the values as they are.
    pub fn unsent(values: Vec<f32>) -> OwnModel {
        OwnModel {
            values: Arc::new(values),
            encoded: None,
        }
    }

    /// True for a model of no values (a strategy that has not been given one).
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

/// What happens to a strategy.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// The daemon is ready; `weights` is the session's model (restored or initial).
    Start { weights: OwnModel },
    /// The trainer finished the asked steps. `score`: held-out tissue Dice when there are
    /// held-out cases; `loss`: the steps' mean loss.
    Trained {
        weights: OwnModel,
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
    /// The roster changed while the site runs: `sites` are now the members (this one
    /// included) and `quorum` FedAvg's quorum for that many. A removed member's messages are
    /// refused by the daemon from now on; the strategy forgets what it held of it that was
    /// not yet merged and stops waiting for it; an added member's models count like any
    /// member's.
    Members { sites: Vec<String>, quorum: usize },
}

/// What the daemon must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Train `steps` more steps, then feed [`Input::Trained`].
    Train { steps: usize },
    /// Install this model in the session.
    SetModel(Arc<Vec<f32>>),
    /// Publish this site's model (retained when `retain`).
    Publish {
        purpose: Purpose,
        round: u64,
        model_version: u64,
        weights: OwnModel,
        retain: bool,
    },
    /// Send the token to `next` (after the Publish that carries the model).
    PassToken {
        next: String,
        cycle: u32,
        position: u32,
    },
    /// Keep this model to answer peers' pulls with (published only when pulled; its encoding
    /// is shared, not copied).
    Offer {
        model_version: u64,
        weights: OwnModel,
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

    /// Takes a new roster (sorted here) and quorum; returns the sites removed, and a note
    /// naming what changed.
    fn set_members(&mut self, mut sites: Vec<String>, quorum: usize) -> (Vec<String>, Action) {
        sites.sort();
        sites.dedup();
        let removed: Vec<String> = self
            .sites
            .iter()
            .filter(|s| !sites.contains(s))
            .cloned()
            .collect();
        let added: Vec<String> = sites
            .iter()
            .filter(|s| !self.sites.contains(s))
            .cloned()
            .collect();
        self.sites = sites;
        self.quorum = quorum.max(1);
        let note = Action::Note(format!(
            "members now {} (added: {}; removed: {}; quorum {})",
            self.sites.join(","),
            if added.is_empty() {
                "none".into()
            } else {
                added.join(",")
            },
            if removed.is_empty() {
                "none".into()
            } else {
                removed.join(",")
            },
            self.quorum
        ));
        (removed, note)
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
    /// The model version (BrainTorrent, gossip-avg; others count rounds).
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
            own: None,
            left: BTreeSet::new(),
        }),
        StrategyKind::BrainTorrent => Box::new(BrainTorrent {
            ctx,
            s: state(saved)?,
            own: Arc::default(),
            latest: BTreeMap::new(),
            peers: BTreeMap::new(),
        }),
        StrategyKind::GossipAvg => Box::new(GossipAvg {
            ctx,
            s: state(saved)?,
            own: Arc::default(),
            trained: Arc::default(),
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
            best: None,
        }),
    })
}

pub(super) fn snapshot_of<T: Serialize>(s: &T) -> serde_json::Value {
    serde_json::to_value(s).unwrap_or(serde_json::Value::Null)
}

/// One model in an average: this site's values, or a peer's model as it arrived (streamed from
/// its encoding, never decoded whole). Either adds the same numbers a decoded copy would.
#[derive(Debug, Clone)]
pub(super) enum Part {
    Own(Arc<Vec<f32>>),
    Peer(EncodedWeights),
}

impl Part {
    fn len(&self) -> usize {
        match self {
            Part::Own(v) => v.len(),
            Part::Peer(e) => e.len(),
        }
    }

    /// Adds `samples ·` this model to `acc` (a model of another size is left out, with a
    /// warning: the daemon checks layouts before this).
    pub(super) fn add_to(&self, acc: &mut WeightedAverage, samples: u64) {
        let weight = samples.max(1) as f64;
        let added = match self {
            Part::Own(v) => acc.add(v, weight),
            Part::Peer(e) => acc.add_encoded(e.bytes(), e.format(), weight),
        };
        if let Err(e) = added {
            tracing::warn!(len = self.len(), reason = %e, "left a model out of an average");
        }
    }
}

/// The sample-weighted average of `models` (weight, model), summed in the given order.
pub(super) fn average(models: impl IntoIterator<Item = (u64, Part)>) -> Option<Vec<f32>> {
    let mut acc: Option<WeightedAverage> = None;
    for (samples, m) in models {
        let a = acc.get_or_insert_with(|| WeightedAverage::new(m.len()));
        m.add_to(a, samples);
    }
    acc.and_then(|a| a.finish().ok())
}

/// The action that installs a peer's model: its values decoded, or a note when they cannot be
/// (they were checked on arrival, so only a defect gets here).
pub(super) fn set_peer_model(m: &PeerModel) -> Action {
    match m.weights.decode() {
        Ok(v) => Action::SetModel(Arc::new(v)),
        Err(e) => Action::Note(format!("could not install {}'s model: {e}", m.origin)),
    }
}

pub mod braintorrent;
mod cyclic;
mod fedavg;
mod gossip;
mod incremental;
mod local;
#[cfg(test)]
mod tests;

pub use braintorrent::BrainTorrent;
pub use cyclic::Cyclic;
pub use fedavg::FedAvg;
pub use gossip::GossipAvg;
pub use incremental::Incremental;
pub use local::LocalOnly;
