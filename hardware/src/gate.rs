//! The training gate: how training yields to clinical work and to the box's health.
//!
//! Training is the appliance's background job. Two kinds of things make it give way:
//!
//! - **Holders**: clinical work (an inference job queued or running) takes a [`GateHold`]; while at
//!   least one exists, training parks at its next step boundary. Holds are counted, so two jobs
//!   overlapping keep training parked until both are done.
//! - **Guards** (thermal, memory, GPU; see [`crate::guard`]) set a [`GuardLevel`]: run, throttle
//!   (idle between steps so the step rate falls to a fraction), or pause.
//!
//! The trainer calls [`TrainingGate::boundary`] between steps with the step it has reached. The
//! call returns at once when nothing holds the gate, sleeps off the throttle, or parks (blocking
//! the trainer's own thread, never an async worker) until the last hold is released and the guards
//! allow running again. Parking happens *between* steps, so nothing of the training state is lost:
//! a paused run continues on exactly the trajectory of an uninterrupted one.
//!
//! Pause latency is counted in steps: a hold taken while the trainer is past boundary `b` is
//! honoured at boundary `b + 1` at the latest (the step in progress finishes; no further step
//! starts). [`GateStatus::last_pause_latency_steps`] records it for each pause, and the counters
//! in [`GateStatus`] are what a metrics endpoint exports.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// What the guards allow training to do.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum GuardLevel {
    /// Full speed.
    Run,
    /// Run at this fraction of full speed (0 < f < 1): the trainer idles `(1/f − 1) ×` the last
    /// step's duration after each step.
    Throttle(f64),
    /// Park at the next step boundary.
    Pause,
}

/// A snapshot of the gate, for logs, tests and a metrics endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateStatus {
    /// Clinical jobs holding the gate now.
    pub holders: usize,
    /// The guards' current decision.
    pub guard: GuardLevel,
    /// Why the guards decided it (e.g. "thermal 87.0 °C ≥ 85.0 °C"); empty when running.
    pub guard_reason: String,
    /// True while the trainer is parked at a boundary.
    pub parked: bool,
    /// The last step boundary the trainer reported.
    pub boundary: u64,
    /// How many times the trainer parked.
    pub pauses: u64,
    /// How many of those pauses holders (clinical work) caused.
    pub clinical_pauses: u64,
    /// Total time parked.
    pub parked_seconds: f64,
    /// Total time idled by throttling.
    pub throttled_seconds: f64,
    /// Steps between the request and the park, for the last pause (0 or 1 when honoured in time).
    pub last_pause_latency_steps: Option<u64>,
    /// The largest such latency seen.
    pub max_pause_latency_steps: Option<u64>,
}

#[derive(Debug)]
struct State {
    holders: usize,
    guard: GuardLevel,
    guard_reason: String,
    parked: bool,
    boundary: u64,
    /// The boundary the trainer had reached when the current pause was first requested.
    pause_requested_at: Option<u64>,
    pauses: u64,
    clinical_pauses: u64,
    parked_time: Duration,
    throttled: Duration,
    last_latency: Option<u64>,
    max_latency: Option<u64>,
}

impl State {
    fn must_park(&self) -> bool {
        self.holders > 0 || self.guard == GuardLevel::Pause
    }

    /// Remembers the boundary at which a pause was first asked for, to measure its latency.
    fn note_request(&mut self) {
        if self.must_park() && self.pause_requested_at.is_none() && !self.parked {
            self.pause_requested_at = Some(self.boundary);
        }
    }
}

/// The gate shared by the trainer, the clinical job queue and the guard monitor. Cloning shares it.
#[derive(Debug, Clone)]
pub struct TrainingGate {
    inner: Arc<(Mutex<State>, Condvar)>,
}

impl Default for TrainingGate {
    fn default() -> Self {
        TrainingGate::new()
    }
}

/// While this lives, training stays parked (or parks at its next step boundary). Dropping it
/// releases the hold.
#[derive(Debug)]
pub struct GateHold {
    gate: TrainingGate,
}

impl Drop for GateHold {
    fn drop(&mut self) {
        self.gate.update(|s| {
            s.holders = s.holders.saturating_sub(1);
            if !s.must_park() {
                s.pause_requested_at = None;
            }
        });
    }
}

/// How a call to [`TrainingGate::boundary`] ended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BoundaryOutcome {
    /// Time spent parked at this boundary.
    pub parked: Duration,
    /// Time idled by throttling at this boundary.
    pub throttled: Duration,
    /// True when the stop flag ended a park: the caller should stop training.
    pub stopped: bool,
}

/// How often a parked trainer looks at its stop flag.
const STOP_POLL: Duration = Duration::from_millis(50);

impl TrainingGate {
    pub fn new() -> TrainingGate {
        TrainingGate {
            inner: Arc::new((
                Mutex::new(State {
                    holders: 0,
                    guard: GuardLevel::Run,
                    guard_reason: String::new(),
                    parked: false,
                    boundary: 0,
                    pause_requested_at: None,
                    pauses: 0,
                    clinical_pauses: 0,
                    parked_time: Duration::ZERO,
                    throttled: Duration::ZERO,
                    last_latency: None,
                    max_latency: None,
                }),
                Condvar::new(),
            )),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain counters behind: keep going.
        self.inner.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, f: impl FnOnce(&mut State)) {
        let mut s = self.lock();
        f(&mut s);
        s.note_request();
        drop(s);
        self.inner.1.notify_all();
    }

    /// Takes a hold: training parks at its next step boundary until every hold is dropped.
    pub fn hold(&self) -> GateHold {
        self.update(|s| s.holders += 1);
        GateHold { gate: self.clone() }
    }

    /// Sets the guards' decision and why.
    pub fn set_guard(&self, level: GuardLevel, reason: impl Into<String>) {
        let reason = reason.into();
        self.update(|s| {
            s.guard = level;
            s.guard_reason = reason;
            if !s.must_park() {
                s.pause_requested_at = None;
            }
        });
    }

    /// The gate's state now.
    pub fn status(&self) -> GateStatus {
        let s = self.lock();
        GateStatus {
            holders: s.holders,
            guard: s.guard,
            guard_reason: s.guard_reason.clone(),
            parked: s.parked,
            boundary: s.boundary,
            pauses: s.pauses,
            clinical_pauses: s.clinical_pauses,
            parked_seconds: s.parked_time.as_secs_f64(),
            throttled_seconds: s.throttled.as_secs_f64(),
            last_pause_latency_steps: s.last_latency,
            max_pause_latency_steps: s.max_latency,
        }
    }

    /// Waits until `cond` holds for the gate's status or `timeout` passes; returns the last status
    /// and whether the condition held. For tests and the clinical queue (wait until parked).
    pub fn wait_for(
        &self,
        timeout: Duration,
        mut cond: impl FnMut(&GateStatus) -> bool,
    ) -> (GateStatus, bool) {
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.status();
            if cond(&st) {
                return (st, true);
            }
            let now = Instant::now();
            if now >= deadline {
                return (st, false);
            }
            let g = self.lock();
            let _ = self
                .inner
                .1
                .wait_timeout(g, (deadline - now).min(STOP_POLL))
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Called by the trainer between steps with the number of steps taken so far and how long the
    /// last step took. Returns at once, after the throttle's idle time, or after a park; a raised
    /// `stop` ends a park or an idle early (`stopped: true`).
    pub fn boundary(&self, step: u64, last_step: Duration, stop: &AtomicBool) -> BoundaryOutcome {
        let mut out = BoundaryOutcome {
            parked: Duration::ZERO,
            throttled: Duration::ZERO,
            stopped: false,
        };
        let mut s = self.lock();
        s.boundary = step;
        if s.must_park() {
            let requested = s.pause_requested_at.unwrap_or(step);
            let latency = step.saturating_sub(requested);
            s.last_latency = Some(latency);
            s.max_latency = Some(s.max_latency.map_or(latency, |m| m.max(latency)));
            s.pauses += 1;
            if s.holders > 0 {
                s.clinical_pauses += 1;
            }
            s.parked = true;
            self.inner.1.notify_all();
            let t0 = Instant::now();
            while s.must_park() {
                if stop.load(Ordering::SeqCst) {
                    out.stopped = true;
                    break;
                }
                s = self
                    .inner
                    .1
                    .wait_timeout(s, STOP_POLL)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            out.parked = t0.elapsed();
            s.parked = false;
            s.pause_requested_at = None;
            s.parked_time += out.parked;
            self.inner.1.notify_all();
            return out;
        }
        if let GuardLevel::Throttle(f) = s.guard {
            let f = f.clamp(0.01, 1.0);
            let idle = last_step.mul_f64(1.0 / f - 1.0);
            let t0 = Instant::now();
            let deadline = t0 + idle;
            // Idle, but wake at once for a hold or a pause (it must not wait out the idle); a new
            // guard reading (the monitor updates the reason every period) does not cut it short.
            while Instant::now() < deadline && !s.must_park() {
                if stop.load(Ordering::SeqCst) {
                    out.stopped = true;
                    break;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                s = self
                    .inner
                    .1
                    .wait_timeout(s, left.min(STOP_POLL))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            out.throttled = t0.elapsed();
            s.throttled += out.throttled;
            if s.must_park() && !out.stopped {
                drop(s);
                let more = self.boundary(step, Duration::ZERO, stop);
                out.parked = more.parked;
                out.stopped = more.stopped;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::thread;

    /// A fake trainer: "steps" of `step` duration, reporting each boundary to the gate.
    fn fake_trainer(
        gate: TrainingGate,
        steps: u64,
        step: Duration,
        stop: Arc<AtomicBool>,
        done: Arc<AtomicU64>,
    ) -> thread::JoinHandle<()> {
        thread::spawn(move || {
            let mut last = Duration::ZERO;
            for i in 0..steps {
                if stop.load(Ordering::SeqCst) || gate.boundary(i, last, &stop).stopped {
                    return;
                }
                let t0 = Instant::now();
                while t0.elapsed() < step {
                    std::hint::spin_loop();
                }
                last = t0.elapsed();
                done.store(i + 1, Ordering::SeqCst);
            }
        })
    }

    #[test]
    fn holds_are_counted_and_park_the_trainer_within_one_step() {
        let gate = TrainingGate::new();
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let t = fake_trainer(
            gate.clone(),
            1_000_000,
            Duration::from_millis(2),
            stop.clone(),
            done.clone(),
        );
        let long = Duration::from_secs(20);
        assert!(gate.wait_for(long, |s| s.boundary >= 3).1);
        let a = gate.hold();
        let b = gate.hold();
        let (st, ok) = gate.wait_for(long, |s| s.parked);
        assert!(ok, "{st:?}");
        assert_eq!(st.holders, 2);
        assert!(st.last_pause_latency_steps.unwrap() <= 1, "{st:?}");
        let at = done.load(Ordering::SeqCst);
        drop(a);
        // One hold left: still parked, no step taken.
        let st = gate.status();
        assert!(st.parked && st.holders == 1, "{st:?}");
        assert_eq!(done.load(Ordering::SeqCst), at);
        drop(b);
        assert!(gate.wait_for(long, |s| !s.parked && s.boundary > at + 2).1);
        let st = gate.status();
        assert_eq!((st.pauses, st.clinical_pauses), (1, 1));
        assert!(st.parked_seconds > 0.0);
        stop.store(true, Ordering::SeqCst);
        t.join().unwrap();
    }

    #[test]
    fn guard_pause_throttle_and_stop() {
        let gate = TrainingGate::new();
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        gate.set_guard(GuardLevel::Throttle(0.5), "warm");
        let t = fake_trainer(
            gate.clone(),
            1_000_000,
            Duration::from_millis(5),
            stop.clone(),
            done.clone(),
        );
        let long = Duration::from_secs(20);
        assert!(gate.wait_for(long, |s| s.throttled_seconds > 0.01).1);
        gate.set_guard(GuardLevel::Pause, "hot");
        let (st, ok) = gate.wait_for(long, |s| s.parked);
        assert!(ok, "{st:?}");
        assert_eq!(st.guard_reason, "hot");
        assert_eq!(st.clinical_pauses, 0);
        assert!(st.max_pause_latency_steps.unwrap() <= 1, "{st:?}");
        // A raised stop flag ends the park: shutdown never waits for the guards.
        stop.store(true, Ordering::SeqCst);
        t.join().unwrap();
        assert!(!gate.status().parked);
    }
}
