//! Outbound: what this site sends. Every message gets a fresh sequence number, is sealed with the
//! site's key and published; a model is split into chunks that fit the broker's packet size and,
//! for gossip, remembered to answer a pull.

use std::collections::BTreeSet;
use std::sync::Arc;

use tracing::debug;

use super::{DaemonError, Site};
use cosilo_federation::keys::SiteKeys;
use cosilo_federation::link::Link;
use cosilo_federation::strategy::{OwnModel, Purpose};
use cosilo_federation::weights::{EncodedWeights, Layout, WeightFormat};
use cosilo_federation::wire::{
    self, topics, Body, Envelope, Presence, SiteStatus, UpdateMeta, UpdatePurpose,
};

/// How many of its own sent seqs a site remembers.
const SENT_SEQS_KEPT: usize = 65_536;

/// Milliseconds since the Unix epoch: the wire format's clock.
pub(super) use cosilo_federation::wire::unix_ms_now as now_ms;

fn to_purpose(p: Purpose) -> UpdatePurpose {
    match p {
        Purpose::Gossip => UpdatePurpose::BrainTorrent,
        Purpose::Round => UpdatePurpose::FedAvgRound,
        Purpose::Token => UpdatePurpose::Token,
    }
}

/// The last gossip announcement, re-sent on a pull.
#[derive(Debug, Clone)]
pub(super) struct Announced {
    pub purpose: Purpose,
    pub round: u64,
    pub model_version: u64,
    /// The model's encoding, shared with the strategy's copy of the model (not a copy).
    pub payload: EncodedWeights,
}

/// This site's sending side.
pub(super) struct Outbound {
    pub me: String,
    pub federation: String,
    pub keys: SiteKeys,
    /// None when the site runs alone (no broker).
    pub link: Option<Link>,
    pub layout: Layout,
    pub format: WeightFormat,
    pub chunk_bytes: usize,
    /// Training samples of this site (announced with its models).
    pub samples: u64,
    /// The last sequence number used.
    pub seq: u64,
    pub next_update_id: u64,
    /// The seqs this run sent (the newest [`SENT_SEQS_KEPT`]), to recognise its own messages
    /// when the broker hands them back.
    pub sent_seqs: BTreeSet<u64>,
    pub last_gossip: Option<Announced>,
    /// The status last announced.
    pub status: SiteStatus,
    pub bytes_sent: u64,
}

impl Outbound {
    fn next_seq(&mut self) -> u64 {
        // Monotonic across restarts even if the last checkpoint missed some sends: at least the
        // clock in microseconds.
        let floor = now_ms().saturating_mul(1000);
        self.seq = (self.seq + 1).max(floor);
        self.seq
    }

    /// Seals `body` with the next seq and publishes it on `topic`.
    pub(super) async fn send(
        &mut self,
        topic: &str,
        body: Body,
        retain: bool,
    ) -> Result<(), DaemonError> {
        let seq = self.next_seq();
        self.sent_seqs.insert(seq);
        if self.sent_seqs.len() > SENT_SEQS_KEPT {
            self.sent_seqs.pop_first();
        }
        let env = Envelope::new(&self.me, seq, now_ms(), body);
        let bytes = wire::seal(&env, &self.keys)?;
        self.bytes_sent += bytes.len() as u64;
        if let Some(link) = &self.link {
            link.publish(topic, bytes, retain).await?;
        }
        Ok(())
    }

    /// This site's model as peers receive it: encoded once in the wire format, and its values
    /// rounded in place to what a receiver decodes, so that every site averages the very same
    /// numbers. The strategy holds both and hands the encoding back to be published (no second
    /// encode, no decoded copy). A site without a broker sends nothing: its values stay as
    /// trained.
    pub(super) fn as_sent(&self, mut data: Vec<f32>) -> Result<OwnModel, DaemonError> {
        if self.link.is_none() {
            return Ok(OwnModel::unsent(data));
        }
        let encoded = EncodedWeights::encode_as_sent(&mut data, self.format)?;
        Ok(OwnModel {
            values: Arc::new(data),
            encoded: Some(encoded),
        })
    }

    /// Publishes an encoded model in chunks (and, with `retain`, its retained announcement).
    pub(super) async fn publish_model(
        &mut self,
        model: Announced,
        retain: bool,
    ) -> Result<(), DaemonError> {
        if self.link.is_none() {
            return Ok(());
        }
        let update_id = self.next_update_id;
        self.next_update_id += 1;
        let meta = UpdateMeta {
            update_id,
            origin: self.me.clone(),
            model_version: model.model_version,
            round: model.round,
            samples: self.samples,
            purpose: to_purpose(model.purpose),
            format: self.format,
            layout_digest: self.layout.digest(),
        };
        let payload = model.payload.bytes();
        let chunks = wire::split_update(&meta, payload, self.chunk_bytes);
        let n = chunks.len();
        let header = meta.header(payload, self.chunk_bytes);
        let topic = topics::updates(&self.federation, &self.me);
        for chunk in chunks {
            self.send(&topic, Body::UpdateChunk(chunk), false).await?;
        }
        if retain {
            // The retained announcement: a late or restarted peer learns the newest version
            // from it and pulls the weights.
            let topic = topics::model(&self.federation, &self.me);
            self.send(&topic, Body::ModelAnnouncement(header), true)
                .await?;
        }
        if let Some(link) = &self.link {
            link.flush().await?;
        }
        debug!(
            purpose = ?model.purpose,
            round = model.round,
            model_version = model.model_version,
            chunks = n,
            bytes = model.payload.bytes().len(),
            "published a model"
        );
        if model.purpose == Purpose::Gossip {
            self.last_gossip = Some(model);
        }
        Ok(())
    }
}

impl Site {
    /// Announces `status` (retained) with where this site's strategy stands.
    pub(super) async fn presence(&mut self, status: SiteStatus) -> Result<(), DaemonError> {
        if self.out.link.is_none() {
            return Ok(());
        }
        self.out.status = status;
        let body = Body::Presence(Presence {
            status,
            model_version: self.strategy.model_version(),
            versions_seen: self.strategy.versions_seen(),
            samples: self.out.samples,
            round: self.strategy.round(),
            strategy: self.cfg.federation.strategy.name().to_string(),
            public_key: self.out.keys.public_bytes(),
        });
        let topic = topics::presence(&self.out.federation, &self.out.me);
        self.out.send(&topic, body, true).await
    }
}
