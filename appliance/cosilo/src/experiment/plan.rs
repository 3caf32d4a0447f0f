//! An experiment plan (`cosilo experiment --plan plan.toml`): the cohort, the arms, the budget in
//! rounds (a round is one local epoch by default), the seeds.

use std::path::Path;

use serde::{Deserialize, Serialize};

use cosilo_federation::strategy::StrategyKind;

use super::ExperimentError;

/// One arm of the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arm {
    /// Every hospital's training cases in one store, one trainer: the upper reference.
    Pooled,
    /// Each hospital alone, same budget.
    Local,
    /// A federation strategy, run as one `cosilo run` process per hospital over the broker.
    Federated(StrategyKind),
}

impl Arm {
    /// Parses an arm's name as a plan writes it. `fedsm` has its own issue and is refused with a
    /// clear message until it exists.
    pub fn parse(name: &str) -> Result<Arm, ExperimentError> {
        let bad = |reason: &str| ExperimentError::Plan(format!("arm {name:?}: {reason}"));
        match name {
            "pooled" => Ok(Arm::Pooled),
            "local" => Ok(Arm::Local),
            "fedsm" => Err(bad("FedSM is not implemented yet (it has its own issue)")),
            other => {
                let kind: StrategyKind =
                    serde_json::from_value(serde_json::json!(other)).map_err(|_| {
                        bad(
                            "unknown; the arms are pooled, local, fedavg, braintorrent, \
                             gossip-avg, ciil, iil",
                        )
                    })?;
                Ok(match kind {
                    StrategyKind::Local => Arm::Local,
                    k => Arm::Federated(k),
                })
            }
        }
    }

    /// The arm's name in tables and folders.
    pub fn name(self) -> &'static str {
        match self {
            Arm::Pooled => "pooled",
            Arm::Local => "local",
            Arm::Federated(k) => k.name(),
        }
    }
}

/// `[cohort]`: what `cosilo data cohort` builds (same seed: the same patients for every arm).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CohortPlan {
    pub seed: u64,
    /// Training patients per hospital (h1, h2, h3), e.g. "40,15,5".
    pub sizes: String,
    pub validation: usize,
    pub test: usize,
}

/// `[train]`: overrides of the default training configuration, the same for every arm.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainPlan {
    pub base: Option<usize>,
    pub depth: Option<usize>,
    pub batch_size: Option<usize>,
    pub patch: Option<[usize; 2]>,
    pub lr: Option<f64>,
}

/// A whole plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// The results folder's name under the output folder.
    pub name: String,
    /// Arms in the order the table lists them.
    pub arms: Vec<String>,
    /// Rounds of every arm (the pooled arm: epochs).
    pub rounds: u64,
    /// Steps per round; 0 (the default) = one local epoch per round, as in Sheller et al.
    #[serde(default)]
    pub steps_per_round: usize,
    /// IIL: rounds (epochs) without a better validation Dice before a site passes its model on.
    #[serde(default = "default_patience")]
    pub patience: u64,
    /// Training seeds; every arm runs once per seed (default 1, 2, 3).
    #[serde(default = "default_seeds")]
    pub seeds: Vec<u64>,
    pub cohort: CohortPlan,
    #[serde(default)]
    pub train: TrainPlan,
}

fn default_patience() -> u64 {
    8
}

fn default_seeds() -> Vec<u64> {
    vec![1, 2, 3]
}

impl Plan {
    /// Reads and checks a plan file.
    pub fn load(path: &Path) -> Result<Plan, ExperimentError> {
        let text = std::fs::read_to_string(path).map_err(|source| ExperimentError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let plan: Plan = toml::from_str(&text)
            .map_err(|e| ExperimentError::Plan(format!("{}: {e}", path.display())))?;
        plan.arms()?;
        if plan.rounds == 0 || plan.seeds.is_empty() || plan.patience == 0 {
            return Err(ExperimentError::Plan(
                "rounds, patience and the seed list must not be zero or empty".into(),
            ));
        }
        Ok(plan)
    }

    /// The arms, parsed.
    pub fn arms(&self) -> Result<Vec<Arm>, ExperimentError> {
        if self.arms.is_empty() {
            return Err(ExperimentError::Plan("the plan names no arm".into()));
        }
        self.arms.iter().map(|a| Arm::parse(a)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arms_parse_by_name_and_fedsm_is_refused_with_a_reason() {
        assert_eq!(Arm::parse("pooled").unwrap(), Arm::Pooled);
        assert_eq!(Arm::parse("local").unwrap(), Arm::Local);
        assert_eq!(
            Arm::parse("braintorrent").unwrap(),
            Arm::Federated(StrategyKind::BrainTorrent)
        );
        assert_eq!(
            Arm::parse("gossip-avg").unwrap(),
            Arm::Federated(StrategyKind::GossipAvg)
        );
        let e = Arm::parse("fedsm").unwrap_err().to_string();
        assert!(e.contains("not implemented"), "{e}");
        assert!(Arm::parse("fedprox").is_err());
        for a in [
            "pooled",
            "local",
            "fedavg",
            "braintorrent",
            "gossip-avg",
            "ciil",
            "iil",
        ] {
            assert_eq!(Arm::parse(a).unwrap().name(), a);
        }
    }

    #[test]
    fn committed_plans_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/plans");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                let plan = Plan::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                assert!(!plan.arms().unwrap().is_empty());
                n += 1;
            }
        }
        assert!(n >= 2, "plans in {}", dir.display());
    }
}
