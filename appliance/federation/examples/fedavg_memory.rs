//! Peak memory of FedAvg's weight path: one site's strategy fed its own trained model and `peers`
//! peers' models per round, in a given arrival order. Peers' models are handed over encoded as
//! `f32` (the daemon hands them over as they arrived, usually `f16+zstd`; `f32` keeps this
//! measurement comparable with the decoded copies of earlier versions). Prints the process's VmHWM (peak resident set, /proc/self/status).
//!
//! `cargo run -p cosilo-federation --release --example fedavg_memory -- PEERS PARAMS ROUNDS ORDER`
//! with ORDER one of `in-order`, `reverse`, `shuffled`. One configuration per process, since
//! VmHWM is the peak over the process's life.

use anyhow::{bail, Context as _, Result};
use cosilo_federation::strategy::{
    build, Action, Context, Input, OwnModel, PeerModel, Purpose, StrategyKind,
};
use cosilo_federation::weights::{EncodedWeights, WeightFormat};

fn vm_hwm_kib() -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("no VmHWM in /proc/self/status")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("VmHWM without a value")?
        .parse()?)
}

/// A model whose every value is written (so each of its pages is resident).
fn model(params: usize, site: usize, round: u64) -> Vec<f32> {
    (0..params)
        .map(|k| (k % 1000) as f32 * 1e-3 + site as f32 + round as f32)
        .collect()
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [peers, params, rounds, order] = args.as_slice() else {
        bail!("usage: fedavg_memory PEERS PARAMS ROUNDS in-order|reverse|shuffled");
    };
    let (peers, params, rounds): (usize, usize, u64) =
        (peers.parse()?, params.parse()?, rounds.parse()?);
    // This site sorts first ("h00"), so its own update never holds the others back.
    let sites: Vec<String> = (0..=peers).map(|i| format!("h{i:02}")).collect();
    let ctx = Context {
        me: sites[0].clone(),
        sites: sites.clone(),
        rounds,
        steps_per_round: 1,
        quorum: sites.len(),
        round_deadline_ms: u64::MAX / 4,
        update_timeout_ms: u64::MAX / 4,
        patience: 1,
        samples: 10,
    };
    let mut s = build(StrategyKind::FedAvg, ctx, None)?;
    s.handle(
        Input::Start {
            weights: OwnModel::unsent(vec![]),
        },
        0,
    );
    let mut arrival: Vec<usize> = (1..=peers).collect();
    match order.as_str() {
        "in-order" => {}
        "reverse" => arrival.reverse(),
        "shuffled" => {
            let mut x = 0x9E37_79B9_7F4A_7C15u64;
            for i in (1..arrival.len()).rev() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                arrival.swap(i, (x % (i as u64 + 1)) as usize);
            }
        }
        o => bail!("unknown order {o}"),
    }
    let mut averaged = 0;
    for r in 0..rounds {
        let own = model(params, 0, r);
        s.handle(
            Input::Trained {
                weights: OwnModel::unsent(own),
                score: None,
                loss: 0.0,
            },
            1,
        );
        for &p in &arrival {
            let input = Input::Model(PeerModel {
                origin: sites[p].clone(),
                purpose: Purpose::Round,
                model_version: r + 1,
                round: r,
                samples: 10 + p as u64,
                weights: EncodedWeights::encode(&model(params, p, r), WeightFormat::F32)?,
            });
            let actions = s.handle(input, 2);
            averaged += actions
                .iter()
                .filter(|a| matches!(a, Action::SetModel(_)))
                .count();
        }
    }
    if averaged as u64 != rounds {
        bail!("averaged {averaged} times in {rounds} rounds");
    }
    let model_mib = params as f64 * 4.0 / (1 << 20) as f64;
    let hwm = vm_hwm_kib()?;
    println!(
        "peers {peers} params {params} ({model_mib:.1} MiB per model) rounds {rounds} order {order}: VmHWM {hwm} KiB = {:.1} MiB = {:.2} models",
        hwm as f64 / 1024.0,
        hwm as f64 / 1024.0 / model_mib
    );
    Ok(())
}
