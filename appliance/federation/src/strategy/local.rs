//! Local training only: no federation.

use super::*;

/// Local training only.
pub struct LocalOnly {
    pub(super) ctx: Context,
    pub(super) s: LocalState,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct LocalState {
    pub(super) round: u64,
    pub(super) done: bool,
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
