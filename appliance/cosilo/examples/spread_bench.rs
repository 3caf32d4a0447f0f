//! How long one model update takes to spread from one site to N others through Mosquitto on
//! loopback, and how many bytes it puts on the wire, for each weight format.
//!
//! The update is the default U-Net's parameters (seeded initialisation), encoded by
//! `federation::weights` as f32, f16 and f16+zstd, cut into 256 KiB chunks, each published at
//! QoS 1 through the appliance's own MQTT link. The clock runs from the first publish until the
//! last subscriber holds every byte; every run's reassembled bytes are compared with the update.
//!
//! ```text
//! cargo run --release -p cosilo-appliance --example spread_bench -- [--runs 5] [--subscribers 2,4,8] [--out bench/results/spread.md]
//! ```
//! Needs `/usr/sbin/mosquitto` (`apt-get install mosquitto`).

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use cosilo_federation::link::{connect, Link, LinkConfig, LinkEvent};
use cosilo_federation::weights::WeightFormat;
use cosilo_train::unet::{build, UNetConfig};
use tokio::sync::mpsc;

const TOPIC: &str = "fed/bench/update";
/// Per-chunk header: run, chunk index, chunk count (u32 LE each).
const HEADER: usize = 12;
/// MQTT PUBACK: fixed header (2) + packet id (2).
const PUBACK_BYTES: usize = 4;
const MAX_PACKET: usize = 1024 * 1024;

struct Args {
    runs: usize,
    subscribers: Vec<usize>,
    chunk: usize,
    out: Option<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        runs: 5,
        subscribers: vec![2, 4, 8],
        chunk: 256 * 1024,
        out: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--runs" => args.runs = value.parse().context("--runs")?,
            "--chunk" => args.chunk = value.parse().context("--chunk")?,
            "--subscribers" => {
                args.subscribers = value
                    .split(',')
                    .map(|n| n.trim().parse().context("--subscribers"))
                    .collect::<Result<_>>()?
            }
            "--out" => args.out = Some(PathBuf::from(value)),
            other => bail!("unknown flag {other}"),
        }
    }
    if args.runs == 0 || args.subscribers.is_empty() || args.chunk + HEADER + 64 > MAX_PACKET {
        bail!(
            "need runs ≥ 1, at least one subscriber count, chunk ≤ {} bytes",
            MAX_PACKET - HEADER - 64
        );
    }
    Ok(args)
}

/// Mosquitto on a free loopback port, killed on drop.
struct Broker {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Broker {
    fn start() -> Result<Broker> {
        let exe = "/usr/sbin/mosquitto";
        if !std::path::Path::new(exe).exists() {
            bail!("{exe} not found: apt-get install mosquitto");
        }
        let dir = tempfile::tempdir()?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\nmax_packet_size {MAX_PACKET}\n\
                 persistence false\nuser root\nlog_dest none\n"
            ),
        )?;
        let child = Command::new(exe)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting mosquitto")?;
        let broker = Broker {
            child,
            port,
            _dir: dir,
        };
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if started.elapsed() > Duration::from_secs(10) {
                bail!("mosquitto did not listen on {port}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(broker)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn link_config(port: u16, id: &str) -> LinkConfig {
    let mut cfg = LinkConfig::new("127.0.0.1", port, id);
    cfg.max_packet_bytes = MAX_PACKET;
    cfg.clean_session = true;
    cfg
}

async fn wait_connected(events: &mut mpsc::Receiver<LinkEvent>) -> Result<()> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), events.recv()).await {
            Ok(Some(LinkEvent::Connected { .. })) => return Ok(()),
            Ok(Some(_)) => {}
            _ => bail!("subscriber did not connect"),
        }
    }
}

/// A subscriber task: reassembles each run's chunks and reports `(run, finished, bytes)`.
async fn reassemble(
    mut events: mpsc::Receiver<LinkEvent>,
    done: mpsc::UnboundedSender<(u32, Instant, Vec<u8>)>,
    chunk: usize,
) {
    let mut run = u32::MAX;
    let mut parts: Vec<Option<Vec<u8>>> = Vec::new();
    let mut have = 0usize;
    while let Some(event) = events.recv().await {
        let LinkEvent::Message { payload, .. } = event else {
            continue;
        };
        if payload.len() < HEADER {
            continue;
        }
        let word = |i: usize| {
            u32::from_le_bytes([payload[i], payload[i + 1], payload[i + 2], payload[i + 3]])
        };
        let (r, index, count) = (word(0), word(4) as usize, word(8) as usize);
        if r != run {
            run = r;
            parts = vec![None; count];
            have = 0;
        }
        if index < parts.len() && parts[index].is_none() {
            parts[index] = Some(payload[HEADER..].to_vec());
            have += 1;
        }
        if have == parts.len() {
            let finished = Instant::now();
            let mut bytes = Vec::with_capacity(parts.len() * chunk);
            for p in parts.iter().flatten() {
                bytes.extend_from_slice(p);
            }
            let _ = done.send((run, finished, bytes));
            have = usize::MAX; // reported; wait for the next run
        }
    }
}

struct Row {
    format: &'static str,
    payload: usize,
    chunks: usize,
    subscribers: usize,
    times_ms: Vec<f64>,
    wire_bytes: usize,
}

async fn spread(
    port: u16,
    payload: &[u8],
    subscribers: usize,
    runs: usize,
    chunk: usize,
    run_base: u32,
) -> Result<Vec<f64>> {
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let mut subs: Vec<Link> = Vec::new();
    for i in 0..subscribers {
        let (link, mut events) = connect(
            &link_config(port, &format!("bench-sub-{i}")),
            vec![TOPIC.into()],
            None,
        )
        .await?;
        wait_connected(&mut events).await?;
        tokio::spawn(reassemble(events, done_tx.clone(), chunk));
        subs.push(link);
    }
    let (publisher, mut pub_events) =
        connect(&link_config(port, "bench-pub"), vec![], None).await?;
    wait_connected(&mut pub_events).await?;
    tokio::spawn(async move { while pub_events.recv().await.is_some() {} });

    let count = payload.len().div_ceil(chunk);
    let mut times = Vec::new();
    // Run 0 warms up (connections, buffers); runs 1..=runs are timed.
    for r in 0..=runs {
        let run = run_base + r as u32;
        let started = Instant::now();
        for (index, data) in payload.chunks(chunk).enumerate() {
            let mut message = Vec::with_capacity(HEADER + data.len());
            message.extend_from_slice(&run.to_le_bytes());
            message.extend_from_slice(&(index as u32).to_le_bytes());
            message.extend_from_slice(&(count as u32).to_le_bytes());
            message.extend_from_slice(data);
            publisher.publish(TOPIC, message, false).await?;
        }
        let mut last = started;
        for _ in 0..subscribers {
            let (got_run, finished, bytes) =
                tokio::time::timeout(Duration::from_secs(60), done_rx.recv())
                    .await
                    .context("a subscriber did not receive the whole update within 60 s")?
                    .context("subscriber tasks ended")?;
            if got_run != run || bytes != payload {
                bail!("run {run}: a subscriber reassembled different bytes (run {got_run})");
            }
            last = last.max(finished);
        }
        publisher.flush().await?;
        if r > 0 {
            times.push((last - started).as_secs_f64() * 1e3);
        }
    }
    publisher.close().await?;
    for s in &subs {
        s.close().await?;
    }
    Ok(times)
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let args = parse_args()?;
    let (_, vars) = build(&UNetConfig::default(), &Device::Cpu, 7).context("building the U-Net")?;
    let weights = cosilo_train::flat::flatten(&vars).context("flattening the weights")?;
    let params = weights.layout.numel();
    let broker = Broker::start()?;
    let mut rows = Vec::new();
    let mut run_base = 0u32;
    let mut encodes = Vec::new();
    for format in [WeightFormat::F32, WeightFormat::F16, WeightFormat::F16Zstd] {
        let mut encode_ms = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            std::hint::black_box(weights.encode(format));
            encode_ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let payload = weights.encode(format);
        encodes.push((format.name(), payload.len(), median(&encode_ms)));
        let chunks = payload.len().div_ceil(args.chunk);
        for &n in &args.subscribers {
            let times = spread(broker.port, &payload, n, args.runs, args.chunk, run_base).await?;
            run_base += args.runs as u32 + 1;
            let packets: usize = payload
                .chunks(args.chunk)
                .map(|c| LinkConfig::publish_packet_bytes(TOPIC, c.len() + HEADER))
                .sum();
            let wire_bytes = (packets + chunks * PUBACK_BYTES) * (1 + n);
            let row = Row {
                format: format.name(),
                payload: payload.len(),
                chunks,
                subscribers: n,
                times_ms: times,
                wire_bytes,
            };
            eprintln!(
                "{:9} {:>9} B  N={}  median {:7.1} ms  runs {:?}",
                row.format,
                row.payload,
                n,
                median(&row.times_ms),
                row.times_ms
                    .iter()
                    .map(|t| (t * 10.0).round() / 10.0)
                    .collect::<Vec<_>>()
            );
            rows.push(row);
        }
    }
    drop(broker);

    let mut md = String::new();
    md.push_str("# Spreading one model update through Mosquitto (loopback)\n\n");
    md.push_str(&format!(
        "One update of the default U-Net ({params} f32 parameters, seeded initialisation) from 1 \
         publisher to N subscribers, {} KiB chunks, QoS 1, through the appliance's MQTT link \
         (`federation::link`) and Mosquitto. Time: first publish → last subscriber holds every \
         byte (checked against the update), median of {} runs after one warm-up run. Wire bytes: \
         MQTT packets (PUBLISH + PUBACK) on the publisher's and every subscriber's connection, \
         i.e. (chunk packets + PUBACKs) × (1 + N); TCP/IP headers not counted.\n\n",
        args.chunk / 1024,
        args.runs
    ));
    md.push_str("| format | update bytes | chunks | N | median ms | min–max ms | MQTT bytes on the wire | delivered MB/s |\n");
    md.push_str("|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in &rows {
        let med = median(&r.times_ms);
        let min = r.times_ms.iter().copied().fold(f64::INFINITY, f64::min);
        let max = r.times_ms.iter().copied().fold(0.0, f64::max);
        md.push_str(&format!(
            "| {} | {} | {} | {} | {:.1} | {:.1}–{:.1} | {} | {:.0} |\n",
            r.format,
            r.payload,
            r.chunks,
            r.subscribers,
            med,
            min,
            max,
            r.wire_bytes,
            (r.payload * r.subscribers) as f64 / (med / 1e3) / 1e6
        ));
    }
    md.push_str(
        "\nThe clock starts after encoding. Encoding the update once (median of 5, same machine), \
         and its size against f16:\n\n| format | bytes | vs f16 | encode ms |\n|---|---:|---:|---:|\n",
    );
    let f16_len = encodes
        .iter()
        .find(|e| e.0 == "f16")
        .map(|e| e.1)
        .unwrap_or(1);
    for (name, len, ms) in &encodes {
        md.push_str(&format!(
            "| {name} | {len} | {:.3} | {ms:.1} |\n",
            *len as f64 / f16_len as f64
        ));
    }
    md.push_str(
        "\nThe weights are a fresh seeded initialisation: zstd finds little to remove from random \
         f16 mantissas; trained weights may compress differently. Each run lasts a few \
         milliseconds, so other work on the machine shows as spread between runs.\n",
    );
    let machine = machine_description();
    md.push_str(&format!(
        "\nCommand: `cargo run --release -p cosilo-appliance --example spread_bench -- --runs {} \
         --subscribers {}`\n\nMachine: {machine}\n",
        args.runs,
        args.subscribers
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(",")
    ));
    print!("{md}");
    if let Some(out) = &args.out {
        std::fs::write(out, &md).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}

fn machine_description() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    let mosquitto = Command::new("/usr/sbin/mosquitto")
        .arg("-h")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.trim().to_string())
        })
        .unwrap_or_default();
    format!("{cpu}, {cores} cores (load average {load} at the end); {mosquitto}")
}
