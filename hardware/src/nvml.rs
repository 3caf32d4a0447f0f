//! NVML (NVIDIA Management Library) readings of a discrete NVIDIA GPU, loaded at run time with
//! `libloading` from the driver's `libnvidia-ml.so.1`, so the binary starts (and takes the
//! [`crate::guard::NoGpu`] path) on a machine without the driver. Feature `nvml`.

use libloading::{Library, Symbol};

use crate::guard::{GpuProbe, GpuReading};
use crate::HardwareError;

type NvmlReturn = i32;
type Device = *mut std::ffi::c_void;

#[repr(C)]
struct Utilization {
    gpu: u32,
    memory: u32,
}

/// `NVML_TEMPERATURE_GPU`.
const TEMPERATURE_GPU: i32 = 0;

/// GPU 0 through NVML.
pub struct NvmlGpu {
    lib: Library,
    device: Device,
}

// SAFETY: NVML is thread-safe (NVIDIA's documentation); the handle is an opaque token.
unsafe impl Send for NvmlGpu {}

fn unavailable(what: impl std::fmt::Display) -> HardwareError {
    HardwareError::NotAvailable(format!("NVML: {what}"))
}

fn check(rc: NvmlReturn, call: &str) -> Result<(), HardwareError> {
    if rc == 0 {
        Ok(())
    } else {
        Err(unavailable(format!("{call} returned {rc}")))
    }
}

impl NvmlGpu {
    /// Loads the library, initialises NVML and opens GPU 0.
    pub fn open() -> Result<NvmlGpu, HardwareError> {
        // SAFETY: loading the driver's NVML runs its initialisers, which are sound to run.
        let lib = unsafe { Library::new("libnvidia-ml.so.1") }.map_err(unavailable)?;
        let mut device: Device = std::ptr::null_mut();
        // SAFETY: the signatures are NVML's documented C ABI.
        unsafe {
            let init: Symbol<unsafe extern "C" fn() -> NvmlReturn> =
                lib.get(b"nvmlInit_v2\0").map_err(unavailable)?;
            check(init(), "nvmlInit_v2")?;
            let by_index: Symbol<unsafe extern "C" fn(u32, *mut Device) -> NvmlReturn> = lib
                .get(b"nvmlDeviceGetHandleByIndex_v2\0")
                .map_err(unavailable)?;
            check(by_index(0, &mut device), "nvmlDeviceGetHandleByIndex_v2")?;
        }
        Ok(NvmlGpu { lib, device })
    }
}

impl GpuProbe for NvmlGpu {
    fn name(&self) -> &'static str {
        "nvml"
    }

    fn read(&mut self) -> Result<GpuReading, HardwareError> {
        let mut util = Utilization { gpu: 0, memory: 0 };
        let mut temp = 0u32;
        // SAFETY: NVML's documented C ABI, with a handle from `open` and valid out-pointers.
        unsafe {
            let utilization: Symbol<unsafe extern "C" fn(Device, *mut Utilization) -> NvmlReturn> =
                self.lib
                    .get(b"nvmlDeviceGetUtilizationRates\0")
                    .map_err(unavailable)?;
            check(
                utilization(self.device, &mut util),
                "nvmlDeviceGetUtilizationRates",
            )?;
            let temperature: Symbol<unsafe extern "C" fn(Device, i32, *mut u32) -> NvmlReturn> =
                self.lib
                    .get(b"nvmlDeviceGetTemperature\0")
                    .map_err(unavailable)?;
            check(
                temperature(self.device, TEMPERATURE_GPU, &mut temp),
                "nvmlDeviceGetTemperature",
            )?;
        }
        Ok(GpuReading {
            load_percent: util.gpu as f64,
            celsius: temp as f64,
        })
    }
}

#[cfg(test)]
mod tests {
    /// On a machine with an NVIDIA driver this reads GPU 0 (run on the GPU machine with
    /// `--features nvml`); elsewhere the open fails with "not available", never a panic.
    #[test]
    fn nvml_reads_or_says_not_available() {
        match super::NvmlGpu::open() {
            Ok(mut g) => {
                use crate::guard::GpuProbe;
                let r = g.read().unwrap();
                println!("nvml: {r:?}");
                assert!((0.0..=100.0).contains(&r.load_percent), "{r:?}");
                assert!(r.celsius > 0.0 && r.celsius < 130.0, "{r:?}");
            }
            Err(e) => {
                println!("nvml: {e}");
                assert!(matches!(e, crate::HardwareError::NotAvailable(_)), "{e}");
            }
        }
    }
}
