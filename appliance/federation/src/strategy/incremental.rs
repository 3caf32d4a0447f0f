//! Institutional incremental learning (IIL).

use super::*;

/// Institutional incremental learning (IIL): each site once, until its validation stalls.
pub struct Incremental {
    pub(super) ctx: Context,
    pub(super) s: IncrementalState,
    pub(super) best: Option<OwnModel>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct IncrementalState {
    /// Training (this site's turn has come).
    pub(super) training: bool,
    /// This site passed its model on.
    pub(super) passed: bool,
    pub(super) rounds_here: u64,
    pub(super) best_score: Option<f64>,
    pub(super) since_best: u64,
    pub(super) done: bool,
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
                if self.best.is_none() {
                    self.best = Some(weights);
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
                    self.best = Some(weights);
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
                    // `best` is set: the first Trained of a turn always becomes the best.
                    if let Some(best) = self.best.clone() {
                        out.push(Action::SetModel(best.values.clone()));
                        out.push(Action::Publish {
                            purpose: Purpose::Token,
                            round: i as u64,
                            model_version: i as u64 + 1,
                            weights: best,
                            retain: true,
                        });
                    }
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
                    return vec![set_peer_model(&m), Action::Finished];
                }
                if j + 1 == self.my_index() && !self.s.training && !self.s.passed {
                    // The previous site's model is not this site's best: the turn's first
                    // trained model always replaces it, so it is only installed.
                    let mut out = vec![set_peer_model(&m)];
                    out.extend(self.start_turn());
                    return out;
                }
                Vec::new()
            }
            Input::Members { .. } => vec![Action::Note(
                "the roster changed: the daemon refuses a removed member's messages from now \
                 on; the token ring keeps this run's order (it is built at start)"
                    .into(),
            )],
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
