//! systemd's service notification protocol (`sd_notify(3)`), written down in a few lines rather
//! than pulled in as a crate.
//!
//! A service started with `Type=notify` finds a datagram socket in `$NOTIFY_SOCKET`: a filesystem
//! path, or an abstract socket when the name starts with `@` (the `@` stands for the leading NUL
//! byte of the Linux abstract namespace). It sends newline-separated `KEY=VALUE` assignments:
//! `READY=1` once it serves, `WATCHDOG=1` at least every `$WATCHDOG_USEC` microseconds when the
//! unit sets `WatchdogSec=`, `STOPPING=1` when it begins to shut down and `STATUS=...` for
//! `systemctl status`. Outside systemd (`$NOTIFY_SOCKET` unset) there is nothing to notify and
//! [`Notifier::from_env`] returns `None`.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Errors of talking to the service manager.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET {0:?} is neither an absolute path nor an abstract name ('@...')")]
    BadAddress(String),
    #[error("cannot use the notification socket {socket}: {source}")]
    Socket {
        socket: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the notification socket {socket} took {sent} of {len} bytes")]
    Short {
        socket: String,
        sent: usize,
        len: usize,
    },
}

/// A connection to the service manager's notification socket.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
    name: String,
}

impl Notifier {
    /// The notifier systemd set up for this process, or `None` when not started by systemd with
    /// `Type=notify` (no `$NOTIFY_SOCKET`).
    pub fn from_env() -> Result<Option<Notifier>, NotifyError> {
        match std::env::var("NOTIFY_SOCKET") {
            Ok(name) if !name.is_empty() => Notifier::connect(&name).map(Some),
            _ => Ok(None),
        }
    }

    /// A notifier for the socket named `name`: an absolute path, or `@name` for an abstract one.
    pub fn connect(name: &str) -> Result<Notifier, NotifyError> {
        let err = |source| NotifyError::Socket {
            socket: name.to_string(),
            source,
        };
        let addr = if let Some(abstract_name) = name.strip_prefix('@') {
            #[cfg(target_os = "linux")]
            {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(abstract_name.as_bytes()).map_err(err)?
            }
            #[cfg(not(target_os = "linux"))]
            {
                let _ = abstract_name;
                return Err(NotifyError::BadAddress(name.to_string()));
            }
        } else if name.starts_with('/') {
            SocketAddr::from_pathname(name).map_err(err)?
        } else {
            return Err(NotifyError::BadAddress(name.to_string()));
        };
        let socket = UnixDatagram::unbound().map_err(err)?;
        Ok(Notifier {
            socket,
            addr,
            name: name.to_string(),
        })
    }

    /// Sends one notification: newline-separated `KEY=VALUE` assignments in one datagram.
    pub fn notify(&self, state: &str) -> Result<(), NotifyError> {
        let sent = self
            .socket
            .send_to_addr(state.as_bytes(), &self.addr)
            .map_err(|source| NotifyError::Socket {
                socket: self.name.clone(),
                source,
            })?;
        if sent != state.len() {
            return Err(NotifyError::Short {
                socket: self.name.clone(),
                sent,
                len: state.len(),
            });
        }
        Ok(())
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: &str) -> Result<(), NotifyError> {
        self.notify(&format!("READY=1\nSTATUS={}", one_line(status)))
    }

    /// `WATCHDOG=1`: still alive.
    pub fn watchdog(&self) -> Result<(), NotifyError> {
        self.notify("WATCHDOG=1")
    }

    /// `STOPPING=1` with a status line.
    pub fn stopping(&self, status: &str) -> Result<(), NotifyError> {
        self.notify(&format!("STOPPING=1\nSTATUS={}", one_line(status)))
    }

    /// `STATUS=...`: what `systemctl status` shows.
    pub fn status(&self, status: &str) -> Result<(), NotifyError> {
        self.notify(&format!("STATUS={}", one_line(status)))
    }
}

/// A status text on one line (a newline would start a new assignment).
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// How often to send `WATCHDOG=1`: half of `$WATCHDOG_USEC` (as `sd_watchdog_enabled(3)`
/// advises), or `None` when the unit has no watchdog or `$WATCHDOG_PID` names another process.
pub fn watchdog_interval() -> Option<Duration> {
    watchdog_interval_from(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

fn watchdog_interval_from(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok()? != me {
            return None;
        }
    }
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    Some(Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recv(socket: &UnixDatagram) -> String {
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 4096];
        let n = socket.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn notifications_reach_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::connect(path.to_str().unwrap()).unwrap();
        n.ready("serving on 127.0.0.1:1\nsecond line").unwrap();
        assert_eq!(
            recv(&server),
            "READY=1\nSTATUS=serving on 127.0.0.1:1 second line"
        );
        n.watchdog().unwrap();
        assert_eq!(recv(&server), "WATCHDOG=1");
        n.stopping("bye").unwrap();
        assert_eq!(recv(&server), "STOPPING=1\nSTATUS=bye");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn notifications_reach_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("cosilo-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        let n = Notifier::connect(&format!("@{name}")).unwrap();
        n.status("round 3").unwrap();
        assert_eq!(recv(&server), "STATUS=round 3");
    }

    #[test]
    fn a_missing_socket_or_bad_name_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nobody-listens");
        let n = Notifier::connect(path.to_str().unwrap()).unwrap();
        assert!(matches!(n.watchdog(), Err(NotifyError::Socket { .. })));
        assert!(matches!(
            Notifier::connect("relative/path"),
            Err(NotifyError::BadAddress(_))
        ));
    }

    #[test]
    fn watchdog_interval_is_half_and_only_for_this_process() {
        assert_eq!(
            watchdog_interval_from(Some("60000000"), None, 7),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            watchdog_interval_from(Some("60000000"), Some("7"), 7),
            Some(Duration::from_secs(30))
        );
        assert_eq!(watchdog_interval_from(Some("60000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval_from(None, None, 7), None);
        assert_eq!(watchdog_interval_from(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval_from(Some("x"), None, 7), None);
    }
}
