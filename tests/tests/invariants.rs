//! The architecture's invariants (ARCHITECTURE.md, "Invariants") as facts a test checks, not
//! conventions: the crate graph from `cargo metadata`, and which sources name `sled` and `rumqttc`.
//!
//! - `sdk`, `hardware` and `bridge` never depend on the appliance's crates.
//! - The federation crate depends on neither candle nor sled (not even transitively); nor does
//!   the provisioning crate, which sits on the federation crate.
//! - Only the store crate names `sled`; only the federation's MQTT link names `rumqttc`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// The appliance's crates: nothing below them may depend on them.
const APPLIANCE_CRATES: [&str; 7] = [
    "cosilo-appliance",
    "cosilo-provision",
    "cosilo-store",
    "cosilo-train",
    "cosilo-federation",
    "cosilo-lab",
    "cosilo-rng",
];

/// Package name → names of its normal (non-dev, non-build) dependencies, resolved for this
/// platform with default features, from `cargo metadata`.
fn dependency_graph() -> Result<BTreeMap<String, BTreeSet<String>>> {
    let root = cosilo_tests::workspace_root();
    let out = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--offline",
            "--manifest-path",
        ])
        .arg(root.join("Cargo.toml"))
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let meta: Value = serde_json::from_slice(&out.stdout)?;
    let mut names = BTreeMap::new();
    for p in meta["packages"].as_array().context("packages")? {
        names.insert(
            p["id"].as_str().context("id")?.to_string(),
            p["name"].as_str().context("name")?.to_string(),
        );
    }
    let mut graph = BTreeMap::new();
    for node in meta["resolve"]["nodes"].as_array().context("resolve")? {
        let id = node["id"].as_str().context("node id")?;
        let mut deps = BTreeSet::new();
        for d in node["deps"].as_array().context("deps")? {
            let normal = d["dep_kinds"]
                .as_array()
                .map(|kinds| kinds.iter().any(|k| k["kind"].is_null()))
                .unwrap_or(false);
            if normal {
                deps.insert(names[d["pkg"].as_str().context("pkg")?].clone());
            }
        }
        graph.insert(names[id].clone(), deps);
    }
    Ok(graph)
}

/// Every package `name` reaches through normal dependencies.
fn closure(graph: &BTreeMap<String, BTreeSet<String>>, name: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![name.to_string()];
    while let Some(n) = todo.pop() {
        for d in graph.get(&n).into_iter().flatten() {
            if seen.insert(d.clone()) {
                todo.push(d.clone());
            }
        }
    }
    seen
}

#[test]
fn sdk_hardware_and_bridge_never_depend_on_the_appliance() -> Result<()> {
    let graph = dependency_graph()?;
    for lower in ["cosilo-sdk", "cosilo-hardware", "cosilo-bridge"] {
        let reach = closure(&graph, lower);
        assert!(!reach.is_empty() || lower == "cosilo-hardware", "{lower}");
        for a in APPLIANCE_CRATES {
            assert!(!reach.contains(a), "{lower} depends on {a}");
        }
    }
    // The check can fail: the composition root does reach every appliance crate.
    let top = closure(&graph, "cosilo-appliance");
    for a in &APPLIANCE_CRATES[1..] {
        assert!(top.contains(*a), "cosilo-appliance should depend on {a}");
    }
    Ok(())
}

#[test]
fn federation_crate_depends_on_neither_candle_nor_sled() -> Result<()> {
    let graph = dependency_graph()?;
    let reach = closure(&graph, "cosilo-federation");
    assert!(reach.contains("rumqttc"), "the graph walk found {reach:?}");
    for banned in [
        "candle-core",
        "candle-nn",
        "sled",
        "cosilo-train",
        "cosilo-store",
    ] {
        assert!(
            !reach.contains(banned),
            "cosilo-federation reaches {banned}"
        );
    }
    // And the training crate does reach candle (the walk is not vacuous).
    assert!(closure(&graph, "cosilo-train").contains("candle-core"));
    Ok(())
}

#[test]
fn provisioning_depends_on_the_federation_crate_and_lower_only() -> Result<()> {
    let graph = dependency_graph()?;
    let reach = closure(&graph, "cosilo-provision");
    assert!(reach.contains("cosilo-federation") && reach.contains("rcgen"));
    for banned in [
        "candle-core",
        "candle-nn",
        "sled",
        "cosilo-train",
        "cosilo-store",
        "cosilo-appliance",
        "cosilo-lab",
    ] {
        assert!(!reach.contains(banned), "cosilo-provision reaches {banned}");
    }
    Ok(())
}

/// Every `.rs` file under `dir` (no `target/`), with its text.
fn rust_sources(dir: &Path, out: &mut Vec<(PathBuf, String)>) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let p = entry?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if p.is_dir() {
            if !name.starts_with('.') && name != "target" && name != "fuzz" {
                rust_sources(&p, out)?;
            }
        } else if name.ends_with(".rs") {
            out.push((p.clone(), std::fs::read_to_string(&p)?));
        }
    }
    Ok(())
}

/// Files whose code (not comments) names `krate` as a path (`krate::`) or in a `use`.
fn files_naming(sources: &[(PathBuf, String)], krate: &str) -> BTreeSet<PathBuf> {
    let pattern = format!("{krate}::");
    sources
        .iter()
        .filter(|(_, text)| {
            text.lines().any(|l| {
                let code = l.split("//").next().unwrap_or("");
                code.contains(&pattern) || code.trim_start().starts_with(&format!("use {krate}"))
            })
        })
        .map(|(p, _)| p.clone())
        .collect()
}

#[test]
fn only_the_store_names_sled_and_only_the_link_names_rumqttc() -> Result<()> {
    let root = cosilo_tests::workspace_root();
    let mut sources = Vec::new();
    for top in ["appliance", "bridge", "sdk", "hardware", "tests"] {
        rust_sources(&root.join(top), &mut sources)?;
    }
    assert!(sources.len() > 50, "found only {} sources", sources.len());
    let rel = |p: &PathBuf| p.strip_prefix(&root).unwrap_or(p).display().to_string();

    let sled = files_naming(&sources, "sled");
    assert!(!sled.is_empty(), "the store names sled somewhere");
    for p in &sled {
        assert!(
            rel(p).starts_with("appliance/store/src/"),
            "{} names sled; only the store crate may",
            rel(p)
        );
    }

    let mqtt = files_naming(&sources, "rumqttc");
    let allowed = ["appliance/federation/src/link.rs"];
    assert!(!mqtt.is_empty(), "the link names rumqttc");
    for p in &mqtt {
        let r = rel(p);
        assert!(
            allowed.contains(&r.as_str()),
            "{r} names rumqttc; only the MQTT link may"
        );
    }
    Ok(())
}
