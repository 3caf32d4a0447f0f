//! Membership changes reach running appliances (issue 15: "adding and removing a site later
//! follows the same path, and every member picks up the new roster").
//!
//! Three provisioned sites run push gossip (gossip-avg) as `cosilo run` processes over the
//! embedded broker (hosted by h1). The operator admits a fourth site with the `cosilo federation`
//! commands (declare, request, admit, install), the running sites get the new kit installed and
//! switch to the new roster without a restart, and h4's models are then merged by the others.
//! Then h2 is removed (`cosilo federation remove`, kits installed again): h2 keeps running with
//! its old roster and keeps publishing, and the others refuse its messages as a removed
//! member's, and merge nothing of it after the switch. A SIGHUP makes a site read its roster
//! again on demand.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use cosilo_appliance::config::SiteConfig;
use cosilo_appliance::kit::{self, LocalFederation};
use cosilo_appliance::plan::FederationPlan;
use cosilo_tests::federation_harness::{cosilo_bin, tiny_cohort, SiteProcess, MAX_PACKET};
use cosilo_tests::free_port;

const FED: &str = "members";
const WAIT: Duration = Duration::from_secs(30);

fn declaration(port: u16) -> String {
    format!(
        r#"[federation]
name = "{FED}"
security = "none"

[strategy]
kind = "gossip-avg"
rounds = 1000
steps_per_round = 1
update_timeout_s = 60
eval_every = 0
personalise_steps = 0

[model]
base = 8
depth = 2
batch_size = 2
patch = [48, 48]

[broker]
kind = "embedded"
host = "127.0.0.1"
port = {port}
max_packet_bytes = {MAX_PACKET}
on_site = "h1"

[[site]]
id = "h1"
hospital = "h1"

[[site]]
id = "h2"
hospital = "h2"

[[site]]
id = "h3"
hospital = "h3"
"#
    )
}

/// Runs `cosilo federation ARGS` and returns its standard output.
fn federation(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Result<String> {
    let out = Command::new(cosilo_bin()?)
        .arg("federation")
        .args(args.iter().map(|a| a.as_ref()))
        .output()
        .context("running cosilo federation")?;
    if !out.status.success() {
        bail!(
            "cosilo federation failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn start(id: &str, folder: &Path) -> Result<SiteProcess> {
    let log = folder.join("run.log");
    let out = std::fs::File::create(&log)?;
    let child = Command::new(cosilo_bin()?)
        .arg("run")
        .arg("--config")
        .arg(folder.join("site.toml"))
        .env("RAYON_NUM_THREADS", "1")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::from(out.try_clone()?))
        .stderr(Stdio::from(out))
        .spawn()
        .with_context(|| format!("starting cosilo run for {id}"))?;
    Ok(SiteProcess::from_child(id, child, log))
}

/// The log after the `nth` (1-based) line that contains `needle`.
fn log_after(log: &str, needle: &str, nth: usize) -> String {
    let mut seen = 0;
    let mut out = String::new();
    for line in log.lines() {
        if seen >= nth {
            out.push_str(line);
            out.push('\n');
        } else if line.contains(needle) {
            seen += 1;
        }
    }
    out
}

/// Installs the operator's current kit of `id` into its folder again (the new roster).
fn reinstall(fed: &LocalFederation, id: &str, folder: &Path) -> Result<()> {
    federation(&[
        &"install",
        &fed.ops.join("kits").join(id),
        &"--dir",
        &folder,
    ])?;
    Ok(())
}

#[test]
fn running_sites_pick_up_an_admitted_and_a_removed_member() -> Result<()> {
    let tmp = tempfile::Builder::new()
        .prefix("cosilo-roster-")
        .tempdir()?;
    let port = free_port()?;
    let decl = tmp.path().join("federation.toml");
    std::fs::write(&decl, declaration(port))?;
    let fed = kit::provision_local(&decl, &tmp.path().join("fed"))?;
    let folder = |id: &str| -> PathBuf { fed.ops.parent().unwrap().join(id) };
    // Each site's hospital from the tiny cohort, in a store of its own; h4 (admitted later)
    // gets a copy of h3's cases, made before any site runs.
    let stores = tmp.path().join("stores");
    let plan = FederationPlan::new(FED, &["h1", "h2", "h3"], &stores);
    plan.import_cohort(&tiny_cohort()?.join("manifest.json"))?;
    let h4_store = stores.join("h4");
    let copied = Command::new("cp")
        .arg("-a")
        .arg(plan.store_path("h3"))
        .arg(&h4_store)
        .status()?;
    assert!(copied.success());
    for h in ["h1", "h2", "h3"] {
        let path = folder(h).join("site.toml");
        let mut cfg = SiteConfig::load(&path)?;
        cfg.site.store = plan.store_path(h);
        kit::write_config(&cfg, &path)?;
    }

    let mut h1 = start("h1", &folder("h1"))?;
    h1.wait_for_log("embedded broker started", 1, WAIT)?;
    let mut h2 = start("h2", &folder("h2"))?;
    let mut h3 = start("h3", &folder("h3"))?;
    for p in [&mut h1, &mut h2, &mut h3] {
        p.wait_for_log("merged v", 1, WAIT)?;
    }

    // SIGHUP with the roster unchanged: read again, nothing switches.
    h3.hangup()?;
    h3.wait_for_log("roster unchanged", 1, WAIT)?;

    // Admit h4 the way a new hospital joins: declared by the operator, keys made on its own
    // folder, admitted, its kit installed; the running sites install their new kits.
    let ops_decl = fed.ops.join("federation.toml");
    let mut text = std::fs::read_to_string(&ops_decl)?;
    text.push_str("\n[[site]]\nid = \"h4\"\nhospital = \"h3\"\n");
    std::fs::write(&ops_decl, text)?;
    let h4_dir = folder("h4");
    federation(&[&"request", &ops_decl, &"--id", &"h4", &"--dir", &h4_dir])?;
    let kit_dir = federation(&[&"admit", &h4_dir.join("request.toml"), &"--dir", &fed.ops])?;
    federation(&[
        &"install",
        &PathBuf::from(kit_dir.trim()),
        &"--dir",
        &h4_dir,
        &"--store",
        &h4_store,
    ])?;
    let path = h4_dir.join("site.toml");
    let mut cfg = SiteConfig::load(&path)?;
    cfg.status.listen = "127.0.0.1:0".into();
    kit::write_config(&cfg, &path)?;
    for (h, p) in [("h1", &mut h1), ("h2", &mut h2), ("h3", &mut h3)] {
        reinstall(&fed, h, &folder(h))?;
        p.wait_for_log("switched to a new roster", 1, WAIT)?;
    }
    let mut h4 = start("h4", &h4_dir)?;
    // h4's models are merged by every running site.
    for p in [&mut h1, &mut h2, &mut h3] {
        p.wait_for_log("h4 v", 1, WAIT)?;
    }
    h4.wait_for_log("merged v", 1, WAIT)?;

    // Remove h2; the remaining members install their kits again. h2 keeps its old roster and
    // keeps publishing.
    federation(&[&"remove", &"h2", &"--dir", &fed.ops])?;
    let members = federation(&[&"members", &"--dir", &fed.ops])?;
    eprintln!("{members}");
    for (h, p) in [("h1", &mut h1), ("h3", &mut h3), ("h4", &mut h4)] {
        let before = p.log().matches("switched to a new roster").count();
        let dir = if h == "h4" { h4_dir.clone() } else { folder(h) };
        reinstall(&fed, h, &dir)?;
        p.wait_for_log("switched to a new roster", before + 1, WAIT)?;
        // h2 trains and publishes on: its next messages are refused as a removed member's.
        p.wait_for_log("refused a message from a removed member", 2, WAIT)?;
    }
    let h2_models_before = h2.log().matches("merged v").count();
    h2.wait_for_log("merged v", h2_models_before + 1, WAIT)?;

    // h1 hosts the broker: it stops last, so the others leave cleanly.
    for p in [&mut h4, &mut h3, &mut h2] {
        p.terminate()?;
    }
    for p in [&mut h4, &mut h3, &mut h2] {
        p.wait(WAIT)?;
    }
    h1.terminate()?;
    h1.wait(WAIT)?;
    for (p, switches) in [(&h1, 2), (&h3, 2), (&h4, 1)] {
        let log = p.log();
        // Nothing of h2 is merged after the switch that removed it, and its refusals carry
        // the reason.
        let after = log_after(&log, "switched to a new roster", switches);
        assert!(
            !after
                .lines()
                .any(|l| l.contains("merged") && l.contains("h2 v")),
            "{} merged h2 after removing it:\n{after}",
            p.site()
        );
        assert!(
            after.contains("sender=h2") && after.contains("removed from the roster"),
            "{}:\n{after}",
            p.site()
        );
        assert!(
            !log.contains("refused a new roster"),
            "{} refused a good roster:\n{log}",
            p.site()
        );
    }
    // h2 is not in the roster it was sent nothing of: it still runs on the old one.
    assert!(!h2.log().contains("refused a message from a removed member"));
    Ok(())
}
