//! Hardware guards that act: thermal, memory pressure and GPU readings turned into a
//! [`GuardLevel`] for the [`TrainingGate`].
//!
//! Each guard is a small state machine with hysteresis ([`Hysteresis`]): at or above its
//! `throttle` threshold training throttles, at or above `pause` it parks, and once paused or
//! throttled it only returns to full speed when the reading falls below `resume` (below the
//! throttle threshold), so a reading that hovers at a threshold does not flap. The [`GuardMonitor`]
//! thread reads the machine every `period`, combines the guards (the strictest wins) and sets the
//! gate. A reading that cannot be taken (no thermal zones in a VM, no GPU) leaves that guard idle;
//! it never stops training by itself.
//!
//! GPU readings come from a [`GpuProbe`]: the Jetson sysfs nodes ([`JetsonGpu`], always built:
//! it is plain sysfs), NVML on discrete NVIDIA GPUs (`NvmlGpu`, feature `nvml`, loading
//! `libnvidia-ml.so.1` at run time), and [`NoGpu`], the "not available" stand-in.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::gate::{GuardLevel, TrainingGate};
use crate::{memory, thermal_zones, HardwareError, SysRoot};

/// Thresholds of one guard, in the reading's unit (°C, percent of memory used, GPU load %).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Thresholds {
    /// At or above: throttle.
    pub throttle: f64,
    /// At or above: pause.
    pub pause: f64,
    /// Back to full speed only below this (≤ `throttle`).
    pub resume: f64,
}

impl Thresholds {
    fn validate(&self, name: &str) -> Result<(), String> {
        let ok = [self.throttle, self.pause, self.resume]
            .iter()
            .all(|x| x.is_finite())
            && self.resume <= self.throttle
            && self.throttle <= self.pause;
        if ok {
            Ok(())
        } else {
            Err(format!(
                "{name}: need resume ≤ throttle ≤ pause (finite), got resume {} throttle {} pause {}",
                self.resume, self.throttle, self.pause
            ))
        }
    }
}

/// `[guards]` of a site configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardsConfig {
    /// false: the monitor does not run and training never throttles or pauses for the hardware.
    pub enabled: bool,
    /// Seconds between readings.
    pub period_s: f64,
    /// The speed (fraction of full) a throttled trainer runs at, 0 < f < 1.
    pub throttle_factor: f64,
    /// The hottest thermal zone, °C.
    pub thermal: Thresholds,
    /// Memory in use, percent of total (100 − MemAvailable/MemTotal).
    pub memory: Thresholds,
    /// GPU temperature, °C (when a GPU probe answers).
    pub gpu_temperature: Thresholds,
    /// GPU utilisation, percent (when a GPU probe answers). Someone else's work on the GPU.
    pub gpu_load: Thresholds,
}

impl Default for GuardsConfig {
    fn default() -> Self {
        GuardsConfig {
            enabled: true,
            period_s: 2.0,
            throttle_factor: 0.5,
            thermal: Thresholds {
                throttle: 80.0,
                pause: 90.0,
                resume: 75.0,
            },
            memory: Thresholds {
                throttle: 90.0,
                pause: 95.0,
                resume: 85.0,
            },
            gpu_temperature: Thresholds {
                throttle: 80.0,
                pause: 88.0,
                resume: 75.0,
            },
            gpu_load: Thresholds {
                throttle: 101.0,
                pause: 101.0,
                resume: 101.0,
            },
        }
    }
}

impl GuardsConfig {
    /// Checks the thresholds and the factor; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.period_s.is_finite() && self.period_s > 0.0) {
            return Err(format!("period_s must be > 0, got {}", self.period_s));
        }
        if !(self.throttle_factor > 0.0 && self.throttle_factor < 1.0) {
            return Err(format!(
                "throttle_factor must be in (0, 1), got {}",
                self.throttle_factor
            ));
        }
        self.thermal.validate("thermal")?;
        self.memory.validate("memory")?;
        self.gpu_temperature.validate("gpu_temperature")?;
        self.gpu_load.validate("gpu_load")
    }
}

/// One guard's state: the level it holds and the hysteresis that moves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Hysteresis {
    Normal,
    Throttled,
    Paused,
}

impl Hysteresis {
    /// The next state for a reading.
    pub fn next(self, t: &Thresholds, value: f64) -> Hysteresis {
        if value >= t.pause {
            return Hysteresis::Paused;
        }
        match self {
            _ if value < t.resume => Hysteresis::Normal,
            Hysteresis::Normal if value >= t.throttle => Hysteresis::Throttled,
            Hysteresis::Normal => Hysteresis::Normal,
            // Between resume and pause: a paused guard stays paused, a throttled one throttled.
            s => s,
        }
    }
}

/// A GPU's load and temperature.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GpuReading {
    /// Utilisation, percent.
    pub load_percent: f64,
    pub celsius: f64,
}

/// Where GPU readings come from.
pub trait GpuProbe: Send {
    /// A name for logs ("jetson", "nvml", "none").
    fn name(&self) -> &'static str;
    fn read(&mut self) -> Result<GpuReading, HardwareError>;
}

/// The stand-in on a machine without a supported GPU: every read says so.
#[derive(Debug, Default)]
pub struct NoGpu;

impl GpuProbe for NoGpu {
    fn name(&self) -> &'static str {
        "none"
    }
    fn read(&mut self) -> Result<GpuReading, HardwareError> {
        Err(HardwareError::NotAvailable(
            "no supported GPU (no Jetson GPU nodes; NVML not built in or not found)".into(),
        ))
    }
}

/// NVIDIA Jetson: load from the GPU's per-mille `load` node and temperature from the thermal zone
/// whose type starts with "GPU".
#[derive(Debug, Clone)]
pub struct JetsonGpu {
    root: SysRoot,
    load: String,
}

/// The per-mille GPU load node of Jetson boards (names from public Jetson tooling; not checked on
/// a board here, see docs/DEPENDENCIES.md).
const JETSON_LOAD_NODES: [&str; 4] = [
    "sys/devices/gpu.0/load",
    "sys/devices/platform/gpu.0/load",
    "sys/devices/17000000.gv11b/load",
    "sys/devices/platform/17000000.ga10b/load",
];

impl JetsonGpu {
    /// The probe when the root has a Jetson GPU load node.
    pub fn detect(root: &SysRoot) -> Option<JetsonGpu> {
        JETSON_LOAD_NODES
            .iter()
            .find(|n| root.0.join(n).is_file())
            .map(|n| JetsonGpu {
                root: root.clone(),
                load: n.to_string(),
            })
    }
}

impl GpuProbe for JetsonGpu {
    fn name(&self) -> &'static str {
        "jetson"
    }
    fn read(&mut self) -> Result<GpuReading, HardwareError> {
        let raw = self.root.read(&self.load)?;
        let per_mille: f64 = raw.trim().parse().map_err(|_| HardwareError::Parse {
            path: self.load.clone(),
            what: format!("load {:?} is not a number", raw.trim()),
        })?;
        let zone = thermal_zones(&self.root)?
            .into_iter()
            .find(|z| z.name.to_ascii_uppercase().starts_with("GPU"))
            .ok_or_else(|| HardwareError::NotAvailable("no GPU thermal zone".into()))?;
        Ok(GpuReading {
            load_percent: per_mille / 10.0,
            celsius: zone.celsius,
        })
    }
}

/// The best GPU probe for this machine: Jetson sysfs, then NVML (feature `nvml`), else [`NoGpu`].
pub fn detect_gpu(root: &SysRoot) -> Box<dyn GpuProbe> {
    if let Some(j) = JetsonGpu::detect(root) {
        return Box::new(j);
    }
    #[cfg(feature = "nvml")]
    if let Ok(n) = crate::nvml::NvmlGpu::open() {
        return Box::new(n);
    }
    Box::new(NoGpu)
}

/// What one look at the machine found and decided.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuardReport {
    pub level: GuardLevel,
    /// Why, e.g. "thermal 91.0 ≥ 90.0 (pause)"; empty at full speed.
    pub reason: String,
    pub thermal: Hysteresis,
    pub memory: Hysteresis,
    pub gpu_temperature: Hysteresis,
    pub gpu_load: Hysteresis,
}

/// The guards' combined state machine (no thread: [`GuardMonitor`] runs it).
pub struct Guards {
    cfg: GuardsConfig,
    root: SysRoot,
    gpu: Box<dyn GpuProbe>,
    state: [Hysteresis; 4],
}

impl Guards {
    pub fn new(cfg: GuardsConfig, root: SysRoot, gpu: Box<dyn GpuProbe>) -> Guards {
        Guards {
            cfg,
            root,
            gpu,
            state: [Hysteresis::Normal; 4],
        }
    }

    /// Reads the machine once and moves every guard; the strictest decides.
    pub fn poll(&mut self) -> GuardReport {
        let hottest = thermal_zones(&self.root).ok().and_then(|z| {
            z.iter()
                .map(|z| z.celsius)
                .fold(None, |m: Option<f64>, c| Some(m.map_or(c, |m| m.max(c))))
        });
        let used = memory(&self.root).ok().and_then(|m| {
            (m.total_bytes > 0)
                .then(|| 100.0 * (1.0 - m.available_bytes as f64 / m.total_bytes as f64))
        });
        let gpu = self.gpu.read().ok();
        let readings = [
            ("thermal", "°C", self.cfg.thermal, hottest),
            ("memory", "% used", self.cfg.memory, used),
            (
                "gpu temperature",
                "°C",
                self.cfg.gpu_temperature,
                gpu.map(|g| g.celsius),
            ),
            (
                "gpu load",
                "%",
                self.cfg.gpu_load,
                gpu.map(|g| g.load_percent),
            ),
        ];
        let mut level = GuardLevel::Run;
        let mut reasons = Vec::new();
        for (i, (name, unit, t, value)) in readings.iter().enumerate() {
            let Some(v) = value else { continue };
            self.state[i] = self.state[i].next(t, *v);
            match self.state[i] {
                Hysteresis::Normal => {}
                Hysteresis::Throttled => {
                    reasons.push(format!("{name} {v:.1} {unit} (throttle ≥ {})", t.throttle));
                    if level == GuardLevel::Run {
                        level = GuardLevel::Throttle(self.cfg.throttle_factor);
                    }
                }
                Hysteresis::Paused => {
                    reasons.push(format!(
                        "{name} {v:.1} {unit} (pause ≥ {}, resume < {})",
                        t.pause, t.resume
                    ));
                    level = GuardLevel::Pause;
                }
            }
        }
        GuardReport {
            level,
            reason: reasons.join("; "),
            thermal: self.state[0],
            memory: self.state[1],
            gpu_temperature: self.state[2],
            gpu_load: self.state[3],
        }
    }
}

/// The thread that reads the machine every period and sets the gate. Dropping it (or
/// [`GuardMonitor::stop`]) ends the thread and leaves the gate at full speed.
pub struct GuardMonitor {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl GuardMonitor {
    /// Starts the monitor; with `cfg.enabled == false` nothing runs and the gate is untouched.
    pub fn spawn(
        cfg: GuardsConfig,
        root: SysRoot,
        gpu: Box<dyn GpuProbe>,
        gate: TrainingGate,
    ) -> Result<GuardMonitor, HardwareError> {
        let stop = Arc::new(AtomicBool::new(false));
        if !cfg.enabled {
            return Ok(GuardMonitor { stop, thread: None });
        }
        let period = Duration::from_secs_f64(cfg.period_s);
        let mut guards = Guards::new(cfg, root, gpu);
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("cosilo-guards".into())
            .spawn(move || {
                let mut last: Option<GuardReport> = None;
                while !flag.load(Ordering::SeqCst) {
                    let r = guards.poll();
                    if last.as_ref().map(|l| (l.level, &l.reason)) != Some((r.level, &r.reason)) {
                        gate.set_guard(r.level, r.reason.clone());
                        if last.as_ref().map(|l| l.level) != Some(r.level) {
                            tracing::warn!(level = ?r.level, reason = %r.reason, "hardware guard");
                        }
                    }
                    last = Some(r);
                    std::thread::park_timeout(period);
                }
                gate.set_guard(GuardLevel::Run, "");
            })
            .map_err(|e| {
                HardwareError::NotAvailable(format!("cannot start the guard thread: {e}"))
            })?;
        Ok(GuardMonitor {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

impl Drop for GuardMonitor {
    fn drop(&mut self) {
        self.halt();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::time::Instant;

    fn write(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        // Replace atomically, as the kernel's nodes never show a half-written value.
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(tmp, p).unwrap();
    }

    /// A fake Jetson tree: two thermal zones, meminfo, and the GPU load node.
    fn tree(cpu_c: f64, gpu_c: f64, mem_used_pct: u64, gpu_load_pm: u64) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        set(d.path(), cpu_c, gpu_c, mem_used_pct, gpu_load_pm);
        d
    }

    fn set(p: &Path, cpu_c: f64, gpu_c: f64, mem_used_pct: u64, gpu_load_pm: u64) {
        write(p, "sys/class/thermal/thermal_zone0/type", "CPU-therm\n");
        write(p, "sys/class/thermal/thermal_zone1/type", "GPU-therm\n");
        write(
            p,
            "sys/class/thermal/thermal_zone0/temp",
            &format!("{}\n", (cpu_c * 1000.0) as i64),
        );
        write(
            p,
            "sys/class/thermal/thermal_zone1/temp",
            &format!("{}\n", (gpu_c * 1000.0) as i64),
        );
        let total = 8_000_000u64;
        write(
            p,
            "proc/meminfo",
            &format!(
                "MemTotal: {total} kB\nMemFree: 1 kB\nMemAvailable: {} kB\n",
                total * (100 - mem_used_pct) / 100
            ),
        );
        write(p, "sys/devices/gpu.0/load", &format!("{gpu_load_pm}\n"));
    }

    fn cfg() -> GuardsConfig {
        GuardsConfig {
            period_s: 0.01,
            gpu_load: Thresholds {
                throttle: 60.0,
                pause: 90.0,
                resume: 50.0,
            },
            ..GuardsConfig::default()
        }
    }

    #[test]
    fn hysteresis_throttles_pauses_and_resumes_only_below_resume() {
        let t = Thresholds {
            throttle: 80.0,
            pause: 90.0,
            resume: 75.0,
        };
        let mut s = Hysteresis::Normal;
        let mut seen = Vec::new();
        for v in [70.0, 79.9, 80.0, 85.0, 77.0, 90.0, 85.0, 76.0, 74.9, 79.0] {
            s = s.next(&t, v);
            seen.push(s);
        }
        use Hysteresis::*;
        assert_eq!(
            seen,
            [
                Normal, Normal, Throttled, Throttled, Throttled, Paused, Paused, Paused, Normal,
                Normal
            ]
        );
        assert!(GuardsConfig::default().validate().is_ok());
        let mut bad = GuardsConfig::default();
        bad.thermal.resume = 85.0;
        assert!(bad.validate().unwrap_err().contains("thermal"));
        bad = GuardsConfig {
            throttle_factor: 1.0,
            ..GuardsConfig::default()
        };
        assert!(bad.validate().unwrap_err().contains("throttle_factor"));
    }

    #[test]
    fn each_guard_reads_the_fake_tree() {
        let d = tree(50.0, 50.0, 40, 100);
        let root = SysRoot(d.path().into());
        let gpu = detect_gpu(&root);
        assert_eq!(gpu.name(), "jetson");
        let mut g = Guards::new(cfg(), root, gpu);
        assert_eq!(g.poll().level, GuardLevel::Run);
        set(d.path(), 82.0, 50.0, 40, 100);
        let r = g.poll();
        assert_eq!(r.level, GuardLevel::Throttle(0.5));
        assert_eq!(r.thermal, Hysteresis::Throttled);
        assert!(r.reason.contains("thermal 82.0"), "{}", r.reason);
        set(d.path(), 50.0, 50.0, 96, 100);
        let r = g.poll();
        assert_eq!((r.level, r.memory), (GuardLevel::Pause, Hysteresis::Paused));
        assert_eq!(r.thermal, Hysteresis::Normal);
        set(d.path(), 50.0, 50.0, 88, 100);
        assert_eq!(
            g.poll().level,
            GuardLevel::Pause,
            "88 % is not below resume"
        );
        set(d.path(), 50.0, 50.0, 80, 700);
        let r = g.poll();
        assert_eq!(
            (r.level, r.gpu_load),
            (GuardLevel::Throttle(0.5), Hysteresis::Throttled)
        );
        set(d.path(), 50.0, 89.0, 80, 100);
        let r = g.poll();
        assert_eq!(r.gpu_temperature, Hysteresis::Paused);
        assert!(r.reason.contains("gpu temperature 89.0"), "{}", r.reason);
    }

    #[test]
    fn no_gpu_and_no_zones_leave_training_alone() {
        let d = tempfile::tempdir().unwrap();
        let root = SysRoot(d.path().into());
        let mut gpu = detect_gpu(&root);
        assert_eq!(gpu.name(), "none");
        assert!(matches!(gpu.read(), Err(HardwareError::NotAvailable(_))));
        let mut g = Guards::new(cfg(), root, gpu);
        assert_eq!(g.poll().level, GuardLevel::Run);
    }

    #[test]
    fn monitor_drives_the_gate_as_the_tree_changes() {
        let d = tree(50.0, 50.0, 40, 0);
        let root = SysRoot(d.path().into());
        let gate = TrainingGate::new();
        let mon =
            GuardMonitor::spawn(cfg(), root.clone(), detect_gpu(&root), gate.clone()).unwrap();
        let long = Duration::from_secs(20);
        let wait = |want: GuardLevel| {
            let (st, ok) = gate.wait_for(long, |s| s.guard == want);
            assert!(ok, "gate never reached {want:?}: {st:?}");
            st
        };
        wait(GuardLevel::Run);
        set(d.path(), 85.0, 50.0, 40, 0);
        wait(GuardLevel::Throttle(0.5));
        set(d.path(), 93.0, 50.0, 40, 0);
        let st = wait(GuardLevel::Pause);
        assert!(st.guard_reason.contains("thermal 93.0"), "{st:?}");
        // Cooling to between resume and pause keeps it paused for several periods.
        set(d.path(), 78.0, 50.0, 40, 0);
        let t0 = Instant::now();
        let (_, left) = gate.wait_for(Duration::from_millis(200), |s| s.guard != GuardLevel::Pause);
        assert!(
            !left,
            "left the pause above resume after {:?}",
            t0.elapsed()
        );
        set(d.path(), 70.0, 50.0, 40, 0);
        wait(GuardLevel::Run);
        set(d.path(), 93.0, 50.0, 40, 0);
        wait(GuardLevel::Pause);
        // Stopping the monitor releases the gate.
        mon.stop();
        wait(GuardLevel::Run);

        // Disabled: nothing runs, the gate stays as it is.
        let gate2 = TrainingGate::new();
        let off = GuardsConfig {
            enabled: false,
            ..cfg()
        };
        let _m = GuardMonitor::spawn(off, root.clone(), Box::new(NoGpu), gate2.clone()).unwrap();
        let (_, moved) = gate2.wait_for(Duration::from_millis(100), |s| s.guard != GuardLevel::Run);
        assert!(!moved);
    }
}
