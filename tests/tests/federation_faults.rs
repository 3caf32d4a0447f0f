//! Federation under faults: real `cosilo run` processes (one per hospital, each with only its own
//! cases in its own store) over a real Mosquitto broker, with a tiny cohort and a tiny U-Net.
//!
//! - A peer SIGKILLed mid-run and restarted resumes from its last durable checkpoint (its round
//!   and model version continue), rejoins, and every model stays finite; the others keep going.
//! - The broker restarted mid-round: every site reconnects and FedAvg completes its rounds.
//! - A site that joins late catches up from the retained announcements and merges its peers' work.
//! - A site that leaves (SIGTERM → `Leaving`) stalls neither FedAvg nor gossip-avg.
//! - A rogue participant (`appliance/cosilo/examples/rogue_site.rs`) is refused with a logged reason for
//!   every attack, and the honest sites end with exactly the model they reach without it.
//!
//! The tests run one at a time (each federation already has three trainers on the machine's
//! cores). Needs the anatomy cache (`cosilo data fetch`) and Mosquitto (`apt-get install
//! mosquitto`).

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use cosilo_appliance::config::Quorum;
use cosilo_appliance::daemon::RunSummary;
use cosilo_federation::strategy::StrategyKind;
use cosilo_tests::brokers::Mosquitto;
use cosilo_tests::federation_harness::{
    appliance_example, lines_with, round_lines, wait_all, Federation, FederationSpec,
    SiteCheckpoint, SiteProcess, MAX_PACKET,
};

/// One federation at a time.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The smallest packet a site accepts: a tiny model's update (~56 KB as f16+zstd) needs 4 chunks.
const SMALL_PACKET: usize = 16 * 1024;

/// Generous bound on a whole tiny federation on a loaded 2-core machine.
const RUN_LIMIT: Duration = Duration::from_secs(240);

/// Bound on a site's next step (a round, noticing the broker is gone) on a loaded machine; below
/// the specs' `update_timeout_s` (90 s), so a site blocked on an absent peer still fails it.
const STALL_LIMIT: Duration = Duration::from_secs(60);

/// Checks a finished site: finished, every round logged once in order, a finite model that moved
/// away from its initialisation. Returns its summary and final checkpoint.
fn finished_site(fed: &Federation, site: &str) -> Result<(RunSummary, SiteCheckpoint)> {
    finished_site_with(fed, site, false)
}

/// As [`finished_site`]; with `restarted`, a round the site trained and announced but had not yet
/// checkpointed when it was killed may be missing from its record (it resumes after the version
/// it announced and never reuses a version number), but the rounds still rise and end at the last.
fn finished_site_with(
    fed: &Federation,
    site: &str,
    restarted: bool,
) -> Result<(RunSummary, SiteCheckpoint)> {
    let s = fed.summary(site)?;
    ensure!(s.finished, "{site} did not finish: {s:?}");
    let rounds: Vec<u64> = s.rounds.iter().map(|r| r.round).collect();
    let want: Vec<u64> = (0..fed.spec().rounds).collect();
    if restarted {
        ensure!(
            rounds.windows(2).all(|w| w[0] < w[1])
                && rounds.first() == Some(&0)
                && rounds.last() == want.last()
                && rounds.len() + 1 >= want.len(),
            "{site} logged rounds {rounds:?}, want {want:?} with at most one lost to the kill"
        );
    } else {
        ensure!(
            rounds == want,
            "{site} logged rounds {rounds:?}, want {want:?}"
        );
    }
    let ck = fed.checkpoint(site)?;
    ensure!(
        ck.all_finite(),
        "{site}'s final model has non-finite weights"
    );
    let init = fed.initial_weights(site)?;
    let changed = ck
        .weights
        .data
        .iter()
        .zip(&init.data)
        .filter(|(a, b)| a != b)
        .count();
    ensure!(
        changed > init.data.len() / 2,
        "{site}: only {changed} of {} weights changed",
        init.data.len()
    );
    Ok((s, ck))
}

/// The version vector a gossip-avg checkpoint holds.
fn seen(ck: &SiteCheckpoint) -> BTreeMap<String, u64> {
    ck.strategy_state()["seen"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
                .collect()
        })
        .unwrap_or_default()
}

fn log_of(p: &SiteProcess) -> String {
    p.log()
}

#[test]
fn killed_peer_resumes_from_its_store_and_rejoins() -> Result<()> {
    let _g = serial();
    let mut spec = FederationSpec::tiny(StrategyKind::GossipAvg);
    spec.rounds = 4;
    // Small packets: every update travels as several chunks, so peers reassemble across the kill.
    spec.max_packet_bytes = SMALL_PACKET;
    let rounds = spec.rounds;
    let broker = Mosquitto::start(SMALL_PACKET)?;
    let fed = Federation::create(spec, broker.port())?;
    let mut procs = fed.start_all()?;

    // h2 has logged two rounds, so its first round's checkpoint is durable (the save is queued
    // behind the next round's training); it is publishing or training when it dies.
    procs[1].wait_for_log("| tissue", 2, RUN_LIMIT)?;
    let before = procs[1].round_lines();
    let status = procs[1].kill()?;
    ensure!(!status.success(), "SIGKILL should not look like success");
    let h1_at_kill = procs[0].round_lines().len();

    // The last durable checkpoint loads, is finite, and is not the beginning.
    let ck = fed.checkpoint("h2")?;
    ensure!(
        ck.all_finite(),
        "h2's durable checkpoint has non-finite weights"
    );
    let saved_version = ck.strategy_state()["version"]
        .as_u64()
        .context("no gossip-avg version in h2's checkpoint")?;
    ensure!(
        saved_version >= 1 && saved_version <= *before.last().unwrap_or(&0),
        "h2 saved version {saved_version}, logged rounds {before:?}"
    );

    // The others keep training while h2 is down: h1 logs its next round well before it would
    // give up on a peer (update_timeout_s), unless it had logged every round already.
    if (h1_at_kill as u64) < rounds {
        procs[0]
            .wait_for_log("| tissue", h1_at_kill + 1, STALL_LIMIT)
            .context("h1 stalled while h2 was down")?;
    }

    let restarted = fed.start("h2")?;
    procs[1] = restarted;
    wait_all(&mut procs, RUN_LIMIT)?;

    let log = log_of(&procs[1]);
    ensure!(
        log.contains("resumed=true"),
        "the restarted h2 did not resume:\n{log}"
    );
    let after = round_lines(&log);
    // It continues after its checkpoint, or, when it had already announced the next version before
    // it died, after that one (a version number is never reused with other weights).
    let first = after.first().copied().unwrap_or(0);
    let announced_jump = log.contains("announced before a restart");
    ensure!(
        first == saved_version + 1 || (announced_jump && first == saved_version + 2),
        "restarted h2 continued at rounds {after:?}, its checkpoint was at version {saved_version}"
    );
    let (_, h2) = finished_site_with(&fed, "h2", true)?;
    ensure!(h2.strategy_state()["version"].as_u64() == Some(rounds));
    for peer in ["h1", "h3"] {
        let (_, ck) = finished_site(&fed, peer)?;
        let v = seen(&ck);
        // The final merge included the model h2 made after its restart.
        ensure!(
            v.get("h2") == Some(&rounds),
            "{peer} merged h2 only up to {:?}: {v:?}",
            v.get("h2")
        );
        let p = &procs[if peer == "h1" { 0 } else { 2 }];
        ensure!(
            lines_with(&p.log(), "gave up waiting").is_empty(),
            "{peer} gave up on a peer:\n{}",
            p.log()
        );
    }
    Ok(())
}

#[test]
fn broker_restart_mid_round_every_site_reconnects_and_finishes() -> Result<()> {
    let _g = serial();
    let mut broker = Mosquitto::start(MAX_PACKET)?;
    let mut spec = FederationSpec::tiny(StrategyKind::FedAvg);
    spec.round_deadline_s = 30;
    spec.quorum = Quorum::Count(2);
    let fed = Federation::create(spec, broker.port())?;
    let mut procs = fed.start_all()?;

    procs[0].wait_for_log("| tissue", 1, RUN_LIMIT)?;
    broker.stop()?;
    // The broker comes back once every site has noticed it is gone.
    for p in &mut procs {
        p.wait_for_log("lost the broker", 1, STALL_LIMIT)?;
    }
    broker.restart()?;
    wait_all(&mut procs, RUN_LIMIT)?;

    let mut last = Vec::new();
    for (p, h) in procs.iter().zip(["h1", "h2", "h3"]) {
        let log = p.log();
        ensure!(
            log.contains("lost the broker"),
            "{h} never noticed the restart:\n{log}"
        );
        ensure!(
            log.matches("connected to the broker").count() >= 2,
            "{h} did not reconnect:\n{log}"
        );
        let (s, ck) = finished_site(&fed, h)?;
        let r = s.rounds.last().context("no rounds")?;
        ensure!(
            r.contributors.len() >= 2,
            "{h}'s last round had {:?}",
            r.contributors
        );
        last.push((r.contributors.clone(), ck.weights.data));
    }
    // With every update of the last round in, the three sites hold the same model.
    if last.iter().all(|(c, _)| c.len() == 3) {
        ensure!(last[0].1 == last[1].1 && last[0].1 == last[2].1);
    }
    Ok(())
}

#[test]
fn late_joiner_catches_up_and_merges_its_peers_work() -> Result<()> {
    let _g = serial();
    let broker = Mosquitto::start(MAX_PACKET)?;
    let mut spec = FederationSpec::tiny(StrategyKind::GossipAvg);
    // h3 has never connected: it must catch up from retained announcements, not a queue.
    spec.provision_sessions = false;
    let rounds = spec.rounds;
    let fed = Federation::create(spec, broker.port())?;
    let mut procs = vec![fed.start("h1")?, fed.start("h2")?];
    procs[0].wait_for_log("| tissue", 2, RUN_LIMIT)?;
    procs[1].wait_for_log("| tissue", 1, RUN_LIMIT)?;
    procs.push(fed.start("h3")?);
    wait_all(&mut procs, RUN_LIMIT)?;

    let (s3, ck3) = finished_site(&fed, "h3")?;
    let v = seen(&ck3);
    for peer in ["h1", "h2"] {
        ensure!(
            v.get(peer).is_some_and(|&x| x >= 1),
            "h3 never merged {peer}: {v:?}"
        );
    }
    ensure!(
        s3.rounds.iter().any(|r| r.contributors.len() > 1),
        "h3's rounds never merged a peer: {:?}",
        s3.rounds
    );
    // It learnt the peers' versions from retained announcements/presence and pulled.
    ensure!(
        procs[2].log().contains("pulling a newer model"),
        "h3 never pulled:\n{}",
        procs[2].log()
    );
    for peer in ["h1", "h2"] {
        let (_, ck) = finished_site(&fed, peer)?;
        ensure!(
            seen(&ck).get("h3") == Some(&rounds),
            "{peer} did not merge the latecomer's final model: {:?}",
            seen(&ck)
        );
    }
    Ok(())
}

/// SIGTERMs h3 after its first round; returns when h1 and h2 finished, with the seconds they
/// needed after h3 left.
fn leave_after_first_round(fed: &Federation) -> Result<(Vec<SiteProcess>, f64)> {
    let mut procs = fed.start_all()?;
    procs[2].wait_for_log("| tissue", 1, RUN_LIMIT)?;
    procs[2].terminate()?;
    let left = Instant::now();
    procs[2].wait_success(Duration::from_secs(60))?;
    let h3 = fed.summary("h3")?;
    ensure!(!h3.finished, "h3 should have stopped early: {h3:?}");
    ensure!(procs[2].log().contains("shutdown requested"));
    let (mut rest, h3p) = {
        let h3p = procs.pop().context("three processes")?;
        (procs, h3p)
    };
    wait_all(&mut rest, RUN_LIMIT)?;
    let seconds = left.elapsed().as_secs_f64();
    rest.push(h3p);
    Ok((rest, seconds))
}

#[test]
fn leaving_site_does_not_stall_fedavg() -> Result<()> {
    let _g = serial();
    let broker = Mosquitto::start(MAX_PACKET)?;
    let mut spec = FederationSpec::tiny(StrategyKind::FedAvg);
    // Only the Leaving presence can end a round early: the deadline is far away.
    spec.round_deadline_s = 150;
    spec.update_timeout_s = 300;
    spec.quorum = Quorum::Count(2);
    let deadline = spec.round_deadline_s as f64;
    let fed = Federation::create(spec, broker.port())?;
    let (procs, seconds) = leave_after_first_round(&fed)?;
    ensure!(
        seconds < deadline,
        "h1/h2 needed {seconds:.0} s after h3 left: they waited for the {deadline} s deadline"
    );
    let mut models = Vec::new();
    for (h, p) in ["h1", "h2"].iter().zip(&procs) {
        let (s, ck) = finished_site(&fed, h)?;
        let last = s.rounds.last().context("no rounds")?;
        ensure!(
            last.contributors == ["h1", "h2"],
            "{h}'s last round: {:?}",
            last.contributors
        );
        ensure!(
            lines_with(&p.log(), "deadline passed").is_empty(),
            "{h} waited for the deadline"
        );
        models.push(ck.weights.data);
    }
    ensure!(
        models[0] == models[1],
        "h1 and h2 ended on different models"
    );
    Ok(())
}

#[test]
fn leaving_site_does_not_stall_gossip_avg() -> Result<()> {
    let _g = serial();
    let broker = Mosquitto::start(MAX_PACKET)?;
    let mut spec = FederationSpec::tiny(StrategyKind::GossipAvg);
    // Only the Leaving presence can end the final wait early.
    spec.update_timeout_s = 150;
    let timeout = spec.update_timeout_s as f64;
    let fed = Federation::create(spec, broker.port())?;
    let (procs, seconds) = leave_after_first_round(&fed)?;
    ensure!(
        seconds < timeout,
        "h1/h2 needed {seconds:.0} s after h3 left: they waited out the {timeout} s timeout"
    );
    let h3_version = fed.checkpoint("h3")?.strategy_state()["version"]
        .as_u64()
        .context("h3's version")?;
    for (h, p) in ["h1", "h2"].iter().zip(&procs) {
        let (s, ck) = finished_site(&fed, h)?;
        ensure!(
            lines_with(&p.log(), "gave up waiting").is_empty(),
            "{h} waited out the timeout"
        );
        // It kept merging with the remaining peer after h3 left.
        let other = if *h == "h1" { "h2" } else { "h1" };
        ensure!(
            seen(&ck).get(other) == Some(&fed.spec().rounds),
            "{h} did not merge {other}'s final model: {:?}",
            seen(&ck)
        );
        ensure!(
            seen(&ck).get("h3").copied().unwrap_or(0) <= h3_version,
            "{h} saw a version of h3 it never made"
        );
        ensure!(s.rounds.iter().any(|r| r.contributors.len() > 1));
    }
    Ok(())
}

/// What a federation run with or without the rogue left.
struct RogueRun {
    /// Final models of h1, h2, h3.
    models: Vec<Vec<f32>>,
    /// Their final checkpoints' gossip-avg version vectors (empty for FedAvg).
    seen: Vec<BTreeMap<String, u64>>,
    /// Their logs.
    logs: Vec<String>,
    /// The rogue's count of messages sent per attack.
    report: BTreeMap<String, u64>,
}

/// Runs a federation to the end, with or without the rogue (holding h3's leaked key and
/// impersonating h1).
fn rogue_run(strategy: StrategyKind, with_rogue: bool) -> Result<RogueRun> {
    let broker = Mosquitto::start(MAX_PACKET)?;
    let spec = FederationSpec::tiny(strategy);
    // The rogue's binary before any site starts: built (minutes) once the federation runs, it
    // started after the honest sites had finished, and the test found no report.
    let rogue_bin = if with_rogue {
        Some(appliance_example("rogue_site")?)
    } else {
        None
    };
    let fed = Federation::create(spec, broker.port())?;
    let mut procs = fed.start_all()?;
    let mut rogue = None;
    let report = fed.dir().join("rogue.json");
    if let Some(bin) = rogue_bin {
        let log = fed.dir().join("rogue.log");
        let out = std::fs::File::create(&log)?;
        let child = Command::new(bin)
            .arg("--config")
            .arg(fed.config_path("h1"))
            .arg("--compromised")
            .arg(fed.key_path("h3"))
            .arg("--impersonate")
            .arg("h1")
            .arg("--interval-ms")
            .arg("500")
            .arg("--duration-s")
            .arg("600")
            .arg("--report")
            .arg(&report)
            .env("RAYON_NUM_THREADS", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out))
            .spawn()
            .context("starting the rogue site")?;
        rogue = Some(SiteProcess::from_child("rogue", child, log));
    }
    wait_all(&mut procs, RUN_LIMIT)?;
    let mut report_counts = BTreeMap::new();
    if let Some(mut r) = rogue {
        ensure!(
            r.try_status()?.is_none(),
            "the rogue died early:\n{}",
            r.log()
        );
        r.kill()?;
        let text = std::fs::read_to_string(&report).context("the rogue's report")?;
        report_counts = serde_json::from_str(&text)?;
    }
    let mut out = RogueRun {
        models: Vec::new(),
        seen: Vec::new(),
        logs: Vec::new(),
        report: report_counts,
    };
    for (h, p) in ["h1", "h2", "h3"].iter().zip(&procs) {
        let (s, ck) = finished_site(&fed, h)?;
        for r in &s.rounds {
            let known = r
                .contributors
                .iter()
                .all(|c| ["h1", "h2", "h3"].contains(&c.as_str()));
            ensure!(known, "{h} round {}: {:?}", r.round, r.contributors);
            if strategy == StrategyKind::FedAvg {
                ensure!(
                    r.contributors == ["h1", "h2", "h3"],
                    "{h} round {}: {:?}",
                    r.round,
                    r.contributors
                );
            }
        }
        if with_rogue {
            ensure!(s.refused > 0, "{h} refused nothing");
        }
        out.seen.push(seen(&ck));
        out.models.push(ck.weights.data);
        out.logs.push(p.log());
    }
    Ok(out)
}

/// The attacks the rogue makes with a leaked member key.
const ATTACKS: [&str; 11] = [
    "garbage",
    "truncated",
    "not-member",
    "wrong-key",
    "replay",
    "mis-shaped",
    "non-finite",
    "other-model",
    "oversized",
    "integrity",
    "flood",
];

/// Checks that the rogue made every attack and every honest site logged each refusal's reason.
fn check_refusals(run: &RogueRun) -> Result<()> {
    for attack in ATTACKS {
        ensure!(
            run.report.get(attack).is_some_and(|&n| n > 0),
            "the rogue never sent {attack}: {:?}",
            run.report
        );
    }
    let every_site = [
        ("garbage", "not a Cosilo message"),
        ("truncated", "message truncated"),
        ("not a member", "is not a member of the federation"),
        ("bad signature", "bad signature on a message from h1"),
        // Replays are checked below: refused when older than the sender's last message, dropped
        // as a copy when identical to it.
    ];
    // The leaked key's forgeries reach h3 as its own messages (ignored); h1 and h2 check them.
    let compromised = [
        ("mis-shaped", "the layout needs"),
        ("non-finite", "is not finite"),
        ("other model", "another model architecture"),
        ("oversized", "exceeds the limit"),
        ("integrity", "payload SHA-256 does not match"),
    ];
    for (h, log) in ["h1", "h2", "h3"].iter().zip(&run.logs) {
        let refusals = lines_with(log, "refused");
        let mut checks: Vec<(&str, &str)> = every_site.to_vec();
        if *h != "h3" {
            checks.extend(compromised);
        }
        for (what, reason) in checks {
            ensure!(
                refusals.iter().any(|l| l.contains(reason)),
                "{h} logged no {what} refusal ({reason:?}); refusals:\n{}",
                refusals.join("\n")
            );
        }
        // Replays of honest peers' traffic, not only of the rogue's own forgeries: refused when
        // older than the sender's last message, dropped as a copy when identical to it.
        let honest_replays = log
            .lines()
            .filter(|l| {
                (l.contains("replayed message from")
                    || l.contains("dropped a copy of the last message"))
                    && !l.contains("sender=h3")
            })
            .count();
        ensure!(honest_replays > 0, "{h} saw no replay of h1/h2 traffic");
    }
    Ok(())
}

#[test]
fn rogue_site_is_refused_and_never_reaches_a_fedavg_model() -> Result<()> {
    let _g = serial();
    let reference = rogue_run(StrategyKind::FedAvg, false)?;
    let attacked = rogue_run(StrategyKind::FedAvg, true)?;
    check_refusals(&attacked)?;
    // No rogue byte reached a model: with the rogue, each site ends on exactly the weights the
    // honest federation reaches without it (training and FedAvg are deterministic).
    for (i, h) in ["h1", "h2", "h3"].iter().enumerate() {
        ensure!(attacked.models[i].iter().all(|x| x.is_finite()));
        let diff = attacked.models[i]
            .iter()
            .zip(&reference.models[i])
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        ensure!(
            diff == 0,
            "{h}: {diff} weights differ from the run without the rogue"
        );
    }
    Ok(())
}

#[test]
fn rogue_site_never_enters_gossip_avg_version_vectors() -> Result<()> {
    let _g = serial();
    let run = rogue_run(StrategyKind::GossipAvg, true)?;
    check_refusals(&run)?;
    let rounds = FederationSpec::tiny(StrategyKind::GossipAvg).rounds;
    for (h, v) in ["h1", "h2", "h3"].iter().zip(&run.seen) {
        // Only members, and only versions members made: the forged updates claim version
        // 1,000,000 for h3 and for the outsider.
        ensure!(
            v.keys().all(|k| ["h1", "h2", "h3"].contains(&k.as_str())),
            "{h}'s version vector names a non-member: {v:?}"
        );
        ensure!(
            v.values().all(|&x| x <= rounds),
            "{h} merged a version nobody trained: {v:?}"
        );
        ensure!(v.len() == 2, "{h} did not merge both peers: {v:?}");
    }
    Ok(())
}
