//! Federated averaging without a server.

use super::*;

/// Federated averaging without a server.
pub struct FedAvg {
    pub(super) ctx: Context,
    pub(super) s: FedAvgState,
    /// round → site → (samples, weights); own entry included; rounds ≥ the current one only.
    pub(super) received: BTreeMap<u64, BTreeMap<String, (u64, Vec<f32>)>>,
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
