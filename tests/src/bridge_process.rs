//! `cosilo bridge` as a child process for the tests: a configuration under a temp dir (loopback
//! port 0, a 0600 key, short quiet period), start and wait for "listening on", wait for log lines
//! against a deadline (never a fixed sleep), SIGTERM or SIGKILL.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

/// The `cosilo` binary ([`crate::federation_harness::cosilo_bin`]), checked to have the `bridge`
/// command (a stale build would not).
pub fn cosilo_with_bridge() -> Result<PathBuf> {
    let bin = crate::federation_harness::cosilo_bin()?;
    let ok = Command::new(&bin)
        .args(["bridge", "--help"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    ensure!(
        ok,
        "{} has no `bridge` command: cargo build --release -p cosilo-appliance --bin cosilo",
        bin.display()
    );
    Ok(bin)
}

/// Writes `secret` to `path` with mode 0600 (the bridge refuses a key others can read).
pub fn write_key(path: &Path, secret: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(secret)?;
    Ok(())
}

/// A bridge configuration under `root` from the checked-in defaults: loopback port 0, no disk
/// reserve, `quiet_s` quiet period, `incomplete_wait_s`, 100 ms polls, a 0600 key.
pub fn write_config(root: &Path, quiet_s: u64, incomplete_wait_s: u64) -> Result<PathBuf> {
    let secret = root.join("deid.key");
    write_key(&secret, b"bridge-process-test-secret-0123456789")?;
    let mut text = cosilo_bridge::pipeline::DEFAULT_CONFIG.to_string();
    for (from, to) in [
        (
            "state_dir = \"/var/lib/cosilo/bridge\"".to_string(),
            format!("state_dir = {:?}", root.join("state")),
        ),
        (
            "bind = \"0.0.0.0:11112\"".into(),
            "bind = \"127.0.0.1:0\"".into(),
        ),
        (
            "spool_dir = \"/var/lib/cosilo/spool\"".into(),
            format!("spool_dir = {:?}", root.join("spool")),
        ),
        (
            "reserve_bytes = 5368709120".into(),
            "reserve_bytes = 0".into(),
        ),
        (
            "outbox_dir = \"/var/lib/cosilo/outbox\"".into(),
            format!("outbox_dir = {:?}", root.join("outbox")),
        ),
        (
            "secret_file = \"/etc/cosilo/deid.key\"".into(),
            format!("secret_file = {secret:?}"),
        ),
        (
            "quiet_period_s = 30".into(),
            format!("quiet_period_s = {quiet_s}"),
        ),
        (
            "poll_interval_ms = 1000".into(),
            "poll_interval_ms = 100".into(),
        ),
        (
            "incomplete_wait_s = 3600".into(),
            format!("incomplete_wait_s = {incomplete_wait_s}"),
        ),
    ] {
        ensure!(text.contains(&from), "default config lacks {from}");
        text = text.replace(&from, &to);
    }
    let path = root.join("bridge.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

/// `cosilo bridge` as a child process, logging to a file; SIGTERMed (then killed) on drop.
pub struct BridgeProcess {
    child: Child,
    /// Its stdout lines not yet read (what [`BridgeProcess::stop`] returns).
    stdout: std::sync::mpsc::Receiver<String>,
    /// The bridge's stderr (its log), appended across restarts.
    pub log: PathBuf,
    /// The SCP's port.
    pub port: u16,
}

impl BridgeProcess {
    /// Starts `cosilo bridge` with `RUST_LOG=<rust_log>` and waits (20 s) for "listening on".
    pub fn start(
        bin: &Path,
        config: &Path,
        store: &Path,
        log: PathBuf,
        rust_log: &str,
    ) -> Result<BridgeProcess> {
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let mut child = Command::new(bin)
            .args(["bridge", "--hospital", "h9", "--config"])
            .arg(config)
            .arg("--store")
            .arg(store)
            .env("RUST_LOG", rust_log)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .context("starting cosilo bridge")?;
        let out = child.stdout.take().context("bridge stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut p = BridgeProcess {
            child,
            stdout: rx,
            log,
            port: 0,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match p.stdout.recv_timeout(Duration::from_millis(100)) {
                Ok(line) if line.starts_with("listening on") => {
                    let addr = line.trim_start_matches("listening on").trim();
                    p.port = addr
                        .rsplit(':')
                        .next()
                        .and_then(|s| s.parse().ok())
                        .with_context(|| format!("no port in {line:?}"))?;
                    return Ok(p);
                }
                Ok(_) => {}
                Err(_) => {
                    if let Some(s) = p.child.try_wait()? {
                        bail!("the bridge exited with {s}:\n{}", p.log_text());
                    }
                    ensure!(
                        Instant::now() < deadline,
                        "the bridge did not listen in 20 s"
                    );
                }
            }
        }
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fails, with the log, if the bridge has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(s) = self.child.try_wait()? {
            bail!("the bridge exited with {s}:\n{}", self.log_text());
        }
        Ok(())
    }

    /// Waits until the log holds at least `count` lines containing `needle`, polling against a
    /// `limit` deadline; fails with the log if the bridge exits or the deadline passes.
    pub fn wait_log(&mut self, needle: &str, count: usize, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let text = self.log_text();
            if text.lines().filter(|l| l.contains(needle)).count() >= count {
                return Ok(());
            }
            if let Some(s) = self.child.try_wait()? {
                bail!("the bridge exited ({s}) before logging {needle:?}:\n{text}");
            }
            ensure!(
                Instant::now() < deadline,
                "no {count}× {needle:?} in the log within {limit:?}:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM; the exit must be clean within 20 s. Returns what it printed on stdout after
    /// "listening on" (its summary).
    pub fn stop(mut self) -> Result<Vec<String>> {
        let st = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        ensure!(st.success(), "kill -TERM failed");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = self.child.try_wait()? {
                ensure!(s.success(), "bridge exited with {s}:\n{}", self.log_text());
                return Ok(self.stdout.try_iter().collect());
            }
            ensure!(Instant::now() < deadline, "no exit within 20 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill9(mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for BridgeProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Fails if any line of `log` contains one of `needles` (original identifiers); returns the
/// number of lines scanned.
pub fn assert_log_free_of(log: &str, needles: &[String]) -> Result<usize> {
    let mut n = 0;
    for line in log.lines() {
        n += 1;
        for needle in needles {
            ensure!(
                !line.contains(needle.as_str()),
                "the log names the original {needle:?}: {line}"
            );
        }
    }
    Ok(n)
}
