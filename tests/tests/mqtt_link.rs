//! The MQTT link against both brokers Cosilo supports: Mosquitto (started here on loopback) and
//! the embedded rumqttd. Large payloads, the link's own size check, retained messages,
//! persistent sessions, reconnection after a broker restart, and TLS with a CA made by openssl.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cosilo_federation::broker::EmbeddedBroker;
use cosilo_federation::link::{connect, Link, LinkConfig, LinkError, LinkEvent, TlsConfig};
use cosilo_tests::brokers::{Mosquitto, TestCa};
use tokio::sync::mpsc::Receiver;

/// Longest wait for any one expected event.
const WAIT: Duration = Duration::from_secs(20);

/// One of the two brokers, started for one test.
enum TestBroker {
    Mosquitto(Mosquitto),
    Embedded(EmbeddedBroker),
}

impl TestBroker {
    fn mosquitto(max_packet: usize) -> Result<Self> {
        Ok(Self::Mosquitto(Mosquitto::start(max_packet)?))
    }

    fn embedded(max_packet: usize) -> Result<Self> {
        let addr: SocketAddr = "127.0.0.1:0".parse()?;
        Ok(Self::Embedded(EmbeddedBroker::start(addr, max_packet)?))
    }

    fn port(&self) -> u16 {
        match self {
            Self::Mosquitto(m) => m.port(),
            Self::Embedded(e) => e.addr().port(),
        }
    }

    fn config(&self, client_id: &str, max_packet: usize) -> LinkConfig {
        let mut cfg = LinkConfig::new("127.0.0.1", self.port(), client_id);
        cfg.max_packet_bytes = max_packet;
        cfg
    }
}

/// Deterministic bytes that no compression or pattern could fake.
fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Waits for the next `Connected`, returning `session_present`.
async fn connected(events: &mut Receiver<LinkEvent>) -> Result<bool> {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.recv()).await {
            Ok(Some(LinkEvent::Connected { session_present })) => return Ok(session_present),
            Ok(Some(_)) => continue,
            Ok(None) => bail!("link closed while waiting for Connected"),
            Err(_) => bail!("no Connected within {WAIT:?}"),
        }
    }
}

/// Waits for the next `Disconnected`, returning its reason.
async fn disconnected(events: &mut Receiver<LinkEvent>) -> Result<String> {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.recv()).await {
            Ok(Some(LinkEvent::Disconnected { reason })) => return Ok(reason),
            Ok(Some(_)) => continue,
            Ok(None) => bail!("link closed while waiting for Disconnected"),
            Err(_) => bail!("no Disconnected within {WAIT:?}"),
        }
    }
}

/// Waits for the next message: `(topic, payload, retained)`.
async fn message(
    events: &mut Receiver<LinkEvent>,
    wait: Duration,
) -> Result<(String, Vec<u8>, bool)> {
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.recv()).await {
            Ok(Some(LinkEvent::Message {
                topic,
                payload,
                retained,
            })) => return Ok((topic, payload, retained)),
            Ok(Some(_)) => continue,
            Ok(None) => bail!("link closed while waiting for a message"),
            Err(_) => bail!("no message within {wait:?}"),
        }
    }
}

async fn connected_link(
    cfg: &LinkConfig,
    subscriptions: &[&str],
) -> Result<(Link, Receiver<LinkEvent>, bool)> {
    let subs = subscriptions.iter().map(|s| s.to_string()).collect();
    let (link, mut events) = connect(cfg, subs, None).await?;
    let session_present = connected(&mut events)
        .await
        .with_context(|| format!("{} connecting to port {}", cfg.client_id, cfg.port))?;
    Ok((link, events, session_present))
}

// ---------------------------------------------------------------------------------------------
// 20 MB through the broker

const BIG: usize = 20 * 1024 * 1024;
const BIG_LIMIT: usize = 32 * 1024 * 1024;

async fn twenty_megabytes(broker: TestBroker) -> Result<()> {
    let (sub, mut sub_events, _) =
        connected_link(&broker.config("big-sub", BIG_LIMIT), &["fed/big"]).await?;
    let (publisher, _pub_events, _) =
        connected_link(&broker.config("big-pub", BIG_LIMIT), &[]).await?;
    let payload = pseudo_random(BIG, 42);
    let started = Instant::now();
    publisher
        .publish_and_confirm("fed/big", payload.clone(), false)
        .await?;
    assert_eq!(publisher.unacknowledged(), 0);
    let (topic, got, retained) = message(&mut sub_events, WAIT).await?;
    let took = started.elapsed();
    assert_eq!(topic, "fed/big");
    assert!(!retained);
    assert_eq!(got.len(), payload.len());
    assert!(got == payload, "payload corrupted in transit");
    eprintln!("20 MiB publish-to-delivery: {took:?}");
    publisher.close().await?;
    sub.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_megabytes_through_mosquitto() -> Result<()> {
    twenty_megabytes(TestBroker::mosquitto(BIG_LIMIT)?).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_megabytes_through_embedded_broker() -> Result<()> {
    twenty_megabytes(TestBroker::embedded(BIG_LIMIT)?).await
}

// ---------------------------------------------------------------------------------------------
// A payload over the link's limit is refused before it is sent; the largest allowed one passes.

const SMALL_LIMIT: usize = 64 * 1024;

async fn oversized_is_refused(broker: TestBroker) -> Result<()> {
    let cfg = broker.config("limit-pub", SMALL_LIMIT);
    let (sub, mut sub_events, _) =
        connected_link(&broker.config("limit-sub", SMALL_LIMIT), &["fed/limit"]).await?;
    let (publisher, _pub_events, _) = connected_link(&cfg, &[]).await?;

    let max = cfg.max_payload_bytes("fed/limit");
    match publisher
        .publish("fed/limit", vec![1u8; max + 1], false)
        .await
    {
        Err(LinkError::PayloadTooLarge {
            packet_bytes,
            max_packet_bytes,
            ..
        }) => {
            assert_eq!(max_packet_bytes, SMALL_LIMIT);
            assert!(packet_bytes > SMALL_LIMIT);
        }
        other => bail!("expected PayloadTooLarge, got {other:?}"),
    }
    assert_eq!(
        publisher.unacknowledged(),
        0,
        "a refused publish must not count"
    );

    // The link is unharmed, and the largest payload that fits gets through whole.
    let fits = pseudo_random(max, 7);
    publisher
        .publish_and_confirm("fed/limit", fits.clone(), false)
        .await?;
    let (_, got, _) = message(&mut sub_events, WAIT).await?;
    assert!(got == fits, "largest allowed payload corrupted");
    // Nothing else (the refused one) follows.
    assert!(message(&mut sub_events, Duration::from_millis(500))
        .await
        .is_err());
    publisher.close().await?;
    sub.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_payload_is_refused_by_the_link_with_mosquitto() -> Result<()> {
    oversized_is_refused(TestBroker::mosquitto(SMALL_LIMIT)?).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_payload_is_refused_by_the_link_with_embedded_broker() -> Result<()> {
    oversized_is_refused(TestBroker::embedded(SMALL_LIMIT)?).await
}

// ---------------------------------------------------------------------------------------------
// Retained "latest model" announcement reaches a site that subscribes later.

async fn retained_for_late_subscriber(broker: TestBroker) -> Result<()> {
    let (publisher, _pub_events, _) =
        connected_link(&broker.config("ret-pub", SMALL_LIMIT), &[]).await?;
    let announcement = pseudo_random(3000, 3);
    publisher
        .publish_and_confirm("fed/model/latest", announcement.clone(), true)
        .await?;
    publisher.close().await?;

    let (late, mut late_events) = connect(
        &broker.config("ret-late", SMALL_LIMIT),
        vec!["fed/model/+".into()],
        None,
    )
    .await?;
    let (topic, got, retained) = message(&mut late_events, WAIT).await?;
    assert_eq!(topic, "fed/model/latest");
    assert!(retained, "a late subscriber must see the retained flag");
    assert_eq!(got, announcement);
    late.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_message_reaches_late_subscriber_through_mosquitto() -> Result<()> {
    retained_for_late_subscriber(TestBroker::mosquitto(SMALL_LIMIT)?).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_message_reaches_late_subscriber_through_embedded_broker() -> Result<()> {
    retained_for_late_subscriber(TestBroker::embedded(SMALL_LIMIT)?).await
}

// ---------------------------------------------------------------------------------------------
// Persistent session: messages published while a site is offline wait for it.

async fn offline_site_gets_queued_messages(broker: TestBroker) -> Result<()> {
    let sub_cfg = broker.config("site-offline", SMALL_LIMIT);
    assert!(!sub_cfg.clean_session, "persistent session is the default");
    let (sub, sub_events, _) = connected_link(&sub_cfg, &["fed/queue"]).await?;
    sub.close().await?;
    drop((sub, sub_events));

    let (publisher, _pub_events, _) =
        connected_link(&broker.config("queue-pub", SMALL_LIMIT), &[]).await?;
    let sent: Vec<Vec<u8>> = (0..3u64)
        .map(|i| pseudo_random(1000 + i as usize, i + 100))
        .collect();
    for payload in &sent {
        publisher
            .publish("fed/queue", payload.clone(), false)
            .await?;
    }
    publisher.flush().await?;
    publisher.close().await?;

    let (sub, mut sub_events) = connect(&sub_cfg, vec!["fed/queue".into()], None).await?;
    let mut got = Vec::new();
    let mut session_present = None;
    let deadline = Instant::now() + WAIT;
    while got.len() < sent.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, sub_events.recv()).await {
            Ok(Some(LinkEvent::Message { payload, .. })) => got.push(payload),
            Ok(Some(LinkEvent::Connected { session_present: p })) => session_present = Some(p),
            Ok(Some(LinkEvent::Disconnected { reason })) => eprintln!("disconnected: {reason}"),
            Ok(None) => bail!("link closed"),
            Err(_) => bail!(
                "got {} of {} queued messages within {WAIT:?}",
                got.len(),
                sent.len()
            ),
        }
    }
    assert_eq!(got, sent, "queued messages missing or out of order");
    let session_present = match session_present {
        Some(p) => p,
        None => connected(&mut sub_events).await?,
    };
    assert!(
        session_present,
        "the broker should have resumed the session"
    );
    sub.close().await?;

    // Control: a clean-session site that was offline gets nothing of what it missed.
    let mut forgetful_cfg = broker.config("site-forgetful", SMALL_LIMIT);
    forgetful_cfg.clean_session = true;
    let (forgetful, _events, _) = connected_link(&forgetful_cfg, &["fed/queue"]).await?;
    forgetful.close().await?;
    let (publisher, _pub_events, _) =
        connected_link(&broker.config("queue-pub", SMALL_LIMIT), &[]).await?;
    publisher
        .publish_and_confirm("fed/queue", sent[0].clone(), false)
        .await?;
    publisher.close().await?;
    let (forgetful, mut events, session_present) =
        connected_link(&forgetful_cfg, &["fed/queue"]).await?;
    assert!(!session_present);
    assert!(
        message(&mut events, Duration::from_millis(1000))
            .await
            .is_err(),
        "a clean session must not receive what was published while it was away"
    );
    forgetful.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_session_queues_messages_with_mosquitto() -> Result<()> {
    offline_site_gets_queued_messages(TestBroker::mosquitto(SMALL_LIMIT)?).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_session_queues_messages_with_embedded_broker() -> Result<()> {
    offline_site_gets_queued_messages(TestBroker::embedded(SMALL_LIMIT)?).await
}

// ---------------------------------------------------------------------------------------------
// Broker restarts.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_reconnects_after_mosquitto_restart() -> Result<()> {
    let mut mosquitto = Mosquitto::start(SMALL_LIMIT)?;
    let cfg = |id: &str| {
        let mut c = LinkConfig::new("127.0.0.1", mosquitto.port(), id);
        c.max_packet_bytes = SMALL_LIMIT;
        c
    };
    let (sub, mut sub_events, _) = connected_link(&cfg("restart-sub"), &["fed/after"]).await?;
    let (publisher, mut pub_events, _) = connected_link(&cfg("restart-pub"), &[]).await?;

    mosquitto.restart()?;
    disconnected(&mut sub_events).await?;
    let resumed = connected(&mut sub_events).await?;
    assert!(
        resumed,
        "mosquitto's persistence should keep the session over a restart"
    );
    connected(&mut pub_events).await?;

    let payload = pseudo_random(5000, 9);
    publisher
        .publish_and_confirm("fed/after", payload.clone(), false)
        .await?;
    let (topic, got, _) = message(&mut sub_events, WAIT).await?;
    assert_eq!(topic, "fed/after");
    assert_eq!(got, payload);
    publisher.close().await?;
    sub.close().await?;
    Ok(())
}

/// A publish made while the broker is down is not lost: `flush` waits, and completes once the
/// broker is back and has acknowledged it; the subscriber then receives it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_while_broker_down_is_confirmed_after_it_returns() -> Result<()> {
    let mut mosquitto = Mosquitto::start(SMALL_LIMIT)?;
    let cfg = |id: &str| {
        let mut c = LinkConfig::new("127.0.0.1", mosquitto.port(), id);
        c.max_packet_bytes = SMALL_LIMIT;
        c
    };
    let (sub, mut sub_events, _) = connected_link(&cfg("down-sub"), &["fed/down"]).await?;
    let (publisher, mut pub_events, _) = connected_link(&cfg("down-pub"), &[]).await?;

    mosquitto.stop()?;
    disconnected(&mut pub_events).await?;
    let payload = pseudo_random(2000, 11);
    publisher
        .publish("fed/down", payload.clone(), false)
        .await?;
    assert_eq!(publisher.unacknowledged(), 1);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), publisher.flush())
            .await
            .is_err(),
        "flush must not report delivery while the broker is down"
    );

    mosquitto.restart()?;
    tokio::time::timeout(WAIT, publisher.flush())
        .await
        .context("flush after the broker returned")??;
    assert_eq!(publisher.unacknowledged(), 0);
    let (_, got, _) = message(&mut sub_events, WAIT).await?;
    assert_eq!(got, payload);
    publisher.close().await?;
    sub.close().await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// TLS with a CA made by openssl.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_link_to_mosquitto_with_test_ca() -> Result<()> {
    let certs = tempfile::tempdir()?;
    let ca = TestCa::generate(certs.path())?;
    let mosquitto = Mosquitto::start_with(SMALL_LIMIT, Some(&ca))?;
    let cfg = |id: &str, ca_file| {
        let mut c = LinkConfig::new(mosquitto.host(), mosquitto.port(), id);
        c.max_packet_bytes = SMALL_LIMIT;
        c.tls = Some(TlsConfig {
            ca_file,
            client_cert: None,
            client_key: None,
        });
        c
    };
    let (sub, mut sub_events, _) =
        connected_link(&cfg("tls-sub", ca.ca_cert.clone()), &["fed/tls"]).await?;
    let (publisher, _pub_events, _) =
        connected_link(&cfg("tls-pub", ca.ca_cert.clone()), &[]).await?;
    let payload = pseudo_random(40_000, 13);
    publisher
        .publish_and_confirm("fed/tls", payload.clone(), false)
        .await?;
    let (_, got, _) = message(&mut sub_events, WAIT).await?;
    assert_eq!(got, payload);
    publisher.close().await?;
    sub.close().await?;

    // A client trusting a different CA refuses the broker.
    let other_dir = tempfile::tempdir()?;
    let other = TestCa::generate(other_dir.path())?;
    let (stranger, mut stranger_events) =
        connect(&cfg("tls-stranger", other.ca_cert.clone()), vec![], None).await?;
    let reason = disconnected(&mut stranger_events).await?;
    eprintln!("untrusted broker: {reason}");
    assert!(
        reason.to_lowercase().contains("certificate") || reason.to_lowercase().contains("tls"),
        "unexpected failure for an untrusted broker: {reason}"
    );
    drop(stranger);
    Ok(())
}

/// The embedded broker keeps sessions in memory only: a new one on the same address knows no
/// session. A publish still unacknowledged when the old one went away (rumqttc then drops it) is
/// sent again by the link, so `flush` completes and a subscriber gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_publish_survives_embedded_broker_replacement() -> Result<()> {
    let first = EmbeddedBroker::start("127.0.0.1:0".parse()?, BIG_LIMIT)?;
    let addr = first.addr();
    let mut cfg = LinkConfig::new("127.0.0.1", addr.port(), "replace-pub");
    cfg.max_packet_bytes = BIG_LIMIT;
    let (publisher, mut pub_events, _) = connected_link(&cfg, &[]).await?;

    // Large enough that its PUBACK is unlikely to be back when the broker disappears.
    let payload = pseudo_random(8 * 1024 * 1024, 17);
    publisher
        .publish("fed/model/latest", payload.clone(), true)
        .await?;
    drop(first);
    disconnected(&mut pub_events).await?;

    let second = EmbeddedBroker::start(addr, BIG_LIMIT)?;
    let session_present = connected(&mut pub_events).await?;
    assert!(
        !session_present,
        "a new embedded broker cannot know the old session"
    );
    tokio::time::timeout(WAIT, publisher.flush())
        .await
        .context("flush after the broker was replaced")??;

    let mut sub_cfg = LinkConfig::new("127.0.0.1", second.addr().port(), "replace-sub");
    sub_cfg.max_packet_bytes = BIG_LIMIT;
    let (sub, mut sub_events) = connect(&sub_cfg, vec!["fed/model/latest".into()], None).await?;
    let (_, got, retained) = message(&mut sub_events, WAIT).await?;
    assert!(retained);
    assert!(got == payload, "the resent update differs");
    sub.close().await?;
    publisher.close().await?;
    Ok(())
}
