//! The embedded MQTT broker (rumqttd 0.20) for zero-setup federations on one machine or one
//! trusted network: [`EmbeddedBroker::start`] serves MQTT 3.1.1 on a TCP address inside this
//! process, with packet limits raised to what weight updates need. Production sites use
//! Mosquitto; this broker exists so a demo or a test needs no outside program.
//!
//! What rumqttd 0.20 does and does not do (checked by `tests/tests/mqtt_link.rs`): it keeps
//! retained messages and persistent sessions (`clean_session = false`: QoS 1 messages published
//! while a site is offline are delivered when it returns), in memory only, so both are lost when
//! the process ends. It cannot report the port it bound, so a request for port 0 is served on a
//! free port picked here first. An undersized packet limit shows up only as a connection reset.
//!
//! Stopping: dropping the [`EmbeddedBroker`] stops its listener and every client connection
//! (they run on a runtime this module owns). rumqttd's router thread has no shutdown and stays
//! parked, idle, until the process exits.
//!
//! Logging: the listener and connections log nowhere unless `RUST_LOG` mentions `rumqttd`; the
//! router thread logs to the global subscriber, which [`LOG_DIRECTIVE`] quiets.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rumqttd::protocol::v4::V4;
use rumqttd::{ConnectionSettings, LinkType, Router, RouterConfig, Server, ServerSettings};
use tokio::sync::oneshot;

/// An `EnvFilter` directive that keeps rumqttd's router messages out of the appliance's log;
/// add it to the default filter when `RUST_LOG` is not set.
pub const LOG_DIRECTIVE: &str = "rumqttd=warn";

/// How long `start` waits for the listener to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the embedded broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The packet limit is unusable.
    #[error("invalid embedded broker packet limit {max_packet_bytes}: {reason}")]
    InvalidLimit {
        /// The limit asked for.
        max_packet_bytes: usize,
        /// Why it cannot be used.
        reason: &'static str,
    },
    /// No free port could be found for a port-0 request.
    #[error("cannot find a free port on {ip}")]
    FreePort {
        /// The address asked for.
        ip: std::net::IpAddr,
        /// The reason.
        source: std::io::Error,
    },
    /// The broker's thread could not be started.
    #[error("cannot start the embedded broker's thread")]
    Thread(#[source] std::io::Error),
    /// The listener could not bind (address in use, no permission).
    #[error("the embedded broker cannot listen on {addr}: {reason}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// rumqttd's reason.
        reason: String,
    },
    /// The listener did not come up in time.
    #[error("the embedded broker on {addr} did not accept connections within {waited:?}")]
    NotReady {
        /// The address.
        addr: SocketAddr,
        /// How long it was given.
        waited: Duration,
    },
}

/// A running rumqttd broker inside this process. Dropping it stops the listener and all
/// connections.
pub struct EmbeddedBroker {
    addr: SocketAddr,
    max_packet_bytes: usize,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl EmbeddedBroker {
    /// Starts a broker on `listen` (port 0: a free port, see [`EmbeddedBroker::addr`]) that takes
    /// packets of up to `max_packet_bytes`, and returns once it accepts TCP connections.
    pub fn start(
        listen: SocketAddr,
        max_packet_bytes: usize,
    ) -> Result<EmbeddedBroker, BrokerError> {
        if max_packet_bytes < 1024 {
            return Err(BrokerError::InvalidLimit {
                max_packet_bytes,
                reason: "below 1024 bytes",
            });
        }
        if max_packet_bytes > crate::link::MQTT_MAX_PACKET_BYTES {
            return Err(BrokerError::InvalidLimit {
                max_packet_bytes,
                reason: "above MQTT's 256 MiB",
            });
        }
        let addr = if listen.port() == 0 {
            let probe = TcpListener::bind(listen).map_err(|source| BrokerError::FreePort {
                ip: listen.ip(),
                source,
            })?;
            probe.local_addr().map_err(|source| BrokerError::FreePort {
                ip: listen.ip(),
                source,
            })?
        } else {
            listen
        };
        // The router keeps each topic's messages in a commit log of segments; one segment must
        // hold the largest message, and a few of them the retained and queued ones.
        let router = RouterConfig {
            max_connections: 1024,
            max_outgoing_packet_count: 200,
            max_segment_size: max_packet_bytes.saturating_mul(2).max(1 << 20),
            max_segment_count: 4,
            ..RouterConfig::default()
        };
        let server = ServerSettings {
            name: "cosilo-embedded".into(),
            listen: addr,
            tls: None,
            next_connection_delay_ms: 1,
            connections: ConnectionSettings {
                connection_timeout_ms: 60_000,
                max_payload_size: max_packet_bytes,
                max_inflight_count: 256,
                auth: None,
                external_auth: None,
                dynamic_filters: true,
            },
        };
        let router_tx = Router::new(0, router).spawn();
        let quiet = !std::env::var("RUST_LOG")
            .map(|v| v.contains("rumqttd"))
            .unwrap_or(false);
        let (shutdown, shutdown_rx) = oneshot::channel::<()>();
        let (failed_tx, mut failed_rx) = oneshot::channel::<String>();
        let thread = std::thread::Builder::new()
            .name("cosilo-broker".into())
            .spawn(move || {
                let serve = move || {
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = failed_tx.send(format!("tokio runtime: {e}"));
                            return;
                        }
                    };
                    runtime.block_on(async move {
                        let mut server = Server::new(server, router_tx, V4);
                        tokio::select! {
                            result = server.start(LinkType::Remote) => {
                                let reason = match result {
                                    Ok(()) => "the listener stopped".to_string(),
                                    Err(e) => e.to_string(),
                                };
                                let _ = failed_tx.send(reason);
                            }
                            _ = shutdown_rx => {}
                        }
                    });
                    // Dropping the runtime here cancels every connection task.
                };
                if quiet {
                    tracing::subscriber::with_default(
                        tracing::subscriber::NoSubscriber::default(),
                        serve,
                    )
                } else {
                    serve()
                }
            })
            .map_err(BrokerError::Thread)?;
        let mut broker = EmbeddedBroker {
            addr,
            max_packet_bytes,
            shutdown: Some(shutdown),
            thread: Some(thread),
        };
        let started = Instant::now();
        loop {
            if let Ok(reason) = failed_rx.try_recv() {
                broker.stop();
                return Err(BrokerError::Bind { addr, reason });
            }
            if answers_mqtt(addr) {
                tracing::info!(%addr, max_packet_bytes, "embedded MQTT broker listening");
                return Ok(broker);
            }
            if started.elapsed() > START_TIMEOUT {
                broker.stop();
                return Err(BrokerError::NotReady {
                    addr,
                    waited: START_TIMEOUT,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The largest packet the broker accepts.
    pub fn max_packet_bytes(&self) -> usize {
        self.max_packet_bytes
    }

    /// Stops the listener and drops every connection; also done on drop.
    pub fn stop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        self.stop();
    }
}

impl std::fmt::Debug for EmbeddedBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBroker")
            .field("addr", &self.addr)
            .field("max_packet_bytes", &self.max_packet_bytes)
            .finish()
    }
}

/// Whether an MQTT broker answers on `addr`: a CONNECT must get a CONNACK that accepts it (a
/// bare TCP accept could be another program holding the port).
fn answers_mqtt(addr: SocketAddr) -> bool {
    const ID: &[u8] = b"cosilo-ready-probe";
    let mut connect = vec![
        0x10,
        (12 + ID.len()) as u8,
        0,
        4,
        b'M',
        b'Q',
        b'T',
        b'T',
        4,
        0x02,
        0,
        10,
    ];
    connect.extend_from_slice(&(ID.len() as u16).to_be_bytes());
    connect.extend_from_slice(ID);
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut connack = [0u8; 4];
    let ok = stream.write_all(&connect).is_ok()
        && stream.read_exact(&mut connack).is_ok()
        && connack == [0x20, 0x02, 0x00, 0x00];
    let _ = stream.write_all(&[0xE0, 0x00]);
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_zero_gets_a_real_port_and_drop_frees_it() {
        let broker =
            EmbeddedBroker::start("127.0.0.1:0".parse().expect("addr"), 64 * 1024).expect("start");
        let addr = broker.addr();
        assert_ne!(addr.port(), 0);
        assert!(TcpStream::connect(addr).is_ok());
        drop(broker);
        // The listener is gone: the port can be bound again.
        TcpListener::bind(addr).expect("port released after drop");
    }

    #[test]
    fn a_taken_port_is_a_bind_error() {
        let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = taken.local_addr().expect("addr");
        match EmbeddedBroker::start(addr, 64 * 1024) {
            Err(BrokerError::Bind { addr: a, .. }) => assert_eq!(a, addr),
            other => panic!("expected a bind error, got {other:?}"),
        }
    }

    #[test]
    fn tiny_limits_are_refused() {
        assert!(matches!(
            EmbeddedBroker::start("127.0.0.1:0".parse().expect("addr"), 10),
            Err(BrokerError::InvalidLimit { .. })
        ));
    }
}
