//! What the daemon tells the status board ([`crate::status::Board`]): its rounds, Dice, bytes,
//! refusals and the members it has heard from, copied from the site's state on every clock tick.

use std::collections::BTreeMap;
use std::time::Instant;

use super::Site;
use crate::status::{Board, DicePoint, FederationView, Member};
use cosilo_federation::wire::SiteStatus;

/// A peer's last presence message.
#[derive(Debug, Clone)]
pub(super) struct PeerSeen {
    pub status: SiteStatus,
    pub round: u64,
    pub model_version: u64,
    pub at: Instant,
}

fn status_name(s: SiteStatus) -> &'static str {
    match s {
        SiteStatus::Joining => "joining",
        SiteStatus::Training => "training",
        SiteStatus::Idle => "idle",
        SiteStatus::Leaving => "leaving",
    }
}

impl Site {
    /// Hands the board this site's view of its run.
    pub(super) fn report(&self, board: &Board, finished: bool) {
        let book = &self.book;
        let mut dice: Vec<DicePoint> = Vec::new();
        if let Some(score) = self.classes.score(&book.initial_dice) {
            dice.push(DicePoint { round: 0, score });
        }
        dice.extend(book.rounds.iter().filter_map(|r| {
            r.tissue_mean.map(|score| DicePoint {
                round: r.round + 1,
                score,
            })
        }));
        let last_scored = book
            .rounds
            .iter()
            .rev()
            .map(|r| &r.dice)
            .chain(std::iter::once(&book.initial_dice))
            .find(|d| d.iter().any(Option::is_some));
        let dice_by_class: BTreeMap<String, f64> = last_scored
            .map(|d| {
                self.classes
                    .names()
                    .iter()
                    .zip(d)
                    .skip(1)
                    .filter_map(|(n, v)| v.map(|v| (n.clone(), v)))
                    .collect()
            })
            .unwrap_or_default();
        let now = Instant::now();
        let members = self
            .inb
            .roster
            .sites()
            .iter()
            .map(|s| {
                let me = s.id == self.out.me;
                let seen = self.inb.seen.get(&s.id);
                Member {
                    id: s.id.clone(),
                    me,
                    status: if me {
                        Some(status_name(self.out.status).to_string())
                    } else {
                        seen.map(|p| status_name(p.status).to_string())
                    },
                    round: if me {
                        Some(self.strategy.round())
                    } else {
                        seen.map(|p| p.round)
                    },
                    model_version: if me {
                        Some(self.strategy.model_version())
                    } else {
                        seen.map(|p| p.model_version)
                    },
                    last_seen_s: if me {
                        Some(0.0)
                    } else {
                        seen.map(|p| now.duration_since(p.at).as_secs_f64())
                    },
                }
            })
            .collect();
        board.update_federation(FederationView {
            site: self.out.me.clone(),
            federation: self.out.federation.clone(),
            strategy: self.cfg.federation.strategy.name().to_string(),
            rounds_planned: self.cfg.federation.rounds,
            round: book.rounds.len() as u64,
            model_version: self.strategy.model_version(),
            last_loss: book.last_loss,
            dice,
            dice_by_class,
            bytes_sent: self.out.bytes_sent,
            bytes_received: self.inb.bytes_received,
            refused: self
                .inb
                .refused_by
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            members,
            finished,
        });
    }
}
