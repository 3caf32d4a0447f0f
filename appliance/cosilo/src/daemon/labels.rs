//! What the daemon knows of the classes: their names from the training configuration and which
//! of them make the score it logs and ranks models by (the site configuration's
//! `score_classes`), never a fixed list of label values.

use cosilo_train::TrainConfig;

/// The model's classes and the ones its score averages.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Classes {
    /// One name per class, background first.
    names: Vec<String>,
    /// The classes whose mean Dice is the score; empty when a scored name is not a class.
    scored: Vec<usize>,
}

impl Classes {
    /// The classes of `cfg`, scored on the classes named `scored` (all of them must be classes
    /// of `cfg` for a score to exist).
    pub(crate) fn new(cfg: &TrainConfig, scored: &[String]) -> Self {
        let names = cfg.class_names.clone();
        let indices: Option<Vec<usize>> = scored
            .iter()
            .map(|s| names.iter().position(|n| n == s))
            .collect();
        Classes {
            names,
            scored: indices.unwrap_or_default(),
        }
    }

    /// The class names, background first.
    pub(crate) fn names(&self) -> &[String] {
        &self.names
    }

    /// The number of classes.
    pub(crate) fn len(&self) -> usize {
        self.names.len()
    }

    /// The mean Dice of the scored classes, when each of them has one.
    pub(crate) fn score(&self, dice: &[Option<f64>]) -> Option<f64> {
        if self.scored.is_empty() {
            return None;
        }
        let v: Vec<f64> = self
            .scored
            .iter()
            .filter_map(|&c| dice.get(c).copied().flatten())
            .collect();
        (v.len() == self.scored.len()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    }

    /// "name value" for each foreground class, `–` where there is no value (a round's log line).
    pub(crate) fn describe(&self, dice: &[Option<f64>]) -> String {
        self.names
            .iter()
            .enumerate()
            .skip(1)
            .map(|(c, name)| {
                let d = dice.get(c).copied().flatten();
                format!("{name} {}", d.map_or("–".into(), |d| format!("{d:.3}")))
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classes(scored: &[&str]) -> Classes {
        let scored: Vec<String> = scored.iter().map(|s| s.to_string()).collect();
        Classes::new(&TrainConfig::default(), &scored)
    }

    #[test]
    fn the_default_score_is_the_mean_of_the_tissue_classes() {
        let c = classes(&["csf", "grey_matter", "white_matter"]);
        assert_eq!(c.len(), 5);
        let dice = [Some(0.9), Some(0.2), Some(0.4), Some(0.6), Some(0.0)];
        assert!((c.score(&dice).unwrap() - 0.4).abs() < 1e-12);
        // A scored class without a value: no score.
        assert_eq!(c.score(&[Some(0.9), Some(0.2), None, Some(0.6)]), None);
        assert_eq!(c.score(&[]), None);
    }

    #[test]
    fn a_scored_name_the_model_lacks_gives_no_score() {
        let c = classes(&["csf", "liver"]);
        assert_eq!(c.score(&[Some(1.0); 5]), None);
    }

    #[test]
    fn the_log_names_the_configured_classes() {
        let c = classes(&["tumour"]);
        assert_eq!(
            c.describe(&[None, Some(0.5), None]),
            "csf 0.500 grey_matter – white_matter – tumour –"
        );
        assert_eq!(c.score(&[None, None, None, None, Some(0.25)]), Some(0.25));
    }
}
