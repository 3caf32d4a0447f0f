//! FedSM's SoftPull without a server: each appliance keeps the newest personalised model `P_j` it
//! has received from every peer and pulls its own towards them (Xu et al., CVPR 2022;
//! docs/FEDSM.md):
//!
//! `P_k ← λ·P_k + (1−λ)/(K−1)·Σ_{j≠k} P_j`, λ configurable (default [`DEFAULT_LAMBDA`] = 0.7).
//!
//! Rules (departures from the paper, which has a server that always holds all K models):
//! - **A site that drops out**: the others continue with the newest personalised model they hold
//!   from it. Its `P_j` stays in the sum, stale, for as long as the federation runs: the sum keeps
//!   its K−1 terms and the weight `(1−λ)/(K−1)` of every term is what the paper's formula gives.
//! - **A peer never heard from** (no `P_j` ever received) cannot be in the sum: the mean is over
//!   the peers held, `(1−λ)/|held|` each, and with none held `P_k` stays as it is.
//! - A model older than the one held from the same peer (by round) is ignored; a model of another
//!   length is refused (typed error), leaving the pool unchanged.
//!
//! The peers' models are summed in site-id order with the one averaging kernel
//! ([`WeightedAverage`]), so two sites that hold the same models compute the same numbers.

use std::collections::BTreeMap;

use crate::aggregate::{soft_pull, AggregateError, WeightedAverage};

/// FedSM's default SoftPull weight λ on the site's own personalised model.
pub const DEFAULT_LAMBDA: f32 = 0.7;

/// A peer's personalised model as held for SoftPull.
#[derive(Debug, Clone, PartialEq)]
pub struct HeldModel {
    /// The round it was trained in.
    pub round: u64,
    pub weights: Vec<f32>,
}

/// What [`PersonalisedPool::offer`] did with a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offered {
    /// Held (new peer, or newer than the one held).
    Held,
    /// Ignored: the pool holds a model of the same or a later round from that peer.
    Stale,
}

/// The newest personalised model of every peer, for SoftPull.
#[derive(Debug, Clone, Default)]
pub struct PersonalisedPool {
    own_site: String,
    len: usize,
    peers: BTreeMap<String, HeldModel>,
}

impl PersonalisedPool {
    /// An empty pool for site `own_site`, whose models have `len` values.
    pub fn new(own_site: impl Into<String>, len: usize) -> Self {
        PersonalisedPool {
            own_site: own_site.into(),
            len,
            peers: BTreeMap::new(),
        }
    }

    /// Takes a peer's personalised model of `round`. The site's own model is never held (it is
    /// the `P_k` being pulled), so offering it is [`Offered::Stale`].
    pub fn offer(
        &mut self,
        site: &str,
        round: u64,
        weights: Vec<f32>,
    ) -> Result<Offered, AggregateError> {
        if weights.len() != self.len {
            return Err(AggregateError::Length {
                expected: self.len,
                actual: weights.len(),
            });
        }
        if site == self.own_site {
            return Ok(Offered::Stale);
        }
        if self.peers.get(site).is_some_and(|h| h.round >= round) {
            return Ok(Offered::Stale);
        }
        self.peers
            .insert(site.to_string(), HeldModel { round, weights });
        Ok(Offered::Held)
    }

    /// The peers held, by id, with the round of the model held from each.
    pub fn held(&self) -> Vec<(String, u64)> {
        self.peers
            .iter()
            .map(|(s, h)| (s.clone(), h.round))
            .collect()
    }

    /// SoftPull of `own` towards the held peers' models with weight `lambda` on `own` (rules in
    /// the module docs). With no peer held, `own` unchanged.
    pub fn soft_pull(&self, own: &[f32], lambda: f32) -> Result<Vec<f32>, AggregateError> {
        if own.len() != self.len {
            return Err(AggregateError::Length {
                expected: self.len,
                actual: own.len(),
            });
        }
        if !(0.0..=1.0).contains(&lambda) {
            return Err(AggregateError::BadLambda(lambda));
        }
        if self.peers.is_empty() {
            return Ok(own.to_vec());
        }
        let mut mean = WeightedAverage::new(self.len);
        for held in self.peers.values() {
            mean.add(&held.weights, 1.0)?;
        }
        soft_pull(own, &mean.finish()?, lambda)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f64]) -> bool {
        a.iter().zip(b).all(|(x, y)| (*x as f64 - y).abs() < 1e-6)
    }

    #[test]
    fn soft_pull_is_the_papers_formula() {
        // K = 3: P_0 ← λ·P_0 + (1−λ)/2·(P_1 + P_2).
        let mut pool = PersonalisedPool::new("a", 2);
        assert_eq!(pool.offer("b", 1, vec![2.0, 4.0]).unwrap(), Offered::Held);
        assert_eq!(pool.offer("c", 1, vec![6.0, -4.0]).unwrap(), Offered::Held);
        let own = [1.0f32, 1.0];
        let out = pool.soft_pull(&own, DEFAULT_LAMBDA).unwrap();
        let want: Vec<f64> = (0..2)
            .map(|i| 0.7 * own[i] as f64 + 0.3 / 2.0 * ([2.0, 4.0][i] + [6.0, -4.0][i]))
            .collect();
        assert!(close(&out, &want), "{out:?} vs {want:?}");
        assert_eq!(pool.soft_pull(&own, 1.0).unwrap(), own.to_vec());
        assert!(pool.soft_pull(&own, 1.5).is_err());
        assert!(pool.soft_pull(&[1.0], 0.7).is_err());
    }

    #[test]
    fn a_dropped_site_stays_in_the_sum_with_its_last_model() {
        let mut pool = PersonalisedPool::new("a", 1);
        pool.offer("b", 1, vec![10.0]).unwrap();
        pool.offer("c", 1, vec![20.0]).unwrap();
        // Round 2: only b delivers; c has dropped out. c's round-1 model stays in the sum.
        pool.offer("b", 2, vec![30.0]).unwrap();
        let out = pool.soft_pull(&[0.0], 0.5).unwrap();
        assert!((out[0] - 0.5 / 2.0 * (30.0 + 20.0)).abs() < 1e-6, "{out:?}");
        assert_eq!(pool.held(), vec![("b".into(), 2), ("c".into(), 1)]);
        // An older or repeated model from a peer is ignored; a mis-sized one refused.
        assert_eq!(pool.offer("b", 1, vec![99.0]).unwrap(), Offered::Stale);
        assert_eq!(pool.offer("b", 2, vec![99.0]).unwrap(), Offered::Stale);
        assert!(pool.offer("b", 3, vec![1.0, 2.0]).is_err());
        assert_eq!(pool.offer("a", 9, vec![5.0]).unwrap(), Offered::Stale);
        assert_eq!(pool.held(), vec![("b".into(), 2), ("c".into(), 1)]);
    }

    #[test]
    fn peers_never_heard_from_are_left_out_and_none_leaves_own_unchanged() {
        let pool = PersonalisedPool::new("a", 2);
        assert_eq!(pool.soft_pull(&[3.0, 4.0], 0.7).unwrap(), vec![3.0, 4.0]);
        let mut pool = PersonalisedPool::new("a", 1);
        pool.offer("c", 4, vec![10.0]).unwrap();
        let out = pool.soft_pull(&[0.0], 0.7).unwrap();
        assert!((out[0] - 3.0).abs() < 1e-6, "{out:?}");
    }
}
