//! # cosilo-hardware
//!
//! What the Cosilo box is and how it is doing, so that training yields to clinical work and never
//! fills the disk or cooks the box.
//!
//! - [`SysRoot`]: where `/proc` and `/sys` are read from: `/` on the box, a fake tree in tests.
//! - [`memory`], [`cpu`], [`thermal_zones`]: readings from procfs/sysfs.
//! - [`disk`]: free space of the filesystem holding a path (`statvfs`).
//! - [`DiskReserve`]: the guard every writer of bulk data consults before writing.
//! - [`durable`]: durable file writes (write, fsync, rename, fsync the directory), the one home of
//!   the fsync discipline every crate that acknowledges data follows.
//! - [`systemd`]: `sd_notify(3)` readiness, watchdog and stopping notifications to the service
//!   manager (`Type=notify` units), over a Unix datagram socket.
//! - [`clock`]: the wall clock in milliseconds since the Unix epoch, as records store it.
//! - [`error_text`]: an error and its sources as one line, for logs and reasons kept on disk.
//!
//! - [`gate`]: the training gate: clinical work holds it and the guards set it, so training
//!   throttles or parks at a step boundary.
//! - [`guard`]: thermal, memory-pressure and GPU guards with hysteresis, and the monitor thread
//!   that drives the gate from them; GPU readings from the Jetson sysfs nodes, NVML (feature
//!   `nvml`, `nvml` module) or the "not available" stand-in.

pub mod clock;
pub mod durable;
pub mod error_text;
pub mod gate;
pub mod guard;
#[cfg(feature = "nvml")]
pub mod nvml;
pub mod systemd;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Errors reading the machine's state.
#[derive(Debug, thiserror::Error)]
pub enum HardwareError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: unexpected content: {what}")]
    Parse { path: String, what: String },
    #[error("statvfs({path}) failed: {source}")]
    Statvfs {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "not enough disk space at {path}: {available} bytes free, {needed} needed plus a reserve of {reserve}"
    )]
    DiskFull {
        path: String,
        available: u64,
        needed: u64,
        reserve: u64,
    },
    #[error("not available on this machine: {0}")]
    NotAvailable(String),
}

/// The root that `proc/` and `sys/` are read under.
#[derive(Debug, Clone)]
pub struct SysRoot(pub PathBuf);

impl Default for SysRoot {
    fn default() -> Self {
        SysRoot(PathBuf::from("/"))
    }
}

impl SysRoot {
    fn read(&self, rel: &str) -> Result<String, HardwareError> {
        let p = self.0.join(rel);
        std::fs::read_to_string(&p).map_err(|source| HardwareError::Read {
            path: p.display().to_string(),
            source,
        })
    }
}

/// System memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Memory {
    pub total_bytes: u64,
    pub available_bytes: u64,
}

/// Reads `proc/meminfo`.
pub fn memory(root: &SysRoot) -> Result<Memory, HardwareError> {
    let text = root.read("proc/meminfo")?;
    let field = |name: &str| -> Result<u64, HardwareError> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .map(|kib| kib * 1024)
            .ok_or_else(|| HardwareError::Parse {
                path: "proc/meminfo".into(),
                what: format!("no {name} line"),
            })
    };
    Ok(Memory {
        total_bytes: field("MemTotal")?,
        available_bytes: field("MemAvailable")?,
    })
}

/// The processor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cpu {
    pub logical_cores: usize,
    pub model: String,
}

/// Reads `proc/cpuinfo`.
pub fn cpu(root: &SysRoot) -> Result<Cpu, HardwareError> {
    let text = root.read("proc/cpuinfo")?;
    let logical_cores = text.lines().filter(|l| l.starts_with("processor")).count();
    let model = text
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            matches!(k.trim(), "model name" | "Model" | "Hardware").then(|| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    if logical_cores == 0 {
        return Err(HardwareError::Parse {
            path: "proc/cpuinfo".into(),
            what: "no processor entries".into(),
        });
    }
    Ok(Cpu {
        logical_cores,
        model,
    })
}

/// One thermal sensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ThermalZone {
    pub name: String,
    pub celsius: f64,
}

/// Reads every `sys/class/thermal/thermal_zone*` (type and millidegree temperature). A machine
/// without thermal zones (many VMs) gives an empty list.
pub fn thermal_zones(root: &SysRoot) -> Result<Vec<ThermalZone>, HardwareError> {
    let dir = root.0.join("sys/class/thermal");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(Vec::new());
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("thermal_zone"))
        .collect();
    names.sort();
    let mut zones = Vec::new();
    for n in names {
        let rel = format!("sys/class/thermal/{n}/temp");
        let raw = root.read(&rel)?;
        let milli: f64 = raw.trim().parse().map_err(|_| HardwareError::Parse {
            path: rel.clone(),
            what: format!("temperature {:?} is not a number", raw.trim()),
        })?;
        let name = root
            .read(&format!("sys/class/thermal/{n}/type"))
            .map(|s| s.trim().to_string())
            .unwrap_or(n);
        zones.push(ThermalZone {
            name,
            celsius: milli / 1000.0,
        });
    }
    Ok(zones)
}

/// Space on the filesystem holding a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    pub total_bytes: u64,
    /// Bytes an unprivileged writer may still use.
    pub available_bytes: u64,
}

/// `statvfs` of the filesystem holding `path`.
pub fn disk(path: &Path) -> Result<Disk, HardwareError> {
    use std::os::unix::ffi::OsStrExt;
    let c =
        std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| HardwareError::Parse {
            path: path.display().to_string(),
            what: "path contains a NUL byte".into(),
        })?;
    // SAFETY: `c` is a valid NUL-terminated string and `st` a properly sized out-parameter.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(HardwareError::Statvfs {
            path: path.display().to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
    let frsize = st.f_frsize as u64;
    Ok(Disk {
        total_bytes: st.f_blocks as u64 * frsize,
        available_bytes: st.f_bavail as u64 * frsize,
    })
}

/// Refuses writes that would leave less than `reserve_bytes` free on a filesystem, so that the
/// appliance never fills the disk that the rest of the box (logs, the OS, the PACS cache) needs.
#[derive(Debug, Clone)]
pub struct DiskReserve {
    pub path: PathBuf,
    pub reserve_bytes: u64,
}

impl DiskReserve {
    /// Ok when `needed` more bytes fit above the reserve.
    pub fn check(&self, needed: u64) -> Result<Disk, HardwareError> {
        let d = disk(&self.path)?;
        if d.available_bytes < needed.saturating_add(self.reserve_bytes) {
            return Err(HardwareError::DiskFull {
                path: self.path.display().to_string(),
                available: d.available_bytes,
                needed,
                reserve: self.reserve_bytes,
            });
        }
        Ok(d)
    }
}

/// Everything at once, for status pages and logs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    pub cpu: Cpu,
    pub memory: Memory,
    pub thermal: Vec<ThermalZone>,
}

/// Reads a [`Snapshot`].
pub fn snapshot(root: &SysRoot) -> Result<Snapshot, HardwareError> {
    Ok(Snapshot {
        cpu: cpu(root)?,
        memory: memory(root)?,
        thermal: thermal_zones(root)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_root() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        std::fs::create_dir_all(p.join("proc")).unwrap();
        std::fs::write(
            p.join("proc/meminfo"),
            "MemTotal:       8000000 kB\nMemFree:  100 kB\nMemAvailable:   6000000 kB\n",
        )
        .unwrap();
        std::fs::write(
            p.join("proc/cpuinfo"),
            "processor\t: 0\nmodel name\t: ARMv8 Processor rev 1 (v8l)\n\nprocessor\t: 1\n\n",
        )
        .unwrap();
        for (i, (t, v)) in [("CPU-therm", "41500"), ("GPU-therm", "52000")]
            .iter()
            .enumerate()
        {
            let z = p.join(format!("sys/class/thermal/thermal_zone{i}"));
            std::fs::create_dir_all(&z).unwrap();
            std::fs::write(z.join("type"), format!("{t}\n")).unwrap();
            std::fs::write(z.join("temp"), format!("{v}\n")).unwrap();
        }
        d
    }

    #[test]
    fn reads_a_fake_jetson_tree() {
        let d = fake_root();
        let root = SysRoot(d.path().to_path_buf());
        let s = snapshot(&root).unwrap();
        assert_eq!(s.memory.total_bytes, 8_000_000 * 1024);
        assert_eq!(s.memory.available_bytes, 6_000_000 * 1024);
        assert_eq!(s.cpu.logical_cores, 2);
        assert_eq!(s.cpu.model, "ARMv8 Processor rev 1 (v8l)");
        assert_eq!(s.thermal.len(), 2);
        assert_eq!(s.thermal[1].name, "GPU-therm");
        assert!((s.thermal[0].celsius - 41.5).abs() < 1e-9);
    }

    #[test]
    fn malformed_readings_are_errors_naming_the_file() {
        let d = fake_root();
        std::fs::write(
            d.path().join("sys/class/thermal/thermal_zone0/temp"),
            "hot\n",
        )
        .unwrap();
        std::fs::write(d.path().join("proc/meminfo"), "MemTotal: 1 kB\n").unwrap();
        let root = SysRoot(d.path().to_path_buf());
        let e = thermal_zones(&root).unwrap_err().to_string();
        assert!(e.contains("thermal_zone0/temp") && e.contains("hot"), "{e}");
        let e = memory(&root).unwrap_err().to_string();
        assert!(e.contains("MemAvailable"), "{e}");
        assert!(thermal_zones(&SysRoot(d.path().join("nowhere")))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn real_machine_disk_and_reserve() {
        let d = tempfile::tempdir().unwrap();
        let disk = disk(d.path()).unwrap();
        assert!(disk.total_bytes > 0 && disk.available_bytes <= disk.total_bytes);
        let ok = DiskReserve {
            path: d.path().into(),
            reserve_bytes: 0,
        };
        assert!(ok.check(1).is_ok());
        let full = DiskReserve {
            path: d.path().into(),
            reserve_bytes: disk.total_bytes + 1,
        };
        assert!(matches!(full.check(1), Err(HardwareError::DiskFull { .. })));
        assert!(matches!(
            super::disk(Path::new("/definitely/not/here")),
            Err(HardwareError::Statvfs { .. })
        ));
    }
}
