//! Multi-process federations for tests: a tiny cohort imported into one store per hospital, keys,
//! a roster and site configurations in a temporary directory ([`Federation`], laid out by the
//! appliance's `FederationPlan` as `cosilo demo` lays out its own), `cosilo run`
//! child processes with their logs captured to files ([`SiteProcess`], killed on drop), and
//! readers for what the sites leave behind: the `--summary` JSON, the newest session checkpoint
//! in each store (weights and the daemon's saved state), and the per-round log lines.
//!
//! The binaries live beside the test executable (`target/release/cosilo`,
//! `target/release/examples/rogue_site`); each is built with `cargo build` once per test process
//! before its first use, so a binary left from an older checkout is never run. The cohort needs the anatomy cache (`cosilo data fetch`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cosilo_appliance::config::{Quorum, SiteConfig};
use cosilo_appliance::daemon::{session_run, RunSummary};
use cosilo_appliance::plan::FederationPlan;
use cosilo_federation::keys::SiteKeys;
use cosilo_federation::strategy::StrategyKind;
use cosilo_federation::weights::{FlatWeights, WeightFormat};
use cosilo_store::Store;

use crate::workspace_root;

/// The max MQTT packet the tiny federations use (a tiny model's update fits one chunk).
pub const MAX_PACKET: usize = 256 * 1024;

/// The target folder (`target/release` or `target/debug`) of the running test executable.
fn target_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the test executable")?;
    // target/release/deps/<test> → target/release
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .context("the test executable has no target folder")
}

/// Builds `what` (cargo arguments after `build -p cosilo-appliance`) in the test's profile, into
/// the target folder `dir` the test executable runs from (passed as `--target-dir`, so a
/// `--target-dir` or `CARGO_TARGET_DIR` of the outer `cargo test` cannot send it elsewhere).
fn cargo_build(what: &[&str], dir: &Path) -> Result<()> {
    let target = dir
        .parent()
        .context("the test's target folder has no parent")?;
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(workspace_root())
        .args(["build", "-p", "cosilo-appliance"])
        .args(what)
        .arg("--target-dir")
        .arg(target);
    if dir.ends_with("release") {
        cmd.arg("--release");
    }
    let status = cmd
        .status()
        .with_context(|| format!("running cargo build {}", what.join(" ")))?;
    if !status.success() {
        bail!("cargo build {} failed with {status}", what.join(" "));
    }
    Ok(())
}

/// Runs `cargo build` for `what` once per test process and returns `product`, the file it makes
/// (relative to the target folder). Always building, even when the file exists, is what keeps a
/// stale binary from an older checkout out of the tests: cargo rebuilds exactly when a source
/// changed and otherwise returns in about a second. The lock is held through the build, so tests
/// running in parallel wait for the one build instead of starting cargo each; a failed build is
/// not remembered, so the next caller tries again and reports its own error.
fn built_once(what: &[&str], product: &Path) -> Result<PathBuf> {
    static BUILT: Mutex<BTreeMap<Vec<String>, PathBuf>> = Mutex::new(BTreeMap::new());
    let key: Vec<String> = what.iter().map(|s| s.to_string()).collect();
    let mut built = BUILT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(bin) = built.get(&key) {
        return Ok(bin.clone());
    }
    let dir = target_dir()?;
    let bin = dir.join(product);
    cargo_build(what, &dir)?;
    if !bin.exists() {
        bail!("cargo build did not produce {}", bin.display());
    }
    built.insert(key, bin.clone());
    Ok(bin)
}

/// The `cosilo` binary of this profile, built (`cargo build -p cosilo-appliance --bin cosilo`)
/// once per test process so that it matches the sources under test.
pub fn cosilo_bin() -> Result<PathBuf> {
    built_once(&["--bin", "cosilo"], Path::new("cosilo"))
}

/// An example of `cosilo-appliance` (e.g. `rogue_site`), built once per test process like
/// [`cosilo_bin`].
pub fn appliance_example(name: &str) -> Result<PathBuf> {
    built_once(&["--example", name], &Path::new("examples").join(name))
}

/// A tiny cohort (2/2/1 training, 1 validation and 1 test patient for h1/h2/h3), built once per test
/// process into a folder that outlives it (the OS cleans temp).
pub fn tiny_cohort() -> Result<PathBuf> {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    if let Some(d) = DIR.get() {
        return Ok(d.clone());
    }
    let dir = tempfile::Builder::new()
        .prefix("cosilo-faults-cohort")
        .tempdir()
        .context("creating the cohort folder")?
        .keep();
    let cache = cosilo_lab::fetch::default_cache_dir();
    let spec = cosilo_lab::cohort::CohortSpec::new(11, "2,2,1", 1)?.with_validation(1)?;
    cosilo_lab::cohort::build_cohort(&cache, &dir, &spec).with_context(|| {
        format!(
            "building the test cohort from {} (run `cosilo data fetch` first)",
            cache.display()
        )
    })?;
    Ok(DIR.get_or_init(|| dir).clone())
}

/// The tiny U-Net every test federation trains: base 8, depth 2, batch 2, 48² patches.
pub fn tiny_model(cfg: &mut SiteConfig) {
    cfg.train.base = Some(8);
    cfg.train.depth = Some(2);
    cfg.train.batch_size = Some(2);
    cfg.train.patch = Some([48, 48]);
}

/// The shape of a test federation.
#[derive(Debug, Clone)]
pub struct FederationSpec {
    /// The federation's name (topics live under `cosilo/{name}/`).
    pub name: String,
    /// The strategy every site runs.
    pub strategy: StrategyKind,
    /// Site ids; each trains on the cohort's hospital of the same id.
    pub sites: Vec<String>,
    /// Training rounds.
    pub rounds: u64,
    /// Optimiser steps per round.
    pub steps_per_round: usize,
    /// FedAvg: seconds after its own update that a site waits for the others.
    pub round_deadline_s: u64,
    /// Seconds before an incomplete transfer or an absent peer is given up.
    pub update_timeout_s: u64,
    /// FedAvg quorum.
    pub quorum: Quorum,
    /// Weights on the wire.
    pub weight_format: WeightFormat,
    /// The broker's (and the sites') max packet.
    pub max_packet_bytes: usize,
    /// Create every site's persistent MQTT session before any site starts, so the broker
    /// queues what peers publish before a slow site first connects (see
    /// [`Federation::provision_sessions`]).
    pub provision_sessions: bool,
}

impl FederationSpec {
    /// Three hospitals h1, h2, h3, a tiny U-Net (base 8, depth 2, batch 2, 48² patches), 3 rounds
    /// of 3 steps, generous deadlines.
    pub fn tiny(strategy: StrategyKind) -> FederationSpec {
        FederationSpec {
            name: "faults".into(),
            strategy,
            sites: ["h1", "h2", "h3"].map(String::from).to_vec(),
            rounds: 3,
            steps_per_round: 3,
            round_deadline_s: 60,
            update_timeout_s: 90,
            quorum: Quorum::Count(2),
            weight_format: WeightFormat::F16Zstd,
            max_packet_bytes: MAX_PACKET,
            provision_sessions: true,
        }
    }
}

/// One federation on disk: stores, keys, roster, configurations and logs in a temp dir.
pub struct Federation {
    root: PathBuf,
    /// Deletes `root` on drop (absent when the folder is kept).
    _guard: Option<tempfile::TempDir>,
    spec: FederationSpec,
    launches: std::cell::Cell<u32>,
}

impl Federation {
    /// Imports each site's hospital into its own store, generates keys and the roster, and
    /// writes `{site}.toml` for a broker on 127.0.0.1:`broker_port`.
    pub fn create(spec: FederationSpec, broker_port: u16) -> Result<Federation> {
        let dir = tempfile::Builder::new()
            .prefix("cosilo-faults-")
            .tempdir()
            .context("creating the federation folder")?;
        let manifest = tiny_cohort()?.join("manifest.json");
        let sites: Vec<&str> = spec.sites.iter().map(String::as_str).collect();
        let plan = FederationPlan::new(&spec.name, &sites, dir.path());
        plan.import_cohort(&manifest)?;
        plan.write_keys_and_roster()?;
        for h in &spec.sites {
            let mut cfg = plan.site_config(h, spec.strategy, broker_port, spec.max_packet_bytes);
            cfg.federation.rounds = spec.rounds;
            cfg.federation.steps_per_round = spec.steps_per_round;
            cfg.federation.round_deadline_s = spec.round_deadline_s;
            cfg.federation.update_timeout_s = spec.update_timeout_s;
            cfg.federation.quorum = spec.quorum;
            cfg.federation.weight_format = spec.weight_format;
            tiny_model(&mut cfg);
            plan.write_config(&cfg, &dir.path().join(format!("{h}.toml")))
                .with_context(|| format!("the test configuration of {h}"))?;
        }
        if spec.provision_sessions {
            provision_sessions(&spec, broker_port)?;
        }
        // COSILO_KEEP_TEST_DIRS=1 keeps the folder (logs, stores) for a post-mortem.
        let root = dir.path().to_path_buf();
        let guard = if std::env::var_os("COSILO_KEEP_TEST_DIRS").is_some() {
            eprintln!("keeping {}", dir.keep().display());
            None
        } else {
            Some(dir)
        };
        Ok(Federation {
            root,
            _guard: guard,
            spec,
            launches: std::cell::Cell::new(0),
        })
    }

    /// The federation's folder.
    pub fn dir(&self) -> &Path {
        self.root.as_path()
    }

    /// Its spec.
    pub fn spec(&self) -> &FederationSpec {
        &self.spec
    }

    /// The roster file.
    pub fn roster_path(&self) -> PathBuf {
        self.root.as_path().join("roster.toml")
    }

    /// A site's secret key file.
    pub fn key_path(&self, site: &str) -> PathBuf {
        SiteKeys::key_path(self.root.as_path(), site)
    }

    /// A site's configuration file.
    pub fn config_path(&self, site: &str) -> PathBuf {
        self.root.as_path().join(format!("{site}.toml"))
    }

    /// A site's configuration as the daemon reads it.
    pub fn config(&self, site: &str) -> Result<SiteConfig> {
        Ok(SiteConfig::load(&self.config_path(site))?)
    }

    /// Where `cosilo run --summary` writes a site's summary.
    pub fn summary_path(&self, site: &str) -> PathBuf {
        self.root.as_path().join(format!("{site}-summary.json"))
    }

    /// Starts `cosilo run --config {site}.toml` with one compute thread; stdout and stderr go to
    /// `{site}.{n}.log` (n counts launches in this federation, so a restart gets its own log).
    pub fn start(&self, site: &str) -> Result<SiteProcess> {
        let n = self.launches.get();
        self.launches.set(n + 1);
        let log = self.root.as_path().join(format!("{site}.{n}.log"));
        let out =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(cosilo_bin()?)
            .arg("run")
            .arg("--config")
            .arg(self.config_path(site))
            .arg("--summary")
            .arg(self.summary_path(site))
            .env("RAYON_NUM_THREADS", "1")
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out))
            .spawn()
            .with_context(|| format!("starting cosilo run for {site}"))?;
        Ok(SiteProcess {
            site: site.to_string(),
            child: Some(child),
            log,
            status: None,
        })
    }

    /// Starts every site of the spec.
    pub fn start_all(&self) -> Result<Vec<SiteProcess>> {
        self.spec.sites.iter().map(|h| self.start(h)).collect()
    }

    /// The summary a finished (or cleanly stopped) site wrote.
    pub fn summary(&self, site: &str) -> Result<RunSummary> {
        let p = self.summary_path(site);
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
    }

    /// The newest durable session checkpoint of a site that is not running (its store is locked
    /// while it runs).
    pub fn checkpoint(&self, site: &str) -> Result<SiteCheckpoint> {
        let cfg = self.config(site)?;
        let store = Store::open(&cfg.site.store)?;
        let run = session_run(&cfg);
        let (seq, meta, _) = store
            .latest_checkpoint(&run)?
            .with_context(|| format!("{site} has no checkpoint of {run}"))?;
        let device = candle_core::Device::Cpu;
        let (_, vars, _) = cosilo_appliance::local::load_model(&store, &run, &device)
            .with_context(|| format!("loading {site}'s checkpoint {seq}"))?;
        Ok(SiteCheckpoint {
            seq,
            weights: cosilo_train::flat::flatten(&vars)?,
            meta,
        })
    }

    /// The model a site starts from (its configuration's seed), for "did it change" checks.
    pub fn initial_weights(&self, site: &str) -> Result<FlatWeights> {
        let tc = self.config(site)?.train_config()?;
        let device = candle_core::Device::Cpu;
        let (_, init) = cosilo_train::unet::build(&tc.model, &device, tc.seed)?;
        Ok(cosilo_train::flat::flatten(&init)?)
    }
}

/// Connects once as each site (the daemon's client id `cosilo-{federation}-{site}`, persistent
/// session, the member subscriptions) and disconnects, so the broker holds every site's session
/// and queues QoS 1 messages for it from now on. Without this, a FedAvg round update published
/// before a slow peer's first connection never reaches that peer, which then waits for the
/// deadline.
pub fn provision_sessions(spec: &FederationSpec, broker_port: u16) -> Result<()> {
    use cosilo_federation::link::{self, LinkConfig, LinkEvent};
    use cosilo_federation::wire::topics;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a tokio runtime")?;
    runtime.block_on(async {
        for h in &spec.sites {
            let mut cfg = LinkConfig::new(
                "127.0.0.1",
                broker_port,
                format!("cosilo-{}-{h}", spec.name),
            );
            cfg.max_packet_bytes = spec.max_packet_bytes;
            cfg.clean_session = false;
            let (l, mut events) =
                link::connect(&cfg, topics::member_filters(&spec.name), None).await?;
            loop {
                match tokio::time::timeout(Duration::from_secs(15), events.recv()).await {
                    Ok(Some(LinkEvent::Connected { .. })) => break,
                    Ok(Some(_)) => continue,
                    _ => bail!("provisioning {h}'s session: no connection to the broker"),
                }
            }
            l.close().await?;
        }
        Ok(())
    })
}

/// A site's newest session checkpoint.
pub struct SiteCheckpoint {
    /// The checkpoint's sequence number in the store.
    pub seq: u64,
    /// The model it holds.
    pub weights: FlatWeights,
    /// Its metadata: `step`, `config`, and `strategy` (the daemon's saved state: `strategy`
    /// (the strategy's own state), `seq`, `replay`, `rounds`, ...).
    pub meta: serde_json::Value,
}

impl SiteCheckpoint {
    /// The strategy's saved state (`meta.strategy.strategy`).
    pub fn strategy_state(&self) -> &serde_json::Value {
        &self.meta["strategy"]["strategy"]
    }

    /// The rounds the daemon had logged when it saved (`meta.strategy.rounds[].round`).
    pub fn rounds_logged(&self) -> Vec<u64> {
        self.meta["strategy"]["rounds"]
            .as_array()
            .map(|a| a.iter().filter_map(|r| r["round"].as_u64()).collect())
            .unwrap_or_default()
    }

    /// True when every weight is finite.
    pub fn all_finite(&self) -> bool {
        self.weights.data.iter().all(|x| x.is_finite())
    }
}

/// A running `cosilo run` (or other) child process with its log file. Killed on drop.
pub struct SiteProcess {
    site: String,
    child: Option<Child>,
    log: PathBuf,
    status: Option<ExitStatus>,
}

impl SiteProcess {
    /// Wraps a spawned child whose output goes to `log`.
    pub fn from_child(site: &str, child: Child, log: PathBuf) -> SiteProcess {
        SiteProcess {
            site: site.to_string(),
            child: Some(child),
            log,
            status: None,
        }
    }

    /// The site id.
    pub fn site(&self) -> &str {
        &self.site
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its exit status, if it has exited.
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            if let Some(c) = &mut self.child {
                self.status = c.try_wait().context("polling a child")?;
            }
        }
        Ok(self.status)
    }

    /// Waits until the log contains `needle` at least `count` times; fails if the process exits
    /// first or `timeout` passes (the error carries the log).
    pub fn wait_for_log(&mut self, needle: &str, count: usize, timeout: Duration) -> Result<()> {
        let t0 = Instant::now();
        loop {
            if self.log().matches(needle).count() >= count {
                return Ok(());
            }
            if let Some(s) = self.try_status()? {
                bail!(
                    "{} exited ({s}) before logging {needle:?} ×{count}:\n{}",
                    self.site,
                    self.log()
                );
            }
            if t0.elapsed() > timeout {
                bail!(
                    "{} did not log {needle:?} ×{count} within {timeout:?}:\n{}",
                    self.site,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends a signal with kill(1) (std's `Child::kill` only sends SIGKILL).
    fn signal(&self, sig: &str) -> Result<()> {
        let Some(c) = &self.child else {
            return Ok(());
        };
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(c.id().to_string())
            .status()
            .context("running kill")?;
        if !status.success() {
            bail!("kill -{sig} {} failed", c.id());
        }
        Ok(())
    }

    /// SIGTERM: the daemon checkpoints, says `Leaving` and disconnects.
    pub fn terminate(&mut self) -> Result<()> {
        self.signal("TERM")
    }

    /// SIGHUP: the daemon reads its roster again.
    pub fn hangup(&mut self) -> Result<()> {
        self.signal("HUP")
    }

    /// SIGKILL, and reap it.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let s = c.wait().context("reaping a killed child")?;
            self.status = Some(s);
        }
        self.status.context("no child")
    }

    /// Waits for the process to exit within `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.try_status()? {
                return Ok(s);
            }
            if t0.elapsed() > timeout {
                bail!(
                    "{} still running after {timeout:?}:\n{}",
                    self.site,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for a successful exit within `timeout`; the error carries the log.
    pub fn wait_success(&mut self, timeout: Duration) -> Result<()> {
        let s = self.wait(timeout)?;
        if !s.success() {
            bail!("{} exited with {s}:\n{}", self.site, self.log());
        }
        Ok(())
    }

    /// The round numbers (1-based, as printed) of the daemon's per-round log lines, in order.
    pub fn round_lines(&self) -> Vec<u64> {
        round_lines(&self.log())
    }
}

impl Drop for SiteProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if self.status.is_none() {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

/// Waits for every process to exit successfully within `timeout` in all.
pub fn wait_all(procs: &mut [SiteProcess], timeout: Duration) -> Result<()> {
    let t0 = Instant::now();
    for p in procs.iter_mut() {
        let left = timeout.saturating_sub(t0.elapsed());
        p.wait_success(left.max(Duration::from_millis(1)))?;
    }
    Ok(())
}

/// The 1-based round numbers of `round N vV: ...` lines in a daemon log.
pub fn round_lines(log: &str) -> Vec<u64> {
    log.lines()
        .filter_map(|l| {
            let rest = &l[l.find("round ")? + "round ".len()..];
            let rest = rest.trim_start();
            let (n, tail) = rest.split_once(' ')?;
            tail.starts_with('v')
                .then(|| n.parse().ok())
                .flatten()
                .filter(|_| l.contains("| tissue"))
        })
        .collect()
}

/// Lines of `log` that contain `needle`.
pub fn lines_with<'a>(log: &'a str, needle: &str) -> Vec<&'a str> {
    log.lines().filter(|l| l.contains(needle)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_lines_parse_the_daemon_format() {
        let log = "2026 INFO site{id=h1}: x: round   1 v1: loss 0.1 | Dice csf – | tissue 0.2 | sent 1 B\n\
                   2026 INFO site{id=h1}: x: round 12 v14: loss – | Dice | tissue – | sent\n\
                   2026 INFO site{id=h1}: x: round 3 of 4 updates (deadline)\n\
                   2026 INFO site{id=h1}: x: session ready";
        assert_eq!(round_lines(log), vec![1, 12]);
        assert_eq!(lines_with(log, "session").len(), 1);
    }

    /// The newest modification time of the `.rs` files under `dir`.
    fn newest_source(dir: &Path) -> std::time::SystemTime {
        let mut newest = std::time::UNIX_EPOCH;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let t = if path.is_dir() {
                newest_source(&path)
            } else if path.extension().is_some_and(|e| e == "rs") {
                std::fs::metadata(&path).unwrap().modified().unwrap()
            } else {
                continue;
            };
            newest = newest.max(t);
        }
        newest
    }

    #[test]
    fn cosilo_bin_is_never_older_than_the_sources_it_is_built_from() {
        // Regression: a `cosilo` left in the target folder by an older checkout was used as it
        // was, so the federation tests ran yesterday's daemon.
        let bin = cosilo_bin().unwrap();
        let built = std::fs::metadata(&bin).unwrap().modified().unwrap();
        let root = workspace_root();
        let crates = [
            "appliance/cosilo",
            "appliance/federation",
            "appliance/train",
            "appliance/store",
            "appliance/lab",
            "appliance/rng",
            "sdk",
            "hardware",
            "bridge",
        ];
        for c in crates {
            let newest = newest_source(&root.join(c).join("src"));
            assert!(
                built >= newest,
                "{} is older than a source file of {c}",
                bin.display()
            );
        }
        // Once per process: a second call returns the same path without building again.
        assert_eq!(cosilo_bin().unwrap(), bin);
    }
}
