//! Cyclic institutional incremental learning (CIIL).

use super::*;

/// Cyclic institutional incremental learning (CIIL): a token round the ring.
pub struct Cyclic {
    pub(super) ctx: Context,
    pub(super) s: CyclicState,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct CyclicState {
    /// The position this site is training (holding the token), if any.
    pub(super) holding: Option<u64>,
    /// The newest position whose model was seen or made.
    pub(super) last_position: Option<u64>,
    pub(super) done: bool,
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
                let mut out = vec![set_peer_model(&m)];
                if m.round + 1 >= self.total() {
                    self.s.done = true;
                    out.push(Action::Finished);
                } else if self.holder(m.round + 1) == self.ctx.me && self.s.holding.is_none() {
                    out.extend(self.hold(m.round + 1));
                }
                out
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
        self.s
            .last_position
            .map_or(0, |p| (p + 1) / self.ctx.sites.len() as u64)
    }
    fn finished(&self) -> bool {
        self.s.done
    }
}
