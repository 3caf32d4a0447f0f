//! `cosilo experiment --plan plan.toml`: its arguments (the library runs it).

use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub(crate) struct ExperimentArgs {
    /// The plan: cohort, arms, rounds, seeds (see docs/plans/).
    #[arg(long)]
    pub(crate) plan: PathBuf,
    /// Output folder; results go to OUT/<plan name>/.
    #[arg(long, default_value = "out/experiments")]
    pub(crate) out: PathBuf,
}

/// The commit the results state: `COSILO_COMMIT` when set, else `git rev-parse HEAD` here (with
/// "+dirty" when the work tree has changes), else "unknown".
fn commit() -> String {
    if let Ok(c) = std::env::var("COSILO_COMMIT") {
        return c;
    }
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match git(&["rev-parse", "HEAD"]) {
        Some(head) => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{head}+dirty")
            } else {
                head
            }
        }
        None => "unknown".into(),
    }
}

/// `cosilo experiment`.
pub(crate) fn experiment(args: ExperimentArgs, cache: &Path) -> anyhow::Result<()> {
    use cosilo_appliance::experiment::{run_experiment, ExperimentOptions, Plan};
    let plan = Plan::load(&args.plan)?;
    let command = std::iter::once("cosilo".to_string())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    let opts = ExperimentOptions {
        out: args.out,
        cache: cache.to_path_buf(),
        cosilo: std::env::current_exe()?,
        commit: commit(),
        command,
    };
    run_experiment(&plan, &opts)?;
    Ok(())
}
