//! The status page in a real browser, from a running appliance in a real federation: three
//! `cosilo run` processes over Mosquitto (the harness's tiny FedAvg federation, with more rounds
//! than the test waits for), h1's status server on a free port. Once h1 has logged two rounds,
//! headless Chromium (Debian's `chromium`) loads `http://<h1>/` and the test checks what it
//! rendered: the three members with their presence, the current round, and one chart point per
//! evaluated round (the initial model's and each round's). `/metrics`, `/status.json` and
//! `cosilo status` are read from the same process. Then every site is stopped with SIGTERM and
//! must exit cleanly.
//!
//! Needs Mosquitto, chromium and the anatomy cache (`cosilo data fetch`).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use cosilo_appliance::status::{client, StatusReport};
use cosilo_federation::strategy::StrategyKind;
use cosilo_tests::brokers::Mosquitto;
use cosilo_tests::federation_harness::{
    cosilo_bin, Federation, FederationSpec, SiteProcess, MAX_PACKET,
};

/// Bound on a tiny site reaching its second round on a loaded 2-core machine.
const ROUNDS_LIMIT: Duration = Duration::from_secs(240);

/// The status address h1 logged ("status page on http://ADDR/").
fn status_addr(site: &SiteProcess) -> Result<String> {
    let log = site.log();
    let at = log
        .find("status page on http://")
        .context("no status address in the log")?;
    let rest = &log[at + "status page on http://".len()..];
    Ok(rest.split('/').next().unwrap_or_default().to_string())
}

/// `chromium --headless --dump-dom URL`: the DOM after the page loaded, within `limit`.
fn chromium_dom(url: &str, limit: Duration) -> Result<String> {
    let profile = tempfile::tempdir()?;
    let out = tempfile::NamedTempFile::new()?;
    let mut child = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--dump-dom")
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out.reopen()?))
        .stderr(Stdio::null())
        .spawn()
        .context("starting chromium (apt-get install chromium)")?;
    let t0 = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            ensure!(status.success(), "chromium exited with {status}");
            return Ok(std::fs::read_to_string(out.path())?);
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            bail!("chromium did not finish loading {url} within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The values of `attr="..."` in `html`, in order.
fn attr_values(html: &str, attr: &str) -> Vec<String> {
    let needle = format!("{attr}=\"");
    html.match_indices(&needle)
        .filter_map(|(i, _)| {
            let rest = &html[i + needle.len()..];
            rest.split('"').next().map(str::to_string)
        })
        .collect()
}

/// The text of the element with `id` (its content up to the next tag).
fn text_of_id(html: &str, id: &str) -> Option<String> {
    let at = html.find(&format!("id=\"{id}\""))?;
    let rest = &html[at..];
    let open = rest.find('>')?;
    let content = &rest[open + 1..];
    Some(content[..content.find('<')?].to_string())
}

#[test]
fn the_status_page_renders_in_chromium_during_a_federation() -> Result<()> {
    let broker = Mosquitto::start(MAX_PACKET)?;
    let mut spec = FederationSpec::tiny(StrategyKind::FedAvg);
    spec.name = "statuspage".into();
    // More rounds than the test waits for: the sites are stopped with SIGTERM once looked at.
    spec.rounds = 30;
    let fed = Federation::create(spec, broker.port())?;
    let mut sites = fed.start_all()?;
    let h1 = &mut sites[0];
    h1.wait_for_log("status page on http://", 1, Duration::from_secs(120))?;
    let addr = status_addr(h1)?;
    h1.wait_for_log("| tissue", 2, ROUNDS_LIMIT)?;

    let dom = chromium_dom(&format!("http://{addr}/"), Duration::from_secs(120))?;
    ensure!(
        dom.contains("<svg id=\"dice-chart\""),
        "no chart rendered:\n{dom}"
    );
    let round: u64 = text_of_id(&dom, "round")
        .context("no round on the page")?
        .parse()?;
    ensure!(round >= 2, "the page shows round {round}, h1 logged two");
    let members = attr_values(&dom, "data-site");
    ensure!(
        members == ["h1", "h2", "h3"],
        "members rendered: {members:?}"
    );
    for peer in ["h2", "h3"] {
        let row = &dom[dom.find(&format!("data-site=\"{peer}\"")).unwrap()..];
        let row = &row[..row.find("</tr>").unwrap_or(row.len())];
        ensure!(
            !row.contains("not heard from") && row.contains("s ago"),
            "{peer}'s presence is not shown: {row}"
        );
    }
    // One point per evaluated round: the initial model's (round 0) and every round's.
    let rounds: Vec<u64> = attr_values(&dom, "data-round")
        .iter()
        .map(|r| r.parse())
        .collect::<Result<_, _>>()?;
    let want: Vec<u64> = (0..=round).collect();
    ensure!(
        rounds == want,
        "chart points for rounds {rounds:?}, want {want:?}"
    );
    for d in attr_values(&dom, "data-dice") {
        let d: f64 = d.parse()?;
        ensure!((0.0..=1.0).contains(&d), "a Dice of {d}");
    }

    // The same process's JSON, metrics and `cosilo status`.
    let report: StatusReport = client::fetch(&addr)?;
    ensure!(report.federation.site == "h1" && report.federation.round >= round);
    ensure!(report.federation.bytes_sent > 0 && report.federation.bytes_received > 0);
    let (code, metrics) = client::get(&addr, "/metrics")?;
    ensure!(code == 200, "/metrics answered {code}");
    for needle in [
        "cosilo_round ",
        "cosilo_federation_sent_bytes_total ",
        "cosilo_federation_members 3",
        "cosilo_dice_score ",
        "cosilo_site_info{",
    ] {
        ensure!(metrics.contains(needle), "{needle:?} not in\n{metrics}");
    }
    let out = Command::new(cosilo_bin()?)
        .args(["status", "--addr", &addr])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "cosilo status failed: {:?}", out);
    ensure!(
        text.contains("site h1 in federation statuspage") && text.contains("  h3 "),
        "cosilo status printed:\n{text}"
    );

    for s in &mut sites {
        s.terminate()?;
    }
    for s in &mut sites {
        s.wait_success(Duration::from_secs(120))?;
    }
    ensure!(
        client::fetch(&addr).is_err(),
        "the status server outlived its daemon"
    );
    Ok(())
}
