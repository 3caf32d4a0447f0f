//! Push-style asynchronous gossip of versioned models with a final sample-weighted average
//! ("gossip-avg"; see the module docs of `strategy`). Not BrainTorrent as published (that is
//! [`BrainTorrent`](super::BrainTorrent)): here every site pushes every model it trains, merges
//! whatever is newer without waiting for anyone, and all sites end on one shared average.

use super::*;

/// Push-style asynchronous gossip with a final sample-weighted average.
pub struct GossipAvg {
    pub(super) ctx: Context,
    pub(super) s: GossipAvgState,
    /// The current model (after training and merges).
    pub(super) own: Arc<Vec<f32>>,
    /// This site's model as its last training left it (before merges): its part of the final
    /// average. Shares its values with `own` until a merge replaces that.
    pub(super) trained: Arc<Vec<f32>>,
    /// Each peer's newest model received, as it arrived (encoded): (version, samples, weights).
    /// The final average needs every peer's newest model and a newer version replaces an older
    /// one, so these cannot be folded into a sum as they arrive; held encoded, each costs its
    /// wire size (`f16+zstd`: about half of the `f32` model), not an `f32` copy.
    pub(super) latest: BTreeMap<String, (u64, u64, EncodedWeights)>,
    /// Each peer's presence: (status, version, round).
    pub(super) peers: BTreeMap<String, (PeerStatus, u64, u64)>,
    /// The version last asked for from each peer.
    pub(super) pulled: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct GossipAvgState {
    /// This site's model version (training rounds done).
    pub(super) version: u64,
    /// The version vector: the version of each peer's model merged last.
    pub(super) seen: BTreeMap<String, u64>,
    /// Waiting for the peers' final models since this time.
    pub(super) finishing_since_ms: Option<u64>,
    pub(super) done: bool,
}

impl GossipAvg {
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
        let own = (self.ctx.samples, Part::Own(self.own.clone()));
        let peers = newer.iter().filter_map(|s| {
            self.latest
                .get(s)
                .map(|(_, n, w)| (*n, Part::Peer(w.clone())))
        });
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
        let avg = Arc::new(avg);
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
                models.push((self.ctx.samples, Part::Own(own.clone())));
            } else if let Some((v, n, w)) = self.latest.get(site) {
                models.push((*n, Part::Peer(w.clone())));
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
        let avg = Arc::new(avg);
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

impl Strategy for GossipAvg {
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
                self.own = weights.values;
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
                self.own = weights.values.clone();
                self.trained = weights.values.clone();
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
            Input::Members { sites, quorum } => {
                let (removed, note) = self.ctx.set_members(sites, quorum);
                // What a removed member sent and was merged stays merged; what it sent and was
                // not merged yet is dropped, and neither its version nor its final model is
                // waited for any more.
                for site in &removed {
                    self.latest.remove(site);
                    self.peers.remove(site);
                    self.pulled.remove(site);
                    self.s.seen.remove(site);
                }
                let mut out = vec![note];
                out.extend(self.check_finish(now_ms));
                out
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
