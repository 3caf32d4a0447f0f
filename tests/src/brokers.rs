//! Real MQTT brokers for tests: [`Mosquitto`] runs `/usr/sbin/mosquitto` on loopback with its
//! configuration, persistence and log in a temporary directory, on a free port, and kills it when
//! dropped. It can stop and restart on the same port with the same persistence file, so tests can
//! check what survives a broker restart (persistent sessions, retained messages, queued QoS 1
//! messages). Optionally it serves TLS with certificates made by `openssl` in the same directory.
//!
//! Nothing is skipped: without Mosquitto the harness fails with the command that installs it.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::free_port;

/// Where Debian installs the broker.
pub const MOSQUITTO: &str = "/usr/sbin/mosquitto";

/// How long to wait for the broker to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// Certificates for a TLS listener, made by [`TestCa::generate`].
#[derive(Debug, Clone)]
pub struct TestCa {
    /// The self-signed CA certificate (what clients trust).
    pub ca_cert: PathBuf,
    /// The broker's certificate, for `localhost` and `127.0.0.1`, signed by the CA.
    pub server_cert: PathBuf,
    /// The broker's private key.
    pub server_key: PathBuf,
}

impl TestCa {
    /// Makes a CA and a server certificate for `localhost`/`127.0.0.1` in `dir` with `openssl`.
    pub fn generate(dir: &Path) -> Result<TestCa> {
        let ca_key = dir.join("ca.key");
        let ca_cert = dir.join("ca.crt");
        let server_key = dir.join("server.key");
        let server_csr = dir.join("server.csr");
        let server_cert = dir.join("server.crt");
        let ext = dir.join("server.ext");
        std::fs::write(
            &ext,
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n\
             extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )
        .with_context(|| format!("writing {}", ext.display()))?;
        let p = |p: &Path| p.display().to_string();
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=Cosilo test CA",
            "-keyout",
            &p(&ca_key),
            "-out",
            &p(&ca_cert),
        ])?;
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            &p(&server_key),
            "-out",
            &p(&server_csr),
        ])?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            &p(&server_csr),
            "-CA",
            &p(&ca_cert),
            "-CAkey",
            &p(&ca_key),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &p(&ext),
            "-out",
            &p(&server_cert),
        ])?;
        Ok(TestCa {
            ca_cert,
            server_cert,
            server_key,
        })
    }
}

fn openssl(args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .context("running openssl (apt-get install openssl)")?;
    if !out.status.success() {
        bail!(
            "openssl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A Mosquitto broker on 127.0.0.1 for one test. Killed on drop.
pub struct Mosquitto {
    dir: tempfile::TempDir,
    port: u16,
    max_packet_size: usize,
    child: Option<Child>,
}

impl Mosquitto {
    /// Starts Mosquitto on a free loopback port, taking packets up to `max_packet_size` bytes,
    /// with persistence (sessions, retained and queued messages) in its temporary directory.
    pub fn start(max_packet_size: usize) -> Result<Mosquitto> {
        Self::start_with(max_packet_size, None)
    }

    /// Like [`Mosquitto::start`], serving TLS with `tls`'s server certificate when given.
    pub fn start_with(max_packet_size: usize, tls: Option<&TestCa>) -> Result<Mosquitto> {
        if !Path::new(MOSQUITTO).exists() {
            bail!("{MOSQUITTO} not found: install the broker with `apt-get install mosquitto`");
        }
        let dir = tempfile::Builder::new()
            .prefix("cosilo-mosquitto-")
            .tempdir()
            .context("creating the broker's temp dir")?;
        let port = free_port()?;
        let mut conf = format!(
            "listener {port} 127.0.0.1\n\
             allow_anonymous true\n\
             max_packet_size {max_packet_size}\n\
             max_queued_messages 10000\n\
             persistence true\n\
             persistence_location {dir}/\n\
             autosave_interval 1\n\
             autosave_on_changes true\n\
             log_dest file {dir}/mosquitto.log\n\
             log_type error\nlog_type warning\nlog_type notice\nlog_type information\n",
            dir = dir.path().display(),
        );
        if running_as_root() {
            // Mosquitto started by root drops to the `mosquitto` user, which cannot write the
            // temp dir; keep root's identity instead.
            conf.push_str("user root\n");
        }
        if let Some(ca) = tls {
            conf.push_str(&format!(
                "cafile {}\ncertfile {}\nkeyfile {}\n",
                ca.ca_cert.display(),
                ca.server_cert.display(),
                ca.server_key.display()
            ));
        }
        Self::launch(dir, port, max_packet_size, conf)
    }

    /// Starts Mosquitto with a configuration `cosilo federation` wrote (`conf`: its listener on
    /// `port`, TLS, ACL, CRL), adding persistence and the log in a temporary directory.
    pub fn start_provisioned(conf: &Path, port: u16, max_packet_size: usize) -> Result<Mosquitto> {
        if !Path::new(MOSQUITTO).exists() {
            bail!("{MOSQUITTO} not found: install the broker with `apt-get install mosquitto`");
        }
        let dir = tempfile::Builder::new()
            .prefix("cosilo-mosquitto-")
            .tempdir()
            .context("creating the broker's temp dir")?;
        let provisioned =
            std::fs::read_to_string(conf).with_context(|| format!("reading {}", conf.display()))?;
        let mut text = format!(
            "persistence true\n\
             persistence_location {dir}/\n\
             autosave_interval 1\n\
             log_dest file {dir}/mosquitto.log\n\
             log_type error\nlog_type warning\nlog_type notice\nlog_type information\n",
            dir = dir.path().display(),
        );
        if running_as_root() {
            text.push_str("user root\n");
        }
        text.push_str(&provisioned);
        Self::launch(dir, port, max_packet_size, text)
    }

    fn launch(
        dir: tempfile::TempDir,
        port: u16,
        max_packet_size: usize,
        conf: String,
    ) -> Result<Mosquitto> {
        let conf_path = dir.path().join("mosquitto.conf");
        std::fs::write(&conf_path, conf)
            .with_context(|| format!("writing {}", conf_path.display()))?;
        let mut broker = Mosquitto {
            dir,
            port,
            max_packet_size,
            child: None,
        };
        broker.spawn()?;
        Ok(broker)
    }

    fn spawn(&mut self) -> Result<()> {
        let conf = self.dir.path().join("mosquitto.conf");
        let mut child = Command::new(MOSQUITTO)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {MOSQUITTO} -c {}", conf.display()))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().context("polling mosquitto")? {
                let mut stderr = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
                }
                bail!(
                    "mosquitto exited with {status} before listening on {addr}: {stderr}\nlog: {}",
                    self.log()
                );
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                break;
            }
            if started.elapsed() > START_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                bail!("mosquitto did not listen on {addr} within {START_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
        Ok(())
    }

    /// The loopback port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The host to connect to (`localhost` matches the TLS certificate).
    pub fn host(&self) -> &'static str {
        "localhost"
    }

    /// The configured `max_packet_size`.
    pub fn max_packet_size(&self) -> usize {
        self.max_packet_size
    }

    /// The broker's working directory (config, persistence file, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The broker's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    /// Stops the broker gracefully (SIGTERM, so it saves its persistence file) and waits for it.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // SIGTERM through kill(1): std only sends SIGKILL, which skips the final save.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if child.try_wait().context("waiting for mosquitto")?.is_some() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops and starts the broker again on the same port with the same persistence.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.spawn()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}
