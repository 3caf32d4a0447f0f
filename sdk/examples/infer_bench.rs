//! Times a bundle's model through the SDK (ort → ONNX Runtime), for `bench/sdk_inference.sh`.
//!
//! `cargo run --release -p cosilo-sdk --example infer_bench -- BUNDLE [THREADS] [SIZE] [BATCHES] [SEGMENT_BATCH]`
//!
//! For each batch size (default `1,16`) it runs `[batch, 1, SIZE, SIZE]` (default 256) through
//! [`Segmenter::run_slices`] with THREADS intra-op threads (default 2): 3 warm-up calls, then at
//! least 10 timed calls and 3 s, and prints one JSON line with the median and minimum time per call. The input
//! is the same deterministic pattern `bench/sdk_inference.py` feeds, and the line carries the sum of
//! the first call's output so the two sides can be checked to compute the same thing. A last line
//! times [`Segmenter::segment`] end to end on a 16-slice volume (normalisation, padding, argmax),
//! SEGMENT_BATCH slices per call (default: [`SegmenterOptions`]'s).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use cosilo_sdk::segment::{Segmenter, SegmenterOptions};
use cosilo_sdk::{Geometry, Volume};

/// The benchmark input: `((i · 2654435761) mod 1000) / 1000`, in [0, 1) like normalised MR.
fn pattern(n: usize) -> Vec<f32> {
    (0..n as u64)
        .map(|i| ((i * 2_654_435_761) % 1000) as f32 / 1000.0)
        .collect()
}

/// Median and minimum milliseconds per call, and the number of timed calls.
fn time_calls(
    min_calls: usize,
    min_time: Duration,
    mut f: impl FnMut() -> Result<()>,
) -> Result<(f64, f64, usize)> {
    for _ in 0..3 {
        f()?;
    }
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < min_calls || start.elapsed() < min_time {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], times[0], times.len()))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let bundle = args
        .first()
        .context("usage: infer_bench BUNDLE [THREADS] [SIZE] [BATCHES] [SEGMENT_BATCH]")?;
    let threads: usize = args
        .get(1)
        .map_or(Ok(2), |s| s.parse())
        .context("THREADS")?;
    let size: usize = args.get(2).map_or(Ok(256), |s| s.parse()).context("SIZE")?;
    let batches: Vec<usize> = args
        .get(3)
        .map_or("1,16", String::as_str)
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .context("BATCHES")?;
    let segment_batch: usize = args
        .get(4)
        .map_or(Ok(SegmenterOptions::default().batch_slices), |s| s.parse())
        .context("SEGMENT_BATCH")?;
    let options = SegmenterOptions {
        intra_threads: Some(threads),
        batch_slices: segment_batch,
        ..Default::default()
    };
    let segmenter = Segmenter::open_with(bundle, &options)?;

    for &batch in &batches {
        let input = pattern(batch * size * size);
        let shape = [batch, 1, size, size];
        let checksum: f64 = segmenter
            .run_slices(&input, shape)?
            .iter()
            .map(|&p| p as f64)
            .sum();
        let (median_ms, min_ms, calls) = time_calls(10, Duration::from_secs(3), || {
            segmenter.run_slices(&input, shape)?;
            Ok(())
        })?;
        println!(
            "{{\"runtime\": \"sdk\", \"what\": \"run\", \"batch\": {batch}, \"size\": {size}, \"threads\": {threads}, \
             \"median_ms\": {median_ms:.3}, \"min_ms\": {min_ms:.3}, \"calls\": {calls}, \"checksum\": {checksum:.6}}}"
        );
    }

    let nz = 16;
    let g = Geometry::axis_aligned([size, size, nz], [1.0, 1.0, 3.0], [0.0; 3]);
    let volume = Volume::new(
        g,
        pattern(size * size * nz)
            .iter()
            .map(|v| v * 1000.0)
            .collect(),
    )?;
    let (median_ms, min_ms, calls) = time_calls(5, Duration::from_secs(3), || {
        segmenter.segment(&volume)?;
        Ok(())
    })?;
    println!(
        "{{\"runtime\": \"sdk\", \"what\": \"segment\", \"batch\": {nz}, \"segment_batch\": {segment_batch}, \"size\": {size}, \"threads\": {threads}, \
         \"median_ms\": {median_ms:.3}, \"min_ms\": {min_ms:.3}, \"calls\": {calls}}}"
    );
    Ok(())
}
