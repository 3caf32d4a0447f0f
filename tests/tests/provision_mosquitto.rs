//! A federation provisioned by `cosilo-provision` (declaration → requests → admissions → kits)
//! against a real Mosquitto started with the configuration provisioning wrote: mutual TLS with
//! the federation's CA, the certificate's name as the user name, the topic ACL and the CRL.
//!
//! - A site's certificate cannot publish into another site's topics; an observer cannot publish.
//! - A client without a certificate, or without TLS, cannot connect; a revoked site is refused.
//! - Three provisioned sites run FedAvg as `cosilo run` processes over that broker.
//!
//! Clients are the appliance's own MQTT link (rumqttc + rustls), so the rcgen PEM files are
//! checked as the sites use them. "Not delivered" is decided without waiting out a timer: the
//! forbidden publish is acknowledged (PUBACK) before an allowed one is sent, Mosquitto handles a
//! client's packets in order, and the subscriber's queue is first in first out, so a delivered
//! forbidden message would arrive before the allowed one the test waits for.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cosilo_appliance::config::SiteConfig;
use cosilo_appliance::daemon::RunSummary;
use cosilo_appliance::kit::{self, LocalFederation};
use cosilo_appliance::plan::FederationPlan;
use cosilo_federation::link::{self, Link, LinkConfig, LinkEvent, TlsConfig};
use cosilo_federation::wire::topics;
use cosilo_provision::Operator;
use cosilo_tests::brokers::Mosquitto;
use cosilo_tests::federation_harness::{cosilo_bin, tiny_cohort, SiteProcess, MAX_PACKET};
use cosilo_tests::free_port;
use tokio::sync::mpsc::Receiver;

const FED: &str = "trial";

fn declaration(port: u16, extra: &str) -> String {
    format!(
        r#"[federation]
name = "{FED}"
security = "mtls"

[strategy]
kind = "fedavg"
rounds = 2
steps_per_round = 3
quorum = 3
round_deadline_s = 60
update_timeout_s = 90
personalise_steps = 0

[model]
base = 8
depth = 2
batch_size = 2
patch = [48, 48]

[broker]
kind = "mosquitto"
host = "localhost"
port = {port}
max_packet_bytes = {MAX_PACKET}

[[site]]
id = "h1"
hospital = "h1"

[[site]]
id = "h2"
hospital = "h2"

[[site]]
id = "h3"
hospital = "h3"
{extra}"#
    )
}

struct Provisioned {
    _tmp: tempfile::TempDir,
    fed: LocalFederation,
    port: u16,
}

impl Provisioned {
    fn new(extra: &str) -> Result<Provisioned> {
        let tmp = tempfile::Builder::new().prefix("cosilo-prov-").tempdir()?;
        let port = free_port()?;
        let decl = tmp.path().join("federation.toml");
        std::fs::write(&decl, declaration(port, extra))?;
        let fed = kit::provision_local(&decl, &tmp.path().join("fed"))?;
        Ok(Provisioned {
            _tmp: tmp,
            fed,
            port,
        })
    }

    fn folder(&self, id: &str) -> PathBuf {
        self.fed.ops.parent().unwrap().join(id)
    }

    fn broker(&self) -> Result<Mosquitto> {
        let conf = self.fed.ops.join("mosquitto/mosquitto.conf");
        Mosquitto::start_provisioned(&conf, self.port, MAX_PACKET)
    }

    /// A link as `id` (its certificate when `cert`), with TLS when `tls`.
    fn link_config(&self, id: &str, client_id: &str, tls: bool, cert: bool) -> LinkConfig {
        let dir = self.folder(id);
        let mut cfg = LinkConfig::new("localhost", self.port, client_id);
        cfg.max_packet_bytes = MAX_PACKET;
        cfg.clean_session = true;
        if tls {
            cfg.tls = Some(TlsConfig {
                ca_file: dir.join("ca.crt"),
                client_cert: cert.then(|| dir.join(format!("{id}.crt"))),
                client_key: cert.then(|| dir.join("tls.key")),
            });
        }
        cfg
    }
}

/// The first connection outcome: Ok(()) when the broker accepted, Err(reason) when it refused.
async fn first_outcome(
    events: &mut Receiver<LinkEvent>,
) -> Result<std::result::Result<(), String>> {
    let deadline = Duration::from_secs(20);
    loop {
        match tokio::time::timeout(deadline, events.recv()).await {
            Ok(Some(LinkEvent::Connected { .. })) => return Ok(Ok(())),
            Ok(Some(LinkEvent::Disconnected { reason })) => return Ok(Err(reason)),
            Ok(Some(LinkEvent::Message { .. })) => continue,
            Ok(None) => bail!("the link ended before connecting"),
            Err(_) => bail!("no connection outcome within {deadline:?}"),
        }
    }
}

async fn connect(cfg: &LinkConfig, subs: Vec<String>) -> Result<(Link, Receiver<LinkEvent>)> {
    let (l, mut ev) = link::connect(cfg, subs, None).await?;
    if let Err(reason) = first_outcome(&mut ev).await? {
        bail!("{} could not connect: {reason}", cfg.client_id);
    }
    Ok((l, ev))
}

async fn refused(cfg: &LinkConfig) -> Result<String> {
    let (l, mut ev) = link::connect(cfg, vec![], None).await?;
    let outcome = first_outcome(&mut ev).await?;
    drop(l);
    match outcome {
        Ok(()) => bail!("{} was accepted by the broker", cfg.client_id),
        Err(reason) => Ok(reason),
    }
}

/// Waits for a message on `topic`; returns every message seen before it (topic, payload).
async fn until(
    events: &mut Receiver<LinkEvent>,
    topic: &str,
    payload: &[u8],
) -> Result<Vec<(String, Vec<u8>)>> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut before = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.recv()).await {
            Ok(Some(LinkEvent::Message {
                topic: t,
                payload: p,
                ..
            })) => {
                if t == topic && p == payload {
                    return Ok(before);
                }
                before.push((t, p));
            }
            Ok(Some(_)) => continue,
            Ok(None) => bail!("the observer's link ended"),
            Err(_) => bail!("{topic} never arrived; saw {before:?}"),
        }
    }
}

#[test]
fn the_acl_tls_and_crl_of_a_provisioned_mosquitto_hold() -> Result<()> {
    let p = Provisioned::new("\n[[observer]]\nid = \"notebook\"\n")?;
    let mut broker = p.broker()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        // The observer reads the whole federation.
        let obs_cfg = p.link_config("notebook", "test-notebook", true, true);
        let (obs, mut seen) = connect(&obs_cfg, vec![topics::all(FED)]).await?;
        let (h1, _ev1) = connect(&p.link_config("h1", "test-h1", true, true), vec![]).await?;

        // h1 cannot publish as h2; its own topic goes through.
        h1.publish(&topics::updates(FED, "h2"), b"forged".to_vec(), false)
            .await?;
        h1.flush().await?;
        h1.publish(&topics::updates(FED, "h1"), b"mine".to_vec(), false)
            .await?;
        let before = until(&mut seen, &topics::updates(FED, "h1"), b"mine").await?;
        assert!(
            before.iter().all(|(_, payload)| payload != b"forged"),
            "h1 published into h2's topic: {before:?}"
        );

        // The observer cannot publish, not even on the shared control topic.
        obs.publish(&topics::control(FED), b"observer-write".to_vec(), false)
            .await?;
        obs.flush().await?;
        h1.publish(&topics::control(FED), b"h1-control".to_vec(), false)
            .await?;
        let before = until(&mut seen, &topics::control(FED), b"h1-control").await?;
        assert!(
            before
                .iter()
                .all(|(_, payload)| payload != b"observer-write"),
            "the observer published: {before:?}"
        );

        // No client certificate, or no TLS at all: refused.
        let reason = refused(&p.link_config("h2", "test-no-cert", true, false)).await?;
        eprintln!("without a certificate: {reason}");
        assert!(reason.contains("CertificateRequired"), "{reason}");
        let reason = refused(&p.link_config("h2", "test-plain", false, false)).await?;
        eprintln!("plain TCP: {reason}");
        // h3 is accepted before it is removed.
        let (h3, _ev3) = connect(&p.link_config("h3", "test-h3", true, true), vec![]).await?;
        h3.close().await?;
        h1.close().await?;
        obs.close().await?;
        anyhow::Ok(())
    })?;

    // Remove h3: its certificate is revoked; Mosquitto reads the new CRL and ACL on restart.
    let mut op = Operator::open(&p.fed.ops)?;
    op.remove("h3")?;
    let acl = std::fs::read_to_string(p.fed.ops.join("mosquitto/acl"))?;
    assert!(!acl.contains("user h3"), "{acl}");
    broker.restart()?;
    rt.block_on(async {
        let reason = refused(&p.link_config("h3", "test-h3-revoked", true, true)).await?;
        eprintln!("revoked: {reason}");
        assert!(reason.contains("CertificateRevoked"), "{reason}");
        let (h1, _ev) = connect(&p.link_config("h1", "test-h1-again", true, true), vec![]).await?;
        h1.close().await?;
        anyhow::Ok(())
    })?;
    // The same certificate connected before the removal; OpenSSL's verdict after it (with the
    // CRL loaded) is a failed verification, logged by Mosquitto.
    assert!(
        broker.log().contains("certificate verify failed"),
        "Mosquitto's log does not show the refused certificate:\n{}",
        broker.log()
    );
    Ok(())
}

/// Connects once as each site with its own certificate and the daemon's client id, so the
/// broker holds every site's persistent session before any site starts (as the harness's
/// `provision_sessions` does over plain TCP).
fn hold_sessions(p: &Provisioned, sites: &[&str]) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        for h in sites {
            let mut cfg = p.link_config(h, &format!("cosilo-{FED}-{h}"), true, true);
            cfg.clean_session = false;
            let (l, _ev) = connect(&cfg, topics::member_filters(FED)).await?;
            l.close().await?;
        }
        anyhow::Ok(())
    })
}

#[test]
fn three_provisioned_sites_run_fedavg_over_mutual_tls() -> Result<()> {
    let p = Provisioned::new("")?;
    let _broker = p.broker()?;
    let sites = ["h1", "h2", "h3"];
    // Each site's hospital from the tiny cohort, in a store of its own.
    let stores = p.fed.ops.parent().unwrap().join("stores");
    let plan = FederationPlan::new(FED, &sites, &stores);
    plan.import_cohort(&tiny_cohort()?.join("manifest.json"))?;
    for h in sites {
        let path = p.folder(h).join("site.toml");
        let mut cfg = SiteConfig::load(&path)?;
        assert_eq!(cfg.broker.client_cert, p.folder(h).join(format!("{h}.crt")));
        cfg.site.store = plan.store_path(h);
        kit::write_config(&cfg, &path)?;
    }
    hold_sessions(&p, &sites)?;
    let mut procs = Vec::new();
    for h in sites {
        let log = p.folder(h).join("run.log");
        let out = std::fs::File::create(&log)?;
        let child = Command::new(cosilo_bin()?)
            .arg("run")
            .arg("--config")
            .arg(p.folder(h).join("site.toml"))
            .arg("--summary")
            .arg(p.folder(h).join("summary.json"))
            .env("RAYON_NUM_THREADS", "1")
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out))
            .spawn()
            .with_context(|| format!("starting cosilo run for {h}"))?;
        procs.push(SiteProcess::from_child(h, child, log));
    }
    for proc in &mut procs {
        proc.wait_success(Duration::from_secs(300))?;
    }
    for h in sites {
        let s: RunSummary =
            serde_json::from_str(&std::fs::read_to_string(p.folder(h).join("summary.json"))?)?;
        assert!(s.finished, "{s:?}");
        assert_eq!(s.rounds.len(), 2, "{s:?}");
        assert_eq!(s.rounds.last().unwrap().contributors, sites, "{s:?}");
        assert_eq!(s.refused, 0, "{s:?}");
    }
    Ok(())
}
