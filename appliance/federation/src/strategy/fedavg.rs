//! Federated averaging without a server.

use super::*;

/// Federated averaging without a server.
pub struct FedAvg {
    pub(super) ctx: Context,
    pub(super) s: FedAvgState,
    /// round → the updates received for it (own included), summed as they arrive; rounds ≥ the
    /// current one only.
    pub(super) received: BTreeMap<u64, RoundSum>,
    /// This site's update of the current round (re-sent to a joining peer; shares its values
    /// and encoding with the running sum and the publication).
    pub(super) own: Option<(u64, OwnModel)>,
    /// Sites that said they are leaving.
    pub(super) left: BTreeSet<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct FedAvgState {
    pub(super) round: u64,
    /// Collecting round `round`'s updates since this time (own update published).
    pub(super) collecting_since_ms: Option<u64>,
    pub(super) done: bool,
}

/// One round's updates as a running sample-weighted sum, added in site-id order so that every
/// site that receives the same updates adds the same numbers in the same order and ends on
/// bit-identical weights. An update is added when every update before it in that order is in;
/// one that arrives ahead of a missing one waits. Extra memory: the sum plus the updates that
/// wait (none when updates arrive in order; a peer's waits encoded, at its wire size), not one
/// model per peer.
#[derive(Default)]
pub(super) struct RoundSum {
    sum: Option<WeightedAverage>,
    /// Sites whose update is in `sum`, in order.
    added: Vec<String>,
    /// Updates that arrived ahead of a site before them in the order.
    waiting: BTreeMap<String, (u64, Part)>,
}

impl RoundSum {
    /// Updates received (added or waiting) from the sites of `members`.
    pub(super) fn len_from(&self, members: &[String]) -> usize {
        members
            .iter()
            .filter(|s| self.added.contains(s) || self.waiting.contains_key(*s))
            .count()
    }

    /// Takes `site`'s update; `order`: all sites by id. A copy of an update already added is
    /// dropped; one still waiting replaces the earlier copy.
    pub(super) fn offer(&mut self, order: &[String], site: String, samples: u64, w: Part) {
        if self.added.contains(&site) {
            return;
        }
        self.waiting.insert(site, (samples, w));
        self.add_ready(order);
    }

    /// Adds waiting updates while the first site of `order` not yet added has one waiting.
    fn add_ready(&mut self, order: &[String]) {
        while let Some(next) = order.iter().find(|s| !self.added.contains(s)) {
            let Some((samples, w)) = self.waiting.remove(next) else {
                break;
            };
            self.add(next.clone(), samples, w);
        }
    }

    /// The roster changed to `order`: an update waiting from a removed site is dropped (one
    /// already added stays in the sum: it was accepted while its sender was a member), and
    /// updates that waited only for a removed site are added.
    pub(super) fn members_changed(&mut self, order: &[String]) {
        self.waiting.retain(|site, _| order.contains(site));
        self.add_ready(order);
    }

    fn add(&mut self, site: String, samples: u64, w: Part) {
        let sum = self
            .sum
            .get_or_insert_with(|| WeightedAverage::new(w.len()));
        w.add_to(sum, samples);
        self.added.push(site);
    }

    /// The contributors (by id) and their average; updates still waiting (behind a site that
    /// never sent) are added in order first.
    pub(super) fn finish(mut self) -> (Vec<String>, Option<Vec<f32>>) {
        for (site, (samples, w)) in std::mem::take(&mut self.waiting) {
            self.add(site, samples, w);
        }
        self.added.sort();
        (self.added, self.sum.and_then(|s| s.finish().ok()))
    }
}

impl FedAvg {
    /// All sites by id: the order a round's updates are added in.
    fn order(&self) -> Vec<String> {
        let mut sites = self.ctx.sites.clone();
        sites.sort();
        sites
    }

    /// Takes `site`'s update for `round`.
    fn receive(&mut self, round: u64, site: String, samples: u64, w: Part) {
        let order = self.order();
        self.received
            .entry(round)
            .or_default()
            .offer(&order, site, samples, w);
    }

    fn check(&mut self, now_ms: u64) -> Vec<Action> {
        let Some(since) = self.s.collecting_since_ms else {
            return Vec::new();
        };
        let r = self.s.round;
        let have = self
            .received
            .get(&r)
            .map_or(0, |m| m.len_from(&self.ctx.sites));
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
        let (contributors, avg) = self.received.remove(&r).unwrap_or_default().finish();
        if let Some(avg) = avg {
            out.push(Action::SetModel(Arc::new(avg)));
        }
        out.push(Action::EndOfRound {
            round: r,
            contributors,
        });
        self.s.round += 1;
        self.s.collecting_since_ms = None;
        self.received.retain(|&k, _| k >= self.s.round);
        self.own = None;
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
                    let me = self.ctx.me.clone();
                    self.receive(r, me, self.ctx.samples, Part::Own(weights.values.clone()));
                    self.own = Some((r, weights.clone()));
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
                let me = self.ctx.me.clone();
                self.receive(r, me, self.ctx.samples, Part::Own(weights.values.clone()));
                self.own = Some((r, weights.clone()));
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
                self.receive(m.round, m.origin, m.samples, Part::Peer(m.weights));
                self.check(now_ms)
            }
            Input::Presence { site, status, .. } => {
                // A peer that is (re)joining may have had no session with the broker when this
                // site published its round update (round updates are not retained): send it
                // again. Peers keep one update per site and round, so a copy is harmless.
                let mut out = Vec::new();
                if status == PeerStatus::Joining && self.ctx.is_peer(&site) {
                    let r = self.s.round;
                    if let Some((_, w)) = self.own.as_ref().filter(|(round, _)| *round == r) {
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
            Input::Members { sites, quorum } => {
                let (removed, note) = self.ctx.set_members(sites, quorum);
                let order = self.order();
                for sum in self.received.values_mut() {
                    sum.members_changed(&order);
                }
                for site in &removed {
                    self.left.remove(site);
                }
                let mut out = vec![note];
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
