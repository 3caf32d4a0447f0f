//! `cosilo status`: the status page's content at the terminal, read from a running appliance's
//! `/status.json`.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use super::StatusReport;

/// Errors of asking an appliance for its status.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{addr} does not resolve to an address")]
    Address { addr: String },
    #[error("no appliance answers at {addr} (is `cosilo run` running with [status] listen = {addr:?}?): {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("reading from {addr}: {source}")]
    Io {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr} answered something that is not HTTP")]
    NotHttp { addr: String },
    #[error("{addr}{path} answered HTTP {code}")]
    Status {
        addr: String,
        path: String,
        code: u16,
    },
    #[error("{addr}/status.json is not a Cosilo status report: {reason}")]
    Json { addr: String, reason: String },
}

/// `GET path` from `addr` (host:port): the status code and the body.
pub fn get(addr: &str, path: &str) -> Result<(u16, String), ClientError> {
    let sock = addr
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| ClientError::Address {
            addr: addr.to_string(),
        })?;
    let io = |source| ClientError::Io {
        addr: addr.to_string(),
        source,
    };
    let mut s = TcpStream::connect_timeout(&sock, Duration::from_secs(5)).map_err(|source| {
        ClientError::Connect {
            addr: addr.to_string(),
            source,
        }
    })?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(io)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(io)?;
    let text = String::from_utf8_lossy(&raw);
    let not_http = || ClientError::NotHttp {
        addr: addr.to_string(),
    };
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(not_http)?;
    let code: u16 = head
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("HTTP/1."))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(not_http)?;
    Ok((code, body.to_string()))
}

/// The appliance's report from `addr`.
pub fn fetch(addr: &str) -> Result<StatusReport, ClientError> {
    let (code, body) = get(addr, "/status.json")?;
    if code != 200 {
        return Err(ClientError::Status {
            addr: addr.to_string(),
            path: "/status.json".into(),
            code,
        });
    }
    serde_json::from_str(&body).map_err(|e| ClientError::Json {
        addr: addr.to_string(),
        reason: e.to_string(),
    })
}

/// The report as terminal text: the page's content, line by line.
pub fn render_text(r: &StatusReport) -> String {
    use std::fmt::Write as _;
    let f = &r.federation;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "site {} in federation {} ({}): round {} of {}{}, model version {}; cosilo {}, up {} s",
        f.site,
        f.federation,
        f.strategy,
        f.round,
        f.rounds_planned,
        if f.finished { " (finished)" } else { "" },
        f.model_version,
        r.version,
        r.uptime_s
    );
    let _ = writeln!(s, "members:");
    for m in &f.members {
        let _ = writeln!(
            s,
            "  {:<12} {:<16} round {:>4}  version {:>4}  {}",
            if m.me {
                format!("{}*", m.id)
            } else {
                m.id.clone()
            },
            m.status.as_deref().unwrap_or("not heard from"),
            m.round.map_or("–".into(), |x| x.to_string()),
            m.model_version.map_or("–".into(), |x| x.to_string()),
            if m.me {
                "this site".to_string()
            } else {
                m.last_seen_s
                    .map_or("never seen".into(), |x| format!("seen {x:.0} s ago"))
            }
        );
    }
    let dice: Vec<String> = f
        .dice
        .iter()
        .map(|p| format!("r{} {:.3}", p.round, p.score))
        .collect();
    let _ = writeln!(
        s,
        "Dice over rounds: {}",
        if dice.is_empty() {
            "no evaluation yet".to_string()
        } else {
            dice.join("  ")
        }
    );
    let _ = writeln!(
        s,
        "loss {}; sent {} B, received {} B; refused {}",
        f.last_loss.map_or("–".into(), |l| format!("{l:.4}")),
        f.bytes_sent,
        f.bytes_received,
        f.refused.values().sum::<u64>()
    );
    let _ = writeln!(
        s,
        "inference queue {}; outbox pending {} given up {}",
        r.inference_queue,
        r.outbox_pending.map_or("–".into(), |x| x.to_string()),
        r.outbox_dead.map_or("–".into(), |x| x.to_string())
    );
    let temps: Vec<String> = r
        .temperatures
        .iter()
        .map(|t| format!("{} {:.1} °C", t.zone, t.celsius))
        .collect();
    let _ = writeln!(
        s,
        "temperatures: {}",
        if temps.is_empty() {
            "no thermal zones".to_string()
        } else {
            temps.join(", ")
        }
    );
    if let Some(d) = &r.disk {
        let _ = writeln!(
            s,
            "disk: {:.1} GiB free of {:.1} GiB ({})",
            d.free_bytes as f64 / 1_073_741_824.0,
            d.total_bytes as f64 / 1_073_741_824.0,
            d.path
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nobody_listening_is_a_clear_error() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = fetch(&format!("127.0.0.1:{port}")).unwrap_err();
        assert!(matches!(e, ClientError::Connect { .. }), "{e}");
        assert!(e.to_string().contains("no appliance answers"), "{e}");
        assert!(matches!(
            fetch("no-such-host.invalid:1"),
            Err(ClientError::Address { .. })
        ));
    }

    #[test]
    fn the_text_names_members_and_rounds() {
        let mut r = StatusReport::default();
        r.federation.site = "h1".into();
        r.federation.round = 2;
        r.federation.dice = vec![super::super::DicePoint {
            round: 2,
            score: 0.5,
        }];
        let t = render_text(&r);
        assert!(t.contains("site h1"), "{t}");
        assert!(t.contains("r2 0.500"), "{t}");
    }
}
