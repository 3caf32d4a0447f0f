//! A real Orthanc PACS for tests: [`Orthanc::start`] writes a config into a temp dir (storage,
//! index, free DICOM and HTTP ports, one modality entry for the system under test), starts
//! `/usr/sbin/Orthanc` (or `ORTHANC_BIN`), waits for its REST API, and kills it on drop. REST calls go
//! through `curl`, so the harness adds no HTTP crate.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::net::TcpListener;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

/// Re-exported where the Orthanc tests have always found it.
/// A free TCP port on loopback (bound, read, released), for servers that cannot listen on port 0
/// and report it.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(listener
        .local_addr()
        .context("reading the bound port")?
        .port())
}

/// A running Orthanc; killed on drop.
pub struct Orthanc {
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// Orthanc's AE title.
    pub aet: String,
    pub dicom_port: u16,
    pub http_port: u16,
}

fn orthanc_bin() -> String {
    std::env::var("ORTHANC_BIN").unwrap_or_else(|_| "/usr/sbin/Orthanc".into())
}

impl Orthanc {
    /// Starts Orthanc (AE `ORTHANC`) knowing one modality `cosilo` = (`modality_ae`, 127.0.0.1,
    /// `modality_port`), the destination of its C-MOVEs and C-STOREs.
    pub fn start(modality_ae: &str, modality_port: u16) -> Result<Orthanc> {
        let bin = orthanc_bin();
        if !Path::new(&bin).exists() {
            bail!("Orthanc not found at {bin}: install it with `apt-get install orthanc` (or set ORTHANC_BIN)");
        }
        let dir = tempfile::tempdir()?;
        let mut o = Orthanc {
            child: None,
            dir,
            aet: "ORTHANC".into(),
            dicom_port: free_port()?,
            http_port: free_port()?,
        };
        let config = serde_json::json!({
            "Name": "cosilo-test",
            "StorageDirectory": o.dir.path().join("storage"),
            "IndexDirectory": o.dir.path().join("index"),
            "DicomAet": o.aet,
            "DicomPort": o.dicom_port,
            "HttpPort": o.http_port,
            "RemoteAccessAllowed": false,
            "AuthenticationEnabled": false,
            "DicomCheckCalledAet": false,
            "DicomAlwaysAllowEcho": true,
            "DicomAlwaysAllowStore": true,
            "DicomAlwaysAllowFind": true,
            "DicomAlwaysAllowMove": true,
            "DicomModalities": { "cosilo": [modality_ae, "127.0.0.1", modality_port] },
            "Plugins": [],
            "HttpTimeout": 30,
            "DicomScuTimeout": 10,
        });
        std::fs::write(o.config_path(), serde_json::to_vec_pretty(&config)?)?;
        o.launch()?;
        Ok(o)
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("orthanc.json")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("orthanc.log")
    }

    /// The last lines of Orthanc's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn launch(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let child = Command::new(orthanc_bin())
            .arg(self.config_path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", orthanc_bin()))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.get("/system").is_ok() {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    bail!("Orthanc exited with {status}:\n{}", self.log_tail());
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "Orthanc did not answer /system within 30 s:\n{}",
            self.log_tail()
        )
    }

    /// `host:port` of its DICOM port.
    pub fn dicom_addr(&self) -> String {
        format!("127.0.0.1:{}", self.dicom_port)
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.http_port, path)
    }

    fn curl(&self, args: &[&str]) -> Result<Value> {
        let out = Command::new("curl")
            .args(["-sS", "--fail-with-body", "--max-time", "60"])
            .args(args)
            .output()
            .context("running curl (apt-get install curl)")?;
        if !out.status.success() {
            bail!(
                "curl {:?} failed: {}{}",
                args,
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        if out.stdout.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&out.stdout).map_err(|e| anyhow!("Orthanc answered non-JSON: {e}"))
    }

    /// GET a REST path (e.g. `/studies`).
    pub fn get(&self, path: &str) -> Result<Value> {
        self.curl(&[&self.url(path)])
    }

    /// POST a JSON body to a REST path.
    pub fn post_json(&self, path: &str, body: &Value) -> Result<Value> {
        let body = body.to_string();
        self.curl(&[
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            &body,
            &self.url(path),
        ])
    }

    /// Uploads a DICOM file (POST /instances); returns Orthanc's instance id.
    pub fn upload(&self, file: &Path) -> Result<String> {
        let at = format!("@{}", file.display());
        let v = self.curl(&[
            "-X",
            "POST",
            "-H",
            "Content-Type: application/dicom",
            "--data-binary",
            &at,
            &self.url("/instances"),
        ])?;
        v["ID"]
            .as_str()
            .map(String::from)
            .ok_or_else(|| anyhow!("no ID in upload answer {v}"))
    }

    /// Orthanc ids of all instances.
    pub fn instances(&self) -> Result<Vec<String>> {
        ids(self.get("/instances")?)
    }

    /// Orthanc ids of all series.
    pub fn series(&self) -> Result<Vec<String>> {
        ids(self.get("/series")?)
    }

    /// Orthanc ids of all studies.
    pub fn studies(&self) -> Result<Vec<String>> {
        ids(self.get("/studies")?)
    }

    /// The SOP instance UIDs stored (via /instances?expand).
    pub fn sop_instance_uids(&self) -> Result<Vec<String>> {
        let v = self.get("/instances?expand")?;
        let arr = v.as_array().ok_or_else(|| anyhow!("not an array: {v}"))?;
        Ok(arr
            .iter()
            .filter_map(|i| {
                i["MainDicomTags"]["SOPInstanceUID"]
                    .as_str()
                    .map(String::from)
            })
            .collect())
    }

    /// Kills Orthanc (storage is kept; [`Orthanc::restart`] brings it back on the same ports).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts a stopped Orthanc again with the same config and storage.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.launch()
    }
}

fn ids(v: Value) -> Result<Vec<String>> {
    let arr = v.as_array().ok_or_else(|| anyhow!("not an array: {v}"))?;
    Ok(arr
        .iter()
        .filter_map(|x| x.as_str().map(String::from))
        .collect())
}

impl Drop for Orthanc {
    fn drop(&mut self) {
        self.stop();
    }
}
