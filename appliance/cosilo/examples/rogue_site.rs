//! A malicious federation participant, for testing that honest appliances refuse everything it
//! sends and that none of it reaches a model.
//!
//! It connects to the federation's broker (from a site configuration it was able to read), listens
//! to every topic under `cosilo/{federation}/` to capture genuine messages, and then, in waves
//! until `--duration-s` passes or it is killed, publishes:
//!
//! | attack | what the honest sites must say |
//! |---|---|
//! | `garbage`: random bytes | not a Cosilo message (bad magic) |
//! | `truncated`: a genuine message cut short | message truncated |
//! | `not-member`: signed by a key of a site not on the roster | not a member of the federation |
//! | `wrong-key`: a member's id signed with another key | bad signature |
//! | `replay`: captured genuine messages sent again | replayed message |
//!
//! and, with `--compromised KEY` (a roster member's secret key that leaked: the messages are
//! validly signed, so only the content checks stand between them and the model), a batch of
//! forgeries each time a new genuine message of that member goes by:
//!
//! | attack | what the honest sites must say |
//! |---|---|
//! | `mis-shaped`: an update one value short | payload is N bytes, the layout needs M |
//! | `non-finite`: a complete, checksummed update full of NaN | value 0 is not finite |
//! | `other-model`: an update for another architecture (layout digest) | another model architecture |
//! | `oversized`: a chunk claiming a 1 TiB update of 2³²−1 chunks | exceeds the limit |
//! | `integrity`: a one-chunk update whose SHA-256 does not match | payload SHA-256 does not match |
//! | `flood`: first chunks of updates that never complete | (held within the reassembler's bounds, expired) |
//!
//! Its sequence numbers for the compromised identity sit just above the member's newest genuine
//! message and below the member's next one (the daemon numbers by its clock in µs), so the
//! forgeries pass the replay guards and meet the content checks without locking the genuine site
//! out (a leaked key could do that too: see `docs/PROTOCOL.md`, "Faults survived").
//!
//! ```text
//! cargo run --release -p cosilo-appliance --example rogue_site -- --config h1.toml \
//!     [--compromised h3.key] [--impersonate h1] [--duration-s 60] [--interval-ms 700] [--report rogue.json]
//! ```
//! `--config` is any member's site configuration: the rogue reads the broker address, the
//! federation name, the roster and the model architecture from it (all of which an insider
//! knows), never the member's key. At exit it prints (and writes to `--report`) a JSON count of
//! the messages it sent per attack.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cosilo_appliance::config::SiteConfig;
use cosilo_federation::keys::{Roster, SiteKeys};
use cosilo_federation::link::{self, Link, LinkConfig, LinkEvent};
use cosilo_federation::strategy::StrategyKind;
use cosilo_federation::weights::{FlatWeights, Layout, WeightFormat};
use cosilo_federation::wire::{
    self, topics, Body, Envelope, Kind, Presence, SiteStatus, UpdateChunk, UpdateMeta,
    UpdatePurpose,
};

/// Forged sequence numbers start this far above the member's newest genuine one (room for the
/// member's own messages within the same millisecond, e.g. the other chunks of an update).
const SEQ_MARGIN: u64 = 100;
/// How many forged numbers fit above one genuine message (below the next millisecond's).
const SEQ_ROOM: u64 = 400;
/// Forgeries per batch: five content attacks and three flood chunks.
const BATCH: u64 = 8;

/// Command-line options.
struct Args {
    config: PathBuf,
    compromised: Option<PathBuf>,
    impersonate: Option<String>,
    duration: Duration,
    interval: Duration,
    report: Option<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        config: PathBuf::new(),
        compromised: None,
        impersonate: None,
        duration: Duration::from_secs(60),
        interval: Duration::from_millis(700),
        report: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--config" => args.config = PathBuf::from(value),
            "--compromised" => args.compromised = Some(PathBuf::from(value)),
            "--impersonate" => args.impersonate = Some(value),
            "--duration-s" => {
                args.duration = Duration::from_secs_f64(value.parse().context("--duration-s")?)
            }
            "--interval-ms" => {
                args.interval = Duration::from_millis(value.parse().context("--interval-ms")?)
            }
            "--report" => args.report = Some(PathBuf::from(value)),
            other => bail!("unknown flag {other}"),
        }
    }
    if args.config.as_os_str().is_empty() {
        bail!("--config FILE (a member's site configuration) is required");
    }
    Ok(args)
}

use cosilo_federation::wire::unix_ms_now as now_ms;

/// A small deterministic generator for garbage (xorshift64*).
struct Noise(u64);

impl Noise {
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| {
                self.0 ^= self.0 >> 12;
                self.0 ^= self.0 << 25;
                self.0 ^= self.0 >> 27;
                (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
            })
            .collect()
    }
}

/// The rogue's state: its link, what it knows and what it captured.
struct Rogue {
    link: Link,
    fed: String,
    /// A site id that is not on the roster, with its own key.
    outsider: SiteKeys,
    /// A member's id with a key that is not the member's.
    impostor: SiteKeys,
    /// A member's real key (leaked), if given.
    compromised: Option<SiteKeys>,
    layout: Layout,
    purpose: UpdatePurpose,
    /// Recently captured genuine messages (topic, bytes), newest last.
    captured: VecDeque<(String, Vec<u8>)>,
    /// Fingerprints of what the rogue itself sent lately (never worth replaying).
    own: VecDeque<u64>,
    /// The highest sequence number seen on the compromised member's genuine messages.
    member_seq: Option<u64>,
    /// Sequence numbers used since then.
    used: u64,
    next_update_id: u64,
    noise: Noise,
    sent: BTreeMap<&'static str, u64>,
}

impl Rogue {
    /// A sequence number for the compromised identity: just above the member's newest genuine
    /// one, so the forgery passes the receivers' replay guards and meets their content checks,
    /// yet below the member's next message (the daemon's numbers follow its clock in µs, at
    /// least 1000 apart per millisecond), so the genuine site is never locked out. None once the
    /// room above that message is used up, or before any genuine message was seen.
    fn seq(&mut self) -> Option<u64> {
        let base = self.member_seq?;
        if self.used >= SEQ_ROOM {
            return None;
        }
        self.used += 1;
        Some(base + SEQ_MARGIN + self.used)
    }

    /// Notes a genuine message of the compromised member; true when its number is the newest.
    fn saw_member(&mut self, seq: u64) -> bool {
        if self.member_seq.is_none_or(|s| seq > s) {
            self.member_seq = Some(seq);
            self.used = 0;
            true
        } else {
            false
        }
    }

    async fn send(&mut self, attack: &'static str, topic: &str, bytes: Vec<u8>) -> Result<()> {
        self.own.push_back(fingerprint(&bytes));
        if self.own.len() > 1024 {
            self.own.pop_front();
        }
        self.link
            .publish(topic, bytes, false)
            .await
            .with_context(|| format!("publishing the {attack} attack"))?;
        *self.sent.entry(attack).or_default() += 1;
        Ok(())
    }

    fn presence_of(keys: &SiteKeys) -> Body {
        Body::Presence(Presence {
            status: SiteStatus::Training,
            model_version: 1_000_000,
            versions_seen: BTreeMap::from([(keys.site().to_string(), 1_000_000)]),
            samples: 1_000_000,
            round: 0,
            strategy: "braintorrent".into(),
            public_key: keys.public_bytes(),
        })
    }

    /// A complete one-chunk update from `origin` carrying `payload` as `format`.
    fn update(&mut self, origin: &str, format: WeightFormat, payload: &[u8]) -> UpdateChunk {
        self.next_update_id += 1;
        let meta = UpdateMeta {
            update_id: self.next_update_id,
            origin: origin.to_string(),
            model_version: 1_000_000,
            round: 0,
            samples: 1_000_000,
            purpose: self.purpose,
            format,
            layout_digest: self.layout.digest(),
        };
        let mut chunks = wire::split_update(&meta, payload, payload.len().max(1));
        chunks.swap_remove(0)
    }

    fn seal(&mut self, keys_of: Who, body: Body) -> Result<Vec<u8>> {
        let seq = match keys_of {
            Who::Compromised => self.seq().context("no room for a forged sequence number")?,
            _ => now_ms().saturating_mul(1000),
        };
        let keys = match keys_of {
            Who::Outsider => &self.outsider,
            Who::Impostor => &self.impostor,
            Who::Compromised => self
                .compromised
                .as_ref()
                .context("no compromised key given")?,
        };
        let env = Envelope::new(keys.site(), seq, now_ms(), body);
        Ok(wire::seal(&env, keys)?)
    }

    /// One wave of the attacks that need no leaked key.
    async fn wave(&mut self) -> Result<()> {
        let fed = self.fed.clone();
        let victim = self.impostor.site().to_string();
        let updates_topic = topics::updates(&fed, &victim);

        // Garbage.
        let garbage = self.noise.bytes(300);
        self.send("garbage", &updates_topic, garbage).await?;

        // A genuine message cut short (or, before any capture, one of the outsider's).
        let whole = match self.captured.back() {
            Some((_, b)) => b.clone(),
            None => {
                let body = Self::presence_of(&self.outsider);
                self.seal(Who::Outsider, body)?
            }
        };
        let cut = whole[..whole.len() / 2].to_vec();
        self.send("truncated", &updates_topic, cut).await?;

        // A site that is not on the roster: presence and an update.
        let body = Self::presence_of(&self.outsider);
        let bytes = self.seal(Who::Outsider, body)?;
        let topic = topics::presence(&fed, self.outsider.site());
        self.send("not-member", &topic, bytes).await?;
        let n = self.layout.numel();
        let zeros = FlatWeights {
            layout: self.layout.clone(),
            data: vec![0.0; n],
        }
        .encode(WeightFormat::F32);
        let outsider = self.outsider.site().to_string();
        let chunk = self.update(&outsider, WeightFormat::F32, &zeros);
        let bytes = self.seal(Who::Outsider, Body::UpdateChunk(chunk))?;
        let topic = topics::updates(&fed, &outsider);
        self.send("not-member", &topic, bytes).await?;

        // A member's id, another key.
        let chunk = self.update(&victim, WeightFormat::F32, &zeros);
        let bytes = self.seal(Who::Impostor, Body::UpdateChunk(chunk))?;
        self.send("wrong-key", &updates_topic, bytes).await?;

        // Replays of genuine messages.
        let replays: Vec<(String, Vec<u8>)> = self.captured.iter().rev().take(4).cloned().collect();
        for (topic, bytes) in replays {
            self.send("replay", &topic, bytes).await?;
        }

        Ok(())
    }

    /// The leaked key's forgeries, sent the moment a genuine message of the member shows its
    /// newest sequence number (so they reach the receivers before the member's next update).
    async fn forge(&mut self) -> Result<()> {
        let fed = self.fed.clone();
        let n = self.layout.numel();
        let Some(member) = self.compromised.as_ref().map(|k| k.site().to_string()) else {
            return Ok(());
        };
        if self.member_seq.is_none() || self.used + BATCH > SEQ_ROOM {
            return Ok(());
        }
        let topic = topics::updates(&fed, &member);
        // Small where the check does not need size, so the batch lands before the member's
        // next update.
        let small = vec![0u8; 64];

        // One value short (f16 zeros).
        let short = vec![0u8; 2 * (n - 1)];
        let chunk = self.update(&member, WeightFormat::F16, &short);
        let bytes = self.seal(Who::Compromised, Body::UpdateChunk(chunk))?;
        self.send("mis-shaped", &topic, bytes).await?;

        // Every value NaN (f16 0x7E00), otherwise a perfect update.
        let nan: Vec<u8> = (0..n).flat_map(|_| [0x00, 0x7E]).collect();
        let chunk = self.update(&member, WeightFormat::F16, &nan);
        let bytes = self.seal(Who::Compromised, Body::UpdateChunk(chunk))?;
        self.send("non-finite", &topic, bytes).await?;

        // Another model's layout.
        let mut chunk = self.update(&member, WeightFormat::F16, &small);
        chunk.update.layout_digest = [0xAB; 32];
        let bytes = self.seal(Who::Compromised, Body::UpdateChunk(chunk))?;
        self.send("other-model", &topic, bytes).await?;

        // A 1 TiB update of 2^32 - 1 chunks.
        let mut chunk = self.update(&member, WeightFormat::F16, &small);
        chunk.update.total_len = 1 << 40;
        chunk.update.chunk_count = u32::MAX;
        let bytes = self.seal(Who::Compromised, Body::UpdateChunk(chunk))?;
        self.send("oversized", &topic, bytes).await?;

        // A checksum that does not match the payload.
        let mut chunk = self.update(&member, WeightFormat::F16, &small);
        chunk.update.payload_sha256[0] ^= 0xFF;
        let bytes = self.seal(Who::Compromised, Body::UpdateChunk(chunk))?;
        self.send("integrity", &topic, bytes).await?;

        // First chunks of updates that never complete.
        for _ in 0..BATCH - 5 {
            let mut chunk = self.update(&member, WeightFormat::F16, &small[..16]);
            chunk.update.total_len = small.len() as u64;
            chunk.update.chunk_count = 4;
            let bytes = self.seal(Who::Compromised, Body::UpdateChunk(chunk))?;
            self.send("flood", &topic, bytes).await?;
        }
        Ok(())
    }
}

/// A fingerprint of a message's bytes.
fn fingerprint(bytes: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// Whose key signs.
#[derive(Clone, Copy)]
enum Who {
    Outsider,
    Impostor,
    Compromised,
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let cfg = SiteConfig::load(&args.config)?;
    let roster = Roster::load(&cfg.federation.roster)?;
    let tc = cfg.train_config()?;
    let device = candle_core::Device::Cpu;
    let (_, vars) = cosilo_train::unet::build(&tc.model, &device, tc.seed)?;
    let layout = cosilo_train::flat::flatten(&vars)?.layout;

    let outsider_id = "mallory";
    if roster.contains(outsider_id) {
        bail!("the roster already has a site called {outsider_id}");
    }
    let victim = match &args.impersonate {
        Some(v) => v.clone(),
        None => roster
            .sites()
            .first()
            .map(|s| s.id.clone())
            .context("the roster is empty")?,
    };
    if !roster.contains(&victim) {
        bail!("--impersonate {victim}: not on the roster");
    }
    let compromised = match &args.compromised {
        Some(p) => {
            let k = SiteKeys::load(p)?;
            if roster.verifying_key(k.site()) != Some(&k.verifying_key()) {
                bail!("{} is not the roster's key of {}", p.display(), k.site());
            }
            Some(k)
        }
        None => None,
    };
    let purpose = match cfg.federation.strategy {
        StrategyKind::FedAvg => UpdatePurpose::FedAvgRound,
        StrategyKind::Ciil | StrategyKind::Iil => UpdatePurpose::Token,
        _ => UpdatePurpose::BrainTorrent,
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let fed = cfg.federation.name.clone();
    let report_path = args.report.clone();
    let sent = runtime.block_on(async move {
        let mut lc = LinkConfig::new(
            cfg.broker.host.clone(),
            cfg.broker.port,
            format!("rogue-{}", std::process::id()),
        );
        lc.max_packet_bytes = cfg.broker.max_packet_bytes;
        lc.clean_session = true;
        let (link, mut events) = link::connect(&lc, vec![topics::all(&fed)], None).await?;
        let mut rogue = Rogue {
            link,
            fed: fed.clone(),
            outsider: SiteKeys::generate(outsider_id)?,
            impostor: SiteKeys::generate(&victim)?,
            compromised,
            layout,
            purpose,
            captured: VecDeque::new(),
            own: VecDeque::new(),
            member_seq: None,
            used: 0,
            next_update_id: 0xDEAD_0000_0000_0000,
            noise: Noise(0x9E37_79B9_7F4A_7C15 ^ now_ms()),
            sent: BTreeMap::new(),
        };
        let t0 = Instant::now();
        let mut tick = tokio::time::interval(args.interval);
        loop {
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(LinkEvent::Message { topic, payload, retained }) => {
                        // Only live genuine traffic is worth replaying (never our own forgeries).
                        let opened = wire::open(&payload, &roster).ok();
                        let genuine = opened.is_some() && !rogue.own.contains(&fingerprint(&payload));
                        let mut forge = false;
                        if let (true, Some(env)) = (genuine, &opened) {
                            // Forge right after each of the member's genuine updates: its next
                            // one is at least a training round away.
                            let member = rogue.compromised.as_ref().is_some_and(|k| k.site() == env.sender);
                            if member && env.kind() == Kind::UpdateChunk {
                                forge = rogue.saw_member(env.seq) && !retained;
                            }
                        }
                        if genuine && !retained {
                            rogue.captured.push_back((topic, payload));
                            if rogue.captured.len() > 16 {
                                rogue.captured.pop_front();
                            }
                        }
                        if forge && t0.elapsed() <= args.duration {
                            rogue.forge().await?;
                        }
                    }
                    Some(LinkEvent::Connected { .. }) => eprintln!("rogue: connected"),
                    Some(LinkEvent::Disconnected { reason }) => eprintln!("rogue: disconnected: {reason}"),
                    None => bail!("the link closed"),
                },
                _ = tick.tick() => {
                    if t0.elapsed() > args.duration {
                        break;
                    }
                    rogue.wave().await?;
                    if let Some(p) = &report_path {
                        // After every wave, so a killed rogue still leaves its counts.
                        write_report(p, &rogue.sent)?;
                    }
                }
            }
        }
        rogue.link.flush().await?;
        rogue.link.close().await?;
        Ok::<_, anyhow::Error>(rogue.sent)
    })?;
    println!("{}", serde_json::to_string_pretty(&sent)?);
    if let Some(p) = &args.report {
        write_report(p, &sent)?;
    }
    Ok(())
}

/// Writes the counts to `path` whole or not at all (a temporary file, then a rename): the rogue is
/// killed at an arbitrary moment, and a kill between truncating the report and writing it left
/// an empty file that the test could not parse.
fn write_report(path: &std::path::Path, sent: &BTreeMap<&'static str, u64>) -> Result<()> {
    let text = serde_json::to_string_pretty(sent)?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))
}
