//! The one weighted-average kernel every strategy aggregates with.
//!
//! [`WeightedAverage`] keeps a single `f32` accumulator the size of one model and adds updates
//! into it as they arrive: `acc += weight · update`, a chunked loop the compiler vectorises (AVX2
//! with fused multiply-add where the CPU has it, chosen at run time; SSE2 otherwise). Encoded
//! updates ([`WeightedAverage::add_encoded`]) are streamed block by block (16 KiB of values) from
//! their `f16` or zstd bytes, never decoded into a whole second model, so the extra memory is the
//! accumulator plus small buffers however many updates are added. An encoded update is checked
//! completely (length, finiteness, zstd cap) before any of it touches the accumulator, so a bad
//! update is refused without spoiling the good ones already added. When a round's updates are
//! all at hand, [`WeightedAverage::add_many`] adds them in one pass over the accumulator (about
//! 2-3× the bandwidth of a plain copy; `bench/results/aggregate.md`). [`soft_pull`] is FedSM's
//! SoftPull (`λ·own + (1-λ)·mean`) in the same style.
//!
//! Accuracy: each addition rounds once in `f32`, so the result is within about
//! `N · 2⁻²⁴ · Σ wᵢ|xᵢ| / Σ wᵢ` of the exact average (tests check 1e-6 of that scale against an
//! `f64` reference).

use rayon::prelude::*;

use super::weights::{for_each_block, WeightFormat, WeightsError, BLOCK};

/// Values per parallel task when [`WeightedAverage::parallel`] is on (1 MiB of `f32`).
const PAR_CHUNK: usize = 1 << 18;

/// A failed aggregation step.
#[derive(Debug, thiserror::Error)]
pub enum AggregateError {
    /// An update has a different number of values from the accumulator.
    #[error("update has {actual} values, the model has {expected}")]
    Length {
        /// The model's size.
        expected: usize,
        /// The update's size.
        actual: usize,
    },
    /// A weight is negative, NaN or infinite.
    #[error("weight {0} is not a finite non-negative number")]
    BadWeight(f64),
    /// `finish` with a total weight of zero (nothing added).
    #[error("no update with a positive weight was added")]
    Empty,
    /// SoftPull's λ is outside [0, 1].
    #[error("soft-pull lambda {0} is outside [0, 1]")]
    BadLambda(f32),
    /// An encoded update was refused (length, non-finite values, zstd); nothing of it was added.
    #[error("encoded update refused: {0}")]
    Decode(#[from] WeightsError),
}

/// A running weighted average of model-sized vectors.
#[derive(Debug, Clone)]
pub struct WeightedAverage {
    acc: Vec<f32>,
    total: f64,
    count: usize,
    parallel: bool,
}

impl WeightedAverage {
    /// An empty average of vectors of `n` values (allocates the accumulator: `4n` bytes).
    pub fn new(n: usize) -> Self {
        WeightedAverage {
            acc: vec![0.0; n],
            total: 0.0,
            count: 0,
            parallel: false,
        }
    }

    /// Splits [`WeightedAverage::add`] over rayon's pool for models above 1 Mi values. Off by
    /// default: aggregation is memory-bound and the appliance's cores are usually training.
    pub fn parallel(mut self, on: bool) -> Self {
        self.parallel = on;
        self
    }

    /// Number of values per vector.
    pub fn len(&self) -> usize {
        self.acc.len()
    }

    /// True for a zero-length model.
    pub fn is_empty(&self) -> bool {
        self.acc.is_empty()
    }

    /// Updates added so far.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Sum of the weights added so far.
    pub fn total_weight(&self) -> f64 {
        self.total
    }

    fn check(&self, len: usize, weight: f64) -> Result<(), AggregateError> {
        if len != self.acc.len() {
            return Err(AggregateError::Length {
                expected: self.acc.len(),
                actual: len,
            });
        }
        if !(weight.is_finite() && weight >= 0.0) {
            return Err(AggregateError::BadWeight(weight));
        }
        Ok(())
    }

    /// Adds `weight · w` (typically `weight` = the update's sample count).
    pub fn add(&mut self, w: &[f32], weight: f64) -> Result<(), AggregateError> {
        self.check(w.len(), weight)?;
        let wf = weight as f32;
        if self.parallel && w.len() > PAR_CHUNK {
            self.acc
                .par_chunks_mut(PAR_CHUNK)
                .zip(w.par_chunks(PAR_CHUNK))
                .for_each(|(a, x)| axpy(a, x, wf));
        } else {
            axpy(&mut self.acc, w, wf);
        }
        self.total += weight;
        self.count += 1;
        Ok(())
    }

    /// Adds several updates in one pass over the accumulator: block by block (16 KiB of values,
    /// which stay in L1), every update is added before moving on, so the accumulator is read and
    /// written once from memory instead of once per update. Same result as calling
    /// [`WeightedAverage::add`] for each in order. Checks every update before adding any.
    pub fn add_many(&mut self, updates: &[(&[f32], f64)]) -> Result<(), AggregateError> {
        for (w, weight) in updates {
            self.check(w.len(), *weight)?;
        }
        let blocked = |acc: &mut [f32], start: usize| {
            for (i, a) in acc.chunks_mut(BLOCK).enumerate() {
                let s = start + i * BLOCK;
                for (w, weight) in updates {
                    axpy(a, &w[s..s + a.len()], *weight as f32);
                }
            }
        };
        if self.parallel && self.acc.len() > PAR_CHUNK {
            self.acc
                .par_chunks_mut(PAR_CHUNK)
                .enumerate()
                .for_each(|(i, a)| blocked(a, i * PAR_CHUNK));
        } else {
            blocked(&mut self.acc, 0);
        }
        for (_, weight) in updates {
            self.total += weight;
            self.count += 1;
        }
        Ok(())
    }

    /// Adds `weight ·` an update encoded in `fmt` (see [`super::weights::FlatWeights::encode`]),
    /// streaming it in blocks. The payload is validated in a first pass (a second zstd
    /// decompression for `f16+zstd`) so a refused update leaves the average unchanged.
    pub fn add_encoded(
        &mut self,
        bytes: &[u8],
        fmt: WeightFormat,
        weight: f64,
    ) -> Result<(), AggregateError> {
        self.check(self.acc.len(), weight)?;
        let n = self.acc.len();
        for_each_block(bytes, fmt, n, |_, _| Ok(()))?;
        let wf = weight as f32;
        let acc = &mut self.acc;
        for_each_block(bytes, fmt, n, |off, block| {
            axpy(&mut acc[off..off + block.len()], block, wf);
            Ok(())
        })?;
        self.total += weight;
        self.count += 1;
        Ok(())
    }

    /// The average: the accumulator divided by the total weight.
    pub fn finish(mut self) -> Result<Vec<f32>, AggregateError> {
        if self.total <= 0.0 {
            return Err(AggregateError::Empty);
        }
        let scale = (1.0 / self.total) as f32;
        for a in &mut self.acc {
            *a *= scale;
        }
        Ok(self.acc)
    }
}

/// FedSM's SoftPull: `λ·own + (1-λ)·others_mean`, value by value.
pub fn soft_pull(
    own: &[f32],
    others_mean: &[f32],
    lambda: f32,
) -> Result<Vec<f32>, AggregateError> {
    if own.len() != others_mean.len() {
        return Err(AggregateError::Length {
            expected: own.len(),
            actual: others_mean.len(),
        });
    }
    if !(0.0..=1.0).contains(&lambda) {
        return Err(AggregateError::BadLambda(lambda));
    }
    let mut out: Vec<f32> = others_mean.iter().map(|m| m * (1.0 - lambda)).collect();
    axpy(&mut out, own, lambda);
    Ok(out)
}

/// `acc[i] += w · x[i]`, with FMA on CPUs that have AVX2 and FMA.
///
/// # Panics
/// If the slices differ in length (a programming error: callers check sizes first).
pub fn axpy(acc: &mut [f32], x: &[f32], w: f32) {
    assert_eq!(acc.len(), x.len(), "axpy on slices of different lengths");
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            unsafe { axpy_avx2_fma(acc, x, w) };
            return;
        }
    }
    axpy_portable(acc, x, w);
}

/// The loop body both variants compile: 64 lanes at a time so LLVM unrolls it without bounds
/// checks, then the tail.
macro_rules! axpy_body {
    ($acc:expr, $x:expr, $w:expr, |$a:ident, $v:ident| $op:expr) => {{
        let mut ac = $acc.chunks_exact_mut(64);
        let mut xc = $x.chunks_exact(64);
        for (ab, xb) in (&mut ac).zip(&mut xc) {
            for ($a, &$v) in ab.iter_mut().zip(xb) {
                *$a = $op;
            }
        }
        for ($a, &$v) in ac.into_remainder().iter_mut().zip(xc.remainder()) {
            *$a = $op;
        }
    }};
}

fn axpy_portable(acc: &mut [f32], x: &[f32], w: f32) {
    axpy_body!(acc, x, w, |a, v| *a + w * v);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn axpy_avx2_fma(acc: &mut [f32], x: &[f32], w: f32) {
    axpy_body!(acc, x, w, |a, v| v.mul_add(w, *a));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::encode_values;
    use cosilo_rng::Rng;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = Rng::new(seed);
        (0..n).map(|_| rng.normal() as f32).collect()
    }

    /// The f64 reference and the scale Σ wᵢ|xᵢ| / Σ wᵢ per value.
    fn reference(updates: &[(Vec<f32>, f64)]) -> (Vec<f64>, Vec<f64>) {
        let n = updates[0].0.len();
        let total: f64 = updates.iter().map(|u| u.1).sum();
        let mut mean = vec![0f64; n];
        let mut scale = vec![0f64; n];
        for (x, w) in updates {
            for i in 0..n {
                mean[i] += w * x[i] as f64 / total;
                scale[i] += w * (x[i] as f64).abs() / total;
            }
        }
        (mean, scale)
    }

    #[test]
    fn matches_an_f64_reference() {
        // An odd length exercises the 64-lane tail.
        let n = 10_007;
        let updates: Vec<(Vec<f32>, f64)> = (0..7)
            .map(|k| {
                (
                    random(n, k),
                    [40.0, 15.0, 5.0, 1.0, 3.5, 100.0, 0.25][k as usize],
                )
            })
            .collect();
        let (mean, scale) = reference(&updates);
        for parallel in [false, true] {
            let mut avg = WeightedAverage::new(n).parallel(parallel);
            for (x, w) in &updates {
                avg.add(x, *w).unwrap();
            }
            assert_eq!(avg.count(), 7);
            let out = avg.finish().unwrap();
            for i in 0..n {
                let err = (out[i] as f64 - mean[i]).abs();
                assert!(err <= 1e-6 * scale[i], "{i}: {} vs {}", out[i], mean[i]);
            }
            // One pass over all updates gives bit-identical results to one add per update.
            let mut many = WeightedAverage::new(n).parallel(parallel);
            let refs: Vec<(&[f32], f64)> =
                updates.iter().map(|(x, w)| (x.as_slice(), *w)).collect();
            many.add_many(&refs[..3]).unwrap();
            many.add_many(&refs[3..]).unwrap();
            assert_eq!(many.count(), 7);
            assert_eq!(many.finish().unwrap(), out);
            let mut bad = WeightedAverage::new(n);
            let short = (&updates[0].0[1..], 1.0);
            assert!(bad.add_many(&[refs[0], short]).is_err());
            assert_eq!(bad.count(), 0, "nothing added when one update is refused");
        }
    }

    #[test]
    fn portable_and_fma_kernels_agree() {
        let x = random(1000, 9);
        let mut a = random(1000, 10);
        let mut b = a.clone();
        axpy_portable(&mut a, &x, 0.3);
        axpy(&mut b, &x, 0.3);
        for (p, q) in a.iter().zip(&b) {
            assert!((p - q).abs() <= 1e-6 * (1.0 + p.abs()));
        }
    }

    #[test]
    fn streaming_an_encoded_update_adds_the_bits_of_its_decoded_values() {
        // What keeps the federation's results unchanged now that strategies hold peers' models
        // encoded: the streamed sum equals the sum of the decoded copies bit for bit (an odd
        // length, so the last block ends inside a 64-lane chunk).
        let n = 3 * 4096 + 17;
        let updates: Vec<(Vec<f32>, f64)> = (0..5)
            .map(|k| (random(n, 40 + k), [40.0, 15.0, 5.0, 1.0, 3.5][k as usize]))
            .collect();
        for fmt in WeightFormat::ALL {
            let mut streamed = WeightedAverage::new(n);
            let mut decoded = WeightedAverage::new(n);
            for (x, w) in &updates {
                let bytes = encode_values(x, fmt);
                streamed.add_encoded(&bytes, fmt, *w).unwrap();
                let mut values = Vec::new();
                for_each_block(&bytes, fmt, n, |_, b| {
                    values.extend_from_slice(b);
                    Ok(())
                })
                .unwrap();
                decoded.add(&values, *w).unwrap();
            }
            let bits = |a: WeightedAverage| {
                a.finish()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>()
            };
            assert_eq!(bits(streamed), bits(decoded), "{fmt}");
        }
    }

    #[test]
    fn encoded_updates_average_like_decoded_ones() {
        let n = 3 * 4096 + 17;
        let updates: Vec<(Vec<f32>, f64)> = (0..4)
            .map(|k| (random(n, 20 + k), 1.0 + k as f64))
            .collect();
        let (mean, scale) = reference(&updates);
        for fmt in WeightFormat::ALL {
            let mut avg = WeightedAverage::new(n);
            for (x, w) in &updates {
                avg.add_encoded(&encode_values(x, fmt), fmt, *w).unwrap();
            }
            let out = avg.finish().unwrap();
            let tol = if fmt == WeightFormat::F32 {
                1e-6
            } else {
                2f64.powi(-11)
            };
            for i in 0..n {
                let err = (out[i] as f64 - mean[i]).abs();
                assert!(
                    err <= tol * scale[i] + 1e-7,
                    "{fmt} {i}: {} vs {}",
                    out[i],
                    mean[i]
                );
            }
        }
    }

    #[test]
    fn refused_update_leaves_the_average_unchanged() {
        let n = 5000;
        let good = random(n, 1);
        let mut bad = random(n, 2);
        bad[4900] = f32::NAN; // in the last block: earlier blocks are valid
        for fmt in WeightFormat::ALL {
            let mut avg = WeightedAverage::new(n);
            avg.add(&good, 2.0).unwrap();
            let e = avg
                .add_encoded(&encode_values(&bad, fmt), fmt, 1.0)
                .unwrap_err();
            assert!(
                matches!(
                    e,
                    AggregateError::Decode(WeightsError::NonFinite { index: 4900, .. })
                ),
                "{e}"
            );
            let e = avg.add(&good[1..], 1.0).unwrap_err();
            assert!(matches!(e, AggregateError::Length { .. }));
            assert!(matches!(
                avg.add(&good, -1.0),
                Err(AggregateError::BadWeight(_))
            ));
            assert!(matches!(
                avg.add(&good, f64::NAN),
                Err(AggregateError::BadWeight(_))
            ));
            assert_eq!(avg.count(), 1);
            assert_eq!(avg.finish().unwrap(), good);
        }
        assert!(matches!(
            WeightedAverage::new(3).finish(),
            Err(AggregateError::Empty)
        ));
    }

    #[test]
    fn soft_pull_mixes_own_and_mean() {
        let own = random(300, 3);
        let mean = random(300, 4);
        assert_eq!(soft_pull(&own, &mean, 1.0).unwrap(), own);
        assert_eq!(soft_pull(&own, &mean, 0.0).unwrap(), mean);
        let half = soft_pull(&own, &mean, 0.25).unwrap();
        for i in 0..300 {
            let r = 0.25 * own[i] as f64 + 0.75 * mean[i] as f64;
            assert!((half[i] as f64 - r).abs() <= 1e-6 * (own[i].abs() + mean[i].abs()) as f64);
        }
        assert!(matches!(
            soft_pull(&own, &mean, 1.5),
            Err(AggregateError::BadLambda(_))
        ));
        assert!(matches!(
            soft_pull(&own, &mean[1..], 0.5),
            Err(AggregateError::Length { .. })
        ));
    }

    /// Peak resident memory (VmHWM) grows by about one accumulator, not with the number of
    /// encoded updates streamed through it. Measured in child processes for clean peaks.
    #[test]
    fn memory_stays_within_two_models() {
        let exe = std::env::current_exe().unwrap();
        let mut extra = Vec::new();
        let mut model_bytes = 0.0;
        for updates in [2, 12] {
            let out = std::process::Command::new(&exe)
                .args(["--exact", "aggregate::tests::memory_child"])
                .args(["--nocapture", "--ignored", "--test-threads=1"])
                .env("COSILO_AGG_MEM_UPDATES", updates.to_string())
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "{text}");
            // libtest prints "test name ... " before the child's own output on the same line.
            let line = text.split("MEM ").nth(1).expect("child reports MEM");
            let line = line.lines().next().unwrap_or_default();
            let v: Vec<f64> = line.split(' ').map(|s| s.parse().unwrap()).collect();
            model_bytes = v[0];
            extra.push(v[1]);
        }
        assert!(
            extra[1] <= 2.0 * model_bytes,
            "{extra:?} for a {model_bytes} B model"
        );
        assert!(
            extra[0] >= 0.9 * model_bytes,
            "the accumulator must show: {extra:?}"
        );
        // Going from 2 to 12 updates keeps nothing per update.
        assert!(extra[1] - extra[0] <= 0.25 * model_bytes, "{extra:?}");
    }

    fn vm_hwm() -> f64 {
        let s = std::fs::read_to_string("/proc/self/status").unwrap();
        let l = s.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
        l.split_whitespace().nth(1).unwrap().parse::<f64>().unwrap() * 1024.0
    }

    #[test]
    #[ignore = "run by memory_stays_within_two_models in a child process"]
    fn memory_child() {
        let updates: usize = match std::env::var("COSILO_AGG_MEM_UPDATES") {
            Ok(v) => v.parse().unwrap(),
            Err(_) => return,
        };
        let n = 8 << 20; // 32 MiB of f32
        let zstd = encode_values(&random(n, 1), WeightFormat::F16Zstd);
        let raw = encode_values(&random(n, 2), WeightFormat::F16);
        // Reset the high-water mark to the current RSS (Linux ≥ 4.0): making the inputs peaked.
        std::fs::write("/proc/self/clear_refs", "5").unwrap();
        let base = vm_hwm();
        let mut avg = WeightedAverage::new(n);
        for k in 0..updates {
            if k % 2 == 0 {
                avg.add_encoded(&zstd, WeightFormat::F16Zstd, 1.0).unwrap();
            } else {
                avg.add_encoded(&raw, WeightFormat::F16, 1.0).unwrap();
            }
        }
        let out = avg.finish().unwrap();
        assert_eq!(out.len(), n);
        println!("MEM {} {}", n * 4, vm_hwm() - base);
    }
}
