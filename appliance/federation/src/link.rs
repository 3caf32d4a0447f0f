//! The MQTT connection between an appliance and the federation's broker: the only module in the
//! workspace that names `rumqttc`. [`connect`] starts one client whose event loop runs in its own
//! tokio task: it reconnects with capped exponential backoff when the broker goes away, subscribes
//! again (QoS 1) after every CONNACK, and hands what arrives to the caller as [`LinkEvent`]s over a
//! channel. [`Link`] publishes at QoS 1, refuses a payload the broker or the peers could not take
//! before anything is sent, and can wait until the broker has acknowledged (PUBACK) everything
//! published so far ([`Link::flush`]), which is what "the update reached the broker" means.
//!
//! Delivery: with `clean_session = false` the broker keeps the session while the site is offline
//! and `rumqttc` resends unacknowledged publishes when the session resumes. When the broker has
//! lost the session (a restart without persistence, or `clean_session = true`), `rumqttc` drops
//! its unacknowledged publishes; this module puts them back in the queue under new packet ids, so
//! a publish is never lost silently, only delivered again (at least once, as QoS 1 promises).

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet,
    Publish, QoS, Request, Subscribe, SubscribeFilter, TlsConfiguration, Transport,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;

/// The largest packet MQTT 3.1.1 can carry: a remaining length of 268,435,455 bytes plus the
/// 5-byte fixed header.
pub const MQTT_MAX_PACKET_BYTES: usize = 268_435_455 + 5;

/// First wait before reconnecting after the broker went away.
const BACKOFF_START: Duration = Duration::from_millis(100);
/// Longest wait between reconnection attempts.
const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// How many events may wait for the caller before the event loop stops reading from the broker.
const EVENT_QUEUE: usize = 256;
/// How many requests may wait for the event loop before `publish` waits.
const REQUEST_QUEUE: usize = 64;
/// How long `close` waits for the DISCONNECT to be written before it stops the task anyway.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// How to reach the broker, as the appliance's configuration spells it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkConfig {
    /// Broker host name or IP address (with TLS, the name the broker's certificate carries).
    pub host: String,
    /// Broker TCP port (1883 plain, 8883 TLS by convention).
    pub port: u16,
    /// MQTT client id; with a persistent session it names the session, so it must be stable.
    pub client_id: String,
    /// Seconds between keep-alive pings when nothing else is sent (5..=65535).
    #[serde(default = "default_keep_alive_s")]
    pub keep_alive_s: u16,
    /// Largest MQTT packet sent or accepted, in bytes, headers included. Must not exceed the
    /// broker's own limit (Mosquitto `max_packet_size`).
    #[serde(default = "default_max_packet_bytes")]
    pub max_packet_bytes: usize,
    /// `false` (the default): a persistent session, so the broker queues QoS 1 messages for this
    /// site while it is offline. `true`: the broker forgets the site when it disconnects.
    #[serde(default)]
    pub clean_session: bool,
    /// TLS to the broker; `None` for plain TCP.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// User name presented to the broker.
    #[serde(default)]
    pub username: Option<String>,
    /// Password presented to the broker (needs `username`).
    #[serde(default)]
    pub password: Option<String>,
    /// How many QoS 1 publishes may await their PUBACK at once.
    #[serde(default = "default_inflight")]
    pub inflight: u16,
}

/// TLS files for the broker connection, all PEM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate authority that signed the broker's certificate.
    pub ca_file: PathBuf,
    /// This site's certificate, when the broker asks for client certificates.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// The private key of `client_cert`.
    #[serde(default)]
    pub client_key: Option<PathBuf>,
}

fn default_keep_alive_s() -> u16 {
    30
}

fn default_max_packet_bytes() -> usize {
    4 * 1024 * 1024
}

fn default_inflight() -> u16 {
    16
}

impl LinkConfig {
    /// A plain-TCP, persistent-session configuration with default limits.
    pub fn new(host: impl Into<String>, port: u16, client_id: impl Into<String>) -> Self {
        Self {
            host: host.into(),
            port,
            client_id: client_id.into(),
            keep_alive_s: default_keep_alive_s(),
            max_packet_bytes: default_max_packet_bytes(),
            clean_session: false,
            tls: None,
            username: None,
            password: None,
            inflight: default_inflight(),
        }
    }

    /// Checks every field; [`connect`] calls it first.
    pub fn validate(&self) -> Result<(), LinkError> {
        let invalid =
            |field: &'static str, reason: String| LinkError::InvalidConfig { field, reason };
        if self.host.trim().is_empty() {
            return Err(invalid("host", "empty".into()));
        }
        if self.port == 0 {
            return Err(invalid("port", "0 is not a broker port".into()));
        }
        if self.client_id.is_empty() {
            return Err(invalid(
                "client_id",
                "empty (a site needs a stable id for its session)".into(),
            ));
        }
        if self.client_id.len() > u16::MAX as usize {
            return Err(invalid("client_id", "longer than 65535 bytes".into()));
        }
        if self.keep_alive_s < 5 {
            return Err(invalid(
                "keep_alive_s",
                format!("{} s is below 5 s", self.keep_alive_s),
            ));
        }
        if !(1024..=MQTT_MAX_PACKET_BYTES).contains(&self.max_packet_bytes) {
            return Err(invalid(
                "max_packet_bytes",
                format!(
                    "{} is outside 1024..={MQTT_MAX_PACKET_BYTES}",
                    self.max_packet_bytes
                ),
            ));
        }
        if self.inflight == 0 {
            return Err(invalid("inflight", "must be at least 1".into()));
        }
        if self.password.is_some() && self.username.is_none() {
            return Err(invalid("password", "given without a username".into()));
        }
        if let Some(tls) = &self.tls {
            if tls.client_cert.is_some() != tls.client_key.is_some() {
                return Err(invalid(
                    "tls",
                    "client_cert and client_key must be given together".into(),
                ));
            }
            let files = [
                Some(&tls.ca_file),
                tls.client_cert.as_ref(),
                tls.client_key.as_ref(),
            ];
            for path in files.into_iter().flatten() {
                if !path.is_file() {
                    return Err(invalid("tls", format!("{} is not a file", path.display())));
                }
            }
        }
        Ok(())
    }

    /// The size in bytes of the QoS 1 PUBLISH packet that carries `payload` on `topic`.
    pub fn publish_packet_bytes(topic: &str, payload_len: usize) -> usize {
        // Variable header: topic length prefix + topic + packet id; then the payload.
        let remaining = 2 + topic.len() + 2 + payload_len;
        let length_bytes = match remaining {
            0..=127 => 1,
            128..=16_383 => 2,
            16_384..=2_097_151 => 3,
            _ => 4,
        };
        1 + length_bytes + remaining
    }

    /// The largest payload one publish on `topic` can carry under this configuration.
    pub fn max_payload_bytes(&self, topic: &str) -> usize {
        let mut payload = self
            .max_packet_bytes
            .saturating_sub(4 + 2 + topic.len() + 2);
        while payload > 0 && Self::publish_packet_bytes(topic, payload) > self.max_packet_bytes {
            payload -= 1;
        }
        payload
    }
}

/// What the link reports to its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// The broker accepted the connection and acknowledged the subscriptions (sent again after
    /// every connection); `session_present` says it still had this site's session
    /// (subscriptions and queued messages) from before. Queued or retained messages may arrive
    /// just before this event.
    Connected {
        /// Whether the broker resumed an existing session.
        session_present: bool,
    },
    /// A message arrived on one of the subscriptions.
    Message {
        /// The topic it was published on.
        topic: String,
        /// Its bytes, as published.
        payload: Vec<u8>,
        /// Whether the broker delivered it from its retained store (not live).
        retained: bool,
    },
    /// The connection dropped; the link keeps trying to reconnect.
    Disconnected {
        /// What went wrong, in words.
        reason: String,
    },
}

/// Errors of the MQTT link.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// A configuration field is unusable.
    #[error("invalid link configuration: {field}: {reason}")]
    InvalidConfig {
        /// The field at fault.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// A TLS file could not be read.
    #[error("cannot read TLS file {path}")]
    ReadTls {
        /// The file.
        path: PathBuf,
        /// The reason.
        source: std::io::Error,
    },
    /// A publish would exceed the configured packet limit; nothing was sent.
    #[error(
        "publish to {topic} refused: the packet would be {packet_bytes} bytes, over the link's \
         max_packet_bytes of {max_packet_bytes}"
    )]
    PayloadTooLarge {
        /// The topic.
        topic: String,
        /// The packet the payload would need.
        packet_bytes: usize,
        /// The configured limit.
        max_packet_bytes: usize,
    },
    /// The topic cannot be published to (empty, or has wildcards).
    #[error("cannot publish to topic {topic:?}: {reason}")]
    InvalidTopic {
        /// The topic.
        topic: String,
        /// Why.
        reason: &'static str,
    },
    /// A subscription filter is not a valid MQTT filter.
    #[error("invalid subscription filter {filter:?}")]
    InvalidFilter {
        /// The filter.
        filter: String,
    },
    /// The link was closed (or its task ended) before the operation finished.
    #[error("the MQTT link to {broker} is closed; {operation} did not complete")]
    Closed {
        /// `host:port` of the broker.
        broker: String,
        /// What was attempted.
        operation: &'static str,
    },
}

/// Counts of publishes, for [`Link::flush`].
struct Delivery {
    /// Publishes handed to the event loop.
    submitted: AtomicU64,
    /// Distinct publishes the broker acknowledged.
    acked: watch::Sender<u64>,
}

/// A running connection to the broker. Dropping it stops the event loop without a DISCONNECT
/// (the broker then publishes the last will); call [`Link::close`] for a clean goodbye.
pub struct Link {
    client: AsyncClient,
    broker: String,
    client_id: String,
    max_packet_bytes: usize,
    delivery: Arc<Delivery>,
    closing: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

/// Starts the link: returns at once with the [`Link`] and its events. The first event is
/// [`LinkEvent::Connected`] once the broker accepts; while it cannot be reached the link retries
/// with backoff and reports each failure as [`LinkEvent::Disconnected`]. `subscriptions` are
/// MQTT filters subscribed at QoS 1 after every CONNACK. `last_will` is `(topic, payload,
/// retain)`, published by the broker at QoS 1 if the link dies without [`Link::close`].
///
/// The caller must keep reading the events: when the channel is full the link stops reading from
/// the broker. Must be called within a tokio runtime.
pub async fn connect(
    cfg: &LinkConfig,
    subscriptions: Vec<String>,
    last_will: Option<(String, Vec<u8>, bool)>,
) -> Result<(Link, mpsc::Receiver<LinkEvent>), LinkError> {
    cfg.validate()?;
    for filter in &subscriptions {
        if !rumqttc::valid_filter(filter) {
            return Err(LinkError::InvalidFilter {
                filter: filter.clone(),
            });
        }
    }
    let mut options = MqttOptions::new(cfg.client_id.clone(), cfg.host.clone(), cfg.port);
    options
        .set_keep_alive(Duration::from_secs(u64::from(cfg.keep_alive_s)))
        .set_max_packet_size(cfg.max_packet_bytes, cfg.max_packet_bytes)
        .set_clean_session(cfg.clean_session)
        .set_inflight(cfg.inflight)
        .set_request_channel_capacity(REQUEST_QUEUE);
    if let Some(user) = &cfg.username {
        options.set_credentials(user.clone(), cfg.password.clone().unwrap_or_default());
    }
    if let Some((topic, payload, retain)) = last_will {
        check_topic(&topic)?;
        options.set_last_will(LastWill::new(topic, payload, QoS::AtLeastOnce, retain));
    }
    if let Some(tls) = &cfg.tls {
        options.set_transport(Transport::tls_with_config(tls_configuration(tls)?));
    }
    let (client, mut eventloop) = AsyncClient::new(options, REQUEST_QUEUE);
    eventloop.network_options.set_tcp_nodelay(true);

    let broker = format!("{}:{}", cfg.host, cfg.port);
    let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
    let (acked, _) = watch::channel(0u64);
    let delivery = Arc::new(Delivery {
        submitted: AtomicU64::new(0),
        acked,
    });
    let (closing, closing_rx) = watch::channel(false);
    let span = tracing::info_span!("mqtt_link", client_id = %cfg.client_id, broker = %broker);
    let task = tokio::spawn(
        run_event_loop(
            eventloop,
            subscriptions,
            events_tx,
            delivery.clone(),
            closing_rx,
        )
        .instrument(span),
    );
    let link = Link {
        client,
        broker,
        client_id: cfg.client_id.clone(),
        max_packet_bytes: cfg.max_packet_bytes,
        delivery,
        closing,
        task: Mutex::new(Some(task)),
    };
    Ok((link, events_rx))
}

impl Link {
    /// Queues `payload` for `topic` at QoS 1 and returns once the event loop has taken it (not
    /// when the broker has it: see [`Link::flush`]). A payload whose packet would exceed
    /// `max_packet_bytes` is refused here, before anything is sent.
    pub async fn publish(
        &self,
        topic: &str,
        payload: Vec<u8>,
        retain: bool,
    ) -> Result<(), LinkError> {
        check_topic(topic)?;
        let packet_bytes = LinkConfig::publish_packet_bytes(topic, payload.len());
        if packet_bytes > self.max_packet_bytes {
            return Err(LinkError::PayloadTooLarge {
                topic: topic.to_string(),
                packet_bytes,
                max_packet_bytes: self.max_packet_bytes,
            });
        }
        self.delivery.submitted.fetch_add(1, Ordering::SeqCst);
        if self
            .client
            .publish(topic, QoS::AtLeastOnce, retain, payload)
            .await
            .is_err()
        {
            self.delivery.submitted.fetch_sub(1, Ordering::SeqCst);
            return Err(self.closed("publish"));
        }
        Ok(())
    }

    /// Waits until the broker has acknowledged (PUBACK) every publish queued before this call.
    /// While the broker is unreachable it keeps waiting (wrap it in a timeout to bound it).
    pub async fn flush(&self) -> Result<(), LinkError> {
        let target = self.delivery.submitted.load(Ordering::SeqCst);
        let mut acked = self.delivery.acked.subscribe();
        let reached = acked.wait_for(|n| *n >= target).await.is_ok();
        if reached {
            Ok(())
        } else {
            Err(self.closed("flush"))
        }
    }

    /// [`Link::publish`], then [`Link::flush`]: returns once the broker has the message.
    pub async fn publish_and_confirm(
        &self,
        topic: &str,
        payload: Vec<u8>,
        retain: bool,
    ) -> Result<(), LinkError> {
        self.publish(topic, payload, retain).await?;
        self.flush().await
    }

    /// How many publishes the broker has not acknowledged yet.
    pub fn unacknowledged(&self) -> u64 {
        let acked = *self.delivery.acked.borrow();
        self.delivery
            .submitted
            .load(Ordering::SeqCst)
            .saturating_sub(acked)
    }

    /// The broker's `host:port`.
    pub fn broker(&self) -> &str {
        &self.broker
    }

    /// The MQTT client id.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// Says goodbye with a DISCONNECT (so no last will is published) and stops the event loop.
    /// Publishes not yet acknowledged are abandoned: call [`Link::flush`] first to keep them.
    /// Closing twice is harmless.
    pub async fn close(&self) -> Result<(), LinkError> {
        let task = self.task.lock().ok().and_then(|mut t| t.take());
        let Some(mut task) = task else {
            return Ok(());
        };
        self.closing.send_replace(true);
        // The event loop may be blocked on a full queue only while it is connected and working,
        // so this send completes; the timeout guards a wedged connection.
        let _ = tokio::time::timeout(CLOSE_GRACE, self.client.disconnect()).await;
        if tokio::time::timeout(CLOSE_GRACE, &mut task).await.is_err() {
            task.abort();
        }
        Ok(())
    }

    fn closed(&self, operation: &'static str) -> LinkError {
        LinkError::Closed {
            broker: self.broker.clone(),
            operation,
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        if let Ok(mut task) = self.task.lock() {
            if let Some(task) = task.take() {
                task.abort();
            }
        }
    }
}

/// Refuses topics a PUBLISH cannot carry.
fn check_topic(topic: &str) -> Result<(), LinkError> {
    let reason = if topic.is_empty() {
        "empty"
    } else if topic.contains(['+', '#']) {
        "wildcards are for subscriptions"
    } else if topic.contains('\0') {
        "contains NUL"
    } else if topic.len() > u16::MAX as usize {
        "longer than 65535 bytes"
    } else {
        return Ok(());
    };
    Err(LinkError::InvalidTopic {
        topic: topic.to_string(),
        reason,
    })
}

/// Reads the PEM files into rumqttc's rustls configuration.
fn tls_configuration(tls: &TlsConfig) -> Result<TlsConfiguration, LinkError> {
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|source| LinkError::ReadTls {
            path: path.clone(),
            source,
        })
    };
    let ca = read(&tls.ca_file)?;
    let client_auth = match (&tls.client_cert, &tls.client_key) {
        (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
        _ => None,
    };
    Ok(TlsConfiguration::Simple {
        ca,
        alpn: None,
        client_auth,
    })
}

/// The event loop task: polls rumqttc, reports events, reconnects, tracks acknowledgements.
async fn run_event_loop(
    mut eventloop: EventLoop,
    subscriptions: Vec<String>,
    events: mpsc::Sender<LinkEvent>,
    delivery: Arc<Delivery>,
    mut closing: watch::Receiver<bool>,
) {
    let mut connected = false;
    let mut backoff = BACKOFF_START;
    // Packet ids of publishes sent and not yet acknowledged.
    let mut awaiting_ack: HashSet<u16> = HashSet::new();
    // Copies of the publishes rumqttc holds for resending after a connection error; put back if
    // the broker has lost the session (rumqttc then drops them).
    let mut held: Vec<Publish> = Vec::new();
    // Set between a CONNACK and the SUBACK of the subscriptions sent after it.
    let mut awaiting_suback: Option<bool> = None;
    loop {
        let polled = if connected {
            // Connected: a close arrives as a DISCONNECT request; never cancel a write.
            eventloop.poll().await
        } else {
            tokio::select! {
                polled = eventloop.poll() => polled,
                _ = closing.wait_for(|c| *c) => break,
            }
        };
        match polled {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                connected = true;
                backoff = BACKOFF_START;
                tracing::info!(session_present = ack.session_present, "connected");
                if !ack.session_present {
                    // rumqttc dropped the unacknowledged publishes: send them again as new ones.
                    awaiting_ack.clear();
                    for mut publish in held.drain(..) {
                        publish.pkid = 0;
                        publish.dup = false;
                        eventloop.pending.push_back(Request::Publish(publish));
                    }
                }
                held.clear();
                if !subscriptions.is_empty() {
                    let filters = subscriptions
                        .iter()
                        .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
                    // Ahead of any resent publishes, so replies cannot be missed.
                    eventloop
                        .pending
                        .push_front(Request::Subscribe(Subscribe::new_many(filters)));
                }
                if subscriptions.is_empty() {
                    let _ = events
                        .send(LinkEvent::Connected {
                            session_present: ack.session_present,
                        })
                        .await;
                } else {
                    // Report the connection once the subscriptions are in place.
                    awaiting_suback = Some(ack.session_present);
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let event = LinkEvent::Message {
                    topic: publish.topic,
                    payload: publish.payload.to_vec(),
                    retained: publish.retain,
                };
                let _ = events.send(event).await;
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                if awaiting_ack.remove(&ack.pkid) {
                    delivery.acked.send_modify(|n| *n += 1);
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let refused = ack
                    .return_codes
                    .iter()
                    .filter(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                    .count();
                if refused > 0 {
                    tracing::warn!(refused, "the broker refused subscriptions");
                }
                if let Some(session_present) = awaiting_suback.take() {
                    let _ = events.send(LinkEvent::Connected { session_present }).await;
                }
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                awaiting_ack.insert(pkid);
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                tracing::info!("disconnected on request");
                break;
            }
            Ok(_) => {}
            Err(ConnectionError::RequestsDone) => break,
            Err(error) => {
                if *closing.borrow() {
                    break;
                }
                connected = false;
                awaiting_suback = None;
                held = eventloop
                    .pending
                    .iter()
                    .filter_map(|r| match r {
                        Request::Publish(p) => Some(p.clone()),
                        _ => None,
                    })
                    .collect();
                let reason = error.to_string();
                tracing::warn!(%reason, retry_in_ms = backoff.as_millis() as u64, "connection lost");
                let _ = events.send(LinkEvent::Disconnected { reason }).await;
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = closing.wait_for(|c| *c) => break,
                }
                backoff = (backoff * 2).min(BACKOFF_CAP);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid_and_round_trips_through_toml() {
        let cfg = LinkConfig::new("broker.example", 1883, "site-a");
        cfg.validate().expect("defaults are valid");
        let text = toml::to_string(&cfg).expect("serialise");
        let back: LinkConfig = toml::from_str(&text).expect("parse");
        assert_eq!(back, cfg);
        let minimal: LinkConfig =
            toml::from_str("host = \"h\"\nport = 1883\nclient_id = \"s\"\n").expect("parse");
        assert!(!minimal.clean_session, "persistent session by default");
        assert_eq!(minimal.inflight, default_inflight());
    }

    #[test]
    fn validate_names_the_bad_field() {
        let base = LinkConfig::new("h", 1883, "s");
        type Mutation = fn(&mut LinkConfig);
        let cases: Vec<(&str, Mutation)> = vec![
            ("host", |c| c.host = " ".into()),
            ("port", |c| c.port = 0),
            ("client_id", |c| c.client_id.clear()),
            ("keep_alive_s", |c| c.keep_alive_s = 1),
            ("max_packet_bytes", |c| c.max_packet_bytes = 10),
            ("max_packet_bytes", |c| {
                c.max_packet_bytes = MQTT_MAX_PACKET_BYTES + 1
            }),
            ("inflight", |c| c.inflight = 0),
            ("password", |c| c.password = Some("p".into())),
        ];
        for (field, mutate) in cases {
            let mut cfg = base.clone();
            mutate(&mut cfg);
            match cfg.validate() {
                Err(LinkError::InvalidConfig { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: expected InvalidConfig, got {other:?}"),
            }
        }
    }

    #[test]
    fn tls_files_must_exist_and_client_pair_must_be_complete() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, b"-----BEGIN CERTIFICATE-----\n").expect("write");
        let mut cfg = LinkConfig::new("h", 8883, "s");
        cfg.tls = Some(TlsConfig {
            ca_file: dir.path().join("missing.pem"),
            client_cert: None,
            client_key: None,
        });
        assert!(matches!(
            cfg.validate(),
            Err(LinkError::InvalidConfig { field: "tls", .. })
        ));
        cfg.tls = Some(TlsConfig {
            ca_file: ca.clone(),
            client_cert: Some(ca.clone()),
            client_key: None,
        });
        assert!(matches!(
            cfg.validate(),
            Err(LinkError::InvalidConfig { field: "tls", .. })
        ));
        cfg.tls = Some(TlsConfig {
            ca_file: ca.clone(),
            client_cert: None,
            client_key: None,
        });
        cfg.validate().expect("CA alone is enough");
        match tls_configuration(cfg.tls.as_ref().expect("set")) {
            Ok(TlsConfiguration::Simple {
                ca: bytes,
                client_auth: None,
                ..
            }) => {
                assert_eq!(bytes, std::fs::read(&ca).expect("read"))
            }
            _ => panic!("expected the CA bytes in a Simple rustls configuration"),
        }
    }

    #[test]
    fn packet_size_matches_rumqttc_encoding() {
        for (topic, len) in [
            ("t", 0usize),
            ("a/b", 100),
            ("fed/x", 20_000),
            ("x", 3_000_000),
        ] {
            let mut publish = Publish::new(topic, QoS::AtLeastOnce, vec![7u8; len]);
            publish.pkid = 1;
            assert_eq!(
                LinkConfig::publish_packet_bytes(topic, len),
                publish.size(),
                "{topic} {len}"
            );
        }
        let cfg = LinkConfig::new("h", 1, "s");
        let max = cfg.max_payload_bytes("fed/update");
        assert!(LinkConfig::publish_packet_bytes("fed/update", max) <= cfg.max_packet_bytes);
        assert!(LinkConfig::publish_packet_bytes("fed/update", max + 1) > cfg.max_packet_bytes);
    }

    #[test]
    fn topics_with_wildcards_are_refused() {
        assert!(check_topic("fed/model").is_ok());
        for bad in ["", "fed/+", "fed/#"] {
            assert!(
                matches!(check_topic(bad), Err(LinkError::InvalidTopic { .. })),
                "{bad:?}"
            );
        }
    }
}
