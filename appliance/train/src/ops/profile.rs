//! Opt-in timing of the custom ops' CPU kernels, for profiling a training step.
//!
//! With `COSILO_OP_PROFILE=1` in the environment every kernel call adds its wall time to a
//! per-op total; [`take`] returns and clears the totals. Off, the cost is one relaxed load.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// 0 = not yet read from the environment, 1 = off, 2 = on.
static STATE: AtomicU8 = AtomicU8::new(0);
static TOTALS: Mutex<BTreeMap<&'static str, (Duration, usize)>> = Mutex::new(BTreeMap::new());

fn enabled() -> bool {
    match STATE.load(Ordering::Relaxed) {
        0 => {
            let on = std::env::var_os("COSILO_OP_PROFILE").is_some_and(|v| v != "0");
            STATE.store(if on { 2 } else { 1 }, Ordering::Relaxed);
            on
        }
        s => s == 2,
    }
}

/// Runs `f`, adding its wall time to `name`'s total when profiling is on.
pub(super) fn timed<R>(name: &'static str, f: impl FnOnce() -> R) -> R {
    if !enabled() {
        return f();
    }
    let t0 = Instant::now();
    let r = f();
    let dt = t0.elapsed();
    if let Ok(mut totals) = TOTALS.lock() {
        let e = totals.entry(name).or_default();
        e.0 += dt;
        e.1 += 1;
    }
    r
}

/// `(op, total time, calls)` since the last call, by op name; empty when profiling is off.
pub fn take() -> Vec<(&'static str, Duration, usize)> {
    match TOTALS.lock() {
        Ok(mut totals) => std::mem::take(&mut *totals)
            .into_iter()
            .map(|(k, (d, n))| (k, d, n))
            .collect(),
        Err(_) => Vec::new(),
    }
}
