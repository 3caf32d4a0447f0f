//! The experiment's results: a table (Markdown and CSV) of test Dice per class per hospital as
//! mean ± std over seeds, the validation curves (SVG), every run (JSON) and the plan, each stating
//! the commit and the command.

use std::fmt::Write as _;
use std::path::Path;

use cosilo_lab::chart::{LineChart, Series};

use super::{ArmRun, ExperimentError, ExperimentOptions, Plan, HOSPITALS};

/// The foreground classes, in label order (background is not scored).
const CLASSES: [&str; 4] = ["csf", "grey_matter", "white_matter", "tumour"];

/// Mean Dice over the foreground classes a model was scored on.
pub fn foreground_mean(dice: &[Option<f64>]) -> Option<f64> {
    let v: Vec<f64> = dice.iter().skip(1).filter_map(|d| *d).collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// Mean and sample standard deviation (0 for one value).
fn mean_std(v: &[f64]) -> Option<(f64, f64)> {
    if v.is_empty() {
        return None;
    }
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    Some((m, var.sqrt()))
}

/// One row of the table: an arm at a hospital (or "all": the mean over hospitals), with each
/// column's values over seeds.
pub struct Row {
    pub arm: String,
    pub hospital: String,
    /// Per column: CLASSES, then the foreground mean.
    pub columns: Vec<Vec<f64>>,
    pub bytes_sent: Vec<f64>,
    pub bytes_received: Vec<f64>,
    pub seconds: Vec<f64>,
    /// The most test-split reads any store of the arm recorded (1 when the arm kept the rule).
    pub test_reads: u64,
}

/// The rows, arms in plan order, hospitals then "all".
pub fn rows(plan: &Plan, runs: &[ArmRun]) -> Vec<Row> {
    let mut out = Vec::new();
    for arm in &plan.arms {
        let arm_runs: Vec<&ArmRun> = runs.iter().filter(|r| r.arm == *arm).collect();
        if arm_runs.is_empty() {
            continue;
        }
        let totals = |f: &dyn Fn(&ArmRun) -> f64| arm_runs.iter().map(|r| f(r)).collect::<Vec<_>>();
        let reads = arm_runs
            .iter()
            .filter_map(|r| r.test_reads.values().copied().max())
            .max()
            .unwrap_or(0);
        let mut per_hospital_means: Vec<Vec<f64>> = vec![Vec::new(); CLASSES.len() + 1];
        for h in HOSPITALS {
            let mut columns: Vec<Vec<f64>> = vec![Vec::new(); CLASSES.len() + 1];
            for r in &arm_runs {
                let Some(score) = r.hospitals.iter().find(|s| s.hospital == h) else {
                    continue;
                };
                for (c, col) in columns.iter_mut().take(CLASSES.len()).enumerate() {
                    if let Some(d) = score.dice.get(c + 1).copied().flatten() {
                        col.push(d);
                    }
                }
                if let Some(m) = foreground_mean(&score.dice) {
                    columns[CLASSES.len()].push(m);
                }
            }
            for (all, col) in per_hospital_means.iter_mut().zip(&columns) {
                if let Some((m, _)) = mean_std(col) {
                    all.push(m);
                }
            }
            out.push(Row {
                arm: arm.clone(),
                hospital: h.to_string(),
                columns,
                bytes_sent: Vec::new(),
                bytes_received: Vec::new(),
                seconds: Vec::new(),
                test_reads: reads,
            });
        }
        out.push(Row {
            arm: arm.clone(),
            hospital: "all".into(),
            columns: per_hospital_means,
            bytes_sent: totals(&|r| r.bytes_sent as f64),
            bytes_received: totals(&|r| r.bytes_received as f64),
            seconds: totals(&|r| r.seconds),
            test_reads: reads,
        });
    }
    out
}

fn cell(v: &[f64], decimals: usize) -> String {
    match mean_std(v) {
        None => "–".into(),
        Some((m, s)) if v.len() > 1 => format!("{m:.decimals$} ± {s:.decimals$}"),
        Some((m, _)) => format!("{m:.decimals$}"),
    }
}

/// The Markdown table with its provenance.
pub fn markdown(plan: &Plan, opts: &ExperimentOptions, rows: &[Row], seconds: f64) -> String {
    let mut s = format!(
        "# Experiment {}\n\ncommit `{}`; command `{}`; wall time {:.0} s on this machine.\n\n\
         Test Dice per class on each hospital's own test patients (read once per arm, through the \
         store's final evaluation), mean ± std over seeds {:?}; \"all\" is the mean over the \
         hospitals. Rounds: {} ({}). Selection and stopping read validation only.\n\n",
        plan.name,
        opts.commit,
        opts.command,
        seconds,
        plan.seeds,
        plan.rounds,
        if plan.steps_per_round == 0 {
            "one local epoch each".to_string()
        } else {
            format!("{} steps each", plan.steps_per_round)
        },
    );
    s += "| arm | hospital | csf | grey matter | white matter | tumour | mean | sent (MB) | received (MB) | wall (s) | test reads per store |\n";
    s += "|---|---|---|---|---|---|---|---|---|---|---|\n";
    for r in rows {
        let mb = |v: &[f64]| v.iter().map(|b| b / 1e6).collect::<Vec<_>>();
        let cols: Vec<String> = r.columns.iter().map(|c| cell(c, 3)).collect();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.arm,
            r.hospital,
            cols.join(" | "),
            cell(&mb(&r.bytes_sent), 1),
            cell(&mb(&r.bytes_received), 1),
            cell(&r.seconds, 0),
            r.test_reads
        );
    }
    if let Some(ratio) = ratio_to_pooled(rows, "fedavg") {
        let _ = writeln!(
            s,
            "\nFedAvg reaches {:.1} % of pooled mean Dice (Sheller et al.: 98.7 %; target ≥ 98 %).",
            ratio * 100.0
        );
    }
    if let Some(ratio) = ratio_to_pooled(rows, "braintorrent") {
        let _ = writeln!(
            s,
            "BrainTorrent reaches {:.1} % of pooled mean Dice (target ≥ 98 %).",
            ratio * 100.0
        );
    }
    s
}

/// An arm's "all" mean Dice over the pooled arm's.
fn ratio_to_pooled(rows: &[Row], arm: &str) -> Option<f64> {
    let all = |a: &str| {
        rows.iter()
            .find(|r| r.arm == a && r.hospital == "all")
            .and_then(|r| mean_std(&r.columns[CLASSES.len()]))
            .map(|(m, _)| m)
    };
    Some(all(arm)? / all("pooled")?)
}

/// The CSV: one line per row, mean and std per column.
pub fn csv(opts: &ExperimentOptions, rows: &[Row]) -> String {
    let mut s = format!(
        "# commit {}; command {}\narm,hospital",
        opts.commit, opts.command
    );
    for c in CLASSES.iter().chain(&["mean"]) {
        let _ = write!(s, ",{c}_mean,{c}_std");
    }
    s += ",bytes_sent_mean,bytes_received_mean,seconds_mean,test_reads\n";
    let num = |v: &[f64]| {
        mean_std(v).map_or((String::new(), String::new()), |(m, d)| {
            (format!("{m:.4}"), format!("{d:.4}"))
        })
    };
    for r in rows {
        let _ = write!(s, "{},{}", r.arm, r.hospital);
        for c in &r.columns {
            let (m, d) = num(c);
            let _ = write!(s, ",{m},{d}");
        }
        let _ = writeln!(
            s,
            ",{},{},{},{}",
            num(&r.bytes_sent).0,
            num(&r.bytes_received).0,
            num(&r.seconds).0,
            r.test_reads
        );
    }
    s
}

/// Validation tissue Dice against round, one line per arm (mean over seeds).
pub fn curves(plan: &Plan, runs: &[ArmRun]) -> LineChart {
    let series = plan
        .arms
        .iter()
        .filter_map(|arm| {
            let arm_runs: Vec<&ArmRun> = runs.iter().filter(|r| r.arm == *arm).collect();
            let rounds = arm_runs.iter().map(|r| r.curve.len()).max()?;
            let points = (0..rounds)
                .filter_map(|i| {
                    let v: Vec<(f64, f64)> = arm_runs
                        .iter()
                        .filter_map(|r| r.curve.get(i).copied())
                        .collect();
                    (!v.is_empty()).then(|| {
                        let n = v.len() as f64;
                        (v[0].0, v.iter().map(|p| p.1).sum::<f64>() / n)
                    })
                })
                .collect();
            Some(Series {
                name: arm.clone(),
                points,
            })
        })
        .collect();
    LineChart {
        title: format!("{}: validation tissue Dice per round", plan.name),
        x_label: "round (pooled: epoch)".into(),
        y_label: "validation Dice (CSF, GM, WM)".into(),
        series,
        y_range: None,
    }
}

fn write(path: &Path, text: &str) -> Result<(), ExperimentError> {
    std::fs::write(path, text).map_err(|source| ExperimentError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes results.md, results.csv, curves.svg, runs.json and plan.toml into `dir`.
pub fn write_all(
    dir: &Path,
    plan: &Plan,
    opts: &ExperimentOptions,
    runs: &[ArmRun],
    seconds: f64,
) -> Result<(), ExperimentError> {
    let rows = rows(plan, runs);
    write(
        &dir.join("results.md"),
        &markdown(plan, opts, &rows, seconds),
    )?;
    write(&dir.join("results.csv"), &csv(opts, &rows))?;
    let mut svg = curves(plan, runs).to_svg();
    svg = svg.replacen(
        '\n',
        &format!(
            "\n<!-- commit {}; command {} -->\n",
            opts.commit, opts.command
        ),
        1,
    );
    write(&dir.join("curves.svg"), &svg)?;
    write(
        &dir.join("runs.json"),
        &serde_json::to_string_pretty(runs).unwrap_or_default(),
    )?;
    let plan_text = toml::to_string(plan).unwrap_or_default();
    write(
        &dir.join("plan.toml"),
        &format!(
            "# commit {}; command {}\n{plan_text}",
            opts.commit, opts.command
        ),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::HospitalScore;
    use super::*;
    use std::collections::BTreeMap;

    fn run(arm: &str, seed: u64, d: f64) -> ArmRun {
        ArmRun {
            arm: arm.into(),
            seed,
            hospitals: HOSPITALS
                .iter()
                .map(|h| HospitalScore {
                    hospital: h.to_string(),
                    dice: vec![None, Some(d), Some(d), Some(d), Some(d)],
                })
                .collect(),
            bytes_sent: 1_000_000,
            bytes_received: 2_000_000,
            seconds: 10.0,
            test_reads: BTreeMap::from([("h1".to_string(), 1)]),
            curve: vec![(1.0, d / 2.0), (2.0, d)],
        }
    }

    #[test]
    fn table_has_a_row_per_arm_and_hospital_with_mean_and_std_over_seeds() {
        let plan: Plan = toml::from_str(
            "name = \"t\"\narms = [\"pooled\", \"fedavg\"]\nrounds = 2\nseeds = [1, 2]\n\
             [cohort]\nseed = 1\nsizes = \"1,1,1\"\nvalidation = 1\ntest = 1\n",
        )
        .unwrap();
        let runs = vec![
            run("pooled", 1, 0.8),
            run("pooled", 2, 0.6),
            run("fedavg", 1, 0.7),
            run("fedavg", 2, 0.7),
        ];
        let rows = rows(&plan, &runs);
        assert_eq!(rows.len(), 2 * (HOSPITALS.len() + 1));
        let opts = ExperimentOptions {
            out: "o".into(),
            cache: "c".into(),
            cosilo: "x".into(),
            commit: "abc123".into(),
            command: "cosilo experiment --plan p.toml".into(),
        };
        let md = markdown(&plan, &opts, &rows, 1.0);
        assert!(md.contains("commit `abc123`"));
        assert!(md.contains("| pooled | h1 | 0.700 ± 0.141 |"), "{md}");
        assert!(md.contains("| fedavg | all | 0.700 ± 0.000 |"), "{md}");
        assert!(md.contains("FedAvg reaches 100.0 % of pooled"), "{md}");
        let csv = csv(&opts, &rows);
        assert_eq!(csv.lines().count(), 2 + rows.len());
        assert!(csv
            .lines()
            .nth(1)
            .unwrap()
            .starts_with("arm,hospital,csf_mean,csf_std"));
        let chart = curves(&plan, &runs);
        assert_eq!(chart.series.len(), 2);
        assert_eq!(chart.series[0].points, vec![(1.0, 0.35), (2.0, 0.7)]);
    }
}
