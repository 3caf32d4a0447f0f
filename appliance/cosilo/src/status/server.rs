//! The status server: a deliberately tiny, read-only HTTP/1.1 server on tokio. `GET` (or `HEAD`)
//! `/` (the page), `/status.json` and `/metrics`; anything else is 404, any other method 405. One
//! request per connection, requests bounded in size and time, connections bounded in number.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::debug;

use super::{page, Board};

/// The largest request head read (request line and headers).
const MAX_REQUEST: usize = 8 * 1024;
/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more wait for a slot.
const MAX_CONNECTIONS: usize = 16;

/// The OpenMetrics text format's content type (Prometheus negotiates it).
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves `board` on `listener` until `shutdown` completes.
pub async fn serve(listener: TcpListener, board: Arc<Board>, shutdown: impl Future<Output = ()>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => return,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                debug!(error = %e, "status server: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let board = board.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, &board).await {
                debug!(%peer, error = %e, "status server: connection failed");
            }
            drop(permit);
        });
    }
}

/// A response: status, content type, body.
struct Response {
    status: &'static str,
    content_type: &'static str,
    body: Vec<u8>,
    allow: bool,
}

fn text(status: &'static str, body: &str) -> Response {
    Response {
        status,
        content_type: "text/plain; charset=utf-8",
        body: body.as_bytes().to_vec(),
        allow: false,
    }
}

/// The response to a request line's method and target.
fn route(method: &str, target: &str, board: &Board) -> Response {
    if method != "GET" && method != "HEAD" {
        return Response {
            allow: true,
            ..text("405 Method Not Allowed", "read-only: GET or HEAD\n")
        };
    }
    let path = target.split(['?', '#']).next().unwrap_or("");
    match path {
        "/" | "/index.html" => Response {
            status: "200 OK",
            content_type: "text/html; charset=utf-8",
            body: page::render(&board.report()).into_bytes(),
            allow: false,
        },
        "/status.json" => Response {
            status: "200 OK",
            content_type: "application/json",
            body: serde_json::to_vec_pretty(&board.report()).unwrap_or_default(),
            allow: false,
        },
        "/metrics" => Response {
            status: "200 OK",
            content_type: OPENMETRICS,
            body: board.metrics_text().into_bytes(),
            allow: false,
        },
        _ => text(
            "404 Not Found",
            "not found: try /, /status.json or /metrics\n",
        ),
    }
}

async fn connection(mut stream: TcpStream, board: &Board) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let head = tokio::time::timeout(READ_TIMEOUT, async {
        let mut chunk = [0u8; 1024];
        loop {
            if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
                return Ok(true);
            }
            if buf.len() >= MAX_REQUEST {
                return Ok(false);
            }
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(!buf.is_empty());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    let response = match head {
        Err(_) => text("408 Request Timeout", "request timed out\n"),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(false)) => text("431 Request Header Fields Too Large", "request too large\n"),
        Ok(Ok(true)) => {
            let line = String::from_utf8_lossy(&buf);
            let first = line.lines().next().unwrap_or("");
            let mut parts = first.split_whitespace();
            match (parts.next(), parts.next(), parts.next()) {
                (Some(m), Some(t), Some(v)) if v.starts_with("HTTP/1.") => {
                    let mut r = route(m, t, board);
                    if m == "HEAD" {
                        let len = r.body.len();
                        r.body.clear();
                        return write(&mut stream, &r, len).await;
                    }
                    r
                }
                _ => text("400 Bad Request", "not an HTTP/1 request\n"),
            }
        }
    };
    let len = response.body.len();
    write(&mut stream, &response, len).await
}

async fn write(stream: &mut TcpStream, r: &Response, len: usize) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {len}\r\nCache-Control: no-store\r\n\
         X-Content-Type-Options: nosniff\r\nConnection: close\r\n",
        r.status, r.content_type
    );
    if r.allow {
        head.push_str("Allow: GET, HEAD\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&r.body).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::super::client;
    use super::super::tests::{board, fake_sysroot};
    use super::*;

    #[test]
    fn serves_page_json_and_metrics_and_refuses_the_rest() {
        let root = fake_sysroot();
        let b = Arc::new(board(root.path(), None));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("binding a loopback port");
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = rt.spawn(serve(listener, b.clone(), async {
            let _ = stopped.await;
        }));
        let get = |path: &str| client::get(&addr.to_string(), path).unwrap();

        let (code, page) = get("/");
        assert_eq!(code, 200);
        assert!(page.contains("<svg id=\"dice-chart\""), "{page}");
        let (code, json) = get("/status.json?x=1");
        assert_eq!(code, 200);
        let report: crate::status::StatusReport = serde_json::from_str(&json).unwrap();
        assert_eq!(report.temperatures.len(), 1);
        let (code, metrics) = get("/metrics");
        assert_eq!(code, 200);
        assert!(metrics.contains("cosilo_temperature_celsius"), "{metrics}");
        assert_eq!(get("/nothing").0, 404);

        // Another method, and a request that is not HTTP.
        let raw = |req: &[u8]| {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.write_all(req).unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        };
        let post = raw(b"POST / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        assert!(post.contains("Allow: GET, HEAD"), "{post}");
        assert!(raw(b"hello\r\n\r\n").starts_with("HTTP/1.1 400"));
        let head = raw(b"HEAD /metrics HTTP/1.1\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(head.ends_with("\r\n\r\n"), "HEAD has no body: {head}");

        stop.send(()).unwrap();
        rt.block_on(server).unwrap();
    }
}
